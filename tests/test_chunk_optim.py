"""ChunkAdamW: parity with torch.optim.AdamW, chunk locality, tiers, cycling, fp16, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from planner.chunks import make_chunk_table_from_model
from planner.errors import ChunkftError
from planner.schema import Tier
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule
from runtime.scaler import LossScaler, ScalerConfig

CFG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    tie_word_embeddings=True,
    pad_token_id=0,
)
ADAMW = AdamWConfig(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)




def _model(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype)


def _batch(i: int) -> torch.Tensor:
    return torch.randint(1, CFG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(100 + i))


def _backward(model, i: int, accum: int = 1, backward=None, loss_mult: float = 1.0) -> None:
    for j in range(accum):
        ids = _batch(i * accum + j)
        loss = model(input_ids=ids, labels=ids).loss * (loss_mult / accum)
        (backward or torch.Tensor.backward)(loss)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "dtype,max_grad_norm", [(torch.float64, None), (torch.float64, 0.5), (torch.float32, None), (torch.float32, 0.5)]
)
def test_one_chunk_equals_torch_adamw(dtype, max_grad_norm):
    ref, mine = _model(dtype), _model(dtype)
    torch_opt = torch.optim.AdamW(
        ref.parameters(), lr=ADAMW.lr, betas=ADAMW.betas, eps=ADAMW.eps, weight_decay=ADAMW.weight_decay
    )
    config = AdamWConfig(
        lr=ADAMW.lr, betas=ADAMW.betas, eps=ADAMW.eps, weight_decay=ADAMW.weight_decay, max_grad_norm=max_grad_norm
    )
    opt = ChunkAdamW(mine, make_chunk_table_from_model(mine, 1), config=config)
    for i in range(6):
        _backward(ref, i, accum=2)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        torch_opt.step()
        torch_opt.zero_grad()
        _backward(mine, i, accum=2)
        result = opt.step()
        assert result.stepped and result.chunk == 0 and result.switched_to is None
        for name, p in mine.named_parameters():
            assert_close(p, dict(ref.named_parameters())[name], rtol=0, atol=0, msg=f"step {i} {name}")
    opt.close()


def _element_stream(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_each_step_changes_exactly_the_active_chunk():
    model = _model(torch.float32)
    table = make_chunk_table_from_model(model, 5)
    # the chunk's elements in the module-order stream (dim-0 cuts keep each chunk contiguous)
    bounds = [0]
    for k in range(5):
        bounds.append(bounds[-1] + table.chunk_bytes(k) // 4)
    opt = ChunkAdamW(model, table, config=ADAMW, update_interval=2)
    for i in range(12):
        before = _element_stream(model)
        k = opt.active_chunk
        _backward(model, i)
        opt.step()
        changed = (_element_stream(model) != before).nonzero().flatten()
        assert changed.tolist() == list(range(bounds[k], bounds[k + 1])), f"step {i}, chunk {k}"
    opt.close()


def test_chunks_cycle_after_update_interval():
    model = _model()
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 3), config=ADAMW, update_interval=2)
    seen, switches = [], []
    for i in range(8):
        seen.append(opt.active_chunk)
        spec = opt.table.grad_spec(opt.active_chunk)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, v in spec.items() if v is True}
        _backward(model, i)
        switches.append(opt.step().switched_to)
    assert seen == [0, 0, 1, 1, 2, 2, 0, 0]
    assert switches == [None, 1, None, 2, None, 0, None, 1]
    assert opt.global_step == 8
    opt.close()


def _run(model, opt, steps, start=0):
    for i in range(start, start + steps):
        _backward(model, i)
        opt.step()


@pytest.mark.parametrize(
    "tier,prefetch,chunks", [(Tier.HOST, 1, 3), (Tier.DISK, 1, 3), (Tier.DISK, 0, 3), (Tier.DISK, 1, 2)]
)
def test_resting_tiers_give_the_same_trajectory(tmp_path, tier, prefetch, chunks):
    ref, mine = _model(), _model()
    ref_opt = ChunkAdamW(ref, make_chunk_table_from_model(ref, chunks), config=ADAMW, state_tier=Tier.GPU)
    opt = ChunkAdamW(
        mine, make_chunk_table_from_model(mine, chunks), config=ADAMW, state_tier=tier, state_dir=tmp_path,
        prefetch_depth=prefetch,
    )
    _run(ref, ref_opt, 8)
    _run(mine, opt, 8)
    for (name, a), b in zip(ref.named_parameters(), mine.parameters()):
        assert torch.equal(a, b), name
    if tier == Tier.DISK:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["OWNER.json"] + [
            f"chunk0000{k}.safetensors" for k in range(chunks)]
    opt.close()
    ref_opt.close()


def test_disk_state_round_trips_exactly(tmp_path):
    model = _model()
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 2), config=ADAMW, state_tier=Tier.DISK, state_dir=tmp_path)
    _run(model, opt, 1)  # chunk 0 stepped and evicted to disk
    assert opt.active_chunk == 1
    on_disk = load_file(str(tmp_path / "chunk00000.safetensors"))
    _run(model, opt, 1, start=1)  # chunk 1 evicted, chunk 0 comes back from disk
    assert opt.active_chunk == 0
    assert set(on_disk) == set(opt._state) and all(torch.equal(on_disk[n], opt._state[n]) for n in on_disk)
    params = dict(model.named_parameters())
    for span in opt.table.chunks[0]:  # fp32 model: the masters are exactly the weights they wrote
        weight = params[span.param].detach().narrow(span.dim, span.start, span.end - span.start)
        assert torch.equal(on_disk[f"{span.param}/master"], weight)
        assert on_disk[f"{span.param}/exp_avg_sq"].abs().sum() > 0
    opt.close()


def test_fp16_overflow_is_skipped_without_advancing(tmp_path):
    model = _model(torch.float16)
    scaler = LossScaler(ScalerConfig(init_scale=2.0**10, growth_interval=2))
    schedule = LRSchedule(kind="cosine", warmup_steps=2, total_steps=10)
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 3), config=ADAMW, schedule=schedule, scaler=scaler)
    _backward(model, 0, backward=opt.backward)
    first = opt.step()
    assert first.stepped and first.switched_to == 1 and first.loss_scale == 2.0**10
    before, lr_before = _weights(model), opt.lr()
    state_before, meta_before = opt.state_dict()
    _backward(model, 1, backward=opt.backward, loss_mult=math.inf)  # every gradient overflows
    skipped = opt.step()
    assert not skipped.stepped and skipped.chunk == 1 and skipped.switched_to is None
    assert opt.active_chunk == 1 and opt.global_step == 1 and opt.lr() == lr_before
    assert scaler.scale == 2.0**9
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    # every chunk's fp32 master and both moments are untouched too, and the span step counts
    state_after, meta_after = opt.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    assert meta_after["span_steps"] == meta_before["span_steps"]
    assert not opt.handle.grads()
    for i in (2, 3):
        _backward(model, i, backward=opt.backward)
        assert opt.step().stepped
    assert opt.active_chunk == 0 and opt.global_step == 3 and scaler.scale == 2.0**10  # grew after 2 good steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


def test_real_fp16_overflow_backs_off_until_finite():
    model = _model(torch.float16)
    scaler = LossScaler(ScalerConfig(init_scale=2.0**40))  # far beyond fp16's 65504
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 2), config=ADAMW, scaler=scaler)
    results = []
    for i in range(40):
        _backward(model, i, backward=opt.backward)
        results.append(opt.step())
        if results[-1].stepped:
            break
    skipped = [r for r in results if not r.stepped]
    assert skipped and results[-1].stepped and opt.global_step == 1
    assert [r.loss_scale for r in results] == [2.0 ** (40 - i) for i in range(len(results))]
    assert all(r.chunk == 0 for r in results)
    opt.close()


def test_state_dict_round_trip_gives_identical_steps(tmp_path):
    schedule = LRSchedule(kind="cosine", warmup_steps=3, total_steps=20, min_lr_ratio=0.1)
    model = _model()
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 3), config=ADAMW, schedule=schedule, update_interval=2,
                     state_tier=Tier.DISK, state_dir=tmp_path / "a")
    _run(model, opt, 3)  # mid-interval on chunk 1
    tensors, meta = opt.state_dict()
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    saved_weights = _weights(model)
    _run(model, opt, 5, start=3)

    resumed = _model()
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(saved_weights[n])
    opt2 = ChunkAdamW(resumed, make_chunk_table_from_model(resumed, 3), config=AdamWConfig(lr=1.0),
                      state_tier=Tier.HOST)
    opt2.load_state_dict(load_file(str(tmp_path / "opt.safetensors")), json.loads((tmp_path / "opt.json").read_text()))
    assert (opt2.active_chunk, opt2.active_steps, opt2.global_step) == (1, 1, 3) and opt2.config == ADAMW
    _run(resumed, opt2, 5, start=3)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    opt.close()
    opt2.close()


def test_state_dict_rejects_another_table():
    model = _model()
    opt = ChunkAdamW(model, make_chunk_table_from_model(model, 3), config=ADAMW)
    tensors, meta = opt.state_dict()
    opt.close()
    other = ChunkAdamW(model, make_chunk_table_from_model(model, 2), config=ADAMW)
    with pytest.raises(ChunkftError, match="different chunk table"):
        other.load_state_dict(tensors, meta)
    other.close()


def test_lr_schedule_values():
    cosine = LRSchedule(kind="cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [cosine.factor(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine.factor(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine.factor(14) == pytest.approx(0.1) and cosine.factor(99) == pytest.approx(0.1)
    assert LRSchedule().factor(1000) == 1.0
    with pytest.raises(ChunkftError, match="'constant', 'cosine'"):
        LRSchedule(kind="linear")


def test_state_bytes_by_tier(tmp_path):
    model = _model()
    table = make_chunk_table_from_model(model, 2)
    opt = ChunkAdamW(model, table, config=ADAMW, state_tier=Tier.HOST)
    _run(model, opt, 2)  # both chunks have state now
    assert opt.state_bytes() == {Tier.HOST: 3 * (table.chunk_bytes(0) + table.chunk_bytes(1))}
    opt.close()


@pytest.mark.parametrize("chunks,interval", [(3, 1), (5, 2)])
def test_chunks_step_as_one_torch_adamw_per_span(chunks, interval):
    """C > 1 against an independent reference: every span of the table (a whole tensor or a
    slice) is its own torch.optim.AdamW over a leaf copy of that span, stepped with the span's
    slice of the dense (autograd) gradient whenever its chunk is active, and written back. After
    cycling through every chunk twice the weights agree in float64 to the last bits (tied
    embeddings, weight decay, per-span step counts and bias correction, chunks cutting tensors)."""
    ref, mine = _model(torch.float64), _model(torch.float64)
    table = make_chunk_table_from_model(mine, chunks)
    assert any(not table.is_whole(s) for c in table.chunks for s in c)  # some chunk cuts a tensor
    params = dict(ref.named_parameters())

    def view(span):
        p = params[span.param].detach()
        return p if table.is_whole(span) else p.narrow(span.dim, span.start, span.end - span.start)

    refs = []  # per chunk: (span, leaf copy, its AdamW)
    for spans in table.chunks:
        row = []
        for span in spans:
            leaf = view(span).clone().requires_grad_(True)
            row.append((span, leaf, torch.optim.AdamW([leaf], lr=ADAMW.lr, betas=ADAMW.betas, eps=ADAMW.eps,
                                                      weight_decay=ADAMW.weight_decay)))
        refs.append(row)
    opt = ChunkAdamW(mine, table, config=ADAMW, update_interval=interval)
    for i in range(2 * chunks * interval):
        k = opt.active_chunk
        assert k == (i // interval) % chunks
        _backward(ref, i)
        for span, leaf, adamw in refs[k]:
            g = params[span.param].grad
            leaf.grad = (g if table.is_whole(span) else g.narrow(span.dim, span.start, span.end - span.start)).clone()
            adamw.step()
            with torch.no_grad():
                view(span).copy_(leaf)
        ref.zero_grad(set_to_none=True)
        _backward(mine, i)
        assert opt.step().stepped
        for name, p in mine.named_parameters():
            # a slice's gradient comes from its own (narrower) matmul, one float64 rounding apart
            assert_close(p, params[name], rtol=1e-12, atol=1e-15, msg=lambda m, i=i, name=name: f"step {i} {name}: {m}")
    opt.close()
