"""torchrun entry of runtime.distributed: one rank of a sharded (FSDP2) training run.

    torchrun --nproc-per-node 2 -m runtime.dist_worker --model-config cfg/config.json \
        --tokens batches.pt --out ckpt/ [--resume ckpt/] [--chunks 8] [--dtype bf16] [--device cuda]

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the process group joins through
them (init_method "env://"). `--tokens` is a tensor of token ids (steps, global batch, seq len)
saved with torch.save (read with weights_only=True); without it, `--steps`, `--global-batch` and
`--seq-len` make seeded random tokens (a smoke run). Rank 0 prints one line per step.
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
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--chunks", type=int, default=1)
    p.add_argument("--update-interval", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--loss-chunk-tokens", type=int, default=0)
    p.add_argument("--shard-embeddings", action="store_true")
    p.add_argument("--out", help="directory for the consolidated checkpoint after the last step")
    p.add_argument("--init-from", help="HF model directory whose weights to start from (default: random init)")
    p.add_argument("--resume", help="consolidated checkpoint directory to continue from")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per local rank)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import json
    import os

    import torch
    import torch.distributed as dist

    from runtime.distributed import DistConfig, init_process_group, train_rank

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
        config = DistConfig(model_config=model_config, batches=batches, seed=args.seed, dtype=args.dtype, lr=args.lr,
                            chunks=args.chunks, update_interval=args.update_interval, checkpointing=args.checkpointing,
                            loss_chunk_tokens=args.loss_chunk_tokens, shard_embeddings=args.shard_embeddings,
                            out_dir=args.out, init_from=args.init_from, resume_from=args.resume,
                            device=args.device)
        init_process_group(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                           init_method="env://", device=args.device)
        try:
            result = train_rank(config)
        finally:
            dist.destroy_process_group()
    except (ChunkftError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.rank == 0:
        for i, loss in enumerate(result.losses):
            print(f"step {result.start_step + i + 1}: loss {loss:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
