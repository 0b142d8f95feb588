"""The solver on hand-made cost functions: brute force agrees, more budget never hurts, and
hand-solved binding / slack / infeasible cases come out as computed on paper."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner.schema import Component, Tier
from planner.solve import (Objective, SearchSpace, SolveStatus, default_space, objective_key, solve)
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy, WeightResidency

GIB = 2**30


def make_estimate(s: Strategy, gpu: int, time_s: float, host: int = 0, disk: int = 0) -> Estimate:
    return Estimate(strategy=s, peak_bytes={Tier.GPU: gpu, Tier.HOST: host, Tier.DISK: disk},
                    components={Tier.GPU: {Component.WEIGHTS: gpu}, Tier.HOST: {Component.OPTIMIZER: host},
                                Tier.DISK: {Component.OPTIMIZER: disk}},
                    reserved_bytes=gpu, step_time_s=time_s, worst_chunk=None if s.chunks == 1 else 0)


def toy_cost(s: Strategy) -> Estimate:
    """A 1 GiB-parameter toy with the physics of the real model, in round numbers.

    Update interval changes no byte (R1); prefetch depth only adds bytes (R2). Nothing else is
    monotone on purpose: chunk counts 3 and 6 keep extra activations (a chunk straddling a
    layer), so more chunks can cost more GPU memory, as on real models.
    """
    P = 1 * GIB  # parameters
    weights = 2 * P if s.weights == WeightResidency.GPU else 2 * P // 8
    state_chunk = 12 * P // s.chunks  # master + two moments of one chunk
    grads = 2 * P // s.chunks
    gpu = weights + 256 * 2**20  # + activations with checkpointing
    gpu += 0 if s.checkpointing else 3 * GIB // 2
    gpu += 512 * 2**20 if s.loss_chunk_tokens == 0 else 64 * 2**20
    if s.chunks in (3, 6):
        gpu += GIB // 4
    host = disk = 0
    if s.optimizer_device == OptimizerDevice.GPU:
        gpu += grads + state_chunk
        if s.state_tier == Tier.GPU:
            gpu += state_chunk * (s.chunks - 1)
        elif s.state_tier == Tier.HOST:
            host += state_chunk * (s.chunks - 1)
        else:
            disk += state_chunk * (s.chunks - 1)
            host += state_chunk  # bounce buffer
        if s.chunks > 1 and s.moves_state:
            gpu += s.prefetch_depth * state_chunk
    else:
        if s.grad_staging is None:
            gpu += grads
            host += 4 * P // s.chunks
        elif s.grad_staging == Tier.HOST:
            host += grads
        else:
            disk += grads
        target = {Tier.HOST: "host", Tier.DISK: "disk"}[s.state_tier]
        if target == "host":
            host += 12 * P
        else:
            disk += 12 * P
            host += state_chunk * (1 + s.prefetch_depth if s.chunks > 1 else 1)
    if s.weights == WeightResidency.STREAM:
        host += 2 * P
    # time: compute, + recompute, + transfers amortised over the update interval unless hidden
    time = 1.0 + (0.33 if s.checkpointing else 0.0) + (0.4 if s.weights == WeightResidency.STREAM else 0.0)
    time += 0.01 * s.chunks
    if s.optimizer_device == OptimizerDevice.HOST:
        time += 2.0 / s.chunks + (0.3 if s.grad_staging == Tier.DISK else 0.0)
    if s.chunks > 1 and s.moves_state:
        switch = (0.6 if s.state_tier == Tier.DISK else 0.2) / (1 + s.prefetch_depth)
        time += switch / s.update_interval
    return make_estimate(s, gpu, round(time, 6), host, disk)


SMALL = SearchSpace(chunk_counts=(1, 2, 3, 4, 6, 8), update_intervals=(1, 4), loss_chunk_tokens=(0, 256))
SMALL_LIST = SMALL.strategies()


def test_space_has_only_valid_distinct_strategies():
    strategies = SMALL.strategies()
    assert len(strategies) == len(set(strategies))
    assert strategies[0] == Strategy()  # plain full FT first
    for s in strategies:
        assert s.chunks > 1 or (s.update_interval == 1 and s.prefetch_depth == 1)
        if s.optimizer_device == OptimizerDevice.GPU:
            assert s.grad_staging is None and (s.chunks > 1 or s.state_tier == Tier.GPU)
        if not (s.chunks > 1 and s.moves_state):
            assert s.prefetch_depth == 1
    # hand count per C > 2: GPU optimizer: state gpu (1) + host (3 depths) + disk (3) = 7;
    # host optimizer: (state host 1 + disk 3) x 3 stagings = 12; x ckpt 2 x weights 2 x loss 2 x intervals 2.
    # C = 2 has one other chunk: depths 0 and 1 only, (1 + 2 + 2) + (1 + 2) x 3 = 14.
    per_level = (7 + 12) * 2 * 2 * 2 * 2
    c2 = 14 * 2 * 2 * 2 * 2
    c1 = (1 + 2 * 3) * 2 * 2 * 2
    assert len(strategies) == c1 + c2 + 4 * per_level
    assert all(s.prefetch_depth < s.chunks for s in strategies if s.chunks > 1)


def test_default_space_chunk_counts():
    assert default_space(num_layers=32, tokens=1024).chunk_counts == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    space = default_space(num_layers=80, tokens=1024)
    assert {5, 10, 20, 40, 80} <= set(space.chunk_counts) and space.loss_chunk_tokens == (0, 256)
    assert default_space(num_layers=2, tokens=128).loss_chunk_tokens == (0,)


BUDGETS = [Budget(gpu_bytes=g * GIB // 4, host_bytes=h, disk_bytes=d)
           for g in (8, 12, 14, 20, 64)
           for h in (None, 6 * GIB, 13 * GIB)
           for d in (None, 2 * GIB)]


@pytest.mark.parametrize("objective", list(Objective))
def test_pruned_solver_equals_brute_force(objective):
    calls = {"n": 0}

    def counting(s):
        calls["n"] += 1
        return toy_cost(s)

    for budget in BUDGETS:
        fast = solve(SMALL_LIST, counting, budget, objective=objective)
        brute = solve(SMALL_LIST, toy_cost, budget, objective=objective, prune=False)
        assert fast.status == brute.status, budget
        if brute.fits:
            assert fast.best.strategy == brute.best.strategy, budget
            # brute force's winner is the minimum over everything that fits
            fitting = [e for e in brute.estimates if e.fits(budget)]
            assert objective_key(brute.best, objective) == min(objective_key(e, objective) for e in fitting)
        else:
            assert fast.missing_bytes == brute.missing_bytes, budget
            assert fast.needed_bytes == brute.needed_bytes, budget
            assert fast.closest.strategy == brute.closest.strategy
        assert len(brute.estimates) == brute.space_size == len(SMALL_LIST)
        assert fast.pruned + len(fast.estimates) <= fast.space_size
    assert calls["n"] < len(BUDGETS) * len(SMALL_LIST)  # pruning did prune


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "brute"])
def test_prepare_sees_each_chunk_count_once_before_its_strategies(prune):
    """solve_model makes a chunk count's traced steps ahead in `prepare`: it must be called once
    per chunk count, before that count's first evaluation, with one strategy per memory group
    (what the evaluated ones read), and change no answer."""
    events = []

    def cost(s):
        events.append(("ev", s.chunks))
        return toy_cost(s)

    def prepare(strategies):
        assert len({s.chunks for s in strategies}) == 1
        assert len({(s.optimizer_device, s.state_tier, s.grad_staging, s.checkpointing, s.weights,
                     s.loss_chunk_tokens) for s in strategies}) == len(strategies)
        events.append(("prepare", strategies[0].chunks))

    budget = BUDGETS[7]
    plain = solve(SMALL_LIST, toy_cost, budget, prune=prune)
    prepared = solve(SMALL_LIST, cost, budget, prune=prune, prepare=prepare)
    assert [e.to_json() for e in prepared.estimates] == [e.to_json() for e in plain.estimates]
    assert prepared.best.strategy == plain.best.strategy
    prepares = [c for kind, c in events if kind == "prepare"]
    assert sorted(prepares) == sorted({c for kind, c in events if kind == "ev"})  # once per count evaluated
    for i, (kind, c) in enumerate(events):
        if kind == "ev":
            assert ("prepare", c) in events[:i]


@pytest.mark.parametrize("objective", list(Objective))
def test_more_budget_never_gives_a_worse_plan(objective):
    for host, disk in ((None, None), (6 * GIB, 2 * GIB), (13 * GIB, None)):
        previous = None
        for g in range(6, 70, 3):
            sol = solve(SMALL_LIST, toy_cost, Budget(gpu_bytes=g * GIB // 4, host_bytes=host, disk_bytes=disk),
                        objective=objective)
            if previous is not None and previous.fits:
                assert sol.fits
                assert objective_key(sol.best, objective) <= objective_key(previous.best, objective)
            previous = sol
    # and more host RAM at a fixed GPU budget
    previous = None
    for h in range(1, 30, 2):
        sol = solve(SMALL_LIST, toy_cost, Budget(gpu_bytes=3 * GIB, host_bytes=h * GIB), objective=objective)
        if previous is not None and previous.fits:
            assert sol.fits and objective_key(sol.best, objective) <= objective_key(previous.best, objective)
        previous = sol


# Hand-solved: three strategies with round numbers.
FULL = Strategy()
FULL_CKPT = Strategy(checkpointing=True)
CHUNKED = Strategy(chunks=4, state_tier=Tier.HOST, prefetch_depth=1)
TABLE = {FULL: (100, 1.0, 0), FULL_CKPT: (80, 1.3, 0), CHUNKED: (50, 1.1, 200)}


def hand_cost(s):
    gpu, t, host = TABLE[s]
    return make_estimate(s, gpu, t, host)


def test_binding_budget_takes_the_strategy_that_exactly_fits():
    fidelity = Objective.FIDELITY
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=100), objective=fidelity)
    assert sol.status == SolveStatus.FITS and sol.best.strategy == FULL
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=99), objective=fidelity)  # one byte short of full FT
    assert sol.best.strategy == FULL_CKPT  # fewest chunks beats faster ChunkFT (fidelity objective)
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=99))  # the default objective is speed
    assert sol.best.strategy == CHUNKED  # 1.1 s < 1.3 s
    assert Objective("memory") is Objective.FIDELITY  # plans written before the rename still load
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=79, host_bytes=200), objective=fidelity)
    assert sol.best.strategy == CHUNKED


def test_slack_budget_takes_the_objective_winner_and_prunes_more_chunks():
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=10**6, host_bytes=10**6), objective=Objective.FIDELITY)
    assert sol.best.strategy == FULL
    assert {e.strategy for e in sol.estimates} == {FULL, FULL_CKPT}  # [R0]: C=4 never evaluated
    assert sol.pruned == 1
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=10**6), objective=Objective.SPEED)
    assert sol.best.strategy == FULL and len(sol.estimates) == 3


def test_infeasible_reports_missing_and_needed_bytes():
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=79, host_bytes=150))
    assert sol.status == SolveStatus.INFEASIBLE and sol.best is None
    # closest: ChunkFT, 50 host bytes short (full FT + ckpt is 1 GPU byte short: closer)
    assert sol.closest.strategy == FULL_CKPT and sol.missing_bytes == {Tier.GPU: 1}
    # with 150 host bytes the smallest GPU that works is 80 (full FT + ckpt); with 79 GPU bytes
    # the smallest host RAM that works is 200 (ChunkFT)
    assert sol.needed_bytes == {Tier.GPU: 80, Tier.HOST: 200}
    sol = solve(list(TABLE), hand_cost, Budget(gpu_bytes=10, host_bytes=10))
    assert sol.needed_bytes == {Tier.GPU: 80, Tier.HOST: None}  # nothing fits 10 GPU bytes


def test_ties_break_on_interval_then_label_not_on_order():
    a = Strategy(chunks=2, state_tier=Tier.HOST, update_interval=4)
    b = replace(a, update_interval=1)
    sol1 = solve([a, b], lambda s: make_estimate(s, 10, 1.0), Budget(gpu_bytes=10))
    sol2 = solve([b, a], lambda s: make_estimate(s, 10, 1.0), Budget(gpu_bytes=10))
    assert sol1.best.strategy == sol2.best.strategy == b


# ------------------------------------------------------------------ the real cost model, small model

@pytest.fixture(scope="module")
def real_costs(tmp_path_factory):
    """Every strategy of a small space priced by planner.evaluate on a 3-layer Llama."""
    from transformers import LlamaConfig

    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.trace import StepShape

    path = tmp_path_factory.mktemp("small-llama")
    LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    model, shape, hw = resolve_model(str(path)), StepShape(seq_len=128, batch=2), hardware("rtx4090")
    space = SearchSpace(chunk_counts=(1, 3), update_intervals=(1, 4), loss_chunk_tokens=(0, 64),
                        prefetch_depths=(0, 1))
    return {s: evaluate(model, shape, s, hw) for s in space.strategies()}


def test_pruning_rules_hold_for_the_real_cost_model(real_costs):
    """R1: the update interval changes no peak; R2: peaks never fall with deeper prefetch."""
    peaks = lambda e: tuple(e.need_bytes(t) for t in Tier)
    for s, e in real_costs.items():
        base = real_costs[replace(s, update_interval=1)]
        assert peaks(e) == peaks(base), s.label()
        deeper = replace(s, prefetch_depth=s.prefetch_depth + 1)
        if deeper in real_costs:
            assert all(a <= b for a, b in zip(peaks(e), peaks(real_costs[deeper]))), s.label()


@pytest.mark.parametrize("objective", list(Objective))
def test_solver_equals_brute_force_on_the_real_cost_model(real_costs, objective):
    strategies = list(real_costs)
    needs = sorted({e.need_bytes(Tier.GPU) for e in real_costs.values()})
    hosts = sorted({e.peak_bytes[Tier.HOST] for e in real_costs.values()})
    budgets = [Budget(gpu_bytes=g, host_bytes=h) for g in (needs[0] - 1, needs[0], needs[len(needs) // 2], needs[-1])
               for h in (None, hosts[1], hosts[len(hosts) // 2])]
    for budget in budgets:
        fast = solve(strategies, real_costs.__getitem__, budget, objective=objective)
        brute = solve(strategies, real_costs.__getitem__, budget, objective=objective, prune=False)
        assert fast.status == brute.status
        if brute.fits:
            assert fast.best is brute.best
        else:
            assert (fast.missing_bytes, fast.needed_bytes) == (brute.missing_bytes, brute.needed_bytes)
    # the smallest GPU need is binding: one byte less and nothing fits
    assert not solve(strategies, real_costs.__getitem__, Budget(gpu_bytes=needs[0] - 1)).fits
    assert solve(strategies, real_costs.__getitem__, Budget(gpu_bytes=needs[0])).fits


# ------------------------------------------------------------------ the seed's headline cases

def test_llama2_7b_at_1k_tokens_fits_13_72_gib_under_chunkft():
    """ChunkFT's headline: a 7B model at 1K tokens in 13.72 GiB (weights resident)."""
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.solve import solve_model
    from planner.trace import StepShape

    budget = Budget(gpu_bytes=round(13.72 * GIB))
    space = SearchSpace(chunk_counts=(1, 128), checkpointing=(True,), loss_chunk_tokens=(256,),
                        weights=(WeightResidency.GPU,))
    sol = solve_model(resolve_model("llama2-7b"), StepShape(seq_len=1024), hardware("rtx4090"), budget, space=space)
    assert sol.fits and sol.best.strategy.chunks == 128  # full FT (C = 1) does not fit 13.72 GiB
    assert sol.best.need_bytes(Tier.GPU) <= budget.gpu_bytes
    weights = sol.best.components[Tier.GPU][Component.WEIGHTS]  # Llama 2 7B's 6,738,415,616 params, bf16
    assert 0 <= weights - 6_738_415_616 * 2 < 2**20  # (+ the rotary inv_freq buffer)


def test_llama3_8b_fits_24_gib():
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.solve import solve_model
    from planner.trace import StepShape

    budget = Budget(gpu_bytes=24 * GIB)
    sol = solve_model(resolve_model("llama3-8b"), StepShape(seq_len=1024), hardware("rtx4090"), budget)
    assert sol.fits and sol.best.need_bytes(Tier.GPU) <= budget.gpu_bytes
    assert sol.best.strategy.weights == WeightResidency.GPU


@pytest.mark.parametrize("objective", list(Objective))
def test_more_budget_never_worse_on_the_real_cost_model(real_costs, objective):
    strategies = list(real_costs)
    needs = sorted({e.need_bytes(Tier.GPU) for e in real_costs.values()})
    previous = None
    for gpu in needs[::3] + [needs[-1]]:
        sol = solve(strategies, real_costs.__getitem__, Budget(gpu_bytes=gpu), objective=objective)
        assert sol.fits  # every listed need is some strategy's: it fits its own need
        if previous is not None:
            assert objective_key(sol.best, objective) <= objective_key(previous.best, objective)
        previous = sol
