"""The vocabulary shared by the planner, the simulator, the runtime and the analysis.

Memory is accounted per `Tier` and per `Component`; time is divided into `Phase`s. The
simulator's predicted timeline and the runtime's measured trace are both JSON Lines files of
`Event`s, so analysis compares like with like.

Timeline / trace file layout (JSON Lines):
  line 1: a header object, {"event": "header", "schema_version": 1, "kind": "timeline" | "trace",
          "t_unit": "op" | "s", "model_fingerprint": ..., "plan_fingerprint": ..., ...}
  then one `Event` per line (see `Event.to_json`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

TIMELINE_SCHEMA_VERSION = 1


class Tier(str, enum.Enum):
    """Where bytes live."""

    GPU = "gpu"
    HOST = "host"
    DISK = "disk"


class Component(str, enum.Enum):
    """What the bytes are."""

    WEIGHTS = "weights"  # 16-bit (or training-dtype) model weights
    GRADIENTS = "gradients"  # weight gradients (.grad or sub-tensor gradients)
    OPTIMIZER = "optimizer"  # AdamW first and second moments
    MASTER = "master"  # fp32 master weights
    ACTIVATIONS = "activations"  # tensors autograd saved for backward
    TEMPORARIES = "temporaries"  # everything else that is alive for a while during the step
    LOGITS = "logits"  # logits and the loss's fp32 copies (largest activation at long context)
    ROUNDING = "rounding"  # caching-allocator block rounding (CUDA only)
    OVERHEAD = "overhead"  # framework overhead: CUDA context, cuBLAS workspace


class Phase(str, enum.Enum):
    """Where in a training step an op or an event happens."""

    SETUP = "setup"
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    RECOMPUTE = "recompute"  # forward re-run inside backward by activation checkpointing
    OPTIMIZER = "optimizer"
    CHUNK_SWITCH = "chunk_switch"  # evict the old chunk's state, bring in the next one's


class EventKind(str, enum.Enum):
    HEADER = "header"
    OP = "op"  # one aten op (simulator) or one sampled op (runtime on CPU)
    PHASE = "phase"  # a phase starts
    LAYER = "layer"  # a decoder layer starts, in the event's phase
    TRANSFER = "transfer"  # bytes moved between tiers
    OPTIMIZER_STEP = "optimizer_step"
    CHUNK_SWITCH = "chunk_switch"
    STEP_END = "step_end"


@dataclass(slots=True)
class Event:
    """One line of a timeline or trace: the state of one tier after something happened.

    `t` is an op index (simulator) or seconds since the step started (runtime); the header
    says which. `bytes` holds live bytes per component on `tier`; `allocated` is their sum and
    `reserved` what the allocator holds (equal to allocated where there is no caching allocator).
    """

    t: float
    event: EventKind
    tier: Tier
    allocated: int
    reserved: int
    bytes: dict[Component, int] = field(default_factory=dict)
    phase: Phase | None = None
    step: int = 0
    layer: int | None = None
    chunk: int | None = None
    name: str | None = None  # the aten op, the transfer ("chunk 3 master host->gpu"), ...
    peak: int | None = None  # measured peak since the previous event, where known

    def to_json(self) -> dict:
        row = {
            "t": self.t,
            "event": self.event.value,
            "tier": self.tier.value,
            "step": self.step,
            "allocated": self.allocated,
            "reserved": self.reserved,
            "bytes": {c.value: b for c, b in self.bytes.items()},
        }
        for key in ("phase",):
            value = getattr(self, key)
            if value is not None:
                row[key] = value.value
        for key in ("layer", "chunk", "name", "peak"):
            value = getattr(self, key)
            if value is not None:
                row[key] = value
        return row

    @classmethod
    def from_json(cls, row: dict) -> "Event":
        return cls(
            t=row["t"],
            event=EventKind(row["event"]),
            tier=Tier(row["tier"]),
            step=int(row.get("step", 0)),
            allocated=int(row["allocated"]),
            reserved=int(row["reserved"]),
            bytes={Component(c): int(b) for c, b in row.get("bytes", {}).items()},
            phase=Phase(row["phase"]) if row.get("phase") is not None else None,
            layer=row.get("layer"),
            chunk=row.get("chunk"),
            name=row.get("name"),
            peak=row.get("peak"),
        )
