"""What hardware does a fine-tuning job need? Per strategy family, and across GPUs.

For every family of strategies (full FT on the GPU, ZeRO-Offload style, NVMSA staging, ChunkFT
with state on GPU / host / disk, streamed weights) `size_model` finds the strategy of the
family with the smallest GPU need (CUDA reserved bytes plus the CUDA context: what a card must
physically hold), reports its host RAM and disk, and lists the catalogue GPUs that suffice.

For each catalogue GPU that cannot hold the job alone with the weights resident, it says how
many of it would, run the way runtime.distributed runs it (FSDP2 + runtime.sharded_optim):
planner.sharding's per-rank model of the traced step, every rank of every examined world size
(one node of 2 .. `gpus_per_node` GPUs, then whole nodes, up to `max_gpus`). The answer is the
fewest GPUs on which every card holds its rank (reserved + CUDA context) and, if a budget is
given, every node's host RAM holds its ranks' host bytes; with the strategy that fits (the
fewest chunks, the GPU state tier before the host tier), its per-GPU need and host RAM per node.

The sharded search (`size_sharded`) examines the strategies the sharded runtime runs: AdamW on
the GPU, weights resident, no gradient staging, state on the GPU or (ChunkFT) the host; per
chunk count and state tier only the space's most memory-saving corner (checkpointing on,
the smallest loss chunk, prefetch 0, update interval 1: the memory representative whose
activations and state copies are least; `sharded_candidates`). A world size is examined in
full only when the leanest of them (the largest chunk count, per tier) fits the largest GPU
still unanswered: the per-rank need falls with the chunk count (smaller working copies and
step temporaries). Everything that does not depend on the world size (traces, layouts, chunk
tables) is computed once (planner.sharding caches it), and memory depends on the GPU kind only
through the cuBLAS workspace (the SM architecture), so one evaluation per architecture serves
every kind of it.

Known limitations: chunk traces follow planner.evaluate's "auto" (exact up to 2B parameters,
"bound" above: one full-FT trace for every chunk, pessimistic by what frozen layers would not
save), reported in `SizeReport.sharded_chunk_traces`; the leanest-first skip above is a
heuristic (a chunk count below the largest that fits where the largest does not is not found);
the sharded estimate's step time is one catalogue GPU's of its architecture; NCCL's own
buffers are not counted (planner.sharding). The one-GPU families use one set of estimates (on
`hw`) for the whole catalogue.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterable

from planner.errors import ChunkftError
from planner.hardware import GpuProfile, list_gpus, load_gpu
from planner.schema import Tier
from planner.solve import SearchSpace, default_space, memory_representatives, objective_key, Objective
from planner.strategy import Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
    from planner.hardware import Hardware
    from planner.model import ModelSpec
    from planner.sharding import ShardedEstimate
    from planner.trace import StepShape

FAMILIES: tuple[tuple[str, Callable[[Strategy], bool]], ...] = (
    ("full FT, AdamW on GPU",
     lambda s: s.chunks == 1 and s.optimizer_device == OptimizerDevice.GPU and s.weights == WeightResidency.GPU),
    ("full FT, AdamW on host (ZeRO-Offload)",
     lambda s: s.chunks == 1 and s.optimizer_device == OptimizerDevice.HOST and s.grad_staging is None
     and s.weights == WeightResidency.GPU),
    ("full FT, 16-bit grads staged off GPU (NVMSA)",
     lambda s: s.chunks == 1 and s.grad_staging is not None and s.weights == WeightResidency.GPU),
    ("ChunkFT, state on GPU",
     lambda s: s.chunks > 1 and s.state_tier == Tier.GPU and s.weights == WeightResidency.GPU),
    ("ChunkFT, state on host",
     lambda s: s.chunks > 1 and s.state_tier == Tier.HOST and s.weights == WeightResidency.GPU),
    ("ChunkFT, state on disk",
     lambda s: s.chunks > 1 and s.state_tier == Tier.DISK and s.weights == WeightResidency.GPU),
    ("any, decoder layers streamed from host",
     lambda s: s.weights == WeightResidency.STREAM),
)


def card_need_bytes(est: Estimate) -> int:
    """Bytes a GPU must have for this estimate: allocator reserved plus the CUDA context."""
    return est.need_bytes(Tier.GPU) + est.context_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class FamilyNeed:
    """The least GPU memory one strategy family needs, with its host RAM and disk."""

    family: str
    estimate: Estimate
    """The family's strategy with the smallest GPU need (ties: host, disk, objective)."""
    gpu_bytes: int
    """Card memory needed: reserved + CUDA context."""
    host_bytes: int
    disk_bytes: int
    gpus: tuple[str, ...]
    """Catalogue GPUs whose memory holds `gpu_bytes`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardedNeed:
    """The fewest GPUs of one kind that hold the job sharded (planner.sharding's model)."""

    gpu: str
    num_gpus: int
    gpus_per_node: int
    nodes: int
    gpu_bytes: int
    """What each card must hold: the worst rank's reserved bytes + CUDA context."""
    host_bytes_per_node: int
    """Host RAM of the fullest node (HOST state tier: its ranks' slices of every chunk)."""
    estimate: "ShardedEstimate"
    """The fitting strategy's per-rank estimate."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SizeReport:
    model_name: str
    shape: "StepShape"
    families: tuple[FamilyNeed, ...]
    sharded: tuple[ShardedNeed, ...]
    """Per catalogue GPU that cannot hold the job alone with weights resident: the fewest
    GPUs of that kind, run sharded (none listed if `max_gpus` do not suffice)."""
    single_gpus: tuple[str, ...]
    """Catalogue GPUs that alone hold some weights-resident strategy."""
    evaluated: int
    unsized: tuple[str, ...] = ()
    """Catalogue GPUs neither alone nor up to `max_gpus` of them hold the job."""
    sharded_chunk_traces: str = ""
    """How the sharded ChunkFT estimates traced chunks: "exact" or "bound" ("" if none ran)."""
    sharded_evaluated: int = 0


def size_estimates(estimates: list[Estimate], *, model_name: str, shape: "StepShape") -> SizeReport:
    """The one-GPU part of the report from estimates of (a superset of) the memory
    representatives: families, the catalogue GPUs that suffice, and which hold it alone."""
    catalogue = [load_gpu(name) for name in list_gpus()]
    families = []
    for name, member in FAMILIES:
        mine = [e for e in estimates if member(e.strategy)]
        if not mine:
            continue
        best = min(mine, key=lambda e: (card_need_bytes(e), e.peak_bytes.get(Tier.HOST, 0),
                                         e.peak_bytes.get(Tier.DISK, 0), objective_key(e, Objective.FIDELITY)))
        need = card_need_bytes(best)
        families.append(FamilyNeed(family=name, estimate=best, gpu_bytes=need,
                                   host_bytes=best.peak_bytes.get(Tier.HOST, 0),
                                   disk_bytes=best.peak_bytes.get(Tier.DISK, 0),
                                   gpus=tuple(g.name for g in catalogue if g.memory_bytes >= need)))
    resident = [e for e in estimates if e.strategy.weights == WeightResidency.GPU]
    least = min((card_need_bytes(e) for e in resident), default=None)
    single = tuple(g.name for g in catalogue if least is not None and least <= g.memory_bytes)
    return SizeReport(model_name=model_name, shape=shape, families=tuple(families), sharded=(),
                      single_gpus=single, evaluated=len(estimates))


def sharded_candidates(strategies: Iterable[Strategy]) -> list[Strategy]:
    """The strategies the sharded search examines (module doc), in preference order: fewest
    chunks first, the GPU state tier before the host tier."""
    runs = [s for s in strategies if s.optimizer_device == OptimizerDevice.GPU and s.weights == WeightResidency.GPU
            and s.grad_staging is None and (s.chunks == 1 or s.state_tier in (Tier.GPU, Tier.HOST))]
    lean: dict[tuple, Strategy] = {}
    for s in runs:
        key = (s.chunks, s.state_tier)
        rank = (not s.checkpointing, s.loss_chunk_tokens == 0, s.loss_chunk_tokens, s.prefetch_depth,
                s.update_interval)
        if key not in lean or rank < lean[key][0]:
            lean[key] = (rank, s)
    tier_order = {Tier.GPU: 0, Tier.HOST: 1}
    return [s for _, s in sorted(lean.values(), key=lambda rs: (rs[1].chunks, tier_order[rs[1].state_tier]))]


def size_sharded(model: "ModelSpec", shape: "StepShape", candidates: list[Strategy],
                 gpus: Iterable["str | GpuProfile"], *,
                 gpus_per_node: int = 8, max_gpus: int = 64, shard_embeddings: bool = False,
                 host_bytes_per_node: int | None = None, chunk_traces: str = "auto"
                 ) -> tuple[list[ShardedNeed], list[str], str, int]:
    """(answers, GPUs max_gpus cannot hold, chunk trace mode, evaluations) for these GPUs
    (catalogue names or profiles): the fewest of each kind that hold the job sharded, trying
    `candidates` in order at each world size (module doc)."""
    from planner.evaluate import sm_arch
    from planner.hardware import hardware
    from planner.sharding import evaluate_sharded, fits_card, world_sizes

    _check_counts(gpus_per_node, max_gpus)
    kinds = sorted((g if isinstance(g, GpuProfile) else load_gpu(g) for g in gpus), key=lambda g: -g.memory_bytes)
    by_tier = [[c for c in candidates if c.state_tier == tier] for tier in (Tier.HOST, Tier.GPU)]
    leanest = [max(mine, key=lambda c: c.chunks) for mine in by_tier if mine]
    answers: dict[str, ShardedNeed] = {}
    modes: set[str] = set()
    evaluated = 0
    groups: dict[int, list] = {}
    for g in kinds:
        groups.setdefault(sm_arch(hardware(g)), []).append(g)
    for group in groups.values():
        hw = hardware(group[-1])
        open_kinds = list(group)  # largest memory first
        for per_node, nodes in world_sizes(gpus_per_node, max_gpus):
            if not open_kinds:
                break
            if per_node * nodes == 1:
                continue
            seen: dict[Strategy, Any] = {}

            def estimate(s: Strategy):
                nonlocal evaluated
                if s not in seen:
                    evaluated += 1
                    seen[s] = evaluate_sharded(model, shape, s, hw, gpus_per_node=per_node, nodes=nodes,
                                               shard_embeddings=shard_embeddings, chunk_traces=chunk_traces)
                    if s.chunks > 1:
                        modes.add(seen[s].chunk_traces)
                return seen[s]

            top = open_kinds[0].memory_bytes
            if not any(fits_card(estimate(s), top, host_bytes_per_node) for s in leanest):
                continue
            for kind in list(open_kinds):
                for s in candidates:
                    est = estimate(s)
                    if fits_card(est, kind.memory_bytes, host_bytes_per_node):
                        answers[kind.name] = ShardedNeed(gpu=kind.name, num_gpus=per_node * nodes,
                                                         gpus_per_node=per_node, nodes=nodes,
                                                         gpu_bytes=est.card_need_bytes(),
                                                         host_bytes_per_node=est.node_host_bytes, estimate=est)
                        open_kinds.remove(kind)
                        break
    order = [g.name for g in kinds]
    found = sorted(answers.values(), key=lambda a: (a.num_gpus, order.index(a.gpu)))
    mode = "bound" if "bound" in modes else ("exact" if modes else "")
    return found, [g for g in order if g not in answers], mode, evaluated


def _check_counts(gpus_per_node: Any, max_gpus: Any) -> None:
    for what, v in (("gpus per node", gpus_per_node), ("max gpus", max_gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ChunkftError(f"invalid {what} {v!r}: must be an integer >= 1")


def size_model(model: "ModelSpec", shape: "StepShape", hw: "Hardware", *, space: SearchSpace | None = None,
               gpus_per_node: int = 8, max_gpus: int = 64, shard_embeddings: bool = False,
               host_bytes_per_node: int | None = None, chunk_traces: str = "auto") -> SizeReport:
    """Evaluate the memory representatives of the space on one GPU, then size the job sharded
    on every catalogue GPU that cannot hold it alone (module doc)."""
    from planner.evaluate import evaluate

    _check_counts(gpus_per_node, max_gpus)
    if space is None:
        space = default_space(num_layers=model.num_layers, tokens=shape.batch * shape.seq_len)
    strategies = memory_representatives(space.strategies())
    estimates = [evaluate(model, shape, s, hw, chunk_traces=chunk_traces) for s in strategies]
    report = size_estimates(estimates, model_name=model.name, shape=shape)
    rest = [g for g in list_gpus() if g not in report.single_gpus]
    candidates = sharded_candidates(space.strategies())
    if not rest or not candidates:
        return dataclasses.replace(report, unsized=tuple(rest))
    found, unsized, mode, count = size_sharded(model, shape, candidates, rest, gpus_per_node=gpus_per_node,
                                               max_gpus=max_gpus, shard_embeddings=shard_embeddings,
                                               host_bytes_per_node=host_bytes_per_node, chunk_traces=chunk_traces)
    return dataclasses.replace(report, sharded=tuple(found), unsized=tuple(unsized), sharded_chunk_traces=mode,
                               sharded_evaluated=count)
