"""A recipe: how the user's training step is written, as opposed to where its bytes rest.

A `Strategy` (planner.strategy) is what the solver chooses: chunks, tiers, checkpointing,
staging. A `Recipe` is what the user already runs and the planner must model as it is; each
axis is traced with the real implementation under fake tensors, never a bytes-per-parameter
formula. It travels in the plan file (`"recipe"`), in `fit`/`plan`/`size` flags and in
`--json`, and keys the trace cache (an axis that changes the traced step is part of
`TraceOptions.key()`).

Axes so far:
- `loop`: how forward, loss and backward are written.
    chunkft  planner.step.step_loss: the model's own loss with `use_cache=False`, keeping only
             the loss tensor (or the chunked loss). `chunkft run` executes a plan's loop,
             either one (planner.step.loop_forward).
    hf       the plain Hugging Face loop, `out = model(input_ids=ids, labels=ids);
             out.loss.backward()`, with the config's defaults: the output object keeps the
             logits alive through backward, and `use_cache` (True in most configs) makes the
             forward build a cache that holds every layer's keys and values until `out` goes.

Known limitations: the other axes of the recipe issue (precision, optimizer implementation and
placement, activation policy, trainable set, allocator settings, importers) are not modelled
yet; a plan states the recipe it was made for so that an older plan never passes for a newer
recipe.
"""

from __future__ import annotations

import dataclasses
import enum

from planner.errors import ChunkftError


def add_recipe_args(p) -> None:
    """The recipe's flags, shared by `fit`, `plan` and `size`."""
    g = p.add_argument_group("recipe (the training step you run; planner.recipe)")
    g.add_argument("--loop", choices=[v.value for v in Loop], default=Loop.CHUNKFT.value,
                   help="chunkft: chunkft's own step (default); hf: the plain HF loop, out = model(input_ids=ids, "
                        "labels=ids); out.loss.backward(), which holds logits and use_cache's keys and values "
                        "through backward")


class Loop(str, enum.Enum):
    """How the training step's forward, loss and backward are written."""

    CHUNKFT = "chunkft"
    HF = "hf"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    """The user's training step (see the module docstring)."""

    loop: Loop = Loop.CHUNKFT

    def __post_init__(self) -> None:
        if not isinstance(self.loop, Loop):
            try:
                object.__setattr__(self, "loop", Loop(self.loop))
            except ValueError:
                raise ChunkftError(f"invalid loop {self.loop!r}: valid loops are "
                                   f"{', '.join(v.value for v in Loop)}") from None

    def check_strategy(self, *, loss_chunk_tokens: int) -> None:
        """Refuse (one line) what this recipe cannot be combined with."""
        if self.loop == Loop.HF and loss_chunk_tokens:
            raise ChunkftError(f"the plain HF loop computes the model's own loss; a chunked loss "
                               f"(loss_chunk_tokens={loss_chunk_tokens}) needs --loop chunkft")

    def describe(self) -> str:
        return {Loop.CHUNKFT: "chunkft's step", Loop.HF: "plain HF loop (out = model(ids, labels=ids))"}[self.loop]

    def to_json(self) -> dict:
        return {"loop": self.loop.value}

    @classmethod
    def from_args(cls, args) -> "Recipe":
        """The recipe flags of fit / plan / size (`add_recipe_args`)."""
        return cls(loop=args.loop)

    @classmethod
    def from_json(cls, doc: object) -> "Recipe":
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise ChunkftError(f"recipe must be a JSON object, got {type(doc).__name__}")
        unknown = sorted(set(doc) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ChunkftError(f"recipe has unknown field {unknown[0]!r}; valid fields: "
                               f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**doc)
