"""Per-rank memory and step time of a strategy run on several GPUs with FSDP2 sharding.

The layout modelled is runtime.distributed's: `fully_shard` on every decoder layer, then on the
root (embeddings, final norm, lm_head), world size W = gpus_per_node x nodes; with
`shard_embeddings` the input embedding and the output head (final norm + lm_head) are units of
their own first (as torchtitan wraps them), so they are unsharded only while they run. The
optimizer is runtime.sharded_optim.ShardedChunkAdamW (full fine-tuning is its one chunk of
whole tensors). `shape` is the per-rank micro-batch (the global batch is W times it). Per rank,
op by op over the traced step of that micro-batch (planner.evaluate.traced_step: the same trace,
replay and caching as `evaluate`, so activations, logits and temporaries are exactly evaluate's):

  weights    every parameter's dim-0 shard, padded as FSDP2 pads it (ceil(rows / W) rows on
             every rank), plus the unsharded copies in flight: the root's parameters from the
             first forward op to the end of backward (FSDP2 keeps the root unsharded after
             forward), the unit (decoder layer, or embedding / head unit) that runs and the one
             prefetched (FSDP2 issues the next unit's all-gather while the current one
             computes: in backward explicitly, in forward on CUDA by the CPU running ahead of
             the GPU; `forward_prefetch=False` is a CPU run, where it cannot), with padding.
             During the optimizer step every unit is resharded.
  gradients  ChunkFT chunk k, as runtime.sharded_optim trains it (`sharded_grad_spec`): a whole
             span's tensor, and a sliced 1-D tensor (a norm weight), gets requires_grad and
             FSDP2's whole gradient; a sliced span of a matrix gets a sub-tensor gradient from
             runtime.subgrad (requires_grad stays off, FSDP2 neither computes nor reduces it):
             a buffer of the whole unsharded slice (+ one row for an nn.Embedding owner) on every
             rank, from its owner's backward to the end of the step, all_reduced at the step.
             The trace is run with that spec, so both kinds are the trace's own bytes. A unit's
             FSDP2 gradients are reduce-scattered once its backward is done: from then on its
             padded shards (FSDP2's reduce-scatter output). The root's gradients (lm_head first
             in backward, unless a unit of its own) stay unsharded to the end of backward.
             During the optimizer step FSDP2 gradients are shards, slice buffers whole.
  comm       in TEMPORARIES: FSDP2's all-gather output buffers, which it copies the unsharded
             parameters out of. In forward the newest one lives until the next unit's copy-out
             (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, `all_gather_state`:
             freeing is deferred to overlap the copy-out with the next all-gather), the last
             unit's until the root's post-forward (after the loss); in backward a unit's is
             freed right after its copy-out (counted on the op that starts the unit). And the
             reduce-scatter input (_fsdp_collectives.py `foreach_reduce`: the unit's gradients
             copied into one buffer with dim 0 padded, before they are freed) from the first op
             after a unit's backward until the next unit's post-backward (FSDP2 retains one;
             the last is dropped at the end of backward).
  states     fp32 master + AdamW moments (12 B/param, for fp32 training too) of the spans'
             local slices only: each rank holds the part of each span inside its own dim-0
             shard rows (`local_span_bytes`, runtime.sharded_optim.local_span), so a slice of a
             big tensor may sit whole on one rank. State tier GPU: every chunk's on the GPU;
             HOST: every chunk's rests in (pinned) host memory, the active chunk's working copy
             is on the GPU, plus the next chunk's with prefetch_depth >= 1 (deeper prefetch
             behaves as 1 in the runtime). DISK is not run sharded (ChunkftError). The AdamW step
             (`step_temp_allocs`) works one local slice at a time: the largest slice's fp32
             gradient copy (16-bit training), sqrt and division.

Every rank is evaluated (ranks differ in the slices they hold); the reported GPU figures are
the worst (chunk, rank)'s, host / disk the fullest rank's, `node_host_bytes` the fullest node's.
One (chunk, rank) is a `RankStep` (public: `rank_step`): the per-op, per-component live matrix
(`rank_live` over the adjusted trace), the rank's resident state, the bytes at the optimizer
step and its temporaries; `RankStep.peak` / `reserved_bytes` are the figures evaluate_sharded
maximises, and planner.simulate builds a parallel plan's timeline from the same object, so the
timeline's maximum is the plan's per-rank prediction by construction. `rank_state_allocs` is one
rank's working copy of a chunk's state (what a HOST-tier switch moves).
W = 1 is not sharded (no FSDP) and returns `evaluate`'s estimate exactly (sub-tensor gradients,
runtime.chunk_optim).

Chunk traces: "exact" traces each chunk-pattern group's first chunk with `sharded_grad_spec`
(evaluate's `chunk_groups`) and evaluates every chunk; "bound" uses the full-FT trace with the
gradients capped at the chunk's FSDP2 gradients and slice buffers for every chunk, evaluated for the chunks with
the largest analytic bytes (`_bound_chunks`); "auto" is exact up to 2B parameters. Everything
that does not depend on W (traces, layouts, chunk groups) is cached across world sizes and GPU
kinds (`_prepare`; only the cuBLAS workspace, via the SM architecture, depends on the kind).

Communication per step (ring collectives: each rank sends and receives (W-1)/W of the
unsharded bytes): all-gather of every parameter in forward and, in backward, of every unit
backward reaches (with the one below it, prefetched) - the root is not resharded after
forward; reduce-scatter of the FSDP2 gradients (dim 0 padded), in the training dtype (no
mixed-precision reduce); all_reduce of the sliced spans' buffers (2 (W-1)/W of their bytes). Bandwidth: NVLink per GPU kind within a node
(`NVLINK_BANDWIDTH_BPS`, PCIe peer-to-peer for kinds without NVLink), the inter-node network
across nodes (`INTER_NODE_BANDWIDTH_BPS`); the slowest link paces a ring. FSDP overlaps
communication with compute: the step time adds the part of the communication time that exceeds
the step's compute time (`comm` term); the optimizer and chunk-switch terms shrink by W.

Measured on CPU (2 gloo ranks, tiny Llama: hidden 128, 4 layers, vocab 2048, 512 tokens):
full FT fp32 (tests/test_distributed.py), each rank's mallinfo2 peak 34.46 MB against
`cpu_rank_rise_bytes`' 34.07 MB (1.2% under: malloc headers and autograd nodes, ~1 KB per
forward op); ChunkFT C = 4 and 8 (sliced k_proj, down_proj, embedding, lm_head spans), fp32 / bf16, state
on host (prefetch 0 / 1) or GPU, every chunk measured: 0.7-1.6% under (tests/test_sharding.py
pins one). The first step
of a run measures ~10% more (lazy initialisation), and is not what is modelled.

Known limitations: the reserved bytes keep the single-rank trace's free-block slack, and the
optimizer step's temporaries and state are counted as fresh segments on top of the highest
reserved bytes (no reuse of freed blocks: pessimistic, as evaluate); NCCL's own buffers (a few
hundred MiB per rank) are not counted. The trace does not mark where backward starts inside
the loss phase, so with `shard_embeddings` the head unit and its all-gather buffer count as held
through the loss's backward, where FSDP2 has resharded it until its pre-backward: pessimistic by
up to two head units (measured on CPU: predicted 33.48 MB, measured 31.77 MB, 5.4% over). Every
rank's shards and gathered units are modelled padded (the last ranks hold fewer real rows). The
step time's compute is evaluate's model at the mean flops of the chunks' steps (exact: the
`sharded_grad_spec` traces; bound: evaluate's analytic flops). No tensor / pipeline parallelism; `shape` must be the same
on every rank. A sliced 1-D tensor is taken to be a norm weight (whole gradient), a Linear
bias would get a sub-tensor one; gloo's staging buffers for the slices' all_reduce (CPU) and
NCCL's are not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import TYPE_CHECKING, Any, Collection, Sequence

import numpy as np

from planner.errors import ChunkftError
from planner.memory import COMPONENTS
from planner.schema import Component, Phase, Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
    from planner.chunks import ChunkSpan, ChunkTable
    from planner.evaluate import ParamLayout, TracedStep
    from planner.hardware import GpuProfile, Hardware
    from planner.model import ModelSpec
    from planner.trace import StepShape

# NVLink bandwidth per GPU per direction, bytes/s (vendor totals are bidirectional, halved):
# H100/H200 SXM NVLink 4: 900 GB/s total (NVIDIA H100 datasheet); H800 SXM: 400 GB/s total
# (NVIDIA's export variant); A100 SXM NVLink 3: 600 GB/s total (A100 datasheet); RTX 3090
# NVLink bridge: 112.5 GB/s total. Kinds not listed (RTX 4090, L4, A10) have no NVLink and talk
# peer to peer over PCIe: their `pcie_bandwidth_Bps` is used.
NVLINK_BANDWIDTH_BPS: dict[str, float] = {
    "h100-80gb": 450e9,
    "h200-141gb": 450e9,
    "h800-80gb": 200e9,
    "a100-80gb": 300e9,
    "a100-40gb": 300e9,
    "rtx3090": 56.25e9,
}
# Across nodes: one 200 Gb/s InfiniBand HDR (or 200 GbE RoCE) NIC per GPU = 25 GB/s per direction,
# the common H100/H800 cluster build (8 NICs per 8-GPU node).
INTER_NODE_BANDWIDTH_BPS = 25e9
# GPU counts min_gpus tries (whole nodes beyond one node).
MAX_GPUS = 1024

_CI = {c: i for i, c in enumerate(COMPONENTS)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardedEstimate:
    """What one rank of a W-rank FSDP2 run needs, and the step time with communication."""

    strategy: Strategy
    gpus_per_node: int
    nodes: int
    peak_bytes: dict[Tier, int]
    """Per rank. HOST / DISK: one rank's share (a node holds gpus_per_node of them)."""
    components: dict[Tier, dict[Component, int]]
    """Per rank, at each tier's peak."""
    reserved_bytes: int
    context_bytes: int
    all_gather_bytes: int
    """Unsharded bytes all-gathered per step (forward + backward re-gather)."""
    reduce_scatter_bytes: int
    """Unsharded gradient bytes reduce-scattered per step (FSDP2: dim 0 padded)."""
    interconnect_Bps: float
    comm_time_s: float
    """Time of the step's collectives at `interconnect_Bps`, before overlap."""
    step_time_s: float
    step_time_parts_s: dict[str, float]
    single: Estimate
    """evaluate()'s unsharded estimate of the same per-rank micro-batch (W > 1: with bound chunk
    traces, its step time at the sharded model's mean flops; it supplies the step-time terms)."""
    worst_chunk: int | None = None
    shard_embeddings: bool = False
    """Input embedding and output head (final norm + lm_head) are FSDP units of their own."""
    all_reduce_bytes: int = 0
    """Bytes of the sub-tensor gradient buffers all_reduced at the step (sliced ChunkFT spans)."""
    worst_rank: int = 0
    """The rank whose GPU need is reported (ranks hold different parts of sliced spans)."""
    node_host_bytes: int = 0
    """Host bytes of the fullest node: the sum over its ranks (HOST state tier: their slices)."""
    chunk_traces: str = "exact"
    """How the chunks' steps were traced: "exact" or "bound" (see evaluate_sharded)."""

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def need_bytes(self, tier: Tier) -> int:
        if tier == Tier.GPU:
            return max(self.reserved_bytes, self.peak_bytes.get(Tier.GPU, 0))
        return self.peak_bytes.get(tier, 0)

    def card_need_bytes(self) -> int:
        """What one GPU must hold: allocator reserved plus the CUDA context."""
        return self.need_bytes(Tier.GPU) + self.context_bytes

    def fits(self, budget: Budget) -> bool:
        """Per-rank budget (GPU per card; host / disk per rank's share)."""
        return all(budget.limit(t) is None or self.need_bytes(t) <= budget.limit(t) for t in Tier)


def interconnect_bandwidth(gpu: "GpuProfile", nodes: int) -> float:
    """Per-GPU bandwidth a ring collective runs at (see module doc)."""
    intra = NVLINK_BANDWIDTH_BPS.get(gpu.name, gpu.pcie_bandwidth_Bps)
    return intra if nodes == 1 else min(intra, INTER_NODE_BANDWIDTH_BPS)


def shard_bytes(shape: tuple[int, ...], elem: int, world: int) -> int:
    """Bytes of one rank's FSDP2 shard of a parameter (dim 0 padded to a multiple of world)."""
    if not shape:
        return elem
    rows = math.ceil(shape[0] / world)
    return rows * math.prod(shape[1:]) * elem


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Units:
    """The FSDP units in forward order and what each holds (padded, unsharded bytes)."""

    shard: int
    """One rank's shards of every parameter."""
    full: tuple[int, ...]
    """Unsharded bytes of each unit: [input embedding,] layer 0 .. L-1 [, output head]."""
    trained: tuple[int, ...]
    """Gradient bytes of each unit this step, as autograd produces them (unpadded)."""
    trained_padded: tuple[int, ...]
    """The reduce-scatter input of each unit: its gradients with dim 0 padded to W rows' multiple."""
    trained_shard: tuple[int, ...]
    """The reduce-scatter output of each unit: one rank's padded gradient shards."""
    root_full: int
    """Unsharded bytes the root unit keeps from the first forward op to the end of backward."""
    offset: int
    """Index of layer 0 in `full` (1 with separate embedding units, else 0)."""


def _unit_of_param(layout: "ParamLayout", shard_embeddings: bool) -> tuple[Any, int]:
    """(function parameter name -> unit index or None for the root, number of units)."""
    rx = re.compile(re.escape(layout.layer_prefix) + r"\.(\d+)\.") if layout.layer_prefix else None
    L = layout.num_layers
    off = 1 if shard_embeddings else 0

    def unit(name: str) -> int | None:
        m = rx.match(name) if rx else None
        if m:
            return int(m.group(1)) + off
        if not shard_embeddings:
            return None
        return 0 if name == layout.input_embedding else L + 1

    return unit, L + 2 * off


_PARAM_UNITS: dict[tuple, tuple] = {}


def _param_units(layout: "ParamLayout", world: int, shard_embeddings: bool) -> tuple:
    """(name -> index, unit per parameter (-1: root), unit count, padded shard bytes per parameter),
    cached per layout, world size and unit layout (chunk evaluations ask for it per chunk)."""
    key = (id(layout), world, shard_embeddings)
    hit = _PARAM_UNITS.get(key)
    if hit is None or hit[0] is not layout:
        unit, count = _unit_of_param(layout, shard_embeddings)
        units = np.asarray([-1 if (u := unit(n)) is None else u for n, _, _ in layout.named_shapes], dtype=np.int64)
        shards = np.asarray([shard_bytes(sh, e, world) for _, sh, e in layout.named_shapes], dtype=np.int64)
        index = {n: i for i, (n, _, _) in enumerate(layout.named_shapes)}
        hit = (layout, (index, units, count, shards))
        if len(_PARAM_UNITS) >= _CACHE_SIZE:
            _PARAM_UNITS.pop(next(iter(_PARAM_UNITS)))
        _PARAM_UNITS[key] = hit
    return hit[1]


def _units(layout: "ParamLayout", world: int, grads: Collection[str], shard_embeddings: bool) -> _Units:
    index, units, count, shards = _param_units(layout, world, shard_embeddings)
    sizes = np.asarray(layout.tensor_bytes, dtype=np.int64)
    in_unit = units >= 0
    full = np.bincount(units[in_unit], weights=world * shards[in_unit], minlength=count)
    trained_idx = np.asarray(sorted(index[n] for n in grads if n in index), dtype=np.int64)
    t_units = units[trained_idx] if trained_idx.size else trained_idx
    t_in = t_units >= 0
    t_sel = trained_idx[t_in]

    def per_unit(values: np.ndarray) -> tuple[int, ...]:
        return tuple(int(v) for v in np.bincount(t_units[t_in], weights=values[t_sel], minlength=count)) \
            if t_sel.size else (0,) * count

    return _Units(shard=int(shards.sum()), full=tuple(int(v) for v in full), trained=per_unit(sizes),
                  trained_padded=per_unit(world * shards), trained_shard=per_unit(shards),
                  root_full=int(world * shards[~in_unit].sum()), offset=1 if shard_embeddings else 0)


def grad_shard_bytes(layout: "ParamLayout", grads: Collection[str], world: int) -> int:
    """One rank's gradient shards once every unit has reduce-scattered: FSDP2's reduce-scatter
    output, padded shards of the parameters that got a gradient."""
    return sum(shard_bytes(shape, elem, world) for name, shape, elem in layout.named_shapes if name in grads)


def _op_units(traced: "TracedStep", u: _Units, n: int) -> list[int | None]:
    """The FSDP unit each traced op runs in (None: only the root's parameters)."""
    phases = traced.phases or (None,) * n
    layers = traced.layers or (None,) * n
    backward = (Phase.BACKWARD, Phase.RECOMPUTE)
    last = len(u.full) - 1
    out: list[int | None] = []
    seen_fwd = seen_bwd = False
    for t in range(n):
        i = layers[t]
        in_bwd = phases[t] in backward
        if i is not None:
            seen_bwd |= in_bwd
            seen_fwd |= not in_bwd
            out.append(i + u.offset)
        elif not u.offset:
            out.append(None)
        elif in_bwd:
            out.append(0 if seen_bwd else last)
        else:
            out.append(last if seen_fwd else 0)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Schedule:
    """What FSDP2 does around every traced op, independent of which parameters train."""

    gathered: np.ndarray
    """Unsharded parameter bytes held after each op (root + running + prefetched unit)."""
    ag_buffer: np.ndarray
    """All-gather output buffers alive after each op."""
    done_count: np.ndarray
    """How many units have finished backward (reduce-scattered) by each op."""
    done_order: tuple[int, ...]
    """Units in the order their backward finishes."""
    rs_unit: np.ndarray
    """The unit whose reduce-scatter input is held after each op (-1: none): FSDP2 keeps the
    newest until the next unit's post-backward (_fsdp_param_group.py `post_backward`:
    `comm_ctx.reduce_scatter_states`, at most `reduce_scatter_max_input_buffers`, default 1)
    and drops the last at the end of backward (_fsdp_state.py, the root's final callback)."""
    backward_gathered: int
    """Unsharded bytes all-gathered in backward: the units backward reaches, each with the one
    below it (prefetched, used or not)."""


def _schedule(traced: "TracedStep", u: _Units, n: int, forward_prefetch: bool) -> _Schedule:
    phases = traced.phases or (None,) * n
    backward = (Phase.BACKWARD, Phase.RECOMPUTE)
    gathered = np.full(n, u.root_full, dtype=np.int64)
    ag_buffer = np.zeros(n, dtype=np.int64)
    done_count = np.zeros(n, dtype=np.int64)
    rs_unit = np.full(n, -1, dtype=np.int64)
    order: list[int] = []
    regathered: set[int] = set()
    bwd_ops = [t for t in range(n) if phases[t] in backward]
    end_of_backward = bwd_ops[-1] + 1 if bwd_ops else n
    current: int | None = None  # unit whose backward runs
    seen_unit = False
    for t, k in enumerate(_op_units(traced, u, n)):
        in_bwd = phases[t] in backward
        if in_bwd and k is not None and k != current:
            if current is not None and k < current:
                order.append(current)  # its post-backward reduce-scatters: input copy, then shards
                rs_unit[t:end_of_backward] = current
            # pre-backward of unit k: the prefetched unit's all-gather output (or k's own, for
            # the first unit of backward) lives until its copy-out is done
            ag = k - 1 if current is not None and k > 0 else (k if current is None else None)
            ag_buffer[t] = u.full[ag] if ag is not None else 0
            current = k
        if k is not None:
            seen_unit = True
            if in_bwd:
                nxt = k - 1 if k > 0 else None
                regathered |= {k} if nxt is None else {k, nxt}
            else:
                nxt = k + 1 if forward_prefetch and k + 1 < len(u.full) else None
            gathered[t] += u.full[k] + (u.full[nxt] if nxt is not None else 0)
            if not in_bwd:  # forward: the newest all-gather's output is freed at the next copy-out
                ag_buffer[t] = u.full[nxt if nxt is not None else k]
        elif not in_bwd and phases[t] in (Phase.FORWARD, Phase.LOSS):
            # before the first unit: the root's own all-gather output; after the last: the last
            # unit's, until the root's post-forward
            ag_buffer[t] = u.full[-1] if seen_unit and u.full else (u.root_full if not seen_unit else 0)
        done_count[t] = len(order)
    return _Schedule(gathered=gathered, ag_buffer=ag_buffer, done_count=done_count, done_order=tuple(order),
                     rs_unit=rs_unit, backward_gathered=sum(u.full[k] for k in regathered))


def rank_live(traced: "TracedStep", layout: "ParamLayout", grads: Collection[str], world: int, *,
              forward_prefetch: bool = True, shard_embeddings: bool = False,
              live: np.ndarray | None = None, schedule: _Schedule | None = None) -> np.ndarray:
    """Per-rank live bytes per component after every traced op (module doc), W > 1.

    `grads`: names of the parameters FSDP2 computes a (whole) gradient of this step; `live`: the
    trace's live array after evaluate's adjustments (default: traced.live); `schedule`:
    `_schedule` of this trace, layout, world and options, when the caller reuses it."""
    live = (traced.live if live is None else live).astype(np.int64).copy()
    u = _units(layout, world, grads, shard_embeddings)
    n = live.shape[1]
    if schedule is None:
        schedule = _schedule(traced, u, n, forward_prefetch)
    trained = np.asarray(u.trained + (0,), dtype=np.int64)  # index -1: no unit
    padded = np.asarray(u.trained_padded + (0,), dtype=np.int64)
    order = list(schedule.done_order)
    cum_full = np.concatenate([[0], np.cumsum(trained[order])]).astype(np.int64)
    cum_shard = np.concatenate([[0], np.cumsum(np.asarray(u.trained_shard, dtype=np.int64)[order])]).astype(np.int64)
    done_full = cum_full[schedule.done_count]
    done_shard = cum_shard[schedule.done_count]
    rs_buffer = padded[schedule.rs_unit]
    w = _CI[Component.WEIGHTS]
    gr = _CI[Component.GRADIENTS]
    live[w] = live[w] - layout.total_bytes + u.shard + schedule.gathered
    live[gr] = np.maximum(live[gr] - done_full, 0) + done_shard
    live[_CI[Component.TEMPORARIES]] += rs_buffer + schedule.ag_buffer
    return live


# ---------------------------------------------------------------------------------------------
# Optimizer state per rank: runtime.sharded_optim's local span slices


def _spans_of(strategy: Strategy, model: "ModelSpec", layout: "ParamLayout", dtype: str) -> tuple:
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
    out = np.zeros((len(spans), world), dtype=np.int64)
    ranks = np.arange(world, dtype=np.int64)
    for i, s in enumerate(spans):
        shape = shapes[s.param]
        rows = shape[0] if shape else 1
        per = -(-rows // world)
        lo = np.minimum(ranks * per, rows)
        hi = np.minimum(lo + per, rows)
        if s.dim == 0:
            row_bytes = s.nbytes // (s.end - s.start) if s.end > s.start else 0
            out[i] = np.clip(np.minimum(s.end, hi) - np.maximum(s.start, lo), 0, None) * row_bytes
        else:
            out[i] = s.nbytes * (hi - lo) // max(rows, 1)
    return out


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
class _RankState:
    """One rank's optimizer-side bytes for one chunk's step."""

    static: dict
    """GPU components of the state resident through the step (rounded: ROUNDING apart)."""
    static_reserved: int
    temps: dict
    temps_reserved: int
    host: dict
    disk: dict


def _rank_states(strategy: Strategy, layout: "ParamLayout", spans: tuple, local: np.ndarray, k: int,
                 prefetch: int | None, world: int, cache: dict) -> list[_RankState]:
    """Per rank r: state resident on the GPU (every chunk's for C = 1 / GPU tier; else chunk
    k's working copy and chunk `prefetch`'s), the step's temporaries, host (and disk)."""
    from planner import evaluate as ev

    bounds = cache.setdefault("bounds", np.cumsum([0] + [len(c) for c in spans]))
    elem = layout.elem_bytes
    out = []
    for r in range(world):
        def chunk_local(j: int) -> tuple[int, ...]:
            return tuple(int(b) for b in local[bounds[j]:bounds[j + 1], r] if b)

        if ("all", r) not in cache:
            cache[("all", r)] = tuple(int(b) for b in local[:, r] if b)
        every = cache[("all", r)]
        mine = chunk_local(k)
        ahead = chunk_local(prefetch) if prefetch is not None else ()
        key = ("rank", r, k, prefetch)
        if key not in cache:
            active = ev.ActiveSet(chunk=k, tensor_bytes=mine, prefetch_bytes=ahead)
            # every chunk's state on the GPU (C = 1, GPU tier): the same for every chunk
            everything = strategy.chunks == 1 or strategy.state_tier == Tier.GPU
            static_key = ("static", r) if everything else ("static", r, k, prefetch)
            if static_key not in cache:
                statics = ev.gpu_static_allocs(strategy, layout, active, every)
                static: dict = {}
                ev.add_allocs(static, statics)
                cache[static_key] = (static, ev.segment_bytes(statics))
            static, static_reserved = cache[static_key]
            temps_list = step_temp_allocs(mine, elem)
            temps: dict = {}
            ev.add_allocs(temps, temps_list)
            if ("host", r) not in cache:
                cache[("host", r)] = ev.host_and_disk_bytes(strategy, layout, active, every)
            host, disk = cache[("host", r)]
            cache[key] = _RankState(static=static, static_reserved=static_reserved, temps=temps,
                                    temps_reserved=ev.segment_bytes(temps_list), host=host, disk=disk)
        out.append(cache[key])
    return out


# ---------------------------------------------------------------------------------------------
# What each chunk's step traces, independent of the world size (cached across world sizes)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Prepared:
    layout: "ParamLayout"
    spans: tuple
    """Spans per chunk (C = 1: one chunk of every parameter whole)."""
    touched: tuple[frozenset, ...]
    """Per chunk: the parameters FSDP2 computes and reduce-scatters a whole gradient of."""
    sliced: tuple[tuple[int, ...], ...]
    """Per chunk: bytes of each sub-tensor gradient buffer (sliced spans, whole and unsharded
    on every rank, all_reduced at the step)."""
    cases: tuple[tuple["TracedStep", int], ...]
    """(traced step, chunk) for every chunk examined; exact mode: every chunk, each with its
    group's representative trace; bound mode: every chunk, with the one full-FT trace."""
    mode: str
    """"exact" or "bound" (C = 1: "exact", the full-FT trace is exact)."""
    flops: tuple[int, ...]


_PREPARED: dict[tuple, _Prepared] = {}
# Per world size, reused across strategies, GPU kinds and calls (chunkft size asks many): FSDP
# schedules per trace (keyed by the trace object, kept alive beside its value), local span
# bytes and per-rank state per chunk table, and evaluate's one-GPU estimates (step times).
_SCHEDULES: dict[tuple, tuple] = {}
_RANK_CACHES: dict[tuple, dict] = {}
_SINGLES: dict[tuple, Estimate] = {}
_CACHE_SIZE = 256


def _remember(store: dict, key: tuple, value: Any) -> Any:
    if len(store) >= _CACHE_SIZE:
        store.pop(next(iter(store)))
    store[key] = value
    return value


def _cached_schedule(traced: "TracedStep", layout: "ParamLayout", world: int, shard_embeddings: bool,
                     forward_prefetch: bool) -> _Schedule:
    key = (id(traced), world, shard_embeddings, forward_prefetch)
    hit = _SCHEDULES.get(key)
    if hit is None or hit[0] is not traced:
        units = _units(layout, world, (), shard_embeddings)
        hit = _remember(_SCHEDULES, key, (traced, _schedule(traced, units, traced.live.shape[1], forward_prefetch)))
    return hit[1]


def sharded_grad_spec(table: "ChunkTable", k: int) -> dict:
    """Chunk k's GradSpec as runtime.sharded_optim trains it: a sliced span of a matrix keeps its
    sub-tensor gradient (runtime.subgrad on its nn.Linear / nn.Embedding owner); a sliced 1-D
    tensor (a norm weight, whose subgrad rule would recompute the module in backward) gets its
    whole gradient, as whole spans do."""
    spec = table.grad_spec(k)
    return {n: v if v is False or v is True or len(table.shapes[n]) > 1 else True for n, v in spec.items()}


def _chunk_grads(table: "ChunkTable", k: int, layout: "ParamLayout") -> tuple[frozenset, tuple[int, ...]]:
    """(parameters with an FSDP2 gradient, bytes of each sub-tensor gradient buffer) of chunk k.
    A buffer is the whole unsharded slice in the training dtype, plus one row for an
    nn.Embedding owner (subgrad's index_add sends other tokens to a dummy row)."""
    spec = sharded_grad_spec(table, k)
    whole = frozenset(n for n, v in spec.items() if v is True)
    shapes = dict(table.shapes)
    buffers = []
    for sp in table.chunks[k]:
        if spec[sp.param] is True:
            continue
        extra = 0
        if sp.param == layout.input_embedding:  # one more row: (e - s + 1) x C, or (R + 1) x (e - s)
            rows = sp.end - sp.start if sp.dim == 0 else shapes[sp.param][0]
            extra = sp.nbytes // max(rows, 1)
        buffers.append(sp.nbytes + extra)
    return whole, tuple(buffers)


def _prepare(model: "ModelSpec", shape: "StepShape", strategy: Strategy, sm: int, chunk_traces: str) -> _Prepared:
    from planner import evaluate as ev

    layout = ev.param_layout(model, shape.dtype)
    mode = chunk_traces
    if mode == "auto":
        mode = "exact" if layout.total_params <= ev.EXACT_CHUNK_TRACE_MAX_PARAMS else "bound"
    if strategy.chunks == 1:
        mode = "exact"
    key = (model.fingerprint(), shape, strategy.chunks, strategy.checkpointing, strategy.loss_chunk_tokens,
           strategy.recipe, sm, mode)
    if key in _PREPARED:
        return _PREPARED[key]

    def trace(grad):
        return ev.traced_step(model, shape, grad=grad, checkpointing=strategy.checkpointing,
                              loss_chunk_tokens=strategy.loss_chunk_tokens, sm=sm, loop=strategy.recipe.loop.value)

    spans = _spans_of(strategy, model, layout, shape.dtype)
    if strategy.chunks == 1:
        touched = (frozenset(n for n, _, _ in layout.named_shapes),)
        sliced: tuple = ((),)
    else:
        table = ev.chunk_table(model, shape.dtype, strategy.chunks)
        grads = [_chunk_grads(table, k, layout) for k in range(table.num_chunks)]
        touched = tuple(g[0] for g in grads)
        sliced = tuple(g[1] for g in grads)
    if strategy.chunks == 1:
        traced = trace(None)
        cases: list = [(traced, 0)]
        flops = [traced.flops]
    elif mode == "exact":
        table = ev.chunk_table(model, shape.dtype, strategy.chunks)
        cases = []
        for group in ev.chunk_groups(table, layout.layer_prefix):
            traced = trace(sharded_grad_spec(table, group[0]))
            cases += [(traced, k) for k in group]
        cases.sort(key=lambda c: c[1])
        flops = [c[0].flops for c in cases]
    else:
        traced = trace(None)
        cases = [(traced, k) for k in range(len(spans))]
        flops = [traced.flops] * len(spans)
    prepared = _Prepared(layout=layout, spans=spans, touched=touched, sliced=sliced, cases=tuple(cases), mode=mode,
                         flops=tuple(flops))
    if len(_PREPARED) >= 32:
        _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = prepared
    return prepared


def _bound_chunks(prep: _Prepared, strategy: Strategy, local: np.ndarray, world: int) -> list[int]:
    """Bound mode: the chunks whose analytic bytes (FSDP2 gradients and slice buffers; the
    worst rank's state on the GPU plus step temporaries) are largest, as evaluate's
    `bound_candidates` picks them; the shared trace makes the rest differ by these terms only."""
    from planner import evaluate as ev

    layout = prep.layout
    elem = layout.elem_bytes
    per_param = ev.MASTER_BYTES_PER_PARAM + ev.MOMENT_BYTES_PER_PARAM
    bounds = np.cumsum([0] + [len(c) for c in prep.spans])
    sums = np.add.reduceat(local, bounds[:-1], axis=0)  # (C, W) local bytes per chunk
    maxes = np.maximum.reduceat(local, bounds[:-1], axis=0)
    cast = ev.FP32_BYTES if elem < ev.FP32_BYTES else 0
    temps = (cast + ev.SINGLE_TENSOR_TEMP_BYTES_PER_PARAM) * maxes // elem
    if strategy.state_tier == Tier.GPU:
        state = np.zeros_like(sums)
    else:
        ahead = np.roll(sums, -1, axis=0) if _prefetches(strategy, len(prep.spans)) else 0
        state = per_param * (sums + ahead) // elem
    static = (state + temps).max(axis=1)
    tensor = dict(zip((n for n, _, _ in layout.named_shapes), layout.tensor_bytes))
    grads = [sum(tensor[n] for n in t) + sum(b) for t, b in zip(prep.touched, prep.sliced)]
    keyed = [((g, int(st)), k) for k, (g, st) in enumerate(zip(grads, static))]
    by_total = sorted(keyed, key=lambda x: (-(x[0][0] + x[0][1]), x[1]))[:ev.BOUND_CANDIDATES]
    by_grad = max(keyed, key=lambda x: (x[0][0], -x[1]))
    by_static = max(keyed, key=lambda x: (x[0][1], -x[1]))
    return sorted({k for _, k in by_total} | {by_grad[1], by_static[1]})


def _prefetches(strategy: Strategy, num_chunks: int) -> bool:
    """HOST tier with prefetch_depth >= 1: the next chunk's working copy is on the device too
    (runtime.sharded_optim: depth beyond 1 behaves as 1)."""
    return strategy.state_tier == Tier.HOST and strategy.prefetch_depth >= 1 and num_chunks > 1


def _check(strategy: Strategy, gpus_per_node: Any, nodes: Any) -> None:
    for what, v in (("gpus_per_node", gpus_per_node), ("nodes", nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ChunkftError(f"invalid {what} {v!r}: must be an integer >= 1")
    if (strategy.optimizer_device != OptimizerDevice.GPU or strategy.weights != WeightResidency.GPU
            or strategy.grad_staging is not None):
        raise ChunkftError(f"strategy {strategy.label()!r} is not modelled sharded: FSDP plans run AdamW on the "
                           "GPU with weights resident and no gradient staging (optimizer_device 'gpu', weights "
                           "'gpu', grad_staging none)")


def _check_tier(strategy: Strategy) -> None:
    if strategy.chunks > 1 and strategy.state_tier not in (Tier.GPU, Tier.HOST):
        raise ChunkftError(f"state tier {strategy.state_tier.value!r} is not supported sharded "
                           "(runtime.sharded_optim refuses it): valid state tiers are gpu, host")


# ---------------------------------------------------------------------------------------------
# One rank's step of one chunk: what evaluate_sharded maximises and planner.simulate replays


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RankStep:
    """One rank's GPU bytes through one chunk's step, op by op, as evaluate_sharded counts them.

    After traced op t the rank holds `live[:, t]` (per component, in planner.memory.COMPONENTS
    order) plus `static`; at the optimizer step `end` plus `static` plus `temps`; at the step
    end `end` plus `static`. `peak()` and `reserved_bytes()` are the figures evaluate_sharded
    reports for this (chunk, rank); a timeline built from these arrays has the same maximum."""

    chunk: int
    """Index into the chunk table (0 for full fine-tuning, C = 1)."""
    rank: int
    live: np.ndarray = dataclasses.field(repr=False)
    """(len(COMPONENTS), ops): `rank_live` of the step's trace after evaluate's adjustments
    (shared between the ranks of a chunk: read only)."""
    reserved: np.ndarray = dataclasses.field(repr=False)
    """(ops,): the trace's reserved bytes with its live bytes replaced by `live`'s."""
    static: dict[Component, int]
    """Optimizer state resident on the GPU through the step (this rank's slices, rounded)."""
    static_reserved: int
    end: dict[Component, int]
    """The trace's bytes at the optimizer step: every unit resharded (FSDP2's post-backward),
    its all-gather and reduce-scatter buffers freed, every FSDP2 gradient a padded shard, the
    slice buffers whole."""
    temps: dict[Component, int]
    """The AdamW step's temporaries on this rank (`step_temp_allocs`, rounded)."""
    temps_reserved: int
    host: dict[Component, int]
    """This rank's host bytes (HOST state tier: its slices of every chunk)."""
    disk: dict[Component, int]
    phases: tuple[Phase, ...] = dataclasses.field(default=(), repr=False)
    layers: tuple[int | None, ...] = dataclasses.field(default=(), repr=False)
    peak_op: int = 0
    """The op with the most live bytes (the argmax of `live`'s column sums)."""
    reserved_max: int = 0
    """`reserved.max()`."""

    def op_bytes(self, t: int) -> dict[Component, int]:
        return {c: int(self.live[i, t]) + self.static.get(c, 0) for i, c in enumerate(COMPONENTS)}

    def end_bytes(self) -> dict[Component, int]:
        """At the step end: the optimizer step's bytes without its temporaries."""
        return {c: b + self.static.get(c, 0) for c, b in self.end.items()}

    def optimizer_bytes(self) -> dict[Component, int]:
        out = self.end_bytes()
        for c, b in self.temps.items():
            out[c] = out.get(c, 0) + b
        return out

    def peak(self) -> tuple[int, dict[Component, int]]:
        """(peak allocated bytes, components there): the peak op's or the optimizer step's."""
        peak, gpu = self._peak
        return peak, dict(gpu)

    @functools.cached_property
    def _peak(self) -> tuple[int, dict[Component, int]]:
        gpu = self.op_bytes(self.peak_op)
        peak = sum(gpu.values())
        opt = self.optimizer_bytes()
        if sum(opt.values()) > peak:
            gpu, peak = opt, sum(opt.values())
        return peak, gpu

    def reserved_bytes(self) -> int:
        """Reserved high-water mark: the trace's, plus the state's and the step temporaries'
        fresh segments (never below the peak)."""
        return max(self.reserved_max + self.static_reserved + self.temps_reserved, self._peak[0])


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _ChunkPart:
    """The rank-independent part of one chunk's step (the ranks differ only in their state)."""

    live: np.ndarray
    reserved: np.ndarray
    reserved_max: int
    peak_op: int
    end: dict
    schedule: _Schedule


def _chunk_part(prep: _Prepared, strategy: Strategy, k: int, world: int, shard_embeddings: bool) -> _ChunkPart:
    from planner import evaluate as ev

    layout = prep.layout
    traced, _ = prep.cases[k]
    grads = prep.touched[k]
    grad_active = ev.ActiveSet(chunk=k if strategy.chunks > 1 else None,
                               tensor_bytes=tuple(b for (n, _, _), b in zip(layout.named_shapes, layout.tensor_bytes)
                                                  if n in grads) + prep.sliced[k])
    live, reserved = ev.adjusted_gpu_live(traced, strategy, layout, grad_active)
    schedule = _cached_schedule(traced, layout, world, shard_embeddings, True)
    rank = rank_live(traced, layout, grads, world, live=live, shard_embeddings=shard_embeddings, schedule=schedule)
    total = rank.sum(axis=0)
    rank_reserved = np.maximum(reserved - live.sum(axis=0) + total, total)
    # the optimizer step: every unit resharded (FSDP2's post-backward), its all-gather and
    # reduce-scatter buffers freed, every gradient a padded shard
    end = {c: int(rank[i, -1]) for i, c in enumerate(COMPONENTS)}
    rs_input = 0
    if schedule.rs_unit[-1] >= 0:  # a reduce-scatter copy on the last op
        rs_input = _units(layout, world, grads, shard_embeddings).trained_padded[schedule.rs_unit[-1]]
    end[Component.WEIGHTS] -= int(schedule.gathered[-1])
    end[Component.TEMPORARIES] -= int(schedule.ag_buffer[-1]) + rs_input
    end[Component.GRADIENTS] = grad_shard_bytes(layout, grads, world) + sum(prep.sliced[k])
    return _ChunkPart(live=rank, reserved=rank_reserved, reserved_max=int(rank_reserved.max()),
                      peak_op=int(np.argmax(total)), end=end, schedule=schedule)


def _rank_cache(model: "ModelSpec", shape: "StepShape", strategy: Strategy, world: int,
                prep: _Prepared) -> tuple[dict, np.ndarray]:
    """(per-rank state cache, `local_span_bytes` of every span) for this chunk table and world."""
    num_chunks = len(prep.spans)
    cache_key = (model.fingerprint(), shape.dtype, strategy.chunks, world, strategy.state_tier,
                 _prefetches(strategy, num_chunks))
    cache = _RANK_CACHES.get(cache_key)
    if cache is None:
        cache = _remember(_RANK_CACHES, cache_key, {})
    if "local" not in cache:
        shapes = {n: s for n, s, _ in prep.layout.named_shapes}
        cache["local"] = local_span_bytes([s for chunk in prep.spans for s in chunk], shapes, world)
    return cache, cache["local"]


def _rank_steps(prep: _Prepared, strategy: Strategy, part: _ChunkPart, k: int, world: int, local: np.ndarray,
                cache: dict) -> list[RankStep]:
    """Every rank's RankStep of chunk k."""
    traced = prep.cases[k][0]
    nxt = (k + 1) % len(prep.spans) if _prefetches(strategy, len(prep.spans)) else None
    return [RankStep(chunk=k, rank=r, live=part.live, reserved=part.reserved, static=st.static,
                     static_reserved=st.static_reserved, end=part.end, temps=st.temps, temps_reserved=st.temps_reserved,
                     host=st.host, disk=st.disk, phases=traced.phases, layers=traced.layers, peak_op=part.peak_op,
                     reserved_max=part.reserved_max)
            for r, st in enumerate(_rank_states(strategy, prep.layout, prep.spans, local, k, nxt, world, cache))]


def rank_step(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: "Hardware", *, gpus_per_node: int,
              nodes: int = 1, shard_embeddings: bool = False, chunk_traces: str = "auto", chunk: int | None = None,
              rank: int | None = None) -> RankStep:
    """One rank's step of one chunk on gpus_per_node x nodes GPUs (W > 1): the per-op,
    per-component live bytes, the resident state, the optimizer step's bytes, as
    evaluate_sharded counts them (the same code). `chunk` and `rank` default to the (chunk, rank)
    evaluate_sharded reports (its `worst_chunk`, 0 for C = 1, and `worst_rank`)."""
    from planner import evaluate as ev

    _check(strategy, gpus_per_node, nodes)
    if chunk_traces not in ev.CHUNK_TRACE_MODES:
        raise ChunkftError(f"invalid chunk_traces {chunk_traces!r}: valid values are {', '.join(ev.CHUNK_TRACE_MODES)}")
    world = gpus_per_node * nodes
    if world == 1:
        raise ChunkftError("rank_step models an FSDP2 rank: gpus_per_node x nodes must be 2 or more "
                           "(one GPU: planner.evaluate.gpu_timeline)")
    _check_tier(strategy)
    if chunk is None or rank is None:
        est = evaluate_sharded(model, shape, strategy, hw, gpus_per_node=gpus_per_node, nodes=nodes,
                               shard_embeddings=shard_embeddings, chunk_traces=chunk_traces)
        chunk = (est.worst_chunk or 0) if chunk is None else chunk
        rank = est.worst_rank if rank is None else rank
    prep = _prepare(model, shape, strategy, ev.sm_arch(hw), chunk_traces)
    num_chunks = len(prep.spans)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < num_chunks:
        raise ChunkftError(f"chunk {chunk!r} does not exist; valid chunks are 0..{num_chunks - 1}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ChunkftError(f"rank {rank!r} does not exist; valid ranks are 0..{world - 1}")
    cache, local = _rank_cache(model, shape, strategy, world, prep)
    part = _chunk_part(prep, strategy, chunk, world, shard_embeddings)
    return _rank_steps(prep, strategy, part, chunk, world, local, cache)[rank]


def rank_state_allocs(model: "ModelSpec", shape: "StepShape", strategy: Strategy, *, world: int,
                      chunk: int, rank: int) -> dict[Component, int]:
    """GPU bytes per component (allocator rounding as ROUNDING) of one rank's working copy of
    chunk `chunk`'s fp32 master and moments: its local slices (`local_span_bytes`), what a
    HOST-tier chunk switch evicts or brings in (runtime.sharded_optim `_evict` / `_activate`)."""
    from planner import evaluate as ev

    layout = ev.param_layout(model, shape.dtype)
    spans = _spans_of(strategy, model, layout, shape.dtype)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < len(spans):
        raise ChunkftError(f"chunk {chunk!r} does not exist; valid chunks are 0..{len(spans) - 1}")
    shapes = {n: s for n, s, _ in layout.named_shapes}
    mine = local_span_bytes(spans[chunk], shapes, world)[:, rank]
    out: dict[Component, int] = {}
    ev.add_allocs(out, ev.state_allocs(tuple(int(b) for b in mine if b), layout.elem_bytes))
    return out


def evaluate_sharded(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: "Hardware", *,
                     gpus_per_node: int, nodes: int = 1, interconnect_Bps: float | None = None,
                     shard_embeddings: bool = False, chunk_traces: str = "auto") -> ShardedEstimate:
    """Per-rank peaks, communication and step time of `strategy` on gpus_per_node x nodes GPUs.

    `shape` is one rank's micro-batch. The worst (chunk, rank) by GPU need is reported; host
    and disk are the largest rank's, `node_host_bytes` the fullest node's. `chunk_traces` as in
    planner.evaluate.evaluate (exact: every chunk with its group's `sharded_grad_spec` trace;
    bound: the full-FT trace for every chunk, evaluated for the chunks `_bound_chunks` picks)."""
    strategy.recipe.require_modelled()
    from planner import evaluate as ev

    _check(strategy, gpus_per_node, nodes)
    if chunk_traces not in ev.CHUNK_TRACE_MODES:
        raise ChunkftError(f"invalid chunk_traces {chunk_traces!r}: valid values are {', '.join(ev.CHUNK_TRACE_MODES)}")
    world = gpus_per_node * nodes
    bw = interconnect_Bps if interconnect_Bps is not None else interconnect_bandwidth(hw.gpu, nodes)
    if world == 1:
        single = ev.evaluate(model, shape, strategy, hw, chunk_traces=chunk_traces)
        host = single.peak_bytes.get(Tier.HOST, 0)
        return ShardedEstimate(strategy=strategy, gpus_per_node=1, nodes=1, peak_bytes=dict(single.peak_bytes),
                               components=dict(single.components), reserved_bytes=single.reserved_bytes,
                               context_bytes=single.context_bytes, all_gather_bytes=0, reduce_scatter_bytes=0,
                               interconnect_Bps=bw, comm_time_s=0.0, step_time_s=single.step_time_s,
                               step_time_parts_s=dict(single.step_time_parts_s), single=single,
                               worst_chunk=single.worst_chunk, node_host_bytes=host, chunk_traces=chunk_traces)
    _check_tier(strategy)
    prep = _prepare(model, shape, strategy, ev.sm_arch(hw), chunk_traces)
    layout = prep.layout
    cache, local = _rank_cache(model, shape, strategy, world, prep)
    num_chunks = len(prep.spans)
    chunks = range(num_chunks) if prep.mode == "exact" else _bound_chunks(prep, strategy, local, world)
    best = None
    for k in chunks:
        part = _chunk_part(prep, strategy, k, world, shard_embeddings)
        for step in _rank_steps(prep, strategy, part, k, world, local, cache):
            peak, _ = step.peak()
            res = step.reserved_bytes()
            if best is None or (res, peak) > best[0]:
                best = ((res, peak), step, part.schedule)
    _, worst_step, schedule = best
    peak, gpu = worst_step.peak()
    res, worst, worst_rank = worst_step.reserved_bytes(), worst_step.chunk, worst_step.rank
    states = _rank_states(strategy, layout, prep.spans, local, worst, None, world, cache)
    hosts = [sum(st.host.values()) for st in states]
    fullest = max(range(world), key=lambda r: (hosts[r], -r))
    node_host = max(sum(hosts[n * gpus_per_node:(n + 1) * gpus_per_node]) for n in range(nodes))
    u = _units(layout, world, prep.touched[worst], shard_embeddings)
    all_gather = u.root_full + sum(u.full) + schedule.backward_gathered
    reduce_scatter = world * grad_shard_bytes(layout, prep.touched[worst], world)  # padded, root's included
    all_reduce = sum(prep.sliced[worst])
    comm = (world - 1) / world * (all_gather + reduce_scatter + 2 * all_reduce) / bw
    # step time: evaluate's terms at the mean flops of the chunks' steps (exact: the sharded
    # grad-spec traces, the runtime's work; bound: evaluate's analytic flops), plus the comm term
    single_key = (model.fingerprint(), shape, strategy, hw, prep.mode)
    single = _SINGLES.get(single_key)
    if single is None:
        single = ev.evaluate(model, shape, strategy, hw, chunk_traces="bound")
        if prep.mode == "exact":
            spans_bytes = tuple(sp.nbytes for chunk in prep.spans for sp in chunk)
            mean = ev.ActiveSet(chunk=None, tensor_bytes=(sum(spans_bytes) // num_chunks,))
            timed = ev.combine(prep.cases[0][0], strategy, layout, mean, hw, dtype=shape.dtype, all_spans=spans_bytes,
                               flops=int(sum(prep.flops) / len(prep.flops)))
            single = dataclasses.replace(single, step_time_s=timed.step_time_s,
                                         step_time_parts_s=dict(timed.step_time_parts_s))
        _remember(_SINGLES, single_key, single)
    parts = dict(single.step_time_parts_s)
    for term in ("optimizer", "switch"):
        if term in parts:
            parts[term] /= world
    parts["comm"] = max(0.0, comm - parts.get("compute", 0.0))
    return ShardedEstimate(
        strategy=strategy, gpus_per_node=gpus_per_node, nodes=nodes,
        peak_bytes={Tier.GPU: peak, Tier.HOST: hosts[fullest],
                    Tier.DISK: sum(states[fullest].disk.values())},
        components={Tier.GPU: {c: b for c, b in gpu.items() if b}, Tier.HOST: dict(states[fullest].host),
                    Tier.DISK: dict(states[fullest].disk)},
        reserved_bytes=max(res, peak), context_bytes=ev.CUDA_CONTEXT_BYTES, all_gather_bytes=all_gather,
        reduce_scatter_bytes=reduce_scatter, all_reduce_bytes=all_reduce, interconnect_Bps=bw, comm_time_s=comm,
        step_time_s=float(sum(parts.values())), step_time_parts_s=parts, single=single,
        worst_chunk=worst if strategy.chunks > 1 else None, worst_rank=worst_rank, node_host_bytes=node_host,
        chunk_traces=prep.mode, shard_embeddings=shard_embeddings)


def world_sizes(gpus_per_node: int, max_gpus: int = MAX_GPUS) -> list[tuple[int, int]]:
    """(gpus_per_node, nodes) in increasing GPU count: 1..gpus_per_node on one node, then whole nodes."""
    out = [(g, 1) for g in range(1, min(gpus_per_node, max_gpus) + 1)]
    nodes = 2
    while gpus_per_node * nodes <= max_gpus:
        out.append((gpus_per_node, nodes))
        nodes += 1
    return out


def fits_card(est: ShardedEstimate, memory_bytes: int, host_bytes_per_node: int | None = None) -> bool:
    """Every card holds its rank (reserved + CUDA context) and, if given, every node's host
    memory holds its ranks' host bytes."""
    host_ok = host_bytes_per_node is None or est.node_host_bytes <= host_bytes_per_node
    return est.card_need_bytes() <= memory_bytes and host_ok


def min_gpus(model: "ModelSpec", shape: "StepShape", strategy: Strategy | Sequence[Strategy],
             gpu_profile: "GpuProfile | str", *, gpus_per_node: int = 8, max_gpus: int = 64,
             host_bytes_per_node: int | None = None, shard_embeddings: bool = False,
             chunk_traces: str = "auto", hw_overrides: dict | None = None) -> int | None:
    """Fewest GPUs of this kind (one node up to `gpus_per_node`, then whole nodes) on which some
    of the strategies fits every card (reserved + CUDA context <= its memory) and, if given,
    each node's host memory; None if `max_gpus` do not suffice. `chunk_traces` as in
    planner.evaluate.evaluate ("bound", auto's choice above 2B parameters, carries the full-FT
    trace's free-block slack into the reserved bytes). Strategies the sharded runtime does not
    run (host optimizer, streamed weights, disk state) are skipped."""
    from planner.hardware import hardware

    hw = hardware(gpu_profile, **(hw_overrides or {}))
    strategies = [strategy] if isinstance(strategy, Strategy) else list(strategy)
    if not strategies:
        raise ChunkftError("min_gpus needs at least one strategy")
    for per_node, nodes in world_sizes(gpus_per_node, max_gpus):
        for s in strategies:
            try:
                est = evaluate_sharded(model, shape, s, hw, gpus_per_node=per_node, nodes=nodes,
                                       shard_embeddings=shard_embeddings, chunk_traces=chunk_traces)
            except ChunkftError:
                continue
            if fits_card(est, hw.gpu.memory_bytes, host_bytes_per_node):
                return per_node * nodes
    return None


def cpu_rank_rise_bytes(model: "ModelSpec", shape: "StepShape", world: int, *, checkpointing: bool = False,
                        loss_chunk_tokens: int = 0, shard_embeddings: bool = False,
                        strategy: Strategy | None = None, chunk: int = 0, rank: int | None = None) -> int:
    """Predicted C-heap rise of one rank's training step on a CPU run of runtime.distributed
    (gloo; runtime.sharded_optim.ShardedChunkAdamW), above the bytes in use before the step:
    what planner.measure's MallocSampler measures there.

    Without `strategy`: full fine-tuning (one chunk of whole tensors) with `checkpointing` and
    `loss_chunk_tokens`. With a `strategy` (its chunks, state tier, prefetch, checkpointing and
    chunked loss): the step of chunk `chunk`, on rank `rank` (None: the largest over ranks).

    The same per-rank model as `evaluate_sharded` over the trace replayed with the CPU
    allocator (exact byte sizes), without forward prefetch (a CPU rank cannot run ahead of its
    own compute), the chunk traced with `sharded_grad_spec`. Optimizer state is
    not part of the rise: the GPU tier's exists from the start, and the HOST tier's working copy
    of the chunk (a separate clone on CPU) and the prefetched next one are made at the previous
    chunk switch, before the step. The optimizer step keeps the FSDP2 gradients' padded shards
    and the sliced spans' whole buffers, and adds `step_temp_allocs` for the rank's slices. With update_interval 1 the step
    ends in a chunk switch (HOST tier): the working copy of chunk `chunk` is written back and
    freed, the next one's loaded (or, prefetching, the one after it): a rise of the difference,
    counted when positive."""
    from planner import evaluate as ev
    from planner.trace import TraceOptions, trace_step

    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ChunkftError(f"invalid world size {world!r}: a sharded CPU run has at least 2 ranks")
    if strategy is None:
        strategy = Strategy(checkpointing=checkpointing, loss_chunk_tokens=loss_chunk_tokens)
    elif not isinstance(strategy, Strategy):
        raise ChunkftError(f"expected a Strategy, got {type(strategy).__name__}")
    _check(strategy, world, 1)
    _check_tier(strategy)
    layout = ev.param_layout(model, shape.dtype)
    spans = _spans_of(strategy, model, layout, shape.dtype)
    num_chunks = len(spans)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < num_chunks:
        raise ChunkftError(f"chunk {chunk!r} does not exist; valid chunks are 0..{num_chunks - 1}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world):
        raise ChunkftError(f"rank {rank!r} does not exist; valid ranks are 0..{world - 1}")
    grad = None
    grads = frozenset(s.param for s in spans[chunk])
    buffers = 0
    if strategy.chunks > 1:
        table = ev.chunk_table(model, shape.dtype, strategy.chunks)
        grad = sharded_grad_spec(table, chunk)
        grads, sliced = _chunk_grads(table, chunk, layout)
        buffers = sum(sliced)
    graph = trace_step(model, shape, TraceOptions(grad=grad, checkpointing=strategy.checkpointing,
                                                  loss_chunk_tokens=strategy.loss_chunk_tokens,
                                                  loop=strategy.recipe.loop.value))
    tl = graph.replay(allocator="cpu")
    traced = ev.TracedStep(live=np.stack([tl.live_bytes[c] for c in COMPONENTS]),
                           reserved=np.asarray(tl.total_bytes, dtype=np.int64), flops=0,
                           phases=tuple(op.phase for op in graph.ops), layers=tuple(op.layer for op in graph.ops))
    live = rank_live(traced, layout, grads, world, forward_prefetch=False, shard_embeddings=shard_embeddings)
    start = tl.start_bytes - layout.total_bytes + _units(layout, world, grads, shard_embeddings).shard
    step = int(live.sum(axis=0).max()) - start
    shapes = {n: s for n, s, _ in layout.named_shapes}
    local = local_span_bytes([s for c in spans for s in c], shapes, world)
    bounds = np.cumsum([0] + [len(c) for c in spans])
    per_param = ev.MASTER_BYTES_PER_PARAM + ev.MOMENT_BYTES_PER_PARAM
    grad_shards = grad_shard_bytes(layout, grads, world) + buffers
    rises = []
    for r in range(world) if rank is None else (rank,):
        mine = local[bounds[chunk]:bounds[chunk + 1], r]
        temps = sum(a.nbytes for a in step_temp_allocs([int(b) for b in mine], layout.elem_bytes))
        switch = 0
        if strategy.state_tier == Tier.HOST and num_chunks > 1 and strategy.update_interval == 1:
            ahead = 2 if _prefetches(strategy, num_chunks) else 1
            new = (chunk + ahead) % num_chunks
            grown = int(local[bounds[new]:bounds[new + 1], r].sum()) - int(mine.sum())
            switch = per_param * grown // layout.elem_bytes
        rises.append(max(step, grad_shards + temps, switch))
    return max(rises)
