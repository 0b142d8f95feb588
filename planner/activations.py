"""Activation policies of a recipe that change what the traced step saves: every-K-th layer
checkpointing, op-level selective checkpointing, and activation offloading to host memory.

Each is the real mechanism, run by the tracer under fake tensors and by the measured CPU step
alike:

- every-K (`--checkpointing every-K`): decoder layer i is checkpointed iff i % K == 0, the
  selection of transformers' `activation_checkpointing_enable(every_n_layers=K)`, torchtune's
  `ac_mode="selective"` with `ac_option=K` and torchtitan's layer-selective AC: layers 0, K,
  2K, ... recompute, the others keep their activations. planner.step.enable_checkpointing
  sets HF's per-layer `gradient_checkpointing` flag; the template tracer gives each template
  layer the flag of the full-depth layer it stands for (planner.replicate keys layers by it).
- selective (`--checkpointing selective`): every decoder layer runs under non-reentrant
  `torch.utils.checkpoint` with `context_fn=selective_context_fn`, torch's
  `create_selective_checkpoint_contexts` with `save_matmuls`: the outputs of the matmuls
  (mm, addmm, bmm, baddbmm) and of scaled-dot-product attention are saved (MUST_SAVE), every
  other op is recomputed in backward (PREFER_RECOMPUTE). torchtitan's "op" mode saves the same
  ops but recomputes every second mm; this policy saves all of them (the upper end of that
  mode's memory). The CPU SDPA kernel the tracer runs (`_scaled_dot_product_flash_attention_
  for_cpu`) stands for the CUDA flash / efficient / cuDNN kernels, which are in the list too.
- offload (`--offload-activations`): `OffloadHooks`, torch.autograd.graph.save_on_cpu(
  pin_memory=True) as it runs on a GPU, around the step's forward and loss: every tensor autograd
  saves there is copied into a new pinned host tensor when saved (the device original is freed
  as soon as nothing else holds it) and copied back to a new device tensor when backward needs
  it (freed once that node has run). Like save_on_cpu, it copies *every* saved tensor, the
  weights' views that matmuls save included, and nothing that torch.utils.checkpoint keeps for
  its recompute (the checkpoint's own hooks are innermost). The host copies are the graph's
  HOST-tier storages (planner.opgraph.StorageInfo.tier): the device replay leaves them out and
  planner.evaluate adds their peak to host memory, each rounded up to a power of two as torch's
  CachingHostAllocator rounds pinned blocks (`host_bytes`). Assumed: the copies are
  synchronous (the compute stream waits, as save_on_cpu's copies on the current stream do), so
  no device tensor outlives its copy; pinned host blocks freed in backward are cached by the
  host allocator and reused, not returned (the peak is what it holds).

Known limitations: the selective policy decides per aten op name, so on a GPU a matmul torch
dispatches differently (e.g. `_addmm_activation`) would be recomputed, not saved.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.cache
def _matmul_ops() -> frozenset:
    import torch

    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
             "_scaled_dot_product_fused_attention_overrideable")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def save_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: save matmul and attention outputs, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _matmul_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    """The `context_fn` of torch.utils.checkpoint for op-level selective checkpointing."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(save_matmuls)


class OffloadHooks:
    """save_on_cpu(pin_memory=True)'s pack / unpack with the device copy made explicit.

    On a GPU, save_on_cpu's unpack (`tensor.to(device)`) always makes a new device tensor; the
    tracer's fake device is the CPU, where `.to("cpu")` would return the host tensor itself, so
    unpack copies (`copy=True`) as the GPU does. `on_host(t)` is told of each host copy (the
    tracer marks its storage as HOST tier). Pinned only where an accelerator exists, as
    save_on_cpu decides."""

    def __init__(self, *, on_host=None):
        import torch

        self.on_host = on_host
        self._pinnable = torch.cuda.is_available()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: "torch.Tensor"):
        import torch

        pin = self._pinnable and not tensor.is_sparse
        packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        packed.copy_(tensor, non_blocking=pin)
        if self.on_host is not None:
            self.on_host(packed)
        return tensor.device, packed

    def _unpack(self, packed):
        device, tensor = packed
        return tensor.to(device, non_blocking=self._pinnable, copy=True)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def host_series(graph):
    """(raw, rounded) bytes of the offloaded host copies alive after every op of `graph` (its
    HOST-tier storages; rounded: each as CachingHostAllocator rounds pinned blocks,
    c10::llvm::PowerOf2Ceil), int64 arrays of len(graph.ops); None when nothing is offloaded."""
    import numpy as np

    from planner.schema import Tier

    host = [s for s in graph.storages.values() if s.tier == Tier.HOST]
    if not host:
        return None
    n = max(len(graph.ops), 1)
    raw = np.zeros(n + 1, dtype=np.int64)
    rounded = np.zeros(n + 1, dtype=np.int64)
    for s in host:
        start = 0 if s.alloc_op is None else s.alloc_op
        end = n if s.free_op is None else s.free_op + 1
        r = 1 << (s.nbytes - 1).bit_length() if s.nbytes > 1 else s.nbytes
        raw[start] += s.nbytes
        raw[end] -= s.nbytes
        rounded[start] += r
        rounded[end] -= r
    return np.cumsum(raw)[:n], np.cumsum(rounded)[:n]


def host_bytes(graph) -> tuple[int, int]:
    """(bytes, power-of-two rounding) of the offloaded host copies alive together at their
    peak (`host_series`'s op with the most rounded bytes)."""
    return host_peak(host_series(graph))


def host_peak(series) -> tuple[int, int]:
    """`host_bytes` of a `host_series` result."""
    import numpy as np

    if series is None:
        return 0, 0
    raw, rounded = series
    t = int(np.argmax(rounded))
    return int(raw[t]), int(rounded[t] - raw[t])
