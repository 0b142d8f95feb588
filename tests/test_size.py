"""Sizing: the per-family minimum, the catalogue GPUs that suffice, and the FSDP arithmetic of
the sharded answer, on hand-made estimates (hand-solved) and on a small traced model."""

from __future__ import annotations

import math


from planner.hardware import load_gpu
from planner.schema import Component, Tier
from planner.size import GATHERED_LAYERS, card_need_bytes, per_rank_bytes, size_estimates
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
LAYER = 1 * GIB


def test_per_rank_arithmetic_by_hand():
    # sharded 103 GiB; unsharded: 3 GiB activations + 1 GiB reserved slack + 0.5 GiB context
    assert card_need_bytes(CHUNKED) == 107 * GIB + CONTEXT
    assert per_rank_bytes(CHUNKED, 1, LAYER) == 107 * GIB + CONTEXT
    assert per_rank_bytes(CHUNKED, 2, LAYER) == 103 * GIB // 2 + 4 * GIB + CONTEXT + GATHERED_LAYERS * LAYER
    assert per_rank_bytes(CHUNKED, 3, LAYER) == math.ceil(103 * GIB / 3) + 4 * GIB + CONTEXT + 3 * LAYER


def test_size_report_by_hand():
    report = size_estimates([CHUNKED, FULL, STREAMED], model_name="toy", shape=StepShape(), layer_bytes=LAYER)
    fam = {f.family: f for f in report.families}
    assert fam["ChunkFT, state on host"].gpu_bytes == 107 * GIB + CONTEXT
    assert fam["ChunkFT, state on host"].gpus == ("h200-141gb",)  # 107.5 GiB: only 139.81 GiB holds it
    assert fam["full FT, AdamW on GPU"].estimate is FULL
    streamed = fam["any, decoder layers streamed from host"]
    assert streamed.gpu_bytes == 10 * GIB + CONTEXT and streamed.host_bytes == 900 * GIB
    assert "rtx4090" in streamed.gpus and "h100-80gb" in streamed.gpus
    assert report.single_gpus == ("h200-141gb",)
    sharded = {s.gpu: s for s in report.sharded}
    assert "h200-141gb" not in sharded and set(sharded) == {"l4", "a10", "rtx4090", "rtx3090", "a100-40gb",
                                                            "h100-80gb", "h800-80gb", "a100-80gb"}
    # 80 GB card (79.11 GiB): 51.5 + 4 + 0.5 + 3 = 59 GiB per rank with 2 GPUs
    h100 = sharded["h100-80gb"]
    assert h100.num_gpus == 2 and h100.estimate is CHUNKED
    assert h100.per_rank_bytes == 59 * GIB
    # RTX 4090 (23.65 GiB): 103/G + 7.5 GiB <= 23.65 GiB  ->  G >= 6.38  ->  7
    assert sharded["rtx4090"].num_gpus == 7
    assert per_rank_bytes(CHUNKED, 6, LAYER) > load_gpu("rtx4090").memory_bytes


def test_single_gpu_suffices_means_no_sharded_answer():
    small = est(Strategy(chunks=8, state_tier=Tier.HOST), {Component.WEIGHTS: 14 * GIB, Component.ACTIVATIONS: 2 * GIB})
    report = size_estimates([small], model_name="toy", shape=StepShape(), layer_bytes=LAYER)
    assert report.single_gpus[0] == "l4" and report.sharded == ()
    assert report.families[0].gpus[0] == "l4"  # smallest catalogue card first (22.17 GiB >= 16.5 GiB)


def test_llama3_70b_needs_more_than_one_80gb_gpu_and_fits_two():
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.size import size_model
    from planner.solve import SearchSpace
    from planner.strategy import WeightResidency

    space = SearchSpace(chunk_counts=(1,), checkpointing=(True,), loss_chunk_tokens=(256,))
    report = size_model(resolve_model("llama3-70b"), StepShape(seq_len=1024), hardware("h100"), space=space)
    h100 = load_gpu("h100-80gb")
    assert "h100-80gb" not in report.single_gpus
    # with the weights resident no strategy fits one 80 GB card: the bf16 weights alone don't
    resident = [f for f in report.families if f.estimate.strategy.weights == WeightResidency.GPU]
    assert resident and all(f.gpu_bytes > h100.memory_bytes for f in resident)
    sharded = {s.gpu: s for s in report.sharded}
    assert sharded["h100-80gb"].num_gpus == 2
    assert sharded["h100-80gb"].per_rank_bytes <= h100.memory_bytes


def test_cli_size_on_a_small_model(tmp_path, capsys):
    from transformers import LlamaConfig

    from planner.cli import main

    LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    assert main(["size", str(tmp_path), "--seq", "128", "--batch", "2", "--max-chunks", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line[:46].strip(): line for line in out.splitlines()}
    assert "full FT, AdamW on GPU" in rows and "ChunkFT, state on host" in rows
    assert "h200-141gb" in rows["full FT, AdamW on GPU"]  # a 5M-parameter model fits every card
    assert "GPU = allocator reserved + CUDA context" in out
    assert main(["size", str(tmp_path), "--seq", "0"]) == 2
