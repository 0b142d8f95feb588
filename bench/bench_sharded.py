"""Benchmark: Llama 3-70B at 1K tokens on 80 GB GPUs with FSDP2 sharding (planner.sharding).

    python3 bench/bench_sharded.py     # prints a table, writes bench/results/sharded.csv

Per-GPU predicted peak (allocated), CUDA reserved, what a card needs (reserved + CUDA
context), host RAM per rank, the step's collective bytes and times, and the step time, for
full FT and ChunkFT plans on 1, 2, 3, 4 and 8 H800 / H100 (80 GB) in one node, batch 1 per GPU,
1024 tokens, bf16. The paper's claim (ChunkFT, arXiv 2605.21177): Llama 3-70B on 2 x 80 GB.
The model is runtime.distributed's (FSDP2 + runtime.sharded_optim): whole spans get FSDP2
gradients, sliced spans sub-tensor gradients all_reduced at the step, state exists for each
rank's slices of the spans (planner.sharding).

The ChunkFT rows trace every chunk pattern as the sharded runtime trains it (`chunk_traces="exact"`,
10-20 s per chunk count the first time). Predictions, not measurements: no 80 GB GPU was used.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.hardware import hardware  # noqa: E402
from planner.model import resolve_model  # noqa: E402
from planner.schema import Tier  # noqa: E402
from planner.sharding import evaluate_sharded  # noqa: E402
from planner.strategy import Strategy  # noqa: E402
from planner.trace import StepShape  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sharded.csv"
GIB = 2**30
MODEL = "llama3-70b"
SHAPE = StepShape(batch=1, seq_len=1024, dtype="bf16")
_CKPT = {"checkpointing": True, "loss_chunk_tokens": 256}
# (strategy, embedding and head as FSDP units of their own, chunk_traces)
PLANS = (
    (Strategy(**_CKPT), False, "bound"),
    (Strategy(chunks=256, state_tier="host", prefetch_depth=0, **_CKPT), True, "exact"),
    (Strategy(chunks=256, state_tier="host", prefetch_depth=0, **_CKPT), False, "exact"),
    (Strategy(chunks=256, state_tier="host", **_CKPT), True, "exact"),
    (Strategy(chunks=512, state_tier="host", prefetch_depth=0, **_CKPT), True, "exact"),
)
GPUS = ("h800", "h100")
WORLD = (1, 2, 3, 4, 8)


def main() -> int:
    spec = resolve_model(MODEL)
    rows = []
    for gpu in GPUS:
        hw = hardware(gpu)
        for strategy, shard_embeddings, mode in PLANS:
            for g in WORLD:
                t0 = time.perf_counter()
                e = evaluate_sharded(spec, SHAPE, strategy, hw, gpus_per_node=g, shard_embeddings=shard_embeddings,
                                     chunk_traces=mode)
                rows.append({
                    "model": MODEL, "gpu": hw.gpu.name, "gpus": g, "strategy": strategy.label(),
                    "shard_embeddings": shard_embeddings, "chunk_traces": mode,
                    "peak_alloc_GiB": round(e.peak_bytes[Tier.GPU] / GIB, 2),
                    "reserved_GiB": round(e.reserved_bytes / GIB, 2),
                    "card_need_GiB": round(e.card_need_bytes() / GIB, 2),
                    "card_GiB": round(hw.gpu.memory_bytes / GIB, 2),
                    "fits": e.card_need_bytes() <= hw.gpu.memory_bytes,
                    "host_per_rank_GiB": round(e.peak_bytes[Tier.HOST] / GIB, 1),
                    "host_per_node_GiB": round(e.node_host_bytes / GIB, 1),
                    "worst_chunk": e.worst_chunk, "worst_rank": e.worst_rank,
                    "all_gather_GB": round(e.all_gather_bytes / 1e9, 1),
                    "reduce_scatter_GB": round(e.reduce_scatter_bytes / 1e9, 2),
                    "all_reduce_GB": round(e.all_reduce_bytes / 1e9, 2),
                    "comm_s": round(e.comm_time_s, 3),
                    "step_s": round(e.step_time_s, 3),
                    "compute_s": round(e.step_time_parts_s.get("compute", 0.0), 3),
                    "eval_s": round(time.perf_counter() - t0, 2),
                })
                r = rows[-1]
                print(f"{r['gpu']:10} G={g} {r['strategy'][:58]:58} emb={'sep' if shard_embeddings else 'root'} "
                      f"peak {r['peak_alloc_GiB']:7.2f} need {r['card_need_GiB']:7.2f} / {r['card_GiB']} GiB "
                      f"{'fits' if r['fits'] else '----'}  comm {r['comm_s']:.3f} s  step {r['step_s']:.3f} s",
                      flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
