"""Recipe axes that change what a traced step trains and when it steps: the trainable set
(--trainable / --freeze), LoRA adapters (--lora) and the optimizer fused into backward
(--optimizer-in-backward). The tracer (planner.trace.trace_module) runs them as `StepAxes` on
the fake model; the measured CPU step of tests/test_recipe_trace.py runs the same code on real
tensors.

- Trainable set: `trainable_grad_spec` turns the recipe's fnmatch patterns into the tracer's
  GradSpec (name -> True / False), so only trainable parameters get gradients, and
  planner.evaluate's active set (hence optimizer state, steps and chunks) covers only them.
- LoRA: runtime.lora's own `apply_lora` on the model the tracer runs (its adapters are created
  under the fake mode, so they are fake too): the base is frozen, each targeted nn.Linear gets
  its rank-r A and B through a forward hook, and only A and B get gradients and state.
- Optimizer in backward (torchtune's `optimizer_in_bwd`, LOMO): each trained tensor steps as
  soon as its gradient is complete and the gradient is dropped, so gradients never all coexist
  and the step's temporaries are one tensor's. The step is the recipe's: with `--optim chunkft`
  (and the other formats ChunkAdamW holds, runtime.lean_state) the one `chunkft run` executes,
  ChunkAdamW(step_in_backward=True)'s (`SpanStepInBackward`: runtime.subgrad's on_complete
  hands over a whole tensor from its post-accumulate-grad hook, a ChunkFT slice once its owners'
  backward used the weight; then the gradient's finiteness flag, its fp32 copy,
  runtime.chunk_optim.adamw_update over the format's state, the copy back into the 16-bit
  weight); with `--optim adamw_torch_forloop` (or pure precision with chunkft) one
  `torch.optim.AdamW(foreach=False, fused=False)` per tensor in its post-accumulate-grad hook
  (`OptimizerInBackward`), stepping an fp32 master copy (mixed precision) or the weight itself
  (pure). The optimizer state (master, moments,
  step counters) exists before the step and is left out of the trace: planner.evaluate prices
  it (`gpu_static_allocs`) like every other optimizer's state, and adds no after-backward
  optimizer temporaries for this recipe (the traced hooks hold them).

Known limitations: torch's per-tensor optimizer in backward needs whole-tensor gradients
(ChunkFT's sliced spans step only with ChunkAdamW's formats, planner.recipe); LoRA adapts
nn.Linear targets only, in the weights' dtype (no dropout), as runtime.lora does.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterable

from planner.errors import ChunkftError

if TYPE_CHECKING:
    import torch

    from planner.recipe import Recipe
    from planner.trace import TraceOptions


def trainable_grad_spec(recipe: "Recipe", names: Iterable[str]) -> dict[str, bool] | None:
    """GradSpec of the recipe's trainable set over parameter `names`: None when every parameter
    trains (no --trainable / --freeze, no LoRA); refused when nothing would train."""
    if recipe.lora_rank:
        return {}  # LoRA: the whole base is frozen
    if not (recipe.trainable or recipe.freeze):
        return None
    names = list(names)
    spec = {n: recipe.is_trainable(n) for n in names}
    if not recipe.lora_rank and not any(spec.values()):
        raise ChunkftError(f"--trainable {list(recipe.trainable)} / --freeze {list(recipe.freeze)} leave no parameter "
                           f"to train; names look like {', '.join(names[:3])}")
    return spec


def trace_options(recipe: "Recipe", *, grad: dict | None, checkpointing: bool, loss_chunk_tokens: int,
                  replicate: bool = True) -> "TraceOptions":
    """The TraceOptions of a step of `recipe` (planner.evaluate's traced steps)."""
    from planner.recipe import Precision
    from planner.trace import TraceOptions

    return TraceOptions(grad=grad, checkpointing=checkpointing, loss_chunk_tokens=loss_chunk_tokens,
                        replicate=replicate, loop=recipe.loop.value, checkpoint_every=recipe.checkpoint_every,
                        selective_checkpointing=recipe.selective_checkpointing,
                        offload_activations=recipe.offload_activations, lora_rank=recipe.lora_rank,
                        lora_targets=recipe.lora_targets if recipe.lora_rank else (),
                        optimizer_in_backward=recipe.optimizer_in_backward,
                        master_weights=recipe.precision == Precision.MIXED, optim=recipe.optim)


def trained_shapes(recipe: "Recipe", named_shapes: tuple) -> tuple:
    """The (name, shape, elem_bytes) the optimizer steps: the trainable base parameters, or with
    LoRA each adapted linear's A (rank x in) and B (out x rank), as runtime.lora creates them."""
    if recipe.lora_rank:
        r = recipe.lora_rank
        out = []
        for name, shape, elem in named_shapes:
            parts = name.rsplit(".", 2)
            if len(shape) == 2 and len(parts) == 3 and parts[1] in recipe.lora_targets and parts[2] == "weight":
                base = name[:-len(".weight")]
                out += [(f"{base}.lora_A", (r, shape[1]), elem), (f"{base}.lora_B", (shape[0], r), elem)]
        if not out:
            raise ChunkftError(f"--lora-targets {','.join(recipe.lora_targets)} name no linear weight of the model; "
                               f"names look like {', '.join(n for n, _, _ in named_shapes[:3])}")
        return tuple(out)
    spec = trainable_grad_spec(recipe, (n for n, _, _ in named_shapes))
    return tuple(named_shapes) if spec is None else tuple(x for x in named_shapes if spec[x[0]])


def steps_spans_in_backward(options: "TraceOptions") -> bool:
    """Whether the traced optimizer-in-backward step is ChunkAdamW's (`SpanStepInBackward`): a
    format ChunkAdamW holds (`--optim` chunkft, adamw_bf16, adamw_torch_8bit; chunkft mixed
    only) on the base weights (LoRA adapters step through `OptimizerInBackward`)."""
    from planner.recipe import chunk_adamw_in_backward

    return (options.optimizer_in_backward and not options.lora_rank
            and chunk_adamw_in_backward(options.optim, options.master_weights))


class OptimizerInBackward:
    """One torch.optim.AdamW(foreach=False) per trained tensor, stepped in its
    post-accumulate-grad hook (see the module doc)."""

    def __init__(self, params: list["torch.Tensor"], *, master_weights: bool,
                 around_step: Callable[["torch.Tensor"], Any] | None = None):
        import torch

        self._handles = []
        self._state: list["torch.Tensor"] = []
        for p in params:
            master = p
            if master_weights:
                master = torch.nn.Parameter(p.detach().to(torch.float32, copy=True))
                self._state.append(master)
            opt = torch.optim.AdamW([master], foreach=False, fused=False)
            # the state a running job already holds (AdamW's _init_group creates it lazily)
            opt.state[master] = {"step": torch.tensor(0.0),
                                 "exp_avg": torch.zeros_like(master, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(master, memory_format=torch.preserve_format)}
            self._state += list(opt.state[master].values())
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(opt, master, around_step)))

    @staticmethod
    def _hook(opt, master, around_step):
        import torch

        def step(p: "torch.Tensor") -> None:
            with around_step(p.grad) if around_step is not None else contextlib.nullcontext():
                master.grad = p.grad if master is p else p.grad.to(master.dtype)
                opt.step()
                master.grad = None
                if master is not p:
                    with torch.no_grad():
                        p.copy_(master)
                p.grad = None

        return step

    def state_tensors(self) -> tuple["torch.Tensor", ...]:
        """Masters, moments and step counters: the state that lives across steps."""
        return tuple(self._state)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class SpanStepInBackward:
    """ChunkAdamW(step_in_backward=True)'s step, as `chunkft run` executes it: runtime.subgrad's
    `install(on_complete=...)` hands over each span's complete gradient (a whole tensor from its
    post-accumulate-grad hook, a ChunkFT slice once every owning module's backward has used the
    weight) and this steps it at once, as ChunkAdamW._step_in_backward does: the gradient's
    finiteness flag (runtime.guard), its fp32 copy and the span's step with the copy back into
    the 16-bit weights (runtime.chunk_optim's `master_grad` and `step_view`, the functions
    ChunkAdamW calls), over the span's state in the recipe's format (runtime.lean_state). The
    state of every trained span exists before the step."""

    def __init__(self, module: "torch.nn.Module", grad: dict[str, Any] | None, *, optim: str,
                 master_weights: bool, around_step: Callable[["torch.Tensor"], Any] | None = None):
        from runtime.chunk_optim import AdamWConfig
        from runtime.lean_state import StateFormat
        from runtime.subgrad import SliceSpec, install

        spec = grad if grad is not None else {n: True for n, _ in module.named_parameters()}
        self.handle = install(module, spec, on_complete=self._step)
        self._format = StateFormat.from_recipe(optim, "mixed" if master_weights else "pure")
        self._config = AdamWConfig()
        self._around = around_step
        params = dict(module.named_parameters())
        self._views: dict[str, "torch.Tensor"] = {}
        self._state: dict[str, "torch.Tensor"] = {}
        for name, value in self.handle.spec.items():
            if value is True or isinstance(value, SliceSpec):
                p = params[name].detach()
                view = p if value is True else p.narrow(value.dim, value.start, value.end - value.start)
                self._views[name] = view
                self._state.update(self._format.fresh(name, view, view.device))

    def _step(self, name: str, grad: "torch.Tensor") -> None:
        import torch

        from runtime.chunk_optim import master_grad, step_view
        from runtime.guard import nonfinite_flag

        view = self._views[name]
        with self._around(grad) if self._around is not None else contextlib.nullcontext():
            nonfinite_flag((grad,), grad.device)
            grad32 = master_grad(grad, grad.device)
            with torch.no_grad():
                step_view(self._state, name, grad32, view, master=self._format.master, device=view.device,
                          config=self._config, lr=1e-5, step=1)

    def state_tensors(self) -> tuple["torch.Tensor", ...]:
        return tuple(self._state.values())


def lora_config(options: "TraceOptions"):
    from runtime.lora import LoraConfig

    return LoraConfig(rank=options.lora_rank, targets=options.lora_targets)


class StepAxes:
    """The trained-set axes applied to a (fake) model about to be traced."""

    def __init__(self, module: "torch.nn.Module", options: "TraceOptions", grad: dict[str, Any] | None):
        self.module = module
        self.options = options
        self.adapters = None
        self.oib: OptimizerInBackward | None = None
        if options.lora_rank:
            from runtime.lora import apply_lora

            self.adapters = apply_lora(module, lora_config(options))
        self.span_step: SpanStepInBackward | None = None
        if steps_spans_in_backward(options):  # installs the GradSpec itself (the trace's handle)
            self.span_step = SpanStepInBackward(module, grad, optim=options.optim, master_weights=options.master_weights,
                                                around_step=self._optimizer_step)
        elif options.optimizer_in_backward:
            if any(not isinstance(v, bool) for v in (grad or {}).values()):
                raise ChunkftError(f"--optimizer-in-backward with --optim {options.optim} steps whole tensors in "
                                   "torch.optim.AdamW hooks; a ChunkFT chunk's sliced spans (C > 1) step only "
                                   "with ChunkAdamW's formats (--optim chunkft, adamw_bf16, adamw_torch_8bit)")
            self._trained = [p for p in module.parameters() if p.requires_grad] + self._adapter_params()
        self._recorder = None

    def _adapter_params(self) -> list:
        return [] if self.adapters is None else list(self.adapters.parameters())

    def named_weights(self) -> dict[str, "torch.Tensor"]:
        """The adapters' A and B, named after the linear they adapt (so each has its decoder layer)."""
        if self.adapters is None:
            return {}
        out = {}
        for kind, d in (("lora_A", self.adapters.a), ("lora_B", self.adapters.b)):
            for key, p in d.items():
                out[f"{key.replace('__', '.')}.{kind}"] = p
        return out

    def external_tensors(self) -> tuple:
        if self.span_step is not None:
            return self.span_step.state_tensors()
        if self.options.optimizer_in_backward and self.oib is None:
            self.oib = OptimizerInBackward(self._trained, master_weights=self.options.master_weights,
                                           around_step=self._optimizer_step)
        return () if self.oib is None else self.oib.state_tensors()

    @contextlib.contextmanager
    def running(self, recorder):
        """Inside the recording: each optimizer-in-backward step is recorded as an OPTIMIZER
        phase of the layer it runs in, its gradient as a gradient."""
        self._recorder = recorder
        try:
            yield
        finally:
            self._recorder = None

    @contextlib.contextmanager
    def _optimizer_step(self, grad):
        from planner.schema import Phase

        recorder = self._recorder
        if recorder is None:
            yield
            return
        recorder.mark_gradients([grad])
        phase, recorder.phase = recorder.phase, Phase.OPTIMIZER
        try:
            yield
        finally:
            recorder.phase = phase

    def final_grads(self) -> list:
        return [p.grad for p in self._adapter_params() if p.grad is not None]

    def remove(self) -> None:
        if self.oib is not None:
            self.oib.remove()
        if self.adapters is not None:
            self.adapters.remove()
