"""Per-rank memory and step time of a strategy run on several GPUs with FSDP2 sharding.

The layout modelled is runtime.distributed's: `fully_shard` on every decoder layer, then on the
root (embeddings, final norm, lm_head), world size W = gpus_per_node x nodes, optionally the
input embedding and the output head as units of their own (`shard_embeddings`). The optimizer is
runtime.sharded_optim.ShardedChunkAdamW (full fine-tuning is its one chunk of whole tensors).
`shape` is the per-rank micro-batch (the global batch is W times it). Per rank, op by op over
the traced step of that micro-batch (planner.evaluate.traced_step: the same trace, replay and
caching as `evaluate`, so activations, logits and temporaries are exactly evaluate's), the
per-rank figures come from three parts, each with its own module and docstring:

  planner.fsdp        weights (shards, the root and the running and prefetched units unsharded),
                      FSDP2 gradients (unsharded until their unit's reduce-scatter, then
                      shards), all-gather and reduce-scatter buffers
  planner.rank_state  the fp32 master + AdamW moments of the rank's local slices of the spans
                      (GPU, HOST or DISK state tier: flat host buffers per chunk, or chunk
                      files and staging buffers), the AdamW step's temporaries
  planner.rank_step   chunk k's gradients (whole FSDP2 gradients, sub-tensor buffers of sliced
                      spans), the chunk traces ("exact" / "bound" / "auto"), and `RankStep`:
                      one (chunk, rank) through its step (public here as `rank_step`)

Every rank is evaluated (ranks differ in the slices they hold); the reported GPU figures are
the worst (chunk, rank)'s by reserved then allocated bytes, host / disk the fullest rank's,
`node_host_bytes` the fullest node's. W = 1 is not sharded (no FSDP) and returns `evaluate`'s
estimate exactly (sub-tensor gradients, runtime.chunk_optim). `min_gpus` / `world_sizes` /
`fits_card` search GPU counts (one node, then whole nodes); `fewest_gpus` is that search against
a node's whole budget (GPU per card, host RAM and disk per node, as `chunkft plan` holds a plan
to: planner.parallel.per_rank_budget), what `chunkft size` answers with; `cpu_rank_rise_bytes`
is the same per-rank model on a CPU (gloo) run, what tests measure.

Communication per step (ring collectives: each rank sends and receives (W-1)/W of the
unsharded bytes): all-gather of every parameter in forward and, in backward, of every unit
backward reaches (with the one below it, prefetched) - the root is not resharded after
forward; reduce-scatter of the FSDP2 gradients (dim 0 padded), in the training dtype (no
mixed-precision reduce); all_reduce of the sliced spans' buffers (2 (W-1)/W of their bytes).
Bandwidth: NVLink per GPU kind within a node (`NVLINK_BANDWIDTH_BPS`, PCIe peer-to-peer for
kinds without NVLink), the inter-node network across nodes (`INTER_NODE_BANDWIDTH_BPS`); the
slowest link paces a ring. FSDP overlaps communication with compute: the step time adds the
part of the communication time that exceeds the step's compute time (`comm` term); the
optimizer and chunk-switch terms shrink by W.

Measured on CPU (2 gloo ranks, tiny Llama: hidden 128, 4 layers, vocab 2048, 512 tokens):
full FT fp32 (tests/test_distributed.py), each rank's mallinfo2 peak 34.46 MB against
`cpu_rank_rise_bytes`' 34.07 MB (1.2% under: malloc headers and autograd nodes, ~1 KB per
forward op); ChunkFT C = 4 and 8 (sliced k_proj, down_proj, embedding, lm_head spans), fp32 /
bf16, state on host (prefetch 0 / 1) or GPU, every chunk measured: 0.7-1.6% under
(tests/test_sharding.py pins one); C = 8, bf16, prefetch 1, host tier (one flat buffer per
chunk) and disk tier (chunk files, two staging buffers): measured 21.52 MB per rank against
21.25 MB predicted on both tiers (1.2% under, within the 2% the test holds it to), and every
rank's host and disk state bytes equal the planner's exactly. The first step of a run measures ~10% more (lazy
initialisation), and is not what is modelled.

Known limitations (each part's own are in its docstring): NCCL's own buffers (a few hundred MiB
per rank) are not counted. The step time's compute is evaluate's model at the mean flops of the
chunks' steps (exact: the `sharded_grad_spec` traces; bound: evaluate's analytic flops). No
tensor / pipeline parallelism; `shape` must be the same on every rank. gloo's staging buffers
for the slices' all_reduce (CPU) and NCCL's are not counted.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from planner.errors import ChunkftError
from planner.fsdp import fsdp_units, grad_shard_bytes, rank_live
from planner.memory import COMPONENTS
from planner.rank_state import chunk_spans, local_span_bytes, prefetches_next_chunk, rank_states, step_temp_allocs
from planner.rank_step import (RankStep, bound_chunks, chunk_grads, chunk_part, prepare_chunks, rank_cache,
                               rank_steps, sharded_grad_spec)
from planner.schema import Component, Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
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
# the one-GPU step time's terms per model, shape, strategy, hardware and trace mode, reused
# across world sizes and calls (chunkft size asks many)
_SINGLES: dict[tuple, dict[str, float]] = {}
_CACHE_SIZE = 256


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
    single: Estimate | None = None
    """W = 1: evaluate()'s estimate (this one is it). W > 1: None; the step-time terms are the
    one-GPU step's of the same per-rank micro-batch (planner.evaluate.step_time_parts, bound chunk
    traces; exact: evaluate's formula at the sharded traces' mean flops), comm added."""
    worst_chunk: int | None = None
    shard_embeddings: bool = False
    """Input embedding and output head (final norm + lm_head) are FSDP units of their own."""
    all_reduce_bytes: int = 0
    """Bytes of the sub-tensor gradient buffers all_reduced at the step (sliced ChunkFT spans)."""
    worst_rank: int = 0
    """The rank whose GPU need is reported (ranks hold different parts of sliced spans)."""
    node_host_bytes: int = 0
    """Host bytes of the fullest node: the sum over its ranks (HOST state tier: their slices)."""
    node_disk_bytes: int = 0
    """Disk bytes of the fullest node: the sum over its ranks (DISK state tier: their files)."""
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


def _remember(store: dict, key: tuple, value: Any) -> Any:
    if len(store) >= _CACHE_SIZE:
        store.pop(next(iter(store)))
    store[key] = value
    return value


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
    """Every state tier runs sharded (runtime.sharded_optim: GPU, HOST, DISK)."""
    if strategy.state_tier not in (Tier.GPU, Tier.HOST, Tier.DISK):
        raise ChunkftError(f"state tier {strategy.state_tier!r} is not supported sharded: valid state tiers are "
                           "gpu, host, disk")


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
    prep = prepare_chunks(model, shape, strategy, ev.sm_arch(hw), chunk_traces)
    num_chunks = len(prep.spans)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < num_chunks:
        raise ChunkftError(f"chunk {chunk!r} does not exist; valid chunks are 0..{num_chunks - 1}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ChunkftError(f"rank {rank!r} does not exist; valid ranks are 0..{world - 1}")
    cache, local = rank_cache(model, shape, strategy, world, prep)
    part = chunk_part(prep, strategy, chunk, world, shard_embeddings)
    return rank_steps(prep, strategy, part, chunk, world, local, cache)[rank]


def evaluate_sharded(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: "Hardware", *,
                     gpus_per_node: int, nodes: int = 1, interconnect_Bps: float | None = None,
                     shard_embeddings: bool = False, chunk_traces: str = "auto") -> ShardedEstimate:
    """Per-rank peaks, communication and step time of `strategy` on gpus_per_node x nodes GPUs.

    `shape` is one rank's micro-batch. The worst (chunk, rank) by GPU need is reported; host
    and disk are the largest rank's, `node_host_bytes` the fullest node's. `chunk_traces` as in
    planner.evaluate.evaluate (exact: every chunk with its group's `sharded_grad_spec` trace;
    bound: the full-FT trace for every chunk, evaluated for the chunks `bound_chunks` picks)."""
    strategy.recipe.require_sharded_modelled()  # what the per-rank cost model prices (planner.recipe)
    from planner import cache
    from planner import evaluate as ev

    _check(strategy, gpus_per_node, nodes)
    if chunk_traces not in ev.CHUNK_TRACE_MODES:
        raise ChunkftError(f"invalid chunk_traces {chunk_traces!r}: valid values are {', '.join(ev.CHUNK_TRACE_MODES)}")
    # planner.cache's "sharded" bucket (when a cache is in use): a repeated search evaluates nothing again
    memo = None if interconnect_Bps is not None else cache.bucket("sharded", (model.fingerprint(), shape, hw,
                                                                             chunk_traces))
    memo_key = (strategy, gpus_per_node, nodes, shard_embeddings)
    hit = cached_sharded(model, shape, strategy, hw, gpus_per_node=gpus_per_node, nodes=nodes,
                         shard_embeddings=shard_embeddings, chunk_traces=chunk_traces, memo=memo)
    if hit is not None:
        return hit
    est = _evaluate_sharded(model, shape, strategy, hw, gpus_per_node=gpus_per_node, nodes=nodes,
                            interconnect_Bps=interconnect_Bps, shard_embeddings=shard_embeddings,
                            chunk_traces=chunk_traces)
    if memo is not None:
        memo[memo_key] = est
    return est


def cached_sharded(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: "Hardware", *,
                   gpus_per_node: int, nodes: int = 1, shard_embeddings: bool = False, chunk_traces: str = "auto",
                   memo: dict | None = None) -> ShardedEstimate | None:
    """The estimate `evaluate_sharded` (default interconnect) keeps in the disk cache's "sharded"
    bucket, or None (no cache in use, or not evaluated yet): planner.parallel traces nothing ahead
    for a strategy answered from there. `memo`: the bucket, when the caller holds it."""
    if memo is None:
        from planner import cache

        memo = cache.bucket("sharded", (model.fingerprint(), shape, hw, chunk_traces))
    hit = None if memo is None else memo.get((strategy, gpus_per_node, nodes, shard_embeddings))
    return hit if isinstance(hit, ShardedEstimate) and hit.strategy == strategy else None


def _evaluate_sharded(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: "Hardware", *,
                      gpus_per_node: int, nodes: int, interconnect_Bps: float | None, shard_embeddings: bool,
                      chunk_traces: str) -> ShardedEstimate:
    from planner import evaluate as ev
    from planner.solve import cached_evaluate

    world = gpus_per_node * nodes
    bw = interconnect_Bps if interconnect_Bps is not None else interconnect_bandwidth(hw.gpu, nodes)
    if world == 1:
        single = cached_evaluate(model, shape, strategy, hw, chunk_traces=chunk_traces)
        host = single.peak_bytes.get(Tier.HOST, 0)
        return ShardedEstimate(strategy=strategy, gpus_per_node=1, nodes=1, peak_bytes=dict(single.peak_bytes),
                               components=dict(single.components), reserved_bytes=single.reserved_bytes,
                               context_bytes=single.context_bytes, all_gather_bytes=0, reduce_scatter_bytes=0,
                               interconnect_Bps=bw, comm_time_s=0.0, step_time_s=single.step_time_s,
                               step_time_parts_s=dict(single.step_time_parts_s), single=single,
                               worst_chunk=single.worst_chunk, node_host_bytes=host, chunk_traces=chunk_traces)
    _check_tier(strategy)
    prep = prepare_chunks(model, shape, strategy, ev.sm_arch(hw), chunk_traces)
    layout = prep.layout
    cache, local = rank_cache(model, shape, strategy, world, prep)
    num_chunks = len(prep.spans)
    chunks = range(num_chunks) if prep.mode == "exact" else bound_chunks(prep, strategy, local, world, cache)
    best = None
    for k in chunks:
        part = chunk_part(prep, strategy, k, world, shard_embeddings)
        for step in rank_steps(prep, strategy, part, k, world, local, cache):
            peak, _ = step.peak()
            res = step.reserved_bytes()
            if best is None or (res, peak) > best[0]:
                best = ((res, peak), step, part.schedule)
    _, worst_step, schedule = best
    peak, gpu = worst_step.peak()
    res, worst, worst_rank = worst_step.reserved_bytes(), worst_step.chunk, worst_step.rank
    states = rank_states(strategy, layout, prep.spans, local, worst, None, world, cache)
    hosts = [sum(st.host.values()) for st in states]
    disks = [sum(st.disk.values()) for st in states]
    fullest = max(range(world), key=lambda r: (hosts[r], disks[r], -r))
    node_host = max(sum(hosts[n * gpus_per_node:(n + 1) * gpus_per_node]) for n in range(nodes))
    node_disk = max(sum(disks[n * gpus_per_node:(n + 1) * gpus_per_node]) for n in range(nodes))
    u = fsdp_units(layout, world, prep.touched[worst], shard_embeddings)
    all_gather = u.root_full + sum(u.full) + schedule.backward_gathered
    reduce_scatter = world * grad_shard_bytes(layout, prep.touched[worst], world)  # padded, root's included
    all_reduce = sum(prep.sliced[worst])
    comm = (world - 1) / world * (all_gather + reduce_scatter + 2 * all_reduce) / bw
    # step time: evaluate's terms at the mean flops of the chunks' steps (exact: the sharded
    # grad-spec traces, the runtime's work; bound: evaluate's analytic flops), plus the comm term.
    # Only the one-GPU step time is needed: planner.evaluate's step-time path (the same checks,
    # trace and formula as evaluate(chunk_traces="bound"), none of its memory estimates).
    single_key = (model.fingerprint(), shape, strategy, hw, prep.mode)
    single_parts = _SINGLES.get(single_key)
    if single_parts is None:
        if prep.mode == "exact":
            ev._check_evaluable(strategy, shape, "bound")  # what evaluate refuses, refused alike
            step_bytes = sum(sp.nbytes for chunk in prep.spans for sp in chunk) // num_chunks
            single_parts = ev.step_parts(layout, step_bytes, int(sum(prep.flops) / len(prep.flops)), shape.dtype,
                                         prep.cases[0][0].host_activations, strategy, hw)
        else:
            single_parts = ev.step_time_parts(model, shape, strategy, hw, chunk_traces="bound")
        _remember(_SINGLES, single_key, single_parts)
    parts = dict(single_parts)
    for term in ("optimizer", "switch"):
        if term in parts:
            parts[term] /= world
    parts["comm"] = max(0.0, comm - parts.get("compute", 0.0))
    return ShardedEstimate(
        strategy=strategy, gpus_per_node=gpus_per_node, nodes=nodes,
        peak_bytes={Tier.GPU: peak, Tier.HOST: hosts[fullest], Tier.DISK: max(disks)},
        components={Tier.GPU: {c: b for c, b in gpu.items() if b}, Tier.HOST: dict(states[fullest].host),
                    Tier.DISK: dict(states[fullest].disk)},
        reserved_bytes=max(res, peak), context_bytes=ev.CUDA_CONTEXT_BYTES, all_gather_bytes=all_gather,
        reduce_scatter_bytes=reduce_scatter, all_reduce_bytes=all_reduce, interconnect_Bps=bw, comm_time_s=comm,
        step_time_s=float(sum(parts.values())), step_time_parts_s=parts,
        worst_chunk=worst if strategy.chunks > 1 else None, worst_rank=worst_rank, node_host_bytes=node_host,
        node_disk_bytes=node_disk,
        chunk_traces=prep.mode, shard_embeddings=shard_embeddings)


def world_sizes(gpus_per_node: int, max_gpus: int = MAX_GPUS) -> list[tuple[int, int]]:
    """(gpus_per_node, nodes) in increasing GPU count: 1..gpus_per_node on one node, then whole nodes."""
    out = [(g, 1) for g in range(1, min(gpus_per_node, max_gpus) + 1)]
    nodes = 2
    while gpus_per_node * nodes <= max_gpus:
        out.append((gpus_per_node, nodes))
        nodes += 1
    return out


def fits_card(est: ShardedEstimate, memory_bytes: int, host_bytes_per_node: int | None = None,
              disk_bytes_per_node: int | None = None) -> bool:
    """Every card holds its rank (reserved + CUDA context) and, if given, every node's host
    memory and disk hold its ranks' host and disk bytes."""
    host_ok = host_bytes_per_node is None or est.node_host_bytes <= host_bytes_per_node
    disk_ok = disk_bytes_per_node is None or est.node_disk_bytes <= disk_bytes_per_node
    return est.card_need_bytes() <= memory_bytes and host_ok and disk_ok


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuCount:
    """`fewest_gpus`' answer: the fitting estimate, or the closest one and what it lacks."""

    estimate: ShardedEstimate | None
    """The fewest GPUs' fitting strategy (fewest chunks; GPU, HOST, DISK tier in that order)."""
    closest: ShardedEstimate | None = None
    """None fits: of the leanest strategies at the most GPUs examined, the one missing least."""
    missing_bytes: dict[Tier, int] = dataclasses.field(default_factory=dict)
    """None fits: what `closest` lacks per tier (GPU per card, host RAM and disk per node)."""
    evaluated: int = 0


_TIER_ORDER = {Tier.GPU: 0, Tier.HOST: 1, Tier.DISK: 2}


def fewest_gpus(model: "ModelSpec", shape: "StepShape", strategies: Sequence[Strategy], hw: "Hardware",
                budget: Budget, *, gpus_per_node: int, max_gpus: int = 64, shard_embeddings: bool = False,
                chunk_traces: str = "auto", memo: dict | None = None) -> GpuCount:
    """Fewest GPUs of `hw`'s kind (2 .. `gpus_per_node` on one node, then whole nodes, up to
    `max_gpus`) on which one of `strategies` fits `budget` (GPU per card, host RAM and disk per
    node, shared out among its ranks as planner.parallel.per_rank_budget: what `chunkft plan`
    checks), with the fewest chunks (ties: GPU, HOST, DISK tier).

    Strategies are grouped by everything but the chunk count (state tier, loss chunk,
    checkpointing, prefetch, update interval) and ordered by chunk count. The per-rank need falls as
    GPUs are added (smaller shards and state slices) and, within a group, as chunks grow
    (smaller working copies and step temporaries): the world size is bisected on whether some
    group's largest chunk count fits, then each group is bisected for its fewest fitting chunks
    (O(log W + log C) evaluations per group instead of one per world size and strategy).
    `memo` ((strategy, layout) -> estimate) may be shared by GPU kinds of one SM architecture."""
    from planner.parallel import ParallelLayout, per_rank_budget, runs_sharded

    memo = {} if memo is None else memo
    groups: dict[tuple, list[Strategy]] = {}
    for st in sorted(dict.fromkeys(s for s in strategies if runs_sharded(s)), key=lambda s: s.chunks):
        key = (_TIER_ORDER[st.state_tier], st.loss_chunk_tokens == 0, st.loss_chunk_tokens, st.checkpointing,
               st.prefetch_depth, st.update_interval)
        groups.setdefault(key, []).append(st)
    ordered = [g for _, g in sorted(groups.items(), key=lambda kg: kg[0])]
    sizes = [(p, n) for p, n in world_sizes(gpus_per_node, max_gpus) if p * n > 1]
    evaluated = 0

    def share(size: tuple[int, int]) -> Budget:
        return per_rank_budget(budget, ParallelLayout(gpus_per_node=size[0], nodes=size[1]))

    def estimate(st: Strategy, size: tuple[int, int]) -> ShardedEstimate | None:
        nonlocal evaluated
        key = (st, size, shard_embeddings, chunk_traces)
        if key not in memo:
            evaluated += 1
            try:
                memo[key] = evaluate_sharded(model, shape, st, hw, gpus_per_node=size[0], nodes=size[1],
                                             shard_embeddings=shard_embeddings, chunk_traces=chunk_traces)
            except ChunkftError:
                memo[key] = None
        return memo[key]

    def fits(st: Strategy, size: tuple[int, int]) -> bool:
        est = estimate(st, size)
        return est is not None and est.fits(share(size))

    def lean_fits(i: int) -> bool:  # off-GPU state tiers first: their leanest need the least GPU
        return any(fits(g[-1], sizes[i]) for g in sorted(ordered, key=lambda g: g[-1].state_tier == Tier.GPU))

    if not sizes or not ordered:
        return GpuCount(estimate=None, evaluated=evaluated)
    if not lean_fits(len(sizes) - 1):
        top = sizes[-1]
        limits = share(top)
        closest, short = None, {}
        for g in ordered:
            est = estimate(g[-1], top)
            if est is None:
                continue
            miss = {t: (est.need_bytes(t) - limits.limit(t)) * (1 if t == Tier.GPU else top[0])
                    for t in Tier if limits.limit(t) is not None and est.need_bytes(t) > limits.limit(t)}
            if closest is None or sum(miss.values()) < sum(short.values()):
                closest, short = est, miss
        return GpuCount(estimate=None, closest=closest, missing_bytes=short, evaluated=evaluated)
    lo, hi = 0, len(sizes) - 1  # sizes[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if lean_fits(mid):
            hi = mid
        else:
            lo = mid + 1
    size = sizes[hi]
    found = []
    for group in ordered:
        if not fits(group[-1], size):
            continue
        a, b = 0, len(group) - 1  # group[b] fits
        while a < b:
            mid = (a + b) // 2
            if fits(group[mid], size):
                b = mid
            else:
                a = mid + 1
        found.append(estimate(group[b], size))
    best = min(found, key=lambda e: (e.strategy.chunks, _TIER_ORDER[e.strategy.state_tier]))
    return GpuCount(estimate=best, evaluated=evaluated)


def min_gpus(model: "ModelSpec", shape: "StepShape", strategy: Strategy | Sequence[Strategy],
             gpu_profile: "GpuProfile | str", *, gpus_per_node: int = 8, max_gpus: int = 64,
             host_bytes_per_node: int | None = None, shard_embeddings: bool = False,
             chunk_traces: str = "auto", hw_overrides: dict | None = None) -> int | None:
    """Fewest GPUs of this kind (one node up to `gpus_per_node`, then whole nodes) on which some
    of the strategies fits every card (reserved + CUDA context <= its memory) and, if given,
    each node's host memory; None if `max_gpus` do not suffice. `chunk_traces` as in
    planner.evaluate.evaluate ("bound", auto's choice above 2B parameters, carries the full-FT
    trace's free-block slack into the reserved bytes). Strategies the sharded runtime does not
    run (host optimizer, streamed weights, gradient staging) are skipped, and so are world sizes
    whose shard of the weights alone overfills a card (70B on one 80 GB card: nothing traced)."""
    from planner.hardware import hardware

    hw = hardware(gpu_profile, **(hw_overrides or {}))
    strategies = [strategy] if isinstance(strategy, Strategy) else list(strategy)
    if not strategies:
        raise ChunkftError("min_gpus needs at least one strategy")
    from planner.evaluate import param_layout

    weights = param_layout(model, shape.dtype).total_bytes
    for per_node, nodes in world_sizes(gpus_per_node, max_gpus):
        if weights // (per_node * nodes) > hw.gpu.memory_bytes:
            continue  # every rank holds its shard of the weights: that alone overfills a card
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
    not part of the rise: the GPU tier's exists from the start, the HOST tier's flat buffers and
    the DISK tier's staging buffers are made with the optimizer, and the working copy of the
    chunk (a separate clone on CPU) and the prefetched next one are made at the previous chunk
    switch, before the step. The optimizer step keeps the FSDP2 gradients' padded shards
    and the sliced spans' whole buffers, and adds `step_temp_allocs` for the rank's slices. With update_interval 1 the step
    ends in a chunk switch (HOST / DISK tier): the working copy of chunk `chunk` is written back and
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
    spans = chunk_spans(strategy, model, layout, shape.dtype)
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
        grads, sliced = chunk_grads(table, chunk, layout)
        buffers = sum(sliced)
    graph = trace_step(model, shape, TraceOptions(grad=grad, checkpointing=strategy.checkpointing,
                                                  loss_chunk_tokens=strategy.loss_chunk_tokens,
                                                  loop=strategy.recipe.loop.value))
    tl = graph.replay(allocator="cpu")
    traced = ev.TracedStep(live=np.stack([tl.live_bytes[c] for c in COMPONENTS]),
                           reserved=np.asarray(tl.total_bytes, dtype=np.int64), flops=0,
                           phases=tuple(op.phase for op in graph.ops), layers=tuple(op.layer for op in graph.ops))
    live = rank_live(traced, layout, grads, world, forward_prefetch=False, shard_embeddings=shard_embeddings)
    start = tl.start_bytes - layout.total_bytes + fsdp_units(layout, world, grads, shard_embeddings).shard
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
        if strategy.state_tier in (Tier.HOST, Tier.DISK) and num_chunks > 1 and strategy.update_interval == 1:
            ahead = 2 if prefetches_next_chunk(strategy, num_chunks) else 1
            new = (chunk + ahead) % num_chunks
            grown = int(local[bounds[new]:bounds[new + 1], r].sum()) - int(mine.sum())
            switch = per_param * grown // layout.elem_bytes
        rises.append(max(step, grad_shards + temps, switch))
    return max(rises)
