"""Weight streaming: decoder layers rest in host memory and visit the device one layer ahead.

A plan with `weights: "stream"` keeps every decoder layer's 16-bit weights in one flat host
buffer per layer (runtime.host_buffer: page-locked in place on CUDA, one per layer, not per
tensor, no power-of-two rounding), and gives
each layer one flat device storage that exists only while the layer computes:

    forward   before layer i: fetch i (if not already there), prefetch i + 1; after it: release i
    backward  when the gradient of layer i's output is complete (a hook on that tensor, i.e.
              just before layer i's backward and its recomputation under checkpointing):
              fetch i, release i + 1, prefetch i - 1 if backward will reach it
    after     `after_backward()` releases what is left (the optimizer then writes the host copy)

so at most two layers are on the device at once, the layer computing and the one arriving.
The policy is `planner.streaming`'s, which rewrites the traced step the same way: prediction
and run share one definition of when a layer's bytes exist.

Mechanics. A layer's parameters stay the same `nn.Parameter` objects (autograd, the optimizer
and the chunk table keep their identities); each parameter's data is a view into the layer's
device storage at the offset `planner.streaming.layer_packing` gives. Releasing resizes that
storage to zero bytes and fetching resizes it back and copies the host buffer in (one copy per
layer), as FSDP does with its flat parameters; views autograd saved for backward (a weight's
transpose) see the refetched bytes. The copy goes through a separate tensor on the storage,
so the parameters' version counters never move and autograd's saved-tensor checks hold. On
CUDA the prefetch copy runs on a side stream after an event recorded where the storage was
allocated, and the compute stream waits for the copy's event before the layer runs; on CPU
every copy is synchronous.

Between steps no layer is on the device. The optimizer reads and writes the host copy
(`host_weights()`, handed to runtime.chunk_optim.ChunkAdamW as its `weights`), and
`state_dict()` of the model returns the host copies (a state-dict hook per layer), so
checkpoints save and load the weights as they rest.

Known limitations: the CUDA path (pinned buffers, side stream, events) is written for CUDA and
tested only on CPU; the layer count ahead is one (the planner's `STREAM_AHEAD`); decoder layers
must return their hidden states as a tensor or as the first element of a tuple.
"""

from __future__ import annotations

import torch
from torch import nn

from planner.errors import ChunkftError
from planner.streaming import layer_packing
from runtime.host_buffer import HostBytes


class _Layer:
    """One decoder layer's host buffer, device storage and parameter views."""

    def __init__(self, prefix: str, layer: nn.Module, device: torch.device, pin: bool):
        named = [(n, p) for n, p in layer.named_parameters(remove_duplicate=True)]
        dtypes = {p.dtype for _, p in named}
        offsets, total = layer_packing([(tuple(p.shape), p.element_size()) for _, p in named])
        self.nbytes = total
        self._host = HostBytes(total, pin=pin)  # page-locked in place on CUDA (no rounding)
        self.host = self._host.buffer
        self.storage = torch.UntypedStorage(total, device=device)
        self.flat = torch.empty(0, dtype=torch.uint8, device=device).set_(self.storage, 0, (total,))
        self.host_views: dict[str, torch.Tensor] = {}
        if len(dtypes) > 1:
            raise ChunkftError(f"layer {prefix!r} mixes parameter dtypes {sorted(map(str, dtypes))}: "
                               "streaming packs one layer into one flat buffer of one dtype")
        with torch.no_grad():
            for (name, p), off in zip(named, offsets):
                elem = p.element_size()
                view = self.host[off:off + p.numel() * elem].view(p.dtype).view(p.shape)
                view.copy_(p.detach())
                self.host_views[f"{prefix}.{name}"] = view
                p.data = torch.empty(0, dtype=p.dtype, device=device).set_(self.storage, off // elem, p.shape)
        self.storage.resize_(0)  # the original storages went with the old .data: nothing resident
        self.resident = False
        self.ready: torch.cuda.Event | None = None


def stream_model(model: nn.Module, layer_prefix: str, device: torch.device | str) -> "LayerStreamer":
    """Put `model` (built anywhere, e.g. on the CPU) on `device` with its decoder layers
    streamed: everything but the layers' parameters moves to the device, the layers'
    parameters go to their host buffers."""
    device = torch.device(device)
    layers = model.get_submodule(layer_prefix)
    in_layers = {id(p) for p in layers.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in in_layers and p.device != device:
                p.data = p.data.to(device)
        for m in model.modules():
            for name, b in list(m.named_buffers(recurse=False)):
                if b.device != device:
                    setattr(m, name, b.to(device))  # Module.__setattr__ keeps it a buffer
    return LayerStreamer(model, layer_prefix, device)


class LayerStreamer:
    """Streams `model`'s decoder layers (`layer_prefix`, e.g. "model.layers") through `device`.

    The model's other modules (embeddings, final norm, head) must already be on `device`; the
    layers' parameters may be anywhere (they are copied into host buffers and released)."""

    def __init__(self, model: nn.Module, layer_prefix: str, device: torch.device | str):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        layers = list(model.get_submodule(layer_prefix))
        if len(layers) < 2:
            raise ChunkftError(f"streaming needs a decoder layer list under {layer_prefix!r}; found {len(layers)}")
        self._layers = [_Layer(f"{layer_prefix}.{i}", m, self.device, pin=cuda) for i, m in enumerate(layers)]
        self._side = torch.cuda.Stream(self.device) if cuda else None
        self._backward = False
        self._reaches: set[int] = set()  # layers whose output needs a gradient this step
        self.fetches = 0  # host -> device layer copies so far (what the step time model counts)
        self._handles = [model.register_forward_pre_hook(self._model_pre)]
        for i, m in enumerate(layers):
            self._handles += [m.register_forward_pre_hook(self._pre(i)), m.register_forward_hook(self._post(i)),
                              m.register_state_dict_post_hook(self._state_dict_hook(i))]

    # -- what the rest of the runtime sees ------------------------------------------------------

    def host_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its host copy (where the optimizer reads and writes the weights)."""
        return {n: v for layer in self._layers for n, v in layer.host_views.items()}

    def host_bytes(self) -> int:
        return sum(layer.host.numel() for layer in self._layers)

    def device_bytes(self) -> int:
        """Bytes of layer weights on the device right now."""
        return sum(layer.nbytes for layer in self._layers if layer.resident)

    def resident_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self._layers) if layer.resident]

    def after_backward(self) -> None:
        """Release every layer still on the device (before the optimizer writes the host copy)."""
        for i in range(len(self._layers)):
            self._release(i)

    def close(self) -> None:
        self.after_backward()
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks --------------------------------------------------------------------------------

    def _model_pre(self, module, args):
        self._backward = False
        self._reaches = set()
        self.after_backward()  # a forward without backward (eval) or an abandoned step

    def _pre(self, i: int):
        def hook(module, args):
            self._fetch(i, wait=True)
            if not self._backward and i + 1 < len(self._layers):
                self._fetch(i + 1, wait=False)
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            if self._backward:  # the recomputation of a checkpointed layer: its backward follows
                return
            self._release(i)
            out = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
                self._reaches.add(i)
                out.register_hook(self._pre_backward(i))
        return hook

    def _pre_backward(self, i: int):
        def hook(grad):
            self._backward = True
            self._fetch(i, wait=True)
            if i + 1 < len(self._layers):
                self._release(i + 1)
            if i - 1 in self._reaches:
                self._fetch(i - 1, wait=False)
        return hook

    def _state_dict_hook(self, i: int):
        views = self._layers[i].host_views

        def hook(module, state_dict, prefix, local_metadata):
            # state_dict's prefix is this layer's, e.g. "model.layers.3."; host views are keyed
            # by the same full names
            for key in list(state_dict):
                if key in views:
                    state_dict[key] = views[key]
        return hook

    # -- moving bytes -------------------------------------------------------------------------

    def _fetch(self, i: int, *, wait: bool) -> None:
        layer = self._layers[i]
        if not layer.resident:
            layer.storage.resize_(layer.nbytes)
            if self._side is None:
                layer.flat.copy_(layer.host)
            else:  # allocated on the compute stream; copied on the side stream once that is done
                allocated = torch.cuda.current_stream(self.device).record_event()
                with torch.cuda.stream(self._side):
                    self._side.wait_event(allocated)
                    layer.flat.copy_(layer.host, non_blocking=True)
                    layer.ready = self._side.record_event()
            layer.resident = True
            self.fetches += 1
        if wait and layer.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
            layer.ready = None

    def _release(self, i: int) -> None:
        layer = self._layers[i]
        if not layer.resident:
            return
        if layer.ready is not None:  # a prefetch nobody used: the free waits for its copy
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
            layer.ready = None
        layer.storage.resize_(0)
        layer.resident = False
