"""Per-rank memory and step time of a strategy run on several GPUs with FSDP2 sharding.

The layout modelled is runtime.distributed's: `fully_shard` on every decoder layer, then on the
root (embeddings, final norm, lm_head), world size W = gpus_per_node x nodes; with
`shard_embeddings` the input embedding and the output head (final norm + lm_head) are units of
their own first (as torchtitan wraps them), so they are unsharded only while they run. `shape` is the
per-rank micro-batch (the global batch is W times it). Per rank, op by op over the traced step
of that micro-batch (planner.evaluate.traced_step: the same trace, replay and caching as
`evaluate`, so activations, logits and temporaries are exactly evaluate's):

  weights    every parameter's dim-0 shard, padded as FSDP2 pads it (ceil(rows / W) rows on
             every rank), plus the unsharded copies in flight: the root's parameters from the
             first forward op to the end of backward (FSDP2 keeps the root unsharded after
             forward), the unit (decoder layer, or embedding / head unit) that runs and the one
             prefetched (FSDP2 issues the next unit's all-gather while the current one
             computes: in backward explicitly, in forward on CUDA by the CPU running ahead of
             the GPU; `forward_prefetch=False` is a CPU run, where it cannot), with padding.
  gradients  the trace's gradient bytes, except that a unit's gradients are reduce-scattered
             once its backward is done: from then on 1/W of them. The root's gradients (lm_head
             first in backward, unless a unit of its own) stay unsharded to the end of
             backward. During the optimizer step all gradients are sharded.
  comm       in TEMPORARIES: FSDP2's all-gather output buffers, which it copies the unsharded
             parameters out of. In forward the newest one lives until the next unit's copy-out
             (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, `all_gather_state`:
             freeing is deferred to overlap the copy-out with the next all-gather), the last
             unit's until the root's post-forward (after the loss); in backward a unit's is
             freed right after its copy-out (counted on the op that starts the unit). And the
             reduce-scatter input (a flat copy of the unit's gradients, made before they are
             freed) on the first op after a unit's backward.
  states     fp32 master + AdamW moments 12 B/param (8 in fp32 training), the spans' shards:
             all of them on the GPU for C = 1 / state on GPU; the active (+ prefetched)
             chunk's for ChunkFT with state on host or disk, where the resting state is on
             each rank's host / disk, sharded too. The AdamW step works on local shards: its
             temporaries are the largest span's shard's.

W = 1 is not sharded (no FSDP) and returns `evaluate`'s estimate exactly.

Communication per step (ring collectives: each rank sends and receives (W-1)/W of the
unsharded bytes): all-gather of every parameter in forward and of every unit again in backward
(the root is not resharded after forward); reduce-scatter of the trained parameters'
gradients, in the training dtype (no mixed-precision reduce). Bandwidth: NVLink per GPU kind
within a node (`NVLINK_BANDWIDTH_BPS`, PCIe peer-to-peer for kinds without NVLink), the
inter-node network across nodes (`INTER_NODE_BANDWIDTH_BPS`); the slowest link paces a ring.
FSDP overlaps communication with compute: the step time adds the part of the communication
time that exceeds the step's compute time (`comm` term); the optimizer and chunk-switch terms
shrink by W (each rank steps and moves its shards only).

Measured on CPU (tests/test_distributed.py: 2 gloo ranks, tiny Llama, fp32, 512 tokens, full FT
step with AdamW): each rank's mallinfo2 peak 34.46 MB against `cpu_rank_rise_bytes`' 34.07 MB
(1.2% under: malloc headers and autograd nodes, ~1 KB per forward op).

Known limitations: the reserved bytes keep the single-rank trace's free-block slack (the bound
mode's full-FT trace: ~6 GiB at 70B); NCCL's own buffers (a few hundred MiB per rank) are not
counted. The trace does not mark where backward starts inside the loss phase, so with
`shard_embeddings` the head unit and its all-gather buffer count as held through the loss's
backward, where FSDP2 has resharded it until its pre-backward: pessimistic by up to two head
units (measured on CPU: predicted 33.48 MB, measured 31.77 MB, 5.4% over). A sliced ChunkFT
span is counted as its slice (the runtime trains whole tensors sharded); no tensor / pipeline
parallelism; `shape` must be the same on every rank.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from planner.errors import ChunkftError
from planner.memory import COMPONENTS
from planner.schema import Component, Phase, Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
    from planner.evaluate import ActiveSet, ParamLayout, TracedStep
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
    """Unsharded gradient bytes reduce-scattered per step."""
    interconnect_Bps: float
    comm_time_s: float
    """Time of the step's collectives at `interconnect_Bps`, before overlap."""
    step_time_s: float
    step_time_parts_s: dict[str, float]
    single: Estimate
    """evaluate()'s unsharded estimate of the same per-rank micro-batch."""
    worst_chunk: int | None = None
    shard_embeddings: bool = False
    """Input embedding and output head (final norm + lm_head) are FSDP units of their own."""

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


def _padded_full(shape: tuple[int, ...], elem: int, world: int) -> int:
    return world * shard_bytes(shape, elem, world)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Units:
    """The FSDP units in forward order and what each holds (padded, unsharded bytes)."""

    shard: int
    """One rank's shards of every parameter."""
    full: tuple[int, ...]
    """Unsharded bytes of each unit: [input embedding,] layer 0 .. L-1 [, output head]."""
    trained: tuple[int, ...]
    """Unsharded gradient bytes of each unit this step."""
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


def _units(layout: "ParamLayout", world: int, spans: Sequence[tuple[str, int]], shard_embeddings: bool) -> _Units:
    unit, count = _unit_of_param(layout, shard_embeddings)
    full = [0] * count
    trained = [0] * count
    root = shard = 0
    for name, shape, elem in layout.named_shapes:
        u = unit(name)
        shard += shard_bytes(shape, elem, world)
        if u is None:
            root += _padded_full(shape, elem, world)
        else:
            full[u] += _padded_full(shape, elem, world)
    for name, nbytes in spans:
        u = unit(name)
        if u is not None:
            trained[u] += nbytes
    return _Units(shard=shard, full=tuple(full), trained=tuple(trained), root_full=root,
                  offset=1 if shard_embeddings else 0)


def grad_shard_bytes(spans: Sequence[tuple[str, int]], world: int) -> int:
    """One rank's gradient shards once every unit has reduce-scattered."""
    return sum(math.ceil(b / world) for _, b in spans)


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
    """The unit whose reduce-scatter input is copied at each op (-1: none)."""


def _schedule(traced: "TracedStep", u: _Units, n: int, forward_prefetch: bool) -> _Schedule:
    phases = traced.phases or (None,) * n
    backward = (Phase.BACKWARD, Phase.RECOMPUTE)
    gathered = np.full(n, u.root_full, dtype=np.int64)
    ag_buffer = np.zeros(n, dtype=np.int64)
    done_count = np.zeros(n, dtype=np.int64)
    rs_unit = np.full(n, -1, dtype=np.int64)
    order: list[int] = []
    current: int | None = None  # unit whose backward runs
    seen_unit = False
    for t, k in enumerate(_op_units(traced, u, n)):
        in_bwd = phases[t] in backward
        if in_bwd and k is not None and k != current:
            if current is not None and k < current:
                order.append(current)  # its post-backward reduce-scatters: input copy, then shards
                rs_unit[t] = current
            # pre-backward of unit k: the prefetched unit's all-gather output (or k's own, for
            # the first unit of backward) lives until its copy-out is done
            ag = k - 1 if current is not None and k > 0 else (k if current is None else None)
            ag_buffer[t] = u.full[ag] if ag is not None else 0
            current = k
        if k is not None:
            seen_unit = True
            if in_bwd:
                nxt = k - 1 if k > 0 else None
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
                     rs_unit=rs_unit)


def rank_live(traced: "TracedStep", layout: "ParamLayout", spans: Sequence[tuple[str, int]], world: int, *,
              forward_prefetch: bool = True, shard_embeddings: bool = False,
              live: np.ndarray | None = None, schedule: _Schedule | None = None) -> np.ndarray:
    """Per-rank live bytes per component after every traced op (module doc), W > 1.

    `spans`: (parameter name, 16-bit bytes) of what trains this step; `live`: the trace's live
    array after evaluate's adjustments (default: traced.live); `schedule`: `_schedule` of this
    trace, layout, world and options, when the caller reuses it across chunks."""
    live = (traced.live if live is None else live).astype(np.int64).copy()
    u = _units(layout, world, spans, shard_embeddings)
    n = live.shape[1]
    if schedule is None:
        schedule = _schedule(traced, u, n, forward_prefetch)
    trained = np.asarray(u.trained + (0,), dtype=np.int64)  # index -1: no unit
    order = list(schedule.done_order)
    cum_full = np.concatenate([[0], np.cumsum(trained[order])]).astype(np.int64)
    cum_shard = np.concatenate([[0], np.cumsum(-(-trained[order] // world))]).astype(np.int64)
    done_full = cum_full[schedule.done_count]
    done_shard = cum_shard[schedule.done_count]
    rs_buffer = trained[schedule.rs_unit]
    w = _CI[Component.WEIGHTS]
    gr = _CI[Component.GRADIENTS]
    live[w] = live[w] - layout.total_bytes + u.shard + schedule.gathered
    live[gr] = np.maximum(live[gr] - done_full, 0) + done_shard
    live[_CI[Component.TEMPORARIES]] += rs_buffer + schedule.ag_buffer
    return live


def _sharded_active(active: "ActiveSet", world: int) -> "ActiveSet":
    return dataclasses.replace(active, tensor_bytes=tuple(math.ceil(b / world) for b in active.tensor_bytes),
                               prefetch_bytes=tuple(math.ceil(b / world) for b in active.prefetch_bytes))


def _check(strategy: Strategy, gpus_per_node: Any, nodes: Any) -> None:
    for what, v in (("gpus_per_node", gpus_per_node), ("nodes", nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ChunkftError(f"invalid {what} {v!r}: must be an integer >= 1")
    if strategy.optimizer_device != OptimizerDevice.GPU or strategy.weights != WeightResidency.GPU:
        raise ChunkftError(f"strategy {strategy.label()!r} is not modelled sharded: FSDP plans run AdamW on the "
                           "GPU with weights resident (optimizer_device 'gpu', weights 'gpu')")


def evaluate_sharded(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: "Hardware", *,
                     gpus_per_node: int, nodes: int = 1, interconnect_Bps: float | None = None,
                     shard_embeddings: bool = False, chunk_traces: str = "auto") -> ShardedEstimate:
    """Per-rank peaks, communication and step time of `strategy` on gpus_per_node x nodes GPUs.

    `shape` is one rank's micro-batch. The worst chunk (highest per-rank GPU need) is reported
    for C > 1, among the chunks evaluate itself examines."""
    from planner import evaluate as ev

    _check(strategy, gpus_per_node, nodes)
    world = gpus_per_node * nodes
    single = ev.evaluate(model, shape, strategy, hw, chunk_traces=chunk_traces)
    bw = interconnect_Bps if interconnect_Bps is not None else interconnect_bandwidth(hw.gpu, nodes)
    if world == 1:
        return ShardedEstimate(strategy=strategy, gpus_per_node=1, nodes=1, peak_bytes=dict(single.peak_bytes),
                               components=dict(single.components), reserved_bytes=single.reserved_bytes,
                               context_bytes=single.context_bytes, all_gather_bytes=0, reduce_scatter_bytes=0,
                               interconnect_Bps=bw, comm_time_s=0.0, step_time_s=single.step_time_s,
                               step_time_parts_s=dict(single.step_time_parts_s), single=single,
                               worst_chunk=single.worst_chunk)
    layout = ev.param_layout(model, shape.dtype)
    sm = ev.sm_arch(hw)
    names = [n for n, _, _ in layout.named_shapes]

    def trace(grad):
        return ev.traced_step(model, shape, grad=grad, checkpointing=strategy.checkpointing,
                              loss_chunk_tokens=strategy.loss_chunk_tokens, sm=sm)

    cases: list[tuple[Any, Any, list[tuple[str, int]]]] = []  # (traced, active, spans)
    if strategy.chunks == 1:
        active = ev.ActiveSet(chunk=None, tensor_bytes=layout.tensor_bytes)
        cases.append((trace(None), active, list(zip(names, layout.tensor_bytes))))
        all_spans = layout.tensor_bytes
    else:
        table = ev.chunk_table(model, shape.dtype, strategy.chunks)
        all_spans = tuple(s.nbytes for c in table.chunks for s in c)
        mode = chunk_traces
        if mode == "auto":
            mode = "exact" if layout.total_params <= ev.EXACT_CHUNK_TRACE_MAX_PARAMS else "bound"
        if mode == "exact":
            for group in ev.chunk_groups(table, layout.layer_prefix):
                traced = trace(table.grad_spec(group[0]))
                for k in group:
                    cases.append((traced, ev.active_set_for(table, k, strategy),
                                  [(s.param, s.nbytes) for s in table.chunks[k]]))
        else:
            traced = trace(None)  # evaluate's bound: its candidate chunks stand for the rest
            actives = [ev.active_set_for(table, k, strategy) for k in range(table.num_chunks)]
            for k in ev.bound_candidates(actives, layout):
                cases.append((traced, actives[k], [(s.param, s.nbytes) for s in table.chunks[k]]))
    sharded_spans = tuple(math.ceil(b / world) for b in all_spans)
    schedules: dict[int, _Schedule] = {}  # keyed by id of a trace `cases` keeps alive
    best = None
    for traced, active, spans in cases:
        live, reserved = ev.adjusted_gpu_live(traced, strategy, layout, active)
        if id(traced) not in schedules:  # the same trace serves a whole group of chunks
            units = _units(layout, world, spans, shard_embeddings)
            schedules[id(traced)] = _schedule(traced, units, live.shape[1], True)
        rank = rank_live(traced, layout, spans, world, live=live, shard_embeddings=shard_embeddings,
                         schedule=schedules[id(traced)])
        rank_reserved = np.maximum(reserved - live.sum(axis=0) + rank.sum(axis=0), rank.sum(axis=0))
        sh_active = _sharded_active(active, world)
        statics = ev.gpu_static_allocs(strategy, layout, sh_active, sharded_spans)
        comps_static: dict[Component, int] = {}
        ev.add_allocs(comps_static, statics)
        total = rank.sum(axis=0)
        t = int(np.argmax(total))
        gpu = {c: int(rank[i, t]) + comps_static.get(c, 0) for i, c in enumerate(COMPONENTS)}
        peak = sum(gpu.values())
        res = int(rank_reserved.max()) + ev.segment_bytes(statics)
        temps = ev.optimizer_temp_allocs(strategy, layout, sh_active)
        if temps:  # optimizer step: every gradient sharded, plus the step's temporaries
            end = {c: int(rank[i, -1]) + comps_static.get(c, 0) for i, c in enumerate(COMPONENTS)}
            end[Component.GRADIENTS] = grad_shard_bytes(spans, world)
            ev.add_allocs(end, temps)
            res = max(res, int(rank_reserved.max()) + ev.segment_bytes(statics) + ev.segment_bytes(temps))
            if sum(end.values()) > peak:
                gpu, peak = end, sum(end.values())
        host, disk = ev.host_and_disk_bytes(strategy, layout, sh_active, sharded_spans)
        key = (max(res, peak), peak)
        if best is None or key > best[0]:
            best = (key, gpu, peak, res, host, disk, active, spans)
    _, gpu, peak, res, host, disk, active, spans = best
    u = _units(layout, world, spans, shard_embeddings)
    all_gather = u.root_full + 2 * sum(u.full)  # every unit again in backward; the root once
    reduce_scatter = sum(b for _, b in spans) if strategy.chunks > 1 else layout.total_bytes
    comm = (world - 1) / world * (all_gather + reduce_scatter) / bw
    parts = dict(single.step_time_parts_s)
    for term in ("optimizer", "switch"):
        if term in parts:
            parts[term] /= world
    parts["comm"] = max(0.0, comm - parts.get("compute", 0.0))
    return ShardedEstimate(
        strategy=strategy, gpus_per_node=gpus_per_node, nodes=nodes,
        peak_bytes={Tier.GPU: peak, Tier.HOST: sum(host.values()), Tier.DISK: sum(disk.values())},
        components={Tier.GPU: {c: b for c, b in gpu.items() if b}, Tier.HOST: host, Tier.DISK: disk},
        reserved_bytes=max(res, peak), context_bytes=single.context_bytes, all_gather_bytes=all_gather,
        reduce_scatter_bytes=reduce_scatter, interconnect_Bps=bw, comm_time_s=comm,
        step_time_s=float(sum(parts.values())), step_time_parts_s=parts, single=single,
        worst_chunk=active.chunk)


def world_sizes(gpus_per_node: int, max_gpus: int = MAX_GPUS) -> list[tuple[int, int]]:
    """(gpus_per_node, nodes) in increasing GPU count: 1..gpus_per_node on one node, then whole nodes."""
    out = [(g, 1) for g in range(1, gpus_per_node + 1)]
    nodes = 2
    while gpus_per_node * nodes <= max_gpus:
        out.append((gpus_per_node, nodes))
        nodes += 1
    return out


def min_gpus(model: "ModelSpec", shape: "StepShape", strategy: Strategy | Sequence[Strategy],
             gpu_profile: "GpuProfile | str", *, gpus_per_node: int = 8, max_gpus: int = 64,
             host_bytes_per_node: int | None = None, shard_embeddings: bool = False,
             chunk_traces: str = "auto", hw_overrides: dict | None = None) -> int | None:
    """Fewest GPUs of this kind (one node up to `gpus_per_node`, then whole nodes) on which some
    of the strategies fits every card (reserved + CUDA context <= its memory) and, if given,
    each node's host memory; None if `max_gpus` do not suffice. `chunk_traces` as in
    planner.evaluate.evaluate ("bound", auto's choice above 2B parameters, carries the full-FT
    trace's free-block slack into the reserved bytes: at 70B it answers 3 x 80 GB where the
    exact chunk traces answer 2)."""
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
            host_ok = host_bytes_per_node is None or per_node * est.need_bytes(Tier.HOST) <= host_bytes_per_node
            if est.card_need_bytes() <= hw.gpu.memory_bytes and host_ok:
                return per_node * nodes
    return None


def cpu_rank_rise_bytes(model: "ModelSpec", shape: "StepShape", world: int, *, checkpointing: bool = False,
                        loss_chunk_tokens: int = 0, shard_embeddings: bool = False) -> int:
    """Predicted C-heap rise of one rank's full fine-tuning step on a CPU run of
    runtime.distributed (gloo; torch.optim.AdamW with foreach=False), above the bytes in use
    before the step: what planner.measure's MallocSampler measures there.

    The same per-rank model as `evaluate_sharded` over the trace replayed with the CPU
    allocator (exact byte sizes), without forward prefetch (a CPU rank cannot run ahead of its
    own compute). The optimizer step keeps the gradient shards and adds the single-tensor
    AdamW temporaries of the largest shard: `exp_avg_sq.sqrt()` and its division, 2 elements
    per parameter in the training dtype (torch/optim/adam.py `_single_tensor_adam`)."""
    from planner import evaluate as ev
    from planner.trace import TraceOptions, trace_step

    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ChunkftError(f"invalid world size {world!r}: a sharded CPU run has at least 2 ranks")
    graph = trace_step(model, shape, TraceOptions(checkpointing=checkpointing, loss_chunk_tokens=loss_chunk_tokens))
    tl = graph.replay(allocator="cpu")
    traced = ev.TracedStep(live=np.stack([tl.live_bytes[c] for c in COMPONENTS]),
                           reserved=np.asarray(tl.total_bytes, dtype=np.int64), flops=0,
                           phases=tuple(op.phase for op in graph.ops), layers=tuple(op.layer for op in graph.ops))
    layout = ev.param_layout(model, shape.dtype)
    spans = list(zip([n for n, _, _ in layout.named_shapes], layout.tensor_bytes))
    rank = rank_live(traced, layout, spans, world, forward_prefetch=False, shard_embeddings=shard_embeddings)
    start = tl.start_bytes - layout.total_bytes + _units(layout, world, spans, shard_embeddings).shard
    step = int(rank.sum(axis=0).max()) - start
    optimizer = grad_shard_bytes(spans, world) + 2 * max(math.ceil(b / world) for b in layout.tensor_bytes)
    return max(step, optimizer)
