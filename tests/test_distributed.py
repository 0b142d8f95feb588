"""runtime.distributed on CPU: 2 gloo processes with FSDP2 and ShardedChunkAdamW against one process.

Full fine-tuning (one chunk, plain AdamW): one sharded run of 4 steps (the second measured with
mallinfo2 on every rank) saves a checkpoint; the one-process reference trains the same 4 steps
on the whole global batch.

ChunkFT: a 5-chunk table of a tiny Llama whose cuts slice the embedding and lm_head along dim 0
(odd vocabulary: uneven shards, one rank holding none of a span) and two MLP weights along dim
1, and the final norm weight split over the last two chunks (the last then has two sliced
spans; a norm's slice falls back to its whole gradient); host state tier, update interval 2,
clipping, weight decay, labels with ignored tokens spread unevenly over the ranks, two
micro-batches per rank. An uninterrupted run of 12 steps against ChunkAdamW in one process,
saving after 6 and 7 steps (7: mid-chunk), and a run resumed from the 7-step checkpoint to the
end (with the embedding and head as FSDP units of their own and activation checkpointing: the
same bits). Every step of every rank reports the gradients it holds after backward: sub-tensor slices
for the sliced spans, no gradient (and no requires_grad) at all for their parameters.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from planner.chunks import ChunkSpan, ChunkTable
from planner.errors import ChunkftError
from planner.measure import mallinfo2_available
from planner.model import ModelSpec
from planner.sharding import cpu_rank_rise_bytes
from planner.trace import StepShape
from runtime.chunk_optim import AdamWConfig
from runtime.dist_config import DistConfig
from runtime.dist_model import chunk_table_for
from runtime.distributed import run_distributed, run_single
from runtime.sharded_optim import read_state_file, state_file_name

WORLD = 2
LOCAL_BATCH = 1
SEQ = 512
STEPS = 4
# Big enough (a 34 MB step per rank) that what mallinfo2 sees beyond tensor storages (autograd
# nodes, malloc headers, Python objects; ~0.4 MB here, growing with the op count) stays ~1%.
CONFIG = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False)
MEMORY_TOLERANCE = 0.05


def _config(**kw) -> DistConfig:
    # the same global batch every step, so the loss has to fall
    batch = torch.randint(0, CONFIG.vocab_size, (1, WORLD * LOCAL_BATCH, SEQ),
                          generator=torch.Generator().manual_seed(1))
    batches = batch.expand(STEPS, -1, -1).clone()
    return DistConfig(model_config=CONFIG.to_dict(), batches=batches, adamw=AdamWConfig(lr=1e-3), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist")
    # every run starts from these weights (seed 7; the runs' own random init is seed 0)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(CONFIG).save_pretrained(tmp / "init")
    init = str(tmp / "init")
    ranks = run_distributed(_config(init_from=init, measure_step=1, out_dir=str(tmp / "step4"),
                                    record_grad_bytes=True), WORLD)
    losses, model = run_single(_config(init_from=init))
    return ranks, losses, model, tmp


def test_loss_trajectory_matches_one_process(runs):
    ranks, losses, _, _ = runs
    assert all(r.losses == ranks[0].losses for r in ranks)  # one global loss
    assert list(ranks[0].losses) == pytest.approx(losses, rel=1e-5, abs=1e-5)
    assert losses[-1] < losses[0]  # it trains


def test_consolidated_checkpoint_loads_in_transformers_and_equals_one_process(runs):
    _, _, model, tmp = runs
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "step4", dtype=torch.float32)
    reference = dict(model.named_parameters())
    # Adam divides by sqrt(v): for a gradient near zero the ranks' different summation order
    # moves an update by up to a few % of lr (1e-3); atol is a tenth of one step
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_each_rank_holds_half_the_parameters_and_their_state(runs):
    first, _, model, _ = runs
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(r.local_param_bytes == total // WORLD for r in first)  # every dim 0 even
    for r in first:  # full fine-tuning: every parameter's reduce-scattered shard gradient, no slices
        assert len(r.grad_bytes) == STEPS
        assert all(g["slice"] == {} and sum(g["shard"].values()) == total // WORLD for g in r.grad_bytes)
    # GPU tier, fp32: master + two moments of the rank's half, all on the (CPU) step device
    assert all(r.state_bytes == {"device": 3 * total // WORLD, "host": 0, "disk": 0} for r in first)


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
def test_rank_peak_matches_sharded_prediction(runs):
    first, _, _, _ = runs
    spec = ModelSpec(name="tiny-llama", source="config", config=CONFIG, num_layers=4)
    predicted = cpu_rank_rise_bytes(spec, StepShape(batch=LOCAL_BATCH, seq_len=SEQ, dtype="fp32"), WORLD)
    for r in first:
        assert abs(r.peak_bytes - predicted) / r.peak_bytes < MEMORY_TOLERANCE, (r.rank, r.peak_bytes, predicted)


SMALL = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=509, tie_word_embeddings=False)
CUT_DIMS = {"model.layers.0.mlp.up_proj.weight": 1, "model.layers.1.mlp.gate_proj.weight": 1}
CHUNKED_STEPS = 12
MAX_GRAD_NORM = 0.5


NORM = "model.norm.weight"


def _chunked_table() -> ChunkTable:
    """5 chunks, cuts along dims 0 and 1; the final norm's elements [40, 64) moved to chunk 4."""
    table = ChunkTable.from_json(chunk_table_for(SMALL.to_dict(), 5, cut_dims=CUT_DIMS))
    chunks = [list(c) for c in table.chunks]
    k, i = next((k, i) for k, c in enumerate(chunks) for i, s in enumerate(c) if s.param == NORM)
    chunks[k][i] = ChunkSpan(param=NORM, dim=0, start=0, end=40, nbytes=40 * 4)
    chunks[4].insert(0, ChunkSpan(param=NORM, dim=0, start=40, end=64, nbytes=24 * 4))
    return ChunkTable(chunks=tuple(tuple(c) for c in chunks), shapes=table.shapes)


def _chunked_config(**kw) -> DistConfig:
    ids = torch.randint(0, SMALL.vocab_size, (1, 4, 64), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, 2, :40] = -100  # rank 1's first micro-batch: fewer labelled tokens than the others
    labels[:, 0, 60:] = -100
    kw = {"state_tier": "host", "record_grad_bytes": True, **kw}
    return DistConfig(model_config=SMALL.to_dict(), batches=ids.expand(CHUNKED_STEPS, -1, -1).clone(),
                      labels=labels.expand(CHUNKED_STEPS, -1, -1).clone(), micro_batch_size=1,
                      chunk_table=_chunked_table().to_json(), update_interval=2,
                      adamw=AdamWConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM), **kw)


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("chunked")
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(SMALL).save_pretrained(tmp / "init")
    init = str(tmp / "init")
    full = run_distributed(_chunked_config(init_from=init, out_dir=str(tmp / "full"),
                                           save_at=((6, str(tmp / "ck6")), (7, str(tmp / "ck7")))), WORLD)
    # the resumed run also shards the embedding and the head as units of their own and
    # checkpoints activations: sub-tensor gradients under FSDP2's other hook orders, same bits
    resumed = run_distributed(_chunked_config(resume_from=str(tmp / "ck7"), out_dir=str(tmp / "end"),
                                              shard_embeddings=True, checkpointing=True), WORLD)
    losses, model = run_single(_chunked_config(init_from=init))
    return full, resumed, losses, model, tmp


def test_table_slices_tensors_along_both_dims():
    table = ChunkTable.from_json(_chunked_config().chunk_table)
    sliced = {(s.param, s.dim) for c in table.chunks for s in c if not table.is_whole(s)}
    assert {("model.embed_tokens.weight", 0), ("lm_head.weight", 0), (NORM, 0)} <= sliced
    assert {(n, 1) for n in CUT_DIMS} <= sliced
    assert [s.param for s in table.chunks[4] if not table.is_whole(s)] == [NORM, "lm_head.weight"]


def _expected_grad_bytes(table: ChunkTable, k: int, rank: int) -> dict:
    """fp32 on 2 ranks: a whole-gradient span's parameter holds its dim-0 shard's gradient (rank r
    the rows [r * ceil(R / 2), ...)); a sliced span (bar the 1-D norm: whole) one full slice-shaped
    buffer, its rows and columns, plus one row for the embedding (subgrad's dummy row)."""
    shard, slices = {}, {}
    for s in table.chunks[k]:
        shape = table.shapes[s.param]
        row = 1 if len(shape) == 1 else shape[1]
        if table.is_whole(s) or s.param == NORM:
            per = -(-shape[0] // WORLD)
            shard[s.param] = max(min(per, shape[0] - rank * per), 0) * row * 4
        else:
            extra = s.param == "model.embed_tokens.weight"
            slices[s.param] = ((s.end - s.start + extra) * row if s.dim == 0 else shape[0] * (s.end - s.start)) * 4
    return {"shard": shard, "slice": slices, "requires_grad": dict.fromkeys(shard, 1)}


def test_sliced_parameters_hold_only_their_slices_gradient(chunked):
    full, resumed, _, _, _ = chunked
    table = _chunked_table()
    for runs, first in ((full, 0), (resumed, 7)):
        for r in runs:
            assert len(r.grad_bytes) == CHUNKED_STEPS - first
            for step, held in enumerate(r.grad_bytes, start=first):
                # after backward: no .grad and no requires_grad for a sliced parameter (FSDP2 neither
                # computed nor reduce-scattered a dense gradient); its buffer is exactly its slice
                assert held == _expected_grad_bytes(table, (step // 2) % 5, r.rank), (r.rank, step)
    # the embedding's first chunk: 435 of 509 rows as one buffer on each rank, nothing sharded
    assert full[1].grad_bytes[0] == {"shard": {}, "slice": {"model.embed_tokens.weight": 436 * 64 * 4},
                                     "requires_grad": {}}


def test_chunkft_sliced_spans_sharded_match_chunk_adamw(chunked):
    full, _, losses, model, tmp = chunked
    assert all(r.losses == full[0].losses for r in full)
    assert list(full[0].losses) == pytest.approx(losses, rel=0, abs=1e-5)
    assert losses[-1] < losses[0] - 0.1  # it trains
    assert max(full[0].grad_norms) > MAX_GRAD_NORM  # clipping was active
    final = load_file(str(tmp / "full" / "model.safetensors"))
    off = 0
    for name, p in model.named_parameters():
        # Adam divides by sqrt(v): where a gradient is near zero, the ranks' summation order can
        # flip its sign, moving that element by up to ~lr per step; measured (sub-tensor
        # gradients for the sliced spans): 53 of 139k elements beyond 1e-6, the worst 1.4e-4
        torch.testing.assert_close(final[name], p.detach(), rtol=0, atol=5e-4)
        off += int(((final[name] - p.detach()).abs() > 1e-6).sum())
    assert off < 1e-3 * sum(p.numel() for p in model.parameters())


def test_host_tier_state_bytes(chunked):
    full, _, _, model, _ = chunked
    table = ChunkTable.from_json(_chunked_config().chunk_table)
    # every chunk's fp32 master + moments rest on the host, sharded: the ranks' shares add up
    assert sum(r.state_bytes["host"] for r in full) == 3 * sum(table.chunk_bytes(k) for k in range(5))
    assert all(0 < r.state_bytes["device"] < r.state_bytes["host"] for r in full)


def _span_mask(table: ChunkTable, k: int, name: str, shape) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for s in table.chunks[k]:
        if s.param == name:
            mask.narrow(s.dim, s.start, s.end - s.start).fill_(True)
    return mask


def test_a_step_changes_only_the_active_chunks_spans(chunked):
    _, _, _, _, tmp = chunked
    table = ChunkTable.from_json(_chunked_config().chunk_table)
    before, after = load_file(str(tmp / "ck6" / "model.safetensors")), load_file(str(tmp / "ck7" / "model.safetensors"))
    changed = 0
    for name, b in before.items():
        mask = _span_mask(table, 3, name, b.shape)  # step 7 is chunk 3's first (update interval 2)
        assert torch.equal(after[name][~mask], b[~mask]), name
        changed += int((after[name][mask] != b[mask]).sum())
    assert changed > 0.9 * table.chunk_bytes(3) // 4  # fp32: 4 bytes an element


def test_resume_mid_chunk_equals_uninterrupted_bitwise(chunked):
    full, resumed, _, _, tmp = chunked
    assert resumed[0].start_step == 7
    assert resumed[0].losses == full[0].losses[7:]
    a, b = load_file(str(tmp / "full" / "model.safetensors")), load_file(str(tmp / "end" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for rank in range(WORLD):
        (ta, ma), (tb, mb) = (read_state_file(tmp / d / state_file_name(rank, WORLD)) for d in ("full", "end"))
        assert ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
        assert ma["global_step"] == CHUNKED_STEPS and ma["active_chunk"] == 1  # 12 steps = 6 chunk turns


def test_resume_with_another_world_size_is_refused(chunked):
    _, _, _, _, tmp = chunked
    with pytest.raises(ChunkftError, match="saved by 2 ranks; this run has 1") as e:
        run_distributed(_chunked_config(resume_from=str(tmp / "ck6")), 1)
    assert "\n" not in str(e.value)


def test_corrupted_optimizer_file_is_refused_on_every_rank(chunked, tmp_path):
    _, _, _, _, tmp = chunked
    shutil.copytree(tmp / "ck6", tmp_path / "ck")
    victim = tmp_path / "ck" / state_file_name(1, WORLD)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor
    victim.write_bytes(bytes(data))
    with pytest.raises(ChunkftError, match=r"^rank 1: optimizer state .* is corrupted: crc32") as e:
        run_distributed(_chunked_config(resume_from=str(tmp_path / "ck")), WORLD)
    assert "\n" not in str(e.value)


def test_bad_state_tiers_are_refused():
    with pytest.raises(ChunkftError, match="state tier 'nvme' is not supported for sharded runs; "
                                           "valid: gpu, host, disk"):
        _chunked_config(state_tier="nvme")
    with pytest.raises(ChunkftError, match="state tier 'disk' needs a state directory"):
        _chunked_config(state_tier="disk")


@pytest.mark.slow  # two more process start-ups (~10 s on a loaded 2-core machine)
def test_torchrun_entry_trains_like_one_process(tmp_path):
    import json
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    SMALL.save_pretrained(tmp_path / "cfg")
    cfg = str(tmp_path / "cfg" / "config.json")

    def torchrun(*args: str) -> list[float]:
        out = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "runtime.dist_worker", "--model-config", cfg,
                              "--seq-len", "64", "--lr", "1e-3", *args], capture_output=True, text=True, check=True)
        return [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step ")]

    sharded = torchrun("--steps", "4", "--chunks", "3", "--state", "host", "--update-interval", "2",
                       "--max-grad-norm", "1.0", "--out", str(tmp_path / "ck"))
    batches = torch.randint(0, SMALL.vocab_size, (4, 2, 64), generator=torch.Generator().manual_seed(0))
    model_config = json.loads((tmp_path / "cfg" / "config.json").read_text())
    config = DistConfig(model_config=model_config, batches=batches, adamw=AdamWConfig(lr=1e-3, max_grad_norm=1.0),
                        chunk_table=chunk_table_for(model_config, 3), state_tier="host", update_interval=2)
    losses, _ = run_single(config)
    assert sharded == pytest.approx(losses, rel=0, abs=1e-5)
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (4, 2)


def test_fp16_loss_scaling_skips_the_steps_one_process_skips():
    from runtime.scaler import ScalerConfig

    batch = torch.randint(0, SMALL.vocab_size, (1, 2, 64), generator=torch.Generator().manual_seed(1))
    config = DistConfig(model_config=SMALL.to_dict(), batches=batch.expand(10, -1, -1).clone(), dtype="fp16",
                        chunk_table=chunk_table_for(SMALL.to_dict(), 5, dtype="fp16"), state_tier="host",
                        update_interval=2, adamw=AdamWConfig(lr=1e-3, max_grad_norm=1.0),
                        loss_scaler=ScalerConfig(init_scale=2.0**24), loss_chunk_tokens=16)
    ranks = run_distributed(config, WORLD)
    losses, _ = run_single(config)
    # 2**24 overflows fp16 gradients until five back-offs bring the scale to 2**19; the ranks
    # agree on every overflow (one all_reduce) and skip exactly the steps one process skips.
    # Chunked loss: FSDP2's root is a ChunkedLossRoot (step_loss never calls model.forward)
    assert [r.skipped_steps for r in ranks] == [5, 5]
    assert losses[:6] == [losses[0]] * 6 and losses[6] < losses[0]
    assert list(ranks[0].losses) == pytest.approx(losses, rel=0, abs=1e-4)
