"""NVMSA-style offloading: every gradient leaves the device as it is produced, in 16 bits.

"Memory-optimized offloading" (NVMSA 2025, see DESIGN.md) in the runtime, for full fine-tuning
(a one-chunk table) and for ChunkFT chunks alike:

- Instant gradient offload. `runtime.subgrad` calls `on_grad(name, g)` with each gradient
  contribution the moment backward produces it (a tensor hook for whole tensors, the slice
  Function for sub-tensors). `OffloadAdamW` copies it to a 16-bit host buffer (pinned when
  CUDA is there) or appends it to a disk staging file (`runtime.disk_store.DiskLog`), and
  drops the device copy the next time a gradient arrives (and after backward): at most the
  gradient being produced plus the last one exist on the device, never a full gradient set
  (the planner's `STAGING_BUFFERS = 2`).
- fp16-centric exchange. Gradients travel and rest in the training dtype (or `staging_dtype`,
  e.g. bf16 for an fp32 model); the fp32 cast happens inside the optimizer, one span at a time
  (`ChunkAdamW._grad32`).
- Host optimizer. The AdamW math and the fp32 master + moment state are ChunkAdamW's with
  `device="cpu"`. State on host: every chunk's in host memory. State on disk: streamed span by
  span (ChunkAdamW's `stream_state`): each span's master and moments are read from their own
  crc32-checked file, stepped and written back atomically, so host memory holds one span's
  state at a time, for C = 1 as for ChunkFT chunks (the planner's block-stepped host
  optimizer). The updated weights go back to the device already cast to 16 bits.
- On-the-fly overflow detection (fp16). ChunkAdamW runs `LossScaler.check` on each
  contribution before staging sees it; staging reads the flag (one sync, which the copy to
  host needs anyway) and, on the first non-finite gradient, abandons the step: what was staged
  is discarded and nothing more is staged until `step()`, which skips the update and backs the
  scale off. No whole-model check at the end, no extra copy of the gradients.

Gradient accumulation over micro-batches accumulates in 16 bits, exactly as the on-device
path does (autograd adds into a bf16 `.grad`; subgrad adds into a bf16 slice): on host, each
contribution is added into the staged 16-bit buffer; on disk, each micro-batch's contribution
is appended and the optimizer sums them in production order, in 16 bits, when it reads them.
On CPU the offloaded step is bit for bit the on-device ChunkAdamW step (tests/test_offload.py).

Known limitations:
- Disk staging keeps every micro-batch's contribution until the step (accum x 16-bit gradient
  bytes on disk; the planner counts one copy).
- A skipped (overflowing) step still runs the rest of its backward passes; their gradients are
  dropped as they arrive instead of staged.
- The CUDA path (pinned buffers, non-blocking copies) is written for CUDA and tested on CPU.
- State on disk is read and written synchronously, one span at a time (no prefetch of the
  next span); a span is a whole tensor (the embedding of a 128K vocabulary is 6 GB of fp32
  state), and the planner sizes the host window by the largest span accordingly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from planner.chunks import ChunkTable
from planner.errors import ChunkftError
from planner.schema import Component, Tier
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule, StepResult
from runtime.disk_store import DiskLog, Opener
from runtime.lean_state import StateFormat
from runtime.scaler import LossScaler
from runtime.train import ChunkOptimizer


class _HostStaging:
    """16-bit gradients in host buffers, one per trained span, reused from step to step."""

    tier = Tier.HOST

    def __init__(self, pin: bool) -> None:
        self._pin = pin
        self._buffers: dict[str, torch.Tensor] = {}
        self._filled: set[str] = set()

    def add(self, name: str, grad: torch.Tensor) -> None:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != grad.shape or buf.dtype != grad.dtype:
            buf = self._buffers[name] = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=self._pin)
        if name in self._filled:  # a later micro-batch: add in 16 bits, as autograd's .grad does
            buf.add_(grad.to("cpu"))
        else:
            buf.copy_(grad, non_blocking=self._pin)
            self._filled.add(name)

    def grads(self) -> Mapping[str, torch.Tensor]:
        if self._pin:
            torch.cuda.synchronize()  # the non-blocking copies have landed
        return {n: self._buffers[n] for n in self._filled}

    def clear(self, *, release: bool) -> None:
        """Forget the staged values; `release` also frees the buffers (a chunk switch)."""
        self._filled.clear()
        if release:
            self._buffers.clear()

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def close(self) -> None:
        self.clear(release=True)


class _DiskGrads(Mapping[str, torch.Tensor]):
    """Staged gradients read back on demand: each name's contributions summed in 16 bits."""

    def __init__(self, log: DiskLog) -> None:
        self._log = log

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = self._log.read_all(name)
        if not parts:
            raise KeyError(name)
        total = parts[0]
        for p in parts[1:]:
            total.add_(p)
        return total

    def __iter__(self) -> Iterator[str]:
        return iter(self._log.keys())

    def __len__(self) -> int:
        return len(self._log.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._log


class _DiskStaging:
    """16-bit gradients appended to one staging file per step under `directory`."""

    tier = Tier.DISK

    def __init__(self, directory: Path, opener: Opener) -> None:
        self._log = DiskLog(directory, "grads.bin", opener=opener)

    def add(self, name: str, grad: torch.Tensor) -> None:
        self._log.append(name, grad)

    def grads(self) -> Mapping[str, torch.Tensor]:
        self._log.seal()
        return _DiskGrads(self._log)

    def clear(self, *, release: bool) -> None:
        self._log.remove()  # the next step starts a fresh file: disk space goes back every step

    def nbytes(self) -> int:
        return self._log.nbytes()

    def close(self) -> None:
        self._log.remove()


class OffloadAdamW:
    """ChunkAdamW on the host, fed by gradients staged in 16 bits on host or disk.

    Args (as ChunkAdamW, plus):
        staging: Tier.HOST or Tier.DISK, where gradients rest until the step.
        staging_dir: directory of the disk staging file (required for Tier.DISK).
        staging_dtype: dtype gradients are staged in (default: each parameter's own; bf16 or
            fp16 for an fp32 model rounds them, as the NVMSA exchange does).
        opener: the disk log's file opener (tests inject write failures through it).

    Use like ChunkAdamW: `backward(loss)` per micro-batch, then `step()`.
    """

    def __init__(self, model: nn.Module, table: ChunkTable, *, staging: Tier, staging_dir: str | os.PathLike | None = None,
                 staging_dtype: torch.dtype | None = None, config: AdamWConfig | None = None,
                 schedule: LRSchedule | None = None, update_interval: int = 1, state_tier: Tier = Tier.HOST,
                 state_dir: str | os.PathLike | None = None, prefetch_depth: int = 1,
                 scaler: LossScaler | None = None, opener: Opener = open, max_nonfinite_steps: int | None = None,
                 run_id: str | None = None, weights: dict[str, torch.Tensor] | None = None,
                 state_format: StateFormat | None = None) -> None:
        if staging == Tier.HOST:
            first = next(model.parameters())
            self._staging: _HostStaging | _DiskStaging = _HostStaging(pin=first.device.type == "cuda")
        elif staging == Tier.DISK:
            if staging_dir is None:
                raise ChunkftError("gradient staging on disk needs a staging directory (staging_dir)")
            self._staging = _DiskStaging(Path(staging_dir), opener)
        else:
            raise ChunkftError(f"gradient staging tier {staging!r} is not valid; valid: 'host', 'disk'")
        if state_tier == Tier.GPU:
            raise ChunkftError("offloaded gradients are stepped on the host; the state tier must be 'host' or "
                               "'disk', not 'gpu'")
        self.staging_dtype = staging_dtype
        self.scaler = scaler
        self._abandoned = False
        self.staged_count = 0  # gradient contributions staged in the current step
        self.inner = ChunkAdamW(model, table, config=config, schedule=schedule, update_interval=update_interval,
                                state_tier=state_tier, state_dir=state_dir, device="cpu",
                                prefetch_depth=prefetch_depth, scaler=scaler, on_grad=self._on_grad,
                                stream_state=state_tier == Tier.DISK, run_id=run_id, weights=weights,
                                state_format=state_format,
                                **({} if max_nonfinite_steps is None else {"max_nonfinite_steps": max_nonfinite_steps}))

    # -- the ChunkAdamW-like surface ---------------------------------------------------------
    @property
    def active_chunk(self) -> int:
        return self.inner.active_chunk

    @property
    def table(self) -> ChunkTable:
        return self.inner.table

    @property
    def model(self) -> nn.Module:
        return self.inner.model

    def lr(self) -> float:
        return self.inner.lr()

    def zero_grad(self) -> None:
        """Forget staged gradients and any device gradient (start of a step)."""
        self.inner.zero_grad()
        self._staging.clear(release=False)
        self.staged_count = 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; its gradients are staged as they are produced."""
        self.inner.backward(loss)
        self.inner.handle.zero_grad()  # the last gradient produced leaves the device too

    def step(self) -> StepResult:
        """AdamW on the host from the staged gradients (skipped if the step overflowed)."""
        if self._abandoned or (self.scaler is not None and self.scaler.overflowed()):
            result = self.inner.step()  # the scaler's flag is set: ChunkAdamW skips and backs off
            assert not result.stepped
        else:
            result = self.inner.step(grads=self._staging.grads())
        self._abandoned = False
        self._staging.clear(release=result.switched_to is not None)
        self.staged_count = 0
        return result

    def staged_bytes(self) -> dict[Tier, int]:
        """Bytes of staged gradients on their tier (host buffers stay allocated between steps)."""
        return {self._staging.tier: self._staging.nbytes()}

    def close(self) -> None:
        self.inner.close()
        self._staging.close()

    # -- the callback ------------------------------------------------------------------------
    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        """Runs once per gradient contribution, after the scaler's check of it."""
        # Drop the previous gradient from the device: whole tensors' .grad and the slice side
        # table (this one is stored by subgrad after we return, and dropped at the next call).
        self.inner.handle.zero_grad()
        if self._abandoned:
            return
        if self.scaler is not None and self.scaler.overflowed():
            self._abandoned = True  # stop staging; step() skips and backs off the scale
            self._staging.clear(release=False)
            return
        g = grad.detach()
        if self.staging_dtype is not None and g.dtype != self.staging_dtype:
            g = g.to(self.staging_dtype)
        self._staging.add(name, g)
        self.staged_count += 1


class OffloadOptimizer(ChunkOptimizer):
    """OffloadAdamW behind runtime.train's `StepOptimizer` (what `chunkft run` uses).

    Accounting: nothing of the optimizer on the compute device; the active chunk's master and
    moments (in the state format) on the host; resting chunks on the plan's state tier; staged 16-bit
    gradients on the staging tier (Component.GRADIENTS).
    """

    inner: OffloadAdamW  # begin_step/backward/step/active_chunk/lr/state_dict as ChunkOptimizer's

    @property
    def adamw(self) -> ChunkAdamW:
        return self.inner.inner

    def tier_bytes(self) -> dict[Tier, dict[Component, int]]:
        tiers: dict[Tier, dict[Component, int]] = {}

        def put(tier: Tier, component: Component, n: int) -> None:
            if n:
                parts = tiers.setdefault(tier, {})
                parts[component] = parts.get(component, 0) + n

        # ChunkAdamW.state_bytes reports its step device's bytes under the compute tier's name;
        # the step device is the host here. Master : moments as the state format holds them.
        for tier, n in self.adamw.state_bytes().items():
            tier = Tier.HOST if tier == Tier.GPU else tier
            master, moments = self.adamw.split_bytes(n)
            put(tier, Component.MASTER, master)
            put(tier, Component.OPTIMIZER, moments)
        for tier, n in self.inner.staged_bytes().items():
            put(tier, Component.GRADIENTS, n)
        return tiers
