"""Sizing: the per-family minimum and the catalogue GPUs that suffice (card, and the host RAM and
disk of the GPU's node) on hand-made estimates (hand-solved); the sharded GPU counts against
planner.sharding on a small traced model (the count fits, one fewer does not; a node's host RAM
and disk; what is missing per tier), Llama 3-70B, and the CLI."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import LlamaConfig

from planner.errors import ChunkftError
from planner.hardware import hardware, load_gpu, load_node
from planner.model import ModelSpec
from planner.schema import Component, Tier
from planner.sharding import evaluate_sharded
from planner.size import sharded_candidates, sharded_space, size_estimates, size_sharded
from planner.solve import SearchSpace
from planner.strategy import Estimate, Strategy
from planner.trace import StepShape

GIB = 2**30
CONTEXT = GIB // 2


def est(strategy, gpu: dict[Component, int], host=0, disk=0, reserved_extra=0) -> Estimate:
    peak = sum(gpu.values())
    return Estimate(strategy=strategy, peak_bytes={Tier.GPU: peak, Tier.HOST: host, Tier.DISK: disk},
                    components={Tier.GPU: gpu, Tier.HOST: {}, Tier.DISK: {}},
                    reserved_bytes=peak + reserved_extra, step_time_s=1.0, worst_chunk=None,
                    context_bytes=CONTEXT)


# A 70B-like job in round numbers: 100 GiB of weights, resident.
CHUNKED = est(Strategy(chunks=64, state_tier=Tier.HOST, checkpointing=True),
              {Component.WEIGHTS: 100 * GIB, Component.GRADIENTS: 1 * GIB, Component.OPTIMIZER: 2 * GIB,
               Component.ACTIVATIONS: 3 * GIB}, host=600 * GIB, reserved_extra=GIB)
FULL = est(Strategy(), {Component.WEIGHTS: 100 * GIB, Component.GRADIENTS: 100 * GIB,
                        Component.MASTER: 200 * GIB, Component.OPTIMIZER: 400 * GIB,
                        Component.ACTIVATIONS: 20 * GIB})
STREAMED = est(Strategy(chunks=64, optimizer_device="host", state_tier=Tier.HOST, grad_staging=Tier.HOST,
                        checkpointing=True, weights="stream"), {Component.WEIGHTS: 4 * GIB,
                                                                Component.ACTIVATIONS: 6 * GIB}, host=900 * GIB)


def test_size_report_by_hand():
    report = size_estimates([CHUNKED, FULL, STREAMED], model_name="toy", shape=StepShape())
    fam = {f.family: f for f in report.families}
    assert fam["ChunkFT, state on host"].gpu_bytes == 107 * GIB + CONTEXT
    assert fam["ChunkFT, state on host"].gpus == ("h200-141gb",)  # 107.5 GiB: only 139.81 GiB holds it
    assert fam["full FT, AdamW on GPU"].estimate is FULL
    streamed = fam["any, decoder layers streamed from host"]
    assert streamed.gpu_bytes == 10 * GIB + CONTEXT and streamed.host_bytes == 900 * GIB
    # 900 GiB of host RAM: a DGX's 2 TiB holds it, an RTX 4090 workstation's 128 GiB and a
    # g2-standard-96's 384 GiB do not
    assert streamed.gpus == ("a100-40gb", "h100-80gb", "h800-80gb", "a100-80gb", "h200-141gb")
    assert report.single_gpus == ("h200-141gb",)
    assert report.sharded == ()  # the sharded answer needs a model to trace: size_sharded
    # the card alone (no node), or one node for every kind
    cards = size_estimates([CHUNKED, FULL, STREAMED], model_name="toy", shape=StepShape(), nodes=False)
    assert "rtx4090" in {f.family: f for f in cards.families}["any, decoder layers streamed from host"].gpus
    small = size_estimates([CHUNKED], model_name="toy", shape=StepShape(), node=load_node("dgx-h200"),
                           host_bytes=599 * GIB)
    assert small.single_gpus == () and small.families[0].gpus == ()  # 600 GiB of host RAM needed


def test_single_gpu_suffices_means_no_sharded_answer():
    small = est(Strategy(chunks=8, state_tier=Tier.HOST), {Component.WEIGHTS: 14 * GIB, Component.ACTIVATIONS: 2 * GIB})
    report = size_estimates([small], model_name="toy", shape=StepShape())
    assert report.single_gpus[0] == "l4" and report.sharded == ()
    assert report.families[0].gpus[0] == "l4"  # smallest catalogue card first (22.17 GiB >= 16.5 GiB)


SMALL = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False)
SHAPE = StepShape(batch=1, seq_len=64, dtype="bf16")


def _small():
    # 27M parameters: big enough that sharding beats the per-rank CUDA context and workspace
    return ModelSpec(name="small-llama", source="config", config=SMALL, num_layers=4)


def _candidates():
    return sharded_candidates(SearchSpace(chunk_counts=(1, 4), checkpointing=(False, True),
                                          loss_chunk_tokens=(0,)).strategies())


def test_sharded_candidates_are_what_the_sharded_runtime_runs():
    labels = [s.label() for s in _candidates()]
    # per chunk count and state tier the leanest corner, fewest chunks first, GPU, host, disk
    assert labels == ["full FT, ckpt", "ChunkFT C=4, ckpt", "ChunkFT C=4, state host, prefetch 0, ckpt",
                      "ChunkFT C=4, state disk, prefetch 0, ckpt"]
    # chunk counts past the space's, as a sharded plan extends them
    extended = sharded_space(SearchSpace(chunk_counts=(1, 4), checkpointing=(True,), loss_chunk_tokens=(0,)))
    assert sorted({s.chunks for s in extended}) == [1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def test_sharded_count_is_the_fewest_that_fits():
    spec, hw = _small(), hardware("h100")
    cands = _candidates()
    need = {w: {s: evaluate_sharded(spec, SHAPE, s, hw, gpus_per_node=w) for s in cands} for w in (2, 3)}
    least = {w: min(e.card_need_bytes() for e in need[w].values()) for w in need}
    assert least[3] < least[2]
    card = (least[2] + least[3]) // 2
    kind = dataclasses.replace(load_gpu("h100"), memory_bytes=card)
    found, unsized, mode, count = size_sharded(spec, SHAPE, cands, [kind], gpus_per_node=8, shard_embeddings=False)
    assert unsized == [] and mode == "exact" and count > 0
    (answer,) = found
    assert (answer.num_gpus, answer.nodes, answer.gpus_per_node) == (3, 1, 3)
    assert answer.node == "dgx-h100" and answer.verified  # the plan solver fits it on that layout
    # it fits at 3 with the strategy it names, and nothing fits at 2
    assert need[3][answer.estimate.strategy].card_need_bytes() == answer.gpu_bytes <= card
    assert all(e.card_need_bytes() > card for e in need[2].values())
    # the fewest chunks that fit at 3, the GPU tier before the host tier
    first = next(s for s in cands if need[3][s].card_need_bytes() <= card)
    assert answer.estimate.strategy == first
    # a node's host RAM: with 1 byte of it neither the host tier (its state) nor the disk tier
    # (its staging buffers) can run; with 1 byte of disk the disk tier cannot
    tight, _, _, _ = size_sharded(spec, SHAPE, cands, [kind], host_bytes_per_node=1, shard_embeddings=False)
    assert all(a.estimate.strategy.state_tier == Tier.GPU and a.host_bytes_per_node == 0 for a in tight)
    # too few GPUs allowed: no answer, and what the closest lacks per tier
    found, unsized, _, _ = size_sharded(spec, SHAPE, cands, [kind], max_gpus=2, shard_embeddings=False,
                                        host_bytes_per_node=1, disk_bytes_per_node=1)
    (short,) = unsized
    assert found == [] and (short.gpu, short.node, short.num_gpus) == ("h100-80gb", "dgx-h100", 2)
    gpu_short = short.closest.card_need_bytes() - card
    assert short.missing_bytes[Tier.GPU] == gpu_short > 0
    if short.closest.strategy.state_tier != Tier.GPU:  # host / disk short by all but the 1 byte per rank
        assert Tier.HOST in short.missing_bytes
    with pytest.raises(ChunkftError, match="gpus per node"):
        size_sharded(spec, SHAPE, cands, [kind], gpus_per_node=0)


def test_nodes_beyond_one_are_whole_nodes():
    spec, hw = _small(), hardware("h100")
    cands = _candidates()
    need = {w: min(evaluate_sharded(spec, SHAPE, s, hw, gpus_per_node=w).card_need_bytes() for s in cands)
            for w in (2, 3, 4)}
    card = (need[3] + need[4]) // 2  # needs 4: with 2 per node, 2 nodes x 2
    kind = dataclasses.replace(load_gpu("h100"), memory_bytes=card)
    (answer,), _, _, _ = size_sharded(spec, SHAPE, cands, [kind], gpus_per_node=2, shard_embeddings=False)
    assert (answer.num_gpus, answer.nodes, answer.gpus_per_node) == (4, 2, 2)
    two_nodes = evaluate_sharded(spec, SHAPE, answer.estimate.strategy, hw, gpus_per_node=2, nodes=2)
    assert two_nodes.card_need_bytes() == answer.gpu_bytes <= card


@pytest.mark.slow
def test_llama3_70b_on_80gb_cards_needs_two_and_agrees_with_the_plan():
    """Bound chunk traces (auto above 2B), chunk counts past 256: 2 x 80 GB with C=1024 and the
    embeddings as units of their own (the root unit holding embedding and lm_head unsharded
    does not fit two at any chunk count); the plan solver on that layout finds the same count,
    and nothing on one GPU fewer. A 24 GB card needs whole workstations."""
    from planner.model import resolve_model
    from planner.parallel import ParallelLayout, node_budget, solve_layouts

    spec, shape = resolve_model("llama3-70b"), StepShape(seq_len=1024)
    space = SearchSpace(chunk_counts=(1, 32, 256), checkpointing=(True,), loss_chunk_tokens=(256,),
                        update_intervals=(1,), prefetch_depths=(0,))
    found, unsized, mode, _ = size_sharded(spec, shape, sharded_space(space), ["h800", "rtx4090"])
    answers = {a.gpu: a for a in found}
    assert mode == "bound" and unsized == []
    h800 = answers["h800-80gb"]
    assert (h800.num_gpus, h800.shard_embeddings, h800.estimate.strategy.chunks, h800.verified) == (2, True, 1024, True)
    assert h800.gpu_bytes <= load_gpu("h800").memory_bytes
    assert h800.host_bytes_per_node == 12 * 70_553_706_496  # every parameter's master + moments, no rounding
    assert answers["rtx4090"].gpus_per_node == 1 and answers["rtx4090"].nodes > 1
    hw = hardware("h800")
    budget = node_budget(load_node("dgx-h800"), hw.gpu.memory_bytes - CONTEXT)
    plan, _, layout = solve_layouts(spec, shape, hw, budget, [ParallelLayout(gpus_per_node=2),
                                                             ParallelLayout(gpus_per_node=2, shard_embeddings=True)],
                                    space=space)
    assert plan.fits and layout.shard_embeddings and plan.best.strategy.chunks == 1024
    # 256 GiB of host RAM per node: the state goes to disk, per rank
    low = node_budget(load_node("dgx-h800"), hw.gpu.memory_bytes - CONTEXT, host_bytes=256 * GIB)
    plan, sharded, _ = solve_layouts(spec, shape, hw, low, [ParallelLayout(gpus_per_node=2, shard_embeddings=True)],
                                     space=space)
    assert plan.fits and plan.best.strategy.state_tier == Tier.DISK
    est = sharded[plan.best.strategy]
    assert est.node_host_bytes <= 256 * GIB and est.node_disk_bytes == 12 * 70_553_706_496


def test_cli_size_on_a_small_model(tmp_path, capsys):
    from planner.cli import main

    LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    assert main(["size", str(tmp_path), "--seq", "128", "--batch", "2", "--max-chunks", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line[:46].strip(): line for line in out.splitlines()}
    assert "full FT, AdamW on GPU" in rows and "ChunkFT, state on host" in rows
    assert "h200-141gb" in rows["full FT, AdamW on GPU"]  # a 5M-parameter model fits every card
    assert "GPU = allocator reserved + CUDA context" in out
    assert "Sharded" not in out  # every card holds it alone


def test_cli_size_sharded_answer(tmp_path, capsys):
    from planner.cli import main

    # 13.9B parameters (bound chunk traces): 26 GB of bf16 weights, more than a 24 GB card holds
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=64, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False).save_pretrained(tmp_path)
    assert main(["size", str(tmp_path), "--seq", "256", "--max-chunks", "8", "--gpus-per-node", "4",
                 "--max-gpus", "8", "--host-ram-per-node", "1TiB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    alone = "a100-40gb, h100-80gb, h800-80gb, a100-80gb, h200-141gb"
    assert f"With weights resident, one GPU suffices on: {alone}." in lines
    head = next(i for i, line in enumerate(lines) if line.startswith("Sharded"))
    assert "bound chunk traces" in lines[head]
    assert "4 GPUs per node, 8 in all" in lines[head]
    assert "nodes     each GPU kind's default node (planner/hardware/node-*.json); per node: host RAM 1.00 TiB" in lines
    answers = {line.split(":")[0].strip(): line for line in lines[head + 1:] if " x " in line}
    assert set(answers) == {"3 x rtx3090 (rtx3090-workstation)", "3 x rtx4090 (rtx4090-workstation)",
                            "3 x a10 (lambda-1x-a10)", "3 x l4 (gcp-g2-standard-96)"}
    four = answers["3 x rtx4090 (rtx4090-workstation)"]
    assert four.endswith("(ChunkFT C=8, state host, prefetch 0, ckpt; verified by the plan solver)")
    # the a10's and L4's smaller cards need the embeddings as units of their own at 3
    assert answers["3 x l4 (gcp-g2-standard-96)"].endswith("embeddings as own units; verified by the plan solver)")
    # the count against planner.sharding: C=8 on the host fits 3 RTX 4090s, not 2
    from planner.model import resolve_model

    spec, hw = resolve_model(str(tmp_path)), hardware("rtx4090")
    plan = Strategy(chunks=8, state_tier="host", prefetch_depth=0, checkpointing=True)
    shape = StepShape(seq_len=256)
    three = evaluate_sharded(spec, shape, plan, hw, gpus_per_node=3)
    assert three.card_need_bytes() <= hw.gpu.memory_bytes < evaluate_sharded(spec, shape, plan, hw, gpus_per_node=2
                                                                              ).card_need_bytes()
    assert f"{three.card_need_bytes() / 2**30:.2f} GiB per GPU" in four
    assert f"{three.node_host_bytes / 2**30:.2f} GiB host RAM per node" in four
    assert lines[-1].startswith("evaluated ") and lines[-1].endswith(" sharded")


@pytest.mark.parametrize("flags, message", [
    (["--gpus-per-node", "0"], "invalid --gpus-per-node 0"),
    (["--max-gpus", "-1"], "invalid --max-gpus -1"),
    (["--host-ram-per-node", "12XB"], "invalid --host-ram-per-node"),
    (["--host-ram-per-node", "0GiB"], "invalid --host-ram-per-node"),
    (["--disk-per-node", "0GiB"], "invalid --disk-per-node"),
    (["--node", "dgx-h900"], "unknown node 'dgx-h900'; known nodes: dgx-a100-320gb, "),
    (["--gpus-per-node", "two"], "invalid int value"),
])
def test_cli_size_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    from planner.cli import main

    LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    try:
        code = main(["size", str(tmp_path), "--seq", "128", *flags])
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
