"""One rank's optimizer state in a sharded run: the local slices of the chunks' spans, their AdamW temporaries.

The optimizer modelled is runtime.sharded_optim.ShardedChunkAdamW (full fine-tuning is its one
chunk of whole tensors, `chunk_spans`). Its state is the fp32 master + AdamW moments (12 B/param,
for fp32 training too) of the spans' local slices only: each rank holds the part of each span
inside its own dim-0 shard rows (`local_span_bytes`, runtime.sharded_optim.local_span), so a
slice of a big tensor may sit whole on one rank. State tier GPU: every chunk's on the GPU;
HOST: every chunk's rests in host memory, the active chunk's working copy is on the GPU, plus
the next chunk's with prefetch_depth >= 1 (`prefetches_next_chunk`: deeper prefetch behaves as 1
in the runtime). The runtime keeps one flat host buffer per chunk, plain memory page-locked with
cudaHostRegister, so the host bytes are the state's bytes exactly (`rank_host_disk`: none of
the CachingHostAllocator's per-tensor power-of-two rounding, which at 70B on 2 ranks was ~180
GiB of the node's ~970). DISK: every chunk's state in one file per chunk in the rank's own
directory (the same bytes on disk), the GPU side as HOST, and in host memory only the staging
buffers the files are read into and written from: one of the rank's largest chunk state, two
with prefetch (the background load and the switch's write use one each). The AdamW step
(`step_temp_allocs`) works one local slice at a time: the largest slice's fp32 gradient copy
(16-bit training), sqrt and division.

`rank_states` is every rank's state for one chunk's step (resident GPU state, step temporaries,
host and disk), through planner.evaluate's allocation helpers so the rounding is evaluate's;
`rank_state_allocs` is one rank's working copy of a chunk's state (what a HOST-tier switch
moves, planner.simulate's transfer events).

Known limitations: the step's temporaries and state are counted as fresh allocator segments (no
reuse of freed blocks: pessimistic, as evaluate); the clipping pass's one-slice fp32 cast is
taken to be smaller than the step's temporaries and not counted apart.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np

from planner.errors import ChunkftError
from planner.schema import Component, Tier
from planner.strategy import Strategy

if TYPE_CHECKING:
    from planner.chunks import ChunkSpan
    from planner.evaluate import ParamLayout
    from planner.model import ModelSpec
    from planner.trace import StepShape


def chunk_spans(strategy: Strategy, model: "ModelSpec", layout: "ParamLayout", dtype: str) -> tuple:
    """The chunk table's spans per chunk (C = 1: every parameter whole, one chunk)."""
    from planner import evaluate as ev
    from planner.chunks import ChunkSpan

    if strategy.chunks > 1:
        return ev.chunk_table(model, dtype, strategy.chunks).chunks
    return (tuple(ChunkSpan(param=n, dim=0, start=0, end=shape[0] if shape else 1, nbytes=b)
                  for (n, shape, _), b in zip(layout.named_shapes, layout.tensor_bytes)),)


def local_span_bytes(spans: Sequence["ChunkSpan"], shapes: dict[str, tuple[int, ...]], world: int) -> np.ndarray:
    """(len(spans), world): bytes (training dtype) of each span inside each rank's dim-0 shard.

    FSDP2 gives rank r the rows [r * ceil(rows / W), ...) that exist; a dim-0 span keeps its
    rows inside them, a dim-1 span all local rows of its columns
    (runtime.sharded_optim.local_span)."""
    if not spans:
        return np.zeros((0, world), dtype=np.int64)
    rows = np.array([shapes[s.param][0] if shapes[s.param] else 1 for s in spans], dtype=np.int64)[:, None]
    start = np.array([s.start for s in spans], dtype=np.int64)[:, None]
    end = np.array([s.end for s in spans], dtype=np.int64)[:, None]
    nbytes = np.array([s.nbytes for s in spans], dtype=np.int64)[:, None]
    dim0 = np.array([s.dim == 0 for s in spans])[:, None]
    per = -(-rows // world)
    lo = np.minimum(np.arange(world, dtype=np.int64)[None, :] * per, rows)
    hi = np.minimum(lo + per, rows)
    row_bytes = np.where(end > start, nbytes // np.maximum(end - start, 1), 0)
    by_rows = np.clip(np.minimum(end, hi) - np.maximum(start, lo), 0, None) * row_bytes
    by_cols = nbytes * (hi - lo) // np.maximum(rows, 1)
    return np.where(dim0, by_rows, by_cols)


def step_temp_allocs(local_bytes: Sequence[int], elem: int) -> list:
    """Temporaries of ShardedChunkAdamW.step on one rank (runtime/sharded_optim.py `step`): one
    local span slice at a time, `_grad32` casts its gradient to fp32 (16-bit training; for fp32
    `.to` is the gradient itself, scaled in place) and its AdamW holds `exp_avg_sq.sqrt()` and
    its division: evaluate's single-tensor temporaries (`optimizer_temp_allocs`) of the largest
    slice, 12 B per parameter (8 for fp32 training). The clipping pass casts one slice at a
    time too (4 B per parameter), less than that."""
    from planner import evaluate as ev

    n = max(local_bytes, default=0) // elem
    if not n:
        return []
    temp = Component.TEMPORARIES
    out = [ev.Alloc(component=temp, nbytes=ev.FP32_BYTES * n)] * (ev.SINGLE_TENSOR_TEMP_BYTES_PER_PARAM // ev.FP32_BYTES)
    if elem < ev.FP32_BYTES:
        out.append(ev.Alloc(component=temp, nbytes=ev.FP32_BYTES * n))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RankState:
    """One rank's optimizer-side bytes for one chunk's step."""

    static: dict
    """GPU components of the state resident through the step (rounded: ROUNDING apart)."""
    static_reserved: int
    temps: dict
    temps_reserved: int
    host: dict
    disk: dict


def rank_states(strategy: Strategy, layout: "ParamLayout", spans: tuple, local: np.ndarray, k: int,
                prefetch: int | None, world: int, cache: dict) -> list[RankState]:
    """Per rank r: state resident on the GPU (every chunk's for C = 1 / GPU tier; else chunk
    k's working copy and chunk `prefetch`'s), the step's temporaries, host (and disk)."""
    from planner import evaluate as ev

    bounds = cache.get("bounds")
    if bounds is None:  # (not setdefault: its default would be built on every call)
        bounds = cache["bounds"] = np.cumsum([0] + [len(c) for c in spans])
    elem = layout.elem_bytes
    out = []
    for r in range(world):
        def chunk_local(j: int) -> tuple[int, ...]:
            return tuple(int(b) for b in local[bounds[j]:bounds[j + 1], r] if b)

        mine = chunk_local(k)
        ahead = chunk_local(prefetch) if prefetch is not None else ()
        key = ("rank", r, k, prefetch)
        if key not in cache:
            active = ev.ActiveSet(chunk=k, tensor_bytes=mine, prefetch_bytes=ahead)
            # every chunk's state on the GPU (C = 1, GPU tier): the same for every chunk
            everything = strategy.chunks == 1 or strategy.state_tier == Tier.GPU
            static_key = ("static", r) if everything else ("static", r, k, prefetch)
            if static_key not in cache:
                # every span's slice: only read when every chunk's state is on the GPU
                every = tuple(int(b) for b in local[:, r] if b) if everything else ()
                cache[static_key] = ev.gpu_static_summary(strategy, layout, active, every)
            static, static_reserved = cache[static_key]
            temps_list = step_temp_allocs(mine, elem)
            temps: dict = {}
            ev.add_allocs(temps, temps_list)
            if ("host", r) not in cache:
                sums = np.concatenate([[0], np.cumsum(local[:, r])])
                cache[("host", r)] = rank_host_disk(strategy, (sums[bounds[1:]] - sums[bounds[:-1]]).tolist(), elem)
            host, disk = cache[("host", r)]
            cache[key] = RankState(static=static, static_reserved=static_reserved, temps=temps,
                                   temps_reserved=ev.segment_bytes(temps_list), host=host, disk=disk)
        out.append(cache[key])
    return out


def prefetches_next_chunk(strategy: Strategy, num_chunks: int) -> bool:
    """HOST or DISK tier with prefetch_depth >= 1: the next chunk's working copy is on the device
    too (runtime.sharded_optim: depth beyond 1 behaves as 1)."""
    return strategy.state_tier in (Tier.HOST, Tier.DISK) and strategy.prefetch_depth >= 1 and num_chunks > 1


def rank_host_disk(strategy: Strategy, chunk_bytes: Sequence[int], elem: int
                   ) -> tuple[dict[Component, int], dict[Component, int]]:
    """(host, disk) bytes per component of one rank whose local slices of each chunk hold
    `chunk_bytes` (training dtype): runtime.sharded_optim's stores. HOST: one flat buffer per
    chunk of fp32 master + moments (12 B per parameter), no rounding. DISK: those bytes in the
    rank's chunk files, and staging buffers of the largest chunk's state in host memory (two
    with prefetch). GPU tier: nothing off the GPU."""
    from planner import evaluate as ev

    host: dict[Component, int] = {}
    disk: dict[Component, int] = {}
    if strategy.state_tier == Tier.GPU:
        return host, disk
    params = [int(b) // elem for b in chunk_bytes]
    resting = disk if strategy.state_tier == Tier.DISK else host
    if sum(params):
        resting[Component.MASTER] = ev.MASTER_BYTES_PER_PARAM * sum(params)
        resting[Component.OPTIMIZER] = ev.MOMENT_BYTES_PER_PARAM * sum(params)
    if strategy.state_tier == Tier.DISK and max(params, default=0):
        buffers = 2 if prefetches_next_chunk(strategy, len(params)) else 1
        host[Component.TEMPORARIES] = buffers * (ev.MASTER_BYTES_PER_PARAM + ev.MOMENT_BYTES_PER_PARAM) * max(params)
    return host, disk


def rank_state_allocs(model: "ModelSpec", shape: "StepShape", strategy: Strategy, *, world: int,
                      chunk: int, rank: int) -> dict[Component, int]:
    """GPU bytes per component (allocator rounding as ROUNDING) of one rank's working copy of
    chunk `chunk`'s fp32 master and moments: its local slices (`local_span_bytes`), what a
    HOST-tier chunk switch evicts or brings in (runtime.sharded_optim `_evict` / `_activate`)."""
    from planner import evaluate as ev

    layout = ev.param_layout(model, shape.dtype)
    spans = chunk_spans(strategy, model, layout, shape.dtype)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < len(spans):
        raise ChunkftError(f"chunk {chunk!r} does not exist; valid chunks are 0..{len(spans) - 1}")
    shapes = {n: s for n, s, _ in layout.named_shapes}
    mine = local_span_bytes(spans[chunk], shapes, world)[:, rank]
    out: dict[Component, int] = {}
    ev.add_allocs(out, ev.state_allocs(tuple(int(b) for b in mine if b), layout.elem_bytes))
    return out
