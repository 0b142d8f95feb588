"""Lean optimizer state (runtime.lean_state): bf16 moments, torchao's 8-bit moments, pure
precision; on every tier, through checkpoints, in the accounting and in `chunkft run`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from planner.chunks import make_chunk_table_from_model
from planner.errors import ChunkftError
from planner.schema import Tier
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, adamw_update
from runtime.lean_state import BLOCK, Moments, StateFormat, dequantize, quantize, stochastic_bf16
from runtime.offload import OffloadAdamW

ADAMW = AdamWConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
BF16 = StateFormat(moments=Moments.BF16)
INT8 = StateFormat(moments=Moments.INT8)
BF16_PURE = StateFormat(moments=Moments.BF16, master=False)
INT8_PURE = StateFormat(moments=Moments.INT8, master=False)
FORMATS = {"bf16": BF16, "int8": INT8, "bf16-pure": BF16_PURE, "int8-pure": INT8_PURE}


def _model(dtype=torch.bfloat16) -> nn.Module:
    """Weights of 8192 elements (8-bit at C = 1; at C = 3 one span of 5120 is, others are not)
    and small ones (plain moments, as torchao keeps them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8))
    return model.to(dtype)


def _loss(model: nn.Module, i: int) -> torch.Tensor:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(i)).to(next(model.parameters()).dtype)
    return (model(x).float() ** 2).mean()


def _train(model, opt, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        opt.backward(_loss(model, i))
        assert opt.step().stepped


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _held_bytes(opt: ChunkAdamW) -> int:
    """Bytes of the distinct storages the optimizer holds, counted from the tensors."""
    tensors = list(opt._state.values()) + [t for s in opt._store._mem.values() for t in s.values()]
    if opt._pending is not None:
        tensors += list((opt._pending[1].result() or {}).values())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _formula(fmt: StateFormat, numel: int, weight_dtype: torch.dtype) -> int:
    """The documented bytes of a span: master 4 B/param (mixed); moments bf16 2 + 2 B/param;
    8-bit 1 + 1 B/param + 4 B per block of 256 per moment (spans >= 4096 elements and a multiple
    of 256; smaller ones keep plain moments: fp32 under mixed, the weights' dtype under pure)."""
    master = 4 * numel if fmt.master else 0
    if fmt.moments == Moments.INT8 and numel >= 4096 and numel % 256 == 0:
        return master + 2 * numel + 2 * 4 * (numel // 256)
    plain = 2 if fmt.moments == Moments.BF16 or not fmt.master else 4
    return master + 2 * plain * numel


# -- the math ----------------------------------------------------------------------------------


def test_bf16_moments_equal_a_float64_reference_rounded_to_bf16():
    # betas 0.5 / 0.75 and gradients k/16: every fp32 operation on the moments is exact, so the
    # step's fp32 math equals float64 math, and each step's rounding to bf16 is the reference's
    config = AdamWConfig(lr=1e-2, betas=(0.5, 0.75), eps=1e-8)
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(300, generator=gen)
    state = BF16.fresh("w", w0, torch.device("cpu"))
    m64, v64, p64 = torch.zeros(300, dtype=torch.float64), torch.zeros(300, dtype=torch.float64), w0.double()
    for step in range(1, 13):
        g = torch.randint(-16, 17, (300,), generator=gen).double() / 16
        adamw_update(state, "w", g.float(), config=config, lr=config.lr, step=step)
        m64, v64 = m64 + 0.5 * (g - m64), 0.75 * v64 + 0.25 * g * g
        # the update uses the moments before their rounding (as torchao's step does), then they rest in bf16
        p64 = p64 - config.lr / (1 - 0.5**step) * m64 / (v64.sqrt() / (1 - 0.75**step) ** 0.5 + config.eps)
        m64, v64 = m64.bfloat16().double(), v64.bfloat16().double()
        assert state["w/exp_avg"].dtype == state["w/exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(state["w/exp_avg"].double(), m64) and torch.equal(state["w/exp_avg_sq"].double(), v64)
        torch.testing.assert_close(state["w/master"].double(), p64, rtol=1e-6, atol=1e-7)


def test_adamw_bf16_one_chunk_is_close_to_fp32_moments():
    fp32, bf16 = _model(torch.float32), _model(torch.float32)
    w0 = _weights(fp32)
    opts = [ChunkAdamW(m, make_chunk_table_from_model(m, 1), config=ADAMW, state_format=f)
            for m, f in ((fp32, StateFormat()), (bf16, BF16))]
    for m, opt in zip((fp32, bf16), opts):
        _train(m, opt, 20)
        opt.close()
    # the bf16 moments' rounding (2**-9 relative) moves 20 steps of updates by < 1% of their size (0.46%)
    for n, p in fp32.named_parameters():
        moved = (p.detach() - w0[n]).abs().max()
        assert (bf16.get_parameter(n).detach() - p.detach()).abs().max() <= 0.01 * moved, n


def _torchao_reference(w0: torch.Tensor, grads: list[torch.Tensor], config: AdamWConfig):
    """AdamW with moments held in torchao's own OptimState8bit (quantized by its copy_,
    dequantized by its dequantize()), the arithmetic torch.optim.AdamW's."""
    from torchao.optim.subclass_8bit import OptimState8bit

    p = w0.clone()
    m8, v8 = OptimState8bit.zeros(w0.shape, signed=True), OptimState8bit.zeros(w0.shape, signed=False)
    b1, b2 = config.betas
    for step, g in enumerate(grads, 1):
        m, v = m8.dequantize(), v8.dequantize()
        p.mul_(1 - config.lr * config.weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(config.eps)
        p.addcdiv_(m, denom, value=-config.lr / (1 - b1**step))
        m8.copy_(m)
        v8.copy_(v)
    return p, m8, v8


def test_8bit_equals_torchao_quantized_reference_bitwise():
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(64, 128, generator=gen)
    grads = [torch.randn(64, 128, generator=gen) * 10 ** (i % 3 - 1) for i in range(6)]
    state = INT8.fresh("w", w0, torch.device("cpu"))
    assert set(state) == {"w/master", "w/exp_avg.codes", "w/exp_avg.scale", "w/exp_avg_sq.codes", "w/exp_avg_sq.scale"}
    for step, g in enumerate(grads, 1):
        adamw_update(state, "w", g, config=ADAMW, lr=ADAMW.lr, step=step)
    p, m8, v8 = _torchao_reference(w0, grads, ADAMW)
    assert torch.equal(state["w/master"], p)
    assert torch.equal(state["w/exp_avg.codes"], m8.codes) and torch.equal(state["w/exp_avg.scale"], m8.scale)
    assert torch.equal(state["w/exp_avg_sq.codes"], v8.codes) and torch.equal(state["w/exp_avg_sq.scale"], v8.scale)
    assert state["w/exp_avg.codes"].dtype == torch.uint8 and state["w/exp_avg.scale"].shape == (64 * 128 // BLOCK,)
    # the round trip is torchao's: block absmax scaling, nearest code of the dynamic map
    x = torch.randn(4096, generator=gen)
    codes, scale = quantize(x, signed=True)
    assert (dequantize(codes, scale, signed=True) - x).abs().max() <= 0.02 * x.abs().max()


def test_8bit_is_close_to_torchao_adamw8bit():
    from torchao.optim import AdamW8bit

    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(64, 128, generator=gen)
    grads = [torch.randn(64, 128, generator=gen) for _ in range(5)]
    param = nn.Parameter(w0.clone())
    ref = AdamW8bit([param], lr=ADAMW.lr, betas=ADAMW.betas, eps=ADAMW.eps, weight_decay=ADAMW.weight_decay)
    state = INT8.fresh("w", w0, torch.device("cpu"))
    with torch.compiler.set_stance("force_eager"):
        for step, g in enumerate(grads, 1):
            param.grad = g.clone()
            ref.step()
            adamw_update(state, "w", g, config=ADAMW, lr=ADAMW.lr, step=step)
    # same format and state; torchao's own arithmetic differs in rounding (lerp for exp_avg_sq)
    moved = (param.detach() - w0).abs().max()
    assert (state["w/master"] - param.detach()).abs().max() <= 1e-3 * moved  # 3e-4 measured
    for kind in ("exp_avg", "exp_avg_sq"):  # the same codes (none differ with this seed)
        assert (ref.state[param][kind].codes != state[f"w/{kind}.codes"]).float().mean() <= 1e-3


def test_pure_precision_steps_the_bf16_weights_and_holds_no_master():
    model = _model()
    table = make_chunk_table_from_model(model, 3)
    w0 = _weights(model)
    opt = ChunkAdamW(model, table, config=ADAMW, state_format=BF16_PURE)
    _train(model, opt, 3)  # each chunk once
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tensors, meta = opt.state_dict()
    assert not any(k.endswith("/master") for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert meta["state_format"] == {"moments": "bf16", "master": False}
    assert all(not torch.equal(p.detach(), w0[n]) for n, p in model.named_parameters())
    opt.close()
    # one span, by hand: fp32 math on the upcast weights, rounded to bf16 once
    w = torch.randn(300).bfloat16()
    g = torch.randn(300)
    state = BF16_PURE.fresh("w", w, torch.device("cpu"))
    stepped = w.clone()
    adamw_update(state, "w", g, config=ADAMW, lr=ADAMW.lr, step=1, weight=stepped)
    p = w.float() * (1 - ADAMW.lr * ADAMW.weight_decay)
    m = torch.zeros(300).lerp_(g, 0.1)
    v = torch.zeros(300).mul_(0.95).addcmul_(g, g, value=0.05)
    p.addcdiv_(m, (v.sqrt() / 0.05**0.5).add_(ADAMW.eps), value=-ADAMW.lr / 0.1)
    assert torch.equal(stepped, p.bfloat16())
    assert torch.equal(state["w/exp_avg"], m.bfloat16()) and torch.equal(state["w/exp_avg_sq"], v.bfloat16())


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.full((200_000,), 1 + 2**-10)  # an eighth of the way from bf16 1 to the next bf16, 1 + 2**-7
    gen = torch.Generator().manual_seed(0)
    r = stochastic_bf16(x, gen)
    assert set(r.float().unique().tolist()) == {1.0, 1 + 2**-7}
    assert abs(r.double().mean().item() - (1 + 2**-10)) < 2e-5
    assert torch.equal(stochastic_bf16(torch.tensor([float("inf"), -2.5, 0.0]), gen),
                       torch.tensor([float("inf"), -2.5, 0.0]).bfloat16())
    # the same seed gives the same run; another seed another one; round-to-nearest differs
    runs = []
    for seed, sr in ((1, True), (1, True), (2, True), (1, False)):
        model = _model()
        opt = ChunkAdamW(model, make_chunk_table_from_model(model, 1), state_format=BF16_PURE,
                         config=AdamWConfig(lr=1e-3, stochastic_rounding=sr, seed=seed))
        _train(model, opt, 3)
        opt.close()
        runs.append(_weights(model))
    assert _same(runs[0], runs[1]) and not _same(runs[0], runs[2]) and not _same(runs[0], runs[3])


# -- tiers, checkpoints, accounting -------------------------------------------------------------


def _setups(tmp_path):
    yield "gpu", lambda m, t, **kw: ChunkAdamW(m, t, state_tier=Tier.GPU, **kw)
    yield "host", lambda m, t, **kw: ChunkAdamW(m, t, state_tier=Tier.HOST, **kw)
    yield "host-copy", lambda m, t, **kw: ChunkAdamW(m, t, state_tier=Tier.HOST, host_state_in_place=False, **kw)
    yield "disk", lambda m, t, **kw: ChunkAdamW(m, t, state_tier=Tier.DISK, state_dir=tmp_path / "d1", **kw)
    yield "disk-stream", lambda m, t, **kw: ChunkAdamW(m, t, state_tier=Tier.DISK, state_dir=tmp_path / "d2",
                                                       stream_state=True, device="cpu", **kw)
    yield "offload-host", lambda m, t, **kw: OffloadAdamW(m, t, staging=Tier.HOST, state_tier=Tier.HOST, **kw)
    yield "offload-disk", lambda m, t, **kw: OffloadAdamW(m, t, staging=Tier.DISK, staging_dir=tmp_path / "s",
                                                          state_tier=Tier.DISK, state_dir=tmp_path / "d3", **kw)


@pytest.mark.parametrize("name", FORMATS)
def test_every_tier_equals_the_gpu_tier_bitwise(name, tmp_path):
    fmt = FORMATS[name]
    config = AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, stochastic_rounding=True, seed=7)
    results = {}
    for setup, make in _setups(tmp_path / name):
        model = _model()
        opt = make(model, make_chunk_table_from_model(model, 3), config=config, update_interval=1, state_format=fmt)
        _train(model, opt, 5)
        adamw = opt.inner if isinstance(opt, OffloadAdamW) else opt
        results[setup] = (_weights(model), adamw.state_dict()[0])
        opt.close()
    ref_weights, ref_state = results["gpu"]
    for setup, (weights, state) in results.items():
        assert _same(weights, ref_weights) and _same(state, ref_state), setup


@pytest.mark.parametrize("name,tier", [("bf16", Tier.HOST), ("int8", Tier.DISK), ("bf16-pure", Tier.DISK),
                                       ("int8-pure", Tier.GPU)])
def test_resume_equals_an_uninterrupted_run_bitwise(name, tier, tmp_path):
    fmt = FORMATS[name]
    kw = dict(config=AdamWConfig(lr=1e-2, stochastic_rounding=True, seed=3), update_interval=2, state_tier=tier,
              state_format=fmt)
    full = _model()
    opt = ChunkAdamW(full, make_chunk_table_from_model(full, 3), state_dir=tmp_path / "a", **kw)
    _train(full, opt, 7)
    full_state = opt.state_dict()[0]
    opt.close()
    part = _model()
    opt = ChunkAdamW(part, make_chunk_table_from_model(part, 3), state_dir=tmp_path / "b", **kw)
    _train(part, opt, 3)  # mid-chunk: one of the active chunk's two steps taken
    tensors, meta = opt.state_dict()
    opt.close()
    resumed = _model()
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(part.get_parameter(n))
    opt = ChunkAdamW(resumed, make_chunk_table_from_model(resumed, 3), state_dir=tmp_path / "c", **kw)
    opt.load_state_dict(tensors, meta)
    assert _same(opt.state_dict()[0], tensors)  # the round trip is bitwise
    _train(resumed, opt, 4, start=3)
    assert _same(_weights(resumed), _weights(full)) and _same(opt.state_dict()[0], full_state)
    opt.close()


def test_a_checkpoint_of_another_format_is_refused():
    model = _model()
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 1), state_format=BF16)
    tensors, meta = opt.state_dict()
    opt.close()
    other = ChunkAdamW(model, make_chunk_table_from_model(model, 1), state_format=INT8)
    with pytest.raises(ChunkftError, match="holds bf16 moments, fp32 master; this optimizer keeps int8 moments"):
        other.load_state_dict(tensors, meta)
    other.close()
    with pytest.raises(ChunkftError, match="--optim adamw_torch is not an optimizer ChunkAdamW runs; valid: chunkft, "
                                           "adamw_bf16, adamw_torch_8bit"):
        StateFormat.from_recipe("adamw_torch", "mixed")
    with pytest.raises(ChunkftError, match="invalid moments format 'int4'"):
        StateFormat(moments="int4")
    assert StateFormat.from_recipe("adamw_torch_8bit", "pure") == INT8_PURE


def _planner_state_bytes(fmt: StateFormat, numels: list[int]) -> int | None:
    """planner.optim_step's traced state bytes of these spans as ChunkAdamW steps them
    (chunk_spans: the format of runtime.lean_state, stepped on fake tensors). None when the
    planner does not expose step_cost."""
    try:
        from planner.optim_step import step_cost
    except ImportError:
        return None
    optim = {Moments.BF16: "adamw_bf16", Moments.INT8: "adamw_torch_8bit"}[fmt.moments]
    return step_cost(optim, "mixed" if fmt.master else "pure", "bf16", tuple((n,) for n in numels),
                     chunk_spans=True, device="cpu").gpu_state_bytes


@pytest.mark.parametrize("name", FORMATS)
def test_state_bytes_are_the_bytes_held(name, tmp_path):
    fmt = FORMATS[name]
    for tier, in_place in ((Tier.GPU, True), (Tier.HOST, True), (Tier.HOST, False), (Tier.DISK, True)):
        model = _model()
        table = make_chunk_table_from_model(model, 3)
        opt = ChunkAdamW(model, table, config=ADAMW, state_tier=tier, host_state_in_place=in_place,
                         state_dir=tmp_path / "s", state_format=fmt)
        _train(model, opt, 2)
        numels = [[s.nbytes // 2 for s in table.chunks[k]] for k in range(3)]
        per_chunk = [sum(_formula(fmt, n, torch.bfloat16) for n in ns) for ns in numels]
        assert [opt.chunk_state_bytes(k) for k in range(3)] == per_chunk
        planner = [_planner_state_bytes(fmt, ns) for ns in numels]
        assert planner == per_chunk or planner == [None] * 3
        total = sum(per_chunk)
        working = per_chunk[opt.active_chunk] + per_chunk[(opt.active_chunk + 1) % 3]  # active + prefetched
        held = _held_bytes(opt)
        by_tier = opt.state_bytes()
        if tier == Tier.DISK:  # the resting state is in files (safetensors: tensors plus a header each)
            assert held == by_tier[Tier.HOST] == working
            assert total < by_tier[Tier.DISK] < total + 3 * 2048
        elif in_place:
            assert held == sum(by_tier.values()) == total
        else:  # resting in one flat buffer per chunk (runtime.host_buffer): tensors at 64-byte offsets
            assert held == sum(by_tier.values())
            tensors = sum(len(state) for state in opt._store._mem.values())
            assert total <= by_tier[Tier.HOST] - working < total + 64 * tensors
        master, moments = opt.split_bytes(total)
        assert master == (sum(4 * n for ns in numels for n in ns) if fmt.master else 0) and master + moments == total
        opt.close()


# -- chunkft run -------------------------------------------------------------------------------


@pytest.mark.parametrize("optim,dtypes", [("adamw_bf16", {torch.float32, torch.bfloat16}),
                                          ("adamw_torch_8bit", {torch.float32, torch.uint8})])
def test_chunkft_run_executes_a_lean_state_plan_and_resumes_it(optim, dtypes, tmp_path, capsys):
    from safetensors.torch import load_file

    from planner.cli import main
    from planner.recipe import Recipe
    from runtime.checkpoint import latest_checkpoint
    from runtime.run_cli import build_run
    from tests.test_train import _args, make_plan, write_data

    plan, _, _ = make_plan(tmp_path, chunks=3, dtype="bf16", state_tier=Tier.HOST, recipe=Recipe(optim=optim))
    train = write_data(tmp_path / "train.jsonl")
    trainer, _, _, _ = build_run(_args(plan, train, tmp_path / "full", steps=4, checkpoint_every=1))
    result = trainer.train()
    assert result.final_step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    adamw = trainer.optimizer.adamw
    assert adamw.state_format == StateFormat.from_recipe(optim)
    tensors, meta = adamw.state_dict()
    assert {t.dtype for t in tensors.values()} == dtypes
    assert meta["state_format"]["moments"] == adamw.state_format.moments.value
    # resting: every chunk on the host; beside it (a GPU-step plan on a CPU) the active and prefetched copies
    total = sum(_formula(adamw.state_format, s.nbytes // 2, torch.bfloat16) for ch in adamw.table.chunks for s in ch)
    assert total == sum(map(adamw.chunk_state_bytes, range(3)))
    tier, resting = adamw.resting_bytes()  # one flat buffer per chunk, tensors at 64-byte offsets
    assert tier == Tier.HOST and total <= resting < total + 64 * sum(len(s) for s in adamw._store._mem.values())
    working = adamw.chunk_state_bytes(adamw.active_chunk) + adamw.chunk_state_bytes((adamw.active_chunk + 1) % 3)
    assert adamw.state_bytes() == {Tier.HOST: resting + working} and _held_bytes(adamw) == resting + working
    trainer.optimizer.inner.close()
    trainer.claimed.release()
    # killed after step 2, resumed by the command line: the same weights as the run above
    part, _, _, _ = build_run(_args(plan, train, tmp_path / "part", steps=4, checkpoint_every=1))
    part.train(stop_after=2)
    part.optimizer.inner.close()
    part.claimed.release()
    assert main(["run", str(plan), "--data", str(train), "--steps", "4", "--out", str(tmp_path / "part"), "--resume",
                 "--checkpoint-every", "1", "--device", "cpu", "--lr", "1e-3", "--no-progress"]) == 0
    assert f"optimizer state: {adamw.state_format.describe()}" in capsys.readouterr().out
    a = load_file(latest_checkpoint(tmp_path / "full") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "part") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
