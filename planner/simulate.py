"""Replay a plan over the op graph: the predicted memory timeline of one step and one switch.

The timeline is what the runtime's trace is held against (planner.schema's layout):

  header   kind "timeline", t_unit "op", model and plan fingerprints, strategy, step time;
  step     the active chunk's training step on the GPU tier, one OP event per traced aten op
           (planner.evaluate.gpu_timeline: trace + CUDA allocator replay + the plan's static
           buffers), with a PHASE event where the phase changes and a LAYER event where a
           decoder layer starts; then the optimizer step and the step end;
  host, disk   the bytes resting on those tiers, per component (an event at the step start and
           one after the optimizer step: the state tiers hold their predicted peak all step);
  switch   for C > 1: a CHUNK_SWITCH event, then TRANSFER events with the bytes each moves:
           evicting the finished chunk's fp32 master and moments from the GPU, and fetching the
           chunk `prefetch_depth` ahead (or, without prefetch, the next one), each followed by
           the tier's bytes after it.

Every event carries the tier's bytes per component after it; `t` counts ops (the switch comes
after the step's last op). The GPU peak over the events equals the plan's predicted GPU peak:
both come from the same replay (a test holds them equal).

Known limitations: host and disk bytes are held constant through the step (the cost model
predicts their peaks, not their course); transfer events have no duration in op units (the
header's step time has the switch cost, amortised, in `step_time_parts_s`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from planner.errors import ChunkftError
from planner.fsio import atomic_write_jsonl
from planner.schema import TIMELINE_SCHEMA_VERSION, Component, Event, EventKind, Phase, Tier
from planner.strategy import OptimizerDevice

if TYPE_CHECKING:
    from planner.hardware import Hardware
    from planner.model import ModelSpec
    from planner.plan import Plan

# fp32 master + two fp32 moments per parameter when training in 16 bits (torch.optim.AdamW
# state: exp_avg, exp_avg_sq); no master when training in fp32.
STATE_BYTES_PER_PARAM = {2: 12, 4: 8}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timeline:
    """A predicted timeline: the header line and the events, in file order."""

    header: dict
    events: tuple[Event, ...]

    def peak_bytes(self, tier: Tier) -> int:
        return max((e.allocated for e in self.events if e.tier == tier), default=0)

    def rows(self) -> list[dict]:
        return [self.header] + [e.to_json() for e in self.events]

    def write(self, path: str | os.PathLike) -> None:
        atomic_write_jsonl(path, self.rows())


def simulate(plan: "Plan", model: "ModelSpec", *, hw: "Hardware | None" = None) -> Timeline:
    """The plan's predicted timeline (hardware: the plan's own profile unless `hw` is given)."""
    from planner.evaluate import evaluate, gpu_timeline

    if plan.parallel is not None:
        raise ChunkftError(f"the plan is for {plan.world_size} GPUs (FSDP2); simulate replays one unsharded GPU "
                           "step, which would not be this plan's per-rank prediction")
    hw = plan.hardware if hw is None else hw
    strategy = plan.strategy
    chunk = plan.worst_chunk if strategy.chunks > 1 else None
    gpu = gpu_timeline(model, plan.shape, strategy, hw, chunk=chunk)
    est = evaluate(model, plan.shape, strategy, hw)
    events: list[Event] = []
    host_disk = [(tier, plan.components.get(tier, {})) for tier in (Tier.HOST, Tier.DISK)
                 if plan.peak_bytes.get(tier, 0)]
    for tier, comps in host_disk:
        events.append(_tier_event(0.0, tier, comps, phase=Phase.SETUP, chunk=chunk, kind=EventKind.PHASE))
    events += _with_boundaries(gpu)
    end_t = gpu[-1].t if gpu else 0.0
    for tier, comps in host_disk:
        events.append(_tier_event(end_t, tier, comps, phase=Phase.OPTIMIZER, chunk=chunk,
                                  kind=EventKind.STEP_END))
    if strategy.chunks > 1 and gpu:
        events += _switch_events(plan, gpu[-1], end_t + 1, dict(host_disk))
    header = {
        "event": EventKind.HEADER.value,
        "schema_version": TIMELINE_SCHEMA_VERSION,
        "kind": "timeline",
        "t_unit": "op",
        "model": plan.model_name,
        "model_fingerprint": plan.model_fingerprint,
        "plan_fingerprint": plan.fingerprint(),
        "strategy": strategy.label(),
        "chunk": chunk,
        "gpu": hw.gpu.name,
        "step_time_s": est.step_time_s,
        "step_time_parts_s": dict(est.step_time_parts_s),
        "predicted_peak_bytes": {t.value: b for t, b in plan.peak_bytes.items()},
        "predicted_reserved_bytes": plan.reserved_bytes,
    }
    return Timeline(header=header, events=tuple(events))


def _tier_event(t: float, tier: Tier, comps: dict[Component, int], *, kind: EventKind,
                phase: Phase | None = None, chunk: int | None = None, name: str | None = None) -> Event:
    total = sum(comps.values())
    return Event(t=t, event=kind, tier=tier, allocated=total, reserved=total,
                 bytes={c: b for c, b in comps.items() if b}, phase=phase, chunk=chunk, name=name)


def _with_boundaries(ops: list[Event]) -> list[Event]:
    """The GPU op events with PHASE and LAYER events where a phase or a decoder layer starts.

    A boundary event carries the bytes before its first op (the previous event's), so it never
    raises the peak."""
    out: list[Event] = []
    phase, layer = None, None
    before = ops[0] if ops else None
    for ev in ops:
        if ev.event == EventKind.OP and ev.phase is not None and ev.phase != phase:
            out.append(dataclasses.replace(before, event=EventKind.PHASE, t=ev.t, phase=ev.phase,
                                           layer=None, name=ev.phase.value, bytes=dict(before.bytes)))
            phase, layer = ev.phase, None
        if ev.event == EventKind.OP and ev.layer is not None and ev.layer != layer:
            out.append(dataclasses.replace(before, event=EventKind.LAYER, t=ev.t, phase=ev.phase,
                                           layer=ev.layer, name=f"layer {ev.layer}", bytes=dict(before.bytes)))
            layer = ev.layer
        out.append(ev)
        before = ev
    return out


def _switch_events(plan: "Plan", end: Event, t: float, rest: dict[Tier, dict[Component, int]]) -> list[Event]:
    """CHUNK_SWITCH and its TRANSFER events after the worst chunk's step."""
    s = plan.strategy
    table = plan.chunk_table
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[plan.shape.dtype]
    per_param = STATE_BYTES_PER_PARAM[elem]
    k = end.chunk if end.chunk is not None else 0
    c = table.num_chunks

    def state(j: int) -> int:
        return table.chunk_bytes(j % c) // elem * per_param

    gpu = dict(end.bytes)
    events = [dataclasses.replace(end, t=t, event=EventKind.CHUNK_SWITCH, phase=Phase.CHUNK_SWITCH,
                                  name=f"chunk {k} -> {(k + 1) % c}", chunk=k, bytes=dict(gpu))]
    if s.optimizer_device == OptimizerDevice.GPU and s.state_tier != Tier.GPU:
        depth = min(s.prefetch_depth, c - 1)
        src = s.state_tier.value
        moves = [(-state(k), f"evict chunk {k} master+moments gpu->{src} {state(k)} B", k)]
        fetch = (k + max(depth, 1)) % c  # with prefetch the next chunk is already on the GPU
        moves.append((state(fetch), f"{'prefetch' if depth else 'fetch'} chunk {fetch} master+moments "
                                    f"{src}->gpu {state(fetch)} B", fetch))
        for delta, name, j in moves:
            t += 1
            for comp, share in ((Component.MASTER, 4 if elem == 2 else 0), (Component.OPTIMIZER, 8)):
                if share:
                    gpu[comp] = gpu.get(comp, 0) + delta * share // per_param
            alloc = sum(gpu.values())
            events.append(Event(t=t, event=EventKind.TRANSFER, tier=Tier.GPU, allocated=alloc,
                                reserved=max(end.reserved, alloc), bytes={x: b for x, b in gpu.items() if b},
                                phase=Phase.CHUNK_SWITCH, chunk=j, name=name))
    elif s.state_tier == Tier.DISK:  # host optimizer: the next chunk's state comes disk->host
        fetch = (k + 1) % c
        t += 1
        events.append(_tier_event(t, Tier.HOST, rest.get(Tier.HOST, {}), kind=EventKind.TRANSFER,
                                  phase=Phase.CHUNK_SWITCH, chunk=fetch,
                                  name=f"fetch chunk {fetch} master+moments disk->host {state(fetch)} B"))
    return events


def write_timeline(timeline: Timeline, path: str | os.PathLike) -> None:
    timeline.write(path)
