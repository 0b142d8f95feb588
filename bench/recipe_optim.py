"""Benchmark: --optim / --precision, predicted (planner.optim_step) against measured on CPU.

    python3 bench/recipe_optim.py     # prints tables, writes bench/results/recipe_optim.csv and
                                      # bench/results/recipe_optim_8b.csv

1. Accuracy: the real optimizer steps a tiny random HF model's bf16 parameters (random
   gradients); planner.optim_step.measured_step measures, with glibc's mallinfo2 after every
   aten op, the state the first step leaves and the step's peak (after a warm-up step). The
   prediction is step_cost on the same shapes, traced on fake cpu tensors. torchao's update runs
   eagerly under the sampler (a dispatch mode and torch.compile do not mix): its state is
   compared there, and its compiled step's peak separately (2.).
2. torchao AdamW8bit compiled (inductor, CPU): the real compiled step, its peak above the state
   sampled by a thread polling mallinfo2 (no op boundaries inside a compiled kernel), against
   the predicted temporaries (TORCHAO_COMPILED_TEMPS).
3. Llama 3-8B, batch 1 x 1024 tokens, bf16, H100 profile: full fine-tuning with checkpointing
   per --optim / --precision: predicted GPU peak, reserved, host.
"""

from __future__ import annotations

import csv
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config  # noqa: E402

from planner.measure import polled_malloc_peak  # noqa: E402
from planner.model import ModelSpec  # noqa: E402
from planner.optim_step import CHUNK_8BIT, measured_step, step_cost  # noqa: E402

CASES = [("adamw_torch_forloop", "mixed"), ("adamw_torch", "mixed"), ("adamw_torch_fused", "mixed"),
         ("adamw_torch_forloop", "pure"), ("adamw_torch", "pure"), ("adamw_torch_fused", "pure"),
         ("adamw_bf16", "mixed"), ("adamw_bf16", "pure"), ("adafactor", "pure"), ("adafactor", "mixed"),
         ("sgd", "pure"), ("sgd", "mixed"), ("adamw_torch_8bit", "pure"), ("adamw_torch_8bit", "mixed"),
         (CHUNK_8BIT, "mixed"), (CHUNK_8BIT, "pure")]
ARCHS = ("llama", "qwen2-tied", "gemma2", "phi3")
SHAPES = ((256, 688), (384, 1024))


def tiny_params(arch: str, hidden: int, inter: int) -> list[torch.Tensor]:
    common = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8192)
    config = {"llama": lambda: LlamaConfig(**common),
              "qwen2-tied": lambda: Qwen2Config(**common, tie_word_embeddings=True),
              "gemma2": lambda: Gemma2Config(**common, head_dim=64),
              "phi3": lambda: Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2)}[arch]()
    torch.manual_seed(0)
    model = ModelSpec(name=arch, source="config", config=config, num_layers=2).build(device="cpu", dtype=torch.bfloat16)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def accuracy() -> list[dict]:
    rows = []
    for optim, precision in CASES:
        for arch in ARCHS:
            for hidden, inter in SHAPES:
                params = tiny_params(arch, hidden, inter)
                held = optim == CHUNK_8BIT  # ChunkAdamW's 8-bit span step (ChunkFT), runtime.lean_state
                cost = step_cost("adamw_torch_8bit" if held else optim, precision, "bf16",
                                 tuple(tuple(p.shape) for p in params), device="cpu", chunk_spans=held)
                state = cost.gpu_state_bytes + cost.host_state_bytes
                m_state, m_peak = measured_step(optim, precision, params)
                compiled = optim == "adamw_torch_8bit"
                rows.append({"optim": optim, "precision": precision, "arch": arch, "hidden": hidden,
                             "params": sum(p.numel() for p in params), "predicted_state": state,
                             "measured_state": m_state, "state_error": (state - m_state) / m_state,
                             "predicted_peak": state + cost.temp_bytes, "measured_peak": "" if compiled else m_peak,
                             "peak_error": "" if compiled else (state + cost.temp_bytes - m_peak) / m_peak})
        errs = [abs(r["peak_error"] or r["state_error"]) for r in rows
                if r["optim"] == optim and r["precision"] == precision]
        print(f"{optim:20s} {precision:5s} {'state' if optim == 'adamw_torch_8bit' else 'peak':5s} error: "
              f"median {statistics.median(errs):.2%}, max {max(errs):.2%}")
    return rows


def torchao_compiled(precision: str) -> dict:
    shapes = [(4096, 1024), (1024,), (1000,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    from planner.optim_step import OptimizerStep

    step = OptimizerStep("adamw_torch_8bit", precision, params)
    step.prepare()
    step.opt.step()  # compiles (inductor): tens of seconds on a laptop CPU
    step.finish()

    def one_step():
        step.prepare()
        step.opt.step()
        step.finish()

    measured = polled_malloc_peak(one_step, repeats=20)
    cost = step_cost("adamw_torch_8bit", precision, "bf16", tuple(shapes), device="cpu")
    print(f"torchao AdamW8bit compiled, {precision}: step peak above state measured {measured}, "
          f"predicted {cost.temp_bytes} ({(cost.temp_bytes - measured) / measured:+.2%})")
    return {"optim": "adamw_torch_8bit (compiled)", "precision": precision, "arch": "tensors " + str(shapes),
            "hidden": "", "params": sum(p.numel() for p in params), "predicted_state": "", "measured_state": "",
            "state_error": "", "predicted_peak": cost.temp_bytes, "measured_peak": measured,
            "peak_error": (cost.temp_bytes - measured) / measured}


def llama3_8b() -> list[dict]:
    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.recipe import Recipe
    from planner.schema import Tier
    from planner.strategy import Strategy
    from planner.trace import StepShape

    model, shape, hw = resolve_model("llama3-8b"), StepShape(batch=1, seq_len=1024, dtype="bf16"), hardware("h100")
    rows = []
    cases = [("chunkft", "mixed")] + [c for c in CASES if c[0] != CHUNK_8BIT] + [
        ("adamw_bnb_8bit", "pure"), ("paged_adamw_8bit", "pure"), ("paged_adamw_32bit", "pure")]
    for optim, precision in cases:
        t = time.perf_counter()
        e = evaluate(model, shape, Strategy(checkpointing=True, recipe=Recipe(optim=optim, precision=precision)), hw)
        rows.append({"optim": optim, "precision": precision, "gpu_peak_gib": e.peak_bytes[Tier.GPU] / 2**30,
                     "reserved_gib": e.reserved_bytes / 2**30, "host_gib": e.peak_bytes[Tier.HOST] / 2**30,
                     "seconds": time.perf_counter() - t})
        r = rows[-1]
        print(f"8B full FT ckpt {optim:20s} {precision:5s} GPU peak {r['gpu_peak_gib']:7.2f} GiB, reserved "
              f"{r['reserved_gib']:7.2f} GiB, host {r['host_gib']:6.2f} GiB ({r['seconds']:.2f} s)")
    return rows


def main() -> None:
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    out = ROOT / "bench" / "results"
    rows = accuracy() + [torchao_compiled("pure"), torchao_compiled("mixed")]
    with open(out / "recipe_optim.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    big = llama3_8b()
    with open(out / "recipe_optim_8b.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(big[0]))
        w.writeheader()
        w.writerows(big)


if __name__ == "__main__":
    main()
