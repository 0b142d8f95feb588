"""ChunkAdamW: exact AdamW on the active chunk, with per-chunk fp32 state on a chosen tier.

One chunk of a `planner.chunks.ChunkTable` is active at a time. `ChunkAdamW` installs that
chunk's GradSpec (`runtime.subgrad.install`), so backward produces gradients for its spans
only; `step()` applies torch.optim.AdamW's math -- decoupled weight decay, bias correction,
one step count per span -- to fp32 master weights and moments of those spans, then writes the
masters back into the model's (bf16 / fp16 / fp32) weights. After `update_interval`
successful steps the chunk's state is evicted to its tier and the next chunk (cyclically) is
activated. A float64 model keeps float64 masters; anything narrower keeps fp32.

State tiers (`planner.schema.Tier`): GPU keeps every chunk's state as device tensors; HOST in
one flat pinned buffer per chunk (runtime.host_buffer; plain CPU memory without CUDA); DISK in one safetensors file per chunk under
`state_dir`, each written atomically and crc32-checked when read back (with `stream_state`, one
file per span, the active chunk's too: a host step then holds one span's state at a time). For HOST and DISK with `prefetch_depth >= 1` a
background thread (on a side CUDA stream where there is one) loads the next chunk's state to
the device while the current chunk trains. A chunk's state is created the first time the
chunk is activated (masters copied from the weights, moments zero): identical to creating it
up front, since an inactive chunk's weights do not change.

State formats (`runtime.lean_state.StateFormat`, from the plan's recipe): fp32 moments
(`--optim chunkft`, the default), bf16 moments (`adamw_bf16`) or torchao's block-wise 8-bit
moments (`adamw_torch_8bit`), each with an fp32 master (`--precision mixed`) or without one
(`pure`: the step updates the 16-bit weights directly, in fp32 arithmetic, rounded back). Every
tier holds every format (bf16 tensors, uint8 codes and fp32 block scales are tensors like any
other: pinned on HOST, safetensors on DISK); the accounting counts their real bytes.

Typical loop (one optimizer step of `accum` micro-batches):

    opt = ChunkAdamW(model, table, config=AdamWConfig(lr=2e-5), schedule=LRSchedule(...),
                     update_interval=1, state_tier=Tier.HOST, scaler=None)
    for micro in micro_batches:
        loss = step_loss(model, ids, labels) / accum
        opt.backward(loss)                     # scales the loss when fp16 needs it
    result = opt.step()                        # StepResult; gradients are dropped after it

Known limitations:
- Prefetch depth beyond 1 behaves as 1 (one chunk ahead is what fits the planner's model).
- Eviction is synchronous: the step that switches chunks waits for the old chunk's state to
  reach host memory or disk (no write-behind), so at most two chunks' state (active and
  prefetched) are on the device at once.
- The CUDA paths (pinned host buffers, the side-stream prefetch) are written for CUDA but
  were tested only on CPU, where HOST is plain memory and the prefetch a thread.
- `state_dict()` gathers every chunk's state in CPU memory at once (3 fp32 copies of the
  trainable parameters with fp32 state, fewer bytes with a lean format); a checkpoint of a
  very large model needs that much host memory.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from planner.chunks import ChunkTable, model_named_shapes
from planner.errors import ChunkftError
from planner.fsio import atomic_path, atomic_write_json
from planner.schema import Tier
from runtime.disk_store import describe_os_error, file_crc32
from runtime.host_buffer import FlatBuffer
from runtime.guard import DEFAULT_MAX_NONFINITE_STEPS, SkipGuard, first_nonfinite, nonfinite_flag
from runtime.lean_state import StateFormat, step_span
from runtime.scaler import LossScaler
from runtime.subgrad import GradCallback, SubgradHandle, install

STATE_VERSION = 1
OWNER = "OWNER.json"
"""In a DISK state directory: the run id and process that own it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AdamWConfig:
    """torch.optim.AdamW's hyper-parameters, plus clipping."""

    lr: float = 1e-5
    """Peak learning rate (the schedule multiplies it)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled: w <- w * (1 - lr * weight_decay) before the Adam update."""
    max_grad_norm: float | None = None
    """Clip the active chunk's gradients to this global L2 norm (None: no clipping)."""
    stochastic_rounding: bool = False
    """Round the step's fp32 -> bf16 writes (bf16 moments; bf16 weights without a master)
    stochastically instead of to nearest (runtime.lean_state: unbiased, seeded by `seed`)."""
    seed: int = 0
    """Seeds stochastic rounding's random bits, with each span's key and step count."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.stochastic_rounding, bool):
            problems.append(f"stochastic_rounding must be true or false, got {self.stochastic_rounding!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            problems.append(f"lr must be a finite number >= 0, got {self.lr}")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            problems.append(f"eps must be a finite number > 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            problems.append(f"max_grad_norm must be a finite number > 0 or None, got {self.max_grad_norm}")
        if problems:
            raise ChunkftError("AdamW: " + "; ".join(problems))


@dataclass(frozen=True, kw_only=True, slots=True)
class LRSchedule:
    """Learning-rate multiplier as a function of successful optimizer steps taken so far.

    "constant": 1 after warm-up. "cosine": from 1 after warm-up down to `min_lr_ratio` at
    `total_steps`, half a cosine. Warm-up is linear, (t + 1) / warmup_steps for step t
    (0-based), so the first step already moves the weights.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine"):
            raise ChunkftError(f"LR schedule {self.kind!r} is unknown; valid: 'constant', 'cosine'")
        if self.warmup_steps < 0 or (self.kind == "cosine" and self.total_steps <= self.warmup_steps):
            raise ChunkftError(
                f"LR schedule needs warmup_steps >= 0 and, for cosine, total_steps > warmup_steps; "
                f"got warmup_steps={self.warmup_steps}, total_steps={self.total_steps}"
            )

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True, kw_only=True, slots=True)
class StepResult:
    """What one `ChunkAdamW.step()` did."""

    stepped: bool
    """False when a gradient the step would consume held inf/nan (fp16 overflow or a
    non-finite bf16/fp32 gradient): weights, state, chunk and schedule did not move."""
    chunk: int
    """The chunk that was (or would have been) updated."""
    lr: float
    grad_norm: float | None
    """The active chunk's gradient norm before clipping (only computed when clipping)."""
    switched_to: int | None
    """The chunk activated after this step, if it switched."""
    loss_scale: float | None
    skipped_because: str | None = None
    """Why a skipped step was skipped ("inf/nan in the accumulated gradient of 'lm_head.weight'")."""


def next_chunk(k: int, steps_done: int, update_interval: int, num_chunks: int) -> tuple[int, int | None]:
    """ChunkFT's cycling rule after a successful step of chunk k that was its `steps_done`-th:
    (steps done on the active chunk from now, the chunk to switch to or None). After
    `update_interval` steps the count restarts and, with several chunks, k + 1 (cyclically)
    becomes active."""
    if steps_done < update_interval:
        return steps_done, None
    return 0, ((k + 1) % num_chunks if num_chunks > 1 else None)


def adamw_update(state: Mapping[str, torch.Tensor], name: str, grad: torch.Tensor, *, config: AdamWConfig,
                 lr: float, step: int, weight: torch.Tensor | None = None, key: str | None = None) -> torch.Tensor:
    """One AdamW step of `name`'s master and moments in `state` ("<name>/master", "/exp_avg",
    "/exp_avg_sq", or their 8-bit "/exp_avg.codes" and "/exp_avg.scale" ...), in place:
    torch.optim.adam._single_tensor_adam with decoupled weight decay, line for line (so one
    chunk of fp32 state equals torch.optim.AdamW bit for bit), in fp32 on moments read in any
    format (runtime.lean_state). Without a master in `state` (pure precision) `weight` is
    stepped instead. `key` names the span's stochastic-rounding stream (default: `name`).
    Returns the tensor stepped (the master, or `weight`)."""
    target = state.get(f"{name}/master", weight)
    if target is None:
        raise ChunkftError(f"optimizer state of {name!r} has no master and no weights were given to step")
    step_span(state, name, grad, target, config=config, lr=lr, step=step, key=key)
    return target


def master_grad(g: torch.Tensor, device: torch.device, inv_scale: float = 1.0) -> torch.Tensor:
    """A gradient cast to the master dtype (fp32; fp64 stays fp64) on the step device, unscaled
    (fp16-centric: the cast happens here, at the optimizer). A copy when the cast or unscale needs one."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = g.to(device=device, dtype=dtype)
    if inv_scale != 1.0:
        out = out * inv_scale
    return out


def step_view(state: Mapping[str, torch.Tensor], name: str, grad: torch.Tensor, view: torch.Tensor, *,
              master: bool, device: torch.device, config: AdamWConfig, lr: float, step: int,
              key: str | None = None) -> None:
    """ChunkAdamW's step of one span: `adamw_update` of its state (`master`: the state holds an
    fp32 master; else the weights are stepped, on `device`), then the weights written back into
    `view`, the span of the model's weights. Call under torch.no_grad()."""
    # pure precision: the weights are the master (a host step steps a host copy of them)
    weight = None if master else view if view.device == device else view.to(device)
    target = adamw_update(state, name, grad, config=config, lr=lr, step=step, weight=weight, key=key)
    if target is not view:
        # a host step sends the weights back already in their 16-bit dtype (same rounding)
        view.copy_(target if target.device == view.device else target.to(view.dtype))


class _Store:
    """Chunk states resting on one tier: {chunk: {"<param>/<kind>": tensor}}.

    DISK: the directory is this store's scratch space. Whatever an earlier process left there
    (a run killed before its checkpoint, another run) is deleted when the store opens it, the
    store's run id is written into it (OWNER), and a file is read only if this store wrote it
    and its crc32 still matches: state comes from this process or from a checkpoint, never
    from a leftover file.
    """

    def __init__(self, tier: Tier, device: torch.device, state_dir: str | os.PathLike | None, *,
                 in_place: bool = True, run_id: str | None = None):
        self.tier = tier
        self.device = device
        # HOST tier with a CPU step device: step the state in its host slot (a host optimizer),
        # or keep a separate working copy as a GPU would (a CPU run emulating a GPU plan).
        self.aliased = tier == Tier.GPU or (tier == Tier.HOST and device.type == "cpu" and in_place)
        """The step works on the resting tensors themselves (no working copy beside them)."""
        self._mem: dict[int, dict[str, torch.Tensor]] = {}
        self._flat: dict[int, FlatBuffer] = {}  # HOST (not aliased): each chunk's one buffer
        self._pin = tier == Tier.HOST and torch.cuda.is_available()
        self._crc: dict[tuple[int, str | None], int] = {}  # DISK: crc32 of each chunk file as written, checked on read
        if tier == Tier.DISK:
            if state_dir is None:
                raise ChunkftError("the DISK state tier needs a state directory (state_dir)")
            self.dir = Path(state_dir)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                for stale in self.dir.glob("*.safetensors"):
                    stale.unlink()
                for stale in self.dir.glob(".*.tmp"):  # atomic writes a kill interrupted
                    stale.unlink()
                atomic_write_json(self.dir / OWNER, {"run_id": run_id, "pid": os.getpid()})
            except OSError as e:
                raise ChunkftError(f"cannot prepare state directory {str(self.dir)!r}: {e.strerror or e}") from None

    def _path(self, k: int, span: str | None = None) -> Path:
        return self.dir / (f"chunk{k:05d}.safetensors" if span is None else f"chunk{k:05d}.{span}.safetensors")

    def put(self, k: int, state: dict[str, torch.Tensor], span: str | None = None) -> None:
        """Rest chunk k's state here (DISK with `span`: one span's state, in its own file)."""
        if self.aliased:
            self._mem[k] = {n: t.to(self.device) for n, t in state.items()}
        elif self.tier == Tier.HOST:  # one flat (pinned) buffer per chunk, reused in place
            flat = self._flat.get(k)
            if flat is None or not flat.matches(state):
                if flat is not None:
                    flat.release()
                flat = self._flat[k] = FlatBuffer(state, pin=self._pin)
            self._mem[k] = flat.copy_in(state)
        else:
            from safetensors.torch import save_file

            path = self._path(k, span)
            try:  # atomic: a failed write leaves the chunk's previous file as it was
                with atomic_path(path) as tmp:
                    save_file({n: t.detach().contiguous().cpu() for n, t in state.items()}, str(tmp))
                    crc = file_crc32(tmp)
            except ChunkftError:
                raise
            except OSError as e:
                raise ChunkftError(f"disk tier: cannot write {str(path)!r}: {describe_os_error(e)}") from None
            except Exception as e:  # safetensors reports I/O failures with its own error types
                raise ChunkftError(f"disk tier: cannot write {str(path)!r}: {str(e).splitlines()[0]}") from None
            self._crc[(k, span)] = crc

    def get(self, k: int, device: torch.device, span: str | None = None) -> dict[str, torch.Tensor] | None:
        if self.tier == Tier.DISK:
            from safetensors.torch import load_file

            path = self._path(k, span)
            wrote = self._crc.get((k, span))
            if wrote is None:  # not written by this store: nothing to read, whatever is on disk
                return None
            try:
                crc = file_crc32(path)
            except OSError as e:
                raise ChunkftError(f"disk tier: cannot read {str(path)!r}: {describe_os_error(e)}") from None
            if crc != wrote:
                raise ChunkftError(f"disk tier: checksum mismatch in {str(path)!r}: the file changed since it was "
                                   f"written (crc32 {crc:08x}, wrote {wrote:08x})")
            try:
                return load_file(str(path), device=str(device))
            except Exception as e:  # safetensors raises its own error types
                raise ChunkftError(f"optimizer state file {str(path)!r} is unreadable: {e}") from None
        state = self._mem.get(k)
        if state is None:
            return None
        return {n: t.to(device, non_blocking=self._pin, copy=not self.aliased) for n, t in state.items()}

    def drop(self, k: int) -> None:
        self._mem.pop(k, None)
        flat = self._flat.pop(k, None)
        if flat is not None:
            flat.release()
        for key in [key for key in self._crc if key[0] == k]:
            del self._crc[key]
        if self.tier == Tier.DISK:
            for path in self.dir.glob(f"chunk{k:05d}.*safetensors"):  # the chunk's file or its span files
                path.unlink(missing_ok=True)

    def nbytes(self) -> int:
        """Bytes held on this tier (file sizes for DISK)."""
        if self.tier == Tier.DISK:
            return sum(p.stat().st_size for p in self.dir.glob("chunk[0-9][0-9][0-9][0-9][0-9].*safetensors"))
        if self._flat:
            return sum(f.nbytes for f in self._flat.values())
        return sum(t.numel() * t.element_size() for s in self._mem.values() for t in s.values())



class ChunkAdamW:
    """Exact AdamW over a ChunkTable, one active chunk at a time (see the module docstring).

    Construct it on a model whose trainable parameters have requires_grad=True (close() a
    previous ChunkAdamW first: it switches requires_grad off outside the active chunk).

    Args:
        model: the model to train; its parameters keep their dtype and device.
        table: the chunk table (validated against the model's trainable parameters).
        config / schedule: AdamW hyper-parameters and the LR schedule.
        update_interval: successful optimizer steps on a chunk before switching to the next.
        state_tier: where inactive chunks' masters and moments rest (GPU, HOST or DISK).
        state_dir: directory for the DISK tier.
        device: where the optimizer step runs (default: the model parameters' device; "cpu"
            for a ZeRO-Offload-style host step).
        prefetch_depth: 0 loads the next chunk's state on switch; >= 1 prefetches it.
        scaler: a LossScaler for fp16 (None for bf16 / fp32).
        on_grad: called with (name, gradient) for every gradient contribution as it is
            produced, after the scaler's check (runtime.offload stages gradients off the
            device through it).
        stream_state: DISK tier only: the active chunk's state is not held in memory either;
            each span's fp32 master and moments are read from their own file, stepped and
            written back (atomically, crc32-checked), so the step device holds one span's
            state at a time (with C = 1: full fine-tuning with the state on disk).
        host_state_in_place: HOST tier on a CPU step device: True steps the state in its host
            slot (a host-side optimizer); False keeps a working copy beside the slot, as a GPU
            step would, so a CPU run of a GPU plan has the plan's memory layout.
        max_nonfinite_steps: consecutive skipped (non-finite) steps before a ChunkftError.
        run_id: written into a DISK state directory as its owner (the run's id).
        step_in_backward: step each span as soon as its gradient is complete, from inside
            backward, and free the gradient (torchtune's optimizer_in_bwd, LOMO); step() then
            only counts the step and cycles the chunk. Same weights as the step after backward
            for the same gradients. Refuses clipping (max_grad_norm), an fp16 scaler and
            `on_grad` staging; one backward per step (no gradient accumulation); a non-finite
            gradient stops the run instead of skipping the step.
        weights: parameter name -> where its weights rest between steps, for parameters whose
            data is not there (runtime.stream's host copies of streamed layers): new masters
            are read from it and every step writes it. Default: the parameters themselves.
        state_format: how each span's state is held (runtime.lean_state.StateFormat, from the
            recipe's --optim / --precision): fp32, bf16 or torchao 8-bit moments, with or
            without an fp32 master. Default: fp32 master and moments.

    Every chunk's state is created when the optimizer is (not at its first activation), so
    the memory a plan predicts for its steady state is held from the first step, and a
    budget that cannot hold it fails at once rather than hours into a run.
    """

    def __init__(
        self,
        model: nn.Module,
        table: ChunkTable,
        *,
        config: AdamWConfig | None = None,
        schedule: LRSchedule | None = None,
        update_interval: int = 1,
        state_tier: Tier = Tier.GPU,
        state_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        prefetch_depth: int = 1,
        scaler: LossScaler | None = None,
        on_grad: GradCallback | None = None,
        stream_state: bool = False,
        host_state_in_place: bool = True,
        max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS,
        run_id: str | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        step_in_backward: bool = False,
        state_format: StateFormat | None = None,
    ):
        if update_interval < 1:
            raise ChunkftError(f"update_interval must be >= 1, got {update_interval}")
        table.validate(model_named_shapes(model))
        self.model = model
        self.table = table
        self.config = config or AdamWConfig()
        self.schedule = schedule or LRSchedule()
        self.update_interval = update_interval
        self.scaler = scaler
        self.guard = SkipGuard(max_nonfinite_steps)
        self._on_grad = on_grad
        self.state_format = state_format or StateFormat()
        if not isinstance(self.state_format, StateFormat):
            raise ChunkftError(f"state_format must be a runtime.lean_state.StateFormat, got {state_format!r}")
        self._parts: list[tuple[int, int]] | None = None  # per chunk: (master, moment) bytes of its format
        if step_in_backward:  # what a step that runs inside backward cannot do, refused up front
            if self.config.max_grad_norm is not None:
                raise ChunkftError(f"the optimizer step in backward cannot clip to a global gradient norm "
                                   f"(max_grad_norm={self.config.max_grad_norm}): each span steps before the "
                                   "norm is known; run with --max-grad-norm 0")
            if scaler is not None:
                raise ChunkftError("the optimizer step in backward cannot skip an fp16 overflow step (spans already "
                                   "stepped cannot be taken back): train in bf16 or fp32")
            if on_grad is not None:
                raise ChunkftError("the optimizer step in backward consumes each gradient itself; it does not "
                                   "combine with gradient staging (on_grad)")
        self._in_backward = step_in_backward
        self._stepped_in_backward: list[str] = []
        self._params = dict(model.named_parameters())
        # where each parameter's weights rest between steps (read for new masters, written by
        # the step): the parameter itself, or its host copy when runtime.stream streams it
        self._weights = {**self._params, **(weights or {})}
        first = next(iter(self._params.values()))
        self.device = torch.device(device) if device is not None else first.device
        try:
            tier = Tier(state_tier)
        except ValueError:
            raise ChunkftError(
                f"state tier {state_tier!r} is unknown; valid: {[t.value for t in Tier]}"
            ) from None
        self._store = _Store(tier, self.device, state_dir, in_place=host_state_in_place, run_id=run_id)
        if stream_state and tier != Tier.DISK:
            raise ChunkftError(f"streaming optimizer state span by span needs the 'disk' state tier, not {tier.value!r}")
        self._stream_spans = stream_state
        self._prefetch = (prefetch_depth >= 1 and table.num_chunks > 1 and self._store.tier != Tier.GPU
                          and not stream_state)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1) if self._prefetch else None
        self._stream = torch.cuda.Stream(self.device) if self._prefetch and self.device.type == "cuda" else None
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self.global_step = 0  # successful optimizer steps: the schedule's position
        self.active_steps = 0  # successful steps on the active chunk since it was activated
        self._span_steps: dict[int, dict[str, int]] = {k: {} for k in range(table.num_chunks)}
        self.active_chunk = 0
        self._state: dict[str, torch.Tensor] = {}
        self._handle: SubgradHandle | None = None
        if not stream_state:  # every chunk's state rests on its tier from the start (see above)
            for k in range(table.num_chunks):
                self._store.put(k, self._fresh_state(k))
        self._activate(0)

    # -- public API ---------------------------------------------------------------------

    @property
    def handle(self) -> SubgradHandle:
        """The active chunk's gradient handle (`.grads()`)."""
        assert self._handle is not None
        return self._handle

    def lr(self) -> float:
        """The learning rate the next successful step will use."""
        return self.config.lr * self.schedule.factor(self.global_step)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled by the loss scaler when there is one."""
        self.handle.in_backward = True  # forwards from here on are checkpoint recomputations
        try:
            (self.scaler.scale_loss(loss) if self.scaler is not None else loss).backward()
        finally:
            self.handle.in_backward = False
        if self._in_backward and (self.handle._ready or any(self.handle._gates.values())):
            raise ChunkftError("a slice's gradient was complete but its step never ran (a module input that "
                               "needs a gradient got none): the optimizer step in backward cannot follow this model")

    def zero_grad(self) -> None:
        self.handle.zero_grad()

    def step(self, grads: Mapping[str, torch.Tensor] | None = None) -> StepResult:
        """One optimizer step on the active chunk's accumulated gradients, then drop them.

        `grads` supplies the gradients instead of the chunk's handle (runtime.offload: 16-bit
        gradients staged on host or disk, read lazily; any device and dtype, cast to the
        master dtype on the step device one span at a time).

        Skipped (returns stepped=False, `skipped_because` says why) when any gradient the step
        would consume -- the accumulated one, checked here, not only the pieces as they
        arrived -- holds inf or nan: nothing is written to weights, masters or moments, neither
        the chunk nor the schedule advances, and fp16 backs its loss scale off. After
        `max_nonfinite_steps` skips in a row, a ChunkftError. Otherwise AdamW on every span
        that received a gradient, and a switch to the next chunk after `update_interval` steps.
        """
        if self._in_backward:
            if grads is not None:
                raise ChunkftError("gradients handed to step() cannot be used: this optimizer steps in backward")
            return self._finish_step_in_backward()
        k = self.active_chunk
        scale = self.scaler.scale if self.scaler is not None else None
        lr = self.lr()
        if self.scaler is not None and self.scaler.overflowed():
            return self._skip(k, lr, scale, "fp16 overflow in a gradient as it was produced")
        grads = self.handle.grads() if grads is None else grads
        inv_scale = 1.0 / scale if scale is not None else 1.0
        names = [s.param for s in self.table.chunks[k] if s.param in grads]
        clip = self.config.max_grad_norm is not None and bool(names)
        # One pass over what the step consumes: the finiteness check and, when clipping, the
        # per-span norms (a disk-staged gradient is read once for both).
        bad, norms = torch.zeros((), dtype=torch.bool, device=self.device), []
        for n in names:
            g = grads[n]
            bad |= nonfinite_flag((g,), self.device)
            if clip:
                norms.append(torch.linalg.vector_norm(self._grad32(g, inv_scale), 2))
            del g
        if bool(bad):  # one sync
            bad_name = first_nonfinite({n: grads[n] for n in names})
            return self._skip(k, lr, scale, f"inf/nan in the accumulated gradient of {bad_name!r}")
        coef, grad_norm = None, None
        if clip:
            # torch.nn.utils.clip_grad_norm_'s arithmetic: norm of the per-tensor norms.
            total = torch.linalg.vector_norm(torch.stack(norms), 2)
            coef = torch.clamp(self.config.max_grad_norm / (total + 1e-6), max=1.0)
            grad_norm = float(total)
        del norms
        for name in names:
            g = self._grad32(grads[name], inv_scale)
            if coef is not None:
                g.mul_(coef)
            self._step_span(k, name, g, lr)
            del g
        return self._finish_step(k, lr, grad_norm, scale)

    def _finish_step(self, k: int, lr: float, grad_norm: float | None, scale: float | None) -> StepResult:
        """After every span of chunk k stepped: drop the gradients, count the step, cycle the chunk."""
        self.handle.zero_grad()
        if self.scaler is not None:
            self.scaler.update(False)
        self.guard.stepped()
        self.global_step += 1
        self.active_steps, switched = next_chunk(k, self.active_steps + 1, self.update_interval, self.table.num_chunks)
        if switched is not None:
            self._evict()
            self._activate(switched)
        return StepResult(stepped=True, chunk=k, lr=lr, grad_norm=grad_norm, switched_to=switched, loss_scale=scale)

    def _step_span(self, k: int, name: str, g: torch.Tensor, lr: float) -> None:
        """AdamW on one span of chunk k with its (unscaled, clipped) master-dtype gradient."""
        step = self._span_steps[k].get(name, 0) + 1
        self._span_steps[k][name] = step
        if self._stream_spans:
            self._state = self._store.get(k, self.device, span=name) or self._fresh_span(k, name)
        self._adamw(name, g, lr, step)
        if self._stream_spans:
            self._store.put(k, self._state, span=name)
            self._state = {}

    def _step_in_backward(self, name: str, grad: torch.Tensor) -> None:
        """on_complete of the chunk's handle: a span's gradient is complete; step it now, so the
        gradient is freed before backward produces the next (torchtune's optimizer_in_bwd,
        LOMO). A non-finite gradient cannot be skipped (earlier spans have stepped): it stops."""
        if name in self._stepped_in_backward:
            raise ChunkftError(f"{name!r} completed a second gradient before step(): gradient accumulation over "
                               "micro-batches does not combine with the optimizer step in backward (--grad-accum 1)")
        if bool(nonfinite_flag((grad,), grad.device)):
            raise ChunkftError(f"inf/nan in the gradient of {name!r} during backward: the optimizer step in "
                               "backward cannot skip a step; resume from the last checkpoint with a lower --lr")
        self._step_span(self.active_chunk, name, self._grad32(grad, 1.0), self.lr())
        self._stepped_in_backward.append(name)

    def _finish_step_in_backward(self) -> StepResult:
        """step() when every span stepped during backward: count the step, cycle the chunk."""
        self._stepped_in_backward = []
        return self._finish_step(self.active_chunk, self.lr(), None, None)

    def _skip(self, k: int, lr: float, scale: float | None, why: str) -> StepResult:
        """Drop the gradients, back the fp16 scale off, count the skip (may raise)."""
        self.handle.zero_grad()
        if self.scaler is not None:
            self.scaler.update(True)
        self.guard.skipped(why)
        return StepResult(stepped=False, chunk=k, lr=lr, grad_norm=None, switched_to=None, loss_scale=scale,
                          skipped_because=why)

    def working_bytes(self) -> int:
        """Bytes of state on the step device beside the resting copies: the active chunk's
        working state and the prefetched chunk's (counted from the moment its load is queued,
        as the plan holds both). Nothing where the store's own tensors are stepped in place
        (the GPU tier, or HOST with a host step): those are counted once, as resting."""
        if self._store.aliased:
            return 0
        active = sum(t.numel() * t.element_size() for t in self._state.values())
        prefetched = self.chunk_state_bytes(self._pending[0]) if self._pending is not None else 0
        return active + prefetched

    def resting_bytes(self) -> tuple[Tier, int]:
        """(tier, bytes) of every chunk's resting state (file sizes for DISK)."""
        return self._store.tier, self._store.nbytes()

    def state_bytes(self) -> dict[Tier, int]:
        """Bytes of optimizer state by tier: the working state on the step device (GPU when it
        is CUDA, else HOST) plus every chunk's resting state on its tier."""
        on_device = Tier.GPU if self.device.type == "cuda" else Tier.HOST
        out = {on_device: self.working_bytes()}
        tier, resting = self.resting_bytes()
        out[tier] = out.get(tier, 0) + resting
        return out

    def chunk_state_bytes(self, k: int) -> int:
        """Bytes of chunk k's state in its format (runtime.lean_state): master (fp32, fp64 for
        an fp64 model; none under pure precision) and two moments (fp32, bf16, or 8-bit codes
        plus an fp32 scale per block of 256)."""
        return sum(self._chunk_parts(k))

    def split_bytes(self, nbytes: int) -> tuple[int, int]:
        """(master, moments) shares of `nbytes` of state, in the proportion the format holds
        them over every chunk (fp32 mixed: 1 : 2; pure: 0 : all)."""
        self._chunk_parts(0)
        master = sum(m for m, _ in self._parts)
        total = sum(m + v for m, v in self._parts)
        share = nbytes * master // total if total else 0
        return share, nbytes - share

    def _chunk_parts(self, k: int) -> tuple[int, int]:
        if self._parts is None:  # the table and the format are fixed: computed once
            self._parts = []
            for chunk in self.table.chunks:
                master = moments = 0
                for span in chunk:
                    p = self._params[span.param]
                    a, b = self.state_format.span_bytes(span.nbytes // p.element_size(), p.dtype)
                    master, moments = master + a, moments + b
                self._parts.append((master, moments))
        return self._parts[k]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): every chunk's state as CPU tensors "chunk<k>/<param>/<kind>", and
        a JSON-able dict of counters, hyper-parameters and the chunk table."""
        self._wait_prefetch()
        tensors: dict[str, torch.Tensor] = {}
        for k in range(self.table.num_chunks):
            if self._stream_spans:
                state = {key: t for s in self.table.chunks[k]
                         for key, t in (self._store.get(k, torch.device("cpu"), span=s.param) or {}).items()}
            else:
                state = self._state if k == self.active_chunk else self._store.get(k, torch.device("cpu"))
            for key, t in (state or {}).items():
                tensors[f"chunk{k}/{key}"] = t.detach().to("cpu", copy=True)
        meta = {
            "version": STATE_VERSION,
            "active_chunk": self.active_chunk,
            "active_steps": self.active_steps,
            "global_step": self.global_step,
            "span_steps": {str(k): dict(v) for k, v in self._span_steps.items()},
            "update_interval": self.update_interval,
            "nonfinite_streak": self.guard.streak,
            "config": asdict(self.config),
            "schedule": asdict(self.schedule),
            "table": self.table.to_json(),
            "state_format": self.state_format.to_json(),
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore `state_dict()`'s output (same chunk table required; the model's weights
        are the caller's to restore). Hyper-parameters and schedule come from `meta`."""
        try:
            if meta.get("version") != STATE_VERSION:
                raise ChunkftError(f"optimizer state version {meta.get('version')!r} is not {STATE_VERSION}")
            if ChunkTable.from_json(meta["table"]) != self.table:
                raise ChunkftError("optimizer state was saved with a different chunk table")
            config = dict(meta["config"])
            config["betas"] = tuple(config["betas"])
            saved_format = StateFormat.from_json(meta.get("state_format"))
            if saved_format != self.state_format:
                raise ChunkftError(f"optimizer state holds {saved_format.describe()}; this optimizer keeps "
                                   f"{self.state_format.describe()} (the plan's --optim / --precision differ)")
            self.config = AdamWConfig(**config)
            self.schedule = LRSchedule(**meta["schedule"])
            self.update_interval = int(meta["update_interval"])
            span_steps = {int(k): {str(n): int(s) for n, s in v.items()} for k, v in meta["span_steps"].items()}
            active, active_steps, global_step = int(meta["active_chunk"]), int(meta["active_steps"]), int(meta["global_step"])
        except (KeyError, TypeError, ValueError) as e:
            raise ChunkftError(f"optimizer state is malformed ({type(e).__name__}: {e})") from None
        if set(span_steps) != set(range(self.table.num_chunks)) or not 0 <= active < self.table.num_chunks:
            raise ChunkftError("optimizer state does not match the chunk table's chunk count")
        self._wait_prefetch()
        self._pending = None
        self._handle.remove()
        self._state = {}
        per_chunk: dict[int, dict[str, torch.Tensor]] = {k: {} for k in range(self.table.num_chunks)}
        for key, t in tensors.items():
            head, _, rest = key.partition("/")
            if not head.startswith("chunk") or not head[5:].isdigit() or int(head[5:]) not in per_chunk:
                raise ChunkftError(f"optimizer state has an unexpected tensor {key!r}")
            per_chunk[int(head[5:])][rest] = t
        for k, state in per_chunk.items():
            if self._stream_spans:
                self._store.drop(k)
                for s in self.table.chunks[k]:
                    span_state = {key: t.clone() for key, t in state.items() if key.startswith(f"{s.param}/")}
                    if span_state:
                        self._store.put(k, span_state, span=s.param)
                continue
            # the active chunk too: activating it below reads it back from the store, so an
            # aliased store holds one copy of it, not the restored one beside a stale one
            if state:
                self._store.put(k, {n: t.clone() for n, t in state.items()})
            else:
                self._store.drop(k)
        self._span_steps = span_steps
        self.global_step, self.active_steps = global_step, active_steps
        self.guard.load_state_dict({"streak": meta.get("nonfinite_streak", 0)})
        self._activate(active)

    def close(self) -> None:
        """Remove the hooks and stop the prefetch thread (the model trains normally again)."""
        self._wait_prefetch()
        if self._handle is not None:
            self._handle.remove()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- internals ----------------------------------------------------------------------

    def _grad32(self, g: torch.Tensor, inv_scale: float) -> torch.Tensor:
        """The gradient cast to the master dtype on the step device (fp16-centric: the cast
        happens here, at the optimizer), unscaled. A copy when the cast or unscale needs one."""
        return master_grad(g, self.device, inv_scale)

    def _span_view(self, k: int, name: str) -> torch.Tensor:
        span = next(s for s in self.table.chunks[k] if s.param == name)
        p = self._weights[name].detach()
        return p if self.table.is_whole(span) else p.narrow(span.dim, span.start, span.end - span.start)

    def _adamw(self, name: str, grad: torch.Tensor, lr: float, step: int) -> None:
        """torch.optim.adam._single_tensor_adam with decoupled weight decay, line for line."""
        with torch.no_grad():
            step_view(self._state, name, grad, self._span_view(self.active_chunk, name),
                      master=self.state_format.master, device=self.device, config=self.config, lr=lr, step=step,
                      key=f"chunk{self.active_chunk}/{name}")

    def _fresh_state(self, k: int) -> dict[str, torch.Tensor]:
        return {key: t for span in self.table.chunks[k] for key, t in self._fresh_span(k, span.param).items()}

    def _fresh_span(self, k: int, name: str) -> dict[str, torch.Tensor]:
        """A span's new state in the format (runtime.lean_state): master from the weights, moments zero."""
        return self.state_format.fresh(name, self._span_view(k, name), self.device)

    def _state_keys(self, k: int) -> set[str]:
        """The state keys chunk k's spans hold in the format."""
        return {key for s in self.table.chunks[k]
                for key in self.state_format.keys(s.param, s.nbytes // self._params[s.param].element_size())}

    def _load(self, k: int) -> dict[str, torch.Tensor] | None:
        if self._stream is None:
            return self._store.get(k, self.device)
        with torch.cuda.stream(self._stream):
            state = self._store.get(k, self.device)
        self._stream.synchronize()
        return state

    def _wait_prefetch(self) -> None:
        if self._pending is not None:
            self._pending[1].result()

    def _activate(self, k: int) -> None:
        if self._stream_spans:  # nothing to load: step() reads each span's state as it goes
            self._state = {}
            self.active_chunk = k
            self._handle = install(self.model, self.table.grad_spec(k), on_grad=self._grad_callback(),
                                   on_complete=self._step_in_backward if self._in_backward else None)
            return
        if self._pending is not None and self._pending[0] == k:
            state = self._pending[1].result()
            if self._stream is not None:  # allocated on the side stream, used on this one
                for t in (state or {}).values():
                    t.record_stream(torch.cuda.current_stream(self.device))
        else:
            self._wait_prefetch()
            state = self._store.get(k, self.device)
        self._pending = None
        expected = self._state_keys(k)
        if not state:
            state = self._fresh_state(k)
            if self._store.aliased:  # the store holds what the step works on
                self._store.put(k, state)
        elif set(state) != expected:
            raise ChunkftError(f"optimizer state of chunk {k} holds {sorted(set(state) ^ expected)[:3]} unexpectedly")
        self._state = state
        self.active_chunk = k
        self._handle = install(self.model, self.table.grad_spec(k), on_grad=self._grad_callback(),
                                   on_complete=self._step_in_backward if self._in_backward else None)
        if self._prefetch:
            nxt = (k + 1) % self.table.num_chunks
            self._pending = (nxt, self._executor.submit(self._load, nxt))

    def _grad_callback(self) -> GradCallback | None:
        """The scaler's overflow check, then the caller's `on_grad`, for each contribution."""
        check, extra = (self.scaler.check if self.scaler is not None else None), self._on_grad
        if check is None or extra is None:
            return check or extra

        def both(name: str, grad: torch.Tensor) -> None:
            check(name, grad)
            extra(name, grad)

        return both

    def _evict(self) -> None:
        self._handle.remove()
        self._handle = None
        if not self._stream_spans:  # streamed spans are on disk already
            self._store.put(self.active_chunk, self._state)
        self._state = {}
