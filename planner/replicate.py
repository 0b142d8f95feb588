"""Trace a few template decoder layers and replicate them to full depth (work in progress).

For now `replicated_trace` traces every layer (the same result, just slower).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.model import ModelSpec
    from planner.opgraph import OpGraph
    from planner.trace import StepShape, TraceOptions


def replicated_trace(model: "ModelSpec", shape: "StepShape", options: "TraceOptions") -> "OpGraph":
    from planner.trace import trace_full

    return trace_full(model, shape, options)
