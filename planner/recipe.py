"""A recipe: how the user's training step is written, as opposed to where its bytes rest.

A `Strategy` (planner.strategy) is what the solver chooses: chunks, tiers, checkpointing on or
off, staging. A `Recipe` is what the user already runs and the planner must model as it is;
each axis is traced with the real implementation under fake tensors, never a bytes-per-parameter
formula. It travels in the plan file (`"recipe"`), in `fit`/`plan`/`size` flags and in
`--json`, and keys the trace cache (an axis that changes the traced step is part of
`TraceOptions.key()`).

Axes (flag: values; the vocabulary is HF TrainingArguments' `optim` names and
PYTORCH_CUDA_ALLOC_CONF's syntax):
- `--loop` (`loop`): how forward, loss and backward are written.
    chunkft  planner.step.step_loss: the model's own loss with `use_cache=False`, keeping only
             the loss tensor (or the chunked loss). `chunkft run` executes either loop.
    hf       the plain Hugging Face loop, `out = model(input_ids=ids, labels=ids);
             out.loss.backward()`, with the config's defaults: the output object keeps the
             logits alive through backward, and `use_cache` (True in most configs) keeps every
             layer's keys and values until `out` goes.
    hf-trainer  transformers.Trainer's training_step: the same forward, the output dropped
             inside compute_loss before backward.
    torchtune  torchtune's full_finetune_single_device step: logits in 8 chunks, an fp32
             cross-entropy per chunk (CEWithChunkedOutputLoss), `del logits` before backward.
- `--precision` (`precision`): mixed = 16-bit (or fp32) weights and gradients with an fp32
  master and fp32 state (fp16: with loss scaling); pure = weights, gradients and optimizer state
  all in the training dtype, no master (torchtune's and LitGPT's bf16 default; with --dtype fp32:
  fp32 training without a master copy).
- `--optim` (`optim`): the optimizer implementation (`OPTIMS`). planner.optim_step traces each
  one's real step (state and temporaries) for planner.evaluate; `chunkft` keeps ChunkAdamW's
  constants. Pure precision needs an optimizer other than `chunkft` (ChunkAdamW keeps a master).
  With ChunkFT (C > 1) or state resting off the GPU only `CHUNK_HELD_OPTIMS` are priced; the
  sharded planner and `chunkft run` price and run `chunkft`/mixed only (`conflict`,
  `require_sharded_modelled`, `require_runnable`).
- `--optimizer-in-backward` (`optimizer_in_backward`): each parameter steps and frees its
  gradient as soon as it is accumulated (torchtune's optimizer_in_bwd, LOMO).
- `--checkpointing off|on|every-K|selective`: on/off is the strategy's choice (a pin when
  given); every-K (`checkpoint_every`) checkpoints every K-th decoder layer; selective
  (`selective_checkpointing`) is op-level, saving matmul outputs (torchtitan's "op" mode).
- `--offload-activations` (`offload_activations`): saved activations go to host memory
  (torch.autograd.graph.save_on_cpu, torchtune's enable_activation_offloading).
- `--trainable PATTERN` / `--freeze PATTERN` (`trainable`, `freeze`): fnmatch patterns over
  parameter names; the trainable set is every parameter matching a --trainable pattern (all
  when none is given) and no --freeze pattern.
- `--lora RANK` (`lora_rank`, `lora_targets`): LoRA adapters of this rank on the named linear
  modules of a frozen base.
- `--alloc-conf STRING` (`alloc_conf`): PYTORCH_CUDA_ALLOC_CONF options of the CUDA caching
  allocator (expandable_segments, max_split_size_mb, roundup_power2_divisions,
  garbage_collection_threshold; planner.cuda_alloc.AllocConf), kept normalised; the replay of
  the traced step (planner.memory) runs the allocator with them.

`Recipe.require_modelled()` refuses, in one line, an axis value the cost model does not price
yet; a plan states the recipe it was made for so that an older plan never passes for a newer
recipe. `conflict(strategy)` names a strategy the recipe cannot run (every-K / selective need
checkpointing on; LoRA and the optimizer in backward need one chunk; the optimizer in backward
needs the GPU optimizer and no fp16 loss scaling); `require_runnable()` refuses what `chunkft
run` does not execute yet, `require_sharded_modelled()` what the sharded cost model does not
price yet (the axes of `traced_axes()`).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import re

from planner.errors import ChunkftError


class Loop(str, enum.Enum):
    """How the training step's forward, loss and backward are written."""

    CHUNKFT = "chunkft"
    HF = "hf"
    HF_TRAINER = "hf-trainer"
    TORCHTUNE = "torchtune"


class Precision(str, enum.Enum):
    """Which copies of the weights exist and in what dtype."""

    MIXED = "mixed"  # training-dtype weights and gradients, fp32 master and optimizer state
    PURE = "pure"  # everything in the training dtype, no master


# --optim: HF TrainingArguments `optim` names where one exists, and what each means.
OPTIMS = {
    "chunkft": "chunkft's ChunkAdamW: fp32 master and moments, one tensor per chunk span, stepped span by span",
    "adamw_torch": "torch.optim.AdamW, default implementation (foreach on CUDA)",
    "adamw_torch_foreach": "torch.optim.AdamW(foreach=True)",
    "adamw_torch_forloop": "torch.optim.AdamW(foreach=False, fused=False): one parameter at a time",
    "adamw_torch_fused": "torch.optim.AdamW(fused=True)",
    "adamw_bf16": "AdamW with bf16 moments (the ChunkFT reference's state)",
    "adamw_torch_8bit": "torchao.optim.AdamW8bit: block-wise 8-bit moments",
    "adamw_bnb_8bit": "bitsandbytes AdamW8bit",
    "paged_adamw_8bit": "bitsandbytes PagedAdamW8bit: 8-bit state in unified memory",
    "paged_adamw_32bit": "bitsandbytes PagedAdamW32bit: fp32 state in unified memory",
    "adafactor": "Adafactor (factored second moment, no first moment)",
    "sgd": "torch.optim.SGD with momentum",
}
CHUNK_HELD_OPTIMS = ("adamw_bf16", "adamw_torch_8bit")
"""--optim values whose state ChunkAdamW could hold span by span: priced with ChunkFT (C > 1) and
with state resting on host or disk; the others are priced for one chunk with state on the GPU."""
RUNNABLE_OPTIMS = ("chunkft",) + CHUNK_HELD_OPTIMS
"""--optim values `chunkft run` executes (ChunkAdamW with runtime.lean_state's formats)."""
IN_BACKWARD_OPTIMS = ("adamw_torch_forloop",) + RUNNABLE_OPTIMS
"""--optim values priced with --optimizer-in-backward: ChunkAdamW's formats (what `chunkft run`
steps in backward, span by span, C > 1 too) and torch's per-tensor AdamW(foreach=False)."""


def chunk_adamw_in_backward(optim: str, mixed: bool) -> bool:
    """Whether an optimizer step in backward is ChunkAdamW's span step (its formats; chunkft
    keeps an fp32 master, so not under pure precision) rather than torch's per-tensor AdamW."""
    return optim in RUNNABLE_OPTIMS and (mixed or optim != "chunkft")


DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
SEARCH_LEVELS = ("none", "exact", "lean")
"""--search-recipes: which of `Recipe.variants` the solver (plan) and fit may choose."""
MAX_PATTERNS = 64
_CHECKPOINTING = re.compile(r"^(off|on|selective|every-([1-9][0-9]{0,3}))$")
_NAME = re.compile(r"^[A-Za-z0-9_.*?\[\]-]{1,200}$")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    """The user's training step (see the module docstring)."""

    loop: Loop = Loop.CHUNKFT
    precision: Precision = Precision.MIXED
    optim: str = "chunkft"
    optimizer_in_backward: bool = False
    checkpoint_every: int = 1
    """With checkpointing on: checkpoint every K-th decoder layer (1 = every layer)."""
    selective_checkpointing: bool = False
    """With checkpointing on: op-level selective checkpointing instead of whole layers."""
    offload_activations: bool = False
    trainable: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    alloc_conf: str = ""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "loop", _enum(Loop, self.loop, "loop"))
        set_(self, "precision", _enum(Precision, self.precision, "precision"))
        if self.optim not in OPTIMS:
            raise ChunkftError(f"invalid optim {self.optim!r}: valid names are {', '.join(OPTIMS)}")
        for name in ("optimizer_in_backward", "selective_checkpointing", "offload_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ChunkftError(f"invalid {name} {getattr(self, name)!r}: must be true or false")
        for name, low in (("checkpoint_every", 1), ("lora_rank", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or v > 65536:
                raise ChunkftError(f"invalid {name} {v!r}: must be an integer from {low} to 65536")
        if self.selective_checkpointing and self.checkpoint_every != 1:
            raise ChunkftError("selective checkpointing is op-level in every layer; it does not combine with every-K")
        for name in ("trainable", "freeze", "lora_targets"):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, (tuple, list)):
                raise ChunkftError(f"invalid {name} {v!r}: must be a list of name patterns")
            if len(v) > MAX_PATTERNS or any(not isinstance(p, str) or not _NAME.match(p) for p in v):
                raise ChunkftError(f"invalid {name} {list(v)[:4]!r}: up to {MAX_PATTERNS} patterns of letters, "
                                   "digits and . _ - * ? [ ]")
            set_(self, name, tuple(v))
        if self.lora_rank and not self.lora_targets:
            raise ChunkftError("--lora needs at least one target module name")
        if not isinstance(self.alloc_conf, str) or len(self.alloc_conf) > 400:
            raise ChunkftError(f"invalid alloc_conf {self.alloc_conf!r}: must be a PYTORCH_CUDA_ALLOC_CONF string")
        from planner.cuda_alloc import AllocConf  # parsed and checked here, kept as normalised text

        set_(self, "alloc_conf", AllocConf.parse(self.alloc_conf).normalised())

    # -- what the cost model prices ----------------------------------------------------------

    def require_modelled(self) -> None:
        """Refuse (one line) an axis value the cost model does not price yet."""
        unmodelled = []
        if self.precision == Precision.PURE and self.optim == "chunkft" and not self.optimizer_in_backward:
            raise ChunkftError("--precision pure has no fp32 master, but --optim chunkft (ChunkAdamW) keeps one: "
                               f"pick a pure optimizer, e.g. --optim adamw_torch or adamw_bf16 (valid: "
                               f"{', '.join(o for o in OPTIMS if o != 'chunkft')})")
        if unmodelled:
            raise ChunkftError(f"{unmodelled[0]} is not modelled by this planner yet; leave it at its default "
                               f"(planner.recipe lists each axis)")

    def traced_axes(self) -> list[str]:
        """The flags of this recipe's axes that change the traced step beyond the loop
        (planner.activations, planner.train_axes), as the user wrote them."""
        out = []
        if self.checkpoint_every != 1:
            out.append(f"--checkpointing every-{self.checkpoint_every}")
        if self.selective_checkpointing:
            out.append("--checkpointing selective")
        if self.offload_activations:
            out.append("--offload-activations")
        if self.trainable or self.freeze:
            out.append("--trainable/--freeze")
        if self.lora_rank:
            out.append(f"--lora {self.lora_rank}")
        if self.optimizer_in_backward:
            out.append("--optimizer-in-backward")
        return out

    def require_sharded_modelled(self) -> None:
        """Refuse (one line) what the sharded cost model (planner.sharding) does not price: it
        traces the loop only, not the axes of `traced_axes` (one-GPU plans price them)."""
        self.require_modelled()
        axes = self.traced_axes()
        if self.optim != "chunkft":
            axes.insert(0, f"--optim {self.optim}")
        if self.precision != Precision.MIXED:
            axes.insert(0, f"--precision {self.precision.value}")
        if axes:
            raise ChunkftError(f"{axes[0]} is priced for one-GPU plans only; the sharded cost model does not "
                               f"trace it yet (plan without --gpus, or leave it at its default)")

    def require_runnable(self) -> None:
        """Refuse (one line) a recipe `chunkft run` cannot execute: its runtime runs either loop
        with every parameter trained and the plan's optimizer, whose
        state ChunkAdamW holds as `--optim` chunkft, adamw_bf16 or adamw_torch_8bit, mixed or
        (not with chunkft) pure precision (runtime.lean_state), after backward or inside it
        (ChunkAdamW(step_in_backward)), under the plan's allocator settings
        (runtime.run_cli.apply_alloc_conf), with the plan's activation policy (every-K or
        selective checkpointing, offloaded activations: the tracer's own mechanisms)."""
        self.require_modelled()
        runs_optim = self.optim in RUNNABLE_OPTIMS
        default = Recipe(loop=self.loop, optimizer_in_backward=self.optimizer_in_backward,  # ChunkAdamW(step_in_backward)
                         alloc_conf=self.alloc_conf,  # runtime.run_cli.apply_alloc_conf
                         checkpoint_every=self.checkpoint_every, selective_checkpointing=self.selective_checkpointing,
                         offload_activations=self.offload_activations,  # planner.step / planner.activations
                         **({"optim": self.optim, "precision": self.precision} if runs_optim else {}))
        if self != default:
            axes = self.traced_axes() or [f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}"
                                          for f in dataclasses.fields(self)
                                          if getattr(self, f.name) != getattr(default, f.name)]
            raise ChunkftError(f"the plan's recipe has {axes[0]}, which chunkft run does not execute yet; "
                               "run it in your own loop, or plan without it")

    def conflict(self, strategy, dtype: str | None = None) -> str | None:
        """Why this recipe cannot run `strategy` (one line), or None. `fit` and the solver leave
        such strategies out; planner.evaluate refuses them."""
        from planner.strategy import OptimizerDevice
        from planner.schema import Tier

        if self.optim != "chunkft":  # planner.optim_step prices these on the GPU optimizer
            if strategy.optimizer_device == OptimizerDevice.HOST:
                return (f"--optim {self.optim} steps on the GPU; chunkft's host optimizer is ChunkAdamW "
                        "(use the GPU optimizer, or --optim chunkft)")
            if self.optim not in CHUNK_HELD_OPTIMS and (strategy.chunks > 1 or strategy.state_tier != Tier.GPU):
                return (f"--optim {self.optim} with ChunkFT (C={strategy.chunks}): ChunkAdamW steps span by span and "
                        f"holds only {' or '.join(CHUNK_HELD_OPTIMS)} state (use one chunk)")
            if self.optimizer_in_backward and self.optim not in IN_BACKWARD_OPTIMS:
                return (f"--optimizer-in-backward steps ChunkAdamW's formats or torch.optim.AdamW(foreach=False) "
                        f"per tensor; --optim {self.optim} is neither (use --optim {', '.join(IN_BACKWARD_OPTIMS)})")
        if (self.checkpoint_every != 1 or self.selective_checkpointing) and not strategy.checkpointing:
            what = "selective" if self.selective_checkpointing else f"every-{self.checkpoint_every}"
            return f"--checkpointing {what} needs a strategy with checkpointing on"
        if self.lora_rank and strategy.chunks > 1:
            return (f"--lora trains adapters only; ChunkFT's {strategy.chunks} chunks cut base weights "
                    "(plan LoRA with one chunk)")
        if self.optimizer_in_backward:
            if strategy.chunks > 1 and not chunk_adamw_in_backward(self.optim, self.precision == Precision.MIXED):
                return (f"--optimizer-in-backward with --precision {self.precision.value} --optim {self.optim} steps "
                        f"whole tensors; ChunkFT's {strategy.chunks} chunks train sliced spans, which only "
                        "ChunkAdamW steps in backward (mixed precision, or --optim adamw_bf16 / adamw_torch_8bit)")
            if strategy.optimizer_device == OptimizerDevice.HOST:
                return "--optimizer-in-backward steps on the GPU inside backward; a host optimizer cannot (use the GPU optimizer)"
            if dtype == "fp16":
                return ("--optimizer-in-backward cannot skip a step on fp16 loss-scale overflow (each tensor has stepped "
                        "before the overflow is known): use --dtype bf16 or fp32")
        return None

    def variants(self, level: str) -> tuple["Recipe", ...]:
        """Recipes the solver may choose instead of this one (`--search-recipes`), each one
        `chunkft run` executes, differing from this recipe in one axis the user left at its
        default:
          exact  the same weights, less memory: selective or every-2nd-layer checkpointing,
                 activations offloaded to host (apply only to checkpointing plans / to any);
          lean   also what changes the arithmetic or the run's options: the optimizer step in
                 backward (no gradient clipping, one micro-batch), bf16 moments, torchao's
                 8-bit moments.
        """
        if level not in SEARCH_LEVELS:
            raise ChunkftError(f"invalid --search-recipes {level!r}: valid values are {', '.join(SEARCH_LEVELS)}")
        if level == "none":
            return ()
        default = Recipe()
        changes: list[dict] = []
        if self.checkpoint_every == 1 and not self.selective_checkpointing:
            changes += [{"selective_checkpointing": True}, {"checkpoint_every": 2}]
        if not self.offload_activations:
            changes.append({"offload_activations": True})
        if level == "lean":
            if not self.optimizer_in_backward:
                changes.append({"optimizer_in_backward": True})
            if self.optim == default.optim and self.precision == default.precision:
                changes += [{"optim": "adamw_bf16"}, {"optim": "adamw_torch_8bit"}]
        out = []
        for change in changes:
            try:
                variant = dataclasses.replace(self, **change)
                variant.require_runnable()
            except ChunkftError:
                continue
            out.append(variant)
        return tuple(out)

    def check_strategy(self, *, loss_chunk_tokens: int) -> None:
        """Refuse (one line) what this recipe cannot be combined with."""
        if self.loop != Loop.CHUNKFT and loss_chunk_tokens:
            raise ChunkftError(f"the {self.loop.value} loop computes its own loss; a chunked loss "
                               f"(loss_chunk_tokens={loss_chunk_tokens}) needs --loop chunkft")

    def is_trainable(self, name: str) -> bool:
        """Whether the base parameter `name` trains under --trainable / --freeze / --lora."""
        if self.lora_rank:
            return False
        if self.trainable and not any(fnmatch.fnmatchcase(name, p) for p in self.trainable):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.freeze)

    # -- text and JSON ----------------------------------------------------------------------

    def describe(self) -> str:
        loop = {Loop.CHUNKFT: "chunkft's step", Loop.HF: "plain HF loop (out = model(ids, labels=ids))",
                Loop.HF_TRAINER: "HF Trainer's training_step (output dropped before backward)",
                Loop.TORCHTUNE: "torchtune's full_finetune_single_device step (8 output chunks, fp32 CE per chunk)"
                }[self.loop]
        return ", ".join([loop, *self.changes()])

    def label(self) -> str:
        """Short text of the axes that differ from the default, for strategy labels ("" if none)."""
        short = {"optimizer in backward": "opt in bwd", "selective checkpointing": "selective ckpt",
                 "activations offloaded": "acts offloaded"}
        return ", ".join(short.get(p, p.split(" (")[0]) for p in self.changes())

    def changes(self) -> list[str]:
        """The axes (besides the loop) that differ from the default, as text."""
        parts: list[str] = []
        default = Recipe()
        if self.precision != default.precision:
            parts.append(f"{self.precision.value} precision")
        if self.optim != default.optim:
            paged = " (state in CUDA unified memory, counted as host RAM, outside PyTorch's allocator)"
            parts.append(self.optim + (paged if self.optim.startswith("paged_") else ""))
        if self.optimizer_in_backward:
            parts.append("optimizer in backward")
        if self.checkpoint_every != 1:
            parts.append(f"checkpoint every {self.checkpoint_every} layers")
        if self.selective_checkpointing:
            parts.append("selective checkpointing")
        if self.offload_activations:
            parts.append("activations offloaded")
        if self.trainable:
            parts.append(f"trainable {','.join(self.trainable)}")
        if self.freeze:
            parts.append(f"frozen {','.join(self.freeze)}")
        if self.lora_rank:
            parts.append(f"LoRA r={self.lora_rank} on {','.join(self.lora_targets)}")
        if self.alloc_conf:
            parts.append(f"alloc {self.alloc_conf}")
        return parts

    def to_json(self) -> dict:
        """The loop and every axis that differs from its default (older plans stay readable)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "loop" and v == f.default:
                continue
            out[f.name] = v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_args(cls, args) -> "Recipe":
        """The recipe flags of fit / plan / size (`add_recipe_args`)."""
        ckpt = getattr(args, "checkpointing", None) or "on"
        return cls(loop=args.loop, precision=getattr(args, "precision", "mixed"), optim=getattr(args, "optim", "chunkft"),
                   optimizer_in_backward=bool(getattr(args, "optimizer_in_backward", False)),
                   checkpoint_every=int(ckpt[6:]) if ckpt.startswith("every-") else 1,
                   selective_checkpointing=ckpt == "selective",
                   offload_activations=bool(getattr(args, "offload_activations", False)),
                   trainable=tuple(getattr(args, "trainable", None) or ()),
                   freeze=tuple(getattr(args, "freeze", None) or ()),
                   lora_rank=getattr(args, "lora", None) or 0,
                   lora_targets=tuple(getattr(args, "lora_targets", None) or DEFAULT_LORA_TARGETS),
                   alloc_conf=getattr(args, "alloc_conf", None) or "")

    @classmethod
    def from_json(cls, doc: object) -> "Recipe":
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise ChunkftError(f"recipe must be a JSON object, got {type(doc).__name__}")
        unknown = sorted(set(doc) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ChunkftError(f"recipe has unknown field {unknown[0]!r}; valid fields: "
                               f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


def checkpointing_pin(text: str | None) -> bool | None:
    """The strategy's checkpointing on/off that `--checkpointing` pins (None: not given)."""
    if text is None:
        return None
    return text != "off"


def _checkpointing(text: str) -> str:
    if not _CHECKPOINTING.match(text):
        raise ValueError(text)
    return text


_checkpointing.__name__ = "checkpointing (off, on, every-K or selective)"


def add_recipe_args(p) -> None:
    """The recipe's flags, shared by `fit`, `plan` and `size`."""
    g = p.add_argument_group("recipe (the training step you run; planner.recipe)")
    g.add_argument("--loop", choices=[v.value for v in Loop], default=Loop.CHUNKFT.value,
                   help="chunkft: chunkft's own step (default); hf: the plain HF loop, out = model(input_ids=ids, "
                        "labels=ids); out.loss.backward(), which holds logits and use_cache's keys and values "
                        "through backward; hf-trainer: transformers.Trainer's training_step; torchtune: "
                        "torchtune's full_finetune_single_device step with its chunked cross-entropy")
    g.add_argument("--precision", choices=[v.value for v in Precision], default=Precision.MIXED.value,
                   help="mixed: fp32 master and optimizer state (default); pure: weights, gradients and state all in "
                        "--dtype, no master")
    g.add_argument("--optim", choices=list(OPTIMS), default="chunkft", metavar="NAME",
                   help="optimizer implementation, HF TrainingArguments names: " + ", ".join(OPTIMS))
    g.add_argument("--optimizer-in-backward", action="store_true",
                   help="step each parameter and free its gradient as soon as it is accumulated")
    g.add_argument("--checkpointing", type=_checkpointing, metavar="off|on|every-K|selective",
                   help="activation checkpointing: off, every decoder layer, every K-th layer, or op-level selective "
                        "(default: fit shows its rows, plan searches on/off)")
    g.add_argument("--offload-activations", action="store_true", help="keep saved activations in host memory")
    g.add_argument("--trainable", action="append", metavar="PATTERN",
                   help="train only parameters whose names match (fnmatch; repeatable)")
    g.add_argument("--freeze", action="append", metavar="PATTERN",
                   help="freeze parameters whose names match (fnmatch; repeatable), e.g. 'model.embed_tokens.*'")
    g.add_argument("--lora", type=int, metavar="RANK", help="LoRA adapters of this rank on a frozen base")
    g.add_argument("--lora-targets", type=lambda s: tuple(s.split(",")), metavar="NAMES",
                   help=f"linear modules LoRA adapts (default {','.join(DEFAULT_LORA_TARGETS)})")
    g.add_argument("--search-recipes", choices=SEARCH_LEVELS, default="none",
                   help="also consider recipe variants chunkft run executes (Recipe.variants): exact = the same "
                        "weights with less memory (selective / every-2 checkpointing, offloaded activations); "
                        "lean = also the optimizer step in backward and bf16 / 8-bit moments (default none)")
    g.add_argument("--from", dest="from_file", metavar="FILE",
                   help="read the recipe from your own config: a torchtune recipe (.yaml), HF TrainingArguments "
                        "(training_args.json) or a DeepSpeed config (ds_config.json); planner.importers")
    g.add_argument("--alloc-conf", metavar="STRING",
                   help="PYTORCH_CUDA_ALLOC_CONF options, e.g. expandable_segments:True")


def _enum(cls: type[enum.Enum], value: object, what: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise ChunkftError(f"invalid {what} {value!r}: valid values are {', '.join(v.value for v in cls)}") from None
