"""`chunkft size MODEL`: what hardware a fine-tuning job needs (planner.size).

  chunkft size MODEL [--seq 1024] [--batch 1] [--dtype bf16] [--gpu-kind KIND]
                     [--gpus-per-node 8] [--max-gpus 64] [--shard-embeddings]
                     [--host-ram-per-node 1TiB]

torch and transformers are imported inside run_size(), not at module top (CLI start-up time).
"""

from __future__ import annotations

from planner.plan_cli import add_shape_args, check_model_args, check_shape_args, search_space, step_shape
from planner.units import format_bytes


def add_parser(subparsers) -> None:
    z = subparsers.add_parser("size", help="what hardware a fine-tuning job needs",
                              description="Minimum GPU memory, host RAM and disk per strategy family, "
                                          "the catalogue GPUs that suffice, and how many GPUs of each other "
                                          "kind hold the job sharded (FSDP2 + sharded ChunkFT).")
    z.add_argument("model", help="preset name, HF model directory, config.json, or package.module:function")
    add_shape_args(z)
    z.add_argument("--gpu-kind", default="rtx4090", help="GPU profile the one-GPU estimates are made on")
    z.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs in one node: counts go 2..this on one node, then whole nodes (default 8)")
    z.add_argument("--max-gpus", type=int, default=64, help="largest GPU count considered (default 64)")
    z.add_argument("--shard-embeddings", action="store_true",
                   help="input embedding and output head as FSDP units of their own")
    z.add_argument("--host-ram-per-node", help="host RAM budget of one node, e.g. 1TiB (default: no limit)")
    z.set_defaults(run=run_size)


def run_size(args) -> int:
    from planner.errors import ChunkftError
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.size import size_model
    from planner.units import parse_bytes
    from planner.validate import MAX_GPUS, MAX_GPUS_PER_NODE, check_count

    check_shape_args(args)
    check_count(args.gpus_per_node, "--gpus-per-node", MAX_GPUS_PER_NODE)
    check_count(args.max_gpus, "--max-gpus", MAX_GPUS)
    host = None
    if args.host_ram_per_node is not None:
        host = parse_bytes(args.host_ram_per_node, what="--host-ram-per-node")
        if host <= 0:
            raise ChunkftError(f"invalid --host-ram-per-node {args.host_ram_per_node!r}: must be more than 0")
    hw = hardware(args.gpu_kind)
    shape = step_shape(args)
    model = resolve_model(args.model)
    check_model_args(args, model)
    report = size_model(model, shape, hw, space=search_space(args, model), gpus_per_node=args.gpus_per_node,
                        max_gpus=args.max_gpus, shard_embeddings=args.shard_embeddings, host_bytes_per_node=host)
    print(f"model     {model.name}, {shape.seq_len} tokens x batch {shape.batch}, {shape.dtype}")
    print(f"{'strategy family':<46} {'GPU':>11} {'host RAM':>11} {'disk':>11}  best strategy; GPUs that suffice")
    for f in report.families:
        gpus = ", ".join(f.gpus) if f.gpus else "none in the catalogue"
        print(f"{f.family:<46} {format_bytes(f.gpu_bytes):>11} {format_bytes(f.host_bytes):>11} "
              f"{format_bytes(f.disk_bytes):>11}  {f.estimate.strategy.label()}; {gpus}")
    print("GPU = allocator reserved + CUDA context, what the card must hold.")
    alone = ", ".join(report.single_gpus) or "none"
    print(f"With weights resident, one GPU suffices on: {alone}.")
    if report.sharded or report.unsized:
        traces = f", {report.sharded_chunk_traces} chunk traces" if report.sharded_chunk_traces else ""
        budget = f", host RAM <= {format_bytes(host)} per node" if host is not None else ""
        print(f"Sharded (FSDP2 + sharded ChunkFT, per-rank model{traces}; up to {args.gpus_per_node} GPUs per node, "
              f"{args.max_gpus} in all{budget}{', embeddings as own units' if args.shard_embeddings else ''}):")
        for s in report.sharded:
            where = f"{s.nodes} nodes x {s.gpus_per_node}" if s.nodes > 1 else f"{s.num_gpus}"
            print(f"  {where} x {s.gpu}: {format_bytes(s.gpu_bytes)} per GPU, "
                  f"{format_bytes(s.host_bytes_per_node)} host RAM per node ({s.estimate.strategy.label()})")
        for g in report.unsized:
            print(f"  {g}: more than {args.max_gpus} GPUs")
        if report.sharded_chunk_traces == "bound":
            print("  bound chunk traces: one full-FT trace stands for every chunk (pessimistic).")
    print(f"evaluated {report.evaluated} strategies on one GPU, {report.sharded_evaluated} sharded")
    return 0
