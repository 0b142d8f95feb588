"""One rank's step of one chunk under FSDP2, op by op: what planner.sharding maximises, planner.simulate replays.

A `RankStep` is one (chunk, rank): the per-op, per-component live matrix (planner.fsdp's
`rank_live` over the chunk's adjusted trace), the rank's resident state (planner.rank_state), the
bytes at the optimizer step and its temporaries. `RankStep.peak` / `reserved_bytes` are the
figures planner.sharding.evaluate_sharded maximises, and planner.simulate builds a parallel
plan's timeline from the same object, so the timeline's maximum is the plan's per-rank
prediction by construction.

Gradients of chunk k, as runtime.sharded_optim trains it (`sharded_grad_spec`): a whole span's
tensor, and a sliced 1-D tensor (a norm weight), gets requires_grad and FSDP2's whole gradient;
a sliced span of a matrix gets a sub-tensor gradient from runtime.subgrad (requires_grad stays
off, FSDP2 neither computes nor reduces it): a buffer of the whole unsharded slice (+ one row
for an nn.Embedding owner) on every rank, from its owner's backward to the end of the step,
all_reduced at the step (`chunk_grads`). The trace is run with that spec, so both kinds are the
trace's own bytes; at the optimizer step FSDP2 gradients are shards, slice buffers whole.

Chunk traces (`prepare_chunks`): "exact" traces each chunk-pattern group's first chunk with
`sharded_grad_spec` (evaluate's `chunk_groups`) and evaluates every chunk; "bound" uses the
full-FT trace with the gradients capped at the chunk's FSDP2 gradients and slice buffers for
every chunk, evaluated for the chunks with the largest analytic bytes (`bound_chunks`); "auto"
is exact up to 2B parameters. Everything that does not depend on W (traces, layouts, chunk
groups) is cached across world sizes and GPU kinds (only the cuBLAS workspace, via the SM
architecture, depends on the kind); FSDP schedules, local span bytes and per-rank state are
cached per world size.

Known limitations: the reserved bytes keep the single-rank trace's free-block slack, and the
optimizer step's temporaries and state are counted as fresh segments on top of the highest
reserved bytes (as evaluate). A sliced 1-D tensor is taken to be a norm weight (whole
gradient); a Linear bias would get a sub-tensor one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from planner.fsdp import FsdpSchedule, fsdp_schedule, fsdp_units, grad_shard_bytes, rank_live
from planner.memory import COMPONENTS
from planner.rank_state import chunk_spans, local_span_bytes, prefetches_next_chunk, rank_states
from planner.schema import Component, Phase, Tier
from planner.strategy import Strategy

if TYPE_CHECKING:
    from planner.chunks import ChunkTable
    from planner.evaluate import ParamLayout, TracedStep
    from planner.model import ModelSpec
    from planner.trace import StepShape


# ---------------------------------------------------------------------------------------------
# What each chunk's step traces, independent of the world size (cached across world sizes)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PreparedChunks:
    layout: "ParamLayout"
    spans: tuple
    """Spans per chunk (C = 1: one chunk of every parameter whole)."""
    touched: tuple[frozenset, ...]
    """Per chunk: the parameters FSDP2 computes and reduce-scatters a whole gradient of."""
    sliced: tuple[tuple[int, ...], ...]
    """Per chunk: bytes of each sub-tensor gradient buffer (sliced spans, whole and unsharded
    on every rank, all_reduced at the step)."""
    cases: tuple[tuple["TracedStep", int], ...]
    """(traced step, chunk) for every chunk examined; exact mode: every chunk, each with its
    group's representative trace; bound mode: every chunk, with the one full-FT trace."""
    mode: str
    """"exact" or "bound" (C = 1: "exact", the full-FT trace is exact)."""
    flops: tuple[int, ...]
    grad_bytes: tuple[int, ...] = ()
    """Per chunk: its FSDP2 gradients' (whole tensors) plus its slice buffers' bytes."""


_PREPARED: dict[tuple, PreparedChunks] = {}
# Per world size, reused across strategies, GPU kinds and calls (chunkft size asks many): FSDP
# schedules per trace (keyed by the trace object, kept alive beside its value), local span
# bytes and per-rank state per chunk table (evaluate_sharded keeps its one-GPU estimates).
_SCHEDULES: dict[tuple, tuple] = {}
_RANK_CACHES: dict[tuple, dict] = {}
_CACHE_SIZE = 256


def _remember(store: dict, key: tuple, value: Any) -> Any:
    if len(store) >= _CACHE_SIZE:
        store.pop(next(iter(store)))
    store[key] = value
    return value


def _cached_schedule(traced: "TracedStep", layout: "ParamLayout", world: int, shard_embeddings: bool,
                     forward_prefetch: bool) -> FsdpSchedule:
    # fsdp_schedule reads the trace's phases and layers only: traces of one step replayed for
    # another GPU architecture (or without the least-memory search) share their schedules
    key = (_op_pattern(traced), id(layout), world, shard_embeddings, forward_prefetch)
    hit = _SCHEDULES.get(key)
    if hit is None or hit[0] is not layout:
        units = fsdp_units(layout, world, (), shard_embeddings)
        hit = _remember(_SCHEDULES, key, (layout, fsdp_schedule(traced, units, traced.live.shape[1], forward_prefetch)))
    return hit[1]


_PATTERNS: dict[Any, int] = {}  # (ops, phases, layers) -> a small id (never reused: a counter)
_PATTERN_OF: dict[int, tuple] = {}  # id(traced) -> (traced, its pattern id)
_PATTERN_IDS = itertools.count()


def _op_pattern(traced: "TracedStep") -> int:
    """A small id per distinct (op count, phases, layers) of a traced step."""
    hit = _PATTERN_OF.get(id(traced))
    if hit is None or hit[0] is not traced:
        content = (traced.live.shape[1], tuple(p.value if p is not None else None for p in traced.phases),
                   traced.layers)
        if content not in _PATTERNS:
            if len(_PATTERNS) >= _CACHE_SIZE:
                _PATTERNS.pop(next(iter(_PATTERNS)))
            _PATTERNS[content] = next(_PATTERN_IDS)
        pattern = _PATTERNS[content]
        hit = _remember(_PATTERN_OF, id(traced), (traced, pattern))
    return hit[1]


def sharded_grad_spec(table: "ChunkTable", k: int) -> dict:
    """Chunk k's GradSpec as runtime.sharded_optim trains it: a sliced span of a matrix keeps its
    sub-tensor gradient (runtime.subgrad on its nn.Linear / nn.Embedding owner); a sliced 1-D
    tensor (a norm weight, whose subgrad rule would recompute the module in backward) gets its
    whole gradient, as whole spans do."""
    spec = table.grad_spec(k)
    return {n: v if v is False or v is True or len(table.shapes[n]) > 1 else True for n, v in spec.items()}


def chunk_grads(table: "ChunkTable", k: int, layout: "ParamLayout") -> tuple[frozenset, tuple[int, ...]]:
    """(parameters with an FSDP2 gradient, bytes of each sub-tensor gradient buffer) of chunk k.
    A buffer is the whole unsharded slice in the training dtype, plus one row for an
    nn.Embedding owner (subgrad's index_add sends other tokens to a dummy row)."""
    from planner.errors import ChunkftError

    if not 0 <= k < table.num_chunks:
        raise ChunkftError(f"chunk {k} does not exist; valid chunks are 0..{table.num_chunks - 1}")
    shapes = table.shapes
    # sharded_grad_spec's True (whole spans, sliced 1-D tensors) for this chunk's parameters only:
    # building the whole table's spec per chunk is O(parameters x chunks)
    spec = {sp.param: table.is_whole(sp) or len(shapes[sp.param]) <= 1 for sp in table.chunks[k]}
    whole = frozenset(n for n, v in spec.items() if v)
    buffers = []
    for sp in table.chunks[k]:
        if spec[sp.param]:
            continue
        extra = 0
        if sp.param == layout.input_embedding:  # one more row: (e - s + 1) x C, or (R + 1) x (e - s)
            rows = sp.end - sp.start if sp.dim == 0 else shapes[sp.param][0]
            extra = sp.nbytes // max(rows, 1)
        buffers.append(sp.nbytes + extra)
    return whole, tuple(buffers)


def prepare_chunks(model: "ModelSpec", shape: "StepShape", strategy: Strategy, sm: int,
                   chunk_traces: str) -> PreparedChunks:
    """Every chunk's traced step, gradients and spans (module doc: chunk traces), cached across
    world sizes and GPU kinds of one SM architecture."""
    from planner import evaluate as ev

    layout = ev.param_layout(model, shape.dtype)
    mode = _mode(layout, strategy, chunk_traces)
    key = (model.fingerprint(), shape, strategy.chunks, strategy.checkpointing, strategy.loss_chunk_tokens,
           strategy.recipe, sm, mode)
    if key in _PREPARED:
        return _PREPARED[key]
    spans = chunk_spans(strategy, model, layout, shape.dtype)
    if strategy.chunks == 1:
        touched = (frozenset(n for n, _, _ in layout.named_shapes),)
        sliced: tuple = ((),)
    else:
        touched, sliced = _table_grads(ev.chunk_table(model, shape.dtype, strategy.chunks), layout)
    requests = chunk_requests(model, shape, strategy, sm, chunk_traces)
    if strategy.chunks == 1:
        traced = ev.traced_step(model, shape, **requests[0])
        cases: list = [(traced, 0)]
        flops = [traced.flops]
    elif mode == "exact":
        from planner import progress

        cases = []
        groups = _pattern_specs(ev.chunk_table(model, shape.dtype, strategy.chunks), layout.layer_prefix)
        bar = progress.bar(zip(groups, requests), f"trace chunk patterns of C={strategy.chunks}", unit="trace",
                           total=len(requests))
        for (group, _), request in bar:
            traced = ev.traced_step(model, shape, **request)
            cases += [(traced, k) for k in group]
        cases.sort(key=lambda c: c[1])
        flops = [c[0].flops for c in cases]
    else:
        traced = ev.traced_step(model, shape, **requests[0])
        cases = [(traced, k) for k in range(len(spans))]
        flops = [traced.flops] * len(spans)
    grad_bytes = _grad_bytes(layout, touched, sliced)
    prepared = PreparedChunks(layout=layout, spans=spans, touched=touched, sliced=sliced, cases=tuple(cases), mode=mode,
                              flops=tuple(flops), grad_bytes=grad_bytes)
    if len(_PREPARED) >= 128:  # chunkft size asks for ~15 chunk counts x 2 loss forms at once
        _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = prepared
    return prepared


def chunk_requests(model: "ModelSpec", shape: "StepShape", strategy: Strategy, sm: int,
                   chunk_traces: str) -> list[dict]:
    """The `traced_step` calls (keyword arguments) `prepare_chunks` makes for `strategy`: each
    chunk pattern's with exact chunk traces, the one full-FT step otherwise. The per-rank model
    reads no least-memory figure, so the replays skip that search (`least=False`). What
    planner.parallel makes ahead, in parallel (planner.parallel_eval.make_requests)."""
    from planner import evaluate as ev

    layout = ev.param_layout(model, shape.dtype)
    base = dict(checkpointing=strategy.checkpointing, loss_chunk_tokens=strategy.loss_chunk_tokens, sm=sm,
                loop=strategy.recipe.loop.value, alloc_conf="", stream=False, recipe=None, least=False)
    if strategy.chunks == 1 or _mode(layout, strategy, chunk_traces) != "exact":
        return [dict(base, grad=None)]
    table = ev.chunk_table(model, shape.dtype, strategy.chunks)
    return [dict(base, grad=grad) for _, grad in _pattern_specs(table, layout.layer_prefix)]


def _mode(layout: "ParamLayout", strategy: Strategy, chunk_traces: str) -> str:
    """How `prepare_chunks` traces `strategy`: "exact" or "bound" (one chunk: its one exact step)."""
    from planner import evaluate as ev

    return "exact" if strategy.chunks == 1 else ev.chunk_mode(layout, chunk_traces)


def _pattern_specs(table: "ChunkTable", layer_prefix: str | None) -> list[tuple[list[int], dict]]:
    """(chunk group, its first chunk's `sharded_grad_spec`) of a table, kept per table (the same
    GradSpec objects each time: planner.evaluate keeps trace keys per GradSpec object)."""
    from planner import evaluate as ev

    return ev._group_specs(table, layer_prefix, sharded_grad_spec)


# Per chunk table and layout: every chunk's `chunk_grads` and gradient bytes (independent of the
# checkpointing, loss and trace mode that key PreparedChunks), kept with the objects they came from.
_TABLE_GRADS: dict[tuple, tuple] = {}


def _table_grads(table: "ChunkTable", layout: "ParamLayout") -> tuple[tuple[frozenset, ...], tuple[tuple[int, ...], ...]]:
    key = ("grads", id(table), id(layout))
    hit = _TABLE_GRADS.get(key)
    if hit is None or hit[0] is not table or hit[1] is not layout:
        grads = [chunk_grads(table, k, layout) for k in range(table.num_chunks)]
        hit = _remember(_TABLE_GRADS, key, (table, layout, (tuple(g[0] for g in grads), tuple(g[1] for g in grads))))
    return hit[2]


def _grad_bytes(layout: "ParamLayout", touched: tuple, sliced: tuple) -> tuple[int, ...]:
    key = ("bytes", id(layout), id(touched), id(sliced))
    hit = _TABLE_GRADS.get(key)
    if hit is None or hit[0] is not layout or hit[1] is not touched or hit[2] is not sliced:
        tensor = dict(zip((n for n, _, _ in layout.named_shapes), layout.tensor_bytes))
        value = tuple(sum(tensor[n] for n in t) + sum(b) for t, b in zip(touched, sliced))
        hit = _remember(_TABLE_GRADS, key, (layout, touched, sliced, value))
    return hit[3]


def bound_chunks(prep: PreparedChunks, strategy: Strategy, local: np.ndarray, world: int,
                 cache: dict | None = None) -> list[int]:
    """Bound mode: the chunks whose analytic bytes (FSDP2 gradients and slice buffers; the
    worst rank's state on the GPU plus step temporaries) are largest, as evaluate's
    `bound_candidates` picks them; the shared trace makes the rest differ by these terms only.
    `cache`: `rank_cache`'s for this world and `local` (its key holds the state tier and
    prefetch, all this reads of the strategy): the answer is kept there per prepared chunks."""
    if cache is not None:
        hit = cache.get(("bound_chunks", id(prep)))
        if hit is None or hit[0] is not prep or hit[1] is not local:
            hit = cache[("bound_chunks", id(prep))] = (prep, local, _bound_chunks(prep, strategy, local, world))
        return list(hit[2])
    return _bound_chunks(prep, strategy, local, world)


def _bound_chunks(prep: PreparedChunks, strategy: Strategy, local: np.ndarray, world: int) -> list[int]:
    from planner import evaluate as ev

    layout = prep.layout
    elem = layout.elem_bytes
    per_param = ev.MASTER_BYTES_PER_PARAM + ev.MOMENT_BYTES_PER_PARAM
    bounds = np.cumsum([0] + [len(c) for c in prep.spans])
    sums = np.add.reduceat(local, bounds[:-1], axis=0)  # (C, W) local bytes per chunk
    maxes = np.maximum.reduceat(local, bounds[:-1], axis=0)
    cast = ev.FP32_BYTES if elem < ev.FP32_BYTES else 0
    temps = (cast + ev.SINGLE_TENSOR_TEMP_BYTES_PER_PARAM) * maxes // elem
    if strategy.state_tier == Tier.GPU:
        state = np.zeros_like(sums)
    else:
        ahead = np.roll(sums, -1, axis=0) if prefetches_next_chunk(strategy, len(prep.spans)) else 0
        state = per_param * (sums + ahead) // elem
    static = (state + temps).max(axis=1).astype(np.int64)
    grads = np.asarray(prep.grad_bytes, dtype=np.int64)
    # evaluate's bound_candidates over arrays: the largest totals (ties: the lower chunk), the
    # largest gradients and the largest state + temporaries (argmax: the first, the lower chunk)
    by_total = np.lexsort((np.arange(len(grads)), -(grads + static)))[:ev.BOUND_CANDIDATES]
    return sorted({int(k) for k in by_total} | {int(np.argmax(grads)), int(np.argmax(static))})


# ---------------------------------------------------------------------------------------------
# One rank's step of one chunk: what evaluate_sharded maximises and planner.simulate replays


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RankStep:
    """One rank's GPU bytes through one chunk's step, op by op, as evaluate_sharded counts them.

    After traced op t the rank holds `live[:, t]` (per component, in planner.memory.COMPONENTS
    order) plus `static`; at the optimizer step `end` plus `static` plus `temps`; at the step
    end `end` plus `static`. `peak()` and `reserved_bytes()` are the figures evaluate_sharded
    reports for this (chunk, rank); a timeline built from these arrays has the same maximum."""

    chunk: int
    """Index into the chunk table (0 for full fine-tuning, C = 1)."""
    rank: int
    live: np.ndarray = dataclasses.field(repr=False)
    """(len(COMPONENTS), ops): `rank_live` of the step's trace after evaluate's adjustments
    (shared between the ranks of a chunk: read only)."""
    reserved: np.ndarray = dataclasses.field(repr=False)
    """(ops,): the trace's reserved bytes with its live bytes replaced by `live`'s."""
    static: dict[Component, int]
    """Optimizer state resident on the GPU through the step (this rank's slices, rounded)."""
    static_reserved: int
    end: dict[Component, int]
    """The trace's bytes at the optimizer step: every unit resharded (FSDP2's post-backward),
    its all-gather and reduce-scatter buffers freed, every FSDP2 gradient a padded shard, the
    slice buffers whole."""
    temps: dict[Component, int]
    """The AdamW step's temporaries on this rank (`step_temp_allocs`, rounded)."""
    temps_reserved: int
    host: dict[Component, int]
    """This rank's host bytes (HOST state tier: its slices of every chunk)."""
    disk: dict[Component, int]
    phases: tuple[Phase, ...] = dataclasses.field(default=(), repr=False)
    layers: tuple[int | None, ...] = dataclasses.field(default=(), repr=False)
    peak_op: int = 0
    """The op with the most live bytes (the argmax of `live`'s column sums)."""
    reserved_max: int = 0
    """`reserved.max()`."""

    def op_bytes(self, t: int) -> dict[Component, int]:
        return {c: int(self.live[i, t]) + self.static.get(c, 0) for i, c in enumerate(COMPONENTS)}

    def end_bytes(self) -> dict[Component, int]:
        """At the step end: the optimizer step's bytes without its temporaries."""
        return {c: b + self.static.get(c, 0) for c, b in self.end.items()}

    def optimizer_bytes(self) -> dict[Component, int]:
        out = self.end_bytes()
        for c, b in self.temps.items():
            out[c] = out.get(c, 0) + b
        return out

    def peak(self) -> tuple[int, dict[Component, int]]:
        """(peak allocated bytes, components there): the peak op's or the optimizer step's."""
        peak, gpu = self._peak
        return peak, dict(gpu)

    @functools.cached_property
    def _peak(self) -> tuple[int, dict[Component, int]]:
        gpu = self.op_bytes(self.peak_op)
        peak = sum(gpu.values())
        opt = self.optimizer_bytes()
        if sum(opt.values()) > peak:
            gpu, peak = opt, sum(opt.values())
        return peak, gpu

    def reserved_bytes(self) -> int:
        """Reserved high-water mark: the trace's, plus the state's and the step temporaries'
        fresh segments (never below the peak)."""
        return max(self.reserved_max + self.static_reserved + self.temps_reserved, self._peak[0])


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChunkPart:
    """The rank-independent part of one chunk's step (the ranks differ only in their state)."""

    live: np.ndarray
    reserved: np.ndarray
    reserved_max: int
    peak_op: int
    end: dict
    schedule: FsdpSchedule


_PARTS: dict[tuple, tuple] = {}
_PARTS_SIZE = 48  # each holds two (components x ops) arrays: ~3 MiB at 70B


def chunk_part(prep: PreparedChunks, strategy: Strategy, k: int, world: int, shard_embeddings: bool) -> ChunkPart:
    """Chunk k's step on any rank of `world`: its trace after evaluate's adjustments through
    `rank_live`, and the bytes at the optimizer step (every unit resharded). Kept per prepared
    chunks, chunk, world and layout: the strategies of one chunk table that differ in state tier,
    prefetch or update interval share it (evaluate's adjustments read only the chunk count,
    the optimizer device and gradient staging, fixed for a sharded plan)."""
    key = (id(prep), k, world, shard_embeddings, strategy.chunks, strategy.optimizer_device, strategy.grad_staging)
    hit = _PARTS.get(key)
    if hit is not None and hit[0] is prep:
        return hit[1]
    part = _chunk_part(prep, strategy, k, world, shard_embeddings)
    if len(_PARTS) >= _PARTS_SIZE:
        _PARTS.pop(next(iter(_PARTS)))
    _PARTS[key] = (prep, part)
    return part


def _chunk_part(prep: PreparedChunks, strategy: Strategy, k: int, world: int, shard_embeddings: bool) -> ChunkPart:
    from planner import evaluate as ev

    layout = prep.layout
    traced, _ = prep.cases[k]
    grads = prep.touched[k]
    grad_active = ev.ActiveSet(chunk=k if strategy.chunks > 1 else None,
                               tensor_bytes=tuple(b for (n, _, _), b in zip(layout.named_shapes, layout.tensor_bytes)
                                                  if n in grads) + prep.sliced[k])
    live, reserved = ev.adjusted_gpu_live(traced, strategy, layout, grad_active)
    schedule = _cached_schedule(traced, layout, world, shard_embeddings, True)
    rank = rank_live(traced, layout, grads, world, live=live, shard_embeddings=shard_embeddings, schedule=schedule)
    total = rank.sum(axis=0)
    rank_reserved = np.maximum(reserved - live.sum(axis=0) + total, total)
    # the optimizer step: every unit resharded (FSDP2's post-backward), its all-gather and
    # reduce-scatter buffers freed, every gradient a padded shard
    end = {c: int(rank[i, -1]) for i, c in enumerate(COMPONENTS)}
    rs_input = 0
    if schedule.rs_unit[-1] >= 0:  # a reduce-scatter copy on the last op
        rs_input = fsdp_units(layout, world, grads, shard_embeddings).trained_padded[schedule.rs_unit[-1]]
    end[Component.WEIGHTS] -= int(schedule.gathered[-1])
    end[Component.TEMPORARIES] -= int(schedule.ag_buffer[-1]) + rs_input
    end[Component.GRADIENTS] = grad_shard_bytes(layout, grads, world) + sum(prep.sliced[k])
    return ChunkPart(live=rank, reserved=rank_reserved, reserved_max=int(rank_reserved.max()),
                     peak_op=int(np.argmax(total)), end=end, schedule=schedule)


def rank_cache(model: "ModelSpec", shape: "StepShape", strategy: Strategy, world: int,
               prep: PreparedChunks) -> tuple[dict, np.ndarray]:
    """(per-rank state cache, `local_span_bytes` of every span) for this chunk table and world."""
    num_chunks = len(prep.spans)
    cache_key = (model.fingerprint(), shape.dtype, strategy.chunks, world, strategy.state_tier,
                 prefetches_next_chunk(strategy, num_chunks))
    cache = _RANK_CACHES.get(cache_key)
    if cache is None:
        cache = _remember(_RANK_CACHES, cache_key, {})
    if "local" not in cache:
        shapes = {n: s for n, s, _ in prep.layout.named_shapes}
        cache["local"] = local_span_bytes([s for chunk in prep.spans for s in chunk], shapes, world)
    return cache, cache["local"]


def rank_steps(prep: PreparedChunks, strategy: Strategy, part: ChunkPart, k: int, world: int, local: np.ndarray,
               cache: dict) -> list[RankStep]:
    """Every rank's RankStep of chunk k."""
    traced = prep.cases[k][0]
    nxt = (k + 1) % len(prep.spans) if prefetches_next_chunk(strategy, len(prep.spans)) else None
    return [RankStep(chunk=k, rank=r, live=part.live, reserved=part.reserved, static=st.static,
                     static_reserved=st.static_reserved, end=part.end, temps=st.temps, temps_reserved=st.temps_reserved,
                     host=st.host, disk=st.disk, phases=traced.phases, layers=traced.layers, peak_op=part.peak_op,
                     reserved_max=part.reserved_max)
            for r, st in enumerate(rank_states(strategy, prep.layout, prep.spans, local, k, nxt, world, cache))]
