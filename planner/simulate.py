"""Replay a plan over the op graph: the predicted memory timeline of one step and one switch.

The timeline is what the runtime's trace is held against (planner.schema's layout):

  header   kind "timeline", t_unit "op", model and plan fingerprints, strategy, step time;
           a parallel plan's adds "parallel": {gpus_per_node, nodes, shard_embeddings, rank};
  step     the active chunk's training step on the GPU tier, one OP event per traced aten op
           (planner.evaluate.gpu_timeline: trace + CUDA allocator replay + the plan's static
           buffers), with a PHASE event where the phase changes and a LAYER event where a
           decoder layer starts; then the optimizer step and the step end;
  host, disk   the bytes resting on those tiers, per component (an event at the step start and
           one after the optimizer step: the state tiers hold their predicted peak all step);
           with offloaded activations, a host OP event after each op where their bytes change
           (the resting bytes plus the copies alive then, rounded as pinned blocks are);
  switch   for C > 1: a CHUNK_SWITCH event (the step's gradients dropped: the optimizers
           zero_grad before they switch), then TRANSFER events with the bytes each moves:
           evicting the finished chunk's fp32 master and moments from the GPU, and fetching the
           chunk `prefetch_depth` beyond the next one (without prefetch: the next one), each
           followed by the tier's bytes after it.

A parallel (FSDP2) plan's timeline is one rank's: the (chunk, rank) whose GPU need the plan
reports (planner.sharding.evaluate_sharded's `worst_chunk` / `worst_rank`). Its step events are
planner.rank_step.RankStep's arrays (planner.sharding.rank_step), the very ones evaluate_sharded
maximises: per op the rank's live bytes (planner.fsdp.rank_live: weight shards, unsharded units
in flight, gradient shards, all-gather and reduce-scatter buffers) plus its resident state
slices (planner.rank_state), then the ShardedChunkAdamW step (every unit resharded, its
temporaries) and the step end. Host and disk are that rank's (the plan's host figure is the
fullest rank's, which may be another). Its switch follows runtime.sharded_optim's `step`:
gradients dropped first, then on the HOST state tier the rank's working copy of chunk k evicted
and chunk k + 1 loaded (prefetching: k + 1 is already on the GPU and k + 2 is loaded), sized by
the rank's slices (`rank_state_allocs`); on the GPU tier nothing moves.

Every event carries the tier's bytes per component after it; `t` counts ops (the switch comes
after the step's last op). The GPU peak over the events equals the plan's predicted GPU peak
and the highest `reserved` its reserved bytes (one GPU and per rank alike): both come from the
same replay (tests hold them equal).

Known limitations: host and disk bytes are held constant through the step (the cost model
predicts their peaks, not their course), except the activations offloaded to host memory
(--offload-activations), whose bytes the host line follows op by op from the trace; transfer
events have no duration in op units (the header's step time has the switch cost, amortised, in
`step_time_parts_s`); `simulate` replays the `--chunk-traces` mode the plan records. One GPU: the switch moves master + moments without the allocator's rounding, and
with prefetch_depth > 1 follows evaluate's model (depth chunks ahead on the GPU) where
runtime.chunk_optim prefetches one. Parallel: no communication events (collectives appear only
as their buffers' bytes); one rank, not all of them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from planner.evaluate import MASTER_BYTES_PER_PARAM, MOMENT_BYTES_PER_PARAM
from planner.errors import ChunkftError
from planner.fsio import atomic_write_jsonl
from planner.schema import TIMELINE_SCHEMA_VERSION, Component, Event, EventKind, Phase, Tier
from planner.strategy import OptimizerDevice

if TYPE_CHECKING:
    from planner.hardware import Hardware
    from planner.model import ModelSpec
    from planner.plan import Plan
    from planner.rank_step import RankStep

# fp32 master + two fp32 moments (torch.optim.AdamW state: exp_avg, exp_avg_sq) per parameter,
# for fp32 training too: runtime.chunk_optim keeps each chunk's master apart from the model's
# weights (planner.evaluate.MASTER_BYTES_PER_PARAM, MOMENT_BYTES_PER_PARAM).
STATE_BYTES_PER_PARAM = MASTER_BYTES_PER_PARAM + MOMENT_BYTES_PER_PARAM


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timeline:
    """A predicted timeline: the header line and the events, in file order."""

    header: dict
    events: tuple[Event, ...]

    def peak_bytes(self, tier: Tier) -> int:
        return max((e.allocated for e in self.events if e.tier == tier), default=0)

    def scope(self) -> str:
        """What the events cover, in words: "one full fine-tuning step" for a one-chunk plan,
        "one step of chunk K and one chunk switch" for ChunkFT (K: the header's chunk)."""
        chunk = self.header.get("chunk")
        if chunk is None:
            return "one full fine-tuning step"
        return f"one step of chunk {chunk} and one chunk switch"

    def rows(self) -> list[dict]:
        return [self.header] + [e.to_json() for e in self.events]

    def write(self, path: str | os.PathLike) -> None:
        atomic_write_jsonl(path, self.rows())


def simulate(plan: "Plan", model: "ModelSpec", *, hw: "Hardware | None" = None,
             chunk_traces: str | None = None, chunk: int | None = None) -> Timeline:
    """The plan's predicted timeline (hardware: the plan's own profile unless `hw` is given).

    One GPU: the step of `chunk` (C > 1; default: the plan's worst chunk, whose peaks are the
    plan's). A parallel plan's is one rank's: the (chunk, rank) planner.sharding.evaluate_sharded
    reports. `chunk_traces` as in planner.evaluate.evaluate; None: the mode the plan was made with
    (a parallel plan records it; one-GPU plans are made with "auto")."""
    from planner.evaluate import evaluate, host_and_disk_bytes, step_trace, timeline_events

    hw = plan.hardware if hw is None else hw
    if chunk_traces is None:
        chunk_traces = plan.chunk_traces
    check_chunk(plan, chunk)
    if plan.parallel is not None:
        return _simulate_parallel(plan, model, hw, chunk_traces)
    strategy = plan.strategy
    if strategy.chunks > 1 and chunk is None:
        chunk = plan.worst_chunk
    step = step_trace(model, plan.shape, strategy, hw, chunk, chunk_traces=chunk_traces)
    gpu = timeline_events(step.traced, strategy, step.layout, step.active, all_spans=step.all_spans)
    est = evaluate(model, plan.shape, strategy, hw, chunk_traces=chunk_traces)
    # what rests on host and disk through the step (the offloaded activations come op by op)
    host_disk = [(tier, comps) for tier, comps in
                 zip((Tier.HOST, Tier.DISK), host_and_disk_bytes(strategy, step.layout, step.active, step.all_spans))
                 if sum(comps.values()) or (tier == Tier.HOST and step.traced.host_live is not None)]
    switch = (lambda t: _switch_events(plan, gpu[-1], t, dict(host_disk))) if strategy.chunks > 1 and gpu else None
    return _timeline(plan, hw, gpu=gpu, host_disk=host_disk, chunk=chunk, switch=switch, est=est,
                     host_live=step.traced.host_live)


def check_chunk(plan: "Plan", chunk: int | None) -> None:
    """Refuse (one line) a `--chunk` the plan does not have: a one-GPU ChunkFT plan's 0..C-1."""
    if chunk is None:
        return
    if plan.parallel is not None:
        raise ChunkftError("--chunk picks a one-GPU plan's chunk; a parallel plan's timeline is the rank and "
                           "chunk its per-GPU figures are for")
    chunks = plan.strategy.chunks
    if chunks == 1 or isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < chunks:
        valid = "none (one chunk)" if chunks == 1 else f"0..{chunks - 1}"
        raise ChunkftError(f"invalid --chunk {chunk!r}: the plan's chunks are {valid}")


def _timeline(plan: "Plan", hw: "Hardware", *, gpu: list[Event], host_disk: list, chunk: int | None,
              switch, est, extra: dict | None = None, host_live=None) -> Timeline:
    """Header, host/disk events around the GPU step, then the switch events (`switch(t)`).

    `host_disk`: the bytes resting on those tiers. `host_live` (the traced step's offloaded
    activations per op, raw and rounded): the host tier's line follows them op by op (an OP
    event where they change) on top of its resting bytes."""
    events: list[Event] = []
    rest = dict(host_disk)
    for tier, comps in rest.items():
        events.append(_tier_event(0.0, tier, comps, phase=Phase.SETUP, chunk=chunk, kind=EventKind.PHASE))
    events += _with_host_line(_with_boundaries(gpu), host_live, rest.get(Tier.HOST), chunk)
    end_t = gpu[-1].t if gpu else 0.0
    for tier, comps in rest.items():
        if tier == Tier.HOST and host_live is not None:
            comps = _with_offloaded(comps, host_live, -1)
        events.append(_tier_event(end_t, tier, comps, phase=Phase.OPTIMIZER, chunk=chunk, kind=EventKind.STEP_END))
    if switch is not None:
        events += switch(end_t + 1)
    header = {
        "event": EventKind.HEADER.value,
        "schema_version": TIMELINE_SCHEMA_VERSION,
        "kind": "timeline",
        "t_unit": "op",
        "model": plan.model_name,
        "model_fingerprint": plan.model_fingerprint,
        "plan_fingerprint": plan.fingerprint(),
        "strategy": plan.strategy.label(),
        "chunk": chunk,
        **(extra or {}),
        "gpu": hw.gpu.name,
        "step_time_s": est.step_time_s,
        "step_time_parts_s": dict(est.step_time_parts_s),
        "predicted_peak_bytes": {t.value: b for t, b in plan.peak_bytes.items()},
        "predicted_reserved_bytes": plan.reserved_bytes,
    }
    return Timeline(header=header, events=tuple(events))


def _simulate_parallel(plan: "Plan", model: "ModelSpec", hw: "Hardware", chunk_traces: str) -> Timeline:
    """One FSDP2 rank's timeline: the worst (chunk, rank) of planner.sharding.evaluate_sharded."""
    from planner.sharding import evaluate_sharded, rank_step

    layout = plan.parallel
    strategy = plan.strategy
    kwargs = dict(gpus_per_node=layout.gpus_per_node, nodes=layout.nodes, shard_embeddings=layout.shard_embeddings,
                  chunk_traces=chunk_traces)
    est = evaluate_sharded(model, plan.shape, strategy, hw, **kwargs)
    step = rank_step(model, plan.shape, strategy, hw, chunk=est.worst_chunk or 0, rank=est.worst_rank, **kwargs)
    chunk = step.chunk if strategy.chunks > 1 else None
    gpu = rank_timeline_events(step, chunk=chunk)
    host_disk = [(tier, comps) for tier, comps in ((Tier.HOST, step.host), (Tier.DISK, step.disk))
                 if sum(comps.values())]
    switch = (lambda t: _rank_switch_events(plan, model, step, gpu[-1], t)) if strategy.chunks > 1 else None
    return _timeline(plan, hw, gpu=gpu, host_disk=host_disk, chunk=chunk, switch=switch, est=est,
                     extra={"parallel": {**layout.to_json(), "rank": step.rank}})


def rank_timeline_events(step: "RankStep", *, chunk: int | None = None) -> list[Event]:
    """GPU events of one rank's step: one OP event per traced op, the optimizer step, the end.

    Read from planner.rank_step.RankStep's arrays, which evaluate_sharded maximises: the highest
    `allocated` is `step.peak()`, the highest `reserved` `step.reserved_bytes()`."""
    events = []
    run_reserved = 0
    n = step.live.shape[1]
    for t in range(n):
        comps = step.op_bytes(t)
        run_reserved = max(run_reserved, int(step.reserved[t]) + step.static_reserved)
        alloc = sum(comps.values())
        events.append(Event(t=float(t), event=EventKind.OP, tier=Tier.GPU, allocated=alloc,
                            reserved=max(run_reserved, alloc), bytes={c: b for c, b in comps.items() if b},
                            phase=step.phases[t] if step.phases else None,
                            layer=step.layers[t] if step.layers else None, chunk=chunk))
    opt, end = step.optimizer_bytes(), step.end_bytes()
    opt_reserved = max(run_reserved + step.temps_reserved, sum(opt.values()))
    events.append(Event(t=float(n), event=EventKind.OPTIMIZER_STEP, tier=Tier.GPU, allocated=sum(opt.values()),
                        reserved=opt_reserved, bytes={c: b for c, b in opt.items() if b},
                        phase=Phase.OPTIMIZER, chunk=chunk, name="ShardedChunkAdamW"))
    events.append(Event(t=float(n + 1), event=EventKind.STEP_END, tier=Tier.GPU, allocated=sum(end.values()),
                        reserved=opt_reserved, bytes={c: b for c, b in end.items() if b}, chunk=chunk))
    return events


def _rank_switch_events(plan: "Plan", model: "ModelSpec", step: "RankStep", end: Event, t: float) -> list[Event]:
    """CHUNK_SWITCH and, for the HOST state tier, its TRANSFER events on one rank, as
    runtime.sharded_optim.ShardedChunkAdamW.step switches: the gradients are dropped
    (zero_grad), the working copy of chunk k written back to host and freed (`_evict`), and
    chunk k + 1 made active (`_activate`): loaded now, or, prefetching, already on the GPU,
    and the load of chunk k + 2 started. Sizes are this rank's slices (`rank_state_allocs`)."""
    from planner.rank_state import rank_state_allocs

    s = plan.strategy
    c = plan.chunk_table.num_chunks
    k = step.chunk
    gpu = {comp: b for comp, b in end.bytes.items() if comp != Component.GRADIENTS}
    reserved = end.reserved
    events = [Event(t=t, event=EventKind.CHUNK_SWITCH, tier=Tier.GPU, allocated=sum(gpu.values()),
                    reserved=reserved, bytes={x: b for x, b in gpu.items() if b}, phase=Phase.CHUNK_SWITCH,
                    chunk=k, name=f"chunk {k} -> {(k + 1) % c} (gradients freed)")]
    if s.state_tier == Tier.GPU:  # every chunk's state stays on the GPU
        return events
    src = s.state_tier.value  # host, or disk (through the rank's staging buffer)
    prefetch = s.prefetch_depth >= 1 and c > 1
    fetch = (k + (2 if prefetch else 1)) % c

    def state(j: int) -> dict[Component, int]:
        return rank_state_allocs(model, plan.shape, s, world=plan.world_size, chunk=j, rank=step.rank)

    moves = [(-1, state(k), f"evict chunk {k} master+moments gpu->{src}", k),
             (1, state(fetch), f"{'prefetch' if prefetch else 'fetch'} chunk {fetch} master+moments {src}->gpu", fetch)]
    for sign, comps, name, j in moves:
        t += 1
        for comp, b in comps.items():
            gpu[comp] = gpu.get(comp, 0) + sign * b
        alloc = sum(gpu.values())
        reserved = max(reserved, alloc)
        moved = sum(b for comp, b in comps.items() if comp != Component.ROUNDING)
        events.append(Event(t=t, event=EventKind.TRANSFER, tier=Tier.GPU, allocated=alloc, reserved=reserved,
                            bytes={x: b for x, b in gpu.items() if b}, phase=Phase.CHUNK_SWITCH, chunk=j,
                            name=f"{name} {moved} B"))
    return events


def _tier_event(t: float, tier: Tier, comps: dict[Component, int], *, kind: EventKind,
                phase: Phase | None = None, chunk: int | None = None, name: str | None = None) -> Event:
    total = sum(comps.values())
    return Event(t=t, event=kind, tier=tier, allocated=total, reserved=total,
                 bytes={c: b for c, b in comps.items() if b}, phase=phase, chunk=chunk, name=name)


def _with_offloaded(rest: dict[Component, int], host_live, t: int) -> dict[Component, int]:
    out = dict(rest)
    raw, rounded = int(host_live[0][t]), int(host_live[1][t])
    out[Component.ACTIVATIONS] = out.get(Component.ACTIVATIONS, 0) + raw
    out[Component.ROUNDING] = out.get(Component.ROUNDING, 0) + rounded - raw
    return out


def _with_host_line(events: list[Event], host_live, rest: dict[Component, int] | None,
                    chunk: int | None) -> list[Event]:
    """`events` with a HOST OP event after each GPU op where the offloaded bytes change."""
    if host_live is None or rest is None:
        return events
    out, last = [], 0
    for ev in events:
        out.append(ev)
        if ev.event != EventKind.OP or ev.tier != Tier.GPU or int(ev.t) >= host_live.shape[1]:
            continue
        now = int(host_live[1][int(ev.t)])
        if now != last:
            out.append(_tier_event(ev.t, Tier.HOST, _with_offloaded(rest, host_live, int(ev.t)), kind=EventKind.OP,
                                   phase=ev.phase, chunk=chunk, name="offloaded activations"))
            last = now
    return out


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
    """CHUNK_SWITCH and its TRANSFER events after the worst chunk's step, as
    runtime.chunk_optim.ChunkAdamW.step switches: the gradients are dropped (zero_grad), then
    chunk k's state evicted and the chunk `prefetch_depth` beyond k + 1 fetched (k + 1 itself
    without prefetch; with it, k + 1 .. k + depth are on the GPU already, as evaluate counts)."""
    s = plan.strategy
    table = plan.chunk_table
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[plan.shape.dtype]
    k = end.chunk if end.chunk is not None else 0
    c = table.num_chunks

    def state(j: int) -> int:
        return table.chunk_bytes(j % c) // elem * STATE_BYTES_PER_PARAM

    gpu = {comp: b for comp, b in end.bytes.items() if comp != Component.GRADIENTS}
    events = [dataclasses.replace(end, t=t, event=EventKind.CHUNK_SWITCH, phase=Phase.CHUNK_SWITCH,
                                  name=f"chunk {k} -> {(k + 1) % c} (gradients freed)", chunk=k,
                                  allocated=sum(gpu.values()), bytes={x: b for x, b in gpu.items() if b})]
    if s.optimizer_device == OptimizerDevice.GPU and s.state_tier != Tier.GPU:
        depth = min(s.prefetch_depth, c - 1)
        src = s.state_tier.value
        moves = [(-state(k), f"evict chunk {k} master+moments gpu->{src} {state(k)} B", k)]
        fetch = (k + 1 + depth) % c
        moves.append((state(fetch), f"{'prefetch' if depth else 'fetch'} chunk {fetch} master+moments "
                                    f"{src}->gpu {state(fetch)} B", fetch))
        for delta, name, j in moves:
            t += 1
            for comp, per in ((Component.MASTER, MASTER_BYTES_PER_PARAM), (Component.OPTIMIZER, MOMENT_BYTES_PER_PARAM)):
                gpu[comp] = gpu.get(comp, 0) + delta * per // STATE_BYTES_PER_PARAM
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
