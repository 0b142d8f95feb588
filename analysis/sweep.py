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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from planner.errors import ChunkftError
from planner.fsio import atomic_write_text
from planner.schema import Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy

EvaluateFn = Callable[[object, Strategy], Estimate]
"""(StepShape, Strategy) -> Estimate; the shape is planner.trace.StepShape."""

FIT_COLUMNS = ("strategy", "seq_len", "batch", "gpu_need_bytes", "host_bytes", "disk_bytes",
               "step_time_s", "fits")
CHUNK_COLUMNS = ("family", "chunks", "gpu_peak_bytes", "gpu_need_bytes", "host_bytes", "step_time_s", "fits")
CACHE_VERSION = 1
CACHE_KIND = "chunkft report estimate cache"
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
    share shapes and strategies.

    With `path`, estimates also persist in that JSON file under `context` (a string naming
    the model and hardware, e.g. their fingerprints): a second report on the same model and
    hardware with another budget re-evaluates nothing. A cache file of another version is
    ignored (and rewritten), never trusted in part; a file that is not such a cache at all (a
    plan, a config, a typo'd path) is never overwritten: `save` refuses it, and
    `check_cache_file` refuses it before any work."""

    def __init__(self, fn: EvaluateFn, *, path: str | os.PathLike | None = None, context: str = ""):
        self.fn = fn
        self.cache: dict[tuple, Estimate] = {}
        self.path = Path(path) if path is not None else None
        self.context = context
        self.stored: dict[str, dict] = {}
        self.foreign = False
        """The file at `path` exists but is not a cache this class wrote: never overwritten."""
        if self.path is not None and self.path.exists():
            data = _read_cache(self.path)
            self.foreign = data is None
            if data is not None and data.get("version") == CACHE_VERSION:
                self.stored = dict(data["estimates"])

    def _key(self, shape, strategy: Strategy) -> str:
        shape_json = {f: getattr(shape, f) for f in ("batch", "seq_len", "dtype")}
        return json.dumps([self.context, shape_json, strategy.to_json()], sort_keys=True)

    def __call__(self, shape, strategy: Strategy) -> Estimate:
        key = (shape, strategy)
        if key not in self.cache:
            text = self._key(shape, strategy)
            est = None
            if text in self.stored:
                try:
                    est = Estimate.from_json(self.stored[text])
                except ChunkftError:
                    est = None
            if est is None or est.strategy != strategy:
                est = self.fn(shape, strategy)
                self.stored[text] = est.to_json()
            self.cache[key] = est
        return self.cache[key]

    def save(self) -> None:
        if self.path is not None:
            if self.foreign:
                raise ChunkftError(_foreign_cache_message(self.path))
            atomic_write_text(self.path, json.dumps({"kind": CACHE_KIND, "version": CACHE_VERSION,
                                                     "estimates": self.stored}) + "\n")


def _read_cache(path: Path) -> dict | None:
    """The cache file's content if it is a cache CachedEvaluate wrote (any version), else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("estimates"), dict):
        return None
    if set(data) - {"kind", "version", "estimates"} or data.get("kind", CACHE_KIND) != CACHE_KIND:
        return None
    return data


def _foreign_cache_message(path: Path) -> str:
    return (f"invalid --cache {str(path)!r}: it is not an estimate cache written by `chunkft report`, and "
            "would be overwritten; give a new file name (e.g. estimates.json) or delete it")


def check_cache_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a --cache path that is a directory or a file this is not the cache of."""
    from planner.fsio import check_output_file

    path = check_output_file(path, "--cache")
    if path.exists() and _read_cache(path) is None:
        raise ChunkftError(_foreign_cache_message(path))
    return path


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


def chunks_that_fit(sweep_table: pd.DataFrame, family: str = "ChunkFT, state host, ckpt") -> int:
    """The fewest chunks (more than one) of `family` that fit the budget in a chunk sweep,
    else the most swept."""
    rows = sweep_table[(sweep_table["family"] == family) & (sweep_table["chunks"] > 1)]
    if rows.empty:
        return 8  # the sweep held only C = 1: a middle-of-the-road ChunkFT for the fit map
    fitting = rows[rows["fits"]]
    return int(fitting["chunks"].min() if len(fitting) else rows["chunks"].max())


def run_sweep(evaluate: EvaluateFn, make_shape, *, model: str, budget: Budget, gpu_profile: str,
              catalogue: pd.DataFrame, seq_lens: list[int], batches: list[int], chunk_counts: list[int],
              strategies: list[Strategy] | None = None, reference: tuple[int, int] | None = None) -> Sweep:
    """Evaluate the grid. `make_shape(seq_len=, batch=)` builds a StepShape; `reference`
    (seq_len, batch) defaults to the middle sequence length at the smallest batch.

    Default strategies: `report_strategies` with ChunkFT at the fewest swept chunks that fit
    the budget at the reference shape (the objective's choice), else the most swept."""
    evaluate = evaluate if isinstance(evaluate, CachedEvaluate) else CachedEvaluate(evaluate)
    seq_ref, batch_ref = reference or (sorted(seq_lens)[(len(seq_lens) - 1) // 2], min(batches))
    shape = make_shape(seq_len=seq_ref, batch=batch_ref)
    sweep_table = chunk_sweep(evaluate, shape, chunk_counts, budget)
    strategies = strategies or report_strategies(chunks_that_fit(sweep_table))
    sweep = Sweep(
        model=model, budget=budget, gpu_profile=gpu_profile,
        reference_seq_len=seq_ref, reference_batch=batch_ref,
        fit_map=fit_map(evaluate, make_shape, strategies, seq_lens, batches, budget),
        chunk_sweep=sweep_table,
        sizing=sizing(evaluate, shape, strategies, catalogue),
        catalogue=catalogue,
    )
    evaluate.save()
    return sweep


def gpu_catalogue() -> pd.DataFrame:
    """The catalogue of planner.hardware as a table, smallest memory first."""
    from planner.hardware import list_gpus, load_gpu

    names = list_gpus()
    return pd.DataFrame({"gpu": names, "memory_bytes": [load_gpu(n).memory_bytes for n in names]})


__all__ = ["CachedEvaluate", "Sweep", "check_cache_file", "chunk_families", "chunk_sweep", "fit_map", "gpu_catalogue",
           "chunks_that_fit", "report_strategies", "run_sweep", "sizing"]
