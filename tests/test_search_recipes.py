"""--search-recipes (issue 12 item 4): fit and the solver may choose recipe variants that
`chunkft run` executes; exact ones train the same weights, lean ones change the arithmetic or
the run's options. Labels stay unique; an offloaded step pays its PCIe copies."""

from __future__ import annotations

import pytest

from planner.errors import ChunkftError
from planner.recipe import Recipe


def test_variants_are_runnable_and_one_axis_each():
    assert Recipe().variants("none") == ()
    exact = Recipe().variants("exact")
    assert {r.selective_checkpointing for r in exact} == {False, True}
    assert {r.checkpoint_every for r in exact} == {1, 2} and any(r.offload_activations for r in exact)
    assert all(r.optim == "chunkft" and not r.optimizer_in_backward for r in exact)
    lean = Recipe().variants("lean")
    assert set(exact) < set(lean)
    assert {r.optim for r in lean} == {"chunkft", "adamw_bf16", "adamw_torch_8bit"}
    for r in lean:
        r.require_runnable()
        assert sum(getattr(r, f) != getattr(Recipe(), f) for f in ("optim", "optimizer_in_backward",
                                                                   "checkpoint_every", "selective_checkpointing",
                                                                   "offload_activations")) == 1
    # what the user fixed is not searched away
    assert all(r.optim == "adamw_bf16" for r in Recipe(optim="adamw_bf16").variants("lean"))
    assert Recipe(selective_checkpointing=True).variants("exact") == (Recipe(selective_checkpointing=True,
                                                                             offload_activations=True),)
    with pytest.raises(ChunkftError, match="--search-recipes"):
        Recipe().variants("all")


def test_solver_space_and_fit_rows_carry_the_variants():
    from planner.fit import fit_strategies
    from planner.solve import default_space
    import dataclasses

    space = default_space(num_layers=4, tokens=256, max_chunks=8)
    plain = space.strategies()
    searched = dataclasses.replace(space, recipes=Recipe().variants("lean")).strategies()
    assert set(plain) < set(searched)
    assert {s.recipe for s in searched} == {Recipe(), *Recipe().variants("lean")}
    # selective and every-K need checkpointing; the optimizer in backward the GPU optimizer
    # (Recipe.conflict), with ChunkFT's chunks too (ChunkAdamW steps their spans in backward)
    assert all(s.checkpointing for s in searched if s.recipe.selective_checkpointing or s.recipe.checkpoint_every > 1)
    in_backward = [s for s in searched if s.recipe.optimizer_in_backward]
    assert all(s.optimizer_device.value == "gpu" for s in in_backward)
    assert any(s.chunks > 1 for s in in_backward)
    rows = fit_strategies((4, 16, 64), Recipe(), search_recipes="lean")
    labels = [s.label() for s in rows]
    assert len(set(labels)) == len(labels) and len(rows) > len(fit_strategies((4, 16, 64)))
    assert "ChunkFT C=64, state host, ckpt, adamw_torch_8bit" in labels


def test_offloaded_activations_cost_their_copies():
    from types import SimpleNamespace

    from planner.steptime import StepWork, predict_step_time
    from planner.strategy import Strategy

    hw = SimpleNamespace(gpu=SimpleNamespace(bf16_flops=1e12, fp32_flops=5e11, hbm_bandwidth_Bps=1e9,
                                             pcie_bandwidth_Bps=1e8), host_bandwidth_Bps=1e8,
                         nvme_bandwidth_Bps=1e7, mfu=0.5)
    work = StepWork(flops=10**12, params_step=1000, elem_bytes=2, offload_bytes=10**8)
    assert predict_step_time(work, Strategy(), hw)["offload"] == pytest.approx(2.0)
