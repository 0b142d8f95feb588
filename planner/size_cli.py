"""`chunkft size MODEL`: what hardware a fine-tuning job needs (planner.size).

  chunkft size MODEL [--seq 1024] [--batch 1] [--dtype bf16] [--gpu-kind KIND] [--node NAME]
                     [--gpus-per-node N] [--max-gpus 64] [--[no-]shard-embeddings]
                     [--host-ram-per-node 1TiB] [--disk-per-node 4TB] [--chunk-traces auto|exact|bound]
                     [--cache-dir DIR] [--no-cache] [--[no-]progress]

Every GPU kind is sized on its node (planner.hardware's node catalogue: GPUs per node, host RAM,
NVMe); --node sizes one node's GPU kind on that node; the per-node flags override its figures.

torch and transformers are imported inside run_size(), not at module top (CLI start-up time).
"""

from __future__ import annotations

import argparse

from planner.plan_cli import (add_run_args, add_shape_args, check_model_args, check_shape_args, search_space,
                              step_shape, using_run_args)
from planner.units import format_bytes

_TIERS_TEXT = {"gpu": "GPU", "host": "host RAM", "disk": "disk"}


def add_parser(subparsers) -> None:
    z = subparsers.add_parser("size", help="what hardware a fine-tuning job needs",
                              description="Minimum GPU memory, host RAM and disk per strategy family, "
                                          "the catalogue GPUs that suffice, and how many GPUs of each other "
                                          "kind hold the job sharded (FSDP2 + sharded ChunkFT) on its node.")
    z.add_argument("model", help="preset name, HF model directory, config.json, or package.module:function")
    add_shape_args(z)
    z.add_argument("--gpu-kind", default="rtx4090", help="GPU profile the one-GPU estimates are made on")
    z.add_argument("--node", help="size on this catalogue node only (its GPU kind, count, host RAM and NVMe); "
                                  "default: every GPU kind on its default node")
    z.add_argument("--gpus-per-node", type=int,
                   help="GPUs in one node: counts go 2..this on one node, then whole nodes (default: the node's)")
    z.add_argument("--max-gpus", type=int, default=64, help="largest GPU count considered (default 64)")
    z.add_argument("--shard-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="input embedding and output head as FSDP units of their own, or not "
                        "(default: both layouts are tried, the fewer GPUs win)")
    z.add_argument("--host-ram-per-node", help="host RAM of one node, e.g. 1TiB (default: the node's)")
    z.add_argument("--disk-per-node", help="disk of one node, e.g. 4TB (default: the node's NVMe)")
    z.add_argument("--chunk-traces", choices=["auto", "exact", "bound"], default="auto",
                   help="ChunkFT per-chunk traces: exact traces every chunk pattern (minutes at 70B); bound (auto "
                        "above 2B parameters) shares one full-FT trace: fast, approximate (Llama 3.2 1B: -0.3 to "
                        "+0.5 GiB)")
    add_run_args(z)
    from planner.parallel_eval import add_argument as add_jobs_argument

    add_jobs_argument(z)
    z.set_defaults(run=run_size)


def _per_node(text: str | None, flag: str) -> int | None:
    from planner.errors import ChunkftError
    from planner.units import parse_bytes

    if text is None:
        return None
    value = parse_bytes(text, what=flag)
    if value <= 0:
        raise ChunkftError(f"invalid {flag} {text!r}: must be more than 0")
    return value


def run_size(args) -> int:
    with using_run_args(args):
        return _run_size(args)


def _run_size(args) -> int:
    from planner.hardware import hardware, load_node
    from planner.model import resolve_model
    from planner.parallel_eval import resolve_jobs
    from planner.size import size_model
    from planner.validate import MAX_GPUS, MAX_GPUS_PER_NODE, check_count

    check_shape_args(args)
    jobs = resolve_jobs(args.jobs)
    if args.gpus_per_node is not None:
        check_count(args.gpus_per_node, "--gpus-per-node", MAX_GPUS_PER_NODE)
    check_count(args.max_gpus, "--max-gpus", MAX_GPUS)
    host = _per_node(args.host_ram_per_node, "--host-ram-per-node")
    disk = _per_node(args.disk_per_node, "--disk-per-node")
    node = load_node(args.node) if args.node is not None else None
    hw = hardware(args.gpu_kind)
    shape = step_shape(args)
    model = resolve_model(args.model)
    check_model_args(args, model)
    report = size_model(model, shape, hw, space=search_space(args, model), gpus_per_node=args.gpus_per_node,
                        max_gpus=args.max_gpus, shard_embeddings=args.shard_embeddings, node=node,
                        host_bytes_per_node=host, disk_bytes_per_node=disk, chunk_traces=args.chunk_traces,
                        extend_chunks=getattr(args, "chunks", None) is None and args.max_chunks is None,
                        jobs=jobs)
    print(f"model     {model.name}, {shape.seq_len} tokens x batch {shape.batch}, {shape.dtype}")
    where = node.describe() if node is not None else "each GPU kind's default node (planner/hardware/node-*.json)"
    overrides = ", ".join(f"{what} {format_bytes(v)}" for what, v in (("host RAM", host), ("disk", disk)) if v)
    print(f"nodes     {where}" + (f"; per node: {overrides}" if overrides else ""))
    print(f"{'strategy family':<46} {'GPU':>11} {'host RAM':>11} {'disk':>11}  best strategy; GPUs that suffice")
    for f in report.families:
        gpus = ", ".join(f.gpus) if f.gpus else "none in the catalogue"
        print(f"{f.family:<46} {format_bytes(f.gpu_bytes):>11} {format_bytes(f.host_bytes):>11} "
              f"{format_bytes(f.disk_bytes):>11}  {f.estimate.strategy.label()}; {gpus}")
    print("GPU = allocator reserved + CUDA context, what the card must hold; a GPU suffices when its node's "
          "host RAM and disk hold the rest too.")
    alone = ", ".join(report.single_gpus) or "none"
    print(f"With weights resident, one GPU suffices on: {alone}.")
    if report.sharded or report.unsized:
        traces = f", {report.sharded_chunk_traces} chunk traces" if report.sharded_chunk_traces else ""
        per = f"{args.gpus_per_node} GPUs per node" if args.gpus_per_node else "the node's GPUs per node"
        print(f"Sharded (FSDP2 + sharded ChunkFT, per-rank model{traces}; {per}, {args.max_gpus} in all):")
        for s in report.sharded:
            count = f"{s.nodes} nodes x {s.gpus_per_node}" if s.nodes > 1 else f"{s.num_gpus}"
            check = "verified by the plan solver" if s.verified else "NOT confirmed by the plan solver"
            disk = f", {format_bytes(s.disk_bytes_per_node)} disk" if s.disk_bytes_per_node else ""
            emb = ", embeddings as own units" if s.shard_embeddings else ""
            print(f"  {count} x {s.gpu} ({s.node}): {format_bytes(s.gpu_bytes)} per GPU, "
                  f"{format_bytes(s.host_bytes_per_node)} host RAM{disk} per node "
                  f"({s.estimate.strategy.label()}{emb}; {check})")
        for u in report.unsized:
            if not u.missing_bytes:
                print(f"  {u.gpu}: more than {args.max_gpus} GPUs")
                continue
            short = ", ".join(f"{_TIERS_TEXT[t.value]} {format_bytes(b)} per {'GPU' if t.value == 'gpu' else 'node'}"
                              for t, b in u.missing_bytes.items())
            print(f"  {u.gpu} ({u.node}): not up to {u.num_gpus} GPUs; closest "
                  f"({u.closest.strategy.label()}) lacks {short}")
        if report.sharded_chunk_traces == "bound":
            print("  bound chunk traces: one full-FT trace stands for every chunk (pessimistic).")
    print(f"evaluated {report.evaluated} strategies on one GPU, {report.sharded_evaluated} sharded")
    return 0
