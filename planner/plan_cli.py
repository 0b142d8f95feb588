"""`chunkft plan` and `chunkft simulate`: solve and replay from the shell.

  chunkft plan MODEL [--gpu 24GiB] [--host-ram ..] [--disk ..] [--seq 1024] [--batch 1]
               [--chunks 4,16] [--optimizer gpu|host] [--state gpu|host|disk] [--grad-staging ..]
               [--dtype bf16] [--gpu-kind rtx4090] [--objective speed|fidelity] [-o plan.json]
      exit 0 with a plan written; exit 1 when nothing fits (what is missing, per tier).
  chunkft simulate PLAN [-o timeline.jsonl] [--model SPEC] [--gpu-kind KIND] [--chunk K]

torch and transformers are imported inside run(), not at module top (CLI start-up time).
"""

from __future__ import annotations

import argparse

from planner.errors import ChunkftError
from planner.recipe import add_recipe_args
from planner.solve import MAX_CHUNKS
from planner.units import describe_size, format_bytes, parse_bytes

COMMANDS = ("plan", "simulate")

DEFAULT_GPU_KIND = "rtx4090"
_TIERS_TEXT = {"gpu": "GPU", "host": "host RAM", "disk": "disk"}


def add_parser(subparsers) -> None:
    """Register plan and simulate. planner.cli calls this once per SUBCOMMANDS entry
    naming this module; the first call registers both, later calls do nothing."""
    if "plan" in subparsers.choices:
        return
    p = subparsers.add_parser("plan", help="find the best plan that fits a memory budget",
                              description="Search the strategy space for the best plan that fits every tier.")
    p.add_argument("model", help="preset name, HF model directory, config.json, or package.module:function")
    p.add_argument("--gpu", help="GPU memory budget, e.g. 24GiB or 80GB (default: the --gpu-kind card's memory "
                                 "less the CUDA context)")
    p.add_argument("--host-ram", help="host RAM budget (default: not limited)")
    p.add_argument("--disk", help="disk budget (default: not limited)")
    add_shape_args(p)
    p.add_argument("--gpu-kind", help=f"GPU profile for step times (default {DEFAULT_GPU_KIND}); "
                                      "without --gpu its memory less the CUDA context is the budget")
    p.add_argument("--objective", choices=["speed", "fidelity", "memory"], default="speed",
                   help="speed: shortest predicted step time first (default); fidelity: fewest chunks first, closest "
                        "to plain full fine-tuning ('memory' is its older name)")
    _pin_args(p)
    g = p.add_argument_group("several GPUs (FSDP2; the budget is per GPU, --host-ram and --disk per node)")
    g.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one rank each (default 1)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--node", help="catalogue node (planner/hardware/node-*.json): its GPU kind, and its host RAM "
                                  "and NVMe as --host-ram / --disk (default with several GPUs: the GPU kind's node)")
    g.add_argument("--shard-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="the input embedding and the output head as FSDP units of their own, or not "
                        "(default with several GPUs: both layouts are searched)")
    p.add_argument("--chunk-traces", choices=["auto", "exact", "bound"], default="auto",
                   help="ChunkFT per-chunk traces: exact traces every chunk pattern; bound (auto above 2B "
                        "parameters) shares one full-FT trace: fast, approximate (Llama 3.2 1B: -0.3 to +0.5 GiB)")
    p.add_argument("-o", "--output", default="plan.json", help="plan file to write (default plan.json)")
    from planner import parallel_eval

    parallel_eval.add_argument(p)
    add_run_args(p)
    p.set_defaults(run=run_plan)

    s = subparsers.add_parser("simulate", help="predict a plan's memory timeline and step time",
                              description="Replay a plan over the op graph: one step and one chunk switch.")
    s.add_argument("plan", help="plan file from `chunkft plan`")
    s.add_argument("-o", "--output", default="timeline.jsonl", help="timeline to write (default timeline.jsonl)")
    s.add_argument("--model", help="model spec (default: the model named in the plan)")
    s.add_argument("--gpu-kind", help="re-time on another GPU profile (default: the plan's)")
    s.add_argument("--chunk", type=int, help="ChunkFT: the step of this chunk (default: the plan's worst chunk)")
    s.set_defaults(run=run_simulate)


def add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq", type=int, default=1024, help="sequence length in tokens (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="training dtype")
    p.add_argument("--max-chunks", type=int,
                   help=f"largest chunk count searched (default {MAX_CHUNKS}; a sharded plan that does not fit "
                        "then tries larger powers of two)")
    p.add_argument("--allow-long-seq", action="store_true",
                   help="plan a --seq beyond the model's max_position_embeddings")
    add_recipe_args(p)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--cache-dir / --no-cache (planner.cache) and --progress / --no-progress (planner.progress)."""
    from planner import cache, progress

    cache.add_arguments(p)
    progress.add_argument(p)


def using_run_args(args):
    """The block `add_run_args`' flags ask for: the disk cache and the progress bars."""
    import contextlib

    from planner import cache, progress

    stack = contextlib.ExitStack()
    stack.enter_context(cache.using(cache.cli_dir(args)))
    stack.enter_context(progress.showing(args.progress))
    return stack


def check_shape_args(args) -> None:
    """The shape flags' ranges (planner.validate), before any model is read."""
    from planner.validate import MAX_CHUNKS as LARGEST_CHUNKS
    from planner.validate import check_int, check_step

    check_step(seq=args.seq, batch=args.batch)
    if args.max_chunks is not None:
        check_int(args.max_chunks, "--max-chunks", low=1, high=LARGEST_CHUNKS)
    if getattr(args, "chunks", None):
        _parse_chunk_counts(args.chunks)


def check_model_args(args, model) -> None:
    """What needs the model: the sequence length against its position embeddings."""
    from planner.validate import check_seq_for_model

    check_seq_for_model(args.seq, model, allow_long=args.allow_long_seq)


def _pin_args(p: argparse.ArgumentParser) -> None:
    """Flags that pin part of the strategy space; the solver searches the rest."""
    p.add_argument("--chunks", help="only these chunk counts, e.g. 4 or 1,8,64 (default: search)")
    p.add_argument("--optimizer", choices=["gpu", "host"], help="where the AdamW step runs (default: search)")
    p.add_argument("--state", choices=["gpu", "host", "disk"],
                   help="where inactive chunks' fp32 master and moments rest (default: search)")
    p.add_argument("--grad-staging", choices=["none", "host", "disk"],
                   help="16-bit gradient offload as produced (default: search)")
    p.add_argument("--weights", choices=["gpu", "stream"],
                   help="every layer resident on the GPU, or decoder layers streamed from host (default: search)")


def _parse_chunk_counts(text: str) -> tuple[int, ...]:
    from planner.validate import MAX_CHUNKS as LARGEST_CHUNKS
    from planner.validate import MAX_LIST_VALUES

    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or max(counts) > LARGEST_CHUNKS or len(counts) > MAX_LIST_VALUES:
        raise ChunkftError(f"invalid --chunks {text[:60]!r}: expected up to {MAX_LIST_VALUES} integers from 1 to "
                           f"{LARGEST_CHUNKS:,} separated by commas, e.g. 4 or 1,8,64")
    return counts


def search_space(args, model):
    import dataclasses

    from planner.recipe import Recipe
    from planner.schema import Tier
    from planner.solve import default_space
    from planner.strategy import OptimizerDevice, WeightResidency

    max_chunks = MAX_CHUNKS if args.max_chunks is None else args.max_chunks
    if max_chunks < 1:
        raise ChunkftError(f"invalid --max-chunks {args.max_chunks}: must be 1 or more")
    space = default_space(num_layers=model.num_layers, tokens=args.batch * args.seq, max_chunks=max_chunks)
    pins = {}
    if getattr(args, "chunks", None):
        pins["chunk_counts"] = _parse_chunk_counts(args.chunks)
    if getattr(args, "optimizer", None):
        pins["optimizer_devices"] = (OptimizerDevice(args.optimizer),)
    if getattr(args, "state", None):
        pins["state_tiers"] = (Tier(args.state),)
    if getattr(args, "grad_staging", None):
        pins["grad_stagings"] = (None if args.grad_staging == "none" else Tier(args.grad_staging),)
    from planner.recipe import checkpointing_pin

    if checkpointing_pin(getattr(args, "checkpointing", None)) is not None:
        pins["checkpointing"] = (checkpointing_pin(args.checkpointing),)
    if getattr(args, "weights", None):
        pins["weights"] = (WeightResidency(args.weights),)
    pins["recipe"] = Recipe.from_args(args)
    level = getattr(args, "search_recipes", "none")
    if level != "none" and (getattr(args, "gpus_per_node", 1) > 1 or getattr(args, "nodes", 1) > 1):
        raise ChunkftError(f"--search-recipes {level} is for one-GPU plans; the sharded cost model prices "
                           "chunkft's own recipe only")
    pins["recipes"] = pins["recipe"].variants(level)
    space = dataclasses.replace(space, **pins)
    if not space.strategies():
        raise ChunkftError("the pinned flags (--chunks/--optimizer/--state/--grad-staging/--weights) leave no valid strategy; "
                           "e.g. a host optimizer keeps its state on host or disk, and gradient staging needs --optimizer host")
    return space


def step_shape(args):
    from planner.trace import StepShape

    return StepShape(batch=args.batch, seq_len=args.seq, dtype=args.dtype)


def _layout(args):
    """The ParallelLayout the flags ask for, or None for one GPU."""
    from planner.parallel import ParallelLayout

    from planner.validate import MAX_GPUS, MAX_GPUS_PER_NODE, MAX_NODES, check_count

    check_count(args.gpus_per_node, "--gpus-per-node", MAX_GPUS_PER_NODE)
    check_count(args.nodes, "--nodes", MAX_NODES)
    if args.gpus_per_node * args.nodes > MAX_GPUS:
        raise ChunkftError(f"invalid --gpus-per-node {args.gpus_per_node} x --nodes {args.nodes}: "
                           f"{args.gpus_per_node * args.nodes:,} GPUs; at most {MAX_GPUS:,} are planned")
    layout = ParallelLayout(gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                            shard_embeddings=bool(args.shard_embeddings))
    if layout.world_size == 1:
        if args.shard_embeddings:
            raise ChunkftError("--shard-embeddings needs several GPUs (--gpus-per-node or --nodes above 1)")
        return None
    return layout


def _node(args, layout):
    """The catalogue node whose host RAM and NVMe bound the plan: --node, else with several GPUs
    the GPU kind's default node when it has that many GPUs per node; None for a one-GPU plan
    without --node."""
    from planner.hardware import default_node, load_gpu, load_node

    if args.node is not None:
        node = load_node(args.node)
        if args.gpu_kind and load_gpu(args.gpu_kind).name != node.gpu:
            raise ChunkftError(f"--gpu-kind {args.gpu_kind} is not node {node.name}'s GPU ({node.gpu}); "
                               f"drop one, or pick a node with {load_gpu(args.gpu_kind).name} GPUs")
    elif layout is not None:
        node = default_node(args.gpu_kind or DEFAULT_GPU_KIND)
        if args.gpus_per_node > node.gpus:  # not that machine: no catalogue figures to hold the plan to
            print(f"note      {node.name} (the {node.gpu}'s catalogue node) has {node.gpus} GPU"
                  f"{'s' if node.gpus > 1 else ''}, not {args.gpus_per_node}: host RAM and disk are limited only "
                  "by --host-ram / --disk")
            return None
    else:
        return None
    if args.gpus_per_node > node.gpus:
        raise ChunkftError(f"invalid --gpus-per-node {args.gpus_per_node}: node {node.name} has {node.gpus} GPU"
                           f"{'s' if node.gpus > 1 else ''} (pick another --node, or --nodes for more)")
    return node


def _budget_line(budget) -> str:
    parts = [f"GPU {describe_size(budget.gpu_bytes)}"]
    for name, value in (("host RAM", budget.host_bytes), ("disk", budget.disk_bytes)):
        parts.append(f"{name} {describe_size(value)}" if value is not None else f"{name} not limited")
    return ", ".join(parts)


def _components(comps: dict) -> str:
    items = sorted(((c, b) for c, b in comps.items() if b), key=lambda cb: -cb[1])
    return ", ".join(f"{c.value} {format_bytes(b)}" for c, b in items)


def print_estimate(est, budget=None) -> None:
    from planner.schema import Tier

    for tier in Tier:
        peak = est.peak_bytes.get(tier, 0)
        if tier != Tier.GPU and not peak:
            continue
        limit = None if budget is None else budget.limit(tier)
        of = f" of {format_bytes(limit)}" if limit is not None else ""
        extra = f", reserved {format_bytes(est.reserved_bytes)}" if tier == Tier.GPU else ""
        print(f"  {_TIERS_TEXT[tier.value]:<8} peak {format_bytes(peak)}{extra}{of}")
        if est.components.get(tier):
            print(f"           {_components(est.components[tier])}")
        if tier == Tier.GPU and est.highest_peak is not None:
            chunk, nbytes = est.highest_peak
            print(f"           chunk {chunk} allocates more at its peak: {format_bytes(nbytes)} (needs less: the "
                  f"GPU figures are chunk {est.worst_chunk}'s, by the least memory it needs)")
    parts = ", ".join(f"{k} {v:.3f}" for k, v in est.step_time_parts_s.items() if v)
    print(f"  step     {est.step_time_s:.3f} s predicted" + (f" ({parts})" if parts else ""))


def run_plan(args) -> int:
    with using_run_args(args):
        return _run_plan(args)


def _run_plan(args) -> int:
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.plan import make_plan, save_plan
    from planner.solve import Objective, solve_model
    from planner.fsio import check_output_file
    from planner.parallel_eval import resolve_jobs
    from planner.strategy import Budget

    check_shape_args(args)
    jobs = resolve_jobs(args.jobs)
    layout = _layout(args)
    check_output_file(args.output, "-o/--output", inputs=[args.model])
    node = _node(args, layout)
    hw = hardware(args.gpu_kind or (node.gpu if node is not None else DEFAULT_GPU_KIND))
    if args.gpu is None:
        from planner.evaluate import CUDA_CONTEXT_BYTES

        gpu_bytes = hw.gpu.memory_bytes - CUDA_CONTEXT_BYTES
    else:
        gpu_bytes = parse_bytes(args.gpu, what="GPU budget")
        if args.gpu_kind and gpu_bytes > hw.gpu.memory_bytes:  # both given: they must agree
            raise ChunkftError(f"--gpu {args.gpu} ({describe_size(gpu_bytes)}) is more than a {hw.gpu.name} has "
                               f"({describe_size(hw.gpu.memory_bytes)}); lower --gpu or pick a larger --gpu-kind")
    budget = Budget(gpu_bytes=gpu_bytes,
                    host_bytes=None if args.host_ram is None else parse_bytes(args.host_ram, what="host RAM budget"),
                    disk_bytes=None if args.disk is None else parse_bytes(args.disk, what="disk budget"))
    if node is not None:
        from planner.parallel import node_budget

        budget = node_budget(node, gpu_bytes, host_bytes=budget.host_bytes, disk_bytes=budget.disk_bytes)
    shape = step_shape(args)
    model = resolve_model(args.model)
    check_model_args(args, model)
    objective = Objective(args.objective)
    sharded = None
    if layout is None:
        solution = solve_model(model, shape, hw, budget, objective=objective, space=search_space(args, model),
                               chunk_traces=args.chunk_traces, jobs=jobs)
    else:
        import dataclasses

        from planner.parallel import per_rank_budget, solve_layouts

        pinned = args.chunks is not None or args.max_chunks is not None
        layouts = [dataclasses.replace(layout, shard_embeddings=e) for e in
                   ((False, True) if args.shard_embeddings is None else (args.shard_embeddings,))]
        solution, sharded, layout = solve_layouts(model, shape, hw, budget, layouts, objective=objective,
                                                  space=search_space(args, model), chunk_traces=args.chunk_traces,
                                                  extend_chunks=not pinned, jobs=jobs)
    print(f"model     {model.name}, {shape.seq_len} tokens x batch {shape.batch}, {shape.dtype}; "
          f"times for {hw.gpu.name}")
    if layout is not None:
        print(f"GPUs      {layout.gpus_per_node} per node x {layout.nodes} node{'s' if layout.nodes > 1 else ''} "
              f"(FSDP2{', embeddings sharded apart' if layout.shard_embeddings else ''}); batch {shape.batch} "
              f"per GPU, {shape.batch * layout.world_size} in all; figures below are per GPU")
        if node is not None:
            print(f"node      {node.describe()}")
        rank = per_rank_budget(budget, layout)
        share = "" if rank == budget else f" (per rank: {_budget_line(rank)})"
        print(f"budget    {_budget_line(budget)}{share}")
    else:
        print(f"budget    {_budget_line(budget)}")
    print(f"objective {objective.describe()}")
    searched = (f"searched {len(solution.estimates)} of {solution.space_size} strategies "
                f"({solution.pruned} skipped by proven rules)")
    if not solution.fits:
        from planner.schema import Tier

        print("INFEASIBLE: no strategy in the space fits every tier")
        closest = solution.closest
        print(f"closest   {closest.strategy.label()}")
        for tier, missing in solution.missing_bytes.items():
            print(f"  {_TIERS_TEXT[tier.value]} short by {format_bytes(missing)} "
                  f"(needs {format_bytes(closest.need_bytes(tier))}, budget {format_bytes(budget.limit(tier))})")
        for tier, need in solution.needed_bytes.items():
            others = " and ".join(_TIERS_TEXT[t.value] for t in Tier if t != tier and budget.limit(t) is not None)
            keep = f" with this {others}" if others else ""
            if need is None:
                print(f"  no {_TIERS_TEXT[tier.value]} budget suffices{keep}")
            else:
                print(f"  smallest {_TIERS_TEXT[tier.value]} budget that works{keep}: {describe_size(need)}")
        print(searched)
        return 1
    best = solution.best
    if layout is None:
        plan = make_plan(model, shape, hw, budget, objective, best, chunk_traces=args.chunk_traces)
    else:
        plan = make_plan(model, shape, hw, budget, objective, best, parallel=layout, sharded=sharded[best.strategy],
                         chunk_traces=args.chunk_traces)
    save_plan(plan, args.output)
    print(f"plan      {best.strategy.label()}")
    print_estimate(best, None if layout is None else per_rank_budget(budget, layout))
    if layout is not None:
        c = plan.communication
        print(f"  comm     all-gather {format_bytes(int(c['all_gather_bytes']))}, reduce-scatter "
              f"{format_bytes(int(c['reduce_scatter_bytes']))}, all-reduce {format_bytes(int(c['all_reduce_bytes']))} "
              f"per step: {c['comm_time_s']:.3f} s at "
              f"{c['interconnect_Bps'] / 1e9:.0f} GB/s before overlap with compute")
    print(searched)
    if objective == Objective.FIDELITY:
        print("(--objective speed, the default, puts the predicted step time before the chunk count)")
    elif layout is None:  # the fidelity answer is cheap (its chunk levels prune): show it when it differs
        other = solve_model(model, shape, hw, budget, objective=Objective.FIDELITY, space=search_space(args, model),
                            chunk_traces=args.chunk_traces, jobs=jobs).best
        if other is not None and other.strategy != best.strategy:
            print(f"fewest chunks that fits (--objective fidelity): {other.strategy.label()}, "
                  f"{other.step_time_s:.3f} s per step")
    print(f"wrote {args.output}")
    return 0


def run_simulate(args) -> int:
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.plan import load_plan
    from planner.schema import Tier
    from planner.fsio import check_output_file
    from planner.simulate import check_chunk, simulate

    check_output_file(args.output, "-o/--output", inputs=[args.plan, args.model])
    plan = load_plan(args.plan)
    check_chunk(plan, args.chunk)  # before the model is built
    model = resolve_model(args.model or plan.model_name)
    from planner.plan import check_plan_model

    check_plan_model(plan, model)
    hw = None
    if args.gpu_kind:
        hw = hardware(args.gpu_kind, **{f: getattr(plan.hardware, f) for f in
                                        ("host_bandwidth_Bps", "nvme_bandwidth_Bps", "mfu")})
    timeline = simulate(plan, model, hw=hw, chunk=args.chunk)
    timeline.write(args.output)
    h = timeline.header
    print(f"plan      {plan.strategy.label()} for {plan.model_name}")
    if plan.parallel is not None:
        p = plan.parallel
        print(f"GPUs      {p.gpus_per_node} per node x {p.nodes} node{'s' if p.nodes > 1 else ''} "
              f"(FSDP2{', embeddings sharded apart' if p.shard_embeddings else ''}); the timeline is rank "
              f"{h['parallel']['rank']}'s, the one the plan's per-GPU figures are for")
    print(f"events    {len(timeline.events)} ({timeline.scope()})")
    for tier in Tier:
        peak = timeline.peak_bytes(tier)
        if peak or tier == Tier.GPU:
            fullest = " for the fullest rank" if plan.parallel is not None and tier != Tier.GPU else ""
            print(f"  {_TIERS_TEXT[tier.value]:<8} peak {format_bytes(peak)} "
                  f"(plan predicted {format_bytes(plan.peak_bytes.get(tier, 0))}{fullest})")
    gpu_events = [e for e in timeline.events if e.tier == Tier.GPU]
    if gpu_events:
        print(f"  reserved {format_bytes(max(e.reserved for e in gpu_events))} "
              f"(plan predicted {format_bytes(plan.reserved_bytes)})")
    print(f"step      {h['step_time_s']:.3f} s predicted on {h['gpu']}")
    print(f"wrote {args.output}")
    return 0
