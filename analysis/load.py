"""Load a predicted timeline (simulator) and a measured trace (runtime) into pandas.

Both files are JSON Lines in the layout of planner.schema: a header line, then one `Event` per
line. Whatever produced them, they come out as a `Recording` whose `events` DataFrame has one
schema, `EVENT_COLUMNS` (one row per event, one column per `Component`, missing components 0),
so analysis compares like with like.

Every problem with a file is a one-line `ChunkftError` that names the file and says why:
empty, truncated (the last line cut off mid-JSON, as a killed run leaves it), a bad line, a
wrong or missing header, or two files that do not belong together (different model or plan
fingerprints).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from planner.errors import ChunkftError
from planner.schema import TIMELINE_SCHEMA_VERSION, Component, Event, EventKind

COMPONENT_COLUMNS: tuple[str, ...] = tuple(c.value for c in Component)
"""One column per Component, in enum order (the stacking order of the figures)."""

EVENT_COLUMNS: tuple[str, ...] = (
    "t",  # op index (timeline) or seconds since the step started (trace); see Recording.t_unit
    "step",
    "event",  # EventKind value
    "phase",  # Phase value; events without one inherit the phase of the last "phase" event
    "layer",  # decoder layer (nullable)
    "chunk",  # active chunk (nullable)
    "tier",  # Tier value
    "allocated",
    "reserved",
    "peak",  # peak since the previous event where measured, else allocated
    "name",
    *COMPONENT_COLUMNS,
)

KINDS = ("timeline", "trace")
T_UNITS = ("op", "s")


@dataclass(frozen=True, kw_only=True, slots=True)
class Recording:
    """One timeline or trace file, loaded.

    `events` has exactly the columns `EVENT_COLUMNS`, rows in file order. Integer byte columns
    are int64; `layer` and `chunk` are nullable Int64; `phase` and `name` may be None.
    """

    path: str
    kind: str
    """"timeline" (predicted by the simulator) or "trace" (measured by the runtime)."""
    t_unit: str
    """"op" (t is an op index) or "s" (t is seconds since the step started)."""
    model_fingerprint: str
    plan_fingerprint: str
    header: dict
    """The header line as written, for producer-specific fields (device, step time, ...)."""
    events: pd.DataFrame

    @property
    def label(self) -> str:
        return "predicted" if self.kind == "timeline" else "measured"


def _what(kind: str | None) -> str:
    return kind if kind in KINDS else "timeline/trace"


def _parse_lines(path: str, what: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ChunkftError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise ChunkftError(f"{what} {path!r} is a directory, not a JSON Lines file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChunkftError(f"cannot read {what} {path!r}: {e}") from None
    if not text.strip():
        raise ChunkftError(f"{what} {path!r} is empty (expected a header line and events)")
    lines = text.split("\n")
    # A file written completely ends with "\n"; a killed writer leaves a partial last line.
    last = max(i for i, line in enumerate(lines) if line.strip())
    rows: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                raise ChunkftError(
                    f"{what} {path!r} is truncated: its last line ({i + 1}) is cut off mid-JSON "
                    "(was the writer killed?)"
                ) from None
            raise ChunkftError(f"{what} {path!r} line {i + 1} is not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ChunkftError(f"{what} {path!r} line {i + 1} is nested too deeply to be an event") from None
        if not isinstance(row, dict):
            raise ChunkftError(f"{what} {path!r} line {i + 1} is not a JSON object")
        row["_line"] = i + 1
        rows.append(row)
    return rows


def _check_header(header: dict, path: str, what: str, expect_kind: str | None) -> None:
    if header.get("event") != EventKind.HEADER.value:
        raise ChunkftError(
            f"{what} {path!r} has no header: line 1 should be "
            '{"event": "header", "kind": "timeline" | "trace", ...}'
            f", found event {header.get('event')!r}"
        )
    version = header.get("schema_version")
    if version != TIMELINE_SCHEMA_VERSION:
        raise ChunkftError(
            f"{what} {path!r} has schema_version {version!r}; this chunkft reads version "
            f"{TIMELINE_SCHEMA_VERSION}"
        )
    kind = header.get("kind")
    if kind not in KINDS:
        raise ChunkftError(f"{what} {path!r} header has kind {kind!r}; valid: {', '.join(KINDS)}")
    if expect_kind is not None and kind != expect_kind:
        raise ChunkftError(
            f"{path!r} is a {kind}, but a {expect_kind} was expected here "
            "(compare takes the predicted timeline first, then the measured trace)"
        )
    if header.get("t_unit") not in T_UNITS:
        raise ChunkftError(
            f"{what} {path!r} header has t_unit {header.get('t_unit')!r}; valid: {', '.join(T_UNITS)}"
        )
    for key in ("model_fingerprint", "plan_fingerprint"):
        if not isinstance(header.get(key), str) or not header[key]:
            raise ChunkftError(f"{what} {path!r} header lacks {key} (a non-empty string)")


def _event_row(row: dict, path: str, what: str) -> dict:
    line = row["_line"]
    _check_event_numbers(row, path, what, line)
    try:
        event = Event.from_json(row)
    except KeyError as e:
        raise ChunkftError(f"{what} {path!r} line {line} lacks field {e.args[0]!r}") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        raise ChunkftError(f"{what} {path!r} line {line} has a bad value: {e}") from None
    if event.event == EventKind.HEADER:
        raise ChunkftError(f"{what} {path!r} line {line} is a second header; concatenated files?")
    out = {
        "t": float(event.t),
        "step": event.step,
        "event": event.event.value,
        "phase": event.phase.value if event.phase is not None else None,
        "layer": event.layer,
        "chunk": event.chunk,
        "tier": event.tier.value,
        "allocated": event.allocated,
        "reserved": event.reserved,
        "peak": max(event.peak, event.allocated) if event.peak is not None else event.allocated,
        "name": event.name,
    }
    for c in Component:
        out[c.value] = event.bytes.get(c, 0)
    return out


_MAX_EVENT_BYTES = 2**62  # int64 columns; no memory tier holds an exabyte


def _check_event_numbers(row: dict, path: str, what: str, line: int) -> None:
    """Before parsing: a finite time, byte counts that fit the int64 columns (integral numbers),
    integer (or null) layer and chunk; the message names the field."""
    def integral(v, limit: int) -> bool:
        return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v == int(v)
                and abs(v) <= limit)

    checks = [("t", row.get("t"), lambda v: not isinstance(v, bool) and isinstance(v, (int, float))
               and math.isfinite(v), "a finite number")]
    checks += [(k, row.get(k), lambda v: v is None or integral(v, _MAX_EVENT_BYTES), "an integer byte count up to 2**62")
               for k in ("allocated", "reserved", "peak")]
    bytes_ = row.get("bytes") if isinstance(row.get("bytes"), dict) else {}
    checks += [(f"bytes.{c}", v, lambda v: integral(v, _MAX_EVENT_BYTES), "an integer byte count up to 2**62")
               for c, v in bytes_.items()]
    checks += [(k, row.get(k), lambda v: v is None or integral(v, 2**31), "an integer or null")
               for k in ("step", "layer", "chunk")]
    for name, value, ok, valid in checks:
        if name in row or name.startswith("bytes."):
            if not ok(value):
                raise ChunkftError(f"{what} {path!r} line {line} has a bad value: {name} "
                                   f"{json.dumps(value)[:40]} (must be {valid})")


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(EVENT_COLUMNS))
    # An event without a phase belongs to the phase the last "phase" event started.
    df["phase"] = df["phase"].ffill()
    df["phase"] = df["phase"].astype(object).where(df["phase"].notna(), None)
    for col in ("step", "allocated", "reserved", "peak", *COMPONENT_COLUMNS):
        df[col] = df[col].astype("int64")
    for col in ("layer", "chunk"):
        df[col] = pd.array(df[col].tolist(), dtype="Int64")
    df["t"] = df["t"].astype("float64")
    return df


def load_recording(path: str | os.PathLike, *, expect_kind: str | None = None) -> Recording:
    """Load one timeline or trace file; `expect_kind` ("timeline" | "trace") checks which."""
    path = str(path)
    what = _what(expect_kind)
    rows = _parse_lines(path, what)
    header = rows[0]
    _check_header(header, path, what, expect_kind)
    what = header["kind"]
    events = [_event_row(r, path, what) for r in rows[1:]]
    if not events:
        raise ChunkftError(f"{what} {path!r} has a header but no events")
    header = {k: v for k, v in header.items() if k != "_line"}
    return Recording(
        path=path,
        kind=header["kind"],
        t_unit=header["t_unit"],
        model_fingerprint=header["model_fingerprint"],
        plan_fingerprint=header["plan_fingerprint"],
        header=header,
        events=_frame(events),
    )


def load_pair(timeline_path: str | os.PathLike, trace_path: str | os.PathLike) -> tuple[Recording, Recording]:
    """Load a predicted timeline and the measured trace of the same model and plan."""
    predicted = load_recording(timeline_path, expect_kind="timeline")
    measured = load_recording(trace_path, expect_kind="trace")
    for key in ("model_fingerprint", "plan_fingerprint"):
        a, b = getattr(predicted, key), getattr(measured, key)
        if a != b:
            subject = "model" if key.startswith("model") else "plan"
            raise ChunkftError(
                f"trace {measured.path!r} is of another {subject} than timeline {predicted.path!r} "
                f"({key} {b[:12]} vs {a[:12]})"
            )
    return predicted, measured


def phases_in_order(df: pd.DataFrame) -> list[str]:
    """The phases present in `df`, in the order they first appear."""
    return [p for p in dict.fromkeys(df["phase"].tolist()) if p is not None]


def write_recording(path: str | os.PathLike, header: dict, events: list[Event]) -> None:
    """Write a timeline/trace file (used by tests and examples; producers have their own)."""
    from planner.fsio import atomic_write_jsonl

    atomic_write_jsonl(Path(path), [header, *(e.to_json() for e in events)])


__all__ = [
    "COMPONENT_COLUMNS",
    "EVENT_COLUMNS",
    "Recording",
    "load_pair",
    "load_recording",
    "phases_in_order",
    "write_recording",
]
