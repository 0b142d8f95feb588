"""Predicted seconds per optimizer step: a simple roofline over compute, optimizer and transfers.

The terms (each reported separately, the step time is their sum):

  compute    traced flops of forward, loss and backward (the recompute of checkpointed layers
             included: it is in the trace) / (MFU x peak flops of the training dtype). Frozen
             layers run no weight-gradient matmuls, so ChunkFT's smaller backward shows up here
             by itself.
  optimizer  AdamW is memory-bound. GPU: bytes it touches per parameter / HBM bandwidth. Host:
             the same over host memory bandwidth (torch's CPU AdamW and DeepSpeed's CPUAdam
             both stream the state through the memory bus).
  grads_out  host optimizer only: gradients to host over PCIe. They leave during backward, so
             only the part longer than backward compute (2/3 of forward+backward flops) is exposed.
  weights_in host optimizer only: the updated 16-bit weights back to the GPU (exposed: the next
             forward needs them).
  switch     chunk switch: evict the old chunk's state and fetch the next one's over PCIe (and
             NVMe for disk state), once per `update_interval` steps. With prefetch_depth >= 1 it
             overlaps the compute of those steps; only the excess is exposed. Amortised per step.
  disk       host optimizer with state on disk, or gradients staged to disk: NVMe reads and
             writes of every step (not overlapped: the host step waits on them).
  stream     weights streamed from host: forward and backward each bring every decoder layer
             over PCIe; overlapped with compute, the excess is exposed.
  offload    activations offloaded to host (--offload-activations): each saved tensor goes to
             host in forward and comes back in backward over PCIe, on the compute stream (as
             save_on_cpu copies), not overlapped. The bytes are the host copies' peak, which is
             all of them without checkpointing and the checkpoint inputs with it.

Known limitations: no kernel-level model (one MFU for every op), no overlap between the host
optimizer step and the next forward, PCIe and NVMe at their nominal bandwidths, no contention
between concurrent transfers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from planner.schema import Tier
from planner.strategy import OptimizerDevice, Strategy, WeightResidency

# AdamW bytes per parameter per step, mixed precision (fp32 master and moments, 16-bit
# grads): read master, m, v (12) and the grad (2), write master, m, v (12) and the 16-bit
# weight (2) = 28; torch's foreach path also writes and reads the sqrt(v) temporary (8) and
# casts the gradient to fp32 (write 4 + read 4) = 44. Counted from torch/optim/adam.py
# `_multi_tensor_adam` (torch 2.13).
ADAMW_GPU_BYTES_PER_PARAM = 44
# Host AdamW (fused per tensor, as DeepSpeed's CPUAdam): the 28 bytes above plus the fp32 cast
# of the 16-bit gradient (write 4 + read 4).
ADAMW_HOST_BYTES_PER_PARAM = 36
# Backward is about two thirds of forward+backward flops (2N fwd, 4N bwd per token).
BACKWARD_SHARE = 2 / 3


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StepWork:
    """What one step of a strategy moves and computes (inputs to the time model)."""

    flops: int
    """Traced flops of forward, loss, backward and recompute."""
    params_step: int
    """Parameters the optimizer updates in one step (all for C = 1, the active chunk's else)."""
    elem_bytes: int
    """Bytes per element of the training dtype (2 for bf16 / fp16)."""
    switch_state_bytes: int = 0
    """State bytes moved per chunk switch (evicted plus fetched)."""
    stream_weight_bytes: int = 0
    """Weight bytes streamed host -> GPU per forward (and again per backward)."""
    state_bytes_step: int = 0
    """Optimizer state bytes of the parameters updated this step (for disk traffic)."""
    offload_bytes: int = 0
    """Activation bytes copied to host in forward (and back in backward)."""
    dtype: str = "bf16"


def _peak_flops(hw: Any, dtype: str) -> float:
    return hw.gpu.fp32_flops if dtype == "fp32" else hw.gpu.bf16_flops


def predict_step_time(work: StepWork, strategy: Strategy, hw: Any) -> dict[str, float]:
    """Seconds per step by term (see the module docstring); the step time is the sum."""
    parts: dict[str, float] = {}
    compute = work.flops / (hw.mfu * _peak_flops(hw, work.dtype))
    parts["compute"] = compute
    pcie = hw.gpu.pcie_bandwidth_Bps
    if strategy.optimizer_device == OptimizerDevice.GPU:
        parts["optimizer"] = ADAMW_GPU_BYTES_PER_PARAM * work.params_step / hw.gpu.hbm_bandwidth_Bps
    else:
        parts["optimizer"] = ADAMW_HOST_BYTES_PER_PARAM * work.params_step / hw.host_bandwidth_Bps
        grads_out = work.elem_bytes * work.params_step / pcie
        parts["grads_out"] = max(0.0, grads_out - BACKWARD_SHARE * compute)
        parts["weights_in"] = work.elem_bytes * work.params_step / pcie
    if (strategy.is_chunked and strategy.optimizer_device == OptimizerDevice.GPU
            and strategy.state_tier != Tier.GPU and work.switch_state_bytes):
        switch = work.switch_state_bytes / pcie
        if strategy.state_tier == Tier.DISK:
            switch += work.switch_state_bytes / hw.nvme_bandwidth_Bps
        if strategy.prefetch_depth >= 1:
            switch = max(0.0, switch - strategy.update_interval * compute)
        parts["switch"] = switch / strategy.update_interval
    disk = 0.0
    if strategy.optimizer_device == OptimizerDevice.HOST and strategy.state_tier == Tier.DISK:
        disk += 2 * work.state_bytes_step / hw.nvme_bandwidth_Bps  # read and write back
    if strategy.grad_staging == Tier.DISK:
        disk += 2 * work.elem_bytes * work.params_step / hw.nvme_bandwidth_Bps  # write, read
    if disk:
        parts["disk"] = disk
    if strategy.weights == WeightResidency.STREAM:
        parts["stream"] = max(0.0, 2 * work.stream_weight_bytes / pcie - compute)
    if work.offload_bytes:
        parts["offload"] = 2 * work.offload_bytes / pcie
    return parts
