"""torchrun entry of runtime.distributed: one rank of a sharded (FSDP2) ChunkFT training run.

    torchrun --nproc-per-node 2 -m runtime.dist_worker --model-config cfg/config.json \
        --tokens batches.pt --out ckpt/ [--resume ckpt/] [--chunks 8 | --chunk-table table.json] \
        [--state host] [--update-interval 2] [--max-grad-norm 1.0] [--dtype bf16] [--device cuda]

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the process group joins through
them (init_method "env://"). `--tokens` is a tensor of token ids (steps, global batch, seq len)
saved with torch.save (read with weights_only=True; labels = the ids); without it, `--steps`,
`--global-batch` and `--seq-len` make seeded random tokens (a smoke run). `--chunks N` builds
the byte-balanced table of `planner.chunks.make_chunk_table_from_model` (cuts along dim 0);
`--chunk-table` reads a ChunkTable's JSON form (e.g. a plan's). Rank 0 prints one line per step.
"""

from __future__ import annotations

import argparse
import sys

from planner.errors import ChunkftError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.dist_worker", description=__doc__.splitlines()[0])
    p.add_argument("--model-config", required=True, help="HF config.json of the model (weights are initialised)")
    p.add_argument("--tokens", help="torch.save'd int tensor (steps, global_batch, seq_len)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, help="rows per forward/backward on a rank (default: all of them)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, help="clip the active chunk's gradients to this global L2 norm")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=0)
    chunks = p.add_mutually_exclusive_group()
    chunks.add_argument("--chunks", type=int, default=1, help="ChunkFT chunk count (1 = full fine-tuning)")
    chunks.add_argument("--chunk-table", help="JSON file of a ChunkTable (planner.chunks) to train")
    p.add_argument("--state", default="gpu", choices=["gpu", "host", "disk"],
                   help="where resting optimizer state lives")
    p.add_argument("--state-dir", help="disk state tier: the run's state directory (a folder per rank)")
    p.add_argument("--prefetch-depth", type=int, default=1)
    p.add_argument("--update-interval", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--loss-chunk-tokens", type=int, default=0)
    p.add_argument("--shard-embeddings", action="store_true")
    p.add_argument("--out", help="directory for the checkpoint after the last step")
    p.add_argument("--init-from", help="HF model directory whose weights to start from (default: random init)")
    p.add_argument("--resume", help="checkpoint directory to continue from (same world size)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per local rank)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import json
    import os

    import torch

    from planner.fsio import read_json
    from runtime.chunk_optim import AdamWConfig, LRSchedule
    from runtime.dist_config import DistConfig
    from runtime.dist_model import chunk_table_for
    from runtime.process_group import init_process_group, shutdown_process_group
    from runtime.rank_train import train_rank

    args = parse_args(argv)
    try:
        with open(args.model_config) as f:
            model_config = json.load(f)
        if args.tokens:
            batches = torch.load(args.tokens, weights_only=True)
        else:
            vocab = int(model_config["vocab_size"])
            batches = torch.randint(0, vocab, (args.steps, args.global_batch, args.seq_len),
                                    generator=torch.Generator().manual_seed(args.seed))
        if args.chunk_table:
            table = read_json(args.chunk_table, what="chunk table")
        else:
            table = chunk_table_for(model_config, args.chunks, dtype=args.dtype) if args.chunks > 1 else None
        schedule = LRSchedule(kind=args.schedule, warmup_steps=args.warmup_steps, total_steps=batches.shape[0])
        config = DistConfig(model_config=model_config, batches=batches, micro_batch_size=args.micro_batch_size,
                            seed=args.seed, dtype=args.dtype,
                            adamw=AdamWConfig(lr=args.lr, weight_decay=args.weight_decay,
                                              max_grad_norm=args.max_grad_norm),
                            schedule=schedule, chunk_table=table, state_tier=args.state,
                            prefetch_depth=args.prefetch_depth, update_interval=args.update_interval,
                            state_dir=args.state_dir, checkpointing=args.checkpointing,
                            loss_chunk_tokens=args.loss_chunk_tokens,
                            shard_embeddings=args.shard_embeddings, out_dir=args.out, init_from=args.init_from,
                            resume_from=args.resume, device=args.device)
        init_process_group(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                           init_method="env://", device=args.device)
        try:
            result = train_rank(config)
        finally:
            shutdown_process_group()
    except (ChunkftError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.rank == 0:
        for i, loss in enumerate(result.losses):
            print(f"step {result.start_step + i + 1}: loss {loss:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
