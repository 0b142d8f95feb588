"""The op graph of one training step: what ran, in order, and which bytes lived when.

An `OpGraph` holds the recorded aten ops (`OpNode`, one per op, in execution order) and the
storages they touched (`StorageInfo`: bytes, the op that allocated it, the op after which it was
freed, its memory `Component`). `graph` presents the same ops as a `networkx.DiGraph` whose
nodes are op indices carrying their `OpNode` in the "op" attribute, with an edge from the op
that last wrote a storage to every later op that reads it. `replay()` turns the allocation and
free events into a memory timeline (planner.memory).

Time is the op index. A storage allocated by op `a` and freed after op `f` is live at ops
`a..f` inclusive: an op's inputs are still live when its outputs appear, as in a real step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from planner.schema import Component, Phase, Tier

if TYPE_CHECKING:
    import networkx

    from planner.memory import MemoryTimeline


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OpNode:
    """One recorded aten op."""

    index: int
    """Position in execution order (0-based); also the node key in `OpGraph.graph`."""
    name: str
    """The aten overload, e.g. "aten.mm.default"."""
    module: str
    """Deepest module the op ran in ("model.layers.3.mlp.down_proj"); "" for the top level."""
    phase: Phase
    """FORWARD, LOSS (lm_head, loss and their backward), BACKWARD, or RECOMPUTE."""
    layer: int | None
    """Decoder layer index the op belongs to; None outside the decoder layers."""
    inputs: tuple[int, ...]
    """Storage ids the op reads."""
    outputs: tuple[int, ...]
    """Storage ids the op writes (new or in place)."""
    allocs: tuple[int, ...]
    """Storage ids this op allocated (a subset of `outputs`)."""
    out_bytes: int
    """Bytes of the storages this op allocated."""
    flops: int
    """Floating-point operations (torch.utils.flop_counter formulas; 0 for ops it has none for)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StorageInfo:
    """One untyped storage seen during the step."""

    id: int
    nbytes: int
    component: Component
    alloc_op: int | None
    """Op that allocated it; None = existed before the step (weights, inputs)."""
    free_op: int | None
    """Op after which it was freed; None = still alive at the end of the step."""
    saved: bool
    """autograd saved it for backward (saved_tensors_hooks saw it)."""
    layer: int | None
    """Decoder layer of the allocating op; for weights, the layer of the parameter; else None."""
    tier: Tier = Tier.GPU
    """Where the bytes live: the device, or HOST for what the step copies out to host memory
    (activations offloaded by --offload-activations, planner.activations)."""


class OpGraph:
    """The recorded step: ops in order, storages, and (lazily) the networkx dependency graph."""

    def __init__(self, ops: list[OpNode] | tuple[OpNode, ...], storages: dict[int, StorageInfo], *,
                 num_layers: int | None = None, template_layers: int | None = None):
        self.ops: tuple[OpNode, ...] = tuple(ops)
        self.storages: dict[int, StorageInfo] = storages
        self.num_layers = num_layers
        """Decoder layers of the traced model (None if it has no recognisable layer list)."""
        self.template_layers = template_layers
        """Layers actually traced when the graph was replicated from a template; None = full trace."""

    def __len__(self) -> int:
        return len(self.ops)

    @functools.cached_property
    def graph(self) -> "networkx.DiGraph":
        """Ops as nodes (payload `OpNode` under "op"), producer -> consumer edges via storages.

        Each edge carries "storages", the ids that link the two ops. Built on first access:
        replay and cost models work on `ops` and `storages` and never need it.
        """
        import networkx

        g = networkx.DiGraph()
        g.add_nodes_from((op.index, {"op": op}) for op in self.ops)
        last_writer: dict[int, int] = {}
        links: dict[tuple[int, int], list[int]] = {}
        for op in self.ops:
            for sid in op.inputs:
                producer = last_writer.get(sid)
                if producer is not None and producer != op.index:
                    links.setdefault((producer, op.index), []).append(sid)
            for sid in op.outputs:
                last_writer[sid] = op.index
        g.add_edges_from((u, v, {"storages": tuple(s)}) for (u, v), s in links.items())
        return g

    def replay(self, allocator: str = "cpu", *, tier: Tier | None = Tier.GPU, **options) -> "MemoryTimeline":
        """Live bytes per component after every op, from allocation and free events in order,
        of the storages on `tier` (the device by default; None: every tier, as one CPU process
        holding both sees them)."""
        from planner.memory import replay

        graph = self
        if tier is not None and any(s.tier != tier for s in self.storages.values()):
            graph = OpGraph(self.ops, {k: s for k, s in self.storages.items() if s.tier == tier},
                            num_layers=self.num_layers, template_layers=self.template_layers)
        return replay(graph, allocator=allocator, **options)

    def phase_of(self, index: int) -> Phase:
        return self.ops[index].phase

    def total_flops(self) -> int:
        return sum(op.flops for op in self.ops)
