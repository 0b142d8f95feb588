"""Fine-tuning methods side by side: learning-rate sweeps and eval loss against wall-clock time.

A `Method` turns a model and a `runtime.train.Schedule` into a `StepOptimizer`:
  - `FullFT()`: torch.optim.AdamW over every parameter;
  - `ChunkFT(chunks=C)`: runtime.chunk_optim.ChunkAdamW over C byte-balanced chunks (state
    resting on the host tier), the same schedule as an `LRSchedule`;
  - `Lora(config)`: runtime.lora adapters (and, with `config.full`, whole modules) under AdamW.
Each also reports its trainable state: fp32 master + two AdamW moments of what it trains at
any one moment (ChunkFT: its largest chunk), the figure equal-memory comparisons hold equal.

`train_curve` trains one run in segments of `eval_every` steps and records, after each, the
eval loss with the training seconds so far (evaluation excluded): wall-clock from the loop,
and this process's CPU seconds. `lr_sweep` runs a method once per learning rate, every run on
a fresh model and a fresh loader (the same batches), and keeps the best by final eval loss.
`time_to_loss` reads off a curve when it first reaches a target loss.

Known limitations: one process; the time resolution of `time_to_loss` is `eval_every` steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from planner.chunks import make_chunk_table_from_model
from planner.errors import ChunkftError
from planner.schema import Tier
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule
from runtime.data import PackedLoader
from runtime.lora import LoraConfig, apply_lora
from runtime.train import ChunkOptimizer, LoopConfig, Schedule, StepOptimizer, TorchAdamW, Trainer, evaluate_loss

STATE_COPIES = 3
"""fp32 master + two AdamW moments per trainable element."""


def _master_element_bytes(p: torch.Tensor) -> int:
    """Bytes of one master element: fp32, float64 for a float64 model (as ChunkAdamW keeps)."""
    return 8 if p.dtype == torch.float64 else 4


def _fp32_bytes(p: torch.Tensor) -> int:
    return p.numel() * _master_element_bytes(p)


class Method(Protocol):
    label: str

    def optimizer(self, model: nn.Module, schedule: Schedule) -> StepOptimizer:
        """The optimizer for `model` (LoRA attaches its adapters to the model here)."""

    def state_bytes(self, model: nn.Module) -> int:
        """Trainable state at any one moment: fp32 master + 2 moments of what trains."""


@dataclass(frozen=True, slots=True)
class FullFT:
    label: str = "full FT"

    def optimizer(self, model: nn.Module, schedule: Schedule) -> StepOptimizer:
        return TorchAdamW(dict(model.named_parameters()), schedule=schedule)

    def state_bytes(self, model: nn.Module) -> int:
        return STATE_COPIES * sum(_fp32_bytes(p) for p in model.parameters())


class _ClosingChunkOptimizer(ChunkOptimizer):
    def close(self) -> None:
        self.inner.close()


def chunk_schedule(schedule: Schedule) -> tuple[AdamWConfig, LRSchedule]:
    """`schedule` as ChunkAdamW's peak learning rate and multiplier (the same curve)."""
    cosine = schedule.total_steps > schedule.warmup_steps
    return AdamWConfig(lr=schedule.lr), LRSchedule(kind="cosine" if cosine else "constant",
                                                   warmup_steps=schedule.warmup_steps,
                                                   total_steps=schedule.total_steps, min_lr_ratio=schedule.min_ratio)


@dataclass(frozen=True, slots=True)
class ChunkFT:
    chunks: int
    update_interval: int = 1

    @property
    def label(self) -> str:
        return f"ChunkFT C={self.chunks}"

    def optimizer(self, model: nn.Module, schedule: Schedule) -> StepOptimizer:
        config, lr_schedule = chunk_schedule(schedule)
        inner = ChunkAdamW(model, make_chunk_table_from_model(model, self.chunks), config=config,
                           schedule=lr_schedule, update_interval=self.update_interval, state_tier=Tier.HOST)
        return _ClosingChunkOptimizer(inner)

    def state_bytes(self, model: nn.Module) -> int:
        table = make_chunk_table_from_model(model, self.chunks)
        params = dict(model.named_parameters())
        def master_bytes(span) -> int:
            p = params[span.param]
            return span.nbytes // p.element_size() * _master_element_bytes(p)

        return STATE_COPIES * max(sum(map(master_bytes, table.chunks[k])) for k in range(table.num_chunks))


@dataclass(frozen=True, slots=True)
class Lora:
    config: LoraConfig

    @property
    def label(self) -> str:
        full = f" + {', '.join(self.config.full)}" if self.config.full else ""
        return f"LoRA r={self.config.rank}{full}"

    def optimizer(self, model: nn.Module, schedule: Schedule) -> StepOptimizer:
        adapters = apply_lora(model, self.config)
        return TorchAdamW(dict(adapters.named_parameters()), schedule=schedule)

    def state_bytes(self, model: nn.Module) -> int:
        trainable = {p: p.requires_grad for p in model.parameters()}
        probe = apply_lora(model, self.config)  # attached and taken off again; the model is left as it was
        try:
            return STATE_COPIES * sum(_fp32_bytes(p) for p in probe.parameters())
        finally:
            probe.remove()
            for p, flag in trainable.items():
                p.requires_grad_(flag)


@dataclass(frozen=True, slots=True)
class CurvePoint:
    step: int
    seconds: float
    """Wall-clock training seconds up to this step (evaluation excluded)."""
    cpu_seconds: float
    """This process's CPU seconds over the same training (all threads)."""
    eval_loss: float


@dataclass(slots=True)
class Run:
    method: str
    lr: float
    points: list[CurvePoint] = field(default_factory=list)
    """Step 0 (before training) first, then every `eval_every` steps and the last step."""
    train_losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.points[-1].eval_loss


def train_curve(model: nn.Module, optimizer: StepOptimizer, loader: PackedLoader, eval_batches, *, steps: int,
                eval_every: int = 0) -> tuple[list[CurvePoint], list[float]]:
    """Train `steps` steps in segments of `eval_every` (0: one segment); the eval loss after
    each with the training seconds so far, and every step's training loss."""
    if steps < 1 or eval_every < 0:
        raise ChunkftError(f"a curve needs steps >= 1 and eval_every >= 0, got {steps} and {eval_every}")
    points = [CurvePoint(0, 0.0, 0.0, evaluate_loss(model, eval_batches))]
    losses: list[float] = []
    done, seconds, cpu = 0, 0.0, 0.0
    while done < steps:
        segment = min(eval_every or steps, steps - done)
        cpu_start = time.process_time()
        result = Trainer(model, optimizer, loader, LoopConfig(steps=segment)).train()
        cpu += time.process_time() - cpu_start
        seconds += result.seconds
        done += segment
        losses += result.losses
        points.append(CurvePoint(done, seconds, cpu, evaluate_loss(model, eval_batches)))
    return points, losses


def run_method(method: Method, model: nn.Module, lr: float, loader: PackedLoader, eval_batches, *, steps: int,
               eval_every: int = 0, warmup_steps: int = 0, seed: int = 0) -> Run:
    """One run of `method` at constant peak learning rate `lr` (after `warmup_steps`). The
    global RNG is seeded with `seed` first: LoRA's A matrices start the same in every run."""
    torch.manual_seed(seed)
    optimizer = method.optimizer(model, Schedule(lr=lr, warmup_steps=warmup_steps))
    try:
        points, losses = train_curve(model, optimizer, loader, eval_batches, steps=steps, eval_every=eval_every)
    finally:
        close = getattr(optimizer, "close", None)
        if close is not None:
            close()
    return Run(method.label, lr, points, losses)


@dataclass(slots=True)
class Sweep:
    method: str
    runs: list[Run]
    """One per learning rate, in the order swept."""

    @property
    def best(self) -> Run:
        """The run with the lowest final eval loss (the first such on a tie)."""
        return min(self.runs, key=lambda r: r.final_loss)

    @property
    def losses(self) -> dict[float, float]:
        return {r.lr: r.final_loss for r in self.runs}


def lr_sweep(method: Method, fresh_model: Callable[[], nn.Module], make_loader: Callable[[], PackedLoader],
             eval_batches, lrs: list[float], *, steps: int, eval_every: int = 0, warmup_steps: int = 0) -> Sweep:
    """`method` once per learning rate in `lrs`, each run on `fresh_model()` and
    `make_loader()` (build both deterministically so every run sees the same start and batches)."""
    if len(lrs) < 1:
        raise ChunkftError("a learning-rate sweep needs at least one learning rate")
    runs = [run_method(method, fresh_model(), lr, make_loader(), eval_batches, steps=steps, eval_every=eval_every,
                       warmup_steps=warmup_steps) for lr in lrs]
    return Sweep(runs[0].method, runs)


def time_to_loss(points: list[CurvePoint], target: float) -> CurvePoint | None:
    """The first recorded point at or below `target`, or None if the run never got there."""
    return next((p for p in points if p.eval_loss <= target), None)
