"""--optim and --precision: the traced optimizer step (planner.optim_step) against the real one.

CPU ground truth: the real optimizer steps a tiny, randomly initialised HF model's parameters
(random gradients) and planner.measure's mallinfo2 sampler measures what the step leaves (state,
masters) and its peak, after a warm-up step; the prediction is planner.optim_step.step_cost on
the same parameter shapes, traced on fake cpu tensors. Four architectures (Llama; Qwen2 with
biases and tied embeddings; Gemma 2; Phi-3), two shapes each: median within 1%, each within 2%.
What the measurement sees beyond tensor storages (per-parameter state dicts, malloc headers) is
tens of KiB: Adafactor's factored state on these models is smaller than that, so its state is
held to 64 KiB and its step peak (one full-size temporary) to 2%.
"""

from __future__ import annotations

import functools
import gc
import statistics

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config

from planner.errors import ChunkftError
from planner.measure import mallinfo2_available
from planner.model import ModelSpec
from planner.optim_step import CHUNK_8BIT, measured_step, step_cost
from planner.recipe import Recipe
from planner.schema import Component, Tier

TOLERANCE = 0.02
NOISE_FLOOR_BYTES = 64 * 1024
ARCHS = ("llama", "qwen2-tied", "gemma2", "phi3")
SHAPES = ((256, 688), (384, 1024))  # (hidden, intermediate)
CASES = [("adamw_torch_forloop", "mixed"), ("adamw_torch", "mixed"), ("adamw_torch_fused", "mixed"),
         ("adamw_torch_forloop", "pure"), ("adamw_bf16", "mixed"), ("adafactor", "pure"), ("sgd", "pure"),
         ("adamw_torch_8bit", "pure"), (CHUNK_8BIT, "mixed")]


def tiny(arch: str, hidden: int, inter: int) -> ModelSpec:
    common = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8192)
    config = {"llama": lambda: LlamaConfig(**common),
              "qwen2-tied": lambda: Qwen2Config(**common, tie_word_embeddings=True),
              "gemma2": lambda: Gemma2Config(**common, head_dim=64),
              "phi3": lambda: Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2)}[arch]()
    return ModelSpec(name=f"tiny-{arch}", source="config", config=config, num_layers=2)


@functools.lru_cache(maxsize=None)
def model_params(arch: str, hidden: int, inter: int) -> list[torch.Tensor]:
    """The model's bf16 parameters with random gradients (built once; the steps change values only)."""
    torch.manual_seed(0)
    model = tiny(arch, hidden, inter).build(device="cpu", dtype=torch.bfloat16)
    params = list(model.parameters())  # tied weights once
    for p in params:
        p.grad = torch.randn_like(p)
    gc.collect()
    gc.freeze()  # measure_malloc_peak's gc.collect() then takes milliseconds
    return params


def compare(optim: str, precision: str) -> dict:
    """{(arch, shape): (state error, peak error, predicted state, measured state)} of one optimizer."""
    out = {}
    # torchao's 8-bit step runs eagerly on CPU at a few seconds per step: one shape per
    # architecture here (bench/recipe_optim.py measures both)
    shapes = SHAPES[:1] if "8bit" in optim else SHAPES
    for arch in ARCHS:
        for hidden, inter in shapes:
            params = model_params(arch, hidden, inter)
            held = optim == CHUNK_8BIT  # ChunkAdamW's 8-bit span step (ChunkFT), runtime.lean_state
            cost = step_cost("adamw_torch_8bit" if held else optim, precision, "bf16",
                             tuple(tuple(p.shape) for p in params), device="cpu", chunk_spans=held)
            state = cost.gpu_state_bytes + cost.host_state_bytes
            m_state, m_peak = measured_step(optim, precision, params)
            out[arch, hidden] = ((state - m_state) / m_state, (state + cost.temp_bytes - m_peak) / m_peak,
                                 state, m_state)
    return out


@pytest.fixture(autouse=True, scope="module")
def _quiet_process():
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.parametrize("optim,precision", CASES)
def test_traced_optimizer_step_matches_malloc_measurement(optim, precision):
    errors = compare(optim, precision)
    print(f"\n{optim} {precision}: " + ", ".join(f"{a}/{h}: state {s:+.2%} peak {p:+.2%}"
                                                  for (a, h), (s, p, _, _) in errors.items()))
    if optim == "adafactor":  # factored state below the noise floor: absolute, see the module doc
        assert all(abs(ps - ms) < NOISE_FLOOR_BYTES for _, _, ps, ms in errors.values()), errors
        state_errors = []
    else:
        state_errors = [abs(s) for s, _, _, _ in errors.values()]
    # torchao's update is torch.compile'd: measured eagerly here, so only its state is compared
    peak_errors = [] if optim == "adamw_torch_8bit" else [abs(p) for _, p, _, _ in errors.values()]
    for errs in (state_errors, peak_errors):
        if errs:
            assert max(errs) < TOLERANCE, errors
            assert statistics.median(errs) < 0.01, errors


# ---------------------------------------------------------------------------- state bytes


def per_param(cost, n: int, comps=(Component.MASTER, Component.OPTIMIZER)) -> float:
    return sum(b * k for c, b, k in cost.gpu_state if c in comps) / n


def test_adamw_state_bytes_per_parameter():
    shapes = ((4096, 4096), (4096, 1024))
    n = 4096 * 5120
    pure = step_cost("adamw_torch", "pure", "bf16", shapes)
    mixed = step_cost("adamw_torch", "mixed", "bf16", shapes)
    assert per_param(pure, n) == 4  # two bf16 moments
    assert per_param(mixed, n) == 12  # fp32 master + two fp32 moments (16 B/param with bf16 weights + grads)
    assert pure.host_state_bytes == mixed.host_state_bytes == 2 * 4  # torch keeps step counters on the CPU
    fused = step_cost("adamw_torch_fused", "pure", "bf16", shapes)
    assert fused.host_state_bytes == 0 and fused.gpu_state_bytes == pure.gpu_state_bytes + 2 * 4
    assert fused.temp_bytes == 0  # one fused kernel, in place
    # foreach materialises sqrt(v) for every tensor at once (then divides in place); the for-loop
    # one tensor's sqrt(v) and its quotient (torch/optim/adam.py `_single_tensor_adam`)
    assert pure.temp_bytes == 2 * n
    forloop = step_cost("adamw_torch_forloop", "pure", "bf16", shapes)
    assert forloop.temp_bytes == 2 * 2 * 4096 * 4096
    # mixed: fp32 copies of every gradient for the masters, plus fp32 sqrt(v)
    assert mixed.temp_bytes == 4 * n + 4 * n
    bf16 = step_cost("adamw_bf16", "mixed", "bf16", shapes)
    assert per_param(bf16, n) == 8  # fp32 master + two bf16 moments


def test_eight_bit_state_is_two_bytes_per_parameter_plus_block_scales():
    n = 4096 * 4096
    ao = step_cost("adamw_torch_8bit", "pure", "bf16", ((4096, 4096),))
    assert ao.gpu_state_bytes == 2 * n + 2 * 4 * (n // 256) + 2 * 256 * 4  # codes, scales, qmaps
    assert ao.temp_bytes == 2 * 4 * n + 2 * 4 * (n // 256)  # inductor's buffers (TORCHAO_COMPILED_TEMPS)
    small = step_cost("adamw_torch_8bit", "pure", "bf16", ((1000,),))
    assert small.gpu_state_bytes == 2 * 2 * 1000  # under 4096 elements: plain bf16 moments
    bnb = step_cost("adamw_bnb_8bit", "pure", "bf16", ((4096, 4096), (1000,)))
    assert bnb.gpu_state_bytes == 2 * n + 2 * 4 * (n // 256) + 2 * 4 * 1000 + 2 * 4 * 256
    paged = step_cost("paged_adamw_8bit", "pure", "bf16", ((4096, 4096), (1000,)))
    assert paged.host_state_bytes == 2 * n and paged.paged  # unified memory, outside PyTorch's allocator
    paged32 = step_cost("paged_adamw_32bit", "pure", "bf16", ((4096, 4096),))
    assert paged32.host_state_bytes == 2 * 4 * n and paged32.gpu_state_bytes == 0


def test_adafactor_factors_matrices_and_sgd_keeps_one_buffer():
    ada = step_cost("adafactor", "pure", "bf16", ((4096, 1024), (1024,)))
    assert ada.gpu_state_bytes == 2 * (4096 + 1024) + 2 * 1024  # row + column factors; a vector's full variance
    sgd = step_cost("sgd", "pure", "bf16", ((4096, 1024),))
    assert sgd.gpu_state_bytes == 2 * 4096 * 1024 and sgd.temp_bytes == 0


def test_chunkft_spans_price_chunk_adamw_state_and_scale_exactly():
    from planner.optim_step import CHUNK_8BIT, _scaled_trace, _shape_trace

    for optim in ("adamw_bf16", CHUNK_8BIT):  # flat spans from two reference traces, entry by entry
        for n in (1000, 4096, 123 * 256, 1_000_003):
            a, b = _scaled_trace(optim, "mixed", "bf16", (n,)), _shape_trace(optim, "mixed", "bf16", (n,), "cuda")
            assert sorted(a.state) == sorted(b.state) and a.extra_at_peak == b.extra_at_peak, (optim, n)
    n = 65536
    whole = step_cost("adamw_torch_8bit", "pure", "bf16", ((n,),))
    spans = step_cost("adamw_torch_8bit", "pure", "bf16", ((n,),), chunk_spans=True)
    # torchao: codes, block scales, a qmap per tensor, a step counter on the host; ChunkAdamW
    # (runtime.lean_state): codes and block scales, the maps are shared constants
    assert whole.gpu_state_bytes == 2 * n + 2 * 4 * (n // 256) + 2 * 256 * 4 and whole.host_state_bytes == 4
    assert spans.gpu_state_bytes == 2 * n + 2 * 4 * (n // 256) and spans.host_state_bytes == 0
    # ChunkAdamW steps a span from its 16-bit gradient: no fp32 gradient copies made before the step
    mixed = step_cost("adamw_torch_8bit", "mixed", "bf16", ((n,), (1000,)), chunk_spans=True)
    assert all(c != Component.GRADIENTS for c, _, _ in mixed.temps)
    assert any(c == Component.GRADIENTS for c, _, _ in step_cost("adamw_torch_8bit", "mixed", "bf16", ((n,),)).temps)
    bf16 = step_cost("adamw_bf16", "pure", "bf16", ((n,),), chunk_spans=True)
    assert bf16.gpu_state_bytes == 2 * 2 * n


# ---------------------------------------------------------------------------- the planner


def test_evaluate_prices_the_recipe_optimizer_and_refuses_what_it_cannot():
    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.strategy import Strategy
    from planner.trace import StepShape

    model, shape, hw = resolve_model("llama3-8b"), StepShape(seq_len=1024), hardware("h100")
    base = evaluate(model, shape, Strategy(checkpointing=True), hw)
    pure = evaluate(model, shape, Strategy(checkpointing=True, recipe=Recipe(optim="adamw_torch_fused",
                                                                             precision="pure")), hw)
    gb, gpu, host = 2**30, Tier.GPU, Tier.HOST
    # ChunkAdamW: fp32 master + moments = 12 B/param; pure bf16 fused AdamW: 4 B/param, no temporaries
    assert base.components[gpu][Component.OPTIMIZER] > 59 * gb and base.components[gpu][Component.MASTER] > 29 * gb
    assert abs(pure.components[gpu][Component.OPTIMIZER] - 4 * 8.03e9) < 0.1 * gb
    assert Component.MASTER not in pure.components[gpu]
    assert base.peak_bytes[gpu] - pure.peak_bytes[gpu] > 60 * gb
    paged = evaluate(model, shape, Strategy(recipe=Recipe(optim="paged_adamw_8bit", precision="pure")), hw)
    assert paged.components[host][Component.OPTIMIZER] > 2 * 7.9e9  # unified memory, counted on the host
    assert paged.components[gpu][Component.OPTIMIZER] < 0.3 * gb  # block scales (and small tensors) only
    with pytest.raises(ChunkftError, match="adamw_torch with ChunkFT"):
        evaluate(model, shape, Strategy(chunks=4, state_tier="host", recipe=Recipe(optim="adamw_torch")), hw)
    with pytest.raises(ChunkftError, match="--precision pure"):
        evaluate(model, shape, Strategy(recipe=Recipe(precision="pure")), hw)
    chunked = evaluate(model, shape, Strategy(chunks=16, state_tier="host", checkpointing=True,
                                              recipe=Recipe(optim="adamw_torch_8bit")), hw)
    assert chunked.peak_bytes[host] < 0.6 * 12 * 8.03e9  # fp32 master + 8-bit moments rest on host


def test_sharded_path_refuses_the_optimizer_axes():
    with pytest.raises(ChunkftError, match="--optim adamw_torch"):
        Recipe(optim="adamw_torch").require_sharded_modelled()
    with pytest.raises(ChunkftError, match="--precision pure"):
        Recipe(optim="adamw_torch", precision="pure").require_sharded_modelled()
    Recipe(optim="adamw_torch").require_modelled()  # one GPU prices it


def test_fit_shows_the_optim(capsys):
    import json

    from planner.cli import main

    main(["fit", "llama3-8b", "--gpu", "80GiB", "--optim", "adamw_torch_8bit", "--precision", "pure", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"]["optim"] == "adamw_torch_8bit" and out["recipe"]["precision"] == "pure"
    assert "adamw_torch_8bit" in out["recipe_description"]
    labels = [r["label"] for r in out["rows"]]
    assert any("ChunkFT" in label for label in labels)  # ChunkAdamW could hold 8-bit state
    main(["fit", "llama3-8b", "--gpu", "80GiB", "--optim", "paged_adamw_8bit", "--precision", "pure"])
    text = capsys.readouterr().out
    assert "paged_adamw_8bit (state in CUDA unified memory" in text and "ChunkFT" not in text


@pytest.mark.slow
@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
def test_torchao_compiled_step_allocates_what_inductor_planned():
    # The real torch.compile'd AdamW8bit step (inductor on CPU, ~30 s to compile): no op
    # boundaries inside its kernel, so a thread polls mallinfo2 through 10 steps.
    from planner.measure import polled_malloc_peak
    from planner.optim_step import OptimizerStep

    shapes = ((4096, 1024), (1024,), (1000,))
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    step = OptimizerStep("adamw_torch_8bit", "pure", params)
    step.opt.step()  # compiles
    measured = polled_malloc_peak(step.opt.step, repeats=10)
    predicted = step_cost("adamw_torch_8bit", "pure", "bf16", shapes, device="cpu").temp_bytes
    assert abs(predicted - measured) / measured < TOLERANCE, (predicted, measured)
