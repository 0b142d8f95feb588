"""Plans for several GPUs: the solver with planner.sharding's per-rank model as its cost.

A parallel plan runs one FSDP2 rank per GPU on `gpus_per_node` GPUs in each of `nodes`
nodes (runtime.distributed). Its step shape is one rank's micro-batch: the global batch is
the world size times it. What the plan predicts is per rank: the GPU peak and reserved bytes
of one card, and one rank's share of host RAM and disk (a node holds `gpus_per_node` shares).

    layout = ParallelLayout(gpus_per_node=2, shard_embeddings=True)
    solution = solve_parallel(model, shape, hw, budget, layout, space=space)

The budget is per GPU for the GPU tier and per node for host RAM and disk; `per_rank_budget`
turns it into what one rank may use, and `node_budget` is a catalogue node's (its host RAM and
NVMe: planner.hardware.NodeProfile), what `chunkft plan --gpus-per-node` and `chunkft size`
hold a plan to by default. The strategy space is narrowed to what runs sharded
(`sharded_strategies`): AdamW on the GPU with every layer resident, no gradient staging, and
the resting optimizer state on the GPU, in host RAM or on disk (runtime.sharded_optim's tiers).

Chunk counts past the one-GPU space: a rank holds 1/W of the state, so finer chunks keep
paying off (smaller working copies and step temporaries). When nothing in the space fits and
the GPU is what is short, `solve_parallel` tries the powers of two above the space's largest
chunk count, up to `SHARDED_MAX_CHUNKS`, one count at a time, and stops at the first that fits
(or when the GPU need stops falling).

Known limitations: one micro-batch per rank and step (no gradient accumulation term in the
communication); the host link and the NVMe of a node are not shared out among its ranks in the
step time (a DISK-tier switch is priced at one drive's bandwidth per rank); with equal predicted
step times the solver's tie-break (smaller GPU, then host, then disk peaks) prefers the DISK
tier to the HOST tier;
several nodes are planned, but `chunkft run --nproc` starts one node's ranks (several nodes
start with torchrun on each node).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Sequence

from planner.errors import ChunkftError
from planner.schema import Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
    from planner.hardware import Hardware, NodeProfile
    from planner.model import ModelSpec
    from planner.sharding import ShardedEstimate
    from planner.solve import Objective, SearchSpace, Solution
    from planner.trace import StepShape

CHUNK_TRACE_MODES = ("auto", "exact", "bound")
SHARDED_MAX_CHUNKS = 4096
"""Largest chunk count a sharded plan tries past its space (see the module doc)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ParallelLayout:
    """How many GPUs a plan runs on, and how FSDP2 wraps the model."""

    gpus_per_node: int
    nodes: int = 1
    shard_embeddings: bool = False
    """Input embedding and output head (final norm + lm_head) are FSDP units of their own."""

    def __post_init__(self) -> None:
        for what in ("gpus_per_node", "nodes"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ChunkftError(f"invalid {what} {v!r}: must be an integer >= 1")
        if not isinstance(self.shard_embeddings, bool):
            raise ChunkftError(f"invalid shard_embeddings {self.shard_embeddings!r}: must be true or false")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def to_json(self) -> dict:
        return {"gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "shard_embeddings": self.shard_embeddings}

    @classmethod
    def from_json(cls, data: dict) -> "ParallelLayout":
        if not isinstance(data, dict):
            raise ChunkftError(f"parallel layout must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"gpus_per_node", "nodes", "shard_embeddings"}
        if unknown:
            raise ChunkftError(f"parallel layout has unknown field {sorted(unknown)[0]!r}; "
                               "valid fields: gpus_per_node, nodes, shard_embeddings")
        if "gpus_per_node" not in data:
            raise ChunkftError("parallel layout is missing field 'gpus_per_node'")
        return cls(gpus_per_node=data["gpus_per_node"], nodes=data.get("nodes", 1),
                   shard_embeddings=data.get("shard_embeddings", False))


def runs_sharded(strategy: Strategy) -> bool:
    """Whether runtime.distributed executes this strategy (and planner.sharding models it)."""
    return (strategy.optimizer_device == OptimizerDevice.GPU and strategy.weights == WeightResidency.GPU
            and strategy.grad_staging is None and strategy.state_tier in (Tier.GPU, Tier.HOST, Tier.DISK))


def extra_chunk_counts(counts: Iterable[int], limit: int = SHARDED_MAX_CHUNKS) -> tuple[int, ...]:
    """Powers of two above the largest of `counts`, up to `limit` (none if it is 1: full FT only)."""
    top = max(counts, default=1)
    if top <= 1:
        return ()
    out, c = [], 1 << top.bit_length()
    while c <= limit:
        out.append(c)
        c *= 2
    return tuple(out)


def node_budget(node: "NodeProfile", gpu_bytes: int, *, host_bytes: int | None = None,
                disk_bytes: int | None = None) -> Budget:
    """A node's budget: `gpu_bytes` per card, the node's host RAM and NVMe unless given."""
    return Budget(gpu_bytes=gpu_bytes, host_bytes=node.host_ram_bytes if host_bytes is None else host_bytes,
                  disk_bytes=node.disk_bytes if disk_bytes is None else disk_bytes)


def sharded_strategies(strategies: Iterable[Strategy]) -> list[Strategy]:
    return [s for s in strategies if runs_sharded(s)]


def per_rank_budget(budget: Budget, layout: ParallelLayout) -> Budget:
    """GPU per card stays; host RAM and disk per node are shared out among its ranks."""
    def share(b: int | None) -> int | None:
        return None if b is None else max(1, b // layout.gpus_per_node)  # a Budget's bytes are positive

    return Budget(gpu_bytes=budget.gpu_bytes, host_bytes=share(budget.host_bytes), disk_bytes=share(budget.disk_bytes))


def as_estimate(est: "ShardedEstimate") -> Estimate:
    """One rank's prediction in the solver's Estimate type (step time with communication)."""
    return Estimate(strategy=est.strategy, peak_bytes=dict(est.peak_bytes),
                    components={t: dict(c) for t, c in est.components.items()},
                    reserved_bytes=est.reserved_bytes, step_time_s=est.step_time_s, worst_chunk=est.worst_chunk,
                    context_bytes=est.context_bytes, step_time_parts_s=dict(est.step_time_parts_s))


def solve_parallel(model: "ModelSpec", shape: "StepShape", hw: "Hardware", budget: Budget, layout: ParallelLayout, *,
                   objective: "Objective | None" = None, space: "SearchSpace | None" = None,
                   chunk_traces: str = "auto", extend_chunks: bool = True,
                   known: "dict[Strategy, ShardedEstimate] | None" = None, jobs: int = 1
                   ) -> "tuple[Solution, dict[Strategy, ShardedEstimate]]":
    """planner.solve.solve over the sharded strategies of `space`, each rank held against
    `per_rank_budget(budget, layout)`; with `extend_chunks` (and a SearchSpace), chunk counts
    past the space's when nothing fits for want of GPU memory (module doc). `known`: estimates
    already made on this layout (reused, not re-evaluated). Before each chunk count the steps
    its strategies trace are made ahead, in up to `jobs` processes. Returns the solution and the
    sharded estimate of every strategy evaluated (the winner's communication figures go into
    the plan)."""
    from planner.sharding import evaluate_sharded
    from planner.solve import Objective, SearchSpace, default_space, solve

    if chunk_traces not in CHUNK_TRACE_MODES:
        raise ChunkftError(f"invalid chunk trace mode {chunk_traces!r}: valid are {', '.join(CHUNK_TRACE_MODES)}")
    if space is None:
        space = default_space(num_layers=model.num_layers, tokens=shape.batch * shape.seq_len)
    strategies = sharded_strategies(space.strategies() if isinstance(space, SearchSpace) else space)
    if not strategies:
        raise ChunkftError("no strategy in the space runs sharded: a sharded plan steps AdamW on the GPU "
                           "(--optimizer gpu) with weights resident and no --grad-staging")
    from planner import progress

    sharded: dict[Strategy, ShardedEstimate] = {}
    apart = ", embeddings apart" if layout.shard_embeddings else ""
    bar = progress.counter(f"rank plans for {layout.world_size} GPUs{apart}", unit="plan")

    def cost(s: Strategy) -> Estimate:
        bar.update(1)
        if known is not None and s in known:
            sharded[s] = known[s]
        else:
            sharded[s] = evaluate_sharded(model, shape, s, hw, gpus_per_node=layout.gpus_per_node,
                                          nodes=layout.nodes, shard_embeddings=layout.shard_embeddings,
                                          chunk_traces=chunk_traces)
        return as_estimate(sharded[s])

    def prepare(level: list[Strategy]) -> None:  # the level's chunk pattern steps, made ahead
        if layout.world_size == 1:  # evaluate_sharded asks planner.evaluate for one GPU
            return
        from planner.evaluate import sm_arch
        from planner.parallel_eval import make_requests
        from planner.rank_step import chunk_requests
        from planner.sharding import cached_sharded

        todo = [s for s in level if (known is None or s not in known) and cached_sharded(
            model, shape, s, hw, gpus_per_node=layout.gpus_per_node, nodes=layout.nodes,
            shard_embeddings=layout.shard_embeddings, chunk_traces=chunk_traces) is None]
        make_requests(model, shape, [r for s in todo for r in chunk_requests(model, shape, s, sm_arch(hw),
                                                                             chunk_traces)], jobs=jobs)

    with bar:
        return _solve_parallel(strategies, cost, per_rank_budget(budget, layout), space, objective, extend_chunks,
                               sharded, prepare)


def _solve_parallel(strategies: list[Strategy], cost, rank_budget: Budget, space, objective, extend_chunks: bool,
                    sharded: dict, prepare) -> "tuple[Solution, dict[Strategy, ShardedEstimate]]":
    from planner.solve import Objective, SearchSpace, solve

    solution = solve(strategies, cost, rank_budget, objective=objective or Objective.SPEED, prepare=prepare)
    if (solution.fits or not extend_chunks or not isinstance(space, SearchSpace)
            or Tier.GPU not in solution.missing_bytes):
        return solution, sharded
    need = solution.closest.need_bytes(Tier.GPU)
    for c in extra_chunk_counts(space.chunk_counts):
        more = sharded_strategies(dataclasses.replace(space, chunk_counts=(c,)).strategies())
        if not more:
            break
        tried = solve(more, cost, rank_budget, objective=objective or Objective.SPEED, prepare=prepare)
        if tried.fits:
            return tried, sharded
        if Tier.GPU not in tried.missing_bytes or tried.closest.need_bytes(Tier.GPU) >= need:
            break  # finer chunks no longer help the GPU
        need = tried.closest.need_bytes(Tier.GPU)
    return solution, sharded


def solve_layouts(model: "ModelSpec", shape: "StepShape", hw: "Hardware", budget: Budget,
                  layouts: "Sequence[ParallelLayout]", *, objective: "Objective | None" = None,
                  space: "SearchSpace | None" = None, chunk_traces: str = "auto", extend_chunks: bool = True,
                  jobs: int = 1) -> "tuple[Solution, dict[Strategy, ShardedEstimate], ParallelLayout]":
    """`solve_parallel` on each layout (e.g. the embeddings inside the root unit, and as units of
    their own): the layout whose plan fits and is best under the objective (ties: the earlier
    layout); if none fits, the one whose closest strategy misses the fewest bytes."""
    from planner.solve import Objective, objective_key

    objective = objective or Objective.SPEED
    results = []
    for layout in layouts:
        solution, sharded = solve_parallel(model, shape, hw, budget, layout, objective=objective, space=space,
                                           chunk_traces=chunk_traces, extend_chunks=extend_chunks, jobs=jobs)
        results.append((solution, sharded, layout))
    fitting = [r for r in results if r[0].fits]
    if fitting:
        return min(fitting, key=lambda r: objective_key(r[0].best, objective))
    return min(results, key=lambda r: sum(r[0].missing_bytes.values()))
