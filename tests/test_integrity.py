"""Training state never silently goes wrong: non-finite sums, leftover state, double state,
honest state accounting, and the LR schedule against torch's own schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from planner.chunks import make_chunk_table_from_model
from planner.errors import ChunkftError
from planner.schema import Tier
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule
from runtime.offload import OffloadAdamW
from runtime.scaler import LossScaler, ScalerConfig
from runtime.train import Schedule, TorchAdamW

PIECE = 46624.0  # an fp16 value: two of them sum past 65504 to inf
ADAMW = AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)


def _linear(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(4, 8) * 0.1)
    return model.to(dtype)


def _backward(model: nn.Module, backward, mult: float) -> None:
    """d loss / d W = mult for every element (x = ones, loss = sum of outputs * mult)."""
    x = torch.ones(1, 8, dtype=next(model.parameters()).dtype)
    backward(model(x).float().sum() * mult)


def _snapshot(model, opt: ChunkAdamW) -> dict[str, torch.Tensor]:
    """Weights, and every chunk's master and moments (as a checkpoint would hold them)."""
    tensors, _ = opt.state_dict()
    return {**{f"w/{n}": p.detach().clone() for n, p in model.named_parameters()}, **tensors}


def _optimizer(kind: str, model, table, tmp_path, scaler=None):
    if kind == "chunk":
        return ChunkAdamW(model, table, config=ADAMW, scaler=scaler)
    return _Offload(model, table, Tier.HOST if kind == "offload-host" else Tier.DISK, tmp_path, scaler)


class _Offload:
    """OffloadAdamW (16-bit gradients staged on host or disk, host AdamW) with the surface the
    tests use; its state is its inner ChunkAdamW's."""

    def __init__(self, model, table, staging: Tier, tmp_path, scaler):
        self.outer = OffloadAdamW(model, table, staging=staging, staging_dir=tmp_path / "staging", config=ADAMW,
                                  scaler=scaler, state_tier=Tier.HOST)
        self.backward, self.step, self.zero_grad = self.outer.backward, self.outer.step, self.outer.zero_grad

    def state_dict(self):
        return self.outer.inner.state_dict()


@pytest.mark.parametrize("kind,chunks", [("chunk", 1), ("chunk", 2), ("offload-host", 1), ("offload-disk", 2)])
def test_fp16_overflow_in_the_accumulated_sum_is_skipped(kind, chunks, tmp_path):
    # Every piece is finite (46,624 per micro-batch), their 16-bit sum is inf: in p.grad (whole
    # tensor), in a slice's side table (2 chunks cut the weight into row slices), in the staged
    # host buffer, or summed from the disk records. The step must see the sum.
    model = _linear(torch.float16)
    table = make_chunk_table_from_model(model, chunks)
    scaler = LossScaler(ScalerConfig(init_scale=1.0))
    opt = _optimizer(kind, model, table, tmp_path, scaler=scaler)
    before = _snapshot(model, opt)
    opt.zero_grad()
    for _ in range(2):
        _backward(model, opt.backward, PIECE)
    result = opt.step()
    assert not result.stepped and "accumulated gradient of '0.weight'" in result.skipped_because
    assert scaler.scale == 0.5  # backed off
    after = _snapshot(model, opt)
    assert after.keys() == before.keys()
    for name in before:  # weights, masters and both moments: untouched and finite
        assert torch.equal(after[name], before[name]) and bool(torch.isfinite(after[name]).all()), name
    # one micro-batch of the same size is finite: that step is taken
    opt.zero_grad()
    _backward(model, opt.backward, PIECE)
    assert opt.step().stepped
    assert all(bool(torch.isfinite(t).all()) for t in _snapshot(model, opt).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_finite_gradient_is_skipped_then_stops_the_run(dtype):
    model = _linear(dtype)
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 2), config=ADAMW, max_nonfinite_steps=3)
    before = _snapshot(model, opt)
    for attempt in range(2):
        opt.zero_grad()
        _backward(model, opt.backward, math.inf)
        result = opt.step()
        assert not result.stepped and result.grad_norm is None
        assert "inf/nan in the accumulated gradient of '0.weight'" in result.skipped_because
    after = _snapshot(model, opt)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert opt.global_step == 0 and opt.active_chunk == 0  # neither the schedule nor the chunk moved
    # a finite step resets the count; three non-finite steps in a row then stop with one line
    opt.zero_grad()
    _backward(model, opt.backward, 1.0)
    assert opt.step().stepped and opt.guard.streak == 0
    for attempt in range(2):
        opt.zero_grad()
        _backward(model, opt.backward, math.nan)
        assert not opt.step().stepped
    opt.zero_grad()
    _backward(model, opt.backward, math.nan)
    with pytest.raises(ChunkftError, match=r"^3 optimizer steps in a row had non-finite gradients .*--max-nonfinite"):
        opt.step()


def test_torch_adamw_baseline_skips_non_finite_steps():
    model = _linear(torch.bfloat16)
    opt = TorchAdamW(dict(model.named_parameters()), schedule=Schedule(lr=1e-2))
    before = model[0].weight.detach().clone()
    opt.begin_step()
    _backward(model, opt.backward, math.inf)
    assert opt.step() is False and "'0.weight'" in opt.last_skip
    assert torch.equal(model[0].weight, before) and not opt.optimizer.state  # no moments were created
    opt.begin_step()
    _backward(model, opt.backward, 1.0)
    assert opt.step() is True and not torch.equal(model[0].weight, before)


def test_disk_tier_never_reads_state_it_did_not_write(tmp_path):
    # A leftover state directory (another run's, or a run killed before its checkpoint) holds
    # files with the names this run would write: they are deleted, never read.
    from safetensors.torch import save_file

    def train(state_dir):
        model = _linear(torch.float32)
        opt = ChunkAdamW(model, make_chunk_table_from_model(model, 2), config=ADAMW, state_tier=Tier.DISK,
                         state_dir=state_dir, device="cpu", stream_state=True, run_id="run-b")
        for i in range(4):
            opt.zero_grad()
            _backward(model, opt.backward, 0.5 + i)
            assert opt.step().stepped
        return model[0].weight.detach().clone()

    stale = tmp_path / "stale"
    stale.mkdir()
    junk = {"0.weight/master": torch.full((2, 8), 7.0), "0.weight/exp_avg": torch.ones(2, 8),
            "0.weight/exp_avg_sq": torch.ones(2, 8)}
    for k in range(2):
        save_file(junk, str(stale / f"chunk{k:05d}.0.weight.safetensors"))
    (stale / ".chunk00000.0.weight.safetensors.x.tmp").write_bytes(b"half a file")
    assert torch.equal(train(stale), train(tmp_path / "clean"))
    import json

    assert json.loads((stale / "OWNER.json").read_text())["run_id"] == "run-b"
    assert not list(stale.glob(".*.tmp"))


def _held_bytes(opt: ChunkAdamW) -> int:
    """Bytes of distinct storages the optimizer holds (active, resting, prefetched): counted
    from the tensors themselves, not from the optimizer's bookkeeping."""
    tensors = list(opt._state.values()) + [t for s in opt._store._mem.values() for t in s.values()]
    if opt._pending is not None:
        tensors += list((opt._pending[1].result() or {}).values())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("tier,in_place,chunks", [(Tier.GPU, True, 1), (Tier.GPU, True, 3), (Tier.HOST, True, 1),
                                                  (Tier.HOST, True, 3), (Tier.HOST, False, 3)])
def test_state_is_held_once_after_resume_and_counted_as_held(tier, in_place, chunks):
    model = _linear(torch.float32)
    table = make_chunk_table_from_model(model, chunks)
    kw = dict(config=ADAMW, state_tier=tier, host_state_in_place=in_place, update_interval=2)
    opt = ChunkAdamW(model, table, **kw)
    for i in range(3):  # mid-chunk: the active chunk has taken one of its two steps
        opt.zero_grad()
        _backward(model, opt.backward, 1.0 + i)
        opt.step()
    tensors, meta = opt.state_dict()
    total = 3 * sum(table.chunk_bytes(k) for k in range(chunks))
    working = 3 * (table.chunk_bytes(opt.active_chunk) + (table.chunk_bytes((opt.active_chunk + 1) % chunks)
                                                          if chunks > 1 else 0))
    if not (tier == Tier.GPU or in_place):  # resting in one flat buffer per chunk, 64-byte aligned tensors
        from planner.streaming import layer_packing

        total = sum(layer_packing([((s.nbytes // 4,), 4) for s in table.chunks[k] for _ in range(3)])[1]
                    for k in range(chunks))
    expected = total if (tier == Tier.GPU or in_place) else total + working
    assert _held_bytes(opt) == sum(opt.state_bytes().values()) == expected
    resumed = ChunkAdamW(_linear(torch.float32), table, **kw)
    resumed.load_state_dict(tensors, meta)
    # the restored active chunk exists once (C = 1: one fp32 master and two moments, not two sets)
    assert _held_bytes(resumed) == sum(resumed.state_bytes().values()) == expected
    opt.close()
    resumed.close()


def test_lr_schedule_equals_torch_schedulers():
    # LRSchedule against torch's own: LinearLR warm-up then CosineAnnealingLR down to min_lr_ratio
    lr, warmup, total, ratio = 3e-4, 5, 40, 0.1
    ours = LRSchedule(kind="cosine", warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=ratio * lr),
    ], milestones=[warmup])
    for step in range(total + 5):
        theirs = opt.param_groups[0]["lr"] if step <= total else ratio * lr  # torch's cosine turns back up
        assert lr * ours.factor(step) == pytest.approx(theirs, rel=1e-9, abs=1e-15), step
        assert Schedule(lr=lr, warmup_steps=warmup, total_steps=total, min_ratio=ratio).at(step) == pytest.approx(
            lr * ours.factor(step), rel=1e-12)
        opt.step()
        sched.step()
    constant = LRSchedule(kind="constant", warmup_steps=3)
    assert [constant.factor(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("bad,message", [
    (dict(lr=math.nan), "lr must be a finite number >= 0, got nan"),
    (dict(weight_decay=math.nan), "weight_decay must be a finite number >= 0"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number > 0 or None, got -1.0"),
    (dict(betas=(0.9, 1.0)), "betas must be two numbers in [0, 1)"),
    (dict(eps=0.0), "eps must be a finite number > 0"),
])
def test_adamw_config_refuses_values_that_corrupt_state(bad, message):
    import re

    with pytest.raises(ChunkftError, match=re.escape(message)):
        AdamWConfig(**bad)


def test_sharded_optimizer_skips_a_non_finite_step_in_every_dtype():
    # ShardedChunkAdamW (here unsharded: one process) checks what it consumes for bf16 and
    # fp32 too, not only under the fp16 scaler
    from runtime.sharded_optim import ShardedChunkAdamW

    model = _linear(torch.bfloat16)
    opt = ShardedChunkAdamW(model, make_chunk_table_from_model(model, 2), config=ADAMW, max_nonfinite_steps=2)
    before = model[0].weight.detach().clone()
    _backward(model, opt.backward, math.inf)
    result = opt.step()
    assert not result.stepped and result.skipped_because == "inf/nan in an accumulated gradient"
    assert torch.equal(model[0].weight, before) and opt.global_step == 0
    _backward(model, opt.backward, math.nan)
    with pytest.raises(ChunkftError, match="2 optimizer steps in a row had non-finite gradients"):
        opt.step()
