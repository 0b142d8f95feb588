"""The plan file: what the solver chose, for which model and step, and what it predicts.

A plan is JSON (written atomically):

    {"schema_version": 1, "planner_version": "0.1.0",
     "model": {"name": "llama3-8b", "fingerprint": "<sha256 of the config>"},
     "shape": {"batch": 1, "seq_len": 1024, "dtype": "bf16"},
     "budget": {"gpu_bytes": ..., "host_bytes": null, "disk_bytes": null},
     "hardware": {"gpu": {GpuProfile fields}, "host_bandwidth_Bps": ..., ...},
     "objective": {"name": "memory", "text": "fit every tier, then fewest chunks, ..."},
     "strategy": {Strategy.to_json()},
     "chunk_table": {ChunkTable.to_json(): shapes + per chunk (param, dim, start, end, nbytes)},
     "predicted": {"peak_bytes": {"gpu": ..}, "components": {"gpu": {"weights": ..}},
                   "reserved_bytes": .., "step_time_s": .., "worst_chunk": ..,
                   "highest_peak_chunk": .. | null, "highest_peak_bytes": .. | null},
     "parallel": {"gpus_per_node": 2, "nodes": 1, "shard_embeddings": true,
                  "all_gather_bytes": .., "reduce_scatter_bytes": .., "all_reduce_bytes": ..,
                  "interconnect_Bps": .., "chunk_traces": "auto"|"exact"|"bound",
                  "comm_time_s": ..}}

"parallel" is present only in a plan for several GPUs (planner.parallel): then the shape is one
rank's micro-batch and every prediction is per rank (per GPU; host and disk: one rank's share).

`load_plan` validates every field (type, presence, enum value, chunk table consistency) and
refuses an unknown schema version; given the model it also refuses a plan made for another
model (fingerprint) and a chunk table that does not cover the model's parameters. Every
refusal is a one-line ChunkftError naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import TYPE_CHECKING, Any

from planner import __version__
from planner.chunks import ChunkTable, NamedShape, make_chunk_table
from planner.errors import ChunkftError
from planner.fsio import atomic_write_json, read_json
from planner.hardware import GpuProfile, Hardware
from planner.parallel import CHUNK_TRACE_MODES, ParallelLayout, runs_sharded
from planner.schema import Component, Tier
from planner.solve import Objective
from planner.strategy import Budget, Estimate, Strategy
from planner.trace import StepShape
from planner.validate import check_step

if TYPE_CHECKING:
    from planner.model import ModelSpec
    from planner.sharding import ShardedEstimate

PLAN_SCHEMA_VERSION = 1
COMMUNICATION_FIELDS = ("all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes", "interconnect_Bps",
                        "comm_time_s")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A solved plan: model, step shape, budget, hardware, strategy, chunks and predictions."""

    model_name: str
    model_fingerprint: str
    shape: StepShape
    budget: Budget
    hardware: Hardware
    objective: Objective
    strategy: Strategy
    chunk_table: ChunkTable
    peak_bytes: dict[Tier, int]
    """Predicted peak per tier."""
    components: dict[Tier, dict[Component, int]]
    """Predicted bytes per component at each tier's peak."""
    reserved_bytes: int
    """Predicted CUDA reserved bytes at the GPU peak (what nvidia-smi shows, minus context)."""
    step_time_s: float
    worst_chunk: int | None = None
    context_bytes: int = 0
    """CUDA context outside the allocator: a real card needs reserved + this."""
    highest_peak: tuple[int, int] | None = None
    """(chunk, GPU bytes) where another chunk allocates more at its peak than the worst chunk
    (Estimate.highest_peak)."""
    step_time_parts_s: dict[str, float] = dataclasses.field(default_factory=dict)
    parallel: ParallelLayout | None = None
    """Several GPUs (FSDP2): the layout; predictions are then per rank."""
    chunk_traces: str = "auto"
    """Parallel plans: the ChunkFT trace mode the predictions were made with (planner.parallel)."""
    communication: dict[str, float] = dataclasses.field(default_factory=dict)
    """Parallel plans: all_gather_bytes, reduce_scatter_bytes, all_reduce_bytes (per step, unsharded;
    all-reduce: the gradients of chunk spans that slice a tensor),
    interconnect_Bps and comm_time_s (the collectives' time before overlap)."""
    planner_version: str = __version__

    @property
    def world_size(self) -> int:
        return 1 if self.parallel is None else self.parallel.world_size

    def estimate(self) -> Estimate:
        """The plan's predictions as the Estimate the solver picked."""
        return Estimate(strategy=self.strategy, peak_bytes=dict(self.peak_bytes),
                        components={t: dict(c) for t, c in self.components.items()},
                        reserved_bytes=self.reserved_bytes, step_time_s=self.step_time_s,
                        worst_chunk=self.worst_chunk, context_bytes=self.context_bytes,
                        step_time_parts_s=dict(self.step_time_parts_s), highest_peak=self.highest_peak)

    def to_json(self) -> dict:
        out = {
            "schema_version": PLAN_SCHEMA_VERSION,
            "planner_version": self.planner_version,
            "model": {"name": self.model_name, "fingerprint": self.model_fingerprint},
            "shape": {"batch": self.shape.batch, "seq_len": self.shape.seq_len, "dtype": self.shape.dtype},
            "budget": {"gpu_bytes": self.budget.gpu_bytes, "host_bytes": self.budget.host_bytes,
                       "disk_bytes": self.budget.disk_bytes},
            "hardware": _hardware_to_json(self.hardware),
            "objective": {"name": self.objective.value, "text": self.objective.describe()},
            "strategy": self.strategy.to_json(),
            "chunk_table": self.chunk_table.to_json(),
            "predicted": {
                "peak_bytes": {t.value: b for t, b in self.peak_bytes.items()},
                "components": {t.value: {c.value: b for c, b in comps.items()}
                               for t, comps in self.components.items()},
                "reserved_bytes": self.reserved_bytes,
                "context_bytes": self.context_bytes,
                "step_time_s": self.step_time_s,
                "step_time_parts_s": dict(self.step_time_parts_s),
                "worst_chunk": self.worst_chunk,
                "highest_peak_chunk": None if self.highest_peak is None else self.highest_peak[0],
                "highest_peak_bytes": None if self.highest_peak is None else self.highest_peak[1],
            },
        }
        if self.parallel is not None:
            out["parallel"] = {**self.parallel.to_json(), **self.communication, "chunk_traces": self.chunk_traces}
        elif self.chunk_traces != "auto":  # the chunk trace mode the one-GPU figures were made with
            out["predicted"]["chunk_traces"] = self.chunk_traces
        return out

    def fingerprint(self) -> str:
        """sha256 hex of the canonical plan JSON (names the plan in timelines and traces)."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Any) -> "Plan":
        """Parse and validate; every problem is a one-line ChunkftError naming the field."""
        r = _Reader(data, "plan")
        version = r.field("schema_version", int)
        if version != PLAN_SCHEMA_VERSION:
            raise ChunkftError(f"plan schema_version {version} is not supported by this chunkft "
                               f"(planner {__version__} reads schema_version {PLAN_SCHEMA_VERSION}); "
                               "re-run `chunkft plan` to make a new plan")
        model = r.sub("model")
        shape_r = r.sub("shape")
        budget_r = r.sub("budget")
        pred = r.sub("predicted")
        objective_r = r.sub("objective")
        try:
            shape = StepShape(batch=shape_r.field("batch", int), seq_len=shape_r.field("seq_len", int),
                              dtype=shape_r.field("dtype", str))
            check_step(seq=shape.seq_len, batch=shape.batch, seq_flag="shape.seq_len", batch_flag="shape.batch")
        except ChunkftError as e:
            raise ChunkftError(f"plan field 'shape' is invalid: {e}") from None
        budget = Budget(gpu_bytes=budget_r.field("gpu_bytes", int, positive=True),
                        host_bytes=budget_r.field("host_bytes", int, optional=True, positive=True),
                        disk_bytes=budget_r.field("disk_bytes", int, optional=True, positive=True))
        strategy_d = r.field("strategy", dict)
        try:
            strategy = Strategy.from_json(strategy_d)
        except ChunkftError as e:
            raise ChunkftError(f"plan field 'strategy' is invalid: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ChunkftError(f"plan field 'strategy' is invalid ({type(e).__name__}: {e})") from None
        table = ChunkTable.from_json(r.field("chunk_table", dict))
        if table.num_chunks != strategy.chunks:
            raise ChunkftError(f"plan chunk table has {table.num_chunks} chunks but the strategy says "
                               f"{strategy.chunks}")
        # Internal consistency without the model: the table against its own recorded shapes.
        table.validate([(n, s, 1) for n, s in table.shapes.items()], check_bytes=False)
        peaks = {_enum(Tier, k, "predicted.peak_bytes"): v
                 for k, v in pred.mapping("peak_bytes", int).items()}
        comps_r = pred.sub("components")
        components = {
            _enum(Tier, k, "predicted.components"): {
                _enum(Component, c, f"predicted.components.{k}"): b
                for c, b in comps_r.mapping(k, int).items()}
            for k in comps_r.keys()}
        parallel, communication, chunk_traces = None, {}, pred.data.get("chunk_traces", "auto")
        if chunk_traces not in CHUNK_TRACE_MODES:
            raise ChunkftError(f"plan field 'predicted.chunk_traces' has {chunk_traces!r}; valid values are: "
                               f"{', '.join(CHUNK_TRACE_MODES)}")
        if data.get("parallel") is not None:
            par = r.sub("parallel")
            communication = {k: par.field(k, float) for k in COMMUNICATION_FIELDS}
            chunk_traces = par.field("chunk_traces", str)
            if chunk_traces not in CHUNK_TRACE_MODES:
                raise ChunkftError(f"plan field 'parallel.chunk_traces' has {chunk_traces!r}; valid values are: "
                                   f"{', '.join(CHUNK_TRACE_MODES)}")
            try:
                parallel = ParallelLayout.from_json({k: v for k, v in par.data.items()
                                                     if k not in COMMUNICATION_FIELDS and k != "chunk_traces"})
            except ChunkftError as e:
                raise ChunkftError(f"plan field 'parallel' is invalid: {e}") from None
            if not runs_sharded(strategy):
                raise ChunkftError(f"plan field 'parallel' is set but strategy {strategy.label()!r} does not run "
                                   "sharded (AdamW on the GPU, weights resident, no staging)")
        return cls(
            parallel=parallel, communication=communication, chunk_traces=chunk_traces,
            model_name=model.field("name", str),
            model_fingerprint=model.field("fingerprint", str),
            shape=shape, budget=budget, hardware=_hardware_from_json(r.sub("hardware")),
            objective=_enum(Objective, objective_r.field("name", str), "objective.name"),
            strategy=strategy, chunk_table=table, peak_bytes=peaks, components=components,
            reserved_bytes=pred.field("reserved_bytes", int),
            step_time_s=pred.field("step_time_s", float),
            worst_chunk=pred.field("worst_chunk", int, optional=True),
            highest_peak=_highest_peak(*(pred.field(k, int, optional=True) if k in pred.keys() else None
                                         for k in ("highest_peak_chunk", "highest_peak_bytes"))),
            context_bytes=pred.field("context_bytes", int),
            step_time_parts_s=pred.mapping("step_time_parts_s", float),
            planner_version=r.field("planner_version", str),
        )


def _highest_peak(chunk: int | None, nbytes: int | None) -> tuple[int, int] | None:
    if chunk is None and nbytes is None:
        return None
    if chunk is None or nbytes is None:
        raise ChunkftError("plan file is malformed: predicted.highest_peak_chunk and highest_peak_bytes "
                           "come together")
    return chunk, nbytes


def named_shapes(model: "ModelSpec", dtype: str) -> list[NamedShape]:
    """(name, shape, elem_bytes) of every parameter in module order, tied weights once.

    planner.evaluate's layout (a one-layer meta build replicated by name, cached), so a 405B
    plan does not build 126 layers to name its parameters."""
    from planner.evaluate import param_layout

    return list(param_layout(model, dtype).named_shapes)


def make_plan(model: "ModelSpec", shape: StepShape, hardware: Hardware, budget: Budget,
              objective: Objective, estimate: Estimate,
              shapes: list[NamedShape] | None = None, sharded: "ShardedEstimate | None" = None,
              parallel: ParallelLayout | None = None, chunk_traces: str = "auto") -> Plan:
    """The Plan for the solver's winner `estimate`; for several GPUs also `parallel` and the
    winner's `sharded` estimate (planner.parallel.solve_parallel), whose per-rank figures
    `estimate` carries."""
    if (sharded is None) != (parallel is None):
        raise ChunkftError("a parallel plan needs both the layout and its sharded estimate")
    communication = {} if sharded is None else {
        "all_gather_bytes": float(sharded.all_gather_bytes), "reduce_scatter_bytes": float(sharded.reduce_scatter_bytes),
        "all_reduce_bytes": float(sharded.all_reduce_bytes),
        "interconnect_Bps": float(sharded.interconnect_Bps), "comm_time_s": float(sharded.comm_time_s)}
    shapes = named_shapes(model, shape.dtype) if shapes is None else shapes
    return Plan(model_name=model.name, model_fingerprint=model.fingerprint(), shape=shape,
                budget=budget, hardware=hardware, objective=objective, strategy=estimate.strategy,
                chunk_table=make_chunk_table(shapes, estimate.strategy.chunks),
                peak_bytes=dict(estimate.peak_bytes),
                components={t: dict(c) for t, c in estimate.components.items()},
                reserved_bytes=estimate.reserved_bytes, step_time_s=estimate.step_time_s,
                worst_chunk=estimate.worst_chunk, context_bytes=estimate.context_bytes,
                highest_peak=estimate.highest_peak,
                step_time_parts_s=dict(estimate.step_time_parts_s), parallel=parallel,
                communication=communication, chunk_traces=chunk_traces)


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    atomic_write_json(path, plan.to_json())


def load_plan(path: str | os.PathLike, *, model: "ModelSpec | None" = None) -> Plan:
    """Read and validate a plan file; with `model`, also check it was made for that model."""
    data = read_json(path, what="plan file")
    try:
        plan = Plan.from_json(data)
    except ChunkftError as e:
        raise ChunkftError(f"plan file {str(path)!r}: {e}") from None
    if model is not None:
        check_plan_model(plan, model)
    return plan


def check_plan_model(plan: Plan, model: "ModelSpec") -> None:
    """Refuse a plan made for another model; check its chunk table covers this model."""
    fp = model.fingerprint()
    if fp != plan.model_fingerprint:
        raise ChunkftError(f"the plan was made for model {plan.model_name!r} (fingerprint "
                           f"{plan.model_fingerprint[:12]}), not {model.name!r} ({fp[:12]}); "
                           "make a plan for this model with `chunkft plan`")
    plan.chunk_table.validate(named_shapes(model, plan.shape.dtype))


# ----------------------------------------------------------------------------- hardware

def _hardware_to_json(hw: Hardware) -> dict:
    d = {f.name: getattr(hw, f.name) for f in dataclasses.fields(hw) if f.name != "gpu"}
    d["gpu"] = {f.name: getattr(hw.gpu, f.name) for f in dataclasses.fields(hw.gpu)}
    return d


def _hardware_from_json(r: "_Reader") -> Hardware:
    gpu_r = r.sub("gpu")
    gpu = GpuProfile(**{f.name: _hardware_field(gpu_r, f) for f in dataclasses.fields(GpuProfile)})
    rest = {f.name: _hardware_field(r, f) for f in dataclasses.fields(Hardware) if f.name != "gpu"}
    return Hardware(gpu=gpu, **rest)


def _hardware_field(r: "_Reader", f: dataclasses.Field):
    """Read a hardware dataclass field by its annotation ("float | None" is an optional float;
    annotations are strings under `from __future__ import annotations`)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    names = [part.strip() for part in text.split("|")]
    typ = {"int": int, "float": float, "str": str, "bool": bool}[names[0]]
    return r.field(f.name, typ, optional="None" in names, positive=typ in (int, float))


# ----------------------------------------------------------------------------- validation

_MAX_NUMBER = 2**62  # byte counts and times are summed in int64 / float64; a plan never nears this


class _Reader:
    """Typed field access into a JSON object, with the dotted path in every error."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ChunkftError(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data, self.where = data, where

    def _path(self, key: str) -> str:
        return key if self.where == "plan" else f"{self.where.removeprefix('plan.')}.{key}"

    def field(self, key: str, typ: type, *, optional: bool = False, positive: bool = False):
        if key not in self.data:
            raise ChunkftError(f"plan is missing field {self._path(key)!r}")
        value = self.data[key]
        if value is None and optional:
            return None
        ok = (isinstance(value, typ) and not (typ is int and isinstance(value, bool))) if typ is not float \
            else (isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            want = {int: "an integer", float: "a number", str: "a string", dict: "an object",
                    bool: "true or false"}.get(typ, typ.__name__)
            raise ChunkftError(f"plan field {self._path(key)!r} must be {want}"
                               f"{' or null' if optional else ''}, got {json.dumps(value)[:40]}")
        if typ in (int, float) and not (math.isfinite(value) and abs(value) <= _MAX_NUMBER):
            raise ChunkftError(f"plan field {self._path(key)!r} must be a finite number up to 2**62, "
                               f"got {json.dumps(value)[:40]}")
        if positive and value <= 0:
            raise ChunkftError(f"plan field {self._path(key)!r} must be positive, got {value}")
        return float(value) if typ is float else value

    def sub(self, key: str) -> "_Reader":
        return _Reader(self.field(key, dict), f"{self.where}.{key}")

    def keys(self) -> list[str]:
        return list(self.data)

    def mapping(self, key: str, typ: type) -> dict[str, Any]:
        sub = self.sub(key)
        return {k: sub.field(k, typ) for k in sub.keys()}


def _enum(cls, value: str, where: str):
    try:
        return cls(value)
    except ValueError:
        raise ChunkftError(f"plan field {where!r} has {value!r}; valid values are: "
                           f"{', '.join(m.value for m in cls)}") from None
