"""`chunkft run PLAN --nproc 2` on CPU ranks (gloo): a parallel plan executed end to end (with a
memory trace per rank), resumed bit for bit, and the refusals of what does not go with a parallel plan."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from planner.cli import main
from planner.measure import mallinfo2_available
from planner.plan import load_plan
from planner.schema import Tier

SEQ = 512  # activations large enough that the traced step rise is not mostly malloc overhead


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig

    tmp = tmp_path_factory.mktemp("distrun")
    LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(tmp / "model")
    rng = random.Random(0)
    words = "the cat sat on a mat while chunks of memory move between tiers".split()
    with open(tmp / "data.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")
    assert main(["plan", str(tmp / "model"), "--gpus-per-node", "2", "--seq", str(SEQ), "--gpu", "1GiB",
                 "--chunks", "3", "--state", "host", "--checkpointing", "off", "-o", str(tmp / "plan.json")]) == 0
    # the planner picks 16 steps per chunk here; 1 makes every step switch chunks (traced below)
    data = json.loads((tmp / "plan.json").read_text())
    data["strategy"]["update_interval"] = 1
    (tmp / "plan.json").write_text(json.dumps(data))
    one_gpu = tmp / "plan1.json"
    assert main(["plan", str(tmp / "model"), "--seq", str(SEQ), "--gpu", "1GiB", "--chunks", "3",
                 "-o", str(one_gpu)]) == 0
    return tmp


def run(setup, *args) -> int:
    return main(["run", str(setup / "plan.json"), "--data", str(setup / "data.jsonl"), "--lr", "1e-3",
                 "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def trained(setup):
    out = setup / "full"
    assert run(setup, "--steps", 5, "--checkpoint-every", 2, "--out", out,
               "--trace", setup / "traces" / "run.jsonl", "--trace-steps", 4) == 0
    return out


def test_parallel_plan_trains_and_writes_checkpoints(setup, trained):
    plan = load_plan(setup / "plan.json")
    assert plan.parallel.gpus_per_node == 2 and plan.strategy.chunks == 3
    assert sorted(p.name for p in trained.glob("step-*")) == ["step-2", "step-4", "step-5"]
    report = json.loads((trained / "ranks.json").read_text())
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    losses = ranks[0]["losses"]
    assert len(losses) == 5 and ranks[1]["losses"] == losses  # one global loss
    assert losses[-1] < losses[0]
    assert all(r["peak_bytes"] > 0 for r in ranks)  # the last step measured on every rank
    assert report["predicted"]["gpu_peak_bytes"] == plan.peak_bytes[Tier.GPU]
    # an HF directory transformers loads
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained / "step-5")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
def test_each_rank_writes_a_memory_trace(setup, trained):
    """--trace NAME.jsonl: NAME.rank{r}.jsonl per rank, loadable by analysis.load, steps 0..3
    only (--trace-steps 4); each rank's measured rise of its last traced step (step 3, chunk 0,
    its second turn: the first turns allocate once-only buffers) within 5% of
    planner.sharding.cpu_rank_rise_bytes (3.2% over when written: ~190 KiB the prediction lacks)."""
    from analysis.load import load_recording
    from planner.model import resolve_model
    from planner.sharding import cpu_rank_rise_bytes

    plan = load_plan(setup / "plan.json")
    spec = resolve_model(plan.model_name)
    assert sorted(p.name for p in (setup / "traces").iterdir()) == ["run.rank0.jsonl", "run.rank1.jsonl"]
    steps = 4
    for r in range(2):
        rec = load_recording(setup / "traces" / f"run.rank{r}.jsonl", expect_kind="trace")
        h = rec.header
        assert (h["rank"], h["world_size"], h["layout"]) == (r, 2, plan.parallel.to_json())
        assert (rec.plan_fingerprint, rec.model_fingerprint) == (plan.fingerprint(), plan.model_fingerprint)
        assert plan.strategy.update_interval == 1 and not plan.strategy.checkpointing
        assert h["strategy"] == plan.strategy.to_json() and h["device"] == "cpu"
        ev = rec.events
        gpu = ev[ev.tier == "gpu"]
        assert sorted(set(ev.step)) == list(range(steps))
        ends = gpu[gpu.event == "step_end"]
        assert list(ends.step) == list(range(steps))
        # chunks 0 -> 1 -> 2 -> 0: one switch per step (update interval 1)
        switches = gpu[gpu.event == "chunk_switch"]
        assert list(switches.name) == ["chunk 0 -> 1", "chunk 1 -> 2", "chunk 2 -> 0", "chunk 0 -> 1"]
        assert [int(c) for c in gpu[gpu.event == "phase"].chunk.unique()] == [0, 1, 2]
        layers = gpu[(gpu.event == "layer") & (gpu.step == 0)]
        assert list(zip(layers.phase, layers.layer)) == [("forward", 0), ("forward", 1), ("backward", 1),
                                                         ("backward", 0)]
        # the rank's accounting: weight shards, and host state = this rank's third of every chunk's
        local = json.loads((trained / "ranks.json").read_text())["ranks"][r]
        assert set(gpu.weights) == {local["local_param_bytes"]}
        host = ev[ev.tier == "host"]
        assert len(host) == 1 and int(host.master.iloc[0] + host.optimizer.iloc[0]) == local["state_bytes"]["host"]
        assert int(gpu[gpu.event == "step_end"].gradients.max()) == 0  # the step drops them
        assert int(gpu[gpu.phase == "backward"].gradients.max()) > 0
        last = gpu[gpu.step == steps - 1]
        chunk = int(last.chunk.iloc[0])
        rise = int(ends.peak.iloc[-1]) - int(last.allocated.iloc[0])
        predicted = cpu_rank_rise_bytes(spec, plan.shape, 2, strategy=plan.strategy, chunk=chunk, rank=r,
                                        shard_embeddings=plan.parallel.shard_embeddings)
        assert abs(rise - predicted) / rise < 0.05, (r, chunk, rise, predicted)


def test_resume_equals_the_uninterrupted_run(setup, trained, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "step-5")
    shutil.rmtree(out / "step-4")  # killed after step 3: the newest complete checkpoint is step-2
    assert run(setup, "--steps", 5, "--checkpoint-every", 2, "--out", out, "--resume") == 0
    a = load_file(trained / "step-5" / "model.safetensors")
    b = load_file(out / "step-5" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in range(2):
        name = f"optimizer-rank{r}-of-2.safetensors"
        sa, sb = load_file(trained / "step-5" / name), load_file(out / "step-5" / name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    resumed = json.loads((out / "ranks.json").read_text())["ranks"][0]
    full = json.loads((trained / "ranks.json").read_text())["ranks"][0]
    assert resumed["start_step"] == 2 and resumed["losses"] == full["losses"][2:]


def test_resume_of_another_run_is_refused(setup, trained, tmp_path, capsys):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(trained, out)
    capsys.readouterr()
    assert run(setup, "--steps", 5, "--out", out, "--resume", "--seed", 1) == 2
    err = capsys.readouterr().err
    assert "is of another run (data_fingerprint differs)" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, text", [
    (["--nproc", 3], "--nproc 3 does not match the plan's 2 GPUs"),
    (["--nproc", 0], "invalid --nproc 0"),
    (["--eval", "x.jsonl"], "--eval is not supported for a parallel plan"),
    (["--steps", 0], "--steps must be an integer in [1, 1000000000], got 0"),
])
def test_bad_parallel_runs_are_one_line_errors(setup, tmp_path, capsys, args, text):
    assert run(setup, "--out", tmp_path / "o", *args) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "run.json").exists()


def test_a_trace_names_a_file_per_rank_and_needs_fingerprints():
    from planner.errors import ChunkftError
    from runtime.dist_config import DistConfig
    from runtime.memtrace import rank_trace_path

    assert rank_trace_path("traces/x.jsonl", 3) == "traces/x.rank3.jsonl"
    assert rank_trace_path("t", 0) == "t.rank0.jsonl"
    ids = torch.zeros(1, 2, 8, dtype=torch.long)
    with pytest.raises(ChunkftError, match="trace_header lacks model_fingerprint"):
        DistConfig(model_config={}, batches=ids, trace_path="t.jsonl")
    with pytest.raises(ChunkftError, match="trace_header lacks plan_fingerprint"):
        DistConfig(model_config={}, batches=ids, trace_path="t.jsonl", trace_header={"model_fingerprint": "m"})
    with pytest.raises(ChunkftError, match="invalid trace_steps 0"):
        DistConfig(model_config={}, batches=ids, trace_steps=0)


def test_nproc_with_a_one_gpu_plan_is_refused(setup, tmp_path, capsys):
    rc = main(["run", str(setup / "plan1.json"), "--data", str(setup / "data.jsonl"), "--nproc", "2",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "the plan is for one GPU" in err and "--gpus-per-node 2" in err


def test_a_plan_over_several_nodes_points_to_torchrun(setup, tmp_path, capsys):
    data = json.loads((setup / "plan.json").read_text())
    data["parallel"]["nodes"] = 2
    (tmp_path / "p.json").write_text(json.dumps(data))
    rc = main(["run", str(tmp_path / "p.json"), "--data", str(setup / "data.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "spans 2 nodes" in err and "torchrun --nnodes 2" in err


def test_torchrun_launch_equals_the_spawned_run(setup, trained, tmp_path):
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "torchrun"
    proc = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "planner.cli", "run", str(setup / "plan.json"),
                           "--data", str(setup / "data.jsonl"), "--lr", "1e-3", "--no-progress", "--steps", "5",
                           "--checkpoint-every", "2", "--out", str(out), "--launcher", "torchrun", "--device", "cpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("training ") == 1  # rank 0 speaks
    a = load_file(trained / "step-5" / "model.safetensors")
    b = load_file(out / "step-5" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ranks = json.loads((out / "ranks.json").read_text())["ranks"]
    full = json.loads((trained / "ranks.json").read_text())["ranks"]
    assert [r["losses"] for r in ranks] == [r["losses"] for r in full]


def test_torchrun_launcher_needs_torchrun_and_a_parallel_plan(setup, tmp_path, capsys):
    assert run(setup, "--out", tmp_path / "o", "--launcher", "torchrun") == 2
    assert "RANK is not set" in capsys.readouterr().err
    rc = main(["run", str(setup / "plan1.json"), "--data", str(setup / "data.jsonl"), "--launcher", "torchrun",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "runs a parallel plan" in capsys.readouterr().err


def test_a_disk_tier_plan_trains_as_the_host_tier_plan(setup, trained, tmp_path):
    """The same plan with its optimizer state on disk (each rank's chunk files under
    <out>/optimizer-state/rank<r>-of-2, staging buffers in host memory): bitwise the host-tier
    run's weights, optimizer state and losses."""
    data = json.loads((setup / "plan.json").read_text())
    data["strategy"]["state_tier"] = "disk"
    disk_plan = tmp_path / "plan-disk.json"
    disk_plan.write_text(json.dumps(data))
    out = tmp_path / "disk"
    assert main(["run", str(disk_plan), "--data", str(setup / "data.jsonl"), "--lr", "1e-3", "--no-progress",
                 "--steps", "5", "--out", str(out)]) == 0
    a = load_file(trained / "step-5" / "model.safetensors")
    b = load_file(out / "step-5" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in range(2):
        name = f"optimizer-rank{r}-of-2.safetensors"
        sa, sb = load_file(trained / "step-5" / name), load_file(out / "step-5" / name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        rank_dir = out / "optimizer-state" / f"rank{r}-of-2"
        assert sorted(p.name for p in rank_dir.glob("chunk*.bin")) == [f"chunk{k:05d}.bin" for k in range(3)]
    ranks = json.loads((out / "ranks.json").read_text())["ranks"]
    host = json.loads((trained / "ranks.json").read_text())["ranks"]
    assert ranks[0]["losses"] == host[0]["losses"]
    for d, h in zip(ranks, host):  # the host tier's bytes are now files; host memory holds staging
        assert d["state_bytes"]["disk"] == h["state_bytes"]["host"] and 0 < d["state_bytes"]["host"]
