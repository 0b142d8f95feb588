"""The process group of a distributed run: setup and teardown, and errors every rank agrees on.

gloo on CPU, nccl on CUDA (each rank on its own local GPU). A ChunkftError on one rank must not
leave the others waiting in a collective: `agree_on_error` all-gathers each rank's error (or
None) at one point every rank reaches and raises the first on all of them; `collective_call`
runs a function that way (checkpoint reads and writes, loading weights).

Known limitations: only ChunkftError is agreed on; any other exception on one rank still leaves
the others waiting in their next collective.
"""

from __future__ import annotations

from typing import Callable

import torch

from planner.errors import ChunkftError


def init_process_group(*, rank: int, world_size: int, init_method: str, device: str) -> None:
    """gloo on CPU, nccl on CUDA (each rank on its own local GPU)."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def shutdown_process_group() -> None:
    """destroy_process_group after collecting garbage: the sharded model's reference cycles hold
    the process group, and left to interpreter shutdown gloo's worker threads abort the
    process (SIGABRT, "terminate called without an active exception") once in a few runs."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def agree_on_error(error: str | None) -> None:
    """Raise on every rank the first rank's error, if any rank has one (all ranks must call
    this at the same point: a rank that raised alone would leave the others in a collective)."""
    import torch.distributed as dist

    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    for rank, e in enumerate(errors):
        if e is not None:
            raise ChunkftError(e if dist.get_world_size() == 1 else f"rank {rank}: {e}")


def collective_call(fn: Callable[[], object]):
    """fn() on every rank; a ChunkftError on any rank is raised on all (see `agree_on_error`)."""
    result, error = None, None
    try:
        result = fn()
    except ChunkftError as e:
        error = str(e)
    agree_on_error(error)
    return result
