"""`chunkft fit --max seq|batch`: the longest sequence (or largest batch) each strategy fits.

For every row of `chunkft fit` the answer is the largest value of the axis at which the
strategy fits every tier of the budget, the other axis held at its flag's value. The search
doubles from the flag's value until a step does not fit (or the limit is reached), then bisects
between the last value that fit and the first that did not. Sequence lengths are searched in
multiples of `SEQ_QUANTUM` tokens (a length a user would pick; the flag's own value is also
tried), batch sizes in ones. Every reported value was evaluated and fits; the value one
quantum above it was evaluated and does not (or is past the limit).

Limits: planner.validate's (MAX_SEQ_LEN, MAX_BATCH, MAX_STEP_TOKENS) and, for sequences, the
model's max_position_embeddings unless --allow-long-seq.

Known limitations: bisection assumes that a step that does not fit at length L does not fit
at any longer length. The GPU peak grows with the step's tokens, but the *reserved* estimate is
not always monotone (block rounding), so a longer length can occasionally fit where the answer
stopped; the answer itself is always a fitting value. Each new shape is a new trace (about
0.2-0.3 s at 8B), so an 8B search takes seconds.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from planner.strategy import Budget, Estimate, Strategy
    from planner.trace import StepShape

SEQ_QUANTUM = 128
AXES = ("seq", "batch")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Largest:
    """One row's answer: the largest fitting value and its estimate (None: not even the smallest)."""

    strategy: "Strategy"
    value: int | None
    estimate: "Estimate | None"
    limit: int
    """The search's ceiling (the answer may equal it: then more might fit, but is not planned)."""
    evaluated: int


def search_largest(fits_at: Callable[[int], "Estimate | None"], *, start: int, limit: int,
                   quantum: int) -> tuple[int | None, "Estimate | None", int]:
    """(largest fitting value, its estimate, evaluations) on the grid of multiples of `quantum`
    up to `limit`, plus `start`. `fits_at(v)` is the estimate if v fits, else None. Gallops up
    from `start` (index steps 1, 2, 4, ...) or bisects below it, then bisects the bracket."""
    grid = sorted({start} | set(range(quantum, limit + 1, quantum)))
    found: dict[int, "Estimate | None"] = {}

    def ok(i: int) -> bool:
        if i not in found:
            found[i] = fits_at(grid[i])
        return found[i] is not None

    first = grid.index(start)
    if ok(first):
        lo, step = first, 1
        hi = len(grid)  # exclusive: nothing past the grid is tried
        while lo + step < len(grid):
            if not ok(lo + step):
                hi = lo + step
                break
            lo, step = lo + step, step * 2
        else:  # galloped past the end: the last grid value closes the bracket
            last = len(grid) - 1
            if lo < last:
                if ok(last):
                    lo = last
                else:
                    hi = last
    else:
        if first == 0 or not ok(0):
            return None, None, len(found)
        lo, hi = 0, first
    while hi - lo > 1:  # invariant: grid[lo] fits, grid[hi] does not (or hi is past the grid)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return grid[lo], found[lo], len(found)


def largest(model, shape: "StepShape", budget: "Budget", hw, strategies: list["Strategy"], axis: str, *,
            allow_long_seq: bool, chunk_traces: str = "auto") -> list[Largest]:
    """The largest `axis` value ("seq" or "batch") at which each strategy fits `budget`."""
    from planner.evaluate import evaluate
    from planner.trace import StepShape
    from planner.validate import MAX_BATCH, MAX_SEQ_LEN, MAX_STEP_TOKENS

    if axis == "seq":
        limit = min(MAX_SEQ_LEN, MAX_STEP_TOKENS // shape.batch)
        positions = model.config_value("max_position_embeddings")
        if isinstance(positions, int) and not allow_long_seq:
            limit = min(limit, positions)
        start, quantum = shape.seq_len, SEQ_QUANTUM

        def at(v: int) -> StepShape:
            return dataclasses.replace(shape, seq_len=v)
    else:
        limit = min(MAX_BATCH, MAX_STEP_TOKENS // shape.seq_len)
        start, quantum = shape.batch, 1

        def at(v: int) -> StepShape:
            return dataclasses.replace(shape, batch=v)

    out = []
    for s in strategies:
        def fits_at(v: int):
            e = evaluate(model, at(v), s, hw, chunk_traces=chunk_traces)
            return e if e.fits(budget) else None

        value, est, n = search_largest(fits_at, start=min(start, limit), limit=limit, quantum=quantum)
        out.append(Largest(strategy=s, value=value, estimate=est, limit=limit, evaluated=n))
    return out
