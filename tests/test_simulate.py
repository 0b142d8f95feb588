"""The simulator replays a plan: its GPU peak is the plan's, and a chunk switch moves exactly
the chunk's fp32 master and moments."""

from __future__ import annotations

import json

import pytest

from planner.cli import main
from planner.evaluate import evaluate
from planner.hardware import hardware
from planner.model import resolve_model
from planner.plan import load_plan, make_plan
from planner.recipe import Recipe
from planner.schema import Component, EventKind, Phase, Tier
from planner.simulate import simulate
from planner.solve import Objective
from planner.strategy import Budget, Strategy
from planner.trace import StepShape

MIB = 2**20


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("small-llama")
    LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    return resolve_model(str(path))


SHAPE = StepShape(seq_len=128, batch=2)
HW = hardware("rtx4090")


def plan_for(model, strategy):
    est = evaluate(model, SHAPE, strategy, HW)
    return make_plan(model, SHAPE, HW, Budget(gpu_bytes=2**30), Objective.MEMORY, est)


@pytest.mark.parametrize("strategy", [
    Strategy(),
    Strategy(checkpointing=True, loss_chunk_tokens=64),
    Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=1),
    Strategy(chunks=4, state_tier=Tier.DISK, prefetch_depth=0, checkpointing=True),
    Strategy(chunks=2, optimizer_device="host", state_tier=Tier.HOST, grad_staging=Tier.HOST),
])
def test_simulated_peak_equals_planned_peak(small, strategy):
    plan = plan_for(small, strategy)
    timeline = simulate(plan, small)
    assert timeline.peak_bytes(Tier.GPU) == plan.peak_bytes[Tier.GPU]
    for tier in (Tier.HOST, Tier.DISK):
        assert timeline.peak_bytes(tier) == plan.peak_bytes.get(tier, 0)
    for ev in timeline.events:
        assert ev.allocated == sum(ev.bytes.values())
        assert ev.reserved >= ev.allocated
    h = timeline.header
    assert h["kind"] == "timeline" and h["t_unit"] == "op"
    assert h["model_fingerprint"] == small.fingerprint() and h["plan_fingerprint"] == plan.fingerprint()
    assert h["step_time_s"] == pytest.approx(plan.step_time_s)


def test_scope_says_what_the_events_cover(small):
    assert simulate(plan_for(small, Strategy()), small).scope() == "one full fine-tuning step"
    chunked = plan_for(small, Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=1))
    assert simulate(chunked, small).scope() == f"one step of chunk {chunked.worst_chunk} and one chunk switch"


def test_step_events_mark_phases_and_layers(small):
    timeline = simulate(plan_for(small, Strategy(checkpointing=True)), small)
    gpu = [e for e in timeline.events if e.tier == Tier.GPU]
    phases = [e.phase for e in gpu if e.event == EventKind.PHASE]
    assert phases[:2] == [Phase.FORWARD, Phase.LOSS] or phases[0] == Phase.FORWARD
    assert Phase.BACKWARD in phases and Phase.RECOMPUTE in phases
    fwd_layers = [e.layer for e in gpu if e.event == EventKind.LAYER and e.phase == Phase.FORWARD]
    assert fwd_layers == [0, 1, 2]
    ops = [e for e in gpu if e.event == EventKind.OP]
    assert [e.t for e in ops] == sorted(e.t for e in ops)
    assert gpu[-1].event == EventKind.STEP_END
    assert any(e.event == EventKind.OPTIMIZER_STEP for e in gpu)


def test_chunk_switch_moves_the_chunks_state(small):
    plan = plan_for(small, Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=0))
    timeline = simulate(plan, small)
    events = list(timeline.events)
    i = next(i for i, e in enumerate(events) if e.event == EventKind.CHUNK_SWITCH)
    switch, evict, fetch = events[i:i + 3]
    k = plan.worst_chunk
    state = lambda j: plan.chunk_table.chunk_bytes(j) // 2 * 12  # fp32 master + 2 moments per bf16 param
    assert evict.event == fetch.event == EventKind.TRANSFER
    assert evict.name == f"evict chunk {k} master+moments gpu->host {state(k)} B"
    assert switch.allocated - evict.allocated == state(k)
    assert fetch.allocated - evict.allocated == state((k + 1) % 3)
    assert evict.bytes.get(Component.MASTER, 0) == switch.bytes[Component.MASTER] - state(k) // 3


def test_switch_drops_gradients_and_prefetches_beyond_the_next_chunk(small):
    """ChunkAdamW.step: zero_grad, evict chunk k, activate k + 1 (prefetched) and load k + 2."""
    plan = plan_for(small, Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=1))
    events = list(simulate(plan, small).events)
    i = next(i for i, e in enumerate(events) if e.event == EventKind.CHUNK_SWITCH)
    end = next(e for e in events if e.event == EventKind.STEP_END and e.tier == Tier.GPU)
    switch, evict, fetch = events[i:i + 3]
    assert Component.GRADIENTS not in switch.bytes
    assert end.allocated - switch.allocated == end.bytes[Component.GRADIENTS] > 0
    k = plan.worst_chunk
    state = lambda j: plan.chunk_table.chunk_bytes(j) // 2 * 12
    assert fetch.name == f"prefetch chunk {(k + 2) % 3} master+moments host->gpu {state((k + 2) % 3)} B"
    assert fetch.allocated - evict.allocated == state((k + 2) % 3)


def test_fp32_switch_moves_master_too(small):
    """runtime.chunk_optim keeps an fp32 master apart from fp32 weights: 12 B per parameter."""
    est = evaluate(small, StepShape(seq_len=128, batch=2, dtype="fp32"),
                   Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=0), HW)
    plan = make_plan(small, StepShape(seq_len=128, batch=2, dtype="fp32"), HW, Budget(gpu_bytes=2**30),
                     Objective.MEMORY, est)
    events = list(simulate(plan, small).events)
    i = next(i for i, e in enumerate(events) if e.event == EventKind.CHUNK_SWITCH)
    switch, evict = events[i:i + 2]
    k = plan.worst_chunk
    state = plan.chunk_table.chunk_bytes(k) // 4 * 12
    assert switch.allocated - evict.allocated == state
    assert switch.bytes[Component.MASTER] - evict.bytes.get(Component.MASTER, 0) == state // 3


def test_cli_plan_then_simulate(small, tmp_path, capsys):
    plan_path, tl_path = tmp_path / "plan.json", tmp_path / "tl.jsonl"
    code = main(["plan", small.name, "--gpu", "200MiB", "--seq", "128", "--batch", "2", "--max-chunks", "4",
                 "-o", str(plan_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "objective fit every tier, then shortest predicted step time" in out  # speed, the default
    plan = load_plan(plan_path, model=small)
    assert plan.peak_bytes[Tier.GPU] <= plan.reserved_bytes <= 200 * MIB
    assert main(["simulate", str(plan_path), "-o", str(tl_path)]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in tl_path.read_text().splitlines()]
    assert rows[0]["event"] == "header" and rows[0]["plan_fingerprint"] == plan.fingerprint()
    assert max(r["allocated"] for r in rows[1:] if r["tier"] == "gpu") == plan.peak_bytes[Tier.GPU]
    assert "plan predicted" in out


def test_cli_simulate_refuses_another_model(small, tmp_path, capsys):
    from transformers import LlamaConfig

    plan_path = tmp_path / "plan.json"
    from planner.plan import save_plan

    save_plan(plan_for(small, Strategy()), plan_path)
    other = tmp_path / "other"
    LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(other)
    assert main(["simulate", str(plan_path), "--model", str(other), "-o", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the plan was made for model" in err
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("strategy", [
    Strategy(recipe=Recipe(offload_activations=True)),
    Strategy(chunks=3, state_tier=Tier.HOST, recipe=Recipe(offload_activations=True)),
])
def test_host_line_follows_the_offloaded_activations(small, strategy, tmp_path):
    """--offload-activations: the host tier starts the step with its resting bytes, gains each
    saved activation as forward offloads it and loses it as backward uses it, op by op; its
    peak is the plan's host peak, at the end of forward."""
    from analysis.compare import cpu_equivalent
    from analysis.load import load_recording

    plan = plan_for(small, strategy)
    timeline = simulate(plan, small)
    host = [e for e in timeline.events if e.tier == Tier.HOST]
    offloaded = plan.components[Tier.HOST][Component.ACTIVATIONS]
    assert host[0].event == EventKind.PHASE and host[0].t == 0
    assert host[0].bytes.get(Component.ACTIVATIONS, 0) == 0
    assert host[0].allocated == plan.peak_bytes[Tier.HOST] - offloaded - (
        plan.components[Tier.HOST].get(Component.ROUNDING, 0) - host[0].bytes.get(Component.ROUNDING, 0))
    ops = [e for e in host if e.event == EventKind.OP]
    assert len(ops) > 10 and timeline.peak_bytes(Tier.HOST) == plan.peak_bytes[Tier.HOST]
    top = max(ops, key=lambda e: e.allocated)
    assert top.bytes[Component.ACTIVATIONS] == offloaded and top.phase in (Phase.FORWARD, Phase.LOSS)
    assert host[-1].event == EventKind.STEP_END and host[-1].bytes.get(Component.ACTIVATIONS, 0) == 0
    # a CPU run holds device and host bytes in one heap: the offloaded bytes rise within the step
    timeline.write(tmp_path / "timeline.jsonl")
    eq = cpu_equivalent(load_recording(tmp_path / "timeline.jsonl").events)
    assert int(eq["peak"].max()) - int(eq["peak"].iloc[0]) > offloaded


def test_simulate_picks_the_chunk(small):
    """--chunk K: the step of chunk K (the worst chunk by default, whose peaks are the plan's)."""
    from planner.errors import ChunkftError

    plan = plan_for(small, Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=0))
    default = simulate(plan, small)
    assert default.header["chunk"] == plan.worst_chunk
    assert simulate(plan, small, chunk=plan.worst_chunk).events == default.events
    peaks = {}
    for k in range(3):
        timeline = simulate(plan, small, chunk=k)
        assert timeline.header["chunk"] == k and timeline.scope() == f"one step of chunk {k} and one chunk switch"
        assert all(e.chunk in (k, None) for e in timeline.events if e.event == EventKind.OP)
        peaks[k] = timeline.peak_bytes(Tier.GPU)
    assert len(set(peaks.values())) > 1 and peaks[plan.worst_chunk] == plan.peak_bytes[Tier.GPU]
    for bad in (3, -1, True):
        with pytest.raises(ChunkftError, match="0..2"):
            simulate(plan, small, chunk=bad)
    with pytest.raises(ChunkftError, match="one chunk"):
        simulate(plan_for(small, Strategy()), small, chunk=0)


def test_a_chunk_that_allocates_more_than_the_worst_chunk_is_named(tmp_path):
    """The worst chunk is the one that needs the most (least memory its allocator needs); another
    chunk can allocate more at its peak. examples/tiny, fp32, C=4 with state on host and
    checkpointing: chunk 3 allocates 54.12 MiB where the worst, chunk 1, allocates 53.18 MiB.
    The estimate and the plan name chunk 3 and its peak, which is the peak of chunk 3's own
    simulated step; simulating the plan's worst chunk still gives the plan's GPU peak."""
    from pathlib import Path

    model = resolve_model(str(Path(__file__).resolve().parents[1] / "examples" / "tiny"))
    shape = StepShape(seq_len=256, batch=2, dtype="fp32")
    strategy = Strategy(chunks=4, state_tier=Tier.HOST, checkpointing=True, prefetch_depth=1)
    est = evaluate(model, shape, strategy, HW)
    assert est.highest_peak is not None
    chunk, nbytes = est.highest_peak
    assert chunk != est.worst_chunk and nbytes > est.peak_bytes[Tier.GPU]
    plan = make_plan(model, shape, HW, Budget(gpu_bytes=2**30), Objective.MEMORY, est)
    path = tmp_path / "plan.json"
    from planner.plan import save_plan

    save_plan(plan, path)
    loaded = load_plan(path)
    assert loaded.highest_peak == (chunk, nbytes) and loaded.estimate().highest_peak == (chunk, nbytes)
    assert simulate(loaded, model, chunk=chunk).peak_bytes(Tier.GPU) == nbytes
    assert simulate(loaded, model).peak_bytes(Tier.GPU) == plan.peak_bytes[Tier.GPU]
    # C = 1 has no other chunk
    assert evaluate(model, shape, Strategy(checkpointing=True), HW).highest_peak is None
