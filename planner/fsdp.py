"""FSDP2 over a traced step: one rank's parameter shards, the units gathered around every op, its gradients.

The layout is runtime.dist_model's (`shard_model`): `fully_shard` on every decoder layer, then on
the root (embeddings, final norm, lm_head); with `shard_embeddings` the input embedding and the
output head (final norm + lm_head) are units of their own first (as torchtitan wraps them), so
they are unsharded only while they run. `fsdp_units` sums a ParamLayout's parameters per unit;
`fsdp_schedule` is what FSDP2 holds around every traced op whichever parameters train (cached
per trace by planner.rank_step); `rank_live` turns a single-rank live matrix (per component, op
by op: planner.evaluate.traced_step's, after evaluate's adjustments) into one rank's, W > 1:

  weights    every parameter's dim-0 shard, padded as FSDP2 pads it (ceil(rows / W) rows on
             every rank), plus the unsharded copies in flight: the root's parameters from the
             first forward op to the end of backward (FSDP2 keeps the root unsharded after
             forward), the unit (decoder layer, or embedding / head unit) that runs and the one
             prefetched (FSDP2 issues the next unit's all-gather while the current one
             computes: in backward explicitly, in forward on CUDA by the CPU running ahead of
             the GPU; `forward_prefetch=False` is a CPU run, where it cannot), with padding.
             During the optimizer step every unit is resharded.
  gradients  the parameters FSDP2 computes a whole gradient of (`grads`; which ones, and the
             sub-tensor gradient buffers of sliced spans, are planner.rank_step's): a unit's
             are reduce-scattered once its backward is done, from then on its padded shards
             (FSDP2's reduce-scatter output). The root's gradients (lm_head first in backward,
             unless a unit of its own) stay unsharded to the end of backward. During the
             optimizer step they are shards (`grad_shard_bytes`).
  comm       in TEMPORARIES: FSDP2's all-gather output buffers, which it copies the unsharded
             parameters out of. In forward the newest one lives until the next unit's copy-out
             (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, `all_gather_state`:
             freeing is deferred to overlap the copy-out with the next all-gather), the last
             unit's until the root's post-forward (after the loss); in backward a unit's is
             freed right after its copy-out (counted on the op that starts the unit). And the
             reduce-scatter input (_fsdp_collectives.py `foreach_reduce`: the unit's gradients
             copied into one buffer with dim 0 padded, before they are freed) from the first op
             after a unit's backward until the next unit's post-backward (FSDP2 retains one;
             the last is dropped at the end of backward).

Why apart from planner.sharding: the schedule depends on the trace, the layout and W only, not
on the optimizer or the chunk; planner.sharding and planner.simulate read it through
planner.rank_step, and the CPU prediction (`cpu_rank_rise_bytes`) through `rank_live` directly.

Known limitations: the trace does not mark where backward starts inside the loss phase, so with
`shard_embeddings` the head unit and its all-gather buffer count as held through the loss's
backward, where FSDP2 has resharded it until its pre-backward: pessimistic by up to two head
units (measured on CPU: predicted 33.48 MB, measured 31.77 MB, 5.4% over). Every rank's shards
and gathered units are modelled padded (the last ranks hold fewer real rows). Gradients are
reduced in the training dtype (no mixed-precision policy).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any, Collection

import numpy as np

from planner.memory import COMPONENTS
from planner.schema import Component, Phase

if TYPE_CHECKING:
    from planner.evaluate import ParamLayout, TracedStep

_CI = {c: i for i, c in enumerate(COMPONENTS)}
_CACHE_SIZE = 256


def shard_bytes(shape: tuple[int, ...], elem: int, world: int) -> int:
    """Bytes of one rank's FSDP2 shard of a parameter (dim 0 padded to a multiple of world)."""
    if not shape:
        return elem
    rows = math.ceil(shape[0] / world)
    return rows * math.prod(shape[1:]) * elem


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FsdpUnits:
    """The FSDP units in forward order and what each holds (padded, unsharded bytes)."""

    shard: int
    """One rank's shards of every parameter."""
    full: tuple[int, ...]
    """Unsharded bytes of each unit: [input embedding,] layer 0 .. L-1 [, output head]."""
    trained: tuple[int, ...]
    """Gradient bytes of each unit this step, as autograd produces them (unpadded)."""
    trained_padded: tuple[int, ...]
    """The reduce-scatter input of each unit: its gradients with dim 0 padded to W rows' multiple."""
    trained_shard: tuple[int, ...]
    """The reduce-scatter output of each unit: one rank's padded gradient shards."""
    root_full: int
    """Unsharded bytes the root unit keeps from the first forward op to the end of backward."""
    offset: int
    """Index of layer 0 in `full` (1 with separate embedding units, else 0)."""


def _unit_of_param(layout: "ParamLayout", shard_embeddings: bool) -> tuple[Any, int]:
    """(function parameter name -> unit index or None for the root, number of units)."""
    rx = re.compile(re.escape(layout.layer_prefix) + r"\.(\d+)\.") if layout.layer_prefix else None
    L = layout.num_layers
    off = 1 if shard_embeddings else 0

    def unit(name: str) -> int | None:
        m = rx.match(name) if rx else None
        if m:
            return int(m.group(1)) + off
        if not shard_embeddings:
            return None
        return 0 if name == layout.input_embedding else L + 1

    return unit, L + 2 * off


_PARAM_UNITS: dict[tuple, tuple] = {}


def _param_units(layout: "ParamLayout", world: int, shard_embeddings: bool) -> tuple:
    """(name -> index, unit per parameter (-1: root), unit count, padded shard bytes per parameter),
    cached per layout, world size and unit layout (chunk evaluations ask for it per chunk)."""
    key = (id(layout), world, shard_embeddings)
    hit = _PARAM_UNITS.get(key)
    if hit is None or hit[0] is not layout:
        unit, count = _unit_of_param(layout, shard_embeddings)
        units = np.asarray([-1 if (u := unit(n)) is None else u for n, _, _ in layout.named_shapes], dtype=np.int64)
        shards = np.asarray([shard_bytes(sh, e, world) for _, sh, e in layout.named_shapes], dtype=np.int64)
        index = {n: i for i, (n, _, _) in enumerate(layout.named_shapes)}
        hit = (layout, (index, units, count, shards))
        if len(_PARAM_UNITS) >= _CACHE_SIZE:
            _PARAM_UNITS.pop(next(iter(_PARAM_UNITS)))
        _PARAM_UNITS[key] = hit
    return hit[1]


def fsdp_units(layout: "ParamLayout", world: int, grads: Collection[str], shard_embeddings: bool) -> FsdpUnits:
    """The FSDP units of `layout` on `world` ranks; `grads`: the parameters FSDP2 computes a
    (whole) gradient of this step."""
    index, units, count, shards = _param_units(layout, world, shard_embeddings)
    sizes = np.asarray(layout.tensor_bytes, dtype=np.int64)
    in_unit = units >= 0
    full = np.bincount(units[in_unit], weights=world * shards[in_unit], minlength=count)
    trained_idx = np.asarray(sorted(index[n] for n in grads if n in index), dtype=np.int64)
    t_units = units[trained_idx] if trained_idx.size else trained_idx
    t_in = t_units >= 0
    t_sel = trained_idx[t_in]

    def per_unit(values: np.ndarray) -> tuple[int, ...]:
        return tuple(int(v) for v in np.bincount(t_units[t_in], weights=values[t_sel], minlength=count)) \
            if t_sel.size else (0,) * count

    return FsdpUnits(shard=int(shards.sum()), full=tuple(int(v) for v in full), trained=per_unit(sizes),
                     trained_padded=per_unit(world * shards), trained_shard=per_unit(shards),
                  root_full=int(world * shards[~in_unit].sum()), offset=1 if shard_embeddings else 0)


def grad_shard_bytes(layout: "ParamLayout", grads: Collection[str], world: int) -> int:
    """One rank's gradient shards once every unit has reduce-scattered: FSDP2's reduce-scatter
    output, padded shards of the parameters that got a gradient."""
    return sum(shard_bytes(shape, elem, world) for name, shape, elem in layout.named_shapes if name in grads)


def _op_units(traced: "TracedStep", u: FsdpUnits, n: int) -> list[int | None]:
    """The FSDP unit each traced op runs in (None: only the root's parameters)."""
    phases = traced.phases or (None,) * n
    layers = traced.layers or (None,) * n
    backward = (Phase.BACKWARD, Phase.RECOMPUTE)
    last = len(u.full) - 1
    out: list[int | None] = []
    seen_fwd = seen_bwd = False
    for t in range(n):
        i = layers[t]
        in_bwd = phases[t] in backward
        if i is not None:
            seen_bwd |= in_bwd
            seen_fwd |= not in_bwd
            out.append(i + u.offset)
        elif not u.offset:
            out.append(None)
        elif in_bwd:
            out.append(0 if seen_bwd else last)
        else:
            out.append(last if seen_fwd else 0)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FsdpSchedule:
    """What FSDP2 does around every traced op, independent of which parameters train."""

    gathered: np.ndarray
    """Unsharded parameter bytes held after each op (root + running + prefetched unit)."""
    ag_buffer: np.ndarray
    """All-gather output buffers alive after each op."""
    done_count: np.ndarray
    """How many units have finished backward (reduce-scattered) by each op."""
    done_order: tuple[int, ...]
    """Units in the order their backward finishes."""
    rs_unit: np.ndarray
    """The unit whose reduce-scatter input is held after each op (-1: none): FSDP2 keeps the
    newest until the next unit's post-backward (_fsdp_param_group.py `post_backward`:
    `comm_ctx.reduce_scatter_states`, at most `reduce_scatter_max_input_buffers`, default 1)
    and drops the last at the end of backward (_fsdp_state.py, the root's final callback)."""
    backward_gathered: int
    """Unsharded bytes all-gathered in backward: the units backward reaches, each with the one
    below it (prefetched, used or not)."""


def fsdp_schedule(traced: "TracedStep", u: FsdpUnits, n: int, forward_prefetch: bool) -> FsdpSchedule:
    """What FSDP2 holds around each of the trace's `n` ops (module doc: weights and comm)."""
    st = _schedule_structure(traced, u, n, forward_prefetch)
    # the units' bytes, then the root's (index -2) and nothing (index -1)
    values = np.asarray(u.full + (u.root_full, 0), dtype=np.int64)
    return FsdpSchedule(gathered=u.root_full + values[st.gathered_a] + values[st.gathered_b],
                        ag_buffer=values[st.ag], done_count=st.done_count.copy(), done_order=st.done_order,
                        rs_unit=st.rs_unit.copy(), backward_gathered=sum(u.full[k] for k in st.regathered))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Structure:
    """`fsdp_schedule` as unit indices (-1: nothing, -2: the root's bytes): which units FSDP2
    holds around each op depends on the trace's phases and layers, the unit count and the
    prefetch only; their bytes (the world size's) are looked up afterwards."""

    gathered_a: np.ndarray
    gathered_b: np.ndarray
    ag: np.ndarray
    done_count: np.ndarray
    done_order: tuple[int, ...]
    rs_unit: np.ndarray
    regathered: tuple[int, ...]


_STRUCTURES: dict[tuple, tuple] = {}


def _schedule_structure(traced: "TracedStep", u: FsdpUnits, n: int, forward_prefetch: bool) -> _Structure:
    key = (id(traced), u.offset, len(u.full), n, forward_prefetch)
    hit = _STRUCTURES.get(key)
    if hit is None or hit[0] is not traced:
        if len(_STRUCTURES) >= _CACHE_SIZE:
            _STRUCTURES.pop(next(iter(_STRUCTURES)))
        hit = _STRUCTURES[key] = (traced, _structure(traced, u, n, forward_prefetch))
    return hit[1]


def _structure(traced: "TracedStep", u: FsdpUnits, n: int, forward_prefetch: bool) -> _Structure:
    """The walk over the ops (reads u.offset and the unit count only; see fsdp_schedule)."""
    NONE, ROOT = -1, -2
    units = len(u.full)
    phases = traced.phases or (None,) * n
    backward = (Phase.BACKWARD, Phase.RECOMPUTE)
    gathered_a = np.full(n, NONE, dtype=np.int64)
    gathered_b = np.full(n, NONE, dtype=np.int64)
    ag_buffer = np.full(n, NONE, dtype=np.int64)
    done_count = np.zeros(n, dtype=np.int64)
    rs_unit = np.full(n, -1, dtype=np.int64)
    order: list[int] = []
    regathered: set[int] = set()
    bwd_ops = [t for t in range(n) if phases[t] in backward]
    end_of_backward = bwd_ops[-1] + 1 if bwd_ops else n
    current: int | None = None  # unit whose backward runs
    seen_unit = False
    for t, k in enumerate(_op_units(traced, u, n)):
        in_bwd = phases[t] in backward
        if in_bwd and k is not None and k != current:
            if current is not None and k < current:
                order.append(current)  # its post-backward reduce-scatters: input copy, then shards
                rs_unit[t:end_of_backward] = current
            # pre-backward of unit k: the prefetched unit's all-gather output (or k's own, for
            # the first unit of backward) lives until its copy-out is done
            ag = k - 1 if current is not None and k > 0 else (k if current is None else None)
            ag_buffer[t] = ag if ag is not None else NONE
            current = k
        if k is not None:
            seen_unit = True
            if in_bwd:
                nxt = k - 1 if k > 0 else None
                regathered |= {k} if nxt is None else {k, nxt}
            else:
                nxt = k + 1 if forward_prefetch and k + 1 < units else None
            gathered_a[t] = k
            gathered_b[t] = nxt if nxt is not None else NONE
            if not in_bwd:  # forward: the newest all-gather's output is freed at the next copy-out
                ag_buffer[t] = nxt if nxt is not None else k
        elif not in_bwd and phases[t] in (Phase.FORWARD, Phase.LOSS):
            # before the first unit: the root's own all-gather output; after the last: the last
            # unit's, until the root's post-forward
            ag_buffer[t] = units - 1 if seen_unit and units else (ROOT if not seen_unit else NONE)
        done_count[t] = len(order)
    return _Structure(gathered_a=gathered_a, gathered_b=gathered_b, ag=ag_buffer, done_count=done_count,
                      done_order=tuple(order), rs_unit=rs_unit, regathered=tuple(sorted(regathered)))


def rank_live(traced: "TracedStep", layout: "ParamLayout", grads: Collection[str], world: int, *,
              forward_prefetch: bool = True, shard_embeddings: bool = False,
              live: np.ndarray | None = None, schedule: FsdpSchedule | None = None) -> np.ndarray:
    """Per-rank live bytes per component after every traced op (module doc), W > 1.

    `grads`: names of the parameters FSDP2 computes a (whole) gradient of this step; `live`: the
    trace's live array after evaluate's adjustments (default: traced.live); `schedule`:
    `fsdp_schedule` of this trace, layout, world and options, when the caller reuses it."""
    live = (traced.live if live is None else live).astype(np.int64)  # a copy (astype copies)
    u = fsdp_units(layout, world, grads, shard_embeddings)
    n = live.shape[1]
    if schedule is None:
        schedule = fsdp_schedule(traced, u, n, forward_prefetch)
    trained = np.asarray(u.trained + (0,), dtype=np.int64)  # index -1: no unit
    padded = np.asarray(u.trained_padded + (0,), dtype=np.int64)
    order = list(schedule.done_order)
    cum_full = np.concatenate([[0], np.cumsum(trained[order])]).astype(np.int64)
    cum_shard = np.concatenate([[0], np.cumsum(np.asarray(u.trained_shard, dtype=np.int64)[order])]).astype(np.int64)
    done_full = cum_full[schedule.done_count]
    done_shard = cum_shard[schedule.done_count]
    rs_buffer = padded[schedule.rs_unit]
    w = _CI[Component.WEIGHTS]
    gr = _CI[Component.GRADIENTS]
    live[w] = live[w] - layout.total_bytes + u.shard + schedule.gathered
    live[gr] = np.maximum(live[gr] - done_full, 0) + done_shard
    live[_CI[Component.TEMPORARIES]] += rs_buffer + schedule.ag_buffer
    return live
