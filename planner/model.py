"""Model intake: turn what the user typed into a causal LM we can build without weights.

A model spec is one of
  - a preset name from planner/presets/*.json ("llama3-8b"), case-insensitive, or one of its
    Hugging Face aliases ("meta-llama/Meta-Llama-3-8B");
  - a local HF model directory holding config.json, or a path to a config.json;
  - "package.module:function", a factory returning an nn.Module (its keyword `num_layers`, if
    it has one, receives depth overrides).

`ModelSpec.build(device="meta")` constructs the model under `torch.device("meta")`: parameters
get shapes and dtypes but no storage, and the init functions run as no-ops on meta tensors.
That is both the honest and the fastest way in transformers 5.x (a few milliseconds for two
Llama-3-8B-width layers once the modeling module is imported), with no patch of transformers'
init machinery. `build(device="cpu")` gives a randomly initialised real model, deterministic
under `torch.manual_seed`.

With planner.cache in use (`chunkft fit`), a preset or config.json whose content was resolved
before comes back as a deferred spec: fingerprint, depth and max_position_embeddings come from the
cache and the transformers config (which imports transformers and torch) is built on first use of
`config`.

Known limitations: factories have no config, so their fingerprint hashes parameter names,
shapes and dtypes instead; depth overrides of a config only keep per-layer *lists* consistent
(lists as long as the model is deep, such as `layer_types`), not per-layer index sets.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from planner.errors import ChunkftError
from planner.fsio import read_json
from planner.validate import check_config

if TYPE_CHECKING:
    import torch
    import transformers

PRESET_DIR = Path(__file__).with_name("presets")

# Keys left out of the fingerprint: they name where or with what a config was saved, or set
# runtime output flags, but do not change the parameters or the computation of a training step.
# `architectures` is dropped because we always build AutoModelForCausalLM from `model_type`;
# `dtype` because the step's dtype is part of the plan's step shape, not of the model.
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
})

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: enough to build the model, fingerprint it and find its layers."""

    name: str
    """What the user typed: preset name, directory, config path or "pkg.mod:fn"."""
    source: str
    """"preset" | "directory" | "config" | "factory"."""
    config: "transformers.PretrainedConfig | None"
    """The HF config; None for factories."""
    num_layers: int | None
    """Number of decoder layers (None if it cannot be told)."""
    factory: "Callable[..., Any] | None" = dataclasses.field(default=None, repr=False, compare=False)
    """The imported factory function (source == "factory" only)."""

    def fingerprint(self) -> str:
        """sha256 hex of the canonical (sorted-keys) config JSON minus VOLATILE_CONFIG_KEYS.

        The config is first normalised by transformers (`to_dict()` of the config class), so a
        config.json that spells a default out and one that omits it fingerprint the same; a
        transformers release that adds config fields changes fingerprints. Computed once per
        spec (treat `config` as immutable; derive variants with `config_for`).
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        if self.config is None:
            model = self.build(device="meta")
            canonical: Any = {
                "factory": self.name,
                "parameters": [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters()],
            }
        else:
            canonical = canonical_config_dict(self.config)
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()
        object.__setattr__(self, "_fingerprint", digest)  # a cache, not state: frozen otherwise
        return digest

    def config_for(self, num_layers: int | None) -> "transformers.PretrainedConfig":
        """A copy of the config with `num_layers` decoder layers (per-layer lists kept in step)."""
        assert self.config is not None, "factories have no config"
        if num_layers is None or num_layers == self.num_layers:
            return copy.deepcopy(self.config)
        if num_layers <= 0:
            raise ChunkftError(f"invalid num_layers {num_layers!r}: must be a positive integer")
        return with_num_layers(self.config, num_layers)

    def build(self, *, num_layers: int | None = None, dtype: "torch.dtype | None" = None,
              device: "str | torch.device" = "meta") -> "torch.nn.Module":
        """Construct the causal LM on `device` (default meta: no storage, no initialisation).

        dtype defaults to torch.bfloat16. `num_layers` overrides the depth (for templates).
        """
        import torch

        dtype = torch.bfloat16 if dtype is None else dtype
        if self.factory is not None:
            return _call_factory(self.name, self.factory, num_layers=num_layers, dtype=dtype, device=device)
        from transformers import AutoModelForCausalLM

        config = self.config_for(num_layers)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model

    def config_value(self, name: str) -> Any:
        """The config's attribute `name`; None without a config, or when it has none."""
        if self.config is None:
            return None
        try:
            return getattr(self.config, name, None)
        except Exception:  # some configs compute attributes from others
            return None

    def layer_prefix(self) -> str | None:
        """Dotted path of the decoder-layer ModuleList ("model.layers"), None if there is none."""
        # A 2-layer meta build takes milliseconds and finds the list whatever the architecture.
        model = self.build(num_layers=2 if self.factory is None else None, device="meta")
        found = find_layer_list(model)
        return None if found is None else found[0]

    def __hash__(self) -> int:
        # HF configs are unhashable; equal specs agree on these fields, which is all hash needs.
        return hash((self.name, self.source, self.num_layers))


def canonical_config_dict(config: "transformers.PretrainedConfig") -> dict:
    """The config as a plain dict minus volatile and private keys (see VOLATILE_CONFIG_KEYS)."""
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_")}


def with_num_layers(config: "transformers.PretrainedConfig", num_layers: int) -> "transformers.PretrainedConfig":
    """Copy of `config` with `num_hidden_layers = num_layers`.

    Lists as long as the old depth (Gemma 2 / Qwen2 / Mistral `layer_types`) are taken
    cyclically to the new depth, so a 2-layer template of Gemma 2 keeps one sliding and one
    global layer in the original order. The config class validates the result.
    """
    d = config.to_dict()
    # GPT-2 and others store the depth under their own name (attribute_map: n_layer).
    depth_key = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    old = d.get(depth_key)
    if old is None:
        raise ChunkftError(f"cannot override the depth of a {config.model_type!r} config: it has no num_hidden_layers")
    for key, value in d.items():
        if isinstance(value, list) and len(value) == old and key not in ("architectures",):
            d[key] = [value[i % old] for i in range(num_layers)]
    d[depth_key] = num_layers
    return _config_from_dict(d, where=f"{config.model_type} config with {num_layers} layers")


# ---------------------------------------------------------------------------- resolution

def list_presets() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(_presets())


def resolve_model(spec: str) -> ModelSpec:
    """Resolve a model spec string; bad specs are a one-line ChunkftError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ChunkftError(f"invalid model spec {spec!r}: give a preset ({', '.join(list_presets())}), "
                           "an HF model directory, a config.json, or package.module:function")
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ChunkftError(f"model directory {spec!r} has no config.json")
        return _from_config_dict(spec, "directory", read_json(config_path, what="model config"), config_path)
    if path.is_file():
        return _from_config_dict(spec, "config", read_json(path, what="model config"), path)
    preset = _aliases().get(spec.lower())
    if preset is not None:
        entry = _presets()[preset]
        return _from_config_dict(spec, "preset", entry["config"], PRESET_DIR / f"{preset}.json")
    if _FACTORY_RE.match(spec):
        return _from_factory(spec)
    if "/" in spec or "\\" in spec or spec.endswith(".json") or spec.startswith((".", "~")):
        raise ChunkftError(f"model path {spec!r} does not exist (and is not a known preset or alias)")
    raise ChunkftError(f"unknown model preset {spec!r}; presets are: {', '.join(list_presets())} "
                       "(or give an HF model directory, a config.json, or package.module:function)")


@functools.cache
def _presets() -> dict[str, dict]:
    """preset name -> its file's content ({"aliases", "source", "config", ...})."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        entry = read_json(path, what="preset")
        assert isinstance(entry.get("config"), dict), f"preset {path} has no config object"
        presets[path.stem] = entry
    return presets


@functools.cache
def _aliases() -> dict[str, str]:
    """lower-cased name or alias -> preset name."""
    table: dict[str, str] = {}
    for name, entry in _presets().items():
        for alias in [name, *entry.get("aliases", [])]:
            assert table.get(alias.lower(), name) == name, f"alias {alias!r} names two presets"
            table[alias.lower()] = name
    return table


def _config_from_dict(d: dict, *, where: str) -> "transformers.PretrainedConfig":
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = d.get("model_type")
    examples = "llama, mistral, qwen2, gemma2, phi3, gpt2"
    if not model_type:
        raise ChunkftError(f"{where} is not a model config: it has no \"model_type\" (e.g. {examples})")
    if model_type not in CONFIG_MAPPING:
        raise ChunkftError(f"{where} has unknown model_type {model_type!r}; transformers knows e.g. {examples}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ChunkftError(f"{where} has model_type {model_type!r}, which has no causal-LM class; "
                           f"causal LMs are e.g. {examples}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(d)
    except Exception as e:  # transformers' strict-dataclass validation raises several types
        raise ChunkftError(f"{where} is not a valid {model_type} config: {_one_line(e)}") from None


def _from_config_dict(name: str, source: str, d: Any, path: Path) -> ModelSpec:
    if not isinstance(d, dict):
        raise ChunkftError(f"model config {str(path)!r} is not a JSON object")
    from planner import cache

    where = f"model config {str(path)!r}"
    raw = copy.deepcopy(d)  # the key: transformers may change nested dicts (rope_scaling) in place
    known = cache.load("model", raw)  # planner.cache (`chunkft fit`): this content resolved before
    if isinstance(known, dict) and isinstance(known.get("fingerprint"), str):
        return _DeferredConfigSpec(name, source, raw=raw, where=where, known=known)
    config = _config_from_dict(copy.deepcopy(raw), where=where)  # the preset's own dict stays as read
    check_config(config, where)
    spec = ModelSpec(name=name, source=source, config=config, num_layers=getattr(config, "num_hidden_layers", None))
    if cache.active() is not None:
        values = {k: spec.config_value(k) for k in DEFERRED_CONFIG_VALUES}
        cache.store("model", raw, {"fingerprint": spec.fingerprint(), "num_layers": spec.num_layers,
                                 "values": {k: v for k, v in values.items() if v is None or isinstance(v, (int, str))}})
    return spec


# What a deferred spec answers without building its config (planner.validate.check_seq_for_model).
DEFERRED_CONFIG_VALUES = ("max_position_embeddings",)


class _DeferredConfigSpec(ModelSpec):
    """A preset or config.json spec resolved from planner.cache: name, source, depth and
    fingerprint are known, the config values of DEFERRED_CONFIG_VALUES too; the transformers
    config (which imports transformers and torch) is built on first use of `config`, from the
    same raw content, which passed `check_config` when it was cached."""

    def __init__(self, name: str, source: str, config: Any = None, num_layers: int | None = None,
                 factory: Any = None, *, raw: dict | None = None, where: str = "", known: dict | None = None):
        # dataclasses.replace(spec, config=...) comes here with a config: an ordinary spec then
        for field, value in (("name", name), ("source", source), ("num_layers", num_layers), ("factory", factory),
                             ("_config", config), ("_raw", raw), ("_where", where)):
            object.__setattr__(self, field, value)
        if known is not None:
            object.__setattr__(self, "num_layers", known.get("num_layers"))
            object.__setattr__(self, "_known", dict(known.get("values") or {}))
            object.__setattr__(self, "_fingerprint", known["fingerprint"])

    @property
    def config(self) -> "transformers.PretrainedConfig":
        if self._config is None and self._raw is not None:
            object.__setattr__(self, "_config", _config_from_dict(copy.deepcopy(self._raw), where=self._where))
        return self._config

    def config_value(self, name: str) -> Any:
        known = self.__dict__.get("_known", {})
        if self._config is None and name in known:
            return known[name]
        return super().config_value(name)


def _from_factory(spec: str) -> ModelSpec:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except SystemExit as e:  # a module that exits on import: not a traceback, not a silent exit
        raise ChunkftError(f"model factory {spec!r}: importing {module_name!r} called sys.exit({e.code!r}); "
                           "a factory module must import without exiting") from None
    except Exception as e:
        raise ChunkftError(f"model factory {spec!r}: cannot import {module_name!r}: {_one_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ChunkftError(f"model factory {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ChunkftError(f"model factory {spec!r} is not callable")
    import torch

    model = _call_factory(spec, obj, num_layers=None, dtype=torch.bfloat16, device="meta")
    layers = find_layer_list(model)
    return ModelSpec(name=spec, source="factory", config=None,
                     num_layers=None if layers is None else len(layers[1]), factory=obj)


def _call_factory(spec: str, fn: Callable[..., Any], *, num_layers: int | None, dtype, device) -> "torch.nn.Module":
    import torch

    kwargs = {}
    if num_layers is not None:
        if "num_layers" not in inspect.signature(fn).parameters:
            raise ChunkftError(f"model factory {spec!r} takes no num_layers argument, so its depth cannot be overridden")
        kwargs["num_layers"] = num_layers
    try:
        with torch.device(device):
            model = fn(**kwargs)
    except SystemExit as e:  # the factory's exit status is not chunkft's: bad input, exit 2
        raise ChunkftError(f"model factory {spec!r} called sys.exit({e.code!r}) instead of returning a "
                           "torch.nn.Module") from None
    except Exception as e:
        raise ChunkftError(f"model factory {spec!r} raised {type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ChunkftError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.to(dtype=dtype)


def find_layer_list(model: "torch.nn.Module") -> "tuple[str, torch.nn.ModuleList] | None":
    """(dotted path, ModuleList) of the decoder layers: the ModuleList of same-class blocks
    holding the most parameters. None if the model has no ModuleList."""
    import torch

    best, best_numel = None, -1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1:
                continue
            numel = sum(p.numel() for p in module.parameters())
            if numel > best_numel:
                best, best_numel = (name, module), numel
    return best



def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
