"""Lean activations in `chunkft run` (issue 13 item 4): a plan whose recipe checkpoints every
K-th layer, checkpoints op-level selectively, or offloads saved activations to host memory runs
with the same mechanism the planner traces (planner.step.enable_checkpointing,
planner.activations), trains the same weights bit for bit as plain checkpointing on CPU, and
its measured step heap (mallinfo2 per op) follows the prediction of that recipe's trace."""

from __future__ import annotations

import pytest
import torch

from test_train import TINY, _args, make_plan, write_data

WIDE = {**TINY, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "vocab_size": 512,
        "max_position_embeddings": 256}
CASES = {
    "every-2": dict(checkpoint_every=2),
    "selective": dict(selective_checkpointing=True),
    "offload": dict(offload_activations=True),
}


def _run(tmp_path, name, recipe, *, checkpointing=True, trace=False):
    from runtime.run_cli import build_run

    case = tmp_path / name
    case.mkdir()
    plan, spec, plan_obj = make_plan(case, chunks=1, checkpointing=checkpointing, recipe=recipe, config=WIDE,
                                     seq_len=256, batch=1)
    extra = {"trace": case / "t.jsonl"} if trace else {}
    trainer, _, _, _ = build_run(_args(plan, write_data(case / "d.jsonl"), case / "out", steps=4, max_grad_norm=0.0,
                                       **extra))
    result = trainer.train()
    trainer.optimizer.inner.close()
    return trainer, result, plan_obj, spec


@pytest.mark.parametrize("name", list(CASES))
def test_lean_activation_plan_runs_as_traced(tmp_path, name):
    from planner.recipe import Recipe
    from planner.train_axes import trace_options
    from planner.trace import trace_step

    recipe = Recipe(**CASES[name])
    ref, _, _, _ = _run(tmp_path, "ref", Recipe(), checkpointing=name != "offload")
    got, result, plan_obj, spec = _run(tmp_path, name, recipe, checkpointing=name != "offload", trace=True)
    assert got.config.offload_activations is recipe.offload_activations
    a, b = ref.model.state_dict(), got.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), (name, k)
    options = trace_options(recipe, grad=None, checkpointing=name != "offload", loss_chunk_tokens=0)
    # one CPU heap holds the device and the host copies alike: every tier of the trace
    predicted = trace_step(spec, plan_obj.shape, options).replay(allocator="cpu", tier=None).step_peak_bytes
    plain = trace_step(spec, plan_obj.shape, trace_options(Recipe(), grad=None, checkpointing=True,
                                                           loss_chunk_tokens=0)).replay(allocator="cpu").step_peak_bytes
    for measured in result.step_peaks[1:]:
        print(f"{name}: measured {measured} B, predicted {predicted} B ({measured / predicted - 1:+.2%}); "
              f"whole-layer checkpointing predicts {plain} B")
        assert abs(measured - predicted) <= 0.02 * predicted, (name, measured, predicted)
