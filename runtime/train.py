"""The training loop: one recipe that reads top to bottom.

    for each optimizer step:
        for each micro-batch (gradient accumulation):
            loss, held = planner.step.loop_forward(model, ids, labels, loop=...)  # the traced step
                                            # (held: the plain HF loop's output, kept through backward)
            backward of loss / accumulation (times the fp16 loss scale)
        optimizer.step()   # ChunkAdamW: clip, skip on overflow, update the active chunk, cycle
        periodic eval loss, checkpoint, trace flush

The optimizer is anything that satisfies `StepOptimizer`: `runtime.chunk_optim.ChunkAdamW`
behind a thin adapter for ChunkFT plans (see runtime.run_cli), or `TorchAdamW` below, plain
torch.optim.AdamW over a parameter list, used for full fine-tuning and LoRA baselines.

`Trainer.train` is resumable: with `out_dir` it writes checkpoints (runtime.checkpoint) holding
the weights, the optimizer's state, the data position, the step and the RNG states; a Trainer
built the same way and `resume`d continues bit for bit on CPU.

Known limitations: one process, one device; evaluation runs the full eval set each time.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from planner.schema import Component, EventKind, Phase, Tier
from planner.step import loop_forward, step_loss
from runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from runtime.data import IGNORE_INDEX, DataPosition, PackedLoader
from runtime.guard import DEFAULT_MAX_NONFINITE_STEPS, SkipGuard, first_nonfinite, nonfinite_flag
from runtime.memtrace import TraceWriter


class StepOptimizer(Protocol):
    """What the loop needs from an optimizer."""

    def begin_step(self) -> None:
        """Before the first backward of a step: clear gradients, arm the active chunk."""

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), times the fp16 loss scale where there is one."""

    def step(self) -> bool:
        """Apply the accumulated gradients; False if the step was skipped (a non-finite
        gradient: nothing was written to weights or state)."""

    @property
    def active_chunk(self) -> int | None: ...

    @property
    def lr(self) -> float: ...

    def tier_bytes(self) -> dict[Tier, dict[Component, int]]:
        """Live bytes of optimizer state and gradients per tier and component."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """Learning rate as a function of the number of optimizer steps taken."""

    lr: float
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""
    total_steps: int = 0
    """Cosine decay to `min_ratio * lr` by this step (0 = constant after warm-up)."""
    min_ratio: float = 0.0

    def at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.total_steps <= self.warmup_steps:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class TorchAdamW:
    """torch.optim.AdamW over `params` with a `Schedule` and global-norm clipping: the full
    fine-tuning and LoRA baselines. No fp16 scaling (run these in fp32 or bf16)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], *, schedule: Schedule, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_grad_norm: float | None = None,
                 max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS):
        self.params = params
        self.schedule = schedule
        self.max_grad_norm = max_grad_norm
        self.guard = SkipGuard(max_nonfinite_steps)
        self.last_skip: str | None = None
        self.steps_taken = 0
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=schedule.at(0), betas=betas, eps=eps,
                                           weight_decay=weight_decay, foreach=False)

    def begin_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> bool:
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        device = next(iter(self.params.values())).device
        if bool(nonfinite_flag(grads.values(), device)):
            self.last_skip = f"inf/nan in the accumulated gradient of {first_nonfinite(grads)!r}"
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.skipped(self.last_skip)
            return False
        self.last_skip = None
        self.guard.stepped()
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.at(self.steps_taken)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm, foreach=False)
        self.optimizer.step()
        self.steps_taken += 1
        return True

    @property
    def active_chunk(self) -> int | None:
        return None

    @property
    def lr(self) -> float:
        return self.schedule.at(self.steps_taken)

    def tier_bytes(self) -> dict[Tier, dict[Component, int]]:
        grads = sum(p.grad.nbytes for p in self.params.values() if p.grad is not None)
        moments = sum(t.nbytes for s in self.optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
        return {Tier.GPU: {Component.GRADIENTS: grads, Component.OPTIMIZER: moments}}

    def state_dict(self) -> dict:
        # torch's state is keyed by parameter index; key it by name so a checkpoint is readable.
        names = list(self.params)
        inner = self.optimizer.state_dict()
        state = {names[i]: {k: v for k, v in s.items()} for i, s in inner["state"].items()}
        return {"steps_taken": self.steps_taken, "state": state}

    def load_state_dict(self, state: dict) -> None:
        names = list(self.params)
        inner = self.optimizer.state_dict()
        inner["state"] = {names.index(n): dict(s) for n, s in state["state"].items()}
        self.optimizer.load_state_dict(inner)
        self.steps_taken = int(state["steps_taken"])


class ChunkOptimizer:
    """runtime.chunk_optim.ChunkAdamW behind `StepOptimizer`: the one place the loop meets it.

    Accounting: the working state on the step device (the active chunk's copy and the
    prefetched chunk's) is reported as Tier.GPU (the CPU itself in a CPU-only run); every
    chunk's resting state on the plan's state tier (for the GPU tier, and a host step stepping
    its host state in place, that is all of it, counted once). Master : moments as the state
    format holds them (`ChunkAdamW.split_bytes`: 1 : 2 for fp32 state).
    """

    def __init__(self, inner) -> None:
        self.inner = inner  # a runtime.chunk_optim.ChunkAdamW
        self.last = None  # the last StepResult

    @property
    def adamw(self):
        """The ChunkAdamW that holds the state, config and schedule (the inner optimizer here)."""
        return self.inner

    def begin_step(self) -> None:
        self.inner.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.inner.backward(loss)

    def step(self) -> bool:
        self.last = self.inner.step()
        return self.last.stepped

    @property
    def last_skip(self) -> str | None:
        return None if self.last is None else self.last.skipped_because

    @property
    def active_chunk(self) -> int | None:
        return self.inner.active_chunk

    @property
    def lr(self) -> float:
        return self.inner.lr()

    def tier_bytes(self) -> dict[Tier, dict[Component, int]]:
        working = self.inner.split_bytes(self.inner.working_bytes())
        tier, resting = self.inner.resting_bytes()
        tiers = {Tier.GPU: {Component.MASTER: working[0], Component.OPTIMIZER: working[1],
                            Component.GRADIENTS: sum(g.nbytes for g in self.inner.handle.grads().values())}}
        if resting:
            master, moments = self.inner.split_bytes(resting)
            parts = tiers.setdefault(tier, {})
            parts[Component.MASTER] = parts.get(Component.MASTER, 0) + master
            parts[Component.OPTIMIZER] = parts.get(Component.OPTIMIZER, 0) + moments
        return tiers

    def state_dict(self) -> dict:
        tensors, meta = self.adamw.state_dict()
        scaler = self.inner.scaler.state_dict() if self.inner.scaler is not None else None
        return {"tensors": tensors, "meta": meta, "scaler": scaler}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["tensors"], state["meta"])
        if self.inner.scaler is not None and state.get("scaler") is not None:
            self.inner.scaler.load_state_dict(state["scaler"])


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopConfig:
    """How the loop runs (the optimizer carries the learning-rate and chunk settings)."""

    steps: int
    """Optimizer steps to run in total (a resumed run counts the steps already done)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    loss_chunk_tokens: int = 0
    """0 = the model's own loss; >0 = chunked lm_head + cross-entropy (planner.step)."""
    loop: str = "chunkft"
    """The plan's recipe loop (planner.step.loop_forward): chunkft's step or the plain "hf" loop,
    whose output stays alive through backward as in the user's own loop."""
    offload_activations: bool = False
    """The recipe's --offload-activations: what autograd saves in forward and loss goes to (pinned)
    host memory and comes back for backward (planner.activations.OffloadHooks, save_on_cpu's
    mechanism, as the planner traces it)."""
    eval_every: int = 0
    """Evaluate every this many steps, and at the end (0 = only at the end, if an eval set)."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps, and at the end (0 = only at the end, if out_dir)."""
    keep_checkpoints: int = 2
    progress: bool = False
    """Show a tqdm progress bar with loss and tokens/s."""


@dataclass(kw_only=True)
class TrainResult:
    """What a run did: per-step mean training loss, eval losses and throughput."""

    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    step_peaks: list[int] = field(default_factory=list)
    """CPU runs with a trace: each step's malloc peak above the bytes live when it started."""
    skipped_steps: int = 0
    skip_reasons: list[tuple[int, str]] = field(default_factory=list)
    """(step, why) of each skipped step."""
    tokens: int = 0
    seconds: float = 0.0
    final_step: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches, *, loss_chunk_tokens: int = 0) -> float:
    """Mean next-token loss over all labelled tokens of `batches` (token-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, labels in batches:
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if n == 0:
            continue
        loss = step_loss(model, ids.to(device), labels.to(device), loss_chunk_tokens=loss_chunk_tokens)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


class Trainer:
    """Runs `LoopConfig.steps` optimizer steps of `model` on `loader`'s batches."""

    def __init__(self, model: torch.nn.Module, optimizer: StepOptimizer, loader: PackedLoader, config: LoopConfig, *,
                 eval_batches=None, out_dir: str | Path | None = None, trace: TraceWriter | None = None,
                 run_state: dict | None = None, streamer=None) -> None:
        self.model = model
        self.streamer = streamer  # runtime.stream.LayerStreamer for a plan that streams weights
        self.optimizer = optimizer
        self.loader = loader
        self.config = config
        self.eval_batches = eval_batches
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.trace = trace
        self.run_state = dict(run_state or {})  # fingerprints etc., stored in checkpoints
        self.warn = None  # callable(str) told about each skipped step (the CLI prints a warning)
        self.step = 0
        self.device = next(model.parameters()).device

    # -- resume ------------------------------------------------------------------------------
    def resume(self, path: str | Path | None = None, *, allow_changed: frozenset[str] = frozenset()) -> bool:
        """Continue from checkpoint `path` (default: out_dir's latest); False if none exists.

        Refused (ChunkftError, nothing loaded) when the checkpoint was written for another
        model, plan or data (fingerprints), or, if this run records its arguments
        (`run_state["args"]`, runtime.outdir.run_arguments), with other values of them than
        the names in `allow_changed`."""
        if path is None:
            assert self.out_dir is not None
            path = latest_checkpoint(self.out_dir)
            if path is None:
                return False

        def check(state: dict) -> None:
            from planner.errors import ChunkftError
            from runtime.outdir import check_same_arguments

            for key in sorted(k for k in self.run_state if k.endswith("_fingerprint")):  # model, plan, data
                mine, theirs = self.run_state.get(key), state.get(key)
                if mine is not None and theirs is not None and mine != theirs:
                    raise ChunkftError(f"checkpoint {str(path)!r} was written for another {key.split('_')[0]} "
                                       f"({key} {theirs[:12]}, this run has {mine[:12]})")
            if "args" in self.run_state:
                check_same_arguments(self.run_state["args"], state.get("args"), where=f"checkpoint {str(path)!r}",
                                     allow=allow_changed)

        ckpt = load_checkpoint(path, model=self.model, check=check)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.loader.position = DataPosition.from_json(ckpt.state["data"])
        self.step = ckpt.step
        return True

    def save(self) -> Path:
        assert self.out_dir is not None
        return save_checkpoint(self.out_dir, step=self.step, model=self.model,
                               optimizer_state=self.optimizer.state_dict(),
                               state={"data": self.loader.position.to_json(), **self.run_state},
                               keep=self.config.keep_checkpoints)

    # -- accounting for the trace ---------------------------------------------------------------
    def tier_bytes(self) -> dict[Tier, dict[Component, int]]:
        tiers = {tier: dict(parts) for tier, parts in self.optimizer.tier_bytes().items()}
        weights = sum(p.nbytes for p in self.model.parameters())  # parameters() lists tied ones once
        if self.streamer is not None:  # streamed layers: on the device only while they compute
            weights -= sum(t.nbytes for t in self.streamer.host_weights().values())
            weights += self.streamer.device_bytes()
            host = tiers.setdefault(Tier.HOST, {})
            host[Component.WEIGHTS] = host.get(Component.WEIGHTS, 0) + self.streamer.host_bytes()
        tiers.setdefault(Tier.GPU, {})[Component.WEIGHTS] = weights
        return tiers

    def _event(self, kind: EventKind, phase: Phase | None = None, name: str | None = None,
               peak: int | None = None) -> None:
        if self.trace is not None:
            self.trace.step, self.trace.chunk = self.step, self.optimizer.active_chunk
            self.trace.record(kind, phase=phase, name=name, peak=peak)

    # -- the loop ----------------------------------------------------------------------------
    def _saved_tensors(self):
        """Where forward's saved tensors wait for backward: host memory with --offload-activations."""
        if not self.config.offload_activations:
            return contextlib.nullcontext()
        from planner.activations import OffloadHooks

        return OffloadHooks()

    def _sampler(self):
        """A per-op malloc sampler for the step when a CPU trace is being written (the op-level
        peak that event sampling misses), else a no-op context."""
        if self.trace is None or self.device.type != "cpu" or (
                self.trace.max_steps is not None and self.step >= self.trace.max_steps):
            return contextlib.nullcontext()
        from planner.measure import MallocSampler

        return MallocSampler()

    def train(self, *, stop_after: int | None = None) -> TrainResult:
        """Run until `config.steps` (or, to simulate a kill, return right after step
        `stop_after` and its checkpoint)."""
        cfg, result = self.config, TrainResult()
        self.model.train()
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True)
        start = time.perf_counter()
        while self.step < cfg.steps:
            chunk_before = self.optimizer.active_chunk
            self.optimizer.begin_step()
            batches = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
            step_loss_sum = torch.zeros((), device=self.device)
            with self._sampler() as sampler:
                for ids, labels in batches:
                    ids, labels = ids.to(self.device), labels.to(self.device)
                    self._event(EventKind.PHASE, Phase.FORWARD)
                    with self._saved_tensors():
                        loss, held = loop_forward(self.model, ids, labels, loop=cfg.loop,
                                                  loss_chunk_tokens=cfg.loss_chunk_tokens)
                    self._event(EventKind.PHASE, Phase.BACKWARD)
                    self.optimizer.backward(loss / cfg.grad_accum)
                    del held
                    step_loss_sum += loss.detach().float()  # no device sync per micro-batch
                    result.tokens += ids.numel()
                    del loss
                if self.streamer is not None:  # the optimizer writes the host copy of the layers
                    self.streamer.after_backward()
                self._event(EventKind.PHASE, Phase.OPTIMIZER)
                stepped = self.optimizer.step()
            why = None if stepped else (getattr(self.optimizer, "last_skip", None) or "non-finite gradient")
            if why is not None:
                result.skipped_steps += 1
                result.skip_reasons.append((self.step + 1, why))
                if self.warn is not None:
                    self.warn(f"step {self.step + 1} skipped: {why}")
            self._event(EventKind.OPTIMIZER_STEP, name="step" if stepped else f"skipped ({why})")
            if self.optimizer.active_chunk != chunk_before:
                self._event(EventKind.CHUNK_SWITCH, Phase.CHUNK_SWITCH,
                            name=f"chunk {chunk_before} -> {self.optimizer.active_chunk}")
            peak = None
            if sampler is not None:  # CPU trace: the step's op-level peak, on the trace's baseline
                result.step_peaks.append(sampler.result.peak_bytes)
                peak = sampler.result.peak_bytes + sampler.result.baseline_bytes - self.trace.cpu_baseline_bytes
            self._event(EventKind.STEP_END, peak=peak)
            self.step += 1
            result.losses.append(float(step_loss_sum) / cfg.grad_accum)
            last = self.step == cfg.steps or self.step == stop_after
            if self.eval_batches is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                result.eval_losses.append((self.step, evaluate_loss(self.model, self.eval_batches,
                                                                    loss_chunk_tokens=cfg.loss_chunk_tokens)))
            if self.out_dir is not None and (last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)):
                self.save()
                if self.trace is not None:
                    self.trace.flush()
            if bar is not None:
                elapsed = time.perf_counter() - start
                postfix = {"loss": f"{result.losses[-1]:.4f}", "tok/s": f"{result.tokens / max(elapsed, 1e-9):.0f}"}
                if result.eval_losses:
                    postfix["eval"] = f"{result.eval_losses[-1][1]:.4f}"
                bar.set_postfix(postfix)
                bar.update(1)
            if self.step == stop_after:
                break
        if bar is not None:
            bar.close()
        result.seconds = time.perf_counter() - start
        result.final_step = self.step
        if self.trace is not None:
            self.trace.flush()
        return result
