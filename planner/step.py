"""The loss of one training step: the single function the tracer and the runtime both call.

`step_loss(model, input_ids, labels)` returns the scalar loss; the caller runs `.backward()`.
Keeping forward and loss in one place means the planner's trace and the runtime's measured
step execute the same aten ops, so their memory can be compared op by op.

With `loss_chunk_tokens > 0` the full logits tensor (batch x seq x vocab, plus the fp32 copy the
loss makes) never exists: the base model runs to its last hidden states, then the output
embedding and an fp32 cross-entropy run over token chunks, each chunk under non-reentrant
`torch.utils.checkpoint`, so backward recomputes one chunk's logits at a time. Labels are
shifted as Hugging Face's `ForCausalLMLoss` shifts them (pad with -100 on the right, drop the
first), and the loss is the mean over non-ignored tokens, so it equals the model's own loss.

Known limitations: the chunked path reproduces `logits = lm_head(hidden)` with Gemma-style
final soft-capping and Cohere-style `logit_scale`; a model whose causal-LM head does anything
else must use `loss_chunk_tokens=0`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
"""Label value the loss skips (torch.nn.functional.cross_entropy's default ignore_index)."""


def loop_forward(model: "torch.nn.Module", input_ids: "torch.Tensor", labels: "torch.Tensor", *, loop: str = "chunkft",
                 loss_chunk_tokens: int = 0) -> tuple["torch.Tensor", object]:
    """Forward and loss as the recipe's loop writes them: (loss, what the loop holds until
    backward has run). "chunkft": `step_loss`, holding nothing else. "hf": the plain Hugging
    Face loop, `out = model(input_ids=ids, labels=labels)` with the config's defaults
    (`use_cache` included), holding `out` -- its logits, and the cache's keys and values --
    through `out.loss.backward()`. Tracer, measurement and runtime all call this."""
    if loop == "chunkft":
        return step_loss(model, input_ids, labels, loss_chunk_tokens=loss_chunk_tokens), None
    if loop == "hf":
        assert not loss_chunk_tokens, "the plain HF loop has no chunked loss (planner.recipe refuses it)"
        out = model(input_ids=input_ids, labels=labels)
        return out.loss, out
    raise ValueError(f"unknown loop {loop!r}")


def step_loss(model: "torch.nn.Module", input_ids: "torch.Tensor", labels: "torch.Tensor", *,
              loss_chunk_tokens: int = 0) -> "torch.Tensor":
    """Forward plus loss of one training step; 0 = the model's own HF loss, >0 = chunked loss."""
    kwargs = _forward_kwargs(model)
    if loss_chunk_tokens <= 0:
        return model(input_ids=input_ids, labels=labels, **kwargs).loss
    base = model.base_model
    assert base is not model, "chunked loss needs a causal LM with a separate base model"
    hidden = base(input_ids=input_ids, **kwargs).last_hidden_state
    return chunked_causal_lm_loss(model, hidden, labels, chunk_tokens=loss_chunk_tokens)


def chunked_causal_lm_loss(model: "torch.nn.Module", hidden: "torch.Tensor", labels: "torch.Tensor", *,
                           chunk_tokens: int) -> "torch.Tensor":
    """Mean next-token cross-entropy of `model`'s output head over `hidden`, chunk by chunk."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def chunk_loss_sum(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")

    # As transformers' ForCausalLMLoss: the label of position t is the token at t + 1.
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = None
    for start in range(0, flat.shape[0], chunk_tokens):
        part = checkpoint(chunk_loss_sum, flat[start:start + chunk_tokens], shifted[start:start + chunk_tokens],
                          use_reentrant=False)
        total = part if total is None else total + part
    count = (shifted != IGNORE_INDEX).sum()
    return total / count


def enable_checkpointing(model: "torch.nn.Module") -> None:
    """Per-decoder-layer activation checkpointing (non-reentrant), as tracer and runtime both use it."""
    from planner.errors import ChunkftError

    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ChunkftError(f"{type(model).__name__} has no activation_checkpointing_enable(): "
                           "activation checkpointing needs a transformers model")


def _forward_kwargs(model: "torch.nn.Module") -> dict:
    # A training step keeps no KV cache: with use_cache=True HF builds a DynamicCache that holds
    # every layer's keys and values to the end of the forward.
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
