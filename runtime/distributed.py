"""Training on several processes with torch.distributed, FSDP2 (`fully_shard`) and sharded ChunkFT.

One rank per process. Every decoder layer is its own FSDP2 unit and the root (embeddings,
final norm, lm_head) is the last, as planner.sharding models it: weights and gradients in the
training dtype are sharded along dim 0 across the ranks; a layer's full weights exist only
while it runs (all-gathered, then freed), and each layer's gradients are reduce-scattered
(averaged) right after its backward. With a chunked loss (`loss_chunk_tokens`) the root is a
`ChunkedLossRoot` holding the model: `planner.step.step_loss` then calls the base model and the
head itself, and the root's hooks must run around the whole loss.

The optimizer is `runtime.sharded_optim.ShardedChunkAdamW`: it executes a ChunkFT chunk table
(`DistConfig.chunk_table`; None = one chunk of whole tensors, i.e. plain AdamW) with the plan's
state tier (gpu or host), update interval, prefetch depth, AdamW hyper-parameters, clipping and
LR schedule. Chunk k's whole-tensor spans train with requires_grad (FSDP2 reduce-scatters their
gradients); its sliced spans (tensors that straddle a chunk cut) keep requires_grad=False and
get sub-tensor gradients from runtime.subgrad -- one buffer the shape of the slice per rank,
all_reduced at the step -- so no dense gradient of a sliced tensor exists on any rank (a sliced
1-D norm weight falls back to its whole gradient). Each rank steps only its local rows of the
spans; masters and moments exist only for those (see that module, which also states the
memory a sliced span's gradient holds). With `record_grad_bytes`, `RankResult.grad_bytes`
reports, per step, the gradients each rank held after backward.

The global batch of a step (`batches[s]`, labels `labels[s]` or the ids, -100 = ignored) is
split evenly across ranks and each rank's part into micro-batches of `micro_batch_size` rows
(gradients accumulate; one optimizer step per global batch). Each micro-batch's mean loss
(`planner.step.step_loss`) is weighted by its share of the global batch's labelled tokens and
the optimizer multiplies FSDP2's average of the ranks' gradients by W, so the gradient is the
one-process gradient of the global batch's mean loss even when ranks hold different numbers of
labelled tokens, and every backward sees one-process gradient magnitudes (what an fp16 loss
scale has to fit).

    results = run_distributed(DistConfig(model_config=cfg.to_dict(), batches=ids), world_size=2)

spawns `world_size` processes (gloo on CPU, nccl on CUDA) and returns one RankResult per rank;
a ChunkftError on the ranks (all ranks agree on it before raising, so none is left waiting in a
collective) comes back as a ChunkftError. `python -m runtime.dist_worker` is the torchrun entry
with the same worker. `run_single` is the one-process reference: the same training with
`runtime.chunk_optim.ChunkAdamW` (sub-tensor gradients) over the same table.

fp16 is trained with dynamic loss scaling (`runtime.scaler.LossScaler`, `DistConfig.loss_scaler`):
the ranks all_reduce the overflow flag of their span slices, so all skip the same steps and back
off alike; on CPU they skip exactly the steps one process skips. bf16 and fp32 need no scaler.

Checkpoints (`save_checkpoint`, after the last step and the steps in `save_at`;
`load_checkpoint` = `read_checkpoint` + `restore_checkpoint`): the weights consolidated on rank
0 as an HF directory (`model.safetensors` + `config.json`, which
`AutoModelForCausalLM.from_pretrained` loads), each rank's optimizer state in its own
`optimizer-rank{r}-of-{W}.safetensors` (local slices of every chunk, counters in its header,
crc32-checked), and `trainer_state.json` (steps trained, world size, the fp16 loss scaler)
written last; every file atomically. Resuming needs the same world size and chunk table; a
resumed run equals the uninterrupted one bitwise on CPU.

Memory trace (`DistConfig.trace_path`): every rank writes its own runtime.memtrace trace,
`rank_trace_path(trace_path, rank)`, atomically at each checkpoint and at the end, in the
one-GPU trace's schema; its header adds `rank` and `world_size` to `trace_header` (the CLI puts
the plan and model fingerprints, the layout, strategy and shape there). Events: the phases of
each micro-batch (forward, backward), each decoder layer's start (forward, recompute, backward:
memtrace's module hooks on the sharded layers), the optimizer phase and step, the chunk switch
and the step end. The GPU tier is what the allocator says (CUDA on this rank's device; on CPU
the C heap above a reading taken before the model was built, and each traced step runs under
planner.measure's MallocSampler, so its STEP_END `peak` is the op-level peak, the step's rise
being that peak less the step's first event); its `bytes` are this rank's accounting: weight
shards, the gradients it holds (`ShardedChunkAdamW.grad_bytes`), the optimizer state on the
step device. The HOST tier is `ShardedChunkAdamW.state_bytes()["host"]` (resting state), split
into masters and moments (a third and two thirds: the three have one shape and dtype).

Known limitations: one FSDP unit per decoder layer plus the root (optionally the embedding and
the head as units of their own); no mixed-precision policy (weights, gradients and reduce in
the training dtype); sharded and one-process runs agree to rounding, not bitwise (the ranks
sum their gradients in another order); a sliced norm weight gets its whole gradient; the
sliced spans' sub-tensor gradients were tested with FSDP2 on CPU (gloo) only (fp32 and fp16,
with and without `shard_embeddings` and activation checkpointing); the DISK state tier is
single-process only (refused here); no offloaded (host) optimizer step or gradient staging
(runtime.offload) on the sharded path; data is a tensor of token ids given in the config, not
runtime.data's loader; every micro-batch must hold at least one labelled token; the CUDA/NCCL
path is written but was tested only on CPU with gloo; a traced step waits for the HOST
tier's prefetch at the chunk switch (the accounting reads `state_bytes()`, which does), so a
traced step's prefetch no longer overlaps its forward, and the trace's optimizer-state bytes are
refreshed at step boundaries only.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from planner.errors import ChunkftError
from planner.fsio import atomic_path, atomic_write_json, atomic_write_text
from runtime.chunk_optim import AdamWConfig, LRSchedule
from runtime.scaler import ScalerConfig

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
IGNORE_INDEX = -100
STATE_TIERS = ("gpu", "host")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistConfig:
    """One distributed run. Picklable: it crosses into spawned processes."""

    model_config: dict
    """The HF config as `PretrainedConfig.to_dict()` (model_type included)."""
    batches: torch.Tensor
    """Token ids, (steps, global_batch, seq_len): step s trains on batches[s]."""
    labels: torch.Tensor | None = None
    """Labels of the same shape as `batches` (-100 = ignored); None: the ids themselves."""
    micro_batch_size: int | None = None
    """Rows per forward/backward on a rank (gradients accumulate over the rank's global_batch / W
    rows, one optimizer step per step); None: all of the rank's rows at once."""
    seed: int = 0
    """Seed of the weight initialisation (the same on every rank: identical starting weights)."""
    dtype: str = "fp32"
    """Training dtype of weights, gradients and communication: bf16, fp16 or fp32."""
    adamw: AdamWConfig = AdamWConfig(lr=1e-3)
    """AdamW hyper-parameters, max_grad_norm included (clipping over the active chunk's spans)."""
    schedule: LRSchedule = LRSchedule()
    """LR multiplier by successful optimizer steps (runtime.chunk_optim.LRSchedule)."""
    loss_scaler: ScalerConfig = ScalerConfig()
    """fp16 only: the dynamic loss-scale policy."""
    chunk_table: dict | None = None
    """A planner.chunks.ChunkTable's JSON form (spans may slice a tensor along dim 0 or 1); None:
    one chunk of whole tensors (plain AdamW, full fine-tuning)."""
    state_tier: str = "gpu"
    """Where resting chunks' fp32 masters and moments live: "gpu" (the step device) or "host"."""
    prefetch_depth: int = 1
    """HOST tier: >= 1 copies the next chunk's state to the device while the current trains."""
    update_interval: int = 1
    """Successful optimizer steps on a chunk before the next one becomes active."""
    checkpointing: bool = False
    loss_chunk_tokens: int = 0
    loop: str = "chunkft"
    """The plan's recipe loop (planner.step.loop_forward): "chunkft" or the plain "hf" loop."""
    out_dir: str | None = None
    """Where the checkpoint goes after the last step (None: not saved)."""
    save_at: tuple[tuple[int, str], ...] = ()
    """(steps trained, directory) pairs: also save a checkpoint there once that many steps are done."""
    init_from: str | None = None
    """An HF model directory (config + *.safetensors) whose weights replace the random ones (rank 0
    reads them and broadcasts them into the shards; every rank first builds the whole model on
    CPU: host RAM for one model per rank)."""
    stop_after: int | None = None
    """Stop (and save) after this many steps in all, of `batches` (None: train every batch)."""
    resume_from: str | None = None
    """A checkpoint directory of an earlier run to continue from: same world size and chunk table;
    its step count, and the optimizer's hyper-parameters, schedule and update interval, are kept."""
    measure_step: int | None = None
    """Measure this step's C-heap peak per rank (planner.measure.MallocSampler, CPU only)."""
    record_samples: bool = False
    """Keep the measured step's per-op samples (op name, bytes above baseline)."""
    record_grad_bytes: bool = False
    """Keep every step's `ShardedChunkAdamW.grad_bytes()` (the gradients each rank holds after
    backward, by parameter) in RankResult.grad_bytes."""
    shard_embeddings: bool = False
    """Input embedding and output head (final norm + lm_head) as FSDP units of their own."""
    trace_path: str | None = None
    """Write a memory trace per rank to `runtime.memtrace.rank_trace_path(trace_path, rank)`
    (module docstring); None: no trace."""
    trace_steps: int | None = None
    """Trace steps 0..trace_steps-1 only (None: every step)."""
    trace_header: dict = dataclasses.field(default_factory=dict)
    """Header fields of every rank's trace; with a trace_path it must hold non-empty
    "model_fingerprint" and "plan_fingerprint" strings (what `chunkft compare` matches on)."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ChunkftError(f"invalid dtype {self.dtype!r}: valid dtypes are {', '.join(DTYPES)}")
        if self.state_tier not in STATE_TIERS:
            raise ChunkftError(f"state tier {self.state_tier!r} is not supported for sharded runs; "
                               f"valid: {', '.join(STATE_TIERS)}")
        if self.update_interval < 1:
            raise ChunkftError(f"invalid update interval {self.update_interval}: must be >= 1")
        if self.prefetch_depth < 0:
            raise ChunkftError(f"invalid prefetch depth {self.prefetch_depth}: must be >= 0")
        if self.batches.dim() != 3:
            raise ChunkftError(f"batches must be (steps, global_batch, seq_len), got shape {list(self.batches.shape)}")
        if self.labels is not None and self.labels.shape != self.batches.shape:
            raise ChunkftError(f"labels shape {list(self.labels.shape)} differs from batches "
                               f"{list(self.batches.shape)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ChunkftError(f"invalid micro-batch size {self.micro_batch_size}: must be >= 1")
        if self.trace_steps is not None and self.trace_steps < 1:
            raise ChunkftError(f"invalid trace_steps {self.trace_steps}: must be >= 1 (None: every step)")
        if self.trace_path is not None:
            for key in ("model_fingerprint", "plan_fingerprint"):
                if not isinstance(self.trace_header.get(key), str) or not self.trace_header[key]:
                    raise ChunkftError(f"trace_header lacks {key} (a non-empty string); a trace needs it")

    def step_labels(self, step: int) -> torch.Tensor:
        return self.batches[step] if self.labels is None else self.labels[step]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankResult:
    """What one rank reports after training."""

    rank: int
    world_size: int
    losses: tuple[float, ...]
    """Global loss of every step trained (mean over the global batch's labelled tokens)."""
    start_step: int
    grad_norms: tuple[float | None, ...] = ()
    """Global L2 norm of the active chunk's span gradients before clipping, per step trained
    (None where not clipping or the step was skipped)."""
    skipped_steps: int = 0
    """fp16: steps whose gradients overflowed (weights, chunk and schedule did not move)."""
    peak_bytes: int | None = None
    """Measured C-heap peak of `measure_step` above the bytes in use before it."""
    baseline_bytes: int | None = None
    local_param_bytes: int = 0
    """Bytes of this rank's parameter shards."""
    state_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    """This rank's optimizer-state bytes after training: "device" (GPU tier, or the active and
    prefetched chunks' working copies) and "host" (HOST tier's resting state)."""
    samples: tuple = ()
    """(op name, bytes above baseline) after every op of the measured step, if recorded."""
    grad_bytes: tuple = ()
    """With `record_grad_bytes`, per step trained, after its backward and before its optimizer
    step: `ShardedChunkAdamW.grad_bytes()` (the gradients this rank holds, by parameter)."""


def _labelled(labels: torch.Tensor) -> int:
    """Tokens that count in the causal-LM loss (the label of position t is labels[t + 1])."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def check_config(config: DistConfig, world_size: int) -> None:
    """ChunkftError (one line) for what a run of `config` on `world_size` ranks would fail on:
    every rank checks this too; run_distributed checks it before spawning."""
    if world_size < 1:
        raise ChunkftError(f"invalid world size {world_size}: must be >= 1")
    steps, global_batch, _ = config.batches.shape
    if global_batch % world_size:
        raise ChunkftError(f"global batch {global_batch} does not split over {world_size} ranks")
    local = global_batch // world_size
    micro = config.micro_batch_size or local
    if local % micro:
        raise ChunkftError(f"micro-batch size {micro} does not divide the {local} rows of a rank")
    for step in range(steps):
        labels = config.step_labels(step)
        for start in range(0, global_batch, micro):
            if _labelled(labels[start:start + micro]) == 0:
                raise ChunkftError(f"step {step}: rows {start}..{start + micro - 1} hold no labelled token "
                                   f"(all -100); every micro-batch needs one")
    if config.resume_from is not None:
        saved = read_trainer_state(config.resume_from)
        if saved["world_size"] != world_size:
            raise ChunkftError(f"checkpoint {config.resume_from!r} was saved by {saved['world_size']} ranks; "
                               f"this run has {world_size} (resume with the same world size)")


def build_model(config: DistConfig) -> torch.nn.Module:
    """The HF causal LM of `config`, randomly initialised from `config.seed` (not yet sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(config.model_config)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[config.dtype])
    model.train()
    if config.checkpointing:
        from planner.step import enable_checkpointing

        enable_checkpointing(model)
    return model


def chunk_table_for(model_config: dict, num_chunks: int, *, dtype: str = "fp32",
                    cut_dims: dict[str, int] | None = None) -> dict:
    """The JSON form of `planner.chunks.make_chunk_table_from_model` over the model of
    `model_config` (built on the meta device) in `dtype`: what `--chunks N` trains."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.chunks import make_chunk_table_from_model

    if dtype not in DTYPES:
        raise ChunkftError(f"invalid dtype {dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    cfg_dict = dict(model_config)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    return make_chunk_table_from_model(model, num_chunks, cut_dims=cut_dims).to_json()


class ChunkedLossRoot(torch.nn.Module):
    """FSDP2's root for a chunked loss: `planner.step.step_loss` then calls the base model and
    the output head itself, never `model.forward`, so the hooks of a root on the model (the
    all-gather of the parameters outside the decoder layers, the end-of-backward callback)
    would never run. Sharded as the root instead, this module's forward -- the whole loss --
    runs between them; it holds no parameters of its own."""

    def __init__(self, model: torch.nn.Module, loss_chunk_tokens: int):
        super().__init__()
        self.lm = model
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from planner.step import step_loss

        return step_loss(self.lm, input_ids, labels, loss_chunk_tokens=self.loss_chunk_tokens)


def shard_model(model: torch.nn.Module, *, shard_embeddings: bool = False, root: torch.nn.Module | None = None) -> None:
    """fully_shard every decoder layer, then the root (the layout planner.sharding models);
    with `shard_embeddings` the input embedding and the output head (the modules of every other
    parameter: final norm, lm_head) become units of their own first. `root` (a module holding
    `model`, e.g. a ChunkedLossRoot) is sharded as the root instead of `model`."""
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
    fully_shard(model if root is None else root)


def _table(config: DistConfig, model: torch.nn.Module):
    from planner.chunks import ChunkTable, make_chunk_table_from_model

    if config.chunk_table is None:
        return make_chunk_table_from_model(model, 1)
    return ChunkTable.from_json(config.chunk_table)


def _agree(error: str | None) -> None:
    """Raise on every rank the first rank's error, if any rank has one (all ranks must call
    this at the same point: a rank that raised alone would leave the others in a collective)."""
    import torch.distributed as dist

    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    for rank, e in enumerate(errors):
        if e is not None:
            raise ChunkftError(e if dist.get_world_size() == 1 else f"rank {rank}: {e}")


def _collective(fn: Callable[[], object]):
    """fn() on every rank; a ChunkftError on any rank is raised on all (see `_agree`)."""
    result, error = None, None
    try:
        result = fn()
    except ChunkftError as e:
        error = str(e)
    _agree(error)
    return result


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
    files = [f for f in files if not f.name.startswith("optimizer-")]
    if not files:
        raise ChunkftError(f"no *.safetensors weights in {str(path)!r}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error types
            raise ChunkftError(f"weights file {str(f)!r} is unreadable ({str(e).splitlines()[0]})") from None
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

    weights = _collective(lambda: _full_weights(model, Path(path)) if dist.get_rank() == 0 else {})
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def read_trainer_state(path: str | os.PathLike) -> dict:
    """A checkpoint's trainer_state.json: {"step", "world_size", "loss_scaler"}; ChunkftError if
    it is missing or malformed (it is written last: without it the checkpoint is incomplete)."""
    from planner.fsio import read_json

    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise ChunkftError(f"no complete checkpoint in {str(path)!r} ({STATE_FILE} missing)")
    state = read_json(file, what="trainer state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("world_size"), int):
        raise ChunkftError(f"{str(file)!r} is malformed: expected integer 'step' and 'world_size'")
    return state


def save_checkpoint(model, optimizer, out_dir: str | os.PathLike, *, step: int, scaler=None) -> None:
    """Consolidated HF weights on rank 0, each rank's optimizer state in its own file, then
    trainer_state.json (module docstring). Collective: every rank calls it."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from runtime.sharded_optim import save_state_file, state_file_name

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write() -> None:
        save_state_file(optimizer, out / state_file_name(rank, world))
        if rank == 0:
            tied = _tied_duplicates(model, weights)
            tensors = {k: v.contiguous() for k, v in weights.items() if k not in tied}
            try:
                with atomic_path(out / WEIGHTS_FILE) as tmp:
                    save_file(tensors, str(tmp), metadata={"format": "pt"})
            except OSError as e:
                raise ChunkftError(f"cannot write {str(out / WEIGHTS_FILE)!r}: {e.strerror or e}") from None
            atomic_write_text(out / "config.json", model.config.to_json_string(use_diff=True))

    _collective(write)
    del weights

    def finish() -> None:
        if rank == 0:
            atomic_write_json(out / STATE_FILE, {"step": step, "world_size": world,
                                                 "loss_scaler": scaler.state_dict() if scaler else None})

    _collective(finish)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(trainer state, this rank's optimizer tensors, their meta) of `save_checkpoint`'s
    directory, checked: complete, saved by this world size, the file intact. Collective (a
    ChunkftError on any rank is raised on all); train_rank reads before building the model."""
    import torch.distributed as dist

    from runtime.sharded_optim import read_state_file, state_file_name

    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(path)

    def read():
        state = read_trainer_state(path)
        if state["world_size"] != world:
            raise ChunkftError(f"checkpoint {str(path)!r} was saved by {state['world_size']} ranks; "
                               f"this run has {world} (resume with the same world size)")
        return (state, *read_state_file(path / state_file_name(rank, world)))

    return _collective(read)


def restore_checkpoint(model, optimizer, path: str | os.PathLike, saved: tuple[dict, dict, dict], *,
                       scaler=None) -> int:
    """Load `read_checkpoint(path)`'s result and the directory's weights into the sharded model,
    this rank's optimizer (same chunk table) and the fp16 scaler; returns the step it was saved
    after. Collective."""
    state, tensors, meta = saved
    load_weights(model, path)
    _collective(lambda: optimizer.check_state(tensors, meta))
    optimizer.load_state_dict(tensors, meta)
    if scaler is not None and state.get("loss_scaler") is not None:
        scaler.load_state_dict(state["loss_scaler"])
    return state["step"]


def load_checkpoint(model, optimizer, path: str | os.PathLike, *, scaler=None) -> int:
    """`read_checkpoint` then `restore_checkpoint`: the step the checkpoint was saved after."""
    return restore_checkpoint(model, optimizer, path, read_checkpoint(path), scaler=scaler)


class _RankTrace:
    """One rank's TraceWriter and the accounting behind its `bytes` (module docstring)."""

    def __init__(self, config: DistConfig, model, optimizer, rank: int, world: int,
                 cpu_baseline: int | None) -> None:
        from planner.model import find_layer_list
        from runtime.memtrace import TraceWriter, rank_trace_path

        self.optimizer = optimizer
        self.weights = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())
        self.refresh()
        header = dict(config.trace_header)
        model_fp, plan_fp = header.pop("model_fingerprint"), header.pop("plan_fingerprint")
        device = torch.device("cuda", torch.cuda.current_device()) if config.device.startswith("cuda") \
            else torch.device("cpu")
        self.writer = TraceWriter(rank_trace_path(config.trace_path, rank), device=device, accounting=self.accounting,
                                  model_fingerprint=model_fp, plan_fingerprint=plan_fp,
                                  extra_header={**header, "rank": rank, "world_size": world},
                                  cpu_baseline_bytes=cpu_baseline, max_steps=config.trace_steps)
        self.writer.attach(list(find_layer_list(model)[1]))

    def refresh(self) -> None:
        """Re-read the optimizer's state bytes (waits for a pending HOST prefetch)."""
        self.state = self.optimizer.state_bytes()

    def accounting(self):
        from planner.schema import Component, Tier

        held = self.optimizer.grad_bytes()
        dev, host = self.state["device"], self.state["host"]
        tiers = {Tier.GPU: {Component.WEIGHTS: self.weights,
                            Component.GRADIENTS: sum(held["shard"].values()) + sum(held["slice"].values()),
                            Component.MASTER: dev // 3, Component.OPTIMIZER: dev - dev // 3}}
        if host:
            tiers[Tier.HOST] = {Component.MASTER: host // 3, Component.OPTIMIZER: host - host // 3}
        return tiers

    def traced(self, step: int) -> bool:
        return self.writer.max_steps is None or step < self.writer.max_steps

    def event(self, kind, phase=None, *, name: str | None = None, peak: int | None = None) -> None:
        self.writer.chunk = self.optimizer.active_chunk
        self.writer.record(kind, phase=phase, name=name, peak=peak)

    def end_step(self, result, chunk_before: int, peak: int | None) -> None:
        """The optimizer step's, the chunk switch's and the step end's events (after the step)."""
        from planner.schema import EventKind, Phase

        self.refresh()
        self.event(EventKind.OPTIMIZER_STEP, name="step" if result.stepped else f"skipped ({result.skipped_because})")
        if self.optimizer.active_chunk != chunk_before:
            self.event(EventKind.CHUNK_SWITCH, Phase.CHUNK_SWITCH,
                       name=f"chunk {chunk_before} -> {self.optimizer.active_chunk}")
        self.event(EventKind.STEP_END, peak=peak)

    def close(self) -> None:
        self.writer.detach()
        self.writer.flush()


def _micro_steps(model, optimizer, config: DistConfig, step: int, rank: int, world: int, root=None,
                 trace: _RankTrace | None = None) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of `step` (the loss from `root`, a
    ChunkedLossRoot, where there is one); returns this rank's share of the global mean loss
    (the ranks' shares add up to it)."""
    from planner.schema import EventKind, Phase
    from planner.step import loop_forward

    ids_all, labels_all = config.batches[step], config.step_labels(step)
    total = _labelled(labels_all)
    local = ids_all.shape[0] // world
    micro = config.micro_batch_size or local
    share = torch.zeros((), dtype=torch.float64)
    for start in range(rank * local, (rank + 1) * local, micro):
        ids = ids_all[start:start + micro].to(config.device)
        labels = labels_all[start:start + micro].to(config.device)
        count = _labelled(labels)
        if trace is not None:
            trace.event(EventKind.PHASE, Phase.FORWARD)
        held = None  # the plain HF loop's output, alive through backward as in the user's loop
        loss = root(ids, labels) if root is not None else None
        if loss is None:
            loss, held = loop_forward(model, ids, labels, loop=config.loop)
        if trace is not None:
            trace.event(EventKind.PHASE, Phase.BACKWARD)
        # this micro-batch's share of the global mean; the optimizer multiplies FSDP2's average
        # of the ranks' gradients by W (grad_multiplier): their sum, the global gradient. The
        # backward then sees the one-process magnitudes (what an fp16 loss scale must fit)
        weight = count / total
        optimizer.backward(loss * weight)
        share += loss.detach().double().cpu() * (count / total)
        del loss, held
    return share


def _train_step(model, optimizer, config: DistConfig, step: int, rank: int, world: int, root=None,
                trace: _RankTrace | None = None):
    from planner.schema import EventKind, Phase

    share = _micro_steps(model, optimizer, config, step, rank, world, root, trace)
    held = optimizer.grad_bytes() if config.record_grad_bytes else None
    if trace is not None:
        trace.event(EventKind.PHASE, Phase.OPTIMIZER)
    return share, optimizer.step(), held


def _global_sum(value: torch.Tensor, device: str) -> float:
    import torch.distributed as dist

    out = value.detach().to(device=device, dtype=torch.float64 if device == "cpu" else torch.float32)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return float(out)


def train_rank(config: DistConfig) -> RankResult:
    """Train on this rank (process group already initialised)."""
    import torch.distributed as dist

    from planner.measure import measure_malloc_peak
    from planner.schema import Tier
    from runtime.scaler import LossScaler
    from runtime.sharded_optim import ShardedChunkAdamW

    rank, world = dist.get_rank(), dist.get_world_size()
    check_config(config, world)  # deterministic: every rank raises the same error, or none does
    saved = read_checkpoint(config.resume_from) if config.resume_from else None  # fail before building
    steps = config.batches.shape[0]
    cpu_baseline = None
    if config.trace_path is not None and not config.device.startswith("cuda"):
        from planner.measure import malloc_in_use_bytes

        cpu_baseline = malloc_in_use_bytes()  # the trace's zero: everything the rank adds from here counts
    model = build_model(config)
    table = _table(config, model)
    root = ChunkedLossRoot(model, config.loss_chunk_tokens) if config.loss_chunk_tokens > 0 else None
    shard_model(model, shard_embeddings=config.shard_embeddings, root=root)
    if config.init_from and not config.resume_from:
        load_weights(model, config.init_from)
    scaler = LossScaler(config.loss_scaler) if config.dtype == "fp16" else None
    optimizer = ShardedChunkAdamW(model, table, config=config.adamw, schedule=config.schedule,
                                  update_interval=config.update_interval, state_tier=Tier(config.state_tier),
                                  prefetch_depth=config.prefetch_depth, scaler=scaler, grad_multiplier=world)
    trace = None
    try:
        start = 0 if saved is None else restore_checkpoint(model, optimizer, config.resume_from, saved, scaler=scaler)
        # the command line's hyper-parameters and schedule (resume checked them against run.json)
        optimizer.config, optimizer.schedule = config.adamw, config.schedule
        if config.trace_path is not None:
            trace = _RankTrace(config, model, optimizer, rank, world, cpu_baseline)
        losses, norms, held = [], [], []
        skipped = 0
        peak = baseline = None
        samples: tuple = ()
        end = steps if config.stop_after is None else min(steps, config.stop_after)
        for step in range(start, end):
            traced = trace if trace is not None and trace.traced(step) else None
            chunk_before = optimizer.active_chunk
            step_peak = None  # the trace's STEP_END peak (CPU: the sampled op-level peak)
            if trace is not None:  # past trace_steps too: the layer hooks then record nothing
                trace.writer.step = step
            if step == config.measure_step or (traced is not None and cpu_baseline is not None):
                optimizer.zero_grad()
                out: list = []
                m = measure_malloc_peak(
                    lambda: out.append(_train_step(model, optimizer, config, step, rank, world, root, traced)),
                    record_samples=config.record_samples and step == config.measure_step)
                if step == config.measure_step:
                    peak, baseline, samples = m.peak_bytes, m.baseline_bytes, m.samples
                if traced is not None:
                    step_peak = m.peak_bytes + m.baseline_bytes - traced.writer.cpu_baseline_bytes
                share, result, grads = out[0]
            else:
                share, result, grads = _train_step(model, optimizer, config, step, rank, world, root, traced)
            if traced is not None:
                traced.end_step(result, chunk_before, step_peak)
            if grads is not None:
                held.append(grads)
            skipped += not result.stepped
            norms.append(result.grad_norm)
            for at, directory in config.save_at:
                if at == step + 1:
                    save_checkpoint(model, optimizer, directory, step=step + 1, scaler=scaler)
                    if trace is not None:
                        trace.writer.flush()
            losses.append(_global_sum(share, config.device))
        if config.out_dir is not None:
            save_checkpoint(model, optimizer, config.out_dir, step=end, scaler=scaler)
        state_bytes = optimizer.state_bytes()
        if trace is not None:
            trace.close()
    finally:
        optimizer.close()
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return RankResult(rank=rank, world_size=world, losses=tuple(losses), start_step=start, grad_norms=tuple(norms),
                      skipped_steps=skipped,
                      peak_bytes=peak, baseline_bytes=baseline, local_param_bytes=local_bytes,
                      state_bytes=state_bytes, samples=samples, grad_bytes=tuple(held))


def init_process_group(*, rank: int, world_size: int, init_method: str, device: str) -> None:
    """gloo on CPU, nccl on CUDA (each rank on its own local GPU)."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def shutdown_process_group() -> None:
    """destroy_process_group after collecting garbage: the sharded model's reference cycles hold
    the process group, and left to interpreter shutdown gloo's worker threads abort the
    process (SIGABRT, "terminate called without an active exception") once in a few runs."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def _spawned(rank: int, world_size: int, config: DistConfig, init_method: str, result_dir: str) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    init_process_group(rank=rank, world_size=world_size, init_method=init_method, device=config.device)
    try:
        out = dataclasses.asdict(train_rank(config))
    except ChunkftError as e:  # raised on every rank together (see _agree)
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
            for name, t in _full_weights(model, Path(config.init_from)).items():
                model.get_parameter(name).copy_(t)
    scaler = LossScaler(config.loss_scaler) if config.dtype == "fp16" else None
    optimizer = ChunkAdamW(model, _table(config, model), config=config.adamw, schedule=config.schedule,
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
