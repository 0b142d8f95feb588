"""Checkpoints of a sharded run: consolidated HF weights, one optimizer-state file per rank, trainer_state.json last.

`save_checkpoint` (runtime.rank_train calls it after the last step and the steps in `save_at`)
writes the weights consolidated on rank 0 as an HF directory (`model.safetensors` +
`config.json`, which `AutoModelForCausalLM.from_pretrained` loads), each rank's optimizer state
in its own `optimizer-rank{r}-of-{W}.safetensors` (local slices of every chunk, counters in its
header, crc32-checked: runtime.sharded_optim), and `trainer_state.json` (steps trained, world
size, the fp16 loss scaler) written last; every file atomically. `load_checkpoint` =
`read_checkpoint` + `restore_checkpoint`. Resuming needs the same world size and chunk table; a
resumed run equals the uninterrupted one bitwise on CPU. `load_weights` puts an HF directory's
weights (read on rank 0, broadcast) into the sharded model. Every step that can fail on one rank
is a `collective_call` (runtime.process_group), so all ranks raise together.

Known limitations: the full weights are gathered into rank 0's host memory to be written;
checkpoints of another world size are refused, not resharded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from planner.errors import ChunkftError
from planner.fsio import atomic_path, atomic_write_json, atomic_write_text
from runtime.process_group import collective_call

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"


def _tied_duplicates(model, weights: dict[str, torch.Tensor]) -> set[str]:
    """Names whose parameter is the same object as an earlier name's (tied embeddings)."""
    seen: dict[int, str] = {}
    dup = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and name in weights:
            dup.add(name)
        seen.setdefault(id(p), name)
    return dup


def full_weights(model, path: Path) -> dict[str, torch.Tensor]:
    """Every parameter's full tensor from an HF directory's safetensors file(s), by name; a tied
    parameter saved once (lm_head tied to the embedding) is filled from its twin."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("optimizer-")]
    if not files:
        raise ChunkftError(f"no *.safetensors weights in {str(path)!r}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error types
            raise ChunkftError(f"weights file {str(f)!r} is unreadable ({str(e).splitlines()[0]})") from None
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        twin = first.setdefault(id(p), name)
        if name not in weights and twin in weights:
            weights[name] = weights[twin]
    missing = [n for n, _ in model.named_parameters() if n not in weights]
    if missing:
        raise ChunkftError(f"weights in {str(path)!r} lack {len(missing)} parameters, e.g. {missing[0]!r}")
    return weights


def load_weights(model, path: str | os.PathLike) -> None:
    """Rank 0 reads an HF directory's weights and broadcasts them into the sharded model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = collective_call(lambda: full_weights(model, Path(path)) if dist.get_rank() == 0 else {})
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def read_trainer_state(path: str | os.PathLike) -> dict:
    """A checkpoint's trainer_state.json: {"step", "world_size", "loss_scaler"}; ChunkftError if
    it is missing or malformed (it is written last: without it the checkpoint is incomplete)."""
    from planner.fsio import read_json

    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise ChunkftError(f"no complete checkpoint in {str(path)!r} ({STATE_FILE} missing)")
    state = read_json(file, what="trainer state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("world_size"), int):
        raise ChunkftError(f"{str(file)!r} is malformed: expected integer 'step' and 'world_size'")
    return state


def save_checkpoint(model, optimizer, out_dir: str | os.PathLike, *, step: int, scaler=None) -> None:
    """Consolidated HF weights on rank 0, each rank's optimizer state in its own file, then
    trainer_state.json (module docstring). Collective: every rank calls it."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from runtime.sharded_optim import save_state_file, state_file_name

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write() -> None:
        save_state_file(optimizer, out / state_file_name(rank, world))
        if rank == 0:
            tied = _tied_duplicates(model, weights)
            tensors = {k: v.contiguous() for k, v in weights.items() if k not in tied}
            try:
                with atomic_path(out / WEIGHTS_FILE) as tmp:
                    save_file(tensors, str(tmp), metadata={"format": "pt"})
            except OSError as e:
                raise ChunkftError(f"cannot write {str(out / WEIGHTS_FILE)!r}: {e.strerror or e}") from None
            atomic_write_text(out / "config.json", model.config.to_json_string(use_diff=True))

    collective_call(write)
    del weights

    def finish() -> None:
        if rank == 0:
            atomic_write_json(out / STATE_FILE, {"step": step, "world_size": world,
                                                 "loss_scaler": scaler.state_dict() if scaler else None})

    collective_call(finish)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(trainer state, this rank's optimizer tensors, their meta) of `save_checkpoint`'s
    directory, checked: complete, saved by this world size, the file intact. Collective (a
    ChunkftError on any rank is raised on all); train_rank reads before building the model."""
    import torch.distributed as dist

    from runtime.sharded_optim import read_state_file, state_file_name

    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(path)

    def read():
        state = read_trainer_state(path)
        if state["world_size"] != world:
            raise ChunkftError(f"checkpoint {str(path)!r} was saved by {state['world_size']} ranks; "
                               f"this run has {world} (resume with the same world size)")
        return (state, *read_state_file(path / state_file_name(rank, world)))

    return collective_call(read)


def restore_checkpoint(model, optimizer, path: str | os.PathLike, saved: tuple[dict, dict, dict], *,
                       scaler=None) -> int:
    """Load `read_checkpoint(path)`'s result and the directory's weights into the sharded model,
    this rank's optimizer (same chunk table) and the fp16 scaler; returns the step it was saved
    after. Collective."""
    state, tensors, meta = saved
    load_weights(model, path)
    collective_call(lambda: optimizer.check_state(tensors, meta))
    optimizer.load_state_dict(tensors, meta)
    if scaler is not None and state.get("loss_scaler") is not None:
        scaler.load_state_dict(state["loss_scaler"])
    return state["step"]


def load_checkpoint(model, optimizer, path: str | os.PathLike, *, scaler=None) -> int:
    """`read_checkpoint` then `restore_checkpoint`: the step the checkpoint was saved after."""
    return restore_checkpoint(model, optimizer, path, read_checkpoint(path), scaler=scaler)
