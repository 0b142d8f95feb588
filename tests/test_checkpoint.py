"""Checkpoints: HF-loadable weights, atomic writes, corruption refused in one line, and resume
that ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from planner.errors import ChunkftError
from runtime import checkpoint as ckpt_mod
from runtime.checkpoint import (check_writable, flatten_tensors, latest_checkpoint, load_checkpoint,
                                save_checkpoint, unflatten_tensors)
from runtime.data import Example, PackedLoader
from runtime.train import LoopConfig, Schedule, TorchAdamW, Trainer

STEPS = 7




def tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def examples(n: int = 24, length: int = 20, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(64) for _ in range(length)]
        out.append(Example(input_ids=tuple(ids), labels=tuple(ids)))
    return out


def full_ft(model, state_dir=None):
    return TorchAdamW(dict(model.named_parameters()), schedule=Schedule(lr=1e-3, warmup_steps=2, total_steps=STEPS),
                      weight_decay=0.01, max_grad_norm=1.0)


def chunkft(model, state_dir=None, tier="host"):
    from planner.chunks import make_chunk_table_from_model
    from planner.schema import Tier
    from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule
    from runtime.train import ChunkOptimizer

    inner = ChunkAdamW(model, make_chunk_table_from_model(model, 3),
                       config=AdamWConfig(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0),
                       schedule=LRSchedule(kind="cosine", warmup_steps=2, total_steps=STEPS), state_tier=Tier(tier),
                       state_dir=state_dir)
    return ChunkOptimizer(inner)


def chunkft_disk(model, state_dir):
    return chunkft(model, state_dir, tier="disk")


def make_trainer(out_dir, make_optimizer, steps=STEPS):
    model = tiny_llama()
    loader = PackedLoader(examples(), seq_len=16, batch_size=2, seed=3, pad_token_id=0)
    return Trainer(model, make_optimizer(model, Path(out_dir) / "optimizer-state"), loader, LoopConfig(steps=steps, grad_accum=2, checkpoint_every=1),
                   out_dir=out_dir, run_state={"model_fingerprint": "m" * 64})


def test_flatten_round_trip():
    tree = {"a": torch.arange(3), "b": [1, {"c": torch.ones(2, 2), "d": None}], "e": "x"}
    doc, tensors = flatten_tensors(tree)
    json.dumps(doc)  # JSON-able
    back = unflatten_tensors(json.loads(json.dumps(doc)), tensors)
    assert torch.equal(back["a"], tree["a"]) and torch.equal(back["b"][1]["c"], tree["b"][1]["c"])
    assert back["b"][0] == 1 and back["b"][1]["d"] is None and back["e"] == "x"


def test_checkpoint_is_hf_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, full_ft, steps=2)
    trainer.train()
    path = latest_checkpoint(tmp_path)
    assert path.name == "step-000002" and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step-000001", "step-000002"]
    loaded = AutoModelForCausalLM.from_pretrained(path)
    want = trainer.model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k].to(want[k].dtype), want[k]) for k in want)
    # the tie survives: lm_head is the embedding
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("make_optimizer", [full_ft, chunkft, chunkft_disk],
                         ids=["full_ft", "chunkft_c3_host", "chunkft_c3_disk"])
def test_resume_is_bitwise_identical(tmp_path, make_optimizer):
    reference = make_trainer(tmp_path / "ref", make_optimizer)
    ref_result = reference.train()
    want = {k: v.clone() for k, v in reference.model.state_dict().items()}
    want_opt, _ = flatten_tensors(reference.optimizer.state_dict())
    for stop in (1, 3, 5):
        out = tmp_path / f"stop{stop}"
        first = make_trainer(out, make_optimizer)
        first.train(stop_after=stop)  # "killed" right after step `stop` was checkpointed
        del first
        second = make_trainer(out, make_optimizer)
        assert second.resume() and second.step == stop
        result = second.train()
        assert result.losses == ref_result.losses[stop:]
        got = second.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), f"weights differ after resuming at {stop}"
        got_opt, got_tensors = flatten_tensors(second.optimizer.state_dict())
        _, want_tensors = flatten_tensors(reference.optimizer.state_dict())
        assert got_opt == want_opt
        assert all(torch.equal(got_tensors[k], want_tensors[k]) for k in want_tensors)


def test_resume_restores_rng_states(tmp_path):
    trainer = make_trainer(tmp_path, full_ft, steps=1)
    trainer.train()
    torch.manual_seed(123)
    random.seed(123)
    path = save_checkpoint(tmp_path, step=1, model=trainer.model, optimizer_state={}, state={"data": {}})
    want_torch, want_py = torch.rand(3), random.random()
    torch.manual_seed(0)
    random.seed(0)
    load_checkpoint(path, model=trainer.model)
    assert torch.equal(torch.rand(3), want_torch) and random.random() == want_py


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "model.safetensors does not match its size/checksum"),
    (lambda d: (d / "state.json").unlink(), "incomplete: state.json is missing"),
    (lambda d: (d / "state.json").write_text("{not json"), "state.json does not match"),
    (lambda d: (d / "manifest.json").unlink(), "incomplete: manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text("[oops"), "manifest.json unreadable"),
])
def test_corrupted_checkpoint_is_one_line_error(tmp_path, damage, message):
    trainer = make_trainer(tmp_path, full_ft, steps=1)
    trainer.train()
    path = latest_checkpoint(tmp_path)
    damage(path)
    before = _snapshot(path)
    fresh = make_trainer(tmp_path, full_ft)
    weights_before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ChunkftError) as err:
        fresh.resume()
    assert message in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(path) == before  # reading a bad checkpoint damages nothing
    assert all(torch.equal(v, weights_before[k]) for k, v in fresh.model.state_dict().items())


def test_truncated_safetensors_without_manifest_check(tmp_path):
    # Even past the manifest, a truncated safetensors file is a one-line error.
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ChunkftError, match="is not readable safetensors"):
        ckpt_mod._load_tensors(tmp_path / "x.safetensors")


def test_checkpoint_for_another_model_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, full_ft, steps=1)
    trainer.train()
    other = make_trainer(tmp_path, full_ft)
    other.run_state["model_fingerprint"] = "f" * 64
    with pytest.raises(ChunkftError, match="written for another model"):
        other.resume()


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, full_ft, steps=1)
    trainer.train()
    good = latest_checkpoint(tmp_path)
    before = _snapshot(good)
    calls = []

    def failing_save(path, tensors):
        calls.append(path.name)
        if path.name == "optimizer.safetensors":
            raise OSError(28, "No space left on device")
        return real_save(path, tensors)

    real_save = ckpt_mod._save_tensors
    monkeypatch.setattr(ckpt_mod, "_save_tensors", failing_save)
    with pytest.raises(ChunkftError, match="cannot write checkpoint .*No space left on device"):
        save_checkpoint(tmp_path, step=2, model=trainer.model, optimizer_state=trainer.optimizer.state_dict(),
                        state={"data": {}})
    assert latest_checkpoint(tmp_path) == good and _snapshot(good) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]  # no temp dir left


def test_unwritable_output_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ChunkftError, match="is not writable"):
        check_writable(tmp_path / "file" / "out")
    assert check_writable(tmp_path / "new" / "dir").is_dir()
    if os.geteuid() != 0:  # root writes anywhere; the file-as-parent case above holds for everyone
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(ChunkftError, match="is not writable"):
            check_writable(tmp_path / "ro")
