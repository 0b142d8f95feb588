"""Plans for several GPUs: the solver over planner.sharding, the plan file's "parallel" section,
and `chunkft plan --gpus-per-node`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from planner.cli import main
from planner.errors import ChunkftError
from planner.hardware import hardware, load_node
from planner.parallel import (ParallelLayout, extra_chunk_counts, node_budget, per_rank_budget, runs_sharded,
                              solve_layouts, solve_parallel)
from planner.plan import load_plan, make_plan, save_plan
from planner.schema import Tier
from planner.sharding import evaluate_sharded
from planner.solve import Objective, default_space
from planner.strategy import Budget, OptimizerDevice, Strategy
from planner.trace import StepShape
from tests.test_plan import tiny_config

SHAPE = StepShape(batch=1, seq_len=64, dtype="bf16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("tiny"), hidden=256, layers=2)  # big enough that chunks matter


def test_layout_json_round_trip_and_refusals():
    layout = ParallelLayout(gpus_per_node=4, nodes=2, shard_embeddings=True)
    assert layout.world_size == 8
    assert ParallelLayout.from_json(layout.to_json()) == layout
    for bad, text in (({"gpus_per_node": 0}, "gpus_per_node 0"), ({"gpus_per_node": 2, "nodes": "2"}, "nodes '2'"),
                      ({"gpus_per_node": 2, "ranks": 2}, "unknown field 'ranks'"), ({}, "missing field")):
        with pytest.raises(ChunkftError, match=text):
            ParallelLayout.from_json(bad)


def test_per_rank_budget_shares_host_and_disk_out_per_node():
    budget = Budget(gpu_bytes=80 * 2**30, host_bytes=1000, disk_bytes=None)
    rank = per_rank_budget(budget, ParallelLayout(gpus_per_node=4, nodes=3))
    assert rank == Budget(gpu_bytes=80 * 2**30, host_bytes=250, disk_bytes=None)


def test_solver_picks_the_fewest_chunks_that_fit_each_rank(tiny):
    hw = hardware("h100")
    layout = ParallelLayout(gpus_per_node=2)
    space = default_space(num_layers=tiny.num_layers, tokens=64, max_chunks=4)
    # a GPU budget just under every full FT strategy's per-rank need: full FT must be refused
    full = min(evaluate_sharded(tiny, SHAPE, s, hw, gpus_per_node=2).need_bytes(Tier.GPU)
               for s in space.strategies() if s.chunks == 1 and runs_sharded(s))
    budget = Budget(gpu_bytes=full - 1)
    solution, sharded = solve_parallel(tiny, SHAPE, hw, budget, layout, space=space, objective=Objective.FIDELITY)
    assert solution.fits and all(runs_sharded(e.strategy) for e in solution.estimates)
    best = solution.best
    assert best.strategy.chunks > 1
    assert best.need_bytes(Tier.GPU) <= budget.gpu_bytes
    # the estimate is the sharded one of the same strategy, per rank
    again = evaluate_sharded(tiny, SHAPE, best.strategy, hw, gpus_per_node=2)
    assert best.peak_bytes == again.peak_bytes and best.reserved_bytes == again.reserved_bytes
    assert sharded[best.strategy].all_gather_bytes == again.all_gather_bytes
    # nothing with fewer chunks fits
    assert all(not e.fits(budget) for e in solution.estimates if e.strategy.chunks < best.strategy.chunks)


def test_parallel_plan_round_trip(tiny, tmp_path):
    hw = hardware("h800")
    layout = ParallelLayout(gpus_per_node=2, shard_embeddings=True)
    strategy = Strategy(chunks=3, state_tier=Tier.HOST, checkpointing=True)
    est = evaluate_sharded(tiny, SHAPE, strategy, hw, gpus_per_node=2, shard_embeddings=True)
    from planner.parallel import as_estimate

    plan = make_plan(tiny, SHAPE, hw, Budget(gpu_bytes=2**30), Objective.MEMORY, as_estimate(est),
                     parallel=layout, sharded=est)
    save_plan(plan, tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json", model=tiny)
    assert loaded == plan and loaded.world_size == 2
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["parallel"]["gpus_per_node"] == 2 and data["parallel"]["shard_embeddings"] is True
    assert data["parallel"]["all_gather_bytes"] == est.all_gather_bytes
    assert data["parallel"]["all_reduce_bytes"] == est.all_reduce_bytes > 0  # C=3 slices tensors
    assert data["predicted"]["peak_bytes"]["gpu"] == est.peak_bytes[Tier.GPU]
    # a strategy that does not run sharded cannot carry a parallel section
    data["strategy"]["optimizer_device"] = OptimizerDevice.HOST.value
    data["strategy"]["state_tier"] = "host"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ChunkftError, match="does not run sharded"):
        load_plan(tmp_path / "bad.json")


def test_one_gpu_plan_has_no_parallel_section(tiny, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", tiny.name, "--seq", "64", "--gpu", "1GiB", "--max-chunks", "2", "-o", str(out)]) == 0
    assert "parallel" not in json.loads(out.read_text())
    assert load_plan(out).world_size == 1


def test_cli_writes_a_parallel_plan(tiny, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", tiny.name, "--seq", "64", "--gpu-kind", "h100", "--gpus-per-node", "2", "--max-chunks", "2",
               "--host-ram", "64GiB", "--no-shard-embeddings", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    plan = load_plan(out)
    assert plan.parallel == ParallelLayout(gpus_per_node=2)
    assert plan.budget.host_bytes == 64 * 2**30  # the node's budget is what the plan records
    assert plan.budget.disk_bytes == load_node("dgx-h100").disk_bytes  # the H100's node's NVMe, by default
    assert "node      dgx-h100: 8 x h100-80gb, 2.00 TiB host RAM, 27.94 TiB NVMe" in text
    assert "2 per node x 1 node" in text and "figures below are per GPU" in text
    assert "per rank: GPU" in text and "host RAM 32.00 GiB" in text
    est = evaluate_sharded(tiny, plan.shape, plan.strategy, plan.hardware, gpus_per_node=2)
    assert plan.peak_bytes[Tier.GPU] == est.peak_bytes[Tier.GPU]
    assert plan.communication["comm_time_s"] == pytest.approx(est.comm_time_s)
    assert plan.chunk_traces == "auto"


def test_the_plan_records_its_chunk_trace_mode(tiny, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", tiny.name, "--seq", "64", "--gpu-kind", "h100", "--gpus-per-node", "2", "--chunks", "3",
                 "--chunk-traces", "bound", "-o", str(out)]) == 0
    plan = load_plan(out)
    assert plan.chunk_traces == "bound"
    est = evaluate_sharded(tiny, plan.shape, plan.strategy, plan.hardware, gpus_per_node=2, chunk_traces="bound")
    assert plan.reserved_bytes == est.reserved_bytes
    data = json.loads(out.read_text())
    data["parallel"]["chunk_traces"] = "guess"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ChunkftError, match="'parallel.chunk_traces' has 'guess'; valid values are: auto, exact, bound"):
        load_plan(tmp_path / "bad.json")


@pytest.mark.parametrize("args, text", [
    (["--gpus-per-node", "0"], "invalid --gpus-per-node 0"),
    (["--nodes", "0"], "invalid --nodes 0"),
    (["--shard-embeddings"], "--shard-embeddings needs several GPUs"),
    (["--gpus-per-node", "2", "--optimizer", "host"], "no strategy in the space runs sharded"),
    (["--gpus-per-node", "2", "--node", "rtx4090-workstation"],
     "invalid --gpus-per-node 2: node rtx4090-workstation has 1 GPU"),
    (["--node", "dgx-h100", "--gpu-kind", "l4"], "--gpu-kind l4 is not node dgx-h100's GPU (h100-80gb)"),
    (["--gpus-per-node", "2", "--node", "dgx-h900"], "unknown node 'dgx-h900'; known nodes: "),
])
def test_cli_refuses_bad_parallel_flags(tiny, tmp_path, capsys, args, text):
    rc = main(["plan", tiny.name, "--seq", "64", "-o", str(tmp_path / "p.json"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and text in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


def test_chunk_counts_past_the_space_and_node_budgets():
    assert extra_chunk_counts((1, 2, 4)) == (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert extra_chunk_counts((1, 5, 256)) == (512, 1024, 2048, 4096)
    assert extra_chunk_counts((1,)) == () and extra_chunk_counts((4096,)) == ()
    node = load_node("dgx-h800")
    assert node_budget(node, 80 * 2**30) == Budget(gpu_bytes=80 * 2**30, host_bytes=2 * 2**40,
                                                    disk_bytes=8 * 3_840_000_000_000)
    assert node_budget(node, 1, host_bytes=256 * 2**30).host_bytes == 256 * 2**30
    # a per-rank share of a tiny budget stays a valid (positive) budget
    assert per_rank_budget(Budget(gpu_bytes=1, host_bytes=1), ParallelLayout(gpus_per_node=8)).host_bytes == 1


def test_a_sharded_plan_tries_chunk_counts_past_the_space():
    """A GPU budget under every strategy of a space up to C=2 but over C=4's: the plan is
    infeasible without the extension and fits with it, at the first count that does."""
    from transformers import LlamaConfig

    from planner.model import ModelSpec

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False)
    tiny = ModelSpec(name="small-llama", source="config", config=config, num_layers=4)  # 27M parameters
    hw = hardware("h100")
    layout = ParallelLayout(gpus_per_node=2)
    space = default_space(num_layers=tiny.num_layers, tokens=64, max_chunks=2)
    def least(counts):
        return min(evaluate_sharded(tiny, SHAPE, s, hw, gpus_per_node=2).need_bytes(Tier.GPU)
                   for c in counts for s in dataclasses.replace(space, chunk_counts=(c,)).strategies()
                   if runs_sharded(s))
    small, four = least((1, 2)), least((4,))
    assert four < small
    budget = Budget(gpu_bytes=(small + four) // 2)
    plain, _ = solve_parallel(tiny, SHAPE, hw, budget, layout, space=space, extend_chunks=False)
    assert not plain.fits and Tier.GPU in plain.missing_bytes
    extended, sharded = solve_parallel(tiny, SHAPE, hw, budget, layout, space=space)
    assert extended.fits and extended.best.strategy.chunks == 4
    assert sharded[extended.best.strategy].need_bytes(Tier.GPU) <= budget.gpu_bytes


def test_disk_tier_when_the_node_lacks_host_ram(tiny, tmp_path):
    """Host RAM under every rank's state: the plan rests it on disk per rank (its host RAM is the
    staging buffers); both FSDP layouts searched, the plan file records the one that won."""
    hw = hardware("h100")
    space = dataclasses.replace(default_space(num_layers=tiny.num_layers, tokens=64, max_chunks=4),
                                chunk_counts=(2, 4), state_tiers=(Tier.HOST, Tier.DISK))
    layouts = [ParallelLayout(gpus_per_node=2), ParallelLayout(gpus_per_node=2, shard_embeddings=True)]
    roomy, _, _ = solve_layouts(tiny, SHAPE, hw, Budget(gpu_bytes=2**40), layouts, space=space)
    host_state = min(evaluate_sharded(tiny, SHAPE, s, hw, gpus_per_node=2).node_host_bytes
                     for s in space.strategies() if runs_sharded(s) and s.state_tier == Tier.HOST)
    budget = Budget(gpu_bytes=2**40, host_bytes=host_state - 1)
    solution, sharded, layout = solve_layouts(tiny, SHAPE, hw, budget, layouts, space=space)
    assert roomy.fits and roomy.best.strategy.state_tier == Tier.HOST  # host RAM to spare: the host tier
    assert solution.fits and solution.best.strategy.state_tier == Tier.DISK
    est = sharded[solution.best.strategy]
    assert est.node_host_bytes < host_state and est.node_disk_bytes > 0
    plan = make_plan(tiny, SHAPE, hw, budget, Objective.SPEED, solution.best, parallel=layout, sharded=est)
    save_plan(plan, tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json")
    assert again.strategy.state_tier == Tier.DISK and again.parallel == layout
    assert again.peak_bytes[Tier.DISK] == est.peak_bytes[Tier.DISK]
