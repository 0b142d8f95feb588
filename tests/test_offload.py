"""NVMSA offloading: same updates as the on-device optimizer, overflow skip, disk-tier failures."""

from __future__ import annotations

import errno
import io

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from planner.chunks import make_chunk_table_from_model
from planner.errors import ChunkftError
from planner.schema import Component, Tier
from runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from runtime.chunk_optim import AdamWConfig, ChunkAdamW
from runtime.disk_store import DiskLog
from runtime.offload import OffloadAdamW, OffloadOptimizer
from runtime.scaler import LossScaler, ScalerConfig

CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=4, tie_word_embeddings=False, pad_token_id=0)
ADAMW = AdamWConfig(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=0.5)




def _model(dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype)


def _loss(model, i: int) -> torch.Tensor:
    ids = torch.randint(1, CFG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(100 + i))
    return model(input_ids=ids, labels=ids).loss


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _table(model, chunks):
    return make_chunk_table_from_model(model, chunks)


@pytest.mark.parametrize("chunks,staging,state", [(1, Tier.HOST, Tier.HOST), (3, Tier.HOST, Tier.HOST),
                                                  (3, Tier.DISK, Tier.HOST), (1, Tier.DISK, Tier.DISK),
                                                  (3, Tier.HOST, Tier.DISK)])
def test_offloaded_step_equals_on_device_step_bitwise(chunks, staging, state, tmp_path):
    """bf16 model, 2 micro-batches, clipping: the host step on staged 16-bit gradients gives
    exactly the on-device ChunkAdamW weights (both accumulate in bf16, cast at the optimizer),
    with the fp32 state in host memory or streamed span by span from disk."""
    ref, mine = _model(torch.bfloat16), _model(torch.bfloat16)
    ref_opt = ChunkAdamW(ref, _table(ref, chunks), config=ADAMW)
    opt = OffloadAdamW(mine, _table(mine, chunks), staging=staging, staging_dir=tmp_path / "staging",
                       config=ADAMW, state_tier=state, state_dir=tmp_path / "state")
    for step in range(5):
        trained = {s.param for s in opt.table.chunks[opt.active_chunk]}
        opt.zero_grad()
        for j in range(2):
            ref_opt.backward(_loss(ref, 2 * step + j) / 2)
            opt.backward(_loss(mine, 2 * step + j) / 2)
            # nothing of the gradients is left on the device after a backward
            assert all(p.grad is None for p in mine.parameters()) and not opt.inner.handle.grads()
        staged = opt.staged_bytes()[staging]
        expected = sum(s.nbytes for s in opt.table.chunks[opt.active_chunk])  # bf16 bytes of the chunk
        assert staged == expected * (2 if staging == Tier.DISK else 1)  # disk keeps each micro-batch
        assert opt.staged_count >= 2 * len(trained)  # each micro-batch's gradient of each span
        a, b = ref_opt.step(), opt.step()
        assert a.stepped and b.stepped and a.grad_norm == b.grad_norm and a.switched_to == b.switched_to
        for name, p in mine.named_parameters():
            assert torch.equal(p, dict(ref.named_parameters())[name]), f"step {step} {name}"
    if state == Tier.DISK:  # every span's state on disk, none of it in host memory between steps
        assert opt.inner.state_bytes() == {Tier.HOST: 0, Tier.DISK: opt.inner._store.nbytes()}
        spans = sum(len(c) for c in opt.table.chunks)  # a file per span (tensors cut by chunks: two)
        assert len(list((tmp_path / "state").glob("*.safetensors"))) == spans
        tensors, meta = opt.inner.state_dict()  # resume: a fresh streamed optimizer continues the same
        again = _model(torch.bfloat16)
        with torch.no_grad():
            for p, q in zip(again.parameters(), mine.parameters()):
                p.copy_(q)
        opt2 = OffloadAdamW(again, _table(again, chunks), staging=Tier.HOST, config=ADAMW, state_tier=Tier.DISK,
                            state_dir=tmp_path / "state2")
        opt2.inner.load_state_dict(tensors, meta)
        for o, m in ((opt, mine), (opt2, again)):
            o.zero_grad()
            o.backward(_loss(m, 99))
            o.step()
        assert all(torch.equal(p, q) for p, q in zip(again.parameters(), mine.parameters()))
        opt2.close()
    ref_opt.close()
    opt.close()
    assert not list((tmp_path / "staging").glob("grads.bin*")) if staging == Tier.DISK else True


def test_fp32_model_staged_in_bf16_matches_rounded_reference():
    """fp32 weights, gradients staged in bf16: exactly the on-device step fed the same bf16-rounded
    gradients, and close to the unrounded fp32 step."""
    exact, rounded, mine = _model(torch.float32), _model(torch.float32), _model(torch.float32)
    config = AdamWConfig(lr=1e-2, weight_decay=0.1)
    opts = [ChunkAdamW(m, _table(m, 3), config=config) for m in (exact, rounded)]
    opt = OffloadAdamW(mine, _table(mine, 3), staging=Tier.HOST, staging_dtype=torch.bfloat16, config=config)
    for step in range(6):
        for m, o in zip((exact, rounded), opts):
            o.zero_grad()
            o.backward(_loss(m, step))
        opts[0].step()
        opts[1].step(grads={n: g.to(torch.bfloat16) for n, g in opts[1].handle.grads().items()})
        opt.zero_grad()
        opt.backward(_loss(mine, step))
        opt.step()
    drift = 0.0
    for name, p in mine.named_parameters():
        assert torch.equal(p, dict(rounded.named_parameters())[name]), name
        drift = max(drift, float((p - dict(exact.named_parameters())[name]).detach().abs().max()))
    # Adam normalises the step: bf16's 3 significant digits move each update by ~0.4% of lr
    assert 0 < drift < 0.05 * config.lr * 6, drift
    for o in (*opts, opt):
        o.close()


class _Bomb(torch.autograd.Function):
    """Identity whose backward puts one inf into the gradient flowing through it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = float("inf")
        return g


class _CountingScaler(LossScaler):
    """Records the order in which gradients reach the on-the-fly check."""

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[str] = []

    def check(self, name, grad):
        self.seen.append(name)
        super().check(name, grad)


def test_overflow_abandons_the_step_on_the_fly():
    """fp16: an inf in the final norm's output gradient. lm_head's gradient (produced before it)
    is staged; the norm's (the first non-finite one) and every later one are checked as they
    arrive but not staged; the step is skipped, weights unchanged, the scale halved; the next
    step trains normally."""
    model = _model(torch.float16)
    scaler = _CountingScaler(ScalerConfig(init_scale=2.0**10))
    opt = OffloadAdamW(model, _table(model, 1), staging=Tier.HOST, config=AdamWConfig(lr=1e-3), scaler=scaler)
    hook = model.model.norm.register_forward_hook(lambda m, a, out: _Bomb.apply(out))
    before = _weights(model)
    opt.zero_grad()
    opt.backward(_loss(model, 0))
    hook.remove()
    assert scaler.seen[:2] == ["lm_head.weight", "model.norm.weight"] and len(scaler.seen) == len(before)
    assert opt.staged_count == 1 and opt.staged_bytes()[Tier.HOST] == model.lm_head.weight.nbytes
    result = opt.step()
    assert not result.stepped and scaler.scale == 2.0**9
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.zero_grad()
    opt.backward(_loss(model, 1))
    assert opt.staged_count == len(before)
    assert opt.step().stepped and scaler.scale == 2.0**9
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.close()


def test_disk_checksum_catches_a_flipped_byte(tmp_path):
    log = DiskLog(tmp_path, "state.bin", block_bytes=256)
    a = torch.randn(40, 10).to(torch.bfloat16)
    log.append("a", a)
    log.append("b", torch.arange(7, dtype=torch.float32))
    log.seal()
    again = DiskLog.open(tmp_path, "state.bin")
    assert torch.equal(again.read("a"), a) and again.nbytes() == 40 * 10 * 2 + 28
    raw = bytearray((tmp_path / "state.bin").read_bytes())
    raw[300] ^= 0x10  # block 1 of record "a"
    (tmp_path / "state.bin").write_bytes(bytes(raw))
    with pytest.raises(ChunkftError, match=r"checksum mismatch in .*state.bin.*record 'a', block 1") as e:
        DiskLog.open(tmp_path, "state.bin").read("a")
    assert "\n" not in str(e.value)
    assert torch.equal(DiskLog.open(tmp_path, "state.bin").read("b"), torch.arange(7, dtype=torch.float32))


def test_state_on_disk_checksum_catches_a_changed_chunk_file(tmp_path):
    """Optimizer state on disk (C = 2, streamed by span): a byte flipped in a span file of chunk
    0 while chunk 1 trains is caught when chunk 0 comes back, before its state is used."""
    model = _model(torch.bfloat16)
    opt = OffloadAdamW(model, _table(model, 2), staging=Tier.HOST, state_tier=Tier.DISK, state_dir=tmp_path,
                       prefetch_depth=0)
    for i in range(2):
        opt.zero_grad()
        opt.backward(_loss(model, i))
        assert opt.step().switched_to == 1 - i
    path = tmp_path / "chunk00000.model.embed_tokens.weight.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor's data
    path.write_bytes(bytes(raw))
    opt.zero_grad()
    opt.backward(_loss(model, 2))
    with pytest.raises(ChunkftError, match=r"checksum mismatch in .*chunk00000.model.embed_tokens.weight.safetensors"):
        opt.step()
    opt.close()


class _FullDisk(io.RawIOBase):
    """A writable file that takes `room` bytes, then fails like a full disk."""

    def __init__(self, path, room: int):
        self._f = open(path, "wb")
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(b)
        return self._f.write(b)

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        super().close()  # flushes first
        self._f.close()


def test_full_disk_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path):
    """Staging on disk; the disk fills during step 2's backward: a one-line ChunkftError naming
    the staging file and ENOSPC; the step-1 checkpoint verifies and holds step 1's weights."""
    model = _model(torch.bfloat16)
    grad_bytes = sum(p.nbytes for p in model.parameters())
    opened = []

    def opener(path, mode):
        if "w" in mode:
            opened.append(path)
            return _FullDisk(path, room=grad_bytes if len(opened) == 1 else grad_bytes // 3)
        return open(path, mode)

    opt = OffloadAdamW(model, _table(model, 1), staging=Tier.DISK, staging_dir=tmp_path / "staging",
                       config=AdamWConfig(lr=1e-2), opener=opener)
    wrapper = OffloadOptimizer(opt)
    wrapper.begin_step()
    wrapper.backward(_loss(model, 0))
    assert wrapper.tier_bytes()[Tier.DISK] == {Component.GRADIENTS: grad_bytes}
    assert wrapper.step()
    after_one = _weights(model)
    save_checkpoint(tmp_path / "out", step=1, model=model, optimizer_state=wrapper.state_dict(), state={})
    wrapper.begin_step()
    with pytest.raises(ChunkftError) as e:
        wrapper.backward(_loss(model, 1))
    message = str(e.value)
    assert "\n" not in message and "grads.bin" in message and "No space left on device (ENOSPC)" in message
    opt.close()
    assert all(torch.equal(p, after_one[n]) for n, p in model.named_parameters())
    fresh = _model(torch.bfloat16)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "out"), model=fresh)  # verifies sha256s
    assert ckpt.step == 1 and all(torch.equal(p, after_one[n]) for n, p in fresh.named_parameters())


def test_accounting_reports_state_and_staged_grads_per_tier(tmp_path):
    model = _model(torch.bfloat16)
    table = _table(model, 3)
    opt = OffloadOptimizer(OffloadAdamW(model, table, staging=Tier.HOST, state_tier=Tier.DISK,
                                        state_dir=tmp_path / "state", prefetch_depth=0))
    opt.begin_step()
    opt.backward(_loss(model, 0))
    chunk0 = table.chunk_bytes(0)  # bf16 bytes: fp32 master = 2x, moments = 4x
    # staged bf16 gradients on host; the state is streamed from disk and none exists yet
    assert opt.tier_bytes() == {Tier.HOST: {Component.GRADIENTS: chunk0}}
    opt.step()  # chunk 0's state written span by span; its staging buffers freed on the switch
    tiers = opt.tier_bytes()
    assert set(tiers) == {Tier.DISK} and tiers[Tier.DISK][Component.MASTER] > 2 * chunk0
    assert 6 * chunk0 < sum(tiers[Tier.DISK].values()) < 6 * chunk0 + 4096 * len(table.chunks[0])  # + headers
    opt.inner.close()


TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False)


def _plan(tmp_path, name: str, **strategy) -> str:
    """A bf16 plan for TINY with this strategy (predictions zero: the runtime does not read them)."""
    import json

    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.plan import make_plan, save_plan
    from planner.solve import Objective
    from planner.strategy import Budget, Estimate, Strategy
    from planner.trace import StepShape

    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(TINY))
    s = Strategy(**strategy)
    estimate = Estimate(strategy=s, peak_bytes={Tier.GPU: 0}, components={Tier.GPU: {}}, reserved_bytes=0,
                        step_time_s=0.0, worst_chunk=None)
    plan = make_plan(resolve_model(str(model_dir)), StepShape(batch=2, seq_len=32, dtype="bf16"), hardware("rtx4090"),
                     Budget(gpu_bytes=2**34), Objective.MEMORY, estimate)
    save_plan(plan, tmp_path / name)
    return str(tmp_path / name)


def test_chunkft_run_executes_staged_plans(tmp_path, capsys):
    """`chunkft run` on plans with 16-bit gradients staged to host and to disk (C = 2): the same
    weights as the host-optimizer plan without staging (bf16 on CPU: bit for bit), and the
    trace accounts the staged gradients on their tier."""
    import json

    from planner.cli import main
    from safetensors.torch import load_file

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                            for i in range(30)))
    host = dict(chunks=2, optimizer_device="host", state_tier=Tier.HOST)
    weights = {}
    for label, extra in (("plain", {}), ("host", {"grad_staging": Tier.HOST}), ("disk", {"grad_staging": Tier.DISK})):
        plan = _plan(tmp_path, f"{label}.json", **host, **extra)
        out, trace = tmp_path / label, tmp_path / f"{label}.jsonl"
        assert main(["run", plan, "--data", str(data), "--steps", "3", "--grad-accum", "2", "--out", str(out),
                     "--trace", str(trace), "--device", "cpu", "--no-progress", "--lr", "1e-3"]) == 0
        weights[label] = load_file(out / "step-000003" / "model.safetensors")
        events = [json.loads(line) for line in trace.read_text().splitlines()[1:]]
        staged = [e["bytes"].get("gradients", 0) for e in events if e["tier"] == extra.get("grad_staging", "x")]
        if label == "host":  # buffers of the active chunk's spans, bf16
            assert max(staged) == max(sum(s.nbytes for s in c) for c in _load_table(plan))
        elif label == "disk":  # each micro-batch's contribution appended: two of them at most
            assert 0 < max(staged) <= 2 * max(sum(s.nbytes for s in c) for c in _load_table(plan))
    assert "16-bit gradients staged on disk" in capsys.readouterr().out
    for label in ("host", "disk"):
        assert all(torch.equal(weights[label][n], t) for n, t in weights["plain"].items()), label


def _load_table(plan_path):
    from planner.plan import load_plan

    return load_plan(plan_path).chunk_table.chunks
