"""`chunkft simulate` of a parallel (FSDP2) plan: one rank's timeline whose GPU peak and reserved
maximum are the plan's per-rank predictions, and whose chunk switch moves that rank's slices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from planner.cli import main
from planner.errors import ChunkftError
from planner.hardware import hardware
from planner.parallel import ParallelLayout, as_estimate
from planner.plan import load_plan, make_plan
from planner.schema import Component, EventKind, Phase, Tier
from planner.sharding import evaluate_sharded, rank_step
from planner.simulate import simulate
from planner.solve import Objective
from planner.strategy import Budget, Strategy
from planner.trace import StepShape
from tests.test_sharding import tiny

SHAPE = StepShape(batch=1, seq_len=64, dtype="bf16")
HW = hardware("h100-80gb")
STRATEGIES = [
    Strategy(),
    Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=1),
    Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=0, checkpointing=True),
    Strategy(chunks=3, state_tier=Tier.GPU, loss_chunk_tokens=32),
]


@pytest.fixture(scope="module")
def model():
    return tiny()


def parallel_plan(model, strategy, shard_embeddings, chunk_traces="auto"):
    est = evaluate_sharded(model, SHAPE, strategy, HW, gpus_per_node=2, shard_embeddings=shard_embeddings,
                           chunk_traces=chunk_traces)
    layout = ParallelLayout(gpus_per_node=2, shard_embeddings=shard_embeddings)
    plan = make_plan(model, SHAPE, HW, Budget(gpu_bytes=2**30), Objective.MEMORY, as_estimate(est),
                     parallel=layout, sharded=est)
    return plan, est


def test_the_c3_table_slices_tensors(model):
    from planner.evaluate import chunk_table

    table = chunk_table(model, "bf16", 3)
    assert any(not table.is_whole(s) for chunk in table.chunks for s in chunk)


@pytest.mark.parametrize("shard_embeddings", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.label())
def test_rank_timeline_peak_and_reserved_are_the_plans(model, strategy, shard_embeddings):
    plan, est = parallel_plan(model, strategy, shard_embeddings)
    timeline = simulate(plan, model)
    gpu = [e for e in timeline.events if e.tier == Tier.GPU]
    assert timeline.peak_bytes(Tier.GPU) == plan.peak_bytes[Tier.GPU] == est.peak_bytes[Tier.GPU]
    assert max(e.reserved for e in gpu) == plan.reserved_bytes
    for ev in timeline.events:
        assert ev.allocated == sum(ev.bytes.values()) and ev.reserved >= ev.allocated
    h = timeline.header
    assert h["parallel"] == {"gpus_per_node": 2, "nodes": 1, "shard_embeddings": shard_embeddings,
                             "rank": est.worst_rank}
    assert h["chunk"] == est.worst_chunk and h["plan_fingerprint"] == plan.fingerprint()
    assert h["step_time_s"] == pytest.approx(plan.step_time_s)
    # one OP event per traced op of the rank's step, then the optimizer step and the step end
    step = rank_step(model, SHAPE, strategy, HW, gpus_per_node=2, shard_embeddings=shard_embeddings)
    ops = [e for e in gpu if e.event == EventKind.OP]
    assert len(ops) == step.live.shape[1]
    assert [e.event for e in gpu if e.event in (EventKind.OPTIMIZER_STEP, EventKind.STEP_END)] == \
        [EventKind.OPTIMIZER_STEP, EventKind.STEP_END]
    # the peak's components are the plan's
    top = max(gpu, key=lambda e: e.allocated)
    assert top.bytes == plan.components[Tier.GPU]
    # host: the rank's own bytes (HOST tier: its slices of every chunk), never above the fullest rank's
    host = timeline.peak_bytes(Tier.HOST)
    assert host == sum(step.host.values()) <= plan.peak_bytes.get(Tier.HOST, 0)
    assert (host > 0) == (strategy.state_tier == Tier.HOST and strategy.chunks > 1)


def test_rank_step_is_what_evaluate_sharded_maximises(model):
    """Over every (chunk, rank), the largest (reserved, peak) is evaluate_sharded's report."""
    strategy = Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=1)
    est = evaluate_sharded(model, SHAPE, strategy, HW, gpus_per_node=2, shard_embeddings=True)
    keyed = []
    for k in range(3):
        for r in range(2):
            step = rank_step(model, SHAPE, strategy, HW, gpus_per_node=2, shard_embeddings=True, chunk=k, rank=r)
            keyed.append((step.reserved_bytes(), step.peak()[0], k, r))
    res, peak, k, r = max(keyed, key=lambda x: (x[0], x[1], -x[2], -x[3]))
    assert (res, peak, k, r) == (est.reserved_bytes, est.peak_bytes[Tier.GPU], est.worst_chunk, est.worst_rank)
    assert len({x[:2] for x in keyed}) > 1  # the chunks and ranks differ


def test_explicit_rank_and_bad_arguments(model):
    strategy = Strategy(chunks=3, state_tier=Tier.HOST)
    one = rank_step(model, SHAPE, strategy, HW, gpus_per_node=2, chunk=0, rank=0)
    other = rank_step(model, SHAPE, strategy, HW, gpus_per_node=2, chunk=0, rank=1)
    assert np.array_equal(one.live, other.live) and one.static != other.static  # same trace part, own slices
    with pytest.raises(ChunkftError, match="chunk 3 does not exist; valid chunks are 0..2"):
        rank_step(model, SHAPE, strategy, HW, gpus_per_node=2, chunk=3, rank=0)
    with pytest.raises(ChunkftError, match="rank 2 does not exist; valid ranks are 0..1"):
        rank_step(model, SHAPE, strategy, HW, gpus_per_node=2, chunk=0, rank=2)
    with pytest.raises(ChunkftError, match="2 or more"):
        rank_step(model, SHAPE, strategy, HW, gpus_per_node=1, chunk=0, rank=0)


def test_bound_plan_simulated_in_bound_mode(model):
    strategy = Strategy(chunks=3, state_tier=Tier.HOST)
    plan, _ = parallel_plan(model, strategy, False, chunk_traces="bound")
    timeline = simulate(plan, model, chunk_traces="bound")
    assert timeline.peak_bytes(Tier.GPU) == plan.peak_bytes[Tier.GPU]
    assert max(e.reserved for e in timeline.events if e.tier == Tier.GPU) == plan.reserved_bytes


def _local_params(model, chunk_spans, rank, world):
    """Parameters of the spans inside `rank`'s dim-0 shard, by runtime.sharded_optim.local_span."""
    from planner.evaluate import param_layout
    from runtime.sharded_optim import local_span

    shapes = {n: s for n, s, _ in param_layout(model, "bf16").named_shapes}
    total = 0
    for span in chunk_spans:
        shape = shapes[span.param]
        per = -(-shape[0] // world)
        offset = min(rank * per, shape[0])
        rows = min(per, shape[0] - offset)
        ls = local_span(span, offset, rows)
        if span.dim == 0:
            total += ls.length * math.prod(shape[1:])
        else:
            total += ls.length * rows
    return total


@pytest.mark.parametrize("prefetch", [0, 1])
def test_chunk_switch_moves_the_ranks_slices(model, prefetch):
    plan, est = parallel_plan(model, Strategy(chunks=3, state_tier=Tier.HOST, prefetch_depth=prefetch), False)
    events = list(simulate(plan, model).events)
    i = next(i for i, e in enumerate(events) if e.event == EventKind.CHUNK_SWITCH)
    switch, evict, fetch = events[i], events[i + 1], events[i + 2]
    end = next(e for e in events if e.event == EventKind.STEP_END and e.tier == Tier.GPU)
    assert len(events) == i + 3 and all(e.tier == Tier.GPU for e in (switch, evict, fetch))
    assert switch.phase == evict.phase == fetch.phase == Phase.CHUNK_SWITCH
    # ShardedChunkAdamW.step drops the gradients before it switches
    assert Component.GRADIENTS not in switch.bytes
    assert end.allocated - switch.allocated == end.bytes[Component.GRADIENTS]
    k, r = est.worst_chunk, est.worst_rank
    nxt = (k + 1 + prefetch) % 3  # prefetching: chunk k + 1 is on the GPU already, k + 2 is loaded

    def state(j):  # fp32 master + exp_avg + exp_avg_sq of this rank's slices
        return 12 * _local_params(model, plan.chunk_table.chunks[j], r, 2)

    def fp32_state(e):
        return e.bytes.get(Component.MASTER, 0) + e.bytes.get(Component.OPTIMIZER, 0)

    assert evict.name == f"evict chunk {k} master+moments gpu->host {state(k)} B"
    assert fp32_state(switch) - fp32_state(evict) == state(k)
    assert fetch.name == f"{'prefetch' if prefetch else 'fetch'} chunk {nxt} master+moments host->gpu {state(nxt)} B"
    assert fp32_state(fetch) - fp32_state(evict) == state(nxt)


def test_gpu_tier_switch_moves_nothing(model):
    plan, _ = parallel_plan(model, Strategy(chunks=3, state_tier=Tier.GPU), True)
    events = list(simulate(plan, model).events)
    assert events[-1].event == EventKind.CHUNK_SWITCH
    assert not any(e.event == EventKind.TRANSFER for e in events)


def test_cli_parallel_plan_then_simulate(model, tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False).save_pretrained(tmp_path / "m")
    plan_path, tl_path = tmp_path / "plan.json", tmp_path / "tl.jsonl"
    rc = main(["plan", str(tmp_path / "m"), "--seq", "64", "--gpu-kind", "h100", "--gpus-per-node", "2",
               "--shard-embeddings", "--chunks", "3", "--state", "host", "-o", str(plan_path)])
    assert rc == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["simulate", str(plan_path), "-o", str(tl_path)]) == 0
    out = capsys.readouterr().out
    plan = load_plan(plan_path)
    rows = [json.loads(line) for line in tl_path.read_text().splitlines()]
    header, gpu = rows[0], [r for r in rows[1:] if r["tier"] == "gpu"]
    assert header["parallel"]["gpus_per_node"] == 2 and header["parallel"]["shard_embeddings"] is True
    assert max(r["allocated"] for r in gpu) == plan.peak_bytes[Tier.GPU]
    assert max(r["reserved"] for r in gpu) == plan.reserved_bytes
    assert "2 per node x 1 node" in out and f"rank {header['parallel']['rank']}'s" in out
    assert any(r["event"] == "chunk_switch" for r in rows[1:])
