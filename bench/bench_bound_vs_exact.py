"""Benchmark: how far bound chunk traces land from exact ones, strategy by strategy.

    python3 bench/bench_bound_vs_exact.py [MODEL] [--chunks 2,8,32,128] [--every 6] [--seq 1024]
    # prints a table, writes bench/results/bound_vs_exact.csv

`--chunk-traces bound` evaluates every chunk of a ChunkFT strategy against one shared full-FT
trace; `exact` traces each chunk pattern (planner.evaluate.evaluate). `auto` takes exact up to
EXACT_CHUNK_TRACE_MAX_PARAMS parameters. For every `--every`-th memory group of each chunk count
(planner.solve's default space of MODEL, default llama3.2-1b), this evaluates the group's
representative (planner.solve.memory_representatives: its lowest peaks) both ways and prints the GPU need (least memory) of each and their difference. Both
are predictions: this measures the shortcut against the full trace, not against a run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="llama3.2-1b")
    p.add_argument("--chunks", default="2,8,32,128", help="chunk counts to sample (default 2,8,32,128)")
    p.add_argument("--every", type=int, default=6, help="every N-th memory group of a chunk count (default 6)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--csv", default=str(ROOT / "bench" / "results" / "bound_vs_exact.csv"))
    args = p.parse_args()

    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.parallel_eval import make_ahead, resolve_jobs
    from planner.schema import Tier
    from planner.solve import default_space, memory_representatives
    from planner.trace import StepShape

    model, shape, hw = resolve_model(args.model), StepShape(batch=1, seq_len=args.seq), hardware("rtx4090")
    space = default_space(num_layers=model.num_layers, tokens=args.seq)
    rows = []
    mib = 2**20
    for c in (int(x) for x in args.chunks.split(",")):
        sample = memory_representatives(s for s in space.strategies() if s.chunks == c)[::args.every]
        make_ahead(model, shape, sample, hw, chunk_traces="exact", jobs=resolve_jobs("auto"))
        for s in sample:
            exact = evaluate(model, shape, s, hw, chunk_traces="exact").need_bytes(Tier.GPU)
            bound = evaluate(model, shape, s, hw, chunk_traces="bound").need_bytes(Tier.GPU)
            rows.append({"strategy": s.label(), "exact_mib": round(exact / mib, 1), "bound_mib": round(bound / mib, 1),
                         "bound_minus_exact_mib": round((bound - exact) / mib, 1),
                         "relative": round((bound - exact) / exact, 4)})
            print(f"{s.label()[:70]:70s} exact {exact / mib:9.1f} MiB  bound {bound / mib:9.1f} MiB  "
                  f"{(bound - exact) / mib:+8.1f} MiB", flush=True)
    diffs = [r["bound_minus_exact_mib"] for r in rows]
    print(f"{args.model}: {len(rows)} strategies, bound - exact from {min(diffs):+.1f} to {max(diffs):+.1f} MiB, "
          f"largest relative {max(abs(r['relative']) for r in rows):.1%}")
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
