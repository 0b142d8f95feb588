"""What hardware does a fine-tuning job need? Per strategy family, and across GPUs.

For every family of strategies (full FT on the GPU, ZeRO-Offload style, NVMSA staging, ChunkFT
with state on GPU / host / disk, streamed weights) `size_model` finds the strategy of the
family with the smallest GPU need (CUDA reserved bytes plus the CUDA context: what a card must
physically hold), reports its host RAM and disk, and lists the catalogue GPUs that suffice.

For each catalogue GPU that cannot hold the job alone with the weights resident, it says how
many of it would, with the states sharded across them, FSDP / ZeRO-3 style. That answer is arithmetic on the one-GPU
estimate, not a traced multi-GPU step (an estimate, and labelled as one):

    per_rank(G) = sharded / G + unsharded + gather(G)
      sharded   = weights + gradients + fp32 master + moments on the GPU at its peak;
      unsharded = everything else at the peak (activations, logits, temporaries, rounding,
                  reserved-but-free bytes) plus the CUDA context: every rank has its own;
      gather    = 0 for G = 1, else two all-gathered layers (the one computing and the one
                  prefetched: FSDP's default forward / backward prefetch of one module) and one
                  layer's gradients being reduce-scattered, in the training dtype.

Known limitations: the sharded answer ignores communication buffers beyond one layer, NCCL's
own memory (a few hundred MiB per rank) and the host RAM of each node; temporaries (the
optimizer step's fp32 gradient copies among them) are counted per rank, unsharded, which is
pessimistic for full fine-tuning. Memory does not depend on the GPU kind except through the
cuBLAS workspace, so one set of estimates (on `hw`) stands for the whole catalogue.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable

from planner.hardware import list_gpus, load_gpu
from planner.schema import Component, Tier
from planner.solve import SearchSpace, default_space, memory_representatives, objective_key, Objective
from planner.strategy import Estimate, OptimizerDevice, Strategy, WeightResidency

if TYPE_CHECKING:
    from planner.hardware import Hardware
    from planner.model import ModelSpec
    from planner.trace import StepShape

# Largest GPU count the sharded answer considers (a few nodes of 8).
MAX_SHARDED_GPUS = 64
SHARDED_COMPONENTS = (Component.WEIGHTS, Component.GRADIENTS, Component.MASTER, Component.OPTIMIZER)
# Unsharded layers an FSDP rank holds at once: computing + prefetched (weights) + one being
# reduce-scattered (gradients). torch.distributed.fsdp: forward/backward prefetch one module.
GATHERED_LAYERS = 3

FAMILIES: tuple[tuple[str, Callable[[Strategy], bool]], ...] = (
    ("full FT, AdamW on GPU",
     lambda s: s.chunks == 1 and s.optimizer_device == OptimizerDevice.GPU and s.weights == WeightResidency.GPU),
    ("full FT, AdamW on host (ZeRO-Offload)",
     lambda s: s.chunks == 1 and s.optimizer_device == OptimizerDevice.HOST and s.grad_staging is None
     and s.weights == WeightResidency.GPU),
    ("full FT, 16-bit grads staged off GPU (NVMSA)",
     lambda s: s.chunks == 1 and s.grad_staging is not None and s.weights == WeightResidency.GPU),
    ("ChunkFT, state on GPU",
     lambda s: s.chunks > 1 and s.state_tier == Tier.GPU and s.weights == WeightResidency.GPU),
    ("ChunkFT, state on host",
     lambda s: s.chunks > 1 and s.state_tier == Tier.HOST and s.weights == WeightResidency.GPU),
    ("ChunkFT, state on disk",
     lambda s: s.chunks > 1 and s.state_tier == Tier.DISK and s.weights == WeightResidency.GPU),
    ("any, decoder layers streamed from host",
     lambda s: s.weights == WeightResidency.STREAM),
)


def card_need_bytes(est: Estimate) -> int:
    """Bytes a GPU must have for this estimate: allocator reserved plus the CUDA context."""
    return est.need_bytes(Tier.GPU) + est.context_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class FamilyNeed:
    """The least GPU memory one strategy family needs, with its host RAM and disk."""

    family: str
    estimate: Estimate
    """The family's strategy with the smallest GPU need (ties: host, disk, objective)."""
    gpu_bytes: int
    """Card memory needed: reserved + CUDA context."""
    host_bytes: int
    disk_bytes: int
    gpus: tuple[str, ...]
    """Catalogue GPUs whose memory holds `gpu_bytes`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardedNeed:
    """How many GPUs of one kind suffice with states sharded (an estimate, see module doc)."""

    gpu: str
    num_gpus: int
    per_rank_bytes: int
    estimate: Estimate
    """The weights-resident strategy the count is based on."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SizeReport:
    model_name: str
    shape: "StepShape"
    families: tuple[FamilyNeed, ...]
    sharded: tuple[ShardedNeed, ...]
    """Per catalogue GPU that cannot hold the job alone with weights resident: the fewest
    GPUs of that kind with sharded states (none listed if 64 do not suffice)."""
    single_gpus: tuple[str, ...]
    """Catalogue GPUs that alone hold some weights-resident strategy."""
    evaluated: int


def per_rank_bytes(est: Estimate, num_gpus: int, layer_bytes: int) -> int:
    """The FSDP arithmetic of the module docstring for one estimate on `num_gpus` ranks."""
    gpu = est.components.get(Tier.GPU, {})
    sharded = sum(gpu.get(c, 0) for c in SHARDED_COMPONENTS)
    unsharded = card_need_bytes(est) - sharded
    gather = 0 if num_gpus == 1 else GATHERED_LAYERS * layer_bytes
    return math.ceil(sharded / num_gpus) + unsharded + gather


def size_estimates(estimates: list[Estimate], *, model_name: str, shape: "StepShape",
                   layer_bytes: int) -> SizeReport:
    """The report from estimates of (a superset of) the memory representatives."""
    catalogue = [load_gpu(name) for name in list_gpus()]
    families = []
    for name, member in FAMILIES:
        mine = [e for e in estimates if member(e.strategy)]
        if not mine:
            continue
        best = min(mine, key=lambda e: (card_need_bytes(e), e.peak_bytes.get(Tier.HOST, 0),
                                         e.peak_bytes.get(Tier.DISK, 0), objective_key(e, Objective.MEMORY)))
        need = card_need_bytes(best)
        families.append(FamilyNeed(family=name, estimate=best, gpu_bytes=need,
                                   host_bytes=best.peak_bytes.get(Tier.HOST, 0),
                                   disk_bytes=best.peak_bytes.get(Tier.DISK, 0),
                                   gpus=tuple(g.name for g in catalogue if g.memory_bytes >= need)))
    resident = [e for e in estimates if e.strategy.weights == WeightResidency.GPU]
    least = min((card_need_bytes(e) for e in resident), default=None)
    single = tuple(g.name for g in catalogue if least is not None and least <= g.memory_bytes)
    sharded = []
    for g in catalogue:
        if g.name in single or not resident:
            continue
        for n in range(2, MAX_SHARDED_GPUS + 1):
            fits = [(b, e) for e in resident if (b := per_rank_bytes(e, n, layer_bytes)) <= g.memory_bytes]
            if fits:
                b, e = min(fits, key=lambda be: (be[0], objective_key(be[1], Objective.MEMORY)))
                sharded.append(ShardedNeed(gpu=g.name, num_gpus=n, per_rank_bytes=b, estimate=e))
                break
    return SizeReport(model_name=model_name, shape=shape, families=tuple(families), sharded=tuple(sharded),
                      single_gpus=single, evaluated=len(estimates))


def size_model(model: "ModelSpec", shape: "StepShape", hw: "Hardware", *,
               space: SearchSpace | None = None) -> SizeReport:
    """Evaluate the memory representatives of the space and size the job."""
    from planner.evaluate import evaluate, param_layout

    if space is None:
        space = default_space(num_layers=model.num_layers, tokens=shape.batch * shape.seq_len)
    estimates = [evaluate(model, shape, s, hw) for s in memory_representatives(space.strategies())]
    layout = param_layout(model, shape.dtype)
    return size_estimates(estimates, model_name=model.name, shape=shape, layer_bytes=layout.layer_weight_bytes)
