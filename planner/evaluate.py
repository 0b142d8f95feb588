"""Predict what a Strategy costs: peaks per tier and component, CUDA reserved, step time.

The GPU side starts from a replay of the traced step (planner.trace + planner.memory with the
CUDA allocator model): weights, gradients, activations, temporaries, logits, block rounding and
the cuBLAS workspace, op by op, for exactly the parameters that need gradients (all of them for
C = 1, the active chunk's sub-tensors otherwise), with or without checkpointing and chunked
loss. Onto that timeline go the bytes the trace does not hold (see `gpu_static_allocs`):

  - fp32 master weights and AdamW moments on the GPU: all of them for the GPU optimizer with
    state on the GPU; the active chunk's plus `prefetch_depth` upcoming chunks' when inactive
    state rests on host or disk; none for a host optimizer. One master / exp_avg / exp_avg_sq
    tensor per chunk span, as runtime.chunk_optim.ChunkAdamW keeps them (C = 1: per parameter).
  - the optimizer step (GPU optimizer only), after backward. The plans run on ChunkAdamW, which
    steps one span at a time (torch's `_single_tensor_adam` arithmetic): the largest span's fp32
    gradient copy (16-bit training only), `exp_avg_sq.sqrt()` and its division by the bias
    correction live at once, 4 + 4 + 4 bytes per parameter of that span
    (`SINGLE_TENSOR_TEMP_BYTES_PER_PARAM`). torch.optim.AdamW's default foreach path on CUDA
    would instead materialise sqrt(v) for every parameter at once
    (torch/optim/adam.py `_multi_tensor_adam`: `exp_avg_sq_sqrt = torch._foreach_sqrt(...)`):
    4 B/param more, 30 GiB at 8B; plans do not use it.
  - with a recipe's `--optim` / `--precision` other than chunkft's mixed ChunkAdamW, the state,
    its off-GPU part and the step's temporaries are those of the real optimizer, traced per
    parameter shape by planner.optim_step (`recipe_step_cost`); for C > 1 only optimizers whose
    state ChunkAdamW could hold (planner.recipe.CHUNK_HELD_OPTIMS), priced per span.
  - gradients that leave the GPU: with grad staging (NVMSA) only a double buffer of the
    largest gradient stays (`STAGING_BUFFERS`); a host optimizer without staging copies in
    DeepSpeed-style buckets (`DEEPSPEED_BUCKET_ELEMENTS`).
  - streamed weights: the trace itself is rewritten (planner.streaming.stream_weights): each
    decoder layer's packed weights exist on the GPU only while runtime.stream holds them
    there (the layer computing and the one arriving), allocated and freed op by op.

Host: pinned fp32 master + moments of every chunk when state rests on host (the active chunk's
slot stays allocated so a switch writes back in place, as ChunkAdamW's store does), in one
flat buffer per chunk registered in place (runtime.host_buffer; tensors at 64-byte offsets,
none of the power-of-two rounding of torch's CachingHostAllocator), staged 16-bit gradients, or fp32
gradients for the DeepSpeed-style baseline, per-tensor buffers of the host AdamW, disk bounce
buffers, pinned layer weights when streaming (one flat buffer per layer, registered in place). Disk: state and staged gradients on the disk tier.

For C > 1 the worst chunk is reported (`evaluate`'s `chunk_traces`). Exact: chunks are grouped
by layer pattern (`chunk_groups`): chunks whose spans name the same parameters at the same
offsets from their first layer, whole or sliced alike, behave alike except for position, and the
earliest of a group keeps the most activations (every layer after the first trained one saves
what its backward needs), so each group's first chunk is traced and stands for its members.
Bound: the full-FT trace, with gradients capped at the chunk's bytes, stands for every chunk.

Public cost API (what planner.sharding builds on): `param_layout`, `chunk_table`, `chunk_groups`,
`traced_step`, `active_set_for`, `bound_candidates`, `adjusted_gpu_live`, `gpu_static_allocs`,
`optimizer_temp_allocs`, `state_allocs`, `add_allocs`, `segment_bytes`, `host_and_disk_bytes`,
`sm_arch`, `combine`.

Known limitations: the CUDA context is reported (`CUDA_CONTEXT_BYTES`), not measured; reserved
bytes of the static buffers are their own segments (no reuse of freed activation blocks by the
optimizer temporaries: pessimistic); chunks of one group differ slightly in gradient bytes
(slices of different lengths) and the representative's are used; host memory counts the
buffers the plan needs, not the Python process itself (torch and its libraries: ~0.5 GiB RSS).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from planner import cache as disk_cache
from planner.errors import ChunkftError
from planner.memory import (COMPONENTS, K_LARGE_BUFFER, K_MIN_BLOCK_SIZE, K_MIN_LARGE_ALLOC, K_ROUND_LARGE,
                            K_SMALL_BUFFER, K_SMALL_SIZE, AllocConf, round_size, segment_size, side_stream_pool)
from planner.step_store import StepStore
from planner.schema import Component, Event, EventKind, Phase, Tier
from planner.steptime import StepWork, predict_step_time
from planner.strategy import Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
    from planner.chunks import ChunkTable
    from planner.model import ModelSpec
    from planner.recipe import Recipe
    from planner.trace import StepShape

# The CUDA context (driver, kernels of torch's loaded modules with lazy loading) sits outside
# PyTorch's allocator: 300-600 MiB on recent drivers; 512 MiB is a round, conservative figure.
CUDA_CONTEXT_BYTES = 512 * 2**20
# fp32 AdamW moments (exp_avg, exp_avg_sq) and an fp32 master per parameter. The master exists
# for fp32 training too: runtime.chunk_optim keeps each chunk's state (master included) apart
# from the model's weights, so it can rest off the GPU.
MOMENT_BYTES_PER_PARAM = 8
MASTER_BYTES_PER_PARAM = 4
FP32_BYTES = 4
# ChunkAdamW._adamw per span: grad.to(fp32) (16-bit training), exp_avg_sq.sqrt(), and the
# division's result, alive together inside `denom = (exp_avg_sq.sqrt() / c).add_(eps)`.
SINGLE_TENSOR_TEMP_BYTES_PER_PARAM = 8  # plus FP32_BYTES for the gradient cast when 16-bit
# NVMSA instant offload: a gradient is copied out while the next is produced: two buffers of
# the largest gradient stay on the GPU.
STAGING_BUFFERS = 2
# DeepSpeed ZeRO stage-1/2 default reduce_bucket_size (5e8 elements; deepspeed/runtime/zero/
# config.py), double-buffered with overlap_comm.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000
DEEPSPEED_BUCKETS = 2
# Pinned bounce buffers between disk and GPU (large sequential blocks): two of 64 MiB.
DISK_BOUNCE_BYTES = 2 * 64 * 2**20
# cuBLAS workspace size in planner.memory depends on the architecture: Hopper (sm90) parts.
_HOPPER = re.compile(r"^(h100|h200|h800|h20|gh200)")

_CI = {c: i for i, c in enumerate(COMPONENTS)}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ParamLayout:
    """The model's parameters as the optimizer sees them."""

    named_shapes: tuple
    """(name, shape, elem_bytes) in module order, each parameter once (tied weights once)."""
    elem_bytes: int
    layer_prefix: str | None
    num_layers: int
    layer_weight_bytes: int
    """Bytes of one decoder layer's parameters (0 when the model has no layer list)."""
    input_embedding: str | None = None
    """Name of the input embedding's weight (a lookup, not a matmul), if known."""
    tensor_bytes: tuple[int, ...] = ()
    """Bytes of each parameter, in `named_shapes` order (derived)."""
    total_bytes: int = 0
    """Bytes of all parameters (derived)."""

    def __post_init__(self):
        sizes = tuple(math.prod(s) * e for _, s, e in self.named_shapes)
        object.__setattr__(self, "tensor_bytes", sizes)
        object.__setattr__(self, "total_bytes", sum(sizes))

    @property
    def total_params(self) -> int:
        return self.total_bytes // self.elem_bytes


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TracedStep:
    """What evaluate needs from one traced and replayed (CUDA allocator) step."""

    live: np.ndarray
    """(len(COMPONENTS), num_ops) allocated bytes per component after every op."""
    reserved: np.ndarray
    """(num_ops,) allocator-held bytes after every op."""
    flops: int
    phases: tuple[Phase, ...] = ()
    layers: tuple[int | None, ...] = ()
    least: int | None = None
    """The least memory the traced step needs (planner.memory MemoryTimeline.least_bytes: the
    smallest allocator cap it replays under, cached blocks freed and retried); None = reserved."""
    host_activations: int = 0
    """Offloaded activations in pinned host memory at their peak (--offload-activations), and
    the CachingHostAllocator's power-of-two rounding of them (planner.activations.host_bytes)."""
    host_rounding: int = 0
    host_live: np.ndarray | None = None
    """(2, num_ops): the offloaded activations' bytes after every op, raw and as the host
    allocator rounds them (planner.activations.host_series); None when nothing is offloaded."""

    @property
    def nbytes(self) -> int:
        """Memory this step holds (its arrays, and a pointer per op in `phases` and `layers`):
        what planner.step_store bounds."""
        arrays = self.live.nbytes + self.reserved.nbytes + (0 if self.host_live is None else self.host_live.nbytes)
        return arrays + 8 * (len(self.phases) + len(self.layers))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ActiveSet:
    """What one step trains: the tensors (or spans) the optimizer updates, in 16-bit bytes."""

    chunk: int | None
    tensor_bytes: tuple[int, ...]
    prefetch_bytes: tuple[int, ...] = ()
    """16-bit bytes of each span of the upcoming chunks whose state is brought to the GPU."""


# ---------------------------------------------------------------------------------------------
# Model layout, chunk tables and traces (cached: fit evaluates many strategies of one model)

_LAYOUTS: dict[tuple, ParamLayout] = {}
_TABLES: dict[tuple, "ChunkTable"] = {}
# Traced steps, bounded in bytes (planner.step_store: a 1B model's exact chunk traces number
# hundreds, a 405B model's steps hold megabytes each).
_TRACES = StepStore()
# Traced steps replayed without the least-memory search (`traced_step(least=False)`: the sharded
# model and the step-time path read no `least`); a full one in _TRACES answers them first.
_LEAN_TRACES = StepStore()
# trace_step's graphs per model, shape and trace options: the GPU kind (cuBLAS workspace) and
# streamed weights change only the replay, so one fake-tensor trace serves them all.
_GRAPHS: dict[tuple, Any] = {}
_GRAPH_CACHE_SIZE = 4
# Pure functions of a chunk table (and a strategy's few fields) that evaluate asks for on every
# call: kept per table object (tables are cached in _TABLES), with the table held beside them.
_MEMO: dict[tuple, tuple] = {}
_MEMO_SIZE = 512


def _memo(key: tuple, owners: tuple, make):
    """make() for `key`, kept while `owners` (the objects whose ids are in the key) are the same."""
    hit = _MEMO.get(key)
    if hit is not None and len(hit[0]) == len(owners) and all(a is b for a, b in zip(hit[0], owners)):
        return hit[1]
    value = make()
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = (owners, value)
    return value


def clear_caches() -> dict[str, int]:
    """Forget the layouts, chunk tables and traced steps kept in this process (the disk cache,
    planner.cache, is not touched): the next evaluation rebuilds them. Returns how many of each
    were held."""
    held = {"layouts": len(_LAYOUTS), "tables": len(_TABLES), "traces": len(_TRACES)}
    for store in (_LAYOUTS, _TABLES, _TRACES, _LEAN_TRACES, _GRAPHS, _MEMO, _STATE_SUMMARIES, _SIDE_STATES, _TOTALS):
        store.clear()
    return held


def _elem_bytes(dtype: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]


def param_layout(model: "ModelSpec", dtype: str = "bf16") -> ParamLayout:
    """Parameters in module order. Built from a one-layer template and replicated by name
    (decoder layers are identical), so 405B takes milliseconds; factories build in full."""
    key = (model.fingerprint(), dtype)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    stored = disk_cache.load("layout", key)  # planner.cache: None unless `chunkft fit` enabled it
    if isinstance(stored, ParamLayout):
        _LAYOUTS[key] = stored
        return stored
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    depth = model.num_layers
    use_template = model.config is not None and depth is not None and depth > 1
    module = model.build(num_layers=1 if use_template else None, dtype=torch_dtype, device="meta")
    from planner.model import find_layer_list

    found = find_layer_list(module)
    prefix = None if found is None else found[0]
    base = [(n, tuple(p.shape), p.element_size()) for n, p in module.named_parameters()]
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    emb_weight = getattr(emb, "weight", None)
    input_embedding = next((n for n, p in module.named_parameters() if p is emb_weight), None)
    layer0 = f"{prefix}.0." if prefix else None
    template = [(n[len(layer0):], s, e) for n, s, e in base if layer0 and n.startswith(layer0)]
    layer_bytes = sum(math.prod(s) * e for _, s, e in template)
    if use_template and prefix:
        shapes: list = []
        placed = False
        for n, s, e in base:
            if n.startswith(layer0):
                if not placed:
                    shapes += [(f"{prefix}.{i}.{t}", ts, te) for i in range(depth) for t, ts, te in template]
                    placed = True
            else:
                shapes.append((n, s, e))
        num_layers = depth
    else:
        shapes = base
        num_layers = len(found[1]) if found else 0
    layout = ParamLayout(named_shapes=tuple(shapes), elem_bytes=_elem_bytes(dtype), layer_prefix=prefix,
                         num_layers=num_layers, layer_weight_bytes=layer_bytes, input_embedding=input_embedding)
    _LAYOUTS[key] = layout
    disk_cache.store("layout", key, layout)
    return layout


def chunk_table(model: "ModelSpec", dtype: str, chunks: int, recipe: "Recipe | None" = None) -> "ChunkTable":
    """The C-chunk table over the parameters `recipe` trains (--trainable / --freeze: the
    trainable ones only, so ChunkFT cycles through exactly those; default: all)."""
    from planner.chunks import ChunkTable, make_chunk_table
    from planner.train_axes import trained_shapes

    if recipe is not None and not (recipe.trainable or recipe.freeze or recipe.lora_rank):
        recipe = None  # every parameter trains (train_axes.trained_shapes: the layout's own): one table
    patterns = () if recipe is None else (recipe.trainable, recipe.freeze)
    key = (model.fingerprint(), dtype, chunks, patterns)
    if key not in _TABLES:
        stored = disk_cache.load("chunks", key)
        if isinstance(stored, ChunkTable):
            _TABLES[key] = stored
        else:
            shapes = param_layout(model, dtype).named_shapes
            _TABLES[key] = make_chunk_table(trained_shapes(recipe, shapes) if recipe is not None else shapes, chunks)
            disk_cache.store("chunks", key, _TABLES[key])
    return _TABLES[key]


def chunk_groups(table: "ChunkTable", layer_prefix: str | None) -> list[list[int]]:
    """Chunks grouped by layer pattern, each group in chunk order, groups by first chunk.

    A chunk's pattern is its spans' parameter names with the decoder-layer index replaced by
    the offset from the chunk's first layer, each marked whole or sliced."""
    rx = re.compile(re.escape(layer_prefix) + r"\.(\d+)\.(.*)") if layer_prefix else None
    groups: dict[tuple, list[int]] = {}
    for k, chunk in enumerate(table.chunks):
        first = None
        sig = []
        for span in chunk:
            m = rx.match(span.param) if rx else None
            if m:
                i = int(m.group(1))
                first = i if first is None else first
                name = f"+{i - first}.{m.group(2)}"
            else:
                name = span.param
            sig.append((name, table.is_whole(span)))
        groups.setdefault(tuple(sig), []).append(k)
    return sorted(groups.values(), key=lambda g: g[0])


def sm_arch(hw: Any) -> int:
    """CUDA architecture of the hardware's GPU as planner.memory's cuBLAS workspace model takes
    it: 90 for Hopper parts, 80 otherwise. The only way the GPU kind changes traced memory."""
    return 90 if _HOPPER.match(hw.gpu.name.lower()) else 80


def traced_step(model: "ModelSpec", shape: "StepShape", *, grad: dict | None, checkpointing: bool,
                loss_chunk_tokens: int, sm: int, loop: str = "chunkft", alloc_conf: str = "", stream: bool = False,
                recipe: "Recipe | None" = None, least: bool = True) -> TracedStep:
    """trace_step + replay(allocator="cuda"), cached per model, shape and trace options
    (`loop`: the recipe's, planner.recipe.Loop). `stream`: decoder layers' weights come and go
    as runtime.stream moves them (planner.streaming rewrites the trace before the replay).
    `least=False`: the caller reads no `TracedStep.least` (planner.sharding's per-rank model,
    `step_time_parts`): the replay skips the least-memory search (a full step cached already
    answers), and the step is kept apart from the full ones."""
    from planner.trace import trace_step

    options, key = _trace_key(model, shape, grad=grad, checkpointing=checkpointing,
                              loss_chunk_tokens=loss_chunk_tokens, sm=sm, loop=loop, alloc_conf=alloc_conf,
                              stream=stream, recipe=recipe)
    held = _held(key, recipe, least)
    if held is not None:
        return held
    graph_key = (model.fingerprint(), shape, options.key())
    graph = _GRAPHS.get(graph_key)
    if graph is None:  # the graph is read only from here on (stream_weights and replay build new ones)
        graph = trace_step(model, shape, options)
        if len(_GRAPHS) >= _GRAPH_CACHE_SIZE:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[graph_key] = graph
    if stream:
        from planner.streaming import packed_layer_bytes, stream_weights

        layout = param_layout(model, shape.dtype)
        if layout.layer_prefix is None:
            raise ChunkftError(f"model {model.name!r} has no decoder layer list to stream")
        graph = stream_weights(graph, packed_layer_bytes(layout.named_shapes, layout.layer_prefix, layout.num_layers))
    tl = graph.replay(allocator="cuda", sm=sm, alloc_conf=alloc_conf, least=least)
    live = np.stack([tl.live_bytes[c] for c in COMPONENTS])
    from planner.activations import host_peak, host_series

    series = host_series(graph)
    host_act, host_round = host_peak(series)
    step = TracedStep(live=live, reserved=np.asarray(tl.reserved_bytes, dtype=np.int64), least=tl.least_bytes,
                      flops=int(graph.total_flops()), phases=tuple(op.phase for op in graph.ops),
                      layers=tuple(op.layer for op in graph.ops), host_activations=host_act, host_rounding=host_round,
                      host_live=None if series is None else np.stack(series))
    (_TRACES if least else _LEAN_TRACES)[key] = step
    disk_cache.store("trace", (key, recipe) if least else (key, recipe, "lean"), step)
    return step


def _trace_key(model: "ModelSpec", shape: "StepShape", *, grad: dict | None, checkpointing: bool,
               loss_chunk_tokens: int, sm: int, loop: str, alloc_conf: str, stream: bool,
               recipe: "Recipe | None") -> tuple[Any, tuple]:
    """(TraceOptions, cache key) of a `traced_step` call, kept per GradSpec object (evaluate asks
    for each chunk pattern's spec of a table once per strategy: `_group_specs`)."""
    memo_key = ("trace-key", id(grad), model.fingerprint(), shape, checkpointing, loss_chunk_tokens, sm, loop,
                alloc_conf, stream, recipe)
    return _memo(memo_key, (grad,), lambda: _make_trace_key(model, shape, grad=grad, checkpointing=checkpointing,
                                                             loss_chunk_tokens=loss_chunk_tokens, sm=sm, loop=loop,
                                                             alloc_conf=alloc_conf, stream=stream, recipe=recipe))


def _make_trace_key(model: "ModelSpec", shape: "StepShape", *, grad: dict | None, checkpointing: bool,
                    loss_chunk_tokens: int, sm: int, loop: str, alloc_conf: str, stream: bool,
                    recipe: "Recipe | None") -> tuple[Any, tuple]:
    from planner.trace import TraceOptions

    if recipe is None:
        options = TraceOptions(grad=grad, checkpointing=checkpointing, loss_chunk_tokens=loss_chunk_tokens, loop=loop)
    else:  # the recipe's traced axes (planner.train_axes.trace_options); `loop` is the recipe's
        from planner.train_axes import trace_options

        options = trace_options(recipe, grad=grad, checkpointing=checkpointing, loss_chunk_tokens=loss_chunk_tokens)
    return options, (model.fingerprint(), shape, options.key(), sm, AllocConf.parse(alloc_conf).normalised(), stream)


def trace_requests(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: Any, *,
                   chunk_traces: str = "auto") -> list[dict]:
    """The `traced_step` calls `evaluate(model, shape, strategy, hw, chunk_traces)` makes, as
    keyword arguments (planner.parallel_eval makes them ahead, in parallel)."""
    _check_evaluable(strategy, shape, chunk_traces)
    recipe = strategy.recipe
    layout = param_layout(model, shape.dtype)
    grads = [trained_grad_spec(layout, recipe)]
    if strategy.chunks > 1 and chunk_mode(layout, chunk_traces) == "exact":
        table = chunk_table(model, shape.dtype, strategy.chunks, recipe)
        grads = [grad for _, grad in _group_specs(table, layout.layer_prefix)]
    return [dict(grad=grad, checkpointing=strategy.checkpointing, alloc_conf=recipe.alloc_conf,
                 loss_chunk_tokens=strategy.loss_chunk_tokens, sm=sm_arch(hw), loop=recipe.loop.value,
                 stream=strategy.weights == WeightResidency.STREAM, recipe=recipe) for grad in grads]


def request_keys(model: "ModelSpec", shape: "StepShape", request: dict) -> tuple[tuple, tuple]:
    """(traced step key, fake-trace graph key) of a `traced_step` request (`trace_requests`,
    planner.rank_step.chunk_requests): requests with one graph key share one fake trace (they
    differ in GPU kind, streamed weights or `least` only)."""
    options, key = _trace_key(model, shape, **{k: v for k, v in request.items() if k != "least"})
    return key, (model.fingerprint(), shape, options.key())


def holds_trace(key: tuple, recipe: "Recipe | None", least: bool = True) -> bool:
    """Whether `traced_step` would answer `key` (and `least`) without tracing: the step is held in
    this process or in the disk cache (then it is loaded and held)."""
    return _held(key, recipe, least) is not None


def _held(key: tuple, recipe: "Recipe | None", least: bool) -> TracedStep | None:
    """`traced_step`'s lookup: a full step held here, a lean one (`least=False` only), then the
    same from the disk cache, held here once loaded; None when the step must be traced."""
    if key in _TRACES:
        return _TRACES[key]
    if not least and key in _LEAN_TRACES:
        return _LEAN_TRACES[key]
    stored = disk_cache.load("trace", (key, recipe))
    if isinstance(stored, TracedStep):
        _TRACES[key] = stored
        return stored
    if not least:
        stored = disk_cache.load("trace", (key, recipe, "lean"))
        if isinstance(stored, TracedStep):
            _LEAN_TRACES[key] = stored
            return stored
    return None


def held_traces() -> tuple[dict, dict]:
    """(full, lean) traced steps held in this process, by key (copies of the dicts)."""
    return dict(_TRACES.items()), dict(_LEAN_TRACES.items())


def hold_traces(full: dict, lean: dict) -> None:
    """Hold traced steps another process made (planner.parallel_eval), as `traced_step` holds its own."""
    for store, new in ((_TRACES, full), (_LEAN_TRACES, lean)):
        for key, step in new.items():
            if key not in store:
                store[key] = step


# ---------------------------------------------------------------------------------------------
# The cost model proper: pure functions of a traced step, a layout and a strategy


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Alloc:
    """One allocation the trace does not hold (state, optimizer temporaries), before rounding."""

    component: Component
    nbytes: int


def _state_per_param(elem_bytes: int) -> tuple[int, int]:
    """(master, moments) bytes per parameter, whatever the training dtype (see above)."""
    return MASTER_BYTES_PER_PARAM, MOMENT_BYTES_PER_PARAM


def state_allocs(tensor_bytes: tuple[int, ...], elem: int) -> list[Alloc]:
    """fp32 master and moments, one tensor each per span of these 16-bit sizes."""
    master, moments = _state_per_param(elem)
    out = []
    for nbytes in tensor_bytes:
        n = nbytes // elem
        if master:
            out.append(Alloc(component=Component.MASTER, nbytes=master * n))
        out += [Alloc(component=Component.OPTIMIZER, nbytes=FP32_BYTES * n)] * (moments // FP32_BYTES)
    return out


def gpu_static_allocs(strategy: Strategy, layout: ParamLayout, active: ActiveSet,
                      all_spans: tuple[int, ...]) -> list[Alloc]:
    """Allocations resident on the GPU for the whole step that the trace does not hold: fp32
    master + moments of `all_spans` (C = 1, or state on the GPU) or of the active set's spans
    and prefetch (state on host / disk); none for a host optimizer. The recipe's --optim /
    --precision change the tensors (`recipe_state_allocs`)."""
    if strategy.optimizer_device == OptimizerDevice.HOST:
        return []
    return recipe_state_allocs(strategy, layout, _static_spans(strategy, active, all_spans))


def _static_spans(strategy: Strategy, active: ActiveSet, all_spans: tuple[int, ...]) -> tuple[int, ...]:
    """The spans whose state `gpu_static_allocs` puts on the GPU (GPU optimizer)."""
    if strategy.chunks == 1 or strategy.state_tier == Tier.GPU:
        return all_spans or active.tensor_bytes
    return active.tensor_bytes + active.prefetch_bytes


def gpu_static_summary(strategy: Strategy, layout: ParamLayout, active: ActiveSet,
                       all_spans: tuple[int, ...]) -> tuple[dict[Component, int], int]:
    """(`add_allocs` of `gpu_static_allocs`, its `segment_bytes`): the same figures, with
    chunkft's own ChunkAdamW state summed at once (`state_summary`) instead of one Alloc per
    tensor. The dict is the caller's; it is empty exactly when there are no allocations."""
    if strategy.optimizer_device == OptimizerDevice.HOST:
        return {}, 0
    spans = _static_spans(strategy, active, all_spans)
    recipe = strategy.recipe
    if recipe.optim == "chunkft" and recipe.precision.value == "mixed":  # recipe_step_cost is None
        comps, reserved = state_summary(spans, layout.elem_bytes)
        return dict(comps), reserved
    statics = recipe_state_allocs(strategy, layout, spans)
    comps: dict[Component, int] = {}
    add_allocs(comps, statics)
    return comps, segment_bytes(statics)


_STATE_SUMMARIES: dict[tuple, tuple[dict[Component, int], int]] = {}


def state_summary(tensor_bytes: tuple[int, ...], elem: int) -> tuple[dict[Component, int], int]:
    """(`add_allocs` of `state_allocs(tensor_bytes, elem)`, their `segment_bytes`), the same
    ints and the same component order, computed over arrays and kept per (elem, spans): a pure
    function that every evaluation of a chunk count asks again (read only: copy to change)."""
    key = (elem, tensor_bytes)
    hit = _STATE_SUMMARIES.get(key)
    if hit is not None:
        return hit
    master, moments = _state_per_param(elem)
    n = np.asarray(tensor_bytes, dtype=np.int64) // elem
    groups = []  # (component, bytes per tensor, tensors per span), in state_allocs' order
    if master:
        groups.append((Component.MASTER, master * n, 1))
    if moments // FP32_BYTES:
        groups.append((Component.OPTIMIZER, FP32_BYTES * n, moments // FP32_BYTES))
    comps: dict[Component, int] = {}
    small = mid = large = 0
    if len(n):
        for component, sizes, count in groups:
            rounded = np.maximum(-(-sizes // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE, K_MIN_BLOCK_SIZE)  # round_size
            comps[component] = comps.get(component, 0) + count * int(sizes.sum())
            comps[Component.ROUNDING] = comps.get(Component.ROUNDING, 0) + count * int((rounded - sizes).sum())
            is_small = rounded <= K_SMALL_SIZE
            is_mid = ~is_small & (rounded < K_MIN_LARGE_ALLOC)
            is_large = ~is_small & ~is_mid
            small += count * int(rounded[is_small].sum())
            mid += count * int(rounded[is_mid].sum())
            large += count * int((-(-rounded[is_large] // K_ROUND_LARGE) * K_ROUND_LARGE).sum())  # segment_size
    value = (comps, _ceil_to(small, K_SMALL_BUFFER) + _ceil_to(mid, K_LARGE_BUFFER) + large)
    if len(_STATE_SUMMARIES) >= _MEMO_SIZE:
        _STATE_SUMMARIES.pop(next(iter(_STATE_SUMMARIES)))
    _STATE_SUMMARIES[key] = value
    return value


def recipe_state_allocs(strategy: Strategy, layout: ParamLayout, spans: tuple[int, ...]) -> list[Alloc]:
    """The GPU state tensors of these spans under the strategy's recipe: `state_allocs` for
    chunkft's ChunkAdamW, the traced optimizer's (planner.optim_step) for --optim / --precision."""
    cost = recipe_step_cost(strategy, layout, spans)
    return state_allocs(spans, layout.elem_bytes) if cost is None else _allocs(cost.gpu_state)


def optimizer_temp_allocs(strategy: Strategy, layout: ParamLayout, active: ActiveSet) -> list[Alloc]:
    """GPU temporaries of the AdamW step: one span at a time, so the largest span's."""
    if strategy.optimizer_device == OptimizerDevice.HOST or not active.tensor_bytes:
        return []
    cost = recipe_step_cost(strategy, layout, active.tensor_bytes)  # --optim / --precision: its traced step
    if cost is not None:
        return _allocs(cost.temps)
    elem = layout.elem_bytes
    n = max(active.tensor_bytes) // elem
    per = SINGLE_TENSOR_TEMP_BYTES_PER_PARAM // FP32_BYTES
    out = [Alloc(component=Component.TEMPORARIES, nbytes=FP32_BYTES * n)] * per
    if elem < FP32_BYTES:
        out.append(Alloc(component=Component.TEMPORARIES, nbytes=FP32_BYTES * n))
    return out


def recipe_step_cost(strategy: Strategy, layout: ParamLayout, spans: tuple[int, ...]) -> Any:
    """The recipe's optimizer over these spans (16-bit bytes), traced by planner.optim_step, or
    None for chunkft's own ChunkAdamW (the constants above). C = 1: each parameter's own shape
    (Adafactor factors 2-D ones); a ChunkFT span, or a tensor the layout does not name (LoRA),
    is flat. 2-byte training is traced as bf16."""
    recipe = strategy.recipe
    if recipe.optim == "chunkft" and recipe.precision.value == "mixed":
        return None
    from planner.optim_step import step_cost

    # chunkft + pure passes require_modelled only with --optimizer-in-backward, whose hooks run
    # torch.optim.AdamW(foreach=False) on each tensor (planner.train_axes)
    optim = "adamw_torch_forloop" if recipe.optim == "chunkft" else recipe.optim

    elem = layout.elem_bytes
    by_bytes = {}
    if strategy.chunks == 1:
        for _, sh, e in reversed(layout.named_shapes):
            by_bytes[math.prod(sh) * e] = tuple(sh)
    shapes = tuple(by_bytes.get(b, (b // elem,)) for b in spans)
    return step_cost(optim, recipe.precision.value, {4: "fp32"}.get(elem, "bf16"), shapes,
                     chunk_spans=strategy.chunks > 1)


def _allocs(entries) -> list[Alloc]:
    return [Alloc(component=c, nbytes=b) for c, b, n in entries for _ in range(n)]


def _grad_cap(strategy: Strategy, layout: ParamLayout, active: ActiveSet) -> int | None:
    """Most gradient bytes on the GPU at once when gradients leave it (None: they stay)."""
    if strategy.grad_staging is not None:
        return STAGING_BUFFERS * max(active.tensor_bytes, default=0)
    if strategy.optimizer_device == OptimizerDevice.HOST:
        return DEEPSPEED_BUCKETS * DEEPSPEED_BUCKET_ELEMENTS * layout.elem_bytes
    return None


def add_allocs(comps: dict[Component, int], allocs: list[Alloc]) -> None:
    """Add allocations to a component breakdown, with the allocator's rounding as ROUNDING."""
    for a in allocs:
        r = round_size(a.nbytes)
        comps[a.component] = comps.get(a.component, 0) + a.nbytes
        comps[Component.ROUNDING] = comps.get(Component.ROUNDING, 0) + r - a.nbytes


def segment_bytes(allocs: list[Alloc]) -> int:
    """Reserved bytes for allocations made back to back into fresh segments: small ones
    (<= 1 MiB) pack into 2 MiB segments, 1-10 MiB ones into 20 MiB segments, larger ones get
    their own segment rounded up to 2 MiB (planner.memory.segment_size)."""
    small = mid = large = 0
    for a in allocs:
        r = round_size(a.nbytes)
        if r <= K_SMALL_SIZE:
            small += r
        elif r < K_MIN_LARGE_ALLOC:
            mid += r
        else:
            large += segment_size(r)
    return _ceil_to(small, K_SMALL_BUFFER) + _ceil_to(mid, K_LARGE_BUFFER) + large


def _ceil_to(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _gpu_grad_cap(strategy: Strategy, layout: ParamLayout, active: ActiveSet) -> int | None:
    """Most gradient bytes `adjusted_gpu_live` leaves on the GPU (None: no cap)."""
    cap = _grad_cap(strategy, layout, active)
    if strategy.chunks > 1:  # a chunk's gradients never exceed its bytes (bound mode: see evaluate)
        cap = min(sum(active.tensor_bytes), cap) if cap is not None else sum(active.tensor_bytes)
    return cap


_TOTALS: dict[int, tuple] = {}
_TOTALS_SIZE = 96  # a sum per traced step, remade when dropped


def _adjusted_totals(traced: TracedStep, cap: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(`adjusted_gpu_live`'s live bytes summed over components, its reserved, the capped
    gradient row or None) without copying the (components x ops) matrix: the same ints, since
    only the gradient row changes (total = the trace's total - what the cap removes)."""
    hit = _TOTALS.get(id(traced))
    if hit is None or hit[0] is not traced:
        if len(_TOTALS) >= _TOTALS_SIZE:
            _TOTALS.pop(next(iter(_TOTALS)))
        hit = _TOTALS[id(traced)] = (traced, traced.live.sum(axis=0))
    total = hit[1]
    if cap is None:
        return total, np.maximum(traced.reserved, total), None
    g = traced.live[_CI[Component.GRADIENTS]]
    kept = np.minimum(g, cap)
    removed = g - kept
    total = total - removed
    return total, np.maximum(traced.reserved - removed, total), kept


def adjusted_gpu_live(traced: TracedStep, strategy: Strategy, layout: ParamLayout,
                      active: ActiveSet) -> tuple[np.ndarray, np.ndarray]:
    """(live per component, reserved) after every op once gradients leave (streamed weights are
    in the traced step already: `traced_step(stream=True)`)."""
    live = traced.live.copy()
    removed = np.zeros(live.shape[1], dtype=np.int64)
    cap = _gpu_grad_cap(strategy, layout, active)
    if cap is not None:
        g = live[_CI[Component.GRADIENTS]]
        kept = np.minimum(g, cap)
        removed += g - kept
        live[_CI[Component.GRADIENTS]] = kept
    reserved = np.maximum(traced.reserved - removed, live.sum(axis=0))
    return live, reserved


def host_and_disk_bytes(strategy: Strategy, layout: ParamLayout, active: ActiveSet, all_spans: tuple[int, ...]
                        ) -> tuple[dict[Component, int], dict[Component, int]]:
    """(host, disk) bytes per component of one step: see the module doc."""
    host: dict[Component, int] = {}
    disk: dict[Component, int] = {}
    elem = layout.elem_bytes
    master, moments = _state_per_param(elem)
    total_params = sum(all_spans or layout.tensor_bytes) // elem
    step_params = sum(active.tensor_bytes) // elem
    largest = max(active.tensor_bytes, default=0) // elem

    def put(d: dict, c: Component, n: int) -> None:
        if n:
            d[c] = d.get(c, 0) + n

    off_gpu = strategy.optimizer_device == OptimizerDevice.HOST or strategy.state_tier != Tier.GPU
    master_total, moments_total = master * total_params, moments * total_params
    cost = recipe_step_cost(strategy, layout, all_spans or layout.tensor_bytes)
    if cost is not None:  # --optim / --precision: the traced state; what it keeps off the GPU is here
        master_total = sum(b * n for c, b, n in cost.gpu_state if c == Component.MASTER)
        moments_total = cost.gpu_state_bytes - master_total
        put(host, Component.OPTIMIZER, cost.host_state_bytes)
    if off_gpu and strategy.state_tier == Tier.HOST:
        put(host, Component.MASTER, master_total)
        put(host, Component.OPTIMIZER, moments_total)
        # pinned for the GPU step as one flat buffer per chunk (runtime.host_buffer: registered in
        # place, no power-of-two rounding); each tensor starts at a 64-byte offset
        if strategy.optimizer_device == OptimizerDevice.GPU and cost is not None:
            put(host, Component.ROUNDING, sum((_ceil_to(b, 64) - b) * n for _, b, n in cost.gpu_state))
        elif strategy.optimizer_device == OptimizerDevice.GPU:
            kinds = (master + moments) // FP32_BYTES
            put(host, Component.ROUNDING, kinds * _fp32_padding(all_spans or layout.tensor_bytes, elem))
    if off_gpu and strategy.state_tier == Tier.DISK:
        put(disk, Component.MASTER, master_total)
        put(disk, Component.OPTIMIZER, moments_total)
        if strategy.optimizer_device == OptimizerDevice.HOST:
            # state window: the span being stepped + prefetched ones. runtime.chunk_optim streams
            # state one whole span at a time (a 128K-vocabulary 8B embedding is 525M parameters,
            # 6.3 GB of fp32 master + moments), so the largest span sets the window.
            put(host, Component.TEMPORARIES, (1 + strategy.prefetch_depth) * (master + moments) * largest)
        else:
            put(host, Component.TEMPORARIES, DISK_BOUNCE_BYTES)
    if strategy.optimizer_device == OptimizerDevice.HOST:
        # ChunkAdamW(device="cpu") steps one span at a time: sqrt(v) and its division, plus the
        # fp32 cast of a 16-bit gradient (the fp16-centric exchange casts at the optimizer)
        staged16 = strategy.grad_staging is not None and elem < FP32_BYTES
        put(host, Component.TEMPORARIES, (SINGLE_TENSOR_TEMP_BYTES_PER_PARAM + FP32_BYTES * staged16) * largest)
        if strategy.grad_staging is None:  # DeepSpeed-style: fp32 gradients gathered on host
            put(host, Component.GRADIENTS, FP32_BYTES * step_params)
        elif strategy.grad_staging == Tier.HOST:
            put(host, Component.GRADIENTS, elem * step_params)
        else:
            put(disk, Component.GRADIENTS, elem * step_params)
            put(host, Component.TEMPORARIES, DISK_BOUNCE_BYTES)
    if strategy.weights == WeightResidency.STREAM:  # one flat buffer per decoder layer, registered in place
        from planner.streaming import packed_layer_bytes

        put(host, Component.WEIGHTS, sum(packed_layer_bytes(layout.named_shapes, layout.layer_prefix,
                                                            layout.num_layers).values()))
    return host, disk


def _fp32_padding(spans: tuple[int, ...], elem: int) -> int:
    """Bytes that 64-byte offsets add to one fp32 tensor per span (of `elem`-byte parameters), kept
    per spans tuple: every chunk of a strategy asks with the table's spans."""
    return _memo(("fp32-padding", id(spans), elem), (spans,),
                 lambda: sum(_ceil_to(FP32_BYTES * (b // elem), 64) - FP32_BYTES * (b // elem) for b in spans))


def combine(traced: TracedStep, strategy: Strategy, layout: ParamLayout, active: ActiveSet,
            hw: Any, *, dtype: str = "bf16", all_spans: tuple[int, ...] = (),
            flops: int | None = None, chunk_spans: tuple[tuple[int, ...], ...] = ()) -> Estimate:
    """The Estimate of one step (one active chunk) from its traced step: see the module doc.

    `all_spans`: 16-bit bytes of every span of every chunk (default: the active set's);
    `flops`: the step's flops when not the traced step's own (bound mode); `chunk_spans`: the
    same per chunk, in chunk order, for the prefetch side stream's pool (`side_stream_state`).

    Least memory (Estimate.least_bytes): the traced step's own (the smallest cap its replay runs
    under with PyTorch's free-cached-blocks-and-retry), lowered by what `adjusted_gpu_live`
    takes off reserved, plus what the static state needs (its segments, or the side stream's
    least); at the optimizer step, what is left allocated plus the temporaries' segments."""
    # adjusted_gpu_live's figures, read at the ops combine needs (no copy of the whole matrix)
    total, reserved, kept = _adjusted_totals(traced, _gpu_grad_cap(strategy, layout, active))
    gr = _CI[Component.GRADIENTS]

    def column(t: int) -> dict[Component, int]:
        return {c: int(traced.live[i, t] if kept is None or i != gr else kept[t]) for i, c in enumerate(COMPONENTS)}

    static_comps, static_reserved = gpu_static_summary(strategy, layout, active, all_spans)
    static_total = sum(static_comps.values())
    static_least = static_reserved
    side = side_stream_state(strategy, layout, chunk_spans)
    if side is not None and static_comps:  # static_comps is empty exactly when there are no static allocations
        static_reserved, static_least = side

    t = int(np.argmax(total))
    gpu = column(t)
    for c, b in static_comps.items():
        gpu[c] = gpu.get(c, 0) + b
    gpu_peak = int(total[t]) + static_total
    gpu_reserved = int(reserved.max()) + static_reserved  # reserved only grows: its high-water mark
    traced_top = int(traced.reserved.max())
    slack = traced_top - (traced_top if traced.least is None else min(traced.least, traced_top))
    least = max(int(reserved.max()) - slack, int(total.max())) + static_least

    # optimizer in backward: each tensor's step ran inside the traced backward (planner.train_axes)
    temps = [] if strategy.recipe.optimizer_in_backward else optimizer_temp_allocs(strategy, layout, active)
    if temps:  # the optimizer step after backward: what is left at the end, plus temporaries
        end = column(total.shape[0] - 1)
        for c, b in static_comps.items():
            end[c] = end.get(c, 0) + b
        add_allocs(end, temps)
        opt_peak = sum(end.values())
        gpu_reserved = max(gpu_reserved, int(reserved.max()) + static_reserved + segment_bytes(temps))
        least = max(least, int(total[-1]) + static_least + segment_bytes(temps))
        if opt_peak > gpu_peak:
            gpu, gpu_peak = end, opt_peak
    gpu = {c: b for c, b in gpu.items() if b}
    assert sum(gpu.values()) == gpu_peak
    reserved_bytes = max(gpu_reserved, gpu_peak)

    host, disk = host_and_disk_bytes(strategy, layout, active, all_spans)
    for c, b in ((Component.ACTIVATIONS, traced.host_activations), (Component.ROUNDING, traced.host_rounding)):
        if b:  # activations offloaded to pinned host memory (planner.activations)
            host[c] = host.get(c, 0) + b
    parts = step_parts(layout, sum(active.tensor_bytes), traced.flops if flops is None else flops, dtype,
                       traced.host_activations, strategy, hw)
    return Estimate(
        strategy=strategy,
        peak_bytes={Tier.GPU: gpu_peak, Tier.HOST: sum(host.values()), Tier.DISK: sum(disk.values())},
        components={Tier.GPU: gpu, Tier.HOST: host, Tier.DISK: disk},
        reserved_bytes=reserved_bytes,
        least_bytes=min(max(least, gpu_peak), reserved_bytes),
        step_time_s=float(sum(parts.values())),
        step_time_parts_s=parts,
        worst_chunk=active.chunk,
        context_bytes=CUDA_CONTEXT_BYTES,
    )


def side_stream_state(strategy: Strategy, layout: ParamLayout,
                      chunk_spans: tuple[tuple[int, ...], ...]) -> tuple[int, int] | None:
    """(reserved, least) of the GPU optimizer state when it arrives on the prefetch side stream
    (planner.memory.side_stream_pool): chunked, state resting off the GPU, prefetch_depth >= 1,
    optimizer on the GPU. None otherwise (or without the chunk table's spans)."""
    if (not chunk_spans or strategy.chunks < 2 or strategy.prefetch_depth < 1
            or strategy.optimizer_device != OptimizerDevice.GPU or strategy.state_tier == Tier.GPU):
        return None
    # a pure function of these (C > 1: recipe_state_allocs reads the recipe and the element size
    # only), asked again by every combine of the strategy's chunks
    key = (strategy.recipe, strategy.prefetch_depth, layout.elem_bytes, chunk_spans)
    hit = _SIDE_STATES.get(key)
    if hit is None:
        tensors = tuple(tuple(a.nbytes for a in recipe_state_allocs(strategy, layout, chunk)) for chunk in chunk_spans)
        hit = side_stream_pool(tensors, strategy.prefetch_depth, strategy.recipe.alloc_conf)
        if len(_SIDE_STATES) >= _MEMO_SIZE:
            _SIDE_STATES.pop(next(iter(_SIDE_STATES)))
        _SIDE_STATES[key] = hit
    return hit


_SIDE_STATES: dict[tuple, tuple[int, int]] = {}


# ---------------------------------------------------------------------------------------------
# Entry points


def evaluate(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: Any, *,
             chunk_traces: str = "auto") -> Estimate:
    """Predicted peaks (GPU, host, disk), component breakdowns, reserved bytes and step time.

    For C > 1 the estimate is the worst chunk's (highest GPU need) with the step time averaged
    over all chunks. `chunk_traces` says how the chunks' steps are traced:
      "exact": each layer-pattern group's first chunk is traced (`chunk_groups`) and stands for
               the group's members, whose own state, prefetch and step temporaries are added;
      "bound": the full-FT trace (every parameter trains) with the same checkpointing and loss
               stands for every chunk: it saves a superset of the activations, and its
               gradients, capped at the chunk's bytes, cover the chunk's. Pessimistic by the
               matmul inputs frozen layers would not save (under checkpointing: one layer's);
               optimistic by what the sub-tensor gradient machinery of a sliced span leaves
               alive after backward (measured at 8B, 1K tokens, C = 4..64: the exact traces
               came out between 16 MiB above and 16 MiB below the bound, 0.05%). Compute flops
               drop the frozen weights' gradient matmuls analytically. One trace serves every
               chunk count, which is what keeps `chunkft fit` and the solver fast;
      "auto":  exact up to EXACT_CHUNK_TRACE_MAX_PARAMS parameters, bound above.
    """
    _check_evaluable(strategy, shape, chunk_traces)
    recipe = strategy.recipe
    layout = param_layout(model, shape.dtype)
    trace = _tracer(model, shape, strategy, hw)

    if strategy.chunks == 1:
        full = one_chunk_active_set(layout, recipe)
        return combine(trace(trained_grad_spec(layout, recipe)), strategy, layout, full, hw, dtype=shape.dtype,
                       all_spans=full.tensor_bytes)
    table = chunk_table(model, shape.dtype, strategy.chunks, recipe)
    spans, by_chunk = _table_spans(table)
    chunk_traces = chunk_mode(layout, chunk_traces)
    estimates: list[Estimate] = []
    if chunk_traces == "exact":
        flops = []
        for group, grad in _group_specs(table, layout.layer_prefix):
            traced = trace(grad)
            flops += [traced.flops] * len(group)
            for k in group:
                estimates.append(combine(traced, strategy, layout, active_set_for(table, k, strategy), hw,
                                         dtype=shape.dtype, all_spans=spans, chunk_spans=by_chunk))
    else:
        traced = trace(trained_grad_spec(layout, recipe))
        flops = _cached_bound_flops(traced.flops, table, layout, shape, recipe)
        actives, candidates = _bound_actives(table, strategy, layout)
        for k in candidates:
            estimates.append(combine(traced, strategy, layout, actives[k], hw, dtype=shape.dtype,
                                     all_spans=spans, flops=flops[k], chunk_spans=by_chunk))
    worst = max(estimates, key=lambda e: (e.need_bytes(Tier.GPU), -(e.worst_chunk or 0)))
    top = max(estimates, key=lambda e: (e.peak_bytes[Tier.GPU], -(e.worst_chunk or 0)))
    if top.peak_bytes[Tier.GPU] > worst.peak_bytes[Tier.GPU]:
        worst = dataclasses.replace(worst, highest_peak=(top.worst_chunk, top.peak_bytes[Tier.GPU]))
    # step time: the worst chunk's terms at the mean flops of all chunks (the other terms are
    # the same for every chunk of a balanced table, up to one row)
    parts = step_parts(layout, sum(spans) // table.num_chunks, int(sum(flops) / len(flops)), shape.dtype,
                       worst.components.get(Tier.HOST, {}).get(Component.ACTIVATIONS, 0), strategy, hw)
    return dataclasses.replace(worst, step_time_s=float(sum(parts.values())), step_time_parts_s=parts)


def step_time_parts(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: Any, *,
                    chunk_traces: str = "auto") -> dict[str, float]:
    """`evaluate(...).step_time_parts_s` without the memory model: the same checks, trace, flops
    and `step_parts` arithmetic, none of the per-chunk memory estimates (what planner.sharding
    needs of a one-GPU step). The trace is replayed without the least-memory search (step times
    do not read it). Exact chunk traces (C > 1) take the worst chunk's offloaded activations, a
    memory figure: that case is `evaluate`'s own."""
    _check_evaluable(strategy, shape, chunk_traces)
    recipe = strategy.recipe
    layout = param_layout(model, shape.dtype)
    trace = _tracer(model, shape, strategy, hw, least=False)
    if strategy.chunks == 1:
        traced = trace(trained_grad_spec(layout, recipe))
        return step_parts(layout, sum(one_chunk_active_set(layout, recipe).tensor_bytes), traced.flops, shape.dtype,
                          traced.host_activations, strategy, hw)
    chunk_traces = chunk_mode(layout, chunk_traces)
    if chunk_traces == "exact":
        return evaluate(model, shape, strategy, hw, chunk_traces=chunk_traces).step_time_parts_s
    table = chunk_table(model, shape.dtype, strategy.chunks, recipe)
    spans, _ = _table_spans(table)
    traced = trace(trained_grad_spec(layout, recipe))
    flops = _cached_bound_flops(traced.flops, table, layout, shape, recipe)
    # bound: every chunk's step is the one trace's, so the worst chunk's offloaded activations are its own
    return step_parts(layout, sum(spans) // table.num_chunks, int(sum(flops) / len(flops)), shape.dtype,
                      traced.host_activations, strategy, hw)


def chunk_mode(layout: ParamLayout, chunk_traces: str) -> str:
    """"exact" or "bound": how ChunkFT steps of this model are traced ("auto" resolved)."""
    if chunk_traces == "auto":
        return "exact" if layout.total_params <= EXACT_CHUNK_TRACE_MAX_PARAMS else "bound"
    return chunk_traces


def step_parts(layout: ParamLayout, step_bytes: int, flops: int, dtype: str, offload_bytes: int, strategy: Strategy,
               hw: Any) -> dict[str, float]:
    """Seconds per step by term (planner.steptime) of a step updating `step_bytes` (16-bit) of
    parameters at `flops`, `offload_bytes` of activations offloaded to host: the one step-time
    formula of `combine`, `evaluate`, `step_time_parts` and planner.sharding."""
    work = dataclasses.replace(_work(layout, step_bytes, flops, dtype), offload_bytes=offload_bytes)
    return predict_step_time(work, strategy, hw)


def _check_evaluable(strategy: Strategy, shape: "StepShape", chunk_traces: str) -> None:
    """What `evaluate` refuses before tracing anything."""
    if not isinstance(strategy, Strategy):
        raise ChunkftError(f"expected a Strategy, got {type(strategy).__name__}")
    recipe = strategy.recipe
    recipe.require_modelled()
    conflict = recipe.conflict(strategy, shape.dtype)
    if conflict:
        raise ChunkftError(conflict)
    if chunk_traces not in CHUNK_TRACE_MODES:
        raise ChunkftError(f"invalid chunk_traces {chunk_traces!r}: valid values are {', '.join(CHUNK_TRACE_MODES)}")


def _tracer(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: Any, *, least: bool = True):
    """The strategy's `traced_step` for a GradSpec, as `evaluate` traces it."""
    recipe = strategy.recipe
    sm = sm_arch(hw)

    def trace(grad: dict | None) -> TracedStep:
        return traced_step(model, shape, grad=grad, checkpointing=strategy.checkpointing,
                           alloc_conf=recipe.alloc_conf, loss_chunk_tokens=strategy.loss_chunk_tokens, sm=sm,
                           loop=recipe.loop.value, stream=strategy.weights == WeightResidency.STREAM, recipe=recipe,
                           least=least)

    return trace


def _group_specs(table: "ChunkTable", layer_prefix: str | None,
                 spec: "Callable[[ChunkTable, int], dict] | None" = None) -> list[tuple[list[int], dict]]:
    """(`chunk_groups` group, its first chunk's GradSpec) of a table, kept per table: the same
    dict objects each time, so `_trace_key` keeps their keys. `spec(table, k)`: chunk k's
    GradSpec (default `table.grad_spec(k)`; planner.rank_step passes its sharded one)."""
    make = spec or (lambda t, k: t.grad_spec(k))
    return _memo(("group-specs", id(table), layer_prefix, spec), (table,),
                 lambda: [(group, make(table, group[0])) for group in chunk_groups(table, layer_prefix)])


def _table_spans(table: "ChunkTable") -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(every span's bytes, the same per chunk) of a chunk table, kept per table."""
    return _memo(("spans", id(table)), (table,), lambda: (tuple(s.nbytes for chunk in table.chunks for s in chunk),
                                                        tuple(tuple(s.nbytes for s in chunk) for chunk in table.chunks)))


def _cached_bound_flops(full_flops: int, table: "ChunkTable", layout: ParamLayout, shape: "StepShape",
                        recipe: "Recipe | None") -> list[int]:
    """`_bound_flops`, kept per table, layout, flops, tokens and recipe (read only)."""
    key = ("flops", id(table), id(layout), full_flops, shape.batch * shape.seq_len, recipe)
    return _memo(key, (table, layout), lambda: _bound_flops(full_flops, table, layout, shape, recipe))


def _bound_actives(table: "ChunkTable", strategy: Strategy, layout: ParamLayout) -> tuple[list[ActiveSet], list[int]]:
    """(`active_set_for` of every chunk, `bound_candidates` of them), kept per table, element
    size and what `active_set_for` reads of the strategy (read only)."""
    gpu_prefetch = strategy.optimizer_device == OptimizerDevice.GPU and strategy.state_tier != Tier.GPU
    depth = min(strategy.prefetch_depth, table.num_chunks - 1) if gpu_prefetch else 0

    def make() -> tuple[list[ActiveSet], list[int]]:
        actives = [active_set_for(table, k, strategy) for k in range(table.num_chunks)]
        return actives, bound_candidates(actives, layout)

    return _memo(("actives", id(table), depth, layout.elem_bytes), (table,), make)


CHUNK_TRACE_MODES = ("auto", "exact", "bound")
# "auto" traces every chunk pattern up to this size: a full-depth fake trace of a 7B+ model
# costs seconds on a laptop CPU and a 64-chunk table has ~20 patterns; tiny and ~1B models
# (the runtime's measured comparisons) get exact per-chunk traces.
EXACT_CHUNK_TRACE_MAX_PARAMS = 2_000_000_000
# Bound mode: chunks whose analytic part (gradient cap, GPU state, step temporaries) is largest
# are evaluated against the shared trace; the rest cannot be worse by more than the spread.
BOUND_CANDIDATES = 4


def _analytic_bytes(active: ActiveSet, layout: ParamLayout) -> tuple[int, int]:
    """(gradient bytes, state + prefetch + largest-span temporaries bytes) of a chunk's step."""
    elem = layout.elem_bytes
    master, moments = _state_per_param(elem)
    state = (master + moments) * sum(active.tensor_bytes + active.prefetch_bytes) // elem
    temps = (SINGLE_TENSOR_TEMP_BYTES_PER_PARAM + FP32_BYTES) * max(active.tensor_bytes, default=0) // elem
    return sum(active.tensor_bytes), state + temps


def bound_candidates(actives: list[ActiveSet], layout: ParamLayout) -> list[int]:
    """The chunks bound mode evaluates against the shared full-FT trace: the BOUND_CANDIDATES
    largest by analytic bytes, the largest by gradients and the largest by state + temporaries."""
    keyed = [(_analytic_bytes(a, layout), k) for k, a in enumerate(actives)]
    by_total = sorted(keyed, key=lambda x: (-(x[0][0] + x[0][1]), x[1]))[:BOUND_CANDIDATES]
    by_grad = max(keyed, key=lambda x: (x[0][0], -x[1]))
    by_static = max(keyed, key=lambda x: (x[0][1], -x[1]))
    return sorted({k for _, k in by_total} | {by_grad[1], by_static[1]})


def _bound_flops(full_flops: int, table: "ChunkTable", layout: ParamLayout, shape: "StepShape",
                 recipe: "Recipe | None" = None) -> list[int]:
    """Per chunk: full-FT flops minus the weight-gradient matmuls of frozen matrices (2 flops
    per token per weight) and the input-gradient matmuls below the chunk's first trained
    matrix (nothing there needs a gradient). The input embedding is a lookup, not a matmul.
    With --trainable / --freeze `full_flops` is the trainable set's step: what it already
    leaves out (frozen matrices, everything below the first trainable one) is not taken twice."""
    tokens = shape.batch * shape.seq_len
    elem = layout.elem_bytes
    order = {n: i for i, (n, _, _) in enumerate(layout.named_shapes)}
    spec = None if recipe is None else trained_grad_spec(layout, recipe)
    is_matmul = {n for n, sh, _ in layout.named_shapes if len(sh) == 2 and n != layout.input_embedding}
    below = np.cumsum([0] + [math.prod(sh) if n in is_matmul else 0 for n, sh, _ in layout.named_shapes])
    total_mm = sum(math.prod(sh) for n, sh, _ in layout.named_shapes if n in is_matmul and (spec is None or spec[n]))
    floor = 0 if spec is None else int(below[min(order[n] for n, v in spec.items() if v)])
    out = []
    for chunk in table.chunks:
        trained = sum(s.nbytes // elem for s in chunk if s.param in is_matmul)
        first = min(order[s.param] for s in chunk)
        out.append(max(full_flops - 2 * tokens * (total_mm - trained) - 2 * tokens * (int(below[first]) - floor), 0))
    return out


def trained_grad_spec(layout: ParamLayout, recipe: "Recipe") -> dict | None:
    """The GradSpec of a one-chunk step of `recipe`: None (every parameter trains) unless
    --trainable / --freeze / --lora narrow it (planner.train_axes.trainable_grad_spec)."""
    from planner.train_axes import trainable_grad_spec

    return trainable_grad_spec(recipe, (n for n, _, _ in layout.named_shapes))


def one_chunk_active_set(layout: ParamLayout, recipe: "Recipe") -> ActiveSet:
    """What a one-chunk step of `recipe` updates: every parameter, the trainable ones, or the
    LoRA adapters (planner.train_axes.trained_shapes); optimizer state follows it."""
    from planner.train_axes import trained_shapes

    if not (recipe.trainable or recipe.freeze or recipe.lora_rank):
        return ActiveSet(chunk=None, tensor_bytes=layout.tensor_bytes)
    return ActiveSet(chunk=None, tensor_bytes=tuple(math.prod(sh) * e for _, sh, e in
                                                     trained_shapes(recipe, layout.named_shapes)))


def _work(layout: ParamLayout, step_bytes: int, flops: int, dtype: str) -> StepWork:
    """The step-time model's inputs for a step updating `step_bytes` (16-bit) of parameters."""
    master, moments = _state_per_param(layout.elem_bytes)
    step_params = step_bytes // layout.elem_bytes
    return StepWork(
        flops=flops,
        params_step=step_params,
        elem_bytes=layout.elem_bytes,
        switch_state_bytes=2 * (master + moments) * step_params,
        stream_weight_bytes=layout.num_layers * layout.layer_weight_bytes,
        state_bytes_step=(master + moments) * step_params,
        dtype=dtype,
    )


def active_set_for(table: "ChunkTable", k: int, strategy: Strategy) -> ActiveSet:
    """Chunk k's spans, plus the spans of the chunks whose state is prefetched to the GPU."""
    gpu_prefetch = strategy.optimizer_device == OptimizerDevice.GPU and strategy.state_tier != Tier.GPU
    depth = min(strategy.prefetch_depth, table.num_chunks - 1) if gpu_prefetch else 0
    nxt = tuple(s.nbytes for i in range(1, depth + 1) for s in table.chunks[(k + i) % table.num_chunks])
    return ActiveSet(chunk=k, tensor_bytes=tuple(s.nbytes for s in table.chunks[k]), prefetch_bytes=nxt)


class StepTrace(NamedTuple):
    """One step of a strategy's chunk as evaluate builds it: the traced step and its parts."""

    traced: TracedStep
    layout: ParamLayout
    active: ActiveSet
    all_spans: tuple[int, ...]


def gpu_timeline(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: Any,
                 chunk: int | None = None, *, chunk_traces: str = "auto") -> list[Event]:
    """GPU events of one step: one OP event per traced op, then the optimizer step, then the end.

    Built from the same trace and the same additions as `evaluate` (same `chunk_traces`), so
    its highest `allocated` is evaluate's GPU peak for that chunk. `chunk` picks the active
    chunk (C > 1; default: the worst one evaluate reports)."""
    step = step_trace(model, shape, strategy, hw, chunk, chunk_traces=chunk_traces)
    return timeline_events(step.traced, strategy, step.layout, step.active, all_spans=step.all_spans)


def step_trace(model: "ModelSpec", shape: "StepShape", strategy: Strategy, hw: Any,
               chunk: int | None = None, *, chunk_traces: str = "auto") -> StepTrace:
    """The traced step behind `gpu_timeline` (same arguments)."""
    if chunk_traces not in CHUNK_TRACE_MODES:
        raise ChunkftError(f"invalid chunk_traces {chunk_traces!r}: valid values are {', '.join(CHUNK_TRACE_MODES)}")
    layout = param_layout(model, shape.dtype)
    grad = trained_grad_spec(layout, strategy.recipe)
    if strategy.chunks == 1:
        active = one_chunk_active_set(layout, strategy.recipe)
        spans = active.tensor_bytes
    else:
        if chunk is None:
            chunk = evaluate(model, shape, strategy, hw, chunk_traces=chunk_traces).worst_chunk
        table = chunk_table(model, shape.dtype, strategy.chunks, strategy.recipe)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < table.num_chunks:
            raise ChunkftError(f"chunk {chunk!r} does not exist; valid chunks are 0..{table.num_chunks - 1}")
        active = active_set_for(table, chunk, strategy)
        spans = tuple(s.nbytes for c in table.chunks for s in c)
        if chunk_mode(layout, chunk_traces) == "exact":
            group = next(g for g in chunk_groups(table, layout.layer_prefix) if chunk in g)
            grad = table.grad_spec(group[0])
    traced = traced_step(model, shape, grad=grad, checkpointing=strategy.checkpointing,
                         alloc_conf=strategy.recipe.alloc_conf,
                         loss_chunk_tokens=strategy.loss_chunk_tokens, sm=sm_arch(hw), loop=strategy.recipe.loop.value,
                         stream=strategy.weights == WeightResidency.STREAM, recipe=strategy.recipe)
    return StepTrace(traced, layout, active, spans)


def timeline_events(traced: TracedStep, strategy: Strategy, layout: ParamLayout, active: ActiveSet,
                    *, all_spans: tuple[int, ...] = ()) -> list[Event]:
    live, reserved = adjusted_gpu_live(traced, strategy, layout, active)
    statics = gpu_static_allocs(strategy, layout, active, all_spans)
    static_comps: dict[Component, int] = {}
    add_allocs(static_comps, statics)
    static_reserved = segment_bytes(statics)
    events = []
    run_reserved = 0
    for t in range(live.shape[1]):
        comps = {c: int(live[i, t]) + static_comps.get(c, 0) for i, c in enumerate(COMPONENTS)}
        run_reserved = max(run_reserved, int(reserved[t]) + static_reserved)
        alloc = sum(comps.values())
        events.append(Event(t=float(t), event=EventKind.OP, tier=Tier.GPU, allocated=alloc,
                            reserved=max(run_reserved, alloc), bytes={c: b for c, b in comps.items() if b},
                            phase=traced.phases[t] if traced.phases else None,
                            layer=traced.layers[t] if traced.layers else None, chunk=active.chunk))
    n = live.shape[1]
    end = {c: int(live[i, -1]) + static_comps.get(c, 0) for i, c in enumerate(COMPONENTS)}
    # optimizer in backward: each tensor's step ran inside the traced backward (planner.train_axes)
    temps = [] if strategy.recipe.optimizer_in_backward else optimizer_temp_allocs(strategy, layout, active)
    opt = dict(end)
    add_allocs(opt, temps)
    opt_reserved = max(run_reserved + segment_bytes(temps), sum(opt.values()))
    events.append(Event(t=float(n), event=EventKind.OPTIMIZER_STEP, tier=Tier.GPU, allocated=sum(opt.values()),
                        reserved=opt_reserved, bytes={c: b for c, b in opt.items() if b},
                        phase=Phase.OPTIMIZER, chunk=active.chunk, name="AdamW"))
    events.append(Event(t=float(n + 1), event=EventKind.STEP_END, tier=Tier.GPU, allocated=sum(end.values()),
                        reserved=opt_reserved, bytes={c: b for c, b in end.items() if b},
                        chunk=active.chunk))
    return events
