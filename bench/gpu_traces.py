"""Issue 4's GPU check: random-init Llamas under a 24 GiB cap, predicted against measured.

For each case this script plans (`chunkft plan`), predicts the step's timeline (`chunkft
simulate`), trains a few steps on generated text with a measured trace under the case's
allocator cap (`chunkft run --gpu-memory-cap`, i.e. torch.cuda.set_per_process_memory_fraction)
and compares the two (`chunkft compare`). Everything goes through the CLI, as a user would run
it. Output: traces/gpu/<case>/ (plan, timeline, trace, report) and traces/gpu/summary.csv: per
case the predicted and measured GPU peak (allocated) and reserved bytes, tokens/s, and the
tokens/s ratio against the plain bf16 full fine-tuning case of the same model, measured in the
same invocation.

    python bench/gpu_traces.py                 # on a CUDA machine (H100: about 8 minutes)
    python bench/gpu_traces.py --smoke         # the same pipeline on a tiny model on the CPU

Cases:
  llama3.2-1b  fullft       plain bf16 full FT, AdamW on the GPU, no chunks (the baseline)
  llama3.2-1b  plan-24g     the solver's plan for 24 GiB (objective speed)
  llama3.2-1b  stream-6g    decoder layers streamed from pinned host memory (runtime.stream),
                            ChunkFT C=16, state on host, checkpointing, under a 6 GiB cap
  llama3.2-1b  recipe-*     the runtime's recipe axes on the 1B, each its own plan under a 12 GiB cap:
                            8-bit moments (torchao format), bf16 moments with pure precision,
                            selective and every-2 checkpointing, activations offloaded to host,
                            expandable segments; and the optimizer step in backward (clipping
                            off): full FT under a 24 GiB cap, ChunkFT C=4 under 12 GiB
  llama3-8b    plan-24g     the solver's plan for 24 GiB (objective speed)
  llama2-7b    floor-13g    exact AdamW aiming at issue 4's 13.0 GiB floor: weights resident,
                            checkpointing, the fewest chunks that fit 13.6 GiB (predicted: C=128,
                            AdamW on host, 13.26 GiB peak, 13.58 GiB reserved, 75.65 GiB host)
The 8B's optimizer state rests in pinned host memory: ~108 GiB predicted (pinned blocks round
to powers of two) of the H100 machine's 128 GiB, the tightest part of the run.
Plain bf16 full FT of the 8B needs about 16 bytes per parameter (~128 GB): it is not run; its
row is the planner's prediction only.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
SEQ = "1024"
STEPS = 6
TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 1024, "tie_word_embeddings": False,
}
# (case, model, plan flags, allocator cap); the first case of a model is its tokens/s baseline
CASES = (
    ("llama3.2-1b-fullft", "llama3.2-1b", ["--gpu", "80GB", "--chunks", "1", "--optimizer", "gpu",
                                           "--checkpointing", "off"], None),
    ("llama3.2-1b-plan-24g", "llama3.2-1b", ["--gpu", "24GiB", "--weights", "gpu", "--objective", "speed"], "24GiB"),
    ("llama3.2-1b-stream-6g", "llama3.2-1b", ["--gpu", "6GiB", "--weights", "stream", "--chunks", "16",
                                              "--state", "host", "--optimizer", "gpu", "--checkpointing", "on"], "6GiB"),
    *((f"llama3.2-1b-recipe-{name}", "llama3.2-1b", ["--gpu", "12GiB", "--chunks", "4", "--state", "host",
                                                     "--optimizer", "gpu", *flags], "12GiB")
      for name, flags in (("8bit", ["--optim", "adamw_torch_8bit", "--checkpointing", "on"]),
                          ("pure-bf16", ["--optim", "adamw_bf16", "--precision", "pure", "--checkpointing", "on"]),
                          ("selective", ["--checkpointing", "selective"]),
                          ("every-2", ["--checkpointing", "every-2"]),
                          ("offload", ["--offload-activations", "--checkpointing", "off"]),
                          ("expandable", ["--alloc-conf", "expandable_segments:True", "--checkpointing", "on"]))),
    # the optimizer step in backward: full FT, and ChunkFT's spans (ChunkAdamW's on_complete)
    ("llama3.2-1b-recipe-in-backward", "llama3.2-1b", ["--gpu", "24GiB", "--chunks", "1", "--optimizer", "gpu",
                                                       "--optimizer-in-backward", "--checkpointing", "on"], "24GiB"),
    ("llama3.2-1b-recipe-c4-in-backward", "llama3.2-1b", ["--gpu", "12GiB", "--chunks", "4", "--state", "host",
                                                          "--optimizer", "gpu", "--optimizer-in-backward",
                                                          "--checkpointing", "on"], "12GiB"),
    ("llama3-8b-plan-24g", "llama3-8b", ["--gpu", "24GiB", "--host-ram", "110GiB", "--weights", "gpu",
                                         "--objective", "speed"], "24GiB"),
    ("llama2-7b-floor-13g", "llama2-7b", ["--gpu", "13.6GiB", "--host-ram", "100GiB", "--weights", "gpu",
                                          "--checkpointing", "on"], "13.6GiB"),
)
SMOKE_CASES = (
    ("tiny-fullft", "tiny", ["--gpu", "1GiB", "--chunks", "1", "--optimizer", "gpu"], None),
    ("tiny-chunkft", "tiny", ["--gpu", "1GiB", "--chunks", "4", "--state", "host", "--optimizer", "gpu"], None),
    ("tiny-stream", "tiny", ["--gpu", "1GiB", "--chunks", "4", "--state", "host", "--optimizer", "gpu",
                             "--weights", "stream"], None),
    ("tiny-recipe", "tiny", ["--gpu", "1GiB", "--chunks", "4", "--state", "host", "--optimizer", "gpu",
                             "--optim", "adamw_torch_8bit", "--checkpointing", "selective"], None),
    ("tiny-in-backward", "tiny", ["--gpu", "1GiB", "--chunks", "1", "--optimizer", "gpu", "--optimizer-in-backward",
                                  "--offload-activations"], None),
    ("tiny-c4-in-backward", "tiny", ["--gpu", "1GiB", "--chunks", "4", "--state", "host", "--optimizer", "gpu",
                                     "--optimizer-in-backward"], None),
)


def chunkft(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"chunkft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def write_data(path: Path) -> None:
    rng = random.Random(0)
    words = "the plan chunk memory tier moves holds while between cat mat sat on and of".split()
    with open(path, "w") as f:
        for _ in range(256):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")


def peaks(report: Path) -> dict[str, int]:
    """Predicted and measured GPU allocated / reserved peaks from `chunkft compare`'s peaks.csv."""
    out = {}
    with open(report / "peaks.csv") as f:
        for row in csv.DictReader(f):
            if row["tier"] in ("gpu", "process") and row["metric"] in ("allocated", "reserved", "rise in step"):
                key = row["metric"].replace(" ", "_")
                for side in ("predicted", "measured"):
                    if row[f"{side}_bytes"]:
                        out[f"{side}_{key}_bytes"] = int(float(row[f"{side}_bytes"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the pipeline, not the GPU)")
    ap.add_argument("--out", default=str(ROOT / "traces" / ("gpu-smoke" if "--smoke" in sys.argv else "gpu")))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    write_data(data)
    cases = SMOKE_CASES if args.smoke else CASES
    device = ["--device", "cpu"] if args.smoke else ["--device", "cuda"]
    seq = ["--seq", "128" if args.smoke else SEQ]
    if args.smoke:
        (out / "tiny").mkdir(exist_ok=True)
        (out / "tiny" / "config.json").write_text(json.dumps(TINY))
    rows, baseline = [], {}
    for case, model, flags, cap in cases:
        d = out / case
        d.mkdir(exist_ok=True)
        spec = str(out / "tiny") if model == "tiny" else model
        plan_text = chunkft("plan", spec, *seq, "--gpu-kind", "h100", *flags, "-o", str(d / "plan.json"))
        # a ChunkFT run of STEPS steps trains chunk 0 first: its timeline is that chunk's step,
        # which `chunkft compare` holds against chunk 0's measured steps
        chunked = json.loads((d / "plan.json").read_text())["strategy"]["chunks"] > 1
        chunkft("simulate", str(d / "plan.json"), "-o", str(d / "timeline.jsonl"), *(["--chunk", "0"] if chunked else []))
        capped = ["--gpu-memory-cap", cap] if cap and not args.smoke else []
        if "--optimizer-in-backward" in flags:  # it cannot clip to a global norm
            capped += ["--max-grad-norm", "0"]
        with tempfile.TemporaryDirectory(prefix="chunkft-gpu-") as run_dir:
            text = chunkft("run", str(d / "plan.json"), "--data", str(data), "--steps", str(STEPS), *device, *capped,
                           "--no-progress", "--lr", "1e-5", "--out", run_dir, "--trace", str(d / "trace.jsonl"))
        chunkft("compare", str(d / "timeline.jsonl"), str(d / "trace.jsonl"), "-o", str(d / "report"))
        tps = float(re.search(r"([\d.]+) tokens/s", text).group(1))
        baseline.setdefault(model, tps)
        plan = json.loads((d / "plan.json").read_text())
        host = plan["predicted"]["peak_bytes"].get("host", 0)
        row = {"case": case, "strategy": re.search(r"^plan +(.*)$", plan_text, re.M).group(1), "cap": cap or "",
               "chunks": plan["strategy"]["chunks"], "predicted_host_bytes": host, **peaks(d / "report"),
               "tokens_per_s": tps, "tokens_per_s_vs_fullft": tps / baseline[model]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c] / GIB:.3f} GiB" if c.endswith("_bytes") and isinstance(r.get(c), int)
                         else f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
