"""What a plan decides and what it costs: Strategy, Budget and Estimate.

A `Strategy` is one point of the strategy space DESIGN.md lists (chunk count, update interval,
where the optimizer runs, where resting optimizer state lives, gradient staging, activation
checkpointing, weight residency, chunked loss, prefetch depth). A `Budget` caps bytes per tier.
An `Estimate` is what planner.evaluate predicts for a strategy: peaks per tier with the
component breakdown at each peak, the CUDA reserved bytes, and a step time.

Budget semantics for the GPU: the bytes PyTorch's caching allocator may reserve (what
`torch.cuda.set_per_process_memory_fraction` caps). The CUDA context lives outside the allocator;
`Estimate.context_bytes` reports it, and a real card needs it on top of the budget. A step fits
when the allocator can serve every request under that cap: when a request finds no cached block
and no room, PyTorch frees its unused cached segments and retries, so the least memory a step
needs (`Estimate.least_bytes`) can be well under the reserved bytes it caches when unconstrained
(`Estimate.reserved_bytes`, what nvidia-smi shows on a card with room to spare).

All three types round-trip through JSON (`to_json` / `from_json`); malformed input is a
ChunkftError naming the bad value and the valid ones.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from planner.errors import ChunkftError
from planner.recipe import Loop, Recipe
from planner.schema import Component, Tier

STRATEGY_FIELDS = ("chunks", "update_interval", "optimizer_device", "state_tier", "grad_staging",
                   "checkpointing", "weights", "loss_chunk_tokens", "prefetch_depth", "recipe")


class OptimizerDevice(str, enum.Enum):
    """Where the AdamW step runs."""

    GPU = "gpu"  # on the active chunk's fp32 master and moments in GPU memory
    HOST = "host"  # on the CPU against host-resident state (ZeRO-Offload / NVMSA style)


class WeightResidency(str, enum.Enum):
    """Where the 16-bit weights live during the step."""

    GPU = "gpu"  # every layer resident
    STREAM = "stream"  # decoder layers rest in pinned host memory and stream in as needed


def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        raise ChunkftError(f"invalid {what} {value!r}: valid values are {valid}") from None


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ChunkftError(f"invalid {what} {value!r}: must be an integer >= {minimum}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Strategy:
    """One way to run a fine-tuning step. The defaults are plain full FT with AdamW on the GPU."""

    chunks: int = 1
    """C, the number of ChunkFT chunks; 1 = plain full fine-tuning (every weight trains every step)."""
    update_interval: int = 1
    """Optimizer steps on the active chunk before switching to the next one."""
    optimizer_device: OptimizerDevice = OptimizerDevice.GPU
    """Where AdamW runs: on the GPU for the active chunk, or on the host."""
    state_tier: Tier = Tier.GPU
    """Where the fp32 master weights and AdamW moments of inactive chunks rest."""
    grad_staging: Tier | None = None
    """None: gradients stay where they are produced until the optimizer step (for a host
    optimizer: DeepSpeed-style, bucketed copies that land as fp32 on host). HOST / DISK: every
    16-bit gradient leaves the GPU as soon as it is produced and rests in 16 bits (NVMSA)."""
    checkpointing: bool = False
    """Per-decoder-layer activation checkpointing."""
    weights: WeightResidency = WeightResidency.GPU
    """All 16-bit weights resident on the GPU, or decoder layers streamed from host memory."""
    loss_chunk_tokens: int = 0
    """0 = the model's own loss; > 0 = lm_head + cross-entropy over chunks of this many tokens."""
    prefetch_depth: int = 1
    """How many upcoming chunks' state are brought towards the optimizer while the current one
    trains (0 = fetch on switch). Only meaningful when state moves (C > 1, state off the GPU)."""
    recipe: Recipe = Recipe()
    """The user's training step (planner.recipe): fixed by the user, copied into every strategy
    the solver compares; it changes the traced step, so it is part of the strategy's identity."""

    def __post_init__(self):
        set_ = object.__setattr__
        if isinstance(self.recipe, dict):
            set_(self, "recipe", Recipe.from_json(self.recipe))
        elif not isinstance(self.recipe, Recipe):
            raise ChunkftError(f"invalid recipe {self.recipe!r}: must be a Recipe or its JSON object")
        _int(self.chunks, "chunk count", 1)
        _int(self.update_interval, "update_interval", 1)
        _int(self.loss_chunk_tokens, "loss_chunk_tokens", 0)
        _int(self.prefetch_depth, "prefetch_depth", 0)
        set_(self, "optimizer_device", _enum(OptimizerDevice, self.optimizer_device, "optimizer_device"))
        set_(self, "state_tier", _enum(Tier, self.state_tier, "state_tier"))
        set_(self, "weights", _enum(WeightResidency, self.weights, "weights"))
        if self.grad_staging is not None:
            set_(self, "grad_staging", _enum(Tier, self.grad_staging, "grad_staging"))
            if self.grad_staging == Tier.GPU:
                raise ChunkftError("invalid grad_staging 'gpu': staging moves gradients off the GPU; "
                                   "valid values are None, 'host', 'disk'")
            if self.optimizer_device != OptimizerDevice.HOST:
                raise ChunkftError(f"grad_staging {self.grad_staging.value!r} needs optimizer_device 'host': "
                                   "staged gradients feed a host-side optimizer step")
        if not isinstance(self.checkpointing, bool):
            raise ChunkftError(f"invalid checkpointing {self.checkpointing!r}: must be true or false")
        if self.optimizer_device == OptimizerDevice.HOST and self.state_tier == Tier.GPU:
            raise ChunkftError("optimizer_device 'host' needs state_tier 'host' or 'disk': "
                               "a host optimizer cannot read state resting on the GPU")
        self.recipe.check_strategy(loss_chunk_tokens=self.loss_chunk_tokens)

    @property
    def is_chunked(self) -> bool:
        return self.chunks > 1

    @property
    def moves_state(self) -> bool:
        """State travels between tiers per chunk switch (what prefetch hides)."""
        if self.optimizer_device == OptimizerDevice.HOST:
            return self.state_tier == Tier.DISK
        return self.state_tier != Tier.GPU

    def label(self) -> str:
        """A short human name, unique per strategy: "ChunkFT C=16, state host, ckpt"."""
        parts = ["full FT" if self.chunks == 1 else f"ChunkFT C={self.chunks}"]
        if self.chunks > 1 and self.update_interval != 1:
            parts.append(f"every {self.update_interval} steps")
        if self.optimizer_device == OptimizerDevice.HOST:
            parts.append(f"AdamW on host, state {self.state_tier.value}")
            if self.grad_staging is None:
                parts.append("fp32 grads on host")
            else:
                parts.append(f"16-bit grads to {self.grad_staging.value}")
        elif self.state_tier != Tier.GPU:
            parts.append(f"state {self.state_tier.value}")
        if self.moves_state and self.prefetch_depth != 1:
            parts.append(f"prefetch {self.prefetch_depth}")
        if self.checkpointing:
            parts.append("ckpt")
        if self.weights == WeightResidency.STREAM:
            parts.append("stream weights")
        if self.loss_chunk_tokens:
            parts.append(f"loss chunks {self.loss_chunk_tokens}")
        if self.recipe.loop != Loop.CHUNKFT:
            parts.append(f"{self.recipe.loop.value} loop")
        if self.recipe.label():
            parts.append(self.recipe.label())
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {
            "chunks": self.chunks,
            "update_interval": self.update_interval,
            "optimizer_device": self.optimizer_device.value,
            "state_tier": self.state_tier.value,
            "grad_staging": None if self.grad_staging is None else self.grad_staging.value,
            "checkpointing": self.checkpointing,
            "weights": self.weights.value,
            "loss_chunk_tokens": self.loss_chunk_tokens,
            "prefetch_depth": self.prefetch_depth,
            "recipe": self.recipe.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> "Strategy":
        if not isinstance(data, dict):
            raise ChunkftError(f"strategy must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(STRATEGY_FIELDS))
        if unknown:
            raise ChunkftError(f"strategy has unknown fields {unknown}; valid fields are {list(STRATEGY_FIELDS)}")
        return cls(**data)


def _budget_bytes(value: Any, what: str, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        none = " or null (unlimited)" if optional else ""
        raise ChunkftError(f"invalid {what} budget {value!r}: must be a positive byte count{none}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """Bytes available per tier."""

    gpu_bytes: int
    """What PyTorch's caching allocator may reserve on the GPU (the CUDA context is extra)."""
    host_bytes: int | None = None
    """Host RAM for pinned state, staged gradients and host buffers; None = not limited."""
    disk_bytes: int | None = None
    """Disk for state / gradients on the disk tier; None = not limited."""

    def __post_init__(self):
        _budget_bytes(self.gpu_bytes, "GPU", False)
        _budget_bytes(self.host_bytes, "host", True)
        _budget_bytes(self.disk_bytes, "disk", True)

    def limit(self, tier: Tier) -> int | None:
        return {Tier.GPU: self.gpu_bytes, Tier.HOST: self.host_bytes, Tier.DISK: self.disk_bytes}[tier]

    def to_json(self) -> dict:
        return {"gpu_bytes": self.gpu_bytes, "host_bytes": self.host_bytes, "disk_bytes": self.disk_bytes}

    @classmethod
    def from_json(cls, data: Any) -> "Budget":
        if not isinstance(data, dict) or "gpu_bytes" not in data:
            raise ChunkftError(f"budget must be a JSON object with gpu_bytes, got {data!r}")
        unknown = sorted(set(data) - {"gpu_bytes", "host_bytes", "disk_bytes"})
        if unknown:
            raise ChunkftError(f"budget has unknown fields {unknown}; valid: gpu_bytes, host_bytes, disk_bytes")
        return cls(**data)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Estimate:
    """Predicted cost of one strategy on one model, step shape and hardware.

    Compared and hashed by identity (eq=False): the solver keys dicts by Estimate."""

    strategy: Strategy
    peak_bytes: dict[Tier, int]
    """Peak bytes per tier. GPU: predicted `torch.cuda.max_memory_allocated` (every allocation
    PyTorch makes, block rounding and the cuBLAS workspace included; the CUDA context excluded)."""
    components: dict[Tier, dict[Component, int]]
    """Breakdown at each tier's peak; sums to `peak_bytes[tier]`."""
    reserved_bytes: int
    """Predicted `torch.cuda.max_memory_reserved` over the step (>= peak_bytes[GPU]) when nothing
    limits the caching allocator: the segments it caches (what nvidia-smi shows, less the context)."""
    step_time_s: float
    """Predicted seconds per optimizer step (chunk switches amortised)."""
    worst_chunk: int | None
    """Chunk whose step has the highest GPU peak (None for C = 1)."""
    context_bytes: int = 0
    """CUDA context outside PyTorch's allocator: a real card needs reserved + this."""
    step_time_parts_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """The step time's terms (compute, recompute, optimizer, transfers ...), for reports."""
    least_bytes: int | None = None
    """The least memory the step needs on the GPU: the smallest allocator cap under which the
    caching allocator, freeing cached blocks and retrying on a failed request, serves every
    request (peak_bytes[GPU] <= least_bytes <= reserved_bytes). What a GPU budget is held
    against. None (older plan files, estimates that do not search it): reserved_bytes."""

    highest_peak: tuple[int, int] | None = None
    """(chunk, bytes): where another evaluated chunk allocates more at its peak than the worst
    chunk (worst by the least memory it needs, `need_bytes`), that chunk and its GPU peak; what
    `torch.cuda.max_memory_allocated` reads over a whole run. None: the worst chunk's peak is
    the highest (or C = 1)."""

    @property
    def least_gpu_bytes(self) -> int:
        """least_bytes, or reserved_bytes where it was not searched."""
        return self.reserved_bytes if self.least_bytes is None else self.least_bytes

    def need_bytes(self, tier: Tier) -> int:
        """What the tier's budget must hold: the least memory the step needs on the GPU (the
        allocator frees cached blocks before it fails), the peak elsewhere."""
        if tier == Tier.GPU:
            return max(self.least_gpu_bytes, self.peak_bytes.get(Tier.GPU, 0))
        return self.peak_bytes.get(tier, 0)

    def missing(self, budget: Budget) -> dict[Tier, int]:
        """Bytes lacking per limited tier (0 where it fits)."""
        out = {}
        for tier in Tier:
            limit = budget.limit(tier)
            if limit is not None:
                out[tier] = max(0, self.need_bytes(tier) - limit)
        return out

    def fits(self, budget: Budget) -> bool:
        return all(v == 0 for v in self.missing(budget).values())

    def fits_tier(self, budget: Budget, tier: Tier) -> bool | None:
        """True / False for a limited tier; None where the budget does not limit it."""
        limit = budget.limit(tier)
        return None if limit is None else self.need_bytes(tier) <= limit

    def to_json(self) -> dict:
        return {
            "strategy": self.strategy.to_json(),
            "label": self.strategy.label(),
            "peak_bytes": {t.value: b for t, b in self.peak_bytes.items()},
            "components": {t.value: {c.value: b for c, b in comps.items()} for t, comps in self.components.items()},
            "reserved_bytes": self.reserved_bytes,
            "least_bytes": self.least_gpu_bytes,
            "context_bytes": self.context_bytes,
            "step_time_s": self.step_time_s,
            "step_time_parts_s": dict(self.step_time_parts_s),
            "worst_chunk": self.worst_chunk,
            "highest_peak": None if self.highest_peak is None else
            {"chunk": self.highest_peak[0], "gpu_bytes": self.highest_peak[1]},
        }

    @classmethod
    def from_json(cls, data: Any) -> "Estimate":
        try:
            return cls(
                strategy=Strategy.from_json(data["strategy"]),
                peak_bytes={Tier(t): int(b) for t, b in data["peak_bytes"].items()},
                components={Tier(t): {Component(c): int(b) for c, b in comps.items()}
                            for t, comps in data["components"].items()},
                reserved_bytes=int(data["reserved_bytes"]),
                least_bytes=None if data.get("least_bytes") is None else int(data["least_bytes"]),
                context_bytes=int(data.get("context_bytes", 0)),
                step_time_s=float(data["step_time_s"]),
                step_time_parts_s={str(k): float(v) for k, v in data.get("step_time_parts_s", {}).items()},
                worst_chunk=None if data.get("worst_chunk") is None else int(data["worst_chunk"]),
                highest_peak=None if data.get("highest_peak") is None else
                (int(data["highest_peak"]["chunk"]), int(data["highest_peak"]["gpu_bytes"])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ChunkftError(f"estimate is malformed ({type(e).__name__}: {e})") from None
