"""The numbers behind `chunkft report`: evaluate a few strategies over a small grid.

Three tables, all from one evaluate function (planner.evaluate bound to a model and a
hardware profile), each (shape, strategy) evaluated once:
  - fit map: every sequence length x batch size x report strategy, with the GPU bytes the
    budget must hold and whether every tier fits;
  - chunk sweep: ChunkFT with inactive-chunk state on the host, with and without activation
    checkpointing, at each chunk count: GPU peak and predicted step time;
  - sizing: each report strategy's GPU need (allocator reservation plus CUDA context, what a
    physical card must have) at the reference shape, against the GPU catalogue.

The grid is kept small on purpose (a handful of shapes; the tracer caches one graph per
shape), so a report takes seconds, not minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from planner.schema import Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy

EvaluateFn = Callable[[object, Strategy], Estimate]
"""(StepShape, Strategy) -> Estimate; the shape is planner.trace.StepShape."""

FIT_COLUMNS = ("strategy", "seq_len", "batch", "gpu_need_bytes", "host_bytes", "disk_bytes",
               "step_time_s", "fits")
CHUNK_COLUMNS = ("family", "chunks", "gpu_peak_bytes", "gpu_need_bytes", "host_bytes", "step_time_s", "fits")
SIZING_COLUMNS = ("strategy", "gpu_need_bytes", "card_bytes", "host_bytes", "step_time_s", "gpus_that_fit")


def report_strategies(chunks: int = 8) -> list[Strategy]:
    """The strategies a report shows side by side: plain full FT, with activation
    checkpointing, ChunkFT (state on host, checkpointing), and the NVMSA-style host optimizer
    with 16-bit gradients staged on host. Four, so a report's grid stays a few dozen
    evaluations (each new shape or chunk count is a new trace)."""
    return [
        Strategy(),
        Strategy(checkpointing=True),
        Strategy(chunks=chunks, state_tier=Tier.HOST, checkpointing=True),
        Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST, grad_staging=Tier.HOST,
                 checkpointing=True),
    ]


def chunk_families() -> dict[str, Callable[[int], Strategy]]:
    """Chunk-sweep families: name -> chunk count -> strategy."""
    return {
        "ChunkFT, state host": lambda c: Strategy(chunks=c, state_tier=Tier.HOST),
        "ChunkFT, state host, ckpt": lambda c: Strategy(chunks=c, state_tier=Tier.HOST, checkpointing=True),
    }


class CachedEvaluate:
    """Memoises an EvaluateFn by (shape, strategy): the fit map, the chunk sweep and sizing
    share shapes and strategies."""

    def __init__(self, fn: EvaluateFn):
        self.fn = fn
        self.cache: dict[tuple, Estimate] = {}

    def __call__(self, shape, strategy: Strategy) -> Estimate:
        key = (shape, strategy)
        if key not in self.cache:
            self.cache[key] = self.fn(shape, strategy)
        return self.cache[key]


@dataclass(frozen=True, kw_only=True, slots=True)
class Sweep:
    """What a report shows. Byte columns are int64, in bytes."""

    model: str
    budget: Budget
    gpu_profile: str
    """The GPU profile step times were predicted for."""
    reference_seq_len: int
    reference_batch: int
    """The shape of the chunk sweep and the sizing."""
    fit_map: pd.DataFrame
    chunk_sweep: pd.DataFrame
    sizing: pd.DataFrame
    catalogue: pd.DataFrame
    """Columns gpu, memory_bytes: the GPU catalogue, smallest first."""


def _gpu_need(est: Estimate) -> int:
    return est.need_bytes(Tier.GPU)


def fit_map(evaluate: EvaluateFn, make_shape, strategies: list[Strategy], seq_lens: list[int],
            batches: list[int], budget: Budget) -> pd.DataFrame:
    rows = []
    for strategy in strategies:
        for seq_len in seq_lens:
            for batch in batches:
                est = evaluate(make_shape(seq_len=seq_len, batch=batch), strategy)
                rows.append({"strategy": strategy.label(), "seq_len": seq_len, "batch": batch,
                             "gpu_need_bytes": _gpu_need(est), "host_bytes": est.peak_bytes.get(Tier.HOST, 0),
                             "disk_bytes": est.peak_bytes.get(Tier.DISK, 0), "step_time_s": est.step_time_s,
                             "fits": est.fits(budget)})
    return pd.DataFrame(rows, columns=list(FIT_COLUMNS))


def chunk_sweep(evaluate: EvaluateFn, shape, chunk_counts: list[int], budget: Budget) -> pd.DataFrame:
    rows = []
    for family, make in chunk_families().items():
        for c in chunk_counts:
            est = evaluate(shape, make(c))
            rows.append({"family": family, "chunks": c, "gpu_peak_bytes": est.peak_bytes.get(Tier.GPU, 0),
                         "gpu_need_bytes": _gpu_need(est), "host_bytes": est.peak_bytes.get(Tier.HOST, 0),
                         "step_time_s": est.step_time_s, "fits": est.fits(budget)})
    return pd.DataFrame(rows, columns=list(CHUNK_COLUMNS))


def sizing(evaluate: EvaluateFn, shape, strategies: list[Strategy], catalogue: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for strategy in strategies:
        est = evaluate(shape, strategy)
        card = _gpu_need(est) + est.context_bytes
        fit = [g for g, mem in zip(catalogue["gpu"], catalogue["memory_bytes"]) if mem >= card]
        rows.append({"strategy": strategy.label(), "gpu_need_bytes": _gpu_need(est), "card_bytes": card,
                     "host_bytes": est.peak_bytes.get(Tier.HOST, 0), "step_time_s": est.step_time_s,
                     "gpus_that_fit": ", ".join(fit)})
    return pd.DataFrame(rows, columns=list(SIZING_COLUMNS))


def run_sweep(evaluate: EvaluateFn, make_shape, *, model: str, budget: Budget, gpu_profile: str,
              catalogue: pd.DataFrame, seq_lens: list[int], batches: list[int], chunk_counts: list[int],
              strategies: list[Strategy] | None = None, reference: tuple[int, int] | None = None) -> Sweep:
    """Evaluate the grid. `make_shape(seq_len=, batch=)` builds a StepShape; `reference`
    (seq_len, batch) defaults to the middle sequence length at the smallest batch."""
    evaluate = evaluate if isinstance(evaluate, CachedEvaluate) else CachedEvaluate(evaluate)
    strategies = strategies or report_strategies()
    seq_ref, batch_ref = reference or (sorted(seq_lens)[(len(seq_lens) - 1) // 2], min(batches))
    shape = make_shape(seq_len=seq_ref, batch=batch_ref)
    return Sweep(
        model=model, budget=budget, gpu_profile=gpu_profile,
        reference_seq_len=seq_ref, reference_batch=batch_ref,
        fit_map=fit_map(evaluate, make_shape, strategies, seq_lens, batches, budget),
        chunk_sweep=chunk_sweep(evaluate, shape, chunk_counts, budget),
        sizing=sizing(evaluate, shape, strategies, catalogue),
        catalogue=catalogue,
    )


def gpu_catalogue() -> pd.DataFrame:
    """The catalogue of planner.hardware as a table, smallest memory first."""
    from planner.hardware import list_gpus, load_gpu

    names = list_gpus()
    return pd.DataFrame({"gpu": names, "memory_bytes": [load_gpu(n).memory_bytes for n in names]})


__all__ = ["CachedEvaluate", "Sweep", "chunk_families", "chunk_sweep", "fit_map", "gpu_catalogue",
           "report_strategies", "run_sweep", "sizing"]
