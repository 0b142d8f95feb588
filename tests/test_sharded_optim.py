"""runtime.sharded_optim without processes: shard geometry, and ShardedChunkAdamW on an unsharded
model (one process, plain tensors) against ChunkAdamW -- sliced spans with sub-tensor gradients
(no dense gradient for a sliced parameter, checked after every backward), a sliced norm weight
with its whole gradient (the fallback); the same under FSDP2 on a one-rank gloo group in this
process, where forward hooks see what FSDP2 hands each Linear / Embedding (the unsharded
parameter, requires_grad only for whole spans); state round trips (bitwise) and refusals. The
multi-rank runs are tests/test_distributed.py's."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from planner.chunks import ChunkSpan, ChunkTable, make_chunk_table_from_model
from planner.errors import ChunkftError
from planner.schema import Tier
from planner.step import step_loss
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule
from runtime.sharded_optim import (LocalSpan, ShardedChunkAdamW, local_span, read_state_file, save_state_file,
                                   shard_rows)

CONFIG = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False)
CUT_DIMS = {"model.layers.1.mlp.up_proj.weight": 1}
ADAMW = AdamWConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5)
SCHEDULE = LRSchedule(kind="cosine", warmup_steps=2, total_steps=10)


def _span(dim: int, start: int, end: int) -> ChunkSpan:
    return ChunkSpan(param="w", dim=dim, start=start, end=end, nbytes=0)


def test_local_span_cuts_a_span_to_the_ranks_rows():
    # 509 rows over 2 ranks: rank 0 rows [0, 255), rank 1 [255, 509)
    assert local_span(_span(0, 0, 435), 0, 255) == LocalSpan(param="w", dim=0, start=0, length=255)
    assert local_span(_span(0, 0, 435), 255, 254) == LocalSpan(param="w", dim=0, start=0, length=180)
    assert local_span(_span(0, 435, 509), 0, 255).length == 0  # rank 0 holds none of it
    assert local_span(_span(0, 435, 509), 255, 254) == LocalSpan(param="w", dim=0, start=180, length=74)
    # dim 1: every local row, the span's columns; a rank without rows holds nothing
    assert local_span(_span(1, 10, 30), 255, 254) == LocalSpan(param="w", dim=1, start=10, length=20)
    assert local_span(_span(1, 10, 30), 3, 0).length == 0


def test_shard_rows_of_a_plain_tensor_and_a_scalar():
    assert shard_rows(torch.zeros(7, 3)) == (0, 7)
    with pytest.raises(ChunkftError, match="0-dim parameter"):
        shard_rows(torch.zeros(()))


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(CONFIG).train()


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step % 2))


def _train(model, opt, steps: range, norms: list | None = None, probe=None) -> list[float]:
    losses = []
    for s in steps:
        ids = _batch(s)
        loss = step_loss(model, ids, ids)
        opt.backward(loss)
        if probe is not None:
            probe(opt)
        result = opt.step()
        losses.append(float(loss.detach()))
        if norms is not None:
            norms.append(result.grad_norm)
    return losses


def split_span(table: ChunkTable, param: str, at: int, into: int) -> ChunkTable:
    """`table` with `param`'s (whole) span cut at `at`: [0, at) stays, [at, end) joins chunk `into`."""
    chunks = [list(c) for c in table.chunks]
    k, i = next((k, i) for k, c in enumerate(chunks) for i, s in enumerate(c) if s.param == param)
    span = chunks[k][i]
    row = span.nbytes // (span.end - span.start)
    chunks[k][i] = ChunkSpan(param=param, dim=span.dim, start=0, end=at, nbytes=at * row)
    chunks[into].append(ChunkSpan(param=param, dim=span.dim, start=at, end=span.end, nbytes=(span.end - at) * row))
    return ChunkTable(chunks=tuple(tuple(c) for c in chunks), shapes=table.shapes)


def expected_grad_bytes(model, table: ChunkTable, k: int, sub_tensor) -> dict:
    """One process, fp32: whole gradients for whole spans (and slices outside `sub_tensor`),
    slice-shaped buffers for the rest (an embedding's has one more row: subgrad's dummy row)."""
    params = dict(model.named_parameters())
    shard, slices = {}, {}
    for s in table.chunks[k]:
        p = params[s.param]
        if s.param not in sub_tensor:
            shard[s.param] = p.numel() * 4
        else:
            rows = s.end - s.start + isinstance(model.get_submodule(s.param.rpartition(".")[0]), torch.nn.Embedding)
            slices[s.param] = p.numel() // p.shape[s.dim] * rows * 4
    return {"shard": shard, "slice": slices, "requires_grad": dict.fromkeys(shard, 1)}


@pytest.mark.parametrize("tier", [Tier.GPU, Tier.HOST, Tier.DISK])
def test_unsharded_equals_chunk_adamw(tier, tmp_path):
    ref_model, model = _model(), _model()
    table = make_chunk_table_from_model(model, 4, cut_dims=CUT_DIMS)
    sliced = {(s.param, s.dim) for c in table.chunks for s in c if not table.is_whole(s)}
    assert {("model.layers.0.self_attn.o_proj.weight", 0), ("model.layers.1.mlp.up_proj.weight", 1)} <= sliced
    ref = ChunkAdamW(ref_model, table, config=ADAMW, schedule=SCHEDULE, update_interval=2, state_tier=tier,
                     host_state_in_place=False, state_dir=tmp_path / "ref")
    opt = ShardedChunkAdamW(model, table, config=ADAMW, schedule=SCHEDULE, update_interval=2, state_tier=tier,
                            state_dir=tmp_path / "state", run_id="test-run")
    assert opt.sub_tensor == tuple(frozenset(s.param for s in c if not table.is_whole(s)) for c in table.chunks)
    steps = range(10)  # every chunk twice, bar the last; warm-up and cosine decay; clipping
    norms, ref_norms, held = [], [], []

    def probe(o):  # after backward: the sliced parameters hold no gradient and require none
        held.append(o.grad_bytes() == expected_grad_bytes(model, table, o.active_chunk, o.sub_tensor[o.active_chunk]))

    losses = _train(model, opt, steps, norms, probe)
    assert held == [True] * len(steps)
    # the same sub-tensor gradients and the same clipping norm (one rank: the norm of per-span
    # norms, as ChunkAdamW takes it) as ChunkAdamW: bitwise equal
    assert losses == _train(ref_model, ref, steps, ref_norms)
    assert norms == ref_norms and max(norms) > ADAMW.max_grad_norm  # clipped
    assert losses[-1] < losses[1]
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name
    device = 3 * 4 * sum(p.numel() for p in model.parameters())
    per_chunk = [3 * 4 * sum(s.nbytes // 4 for s in c) for c in table.chunks]
    active = per_chunk[opt.active_chunk] + per_chunk[(opt.active_chunk + 1) % 4]
    if tier == Tier.GPU:
        assert opt.state_bytes() == {"device": device, "host": 0, "disk": 0}
    elif tier == Tier.HOST:  # all chunks on the host, one flat buffer each; the working copies
        assert opt.state_bytes() == {"device": active, "host": device, "disk": 0}
        assert [opt._host.flat[k].numel() * 4 for k in range(4)] == per_chunk
    else:  # all chunks in files; two staging buffers of the largest chunk (prefetch 1)
        assert opt.state_bytes() == {"device": active, "host": 2 * max(per_chunk), "disk": device}
        rank_dir = tmp_path / "state" / "rank0-of-1"
        files = sorted(p.name for p in rank_dir.iterdir())
        assert files == ["OWNER.json", *[f"chunk{k:05d}.bin" for k in range(4)]]
        assert [(rank_dir / f"chunk{k:05d}.bin").stat().st_size for k in range(4)] == per_chunk
        assert json.loads((rank_dir / "OWNER.json").read_text())["run_id"] == "test-run"
    opt.close()
    ref.close()


def test_sliced_norm_weight_gets_its_whole_gradient_and_equals_chunk_adamw():
    # a 1-D norm weight split over chunks 1 and 2: subgrad's rule for it recomputes the norm in
    # backward (functional_call), which FSDP2's resharding can break; its whole gradient is used
    ref_model, model = _model(), _model()
    norm = "model.layers.0.input_layernorm.weight"
    table = split_span(make_chunk_table_from_model(model, 4, cut_dims=CUT_DIMS), norm, 12, into=2)
    table.validate([(n, tuple(p.shape), 4) for n, p in model.named_parameters()])
    ref = ChunkAdamW(ref_model, table, config=ADAMW, update_interval=1, host_state_in_place=False)
    opt = ShardedChunkAdamW(model, table, config=ADAMW, update_interval=1)
    assert all(norm not in sub for sub in opt.sub_tensor)
    held = []
    steps = range(4)
    losses = _train(model, opt, steps, probe=lambda o: held.append(o.grad_bytes()))
    assert norm not in held[1]["slice"] and held[1]["shard"][norm] == 32 * 4  # whole, not 12 elements
    assert held[2]["shard"][norm] == 32 * 4 and held[0]["shard"].keys().isdisjoint({norm})
    assert held == [expected_grad_bytes(model, table, k, opt.sub_tensor[k]) for k in steps]
    # the whole gradient's span part equals the generic rule's slice of its recomputed gradient
    assert losses == _train(ref_model, ref, steps)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name
    opt.close()
    ref.close()


def test_fsdp2_hands_sliced_parameters_over_without_requires_grad(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from runtime.dist_model import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ref_model, model = _model(), _model()
        table = make_chunk_table_from_model(model, 4, cut_dims=CUT_DIMS)
        shard_model(model)  # every decoder layer a unit, then the root
        assert isinstance(model.get_parameter("model.layers.0.self_attn.o_proj.weight"), DTensor)
        ref = ChunkAdamW(ref_model, table, config=ADAMW, schedule=SCHEDULE, update_interval=2,
                         host_state_in_place=False)
        opt = ShardedChunkAdamW(model, table, config=ADAMW, schedule=SCHEDULE, update_interval=2)
        seen, expected, held = [], [], []
        names = {m: n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}

        def record(module, args, out):  # the parameter FSDP2 handed the module for this forward
            w = module.weight
            seen.append((names[module], w.requires_grad, type(w) is torch.nn.Parameter, tuple(w.shape)))
            spec = opt.grad_spec(opt.active_chunk)[names[module] + ".weight"]
            expected.append((names[module], spec is True, True, table.shapes[names[module] + ".weight"]))

        hooks = [m.register_forward_hook(record) for m in names]
        steps = range(8)
        losses = _train(model, opt, steps, probe=lambda o: held.append(
            o.grad_bytes() == expected_grad_bytes(model, table, o.active_chunk, o.sub_tensor[o.active_chunk])))
        for h in hooks:
            h.remove()
        assert len(seen) == len(steps) * len(names) and seen == expected  # unsharded, frozen unless whole
        assert held == [True] * len(steps)
        assert losses == _train(ref_model, ref, steps)  # one rank: FSDP2's reduce-scatter is the identity
        for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
            assert torch.equal(a.full_tensor(), b), name
        opt.close()
        ref.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tier", [Tier.HOST, Tier.DISK])
def test_state_file_round_trip_mid_chunk_continues_bitwise(tmp_path, tier):
    model, resumed_model = _model(), _model()
    table = make_chunk_table_from_model(model, 3, cut_dims=CUT_DIMS)
    kw = dict(config=ADAMW, schedule=SCHEDULE, update_interval=2, state_tier=tier, state_dir=tmp_path / "state")
    opt = ShardedChunkAdamW(model, table, **kw)
    _train(model, opt, range(3))  # chunk 1, one of its two steps done
    save_state_file(opt, tmp_path / "opt.safetensors")
    with torch.no_grad():
        for a, b in zip(resumed_model.parameters(), model.parameters()):
            a.copy_(b)
    resumed = ShardedChunkAdamW(resumed_model, table, **{**kw, "state_dir": tmp_path / "resumed"})
    resumed.load_state_dict(*read_state_file(tmp_path / "opt.safetensors"))
    assert (resumed.active_chunk, resumed.active_steps, resumed.global_step) == (1, 1, 3)
    assert _train(resumed_model, resumed, range(3, 7)) == _train(model, opt, range(3, 7))
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.parameters(), model.parameters()))


def test_bad_state_is_refused_in_one_line(tmp_path):
    model = _model()
    table = make_chunk_table_from_model(model, 3)
    opt = ShardedChunkAdamW(model, table, config=ADAMW)
    path = tmp_path / "opt.safetensors"
    save_state_file(opt, path)
    tensors, meta = read_state_file(path)
    errors = []
    for bad_meta, match in [({**meta, "world_size": 4}, "saved by 4 ranks; this run has 1"),
                            ({**meta, "table": make_chunk_table_from_model(model, 2).to_json()},
                             "different chunk table"),
                            ({**meta, "span_steps": None}, "malformed")]:
        with pytest.raises(ChunkftError, match=match) as e:
            opt.check_state(tensors, bad_meta)
        errors.append(str(e.value))
    with pytest.raises(ChunkftError, match="tensors differ") as e:
        opt.check_state({k: v for k, v in list(tensors.items())[1:]}, meta)
    errors.append(str(e.value))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkftError, match="is corrupted: crc32") as e:
        read_state_file(path)
    errors.append(str(e.value))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ChunkftError, match="unreadable or not chunkft's") as e:
        read_state_file(path)
    errors.append(str(e.value))
    with pytest.raises(ChunkftError, match="state tier 'nvme' is not supported for sharded runs; "
                                           "valid: gpu, host, disk") as e:
        ShardedChunkAdamW(model, table, state_tier="nvme")
    errors.append(str(e.value))
    with pytest.raises(ChunkftError, match="needs a state directory") as e:
        ShardedChunkAdamW(model, table, state_tier="disk")
    errors.append(str(e.value))
    assert all("\n" not in e for e in errors)


def test_disk_tier_refuses_a_changed_or_truncated_chunk_file(tmp_path):
    """A chunk file flipped or cut after it was written is a one-line error naming the file,
    never stale state; a file another process left in the rank directory is deleted on open."""
    model = _model()
    table = make_chunk_table_from_model(model, 3)
    rank_dir = tmp_path / "rank0-of-1"
    rank_dir.mkdir()
    (rank_dir / "chunk00007.bin").write_bytes(b"stale")
    (rank_dir / ".chunk00001.bin.x.tmp").write_bytes(b"torn")
    opt = ShardedChunkAdamW(model, table, config=ADAMW, state_tier="disk", state_dir=tmp_path, prefetch_depth=0)
    assert sorted(p.name for p in rank_dir.iterdir()) == ["OWNER.json", "chunk00000.bin", "chunk00001.bin",
                                                          "chunk00002.bin"]
    path = rank_dir / "chunk00001.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    errors = []
    with pytest.raises(ChunkftError, match=r"checksum mismatch in .*chunk00001\.bin") as e:
        _train(model, opt, range(1))  # the switch to chunk 1 reads it
    errors.append(str(e.value))
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(ChunkftError, match=r"chunk00001\.bin' is truncated") as e:
        opt._load(1)
    errors.append(str(e.value))
    assert all("\n" not in e for e in errors)
    opt.close()
