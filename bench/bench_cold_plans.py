"""Benchmark: cold plans that trace every chunk pattern, with one process and with --jobs N.

    python3 bench/bench_cold_plans.py [--jobs 2] [--quick] [--evaluation]
    # prints a table, writes bench/results/cold_plans.csv

Each case is one `python -m planner.cli ... --no-cache --no-progress` process (no disk cache:
every step is traced), first with `--jobs 1`, then with `--jobs N`; the two must print the same
answer and write the same plan file (checked, the table says so). Cases:
  - plan llama3.2-1b --gpu 8GiB (one GPU; exact chunk traces, auto's choice up to 2B parameters);
  - plan llama3.2-1b --gpus-per-node 2 --gpu 8GiB (the sharded solver, exact chunk traces);
  - plan llama3-70b on 2 x H800 with exact chunk traces (C = 256, 512; the seed's setting);
  - size examples/tiny --seq 256 (every strategy family, exact chunk traces).
`--quick` runs the last only. `--evaluation` also times the 1B one-GPU plan's evaluations with
every traced step already held (planner.solve.solve_model twice in one process, the second
timed): what remains of a cold plan once its steps are made.

Wall times come from this machine (shared; one run each): compare the two columns of a row,
not rows of different runs. A script that prints a table, not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("plan llama3.2-1b, 1 GPU", ["plan", "llama3.2-1b", "--gpu", "8GiB"]),
    ("plan llama3.2-1b, 2 GPUs", ["plan", "llama3.2-1b", "--gpus-per-node", "2", "--gpu", "8GiB"]),
    ("plan llama3-70b, 2 x h800, exact", ["plan", "llama3-70b", "--gpus-per-node", "2", "--gpu-kind", "h800",
                                          "--shard-embeddings", "--chunk-traces", "exact", "--chunks", "256,512",
                                          "--state", "host", "--checkpointing", "on"]),
    ("size examples/tiny", ["size", str(ROOT / "examples" / "tiny"), "--seq", "256"]),
]


def run(argv: list[str], jobs: int, out: Path) -> tuple[float, str, bytes]:
    """(wall seconds, stdout without the `wrote` line, plan file bytes or b"") of one process."""
    out.unlink(missing_ok=True)
    extra = ["-o", str(out)] if argv[0] == "plan" else []
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *argv, *extra, "--no-cache", "--no-progress",
                           "--jobs", str(jobs)], capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    text = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("wrote "))
    return wall, text, out.read_bytes() if out.exists() else b""


EVALUATION = r"""
import time
from planner.hardware import hardware
from planner.model import resolve_model
from planner.solve import solve_model
from planner.strategy import Budget
from planner.trace import StepShape
args = (resolve_model("llama3.2-1b"), StepShape(batch=1, seq_len=1024), hardware("rtx4090"), Budget(gpu_bytes=8 * 2**30))
solve_model(*args, jobs=2)
start = time.perf_counter()
solution = solve_model(*args, jobs=2)
print(time.perf_counter() - start, len(solution.estimates))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="the second column's --jobs (default 2)")
    p.add_argument("--quick", action="store_true", help="only `size examples/tiny`")
    p.add_argument("--evaluation", action="store_true", help="also time the 1B plan's evaluations, steps held")
    p.add_argument("--csv", default=str(ROOT / "bench" / "results" / "cold_plans.csv"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        for name, argv in CASES[-1:] if args.quick else CASES:
            one, text_one, plan_one = run(argv, 1, out)
            many, text_many, plan_many = run(argv, args.jobs, out)
            same = text_one == text_many and plan_one == plan_many
            rows.append({"case": name, "jobs_1_s": round(one, 1), f"jobs_{args.jobs}_s": round(many, 1),
                         "speedup": round(one / many, 2), "same_answer": same})
            print(f"{name:36s} {one:8.1f} s  {many:8.1f} s with --jobs {args.jobs}  x{one / many:.2f}  "
                  f"{'same answer' if same else 'ANSWERS DIFFER'}", flush=True)
    if args.evaluation:
        proc = subprocess.run([sys.executable, "-c", EVALUATION], capture_output=True, text=True, check=True)
        seconds, count = proc.stdout.split()
        print(f"evaluations of plan llama3.2-1b, steps held: {int(count)} strategies in {float(seconds):.1f} s")
        rows.append({"case": "plan llama3.2-1b, 1 GPU: evaluations, steps held", "jobs_1_s": round(float(seconds), 1),
                     "same_answer": ""})
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp_path = path.with_suffix(".csv.tmp")
    with tmp_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp_path.replace(path)
    print(f"wrote {path}")
    return 0 if all(row["same_answer"] in (True, "") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
