"""Benchmark: fine-tuning quality and eval loss against time on the synthetic Markov task.

    python bench/quality_sweep.py   # 5-7 minutes on a shared 2-core machine; prints two tables,
                                    # writes bench/results/quality_sweep.csv and quality_curves.csv

The task (runtime.markov_task): a tiny Llama pretrained on language A, fine-tuned on language
B, half of whose tokens A never used. One torch thread throughout, so a run's CPU seconds are
what one dedicated core would take even when the machine is shared.

1. Learning-rate sweep: every method below, at every rate of LRS, STEPS steps of the same
   batches from the same pretrained weights, constant learning rate; eval loss on B's held-out
   sequences at the end. Best = lowest final eval loss.
     full FT                       AdamW over every parameter
     ChunkFT C=3, C=4, C=16        ChunkAdamW, byte-balanced chunks, update interval 1
     LoRA (= C budget) + emb       LoRA on every attention/MLP linear with embed_tokens and
                                   lm_head trained in full, at the largest rank whose trainable
                                   state (fp32 + 2 moments) fits ChunkFT C's (C = 3 and 4)
     LoRA (= C=4 budget), no emb   adapters only: cannot learn the new tokens' rows
2. Loss against time: full FT for STEPS steps and ChunkFT C=4 and C=16 for CURVE_STEPS
   steps, each at its sweep's best rate, eval loss every EVAL_EVERY steps with the training
   seconds so far (evaluation excluded); when ChunkFT first reaches full FT's final eval loss.
   With a constant rate a run's first STEPS steps are the sweep's run.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.lora import LoraConfig, rank_for_budget  # noqa: E402
from runtime.markov_task import entropy_rate, markov_task  # noqa: E402
from runtime.train import evaluate_loss  # noqa: E402
from runtime.sweep import STATE_COPIES, ChunkFT, FullFT, Lora, lr_sweep, run_method, time_to_loss  # noqa: E402

LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
STEPS = 300
CURVE_STEPS = 2400
EVAL_EVERY = 25
EMBEDDINGS = ("embed_tokens", "lm_head")
RESULTS = Path(__file__).resolve().parent / "results"


def lora_at_budget(model, chunks: int, full: tuple[str, ...]) -> Lora:
    """LoRA whose trainable state fits ChunkFT C=chunks' (alpha = 2 x rank)."""
    budget = ChunkFT(chunks).state_bytes(model) // STATE_COPIES
    rank = rank_for_budget(model, budget, LoraConfig(full=full))
    return Lora(LoraConfig(rank=rank, alpha=2.0 * rank, full=full))


def main() -> None:
    torch.set_num_threads(1)
    task = markov_task()
    probe = task.fresh()
    methods = [FullFT(), ChunkFT(3), ChunkFT(4), ChunkFT(16), lora_at_budget(probe, 3, EMBEDDINGS),
               lora_at_budget(probe, 4, EMBEDDINGS), lora_at_budget(probe, 4, ())]
    budgets = ["", "", "", "", " (= C=3 state)", " (= C=4 state)", " (= C=4 state)"]

    RESULTS.mkdir(exist_ok=True)
    sweeps = {}
    with open(RESULTS / "quality_sweep.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "state_bytes", "lr", "eval_loss", "best"])
        print(f"eval loss on B after {STEPS} steps (entropy rate {entropy_rate():.3f}; "
              f"before fine-tuning {evaluate_loss(task.fresh(), task.eval_batches):.3f})")
        print(f"{'method':50s} {'state KiB':>9s} " + " ".join(f"{lr:>8.1e}" for lr in LRS) + "   best lr   loss")
        for method, note in zip(methods, budgets):
            sweep = lr_sweep(method, task.fresh, task.make_loader, task.eval_batches, list(LRS), steps=STEPS)
            sweeps[method.label] = sweep
            state = method.state_bytes(task.fresh())
            best = sweep.best
            edge = " (edge)" if best.lr in (LRS[0], LRS[-1]) else ""
            print(f"{method.label + note:50s} {state / 1024:9.0f} " + " ".join(f"{r.final_loss:8.3f}" for r in sweep.runs)
                  + f"   {best.lr:.1e}{edge} {best.final_loss:.3f}", flush=True)
            for r in sweep.runs:
                out.writerow([method.label + note, state, r.lr, f"{r.final_loss:.5f}", int(r is best)])

    full_lr = sweeps[FullFT().label].best.lr
    curves = [run_method(FullFT(), task.fresh(), full_lr, task.make_loader(), task.eval_batches, steps=STEPS,
                         eval_every=EVAL_EVERY)]
    for chunks in (4, 16):
        lr = sweeps[ChunkFT(chunks).label].best.lr
        curves.append(run_method(ChunkFT(chunks), task.fresh(), lr, task.make_loader(), task.eval_batches,
                                 steps=CURVE_STEPS, eval_every=EVAL_EVERY))
    with open(RESULTS / "quality_curves.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "lr", "step", "seconds", "cpu_seconds", "eval_loss"])
        for run in curves:
            for p in run.points:
                out.writerow([run.method, run.lr, p.step, f"{p.seconds:.3f}", f"{p.cpu_seconds:.3f}",
                              f"{p.eval_loss:.5f}"])

    full = curves[0]
    target = full.final_loss
    end = full.points[-1]
    print(f"\nloss against time (1 thread): full FT's final eval loss {target:.3f} after {end.step} steps, "
          f"{end.seconds:.1f} s wall, {end.cpu_seconds:.1f} s CPU")
    print(f"{'method':14s} {'lr':>7s} {f'loss@{STEPS}':>9s} {f'loss@{CURVE_STEPS}':>10s} {'CPU s/step':>10s} "
          f"{'reaches full FT loss at':>24s} {'wall s':>7s} {'CPU s':>7s} {'x full FT CPU':>13s}")
    for run in curves:
        at_steps = next(p for p in run.points if p.step == STEPS)
        last = run.points[-1]
        hit = time_to_loss(run.points, target)
        reach = (f"step {hit.step:5d}", f"{hit.seconds:7.1f}", f"{hit.cpu_seconds:7.1f}",
                 f"{hit.cpu_seconds / end.cpu_seconds:13.2f}") if hit else ("not reached", "-", "-", "-")
        longer = f"{last.eval_loss:10.3f}" if last.step == CURVE_STEPS else f"{'-':>10s}"
        print(f"{run.method:14s} {run.lr:7.1e} {at_steps.eval_loss:9.3f} {longer} "
              f"{last.cpu_seconds / last.step:10.4f} {reach[0]:>24s} {reach[1]:>7s} {reach[2]:>7s} {reach[3]:>13s}")


if __name__ == "__main__":
    main()
