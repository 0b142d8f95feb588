"""`chunkft run PLAN --nproc G`: execute a parallel plan (planner.parallel) on G ranks of one node.

The plan fixes the model, one rank's micro-batch (batch x sequence length, dtype), the
strategy (chunk table, state tier, update interval, prefetch, checkpointing, chunked loss) and
the FSDP2 layout (`shard_embeddings`); `runtime.distributed` runs it, one process per GPU
(nccl) or, without CUDA, per CPU rank (gloo). The data is read, tokenized, checked and packed
here once, before any process starts: step s trains on the global batch of
`batch x G x grad_accum` packed blocks that `runtime.data.PackedLoader` yields s-th, split
evenly across ranks and, on each rank, into micro-batches of the plan's batch.

Checkpoints go to OUT/step-N (N = steps trained): the consolidated HF weights, each rank's
optimizer-state file and trainer_state.json, written last (runtime.distributed). OUT/run.json
records what the run was (plan, data, tokenizer and seed fingerprints, world size): `--resume`
continues from the newest complete OUT/step-N only when they match. OUT/ranks.json has each
rank's losses and measured memory beside the plan's per-rank prediction.

Known limitations: one node (several nodes start `torchrun -m runtime.dist_worker` on each);
every step's token ids are materialised up front (steps x global batch x sequence length
int64s); no periodic eval loss (`--eval` is refused) and no per-op memory trace (`--trace` is
refused): ranks.json has the per-rank peaks instead.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from planner.errors import ChunkftError

if TYPE_CHECKING:
    from planner.model import ModelSpec
    from planner.plan import Plan
    from runtime.distributed import DistConfig

RUN_FILE = "run.json"
RANKS_FILE = "ranks.json"


def check_parallel_args(args, plan: "Plan") -> int:
    """The world size to start (one-line ChunkftError for what does not go with a parallel plan)."""
    nproc = args.nproc
    if plan.parallel is None:
        if nproc not in (None, 1):
            raise ChunkftError(f"--nproc {nproc}: the plan is for one GPU; make a plan for {nproc} with "
                               f"`chunkft plan MODEL --gpus-per-node {nproc}`")
        return 1
    layout = plan.parallel
    if layout.nodes > 1:
        raise ChunkftError(f"the plan spans {layout.nodes} nodes; `chunkft run` starts one node's ranks: run "
                           f"`torchrun --nnodes {layout.nodes} --nproc-per-node {layout.gpus_per_node} "
                           "-m runtime.dist_worker` on every node")
    if nproc is not None and nproc != layout.world_size:
        raise ChunkftError(f"--nproc {nproc} does not match the plan's {layout.world_size} GPUs; "
                           f"leave --nproc out or make a plan with --gpus-per-node {nproc}")
    for flag, value in (("--eval", args.eval), ("--trace", args.trace)):
        if value is not None:
            raise ChunkftError(f"{flag} is not supported for a parallel plan yet; leave it out "
                               f"(OUT/{RANKS_FILE} records each rank's measured peak)")
    return layout.world_size


def global_batches(loader, steps: int, rows: int):
    """(ids, labels) of `steps` global batches of `rows` packed blocks, stacked: (steps, rows, seq)."""
    import torch

    loader.batch_size = rows
    pairs = [loader.next_batch() for _ in range(steps)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest OUT/step-N whose trainer_state.json (written last) is there."""
    from runtime.distributed import STATE_FILE

    found = []
    for d in out.glob("step-*"):
        n = d.name.removeprefix("step-")
        if n.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(n), d))
    return max(found) if found else None


def dist_config(plan: "Plan", spec: "ModelSpec", args, *, ids, labels, device: str, out: Path,
                resume_from: Path | None) -> "DistConfig":
    """The DistConfig that runs `plan` with the command line's hyper-parameters."""
    from runtime.chunk_optim import AdamWConfig, LRSchedule
    from runtime.distributed import DistConfig

    s = plan.strategy
    init = None
    if spec.source == "directory" and any(Path(spec.name).glob("*.safetensors")):
        init = spec.name
    every = args.checkpoint_every
    save_at = tuple((k, str(out / f"step-{k}")) for k in range(every, args.steps, every)) if every else ()
    return DistConfig(
        model_config=spec.config.to_dict(), batches=ids, labels=labels, micro_batch_size=plan.shape.batch,
        seed=args.seed, dtype=plan.shape.dtype,
        adamw=AdamWConfig(lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None),
        schedule=LRSchedule(kind=args.schedule, warmup_steps=args.warmup_steps, total_steps=args.steps),
        chunk_table=plan.chunk_table.to_json(), state_tier=s.state_tier.value, prefetch_depth=s.prefetch_depth,
        update_interval=s.update_interval, checkpointing=s.checkpointing, loss_chunk_tokens=s.loss_chunk_tokens,
        shard_embeddings=plan.parallel.shard_embeddings, init_from=init, save_at=save_at,
        out_dir=str(out / f"step-{args.steps}"), resume_from=None if resume_from is None else str(resume_from),
        # a CPU run measures its last step's C-heap rise per rank (planner.measure)
        measure_step=args.steps - 1 if device == "cpu" else None, device=device)


def run_parallel(args, plan: "Plan", spec: "ModelSpec", world: int) -> int:
    import torch

    from planner.fsio import atomic_write_json, read_json
    from runtime.checkpoint import check_writable
    from runtime.data import PackedLoader, load_tokenizer, padding_id, read_examples
    from runtime.distributed import run_distributed
    from runtime.run_cli import cap_gpu_memory, check_args, data_fingerprint

    check_args(args)
    cuda = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    if cuda and torch.cuda.device_count() < world:
        raise ChunkftError(f"the plan needs {world} GPUs; this machine has {torch.cuda.device_count()} "
                           "(valid: --device cpu to run the ranks on the CPU with gloo)")
    device = "cuda" if cuda else "cpu"
    if args.gpu_memory_cap is not None:
        cap_gpu_memory(args.gpu_memory_cap, torch.device(device))
    if args.gpu_memory_cap is not None and world > 1:
        raise ChunkftError("--gpu-memory-cap is applied in this process only; a parallel run cannot cap its ranks yet")
    out = check_writable(args.out)
    tok = load_tokenizer(args.tokenizer, model_vocab_size=spec.config.vocab_size)
    examples = read_examples(args.data, tok)
    loader = PackedLoader(examples, seq_len=plan.shape.seq_len, batch_size=1, seed=args.seed,
                          pad_token_id=padding_id(tok))
    rows = plan.shape.batch * world * args.grad_accum
    ids, labels = global_batches(loader, args.steps, rows)
    run_state = {"model_fingerprint": plan.model_fingerprint, "plan_fingerprint": plan.fingerprint(),
                 "data_fingerprint": data_fingerprint(examples, plan.shape.seq_len, tok.name, args.seed),
                 "tokenizer": tok.name, "seed": args.seed, "world_size": world, "global_batch": rows}
    resume_from = None
    if args.resume:
        found = latest_checkpoint(out)
        if found is None:
            print(f"no checkpoint in {out}; starting from step 0")
        else:
            saved = read_json(out / RUN_FILE, what="run record")
            differs = [k for k, v in run_state.items() if saved.get(k) != v]
            if differs:
                raise ChunkftError(f"the checkpoint in {str(out)!r} is of another run ({differs[0]} differs); "
                                   "resume with the same plan, data, tokenizer and seed, or use a new --out")
            resume_from = found[1]
            print(f"resuming from step {found[0]} ({resume_from})")
    atomic_write_json(out / RUN_FILE, run_state)
    config = dist_config(plan, spec, args, ids=ids, labels=labels, device=device, out=out, resume_from=resume_from)
    s = plan.strategy
    print(f"training {spec.name} on {world} {'GPUs' if cuda else 'CPU ranks (gloo)'} with FSDP2 "
          f"({plan.shape.dtype}, {rows} x {plan.shape.seq_len} tokens per step) with {s.chunks} "
          f"chunk{'s' if s.chunks != 1 else ''}, state on {s.state_tier.value}, for {args.steps} steps")
    results = run_distributed(config, world)
    losses = results[0].losses
    atomic_write_json(out / RANKS_FILE, ranks_report(results, plan))
    if losses:
        print(f"done: step {results[0].start_step + len(losses)}, last loss {losses[-1]:.4f}")
    for r in results:
        if r.peak_bytes is not None:
            print(f"  rank {r.rank}: step {config.measure_step + 1} raised the C heap by {r.peak_bytes / 2**20:.1f} MiB")
    print(f"checkpoint: {out}/step-{args.steps}; per-rank report: {out / RANKS_FILE}")
    return 0


def ranks_report(results, plan: "Plan") -> dict:
    """Per rank: losses, measured memory and state bytes, next to the plan's per-rank prediction."""
    from planner.schema import Tier

    return {
        "plan_fingerprint": plan.fingerprint(),
        "predicted": {"gpu_peak_bytes": plan.peak_bytes.get(Tier.GPU, 0), "reserved_bytes": plan.reserved_bytes,
                      "host_bytes": plan.peak_bytes.get(Tier.HOST, 0)},
        "ranks": [{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in results],
    }
