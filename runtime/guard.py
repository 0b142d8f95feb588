"""No non-finite value reaches weights, masters or moments.

The check runs on what the optimizer will consume: the accumulated gradient of each span (the
16-bit sum over micro-batches, both uses of a tied weight, the staged host buffer or the disk
records summed), not on the pieces as they arrive. Every piece can be finite while their
16-bit sum is not (two fp16 contributions of 46,624 sum to inf), which is why
`torch.amp.GradScaler` also checks the accumulated `.grad`.

`nonfinite_flag` folds "has inf or nan" over a set of gradients into one device scalar (one
sync to read it). Each gradient is reduced with `sum(dtype=float64)`: inf or nan anywhere makes
the sum non-finite, a float64 sum of fp32 or 16-bit values cannot overflow by itself
(3.4e38 * 2**53 << 1.8e308), and the reduction allocates nothing gradient-sized (measured on
CPU: a bf16 -> fp32 sum allocates about a copy, -> float64 none; on CUDA the cast happens in the
kernel).

`SkipGuard` counts consecutive skipped steps: an fp16 run skips and backs its loss scale off
(routine while the scale settles), a bf16 or fp32 run skips with a warning; after
`max_consecutive` non-finite steps in a row the run stops with a one-line error rather than
training on nothing.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from planner.errors import ChunkftError

DEFAULT_MAX_NONFINITE_STEPS = 25
"""Consecutive skipped steps before a run stops: an fp16 scale of 2**16 backs off to 1 in 16."""


def nonfinite_flag(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-dim bool tensor on `device`: True if any of `grads` holds inf or nan (no sync)."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for g in grads:
        bad |= ~torch.isfinite(g.sum(dtype=torch.float64)).to(device)
    return bad


def first_nonfinite(grads: Mapping[str, torch.Tensor]) -> str | None:
    """The first name whose gradient is not finite (for the message; syncs once per name)."""
    for name, g in grads.items():
        if not bool(torch.isfinite(g.sum(dtype=torch.float64))):
            return name
    return None


class SkipGuard:
    """Counts consecutive skipped optimizer steps; raises after `max_consecutive` of them."""

    def __init__(self, max_consecutive: int = DEFAULT_MAX_NONFINITE_STEPS) -> None:
        if max_consecutive < 1:
            raise ChunkftError(f"the limit of consecutive non-finite steps must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.streak = 0

    def stepped(self) -> None:
        self.streak = 0

    def skipped(self, what: str) -> None:
        """A step was skipped because of `what` (e.g. "inf/nan in gradient of 'lm_head.weight'")."""
        self.streak += 1
        if self.streak >= self.max_consecutive:
            raise ChunkftError(f"{self.streak} optimizer steps in a row had non-finite gradients (last: {what}); "
                               f"stopping with weights and optimizer state untouched by them (the last checkpoint "
                               f"is intact); lower the learning rate or raise --max-nonfinite-steps")

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))
