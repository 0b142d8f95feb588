"""Replay a traced step's allocations and frees into a memory timeline.

Peaks come from replaying allocation and free events in op order, never from summing the
maxima of components: at 8B the activations peak at the end of the forward and the gradients
at the end of the backward, and adding the two would overstate the step by gigabytes.

allocator="cpu": every storage costs its exact byte size (what glibc's malloc hands out, up to
its own few bytes of bookkeeping), matching the CPU ground truth of planner.measure.

allocator="cuda": PyTorch's CUDA caching allocator is replayed (planner.cuda_alloc, a model of
c10/cuda/CUDACachingAllocator.cpp with the PYTORCH_CUDA_ALLOC_CONF options as a typed AllocConf):
  - every request is rounded (round_size: 512 B multiples, or roundup_power2_divisions); the
    extra bytes are Component.ROUNDING in the allocated total;
  - requests up to 1 MiB come from the small pool (2 MiB segments), larger ones from the large
    pool (20 MiB segments under 10 MiB, else the request rounded up to 2 MiB); best fit, split
    and merge as PyTorch does; max_split_size_mb, garbage_collection_threshold and
    expandable_segments (one segment per pool and stream, mapped in 2 / 20 MiB pages) as the
    source does them.
  This gives `reserved` (bytes of segments held when nothing limits the allocator), which is
  what nvidia-smi shows minus the CUDA context on a GPU with room to spare. It is an upper
  bound of what a step needs: a request that finds no cached block and no room makes PyTorch
  free cached blocks and retry (release_available_cached_blocks, release_cached_blocks) before
  it raises OOM. `least_bytes` (replay(..., least=True)) is the least memory the step needs:
  the smallest cap under which the replay, retrying that way, never runs out (a bisection over
  capped replays, planner.cuda_alloc.least_reserved). Llama 3-8B, 1K tokens, no checkpointing:
  allocated 30.0 GiB, reserved 35.9 GiB, least 30.2 GiB: activations of 10 MiB and more get
  segments of their own size, the larger weight gradients of backward fit in none of them once
  freed, and freeing them is what a capped allocator does. expandable_segments:True: reserved
  30.9 GiB (-14%), least 30.7 GiB (20 MiB pages).
  The prefetch side stream's pool (side_stream_pool): a stream only reuses its own blocks, so
  chunk state prefetched on a torch.cuda.Stream (runtime.chunk_optim) is replayed as its own
  program, chunk after chunk, with the spans' actual sizes.
  The cuBLAS workspace is Component.OVERHEAD (aten/src/ATen/cuda/CublasHandlePool.cpp,
  parseChosenWorkspaceSize): by default ":4096:2:16:8" = 2 x 4096 KiB + 8 x 16 KiB = 8.125 MiB,
  and 4096 KiB x 8 = 32 MiB on compute capability 9.x, 10.x and 12.x (Hopper, Blackwell). It is
  allocated through the caching allocator (getNewWorkspace), so it counts in allocated and
  reserved, once per thread and stream (the workspace map is thread_local; cuBLASLt shares it
  unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=0). A training step has two: the forward's thread
  and autograd's device thread for backward. Both stay cached after the first step, so they
  are modelled as live before the step.

Known limitations: one step is replayed from an empty cache (a steady-state step starts from
the previous step's cached segments); record_stream's delayed reuse of blocks used on another
stream is not modelled; garbage_collection_threshold acts only under a cap (as in PyTorch, where
it needs set_per_process_memory_fraction), so it changes least_bytes, not reserved; the CUDA
context itself (hundreds of MiB outside PyTorch's allocator) is not in these bytes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from planner.errors import ChunkftError
from planner.schema import Component

if TYPE_CHECKING:
    from planner.opgraph import OpGraph

# c10/cuda/CUDACachingAllocator.cpp constants (PyTorch 2.x), kept in planner.cuda_alloc
from planner.cuda_alloc import (K_LARGE_BUFFER, K_MIN_BLOCK_SIZE, K_MIN_LARGE_ALLOC, K_ROUND_LARGE,  # noqa: E402,F401
                                K_SMALL_BUFFER, K_SMALL_SIZE, AllocConf, OutOfMemory, Program, least_reserved)
from planner.cuda_alloc import run as run_program  # noqa: E402

# aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize (default CUBLAS_WORKSPACE_CONFIG)
CUBLAS_WORKSPACE_32MB_BYTES = 4096 * 8 * 1024  # compute capability 9.x, 10.x, 12.x
CUBLAS_WORKSPACE_DEFAULT_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8  # ":4096:2:16:8" elsewhere
CUBLAS_WORKSPACE_32MB_MAJORS = (9, 10, 12)
TRAINING_CUBLAS_WORKSPACES = 2
"""One per thread that runs matmuls: the forward's and autograd's device thread in backward."""

ALLOCATORS = ("cpu", "cuda")
COMPONENTS = tuple(Component)
_COMPONENT_INDEX = {c: i for i, c in enumerate(COMPONENTS)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryTimeline:
    """Live bytes after every op of a step, per Component, from replaying its events in order."""

    allocator: str
    live_bytes: dict[Component, np.ndarray]
    """Per component, int64 array of length num_ops: bytes live right after each op."""
    total_bytes: np.ndarray
    """Allocated bytes after each op (sum over components)."""
    reserved_bytes: np.ndarray
    """Allocator-held bytes after each op (= total_bytes for the cpu allocator)."""
    start_bytes: int
    """Bytes live before the first op (weights, inputs, workspace): the measurement baseline."""
    peak_bytes: int
    """Largest allocated total over the step."""
    peak_op: int
    """First op at which `peak_bytes` is reached."""
    peak_reserved_bytes: int
    """Largest reserved (the caching allocator's cached segments, what nvidia-smi shows)."""
    least_bytes: int | None = None
    """The least memory the step needs: the smallest allocator cap (set_per_process_memory_fraction)
    under which the replay, freeing cached blocks and retrying as PyTorch does, never runs out
    (replay(..., least=True); None otherwise). allocated peak <= least_bytes <= peak_reserved_bytes."""

    def at(self, op: int) -> dict[Component, int]:
        """Bytes per component right after `op`."""
        return {c: int(a[op]) for c, a in self.live_bytes.items()}

    def at_peak(self) -> dict[Component, int]:
        return self.at(self.peak_op)

    @property
    def step_peak_bytes(self) -> int:
        """Peak growth over the bytes live before the step (what a baseline-subtracted measurement sees)."""
        return self.peak_bytes - self.start_bytes


def round_size(nbytes: int) -> int:
    """CUDACachingAllocator round_size: up to a multiple of kMinBlockSize (512 B), at least 512."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * ((nbytes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def segment_size(rounded: int) -> int:
    """CUDACachingAllocator get_allocation_size: bytes of a new segment for a rounded request."""
    if rounded <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if rounded < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((rounded + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


def cublas_workspace_bytes(major: int = 9) -> int:
    """Default cuBLAS workspace of one thread: 32 MiB on compute capability 9/10/12, else 8.125 MiB."""
    return CUBLAS_WORKSPACE_32MB_BYTES if major in CUBLAS_WORKSPACE_32MB_MAJORS else CUBLAS_WORKSPACE_DEFAULT_BYTES


def replay(graph: "OpGraph", *, allocator: str = "cpu", sm: int = 90,
           cublas_workspaces: int = TRAINING_CUBLAS_WORKSPACES, alloc_conf: "AllocConf | str | None" = None,
           least: bool = False) -> MemoryTimeline:
    """Replay `graph`'s allocations and frees.

    For allocator="cuda", `sm` (compute capability as 10 * major + minor: 80 Ampere, 89 Ada,
    90 Hopper) picks the cuBLAS workspace size and `cublas_workspaces` how many there are;
    `alloc_conf` (an AllocConf or PYTORCH_CUDA_ALLOC_CONF text) the allocator's options; `least`
    also searches the least memory the step needs (MemoryTimeline.least_bytes).
    """
    if allocator not in ALLOCATORS:
        raise ChunkftError(f"invalid allocator {allocator!r}: valid allocators are {', '.join(ALLOCATORS)}")
    conf = alloc_conf if isinstance(alloc_conf, AllocConf) else AllocConf.parse(alloc_conf)
    n = max(len(graph.ops), 1)
    infos = list(graph.storages.values())
    sizes = np.fromiter((s.nbytes for s in infos), dtype=np.int64, count=len(infos))
    comps = np.fromiter((_COMPONENT_INDEX[s.component] for s in infos), dtype=np.int64, count=len(infos))
    starts = np.fromiter((0 if s.alloc_op is None else s.alloc_op for s in infos), dtype=np.int64, count=len(infos))
    ends = np.fromiter((n if s.free_op is None else s.free_op + 1 for s in infos), dtype=np.int64, count=len(infos))
    pre = np.fromiter((s.alloc_op is None for s in infos), dtype=bool, count=len(infos))

    delta = np.zeros((len(COMPONENTS), n + 1), dtype=np.int64)
    np.add.at(delta, (comps, starts), sizes)
    np.add.at(delta, (comps, ends), -sizes)
    start_bytes = int(sizes[pre & (ends > 0)].sum())
    if allocator == "cuda":
        # round_size; an empty storage never reaches the allocator (it returns a null DataPtr)
        rounded = round_sizes(sizes, conf)
        extra = rounded - sizes
        r = _COMPONENT_INDEX[Component.ROUNDING]
        np.add.at(delta[r], starts, extra)
        np.add.at(delta[r], ends, -extra)
        start_bytes += int(extra[pre & (ends > 0)].sum())
        workspaces = [cublas_workspace_bytes(sm // 10)] * cublas_workspaces
        delta[_COMPONENT_INDEX[Component.OVERHEAD], 0] += sum(workspaces)
        delta[_COMPONENT_INDEX[Component.OVERHEAD], n] -= sum(workspaces)
        start_bytes += sum(workspaces)
    live = np.cumsum(delta, axis=1)[:, :n]
    total = live.sum(axis=0)
    least_bytes = None
    if allocator == "cuda":
        program = step_program(n, rounded, starts, ends, pre, [conf.round_size(b) for b in workspaces],
                               rounded=True)
        peak, per_op = run_program(program, conf, per_op=True)
        reserved = np.asarray(per_op, dtype=np.int64)
        if least:
            least_bytes = least_reserved(program, conf, low=int(total.max()) - 1, high=peak)
    else:
        reserved = total
    peak_op = int(np.argmax(total))
    return MemoryTimeline(
        allocator=allocator,
        live_bytes={c: live[i] for i, c in enumerate(COMPONENTS)},
        total_bytes=total,
        reserved_bytes=reserved,
        start_bytes=start_bytes,
        peak_bytes=int(total[peak_op]),
        peak_op=peak_op,
        peak_reserved_bytes=int(reserved.max()),
        least_bytes=least_bytes,
    )


def round_sizes(sizes: np.ndarray, conf: AllocConf = AllocConf()) -> np.ndarray:
    """round_size of every size (0 stays 0: an empty storage never reaches the allocator)."""
    if not any(conf.roundup_power2_divisions):
        return np.where(sizes == 0, 0, np.maximum(
            ((sizes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE, K_MIN_BLOCK_SIZE))
    memo: dict[int, int] = {}
    out = np.empty_like(sizes)
    for i, s in enumerate(sizes.tolist()):
        r = memo.get(s)
        if r is None:
            r = memo[s] = 0 if s == 0 else conf.round_size(s)
        out[i] = r
    return out


def step_program(n: int, sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray, pre: np.ndarray,
                 workspaces: list[int], *, keep: np.ndarray | None = None, rounded: bool = False) -> Program:
    """The caching allocator's view of a step: the workspaces and the storages live before the
    step (in id order: the order they were created), then per op its frees and allocations.
    `keep`: mask of the storages that reach the GPU (default all); `rounded`: the sizes are
    round_size'd already (`round_sizes`)."""
    ok = sizes > 0
    if keep is not None:
        ok &= keep
    first = [(-1 - i, int(b), 0) for i, b in enumerate(workspaces)]
    first += [(int(sid), int(sizes[sid]), 0) for sid in np.flatnonzero(pre & ok)]
    allocs: list[list] = [[] for _ in range(n)]
    frees: list[list] = [[] for _ in range(n)]
    for sid in np.flatnonzero(~pre & ok).tolist():
        allocs[int(starts[sid])].append((sid, int(sizes[sid]), 0))
    for sid in np.flatnonzero((ends < n) & ok).tolist():
        frees[int(ends[sid])].append(sid)
    return Program(pre=tuple(first), ops=tuple(zip(map(tuple, frees), map(tuple, allocs))), rounded=rounded)


SIDE_STREAM = 1
"""Stream id of the prefetch side stream in a Program (the default stream is 0)."""
_SIDE_POOLS: dict[tuple, tuple[int, int]] = {}


def side_stream_pool(chunk_tensors: tuple[tuple[int, ...], ...], depth: int,
                     alloc_conf: "AllocConf | str | None" = None) -> tuple[int, int]:
    """(reserved, least) bytes of the prefetch side stream's own pool over a cycle of chunk switches.

    runtime.chunk_optim loads the next chunk's state on a torch.cuda.Stream: its tensors are
    allocated in that stream's pool, where the default stream never reuses them, and freed back
    to it when the chunk is done. `chunk_tensors[k]`: bytes of chunk k's state tensors in the
    order they are created (per span: master, exp_avg, exp_avg_sq). With `depth` chunks ahead,
    chunks k .. k+depth are live while chunk k trains; a switch frees chunk k's, then
    allocates chunk k+depth+1's. Chunks of different span sizes leave blocks the next ones
    fit badly: reserved is the pool's high-water mark over two cycles (the cycle repeats), and
    least what it needs when the allocator frees cached blocks on a failed request."""
    conf = alloc_conf if isinstance(alloc_conf, AllocConf) else AllocConf.parse(alloc_conf)
    c = len(chunk_tensors)
    depth = max(0, min(depth, c - 1))
    key = (chunk_tensors, depth, conf)
    if key in _SIDE_POOLS:
        return _SIDE_POOLS[key]
    from planner import cache as disk_cache  # `chunkft fit`'s disk cache (planner.cache), if enabled

    stored = disk_cache.load("pool", key)
    if isinstance(stored, tuple) and len(stored) == 2 and all(isinstance(v, int) for v in stored):
        _SIDE_POOLS[key] = stored
        return stored
    pre = tuple(((0, j, i), b, SIDE_STREAM) for j in range(depth + 1)
                for i, b in enumerate(chunk_tensors[j]) if b)
    ops = []
    for k in range(2 * c):
        j = k + depth + 1
        frees = tuple((k // c, k % c, i) for i, b in enumerate(chunk_tensors[k % c]) if b)
        allocs = tuple(((j // c, j % c, i), b, SIDE_STREAM) for i, b in enumerate(chunk_tensors[j % c]) if b)
        ops.append((frees, allocs))
    program = Program(pre=pre, ops=tuple(ops))
    peak, _ = run_program(program, conf)
    live = max(sum(sum(chunk_tensors[(k + i) % c]) for i in range(depth + 1)) for k in range(c))
    least = least_reserved(program, conf, low=live - 1, high=peak) if live else 0
    if len(_SIDE_POOLS) > 256:
        _SIDE_POOLS.clear()
    _SIDE_POOLS[key] = (peak, least)
    disk_cache.store("pool", key, (peak, least))
    return peak, least
