"""Optimizer-state formats of ChunkAdamW: fp32 moments, bf16 moments, torchao's 8-bit moments;
with an fp32 master (mixed precision) or without one (pure precision).

A `StateFormat` says what one span's state holds; `planner.recipe`'s `optim` / `precision`
choose it (`StateFormat.from_recipe`). Per span "<param>/<kind>":

    moments  --optim            per span                                      bytes per element
    fp32     chunkft            exp_avg, exp_avg_sq in the master dtype       4 + 4 (8 + 8 for fp64)
    bf16     adamw_bf16         exp_avg, exp_avg_sq in bf16                   2 + 2
    int8     adamw_torch_8bit   exp_avg.codes, exp_avg_sq.codes (uint8, the   1 + 1, plus 4 + 4 per
                                span's shape), exp_avg.scale, exp_avg_sq.     block of 256
                                scale (fp32, one per block of 256)
    master   precision mixed    master in fp32 (fp64 for an fp64 model)       + 4
             precision pure     none: the training-dtype weights are the      + 0
                                master, the step writes them directly

8-bit is torchao.optim.AdamW8bit's format (torchao 0.18, `torchao.optim.subclass_8bit`,
`quant_utils`): block-wise absmax scaling (`scale_tensor`) of the flattened span in blocks of
256, codes into the dynamic quantization map of Dettmers et al. (`create_dynamic_map`: signed
for exp_avg, unsigned for exp_avg_sq), rounded to the nearest code (`quantize_8bit_with_qmap`),
read back by `dequant_with_qmap`. As torchao (and bitsandbytes) do, a span of fewer than 4096
elements or not a multiple of 256 keeps plain moments (torchao's `zeros_like(p)`: the master
dtype under mixed precision, the weights' dtype under pure precision). The two 256-entry maps
are constants, built once per device and not part of the state (torchao keeps one per tensor:
1 KiB each).

The step (`step_span`, called by `runtime.chunk_optim.adamw_update` for every format) is
torch.optim.AdamW's arithmetic line for line (`_single_tensor_adam`, decoupled weight decay) in
the compute dtype (fp32; fp64 for an fp64 model), on the master or an upcast copy of the 16-bit
weights, and on the moments read into the compute dtype (bf16 upcast, 8-bit dequantized); then
the moments are stored back (rounded to bf16, or requantized) and, without a master, the weights
are rounded to their dtype. With fp32 moments and an fp32 master nothing is copied: the step is
ChunkAdamW's original, bit for bit. (torchao's own `single_param_adam` differs from torch's
arithmetic in rounding only: lerp for exp_avg_sq, bias corrections as fp32 tensors.)

Stochastic rounding (`AdamWConfig.stochastic_rounding`): every fp32 -> bf16 rounding of the step
(bf16 moments; bf16 weights under pure precision) rounds away from zero with probability equal
to the discarded low 16 bits / 2**16 (torchao's `_fp32_to_bf16_sr`: add 16 uniform random bits
to the fp32 bit pattern, truncate), so the rounding is unbiased. The random bits come from a
torch.Generator on the step device seeded from (`AdamWConfig.seed`, the span's key, its step
count), never from the global RNG: the same run gives the same bits on any tier, with or without
prefetch threads, and a resumed run equals an uninterrupted one without saving any RNG state.
fp16 targets and the 8-bit codes always round to nearest.

Known limitations: 8-bit quantization reads the span whole (a few fp32 and int64 temporaries of
the span's size during the step, as torchao's eager functions allocate); stochastic rounding is
for bf16 only; the 8-bit block size is torchao's default (256), not configurable.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from typing import TYPE_CHECKING, Mapping

import torch

from planner.errors import ChunkftError

if TYPE_CHECKING:
    from runtime.chunk_optim import AdamWConfig

BLOCK = 256
"""torchao.optim.AdamW8bit's default block_size: one fp32 scale per 256 elements."""
MIN_QUANTIZED_NUMEL = 4096
"""torchao (after bitsandbytes) quantizes tensors of at least this many elements only."""


class Moments(str, enum.Enum):
    """How exp_avg and exp_avg_sq are stored."""

    FP32 = "fp32"  # the master dtype: fp32, or fp64 for an fp64 model
    BF16 = "bf16"
    INT8 = "int8"  # torchao's block-wise 8-bit


_OPTIM_MOMENTS = {"chunkft": Moments.FP32, "adamw_bf16": Moments.BF16, "adamw_torch_8bit": Moments.INT8}
"""planner.recipe's --optim names ChunkAdamW runs, and the moments each keeps."""
RUNNABLE_OPTIMS = tuple(_OPTIM_MOMENTS)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StateFormat:
    """What one span's optimizer state holds (see the module docstring)."""

    moments: Moments = Moments.FP32
    master: bool = True
    """True: an fp32 master (mixed precision). False: the weights are the master (pure)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "moments", Moments(self.moments))
        except ValueError:
            raise ChunkftError(f"invalid moments format {self.moments!r}: valid values are "
                               f"{', '.join(m.value for m in Moments)}") from None
        if not isinstance(self.master, bool):
            raise ChunkftError(f"invalid master {self.master!r}: must be true or false")

    @classmethod
    def from_recipe(cls, optim: str, precision: str = "mixed") -> "StateFormat":
        """The format of a recipe's `optim` and `precision` (planner.recipe)."""
        precision = getattr(precision, "value", precision)
        if optim not in _OPTIM_MOMENTS:
            raise ChunkftError(f"--optim {optim} is not an optimizer ChunkAdamW runs; valid: {', '.join(RUNNABLE_OPTIMS)}")
        if precision not in ("mixed", "pure"):
            raise ChunkftError(f"invalid precision {precision!r}: valid values are mixed, pure")
        if precision == "pure" and optim == "chunkft":
            raise ChunkftError("--precision pure has no fp32 master, but --optim chunkft keeps one; valid with pure: "
                               f"{', '.join(o for o in RUNNABLE_OPTIMS if o != 'chunkft')}")
        return cls(moments=_OPTIM_MOMENTS[optim], master=precision == "mixed")

    def to_json(self) -> dict:
        return {"moments": self.moments.value, "master": self.master}

    @classmethod
    def from_json(cls, doc: object) -> "StateFormat":
        if doc is None:  # written before formats existed: ChunkAdamW's original state
            return cls()
        if not isinstance(doc, dict) or set(doc) != {"moments", "master"}:
            raise ChunkftError(f"optimizer state format {doc!r} is malformed; expected {{'moments': ..., 'master': ...}}")
        return cls(moments=doc["moments"], master=doc["master"])

    def describe(self) -> str:
        return f"{self.moments.value} moments, " + ("fp32 master" if self.master else "no master (pure precision)")

    # -- one span ----------------------------------------------------------------------------

    def quantized(self, numel: int) -> bool:
        """Whether a span of `numel` elements keeps 8-bit moments (torchao's rule)."""
        return self.moments == Moments.INT8 and numel >= MIN_QUANTIZED_NUMEL and numel % BLOCK == 0

    def keys(self, name: str, numel: int) -> tuple[str, ...]:
        """The state keys of span `name`."""
        moments = (("exp_avg.codes", "exp_avg.scale", "exp_avg_sq.codes", "exp_avg_sq.scale")
                   if self.quantized(numel) else ("exp_avg", "exp_avg_sq"))
        return tuple(f"{name}/{k}" for k in (("master",) if self.master else ()) + moments)

    def plain_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of plain (not 8-bit) moments for weights of `weight_dtype`."""
        if self.moments == Moments.BF16:
            return torch.bfloat16
        if self.moments == Moments.INT8 and not self.master:  # torchao: zeros_like(p), p the weight
            return weight_dtype
        return compute_dtype(weight_dtype)

    def fresh(self, name: str, view: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """A new span's state: the master copied from the weights, moments zero."""
        out: dict[str, torch.Tensor] = {}
        if self.master:
            out[f"{name}/master"] = view.to(device=device, dtype=compute_dtype(view.dtype), copy=True)
        if self.quantized(view.numel()):
            for kind in ("exp_avg", "exp_avg_sq"):  # torchao's OptimState8bit.zeros
                out[f"{name}/{kind}.codes"] = torch.zeros(view.shape, dtype=torch.uint8, device=device)
                out[f"{name}/{kind}.scale"] = torch.zeros(view.numel() // BLOCK, dtype=torch.float32, device=device)
        else:
            dtype = self.plain_dtype(view.dtype)
            for kind in ("exp_avg", "exp_avg_sq"):
                out[f"{name}/{kind}"] = torch.zeros(view.shape, dtype=dtype, device=device)
        return out

    def span_bytes(self, numel: int, weight_dtype: torch.dtype) -> tuple[int, int]:
        """(master bytes, moment bytes) of a span of `numel` elements of `weight_dtype`."""
        master = numel * compute_dtype(weight_dtype).itemsize if self.master else 0
        if self.quantized(numel):
            return master, 2 * (numel * 1 + (numel // BLOCK) * 4)
        return master, 2 * numel * self.plain_dtype(weight_dtype).itemsize


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step computes in (and the master's): fp64 for fp64 weights, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the step ----------------------------------------------------------------------------------


def step_span(state: Mapping[str, torch.Tensor], name: str, grad: torch.Tensor, target: torch.Tensor, *,
              config: "AdamWConfig", lr: float, step: int, key: str | None = None) -> None:
    """One AdamW step of span `name`: `target` (its master, or under pure precision the
    weights themselves) and its moments in `state`, in place, whatever their format."""
    compute = compute_dtype(target.dtype)
    p = target if target.dtype == compute else target.to(compute)
    g = grad if grad.dtype == compute else grad.to(compute)
    m = _read_moment(state, name, "exp_avg", compute)
    v = _read_moment(state, name, "exp_avg_sq", compute)
    adam_math(p, m, v, g, config=config, lr=lr, step=step)
    gen = _generator(config.seed, key or name, step, p.device) if config.stochastic_rounding else None
    _write_moment(state, name, "exp_avg", m, gen)
    _write_moment(state, name, "exp_avg_sq", v, gen)
    if p is not target:
        target.copy_(round_to(p, target.dtype, gen))


def adam_math(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, *,
              config: "AdamWConfig", lr: float, step: int) -> None:
    """torch.optim.adam._single_tensor_adam with decoupled weight decay, line for line, in place
    (so one chunk of fp32 state equals torch.optim.AdamW bit for bit)."""
    beta1, beta2 = config.betas
    if config.weight_decay != 0:
        master.mul_(1 - lr * config.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(config.eps)
    master.addcdiv_(exp_avg, denom, value=-step_size)


def _read_moment(state: Mapping[str, torch.Tensor], name: str, kind: str, compute: torch.dtype) -> torch.Tensor:
    """The moment in the compute dtype: the state tensor itself when it already is, else a copy."""
    plain = state.get(f"{name}/{kind}")
    if plain is not None:
        return plain if plain.dtype == compute else plain.to(compute)
    codes, scale = state[f"{name}/{kind}.codes"], state[f"{name}/{kind}.scale"]
    out = dequantize(codes, scale, signed=kind == "exp_avg")
    return out if out.dtype == compute else out.to(compute)


def _write_moment(state: Mapping[str, torch.Tensor], name: str, kind: str, value: torch.Tensor,
                  gen: torch.Generator | None) -> None:
    plain = state.get(f"{name}/{kind}")
    if plain is not None:
        if plain is not value:
            plain.copy_(round_to(value, plain.dtype, gen))
        return
    codes, scale = quantize(value.to(torch.float32), signed=kind == "exp_avg")
    state[f"{name}/{kind}.codes"].copy_(codes)
    state[f"{name}/{kind}.scale"].copy_(scale)


# -- torchao's 8-bit format --------------------------------------------------------------------

_QMAPS: dict[tuple[bool, str], torch.Tensor] = {}


def qmap(signed: bool, device: torch.device | str) -> torch.Tensor:
    """torchao's 256-entry dynamic quantization map (signed: exp_avg; unsigned: exp_avg_sq), one
    per device (made afresh under a fake-tensor or other tensor mode, so no fake map is cached)."""
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    if type(torch.empty(0)) is not torch.Tensor:  # under a tensor mode (the planner's fake trace): not cached
        return torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32, device=device)
    key = (signed, str(torch.device(device)))
    table = _QMAPS.get(key)
    if table is None:
        values = get_qmap_signed() if signed else get_qmap_unsigned()
        table = _QMAPS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return table


def quantize(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of x's shape, fp32 scale per block of 256): what torchao's OptimState8bit
    `copy_` from a float tensor stores (`scale_tensor`, `quantize_8bit_with_qmap`)."""
    from torchao.optim.quant_utils import quantize_8bit_with_qmap, scale_tensor

    scaled, scale = scale_tensor(x.contiguous(), BLOCK)
    return quantize_8bit_with_qmap(scaled, qmap(signed, x.device)), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """fp32 values of 8-bit codes (torchao's `dequant_with_qmap`)."""
    from torchao.optim.quant_utils import dequant_with_qmap

    return dequant_with_qmap(codes.contiguous(), qmap(signed, codes.device), scale)


# -- rounding ----------------------------------------------------------------------------------


def round_to(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator | None) -> torch.Tensor:
    """x in `dtype`: stochastically rounded when `gen` is given and `dtype` is bf16, else to nearest."""
    if gen is None or dtype != torch.bfloat16:
        return x.to(dtype)
    return stochastic_bf16(x.to(torch.float32), gen)


def stochastic_bf16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, away from zero with probability (low 16 bits) / 2**16 (torchao's
    `_fp32_to_bf16_sr`, with its random bits from `gen`); inf and nan round to nearest."""
    rand = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    bits = (x.contiguous().view(torch.int32) + rand) & -65536  # 0xFFFF0000: the bf16 bits kept
    return torch.where(torch.isfinite(x), bits.view(torch.float32), x).to(torch.bfloat16)


def _generator(seed: int, key: str, step: int, device: torch.device) -> torch.Generator:
    """A generator for one span's step: seeded from (seed, span key, step count) alone."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{step}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return gen
