"""`chunkft size MODEL`: what hardware a fine-tuning job needs (planner.size).

  chunkft size MODEL [--seq 1024] [--batch 1] [--dtype bf16] [--gpu-kind KIND]

torch and transformers are imported inside run_size(), not at module top (CLI start-up time).
"""

from __future__ import annotations

from planner.plan_cli import step_shape, add_shape_args, search_space
from planner.units import format_bytes


def add_parser(subparsers) -> None:
    z = subparsers.add_parser("size", help="what hardware a fine-tuning job needs",
                              description="Minimum GPU memory, host RAM and disk per strategy family, "
                                          "the catalogue GPUs that suffice, and sharded GPU counts.")
    z.add_argument("model", help="preset name, HF model directory, config.json, or package.module:function")
    add_shape_args(z)
    z.add_argument("--gpu-kind", default="rtx4090", help="GPU profile the estimates are made on")
    z.set_defaults(run=run_size)


def run_size(args) -> int:
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.size import size_model

    hw = hardware(args.gpu_kind)
    shape = step_shape(args)
    model = resolve_model(args.model)
    report = size_model(model, shape, hw, space=search_space(args, model))
    print(f"model     {model.name}, {shape.seq_len} tokens x batch {shape.batch}, {shape.dtype}")
    print(f"{'strategy family':<46} {'GPU':>11} {'host RAM':>11} {'disk':>11}  best strategy; GPUs that suffice")
    for f in report.families:
        gpus = ", ".join(f.gpus) if f.gpus else "none in the catalogue"
        print(f"{f.family:<46} {format_bytes(f.gpu_bytes):>11} {format_bytes(f.host_bytes):>11} "
              f"{format_bytes(f.disk_bytes):>11}  {f.estimate.strategy.label()}; {gpus}")
    print("GPU = allocator reserved + CUDA context, what the card must hold.")
    if report.sharded:
        alone = ", ".join(report.single_gpus) or "none"
        print(f"With weights resident, one GPU suffices on: {alone}. Otherwise, with states sharded "
              "across GPUs (FSDP arithmetic, an estimate):")
        for s in report.sharded:
            print(f"  {s.num_gpus} x {s.gpu}: {format_bytes(s.per_rank_bytes)} per GPU "
                  f"({s.estimate.strategy.label()})")
    print(f"evaluated {report.evaluated} strategies")
    return 0
