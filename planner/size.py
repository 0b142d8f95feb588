"""What hardware does a fine-tuning job need? Per strategy family, and across GPUs.

For every family of strategies (full FT on the GPU, ZeRO-Offload style, NVMSA staging, ChunkFT
with state on GPU / host / disk, streamed weights) `size_model` finds the strategy of the
family with the smallest GPU need (CUDA reserved bytes plus the CUDA context: what a card must
physically hold), reports its host RAM and disk, and lists the catalogue GPUs that suffice: a
GPU suffices when some strategy of the family fits its card and the host RAM and NVMe of its
node (planner.hardware.default_node: e.g. an RTX 4090 workstation with 128 GiB).

For each catalogue GPU that cannot hold the job alone with the weights resident, it says how
many of it would, run the way runtime.distributed runs it (FSDP2 + runtime.sharded_optim),
on that kind's node (its GPU count per node, host RAM and NVMe; `--node` picks another, the
flags override each figure): planner.sharding.fewest_gpus over the space's sharded memory
representatives (`sharded_candidates`: AdamW on the GPU, weights resident, no gradient
staging; per chunk count, state tier (GPU, host, disk) and loss form (chunked or whole) the
space's most memory-saving corner: checkpointing on, the smallest loss chunk, prefetch 0,
update interval 1), with chunk
counts past the space's (`sharded_space`: planner.parallel.extra_chunk_counts, up to
SHARDED_MAX_CHUNKS, as a sharded `chunkft plan` extends them: a rank holds 1/W of the state).
The budget check is `chunkft plan`'s (planner.parallel.per_rank_budget), and each answer is
verified with the plan solver itself (planner.parallel.solve_parallel on the answer's layout
and strategy), so `chunkft size` and `chunkft plan --gpus-per-node N --gpu-kind K` agree. A
kind no count up to `max_gpus` holds is reported with what its closest strategy lacks per
tier (GPU per card, host RAM and disk per node).

Speed: traces follow planner.evaluate's "auto" (bound above 2B parameters: one full-FT trace
for every chunk), estimates are shared by the GPU kinds of one SM architecture (memory depends
on the kind only through the cuBLAS workspace), a world size is examined only when some tier's
leanest strategy fits, and each tier's fewest fitting chunk count is bisected. Under a disk
cache (`chunkft size` uses one unless --no-cache: planner.cache), every one-GPU and per-rank
estimate is kept ("estimates" / "sharded" buckets), so a repeated question evaluates nothing.

Known limitations: bound chunk traces are pessimistic by what frozen layers would not save
(`SizeReport.sharded_chunk_traces` says which ran; exact traces at 70B take minutes per
strategy); the bisection assumes the per-rank GPU need falls as chunks grow; the sharded
estimate's step time is one catalogue GPU's of its architecture; NCCL's own buffers are not
counted (planner.sharding). The one-GPU families use one set of estimates (on `hw`) for the
whole catalogue.
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
    from planner.hardware import Hardware, NodeProfile
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
    """The fewest GPUs of one kind that hold the job sharded on its node (planner.sharding)."""

    gpu: str
    node: str
    """The node profile whose host RAM and NVMe were the budget (planner.hardware)."""
    num_gpus: int
    gpus_per_node: int
    nodes: int
    gpu_bytes: int
    """What each card must hold: the worst rank's reserved bytes + CUDA context."""
    host_bytes_per_node: int
    """Host RAM of the fullest node (HOST tier: its ranks' flat state buffers; DISK: staging)."""
    disk_bytes_per_node: int
    """Disk of the fullest node (DISK tier: its ranks' chunk files)."""
    estimate: "ShardedEstimate"
    """The fitting strategy's per-rank estimate."""
    verified: bool = False
    """The plan solver (planner.parallel.solve_parallel) fits the same strategy on that layout."""
    shard_embeddings: bool = False
    """The layout that fits: input embedding and output head as FSDP units of their own."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unsized:
    """A GPU kind that `max_gpus` of it cannot hold on its node: what the closest lacks."""

    gpu: str
    node: str
    num_gpus: int
    """The most GPUs examined."""
    closest: "ShardedEstimate | None"
    missing_bytes: dict[Tier, int]
    """Per tier: GPU per card, host RAM and disk per node."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SizeReport:
    model_name: str
    shape: "StepShape"
    families: tuple[FamilyNeed, ...]
    sharded: tuple[ShardedNeed, ...]
    """Per catalogue GPU that cannot hold the job alone with weights resident: the fewest
    GPUs of that kind, run sharded (none listed if `max_gpus` do not suffice)."""
    single_gpus: tuple[str, ...]
    """Catalogue GPUs that alone (with their node's host RAM and disk) hold some weights-resident strategy."""
    evaluated: int
    unsized: tuple[Unsized, ...] = ()
    """Catalogue GPUs neither alone nor up to `max_gpus` of them hold the job."""
    sharded_chunk_traces: str = ""
    """How the sharded ChunkFT estimates traced chunks: "exact" or "bound" ("" if none ran)."""
    sharded_evaluated: int = 0


def _fits_node(est: Estimate, gpu: GpuProfile, node: "NodeProfile | None", host: int | None,
               disk: int | None) -> bool:
    """One GPU: the card holds the estimate and its node's host RAM and disk hold the rest."""
    if card_need_bytes(est) > gpu.memory_bytes:
        return False
    host = host if host is not None else (node.host_ram_bytes if node is not None else None)
    disk = disk if disk is not None else (node.disk_bytes if node is not None else None)
    return ((host is None or est.peak_bytes.get(Tier.HOST, 0) <= host)
            and (disk is None or est.peak_bytes.get(Tier.DISK, 0) <= disk))


def size_estimates(estimates: list[Estimate], *, model_name: str, shape: "StepShape",
                   node: "NodeProfile | None" = None, host_bytes: int | None = None,
                   disk_bytes: int | None = None, nodes: bool = True) -> SizeReport:
    """The one-GPU part of the report from estimates of (a superset of) the memory
    representatives: families, the catalogue GPUs that suffice (card, and the host RAM and disk
    of `node`, else of each kind's default node; `nodes=False`: the card only), and which hold
    it alone."""
    from planner.hardware import default_node

    catalogue = [load_gpu(name) for name in list_gpus()]
    where = {g.name: (node if node is not None else default_node(g)) if nodes else None for g in catalogue}
    families = []
    for name, member in FAMILIES:
        mine = [e for e in estimates if member(e.strategy)]
        if not mine:
            continue
        best = min(mine, key=lambda e: (card_need_bytes(e), e.peak_bytes.get(Tier.HOST, 0),
                                         e.peak_bytes.get(Tier.DISK, 0), objective_key(e, Objective.FIDELITY)))
        need = card_need_bytes(best)
        gpus = tuple(g.name for g in catalogue
                     if any(_fits_node(e, g, where[g.name], host_bytes, disk_bytes) for e in mine))
        families.append(FamilyNeed(family=name, estimate=best, gpu_bytes=need,
                                   host_bytes=best.peak_bytes.get(Tier.HOST, 0),
                                   disk_bytes=best.peak_bytes.get(Tier.DISK, 0), gpus=gpus))
    resident = [e for e in estimates if e.strategy.weights == WeightResidency.GPU]
    single = tuple(g.name for g in catalogue
                   if any(_fits_node(e, g, where[g.name], host_bytes, disk_bytes) for e in resident))
    return SizeReport(model_name=model_name, shape=shape, families=tuple(families), sharded=(),
                      single_gpus=single, evaluated=len(estimates))


def sharded_candidates(strategies: Iterable[Strategy]) -> list[Strategy]:
    """The strategies the sharded search examines (module doc), in preference order: fewest
    chunks first, then the GPU, host and disk state tiers, the chunked loss before the whole
    one. Both loss forms are kept: under FSDP the chunked loss is not always the leaner (its
    trace's free-block slack can exceed the logits it saves)."""
    from planner.parallel import runs_sharded

    lean: dict[tuple, Strategy] = {}
    for s in strategies:
        if not runs_sharded(s) or (s.chunks == 1 and s.state_tier != Tier.GPU):
            continue
        key = (s.chunks, s.state_tier, s.loss_chunk_tokens == 0)
        rank = (not s.checkpointing, s.loss_chunk_tokens, s.prefetch_depth, s.update_interval)
        if key not in lean or rank < lean[key][0]:
            lean[key] = (rank, s)
    tier_order = {Tier.GPU: 0, Tier.HOST: 1, Tier.DISK: 2}
    return [s for _, s in sorted(lean.values(), key=lambda rs: (rs[1].chunks, tier_order[rs[1].state_tier],
                                                                 rs[1].loss_chunk_tokens == 0))]


def sharded_space(space: SearchSpace, *, extend_chunks: bool = True) -> list[Strategy]:
    """`sharded_candidates` of the space with its chunk counts extended past its largest
    (planner.parallel.extra_chunk_counts), as a sharded `chunkft plan` extends them."""
    from planner.parallel import extra_chunk_counts

    counts = tuple(space.chunk_counts) + (extra_chunk_counts(space.chunk_counts) if extend_chunks else ())
    return sharded_candidates(dataclasses.replace(space, chunk_counts=counts).strategies())


def size_sharded(model: "ModelSpec", shape: "StepShape", candidates: list[Strategy],
                 gpus: Iterable["str | GpuProfile"], *, gpus_per_node: int | None = None, max_gpus: int = 64,
                 shard_embeddings: bool | None = None, node: "NodeProfile | None" = None,
                 host_bytes_per_node: int | None = None, disk_bytes_per_node: int | None = None,
                 chunk_traces: str = "auto") -> tuple[list[ShardedNeed], list[Unsized], str, int]:
    """(answers, kinds `max_gpus` cannot hold, chunk trace mode, evaluations) for these GPUs
    (catalogue names or profiles), each on `node` or its default node (`gpus_per_node`,
    `host_bytes_per_node`, `disk_bytes_per_node` override the node's figures): the fewest of
    each kind that hold the job sharded (planner.sharding.fewest_gpus), each answer verified
    with the plan solver (module doc). `shard_embeddings` None tries both FSDP layouts (the
    embeddings in the root unit first; the fewer GPUs win, ties the root layout), as `chunkft
    plan` does without --shard-embeddings / --no-shard-embeddings."""
    from planner.evaluate import CUDA_CONTEXT_BYTES, sm_arch
    from planner.hardware import default_node, hardware
    from planner.parallel import ParallelLayout, node_budget, solve_parallel
    from planner.sharding import fewest_gpus

    _check_counts(gpus_per_node if gpus_per_node is not None else 1, max_gpus)
    kinds = sorted((g if isinstance(g, GpuProfile) else load_gpu(g) for g in gpus), key=lambda g: -g.memory_bytes)
    arch_hw: dict[int, "Hardware"] = {}
    memos: dict[int, dict] = {}
    answers: list[ShardedNeed] = []
    unsized: list[Unsized] = []
    modes: set[str] = set()
    evaluated = 0
    from planner import progress

    for kind in progress.bar(kinds, f"size {model.name} sharded, per GPU kind", unit="kind"):
        where = node if node is not None else default_node(kind)
        per_node = gpus_per_node if gpus_per_node is not None else where.gpus
        budget = node_budget(where, kind.memory_bytes - CUDA_CONTEXT_BYTES, host_bytes=host_bytes_per_node,
                             disk_bytes=disk_bytes_per_node)
        arch = sm_arch(hardware(kind))
        hw = arch_hw.setdefault(arch, hardware(kind))  # one kind's step times per architecture
        tries = []
        for emb in ((False, True) if shard_embeddings is None else (shard_embeddings,)):
            found = fewest_gpus(model, shape, candidates, hw, budget, gpus_per_node=per_node, max_gpus=max_gpus,
                                shard_embeddings=emb, chunk_traces=chunk_traces, memo=memos.setdefault(arch, {}))
            evaluated += found.evaluated
            tries.append(found)
        fitting = [f for f in tries if f.estimate is not None]
        if fitting:
            found = min(fitting, key=lambda f: (f.estimate.world_size, f.estimate.strategy.chunks))
        else:
            found = min(tries, key=lambda f: sum(f.missing_bytes.values()) if f.missing_bytes else float("inf"))
        est = found.estimate
        if est is None:
            from planner.sharding import world_sizes

            top = world_sizes(per_node, max_gpus)[-1]
            unsized.append(Unsized(gpu=kind.name, node=where.name, num_gpus=top[0] * top[1], closest=found.closest,
                                   missing_bytes=dict(found.missing_bytes)))
            continue
        if est.strategy.chunks > 1:
            modes.add(est.chunk_traces)
        layout = ParallelLayout(gpus_per_node=est.gpus_per_node, nodes=est.nodes,
                                shard_embeddings=est.shard_embeddings)
        solution, _ = solve_parallel(model, shape, hw, budget, layout, space=[est.strategy], chunk_traces=chunk_traces,
                                     extend_chunks=False, known={est.strategy: est})
        answers.append(ShardedNeed(gpu=kind.name, node=where.name, num_gpus=est.world_size,
                                   gpus_per_node=est.gpus_per_node, nodes=est.nodes, gpu_bytes=est.card_need_bytes(),
                                   host_bytes_per_node=est.node_host_bytes, disk_bytes_per_node=est.node_disk_bytes,
                                   estimate=est, verified=solution.fits, shard_embeddings=est.shard_embeddings))
    order = [g.name for g in kinds]
    answers.sort(key=lambda a: (a.num_gpus, order.index(a.gpu)))
    mode = "bound" if "bound" in modes else ("exact" if modes else "")
    return answers, unsized, mode, evaluated


def _check_counts(gpus_per_node: Any, max_gpus: Any) -> None:
    for what, v in (("gpus per node", gpus_per_node), ("max gpus", max_gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ChunkftError(f"invalid {what} {v!r}: must be an integer >= 1")


def size_model(model: "ModelSpec", shape: "StepShape", hw: "Hardware", *, space: SearchSpace | None = None,
               gpus_per_node: int | None = None, max_gpus: int = 64, shard_embeddings: bool | None = None,
               node: "NodeProfile | None" = None, host_bytes_per_node: int | None = None,
               disk_bytes_per_node: int | None = None, chunk_traces: str = "auto",
               extend_chunks: bool = True, jobs: int = 1) -> SizeReport:
    """Evaluate the memory representatives of the space on one GPU, then size the job sharded
    on every catalogue GPU that cannot hold it alone (module doc). With `node`, only its GPU
    kind is sized sharded, on it. `jobs`: processes tracing the one-GPU steps (planner.parallel_eval)."""
    from planner.solve import cached_evaluate_all

    _check_counts(gpus_per_node if gpus_per_node is not None else 1, max_gpus)
    if space is None:
        space = default_space(num_layers=model.num_layers, tokens=shape.batch * shape.seq_len)
    strategies = memory_representatives(space.strategies())
    estimates = cached_evaluate_all(model, shape, strategies, hw, chunk_traces=chunk_traces, jobs=jobs,
                                    what=f"size {model.name} on one GPU")
    report = size_estimates(estimates, model_name=model.name, shape=shape, node=node, host_bytes=host_bytes_per_node,
                            disk_bytes=disk_bytes_per_node)
    rest = [g for g in list_gpus() if g not in report.single_gpus and (node is None or g == node.gpu)]
    candidates = sharded_space(space, extend_chunks=extend_chunks)
    if not rest or not candidates:
        return dataclasses.replace(report, unsized=tuple(Unsized(gpu=g, node="", num_gpus=0, closest=None,
                                                                  missing_bytes={}) for g in rest))
    found, unsized, mode, count = size_sharded(model, shape, candidates, rest, gpus_per_node=gpus_per_node,
                                               max_gpus=max_gpus, shard_embeddings=shard_embeddings, node=node,
                                               host_bytes_per_node=host_bytes_per_node,
                                               disk_bytes_per_node=disk_bytes_per_node, chunk_traces=chunk_traces)
    return dataclasses.replace(report, sharded=tuple(found), unsized=tuple(unsized), sharded_chunk_traces=mode,
                               sharded_evaluated=count)
