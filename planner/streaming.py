"""Weight streaming in the traced step: when each decoder layer's weights are on the device.

A plan with `weights: "stream"` runs runtime.stream.LayerStreamer: every decoder layer's
16-bit weights rest in one flat host buffer and have one flat device storage that exists only
while the layer is needed. `stream_weights` rewrites a traced step (planner.opgraph.OpGraph)
with the same policy, so the replay (planner.memory, CPU or CUDA allocator) sees each layer's
device bytes appear and go where the runtime allocates and frees them:

    forward   at layer i's first op: fetch i (if absent) and prefetch i + 1 (STREAM_AHEAD);
              after layer i's last forward op: release i
    backward  at layer i's first backward or recompute op: fetch i, prefetch i - 1 if backward
              reaches it; layer i + 1 is released just before
    end       whatever is left is released once backward is done, before the optimizer step
              (which writes the host copy): a last no-op, RELEASE_OP, marks that point

Each fetch is one storage of the layer's packed bytes (`layer_packing`: parameters in module
order, each at a 64-byte aligned offset, as the runtime lays them out), owned by the weights
component; the traced per-parameter weight storages of decoder layers are dropped (they rest on
the host, counted there by planner.evaluate). At most two layers are on the device at once.

Known limitations: ops are attributed to a layer by the module they ran in (OpNode.layer);
the hooks of the runtime fire at module boundaries, so an op a layer's forward runs outside its
own submodules but inside the layer module is still that layer's (the tracer's attribution is
the deepest module, whose path starts with the layer's).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from planner.schema import Component, Phase

if TYPE_CHECKING:
    from planner.opgraph import OpGraph

ALIGN_BYTES = 64
STREAM_AHEAD = 1
RELEASE_OP = "chunkft.release_streamed_layers"


def layer_packing(shapes: Sequence[tuple[tuple[int, ...], int]]) -> tuple[list[int], int]:
    """(byte offset of each parameter, total bytes) of one layer's flat buffer, for parameters
    given as (shape, element bytes) in module order: each offset aligned to ALIGN_BYTES."""
    offsets, pos = [], 0
    for shape, elem in shapes:
        pos = -(-pos // ALIGN_BYTES) * ALIGN_BYTES
        offsets.append(pos)
        n = 1
        for d in shape:
            n *= d
        pos += n * elem
    return offsets, pos


def layer_intervals(graph: "OpGraph") -> dict[int, list[tuple[int, int | None]]]:
    """Per decoder layer, the (fetch op, release op) intervals its weights are on the device
    (release None = until backward ends), following the policy in the module docstring."""
    ops = graph.ops
    n_layers = graph.num_layers or 0
    first_fwd: dict[int, int] = {}
    last_fwd: dict[int, int] = {}
    first_bwd: dict[int, int] = {}
    for op in ops:
        if op.layer is None:
            continue
        if op.phase == Phase.FORWARD:
            first_fwd.setdefault(op.layer, op.index)
            last_fwd[op.layer] = op.index
        elif op.phase in (Phase.BACKWARD, Phase.RECOMPUTE):
            first_bwd.setdefault(op.layer, op.index)
    events: list[tuple[int, int, str, int]] = []  # (op, order, kind, layer); frees before allocs
    for i, a in first_fwd.items():
        events.append((a, 1, "fetch", i))
        if i + STREAM_AHEAD < n_layers:
            events.append((a, 1, "fetch", i + STREAM_AHEAD))
        events.append((last_fwd[i] + 1, 0, "release", i))
    for i, b in first_bwd.items():
        events.append((b, 0, "release", i + 1))
        events.append((b, 1, "fetch", i))
        if i - 1 in first_bwd:
            events.append((b, 1, "fetch", i - 1))
    events.sort(key=lambda e: (e[0], e[1]))
    open_at: dict[int, int] = {}
    out: dict[int, list[tuple[int, int | None]]] = {}
    for at, _, kind, i in events:
        if kind == "fetch" and i not in open_at:
            open_at[i] = at
        elif kind == "release" and i in open_at:
            out.setdefault(i, []).append((open_at.pop(i), at - 1))
    for i, at in open_at.items():
        out.setdefault(i, []).append((at, None))
    return out


def stream_weights(graph: "OpGraph", layer_bytes: dict[int, int]) -> "OpGraph":
    """`graph` with decoder-layer weights streamed: their resting storages removed and one
    storage of `layer_bytes[i]` (the packed layer) per interval `layer_intervals` gives."""
    from planner.opgraph import OpGraph, OpNode, StorageInfo

    storages = {sid: s for sid, s in graph.storages.items()
                if not (s.component == Component.WEIGHTS and s.alloc_op is None and s.layer is not None)}
    sid = max(graph.storages, default=0) + 1
    last = len(graph.ops) - 1
    for i, intervals in sorted(layer_intervals(graph).items()):
        for start, end in intervals:
            storages[sid] = StorageInfo(id=sid, nbytes=layer_bytes[i], component=Component.WEIGHTS, alloc_op=start,
                                        free_op=last if end is None else end, saved=False, layer=i)
            sid += 1
    ops = [dataclasses.replace(op, inputs=tuple(s for s in op.inputs if s in storages),
                               outputs=tuple(s for s in op.outputs if s in storages))
           for op in graph.ops]
    ops.append(OpNode(index=last + 1, name=RELEASE_OP, module="", phase=graph.ops[-1].phase, layer=None, inputs=(),
                      outputs=(), allocs=(), out_bytes=0, flops=0))
    return OpGraph(ops, storages, num_layers=graph.num_layers, template_layers=graph.template_layers)


_PACKED: dict[tuple, tuple] = {}


def packed_layer_bytes(named_shapes, layer_prefix: str, num_layers: int) -> dict[int, int]:
    """Packed bytes of each decoder layer from (name, shape, elem_bytes) in module order (kept
    per shapes object: planner.evaluate asks once per streamed estimate, ~1,000 times in
    `chunkft size`)."""
    if not isinstance(named_shapes, tuple):  # kept only for immutable shapes
        return _packed_layer_bytes(named_shapes, layer_prefix, num_layers)
    key = (id(named_shapes), layer_prefix, num_layers)
    hit = _PACKED.get(key)
    if hit is not None and hit[0] is named_shapes:
        return dict(hit[1])
    packed = _packed_layer_bytes(named_shapes, layer_prefix, num_layers)
    if len(_PACKED) >= 16:
        _PACKED.pop(next(iter(_PACKED)))
    _PACKED[key] = (named_shapes, packed)
    return dict(packed)


def _packed_layer_bytes(named_shapes, layer_prefix: str, num_layers: int) -> dict[int, int]:
    per: dict[int, list] = {}
    head = layer_prefix + "."
    for name, shape, elem in named_shapes:
        if name.startswith(head):
            i = int(name[len(head):].split(".", 1)[0])
            per.setdefault(i, []).append((tuple(shape), elem))
    return {i: layer_packing(per.get(i, []))[1] for i in range(num_layers)}
