"""Benchmark: wall time of whole `chunkft` processes, cold and warm disk cache (planner.cache).

    python3 bench/bench_cli_speed.py [--warm-runs 5] [--cold-runs 2] [--skip-fit] [--skip-size]
    # prints a table, writes bench/results/cli_speed.csv

Each command runs as its own process (`python -m planner.cli ...`, what the `chunkft` script
runs: imports, and the planning commands' end by os._exit, included), in a
snapshot of planner/, runtime/ and analysis/ copied to a temporary directory: the cache key holds
a digest of the planner's sources, so in a checkout others are editing, an edit between two runs
would make a "warm" run cold. Cases:
  - fit llama3-8b and fit llama3.1-405b (the defaults: 1024 tokens, 24 GiB, chunks 4,16,64):
    cold = an empty cache directory (every run gets a fresh one), warm = the same directory after
    a cold run; warm runs are also checked (one more run under `python -X importtime`) to have
    imported neither torch nor transformers, and to print the cold run's answer byte for byte;
  - size llama3-70b and plan llama3-70b --gpus-per-node 2 --gpu-kind h800 (the sharded
    searches; their one-GPU and per-rank estimates are cached as "estimates" / "sharded"
    buckets): cold, warm (checked to print the cold answer byte for byte, and for plan to write
    the same plan file) and --no-cache (the answer before the cache, checked the same).
Python bytecode: "cached" runs keep .pyc files in a temporary PYTHONPYCACHEPREFIX (what an
installed package has); "none" runs with PYTHONDONTWRITEBYTECODE=1 (every module compiled from
source each time, as in a checkout where bytecode writing is off). The minimum of the runs is
reported (the machine may be shared: the spread is printed too), with the CPU time (user + sys)
of the fastest run.

A first row times the imports alone (torch and transformers' Llama modeling code, then
os._exit): no cold answer can come sooner, since every cold answer traces the real HF model.

Targets (issue "Answers people can act on", items 1 and 5): warm fit 8B <= 0.5 s, 405B <= 1 s;
cold 8B <= 5 s; size 70B <= 5 s and the 70B parallel plan <= 20 s (met warm; cold, they trace
and evaluate everything once). A script that prints a table, not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cli_speed.csv"
SNAPSHOT_DIRS = ("planner", "runtime", "analysis")
# What every cold answer must import before it can trace the real HF model code, and nothing else:
# the floor under a cold `fit`/`size` (the process ends as `chunkft`'s does, with os._exit).
IMPORT_FLOOR = ("import os, torch\nfrom transformers.models.llama import modeling_llama\nos._exit(0)\n")
TARGETS = {("fit llama3-8b", "warm"): 0.5, ("fit llama3.1-405b", "warm"): 1.0, ("fit llama3-8b", "cold"): 5.0,
           ("size llama3-70b", "cold"): 5.0, ("size llama3-70b", "warm"): 5.0,
           ("plan llama3-70b 2 x h800", "cold"): 20.0, ("plan llama3-70b 2 x h800", "warm"): 20.0}
SHARDED = (("size llama3-70b", ["size", "llama3-70b"]),
           ("plan llama3-70b 2 x h800", ["plan", "llama3-70b", "--gpus-per-node", "2", "--gpu-kind", "h800"]))


def _snapshot(into: Path) -> Path:
    for name in SNAPSHOT_DIRS:
        shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def _run(argv: list[str], cwd: Path, env: dict) -> tuple[float, float, int, str]:
    """(wall s, cpu s, exit code, stdout) of one `python -m planner.cli` process (what the
    `chunkft` script runs); what it imports comes from `_heavy_modules`, an untimed run."""
    wall, cpu, proc = _timed([sys.executable, "-m", "planner.cli", *argv], cwd, env)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"`chunkft {' '.join(argv)}` failed:\n{proc.stderr[-3000:]}")
    return wall, cpu, proc.returncode, proc.stdout


def _heavy_modules(argv: list[str], cwd: Path, env: dict) -> list[str]:
    """The torch / transformers modules `chunkft ARGV` imports (from `python -X importtime`)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "planner.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True)
    names = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return sorted(n for n in names if n.split(".")[0] in ("torch", "transformers"))[:3]


def _timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warm-runs", type=int, default=5)
    p.add_argument("--cold-runs", type=int, default=2)
    p.add_argument("--skip-fit", action="store_true", help="leave out the `chunkft fit` cases")
    p.add_argument("--skip-size", action="store_true",
                   help="leave out `chunkft size llama3-70b` and the 70B parallel plan (slow cold)")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="chunkft-bench-") as tmp:
        tmp = Path(tmp)
        snap = _snapshot(tmp / "src")
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        base["PYTHONPATH"] = str(snap)
        envs = {"cached": {**base, "PYTHONPYCACHEPREFIX": str(tmp / "pyc")},
                "none": {**base, "PYTHONDONTWRITEBYTECODE": "1"}}
        # compiles the bytecode of everything a cold fit imports (torch and transformers too) once
        _run(["fit", "--json", "--cache-dir", str(tmp / "cache-warm-up")], snap, envs["cached"])

        def record(what: str, cache: str, bytecode: str, runs: list, heavy: list[str] | None, note: str = "") -> None:
            walls = [r[0] for r in runs]
            best = min(range(len(runs)), key=lambda i: walls[i])
            target = TARGETS.get((what, cache), "") if bytecode == "cached" else ""
            command = what if what.startswith("(") else f"chunkft {what}"
            rows.append({"command": command, "cache": cache, "bytecode": bytecode, "runs": len(runs),
                         "min_s": round(walls[best], 3), "max_s": round(max(walls), 3),
                         "cpu_s_of_min": round(runs[best][1], 3), "target_s": target,
                         "torch_imported": "" if heavy is None else "yes" if heavy else "no", "note": note})
            print(f"  {what:<24} {cache:<5} bytecode {bytecode:<6} min {walls[best]:.3f} s  "
                  f"(max {max(walls):.3f} s, cpu {runs[best][1]:.3f} s)", flush=True)

        floor = [_timed([sys.executable, "-c", IMPORT_FLOOR], snap, envs["cached"])[:2]
                 for _ in range(max(3, args.cold_runs))]
        record("(import torch + HF Llama)", "-", "cached", floor, ["torch"],
               note="the imports any cold answer needs, nothing else: the floor under a cold fit or size")

        for model in () if args.skip_fit else ("llama3-8b", "llama3.1-405b"):
            what = f"fit {model}"
            argv = ["fit", model, "--json"]
            cold = []
            for i in range(args.cold_runs):
                cold.append(_run(argv + ["--cache-dir", str(tmp / f"cache-{model}-{i}")], snap, envs["cached"]))
            fresh = argv + ["--cache-dir", str(tmp / f"cache-{model}-imports")]
            record(what, "cold", "cached", cold, _heavy_modules(fresh, snap, envs["cached"]))
            warm_dir = ["--cache-dir", str(tmp / f"cache-{model}-0")]
            answer = cold[0][3]
            for bytecode, env in envs.items():
                warm = [_run(argv + warm_dir, snap, env) for _ in range(args.warm_runs)]
                same = all(r[3] == answer for r in warm)
                record(what, "warm", bytecode, warm, _heavy_modules(argv + warm_dir, snap, env),
                       note="same answer as cold" if same else "ANSWER DIFFERS")
            nocache = [_run(argv + ["--no-cache"], snap, envs["cached"])]
            record(what, "off", "cached", nocache, None,
                   note="--no-cache; same answer" if nocache[0][3] == answer else "--no-cache; ANSWER DIFFERS")
        for what, argv in () if args.skip_size else SHARDED:
            out = tmp / "plan.json"
            argv = argv + (["-o", str(out)] if argv[0] == "plan" else [])

            def answer(run: tuple) -> tuple[str, bytes]:
                return run[3], out.read_bytes() if argv[0] == "plan" else b""

            cold, answers = [], []
            for i in range(max(1, args.cold_runs)):
                cold.append(_run(argv + ["--cache-dir", str(tmp / f"cache-{argv[0]}-{i}")], snap, envs["cached"]))
                answers.append(answer(cold[-1]))
            record(what, "cold", "cached", cold, None)
            warm, same = [], True
            for _ in range(args.warm_runs):
                warm.append(_run(argv + ["--cache-dir", str(tmp / f"cache-{argv[0]}-0")], snap, envs["cached"]))
                same = same and answer(warm[-1]) == answers[0]
            record(what, "warm", "cached", warm, None, note="same answer as cold" if same else "ANSWER DIFFERS")
            off = [_run(argv + ["--no-cache"], snap, envs["cached"])]
            record(what, "off", "cached", off, None, note="--no-cache; same answer" if answer(off[0]) == answers[0]
                   else "--no-cache; ANSWER DIFFERS")

    cols = ("command", "cache", "bytecode", "runs", "min_s", "max_s", "cpu_s_of_min", "target_s",
            "torch_imported", "note")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print()
    print("  ".join(f"{c:<{widths[c]}}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r[c]):<{widths[c]}}" for c in cols))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS.exists() and (args.skip_fit or args.skip_size):  # keep the rows of the cases left out
        measured = {r["command"] for r in rows}
        with open(RESULTS, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["command"] not in measured
                    and (args.skip_fit or not r["command"].startswith("chunkft fit"))]
        rows = [{c: r.get(c, "") for c in cols} for r in kept] + rows
    with open(RESULTS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {RESULTS.relative_to(ROOT)}  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
