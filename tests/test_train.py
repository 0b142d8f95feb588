"""`chunkft run` end to end on CPU: a plan for a tiny Llama, data, a trace held against the
plan's prediction, checkpoints, resume, and bad input refused in one line before training."""

from __future__ import annotations

import json

import pytest
import torch

from planner.cli import main

SEQ, BATCH = 64, 2


TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False)


def make_plan(tmp_path, *, chunks=3, checkpointing=False, dtype="fp32", loss_chunk_tokens=0, name="plan.json",
              config=TINY, predict=False, seq_len=SEQ, batch=BATCH, prefetch_depth=1, **strategy_fields):
    """A plan for the tiny model through planner.plan, strategy fixed; predictions from
    planner.evaluate with `predict`, else zeros (the runtime does not read them)."""
    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.plan import make_plan as planner_make_plan, save_plan
    from planner.schema import Tier as T
    from planner.solve import Objective
    from planner.strategy import Budget, Estimate, Strategy
    from planner.trace import StepShape

    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    spec = resolve_model(str(model_dir))
    shape = StepShape(batch=batch, seq_len=seq_len, dtype=dtype)
    strategy = Strategy(chunks=chunks, state_tier=T.HOST if chunks > 1 else T.GPU, checkpointing=checkpointing,
                        loss_chunk_tokens=loss_chunk_tokens, prefetch_depth=prefetch_depth)
    if strategy_fields:
        import dataclasses

        strategy = dataclasses.replace(strategy, **strategy_fields)
    hw = hardware("rtx4090")
    if predict:
        estimate = evaluate(spec, shape, strategy, hw)
    else:
        estimate = Estimate(strategy=strategy, peak_bytes={T.GPU: 0}, components={T.GPU: {}}, reserved_bytes=0,
                            step_time_s=0.0, worst_chunk=None)
    plan = planner_make_plan(spec, shape, hw, Budget(gpu_bytes=2**34), Objective.MEMORY, estimate)
    path = tmp_path / name
    save_plan(plan, path)
    return path, spec, plan


def write_data(path, n=40):
    rows = [{"text": f"the quick brown fox {i} jumps over the lazy dog"} if i % 2 else
            {"prompt": f"question {i}?", "response": f" answer {i * 7}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    plan, spec, plan_obj = make_plan(tmp)
    return tmp, plan, spec, plan_obj, write_data(tmp / "train.jsonl"), write_data(tmp / "eval.jsonl", 6)


def run_cli(*argv):
    return main(["run", *map(str, argv), "--no-progress", "--lr", "1e-3"])


def read_trace(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0], lines[1:]


def test_run_writes_checkpoint_and_trace(planned, capsys):
    tmp, plan, spec, plan_obj, train, evaluation = planned
    out, trace = tmp / "out", tmp / "traces" / "tiny.jsonl"
    assert run_cli(plan, "--data", train, "--eval", evaluation, "--steps", 5, "--out", out, "--trace", trace,
                   "--trace-steps", 4) == 0
    printed = capsys.readouterr().out
    assert "with 3 chunks, state on host" in printed and "eval loss" in printed
    header, events = read_trace(trace)
    assert header["kind"] == "trace" and header["model_fingerprint"] == spec.fingerprint()
    assert header["plan_fingerprint"] == plan_obj.fingerprint() and header["allocator"] == "cpu"
    kinds = {e["event"] for e in events}
    assert {"phase", "layer", "optimizer_step", "chunk_switch", "step_end"} <= kinds
    # one chunk switch per step (update interval 1), cycling 0 -> 1 -> 2 -> 0
    switches = [e["name"] for e in events if e["event"] == "chunk_switch" and e["tier"] == "gpu"]
    assert switches == ["chunk 0 -> 1", "chunk 1 -> 2", "chunk 2 -> 0", "chunk 0 -> 1"]
    # forward and backward layer events for both decoder layers, every step
    layer_events = [(e["step"], e["phase"], e["layer"]) for e in events if e["event"] == "layer"]
    assert layer_events[:4] == [(0, "forward", 0), (0, "forward", 1), (0, "backward", 1), (0, "backward", 0)]
    # ... and none from the evaluation at the end (no grad: not a training step)
    assert sum(1 for _, phase, _ in layer_events if phase == "forward") == 4 * 2
    assert [e["step"] for e in events if e["event"] == "step_end" and e["tier"] == "gpu"] == [0, 1, 2, 3]
    # the runtime's accounting: fp32 master + 2 moments of the active chunk and of the prefetched
    # next one on the compute tier; every chunk's host slot resting on host (a GPU step keeps its
    # working copy beside the host slot, not instead of it)
    table = plan_obj.chunk_table
    gpu_ends = [e for e in events if e["event"] == "step_end" and e["tier"] == "gpu"]
    for e in gpu_ends:
        # fp32 model: 4 B per element, like the master
        chunk_bytes = table.chunk_bytes(e["chunk"]) + table.chunk_bytes((e["chunk"] + 1) % 3)
        assert e["bytes"]["master"] == chunk_bytes and e["bytes"]["optimizer"] == 2 * chunk_bytes
        assert e["bytes"]["weights"] == sum(table.chunk_bytes(k) for k in range(3))
        assert e["peak"] > e["allocated"] > 0  # the op-level peak of the step is above its end
        # the CPU trace's zero is before the model was built: weights and fp32 state are in it
        assert e["allocated"] > e["bytes"]["weights"] + 3 * chunk_bytes
    host = [e for e in events if e["tier"] == "host"]
    assert host and host[-1]["bytes"]["master"] == sum(table.chunk_bytes(k) for k in range(3))
    # HF-loadable checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / (out / "latest").read_text().strip())
    assert model.config.hidden_size == 64


def test_measured_step_peak_matches_plan_prediction(tmp_path):
    """CPU: the malloc peak of real ChunkFT steps (planner.measure.MallocSampler, per aten op)
    against the planner's replay of the same step (allocator="cpu"), chunk by chunk.

    The model is wider than TINY: what malloc sees besides tensor storages (autograd nodes,
    headers, Python objects; 100-300 KiB) must stay small next to the step's peak (~10 MiB)."""
    from planner.trace import TraceOptions, trace_step
    from runtime.run_cli import build_run

    config = {**TINY, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "vocab_size": 4096,
              "max_position_embeddings": 256}
    # No prefetch: a prefetch thread allocates the next chunk's working copy whenever it runs,
    # inside or outside a step's sampling window; the step's own peak is what is compared here.
    plan, spec, plan_obj = make_plan(tmp_path, config=config, seq_len=256, batch=1, prefetch_depth=0)
    train = write_data(tmp_path / "train.jsonl")
    args = _args(plan, train, tmp_path / "peak", trace=tmp_path / "peak.jsonl", steps=6)
    trainer, trace, _, _ = build_run(args)
    result = trainer.train()
    trainer.optimizer.inner.close()
    table = plan_obj.chunk_table
    for step in (3, 4, 5):  # second cycle: every chunk's state exists, nothing lazily created
        k = step % 3
        graph = trace_step(spec, plan_obj.shape, TraceOptions(grad=table.grad_spec(k)))
        predicted = graph.replay(allocator="cpu").step_peak_bytes
        measured = result.step_peaks[step]
        print(f"chunk {k}: measured {measured} B, predicted {predicted} B, error {measured / predicted - 1:+.2%}")
        assert abs(measured - predicted) <= 0.03 * predicted, (k, measured, predicted)


def test_plain_hf_loop_plan_runs_its_loop_and_matches_its_prediction(tmp_path):
    """A plan for the plain HF loop (--loop hf) is run with that loop: the output object (logits,
    use_cache's keys and values) stays alive through backward, and the measured step peak
    follows the hf-loop prediction, which is above chunkft's step."""
    from planner.recipe import Loop, Recipe
    from planner.trace import TraceOptions, trace_step
    from runtime.run_cli import build_run

    config = {**TINY, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "vocab_size": 4096,
              "max_position_embeddings": 256, "use_cache": True}
    plan, spec, plan_obj = make_plan(tmp_path, config=config, seq_len=256, batch=1, chunks=1,
                                     recipe=Recipe(loop=Loop.HF))
    assert json.loads(plan.read_text())["strategy"]["recipe"] == {"loop": "hf"}
    trainer, _, _, _ = build_run(_args(plan, write_data(tmp_path / "train.jsonl"), tmp_path / "out",
                                       trace=tmp_path / "t.jsonl", steps=3))
    assert trainer.config.loop == "hf"
    result = trainer.train()
    trainer.optimizer.inner.close()
    predicted = trace_step(spec, plan_obj.shape, TraceOptions(loop="hf")).replay(allocator="cpu").step_peak_bytes
    chunkft = trace_step(spec, plan_obj.shape, TraceOptions()).replay(allocator="cpu").step_peak_bytes
    assert predicted > chunkft * 1.05
    for measured in result.step_peaks[1:]:
        print(f"hf loop: measured {measured} B, predicted {predicted} B ({measured / predicted - 1:+.2%}); "
              f"chunkft step {chunkft} B")
        assert abs(measured - predicted) <= 0.03 * predicted, (measured, predicted)


def _args(plan, train, out, *, trace=None, steps=3, **extra):
    """`chunkft run`'s parsed arguments (the real parser: every default), with `extra` set."""
    from planner.cli import build_parser

    args = build_parser().parse_args(["run", str(plan), "--data", str(train), "--out", str(out), "--steps", str(steps),
                                      "--lr", "1e-3", "--device", "cpu", "--no-progress"]
                                     + (["--trace", str(trace)] if trace else []))
    for name, value in extra.items():
        assert hasattr(args, name), name
        setattr(args, name, value)
    return args


def test_cli_resume_matches_uninterrupted_run(planned, capsys):
    from runtime.run_cli import build_run

    tmp, plan, _, _, train, _ = planned
    full, _, _, _ = build_run(_args(plan, train, tmp / "r_full", steps=5, checkpoint_every=1, grad_accum=2))
    full.train()
    first, _, _, _ = build_run(_args(plan, train, tmp / "r_part", steps=5, checkpoint_every=1, grad_accum=2))
    first.train(stop_after=2)
    first.claimed.release()
    assert run_cli(plan, "--data", train, "--steps", 5, "--out", tmp / "r_part", "--resume", "--grad-accum", 2,
                   "--checkpoint-every", 1, "--device", "cpu") == 0
    from runtime.checkpoint import latest_checkpoint
    from safetensors.torch import load_file

    a = load_file(latest_checkpoint(tmp / "r_full") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp / "r_part") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming with other data (or another seed: another order) is refused
    other = write_data(tmp / "other.jsonl", 30)
    capsys.readouterr()
    assert run_cli(plan, "--data", other, "--steps", 6, "--out", tmp / "r_part", "--resume") == 2
    assert "was written for another data (data_fingerprint" in capsys.readouterr().err
    assert run_cli(plan, "--data", train, "--steps", 6, "--out", tmp / "r_part", "--resume", "--seed", 1) == 2
    assert "was written for another data" in capsys.readouterr().err


def test_activation_checkpointing_and_chunked_loss_train(tmp_path):
    plan, _, _ = make_plan(tmp_path, chunks=2, checkpointing=True, loss_chunk_tokens=32)
    from runtime.run_cli import build_run

    trainer, _, _, _ = build_run(_args(plan, write_data(tmp_path / "d.jsonl"), tmp_path / "out", steps=6, lr=3e-3,
                                       trace=tmp_path / "t.jsonl"))
    result = trainer.train()
    trainer.optimizer.inner.close()
    assert result.losses[-1] < result.losses[0]  # it learns
    assert trainer.model.is_activation_checkpointing
    # checkpointed layers re-run their forward inside backward: the trace says so, per layer
    _, events = read_trace(tmp_path / "t.jsonl")
    step0 = [(e["phase"], e["layer"]) for e in events if e["event"] == "layer" and e["step"] == 0]
    assert step0 == [("forward", 0), ("forward", 1), ("backward", 1), ("recompute", 1), ("backward", 0),
                     ("recompute", 0)]


def test_bad_inputs_are_one_line_errors_before_training(planned, tmp_path, capsys):
    _, plan, _, _, train, _ = planned
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "ok"}\n{"txt": 1}\n')
    (tmp_path / "file").write_text("x")
    cases = [
        (["--data", bad_data], "bad.jsonl' line 2 is missing key 'prompt'"),
        (["--data", tmp_path / "none.jsonl"], "does not exist"),
        (["--data", train, "--out", tmp_path / "file" / "out"], "is not writable"),
        (["--data", train, "--tokenizer", tmp_path / "nodir"], "is not a directory"),
        (["--data", train, "--steps", 0], "--steps must be an integer in [1, 1000000000], got 0"),
        (["--data", train, "--device", "cpu", "--gpu-memory-cap", "24GiB"], "needs a CUDA device"),
        (["--data", train, "--device", "cpu", "--gpu-memory-cap", "24XB"], "24XB"),
    ]
    for argv, message in cases:
        out = tmp_path / "o"
        code = run_cli(plan, *(argv if "--out" in map(str, argv) else [*argv, "--out", out]))
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
        assert not (out / "latest").exists()  # nothing trained, nothing written


def test_plan_for_another_model_and_bad_plan(tmp_path, capsys):
    plan, _, _ = make_plan(tmp_path)
    data = write_data(tmp_path / "d.jsonl")
    doc = json.loads(plan.read_text())
    doc["model"]["fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(doc))
    assert run_cli(tmp_path / "other.json", "--data", data, "--out", tmp_path / "o") == 2
    assert "the plan was made for model" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert run_cli(tmp_path / "broken.json", "--data", data, "--out", tmp_path / "o") == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_tokenizer_larger_than_model_vocabulary_is_refused(tmp_path, capsys):
    plan, _, _ = make_plan(tmp_path, config={**TINY, "vocab_size": 200})
    assert run_cli(plan, "--data", write_data(tmp_path / "d.jsonl"), "--out", tmp_path / "o") == 2
    assert "has 259 tokens but the model's vocab_size is 200" in capsys.readouterr().err


def test_model_directory_with_weights_is_loaded(tmp_path):
    """A model directory with safetensors weights fine-tunes those weights, not a random init."""
    from runtime.run_cli import load_model
    from planner.model import resolve_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded = load_model(resolve_model(str(tmp_path / "m")), dtype=torch.float32, device="cpu", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_16bit_plans_train_and_fp16_overflow_skips_the_step(tmp_path, dtype):
    from runtime.run_cli import build_run

    plan, _, _ = make_plan(tmp_path, chunks=2, dtype=dtype)
    trainer, _, _, _ = build_run(_args(plan, write_data(tmp_path / "d.jsonl"), tmp_path / "out", steps=8, lr=3e-3,
                                       schedule="constant", grad_accum=2))
    inner = trainer.optimizer.inner
    assert next(trainer.model.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if dtype == "fp16":
        # A loss scale far too large: the logits' gradients overflow fp16; the step must be skipped,
        # the scale halved, the weights and the active chunk left as they were.
        inner.scaler.scale = 2.0**30
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        result = trainer.train(stop_after=1)
        assert result.skipped_steps == 1 and inner.scaler.scale == 2.0**29
        assert inner.active_chunk == 0 and inner.global_step == 0
        assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
        inner.scaler.scale = 2.0**8
    else:
        assert inner.scaler is None
    result = trainer.train()
    inner.close()
    assert result.skipped_steps == 0 and inner.global_step == (7 if dtype == "fp16" else 8)
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("loop", ["hf-trainer", "torchtune"])
def test_trainer_and_torchtune_loop_plans_run_their_loops(tmp_path, loop):
    """Plans for HF Trainer's and torchtune's loops train with those loops (planner.step.loop_forward);
    each computes the same mean next-token loss as chunkft's step, to rounding."""
    from planner.recipe import Recipe
    from runtime.run_cli import build_run

    losses = {}
    for name in ("chunkft", loop):
        case = tmp_path / name
        case.mkdir()
        plan, _, _ = make_plan(case, chunks=1, recipe=Recipe(loop=name))
        trainer, _, _, _ = build_run(_args(plan, write_data(case / "d.jsonl"), case / "out", steps=2))
        assert trainer.config.loop == name
        losses[name] = trainer.train().losses
        trainer.optimizer.inner.close()
    assert losses[loop] == pytest.approx(losses["chunkft"], rel=1e-5)
