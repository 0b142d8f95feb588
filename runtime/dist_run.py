"""`chunkft run PLAN --nproc G`: execute a parallel plan (planner.parallel) on G ranks.

The plan fixes the model, one rank's micro-batch (batch x sequence length, dtype), the
strategy (chunk table, state tier, update interval, prefetch, checkpointing, chunked loss) and
the FSDP2 layout (`shard_embeddings`); `runtime.distributed` runs it, one process per GPU
(nccl) or, without CUDA, per CPU rank (gloo). The data is read, tokenized, checked and packed
here once, before any process starts: step s trains on the global batch of
`batch x G x grad_accum` packed blocks that `runtime.data.PackedLoader` yields s-th, split
evenly across ranks and, on each rank, into micro-batches of the plan's batch.

Checkpoints go to OUT/step-N (N = steps trained): the consolidated HF weights, each rank's
optimizer-state file and trainer_state.json, written last (runtime.dist_checkpoint). OUT/run.json
records what the run was (plan, data, tokenizer and seed fingerprints, world size): `--resume`
continues from the newest complete OUT/step-N only when they match. OUT/ranks.json has each
rank's losses and measured memory beside the plan's per-rank prediction.

`chunkft run` spawns the G ranks of one node itself. Under torchrun (several nodes, or any
launcher that sets torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), every rank runs
the same command with `--launcher torchrun`:

    torchrun --nnodes 2 --nproc-per-node 8 ... -m planner.cli run plan.json --data d.jsonl --launcher torchrun

Each rank then reads and packs the data itself (the same bytes everywhere) and rank 0 writes
run.json and ranks.json; OUT must be a directory every node sees (checkpoints are written by
every rank into it).

`--trace traces/NAME.jsonl` writes one memory trace per rank, traces/NAME.rank{r}.jsonl
(runtime.memtrace.rank_trace_path), in the one-GPU trace's schema (`chunkft compare TIMELINE
traces/NAME.rank0.jsonl` loads it) for the first `--trace-steps` steps; each header adds the
rank, world size and layout to the plan and model fingerprints, strategy and shape
(runtime.rank_train's docstring lists the events and tiers).

Known limitations: every step's token ids are materialised up front (steps x global batch x sequence length
int64s); no periodic eval loss (`--eval` is refused); the per-rank traces are not merged (compare
each rank's file on its own).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from planner.errors import ChunkftError

if TYPE_CHECKING:
    from planner.model import ModelSpec
    from planner.plan import Plan
    from runtime.dist_config import DistConfig

RUN_FILE = "run.json"
RANKS_FILE = "ranks.json"


def check_parallel_args(args, plan: "Plan") -> int:
    """The world size to start (one-line ChunkftError for what does not go with a parallel plan)."""
    nproc = args.nproc
    if plan.parallel is None and args.launcher == "torchrun":
        raise ChunkftError("--launcher torchrun runs a parallel plan; this plan is for one GPU "
                           "(make one with `chunkft plan MODEL --gpus-per-node G`)")
    if plan.parallel is None:
        if nproc not in (None, 1):
            raise ChunkftError(f"--nproc {nproc}: the plan is for one GPU; make a plan for {nproc} with "
                               f"`chunkft plan MODEL --gpus-per-node {nproc}`")
        return 1
    layout = plan.parallel
    plan.strategy.recipe.require_sharded_modelled()  # a parallel run executes chunkft's own recipe only
    if layout.nodes > 1 and args.launcher != "torchrun":
        raise ChunkftError(f"the plan spans {layout.nodes} nodes; `chunkft run` starts one node's ranks: run "
                           f"`torchrun --nnodes {layout.nodes} --nproc-per-node {layout.gpus_per_node} "
                           "-m planner.cli run PLAN ... --launcher torchrun` on every node")
    if nproc is not None and nproc != layout.world_size:
        raise ChunkftError(f"--nproc {nproc} does not match the plan's {layout.world_size} GPUs; "
                           f"leave --nproc out or make a plan with --gpus-per-node {nproc}")
    if args.eval is not None:
        raise ChunkftError("--eval is not supported for a parallel plan yet; leave it out "
                           f"(OUT/{RANKS_FILE} records each rank's losses)")
    return layout.world_size


def global_batches(loader, steps: int):
    """(ids, labels) of the loader's next `steps` batches, stacked: (steps, batch, seq)."""
    import torch

    pairs = [loader.next_batch() for _ in range(steps)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest OUT/step-N whose trainer_state.json (written last) is there."""
    from runtime.dist_checkpoint import STATE_FILE

    found = []
    for d in out.glob("step-*"):
        n = d.name.removeprefix("step-")
        if n.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(n), d))
    return max(found) if found else None


def dist_config(plan: "Plan", spec: "ModelSpec", args, *, ids, labels, device: str, out: Path,
                resume_from: Path | None) -> "DistConfig":
    """The DistConfig that runs `plan` with the command line's hyper-parameters."""
    from runtime.dist_config import DistConfig
    from runtime.run_cli import trainer_adamw, trainer_schedule

    s = plan.strategy
    init = None
    if spec.source == "directory" and any(Path(spec.name).glob("*.safetensors")):
        init = spec.name
    every = args.checkpoint_every
    save_at = tuple((k, str(out / f"step-{k}")) for k in range(every, args.steps, every)) if every else ()
    return DistConfig(
        model_config=spec.config.to_dict(), batches=ids, labels=labels, micro_batch_size=plan.shape.batch,
        seed=args.seed, dtype=plan.shape.dtype,
        adamw=trainer_adamw(args), schedule=trainer_schedule(args),
        chunk_table=plan.chunk_table.to_json(), state_tier=s.state_tier.value, prefetch_depth=s.prefetch_depth,
        state_dir=str(out / "optimizer-state") if s.state_tier.value == "disk" else None,
        update_interval=s.update_interval, checkpointing=s.checkpointing, loss_chunk_tokens=s.loss_chunk_tokens,
        loop=s.recipe.loop.value,
        shard_embeddings=plan.parallel.shard_embeddings, init_from=init, save_at=save_at,
        out_dir=str(out / f"step-{args.steps}"), resume_from=None if resume_from is None else str(resume_from),
        # a CPU run measures its last step's C-heap rise per rank (planner.measure)
        measure_step=args.steps - 1 if device == "cpu" else None, device=device,
        trace_path=None if args.trace is None else str(args.trace), trace_steps=args.trace_steps or None,
        trace_header=trace_header(plan))


def trace_header(plan: "Plan") -> dict:
    """What every rank's trace header says of the run (rank and world size are added per rank)."""
    return {"model_fingerprint": plan.model_fingerprint, "plan_fingerprint": plan.fingerprint(),
            "layout": plan.parallel.to_json(), "strategy": plan.strategy.to_json(),
            "shape": {"batch": plan.shape.batch, "seq_len": plan.shape.seq_len, "dtype": plan.shape.dtype}}


def run_parallel(args, plan: "Plan", spec: "ModelSpec", world: int) -> int:
    import torch

    from planner.fsio import atomic_write_json, read_json
    from runtime.checkpoint import check_writable
    from runtime.data import PackedLoader, load_tokenizer, padding_id, read_examples
    from runtime.distributed import run_distributed
    from runtime.outdir import check_same_arguments, parse_allow_changed, run_arguments
    from runtime.run_cli import check_args, data_fingerprint

    check_args(args)
    cuda = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    if cuda and args.launcher == "spawn" and torch.cuda.device_count() < world:
        raise ChunkftError(f"the plan needs {world} GPUs; this machine has {torch.cuda.device_count()} "
                           "(valid: --device cpu to run the ranks on the CPU with gloo)")
    device = "cuda" if cuda else "cpu"
    if args.gpu_memory_cap is not None:
        raise ChunkftError("--gpu-memory-cap caps this process only, not the ranks of a parallel run; leave it out")
    torchrun = args.launcher == "torchrun"
    rank = int(_torchrun_env("RANK")) if torchrun else 0
    out = check_writable(args.out)
    if args.trace is not None:
        check_writable(Path(args.trace).parent if str(Path(args.trace).parent) else ".")
    tok = load_tokenizer(args.tokenizer, model_vocab_size=spec.config.vocab_size)
    examples = read_examples(args.data, tok)
    rows = plan.shape.batch * world * args.grad_accum
    loader = PackedLoader(examples, seq_len=plan.shape.seq_len, batch_size=rows, seed=args.seed,
                          pad_token_id=padding_id(tok))
    ids, labels = global_batches(loader, args.steps)
    run_state = {"model_fingerprint": plan.model_fingerprint, "plan_fingerprint": plan.fingerprint(),
                 "data_fingerprint": data_fingerprint(examples, plan.shape.seq_len, tok.name, args.seed),
                 "tokenizer": tok.name, "seed": args.seed, "world_size": world, "global_batch": rows}
    arguments = run_arguments(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    resume_from = None
    if not args.resume and latest_checkpoint(out) is not None:
        if not args.overwrite:
            raise ChunkftError(f"output directory {str(out)!r} already holds a run's checkpoints; pass --resume to "
                               f"continue it, --overwrite to delete them and start again, or choose another --out")
        import shutil

        for old in out.glob("step-*"):  # every rank of a torchrun launch may get here: tolerate the others
            shutil.rmtree(old, ignore_errors=True)
    if args.resume:
        found = latest_checkpoint(out)
        if found is None:
            say(f"no checkpoint in {out}; starting from step 0")
        else:
            saved = read_json(out / RUN_FILE, what="run record")
            differs = [k for k, v in run_state.items() if saved.get(k) != v]
            if differs:
                raise ChunkftError(f"the checkpoint in {str(out)!r} is of another run ({differs[0]} differs); "
                                   "resume with the same plan, data, tokenizer and seed, or use a new --out")
            check_same_arguments(arguments, saved.get("args"), where=f"the run in {str(out)!r}",
                                 allow=parse_allow_changed(args.allow_changed))
            resume_from = found[1]
            say(f"resuming from step {found[0]} ({resume_from})")
    if rank == 0:
        atomic_write_json(out / RUN_FILE, {**run_state, "args": arguments})
    config = dist_config(plan, spec, args, ids=ids, labels=labels, device=device, out=out, resume_from=resume_from)
    s = plan.strategy
    say(f"training {spec.name} on {world} {'GPUs' if cuda else 'CPU ranks (gloo)'} with FSDP2 "
        f"({plan.shape.dtype}, {rows} x {plan.shape.seq_len} tokens per step) with {s.chunks} "
        f"chunk{'s' if s.chunks != 1 else ''}, state on {s.state_tier.value}, for {args.steps} steps")
    results = run_torchrun_rank(config, world) if torchrun else run_distributed(config, world)
    if results is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return 0
    losses = results[0].losses
    atomic_write_json(out / RANKS_FILE, ranks_report(results, plan))
    if losses:
        print(f"done: step {results[0].start_step + len(losses)}, last loss {losses[-1]:.4f}")
    for r in results:
        if r.peak_bytes is not None:
            print(f"  rank {r.rank}: step {config.measure_step + 1} raised the C heap by {r.peak_bytes / 2**20:.1f} MiB")
    print(f"checkpoint: {out}/step-{args.steps}; per-rank report: {out / RANKS_FILE}")
    if args.trace is not None:
        from runtime.memtrace import rank_trace_path

        print(f"traces: {', '.join(rank_trace_path(args.trace, r.rank) for r in results)}")
    return 0


def _torchrun_env(name: str) -> str:
    import os

    if name not in os.environ:
        raise ChunkftError(f"--launcher torchrun: {name} is not set; start the command with torchrun, e.g. "
                           "`torchrun --nproc-per-node 2 -m planner.cli run plan.json --data d.jsonl --launcher torchrun`")
    return os.environ[name]


def run_torchrun_rank(config: "DistConfig", world: int):
    """This process is one rank of a torchrun launch: join, train, and gather every rank's
    RankResult on rank 0 (None on the others)."""
    import torch.distributed as dist

    from runtime.dist_config import RankResult
    from runtime.process_group import init_process_group, shutdown_process_group
    from runtime.rank_train import train_rank

    launched = int(_torchrun_env("WORLD_SIZE"))
    if launched != world:
        raise ChunkftError(f"torchrun started {launched} ranks but the plan is for {world} GPUs")
    init_process_group(rank=int(_torchrun_env("RANK")), world_size=world, init_method="env://", device=config.device)
    try:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, dataclasses.asdict(train_rank(config)))
        rank = dist.get_rank()
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        shutdown_process_group()
    if rank != 0:
        return None
    out = []
    for d in gathered:
        d["losses"], d["grad_norms"] = tuple(d["losses"]), tuple(d["grad_norms"])
        out.append(RankResult(**d))
    return out


def ranks_report(results, plan: "Plan") -> dict:
    """Per rank: losses, measured memory and state bytes, next to the plan's per-rank prediction."""
    from planner.schema import Tier

    return {
        "plan_fingerprint": plan.fingerprint(),
        "predicted": {"gpu_peak_bytes": plan.peak_bytes.get(Tier.GPU, 0), "reserved_bytes": plan.reserved_bytes,
                      "host_bytes": plan.peak_bytes.get(Tier.HOST, 0)},
        "ranks": [{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in results],
    }
