"""The optimizer step fused into backward (runtime.chunk_optim.ChunkAdamW(step_in_backward=True)):
each span steps as soon as its gradient is complete and the gradient is freed. Same weights and
state as the step after backward for the same gradients, bit for bit on CPU; lower peak; what
it cannot combine with is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from planner.chunks import make_chunk_table_from_model
from planner.errors import ChunkftError
from planner.model import resolve_model
from planner.schema import Tier
from planner.step import enable_checkpointing, step_loss
from runtime.chunk_optim import AdamWConfig, ChunkAdamW

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)


def _model(tmp_path, *, tied: bool, checkpointing: bool, seed: int = 0):
    d = tmp_path / f"m-{tied}"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": tied}))
    torch.manual_seed(seed)
    model = resolve_model(str(d)).build(dtype=torch.float32, device="cpu")
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def _run(tmp_path, *, fused: bool, chunks: int, tied: bool, checkpointing: bool, tier=Tier.GPU, device="cpu",
         steps: int = 4):
    model = _model(tmp_path, tied=tied, checkpointing=checkpointing)
    table = make_chunk_table_from_model(model, chunks)
    opt = ChunkAdamW(model, table, config=AdamWConfig(lr=1e-2, weight_decay=0.1), state_tier=tier,
                     state_dir=tmp_path / f"state-{fused}-{chunks}", device=device, step_in_backward=fused,
                     host_state_in_place=device == "cpu")
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 24), generator=g)
        opt.backward(step_loss(model, ids, ids))
        if fused:  # every gradient was consumed and freed inside backward
            assert opt.handle.grads() == {}
            assert all(p.grad is None for p in model.parameters())
        assert opt.step().stepped
    tensors, meta = opt.state_dict()
    opt.close()
    return {k: v.clone() for k, v in model.state_dict().items()}, tensors, meta


@pytest.mark.parametrize("chunks,tied,checkpointing,tier", [
    (1, False, False, Tier.GPU), (1, True, True, Tier.GPU), (3, True, False, Tier.HOST), (5, False, True, Tier.DISK),
])
def test_fused_step_equals_step_after_backward_bitwise(tmp_path, chunks, tied, checkpointing, tier):
    ref = _run(tmp_path, fused=False, chunks=chunks, tied=tied, checkpointing=checkpointing, tier=tier)
    got = _run(tmp_path, fused=True, chunks=chunks, tied=tied, checkpointing=checkpointing, tier=tier)
    for k in ref[0]:
        assert torch.equal(ref[0][k], got[0][k]), k
    assert ref[1].keys() == got[1].keys()
    for k in ref[1]:
        assert torch.equal(ref[1][k], got[1][k]), k
    assert ref[2]["span_steps"] == got[2]["span_steps"]


def test_fused_step_lowers_the_peak_by_the_gradients(tmp_path):
    """C = 1 on CPU: the unfused step holds every gradient at the end of backward; fused, each
    is gone once stepped, so the peak drops by a good part of the gradient bytes (here 42%: the
    fused peak is inside backward, where activations and the gradients not yet stepped live)."""
    from planner.measure import MallocSampler

    peaks = {}
    for fused in (False, True):
        model = _model(tmp_path, tied=False, checkpointing=False)
        opt = ChunkAdamW(model, make_chunk_table_from_model(model, 1), config=AdamWConfig(lr=1e-3),
                         step_in_backward=fused)
        ids = torch.randint(0, 300, (1, 8))
        for _ in range(2):  # the first step creates lazily initialised kernels' state
            with MallocSampler() as s:
                opt.backward(step_loss(model, ids, ids))
                opt.step()
        peaks[fused] = s.result.peak_bytes
        opt.close()
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert peaks[False] - peaks[True] > 0.35 * grad_bytes, (peaks, grad_bytes)


def test_refusals(tmp_path):
    from runtime.scaler import LossScaler

    model = _model(tmp_path, tied=False, checkpointing=False)
    table = make_chunk_table_from_model(model, 2)
    with pytest.raises(ChunkftError, match="global gradient norm"):
        ChunkAdamW(model, table, config=AdamWConfig(max_grad_norm=1.0), step_in_backward=True)
    with pytest.raises(ChunkftError, match="fp16 overflow"):
        ChunkAdamW(model, table, scaler=LossScaler(), step_in_backward=True)
    opt = ChunkAdamW(model, table, step_in_backward=True)
    ids = torch.randint(0, 300, (1, 8))
    opt.backward(step_loss(model, ids, ids))
    with pytest.raises(ChunkftError, match="gradient accumulation"):
        opt.backward(step_loss(model, ids, ids))
    opt.close()


def test_chunkft_run_executes_a_plan_with_the_optimizer_in_backward(tmp_path):
    """`chunkft run` on a plan whose recipe steps in backward: the same weights as the plan
    without it (clipping off, one micro-batch); clipping, accumulation and fp16 are refused in
    one line before anything is written."""
    import dataclasses

    from planner.recipe import Recipe
    from runtime.run_cli import build_run
    from test_train import _args, make_plan, write_data

    data = write_data(tmp_path / "d.jsonl")
    weights = {}
    for fused in (False, True):
        case = tmp_path / f"f{fused}"
        case.mkdir()
        plan, _, _ = make_plan(case, chunks=3, recipe=Recipe(optimizer_in_backward=fused))
        trainer, _, plan_obj, _ = build_run(_args(plan, data, case / "out", steps=4, max_grad_norm=0.0))
        assert plan_obj.strategy.recipe.optimizer_in_backward is fused
        assert trainer.optimizer.inner._in_backward is fused
        trainer.train()
        trainer.optimizer.inner.close()
        weights[fused] = trainer.model.state_dict()
    for k in weights[False]:
        assert torch.equal(weights[False][k], weights[True][k]), k
    plan, _, _ = make_plan(tmp_path, chunks=3, recipe=Recipe(optimizer_in_backward=True), name="p2.json")
    for extra, words in (({}, "clipping"), ({"max_grad_norm": 0.0, "grad_accum": 2}, "accumulation")):
        out = tmp_path / f"refused-{words}"
        with pytest.raises(ChunkftError, match=words):
            build_run(_args(plan, data, out, steps=2, **extra))
        assert not out.exists()


@pytest.mark.parametrize("chunks,dtype", [(1, "bf16"), (3, "bf16")])
def test_planned_step_in_backward_heap_follows_the_traced_step(tmp_path, chunks, dtype):
    """`chunkft run` of a plan with --optimizer-in-backward (C = 1 and ChunkFT's sliced spans):
    the measured step heap (mallinfo2 per op) against the planner's trace of the same recipe,
    whose hooks run ChunkAdamW's span step (planner.train_axes.SpanStepInBackward), chunk by
    chunk, within 2%. Without prefetch: a prefetched chunk's state lands, from its thread, inside
    the measured step, where the plan has it resident before the step begins."""
    from planner.recipe import Recipe
    from planner.trace import trace_step
    from planner.train_axes import trace_options
    from runtime.run_cli import build_run
    from test_lean_activations import WIDE
    from test_train import _args, make_plan, write_data

    recipe = Recipe(optimizer_in_backward=True)
    plan, spec, plan_obj = make_plan(tmp_path, chunks=chunks, recipe=recipe, config=WIDE, seq_len=256, batch=2,
                                     dtype=dtype, prefetch_depth=0)
    trainer, _, _, _ = build_run(_args(plan, write_data(tmp_path / "d.jsonl"), tmp_path / "out", steps=2 * chunks,
                                       max_grad_norm=0.0, trace=tmp_path / "t.jsonl"))
    result = trainer.train()
    trainer.optimizer.inner.close()
    for step in range(chunks, 2 * chunks):  # every chunk's state exists
        k = step % chunks
        grad = plan_obj.chunk_table.grad_spec(k) if chunks > 1 else None
        options = trace_options(recipe, grad=grad, checkpointing=False, loss_chunk_tokens=0)
        predicted = trace_step(spec, plan_obj.shape, options).replay(allocator="cpu").step_peak_bytes
        measured = result.step_peaks[step]
        print(f"C={chunks} {dtype} chunk {k}: measured {measured} B, predicted {predicted} B "
              f"({measured / predicted - 1:+.2%})")
        assert abs(measured - predicted) <= 0.02 * predicted, (k, measured, predicted)
