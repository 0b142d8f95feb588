"""The runtime's measured memory trace, in the simulator's event schema (planner.schema).

Every event records, for the compute tier (Tier.GPU, which is the CPU itself in a CPU-only run),
what the process allocator says and what the runtime's own accounting says:
  - on CUDA: `allocated` = torch.cuda.memory_allocated, `reserved` = memory_reserved, `peak` =
    max_memory_allocated since the previous event (the counter is reset after each read);
  - on CPU: `allocated` = glibc mallinfo2 (uordblks + hblkhd) minus a baseline read before the
    model was built (so weights, optimizer state and activations all count, as the planner's
    compute tier counts them), `reserved` = the same (no caching allocator); `peak` only on STEP_END events,
    where the trainer ran the step under planner.measure.MallocSampler (sampled after every
    aten op), on the same baseline.
`bytes` is the runtime's accounting per Component on that tier (weights, gradients, masters,
moments). Host and disk tiers get their own events whenever their accounted bytes change
(chunk switches, transfers): `allocated` there is the accounted total.

Events come from module hooks (a decoder layer starts, in forward, recompute or backward) and
from the training loop (phase starts, optimizer step, chunk switch, step end). The file is
written atomically at the end and whenever `flush()` is called.

A parallel run (runtime.distributed) writes one trace per rank, `rank_trace_path(path, r)`
(traces/NAME.jsonl -> traces/NAME.rank{r}.jsonl), each in this schema with the rank's own
measurements and accounting.

Known limitations: CPU events other than STEP_END sample between ops of interest only; on
CPU the host tier is the same memory as the compute tier, so its bytes are accounted, not
measured separately.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from planner.fsio import atomic_write_jsonl
from planner.schema import TIMELINE_SCHEMA_VERSION, Component, Event, EventKind, Phase, Tier

Accounting = Callable[[], dict[Tier, dict[Component, int]]]
"""Returns the runtime's live bytes per tier and component (the trainer provides it)."""


def _cpu_allocated_bytes() -> int:
    """Bytes the process has allocated through malloc (planner.measure's reading)."""
    from planner.measure import malloc_in_use_bytes

    return malloc_in_use_bytes()


def rank_trace_path(path: str | os.PathLike, rank: int) -> str:
    """Rank `rank`'s trace file of a parallel run traced to `path`: NAME.jsonl -> NAME.rank{rank}.jsonl."""
    path = os.fspath(path)
    stem = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
    return f"{stem}.rank{rank}.jsonl"


class TraceWriter:
    """Collects `Event`s for one run and writes them as a trace file (header + events)."""

    def __init__(self, path: str | os.PathLike | None, *, device: torch.device, accounting: Accounting,
                 model_fingerprint: str, plan_fingerprint: str | None, extra_header: dict | None = None,
                 cpu_baseline_bytes: int | None = None, max_steps: int | None = None) -> None:
        self.path = path
        self.max_steps = max_steps  # record steps 0..max_steps-1 only (None: all): a trace is for
        # memory analysis, and a long run's every layer event would grow without bound
        self.device = torch.device(device)
        self.accounting = accounting
        self.events: list[Event] = []
        self.header = {"event": EventKind.HEADER.value, "schema_version": TIMELINE_SCHEMA_VERSION, "kind": "trace",
                       "t_unit": "s", "model_fingerprint": model_fingerprint, "plan_fingerprint": plan_fingerprint,
                       "device": str(self.device),
                       "allocator": "cuda" if self.device.type == "cuda" else "cpu", **(extra_header or {})}
        self.step = 0
        self.phase: Phase | None = None
        self.chunk: int | None = None
        self._t0 = time.perf_counter()
        self._last_offtier: dict[Tier, dict[Component, int]] = {}
        self._hooks: list = []
        self._layer_index: dict[int, int] = {}
        if self.device.type == "cuda":
            self.cpu_baseline_bytes = 0
        else:  # give the reading from before the model was built, so weights and state count
            self.cpu_baseline_bytes = cpu_baseline_bytes if cpu_baseline_bytes is not None else _cpu_allocated_bytes()
        self.header["cpu_baseline_bytes"] = self.cpu_baseline_bytes

    # -- sampling ---------------------------------------------------------------------------
    def _measure(self) -> tuple[int, int, int | None]:
        if self.device.type == "cuda":
            allocated = torch.cuda.memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return allocated, reserved, peak
        allocated = _cpu_allocated_bytes() - self.cpu_baseline_bytes
        return allocated, allocated, None

    def record(self, kind: EventKind, *, phase: Phase | None = None, layer: int | None = None,
               name: str | None = None, peak: int | None = None) -> None:
        """Append one compute-tier event, plus host/disk events where their bytes changed.
        `peak` overrides the measured peak (a CPU step's op-level peak from the trainer)."""
        if phase is not None:
            self.phase = phase
        if self.max_steps is not None and self.step >= self.max_steps:
            return
        allocated, reserved, measured_peak = self._measure()
        peak = peak if peak is not None else measured_peak
        tiers = self.accounting()
        t = time.perf_counter() - self._t0
        self.events.append(Event(t=t, event=kind, tier=Tier.GPU, allocated=allocated, reserved=reserved,
                                 bytes=dict(tiers.get(Tier.GPU, {})), phase=self.phase, step=self.step,
                                 layer=layer, chunk=self.chunk, name=name, peak=peak))
        for tier in (Tier.HOST, Tier.DISK):
            now = dict(tiers.get(tier, {}))
            if now != self._last_offtier.get(tier, {}):
                total = sum(now.values())
                self.events.append(Event(t=t, event=EventKind.TRANSFER if kind == EventKind.CHUNK_SWITCH else kind,
                                         tier=tier, allocated=total, reserved=total, bytes=now, phase=self.phase,
                                         step=self.step, chunk=self.chunk, name=name))
                self._last_offtier[tier] = now

    # -- module hooks -------------------------------------------------------------------------
    def attach(self, layers: list[torch.nn.Module]) -> None:
        """Record a LAYER event when each decoder layer starts: in forward, in recompute and in
        backward.

        Forward: a pre-hook on the layer. Recompute: transformers checkpoints a layer's
        `forward`, not `__call__`, so the layer's own hooks do not run again when backward
        re-runs it; a pre-hook on its first container child (attention) does. Backward: a
        tensor hook on the layer's output fires when its gradient arrives, as the tracer marks
        it; no module backward hooks, which would add autograd nodes to the measured step.
        """
        for index, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._forward_pre_hook(index)))
            self._hooks.append(layer.register_forward_hook(self._forward_hook(index)))
            inner = next((c for c in layer.children() if any(True for _ in c.children())), None)
            if inner is not None:
                self._hooks.append(inner.register_forward_pre_hook(self._recompute_hook(index)))

    def _forward_pre_hook(self, index: int):
        def hook(module, args):
            if torch.is_grad_enabled() and self.phase not in (Phase.BACKWARD, Phase.RECOMPUTE):
                self.record(EventKind.LAYER, phase=Phase.FORWARD, layer=index)
        return hook

    def _recompute_hook(self, index: int):
        def hook(module, args):
            if torch.is_grad_enabled() and self.phase in (Phase.BACKWARD, Phase.RECOMPUTE):
                self.record(EventKind.LAYER, phase=Phase.RECOMPUTE, layer=index)
        return hook

    def _forward_hook(self, index: int):
        def on_grad(grad):
            self.record(EventKind.LAYER, phase=Phase.BACKWARD, layer=index)

        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.requires_grad and self.phase == Phase.FORWARD:
                out.register_hook(on_grad)
        return hook

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- output -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the whole trace so far, atomically (a reader never sees half a file)."""
        if self.path is not None:
            atomic_write_jsonl(self.path, [self.header] + [e.to_json() for e in self.events])

    def peak(self, tier: Tier = Tier.GPU) -> int:
        """Largest measured (`peak`, else `allocated`) bytes over the events of `tier`."""
        return max((e.peak if e.peak is not None else e.allocated) for e in self.events if e.tier == tier)
