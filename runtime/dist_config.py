"""A distributed run's configuration (DistConfig), what each rank reports (RankResult), the checks.

DistConfig crosses into spawned processes (it is pickled): every field is plain data, the HF
config as a dict, the token ids (and labels) as tensors, the chunk table in its JSON form.
`check_config` raises, in one line, what a run of a config on a world size would fail on: the
global batch must split evenly over the ranks and each rank's part into micro-batches, every
micro-batch must hold a labelled token, and a resumed checkpoint must come from the same world
size. run_distributed checks before spawning and every rank checks again (deterministically:
all ranks raise the same error, or none does).

Known limitations: the whole run's token ids are one tensor in the config (steps x global batch
x sequence length), copied into every rank.
"""

from __future__ import annotations

import dataclasses

import torch

from planner.errors import ChunkftError
from runtime.chunk_optim import AdamWConfig, LRSchedule
from runtime.dist_checkpoint import read_trainer_state
from runtime.scaler import ScalerConfig

IGNORE_INDEX = -100
STATE_TIERS = ("gpu", "host", "disk")
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
    """Where resting chunks' fp32 masters and moments live: "gpu" (the step device), "host" or "disk"."""
    prefetch_depth: int = 1
    """HOST / DISK tier: >= 1 copies the next chunk's state to the device while the current trains."""
    state_dir: str | None = None
    """DISK tier: the run's state directory (each rank writes its own rank<r>-of-<W> folder)."""
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
    (runtime.rank_train's docstring); None: no trace."""
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
        if self.state_tier == "disk" and not self.state_dir:
            raise ChunkftError("state tier 'disk' needs a state directory (state_dir)")
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
    prefetched chunks' working copies), "host" (HOST tier's resting state, DISK tier's staging
    buffers) and "disk" (DISK tier's chunk files)."""
    samples: tuple = ()
    """(op name, bytes above baseline) after every op of the measured step, if recorded."""
    grad_bytes: tuple = ()
    """With `record_grad_bytes`, per step trained, after its backward and before its optimizer
    step: `ShardedChunkAdamW.grad_bytes()` (the gradients this rank holds, by parameter)."""


def labelled_tokens(labels: torch.Tensor) -> int:
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
            if labelled_tokens(labels[start:start + micro]) == 0:
                raise ChunkftError(f"step {step}: rows {start}..{start + micro - 1} hold no labelled token "
                                   f"(all -100); every micro-batch needs one")
    if config.resume_from is not None:
        saved = read_trainer_state(config.resume_from)
        if saved["world_size"] != world_size:
            raise ChunkftError(f"checkpoint {config.resume_from!r} was saved by {saved['world_size']} ranks; "
                               f"this run has {world_size} (resume with the same world size)")
