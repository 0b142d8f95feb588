"""One flat host buffer per chunk (or per streamed layer): tensors as views into one allocation.

Per-tensor pinned allocations go through CUDA's CachingHostAllocator, which rounds every block
up to a power of two (ATen/core/CachingHostAllocator.h: `c10::llvm::PowerOf2Ceil(size)`): about a
third more host RAM than the state itself, 133 GiB per GPU in the 70B plan. A `FlatBuffer`
instead packs a chunk's tensors (masters, moments, 8-bit codes and scales alike) at 64-byte
aligned offsets (planner.streaming.layer_packing, the same packing the weight streamer uses)
into one plain host allocation and, on a CUDA machine, page-locks it in place with
cudaHostRegister (torch.cuda.cudart()), which rounds nothing: the bytes held are the packed
bytes. planner.evaluate prices exactly that. runtime.stream keeps each streamed decoder layer
in one `HostBytes` the same way.

Known limitations: the CUDA registration is written for CUDA and tested only on CPU, where the
buffer is plain memory; a registration that fails falls back to `pin_memory()` (rounded).
"""

from __future__ import annotations

import torch

from planner.streaming import layer_packing


class HostBytes:
    """`nbytes` of host memory, page-locked in place on a CUDA machine (cudaHostRegister: no
    power-of-two rounding); plain memory otherwise."""

    def __init__(self, nbytes: int, *, pin: bool):
        self.nbytes = nbytes
        self._registered = False
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        if pin and nbytes:
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), nbytes, 0)
            if int(getattr(err, "value", err)) == 0:
                self._registered = True
            else:  # e.g. a kernel that refuses to lock this much: the caching allocator's rounded pinning
                self.buffer = self.buffer.pin_memory()

    def release(self) -> None:
        """Unregister the pages (CUDA) before the memory goes back to the allocator."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self._registered = False

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


class FlatBuffer:
    """Tensors of given shapes and dtypes as views into one host allocation (`HostBytes`)."""

    def __init__(self, like: dict[str, torch.Tensor], *, pin: bool):
        offsets, total = layer_packing([(tuple(t.shape), t.element_size()) for t in like.values()])
        self.nbytes = total
        self._bytes = HostBytes(total, pin=pin)
        buffer = self._bytes.buffer
        self.views = {n: buffer[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                      for (n, t), off in zip(like.items(), offsets)}

    def matches(self, state: dict[str, torch.Tensor]) -> bool:
        """Same names, shapes and dtypes: `state` can be copied in place."""
        return state.keys() == self.views.keys() and all(
            v.shape == state[n].shape and v.dtype == state[n].dtype for n, v in self.views.items())

    def copy_in(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for n, t in state.items():
            self.views[n].copy_(t)
        return self.views

    def release(self) -> None:
        self._bytes.release()
