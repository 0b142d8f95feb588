"""Training on several processes with torch.distributed, FSDP2 (`fully_shard`) and sharded ChunkFT.

One rank per process. Every decoder layer is its own FSDP2 unit and the root (embeddings,
final norm, lm_head) is the last, as planner.sharding models it (runtime.dist_model): weights
and gradients in the training dtype are sharded along dim 0 across the ranks; a layer's full
weights exist only while it runs (all-gathered, then freed), and each layer's gradients are
reduce-scattered (averaged) right after its backward.

The optimizer is `runtime.sharded_optim.ShardedChunkAdamW`: it executes a ChunkFT chunk table
(`DistConfig.chunk_table`; None = one chunk of whole tensors, i.e. plain AdamW) with the plan's
state tier (gpu or host), update interval, prefetch depth, AdamW hyper-parameters, clipping and
LR schedule. Chunk k's whole-tensor spans train with requires_grad (FSDP2 reduce-scatters their
gradients); its sliced spans (tensors that straddle a chunk cut) keep requires_grad=False and
get sub-tensor gradients from runtime.subgrad -- one buffer the shape of the slice per rank,
all_reduced at the step -- so no dense gradient of a sliced tensor exists on any rank (a sliced
1-D norm weight falls back to its whole gradient). Each rank steps only its local rows of the
spans; masters and moments exist only for those (see that module, which also states the
memory a sliced span's gradient holds).

    results = run_distributed(DistConfig(model_config=cfg.to_dict(), batches=ids), world_size=2)

spawns `world_size` processes (gloo on CPU, nccl on CUDA) and returns one RankResult per rank;
a ChunkftError on the ranks (all ranks agree on it before raising, so none is left waiting in a
collective: runtime.process_group) comes back as a ChunkftError. `python -m runtime.dist_worker`
is the torchrun entry with the same worker. `run_single` is the one-process reference: the same
training with `runtime.chunk_optim.ChunkAdamW` (sub-tensor gradients) over the same table.

The run, in modules of one idea each:

  runtime.dist_config      DistConfig (one run, picklable into the ranks), RankResult,
                           check_config
  runtime.dist_model       the model of a run and its FSDP2 layout (shard_model,
                           ChunkedLossRoot, chunk tables)
  runtime.rank_train       one rank's training loop (train_rank): the global batch split over
                           ranks and micro-batches, loss weighting, fp16 scaling, its memory trace
  runtime.dist_checkpoint  consolidated HF weights, per-rank optimizer state, trainer_state.json
  runtime.process_group    process-group setup and teardown, errors agreed on by every rank

fp16 is trained with dynamic loss scaling (`runtime.scaler.LossScaler`, `DistConfig.loss_scaler`):
the ranks all_reduce the overflow flag of their span slices, so all skip the same steps and back
off alike; on CPU they skip exactly the steps one process skips. bf16 and fp32 need no scaler.

Known limitations: sharded and one-process runs agree to rounding, not bitwise (the ranks sum
their gradients in another order); a sliced norm weight gets its whole gradient; the sliced
spans' sub-tensor gradients were tested with FSDP2 on CPU (gloo) only (fp32 and fp16, with and
without `shard_embeddings` and activation checkpointing); the DISK state tier is single-process
only (refused here); no offloaded (host) optimizer step or gradient staging (runtime.offload) on
the sharded path; data is a tensor of token ids given in the config, not runtime.data's loader;
the CUDA/NCCL path is written but was tested only on CPU with gloo. The other modules' own
limitations are in their docstrings.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from planner.errors import ChunkftError
from runtime.dist_checkpoint import full_weights
from runtime.dist_config import DistConfig, RankResult, check_config
from runtime.dist_model import build_model, chunk_table_of
from runtime.process_group import init_process_group, shutdown_process_group
from runtime.rank_train import train_rank


def _spawned(rank: int, world_size: int, config: DistConfig, init_method: str, result_dir: str) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    init_process_group(rank=rank, world_size=world_size, init_method=init_method, device=config.device)
    try:
        out = dataclasses.asdict(train_rank(config))
    except ChunkftError as e:  # raised on every rank together (see agree_on_error)
        out = {"error": str(e)}
    finally:
        shutdown_process_group()
    torch.save(out, Path(result_dir) / f"rank{rank}.pt")


def run_distributed(config: DistConfig, world_size: int) -> list[RankResult]:
    """Spawn `world_size` processes that train `config` together; one RankResult per rank."""
    import torch.multiprocessing as mp

    check_config(config, world_size)
    with tempfile.TemporaryDirectory(prefix="chunkft-dist-") as tmp:
        init_method = f"file://{Path(tmp) / 'rendezvous'}"
        mp.spawn(_spawned, args=(world_size, config, init_method, tmp), nprocs=world_size, join=True)
        out = []
        for rank in range(world_size):
            d = torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=True)
            if "error" in d:
                raise ChunkftError(d["error"])
            d["losses"], d["grad_norms"], d["grad_bytes"] = tuple(d["losses"]), tuple(d["grad_norms"]), \
                tuple(d["grad_bytes"])
            out.append(RankResult(**d))
    return out


def run_single(config: DistConfig) -> tuple[list[float], torch.nn.Module]:
    """The same training in this process without sharding, with runtime.chunk_optim.ChunkAdamW
    (sub-tensor gradients) over the same chunk table, tier and hyper-parameters: the reference
    the ranks must match. Trains every step of `batches`, the whole global batch at once."""
    from planner.schema import Tier
    from planner.step import loop_forward
    from runtime.chunk_optim import ChunkAdamW
    from runtime.scaler import LossScaler

    model = build_model(config)
    if config.init_from:
        with torch.no_grad():
            for name, t in full_weights(model, Path(config.init_from)).items():
                model.get_parameter(name).copy_(t)
    scaler = LossScaler(config.loss_scaler) if config.dtype == "fp16" else None
    optimizer = ChunkAdamW(model, chunk_table_of(config, model), config=config.adamw, schedule=config.schedule,
                           update_interval=config.update_interval, state_tier=Tier(config.state_tier),
                           prefetch_depth=config.prefetch_depth, scaler=scaler, host_state_in_place=False)
    losses = []
    try:
        for step in range(config.batches.shape[0]):
            loss, held = loop_forward(model, config.batches[step], config.step_labels(step), loop=config.loop,
                                      loss_chunk_tokens=config.loss_chunk_tokens)
            optimizer.backward(loss)
            del held
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        optimizer.close()
    return losses, model
