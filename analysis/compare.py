"""Predicted against measured: align the events of a timeline and a trace, tabulate errors.

A timeline counts time in ops and a trace in seconds, so events are never matched by `t`.
They are matched by position: within one tier, the k-th event of a kind in a given (step,
phase, layer) of the timeline is paired with the k-th such event of the trace (the
"ordinal"). Events one side has and the other lacks stay unmatched and are counted.

Error convention: `error_bytes = measured - predicted` (positive: the plan under-predicted,
the dangerous direction) and `relative_error = error_bytes / predicted`, i.e. how much the
prediction must grow to cover what was measured. Predicted 10 GiB, measured 10.5 GiB: +5.0%.

Peaks are taken over every event of the compared steps, not only the matched ones: a
measured event the timeline has no counterpart for can still hold the real peak. A trace's
`peak` column (the allocator's peak since the previous event) counts, so a short-lived spike
between two samples is not missed.

A CPU trace (header "allocator": "cpu") measures one malloc heap that holds every tier, and a
timeline's GPU bytes include CUDA-only block rounding and workspace; `peak_table` adds a
"process" row holding the heap against `cpu_equivalent(timeline)`.

Known limitations: the runtime samples at phase and layer boundaries, so most of a
timeline's op events have no counterpart; the boundaries are what aligns (the trace's
`peak` at step end still carries the op-level peak). When both sides record ops but a
different number inside one layer (fake-tensor trace and real run decompose an op
differently), ordinal matching there pairs neighbouring ops, not identical ones;
`positions_on_predicted` spreads such groups proportionally for plotting, and the phase and
peak tables do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.load import COMPONENT_COLUMNS, Recording, phases_in_order
from planner.errors import ChunkftError
from planner.schema import Tier

ALIGN_KEYS: tuple[str, ...] = ("tier", "step", "phase", "layer", "event", "ordinal")

PEAK_COLUMNS: tuple[str, ...] = (
    "tier", "metric", "predicted_bytes", "measured_bytes", "error_bytes", "relative_error",
    "predicted_t", "predicted_event", "predicted_phase", "predicted_layer", "predicted_name",
    "measured_t", "measured_event", "measured_phase", "measured_layer", "measured_name",
)
PHASE_COLUMNS: tuple[str, ...] = (
    "tier", "phase", "predicted_bytes", "measured_bytes", "error_bytes", "relative_error",
    "matched_events", "mean_abs_error_bytes",
)


def _with_ordinal(df: pd.DataFrame) -> pd.DataFrame:
    """Add the k-th-of-its-kind ordinal within (tier, step, phase, layer, event)."""
    out = df.copy()
    out["_row"] = np.arange(len(out))
    keys = list(ALIGN_KEYS[:-1])
    # groupby drops NaN keys unless told not to; an op outside any layer is a group of its own.
    out["ordinal"] = out.groupby(keys, dropna=False, sort=False).cumcount()
    return out


def align(predicted: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Pair events by (tier, step, phase, layer, event, ordinal).

    Returns one row per matched pair: the keys, then every other event column twice, with
    suffixes `_pred` and `_meas`, in the timeline's order.
    """
    p = _with_ordinal(predicted)
    m = _with_ordinal(measured)
    keys = list(ALIGN_KEYS)
    for frame in (p, m):  # merge cannot match <NA> layers with each other; -1 stands for "none"
        frame["layer"] = frame["layer"].fillna(-1)
        frame["phase"] = frame["phase"].fillna("")
    merged = p.merge(m, on=keys, how="inner", suffixes=("_pred", "_meas"))
    merged = merged.sort_values("_row_pred", kind="stable").reset_index(drop=True)
    merged["layer"] = merged["layer"].astype("Int64").replace(-1, pd.NA)
    merged["phase"] = merged["phase"].replace("", None)
    return merged.drop(columns=["_row_pred", "_row_meas"])


def positions_on_predicted(predicted: pd.DataFrame, measured: pd.DataFrame) -> np.ndarray:
    """For each measured row, the predicted `t` of its counterpart (NaN where none).

    Inside each (tier, step, phase, layer, event) group, measured event j of n_m maps to
    predicted event floor(j * n_p / n_m) of n_p: ordinal matching when the counts agree, a
    proportional spread when they do not. This puts a trace in seconds on a timeline's op
    axis, for drawing both on one figure.
    """
    keys = list(ALIGN_KEYS[:-1])

    def key_frame(df: pd.DataFrame) -> pd.DataFrame:
        k = df[keys].copy()
        k["layer"] = k["layer"].fillna(-1).astype("int64")
        k["phase"] = k["phase"].fillna("")
        return k

    pk, mk = key_frame(predicted), key_frame(measured)
    pred_t = predicted["t"].to_numpy()
    groups: dict[tuple, np.ndarray] = {
        key: pred_t[np.asarray(idx)] for key, idx in pk.groupby(keys, sort=False).indices.items()
    }
    out = np.full(len(measured), np.nan)
    for key, idx in mk.groupby(keys, sort=False).indices.items():
        targets = groups.get(key)
        if targets is None:
            continue
        n_p, n_m = len(targets), len(idx)
        picks = (np.arange(n_m) * n_p) // n_m
        out[np.asarray(idx)] = targets[picks]
    return out


def _tiers(*frames: pd.DataFrame) -> list[str]:
    """Tiers present in any frame, in Tier order (gpu, host, disk)."""
    present = set().union(*(set(f["tier"]) for f in frames))
    return [t.value for t in Tier if t.value in present]


def _peak_row(df: pd.DataFrame, column: str) -> pd.Series:
    return df.loc[df[column].idxmax()]


def _nullable_layer(value):
    return None if pd.isna(value) else int(value)


CPU_ONLY_COMPONENTS = ("rounding", "overhead")
"""Predicted components a CPU run has no counterpart for: block rounding of the CUDA caching
allocator (GPU) and of pinned host memory (host), the CUDA context / cuBLAS workspace."""


def _side(row: dict, side: str, d: pd.DataFrame, column: str) -> None:
    if len(d) == 0:
        row.update({f"{side}_bytes": pd.NA, f"{side}_t": np.nan, f"{side}_event": None,
                    f"{side}_phase": None, f"{side}_layer": None, f"{side}_name": None})
        return
    at = _peak_row(d, column)
    row.update({
        f"{side}_bytes": int(at[column]),
        f"{side}_t": float(at["t"]),
        f"{side}_event": at["event"],
        f"{side}_phase": at["phase"],
        f"{side}_layer": _nullable_layer(at["layer"]),
        f"{side}_name": at["name"],
    })


def cpu_equivalent(predicted: pd.DataFrame) -> pd.DataFrame:
    """The predicted compute-tier rows with `peak` replaced by what one CPU process would hold
    at that moment: GPU plus host bytes, less the CUDA-only components of both (a CPU run
    keeps "GPU" tensors and host-resident state in the same malloc heap)."""
    # Rounding on the host tier is pinned memory's power-of-two blocks: CUDA only, too.
    heap_part = predicted["allocated"] - predicted[list(CPU_ONLY_COMPONENTS)].sum(axis=1)
    per_tier = pd.DataFrame({tier: heap_part.where(predicted["tier"] == tier) for tier in ("gpu", "host")})
    # A tier holds its first recorded bytes from the step's start (host state rests all step).
    per_tier = per_tier.ffill().bfill().fillna(0)
    out = predicted[predicted["tier"] == "gpu"].copy()
    out["peak"] = (per_tier["gpu"] + per_tier["host"]).loc[out.index].astype("int64")
    return out


def peak_table(predicted: pd.DataFrame, measured: pd.DataFrame, *, cpu_trace: bool = False) -> pd.DataFrame:
    """Per tier: both peaks, the error, and when. A "reserved" row is added for a tier whose
    measured side has a caching allocator (reserved differs from allocated somewhere; never
    for a CPU trace).

    `cpu_trace`: the trace comes from a CPU run, where one malloc heap holds every tier and
    its "gpu" rows measure the whole process; a row (tier "process", metric "cpu-equivalent")
    then holds that against `cpu_equivalent(predicted)`, and a row "rise in step" holds the
    rise of each above its first event (what the step itself allocates).

    The time and event of each peak are those of the event at which it was recorded (for a
    trace with a `peak` column: the first event after the spike).
    """
    rows = []
    for tier in _tiers(predicted, measured):
        p = predicted[predicted["tier"] == tier]
        m = measured[measured["tier"] == tier]
        metrics = [("allocated", "peak")]
        if not cpu_trace and len(m) and (m["reserved"] != m["allocated"]).any():
            metrics.append(("reserved", "reserved"))
        for metric, column in metrics:
            row: dict = {"tier": tier, "metric": metric}
            _side(row, "predicted", p, column)
            _side(row, "measured", m, column)
            row.update(_errors(row["predicted_bytes"], row["measured_bytes"]))
            rows.append(row)
    if cpu_trace and (predicted["tier"] == "gpu").any():
        eq = cpu_equivalent(predicted)
        heap = measured[measured["tier"] == "gpu"]
        row = {"tier": "process", "metric": "cpu-equivalent"}
        _side(row, "predicted", eq, "peak")
        _side(row, "measured", heap, "peak")
        row.update(_errors(row["predicted_bytes"], row["measured_bytes"]))
        rows.append(row)
        if len(heap):
            # The heap also holds what no plan predicts (the interpreter's objects, the data
            # pipeline, malloc's free lists); the rise above the step's first event leaves it out.
            rise = {**row, "metric": "rise in step"}
            for side, d in (("predicted", eq), ("measured", heap)):
                rise[f"{side}_bytes"] = int(d["peak"].max()) - int(d["allocated" if side == "measured" else "peak"].iloc[0])
            rise.update(_errors(rise["predicted_bytes"], rise["measured_bytes"]))
            rows.append(rise)
    table = pd.DataFrame(rows, columns=list(PEAK_COLUMNS))
    for col in ("predicted_bytes", "measured_bytes", "error_bytes"):
        table[col] = table[col].astype("Int64")
    return table


def _errors(predicted_bytes, measured_bytes) -> dict:
    if pd.isna(predicted_bytes) or pd.isna(measured_bytes):
        return {"error_bytes": pd.NA, "relative_error": np.nan}
    error = int(measured_bytes) - int(predicted_bytes)
    relative = error / predicted_bytes if predicted_bytes else (0.0 if error == 0 else np.inf)
    return {"error_bytes": error, "relative_error": relative}


def phase_table(predicted: pd.DataFrame, measured: pd.DataFrame, aligned: pd.DataFrame) -> pd.DataFrame:
    """Per tier and phase: the phase's peak on each side, its error, and the mean absolute
    error of `allocated` over the events matched in that phase."""
    rows = []
    tiers = _tiers(predicted, measured)
    phases = list(dict.fromkeys([*phases_in_order(predicted), *phases_in_order(measured)]))
    for tier in tiers:
        for phase in phases:
            p = predicted[(predicted["tier"] == tier) & (predicted["phase"] == phase)]
            m = measured[(measured["tier"] == tier) & (measured["phase"] == phase)]
            if len(p) == 0 and len(m) == 0:
                continue
            a = aligned[(aligned["tier"] == tier) & (aligned["phase"] == phase)]
            pb = int(p["peak"].max()) if len(p) else pd.NA
            mb = int(m["peak"].max()) if len(m) else pd.NA
            mae = float((a["allocated_meas"] - a["allocated_pred"]).abs().mean()) if len(a) else np.nan
            rows.append({"tier": tier, "phase": phase, "predicted_bytes": pb, "measured_bytes": mb,
                         **_errors(pb, mb), "matched_events": len(a), "mean_abs_error_bytes": mae})
    table = pd.DataFrame(rows, columns=list(PHASE_COLUMNS))
    for col in ("predicted_bytes", "measured_bytes", "error_bytes"):
        table[col] = table[col].astype("Int64")
    return table


def components_at_peak(predicted: pd.DataFrame, measured: pd.DataFrame, tier: str) -> pd.DataFrame:
    """Bytes per component at each side's `allocated` peak on `tier`: index Component value,
    columns predicted_bytes, measured_bytes (0 where a side does not break its bytes down)."""
    out = {}
    for side, d in (("predicted", predicted), ("measured", measured)):
        d = d[d["tier"] == tier]
        out[f"{side}_bytes"] = (
            d.loc[d["allocated"].idxmax(), list(COMPONENT_COLUMNS)].astype("int64")
            if len(d) else pd.Series(0, index=list(COMPONENT_COLUMNS), dtype="int64")
        )
    return pd.DataFrame(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    """Everything `chunkft compare` reports about one timeline/trace pair."""

    predicted: Recording
    measured: Recording
    measured_step: int | None
    """The trace step compared with the (one-step) timeline; None: steps matched by number."""
    predicted_events: pd.DataFrame
    """The timeline's events of the compared steps (all of `predicted.events` by default)."""
    measured_events: pd.DataFrame
    """The trace's events of the compared steps, renumbered to the timeline's step numbers."""
    aligned: pd.DataFrame
    """`align(predicted_events, measured_events)`."""
    peaks: pd.DataFrame
    """`peak_table`: one row per tier (and reserved), columns PEAK_COLUMNS."""
    phases: pd.DataFrame
    """`phase_table`: one row per tier and phase, columns PHASE_COLUMNS."""

    def match_counts(self) -> dict[str, int]:
        """How many events each side has and how many were paired."""
        return {"predicted": len(self.predicted_events), "measured": len(self.measured_events),
                "matched": len(self.aligned)}


def worst_step(events: pd.DataFrame, chunk: int | None = None) -> int:
    """The step with the highest peak on the GPU tier (on any tier if there is no GPU row),
    among the steps that hold a phase event: a fragment (a lone step_end written after the
    step counter moved on, the tail of a killed run) is no step to compare a timeline with.
    `chunk`: among the steps that trained that chunk, when any did (a ChunkFT timeline is one
    chunk's step; another chunk's step holds other spans' gradients and activations)."""
    rows = events[events["tier"] == "gpu"] if (events["tier"] == "gpu").any() else events
    whole = set(rows.loc[rows["event"] == "phase", "step"])
    if whole:
        rows = rows[rows["step"].isin(whole)]
    if chunk is not None:
        started = rows.loc[rows["event"] == "phase"].groupby("step")["chunk"].first()
        same = set(started[started == chunk].index)
        if same:
            rows = rows[rows["step"].isin(same)]
    return int(rows.groupby("step")["peak"].max().idxmax())


def compare(predicted: Recording, measured: Recording, *, measured_step: int | None = None) -> Comparison:
    """Compare a timeline with a trace.

    `measured_step`: compare the timeline (which must then hold one step) against this one
    step of the trace, e.g. a step after warm-up. Default: a one-step timeline against a
    trace of several steps is compared with the trace's worst step (highest GPU peak: the
    prediction is meant to bound every step) among those that trained the timeline's chunk;
    otherwise steps match by number.
    """
    p, m = predicted.events, measured.events
    steps = sorted(set(p["step"]))
    available = sorted(set(m["step"]))
    if measured_step is None and len(steps) == 1 and len(available) > 1:
        measured_step = worst_step(m, predicted.header.get("chunk"))
    if measured_step is not None:
        if len(steps) != 1:
            raise ChunkftError(f"--step needs a timeline of one step; {predicted.path!r} has steps {steps}")
        if measured_step not in available:
            raise ChunkftError(f"trace {measured.path!r} has no step {measured_step}; it has steps {available}")
        m = m[m["step"] == measured_step].copy()
        m["step"] = steps[0]
        m = m.reset_index(drop=True)
    aligned = align(p, m)
    return Comparison(
        predicted=predicted,
        measured=measured,
        measured_step=measured_step,
        predicted_events=p,
        measured_events=m,
        aligned=aligned,
        peaks=peak_table(p, m, cpu_trace=measured.header.get("allocator") == "cpu"),
        phases=phase_table(p, m, aligned),
    )


__all__ = [
    "ALIGN_KEYS", "PEAK_COLUMNS", "PHASE_COLUMNS", "Comparison", "align", "compare",
    "components_at_peak", "cpu_equivalent", "peak_table", "phase_table", "positions_on_predicted", "worst_step",
]
