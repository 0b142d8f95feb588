"""A sweep of bad and hostile inputs over the command line: every case must exit 2 with exactly
one line on stderr (`chunkft: error: ...`) naming the bad value, no traceback, and leave every
file in the working directory byte for byte as it was (and create none).

Cases run in process (`planner.cli.main`) in one shared working directory (`work`), prepared
once per module: a tiny Llama config, broken variants of it, a real plan and timeline of the
tiny model made by the CLI itself, broken variants of those, report directories, factories.
Validation must fail before any tracing, so each case takes milliseconds.

To add a case, append (id, argv, expected substring of the message) to CASES; argv paths are
relative to `work` (the test runs there). Files a new case needs go into `_write_inputs`.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

from planner.cli import main

TINY = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}
PLANNED = ["--seq", "32", "--chunks", "2", "--gpu", "1GiB"]

# config file name -> changes to TINY (None deletes the key)
BAD_CONFIGS: dict[str, dict] = {
    "hidden0.json": {"hidden_size": 0},
    "hidden_neg.json": {"hidden_size": -64},
    "hidden_huge.json": {"hidden_size": 10**9},
    "hidden_float.json": {"hidden_size": 64.5},
    "hidden63.json": {"hidden_size": 63},
    "inter_neg.json": {"intermediate_size": -1},
    "inter0.json": {"intermediate_size": 0},
    "kv3.json": {"num_key_value_heads": 3},
    "kv0.json": {"num_key_value_heads": 0},
    "kv8.json": {"num_key_value_heads": 8},
    "heads0.json": {"num_attention_heads": 0},
    "vocab0.json": {"vocab_size": 0},
    "vocab_huge.json": {"vocab_size": 10**12},
    "layers0.json": {"num_hidden_layers": 0},
    "layers_neg.json": {"num_hidden_layers": -2},
    "layers_huge.json": {"num_hidden_layers": 100000},
    "maxpos0.json": {"max_position_embeddings": 0},
    "bert.json": {"model_type": "bert"},
    "bart.json": {"model_type": "bart"},
    "notype.json": {"model_type": None},
    "unknowntype.json": {"model_type": "llama9000"},
    "t5.json": {"model_type": "t5"},
}

CASES: list[tuple[str, list[str], str]] = [
    # --- sizes: unit, sign, range, finiteness (fit parses the budget before the model)
    ("gpu-overflow", ["fit", "--gpu", "1e400GB"], "'1e400GB'"),
    ("gpu-above-1EiB", ["fit", "--gpu", "1e30GiB"], "at most 1 EiB"),
    ("gpu-negative", ["fit", "--gpu", "-1GiB"], "'-1GiB'"),
    ("gpu-negative-number", ["fit", "--gpu", "-5"], "'-5'"),
    ("gpu-zero", ["fit", "--gpu", "0GiB"], "greater than zero"),
    ("gpu-nan", ["fit", "--gpu", "nan"], "'nan'"),
    ("gpu-inf", ["fit", "--gpu", "inf"], "'inf'"),
    ("gpu-unit", ["fit", "--gpu", "24XB"], "GiB"),
    ("gpu-empty", ["fit", "--gpu", ""], "''"),
    ("gpu-tiny-fraction", ["fit", "--gpu", "0.1B"], "greater than zero"),
    ("host-ram-negative", ["fit", "--host-ram", "-3GiB"], "'-3GiB'"),
    ("host-ram-overflow", ["fit", "--host-ram", "9e99TiB"], "at most 1 EiB"),
    ("disk-words", ["fit", "--disk", "lots"], "'lots'"),
    ("plan-gpu-overflow", ["plan", "tiny.json", "--gpu", "1e400GB"], "'1e400GB'"),
    ("plan-gpu-above-card", ["plan", "tiny.json", "--gpu", "80GiB", "--gpu-kind", "rtx4090"], "rtx4090"),
    ("plan-host-negative", ["plan", "tiny.json", "--host-ram", "-1GB"], "'-1GB'"),
    ("plan-disk-nan", ["plan", "tiny.json", "--disk", "nanGB"], "'nanGB'"),
    ("size-host-overflow", ["size", "tiny.json", "--host-ram-per-node", "1e400GB"], "'1e400GB'"),
    ("size-host-negative", ["size", "tiny.json", "--host-ram-per-node", "-1TiB"], "'-1TiB'"),
    ("report-gpu-overflow", ["report", "tiny.json", "--gpu", "1e400GB"], "'1e400GB'"),
    ("report-host-empty", ["report", "tiny.json", "--host-ram", ""], "''"),
    # --- step shape: ranges, upper bounds, max_position_embeddings
    ("fit-jobs-zero", ["fit", "--jobs", "0"], "invalid --jobs '0'"),
    ("fit-jobs-words", ["fit", "--jobs", "many"], "invalid --jobs 'many'"),
    ("size-jobs-float", ["size", "tiny.json", "--jobs", "1.5"], "invalid --jobs '1.5'"),
    ("plan-jobs-negative", ["plan", "tiny.json", "--jobs", "-2"], "invalid --jobs '-2'"),
    ("fit-seq-zero", ["fit", "--seq", "0"], "sequence length 0"),
    ("fit-seq-negative", ["fit", "--seq", "-5"], "sequence length -5"),
    ("fit-seq-huge", ["fit", "--seq", "100000000"], "sequence length 100000000"),
    ("fit-seq-float", ["fit", "--seq", "1e8"], "'1e8'"),
    ("fit-batch-huge", ["fit", "--batch", "100000000000"], "batch size 100000000000"),
    ("fit-batch-float", ["fit", "--batch", "1e11"], "'1e11'"),
    ("fit-batch-zero", ["fit", "--batch", "0"], "batch size 0"),
    ("fit-tokens-product", ["fit", "--seq", "65536", "--batch", "1024"], "tokens per step"),
    ("fit-seq-over-maxpos", ["fit", "tiny.json", "--seq", "512"], "max_position_embeddings 256"),
    ("fit-preset-seq-over-maxpos", ["fit", "llama3-8b", "--seq", "200000"], "--allow-long-seq"),
    ("fit-long-seq-still-capped", ["fit", "tiny.json", "--seq", "2000000", "--allow-long-seq"], "sequence length"),
    ("fit-dtype", ["fit", "--dtype", "int8"], "'int8'"),
    ("plan-seq-huge", ["plan", "tiny.json", "--seq", "100000000"], "sequence length"),
    ("plan-seq-over-maxpos", ["plan", "tiny.json", "--seq", "257"], "max_position_embeddings 256"),
    ("plan-batch-zero", ["plan", "tiny.json", "--batch", "0"], "batch size 0"),
    ("plan-batch-huge", ["plan", "tiny.json", "--batch", "100000000000"], "batch size"),
    ("plan-dtype", ["plan", "tiny.json", "--dtype", "fp8"], "'fp8'"),
    ("size-seq-huge", ["size", "tiny.json", "--seq", "100000000"], "sequence length"),
    ("size-seq-over-maxpos", ["size", "tiny.json", "--seq", "1024"], "max_position_embeddings 256"),
    ("size-batch-negative", ["size", "tiny.json", "--batch", "-1"], "batch size -1"),
    ("report-seq-zero", ["report", "tiny.json", "--seq", "0"], "--seq"),
    ("report-seq-huge", ["report", "tiny.json", "--seq", "100000000"], "--seq"),
    ("report-seq-over-maxpos", ["report", "tiny.json", "--seq", "32,1024", "--batch", "1"], "max_position_embeddings"),
    ("report-seq-words", ["report", "tiny.json", "--seq", "a,b"], "'a,b'"),
    ("report-batch-huge", ["report", "tiny.json", "--batch", "100000000000"], "--batch"),
    ("report-too-many-values", ["report", "tiny.json", "--seq", ",".join(str(i) for i in range(1, 40))], "up to 16"),
    ("report-tokens-product", ["report", "tiny.json", "--seq", "65536", "--batch", "1024"], "tokens per step"),
    # --- chunk counts and GPU counts
    ("fit-chunks-one", ["fit", "--chunks", "1"], "chunk count '1'"),
    ("fit-chunks-huge", ["fit", "--chunks", "100000000000"], "'100000000000'"),
    ("fit-chunks-words", ["fit", "--chunks", "4,x"], "chunk count 'x'"),
    ("fit-chunks-many", ["fit", "--chunks", ",".join(str(i) for i in range(2, 40))], "at most 16"),
    ("plan-chunks-zero", ["plan", "tiny.json", "--chunks", "0"], "'0'"),
    ("plan-chunks-huge", ["plan", "tiny.json", "--chunks", "100000000000"], "'100000000000'"),
    ("plan-max-chunks-zero", ["plan", "tiny.json", "--max-chunks", "0"], "--max-chunks 0"),
    ("plan-max-chunks-huge", ["plan", "tiny.json", "--max-chunks", "100000000000"], "--max-chunks 100000000000"),
    ("plan-gpus-per-node-huge", ["plan", "tiny.json", "--gpus-per-node", "100000000"], "--gpus-per-node 100000000"),
    ("plan-gpus-per-node-zero", ["plan", "tiny.json", "--gpus-per-node", "0"], "--gpus-per-node 0"),
    ("plan-nodes-negative", ["plan", "tiny.json", "--nodes", "-1"], "--nodes -1"),
    ("plan-nodes-huge", ["plan", "tiny.json", "--gpus-per-node", "8", "--nodes", "1000"], "GPUs"),
    ("plan-shard-one-gpu", ["plan", "tiny.json", "--shard-embeddings"], "--shard-embeddings"),
    ("size-max-gpus-huge", ["size", "tiny.json", "--max-gpus", "1000000000"], "--max-gpus 1000000000"),
    ("size-max-gpus-zero", ["size", "tiny.json", "--max-gpus", "0"], "--max-gpus 0"),
    ("size-gpus-per-node-huge", ["size", "tiny.json", "--gpus-per-node", "100000"], "--gpus-per-node 100000"),
    ("size-max-chunks-huge", ["size", "tiny.json", "--max-chunks", "10000000"], "--max-chunks 10000000"),
    ("report-chunks-zero", ["report", "tiny.json", "--chunks", "0"], "--chunks"),
    ("report-chunks-huge", ["report", "tiny.json", "--chunks", "100000000000"], "--chunks"),
    # --- names: hardware, presets, flags
    ("fit-hardware", ["fit", "--hardware", "tpu9"], "unknown GPU 'tpu9'"),
    ("plan-gpu-kind", ["plan", "tiny.json", "--gpu-kind", "h1000"], "'h1000'"),
    ("size-gpu-kind", ["size", "tiny.json", "--gpu-kind", "a100"], "a100"),
    ("report-hardware", ["report", "tiny.json", "--hardware", "tpu9"], "'tpu9'"),
    ("fit-unknown-preset", ["fit", "no-such-model"], "'no-such-model'"),
    ("plan-missing-path", ["plan", "absent/config.json"], "'absent/config.json'"),
    ("size-unknown-preset", ["size", "llama99"], "'llama99'"),
    ("fit-unknown-flag", ["fit", "--frob"], "--frob"),
    ("fit-unknown-flag-lists-options", ["fit", "--gpus", "24GiB"], "valid options are"),
    ("plan-unknown-flag", ["plan", "tiny.json", "--chunks", "4", "--bogus"], "--bogus"),
    ("simulate-unknown-flag", ["simulate", "plan.json", "--seq", "64"], "--seq"),
    ("size-extra-positional", ["size", "tiny.json", "extra"], "'extra'"),
    ("compare-unknown-flag", ["compare", "timeline.jsonl", "timeline.jsonl", "--gpu", "1GB"], "--gpu"),
    ("report-unknown-flag", ["report", "tiny.json", "--cahce", "x.json"], "--cache"),
    ("unknown-command", ["frobnicate"], "'frobnicate'"),
    ("fit-missing-value", ["fit", "--gpu"], "--gpu"),
    ("fit-objective-choice", ["plan", "tiny.json", "--objective", "cost"], "'cost'"),
    # --- model configs: impossible values are refused before the tracer
    *[(f"config-{name[:-5]}", ["fit", name, *PLANNED], name) for name in BAD_CONFIGS],
    ("config-nested", ["fit", "nested.json"], "nested too deeply"),
    ("config-not-json", ["fit", "notjson.json"], "not valid JSON"),
    ("config-list", ["fit", "list.json"], "not a JSON object"),
    ("config-empty", ["fit", "empty.json"], "not valid JSON"),
    ("config-dir-without-config", ["fit", "emptydir"], "no config.json"),
    ("plan-config-kv3", ["plan", "kv3.json"], "num_key_value_heads 3"),
    ("size-config-layers0", ["size", "layers0.json"], "num_hidden_layers 0"),
    ("report-config-vocab0", ["report", "vocab0.json"], "vocab_size 0"),
    ("simulate-model-config-hidden0", ["simulate", "plan.json", "--model", "hidden0.json"], "hidden_size 0"),
    # --- model factories
    ("factory-sys-exit", ["fit", "exitfactory:make"], "sys.exit(3)"),
    ("factory-exit-on-import", ["fit", "exitimport:make"], "sys.exit(4)"),
    ("factory-raises", ["fit", "raisefactory:make"], "ValueError"),
    ("factory-not-module", ["fit", "notamodule_xyz:make"], "'notamodule_xyz'"),
    ("factory-returns-int", ["fit", "intfactory:make"], "not a torch.nn.Module"),
    ("factory-missing-attr", ["fit", "intfactory:nothing"], "'nothing'"),
    # --- output paths: directories, files in the way, inputs
    ("plan-output-dir", ["plan", "tiny.json", *PLANNED, "-o", "outdir"], "'outdir'"),
    ("plan-output-under-file", ["plan", "tiny.json", *PLANNED, "-o", "sentinel.txt/plan.json"], "is a file"),
    ("plan-output-is-model", ["plan", "tiny.json", *PLANNED, "-o", "tiny.json"], "input"),
    ("plan-output-empty", ["plan", "tiny.json", *PLANNED, "-o", ""], "''"),
    ("simulate-output-dir", ["simulate", "plan.json", "-o", "outdir"], "'outdir'"),
    ("simulate-output-is-plan", ["simulate", "plan.json", "-o", "plan.json"], "input"),
    ("simulate-output-under-file", ["simulate", "plan.json", "-o", "sentinel.txt/t.jsonl"], "is a file"),
    ("compare-out-is-file", ["compare", "timeline.jsonl", "trace.jsonl", "-o", "sentinel.txt"], "'sentinel.txt'"),
    ("compare-perfetto-dir", ["compare", "timeline.jsonl", "trace.jsonl", "-o", "fresh", "--perfetto", "outdir"],
     "'outdir'"),
    ("compare-perfetto-is-input", ["compare", "timeline.jsonl", "trace.jsonl", "-o", "fresh",
                                   "--perfetto", "timeline.jsonl"], "input"),
    ("report-out-is-file", ["report", "tiny.json", "-o", "sentinel.txt"], "'sentinel.txt'"),
    ("report-out-under-file", ["report", "tiny.json", "-o", "sentinel.txt/r"], "is a file"),
    # --- overwrites: another command's report, a cache that is not one
    ("report-over-compare-report", ["report", "tiny.json", "-o", "cmpdir"], "`chunkft compare` report"),
    ("compare-over-plan-report", ["compare", "timeline.jsonl", "trace.jsonl", "-o", "rptdir"],
     "`chunkft report` report"),
    ("report-over-foreign-files", ["report", "tiny.json", "-o", "userdir"], "did not write"),
    ("report-cache-is-plan", ["report", "tiny.json", "--cache", "plan.json"], "'plan.json'"),
    ("report-cache-is-model", ["report", "tiny.json", "--cache", "tiny.json"], "not an estimate cache"),
    ("report-cache-is-dir", ["report", "tiny.json", "--cache", "outdir"], "'outdir'"),
    ("report-cache-not-json", ["report", "tiny.json", "--cache", "notjson.json"], "not an estimate cache"),
    # --- plan files
    ("simulate-missing-plan", ["simulate", "absent.json"], "'absent.json'"),
    ("simulate-plan-not-json", ["simulate", "notjson.json"], "not valid JSON"),
    ("simulate-plan-nested", ["simulate", "nested.json"], "nested too deeply"),
    ("simulate-plan-is-config", ["simulate", "tiny.json"], "schema_version"),
    ("simulate-plan-seq-huge", ["simulate", "plan_seq_huge.json"], "shape.seq_len"),
    ("simulate-plan-batch-huge", ["simulate", "plan_batch_huge.json"], "shape.batch"),
    ("simulate-plan-batch-zero", ["simulate", "plan_batch_zero.json"], "batch size 0"),
    ("simulate-plan-nan-time", ["simulate", "plan_nan_time.json"], "step_time_s"),
    ("simulate-plan-inf-bandwidth", ["simulate", "plan_inf_bandwidth.json"], "hbm_bandwidth_Bps"),
    ("simulate-plan-huge-budget", ["simulate", "plan_huge_budget.json"], "gpu_bytes"),
    ("simulate-plan-version", ["simulate", "plan_version.json"], "schema_version 99"),
    ("simulate-plan-other-model", ["simulate", "plan.json", "--model", "other.json"], "fingerprint"),
    ("simulate-gpu-kind", ["simulate", "plan.json", "--gpu-kind", "tpu9"], "'tpu9'"),
    ("simulate-chunk-beyond", ["simulate", "plan.json", "--chunk", "99"], "--chunk 99"),
    ("simulate-chunk-negative", ["simulate", "plan.json", "--chunk", "-1"], "--chunk -1"),
    ("simulate-chunk-not-int", ["simulate", "plan.json", "--chunk", "first"], "'first'"),
    # --- timelines and traces
    ("compare-missing-timeline", ["compare", "absent.jsonl", "trace.jsonl", "-o", "fresh"], "'absent.jsonl'"),
    ("compare-timeline-is-dir", ["compare", "outdir", "trace.jsonl", "-o", "fresh"], "'outdir'"),
    ("compare-timeline-empty", ["compare", "empty.json", "trace.jsonl", "-o", "fresh"], "empty"),
    ("compare-timeline-nested", ["compare", "nested.json", "trace.jsonl", "-o", "fresh"], "nested too deeply"),
    ("compare-timeline-truncated", ["compare", "truncated.jsonl", "trace.jsonl", "-o", "fresh"], "truncated"),
    ("compare-timeline-inf-bytes", ["compare", "inf_bytes.jsonl", "trace.jsonl", "-o", "fresh"], "allocated"),
    ("compare-timeline-huge-bytes", ["compare", "huge_bytes.jsonl", "trace.jsonl", "-o", "fresh"], "allocated"),
    ("compare-timeline-nan-t", ["compare", "nan_t.jsonl", "trace.jsonl", "-o", "fresh"], "t NaN"),
    ("compare-timeline-string-layer", ["compare", "string_layer.jsonl", "trace.jsonl", "-o", "fresh"], "layer"),
    ("compare-swapped", ["compare", "trace.jsonl", "timeline.jsonl", "-o", "fresh"], "'trace.jsonl'"),
    ("compare-other-plan", ["compare", "timeline.jsonl", "other_trace.jsonl", "-o", "fresh"], "another plan"),
    ("compare-step-negative", ["compare", "timeline.jsonl", "trace.jsonl", "-o", "fresh", "--step", "-1"],
     "--step -1"),
    # --- run: only the plan file, the data file and the model (its own flags are runtime's)
    ("run-missing-plan", ["run", "absent.json", "--data", "data.jsonl", "--out", "fresh"], "'absent.json'"),
    ("run-plan-not-json", ["run", "notjson.json", "--data", "data.jsonl", "--out", "fresh"], "not valid JSON"),
    ("run-plan-nested", ["run", "nested.json", "--data", "data.jsonl", "--out", "fresh"], "nested too deeply"),
    ("run-plan-seq-huge", ["run", "plan_seq_huge.json", "--data", "data.jsonl", "--out", "fresh"], "shape.seq_len"),
    ("run-plan-nan-time", ["run", "plan_nan_time.json", "--data", "data.jsonl", "--out", "fresh"], "step_time_s"),
    ("fit-loop-unknown", ["fit", "tiny.json", "--loop", "keras"], "'keras'"),
    ("fit-max-unknown", ["fit", "tiny.json", "--max", "tokens"], "'tokens'"),
    ("fit-objective-unknown", ["fit", "tiny.json", "--objective", "cheapest"], "'cheapest'"),
    ("fit-max-seq-too-long", ["fit", "tiny.json", "--max", "seq", "--seq", "100000"], "max_position_embeddings"),
    ("plan-loop-unknown", ["plan", "tiny.json", "--loop", "lightning", "-o", "fresh.json"], "'lightning'"),
    ("fit-from-missing", ["fit", "tiny.json", "--from", "no_such_recipe.yaml"], "cannot read it"),
    ("fit-from-wrong-kind", ["fit", "tiny.json", "--from", "data.jsonl"], "valid files are"),
    ("fit-search-recipes-bogus", ["fit", "tiny.json", "--search-recipes", "all"], "'all'"),
    ("fit-alloc-conf-unknown-key", ["fit", "tiny.json", "--seq", "128", "--alloc-conf", "turbo:True"], "turbo"),
    ("plan-search-recipes-sharded", ["plan", "tiny.json", "--seq", "128", "--gpus-per-node", "2",
                                     "--search-recipes", "exact", "-o", "fresh.json"], "one-GPU plans"),
    ("simulate-plan-loop-bogus", ["simulate", "plan_loop_bogus.json", "-o", "fresh.jsonl"],
     "invalid loop 'keras': valid values are chunkft, hf"),
    ("simulate-plan-recipe-field", ["simulate", "plan_recipe_field.json", "-o", "fresh.jsonl"],
     "recipe has unknown field 'optimiser'; valid fields: loop, precision, optim"),
    ("run-plan-hf-chunked-loss", ["run", "plan_hf_chunked_loss.json", "--data", "data.jsonl", "--out", "fresh"],
     "a chunked loss (loss_chunk_tokens=512) needs --loop chunkft"),
    ("run-data-nested", ["run", "plan.json", "--data", "nested.jsonl", "--out", "fresh"], "nests JSON too deeply"),
    # training arguments: refused before anything is built or written
    *[(f"run-{name}", ["run", "plan.json", "--data", "data.jsonl", "--out", "fresh", *argv], expected) for name, argv,
      expected in [
        ("lr-nan", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        ("lr-inf", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        ("lr-negative", ["--lr=-1e-3"], "--lr must be a finite number > 0, got -0.001"),
        ("weight-decay-nan", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        ("weight-decay-negative", ["--weight-decay=-0.1"], "--weight-decay must be a finite number >= 0"),
        ("clip-negative", ["--max-grad-norm=-1"], "--max-grad-norm must be a finite number >= 0 (0 = no clipping)"),
        ("clip-inf", ["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number >= 0"),
        ("steps-huge", ["--steps", "10000000000"], "--steps must be an integer in [1, 1000000000]"),
        ("steps-zero", ["--steps", "0"], "--steps must be an integer in [1, 1000000000], got 0"),
        ("grad-accum-zero", ["--grad-accum", "0"], "--grad-accum must be an integer in [1, 1000000000]"),
        ("warmup-negative", ["--warmup-steps=-1"], "--warmup-steps must be an integer in [0, 1000000000]"),
        ("warmup-past-steps", ["--steps", "4", "--warmup-steps", "4"], "cosine schedule needs --steps (4) >"),
        ("seed-negative", ["--seed=-1"], "--seed must be an integer in [0, 2**63), got -1"),
        ("seed-huge", ["--seed", str(2**64)], "--seed must be an integer in [0, 2**63)"),
        ("nonfinite-zero", ["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be an integer in [1,"),
        ("checkpoint-every-negative", ["--checkpoint-every=-2"], "--checkpoint-every must be an integer in [0,"),
        ("allow-changed-alone", ["--allow-changed", "lr"], "--allow-changed goes with --resume"),
        ("allow-changed-unknown", ["--resume", "--allow-changed", "lr,plan"], "plan is not a resumable argument"),
        ("resume-and-overwrite", ["--resume", "--overwrite"], "give one of them"),
        ("trace-is-dir", ["--trace", "outdir"], "--trace 'outdir' is a directory"),
        ("out-is-file", ["--out", "sentinel.txt"], "--out 'sentinel.txt' is a file"),
        ("nproc-zero", ["--nproc", "0"], "invalid --nproc 0"),
    ]],
]


def _write_inputs(work: Path) -> None:
    """Every file the cases read, made once (the plan and timeline by the CLI itself)."""
    (work / "tiny.json").write_text(json.dumps(TINY))
    (work / "other.json").write_text(json.dumps({**TINY, "vocab_size": 640}))
    for name, changes in BAD_CONFIGS.items():
        config = {**TINY, **changes}
        (work / name).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    (work / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (work / "notjson.json").write_text("{not json")
    (work / "list.json").write_text("[1, 2]")
    (work / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (work / "empty.json").write_text("")
    (work / "emptydir").mkdir()
    (work / "outdir").mkdir()
    (work / "sentinel.txt").write_text("an earlier result\n")
    (work / "data.jsonl").write_text('{"text": "hello world"}\n' * 4)
    (work / "exitfactory.py").write_text("import sys\ndef make():\n    sys.exit(3)\n")
    (work / "exitimport.py").write_text("import sys\nsys.exit(4)\n")
    (work / "raisefactory.py").write_text("def make():\n    raise ValueError('no model today')\n")
    (work / "intfactory.py").write_text("def make():\n    return 3\n")
    for name, title in (("cmpdir", "chunkft: predicted vs measured memory"), ("rptdir", "chunkft: what fits for x")):
        (work / name).mkdir()
        (work / name / "report.md").write_text(f"# {title}\n\nan earlier report\n")
        (work / name / "report.html").write_text("<html>an earlier report</html>\n")
    (work / "userdir").mkdir()
    (work / "userdir" / "sizing.csv").write_text("the user's own sizing table\n")

    assert main(["plan", "tiny.json", *PLANNED, "-o", "plan.json"]) == 0
    assert main(["simulate", "plan.json", "-o", "timeline.jsonl"]) == 0
    plan = json.loads((work / "plan.json").read_text())
    variants = {
        "plan_seq_huge.json": lambda p: p["shape"].update(seq_len=10**9),
        "plan_batch_huge.json": lambda p: p["shape"].update(batch=10**12),
        "plan_batch_zero.json": lambda p: p["shape"].update(batch=0),
        "plan_nan_time.json": lambda p: p["predicted"].update(step_time_s=float("nan")),
        "plan_inf_bandwidth.json": lambda p: p["hardware"]["gpu"].update(hbm_bandwidth_Bps=float("inf")),
        "plan_huge_budget.json": lambda p: p["budget"].update(gpu_bytes=10**30),
        "plan_version.json": lambda p: p.update(schema_version=99),
        "plan_loop_bogus.json": lambda p: p["strategy"].update(recipe={"loop": "keras"}),
        "plan_recipe_field.json": lambda p: p["strategy"].update(recipe={"loop": "hf", "optimiser": "sgd"}),
        "plan_hf_chunked_loss.json": lambda p: p["strategy"].update(recipe={"loop": "hf"}, loss_chunk_tokens=512),
    }
    for name, change in variants.items():
        bad = json.loads(json.dumps(plan))
        change(bad)
        (work / name).write_text(json.dumps(bad))
    lines = (work / "timeline.jsonl").read_text().splitlines()
    header, event = json.loads(lines[0]), json.loads(lines[1])
    trace_header = {**header, "kind": "trace", "t_unit": "s"}
    (work / "trace.jsonl").write_text("\n".join(json.dumps(r) for r in (trace_header, event)) + "\n")
    (work / "other_trace.jsonl").write_text(
        "\n".join(json.dumps(r) for r in ({**trace_header, "plan_fingerprint": "f" * 64}, event)) + "\n")
    (work / "truncated.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    for name, change in (("inf_bytes.jsonl", {"allocated": float("inf")}), ("huge_bytes.jsonl", {"allocated": 10**30}),
                         ("nan_t.jsonl", {"t": float("nan")}), ("string_layer.jsonl", {"layer": "three"})):
        (work / name).write_text(json.dumps(header) + "\n" + json.dumps({**event, **change}) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The shared working directory with every input written (module-scoped: made once)."""
    work = tmp_path_factory.mktemp("bad_input")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.syspath_prepend(str(work))
    try:
        _write_inputs(work)
        yield work
    finally:
        mp.undo()


@pytest.fixture
def in_work(work, monkeypatch):
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    return work


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (b"<dir>" if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts}


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors exit through the parser
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err: str, expected: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, err
    assert err.startswith("chunkft: error: ") and err.count("\n") == 1, err
    assert expected in err, err


@pytest.mark.parametrize("argv, expected", [(argv, expected) for _, argv, expected in CASES],
                         ids=[case_id for case_id, _, _ in CASES])
def test_bad_input(in_work, capsys, argv, expected):
    before = _snapshot(in_work)
    code, out, err = _run(capsys, argv)
    _assert_one_line_error(code, err, expected)
    assert _snapshot(in_work) == before, "a failing command changed or created files"


def test_case_ids_are_unique_and_the_sweep_is_wide():
    ids = [case_id for case_id, _, _ in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 100
    assert {argv[0] for _, argv, _ in CASES} >= {"fit", "plan", "simulate", "size", "compare", "report", "run"}


class SafetensorError(Exception):
    """Stands in for safetensors' own I/O error (matched by name at the CLI edge)."""


@pytest.mark.parametrize("argv, error, expected", [
    (["plan", "tiny.json", *PLANNED, "-o", "plan.json"], OSError(errno.ENOSPC, "No space left on device"),
     "No space left on device"),
    (["simulate", "plan.json", "-o", "timeline.jsonl"], OSError(errno.EFBIG, "File too large"), "File too large"),
    (["plan", "tiny.json", *PLANNED, "-o", "plan.json"], SafetensorError("Error while serializing: I/O error"),
     "I/O error"),
], ids=["plan-ENOSPC", "simulate-EFBIG", "plan-SafetensorError"])
def test_a_full_disk_keeps_the_earlier_result(in_work, capsys, monkeypatch, argv, error, expected):
    import planner.fsio

    def failing_replace(src, dst):
        raise error

    monkeypatch.setattr(planner.fsio.os, "replace", failing_replace)
    before = _snapshot(in_work)
    code, out, err = _run(capsys, argv)
    _assert_one_line_error(code, err, expected)
    assert _snapshot(in_work) == before


def test_write_errors_outside_the_atomic_writer_are_one_line_too(in_work, capsys, monkeypatch):
    """A full disk met anywhere in a command (not only in planner.fsio) is one line, exit 2."""
    import planner.plan_cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "timeline.jsonl")

    monkeypatch.setattr(planner.plan_cli, "run_simulate", full_disk)
    code, out, err = _run(capsys, ["simulate", "plan.json"])
    _assert_one_line_error(code, err, "'timeline.jsonl'")


# ----------------------------------------------------------------- what must still be accepted

def test_allow_long_seq_plans_beyond_max_position_embeddings(in_work, capsys):
    code, out, err = _run(capsys, ["fit", "tiny.json", "--seq", "512", "--allow-long-seq", "--chunks", "2",
                                   "--gpu", "1GiB", "--json"])
    assert code == 0 and err == "" and json.loads(out)["shape"]["seq_len"] == 512


def test_a_report_directory_takes_reruns_and_force(tmp_path):
    from analysis.report import check_report_dir
    from planner.errors import ChunkftError

    for command, other in (("compare", "report"), ("report", "compare")):
        out = tmp_path / command
        out.mkdir()
        title = "chunkft: predicted vs measured memory" if command == "compare" else "chunkft: what fits for m"
        (out / "report.md").write_text(f"# {title}\n")
        assert check_report_dir(out, command, force=False) == out  # a rerun replaces its own report
        with pytest.raises(ChunkftError, match=f"`chunkft {command}` report"):
            check_report_dir(out, other, force=False)
        assert check_report_dir(out, other, force=True) == out
    assert check_report_dir(tmp_path / "new", "report", force=False) == tmp_path / "new"
