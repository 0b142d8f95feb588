"""Export a timeline or trace to Chrome trace JSON, for chrome://tracing and ui.perfetto.dev.

Layout of the exported trace (the Trace Event Format, "JSON Object Format"):
  - one process, named after the file's kind ("chunkft predicted timeline" / "... measured
    trace");
  - counter events ("ph": "C"): per tier, the bytes of every component (drawn stacked), and
    per tier the allocated and reserved bytes; values are in MiB so the viewer's axis reads;
  - complete events ("ph": "X"): one per phase run on the thread "phases", one per decoder
    layer run on the thread "layers";
  - instant events ("ph": "i"): transfers, optimizer steps, chunk switches, step ends, on
    the thread "events", with the event's name and bytes in args.

Time: a trace in seconds is exported in microseconds as is. A timeline counts ops, which have
no duration of their own; each op is drawn as `us_per_op` microseconds (default 1), so
durations read as op counts. Pass the predicted step time to spread the ops over it instead
(evenly: a predicted op has no duration of its own). `write_chrome_trace(timeline, path,
measured=trace)` puts both in one file as two processes on one axis in seconds.
"""

from __future__ import annotations

import json
import os

import pandas as pd

from analysis.load import COMPONENT_COLUMNS, Recording
from planner.fsio import atomic_write_text

MIB = 2**20
THREADS: dict[str, int] = {"phases": 1, "layers": 2, "events": 3}
INSTANT_EVENTS = ("transfer", "optimizer_step", "chunk_switch", "step_end")


def _runs(values: list, ts: list[float]) -> list[tuple[object, float, float]]:
    """Maximal runs of equal consecutive values: (value, start, end); a run ends where the
    next begins (the last at the last timestamp)."""
    runs = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            end = ts[i] if i < len(values) else ts[-1]
            runs.append((values[start], ts[start], end))
            start = i
    return runs


def to_chrome_trace(recording: Recording, *, us_per_op: float | None = None,
                    step_time_s: float | None = None, pid: int = 1) -> dict:
    """The recording as a Chrome trace object {"traceEvents": [...], ...}, as process `pid`."""
    events = recording.events
    if recording.t_unit == "s":
        scale = 1e6
    elif step_time_s is not None and len(events) and events["t"].max() > 0:
        scale = step_time_s * 1e6 / float(events["t"].max())
    else:
        scale = us_per_op if us_per_op is not None else 1.0
    ts = (events["t"] * scale).round(3).tolist()
    out: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": f"chunkft {recording.label} {recording.kind}"}},
    ]
    for name, tid in THREADS.items():
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})

    # A counter series missing from an event keeps its last value in the viewer, so every event
    # of a tier names every component that tier ever holds, zeros included.
    series = {tier: [c for c in COMPONENT_COLUMNS if (part[c] > 0).any()]
              for tier, part in events.groupby("tier", sort=False)}
    for row, t in zip(events.itertuples(index=False), ts):
        parts = {c: round(getattr(row, c) / MIB, 3) for c in series[row.tier]}
        out.append({"name": f"{row.tier} memory by component (MiB)", "ph": "C", "pid": pid, "tid": 0,
                    "ts": t, "args": parts or {"allocated": round(row.allocated / MIB, 3)}})
        out.append({"name": f"{row.tier} allocated/reserved (MiB)", "ph": "C", "pid": pid, "tid": 0,
                    "ts": t, "args": {"allocated": round(row.allocated / MIB, 3),
                                      "reserved": round(row.reserved / MIB, 3)}})
        if row.event in INSTANT_EVENTS:
            out.append({"name": row.name or row.event, "cat": row.event, "ph": "i", "s": "t",
                        "pid": pid, "tid": THREADS["events"], "ts": t,
                        "args": {"tier": row.tier, "allocated_bytes": int(row.allocated),
                                 "phase": row.phase, "chunk": None if pd.isna(row.chunk) else int(row.chunk)}})

    # Phases and layers as spans. Each step's phases are consecutive; a layer run is cut where
    # the phase changes, so forward layer 3 and backward layer 3 are separate spans.
    steps = events["step"].tolist()
    phase_key = [(s, p) for s, p in zip(steps, events["phase"].fillna("").tolist())]
    for (step, phase), start, end in _runs(phase_key, ts):
        if phase:
            out.append({"name": phase, "cat": "phase", "ph": "X", "pid": pid, "tid": THREADS["phases"],
                        "ts": start, "dur": round(max(end - start, 0.0), 3), "args": {"step": step}})
    layers = [None if pd.isna(v) else int(v) for v in events["layer"]]
    layer_key = [(s, p, lay) for (s, p), lay in zip(phase_key, layers)]
    for (step, phase, layer), start, end in _runs(layer_key, ts):
        if layer is not None:
            out.append({"name": f"layer {layer}", "cat": "layer", "ph": "X", "pid": pid,
                        "tid": THREADS["layers"], "ts": start, "dur": round(max(end - start, 0.0), 3),
                        "args": {"step": step, "phase": phase}})
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {
            "kind": recording.kind,
            "t_unit": recording.t_unit,
            "us_per_t": scale,
            "model_fingerprint": recording.model_fingerprint,
            "plan_fingerprint": recording.plan_fingerprint,
            "source": os.path.basename(recording.path),
        },
    }


def combine(*traces: dict) -> dict:
    """Several exported recordings (distinct pids) in one file: a viewer shows them as
    processes one above the other, e.g. the predicted timeline over the measured trace."""
    return {"traceEvents": [e for t in traces for e in t["traceEvents"]], "displayTimeUnit": "ms",
            "otherData": {"recordings": [t["otherData"] for t in traces]}}


def write_chrome_trace(recording: Recording, path: str | os.PathLike, *, measured: Recording | None = None,
                       **kwargs) -> None:
    """Write `to_chrome_trace(recording)` to `path` atomically (compact: traces get large).

    With `measured`, the file also holds that trace as a second process; the timeline's ops
    are then spread over its header's predicted step time (when it has one) so both share a
    time axis in seconds."""
    if measured is None:
        trace = to_chrome_trace(recording, **kwargs)
    else:
        kwargs.setdefault("step_time_s", recording.header.get("step_time_s"))
        trace = combine(to_chrome_trace(recording, pid=1, **kwargs), to_chrome_trace(measured, pid=2))
    atomic_write_text(path, json.dumps(trace, separators=(",", ":")))


__all__ = ["combine", "to_chrome_trace", "write_chrome_trace"]
