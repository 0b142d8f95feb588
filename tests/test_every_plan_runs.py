"""Every strategy the solver can emit is a plan `chunkft run` executes (issue: run every plan the
planner emits). The solver's space (planner.solve.default_space) for a tiny Llama, with chunk
counts 1 and 3 and each update interval and prefetch depth represented, is enumerated; each
strategy becomes a plan (planner.plan) and trains one step through runtime.run_cli.build_run
on CPU. Refusals: none; the planner emits no strategy the runtime refuses.

Every tier, staging, checkpointing and streaming choice computes the same step, so one step of
one chunk count leaves the same weights bit for bit whatever else the strategy says (fp32
model: no 16-bit round trip through the host)."""

from __future__ import annotations

import dataclasses

import torch

from test_train import _args, make_plan, write_data


def _space():
    from planner.solve import default_space

    space = default_space(num_layers=2, tokens=128, max_chunks=8)
    main = dataclasses.replace(space, chunk_counts=(1, 3), update_intervals=(1,), prefetch_depths=(1,))
    extra = dataclasses.replace(space, chunk_counts=(3,), update_intervals=(4,), prefetch_depths=(0, 2),
                                weights=(space.weights[-1],), checkpointing=(True,))
    strategies = list(dict.fromkeys(main.strategies() + extra.strategies()))
    # each value of every axis the solver searches appears at least once
    for field, values in (("optimizer_device", space.optimizer_devices), ("state_tier", space.state_tiers),
                          ("grad_staging", space.grad_stagings), ("checkpointing", space.checkpointing),
                          ("weights", space.weights), ("update_interval", space.update_intervals[:2]),
                          ("prefetch_depth", space.prefetch_depths)):
        assert {getattr(s, field) for s in strategies} >= set(values), field
    return strategies


def test_every_strategy_in_the_solver_space_runs_one_step(tmp_path):
    from runtime.run_cli import build_run

    strategies = _space()
    assert len(strategies) > 60
    data = write_data(tmp_path / "train.jsonl", n=8)
    reference: dict[int, dict[str, torch.Tensor]] = {}
    for i, s in enumerate(strategies):
        fields = {f: getattr(s, f) for f in ("update_interval", "optimizer_device", "state_tier", "grad_staging",
                                             "weights", "prefetch_depth")}
        case = tmp_path / f"s{i}"
        case.mkdir()
        plan, _, _ = make_plan(case, chunks=s.chunks, checkpointing=s.checkpointing, **fields)
        trainer, _, plan_obj, _ = build_run(_args(plan, data, case / "out", steps=1))
        assert plan_obj.strategy == s, s.label()
        result = trainer.train()
        trainer.optimizer.inner.close()
        trainer.claimed.release()
        assert result.skipped_steps == 0 and torch.isfinite(torch.tensor(result.losses)).all(), s.label()
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        ref = reference.setdefault(s.chunks, weights)
        for k in ref:
            assert torch.equal(ref[k], weights[k]), (s.label(), k)


def test_every_recipe_the_solver_may_choose_runs_one_step(tmp_path):
    """`--search-recipes lean`: the recipe variants the solver may pick (selective and every-2
    checkpointing, offloaded activations, the optimizer step in backward, bf16 and 8-bit
    moments), with one chunk and with ChunkFT, each planned and run one step through
    build_run. The variants that change no arithmetic leave the default recipe's weights bit
    for bit (fp32: the step in backward steps the same spans with the same gradients)."""
    from planner.recipe import Recipe
    from planner.schema import Tier
    from planner.solve import default_space
    from planner.strategy import OptimizerDevice, WeightResidency
    from runtime.run_cli import build_run

    space = dataclasses.replace(default_space(num_layers=2, tokens=128, max_chunks=8), chunk_counts=(1, 3),
                                update_intervals=(1,), prefetch_depths=(1,), optimizer_devices=(OptimizerDevice.GPU,),
                                state_tiers=(Tier.GPU, Tier.HOST), grad_stagings=(None,), weights=(WeightResidency.GPU,),
                                recipes=Recipe().variants("lean"))
    strategies = [s for s in space.strategies() if (s.chunks == 1) == (s.state_tier == Tier.GPU)]
    recipes = {s.recipe for s in strategies}
    assert recipes == {Recipe(), *Recipe().variants("lean")} and len(recipes) >= 6
    assert any(s.chunks > 1 and s.recipe.optimizer_in_backward for s in strategies)
    data = write_data(tmp_path / "train.jsonl", n=8)
    reference: dict[tuple, dict[str, torch.Tensor]] = {}
    for i, s in enumerate(sorted(strategies, key=lambda s: s.recipe != Recipe())):  # the default recipe first
        case = tmp_path / f"r{i}"
        case.mkdir()
        plan, _, _ = make_plan(case, chunks=s.chunks, checkpointing=s.checkpointing, state_tier=s.state_tier,
                               recipe=s.recipe)
        trainer, _, plan_obj, _ = build_run(_args(plan, data, case / "out", steps=1, max_grad_norm=0.0))
        assert plan_obj.strategy == s, s.label()
        result = trainer.train()
        trainer.optimizer.inner.close()
        trainer.claimed.release()
        assert result.skipped_steps == 0 and torch.isfinite(torch.tensor(result.losses)).all(), s.label()
        if s.recipe.optim == "chunkft":  # bf16 / 8-bit moments round the update differently
            weights = trainer.model.state_dict()
            ref = reference.setdefault(s.chunks, {k: v.clone() for k, v in weights.items()})
            for k in ref:
                assert torch.equal(ref[k], weights[k]), (s.label(), k)
