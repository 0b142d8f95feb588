"""Sub-tensor weight gradients: train only the active chunk's slices, never a dense gradient.

`install(model, grad_spec)` applies one `planner.chunks.GradSpec` to a model:

- a whole tensor (True) gets `requires_grad=True` and native autograd (`p.grad`);
- a tensor outside the chunk (False) gets `requires_grad=False`: autograd then neither saves
  the inputs its weight gradient would need nor computes one;
- a slice (SliceSpec) keeps `requires_grad=False` too, so no dense gradient can exist. A
  forward hook on each module that owns the parameter wraps the module's output in
  `_SliceGrad`, an autograd.Function whose backward passes grad_output through unchanged and
  adds just the slice's gradient to a side table keyed by parameter name:
    nn.Linear weight, dim 0 (output rows s:e):  grad_out[..., s:e]^T @ x
    nn.Linear weight, dim 1 (input columns):    grad_out^T @ x[..., s:e]
    nn.Linear bias:                             grad_out[..., s:e] summed over tokens
    nn.Embedding weight, dim 0 (rows s:e):      index_add of grad_out rows whose id is in
                                                [s, e) (padding_idx excluded); dim 1 likewise
    any other parameter of at most 1-D (RMSNorm weights, Llama's `w * x` or Gemma's
    `x * (1 + w)`): the module is recomputed in backward with torch.func.functional_call and
    differentiated w.r.t. that parameter with torch.autograd.grad, then sliced. The temporary
    dense gradient is 1-D (hidden_size elements), so it is negligible.
  A tied weight (lm_head sharing embed_tokens) has two owners; both contribute to its slice.

`recomputes_in_backward(model, name)` says whether a slice of `name` would use the generic
rule (runtime.sharded_optim gives such a parameter its whole gradient under FSDP2, which may
swap the module's parameter for its shard between forward and the recompute).

Nothing is replaced or patched: the model's classes and code run unchanged, and nothing is
stored on nn.Parameter. Works on FakeTensor models (the planner's tracer installs the same
hooks). Hooks do nothing while grad mode is off (eval, the first pass of reentrant
checkpointing); with non-reentrant checkpointing the recompute re-saves the same tensors.

Known limitations:
- Sliced 2-D parameters must belong to nn.Linear or nn.Embedding (or subclasses); anything
  else >1-D raises ChunkftError at install time. A subclass that overrides forward (Gemma's
  scaled embedding) is handled by a TorchFunctionMode active only during that module's
  forward, which wraps the F.embedding / F.linear call using the parameter: it must call
  F.linear / F.embedding with the parameter itself.
- Embedding with max_norm, sparse or scale_grad_by_freq is not supported when sliced.
- Only uses inside the forward of a module that registers the parameter are seen: a parent
  that calls `F.linear(h, self.embed.weight)` itself would lose that contribution (HF causal
  LMs tie through an lm_head nn.Linear, which is seen).
- A generic (1-D) module must return one tensor; its tensor keyword arguments are held by the
  autograd node without saved-tensor hooks.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from planner.chunks import GradSpec, SliceSpec
from planner.errors import ChunkftError

GradCallback = Callable[[str, torch.Tensor], None]
"""Called with (parameter name, gradient contribution) as soon as each one is produced."""

_state = threading.local()  # .recomputing: our hooks are silent while a generic rule recomputes


@contextlib.contextmanager
def _recomputing():
    previous = getattr(_state, "recomputing", False)
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


@dataclass(slots=True)
class _Rule:
    """How one owner module yields the gradient of one parameter slice."""

    name: str  # parameter name (the side-table key)
    kind: str  # "linear_weight" | "linear_bias" | "embedding" | "generic"
    spec: SliceSpec
    module: nn.Module
    attr: str  # the parameter's attribute name on `module`
    handle: "SubgradHandle"

    def saved(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The forward tensors backward needs (saved through ctx.save_for_backward)."""
        if self.kind == "linear_bias":
            return ()
        first = args[0] if args else kwargs.get("input")
        if self.kind in ("linear_weight", "embedding"):
            return (first,)
        return tuple(a for a in args if isinstance(a, torch.Tensor))

    def gradient(self, grad_out: torch.Tensor, saved: tuple, args: tuple, kwargs: dict) -> torch.Tensor:
        s, e, dim = self.spec.start, self.spec.end, self.spec.dim
        param = getattr(self.module, self.attr)
        if self.kind == "linear_weight":
            (x,) = saved
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
            grad = g2[:, s:e].t() @ x2 if dim == 0 else g2.t() @ x2[:, s:e]
        elif self.kind == "linear_bias":
            grad = grad_out.reshape(-1, grad_out.shape[-1])[:, s:e].sum(0)
        elif self.kind == "embedding":
            (ids,) = saved
            ids = ids.reshape(-1)
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            pad = self.module.padding_idx
            # Rows outside the slice (and the padding row) go to a dummy last row, so no shape
            # depends on the data (FakeTensor-friendly) and no masked copy of grad_out is made.
            if dim == 0:
                keep = (ids >= s) & (ids < e)
                if pad is not None:
                    keep &= ids != pad
                index = torch.where(keep, ids - s, e - s)
                buf = g2.new_zeros(e - s + 1, g2.shape[1]).index_add_(0, index, g2)
                grad = buf[: e - s]
            else:
                rows = param.shape[0]
                index = ids if pad is None else torch.where(ids == pad, rows, ids)
                buf = g2.new_zeros(rows + 1, e - s).index_add_(0, index, g2[:, s:e])
                grad = buf[:rows]
        else:
            with torch.enable_grad(), _recomputing():
                inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
                # A fresh leaf and torch.autograd.grad, not torch.func.vjp: torch.func refuses
                # to run under saved_tensors_hooks, which the planner's tracer keeps active.
                weight = param.detach().requires_grad_(True)
                out = torch.func.functional_call(self.module, {self.attr: weight}, tuple(inputs), kwargs)
                (dense,) = torch.autograd.grad(out, weight, grad_out)
            grad = dense.narrow(dim, s, e - s) if dense.dim() else dense
        return grad.to(param.dtype)


class _SliceGrad(torch.autograd.Function):
    """Identity on a module's output whose backward also accumulates one slice's gradient.

    Inputs: the rule, a 0-element `anchor` that requires grad (so the output joins the graph
    even when nothing upstream requires grad, e.g. embedding lookups of integer ids), the
    module output, the rule's positional args and kwargs, then the tensors to save.
    """

    @staticmethod
    def forward(ctx, rule, anchor, output, args, kwargs, *saved):
        ctx.rule = rule
        ctx.args = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
        ctx.kwargs = kwargs
        ctx.save_for_backward(*saved)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out):
        rule: _Rule = ctx.rule
        saved = ctx.saved_tensors
        args = ctx.args
        if rule.kind == "generic":  # put the saved tensors back in their argument slots
            it = iter(saved)
            args = tuple(next(it) if a is None else a for a in args)
        grad = rule.gradient(grad_out, saved, args, ctx.kwargs)
        rule.handle._accumulate(rule.name, grad)
        return (None, None, grad_out, None, None) + (None,) * len(saved)


class SubgradHandle:
    """What `install` applied; undo it with `remove()`.

    `grads()` maps each trained parameter name to its gradient: `p.grad` for whole tensors
    (shape of the parameter), the accumulated slice gradient for SliceSpec entries (shape of
    `p.narrow(dim, start, end - start)`). Both accumulate over backward passes until
    `zero_grad()`, which is how gradient accumulation over micro-batches works.
    """

    def __init__(self, model: nn.Module, spec: GradSpec, on_grad: GradCallback | None,
                 on_complete: GradCallback | None = None):
        self.spec: GradSpec = dict(spec)
        self._params = dict(model.named_parameters())
        self._on_grad = on_grad
        self._on_complete = on_complete
        self._uses: dict[str, int] = {}  # slice -> contributions one backward brings (its owners)
        self._arrived: dict[str, int] = {}
        # on_complete for slices waits until the owning module's backward has used the weight
        # (for its input's gradient): one gate per forward use whose input needs a gradient,
        # opened by a hook on that input; `_ready` holds complete slices behind closed gates
        self._gates: dict[str, int] = {}
        self._ready: dict[str, torch.Tensor] = {}
        self.in_backward = False  # set by the optimizer around loss.backward(): recomputation
        self._slice_grads: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._saved_requires_grad = {n: p.requires_grad for n, p in self._params.items()}

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        if self._on_grad is not None:
            self._on_grad(name, grad)
        current = self._slice_grads.get(name)
        if current is None:
            self._slice_grads[name] = grad
        else:
            current.add_(grad)
        if self._on_complete is not None:
            arrived = self._arrived.get(name, 0) + 1
            if arrived > self._uses[name]:
                raise ChunkftError(f"{name!r} received more gradient contributions than it has owning modules "
                                   f"({self._uses[name]}): a module ran twice in one forward, which the optimizer "
                                   "step in backward cannot follow")
            self._arrived[name] = arrived
            if arrived == self._uses[name]:  # complete for this backward: consume once the weight is free
                self._arrived[name] = 0
                self._ready[name] = self._slice_grads.pop(name)
                self._release(name)

    def _gate(self, name: str, args: tuple, kwargs: dict) -> None:
        """Forward of a module using slice `name` (not a recomputation): the step must wait for
        this use's backward, which needs the weight for its input's gradient."""
        if self._on_complete is None or self.in_backward:
            return
        x = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad), None)
        if x is None:  # no input gradient: the backward of this use never reads the weight
            return
        self._gates[name] = self._gates.get(name, 0) + 1

        def opened(grad, name=name):
            self._gates[name] -= 1
            self._release(name)

        x.register_hook(opened)

    def _release(self, name: str) -> None:
        if name in self._ready and not self._gates.get(name):
            self._on_complete(name, self._ready.pop(name))

    def _complete_whole(self, name: str, p: torch.Tensor) -> None:
        """post-accumulate-grad hook of a whole trained tensor: consume p.grad, then free it."""
        grad, p.grad = p.grad, None
        self._on_complete(name, grad)

    def grads(self) -> dict[str, torch.Tensor]:
        """{name: gradient} of every trained parameter that has received one."""
        out: dict[str, torch.Tensor] = {}
        for name, value in self.spec.items():
            if value is True and self._params[name].grad is not None:
                out[name] = self._params[name].grad
            elif isinstance(value, SliceSpec) and name in self._slice_grads:
                out[name] = self._slice_grads[name]
        return out

    def zero_grad(self) -> None:
        """Drop every gradient (whole: p.grad = None; slices: side table emptied)."""
        for name, value in self.spec.items():
            if value is True:
                self._params[name].grad = None
        self._slice_grads.clear()
        self._arrived.clear()
        self._gates.clear()
        self._ready.clear()

    def remove(self) -> None:
        """Remove hooks, drop gradients and restore each parameter's original requires_grad."""
        self.zero_grad()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, p in self._params.items():
            p.requires_grad_(self._saved_requires_grad[name])


def _canonical_names(model: nn.Module, grad: GradSpec) -> GradSpec:
    """Map a tied parameter's other names ("lm_head.weight") to the one named_parameters()
    lists; ChunkftError for unknown names or two different specs for one tensor."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = first.setdefault(id(p), name)
    unknown = sorted(set(grad) - set(alias))
    if unknown:
        raise ChunkftError(
            f"grad spec names parameters the model does not have: {unknown[:5]}; "
            f"valid names look like {list(first.values())[:3]}"
        )
    out: GradSpec = {}
    for name, value in grad.items():
        canonical = alias[name]
        if canonical in out and out[canonical] != value:
            raise ChunkftError(
                f"grad spec gives tied parameter {canonical!r} two different values: {out[canonical]} and {value}"
            )
        out[canonical] = value
    return out


def _owners(model: nn.Module, target: nn.Parameter) -> list[tuple[str, nn.Module, str]]:
    """Every (module path, module, attribute) through which `target` is used: two for a tied weight."""
    found = []
    for mod_name, mod in model.named_modules():
        for attr, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if p is target:
                found.append((mod_name, mod, attr))
    return found


def _rule_kind(mod_name: str, mod: nn.Module, attr: str, param: torch.Tensor, name: str) -> tuple[str, bool]:
    """(rule kind, intercept): intercept=True for Linear / Embedding subclasses that override
    forward -- their output is not the bare matmul / lookup, so the slice Function wraps the
    F.linear / F.embedding call inside their forward instead of the module's output."""
    where = f"{name!r} (in {mod_name or 'the model'}: {type(mod).__name__})"
    if isinstance(mod, nn.Linear) and attr in ("weight", "bias"):
        return ("linear_weight" if attr == "weight" else "linear_bias"), type(mod).forward is not nn.Linear.forward
    if isinstance(mod, nn.Embedding) and attr == "weight":
        if mod.max_norm is not None or mod.sparse or mod.scale_grad_by_freq:
            raise ChunkftError(f"cannot slice {where}: max_norm, sparse and scale_grad_by_freq are not supported")
        return "embedding", type(mod).forward is not nn.Embedding.forward
    if param.dim() <= 1:
        return "generic", False
    raise ChunkftError(
        f"cannot slice {where}: sub-tensor gradients exist for nn.Linear and nn.Embedding weights "
        f"and 1-D parameters; give this parameter whole to one chunk"
    )


def recomputes_in_backward(model: nn.Module, name: str) -> bool:
    """True if a SliceSpec for parameter `name` would use the generic rule: an owner module that
    is neither nn.Linear nor nn.Embedding (a 1-D norm weight) is recomputed in backward with
    functional_call on the parameter it holds then. A caller whose parameters are swapped
    between hooks (FSDP2 reshards a unit after its forward or its backward) gives such a
    parameter its whole gradient instead (runtime.sharded_optim does)."""
    p = model.get_parameter(name)
    return any(_rule_kind(mod_name, mod, attr, p, name)[0] == "generic" for mod_name, mod, attr in _owners(model, p))


def install(model: nn.Module, grad: GradSpec, *, on_grad: GradCallback | None = None,
            on_complete: GradCallback | None = None) -> SubgradHandle:
    """Apply `grad` to `model` (see the module docstring) and return the handle.

    Parameters missing from `grad` are treated as False (no gradient); a tied parameter may
    be named by any of its names (handle.grads() uses the first). `on_grad(name, g)` is
    called with every gradient contribution as it is produced -- slice gradients from the
    autograd Function, whole tensors through a tensor hook -- which is where the fp16 loss
    scaler checks for overflow on the fly. Install one GradSpec at a time: remove() the old
    handle before installing the next chunk's.

    `on_complete(name, g)` (the optimizer step in backward, runtime.chunk_optim) is called once
    per backward with a parameter's complete gradient, which the handle then drops: a whole
    tensor from its post-accumulate-grad hook (p.grad is None afterwards), a slice once all its
    owning modules have contributed (each owner runs once per forward in a causal LM; a tied
    weight has two). grads() then holds nothing for it.
    """
    params = dict(model.named_parameters())
    grad = _canonical_names(model, grad)
    handle = SubgradHandle(model, {n: grad.get(n, False) for n in params}, on_grad, on_complete)
    rules: dict[nn.Module, list[_Rule]] = {}
    intercepted: dict[nn.Module, list[_Rule]] = {}
    try:
        for name, p in params.items():
            value = handle.spec[name]
            if isinstance(value, SliceSpec):
                size = p.shape[value.dim] if p.dim() else 1
                if not (0 <= value.dim < max(p.dim(), 1) and 0 <= value.start < value.end <= size):
                    raise ChunkftError(f"slice {value} is out of bounds for {name!r} of shape {list(p.shape)}")
                owners = _owners(model, p)
                assert owners, name
                handle._uses[name] = len(owners)
                for mod_name, mod, attr in owners:
                    kind, intercept = _rule_kind(mod_name, mod, attr, p, name)
                    (intercepted if intercept else rules).setdefault(mod, []).append(
                        _Rule(name=name, kind=kind, spec=value, module=mod, attr=attr, handle=handle)
                    )
                p.requires_grad_(False)
            elif value is True:
                p.requires_grad_(True)
                if on_grad is not None:
                    handle._hooks.append(p.register_hook(lambda g, name=name: on_grad(name, g)))
                if on_complete is not None:
                    handle._hooks.append(p.register_post_accumulate_grad_hook(
                        lambda t, name=name: handle._complete_whole(name, t)))
            else:
                p.requires_grad_(False)
        for mod, mod_rules in rules.items():
            handle._hooks.append(mod.register_forward_hook(_make_hook(mod_rules), with_kwargs=True))
        for mod, mod_rules in intercepted.items():
            enter, leave = _intercept_hooks(_Intercept(mod_rules))
            handle._hooks.append(mod.register_forward_pre_hook(enter))
            handle._hooks.append(mod.register_forward_hook(leave, always_call=True))
    except BaseException:
        handle.remove()
        raise
    return handle


def _make_hook(rules: list[_Rule]):
    def hook(module, args, kwargs, output):
        if not torch.is_grad_enabled() or getattr(_state, "recomputing", False):
            return None
        if not isinstance(output, torch.Tensor):
            raise ChunkftError(
                f"cannot slice parameters of {type(module).__name__}: its forward returns "
                f"{type(output).__name__}, not one tensor"
            )
        for rule in rules:
            rule.handle._gate(rule.name, args, kwargs)
            anchor = output.new_empty(0).requires_grad_(True)
            output = _SliceGrad.apply(rule, anchor, output, args, kwargs, *rule.saved(args, kwargs))
        return output

    return hook


class _Intercept(TorchFunctionMode):
    """Active only while one Linear / Embedding subclass runs its forward (pre-hook to
    forward hook): wraps the F.linear / F.embedding call that uses the sliced parameter in
    `_SliceGrad`, so e.g. Gemma's `embedding(ids) * scale` gets the right rows' gradient."""

    def __init__(self, rules: list[_Rule]):
        super().__init__()
        self.rules = rules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in (F.linear, F.embedding) or not torch.is_grad_enabled():
            return out
        if getattr(_state, "recomputing", False):
            return out
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        first = args[0] if args else kwargs.get("input")
        for rule in self.rules:
            used = getattr(rule.module, rule.attr)
            if used is weight or (func is F.linear and used is bias):
                rule.handle._gate(rule.name, (first,), {})
                anchor = out.new_empty(0).requires_grad_(True)
                out = _SliceGrad.apply(rule, anchor, out, (first,), {}, *rule.saved((first,), {}))
        return out


def _intercept_hooks(mode: _Intercept):
    def enter(module, args):
        mode.__enter__()

    def leave(module, args, output):  # always_call: runs even if forward raised
        mode.__exit__(None, None, None)

    return enter, leave
