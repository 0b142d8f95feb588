"""`chunkft compare` (predicted timeline vs measured trace) and `chunkft report` (what fits a
budget for one model): figures, tables and a report in one output directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

COMMANDS = ("compare", "report")

# Default output directories: one per command, so neither default can hold the other's report.
COMPARE_OUT = "report/compare"
REPORT_OUT = "report/fit"


def add_parser(subparsers) -> None:
    """Register the subcommands not registered yet (planner.cli calls this once per entry)."""
    if "compare" not in subparsers.choices:
        p = subparsers.add_parser("compare", help="predicted timeline vs measured trace: figures and a report",
                                  description="Align a simulator timeline with a runtime trace and report the errors.")
        p.add_argument("timeline", help="predicted timeline (chunkft simulate -o ...)")
        p.add_argument("trace", help="measured trace (chunkft run --trace ...)")
        p.add_argument("-o", "--out", default=COMPARE_OUT, help=f"output directory (default: {COMPARE_OUT}/)")
        p.add_argument("--step", type=int, default=None,
                       help="compare the timeline against this step of the trace (default: a one-step timeline against the worst step of its chunk, else steps by number)")
        p.add_argument("--perfetto", default=None, metavar="OUT.json",
                       help="also export timeline and trace as Chrome trace JSON (chrome://tracing, ui.perfetto.dev)")
        p.add_argument("--force", action="store_true",
                       help="replace another command's report in the output directory")
        p.set_defaults(run=run_compare)
    if "report" not in subparsers.choices:
        p = subparsers.add_parser("report", help="fit map, chunk sweep and GPU sizing for one model",
                                  description="What fits a GPU budget: per strategy, sequence length and batch.")
        p.add_argument("model", nargs="?", default="llama3-8b", help="preset, HF dir, config.json or pkg.mod:fn")
        p.add_argument("--gpu", default="24GiB", help="GPU memory budget (default 24GiB)")
        p.add_argument("--host-ram", default=None, help="host memory budget (default: unlimited)")
        p.add_argument("--seq", default="512,1024,2048", help="comma-separated sequence lengths (default 512,1024,2048)")
        p.add_argument("--batch", default="1,2", help="comma-separated batch sizes (default 1,2)")
        p.add_argument("--chunks", default="1,4,16,64,128",
                       help="chunk counts for the chunk sweep (default 1,4,16,64,128); the fit map's ChunkFT "
                            "uses the fewest of them that fit")
        p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
        p.add_argument("--hardware", default="rtx4090", help="GPU profile for step times (planner.hardware)")
        p.add_argument("-o", "--out", default=REPORT_OUT, help=f"output directory (default: {REPORT_OUT}/)")
        p.add_argument("--cache", default=None, metavar="FILE.json",
                       help="reuse and store estimates in this file (same model, hardware and planner version); "
                            "a file that is not such a cache is refused, never overwritten")
        p.add_argument("--allow-long-seq", action="store_true",
                       help="plan sequence lengths beyond the model's max_position_embeddings")
        p.add_argument("--force", action="store_true",
                       help="replace another command's report in the output directory")
        p.set_defaults(run=run_report)


def run(args: argparse.Namespace) -> int:
    return args.run(args)


def run_compare(args: argparse.Namespace) -> int:
    from analysis.compare import compare
    from analysis.load import load_pair
    from analysis.perfetto import write_chrome_trace
    from analysis.report import check_report_dir, write_compare_report
    from planner.errors import ChunkftError
    from planner.fsio import check_output_file

    check_report_dir(args.out, "compare", force=args.force)
    if args.perfetto:
        check_output_file(args.perfetto, "--perfetto", inputs=[args.timeline, args.trace])
    if args.step is not None and not 0 <= args.step < 2**31:
        raise ChunkftError(f"invalid --step {args.step}: must be a step number, 0 or more")
    predicted, measured = load_pair(args.timeline, args.trace)
    comparison = compare(predicted, measured, measured_step=args.step)
    html_path, md_path = write_compare_report(comparison, Path(args.out))
    print(f"wrote {html_path} and {md_path}")
    for line in comparison_summary(comparison):
        print(line)
    if args.perfetto:
        write_chrome_trace(predicted, args.perfetto, measured=measured)
        print(f"wrote {args.perfetto}: predicted timeline and measured trace as two processes "
              "(open in ui.perfetto.dev or chrome://tracing)")
    return 0


def comparison_summary(comparison) -> list[str]:
    """One line per peak row: predicted, measured, relative error."""
    import pandas as pd

    from planner.units import format_bytes

    lines = []
    for r in comparison.peaks.itertuples(index=False):
        if pd.isna(r.predicted_bytes) or pd.isna(r.measured_bytes):
            side = "timeline" if pd.isna(r.measured_bytes) else "trace"
            lines.append(f"{r.tier} {r.metric} peak: only the {side} records this tier")
            continue
        lines.append(f"{r.tier} {r.metric} peak: predicted {format_bytes(int(r.predicted_bytes))}, "
                     f"measured {format_bytes(int(r.measured_bytes))} ({r.relative_error * 100:+.1f}%)")
    return lines


def _int_list(text: str, what: str, high: int) -> list[int]:
    from planner.errors import ChunkftError
    from planner.validate import MAX_LIST_VALUES

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= high for v in values) or len(values) > MAX_LIST_VALUES:
        raise ChunkftError(f"invalid {what} {text[:60]!r}: expected up to {MAX_LIST_VALUES} comma-separated "
                           f"integers from 1 to {high:,}, e.g. 512,1024")
    return values


def run_report(args: argparse.Namespace) -> int:
    from analysis.report import check_report_dir, write_plan_report
    from analysis.sweep import CachedEvaluate, check_cache_file, gpu_catalogue, run_sweep
    from planner import __version__ as planner_version
    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.strategy import Budget
    from planner.trace import StepShape
    from planner.units import parse_bytes

    from planner.validate import MAX_BATCH, MAX_CHUNKS, MAX_SEQ_LEN, check_seq_for_model, check_step

    seq_lens = _int_list(args.seq, "--seq", MAX_SEQ_LEN)
    batches = _int_list(args.batch, "--batch", MAX_BATCH)
    chunks = _int_list(args.chunks, "--chunks", MAX_CHUNKS)
    check_step(seq=max(seq_lens), batch=max(batches))
    budget = Budget(gpu_bytes=parse_bytes(args.gpu, what="--gpu"),
                    host_bytes=parse_bytes(args.host_ram, what="--host-ram") if args.host_ram is not None else None)
    check_report_dir(args.out, "report", force=args.force)
    if args.cache is not None:
        check_cache_file(args.cache)
    hw = hardware(args.hardware)
    model = resolve_model(args.model)
    check_seq_for_model(max(seq_lens), model, allow_long=args.allow_long_seq)

    def make_shape(*, seq_len: int, batch: int):
        return StepShape(seq_len=seq_len, batch=batch, dtype=args.dtype)

    # --cache: estimates persist in a file, so a rerun with another budget re-evaluates nothing.
    # Opt-in: the key names model, hardware and planner version, not the cost model's code.
    cached = CachedEvaluate(lambda shape, strategy: evaluate(model, shape, strategy, hw), path=args.cache,
                            context=f"{model.fingerprint()} {hw!r} planner {planner_version}")
    sweep = run_sweep(cached, make_shape,
                      model=args.model, budget=budget, gpu_profile=hw.gpu.name, catalogue=gpu_catalogue(),
                      seq_lens=seq_lens, batches=batches, chunk_counts=chunks)
    html_path, md_path = write_plan_report(sweep, Path(args.out))
    print(f"wrote {html_path} and {md_path}")
    return 0
