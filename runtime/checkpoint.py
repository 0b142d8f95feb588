"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

Layout of OUT/step-000120/ (OUT/latest names the newest complete one):
  model.safetensors, config.json   the weights, loadable by AutoModelForCausalLM.from_pretrained
  optimizer.safetensors            every tensor of the optimizer's state_dict (all chunks' fp32
                                   masters and moments), keyed by their path in that state_dict
  rng.safetensors                  torch CPU and CUDA generator states
  state.json                       the optimizer's non-tensor state (active chunk, its step count,
                                   schedule position, ...), loss-scaler state, python `random`
                                   state, data position, step, fingerprints
  manifest.json                    size and sha256 of every file above, written last

A checkpoint is written into a hidden temporary directory beside its final place and renamed
into place when complete; `latest` is replaced atomically afterwards. A crash mid-write leaves
the previous checkpoint and `latest` untouched, and a hidden `.step-N.*.tmp` directory (up to a
near-full checkpoint) that `remove_stale_temporaries` deletes when the next run on OUT starts.
Nothing here uses pickle.

Known limitations: the optimizer's state is gathered into memory to be written (a disk-tier
optimizer's state is read back from its files); checkpoints older than the newest `keep` are
deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from planner.errors import ChunkftError
from planner.fsio import atomic_write_text

CHECKPOINT_VERSION = 1
LATEST = "latest"
_TENSOR_KEY = "__tensor__"  # marks where a tensor was taken out of a JSON tree
_FILES = ("model.safetensors", "config.json", "optimizer.safetensors", "rng.safetensors", "state.json")


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` if needed and prove a file can be written there; a one-line
    ChunkftError otherwise (checked before training, not after the first hour)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ChunkftError(f"output directory {str(out)!r} is not writable: {e.strerror or e}") from None
    return out


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete what interrupted writes left in `out_dir` (a checkpoint's `.step-N.*.tmp`
    directory, `.latest.*.tmp`); only for the one process that owns OUT (runtime.run_lock).
    Returns what was removed."""
    removed = []
    for stale in Path(out_dir).glob(".*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def flatten_tensors(tree, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """Split a nested dict/list tree into a JSON tree (tensors replaced by {"__tensor__": key})
    and a {key: tensor} map for safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path: str):
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {_TENSOR_KEY: path}
        if isinstance(node, dict):
            assert all(isinstance(k, (str, int)) for k in node), "state keys must be str or int"
            return {str(k): walk(v, f"{path}{k}/") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}{i}/") for i, v in enumerate(node)]
        if hasattr(node, "value") and not isinstance(node, (int, float, str, bool)):  # enums
            return node.value
        assert node is None or isinstance(node, (int, float, str, bool)), f"cannot store {type(node)} at {path}"
        return node

    return walk(tree, prefix), tensors


def unflatten_tensors(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of `flatten_tensors` (lists stay lists; integer dict keys come back as str)."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR_KEY}:
            return tensors[tree[_TENSOR_KEY]]
        return {k: unflatten_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_tensors(v, tensors) for v in tree]
    return tree


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses shared storages)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: _own_storage(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied aliases dropped (the first name of a storage wins, as in
    HF's own save_pretrained), so from_pretrained re-ties them."""
    seen: set = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        # an alias is the same bytes, not merely the same storage: runtime.stream's host copies
        # of one layer are views into one flat buffer
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    """What `load_checkpoint` returns besides the weights it copies into the model."""

    path: Path
    step: int
    optimizer: dict  # the optimizer's state_dict, tensors restored
    state: dict  # state.json: "scaler", "data", "extra", fingerprints


def save_checkpoint(out_dir: str | os.PathLike, *, step: int, model: torch.nn.Module, optimizer_state: dict,
                    state: dict, keep: int = 2) -> Path:
    """Write step `step`'s checkpoint under `out_dir` atomically and point `latest` at it.
    `state` is JSON-able run state (data position, scaler, fingerprints, ...)."""
    out = Path(out_dir)
    final = out / f"step-{step:06d}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=out))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the finished checkpoint private
    except OSError as e:
        raise ChunkftError(f"cannot write checkpoint {str(final)!r}: {e.strerror or e}") from None
    try:
        _save_tensors(tmp / "model.safetensors", model_tensors(model))
        config = getattr(model, "config", None)
        (tmp / "config.json").write_text(config.to_json_string() if config is not None else "{}\n")
        opt_tree, opt_tensors = flatten_tensors(optimizer_state)
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        rng_tensors = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng_tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        _save_tensors(tmp / "rng.safetensors", rng_tensors)
        version, internal, gauss = random.getstate()
        doc = {"checkpoint_version": CHECKPOINT_VERSION, "step": step, "optimizer": opt_tree,
               "python_random": {"version": version, "state": list(internal), "gauss_next": gauss}, **state}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in _FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if final.exists():  # a re-run of the same step: the new copy replaces the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ChunkftError(f"cannot write checkpoint {str(final)!r}: {e.strerror or e}") from None
        if type(e).__name__ == "SafetensorError":  # safetensors' own error for a failed write (a full disk)
            first = (str(e).strip().splitlines() or ["write failed"])[0]
            raise ChunkftError(f"cannot write checkpoint {str(final)!r}: {first}") from None
        raise
    atomic_write_text(out / LATEST, final.name + "\n")
    for old in sorted(out.glob("step-*"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `OUT/latest` names, or None when there is none."""
    pointer = Path(out_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or not (Path(out_dir) / name).is_dir():
        raise ChunkftError(f"{str(pointer)!r} names checkpoint {name!r}, which does not exist in {str(out_dir)!r}")
    return Path(out_dir) / name


def _verify(path: Path) -> None:
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ChunkftError(f"checkpoint {str(path)!r} is incomplete: manifest.json is missing") from None
    except (OSError, ValueError) as e:
        raise ChunkftError(f"checkpoint {str(path)!r} is corrupted: manifest.json unreadable ({e})") from None
    for name in _FILES:
        f = path / name
        if not f.exists():
            raise ChunkftError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")
        want = manifest.get(name, {})
        if f.stat().st_size != want.get("bytes") or _sha256(f) != want.get("sha256"):
            raise ChunkftError(f"checkpoint {str(path)!r} is corrupted: {name} does not match its size/checksum "
                               f"in manifest.json")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ChunkftError(f"checkpoint file {str(path)!r} is not readable safetensors: {e}") from None


def read_state(path: str | os.PathLike) -> dict:
    """state.json of the checkpoint at `path` (version checked, files not verified): what a
    run reads before it builds anything, e.g. the run id to continue."""
    path = Path(path)
    try:
        doc = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise ChunkftError(f"checkpoint {str(path)!r} is incomplete: state.json is missing") from None
    except (OSError, ValueError) as e:
        raise ChunkftError(f"checkpoint {str(path)!r}: state.json is not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("checkpoint_version") != CHECKPOINT_VERSION:
        version = doc.get("checkpoint_version") if isinstance(doc, dict) else None
        raise ChunkftError(f"checkpoint {str(path)!r} has version {version!r}; this "
                           f"runtime reads version {CHECKPOINT_VERSION}")
    return doc


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    check: Callable[[dict], None] | None = None) -> Checkpoint:
    """Verify the checkpoint at `path`, copy its weights into `model` (shapes must match) and
    restore the RNG states; return the optimizer and run state for the caller to apply.
    `check(state)` sees state.json first and may refuse (raise) before anything is touched."""
    path = Path(path)
    _verify(path)
    doc = read_state(path)
    if check is not None:
        check(doc)
    weights = _load_tensors(path / "model.safetensors")
    own = model_tensors(model)
    if set(weights) != set(own):
        diff = sorted(set(weights) ^ set(own))[:3]
        raise ChunkftError(f"checkpoint {str(path)!r} holds weights for another model (differs in {diff})")
    with torch.no_grad():
        for name, t in own.items():
            if t.shape != weights[name].shape or t.dtype != weights[name].dtype:
                raise ChunkftError(f"checkpoint {str(path)!r}: {name} is {tuple(weights[name].shape)} "
                                   f"{weights[name].dtype}, the model has {tuple(t.shape)} {t.dtype}")
            t.copy_(weights[name])
    optimizer = unflatten_tensors(doc.pop("optimizer"), _load_tensors(path / "optimizer.safetensors"))
    rng = _load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    py = doc.pop("python_random")
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    return Checkpoint(path=path, step=int(doc["step"]), optimizer=optimizer, state=doc)
