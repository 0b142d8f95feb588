"""fp16 dynamic loss scaling with on-the-fly overflow detection (NVMSA 2025).

Every gradient is checked the moment it is produced: `LossScaler.check` is the `on_grad`
callback of `runtime.subgrad.install` (ChunkAdamW wires it), so each slice gradient and each
whole-tensor gradient folds "is it finite?" into one shared 1-element flag on the device. There
is no whole-model scan at the end of backward and no extra copy of the gradients: the check
is one fp32-accumulated sum per gradient (inf or nan anywhere makes the sum non-finite; an
fp32 sum of fp16 values cannot overflow by itself, 65504 * 2**31 << 3.4e38).

The optimizer reads the flag once per step (one device sync), skips the step when it is set,
and calls `update`: an overflow multiplies the scale by `backoff_factor`; `growth_interval`
consecutive good steps multiply it by `growth_factor` -- the policy of torch.amp.GradScaler,
whose defaults these are. bf16 has fp32's exponent range and needs no scaler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from planner.errors import ChunkftError


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalerConfig:
    """Dynamic loss-scale policy (defaults: torch.amp.GradScaler's)."""

    init_scale: float = 2.0**16
    """Scale of the first step."""
    growth_factor: float = 2.0
    """Multiplier after `growth_interval` consecutive steps without overflow."""
    backoff_factor: float = 0.5
    """Multiplier after an overflow."""
    growth_interval: int = 2000
    """Good steps between growths."""
    min_scale: float = 1.0 / 2**24
    """The scale never falls below this (a step that overflows at it is still skipped)."""

    def __post_init__(self) -> None:
        if not (self.init_scale > 0 and self.growth_factor >= 1 and 0 < self.backoff_factor < 1):
            raise ChunkftError(
                f"loss scaler needs init_scale > 0, growth_factor >= 1 and 0 < backoff_factor < 1; got {self}"
            )
        if self.growth_interval < 1:
            raise ChunkftError(f"loss scaler growth_interval must be >= 1, got {self.growth_interval}")


class LossScaler:
    """Scale the loss, watch gradients as they appear, decide whether a step may happen.

    Use: `scaler.scale_loss(loss).backward()` for each micro-batch; the optimizer calls
    `overflowed()`, divides gradients by `scale`, then `update(overflowed)` (which also clears
    the flag).
    """

    def __init__(self, config: ScalerConfig | None = None):
        self.config = config or ScalerConfig()
        self.scale: float = self.config.init_scale
        self.good_steps: int = 0
        self._found_inf: torch.Tensor | None = None  # bool[1] on the gradients' device

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def check(self, name: str, grad: torch.Tensor) -> None:
        """`on_grad` callback: fold "grad has inf/nan" into the flag, without syncing."""
        bad = ~torch.isfinite(grad.sum(dtype=torch.float32))
        if self._found_inf is None or self._found_inf.device != grad.device:
            self._found_inf = torch.zeros(1, dtype=torch.bool, device=grad.device)
        self._found_inf.logical_or_(bad)

    def overflowed(self) -> bool:
        """True if any gradient checked since the last update was not finite (one sync)."""
        return bool(self._found_inf is not None and self._found_inf.item())

    def update(self, overflowed: bool) -> None:
        """Back off after an overflow, grow after enough good steps; clear the flag."""
        if overflowed:
            self.scale = max(self.scale * self.config.backoff_factor, self.config.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.config.growth_interval:
                self.scale *= self.config.growth_factor
                self.good_steps = 0
        if self._found_inf is not None:
            self._found_inf.zero_()

    def state_dict(self) -> dict:
        """JSON-able state (the config travels with it)."""
        return {"scale": self.scale, "good_steps": self.good_steps, "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.config = ScalerConfig(**state["config"])
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise ChunkftError(f"loss scaler state is malformed ({type(e).__name__}: {e})") from None
        if self._found_inf is not None:
            self._found_inf.zero_()
