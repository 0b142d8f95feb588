"""Training on several processes with torch.distributed and FSDP2 (`fully_shard`).

One rank per process. Every decoder layer is its own FSDP2 unit and the root (embeddings,
final norm, lm_head) is the last, as planner.sharding models it: 16-bit (or fp32) weights,
gradients and AdamW state are sharded along dim 0 across the ranks; a layer's full weights
exist only while it runs (all-gathered, then freed), and each layer's gradients are
reduce-scattered (averaged) right after its backward. The global batch of a step is split
evenly across ranks; every rank computes `planner.step.step_loss` on its slice, so with the
same number of tokens per rank the averaged gradient equals the one-process gradient of the
whole batch.

    results = run_distributed(DistConfig(model_config=cfg.to_dict(), batches=ids), world_size=2)

spawns `world_size` processes (gloo on CPU, nccl on CUDA) and returns one RankResult per rank.
`python -m runtime.dist_worker` is the torchrun entry with the same worker.

Checkpoints are consolidated: `torch.distributed.checkpoint.state_dict.get_model_state_dict`
(full_state_dict, cpu_offload) gathers the weights to rank 0, which writes an HF directory
(config.json + model.safetensors) that `AutoModelForCausalLM.from_pretrained` loads, plus the
full optimizer state and the step for `resume`; resuming broadcasts both from rank 0.

ChunkFT sharded: `chunks > 1` trains whole-tensor chunks in turn (module order, byte-balanced
over whole parameters, `update_interval` steps each) by setting `requires_grad` per chunk on
the sharded parameters: frozen parameters get no gradient and no reduce-scatter. AdamW is plain
torch.optim.AdamW over the sharded parameters, so the moments of a chunk, once created, stay in
memory (sharded 1/G) while the chunk rests; ChunkAdamW's host/disk tiers and the sub-tensor
gradients of chunk cuts inside a tensor are single-process only.

Known limitations: one FSDP unit per decoder layer plus the root (no separate units for the
embeddings); no mixed-precision policy (weights, gradients and reduce in the training dtype);
data is a tensor of token ids given in the config, not runtime.data's loader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from planner.errors import ChunkftError

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistConfig:
    """One distributed run. Picklable: it crosses into spawned processes."""

    model_config: dict
    """The HF config as `PretrainedConfig.to_dict()` (model_type included)."""
    batches: torch.Tensor
    """Token ids, (steps, global_batch, seq_len): step s trains on batches[s]; labels = ids."""
    seed: int = 0
    """Seed of the weight initialisation (the same on every rank: identical starting weights)."""
    dtype: str = "fp32"
    lr: float = 1e-3
    weight_decay: float = 0.0
    chunks: int = 1
    """1 = full fine-tuning; > 1 = whole-tensor ChunkFT chunks trained in turn (module doc)."""
    update_interval: int = 1
    checkpointing: bool = False
    loss_chunk_tokens: int = 0
    out_dir: str | None = None
    """Where the consolidated checkpoint goes after the last step (None: not saved)."""
    init_from: str | None = None
    """An HF model directory (config + *.safetensors) whose weights replace the random ones (every
    rank first builds the whole model on CPU, then shards it: host RAM for one model per rank)."""
    stop_after: int | None = None
    """Stop (and save) after this many steps in all, of `batches` (None: train every batch)."""
    resume_from: str | None = None
    """A checkpoint directory of an earlier run to continue from (its step count is kept)."""
    measure_step: int | None = None
    """Measure this step's C-heap peak per rank (planner.measure.MallocSampler, CPU only)."""
    record_samples: bool = False
    """Keep the measured step's per-op samples (op name, bytes above baseline)."""
    shard_embeddings: bool = False
    """Input embedding and output head (final norm + lm_head) as FSDP units of their own."""
    device: str = "cpu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankResult:
    """What one rank reports after training."""

    rank: int
    world_size: int
    losses: tuple[float, ...]
    """Global loss of every step trained (the ranks' losses averaged: equal token counts)."""
    start_step: int
    peak_bytes: int | None = None
    """Measured C-heap peak of `measure_step` above the bytes in use before it."""
    baseline_bytes: int | None = None
    local_param_bytes: int = 0
    """Bytes of this rank's parameter shards."""
    samples: tuple = ()
    """(op name, bytes above baseline) after every op of the measured step, if recorded."""


def _torch_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise ChunkftError(f"invalid dtype {name!r}: valid dtypes are {', '.join(table)}")
    return table[name]


def build_model(config: DistConfig) -> torch.nn.Module:
    """The HF causal LM of `config`, randomly initialised from `config.seed` (not yet sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(config.model_config)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=_torch_dtype(config.dtype))
    model.train()
    if config.checkpointing:
        from planner.step import enable_checkpointing

        enable_checkpointing(model)
    return model


def shard_model(model: torch.nn.Module, *, shard_embeddings: bool = False) -> None:
    """fully_shard every decoder layer, then the root (the layout planner.sharding models);
    with `shard_embeddings` the input embedding and the output head (the modules of every other
    parameter: final norm, lm_head) become units of their own first."""
    from torch.distributed.fsdp import fully_shard

    from planner.model import find_layer_list

    found = find_layer_list(model)
    if found is None:
        raise ChunkftError(f"{type(model).__name__} has no decoder-layer list to shard")
    prefix, layers = found
    if shard_embeddings:
        embedding = model.get_input_embeddings()
        fully_shard(embedding)
        emb_params = {id(p) for p in embedding.parameters()}
        head = []
        for name, p in model.named_parameters():
            if name.startswith(prefix + ".") or id(p) in emb_params:
                continue
            module = model.get_submodule(name.rpartition(".")[0])
            if all(m is not module for m in head):
                head.append(module)
        if head:
            fully_shard(head)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def whole_tensor_chunks(model: torch.nn.Module, num_chunks: int) -> list[list[str]]:
    """Parameter names in module order cut into `num_chunks` groups of whole tensors, each
    closing once it holds its share of the bytes (every chunk at least one tensor)."""
    named = [(n, p.numel() * p.element_size()) for n, p in model.named_parameters()]
    if not 1 <= num_chunks <= len(named):
        raise ChunkftError(f"invalid chunk count {num_chunks}: must be 1..{len(named)} (whole tensors)")
    total = sum(b for _, b in named)
    chunks: list[list[str]] = [[] for _ in range(num_chunks)]
    done = 0
    k = 0
    for i, (name, nbytes) in enumerate(named):
        left_tensors = len(named) - i
        if chunks[k] and (done >= total * (k + 1) / num_chunks or left_tensors == num_chunks - k - 1):
            k += 1
        chunks[k].append(name)
        done += nbytes
    assert all(chunks), chunks
    return chunks


def _set_active_chunk(model: torch.nn.Module, chunks: list[list[str]], k: int) -> None:
    active = set(chunks[k])
    for name, p in model.named_parameters():
        p.requires_grad_(name in active)


def _global_mean(value: torch.Tensor) -> float:
    import torch.distributed as dist

    out = value.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return float(out) / dist.get_world_size()


def _train_step(model, optimizer, ids: torch.Tensor, config: DistConfig) -> torch.Tensor:
    from planner.step import step_loss

    optimizer.zero_grad(set_to_none=True)
    loss = step_loss(model, ids, ids, loss_chunk_tokens=config.loss_chunk_tokens)
    loss.backward()
    optimizer.step()
    return loss


def save_consolidated(model, optimizer, out_dir: str | os.PathLike, *, step: int) -> None:
    """Gather full weights (and optimizer state) to rank 0 and write an HF directory there."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tied = _tied_duplicates(model, weights)
        tensors = {k: v.contiguous() for k, v in weights.items() if k not in tied}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(out)
        torch.save(optim, out / OPTIMIZER_FILE)
        (out / STATE_FILE).write_text(json.dumps({"step": step}))
    dist.barrier()


def _tied_duplicates(model, weights: dict[str, torch.Tensor]) -> set[str]:
    """Names whose parameter is the same object as an earlier name's (tied embeddings)."""
    seen: dict[int, str] = {}
    dup = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and name in weights:
            dup.add(name)
        seen.setdefault(id(p), name)
    return dup


def _full_weights(model, path: Path) -> dict[str, torch.Tensor]:
    """Every parameter's full tensor from an HF directory's safetensors file(s), by name; a tied
    parameter saved once (lm_head tied to the embedding) is filled from its twin."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ChunkftError(f"no *.safetensors weights in {str(path)!r}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        twin = first.setdefault(id(p), name)
        if name not in weights and twin in weights:
            weights[name] = weights[twin]
    missing = [n for n, _ in model.named_parameters() if n not in weights]
    if missing:
        raise ChunkftError(f"weights in {str(path)!r} lack {len(missing)} parameters, e.g. {missing[0]!r}")
    return weights


def load_weights(model, path: str | os.PathLike) -> None:
    """Rank 0 reads an HF directory's weights and broadcasts them into the sharded model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(path)
    weights = _full_weights(model, path) if dist.get_rank() == 0 else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_consolidated(model, optimizer, path: str | os.PathLike) -> int:
    """Rank 0 reads a consolidated checkpoint and broadcasts it into the sharded model and
    optimizer; returns the step it was saved after."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(path)
    if not (path / OPTIMIZER_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise ChunkftError(f"no consolidated checkpoint in {str(path)!r} ({OPTIMIZER_FILE} or {STATE_FILE} missing)")
    load_weights(model, path)
    optim = torch.load(path / OPTIMIZER_FILE, weights_only=True) if dist.get_rank() == 0 else {}
    set_optimizer_state_dict(model, optimizer, optim,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def train_rank(config: DistConfig) -> RankResult:
    """Train on this rank (process group already initialised)."""
    import torch.distributed as dist

    from planner.measure import measure_malloc_peak

    rank, world = dist.get_rank(), dist.get_world_size()
    steps, global_batch, _ = config.batches.shape
    if global_batch % world:
        raise ChunkftError(f"global batch {global_batch} does not split over {world} ranks")
    local = global_batch // world
    model = build_model(config)
    shard_model(model, shard_embeddings=config.shard_embeddings)
    chunks = whole_tensor_chunks(model, config.chunks) if config.chunks > 1 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  foreach=False)
    if config.init_from and not config.resume_from:
        load_weights(model, config.init_from)
    start = load_consolidated(model, optimizer, config.resume_from) if config.resume_from else 0
    losses = []
    peak = baseline = None
    samples: tuple = ()
    end = steps if config.stop_after is None else min(steps, config.stop_after)
    for step in range(start, end):
        if chunks is not None:
            _set_active_chunk(model, chunks, (step // config.update_interval) % len(chunks))
        ids = config.batches[step, rank * local:(rank + 1) * local].to(config.device)
        if step == config.measure_step:
            optimizer.zero_grad(set_to_none=True)
            out: list[torch.Tensor] = []
            m = measure_malloc_peak(lambda: out.append(_train_step(model, optimizer, ids, config)),
                                    record_samples=config.record_samples)
            peak, baseline, samples = m.peak_bytes, m.baseline_bytes, m.samples
            loss = out[0]
        else:
            loss = _train_step(model, optimizer, ids, config)
        losses.append(_global_mean(loss))
    if config.out_dir is not None:
        save_consolidated(model, optimizer, config.out_dir, step=end)
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return RankResult(rank=rank, world_size=world, losses=tuple(losses), start_step=start, peak_bytes=peak,
                      baseline_bytes=baseline, local_param_bytes=local_bytes, samples=samples)


def init_process_group(*, rank: int, world_size: int, init_method: str, device: str) -> None:
    """gloo on CPU, nccl on CUDA (each rank on its own local GPU)."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def _spawned(rank: int, world_size: int, config: DistConfig, init_method: str, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the machine's cores
    init_process_group(rank=rank, world_size=world_size, init_method=init_method, device=config.device)
    try:
        result = train_rank(config)
    finally:
        dist.destroy_process_group()
    torch.save(dataclasses.asdict(result), Path(result_dir) / f"rank{rank}.pt")


def run_distributed(config: DistConfig, world_size: int) -> list[RankResult]:
    """Spawn `world_size` processes that train `config` together; one RankResult per rank."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ChunkftError(f"invalid world size {world_size}: must be >= 1")
    with tempfile.TemporaryDirectory(prefix="chunkft-dist-") as tmp:
        init_method = f"file://{Path(tmp) / 'rendezvous'}"
        mp.spawn(_spawned, args=(world_size, config, init_method, tmp), nprocs=world_size, join=True)
        out = []
        for rank in range(world_size):
            d = torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=True)
            d["losses"] = tuple(d["losses"])
            out.append(RankResult(**d))
    return out


def run_single(config: DistConfig) -> tuple[list[float], torch.nn.Module]:
    """The same training in this process without sharding: the reference the ranks must match."""
    from planner.step import step_loss

    model = build_model(config)
    if config.init_from:
        with torch.no_grad():
            for name, t in _full_weights(model, Path(config.init_from)).items():
                model.get_parameter(name).copy_(t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  foreach=False)
    chunks = whole_tensor_chunks(model, config.chunks) if config.chunks > 1 else None
    losses = []
    for step in range(config.batches.shape[0]):
        if chunks is not None:
            _set_active_chunk(model, chunks, (step // config.update_interval) % len(chunks))
        ids = config.batches[step]
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(model, ids, ids, loss_chunk_tokens=config.loss_chunk_tokens)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, model
