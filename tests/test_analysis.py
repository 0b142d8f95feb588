"""Analysis: loading, alignment, error tables, Perfetto export, the compare/report CLI.

Timelines and traces are generated here by hand (`synthetic_step`), with known peaks, so the
numbers behind every figure are checked exactly; pixels are not.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.compare import align, compare, components_at_peak, positions_on_predicted
from analysis.load import COMPONENT_COLUMNS, EVENT_COLUMNS, load_pair, load_recording, write_recording
from analysis.perfetto import to_chrome_trace
from planner import cli
from planner.errors import ChunkftError
from planner.schema import TIMELINE_SCHEMA_VERSION, Component, Event, EventKind, Phase, Tier

GIB = 2**30
MIB = 2**20


def header(kind: str, *, model: str = "m" * 64, plan: str = "p" * 64) -> dict:
    return {"event": "header", "schema_version": TIMELINE_SCHEMA_VERSION, "kind": kind,
            "t_unit": "op" if kind == "timeline" else "s", "model_fingerprint": model, "plan_fingerprint": plan}


def synthetic_step(*, layers: int = 4, ops_per_layer: int = 3, scale: float = 1.0, seconds: bool = False,
                   extra_op_in_layer: int | None = None, switch: bool = True) -> list[Event]:
    """One ChunkFT-like training step on GPU and host, with a chunk switch.

    GPU: 2 GiB weights; forward adds 256 MiB of activations per op; the loss adds 1 GiB of
    logits; backward frees activations and builds 512 MiB of gradients; the optimizer holds
    384 MiB of moments and masters; the switch moves them to the host and brings the next
    chunk's in. `scale` multiplies every transient byte (measured vs predicted), `seconds`
    gives t in seconds (1 ms per op) as a runtime trace has it, `extra_op_in_layer` adds one
    op to that forward layer (a real run that decomposes an op differently).
    """
    events: list[Event] = []
    t = 0
    gpu = {Component.WEIGHTS: 2 * GIB}
    host = {Component.MASTER: 1 * GIB, Component.OPTIMIZER: 2 * GIB}

    def emit(kind, phase, tier=Tier.GPU, layer=None, name=None, chunk=0):
        nonlocal t
        state = gpu if tier == Tier.GPU else host
        b = {c: (v if c == Component.WEIGHTS else int(v * scale)) for c, v in state.items() if v}
        alloc = sum(b.values())
        events.append(Event(t=t * 1e-3 if seconds else t, event=kind, tier=tier, allocated=alloc,
                            reserved=alloc + (64 * MIB if tier == Tier.GPU else 0), bytes=b, phase=phase,
                            layer=layer, chunk=chunk, name=name))
        t += 1

    emit(EventKind.PHASE, Phase.FORWARD)
    emit(EventKind.PHASE, Phase.FORWARD, tier=Tier.HOST)
    for layer in range(layers):
        emit(EventKind.LAYER, Phase.FORWARD, layer=layer)
        for _ in range(ops_per_layer + (1 if layer == extra_op_in_layer else 0)):
            gpu[Component.ACTIVATIONS] = gpu.get(Component.ACTIVATIONS, 0) + 256 * MIB
            emit(EventKind.OP, Phase.FORWARD, layer=layer, name="aten::mm")
    emit(EventKind.PHASE, Phase.LOSS)
    gpu[Component.LOGITS] = 1 * GIB
    emit(EventKind.OP, Phase.LOSS, name="aten::_log_softmax")
    emit(EventKind.PHASE, Phase.BACKWARD)
    per_op = gpu[Component.ACTIVATIONS] // (layers * ops_per_layer)
    for layer in reversed(range(layers)):
        emit(EventKind.LAYER, Phase.BACKWARD, layer=layer)
        for _ in range(ops_per_layer):
            gpu[Component.LOGITS] = 0
            gpu[Component.ACTIVATIONS] -= per_op
            gpu[Component.GRADIENTS] = gpu.get(Component.GRADIENTS, 0) + 512 * MIB // (layers * ops_per_layer)
            emit(EventKind.OP, Phase.BACKWARD, layer=layer, name="aten::mm")
    gpu[Component.ACTIVATIONS] = 0
    emit(EventKind.PHASE, Phase.OPTIMIZER)
    gpu[Component.OPTIMIZER], gpu[Component.MASTER] = 256 * MIB, 128 * MIB
    emit(EventKind.OPTIMIZER_STEP, Phase.OPTIMIZER, name="adamw chunk 0")
    gpu[Component.GRADIENTS] = 0
    if switch:
        emit(EventKind.PHASE, Phase.CHUNK_SWITCH)
        emit(EventKind.CHUNK_SWITCH, Phase.CHUNK_SWITCH, chunk=1)
        gpu[Component.OPTIMIZER], gpu[Component.MASTER] = 0, 0
        emit(EventKind.TRANSFER, Phase.CHUNK_SWITCH, name="chunk 0 state gpu->host", chunk=1)
        host[Component.OPTIMIZER] += 256 * MIB
        host[Component.MASTER] += 128 * MIB
        emit(EventKind.TRANSFER, Phase.CHUNK_SWITCH, tier=Tier.HOST, name="chunk 0 state gpu->host", chunk=1)
        host[Component.OPTIMIZER] -= 256 * MIB
        host[Component.MASTER] -= 128 * MIB
        emit(EventKind.TRANSFER, Phase.CHUNK_SWITCH, tier=Tier.HOST, name="chunk 1 state host->gpu", chunk=1)
        gpu[Component.OPTIMIZER], gpu[Component.MASTER] = 256 * MIB, 128 * MIB
        emit(EventKind.TRANSFER, Phase.CHUNK_SWITCH, name="chunk 1 state host->gpu", chunk=1)
    emit(EventKind.STEP_END, Phase.OPTIMIZER)
    return events


def write_pair(tmp_path: Path, *, scale: float = 1.05, **kwargs) -> tuple[Path, Path]:
    tl, tr = tmp_path / "timeline.jsonl", tmp_path / "trace.jsonl"
    write_recording(tl, header("timeline"), synthetic_step())
    write_recording(tr, header("trace"), synthetic_step(scale=scale, seconds=True, **kwargs))
    return tl, tr


def hand_made(tmp_path: Path, name: str, kind: str, points: list[tuple[Phase, int]], **kw) -> Path:
    """A GPU-only file with one op per (phase, bytes) point, all bytes as activations."""
    events = [Event(t=i if kind == "timeline" else i * 0.5, event=EventKind.OP, tier=Tier.GPU, allocated=b,
                    reserved=b, bytes={Component.ACTIVATIONS: b}, phase=ph, name=f"op{i}", **kw)
              for i, (ph, b) in enumerate(points)]
    path = tmp_path / name
    write_recording(path, header(kind), events)
    return path


# -- loading -------------------------------------------------------------------------------

def test_load_schema_and_phase_inheritance(tmp_path):
    tl, tr = write_pair(tmp_path)
    p, m = load_pair(tl, tr)
    assert tuple(p.events.columns) == EVENT_COLUMNS == tuple(m.events.columns)
    assert (p.kind, p.t_unit, m.kind, m.t_unit) == ("timeline", "op", "trace", "s")
    assert str(p.events["layer"].dtype) == "Int64" and p.events["allocated"].dtype == "int64"
    first = p.events.iloc[0]
    assert first["phase"] == "forward" and first["weights"] == 2 * GIB and first["activations"] == 0
    # every component column exists; missing components read as 0
    assert set(COMPONENT_COLUMNS) <= set(p.events.columns) and (p.events["rounding"] == 0).all()
    # a trace row without a phase inherits the last phase event's
    rows = [header("trace"),
            {"t": 0, "event": "phase", "tier": "gpu", "allocated": 1, "reserved": 1, "phase": "backward"},
            {"t": 1, "event": "op", "tier": "gpu", "allocated": 5, "reserved": 8, "peak": 9}]
    path = tmp_path / "nophase.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = load_recording(path).events
    assert events["phase"].tolist() == ["backward", "backward"]
    assert events["peak"].tolist() == [1, 9]  # peak defaults to allocated, else the measured one


@pytest.mark.parametrize("content, reason", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    (json.dumps(header("trace")) + "\n", "has a header but no events"),
    (json.dumps(header("trace")) + "\n" + '{"t": 0, "event": "op", "tier": "gp', "is truncated"),
    (json.dumps(header("trace")) + "\n{oops\n" + json.dumps(
        {"t": 0, "event": "op", "tier": "gpu", "allocated": 1, "reserved": 1}) + "\n", "line 2 is not valid JSON"),
    ('{"t": 0, "event": "op", "tier": "gpu", "allocated": 1, "reserved": 1}\n', "has no header"),
    (json.dumps({**header("trace"), "schema_version": 99}) + "\n", "schema_version 99"),
    (json.dumps({**header("trace"), "kind": "plan"}) + "\n", "kind 'plan'"),
    (json.dumps({**header("trace"), "t_unit": "ms"}) + "\n", "t_unit 'ms'"),
    (json.dumps({k: v for k, v in header("trace").items() if k != "plan_fingerprint"}) + "\n",
     "lacks plan_fingerprint"),
    (json.dumps(header("trace")) + "\n" + json.dumps(
        {"t": 0, "event": "op", "tier": "vram", "allocated": 1, "reserved": 1}) + "\n", "line 2 has a bad value"),
    (json.dumps(header("trace")) + "\n" + json.dumps({"t": 0, "event": "op", "tier": "gpu"}) + "\n",
     "line 2 lacks field 'allocated'"),
])
def test_load_bad_files_say_which_and_why(tmp_path, content, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ChunkftError) as e:
        load_recording(path)
    message = str(e.value)
    assert reason in message and str(path) in message and "\n" not in message


def test_load_missing_file_and_wrong_kind(tmp_path):
    with pytest.raises(ChunkftError, match="does not exist"):
        load_recording(tmp_path / "nope.jsonl")
    tl, tr = write_pair(tmp_path)
    with pytest.raises(ChunkftError, match="is a trace, but a timeline was expected"):
        load_pair(tr, tl)


@pytest.mark.parametrize("field, subject", [("model", "model"), ("plan", "plan")])
def test_mismatched_pair_is_refused(tmp_path, field, subject):
    tl = tmp_path / "timeline.jsonl"
    tr = tmp_path / "trace.jsonl"
    write_recording(tl, header("timeline"), synthetic_step())
    write_recording(tr, header("trace", **{field: "x" * 64}), synthetic_step(seconds=True))
    with pytest.raises(ChunkftError, match=f"trace .*trace.jsonl' is of another {subject} than timeline"):
        load_pair(tl, tr)


# -- alignment and error tables ------------------------------------------------------------

def test_known_peak_error(tmp_path):
    """Predicted peak 10 GiB at op 5, measured 10.5 GiB: +0.5 GiB, +5.0%."""
    pred = [(Phase.FORWARD, 2 * GIB), (Phase.FORWARD, 4 * GIB), (Phase.FORWARD, 6 * GIB),
            (Phase.LOSS, 8 * GIB), (Phase.BACKWARD, 9 * GIB), (Phase.BACKWARD, 10 * GIB),
            (Phase.OPTIMIZER, 7 * GIB)]
    meas = [(ph, b) for ph, b in pred]
    meas[5] = (Phase.BACKWARD, int(10.5 * GIB))
    meas[3] = (Phase.LOSS, int(8.8 * GIB))  # loss phase: +10%
    tl = hand_made(tmp_path, "tl.jsonl", "timeline", pred)
    tr = hand_made(tmp_path, "tr.jsonl", "trace", meas)
    c = compare(*load_pair(tl, tr))
    (row,) = c.peaks.to_dict("records")  # GPU only; reserved == allocated so no reserved row
    assert (row["tier"], row["metric"]) == ("gpu", "allocated")
    assert row["predicted_bytes"] == 10 * GIB and row["measured_bytes"] == int(10.5 * GIB)
    assert row["error_bytes"] == GIB // 2
    assert round(row["relative_error"] * 100, 1) == 5.0
    assert (row["predicted_t"], row["predicted_event"], row["predicted_phase"], row["predicted_name"]) == (
        5.0, "op", "backward", "op5")
    assert (row["measured_t"], row["measured_phase"]) == (2.5, "backward")
    phases = c.phases.set_index("phase")
    assert list(phases.index) == ["forward", "loss", "backward", "optimizer"]
    assert phases.loc["forward", "error_bytes"] == 0 and phases.loc["forward", "relative_error"] == 0.0
    assert math.isclose(phases.loc["loss", "relative_error"], 0.1, rel_tol=1e-6)
    assert math.isclose(phases.loc["backward", "relative_error"], 0.05)
    # mean |error| over the two matched backward events: (0 + 0.5 GiB) / 2
    assert phases.loc["backward", "matched_events"] == 2
    assert phases.loc["backward", "mean_abs_error_bytes"] == GIB / 4


def test_measured_spike_between_samples_counts(tmp_path):
    """A trace's `peak` (allocator peak since the last event) is the measured peak."""
    pred = [(Phase.FORWARD, 4 * GIB), (Phase.BACKWARD, 8 * GIB)]
    tl = hand_made(tmp_path, "tl.jsonl", "timeline", pred)
    tr = hand_made(tmp_path, "tr.jsonl", "trace", pred)
    lines = tr.read_text().splitlines()
    row = json.loads(lines[1])
    row["peak"] = 9 * GIB  # a 9 GiB spike during the forward op, freed before the sample
    tr.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    c = compare(*load_pair(tl, tr))
    peak = c.peaks.iloc[0]
    assert peak["measured_bytes"] == 9 * GIB and peak["measured_phase"] == "forward"
    assert math.isclose(peak["relative_error"], 1 / 8)


def test_alignment_by_ordinal_not_time(tmp_path):
    tl, tr = write_pair(tmp_path, scale=1.0, extra_op_in_layer=1)
    p, m = load_pair(tl, tr)
    a = align(p.events, m.events)
    # every predicted event has a counterpart; the measured extra op in layer 1 has none
    assert len(p.events) == len(a) == len(m.events) - 1
    fwd = a[(a["event"] == "op") & (a["phase"] == "forward") & (a["tier"] == "gpu")]
    assert (fwd["layer_pred" if "layer_pred" in fwd else "layer"].value_counts() == 3).all()
    # within layer 0 the same ops pair (same bytes); t differs (ops vs seconds)
    l0 = fwd[fwd["layer"] == 0]
    assert (l0["allocated_pred"] == l0["allocated_meas"]).all()
    assert l0["t_pred"].tolist() == [3.0, 4.0, 5.0] and l0["t_meas"].tolist() == [0.003, 0.004, 0.005]
    # plotting positions: equal-count groups map 1:1, the 4-op layer spreads over 3 predicted ops
    x = positions_on_predicted(p.events, m.events)
    assert not any(math.isnan(v) for v in x)
    layer1 = m.events[(m.events["layer"] == 1) & (m.events["event"] == "op") & (m.events["phase"] == "forward")]
    assert x[layer1.index].tolist() == [7.0, 7.0, 8.0, 9.0]


def test_compare_synthetic_step_peaks_and_reserved(tmp_path):
    tl, tr = write_pair(tmp_path, scale=1.05)
    c = compare(*load_pair(tl, tr))
    peaks = c.peaks.set_index(["tier", "metric"])
    # GPU peak: 2 GiB weights + 12 x 256 MiB activations + 1 GiB logits, at the loss op
    assert peaks.loc[("gpu", "allocated"), "predicted_bytes"] == 6 * GIB
    assert peaks.loc[("gpu", "allocated"), "predicted_phase"] == "loss"
    assert peaks.loc[("gpu", "allocated"), "measured_bytes"] == 2 * GIB + int(3 * GIB * 1.05) + int(GIB * 1.05)
    assert peaks.loc[("gpu", "reserved"), "predicted_bytes"] == 6 * GIB + 64 * MIB
    assert ("host", "reserved") not in peaks.index  # no caching allocator on the host: reserved == allocated
    assert peaks.loc[("host", "allocated"), "predicted_bytes"] == 3 * GIB + 384 * MIB
    assert c.match_counts() == {"predicted": len(c.predicted_events), "measured": len(c.measured_events),
                                "matched": len(c.predicted_events)}
    parts = components_at_peak(c.predicted_events, c.measured_events, "gpu")
    assert parts.loc["logits"].tolist() == [GIB, int(GIB * 1.05)]
    assert parts.loc["activations", "predicted_bytes"] == 3 * GIB and parts.loc["gradients"].sum() == 0


def test_measured_step_selection(tmp_path):
    tl = tmp_path / "timeline.jsonl"
    tr = tmp_path / "trace.jsonl"
    write_recording(tl, header("timeline"), synthetic_step())
    steps = synthetic_step(seconds=True)
    later = synthetic_step(seconds=True, scale=1.5)
    for e in later:
        e.step = 1
    write_recording(tr, header("trace"), steps + later)
    c = compare(*load_pair(tl, tr), measured_step=1)
    assert set(c.measured_events["step"]) == {0}
    assert c.peaks.set_index(["tier", "metric"]).loc[("gpu", "allocated"), "measured_bytes"] == 2 * GIB + int(
        3 * GIB * 1.5) + int(GIB * 1.5)
    with pytest.raises(ChunkftError, match="has no step 7"):
        compare(*load_pair(tl, tr), measured_step=7)


# -- Perfetto ------------------------------------------------------------------------------

def test_perfetto_export_structure(tmp_path):
    tl, _ = write_pair(tmp_path)
    rec = load_recording(tl)
    trace = to_chrome_trace(rec)
    events = trace["traceEvents"]
    json.dumps(trace)  # serialisable
    counters = [e for e in events if e["ph"] == "C"]
    assert len(counters) == 2 * len(rec.events)
    first_gpu = next(e for e in counters if e["name"] == "gpu memory by component (MiB)")
    assert first_gpu["ts"] == 0 and first_gpu["args"]["weights"] == 2048.0
    # every GPU counter event names every component the GPU ever holds (a missing series would
    # keep its stale value in the viewer)
    gpu_series = {"weights", "gradients", "optimizer", "master", "activations", "logits"}
    assert all(set(e["args"]) == gpu_series for e in counters if e["name"] == "gpu memory by component (MiB)")
    assert first_gpu["args"]["logits"] == 0
    peak = max((e for e in counters if e["name"] == "gpu memory by component (MiB)"),
               key=lambda e: sum(e["args"].values()))
    assert peak["ts"] == 19 and peak["args"]["logits"] == 1024.0 and peak["args"]["activations"] == 3072.0
    spans = [e for e in events if e["ph"] == "X"]
    phases = [(e["name"], e["ts"], e["dur"]) for e in spans if e["cat"] == "phase"]
    assert [p[0] for p in phases] == ["forward", "loss", "backward", "optimizer", "chunk_switch", "optimizer"]
    assert phases[0][1:] == (0, 18)  # 2 phase events + 4 x (layer + 3 ops) before the loss
    layers = [e for e in spans if e["cat"] == "layer"]
    assert [e["name"] for e in layers] == [f"layer {i}" for i in (0, 1, 2, 3, 3, 2, 1, 0)]
    assert all(e["dur"] == 4 for e in layers[:3])
    instants = [e for e in events if e["ph"] == "i"]
    assert [e["cat"] for e in instants].count("transfer") == 4
    assert {e["name"] for e in events if e["ph"] == "M"} == {"process_name", "thread_name"}
    assert all(isinstance(e["ts"], (int, float)) for e in events if e["ph"] != "M")
    # a timeline spread over a predicted step time: the last event lands at the step's end
    spread = to_chrome_trace(rec, step_time_s=0.5)
    assert max(e["ts"] for e in spread["traceEvents"] if e["ph"] == "C") == pytest.approx(0.5e6)


# -- the CLI -------------------------------------------------------------------------------

@pytest.fixture
def main(monkeypatch):
    """planner.cli.main with only this module's subcommands (others may not have landed)."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"compare": "analysis.cli", "report": "analysis.cli"})
    return cli.main


def test_cli_compare_writes_report(tmp_path, capsys, main):
    tl, tr = write_pair(tmp_path)
    out = tmp_path / "report"
    assert main(["compare", str(tl), str(tr), "-o", str(out), "--perfetto", str(tmp_path / "p.json")]) == 0
    for name in ("error_table.png", "errors.png", "memory_gpu.png", "memory_host.png", "chunk_switch.png",
                 "report.md", "report.html", "peaks.csv", "phases.csv"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "src='error_table.png'" not in html
    png = html.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](memory_gpu.png)" in (out / "report.md").read_text()
    peaks = pd.read_csv(out / "peaks.csv")
    assert peaks.loc[0, "predicted_bytes"] == 6 * GIB
    assert "traceEvents" in json.loads((tmp_path / "p.json").read_text())
    assert "gpu allocated peak: predicted 6.00 GiB" in capsys.readouterr().out


def test_cli_compare_bad_input_exits_2(tmp_path, capsys, main):
    tl, tr = write_pair(tmp_path)
    tr.write_text(tr.read_text()[:-40])
    assert main(["compare", str(tl), str(tr), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is truncated" in err and "trace.jsonl" in err
    assert not (tmp_path / "r").exists()


# -- the planning report -------------------------------------------------------------------

def fake_evaluate(shape, strategy):
    """A hand-checkable cost model: 10 GiB fixed, 1 MiB per token (a quarter with
    checkpointing), 8 GiB of optimizer state split over the chunks (only the active one on
    the GPU unless state rests on the GPU), 0.5 GiB of CUDA context; 0.1 s per 1K tokens."""
    from planner.strategy import Estimate, OptimizerDevice

    tokens = shape.seq_len * shape.batch
    act = tokens * MIB // (4 if strategy.checkpointing else 1)
    state = 8 * GIB
    if strategy.optimizer_device == OptimizerDevice.HOST:
        on_gpu, on_host = 0, state
    elif strategy.state_tier == Tier.GPU:
        on_gpu, on_host = state, 0
    else:
        on_gpu, on_host = state // strategy.chunks, state - state // strategy.chunks
    gpu = 10 * GIB + act + on_gpu
    return Estimate(strategy=strategy, peak_bytes={Tier.GPU: gpu, Tier.HOST: on_host},
                    components={Tier.GPU: {Component.WEIGHTS: gpu}, Tier.HOST: {Component.OPTIMIZER: on_host}},
                    reserved_bytes=gpu, step_time_s=0.1 * tokens / 1024 + 0.01 * strategy.chunks,
                    worst_chunk=None, context_bytes=GIB // 2)


def fake_sweep():
    from analysis.sweep import run_sweep
    from planner.strategy import Budget
    from planner.trace import StepShape

    catalogue = pd.DataFrame({"gpu": ["small", "mid", "big"], "memory_bytes": [16 * GIB, 24 * GIB, 80 * GIB]})
    calls = []

    def counting(shape, strategy):
        calls.append((shape, strategy))
        return fake_evaluate(shape, strategy)

    sweep = run_sweep(counting, lambda **kw: StepShape(**kw), model="fake-8b", budget=Budget(gpu_bytes=24 * GIB),
                      gpu_profile="rtx4090", catalogue=catalogue, seq_lens=[1024, 4096, 8192], batches=[1, 2],
                      chunk_counts=[1, 4, 16])
    return sweep, calls


def test_sweep_tables():
    sweep, calls = fake_sweep()
    assert len(calls) == len(set(calls))  # each (shape, strategy) evaluated once
    fm = sweep.fit_map.set_index(["strategy", "seq_len", "batch"])
    assert len(fm) == 4 * 3 * 2
    # full FT: 10 + 8 GiB + 1 MiB/token -> fits at 4K (22 GiB), not at 8K (26 GiB) within 24 GiB
    assert fm.loc[("full FT", 4096, 1), "gpu_need_bytes"] == 22 * GIB and fm.loc[("full FT", 4096, 1), "fits"]
    assert not fm.loc[("full FT", 8192, 1), "fits"] and not fm.loc[("full FT", 4096, 2), "fits"]
    # the fit map's ChunkFT: the fewest swept chunks > 1 that fit at the reference shape (C=4: 13 GiB)
    # with checkpointing at 8K: 10 + 8/4 + 8192 tokens / 4 MiB = 14 GiB, host 6 GiB
    c4 = "ChunkFT C=4, state host, ckpt"
    assert fm.loc[(c4, 8192, 1), "gpu_need_bytes"] == 14 * GIB and fm.loc[(c4, 8192, 1), "host_bytes"] == 6 * GIB
    # reference shape: middle sequence length, smallest batch
    assert (sweep.reference_seq_len, sweep.reference_batch) == (4096, 1)
    cs = sweep.chunk_sweep.set_index(["family", "chunks"])
    assert cs.loc[("ChunkFT, state host", 1), "gpu_need_bytes"] == 22 * GIB
    assert cs.loc[("ChunkFT, state host", 16), "gpu_need_bytes"] == 14 * GIB + GIB // 2
    assert cs.loc[("ChunkFT, state host, ckpt", 4), "step_time_s"] == pytest.approx(0.44)
    sz = sweep.sizing.set_index("strategy")
    # full FT at 4K: 22 GiB + 0.5 GiB context -> not the 16 GiB card
    assert sz.loc["full FT", "card_bytes"] == 22 * GIB + GIB // 2 and sz.loc["full FT", "gpus_that_fit"] == "mid, big"
    nvmsa = "full FT, AdamW on host, state host, 16-bit grads to host, ckpt"
    assert sz.loc[nvmsa, "card_bytes"] == 11 * GIB + GIB // 2 and sz.loc[nvmsa, "gpus_that_fit"] == "small, mid, big"


def test_write_plan_report(tmp_path):
    from analysis.report import write_plan_report

    sweep, _ = fake_sweep()
    html_path, md_path = write_plan_report(sweep, tmp_path / "r")
    assert html_path.read_text().count("data:image/png;base64,") == 3
    for name in ("fit_map.png", "chunk_sweep.png", "sizing.png", "fit_map.csv", "sizing.csv"):
        assert (tmp_path / "r" / name).is_file()
    assert "| full FT | 22.50 GiB |" in md_path.read_text()


def test_default_compares_worst_measured_step(tmp_path):
    tl = tmp_path / "timeline.jsonl"
    tr = tmp_path / "trace.jsonl"
    write_recording(tl, header("timeline"), synthetic_step())
    events = []
    for step, scale in enumerate((1.0, 1.2, 1.1)):
        for e in synthetic_step(seconds=True, scale=scale):
            e.step = step
            events.append(e)
    write_recording(tr, header("trace"), events)
    c = compare(*load_pair(tl, tr))
    assert c.measured_step == 1 and set(c.measured_events["step"]) == {0}
    assert c.match_counts()["matched"] == len(c.predicted_events)


def test_cpu_trace_gets_a_process_row(tmp_path):
    """On a CPU run one heap holds every tier: the trace's gpu rows are held against the
    predicted GPU bytes less CUDA-only rounding/overhead plus the host tier's bytes."""
    tl, tr = tmp_path / "timeline.jsonl", tmp_path / "trace.jsonl"
    events = synthetic_step()
    for e in events:
        if e.tier == Tier.GPU:  # CUDA-only bytes the CPU run does not have
            e.bytes[Component.OVERHEAD] = 100 * MIB
            e.allocated += 100 * MIB
    write_recording(tl, header("timeline"), events)
    write_recording(tr, {**header("trace"), "allocator": "cpu"}, synthetic_step(seconds=True))
    c = compare(*load_pair(tl, tr))
    peaks = c.peaks.set_index(["tier", "metric"])
    assert peaks.loc[("gpu", "allocated"), "predicted_bytes"] == 6 * GIB + 100 * MIB
    row = peaks.loc[("process", "cpu-equivalent")]
    # 6 GiB on the GPU at the loss op (overhead left out) + 3 GiB of host state resting then
    assert row["predicted_bytes"] == 9 * GIB and row["predicted_t"] == 19.0
    assert row["measured_bytes"] == 6 * GIB
    rise = peaks.loc[("process", "rise in step")]
    # predicted: 9 GiB peak - (2 GiB weights + 3 GiB host) at the first event; measured: 6 - 2 GiB
    assert rise["predicted_bytes"] == 4 * GIB and rise["measured_bytes"] == 4 * GIB and rise["relative_error"] == 0
    assert ("gpu", "reserved") not in peaks.index  # the CPU trace has no caching allocator


def test_perfetto_pair_shares_a_time_axis(tmp_path):
    from analysis.perfetto import write_chrome_trace

    tl, tr = write_pair(tmp_path)
    p, m = load_pair(tl, tr)
    p = type(p)(**{**{f: getattr(p, f) for f in p.__slots__}, "header": {**p.header, "step_time_s": 0.045}})
    out = tmp_path / "pair.json"
    write_chrome_trace(p, out, measured=m)
    events = json.loads(out.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {1: "chunkft predicted timeline", 2: "chunkft measured trace"}
    last = {pid: max(e["ts"] for e in events if e["pid"] == pid and e["ph"] == "C") for pid in (1, 2)}
    # the timeline's 45 ops spread over the predicted 0.045 s; the trace's 1 ms per event
    assert last[1] == pytest.approx(45_000) and last[2] == pytest.approx(45_000)


def test_worst_step_ignores_fragments(tmp_path):
    """A step holding no phase event (a lone step_end, a killed run's tail) is not compared."""
    tl = tmp_path / "timeline.jsonl"
    tr = tmp_path / "trace.jsonl"
    write_recording(tl, header("timeline"), synthetic_step())
    events = []
    for step, scale in enumerate((1.0, 1.1)):
        for e in synthetic_step(seconds=True, scale=scale):
            e.step = step
            events.append(e)
    events.append(Event(t=1.0, event=EventKind.STEP_END, tier=Tier.GPU, allocated=GIB, reserved=GIB,
                        peak=99 * GIB, step=2))
    write_recording(tr, header("trace"), events)
    assert compare(*load_pair(tl, tr)).measured_step == 1


@pytest.mark.parametrize("argv, message", [
    (["--seq", "512,-1"], "invalid --seq '512,-1'"),
    (["--batch", "two"], "invalid --batch 'two'"),
    (["--gpu", "24XB"], "invalid --gpu '24XB'"),
])
def test_cli_report_bad_flags_exit_2(tmp_path, capsys, main, argv, message):
    assert main(["report", "llama3-8b", *argv, "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_estimate_cache_file(tmp_path):
    from analysis.sweep import CachedEvaluate
    from planner.strategy import Strategy
    from planner.trace import StepShape

    calls = []

    def counting(shape, strategy):
        calls.append(strategy)
        return fake_evaluate(shape, strategy)

    path = tmp_path / "estimates.json"
    shape, strategy = StepShape(seq_len=1024), Strategy(chunks=4, state_tier=Tier.HOST)
    first = CachedEvaluate(counting, path=path, context="model-a")
    est = first(shape, strategy)
    assert first(shape, strategy) is est and len(calls) == 1
    first.save()
    again = CachedEvaluate(counting, path=path, context="model-a")(shape, strategy)
    assert len(calls) == 1 and again.peak_bytes == est.peak_bytes and again.step_time_s == est.step_time_s
    CachedEvaluate(counting, path=path, context="model-b")(shape, strategy)  # another model: evaluated
    assert len(calls) == 2
    path.write_text("{not json")
    CachedEvaluate(counting, path=path, context="model-a")(shape, strategy)  # unreadable: ignored
    assert len(calls) == 3


def test_chunks_that_fit():
    from analysis.sweep import chunks_that_fit

    family = "ChunkFT, state host, ckpt"
    table = pd.DataFrame({"family": [family] * 4, "chunks": [1, 4, 16, 64], "fits": [True, False, True, True]})
    assert chunks_that_fit(table) == 16  # C = 1 is full FT, not ChunkFT
    assert chunks_that_fit(table.assign(fits=False)) == 64  # nothing fits: the most chunks swept


def test_worst_step_of_the_timelines_chunk(tmp_path):
    """A ChunkFT timeline (header chunk K) is held against the worst step that trained chunk K,
    not against a worse step of another chunk; with no step of chunk K, the worst step."""
    import dataclasses

    tr = tmp_path / "trace.jsonl"
    events = []
    for step, (chunk, scale) in enumerate(((0, 1.0), (1, 1.5), (0, 1.1), (1, 1.4))):
        events += [dataclasses.replace(e, step=step, chunk=chunk) for e in synthetic_step(seconds=True, scale=scale)]
    write_recording(tr, header("trace"), events)
    for chunk, expected in ((0, 2), (1, 1), (7, 1), (None, 1)):
        tl = tmp_path / f"timeline-{chunk}.jsonl"
        write_recording(tl, {**header("timeline"), "chunk": chunk}, synthetic_step())
        assert compare(*load_pair(tl, tr)).measured_step == expected, chunk
