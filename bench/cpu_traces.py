"""Real CPU runs held against their plans: the pairs committed under traces/.

For each case this script plans a small random-init Llama (pinned strategy), predicts the
step's timeline (`chunkft simulate`), trains it for a few steps on generated text with a
measured trace (`chunkft run --device cpu --trace`), and compares the two (`chunkft compare`).
Everything goes through the CLI, as a user would run it. Output: traces/cpu/<case>/ and a
summary table (traces/cpu/summary.csv).

    python bench/cpu_traces.py            # every case: a few minutes on 2 cores
    python bench/cpu_traces.py CASE ...   # only these cases (the summary keeps the others' rows)
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "traces" / "cpu"

# A Llama small enough to train on a CPU in seconds, large enough that malloc's non-tensor
# bytes (a few hundred KiB) are small next to the step.
CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 4096,
    "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
SHAPE = ["--seq", "256", "--batch", "2", "--dtype", "bf16"]
CASES = {
    "fullft-ckpt": ["--chunks", "1", "--optimizer", "gpu", "--checkpointing", "on"],
    "chunkft-c4-host": ["--chunks", "4", "--optimizer", "gpu", "--state", "host", "--checkpointing", "on"],
    "chunkft-c4-stream": ["--chunks", "4", "--optimizer", "gpu", "--state", "host", "--checkpointing", "on",
                          "--weights", "stream"],
    # recipe axes the runtime executes (planner.recipe)
    "fullft-in-backward": ["--chunks", "1", "--optimizer", "gpu", "--checkpointing", "off", "--optimizer-in-backward"],
    "chunkft-c4-in-backward": ["--chunks", "4", "--optimizer", "gpu", "--state", "host", "--checkpointing", "off",
                            "--weights", "gpu", "--optimizer-in-backward"],
    "chunkft-c4-bf16-offload": ["--chunks", "4", "--optimizer", "gpu", "--state", "host", "--checkpointing", "off",
                                "--weights", "gpu", "--optim", "adamw_bf16", "--offload-activations"],
    "chunkft-c4-8bit-selective": ["--chunks", "4", "--optimizer", "gpu", "--state", "host",
                                  "--checkpointing", "selective", "--optim", "adamw_torch_8bit"],
}
# what `chunkft run` needs besides the plan for a case (the step in backward cannot clip)
RUN_FLAGS = {"fullft-in-backward": ["--max-grad-norm", "0"], "chunkft-c4-in-backward": ["--max-grad-norm", "0"]}
STEPS = 4


def chunkft(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"chunkft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def rel(path: Path) -> str:
    """Paths relative to the repository, so the committed plans and traces name no machine."""
    return str(path.relative_to(ROOT))


def write_inputs() -> tuple[Path, Path]:
    model_dir = OUT / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    rng = random.Random(0)
    words = "the plan chunk memory tier moves holds while between cat mat sat on and of".split()
    data = OUT / "data.jsonl"
    with open(data, "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n")
    return model_dir, data


def main(argv: list[str]) -> None:
    unknown = sorted(set(argv) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case {unknown[0]!r}; valid cases: {', '.join(CASES)}")
    model_dir, data = write_inputs()
    for case, pins in CASES.items():
        if argv and case not in argv:
            continue
        d = OUT / case
        d.mkdir(parents=True, exist_ok=True)
        chunkft("plan", rel(model_dir), "--gpu", "80GiB", *SHAPE, *pins, "-o", rel(d / "plan.json"))
        # a ChunkFT run of STEPS steps trains chunk 0 (the plans switch every 16 steps); its
        # timeline is that chunk's step, which `chunkft compare` holds against chunk 0's steps
        chunked = pins[pins.index("--chunks") + 1] != "1"
        chunkft("simulate", rel(d / "plan.json"), "-o", rel(d / "timeline.jsonl"), *(["--chunk", "0"] if chunked else []))
        with tempfile.TemporaryDirectory(prefix="chunkft-cpu-traces-") as run_dir:  # checkpoints are not kept
            chunkft("run", rel(d / "plan.json"), "--data", rel(data), "--steps", str(STEPS), "--device", "cpu",
                    "--no-progress", "--out", run_dir, "--trace", rel(d / "trace.jsonl"), *RUN_FLAGS.get(case, []))
        chunkft("compare", rel(d / "timeline.jsonl"), rel(d / "trace.jsonl"), "-o", rel(d / "report"),
                "--perfetto", rel(d / "report" / "perfetto.json"))
    rows = []  # every case that has a report, this invocation's and earlier ones'
    for case in CASES:
        if (OUT / case / "report" / "peaks.csv").exists():
            with open(OUT / case / "report" / "peaks.csv") as f:
                rows += [{"case": case, **row} for row in csv.DictReader(f)]
    with open(OUT / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))


if __name__ == "__main__":
    main(sys.argv[1:])
