"""runtime.distributed on CPU: 2 gloo processes with FSDP2 against one process.

All start from the same saved HF weights (init_from). One sharded run of 2 steps (the second
measured with mallinfo2 on every rank) saves a consolidated checkpoint; a second run resumes it
for 2 more steps and saves again. The one-process reference trains the same 4 steps on the
whole global batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from planner.measure import mallinfo2_available
from planner.model import ModelSpec
from planner.sharding import cpu_rank_rise_bytes
from planner.trace import StepShape
from runtime.distributed import DistConfig, run_distributed, run_single, whole_tensor_chunks

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
    return DistConfig(model_config=CONFIG.to_dict(), batches=batches, lr=1e-3, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist")
    # every run starts from these weights (seed 7; the runs' own random init is seed 0)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(CONFIG).save_pretrained(tmp / "init")
    init = str(tmp / "init")
    first = run_distributed(_config(init_from=init, stop_after=2, measure_step=1, out_dir=str(tmp / "step2")),
                            WORLD)
    second = run_distributed(_config(init_from=init, resume_from=str(tmp / "step2"), out_dir=str(tmp / "step4")),
                             WORLD)
    losses, model = run_single(_config(init_from=init))
    return first, second, losses, model, tmp


def test_loss_trajectory_matches_one_process(runs):
    first, second, losses, _, _ = runs
    for a, b in zip(first, second):
        assert a.losses == first[0].losses and b.losses == second[0].losses  # one global loss
        assert b.start_step == 2
    sharded = list(first[0].losses) + list(second[0].losses)
    assert sharded == pytest.approx(losses, rel=1e-5, abs=1e-5)
    assert losses[-1] < losses[0]  # it trains


def test_consolidated_checkpoint_loads_in_transformers_and_equals_one_process(runs):
    _, _, _, model, tmp = runs
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "step4", dtype=torch.float32)
    reference = dict(model.named_parameters())
    # Adam divides by sqrt(v): for a gradient near zero the ranks' different summation order
    # moves an update by up to a few % of lr (1e-3); atol is a tenth of one step
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_each_rank_holds_half_the_parameters(runs):
    first, _, _, model, _ = runs
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(r.local_param_bytes == total // WORLD for r in first)  # every dim 0 even


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
def test_rank_peak_matches_sharded_prediction(runs):
    first, _, _, _, _ = runs
    spec = ModelSpec(name="tiny-llama", source="config", config=CONFIG, num_layers=4)
    predicted = cpu_rank_rise_bytes(spec, StepShape(batch=LOCAL_BATCH, seq_len=SEQ, dtype="fp32"), WORLD)
    for r in first:
        assert abs(r.peak_bytes - predicted) / r.peak_bytes < MEMORY_TOLERANCE, (r.rank, r.peak_bytes, predicted)


def test_whole_tensor_chunks_cover_parameters_in_order():
    model = AutoModelForCausalLM.from_config(CONFIG)
    names = [n for n, _ in model.named_parameters()]
    chunks = whole_tensor_chunks(model, 3)
    assert [n for c in chunks for n in c] == names and all(chunks)


SMALL = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)


def test_chunkft_whole_tensor_chunks_sharded_match_one_process():
    batch = torch.randint(0, 512, (1, 2, 64), generator=torch.Generator().manual_seed(1))
    config = DistConfig(model_config=SMALL.to_dict(), batches=batch.expand(6, -1, -1).clone(), chunks=3, lr=1e-2)
    ranks = run_distributed(config, WORLD)
    losses, _ = run_single(config)
    assert list(ranks[0].losses) == pytest.approx(losses, rel=1e-5, abs=1e-5)
    assert losses[3] < losses[0]  # each chunk trained once: the loss fell


@pytest.mark.slow  # two more process start-ups (~10 s on a loaded 2-core machine)
def test_torchrun_entry_trains_like_one_process(tmp_path):
    import json
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    SMALL.save_pretrained(tmp_path / "cfg")
    cfg = str(tmp_path / "cfg" / "config.json")

    def torchrun(*args: str) -> list[float]:
        out = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "runtime.dist_worker", "--model-config", cfg,
                              "--seq-len", "64", "--lr", "1e-2", *args], capture_output=True, text=True, check=True)
        return [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step ")]

    sharded = torchrun("--steps", "2", "--out", str(tmp_path / "ck"))
    batches = torch.randint(0, 512, (2, 2, 64), generator=torch.Generator().manual_seed(0))
    config = DistConfig(model_config=json.loads((tmp_path / "cfg" / "config.json").read_text()), batches=batches,
                        lr=1e-2)
    losses, _ = run_single(config)
    assert sharded == pytest.approx(losses, rel=1e-5, abs=1e-5)
    assert json.loads((tmp_path / "ck" / "trainer_state.json").read_text()) == {"step": 2}
