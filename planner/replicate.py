"""Trace a few template decoder layers and replicate them to the model's full depth.

Decoder layers of one model run the same ops. What makes one layer's ops differ from another's
is its *key*: which of its parameters need a gradient (all, none, or a slice at a chunk cut),
whether its input needs a gradient (something below it trains), and its per-layer config
values (`layer_types` such as sliding vs full attention). Consecutive repeats of one block of
keys (one layer, or Gemma 2's sliding/full pair) form a run. The template is the model with
every run cut down to at most three blocks (its first, one interior block, its last), traced
once; the full graph is

    prefix, F[l(0)] .. F[l(N-1)], middle, B[l(N-1)] .. B[l(0)], suffix

where F[t] / B[t] are template layer t's forward / backward op segments (backward includes
checkpointing's recompute), l(j) is the template layer standing for full layer j, "middle" is
everything between the last layer's forward and its backward (final norm, lm_head, loss and
their backward) and "suffix" what follows layer 0's backward (embedding gradient).

Storages are copied per full layer. A storage allocated in template layer t and freed in the
segment of template layer t' (a layer's output dies in the next layer's backward; a saved
activation in its own backward) is freed in full layer j + (t' - t) at the same offset of that
segment, which is exact because that layer has the same key as t'. Where this cannot hold (a
lifetime reaching two layers into a run, a segment holding another layer's ops) the template
says so and we fall back to tracing every layer, as we do for models without a layer list.

Templates are cached by model, shape, options and run structure: the chunks of a ChunkFT plan
share a handful of templates, so tracing all of a 405B model's chunks costs a few templates.

Known limitations: layer identity beyond the grad pattern is read from config lists as long as
the model is deep (`layer_types`); per-layer differences expressed otherwise (index sets such
as Llama 4's `no_rope_layers`) are not seen, and such models should use replicate=False.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import TYPE_CHECKING, Any

from planner.errors import ChunkftError
from planner.schema import Phase
from planner.trace import find_layer_prefix, grad_key, trace_full, trace_module

if TYPE_CHECKING:
    from planner.model import ModelSpec
    from planner.opgraph import OpGraph, OpNode
    from planner.trace import StepShape, TraceOptions

MAX_RUN_COPIES = 3
"""Template layers per run: its first, one interior layer standing for all others, its last."""

_TEMPLATE_CACHE: dict[tuple, "OpGraph"] = {}
_MODULE_CACHE: dict[tuple, Any] = {}
_TEMPLATE_CACHE_SIZE = 32


class NotReplicable(Exception):
    """The template's structure does not allow replication; trace every layer instead."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LayerPlan:
    """How the full model's layers map onto the template's."""

    prefix: str
    """Path of the decoder-layer ModuleList ("model.layers")."""
    num_layers: int
    template_of: tuple[int, ...]
    """Full layer j -> template layer standing for it."""
    anchors: tuple[int, ...]
    """Template layer t -> the full layer whose grad spec and per-layer config it takes."""
    edge: tuple[int | None, ...]
    """Template layer t -> the full layer it is in its run's first or last block; None for an
    interior block (standing for many layers, so no non-layer op may refer to it)."""
    keys: tuple[Any, ...]
    """Template layer t -> its key (for the cache)."""


def replicated_trace(model: "ModelSpec", shape: "StepShape", options: "TraceOptions") -> "OpGraph":
    """trace_step with replication; the full trace where the model does not allow it."""
    plan = layer_plan(model, options)
    if plan is None:
        return trace_full(model, shape, options)
    template = _template_trace(model, shape, options, plan)
    try:
        return replicate(template, plan)
    except NotReplicable:
        return trace_full(model, shape, options)


# ---------------------------------------------------------------------------- the layer plan

@functools.lru_cache(maxsize=64)
def _layout(model: "ModelSpec") -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]] | None:
    """(layer prefix, local names of layer 0's parameters, non-layer names before the layers,
    groups of tied non-layer names) from a one-layer meta build; None without a layer list."""
    try:
        small = model.build(num_layers=1, device="meta")
    except ChunkftError:
        return None  # a factory that cannot change depth
    prefix = find_layer_prefix(small)
    if prefix is None:
        return None
    head = prefix + ".0."
    local, before, groups = [], [], {}
    seen_layer = False
    for name, p in small.named_parameters(remove_duplicate=False):
        if name.startswith(head):
            local.append(name[len(head):])
            seen_layer = True
        elif not name.startswith(prefix + "."):
            groups.setdefault(id(p), []).append(name)
            if not seen_layer:
                before.append(name)
    tied = tuple(tuple(g) for g in groups.values())
    return prefix, tuple(local), tuple(before), tied


def layer_plan(model: "ModelSpec", options: "TraceOptions") -> LayerPlan | None:
    """Keys of the full model's layers and the template that covers them; None = no replication."""
    n = model.num_layers
    layout = _layout(model) if n else None
    if layout is None:
        return None
    prefix, local, before, tied = layout
    grad = options.grad
    if grad is not None:
        _check_names(grad, prefix, n, local, tied)

    def trains(name: str) -> bool:
        return grad is None or grad.get(name, False) is not False

    tied_of = {name: group for group in tied for name in group}
    below = any(trains(other) for name in before for other in tied_of.get(name, (name,)))
    per_layer = _per_layer_config_values(model, n)
    keys = []
    for j in range(n):
        names = [f"{prefix}.{j}.{x}" for x in local]
        pattern = None if grad is None else tuple(grad_key(grad.get(m, False)) for m in names)
        # recipe axes that differ per layer: every-K checkpointing
        keys.append((pattern, below, per_layer[j], options.checkpoints_layer(j)))
        # LoRA adapters train in every layer: what is above layer j needs an input gradient
        below = below or bool(options.lora_rank) or any(trains(m) for m in names)

    # A run is m repeats of a block of p layers (p = 1 for identical layers, 2 for Gemma 2's
    # alternating sliding / full attention); the template keeps its first, one interior and
    # its last block.
    template_of, anchors, edge, tkeys = [], [], [], []
    j = 0
    while j < n:
        p, m = _best_period(keys, j)
        copies = min(m, MAX_RUN_COPIES)
        first = len(anchors)
        for c in range(copies):
            block = 0 if c == 0 else m - 1 if c == copies - 1 else 1
            for r in range(p):
                full = j + block * p + r
                anchors.append(full)
                tkeys.append(keys[full])
                edge.append(full if block in (0, m - 1) else None)
        for q in range(m):
            c = 0 if q == 0 else copies - 1 if q == m - 1 else 1
            template_of.extend(first + c * p + r for r in range(p))
        j += m * p
    return LayerPlan(prefix=prefix, num_layers=n, template_of=tuple(template_of), anchors=tuple(anchors),
                     edge=tuple(edge), keys=tuple(tkeys))


MAX_PERIOD = 4
"""Longest repeating block of layer keys looked for (Gemma 2 alternates with period 2)."""


def _best_period(keys: list, j: int) -> tuple[int, int]:
    """(p, m): the block length p <= MAX_PERIOD whose m repeats from j cover the most layers."""
    best = (1, 1)
    for p in range(1, MAX_PERIOD + 1):
        if j + p > len(keys):
            break
        block = keys[j:j + p]
        m = 1
        while keys[j + m * p:j + (m + 1) * p] == block:
            m += 1
        if m * p > best[0] * best[1] and m > 1:
            best = (p, m)
    return best


def _check_names(grad: dict, prefix: str, n: int, local: tuple[str, ...], tied) -> None:
    non_layer = {name for group in tied for name in group}
    local_set = set(local)
    bad = []
    for name in grad:
        if name in non_layer:
            continue
        rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        index, _, tail = (rest or "").partition(".")
        if rest is None or not index.isdigit() or int(index) >= n or tail not in local_set:
            bad.append(name)
    if bad:
        raise ChunkftError(f"grad spec names unknown parameters {sorted(bad)[:5]}: valid names look like "
                           f"{prefix}.0.{local[0] if local else '...'} or {sorted(non_layer)[:2]}")


def _per_layer_config_values(model: "ModelSpec", n: int) -> list[tuple]:
    """Per layer, the values of config lists as long as the model is deep (e.g. layer_types)."""
    if model.config is None:
        return [()] * n
    lists = _per_layer_lists(model.config, n)
    return [tuple((k, _hashable(v[j])) for k, v in lists.items()) for j in range(n)]


def _per_layer_lists(config, n: int) -> dict[str, list]:
    d = config.to_dict()
    return {k: v for k, v in sorted(d.items()) if isinstance(v, list) and len(v) == n and k != "architectures"}


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


# ---------------------------------------------------------------------------- the template

def _template_trace(model: "ModelSpec", shape: "StepShape", options: "TraceOptions", plan: LayerPlan) -> "OpGraph":
    non_layer = None if options.grad is None else {
        k: v for k, v in options.grad.items() if not k.startswith(plan.prefix + ".")}
    non_layer_key = None if non_layer is None else tuple(sorted((k, grad_key(v)) for k, v in non_layer.items()))
    key = (_model_key(model), shape, options.axes_key(), plan.keys, non_layer_key)
    cached = _TEMPLATE_CACHE.get(key)
    if cached is not None:
        return cached
    module = _build_template(model, shape, plan)
    grad = None
    if options.grad is not None:
        grad = dict(non_layer)
        head = plan.prefix + "."
        for t, anchor in enumerate(plan.anchors):
            source = f"{head}{anchor}."
            for name, value in options.grad.items():
                if name.startswith(source):
                    grad[f"{head}{t}.{name[len(source):]}"] = value
    graph = trace_module(module, shape, options, layer_prefix=plan.prefix, grad=grad, layer_index=plan.anchors)
    if len(_TEMPLATE_CACHE) >= _TEMPLATE_CACHE_SIZE:
        _TEMPLATE_CACHE.pop(next(iter(_TEMPLATE_CACHE)))
    _TEMPLATE_CACHE[key] = graph
    return graph


def _model_key(model: "ModelSpec") -> Any:
    return model.fingerprint() if model.config is not None else (model.name, model.source)


def _build_template(model: "ModelSpec", shape: "StepShape", plan: LayerPlan):
    """A fresh meta copy of the model with one layer per template layer.

    Templates of one depth and per-layer config values (all chunks of a plan, mostly) are the
    same meta module: it is built once and deep-copied (milliseconds; a build runs the init
    functions on meta tensors, a good part of a template trace).
    """
    lists = {} if model.config is None else _per_layer_lists(model.config, plan.num_layers)
    key = (_model_key(model), shape.dtype, len(plan.anchors),
           tuple((name, tuple(_hashable(values[a]) for a in plan.anchors)) for name, values in lists.items()))
    cached = _MODULE_CACHE.get(key)
    if cached is None:
        cached = _build_template_module(model, shape, plan, lists)
        if len(_MODULE_CACHE) >= _TEMPLATE_CACHE_SIZE:
            _MODULE_CACHE.pop(next(iter(_MODULE_CACHE)))
        _MODULE_CACHE[key] = cached
    return copy.deepcopy(cached)


def _build_template_module(model: "ModelSpec", shape: "StepShape", plan: LayerPlan, lists: dict[str, list]):
    k = len(plan.anchors)
    if model.config is None:
        return model.build(num_layers=k, dtype=shape.torch_dtype(), device="meta")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = k
    for name, values in lists.items():
        setattr(config, name, [values[a] for a in plan.anchors])
    spec = dataclasses.replace(model, config=config, num_layers=k)
    return spec.build(dtype=shape.torch_dtype(), device="meta")


# ---------------------------------------------------------------------------- replication

@dataclasses.dataclass(slots=True)
class _Segments:
    prefix: tuple[int, int]
    forward: list[tuple[int, int]]
    middle: tuple[int, int]
    backward: list[tuple[int, int]]  # per template layer; empty range where no backward ran
    suffix: tuple[int, int]


def _segments(ops: "tuple[OpNode, ...]", k: int) -> _Segments:
    """Op ranges of the template's segments; NotReplicable where layers interleave."""
    n = len(ops)
    fw_first, bw_first, fw_last, bw_last = [None] * k, [None] * k, [None] * k, [None] * k
    for op in ops:
        if op.layer is None:
            continue
        if op.phase == Phase.FORWARD:
            fw_first[op.layer] = op.index if fw_first[op.layer] is None else fw_first[op.layer]
            fw_last[op.layer] = op.index
        else:
            bw_first[op.layer] = op.index if bw_first[op.layer] is None else bw_first[op.layer]
            bw_last[op.layer] = op.index
    if any(x is None for x in fw_first):
        raise NotReplicable("a template layer ran no forward op")
    forward = [(fw_first[t], fw_first[t + 1] if t + 1 < k else fw_last[t] + 1) for t in range(k)]
    with_bw = [t for t in range(k) if bw_first[t] is not None]
    if with_bw != list(range(k - len(with_bw), k)):
        raise NotReplicable("layers with a backward are not the top ones")
    backward = [(0, 0)] * k
    for t in with_bw:
        start = bw_first[t]
        end = bw_first[t - 1] if t - 1 in with_bw else bw_last[t] + 1
        backward[t] = (start, end)
    middle_end = bw_first[k - 1] if with_bw else n
    bw_end = backward[with_bw[0]][1] if with_bw else n
    segs = _Segments(prefix=(0, forward[0][0]), forward=forward, middle=(forward[-1][1], middle_end),
                     backward=backward, suffix=(bw_end, n))
    for t in range(k):
        for lo, hi in (forward[t], backward[t]):
            if any(ops[i].layer not in (t, None) for i in range(lo, hi)):
                raise NotReplicable(f"template layer {t}'s segment holds another layer's ops")
    for lo, hi in (segs.prefix, segs.middle, segs.suffix):
        if any(ops[i].layer is not None for i in range(lo, hi)):
            raise NotReplicable("a layer's op outside its segment")
    return segs


def replicate(template: "OpGraph", plan: LayerPlan) -> "OpGraph":
    """The full-depth OpGraph from a template traced with `plan`'s template layers."""
    from planner.opgraph import OpGraph, OpNode, StorageInfo

    ops = template.ops
    k, n = len(plan.anchors), plan.num_layers
    segs = _segments(ops, k)
    template_of = plan.template_of

    # Where each template op lands: (segment kind, template layer) of every op.
    seg_of = [None] * len(ops)  # (kind, t, start) ; kind in "P", "M", "S", "F", "B"
    for kind, t, (lo, hi) in ([("P", None, segs.prefix), ("M", None, segs.middle), ("S", None, segs.suffix)]
                              + [("F", t, r) for t, r in enumerate(segs.forward)]
                              + [("B", t, r) for t, r in enumerate(segs.backward)]):
        for i in range(lo, hi):
            seg_of[i] = (kind, t, lo)

    # Full op positions of every segment.
    order: list[tuple[str, int | None, int | None]] = [("P", None, None)]
    order += [("F", template_of[j], j) for j in range(n)]
    order += [("M", None, None)]
    order += [("B", template_of[j], j) for j in range(n - 1, -1, -1)]
    order += [("S", None, None)]
    ranges = {"P": segs.prefix, "M": segs.middle, "S": segs.suffix}
    start_of: dict[tuple[str, int | None], int] = {}
    pos = 0
    for kind, t, j in order:
        lo, hi = ranges[kind] if t is None else (segs.forward[t] if kind == "F" else segs.backward[t])
        start_of[(kind, j)] = pos
        pos += hi - lo
    total_ops = pos

    keys = plan.keys
    for t in range(k):
        for u in range(t):
            if keys[t] == keys[u] and (_len(segs.forward[t]) != _len(segs.forward[u])
                                       or _len(segs.backward[t]) != _len(segs.backward[u])):
                raise NotReplicable(f"template layers {u} and {t} share a key but not their ops")

    def full_layer(t: int, j: int | None, t_ctx: int | None) -> int:
        """Full layer standing for template layer t, seen from full layer j (template t_ctx)."""
        if j is None:  # from a non-layer segment: a layer of the run's first or last block
            if plan.edge[t] is None:
                raise NotReplicable("a non-layer op touches an interior template layer")
            return plan.edge[t]
        target = j + (t - t_ctx)
        if not 0 <= target < n or keys[template_of[target]] != keys[t]:
            raise NotReplicable("a lifetime reaches beyond the template's neighbours")
        return target

    def full_op(i: int, j: int | None, t_ctx: int | None) -> int:
        kind, t, lo = seg_of[i]
        if t is None:
            return start_of[(kind, None)] + i - lo
        return start_of[(kind, full_layer(t, j, t_ctx))] + i - lo

    # A storage's role within its layer: which weight, or which allocation of which op of which
    # segment. Template layers of one key have the same roles; a full layer's copies come from
    # the template layer standing for it.
    owner_of = {s.id: _owner_layer(s, seg_of) for s in template.storages.values()}
    role_of: dict[int, tuple] = {}
    by_role: list[dict[tuple, int]] = [{} for _ in range(k)]
    weight_count = [0] * k
    for s in template.storages.values():
        t = owner_of[s.id]
        if t is None:
            continue
        if s.alloc_op is None:
            role = ("W", weight_count[t])
            weight_count[t] += 1
        else:
            kind, _, lo = seg_of[s.alloc_op]
            role = (kind, s.alloc_op - lo, ops[s.alloc_op].allocs.index(s.id))
        role_of[s.id] = role
        by_role[t][role] = s.id

    # Storages: one copy per full layer for layer storages, one for the rest.
    storages: dict[int, StorageInfo] = {}
    copies: dict[int, dict[int, int]] = {}  # template sid -> {full layer: full sid}
    single: dict[int, int] = {}
    layers_of: list[list[int]] = [[] for _ in range(k)]
    for j, t in enumerate(template_of):
        layers_of[t].append(j)
    for s in template.storages.values():
        owner = owner_of[s.id]
        for j in ([None] if owner is None else layers_of[owner]):
            sid = len(storages)
            alloc = None if s.alloc_op is None else full_op(s.alloc_op, j, owner)
            free = None if s.free_op is None else full_op(s.free_op, j, owner)
            storages[sid] = StorageInfo(id=sid, nbytes=s.nbytes, component=s.component, alloc_op=alloc,
                                        free_op=free, saved=s.saved, layer=j, tier=s.tier)
            if j is None:
                single[s.id] = sid
            else:
                copies.setdefault(s.id, {})[j] = sid

    def full_sid(sid: int, j: int | None, t_ctx: int | None) -> int:
        if sid in single:
            return single[sid]
        target = full_layer(owner_of[sid], j, t_ctx)
        stand_in = template_of[target]
        if stand_in != owner_of[sid]:
            sid = by_role[stand_in].get(role_of[sid])
            if sid is None:
                raise NotReplicable("template layers of one key differ in their storages")
        return copies[sid][target]

    new_ops: list[OpNode] = []
    for kind, t, j in order:
        lo, hi = ranges[kind] if t is None else (segs.forward[t] if kind == "F" else segs.backward[t])
        rename = None if t is None else (f"{plan.prefix}.{t}", f"{plan.prefix}.{j}")
        for i in range(lo, hi):
            op = ops[i]
            module = op.module
            if rename is not None and (module == rename[0] or module.startswith(rename[0] + ".")):
                module = rename[1] + module[len(rename[0]):]
            new_ops.append(OpNode(
                index=len(new_ops), name=op.name, module=module, phase=op.phase,
                layer=None if op.layer is None else j,
                inputs=tuple(full_sid(s, j, t) for s in op.inputs),
                outputs=tuple(full_sid(s, j, t) for s in op.outputs),
                allocs=tuple(full_sid(s, j, t) for s in op.allocs),
                out_bytes=op.out_bytes, flops=op.flops))
    assert len(new_ops) == total_ops
    return OpGraph(new_ops, storages, num_layers=n, template_layers=k)


def _len(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def _owner_layer(s, seg_of) -> int | None:
    """Template layer a storage belongs to: its allocating layer segment, or a weight's layer."""
    if s.alloc_op is None:
        return s.layer
    kind, t, _ = seg_of[s.alloc_op]
    return t
