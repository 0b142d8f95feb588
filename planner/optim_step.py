"""The recipe's optimizer step (`--optim`, `--precision`), traced with the real implementation.

For each distinct parameter shape of the step's active set (planner.evaluate: every parameter
for C = 1, the active chunk's spans otherwise) the real optimizer steps one fake parameter of that
shape twice under FakeTensorMode, on fake *cuda* tensors (an optimizer step needs no autograd,
so a CPU-only torch runs it; the optimizer then takes its CUDA branches, e.g. torch keeps the
`step` counters of a non-fused AdamW on the CPU). The first step creates the state lazily; a
recording TorchDispatchMode follows the second step op by op: every storage an op creates, and
(by a weak reference on the storage) when it dies. What stays after the step is state, what came
and went are the step's temporaries, and their highest point is the step's peak. Data-dependent
scalars (`.item()`: Adafactor's parameter norm) answer 1.0: no allocation depends on them.

The per-shape traces combine exactly: a for-loop implementation steps one tensor at a time
(peak = every tensor's state + the worst tensor's temporaries; torch's own for-loops keep the
previous tensor's last temporaries alive into the next, so they also trace each consecutive pair
of shapes, `CARRY_OVER`); a foreach or fused one runs the same op sequence over the whole list
(peak = the op whose count-weighted sum over shapes is highest). So Llama 3-8B's 291 tensors
cost 7 tiny traces (plus ~10 pairs), cached per (optim, precision, dtype, shape). ChunkFT's flat
spans come in as many sizes as there are spans: a 1-D for-loop step allocates a*n + b bytes per
tensor, so two traces of the same code path give every size (`_scaled_trace`, checked to agree
entry by entry, else traced directly).

What runs for each `--optim` (planner.recipe.OPTIMS):
  adamw_torch            torch.optim.AdamW() as it runs on CUDA: the foreach path (torch picks
                         foreach for plain CUDA tensors; fake tensors are not plain, so foreach=True
                         is passed explicitly)
  adamw_torch_foreach    torch.optim.AdamW(foreach=True)
  adamw_torch_forloop    torch.optim.AdamW(foreach=False)
  adamw_torch_fused      torch.optim.AdamW(fused=True): `_fused_adamw_` runs on fake tensors (its
                         meta kernel): state on the GPU (step counters too), no temporaries
  adamw_bf16             ChunkAdamW's own span step with bf16 moments (runtime.chunk_optim.
                         adamw_update over runtime.lean_state's format: fp32 AdamW math on
                         upcast copies, moments rounded back to bf16), also for C = 1
  adamw_torch_8bit       torchao.optim.AdamW8bit: state traced (uint8 codes, one fp32 scale per
                         block of 256, a 256-entry qmap per tensor; tensors under 4096 elements or
                         not a multiple of 256 keep plain moments). Its step is torch.compile'd,
                         which cannot run under a dispatch mode; the compiled kernel (inductor,
                         torch 2.13, torchao 0.18) allocates, per quantized tensor, two fp32
                         buffers of the tensor's size and two of its block count, and nothing
                         for a plain one (`TORCHAO_COMPILED_TEMPS`). With ChunkFT (C > 1) ChunkAdamW
                         holds the 8-bit state instead: runtime.lean_state's format and span step
                         (`CHUNK_8BIT`; no per-tensor qmaps, eager dequantize/requantize)
  adamw_bnb_8bit         bitsandbytes AdamW8bit, from its source (bitsandbytes/optim/optimizer.py,
  paged_adamw_8bit       Optimizer2State.init_state, get_state_buffer): uint8 state1/state2 and
  paged_adamw_32bit      fp32 absmax1/absmax2 per block of 256 (fp32 state below 4096 elements),
                         two shared 256-entry fp32 qmaps; 32-bit: fp32 state1/state2. Paged:
                         state1/state2 of tensors of >= 1e5 elements live in CUDA unified memory
                         (counted on the host, outside PyTorch's allocator). A fused in-place
                         CUDA kernel: no temporaries. bitsandbytes does not run on CPU, so this
                         is not traced
  adafactor              torch.optim.Adafactor() (its default is the for-loop, also on CUDA)
  sgd                    torch.optim.SGD(momentum=0.9) as it runs on CUDA: foreach

Precision: pure steps the training-dtype weights themselves (state in that dtype). Mixed keeps
an fp32 master per parameter: a parameter-owning optimizer (torch, torchao, bitsandbytes) steps
the masters, whose `.grad` is an fp32 copy of each 16-bit gradient made before `step()` and
dropped after it, and the weights are copied back from the masters (Apex O2 / DeepSpeed's bf16
optimizer); ChunkAdamW's formats (adamw_bf16, 8-bit with C > 1) update the master span by span
from the 16-bit gradient, as `chunkft run` does.
`chunkft` (ChunkAdamW, mixed) keeps planner.evaluate's own constants path.

Known limitations: a parameter's shape is what a factored optimizer (Adafactor) sees; ChunkFT
spans are flat, and only adamw_bf16 and adamw_torch_8bit (whose state ChunkAdamW could hold) are
priced for C > 1. ChunkAdamW's formats are traced on fake cpu tensors standing for the GPU's
(`_HELD`), and the mixed-precision copy back into the 16-bit weights (an in-place copy_) is left
out of the cuda traces: neither can be faked on cuda by a CPU-only torch. torchao's compiled
buffers were read from inductor's CPU code and measured on CPU (bench/recipe_optim.py); Triton's
kernel on CUDA is assumed to keep the same buffers (not measured on a GPU here). The mixed
precision of a parameter-owning optimizer is one wrapper's (fp32 gradient copies of every
tensor at once); AMP-style fp32 weights are not a precision value here. With mixed-dtype
parameter lists a foreach step groups by dtype; every layout here has one dtype. 2-byte training
is traced as bf16 (fp16 allocates the same bytes). planner.steptime's optimizer and switch terms
still count fp32 state bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections import Counter
from typing import Any, Callable

from planner.errors import ChunkftError
from planner.schema import Component
from planner.trace import flat_tensors

# --optim -> (implementation kind, how its per-shape traces combine)
LOOP, MULTI = "loop", "multi"
IMPLEMENTATIONS = {
    "adamw_torch": MULTI, "adamw_torch_foreach": MULTI, "adamw_torch_forloop": LOOP,
    "adamw_torch_fused": MULTI, "adamw_bf16": LOOP, "adamw_torch_8bit": LOOP, "adamw_bnb_8bit": LOOP,
    "paged_adamw_8bit": LOOP, "paged_adamw_32bit": LOOP, "adafactor": LOOP, "sgd": MULTI,
}
CHUNK_8BIT = "adamw_torch_8bit@chunk"
"""adamw_torch_8bit as ChunkAdamW holds it (ChunkFT spans): runtime.lean_state's 8-bit format."""
_PRIVATE = {CHUNK_8BIT: LOOP}
_HELD = ("adamw_bf16", CHUNK_8BIT)
"""ChunkAdamW's own span step (runtime.chunk_optim.adamw_update over runtime.lean_state's
formats): traced on fake cpu tensors, standing for the GPU's. Its casts (copy_ between dtypes)
and 8-bit lookups (an index) cannot be faked on cuda by a CPU-only torch, and nothing in it
depends on the device (no host-side counters: the step count is a Python int)."""
CARRY_OVER = ("adamw_torch_forloop", "adafactor")
"""torch's for-loop steps keep one tensor's last temporaries (a loop variable such as `denom` or
`update`) alive until the next tensor reassigns them: their peak is taken over the step of each
consecutive pair of shapes, traced together."""
SGD_MOMENTUM = 0.9
BNB_BLOCK = 256  # bitsandbytes/optim/optimizer.py: blocks = n // 256 (+1)
BNB_MIN_8BIT_SIZE = 4096  # min_8bit_size default: smaller tensors keep fp32 state
BNB_PAGED_MIN_NUMEL = 100_000  # get_state_buffer: paged only for p.numel() >= 1e5
BNB_QMAP_ENTRIES = 256
TORCHAO_BLOCK = 256
TORCHAO_MIN_NUMEL = 4096
# inductor's kernel for torchao's single_param_adam on a quantized tensor of n elements (the
# generated `call()`): buffers (n / 256,) fp32 x 2 (block maxima) and (n / 256, 256) fp32 x 2.
TORCHAO_COMPILED_TEMPS = ((4, 1), (4, 1), (4, TORCHAO_BLOCK), (4, TORCHAO_BLOCK))  # (bytes, per elements)

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass(frozen=True, slots=True)
class StepCost:
    """The optimizer's memory for one step over a list of parameter shapes.

    Entries are (component, bytes, count): `count` tensors of `bytes` each."""

    gpu_state: tuple[tuple[Component, int, int], ...]
    """State in PyTorch's CUDA allocator (master copies: MASTER; moments, scales, counters:
    OPTIMIZER), resident between steps."""
    host_state: tuple[tuple[Component, int, int], ...]
    """State the implementation keeps off the GPU: torch's CPU step counters, bitsandbytes' paged
    state (CUDA unified memory, outside PyTorch's allocator)."""
    temps: tuple[tuple[Component, int, int], ...]
    """GPU allocations live at the step's peak besides the state (fp32 master gradients under
    mixed precision: GRADIENTS; the step's own: TEMPORARIES)."""
    paged: bool = False

    @property
    def gpu_state_bytes(self) -> int:
        return sum(b * n for _, b, n in self.gpu_state)

    @property
    def host_state_bytes(self) -> int:
        return sum(b * n for _, b, n in self.host_state)

    @property
    def temp_bytes(self) -> int:
        return sum(b * n for _, b, n in self.temps)


def step_cost(optim: str, precision: str, dtype: str, shapes: tuple[tuple[int, ...], ...], *,
              chunk_spans: bool = False, device: str = "cuda") -> StepCost:
    """The optimizer state and step peak of `optim` over parameters of these shapes (cached).

    `chunk_spans`: ChunkFT's spans, stepped by ChunkAdamW one at a time from the 16-bit gradient
    (planner.recipe.CHUNK_HELD_OPTIMS): no fp32 master gradients made before the step.
    `device`: "cuda" (what a GPU runs; the default) or "cpu" (the tests' measured CPU step, where
    torch's step counters are state like any other)."""
    if optim not in IMPLEMENTATIONS:
        raise ChunkftError(f"--optim {optim} is not traced by planner.optim_step; traced: {', '.join(IMPLEMENTATIONS)}")
    if chunk_spans and optim == "adamw_torch_8bit":
        optim = CHUNK_8BIT
    if precision not in ("mixed", "pure"):
        raise ChunkftError(f"invalid precision {precision!r}: valid values are mixed, pure")
    if dtype not in _DTYPES:
        raise ChunkftError(f"invalid dtype {dtype!r}: valid dtypes are {', '.join(_DTYPES)}")
    if device not in ("cuda", "cpu"):
        raise ChunkftError(f"invalid device {device!r}: valid devices are cuda, cpu")
    shapes = tuple(tuple(s) for s in shapes)
    pairs = tuple(sorted(set(zip(shapes, shapes[1:])))) if optim in CARRY_OVER else ()
    return _combined(optim, precision, dtype, tuple(sorted(Counter(shapes).items())), chunk_spans, device, pairs)


@functools.lru_cache(maxsize=256)
def _combined(optim: str, precision: str, dtype: str, counted: tuple, chunk_spans: bool = False,
              device: str = "cuda", pairs: tuple = ()) -> StepCost:
    traces = [(_scaled_trace(optim, precision, dtype, shape) if device == "cuda" else
               _shape_trace(optim, precision, dtype, shape, device), n) for shape, n in counted]
    gpu_state: Counter = Counter()
    host_state: Counter = Counter()
    for tr, n in traces:
        for comp, nbytes, on_gpu in tr.state:
            (gpu_state if on_gpu else host_state)[(comp, nbytes)] += n
    for _, comp, nbytes in {s for tr, _ in traces for s in tr.shared}:  # once per optimizer (bnb's qmaps)
        gpu_state[(comp, nbytes)] += 1
    temps: Counter = Counter()
    if traces and _kind(optim) == LOOP:
        for tr, n in traces:  # every tensor's master gradient lives through the whole step
            for comp, nbytes in () if chunk_spans else tr.pre:
                temps[(comp, nbytes)] += n
        candidates = [tr for tr, _ in traces] + [_trace(optim, precision, dtype, pair, device) for pair in pairs]
        worst = max(candidates, key=lambda tr: tr.extra_peak_bytes)
        for comp, nbytes in worst.extra_at_peak:
            temps[(comp, nbytes)] += 1
    elif traces:
        lengths = {len(tr.timeline) for tr, _ in traces}
        if len(lengths) != 1:
            raise ChunkftError(f"--optim {optim}: the foreach step's op sequence depends on the shape; "
                               "cannot combine per-shape traces")
        totals = [sum(n * sum(b for _, b in tr.timeline[t]) for tr, n in traces) for t in range(lengths.pop())]
        if totals:
            t = max(range(len(totals)), key=totals.__getitem__)
            for tr, n in traces:
                for comp, nbytes in tr.timeline[t]:
                    temps[(comp, nbytes)] += n
    flat = lambda c: tuple(sorted((comp, b, n) for (comp, b), n in c.items() if b and n))  # noqa: E731
    return StepCost(gpu_state=flat(gpu_state), host_state=flat(host_state), temps=flat(temps),
                    paged=optim.startswith("paged_"))


# ---------------------------------------------------------------------------------------------
# One shape


@dataclasses.dataclass(frozen=True, slots=True)
class ShapeTrace:
    """One parameter's optimizer step, traced."""

    state: tuple[tuple[Component, int, bool], ...]
    """(component, bytes, on the GPU) of every state tensor after the step."""
    shared: tuple[tuple[str, Component, int], ...]
    """(name, component, bytes) of state shared by all parameters of one optimizer (counted once)."""
    pre: tuple[tuple[Component, int], ...]
    """Allocations made before `optimizer.step()` and live through it (fp32 master gradients)."""
    timeline: tuple[tuple[tuple[Component, int], ...], ...]
    """Live allocations (other than state, weights, gradients) after every op of the step."""
    extra_at_peak: tuple[tuple[Component, int], ...]
    """The step's own allocations (not `pre`) at its highest point."""

    @property
    def extra_peak_bytes(self) -> int:
        return sum(b for _, b in self.extra_at_peak)


@functools.lru_cache(maxsize=4096)
def _shape_trace(optim: str, precision: str, dtype: str, shape: tuple[int, ...], device: str) -> ShapeTrace:
    if optim.startswith(("adamw_bnb", "paged_")):
        return _bnb_trace(optim, precision, dtype, shape)
    return _trace(optim, precision, dtype, (shape,), device)


@functools.lru_cache(maxsize=1024)
def _trace(optim: str, precision: str, dtype: str, shapes: tuple[tuple[int, ...], ...], device: str) -> ShapeTrace:
    """The step of an optimizer over parameters of these shapes, in this order (one shape, or a
    pair for CARRY_OVER)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = shapes[0]
    torch_dtype = getattr(torch, _DTYPES[dtype])
    if optim in _HELD:
        device = "cpu"  # see _HELD; its tensors stand for the GPU's
    if optim.startswith("adamw_torch_8bit"):
        from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

        get_qmap_signed(), get_qmap_unsigned()  # built from data once and cached: fake tensors have none
    if optim == CHUNK_8BIT:
        from runtime.lean_state import qmap

        qmap(True, device), qmap(False, device)  # cached per device: real constants, not this trace's fakes
    with FakeTensorMode(allow_non_fake_inputs=optim == CHUNK_8BIT):
        params = [torch.nn.Parameter(torch.empty(sh, dtype=torch_dtype, device=device)) for sh in shapes]
        for p in params:
            p.grad = torch.empty_like(p)
        # the copy back into the 16-bit weight (copy_, converting in place) allocates nothing, and
        # a fake cuda tensor cannot run its dtype conversion on a CPU-only build: left out
        step = OptimizerStep(optim, precision, params, copy_back=device != "cuda")
        rec = _Recorder(device)
        with rec:
            if optim == "adamw_torch_8bit" and device == "cuda":
                # torchao creates the state, then runs the update, whose qmap lookup (an index on
                # a cuda tensor) a CPU-only torch cannot fake; the update's buffers are
                # TORCHAO_COMPILED_TEMPS anyway
                try:
                    step.step()
                except RuntimeError:
                    step.finish()
                    step.step_only = lambda: None  # noqa: E731 (the state is what this trace needs)
            else:
                step.step()  # creates the state
            rec.start(known=[t for p in params for t in (p, p.grad)] + step.state_tensors())
            step.prepare()
            pre = rec.live()
            rec.mark_pre()
            step.step_only()
            step.finish()
            rec.stop()
        state = [(comp, _nbytes(t), t.device.type == device) for comp, t in step.state_tensors(flat=True)]
    extra_at_peak = rec.peak_extra()
    if optim == "adamw_torch_8bit":  # compiled step: inductor's buffers, not the eager ops
        n = int(torch.Size(shape).numel())
        quantized = n >= TORCHAO_MIN_NUMEL and n % TORCHAO_BLOCK == 0
        extra_at_peak = (tuple((Component.TEMPORARIES, b * n // per) for b, per in TORCHAO_COMPILED_TEMPS)
                         if quantized else ())
        timeline = (tuple(pre) + extra_at_peak,)
    else:
        timeline = tuple(rec.timeline)
    return ShapeTrace(state=tuple(state), shared=(), pre=tuple(pre), timeline=timeline, extra_at_peak=extra_at_peak)


# Flat spans (ChunkFT) have as many sizes as spans: a for-loop step over a 1-D tensor allocates
# tensors of a*n + b bytes (elementwise ops; torchao's block scales n / 256) within one code
# path, so two traces of that path give every size exactly.
_REFERENCE_NUMELS = {True: (1 << 16, 1 << 17), False: ((1 << 16) + 1, (1 << 17) + 1)}


def _scaled_trace(optim: str, precision: str, dtype: str, shape: tuple[int, ...]) -> ShapeTrace:
    """`_shape_trace` on fake cuda; a 1-D shape of a for-loop optimizer from two reference traces
    of the same code path (see above), checked to agree entry by entry."""
    if len(shape) != 1 or _kind(optim) != LOOP or optim.startswith(("adamw_bnb", "paged_")):
        return _shape_trace(optim, precision, dtype, shape, "cuda")
    n = shape[0]
    eight = optim.startswith("adamw_torch_8bit")
    quantized = eight and n >= TORCHAO_MIN_NUMEL and n % TORCHAO_BLOCK == 0
    n1, n2 = _REFERENCE_NUMELS[quantized or not eight]
    if n in (n1, n2):
        return _shape_trace(optim, precision, dtype, shape, "cuda")
    a, b = (_shape_trace(optim, precision, dtype, (m,), "cuda") for m in (n1, n2))

    def scale(x: tuple, y: tuple) -> tuple:
        if len(x) != len(y) or any(e[0] != f[0] or e[2:] != f[2:] for e, f in zip(x, y)):
            raise _NotAffine
        out = []
        for e, f in zip(x, y):
            size, rest = divmod(e[1] * (n2 - n) + f[1] * (n - n1), n2 - n1)
            if rest or size < 0:
                raise _NotAffine
            out.append((e[0], size, *e[2:]))
        return tuple(out)

    try:
        return ShapeTrace(state=scale(a.state, b.state), shared=a.shared, pre=scale(a.pre, b.pre),
                          timeline=tuple(scale(x, y) for x, y in zip(a.timeline, b.timeline)),
                          extra_at_peak=scale(a.extra_at_peak, b.extra_at_peak))
    except _NotAffine:
        return _shape_trace(optim, precision, dtype, shape, "cuda")


class _NotAffine(Exception):
    pass


def _kind(optim: str) -> str:
    return _PRIVATE.get(optim) or IMPLEMENTATIONS[optim]


def _bnb_trace(optim: str, precision: str, dtype: str, shape: tuple[int, ...]) -> ShapeTrace:
    """bitsandbytes' state layout from its source (see the module docstring); no temporaries."""
    import math

    n = math.prod(shape)
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    state: list[tuple[Component, int, bool]] = []
    pre: tuple[tuple[Component, int], ...] = ()
    if precision == "mixed":
        state.append((Component.MASTER, 4 * n, True))
        if elem != 4:
            pre = ((Component.GRADIENTS, 4 * n),)
    paged = optim.startswith("paged_") and n >= BNB_PAGED_MIN_NUMEL
    eight = optim.endswith("_8bit") and n >= BNB_MIN_8BIT_SIZE
    state += [(Component.OPTIMIZER, (1 if eight else 4) * n, not paged)] * 2
    shared: tuple[tuple[str, Component, int], ...] = ()
    if eight:
        blocks = -(-n // BNB_BLOCK)
        state += [(Component.OPTIMIZER, 4 * blocks, True)] * 2
        qmap = 4 * BNB_QMAP_ENTRIES
        shared = (("qmap1", Component.OPTIMIZER, qmap), ("qmap2", Component.OPTIMIZER, qmap))
    return ShapeTrace(state=tuple(state), shared=shared, pre=pre, timeline=(pre,), extra_at_peak=())


def _nbytes(t) -> int:
    return int(t.untyped_storage().nbytes())


# ---------------------------------------------------------------------------------------------
# The step itself: the same code runs on fake tensors (the trace) and real ones (the tests)


class OptimizerStep:
    """One training step's optimizer update of `params` (with `.grad` set), as the recipe runs it."""

    def __init__(self, optim: str, precision: str, params: list, *, copy_back: bool = True):
        import torch

        if optim not in IMPLEMENTATIONS and optim not in _PRIVATE or optim.startswith(("adamw_bnb", "paged_")):
            raise ChunkftError(f"--optim {optim} has no CPU implementation here; runnable: "
                               f"{', '.join(o for o in IMPLEMENTATIONS if not o.startswith(('adamw_bnb', 'paged_')))}")
        self.optim, self.params = optim, list(params)
        self.mixed = precision == "mixed"
        self.copy_back = copy_back
        self.masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) if self.mixed else p
                        for p in self.params]
        if optim in _HELD:  # ChunkAdamW's span step (runtime.chunk_optim)
            self.moments = {}
            self.opt = None
        else:
            self.opt = _torch_optimizer(optim, self.masters)

    def step(self) -> None:
        self.prepare()
        self.step_only()
        self.finish()

    def prepare(self) -> None:
        """Mixed precision, parameter-owning optimizers: fp32 gradients for the masters."""
        if self.mixed and self.opt is not None:
            import torch

            for m, p in zip(self.masters, self.params):
                m.grad = p.grad.to(torch.float32)

    def step_only(self) -> None:
        import torch

        if self.opt is not None:
            if self.optim == "adamw_torch_8bit":  # torch.compile cannot run under a dispatch mode
                with torch.compiler.set_stance("force_eager"):
                    self.opt.step()
            else:
                self.opt.step()
            return
        from runtime.chunk_optim import AdamWConfig, adamw_update

        with torch.no_grad():
            for i, (m, p) in enumerate(zip(self.masters, self.params)):
                if i not in self.moments:
                    self.moments[i] = (1, self._fresh(m, p))
                count, state = self.moments[i]
                adamw_update(state, "w", p.grad, config=AdamWConfig(), lr=1e-5, step=count, weight=p.detach())
                self.moments[i] = (count + 1, state)

    def _fresh(self, master, p) -> dict:
        """A span's state as ChunkAdamW keeps it (runtime.lean_state.StateFormat): the master
        (mixed; under pure precision the weights are stepped) and bf16 or 8-bit moments."""
        from runtime.lean_state import StateFormat

        fmt = StateFormat.from_recipe("adamw_torch_8bit" if self.optim == CHUNK_8BIT else self.optim,
                                      "mixed" if self.mixed else "pure")
        state = fmt.fresh("w", p.detach(), p.device)
        if self.mixed:
            state["w/master"] = master  # the same master the copy back reads
        return state

    def finish(self) -> None:
        if self.mixed:
            import torch

            with torch.no_grad():
                for m, p in zip(self.masters, self.params):
                    if self.copy_back:
                        p.copy_(m)
                    if self.opt is not None:
                        m.grad = None

    def state_tensors(self, flat: bool = False) -> list:
        """The optimizer's state (with `flat`: (component, tensor) of every storage, tensor
        subclasses such as torchao's 8-bit state opened into their inner tensors)."""
        out = []
        if self.mixed:
            out += [(Component.MASTER, m) for m in self.masters]
        if self.opt is not None:
            for st in self.opt.state.values():
                out += [(Component.OPTIMIZER, v) for v in st.values() if _is_tensor(v)]
        else:
            out += [(Component.OPTIMIZER, v) for _, st in self.moments.values() for k, v in st.items()
                    if not k.endswith("/master")]
        if not flat:
            return [t for _, t in out]
        flat_out, seen = [], set()
        for comp, t in out:
            for inner in _inner_tensors(t):
                key = inner.untyped_storage()._cdata
                if key not in seen:
                    seen.add(key)
                    flat_out.append((comp, inner))
        return flat_out


def _torch_optimizer(optim: str, params: list):
    import torch

    if optim in ("adamw_torch", "adamw_torch_foreach"):
        return torch.optim.AdamW(params, foreach=True)
    if optim == "adamw_torch_forloop":
        return torch.optim.AdamW(params, foreach=False)
    if optim == "adamw_torch_fused":
        return torch.optim.AdamW(params, fused=True)
    if optim == "adafactor":
        return torch.optim.Adafactor(params)
    if optim == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=SGD_MOMENTUM, foreach=True)
    if optim == "adamw_torch_8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params)
    raise ChunkftError(f"--optim {optim} has no torch implementation here")


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _inner_tensors(t) -> list:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [x for name in names for x in _inner_tensors(getattr(t, name))]
    return [t]


# ---------------------------------------------------------------------------------------------
# Recording


def _make_recorder_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        """Storages the step creates and frees, op by op (see the module docstring)."""

        def __init__(self, device: str):
            super().__init__()
            self.device = device
            self.on = False
            self._known: set[int] = set()
            self._live: dict[int, tuple[Component, int]] = {}
            self._pre: set[int] = set()
            self._refs: dict[int, Any] = {}
            self.timeline: list[tuple[tuple[Component, int], ...]] = []
            self._peak, self._peak_extra = -1, ()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            import torch

            if func is torch.ops.aten._local_scalar_dense.default:
                return _placeholder_scalar(args[0])
            out = func(*args, **(kwargs or {}))
            if self.on and func.namespace != "prim":
                for t in flat_tensors(out):
                    for inner in _inner_tensors(t):
                        self._register(inner)
                self._sample()
            return out

        def _register(self, t) -> None:
            st = t.untyped_storage()
            key = st._cdata
            if key in self._known or key in self._live:
                return
            if t.device.type != self.device:
                return  # host scalars of a CUDA run (torch's step counters) are not GPU memory
            self._live[key] = (Component.TEMPORARIES, st.nbytes())
            self._refs[key] = weakref.ref(st, functools.partial(self._free, key))

        def _free(self, key: int, _ref) -> None:
            self._live.pop(key, None)
            self._refs.pop(key, None)
            self._pre.discard(key)

        def start(self, known: list) -> None:
            for t in known:
                for inner in _inner_tensors(t):
                    self._known.add(inner.untyped_storage()._cdata)
            self.on = True

        def live(self) -> list[tuple[Component, int]]:
            return [(Component.GRADIENTS, b) for _, b in self._live.values()]

        def mark_pre(self) -> None:
            self._pre = set(self._live)
            self.timeline, self._peak, self._peak_extra = [], -1, ()
            self._sample()

        def stop(self) -> None:
            self._sample()
            self.on = False

        def _sample(self) -> None:
            entries = tuple((Component.GRADIENTS if k in self._pre else c, b) for k, (c, b) in self._live.items())
            self.timeline.append(entries)
            extra = tuple((c, b) for k, (c, b) in self._live.items() if k not in self._pre)
            total = sum(b for _, b in extra)
            if total > self._peak:
                self._peak, self._peak_extra = total, extra

        def peak_extra(self) -> tuple[tuple[Component, int], ...]:
            return self._peak_extra

    return Recorder


def _placeholder_scalar(t) -> Any:
    import torch

    if t.dtype == torch.bool:
        return True
    return 1 if not t.is_floating_point() else 1.0


_RECORDER: Callable | None = None


def _Recorder(device: str):
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = _make_recorder_class()
    return _RECORDER(device)


# ---------------------------------------------------------------------------------------------
# CPU ground truth (tests/test_recipe_optim.py, bench/recipe_optim.py)


def measured_step(optim: str, precision: str, params: list) -> tuple[int, int]:
    """(state bytes, step peak bytes) of the real step of `params` (real CPU tensors with
    `.grad`), measured with planner.measure's mallinfo2 sampler after a warm-up step: the first
    step of a fresh optimizer leaves its state (and masters) behind; the peak is the higher of
    that step's and the next step's on top of the state. torchao's compiled update runs eagerly
    here (a dispatch mode and torch.compile do not mix): compare its state, not its peak."""
    import gc

    from planner.measure import measure_malloc_peak

    warm = OptimizerStep(optim, precision, params)
    warm.step()
    warm.step()
    del warm
    gc.collect()
    box: dict = {}

    def first() -> None:
        box["step"] = OptimizerStep(optim, precision, params)
        box["step"].step()

    m1 = measure_malloc_peak(first)
    m2 = measure_malloc_peak(box["step"].step)
    del box
    gc.collect()
    return m1.end_bytes, max(m1.peak_bytes, m1.end_bytes + m2.peak_bytes)
