"""`chunkft fit`: will this model fine-tune fully on this GPU? One row per strategy.

    chunkft fit [MODEL] [--gpu 24GiB] [--host-ram SIZE] [--disk SIZE] [--seq 1024] [--batch 1]
                [--dtype bf16] [--chunks 4,16,64] [--hardware rtx4090]
                [--chunk-traces auto|exact|bound] [--json] [--cache-dir DIR] [--no-cache]

With no MODEL: Llama 3-8B at 1024 tokens, batch 1, on a 24 GiB GPU. Rows (`fit_strategies`):
full fine-tuning with AdamW on the GPU, the same with activation checkpointing, ChunkFT at each
`--chunks` count with inactive state in pinned host memory (checkpointing on), a
DeepSpeed-ZeRO-Offload-style full FT (AdamW on host, fp32 gradients gathered there), and the
NVMSA path (16-bit gradients leave the GPU as produced), to host and to disk. For each: GPU
peak (allocated), reserved (cached, unconstrained) and the least memory the step needs (the
allocator frees cached blocks and retries before it fails; what the GPU budget is held to), host
and disk peaks, fits or not per tier, predicted step time.
Then the recommended row -- the first that fits in the objective's order (`--objective speed`,
the default: shortest predicted step, then fewest chunks; `fidelity`: fewest chunks first, the
closest to plain full fine-tuning) -- with its component breakdown per tier, and the other
objective's pick when it differs.

Traced steps, parameter layouts and chunk tables are kept on disk (planner.cache; `--cache-dir`,
default $XDG_CACHE_HOME/chunkft or ~/.cache/chunkft): a repeated question is answered without
importing torch or transformers, with the same answer. `--no-cache` neither reads nor writes it.

Exit status: 0 when some row fits, 1 when none does (an answer, not an error), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from planner.errors import ChunkftError
from planner.recipe import Recipe, add_recipe_args, checkpointing_pin
from planner.schema import Tier
from planner.solve import Objective
from planner.units import describe_size, format_bytes, parse_bytes

if TYPE_CHECKING:
    from planner.strategy import Budget, Estimate, Strategy

DEFAULT_MODEL = "llama3-8b"
DEFAULT_GPU = "24GiB"
DEFAULT_CHUNKS = "4,16,64"
DEFAULT_HARDWARE = "rtx4090"
TIERS = (Tier.GPU, Tier.HOST, Tier.DISK)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fit", help="will a model fine-tune fully in this memory? one row per strategy",
        description="Predict GPU, host and disk peaks and step time of full fine-tuning strategies "
                    "(plain, checkpointed, ChunkFT, ZeRO-Offload style, NVMSA offload) and say which fit.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"preset name, HF model directory or config.json, or pkg.module:function (default {DEFAULT_MODEL})")
    p.add_argument("--gpu", default=DEFAULT_GPU, metavar="SIZE",
                   help=f"GPU memory PyTorch may reserve, e.g. 24GiB or 80GB (default {DEFAULT_GPU})")
    p.add_argument("--host-ram", default=None, metavar="SIZE", help="host RAM budget (default: not limited)")
    p.add_argument("--disk", default=None, metavar="SIZE", help="disk budget (default: not limited)")
    p.add_argument("--seq", type=int, default=1024, help="sequence length in tokens (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--dtype", default="bf16", help="training dtype: bf16, fp16 or fp32 (default bf16)")
    p.add_argument("--chunks", default=DEFAULT_CHUNKS, metavar="C1,C2,..",
                   help=f"ChunkFT chunk counts to show (default {DEFAULT_CHUNKS})")
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, metavar="GPU",
                   help=f"GPU profile for step times (default {DEFAULT_HARDWARE}; see planner/hardware/)")
    p.add_argument("--chunk-traces", default="auto", choices=("auto", "exact", "bound"),
                   help="trace every chunk pattern (exact), or bound all chunks by one full-FT trace "
                        "(bound; fast); auto: exact up to 2B parameters")
    p.add_argument("--allow-long-seq", action="store_true",
                   help="plan a --seq beyond the model's max_position_embeddings")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--objective", choices=("speed", "fidelity"), default="speed",
                   help="speed: recommend the shortest predicted step that fits (default); fidelity: the fewest "
                        "chunks that fit (closest to plain full fine-tuning)")
    p.add_argument("--max", choices=("seq", "batch"), default=None,
                   help="instead: the longest sequence (or largest batch) each strategy fits, the other axis at "
                        "its flag's value (planner.fit_max)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where traced steps, layouts and chunk tables are kept between runs (default "
                        "$XDG_CACHE_HOME/chunkft, else ~/.cache/chunkft; see `chunkft cache`)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    from planner.progress import add_argument as add_progress_argument

    add_progress_argument(p)
    from planner.parallel_eval import add_argument as add_jobs_argument

    add_jobs_argument(p)
    add_recipe_args(p)
    p.set_defaults(run=run)


def parse_chunks(text: str) -> tuple[int, ...]:
    """"4,16,64" -> (4, 16, 64): integers >= 2, each once, in the order given."""
    from planner.validate import MAX_CHUNKS, MAX_LIST_VALUES

    out: list[int] = []
    parts = str(text).split(",")
    if len(parts) > MAX_LIST_VALUES:
        raise ChunkftError(f"invalid --chunks {text[:40]!r}...: {len(parts)} values; at most {MAX_LIST_VALUES}")
    for part in parts:
        part = part.strip()
        try:
            c = int(part)
        except ValueError:
            c = 0
        if not 2 <= c <= MAX_CHUNKS:
            raise ChunkftError(f"invalid chunk count {part!r} in --chunks {text!r}: "
                               f"expected integers >= 2 (at most {MAX_CHUNKS:,}) separated by commas, e.g. 4,16,64")
        if c not in out:
            out.append(c)
    return tuple(out)


def fit_strategies(chunk_counts: tuple[int, ...], recipe: Recipe = Recipe(),
                   checkpointing: bool | None = None, search_recipes: str = "none") -> list["Strategy"]:
    """The rows of `chunkft fit`, in display order, each for the user's `recipe`; with
    `checkpointing` (the --checkpointing pin) every row checkpoints that way (duplicates go).
    `search_recipes` (exact / lean) adds, for each of the recipe's variants (Recipe.variants),
    full FT and ChunkFT at the most chunks, state on host."""
    import dataclasses

    from planner.strategy import Strategy

    rows = _rows(chunk_counts, recipe, checkpointing)
    for variant in recipe.variants(search_recipes):
        extra = [Strategy(checkpointing=True), Strategy(chunks=max(chunk_counts), state_tier=Tier.HOST,
                                                        checkpointing=True)]
        if variant.offload_activations:
            extra += [dataclasses.replace(s, checkpointing=False) for s in extra]
        rows += [s for s in _rows((), variant, checkpointing, base=extra) if s not in rows]
    return rows


def _rows(chunk_counts: tuple[int, ...], recipe: Recipe, checkpointing: bool | None,
          base: list | None = None) -> list["Strategy"]:
    import dataclasses

    from planner.strategy import OptimizerDevice, Strategy

    host = dict(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST, checkpointing=True)
    rows = [Strategy(), Strategy(checkpointing=True)]
    rows += [Strategy(chunks=c, state_tier=Tier.HOST, checkpointing=True) for c in chunk_counts]
    rows += [
        Strategy(**host),  # DeepSpeed ZeRO-Offload style: fp32 gradients gathered on host
        Strategy(**host, grad_staging=Tier.HOST),  # NVMSA: 16-bit gradients to host as produced
        Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.DISK, grad_staging=Tier.DISK,
                 checkpointing=True),  # NVMSA to SSD
    ] if base is None else list(base)
    out = []
    for s in rows:
        s = dataclasses.replace(s, recipe=recipe, checkpointing=s.checkpointing if checkpointing is None else checkpointing)
        if recipe.conflict(s) is not None:
            continue  # a row the recipe cannot run (e.g. --lora or --optimizer-in-backward with ChunkFT)
        if s not in out:
            out.append(s)
    return out


def recommend(estimates: list["Estimate"], budget: "Budget", objective: "Objective") -> int | None:
    """Index of the first row that fits in `objective`'s order (planner.solve.objective_key, the
    solver's order and tie-breaks), or None when no row fits."""
    from planner.solve import objective_key

    fitting = [i for i, e in enumerate(estimates) if e.fits(budget)]
    if not fitting:
        return None
    return min(fitting, key=lambda i: objective_key(estimates[i], objective) + (i,))


def run(args: argparse.Namespace) -> int:
    from planner import cache

    from planner import progress

    directory = None if args.no_cache else cache.resolve_dir(args.cache_dir)
    with cache.using(directory), progress.showing(args.progress):  # a warm cache: no torch, no transformers
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.parallel_eval import resolve_jobs
    from planner.trace import StepShape
    from planner.validate import check_seq_for_model, check_step

    budget = _budget(args)
    jobs = resolve_jobs(args.jobs)
    chunk_counts = parse_chunks(args.chunks)
    check_step(seq=args.seq, batch=args.batch)
    shape = StepShape(batch=args.batch, seq_len=args.seq, dtype=args.dtype)
    hw = hardware(args.hardware)
    model = resolve_model(args.model)
    check_seq_for_model(args.seq, model, allow_long=args.allow_long_seq)
    if args.max is not None:
        return run_max(args, model, shape, budget, hw, chunk_counts)
    result = fit(model, shape, budget, hw, chunk_counts, chunk_traces=args.chunk_traces,
                 recipe=Recipe.from_args(args), objective=Objective(args.objective),
                 checkpointing=checkpointing_pin(args.checkpointing), search_recipes=args.search_recipes,
                 jobs=jobs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0 if result["recommended"] is not None else 1


def run_max(args: argparse.Namespace, model, shape, budget: "Budget", hw, chunk_counts: tuple[int, ...]) -> int:
    """`fit --max seq|batch`: one row per strategy with the largest value that fits."""
    from planner.fit_max import largest

    recipe = Recipe.from_args(args)
    strategies = fit_strategies(chunk_counts, recipe, checkpointing_pin(args.checkpointing), args.search_recipes)
    rows = largest(model, shape, budget, hw, strategies, args.max,
                   allow_long_seq=args.allow_long_seq, chunk_traces=args.chunk_traces)
    code = 0 if any(r.value is not None for r in rows) else 1
    held = f"batch {shape.batch}" if args.max == "seq" else f"{shape.seq_len} tokens"
    what = "longest sequence" if args.max == "seq" else "largest batch"
    doc = {"model": model.name, "axis": args.max, "held": {"batch": shape.batch} if args.max == "seq" else
           {"seq_len": shape.seq_len}, "dtype": shape.dtype, "budget": budget.to_json(),
           "recipe": recipe.to_json(), "hardware": hw.gpu.name,
           "rows": [{"label": r.strategy.label(), "strategy": r.strategy.to_json(), "largest": r.value,
                     "limit": r.limit, "evaluated": r.evaluated,
                     "estimate": None if r.estimate is None else r.estimate.to_json()} for r in rows]}
    if args.json:
        print(json.dumps(doc, indent=2))
        return code
    print(f"model: {model.name}; {what} that fits every tier ({held}, {shape.dtype}); "
          f"GPU budget {describe_size(budget.gpu_bytes)}")
    label_w = max(len(r.strategy.label()) for r in rows)
    print(f"{'strategy':<{label_w}}  {args.max:>8}  {'GPU peak':>10}  {'reserved':>10}  {'host':>10}  {'step':>8}")
    for r in rows:
        if r.value is None:
            print(f"{r.strategy.label():<{label_w}}  {'none':>8}  (does not fit even at the smallest {args.max})")
            continue
        e = r.estimate
        at_limit = "  (the search's limit)" if r.value == r.limit else ""
        print(f"{r.strategy.label():<{label_w}}  {r.value:>8}  {format_bytes(e.peak_bytes[Tier.GPU]):>10}  "
              f"{format_bytes(e.reserved_bytes):>10}  {format_bytes(e.peak_bytes.get(Tier.HOST, 0)):>10}  "
              f"{_secs(e.step_time_s):>8}{at_limit}")
    return code


def _budget(args: argparse.Namespace) -> "Budget":
    from planner.strategy import Budget

    return Budget(
        gpu_bytes=parse_bytes(args.gpu, what="GPU memory (--gpu)"),
        host_bytes=None if args.host_ram is None else parse_bytes(args.host_ram, what="host RAM (--host-ram)"),
        disk_bytes=None if args.disk is None else parse_bytes(args.disk, what="disk (--disk)"),
    )


def fit(model, shape, budget: "Budget", hw, chunk_counts: tuple[int, ...], *, chunk_traces: str = "auto",
        recipe: Recipe = Recipe(), objective: "Objective | None" = None, checkpointing: bool | None = None,
        search_recipes: str = "none", jobs: int = 1) -> dict:
    """Evaluate every row and return the report as plain JSON-able data (`checkpointing`,
    `search_recipes`: see `fit_strategies`; `jobs`: processes tracing, planner.parallel_eval)."""
    from planner.evaluate import param_layout
    from planner.parallel_eval import evaluate_all

    layout = param_layout(model, shape.dtype)
    strategies = fit_strategies(chunk_counts, recipe, checkpointing, search_recipes)
    estimates = evaluate_all(model, shape, strategies, hw, chunk_traces=chunk_traces, jobs=jobs,
                             what=f"fit {model.name}: evaluate strategies")
    objective = objective or Objective.SPEED
    other = Objective.FIDELITY if objective == Objective.SPEED else Objective.SPEED
    best, alternative = recommend(estimates, budget, objective), recommend(estimates, budget, other)
    fitting = [i for i, e in enumerate(estimates) if e.fits(budget)]
    fastest = min(fitting, key=lambda i: (estimates[i].step_time_s, i)) if fitting else None
    rows = []
    for e in estimates:
        row = e.to_json()
        row["need_bytes"] = {t.value: e.need_bytes(t) for t in TIERS}
        row["fits"] = {t.value: e.fits_tier(budget, t) for t in TIERS}
        row["fits_all"] = e.fits(budget)
        rows.append(row)
    read_as = {"gpu": describe_size(budget.gpu_bytes),
               "host": None if budget.host_bytes is None else describe_size(budget.host_bytes),
               "disk": None if budget.disk_bytes is None else describe_size(budget.disk_bytes)}
    return {
        "model": model.name,
        "source": model.source,
        "fingerprint": model.fingerprint(),
        "parameters": layout.total_params,
        "num_layers": layout.num_layers,
        "shape": {"batch": shape.batch, "seq_len": shape.seq_len, "dtype": shape.dtype},
        "recipe": recipe.to_json(),
        "recipe_description": recipe.describe(),
        "budget": budget.to_json(),
        "budget_read_as": read_as,
        "hardware": hw.gpu.name,
        "chunk_traces": chunk_traces,
        "objective": objective.describe(),
        "objective_name": objective.value,
        "alternative": {"objective": other.value, "row": alternative,
                        "label": None if alternative is None else rows[alternative]["label"]},
        "rows": rows,
        "recommended": best,
        "recommended_label": None if best is None else rows[best]["label"],
        "fastest": fastest,
        "fastest_label": None if fastest is None else rows[fastest]["label"],
    }


def _fits_mark(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def _secs(t: float) -> str:
    return f"{t:.2f}s" if t >= 0.1 else f"{t * 1e3:.3g}ms" if t >= 1e-4 else f"{t * 1e6:.3g}us"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def print_report(r: dict, out=None) -> None:
    w = (out or sys.stdout).write
    w(f"model: {r['model']} ({r['source']}), {_count(r['parameters'])} parameters, {r['num_layers']} layers\n")
    s = r["shape"]
    w(f"step: batch {s['batch']} x {s['seq_len']} tokens, {s['dtype']}; step times on {r['hardware']}\n")
    w(f"recipe: {r['recipe_description']}\n")
    ra = r["budget_read_as"]
    w(f"GPU budget: {ra['gpu']} (what PyTorch may reserve; the CUDA context comes on top)\n")
    w(f"host RAM:   {ra['host'] or 'not limited (--host-ram to check)'}\n")
    w(f"disk:       {ra['disk'] or 'not limited (--disk to check)'}\n")
    w(f"objective:  {r['objective']}\n\n")
    label_w = max(len("strategy"), *(len(row["label"]) for row in r["rows"]))
    head = (f"{'strategy':<{label_w}}  {'GPU peak':>10}  {'reserved':>10}  {'least':>10}  {'host':>10}"
            f"  {'disk':>10}"
            f"  {'fits GPU/host/disk':>18}  {'step':>8}")
    w(head + "\n" + "-" * len(head) + "\n")
    for i, row in enumerate(r["rows"]):
        pk = row["peak_bytes"]
        fits = "/".join(_fits_mark(row["fits"][t.value]) for t in TIERS)
        mark = "  <- recommended" if i == r["recommended"] else ""
        w(f"{row['label']:<{label_w}}  {format_bytes(pk['gpu']):>10}  {format_bytes(row['reserved_bytes']):>10}"
          f"  {format_bytes(row.get('least_bytes', row['reserved_bytes'])):>10}  {format_bytes(pk['host']):>10}"
          f"  {format_bytes(pk['disk']):>10}  {fits:>18}"
          f"  {_secs(row['step_time_s']):>8}{mark}\n")
    w("reserved: what the caching allocator caches unconstrained; least: the least memory the step needs "
      "(it frees cached blocks and retries before running out): fits GPU holds least to the budget\n\n")
    if r["recommended"] is None:
        w("nothing fits: no row fits every tier's budget (see the peaks above)\n")
        return
    row = r["rows"][r["recommended"]]
    w(f"recommended: {row['label']}")
    if row.get("worst_chunk") is not None:
        w(f" (worst chunk: {row['worst_chunk']})")
    w("\n")
    if row.get("highest_peak"):
        high = row["highest_peak"]
        w(f"  chunk {high['chunk']} allocates more at its peak: {format_bytes(high['gpu_bytes'])} (needs less: the GPU "
          "figures are the worst chunk's, by the least memory it needs)\n")
    for tier in TIERS:
        comps = row["components"].get(tier.value) or {}
        if not comps:
            continue
        parts = ", ".join(f"{c} {format_bytes(b)}" for c, b in sorted(comps.items(), key=lambda kv: -kv[1]))
        w(f"  {tier.value:<5} {format_bytes(row['peak_bytes'][tier.value]):>10}: {parts}\n")
    times = ", ".join(f"{k} {_secs(v)}" for k, v in row["step_time_parts_s"].items())
    w(f"  step time {_secs(row['step_time_s'])}: {times}\n")
    least = row.get("least_bytes", row["reserved_bytes"])
    card = least + row["context_bytes"]
    w(f"  a GPU needs about {format_bytes(card)}: {format_bytes(least)} for PyTorch's allocator"
      f" ({format_bytes(row['reserved_bytes'])} cached when unconstrained)"
      f" + {format_bytes(row['context_bytes'])} CUDA context\n")
    alt = r["alternative"]
    if alt["row"] is not None and alt["row"] != r["recommended"]:
        row = r["rows"][alt["row"]]
        what = "fewest chunks that fits" if alt["objective"] == "fidelity" else "fastest that fits"
        w(f"{what} (--objective {alt['objective']}): {row['label']} ({_secs(row['step_time_s'])} per step)\n")
