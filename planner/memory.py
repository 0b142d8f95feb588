"""Replay a traced step's allocations and frees into a memory timeline.

Peaks come from replaying allocation and free events in op order, never from summing the
maxima of components: at 8B the activations peak at the end of the forward and the gradients
at the end of the backward, and adding the two would overstate the step by gigabytes.

allocator="cpu": every storage costs its exact byte size (what glibc's malloc hands out, up to
its own few bytes of bookkeeping), matching the CPU ground truth of planner.measure.

allocator="cuda": PyTorch's CUDA caching allocator is modelled (c10/cuda/CUDACachingAllocator.cpp):
  - every request is rounded up to a multiple of kMinBlockSize = 512 bytes (round_size); the
    extra bytes are Component.ROUNDING in the allocated total;
  - requests up to kSmallSize = 1 MiB come from the small pool, carved out of kSmallBuffer =
    2 MiB segments; larger ones from the large pool, whose new segments are kLargeBuffer = 20 MiB
    for requests under kMinLargeAlloc = 10 MiB and otherwise the request rounded up to a
    multiple of kRoundLarge = 2 MiB (get_allocation_size);
  - a free block is split when the remainder is at least kMinBlockSize (small pool) or more
    than kSmallSize (large pool) (should_split); freed blocks merge with free neighbours in
    their segment; segments are cached, never returned (no empty_cache, no OOM retry);
  - best fit: the smallest cached free block of the pool that is large enough (get_free_block).
  This gives `reserved` (bytes of segments held), which is what nvidia-smi shows minus the CUDA
  context on a GPU with room to spare. It is an upper bound of what a step needs: a request
  that finds no cached block and no free device memory makes PyTorch release the unused cached
  segments and retry (release_cached_blocks) before it raises OOM. Without checkpointing it
  runs well above allocated (Llama 3-8B, 1K tokens: 35.9 vs 30.0 GiB): activations of 10 MiB
  and more get segments of their own size, and the larger weight gradients of backward fit in
  none of them once freed.
  The cuBLAS workspace is Component.OVERHEAD (aten/src/ATen/cuda/CublasHandlePool.cpp,
  parseChosenWorkspaceSize): by default ":4096:2:16:8" = 2 x 4096 KiB + 8 x 16 KiB = 8.125 MiB,
  and 4096 KiB x 8 = 32 MiB on compute capability 9.x, 10.x and 12.x (Hopper, Blackwell). It is
  allocated through the caching allocator (getNewWorkspace), so it counts in allocated and
  reserved, once per thread and stream (the workspace map is thread_local; cuBLASLt shares it
  unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=0). A training step has two: the forward's thread
  and autograd's device thread for backward. Both stay cached after the first step, so they
  are modelled as live before the step.

Known limitations: the CUDA model ignores allocator options (expandable_segments,
max_split_size_mb, garbage-collection thresholds), the per-stream pools of several streams,
the 1 MiB-alignment of oversize blocks, and the CUDA context itself (hundreds of MiB outside
PyTorch's allocator, reported by nvidia-smi but not by memory_allocated).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from planner.errors import ChunkftError
from planner.schema import Component

if TYPE_CHECKING:
    from planner.opgraph import OpGraph

# c10/cuda/CUDACachingAllocator.cpp constants (PyTorch 2.x, unchanged through 2.13)
K_MIN_BLOCK_SIZE = 512  # all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1048576  # largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2097152  # "small" allocations are packed in 2 MiB blocks
K_LARGE_BUFFER = 20971520  # "large" allocations may be packed in 20 MiB blocks
K_MIN_LARGE_ALLOC = 10485760  # allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2097152  # round up large allocations to 2 MiB

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
           cublas_workspaces: int = TRAINING_CUBLAS_WORKSPACES) -> MemoryTimeline:
    """Replay `graph`'s allocations and frees.

    For allocator="cuda", `sm` (compute capability as 10 * major + minor: 80 Ampere, 89 Ada,
    90 Hopper) picks the cuBLAS workspace size and `cublas_workspaces` how many there are.
    """
    if allocator not in ALLOCATORS:
        raise ChunkftError(f"invalid allocator {allocator!r}: valid allocators are {', '.join(ALLOCATORS)}")
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
        rounded = np.where(sizes == 0, 0, np.maximum(
            ((sizes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE, K_MIN_BLOCK_SIZE))
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
    if allocator == "cuda":
        reserved = _simulate_caching_allocator(n, rounded, starts, ends, pre, workspaces)
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
    )


def _simulate_caching_allocator(n: int, rounded: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                                pre: np.ndarray, workspaces: list[int]) -> np.ndarray:
    """Reserved bytes after every op under the caching-allocator model in the module docstring."""
    alloc = _CachingAllocatorModel()
    for i, nbytes in enumerate(workspaces):
        alloc.malloc(-1 - i, round_size(nbytes))
    # Pre-existing storages are allocated first, in id order (the order they were created).
    for sid in np.flatnonzero(pre & (rounded > 0)):
        alloc.malloc(int(sid), int(rounded[sid]))
    frees_at: dict[int, list[int]] = {}
    allocs_at: dict[int, list[int]] = {}
    for sid in np.flatnonzero(~pre & (rounded > 0)):
        allocs_at.setdefault(int(starts[sid]), []).append(int(sid))
    for sid in np.flatnonzero((ends < n) & (rounded > 0)):
        frees_at.setdefault(int(ends[sid]), []).append(int(sid))
    reserved = np.zeros(n, dtype=np.int64)
    for k in range(n):
        for sid in frees_at.get(k, ()):
            alloc.free(sid)
        for sid in allocs_at.get(k, ()):
            alloc.malloc(sid, int(rounded[sid]))
        reserved[k] = alloc.reserved_bytes
    return reserved


class _CachingAllocatorModel:
    """Best-fit blocks in cached segments, two pools (small <= 1 MiB, large), merge on free."""

    def __init__(self):
        self.reserved_bytes = 0
        # per pool: sorted list of free blocks (size, segment, offset)
        self.free_blocks: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}
        # per segment: {offset: (size, is_free)}
        self.segments: list[dict[int, list]] = []
        self.segment_small: list[bool] = []
        self.owner: dict[int, tuple[int, int]] = {}  # storage id -> (segment, offset)

    def malloc(self, key: int, size: int) -> None:
        small = size <= K_SMALL_SIZE
        pool = self.free_blocks[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            seg_bytes = segment_size(size)
            seg = len(self.segments)
            self.segments.append({0: [seg_bytes, True]})
            self.segment_small.append(small)
            self.reserved_bytes += seg_bytes
            block = (seg_bytes, seg, 0)
        else:
            block = pool.pop(i)
        block_size, seg, off = block
        blocks = self.segments[seg]
        remaining = block_size - size
        split = remaining >= K_MIN_BLOCK_SIZE if small else remaining > K_SMALL_SIZE
        if split:
            blocks[off] = [size, False]
            blocks[off + size] = [remaining, True]
            bisect.insort(pool, (remaining, seg, off + size))
        else:
            blocks[off] = [block_size, False]
        self.owner[key] = (seg, off)

    def free(self, key: int) -> None:
        seg, off = self.owner.pop(key)
        blocks = self.segments[seg]
        pool = self.free_blocks[self.segment_small[seg]]
        size = blocks[off][0]
        # merge with the next block
        nxt = off + size
        if nxt in blocks and blocks[nxt][1]:
            nsize = blocks.pop(nxt)[0]
            pool.remove((nsize, seg, nxt))
            size += nsize
        # merge with the previous block
        prev = self._previous(blocks, off)
        if prev is not None and blocks[prev][1]:
            psize = blocks[prev][0]
            pool.remove((psize, seg, prev))
            del blocks[off]
            off, size = prev, psize + size
        blocks[off] = [size, True]
        bisect.insort(pool, (size, seg, off))

    @staticmethod
    def _previous(blocks: dict[int, list], off: int) -> int | None:
        best = None
        for o in blocks:
            if o < off and (best is None or o > best):
                best = o
        return best
