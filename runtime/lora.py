"""A minimal LoRA baseline (Hu et al. 2021), for comparing fine-tuning quality with ChunkFT.

`apply_lora(model, LoraConfig(rank=8))` freezes every model parameter and adds, through a
forward hook on each targeted nn.Linear, the low-rank update `(x @ A^T @ B^T) * alpha / rank`
to its output. A and B live in a separate `LoraAdapters` module (A ~ Kaiming-uniform as in the
paper's reference code, B = 0, so training starts at the base model); the model's classes and
code are unchanged, and `LoraAdapters.remove()` takes the hooks out again.

`LoraConfig(full=("embed_tokens", "lm_head"))` also trains those modules' parameters in full
(peft's `modules_to_save`): needed when fine-tuning adds tokens the base model never saw, whose
embeddings and output rows a low-rank update of the other linears cannot supply. They are
registered in the adapters' `full` dict (the model's own Parameter objects, shared), so
`LoraAdapters.parameters()` is the complete trainable set and `trainable_bytes()` counts them.
`rank_for_budget` picks the largest rank whose trainable bytes fit a budget (equal-memory
comparisons).

Written here rather than depending on `peft`: the baseline needs ~80 lines, and the project
installs without network access to extra packages.

Known limitations: nn.Linear targets only; no dropout on the LoRA path; no merging into the
base weights; `remove()` takes out the hooks but leaves every model parameter frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from planner.errors import ChunkftError

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Module names LoRA adapts by default: every linear of attention and MLP (QLoRA's choice)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraConfig:
    rank: int = 8
    """Rank r of each update B @ A."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    targets: tuple[str, ...] = LLAMA_TARGETS
    """Last component of the module names to adapt."""
    full: tuple[str, ...] = ()
    """Last component of the module names whose parameters train in full beside the adapters,
    e.g. ("embed_tokens", "lm_head") when the task adds tokens."""


class LoraAdapters(nn.Module):
    """The A and B matrices of every adapted linear, and the hooks that apply them."""

    def __init__(self, model: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.alpha / config.rank
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self.full = nn.ParameterDict()
        self._hooks = []
        for name, p in _full_parameters(model, config.full).items():
            p.requires_grad_(True)
            self.full[name.replace(".", "__")] = p
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] not in config.targets or not isinstance(module, nn.Linear):
                continue
            key = name.replace(".", "__")  # ParameterDict keys cannot hold dots
            w = module.weight
            a = torch.empty(config.rank, module.in_features, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and the LoRA reference code
            self.a[key] = nn.Parameter(a)
            self.b[key] = nn.Parameter(torch.zeros(module.out_features, config.rank, dtype=w.dtype, device=w.device))
            self._hooks.append(module.register_forward_hook(self._hook(key)))
        if not self.a:
            raise ChunkftError(f"LoRA found no nn.Linear named {', '.join(config.targets)} in the model")

    def _hook(self, key: str):
        def hook(module, args, output):
            x = args[0]
            return output + (x @ self.a[key].t() @ self.b[key].t()) * self.scale
        return hook

    def trainable_bytes(self) -> int:
        """Bytes of every trainable tensor: A, B and the parameters trained in full."""
        return sum(p.nbytes for p in self.parameters())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def apply_lora(model: nn.Module, config: LoraConfig) -> LoraAdapters:
    """Freeze `model` and attach LoRA adapters to its targeted linears; train the result's
    parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    return LoraAdapters(model, config)


def _full_parameters(model: nn.Module, modules: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Parameters of the modules named `modules` (last name component), each once (tied weights
    are one parameter)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    found: set[str] = set()
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last not in modules:
            continue
        found.add(last)
        for pname, p in module.named_parameters(prefix=name):
            if id(p) not in seen:
                seen.add(id(p))
                out[pname] = p
    missing = sorted(set(modules) - found)
    if missing:
        raise ChunkftError(f"LoRA cannot train {', '.join(missing)} in full: no such module in the model")
    return out


def rank_for_budget(model: nn.Module, budget_bytes: int, config: LoraConfig = LoraConfig()) -> int:
    """The largest LoRA rank whose trainable bytes (A and B of every target, in the weights'
    dtype, plus the parameters `config.full` trains in full) are at most `budget_bytes`."""
    full = sum(p.nbytes for p in _full_parameters(model, config.full).values())
    per_rank = sum((m.in_features + m.out_features) * m.weight.element_size() for name, m in model.named_modules()
                   if name.rsplit(".", 1)[-1] in config.targets and isinstance(m, nn.Linear))
    if per_rank == 0:
        raise ChunkftError(f"LoRA found no nn.Linear named {', '.join(config.targets)} in the model")
    rank = (budget_bytes - full) // per_rank
    if rank < 1:
        raise ChunkftError(f"a budget of {budget_bytes} B holds no LoRA rank: the modules trained in full take "
                           f"{full} B and each rank {per_rank} B")
    return int(rank)
