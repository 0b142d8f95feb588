"""Benchmark: Llama 3-8B at 1K tokens, one recipe axis at a time, the planner's predicted step
peak against torch's MemTracker under FakeTensorMode running the real loop.

    python3 bench/memtracker_recipes.py     # prints the table, writes bench/results/memtracker_recipes.csv

The comparison itself (which real loop runs, the peak definition, offloaded activations booked
apart so MemTracker's peak is device memory) is tests/test_memtracker_recipes.py's; see its
module docstring. Every recipe at full depth (32 layers), about 30 s each on one CPU thread.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FIELDS = ("recipe", "flags", "layers", "memtracker_bytes", "predicted_bytes", "error", "memtracker_fwd_bytes",
          "predicted_fwd_bytes", "fwd_error", "memtracker_host_bytes",
          "predicted_host_bytes", "predict_s", "memtracker_s")


def main() -> None:
    import torch

    torch.set_num_threads(1)  # fake tensors: no kernels to parallelise
    import dataclasses

    from test_memtracker_recipes import CASES, compare, format_table

    rows = []
    for case in CASES:  # every recipe at full depth (the test runs some on 8 layers)
        rows.append(compare(dataclasses.replace(case, layers=None)))
        print("\n".join(format_table(rows[-1:]).splitlines()[1:]), flush=True)
    print()
    print(format_table(rows))
    out = ROOT / "bench" / "results" / "memtracker_recipes.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "error": f"{r['error']:.6f}", "fwd_error": f"{r['fwd_error']:.6f}"})
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
