"""Trace one real training step of a causal LM under FakeTensorMode into an OpGraph.

The model is built on the meta device (no storage), materialised as fake *cpu* tensors, and
one step (`planner.step.step_loss` plus `backward()`) of the real transformers code runs under
a recording TorchDispatchMode. Fake tensors carry shapes, dtypes and storages but no data, and
Python frees them exactly when it would free real ones, so the recording is the real order of
allocations and frees. For every aten op we keep its name, module, phase, decoder layer,
input/output storages, allocated bytes and flops; for every storage its bytes, the op that
allocated it, the op after which it died (weak-reference callbacks on the untyped storage, as
torch.distributed._tools.mem_tracker does), whether autograd saved it
(`torch.autograd.graph.saved_tensors_hooks`) and its memory Component.

Why fake cpu and not meta or fake cuda: on meta, SDPA falls back to a math path that keeps
full attention-score tensors that no GPU run keeps; fake cuda tensors abort in backward on a
CPU-only torch build. CUDA's differences (caching allocator, cuBLAS workspace) are modelled in
planner.memory.

Where the real step's path depends on tensor *data*, the trace must take the real branch:
transformers builds no causal mask for an unpadded batch, but cannot tell on fake tensors
(see match_real_attention_branch).

The recipe's axes that change the step (TraceOptions: every-K and selective checkpointing,
the trainable set as a GradSpec, LoRA adapters, the optimizer stepped in backward) run their
real implementations on the fake model (planner.activations, planner.train_axes); optimizer
state that outlives the step is left out of the graph (planner.evaluate prices it).

Known limitations: scratch buffers a kernel allocates and frees inside one op are invisible
(to the per-op CPU measurement as well); what is not a tensor storage (autograd nodes, malloc
headers: 150-300 KiB on the tiny test models, about 1%) is not counted; on CUDA, SDPA's flash /
memory-efficient kernels save a logsumexp like the CPU flash kernel traced here, but their
exact scratch differs; the step is traced in train() mode, so dropout masks count.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from planner.errors import ChunkftError
from planner.schema import Component, Phase, Tier

if TYPE_CHECKING:
    import torch

    from planner.model import ModelSpec
    from planner.opgraph import OpGraph

DTYPES = ("bf16", "fp16", "fp32")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StepShape:
    """The shape of one training step's batch."""

    batch: int = 1
    seq_len: int = 1024
    dtype: str = "bf16"
    """Training dtype of weights and activations: "bf16" | "fp16" | "fp32"."""

    def __post_init__(self):
        if not isinstance(self.batch, int) or self.batch <= 0:
            raise ChunkftError(f"invalid batch size {self.batch!r}: must be a positive integer")
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ChunkftError(f"invalid sequence length {self.seq_len!r}: must be a positive integer")
        if self.dtype not in DTYPES:
            raise ChunkftError(f"invalid dtype {self.dtype!r}: valid dtypes are {', '.join(DTYPES)}")

    def torch_dtype(self) -> "torch.dtype":
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceOptions:
    """What the traced step does besides forward and backward."""

    grad: dict[str, Any] | None = None
    """GradSpec: parameter name -> True (full grad) / False (none) / SliceSpec (sub-tensor grad).
    None = every parameter gets a full gradient; names missing from a dict get none."""
    checkpointing: bool = False
    """Per-decoder-layer activation checkpointing (HF gradient checkpointing, non-reentrant)."""
    loss_chunk_tokens: int = 0
    """0 = HF's own loss; > 0 = lm_head + cross-entropy over chunks of this many tokens."""
    replicate: bool = True
    """Trace template layers and replicate them to full depth (else trace every layer)."""
    loop: str = "chunkft"
    """The recipe's loop (planner.recipe.Loop value): "chunkft" or "hf" (planner.step.loop_forward)."""
    checkpoint_every: int = 1
    """With checkpointing: only decoder layers whose index % checkpoint_every == 0 (planner.activations)."""
    selective_checkpointing: bool = False
    """With checkpointing: op-level selective checkpointing in every layer (planner.activations)."""
    offload_activations: bool = False
    """Saved activations go to host memory as torch.autograd.graph.save_on_cpu does (planner.activations)."""
    lora_rank: int = 0
    """> 0: runtime.lora adapters of this rank on `lora_targets` of a frozen base (planner.train_axes)."""
    lora_targets: tuple[str, ...] = ()
    optimizer_in_backward: bool = False
    """Each trained tensor's AdamW step runs in its post-accumulate-grad hook (planner.train_axes)."""
    master_weights: bool = True
    """With optimizer_in_backward: the step updates an fp32 master (mixed precision) rather than the
    weight itself (pure precision)."""
    optim: str = "chunkft"
    """With optimizer_in_backward: the recipe's --optim, which decides the step run in backward
    (planner.train_axes: ChunkAdamW's `SpanStepInBackward` or torch's `OptimizerInBackward`)."""

    def __post_init__(self):
        if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0:
            raise ChunkftError(f"invalid loss_chunk_tokens {self.loss_chunk_tokens!r}: "
                               "must be 0 (no chunking) or a positive token count")
        from planner.recipe import Recipe

        Recipe(loop=self.loop, checkpoint_every=self.checkpoint_every,
               selective_checkpointing=self.selective_checkpointing, lora_rank=self.lora_rank,
               lora_targets=self.lora_targets or ("q_proj",)).check_strategy(loss_chunk_tokens=self.loss_chunk_tokens)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank:
            if not self.lora_targets:
                raise ChunkftError("lora_rank > 0 needs lora_targets (module names to adapt)")
            if self.grad is None:
                object.__setattr__(self, "grad", {})  # LoRA freezes the base: only adapters train
            elif any(v is not False for v in self.grad.values()):
                raise ChunkftError("LoRA trains adapters on a frozen base: the grad spec must train no base parameter")

    def key(self) -> tuple:
        """Hashable identity (GradSpec dicts are not hashable): exactly what changes the step."""
        grad = None if self.grad is None else tuple(sorted((k, grad_key(v)) for k, v in self.grad.items()))
        return (grad, self.replicate) + self.axes_key()

    def axes_key(self) -> tuple:
        """key() without the GradSpec and replication: the step's axes (replicate's template key)."""
        ckpt = self.checkpointing
        return (ckpt, self.loss_chunk_tokens, self.loop, self.checkpoint_every if ckpt else 1,
                self.selective_checkpointing and ckpt, self.offload_activations,
                (self.lora_rank, self.lora_targets) if self.lora_rank else None,
                (self.optimizer_in_backward, self.master_weights, self.optim) if self.optimizer_in_backward else None)

    def checkpoints_layer(self, index: int) -> bool:
        """Whether decoder layer `index` (of the full model) runs under activation checkpointing."""
        return self.checkpointing and index % self.checkpoint_every == 0


def grad_key(v: Any) -> Any:
    """Hashable form of one GradSpec value (True / False / SliceSpec)."""
    if isinstance(v, bool):
        return v
    return ("slice", v.dim, v.start, v.end)


def trace_step(model: "ModelSpec", shape: StepShape, options: TraceOptions = TraceOptions()) -> "OpGraph":
    """The op graph of one training step of `model` at `shape` under `options`.

    With `options.replicate` (the default) a few template decoder layers are traced and
    replicated to full depth (planner.replicate); without it every layer is traced.
    """
    if options.replicate:
        from planner.replicate import replicated_trace

        return replicated_trace(model, shape, options)
    return trace_full(model, shape, options)


def trace_full(model: "ModelSpec", shape: StepShape, options: TraceOptions) -> "OpGraph":
    """Trace every layer of `model` (what trace_step does with replicate=False)."""
    module = model.build(dtype=shape.torch_dtype(), device="meta")
    return trace_module(module, shape, options, layer_prefix=find_layer_prefix(module), grad=options.grad)


def trace_module(module: "torch.nn.Module", shape: StepShape, options: TraceOptions, *,
                 layer_prefix: str | None, grad: dict[str, Any] | None,
                 layer_index: tuple[int, ...] | None = None) -> "OpGraph":
    """Trace one step of an already built (meta) module. Consumes the module.

    `layer_index`: the full-depth index each decoder layer stands for (a template's layers,
    planner.replicate); per-layer recipe choices such as every-K checkpointing follow it."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from planner.activations import OffloadHooks
    from planner.step import enable_checkpointing, loop_forward
    from planner.train_axes import StepAxes, steps_spans_in_backward

    # The meta parameters are the one non-fake input: empty_like turns them into fake cpu tensors.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        _to_fake_cpu(module)
        fake_mode.allow_non_fake_inputs = False
        assert all(isinstance(p, FakeTensor) for p in module.parameters()), "parameters must be fake"
        # the optimizer step in backward over ChunkAdamW's spans installs the GradSpec with its
        # on_complete after checkpointing is enabled, as ChunkAdamW(step_in_backward=True) does
        spans_in_backward = steps_spans_in_backward(options)
        if spans_in_backward:
            _check_grad_spec(module, grad)
        else:
            handle = _apply_grad_spec(module, grad)
        match_real_attention_branch(module, shape)
        if options.checkpointing:
            n = len(module.get_submodule(layer_prefix)) if layer_prefix else 0
            index = layer_index if layer_index is not None else tuple(range(n))
            per_layer = n and options.checkpoint_every != 1
            enable_checkpointing(module, layers=[options.checkpoints_layer(i) for i in index] if per_layer else None,
                                 selective=options.selective_checkpointing)
        axes = StepAxes(module, options, grad)  # LoRA adapters, optimizer in backward
        if spans_in_backward:
            handle = axes.span_step.handle
        module.train()
        vocab = _vocab_size(module)
        input_ids = torch.randint(0, vocab, (shape.batch, shape.seq_len))
        labels = torch.randint(0, vocab, (shape.batch, shape.seq_len))

        recorder = StepRecorder(module, layer_prefix=layer_prefix, extra_weights=axes.named_weights(),
                                external=axes.external_tensors())
        with _quiet_transformers(), recorder.recording(inputs=(input_ids, labels)), axes.running(recorder):
            with OffloadHooks(on_host=recorder.mark_host) if options.offload_activations else contextlib.nullcontext():
                loss, held = loop_forward(module, input_ids, labels, loop=options.loop,
                                          loss_chunk_tokens=options.loss_chunk_tokens)
            recorder.start_backward(loss)
            if loss.requires_grad:
                if spans_in_backward:  # forwards from here on are recomputations (ChunkAdamW.backward)
                    handle.in_backward = True
                loss.backward()
            del loss, held
            grads = _final_grads(module, handle) + axes.final_grads()
            recorder.mark_gradients(grads)
            del grads
        axes.remove()
        if handle is not None:
            handle.remove()
    return recorder.to_opgraph()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings about the user's step (e.g. "use_cache=True is incompatible with
    gradient checkpointing", which the HF loop under checkpointing triggers by design) are the
    tracer's business, not the planning user's: errors only while tracing, then as before."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _to_fake_cpu(module: "torch.nn.Module") -> None:
    """module.to_empty(device="cpu") under the fake mode, keeping tied parameters tied.

    to_empty gives every module its own new Parameter, so a tied lm_head / embedding would
    become two weights with two gradients; the owners of each meta Parameter share its
    replacement again (plain module attribute assignment).
    """
    owners: dict[int, list[tuple["torch.nn.Module", str]]] = {}
    for _, mod in module.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, attr))
    module.to_empty(device="cpu")
    for group in owners.values():
        shared = getattr(*group[0])
        for mod, attr in group[1:]:
            if getattr(mod, attr) is not shared:
                setattr(mod, attr, shared)


TRACE_SDPA = "chunkft_trace_sdpa"
"""HF's own SDPA attention function, registered under a name that has no mask function."""


def match_real_attention_branch(module: "torch.nn.Module", shape: StepShape) -> None:
    """Make HF take, on fake tensors, the attention branch it takes on the real batch.

    For a batch without padding, transformers' create_causal_mask checks the position ids for
    packed sequences and, finding none, returns no mask: SDPA runs with is_causal=True. That
    check reads tensor data, so on fake tensors (`is_tracing`) it assumes packing and builds a
    batch x seq x seq mask, which changes SDPA's kernel and memory. An attention implementation
    registered without a mask function (transformers' public AttentionInterface) gets no mask:
    exactly the real branch, computed by the same `sdpa_attention_forward`. Only where the
    real branch has no mask either: causal SDPA models whose sliding window, if any, covers the
    sequence.
    """
    config = getattr(module, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(
            module, "set_attn_implementation"):
        return
    if not getattr(config, "is_causal", True):
        return
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and shape.seq_len > window:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(TRACE_SDPA, sdpa_attention_forward)
    module.set_attn_implementation(TRACE_SDPA)


def find_layer_prefix(module: "torch.nn.Module") -> str | None:
    """Path of the ModuleList of identical blocks holding the most parameters (the decoder layers)."""
    import torch

    best, best_numel = None, 0
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 0 and len({type(m) for m in child}) == 1:
            numel = sum(p.numel() for p in child.parameters())
            if numel > best_numel:
                best, best_numel = name, numel
    return best


def _vocab_size(module: "torch.nn.Module") -> int:
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if vocab is None:
        raise ChunkftError(f"cannot tell the vocabulary size of {type(module).__name__}: "
                           "it has no input embedding and no config.vocab_size")
    return int(vocab)


def _apply_grad_spec(module: "torch.nn.Module", grad: dict[str, Any] | None):
    """Apply the GradSpec (runtime.subgrad.install); None = every parameter trains."""
    if grad is None:
        for p in module.parameters():
            p.requires_grad_(True)
        return None
    _check_grad_spec(module, grad)
    # The runtime's own installer: whole tensors by requires_grad, slices by hooks and an
    # autograd.Function, so the trace runs exactly what a ChunkFT step runs.
    from runtime.subgrad import install

    return install(module, grad)


def _check_grad_spec(module: "torch.nn.Module", grad: dict[str, Any] | None) -> None:
    """Refuse a GradSpec naming parameters `module` does not have (one line)."""
    names = dict(module.named_parameters(remove_duplicate=False))
    unknown = sorted(set(grad or ()) - set(names))
    if unknown:
        valid = ", ".join(list(names)[:5])
        raise ChunkftError(f"grad spec names unknown parameters {unknown[:5]}: valid names look like {valid}, ...")


def _final_grads(module: "torch.nn.Module", handle) -> list["torch.Tensor"]:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if handle is not None and hasattr(handle, "grads"):
        grads.extend(handle.grads().values())
    return grads


# ---------------------------------------------------------------------------- recording

class StepRecorder:
    """Records ops, storages, phases and layers of one step; `to_opgraph()` gives the result.

    Phase and layer come from hooks, not from patching: global module forward hooks keep the
    module path; each decoder layer's forward hooks set the layer; tensor hooks on each
    layer's output and input mark where that layer's backward starts and ends; hooks on the
    output embedding bracket the LOSS phase (lm_head, loss, and their backward). An op that
    runs inside backward with grad mode on is a RECOMPUTE (checkpointing re-runs the forward
    under enable_grad; autograd runs backward functions with grad mode off).
    """

    def __init__(self, module: "torch.nn.Module", *, layer_prefix: str | None,
                 extra_weights: dict[str, "torch.Tensor"] | None = None, external: tuple = ()):
        self.module = module
        self.extra_weights = extra_weights or {}
        """Trained tensors outside the module (LoRA adapters), named as if inside it."""
        self.external = external
        """Tensors the trace leaves out (optimizer state another part of the cost model prices)."""
        self.layer_prefix = layer_prefix
        self.layers = list(module.get_submodule(layer_prefix)) if layer_prefix else []
        self.head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        self.head_name = _module_name(module, self.head)
        weight = getattr(self.head, "weight", None)
        self.head_weight_shape = None if weight is None else weight.shape
        # (name, module, phase, recompute, layer, inputs, outputs, allocs, out_bytes, flops)
        self.rows: list[tuple] = []
        self.nbytes: list[int] = []
        self.alloc_op: list[int | None] = []
        self.free_op: list[int | None] = []
        self.saved: list[bool] = []
        self.kind: list[str | None] = []  # "weight" | "input" | "grad" | None
        self._live: dict[int, int] = {}  # storage _cdata -> storage id, while alive
        self._refs: dict[int, Any] = {}
        self._closed = False
        self.phase = Phase.FORWARD
        self.layer: int | None = None
        self.in_backward = False
        self.first_backward_op: int | None = None
        self._module_stack: list[str] = []
        self._module_names = {id(m): n for n, m in module.named_modules()}
        self.weight_layer: dict[int, int | None] = {}  # storage id -> decoder layer of a parameter/buffer
        self._head_hooked = False

    def _layer_of_name(self, name: str) -> int | None:
        """Decoder layer of a parameter name ("model.layers.3.mlp.up_proj.weight" -> 3)."""
        if not self.layer_prefix or not name.startswith(self.layer_prefix + "."):
            return None
        return int(name[len(self.layer_prefix) + 1:].split(".", 1)[0])

    # -- storages

    def storage_id(self, t: "torch.Tensor", alloc_op: int | None) -> tuple[int, bool]:
        """(id, is_new) of `t`'s storage, registering it with `alloc_op` if unseen."""
        st = t.untyped_storage()
        key = st._cdata
        sid = self._live.get(key)
        if sid is not None:
            return sid, False
        import functools
        import weakref

        sid = len(self.nbytes)
        self.nbytes.append(st.nbytes())
        self.alloc_op.append(alloc_op)
        self.free_op.append(None)
        self.saved.append(False)
        self.kind.append(None)
        self._live[key] = sid
        self._refs[sid] = weakref.ref(st, functools.partial(self._on_free, sid, key))
        return sid, True

    def _on_free(self, sid: int, key: int, _ref) -> None:
        if self._closed:
            return
        self.free_op[sid] = len(self.rows) - 1
        if self._live.get(key) == sid:
            del self._live[key]

    def _pack(self, t: "torch.Tensor") -> "torch.Tensor":
        sid, _ = self.storage_id(t, None)
        self.saved[sid] = True
        return t

    @staticmethod
    def _unpack(t: "torch.Tensor") -> "torch.Tensor":
        return t

    def mark_host(self, t: "torch.Tensor") -> None:
        """`t`'s storage lives in host memory (an offloaded activation), not on the device."""
        self.kind[self.storage_id(t, None)[0]] = "host"

    def mark_gradients(self, grads: list["torch.Tensor"]) -> None:
        for g in grads:
            sid, _ = self.storage_id(g, None)
            self.kind[sid] = "grad"

    # -- one op

    def record(self, func, args, kwargs, out) -> None:
        import torch
        from torch.utils.flop_counter import flop_registry

        index = len(self.rows)
        inputs = []
        for t in flat_tensors(args, kwargs):
            sid, _ = self.storage_id(t, None)
            inputs.append(sid)
        outputs, allocs, out_bytes = [], [], 0
        for t in flat_tensors(out):
            sid, new = self.storage_id(t, index)
            outputs.append(sid)
            if new:
                allocs.append(sid)
                out_bytes += self.nbytes[sid]
                if self.in_backward and self.phase == Phase.LOSS and t.shape == self.head_weight_shape:
                    self.kind[sid] = "grad"  # a chunk's output-embedding gradient (chunked loss)
        flop_fn = flop_registry.get(func._overloadpacket)
        flops = int(flop_fn(*args, **kwargs, out_val=out)) if flop_fn is not None else _cpu_sdpa_flops(func, args)
        # Autograd runs backward functions with grad mode off (no create_graph); checkpointing
        # re-runs the forward under enable_grad. So a grad-mode op inside backward is a recompute.
        recompute = self.in_backward and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1
        self.rows.append((str(func), self._module_path(), self.phase, recompute, self.layer, tuple(inputs),
                          tuple(outputs), tuple(allocs), out_bytes, flops))

    def _module_path(self) -> str:
        if self._module_stack:
            return self._module_stack[-1]
        if self.layer is not None:
            return f"{self.layer_prefix}.{self.layer}"
        if self.phase.value == "loss":
            return self.head_name
        return ""

    # -- hooks

    def start_backward(self, loss: "torch.Tensor") -> None:
        self.in_backward = True
        self.first_backward_op = len(self.rows)
        self.layer = None
        self.phase = Phase.LOSS if self._head_hooked else Phase.BACKWARD

    def _install_hooks(self) -> list:
        import functools

        import torch
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        handles = [register_module_forward_pre_hook(self._push_module),
                   register_module_forward_hook(self._pop_module, always_call=True)]
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(functools.partial(self._layer_enter, i), with_kwargs=True))
            handles.append(layer.register_forward_hook(functools.partial(self._layer_exit, i), always_call=True))
        if isinstance(self.head, torch.nn.Module):
            handles.append(self.head.register_forward_pre_hook(self._head_enter))
        return handles

    def _push_module(self, module, args) -> None:
        # A module outside the model's tree (transformers >= 5 may wrap a function such as
        # apply_rotary_pos_emb in a throwaway nn.Module named `Func`) runs on behalf of the
        # module that called it: its ops belong to the caller.
        name = self._module_names.get(id(module))
        if name is None:
            name = self._module_stack[-1] if self._module_stack else type(module).__name__
        self._module_stack.append(name)

    def _pop_module(self, module, args, output) -> None:
        if self._module_stack:
            self._module_stack.pop()

    def _layer_enter(self, i: int, module, args, kwargs) -> None:
        if self.in_backward:
            return  # a recompute that runs the layer's hooks again: phase comes from grad mode
        self.layer = i
        hidden = _first_tensor(args, kwargs)
        if hidden is not None and hidden.requires_grad:
            import functools

            hidden.register_hook(functools.partial(self._backward_layer_end, i))

    def _layer_exit(self, i: int, module, args, output) -> None:
        if self.in_backward:
            return
        self.layer = None
        hidden = _first_tensor(output, None)
        if hidden is not None and hidden.requires_grad:
            import functools

            hidden.register_hook(functools.partial(self._backward_layer_start, i))

    def _backward_layer_start(self, i: int, grad) -> None:
        self.phase, self.layer = Phase.BACKWARD, i

    def _backward_layer_end(self, i: int, grad) -> None:
        if self.layer == i:
            self.layer = None

    def _head_enter(self, module, args) -> None:
        if self.in_backward or self._head_hooked:
            return
        self._head_hooked = True
        self.phase, self.layer = Phase.LOSS, None
        hidden = _first_tensor(args, None)
        if hidden is not None and hidden.requires_grad:
            hidden.register_hook(self._loss_backward_end)

    def _loss_backward_end(self, grad) -> None:
        if self.phase == Phase.LOSS:
            self.phase = Phase.BACKWARD

    # -- the recording context

    def recording(self, *, inputs: tuple = ()):
        import contextlib

        import torch

        @contextlib.contextmanager
        def ctx():
            layer_of = self._layer_of_name
            for name, p in self.module.named_parameters():
                sid = self.storage_id(p, None)[0]
                self.kind[sid], self.weight_layer[sid] = "weight", layer_of(name)
            for name, b in list(self.module.named_buffers()) + list(self.extra_weights.items()):
                sid = self.storage_id(b, None)[0]
                self.kind[sid], self.weight_layer[sid] = "weight", layer_of(name)
            for t in self.external:
                self.kind[self.storage_id(t, None)[0]] = "external"
            for t in inputs:
                self.kind[self.storage_id(t, None)[0]] = "input"
            handles = self._install_hooks()
            try:
                with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack), _DispatchRecorder(self):
                    yield self
            finally:
                self._closed = True
                for h in handles:
                    h.remove()

        return ctx()

    # -- result

    def to_opgraph(self) -> "OpGraph":
        from planner.opgraph import OpGraph, OpNode, StorageInfo

        n = len(self.rows)
        phases = [Phase.RECOMPUTE if r[3] else r[2] for r in self.rows]
        in_loss = [r[2] == Phase.LOSS for r in self.rows]
        first_bw = self.first_backward_op if self.first_backward_op is not None else n
        # next_plain[k]: first op at or after k that is not a recompute op
        next_plain = [n] * (n + 1)
        for k in range(n - 1, -1, -1):
            next_plain[k] = k if phases[k] != Phase.RECOMPUTE else next_plain[k + 1]
        storages = {}
        for sid in range(len(self.nbytes)):
            a, f, kind = self.alloc_op[sid], self.free_op[sid], self.kind[sid]
            if kind == "external":
                continue
            last = n if f is None else f
            if kind == "weight":
                comp = Component.WEIGHTS
            elif kind == "host":
                comp = Component.ACTIVATIONS
            elif kind == "grad":
                comp = Component.GRADIENTS
            elif kind == "input" or a is None:
                comp = Component.TEMPORARIES
            elif in_loss[a]:
                comp = Component.LOGITS  # lm_head output, the loss's fp32 copies, their gradients
            elif self.saved[sid]:
                comp = Component.ACTIVATIONS
            elif phases[a] == Phase.FORWARD and last >= first_bw:
                comp = Component.ACTIVATIONS  # e.g. a checkpointed layer's input, kept for recompute
            elif phases[a] == Phase.RECOMPUTE and last >= next_plain[a]:
                comp = Component.ACTIVATIONS  # recomputed and kept for this layer's backward
            else:
                comp = Component.TEMPORARIES
            storages[sid] = StorageInfo(id=sid, nbytes=self.nbytes[sid], component=comp, alloc_op=a, free_op=f,
                                        tier=Tier.HOST if kind == "host" else Tier.GPU,
                                        saved=self.saved[sid],
                                        layer=self.weight_layer.get(sid) if a is None else self.rows[a][4])
        def kept(sids: tuple[int, ...]) -> tuple[int, ...]:
            return sids if len(storages) == len(self.nbytes) else tuple(s for s in sids if s in storages)

        ops = [OpNode(index=i, name=r[0], module=r[1], phase=phases[i], layer=r[4], inputs=kept(r[5]),
                      outputs=kept(r[6]), allocs=kept(r[7]), out_bytes=r[8], flops=r[9]) for i, r in enumerate(self.rows)]
        return OpGraph(ops, storages, num_layers=len(self.layers) or None)


def _make_dispatch_recorder():
    from torch.utils._python_dispatch import TorchDispatchMode

    class DispatchRecorder(TorchDispatchMode):
        """Runs each aten op (under the fake mode below it) and hands it to the StepRecorder."""

        def __init__(self, recorder: StepRecorder):
            super().__init__()
            self.recorder = recorder

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            # prim ops (prim.device, prim.layout, ...) answer metadata queries; they allocate nothing.
            if func.namespace != "prim":
                self.recorder.record(func, args, kwargs, out)
            return out

    return DispatchRecorder


def _DispatchRecorder(recorder: StepRecorder):
    global _DISPATCH_RECORDER_CLASS
    if _DISPATCH_RECORDER_CLASS is None:
        _DISPATCH_RECORDER_CLASS = _make_dispatch_recorder()
    return _DISPATCH_RECORDER_CLASS(recorder)


_DISPATCH_RECORDER_CLASS = None


def _cpu_sdpa_flops(func, args) -> int:
    """Flops of the CPU flash-attention kernels, which torch.utils.flop_counter has no formula
    for; its formulas for the CUDA flash kernels (same math, full non-causal count) apply."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    name = func._overloadpacket.__name__
    if name == "_scaled_dot_product_flash_attention_for_cpu":
        q, k, v = args[:3]
        return int(sdpa_flop_count(q.shape, k.shape, v.shape))
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward":
        grad_out, q, k, v = args[:4]
        return int(sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape))
    return 0


def flat_tensors(args, kwargs=None) -> list:
    """The tensors inside an op's arguments (or its output), through lists, tuples and dicts."""
    import torch

    found = []
    stack = [args] if kwargs is None else [args, kwargs]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return found


def _first_tensor(args, kwargs) -> "torch.Tensor | None":
    import torch

    if isinstance(args, torch.Tensor):
        return args
    for x in (args if isinstance(args, (list, tuple)) else ()):
        if isinstance(x, torch.Tensor):
            return x
    if kwargs:
        x = kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            return x
    return None


def _module_name(root, module) -> str:
    if module is None:
        return ""
    for name, m in root.named_modules():
        if m is module:
            return name
    return ""
