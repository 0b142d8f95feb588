"""Wall time of `chunkft plan` for Llama 3-8B, Llama 3.1-70B and 405B on this machine.

Each model is planned in a fresh `python -m planner.cli plan` process (what a user waits for:
interpreter, torch and transformers imports, tracing, the search, writing the plan), then in a
fresh interpreter that first imports torch, transformers' Llama code and the planner, timing
`planner.cli.main(["plan", ...])` alone, to separate start-up from planning. Prints a table
and writes bench/results/plan_times.csv.

    python3 bench/bench_plan.py [--repeat 1]

Targets (issue 3): 8B <= 1 s, 70B <= 3 s, 405B <= 5 s.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    # (model, plan flags, target seconds)
    ("llama3-8b", ["--gpu", "24GiB"], 1.0),
    ("llama3.1-70b", ["--gpu-kind", "h100"], 3.0),
    ("llama3.1-405b", ["--gpu-kind", "h100"], 5.0),
]


def time_subprocess(model: str, flags: list[str], out: str) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "plan", model, *flags, "-o", out],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    plan_line = next((line for line in proc.stdout.splitlines() if line.startswith(("plan ", "INFEASIBLE"))), "")
    return wall, proc.returncode, plan_line.removeprefix("plan").strip()


# Warm a fresh interpreter (imports of torch, transformers' Llama code and the planner), then
# time `chunkft plan` alone: model intake, tracing, the search and writing the plan.
_IN_PROCESS = """
import io, contextlib, sys, time
import torch, transformers.models.llama.modeling_llama
import planner.evaluate, planner.trace, planner.replicate, planner.plan, planner.plan_cli
from planner.cli import main
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(time.perf_counter() - t0, code)
"""


def time_in_process(model: str, flags: list[str], out: str) -> float:
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, "plan", model, *flags, "-o", out],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"in-process timing of {model} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per model; the best is reported")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, flags, target in CASES:
            out = os.path.join(tmp, f"{model}.json")
            runs = [time_subprocess(model, flags, out) for _ in range(args.repeat)]
            wall, code, plan = min(runs)
            inproc = min(time_in_process(model, flags, out) for _ in range(args.repeat))
            rows.append({"model": model, "flags": " ".join(flags), "wall_s": round(wall, 2),
                         "in_process_s": round(inproc, 2), "target_s": target, "exit": code, "plan": plan})
    print(f"{'model':<15} {'flags':<17} {'wall s':>7} {'in-proc s':>9} {'target':>6}  exit  plan")
    for r in rows:
        print(f"{r['model']:<15} {r['flags']:<17} {r['wall_s']:>7.2f} {r['in_process_s']:>9.2f} "
              f"{r['target_s']:>6.1f}  {r['exit']:>4}  {r['plan']}")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "plan_times.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {results / 'plan_times.csv'} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
