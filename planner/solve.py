"""Search the strategy space for the best plan that fits every tier of a budget.

The space (`SearchSpace`) is a finite product of the choices DESIGN.md lists, reduced to the
combinations that mean something (`SearchSpace.strategies`). The solver is exact over it: the
answer is the minimum of the objective over every strategy that fits, the same answer brute
force gives (`solve(..., prune=False)` is that brute force, and the tests hold them equal).

Objective (printed with every plan):
  speed (default): fit every tier, then the shortest predicted step time, then fewest chunks
                   (DESIGN.md: ChunkFT's point is to train as well as full FT in less memory
                   and time, so the fastest plan that fits is the answer);
  fidelity:        fit every tier, then the fewest chunks (closest to plain full fine-tuning),
                   then the shortest predicted step time ("memory" in plans written before).
Remaining ties go to the smaller update interval (the chunk rotates more often, closer to
cyclic block-coordinate descent), then the smaller GPU, host and disk peaks, then the label, so
the answer never depends on enumeration order.

Pruning: the solver skips a strategy only when a rule proves it cannot change the answer.
  [R0] Lexicographic order (fidelity objective). Chunk count is compared first, so once some
       strategy with C chunks fits, no strategy with more chunks can win: levels with more
       chunks are not evaluated.
  [R1] The update interval changes no byte count. It says how often the active chunk switches,
       not what is alive at any moment (a switch moves the same bytes whenever it happens), so
       strategies differing only in `update_interval` have identical peaks on every tier. If
       one of them does not fit, none does: the rest of the group is skipped.
  [R2] Prefetch depth only adds bytes. Depth d+1 keeps every buffer of depth d plus one more
       chunk's state in flight, so each tier's peak is non-decreasing in depth. If depth d does
       not fit, no deeper prefetch of the same strategy fits, and none is needed to report the
       smallest budget that would work (it is dominated on every tier).
  R1 and R2 are properties of the cost model; tests check them on the real evaluator, and the
  brute-force test checks the pruned answer. No rule assumes that more chunks, checkpointing or
  chunked loss lower the peak: those are often true but not always (a chunk that straddles a
  layer can keep more activations than a coarser chunk that does not), so they are evaluated.

Infeasible is an answer, not an error: `Solution.status` is INFEASIBLE, `closest` is the
strategy missing the fewest bytes (summed over tiers) with its per-tier shortfall, and
`needed_bytes[tier]` is the smallest budget on that tier that would work with the other tiers'
budgets unchanged (None if nothing in the space fits the other tiers).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from planner.recipe import Loop, Recipe
from planner.schema import Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
    from planner.hardware import Hardware
    from planner.model import ModelSpec
    from planner.trace import StepShape


class Objective(str, enum.Enum):
    """What the solver minimizes among the strategies that fit."""

    SPEED = "speed"
    FIDELITY = "fidelity"
    MEMORY = "fidelity"
    """The name plans and code used before (an alias: the same member)."""

    @classmethod
    def _missing_(cls, value):
        return cls.FIDELITY if value == "memory" else None  # plans written before the rename

    def describe(self) -> str:
        return OBJECTIVE_TEXT[self]


OBJECTIVE_TEXT = {
    Objective.SPEED: "fit every tier, then shortest predicted step time, then fewest chunks",
    Objective.FIDELITY: "fit every tier, then fewest chunks, then shortest predicted step time",
}


class SolveStatus(str, enum.Enum):
    FITS = "fits"
    INFEASIBLE = "infeasible"


# Default chunk-count cap: the reference ChunkFT code reaches 13.72 GiB at 7B with ~128 chunks
# (DESIGN.md); one doubling beyond it leaves room for longer sequences and larger models.
MAX_CHUNKS = 256
# Loss-chunk size offered to the solver: 256 tokens keeps the fp32 logits copies of a 128K
# vocabulary at 128 MiB each (256 x 128256 x 4 B), small next to any 7B+ model's weights.
LOSS_CHUNK_TOKENS = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchSpace:
    """The finite set of strategies the solver chooses from (before validity rules)."""

    chunk_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    """Chunk counts C; 1 is plain full fine-tuning."""
    update_intervals: tuple[int, ...] = (1, 4, 16)
    """Optimizer steps on one chunk before switching (only meaningful for C > 1)."""
    optimizer_devices: tuple[OptimizerDevice, ...] = (OptimizerDevice.GPU, OptimizerDevice.HOST)
    state_tiers: tuple[Tier, ...] = (Tier.GPU, Tier.HOST, Tier.DISK)
    """Where fp32 masters and moments rest while their chunk is inactive."""
    grad_stagings: tuple[Tier | None, ...] = (None, Tier.HOST, Tier.DISK)
    checkpointing: tuple[bool, ...] = (False, True)
    weights: tuple[WeightResidency, ...] = (WeightResidency.GPU, WeightResidency.STREAM)
    loss_chunk_tokens: tuple[int, ...] = (0, LOSS_CHUNK_TOKENS)
    prefetch_depths: tuple[int, ...] = (0, 1, 2)
    recipe: Recipe = Recipe()
    """The user's step (planner.recipe): fixed, copied into every strategy; combinations it
    refuses (the HF loop with a chunked loss) are left out."""
    recipes: tuple[Recipe, ...] = ()
    """Further recipes the solver may choose (`--search-recipes`: Recipe.variants of `recipe`),
    each searched over the same strategy space."""

    def strategies(self) -> list[Strategy]:
        """Every meaningful strategy, each once, in a fixed order (chunks ascending).

        Validity rules (a combination outside them is either contradictory or a duplicate of
        one inside, with a field that has no effect pinned to one value):
        - C = 1 has nothing to switch: update_interval 1.
        - An optimizer on the GPU reads its state on the GPU: with C = 1 the state stays there;
          gradients are not staged off the GPU (staging feeds a host-side optimizer).
        - A host optimizer keeps its state on host or disk, never on the GPU.
        - Prefetch depth matters only when a chunk switch moves state (`Strategy.moves_state`,
          C > 1); elsewhere it is pinned to the default, 1. It is at most C - 1 (there are
          only C - 1 other chunks to fetch ahead).
        """
        out: dict[Strategy, None] = {}
        for recipe in dict.fromkeys((self.recipe, *self.recipes)):
            self._add(out, recipe)
        return list(out)

    def _add(self, out: dict[Strategy, None], recipe: Recipe) -> None:
        for c in sorted(set(self.chunk_counts)):
            intervals = (1,) if c == 1 else tuple(sorted(set(self.update_intervals)))
            for device in self.optimizer_devices:
                for tier in self.state_tiers:
                    if device == OptimizerDevice.HOST and tier == Tier.GPU:
                        continue
                    if device == OptimizerDevice.GPU and c == 1 and tier != Tier.GPU:
                        continue
                    stagings = self.grad_stagings if device == OptimizerDevice.HOST else (None,)
                    for staging in stagings:
                        for ckpt in self.checkpointing:
                            for weights in self.weights:
                                for loss in self.loss_chunk_tokens:
                                    if loss and recipe.loop != Loop.CHUNKFT:
                                        continue  # only chunkft's step has a chunked loss
                                    base = Strategy(chunks=c, optimizer_device=device, state_tier=tier,
                                                    grad_staging=staging, checkpointing=ckpt,
                                                    weights=weights, loss_chunk_tokens=loss, recipe=recipe)
                                    if recipe.conflict(base) is not None:
                                        continue  # a strategy the recipe cannot run (planner.recipe)
                                    depths = (tuple(sorted({min(d, c - 1) for d in self.prefetch_depths}))
                                              if c > 1 and base.moves_state else (1,))
                                    for depth in depths:
                                        for interval in intervals:
                                            out[replace(base, prefetch_depth=depth,
                                                        update_interval=interval)] = None


def default_space(*, num_layers: int | None, tokens: int, max_chunks: int = MAX_CHUNKS) -> SearchSpace:
    """The solver's default space for a model of `num_layers` decoder layers and a step of
    `tokens` tokens (batch x sequence length).

    Chunk counts: 1, powers of two up to `max_chunks`, and the divisors of the layer count
    (a chunk count that divides the layers puts chunk cuts near layer boundaries, and gives the
    memory objective finer steps than doubling: 70B's 80 layers add 5, 10, 20, 40, 80).
    The chunked loss is offered only when the step has more tokens than one loss chunk.
    """
    counts = {1} | {2**i for i in range(1, int(math.log2(max_chunks)) + 1)}
    if num_layers:
        counts |= {d for d in range(2, min(num_layers, max_chunks) + 1) if num_layers % d == 0}
    losses = (0, LOSS_CHUNK_TOKENS) if tokens > LOSS_CHUNK_TOKENS else (0,)
    return SearchSpace(chunk_counts=tuple(sorted(counts)), loss_chunk_tokens=losses)


def objective_key(est: Estimate, objective: Objective) -> tuple:
    """Sort key: smaller is better (see the module docstring for the order and its reasons)."""
    s = est.strategy
    first = (s.chunks, est.step_time_s) if objective == Objective.FIDELITY else (est.step_time_s, s.chunks)
    peaks = tuple(est.peak_bytes.get(t, 0) for t in (Tier.GPU, Tier.HOST, Tier.DISK))
    return first + (s.update_interval,) + peaks + (s.label(),)


@dataclass(frozen=True, kw_only=True)
class Solution:
    """What the solver found: the best plan, or why there is none."""

    status: SolveStatus
    objective: Objective
    budget: Budget
    best: Estimate | None
    """The winner (None when infeasible)."""
    closest: Estimate | None = None
    """Infeasible only: the strategy missing the fewest bytes over all tiers."""
    missing_bytes: dict[Tier, int] = field(default_factory=dict)
    """Infeasible only: bytes `closest` lacks per tier (tiers that fit are omitted)."""
    needed_bytes: dict[Tier, int | None] = field(default_factory=dict)
    """Infeasible only: per limited tier, the smallest budget that works with the other tiers'
    budgets unchanged (None: nothing in the space fits the other tiers)."""
    estimates: tuple[Estimate, ...] = ()
    """Every strategy evaluated, in evaluation order."""
    space_size: int = 0
    pruned: int = 0
    """Strategies skipped by a proven rule (R0-R2)."""

    @property
    def fits(self) -> bool:
        return self.status == SolveStatus.FITS


EvaluateFn = Callable[[Strategy], Estimate]


def _memory_group(s: Strategy) -> Strategy:
    """Strategies with the same key have the same peaks except for prefetch (R1, R2)."""
    return replace(s, update_interval=1, prefetch_depth=0)


def solve(strategies: Iterable[Strategy] | SearchSpace, evaluate_fn: EvaluateFn, budget: Budget, *,
          objective: Objective = Objective.SPEED, prune: bool = True,
          prepare: Callable[[list[Strategy]], None] | None = None) -> Solution:
    """The best strategy under `objective` that fits `budget`, or the infeasibility report.

    `evaluate_fn` maps a strategy to its Estimate (planner.evaluate.evaluate bound to a model,
    shape and hardware, or a hand-made cost function in tests). With `prune=False` every
    strategy is evaluated: brute force. `prepare`, when given, is called before each chunk
    count's strategies are evaluated with one strategy per memory group (those that may be
    evaluated read what these read: solve_model makes their traced steps ahead).
    """
    if isinstance(strategies, SearchSpace):
        strategies = strategies.strategies()
    strategies = list(dict.fromkeys(strategies))
    assert strategies, "the strategy space is empty"
    cache: dict[Strategy, Estimate] = {}

    def ev(s: Strategy) -> Estimate:
        if s not in cache:
            cache[s] = evaluate_fn(s)
            assert cache[s].strategy == s, f"evaluate returned an estimate for {cache[s].strategy}, not {s}"
        return cache[s]

    fitting: list[Estimate] = []
    pruned = 0
    levels: dict[int, dict[Strategy, list[Strategy]]] = {}
    for s in strategies:
        levels.setdefault(s.chunks, {}).setdefault(_memory_group(s), []).append(s)
    if not prune:
        for s in strategies:
            if prepare is not None and s.chunks in levels:
                prepare([members[0] for members in levels.pop(s.chunks).values()])
            if ev(s).fits(budget):
                fitting.append(ev(s))
    else:
        for c in sorted(levels):
            if prepare is not None:
                prepare([members[0] for members in levels[c].values()])
            for members in levels[c].values():
                by_depth: dict[int, list[Strategy]] = {}
                for s in members:
                    by_depth.setdefault(s.prefetch_depth, []).append(s)
                blocked = False
                for depth in sorted(by_depth):
                    group = sorted(by_depth[depth], key=lambda s: s.update_interval)
                    if blocked:  # [R2] a shallower prefetch already did not fit
                        pruned += len(group)
                        continue
                    if not ev(group[0]).fits(budget):
                        pruned += len(group) - 1  # [R1] same peaks for every update interval
                        blocked = True
                        continue
                    fitting.extend(ev(s) for s in group)
            if fitting and objective == Objective.FIDELITY:  # [R0] more chunks cannot win
                pruned += sum(len(m) for later in levels if later > c for m in levels[later].values())
                break

    estimates = tuple(cache.values())
    if fitting:
        best = min(fitting, key=lambda e: objective_key(e, objective))
        return Solution(status=SolveStatus.FITS, objective=objective, budget=budget, best=best,
                        estimates=estimates, space_size=len(strategies), pruned=pruned)
    return _infeasible(estimates, budget, objective, len(strategies), pruned)


def _infeasible(estimates: tuple[Estimate, ...], budget: Budget, objective: Objective,
                space_size: int, pruned: int) -> Solution:
    limits = {Tier.GPU: budget.gpu_bytes, Tier.HOST: budget.host_bytes, Tier.DISK: budget.disk_bytes}
    missing = {e: {t: b for t, b in e.missing(budget).items() if b > 0} for e in estimates}
    # Closest: fewest bytes missing, then the objective's order on what R1 leaves unchanged
    # (chunks, then the smallest update interval): the step time of a plan that does not fit
    # is not compared, so the pruned and the brute-force search report the same strategy.
    closest = min(estimates, key=lambda e: (sum(missing[e].values()), e.strategy.chunks,
                                            e.strategy.update_interval, e.strategy.prefetch_depth,
                                            objective_key(e, objective)))
    needed: dict[Tier, int | None] = {}
    for tier, limit in limits.items():
        if limit is None:
            continue
        # Only this tier falls short: this tier's budget plus the shortfall is enough for it.
        options = [limit + m.get(tier, 0) for e, m in missing.items() if set(m) <= {tier}]
        needed[tier] = min(options) if options else None
    return Solution(status=SolveStatus.INFEASIBLE, objective=objective, budget=budget, best=None,
                    closest=closest, missing_bytes=missing[closest], needed_bytes=needed,
                    estimates=estimates, space_size=space_size, pruned=pruned)


def memory_representatives(strategies: Iterable[Strategy]) -> list[Strategy]:
    """One strategy per memory group at its smallest prefetch depth and update interval.

    By R1 and R2 it has the lowest peaks of its group on every tier, so the minimum need of
    any tier over the space is a minimum over these (what `chunkft size` reports)."""
    best: dict[Strategy, Strategy] = {}
    for s in strategies:
        key = _memory_group(s)
        if key not in best or (s.prefetch_depth, s.update_interval) < (best[key].prefetch_depth,
                                                                        best[key].update_interval):
            best[key] = s
    return list(best.values())


def solve_model(model: "ModelSpec", shape: "StepShape", hw: "Hardware", budget: Budget, *,
                objective: Objective = Objective.SPEED, space: SearchSpace | None = None,
                prune: bool = True, chunk_traces: str = "auto", jobs: int = 1) -> Solution:
    """`solve` over the default space of `model` with planner.evaluate as the cost model
    (`chunk_traces`: how ChunkFT steps are traced, planner.evaluate.evaluate). Before each chunk
    count, the traced steps its strategies read are made ahead (planner.parallel_eval.make_ahead,
    in up to `jobs` processes), each fake trace once."""
    from planner import progress
    from planner.parallel_eval import make_ahead

    if space is None:
        space = default_space(num_layers=model.num_layers, tokens=shape.batch * shape.seq_len)
    memo = _estimates(model, shape, hw, chunk_traces)

    def prepare(strategies: list[Strategy]) -> None:
        make_ahead(model, shape, [s for s in strategies if _kept(memo, s) is None], hw, chunk_traces=chunk_traces,
                   jobs=jobs)

    with progress.counter(f"one-GPU plans for {model.name}", unit="plan") as bar:
        def cost(s: Strategy) -> Estimate:
            bar.update(1)
            return cached_evaluate(model, shape, s, hw, chunk_traces=chunk_traces)

        return solve(space, cost, budget, objective=objective, prune=prune, prepare=prepare)


def cached_evaluate_all(model: "ModelSpec", shape: "StepShape", strategies: "Sequence[Strategy]", hw: "Hardware", *,
                        chunk_traces: str = "auto", jobs: int = 1, what: str = "evaluate strategies") -> list[Estimate]:
    """[cached_evaluate(...) for s in strategies]: those not in the "estimates" bucket are
    evaluated by planner.parallel_eval.evaluate_all (`jobs` processes), then kept in it."""
    from planner.parallel_eval import evaluate_all

    memo = _estimates(model, shape, hw, chunk_traces)
    out: list = [_kept(memo, s) for s in strategies]
    todo = [i for i, est in enumerate(out) if est is None]
    made = evaluate_all(model, shape, [strategies[i] for i in todo], hw, chunk_traces=chunk_traces, jobs=jobs,
                        what=what)
    for i, est in zip(todo, made):
        out[i] = est
        if memo is not None:
            memo[strategies[i]] = est
    return out


def cached_evaluate(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: "Hardware", *,
                    chunk_traces: str = "auto") -> Estimate:
    """planner.evaluate.evaluate, kept in the disk cache's "estimates" bucket (planner.cache) of
    the model, shape, hardware and chunk trace mode when a cache is in use: a repeated `chunkft
    plan` or `chunkft size` evaluates nothing again."""
    from planner.evaluate import evaluate

    memo = _estimates(model, shape, hw, chunk_traces)
    hit = _kept(memo, strategy)
    if hit is not None:
        return hit
    est = evaluate(model, shape, strategy, hw, chunk_traces=chunk_traces)
    if memo is not None:
        memo[strategy] = est
    return est


def _estimates(model: "ModelSpec", shape: "StepShape", hw: "Hardware", chunk_traces: str) -> dict | None:
    """The disk cache's "estimates" bucket of a model, shape, hardware and chunk trace mode (None:
    no cache in use)."""
    from planner import cache

    return cache.bucket("estimates", (model.fingerprint(), shape, hw, chunk_traces))


def _kept(memo: dict | None, strategy: Strategy) -> Estimate | None:
    """`strategy`'s estimate in an "estimates" bucket, or None."""
    hit = None if memo is None else memo.get(strategy)
    return hit if isinstance(hit, Estimate) and hit.strategy == strategy else None
