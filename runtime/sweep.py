"""Fine-tuning methods side by side: learning-rate sweeps and eval loss against wall-clock time.

A `Method` turns a model and a `runtime.train.Schedule` into a `StepOptimizer`:
  - `FullFT()`: torch.optim.AdamW over every parameter;
  - `ChunkFT(chunks=C)`: runtime.chunk_optim.ChunkAdamW over C byte-balanced chunks (state
    resting on the host tier), the same schedule as an `LRSchedule`;
  - `Lora(config)`: runtime.lora adapters (and, with `config.full`, whole modules) under AdamW;
  - `BlockAdam(interval=K)`: BAdam-style block coordinate descent (Luo et al. 2024): one decoder
    layer per block, embeddings, final norm and lm_head frozen, torch.optim.AdamW on the active
    block only, its state dropped at every switch (BAdam keeps no inactive block's moments),
    K steps per block, blocks in a fresh random order every cycle (BAdam's "random" mode).
`ChunkFT`'s typed options, each default the runtime's own behaviour: `order="random"` visits the
chunks in a fresh seeded random permutation every cycle instead of ChunkAdamW's cyclic 0, 1, ...
(written here by choosing the chunk each activation loads; ChunkAdamW itself is unchanged);
`layout="layers"` cuts along layer boundaries (`layer_aligned_table`) instead of byte-balanced
row cuts; `state_format` (runtime.lean_state) and `step_in_backward` are passed to ChunkAdamW.
Each also reports its trainable state: fp32 master + two AdamW moments of what it trains at
any one moment (ChunkFT: its largest chunk), the figure equal-memory comparisons hold equal.

`train_curve` trains one run in segments of `eval_every` steps and records, after each, the
eval loss with the training seconds so far (evaluation excluded): wall-clock from the loop,
and this process's CPU seconds. `lr_sweep` runs a method once per learning rate, every run on
a fresh model and a fresh loader (the same batches), and keeps the best by final eval loss.
`time_to_loss` reads off a curve when it first reaches a target loss.

Known limitations: one process; the time resolution of `time_to_loss` is `eval_every` steps;
`order="random"` overrides ChunkAdamW's private `_activate` (the one place a chunk is chosen), so
it follows that method's signature; BlockAdam keeps no fp32 master (the weights are the master,
as torch AdamW).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from planner.chunks import ChunkSpan, ChunkTable, make_chunk_table_from_model, model_named_shapes
from planner.errors import ChunkftError
from planner.schema import Tier
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule
from runtime.data import PackedLoader
from runtime.lean_state import StateFormat
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


def layer_units(model: nn.Module) -> list[list[str]]:
    """The trainable parameters grouped by the module they belong to, in module order: each
    decoder layer (`...layers.<i>.`) one unit, every other parameter (embeddings, final norm,
    lm_head) a unit of its own."""
    units: list[list[str]] = []
    last_key = None
    for name, _, _ in model_named_shapes(model):
        parts = name.split(".")
        key = ".".join(parts[:parts.index("layers") + 2]) if "layers" in parts[:-1] else name
        if key != last_key:
            units.append([])
            last_key = key
        units[-1].append(name)
    return units


def layer_aligned_table(model: nn.Module, num_chunks: int) -> ChunkTable:
    """C chunks of whole layer units (`layer_units`), contiguous in module order, the split that
    minimises the largest chunk's bytes (a partition of the unit sequence; no tensor is cut)."""
    shapes = {name: (shape, elem) for name, shape, elem in model_named_shapes(model)}
    units = layer_units(model)
    sizes = [sum(math.prod(shapes[n][0]) * shapes[n][1] for n in u) for u in units]
    if not 1 <= num_chunks <= len(units):
        raise ChunkftError(f"layer-aligned chunks: C={num_chunks} must be in 1..{len(units)} (the model's layer units)")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # best[c][i]: smallest largest-chunk over the first i units in c chunks; cut[c][i]: where the last starts
    inf = float("inf")
    best = [[inf] * (len(units) + 1) for _ in range(num_chunks + 1)]
    cut = [[0] * (len(units) + 1) for _ in range(num_chunks + 1)]
    best[0][0] = 0
    for c in range(1, num_chunks + 1):
        for i in range(c, len(units) + 1):
            for j in range(c - 1, i):
                value = max(best[c - 1][j], prefix[i] - prefix[j])
                if value < best[c][i]:
                    best[c][i], cut[c][i] = value, j
    bounds, i = [], len(units)
    for c in range(num_chunks, 0, -1):
        bounds.append((cut[c][i], i))
        i = cut[c][i]
    chunks = []
    for start, end in reversed(bounds):
        chunks.append(tuple(ChunkSpan(param=n, dim=0, start=0, end=shapes[n][0][0] if shapes[n][0] else 1,
                                      nbytes=math.prod(shapes[n][0]) * shapes[n][1])
                            for u in units[start:end] for n in u))
    table = ChunkTable(chunks=tuple(chunks), shapes={n: s for n, (s, _) in shapes.items()})
    table.validate(model_named_shapes(model))
    return table


class _RandomOrderChunkAdamW(ChunkAdamW):
    """ChunkAdamW whose every activation loads the next chunk of a seeded random permutation of
    0..C-1, a fresh permutation each cycle, instead of the chunk ChunkAdamW's cycling rule names
    (state, steps and everything else are ChunkAdamW's own; only the order differs)."""

    def __init__(self, model: nn.Module, table: ChunkTable, *, order_seed: int, **kwargs) -> None:
        self._order_rng = random.Random(order_seed)
        self._order: list[int] = []
        self._num_order = table.num_chunks
        super().__init__(model, table, **kwargs)

    def _activate(self, k: int) -> None:
        if not self._order:
            self._order = list(range(self._num_order))
            self._order_rng.shuffle(self._order)
        super()._activate(self._order.pop(0))


@dataclass(frozen=True, slots=True)
class ChunkFT:
    chunks: int
    update_interval: int = 1
    order: str = "cyclic"
    """"cyclic" (ChunkAdamW's 0, 1, ..., C-1, 0, ...) or "random" (a fresh seeded permutation per cycle)."""
    layout: str = "bytes"
    """"bytes" (make_chunk_table_from_model's byte-balanced row cuts) or "layers" (layer_aligned_table)."""
    state_format: StateFormat = StateFormat()
    step_in_backward: bool = False
    state_tier: Tier = Tier.HOST
    state_dir: str | None = None
    """For the DISK tier."""
    order_seed: int = 0

    def __post_init__(self) -> None:
        if self.order not in ("cyclic", "random"):
            raise ChunkftError(f"chunk order {self.order!r} is unknown; valid: 'cyclic', 'random'")
        if self.layout not in ("bytes", "layers"):
            raise ChunkftError(f"chunk layout {self.layout!r} is unknown; valid: 'bytes', 'layers'")

    @property
    def label(self) -> str:
        extra = [f"K={self.update_interval}"] if self.update_interval != 1 else []
        extra += ["random order"] if self.order == "random" else []
        extra += ["layer-aligned"] if self.layout == "layers" else []
        extra += [self.state_format.describe()] if self.state_format != StateFormat() else []
        extra += ["step in backward"] if self.step_in_backward else []
        return f"ChunkFT C={self.chunks}" + (f" ({', '.join(extra)})" if extra else "")

    def table(self, model: nn.Module) -> ChunkTable:
        if self.layout == "layers":
            return layer_aligned_table(model, self.chunks)
        return make_chunk_table_from_model(model, self.chunks)

    def optimizer(self, model: nn.Module, schedule: Schedule) -> StepOptimizer:
        config, lr_schedule = chunk_schedule(schedule)
        kwargs = dict(config=config, schedule=lr_schedule, update_interval=self.update_interval,
                      state_tier=self.state_tier, state_dir=self.state_dir, state_format=self.state_format,
                      step_in_backward=self.step_in_backward)
        if self.order == "random":
            inner = _RandomOrderChunkAdamW(model, self.table(model), order_seed=self.order_seed, **kwargs)
        else:
            inner = ChunkAdamW(model, self.table(model), **kwargs)
        return _ClosingChunkOptimizer(inner)

    def state_bytes(self, model: nn.Module) -> int:
        table = self.table(model)
        params = dict(model.named_parameters())
        def master_bytes(span) -> int:
            p = params[span.param]
            return span.nbytes // p.element_size() * _master_element_bytes(p)

        return STATE_COPIES * max(sum(map(master_bytes, table.chunks[k])) for k in range(table.num_chunks))


class _BlockAdamOptimizer:
    """StepOptimizer of `BlockAdam`: torch.optim.AdamW over the active block only."""

    def __init__(self, model: nn.Module, blocks: list[list[str]], schedule: Schedule, interval: int, seed: int):
        self.params = dict(model.named_parameters())
        for p in self.params.values():
            p.requires_grad_(False)
        self.blocks = blocks
        self.schedule = schedule
        self.interval = interval
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self.global_step = 0
        self._steps_on_block = 0
        self._inner: TorchAdamW | None = None
        self.active_chunk: int | None = None
        self._switch()

    def _switch(self) -> None:
        if self.active_chunk is not None:
            for n in self.blocks[self.active_chunk]:
                self.params[n].requires_grad_(False)
                self.params[n].grad = None
        if not self._order:
            self._order = list(range(len(self.blocks)))
            self._rng.shuffle(self._order)
        self.active_chunk = self._order.pop(0)
        active = {n: self.params[n] for n in self.blocks[self.active_chunk]}
        for p in active.values():
            p.requires_grad_(True)
        # fresh moments for the new block (BAdam drops the old block's); the schedule continues
        self._inner = TorchAdamW(active, schedule=_OffsetSchedule(self.schedule, self.global_step))
        self._steps_on_block = 0

    def begin_step(self) -> None:
        self._inner.begin_step()

    def backward(self, loss: torch.Tensor) -> None:
        self._inner.backward(loss)

    def step(self) -> bool:
        stepped = self._inner.step()
        if stepped:
            self.global_step += 1
            self._steps_on_block += 1
            if self._steps_on_block >= self.interval and len(self.blocks) > 1:
                self._switch()
        return stepped

    @property
    def lr(self) -> float:
        return self.schedule.at(self.global_step)

    def state_bytes(self) -> int:
        return STATE_COPIES * max(sum(_fp32_bytes(self.params[n]) for n in b) for b in self.blocks)

    def close(self) -> None:
        for p in self.params.values():
            p.grad = None
            p.requires_grad_(True)


@dataclass(frozen=True, slots=True)
class _OffsetSchedule:
    """`base` seen from global step `offset`: a fresh TorchAdamW continues the run's schedule."""

    base: Schedule
    offset: int

    def at(self, step: int) -> float:
        return self.base.at(self.offset + step)


@dataclass(frozen=True, slots=True)
class BlockAdam:
    """BAdam-style block coordinate descent (see the module docstring)."""

    interval: int = 50
    seed: int = 0

    @property
    def label(self) -> str:
        return f"BAdam-style blocks (K={self.interval})"

    @staticmethod
    def blocks(model: nn.Module) -> list[list[str]]:
        units = layer_units(model)
        blocks = [u for u in units if any(".layers." in f".{n}" for n in u)]
        if not blocks:
            raise ChunkftError("BAdam-style blocks: the model has no decoder layers (no parameter under 'layers.<i>')")
        return blocks

    def optimizer(self, model: nn.Module, schedule: Schedule) -> StepOptimizer:
        return _BlockAdamOptimizer(model, self.blocks(model), schedule, self.interval, self.seed)

    def state_bytes(self, model: nn.Module) -> int:
        params = dict(model.named_parameters())
        return STATE_COPIES * max(sum(_fp32_bytes(params[n]) for n in b) for b in self.blocks(model))


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
