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
    through `out.loss.backward()`. "hf-trainer": transformers.Trainer's training_step, the same
    forward with the output dropped before backward. "torchtune": torchtune's
    full_finetune_single_device step (`torchtune_loss`). Tracer, measurement and runtime all
    call this."""
    if loop == "chunkft":
        return step_loss(model, input_ids, labels, loss_chunk_tokens=loss_chunk_tokens), None
    assert loop == "chunkft" or not loss_chunk_tokens, "only chunkft's step has a chunked loss (planner.recipe)"
    if loop == "hf":
        out = model(input_ids=input_ids, labels=labels)
        return out.loss, out
    if loop == "hf-trainer":
        # transformers.Trainer.training_step -> compute_loss: `outputs = model(**inputs)`,
        # `loss = outputs["loss"]`, and compute_loss returns the loss alone, so the output object
        # (logits, use_cache's cache) is gone before `accelerator.backward(loss)`
        out = model(input_ids=input_ids, labels=labels)
        loss = out["loss"]
        del out
        return loss, None
    if loop == "torchtune":
        return torchtune_loss(model, input_ids, labels), None
    raise ValueError(f"unknown loop {loop!r}")


TORCHTUNE_OUTPUT_CHUNKS = 8
"""torchtune's CEWithChunkedOutputLoss.num_output_chunks (the recipes' default loss)."""


def torchtune_loss(model: "torch.nn.Module", input_ids: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """torchtune's full_finetune_single_device `_loss_step` with its default CEWithChunkedOutputLoss,
    on an HF model: the model (`set_num_output_chunks(8)`) returns its logits as 8 chunks along
    the sequence, one output projection per chunk; labels are shifted left with an ignore
    column appended (`torch.hstack((labels[..., 1:], ignore))`); the loss upcasts each chunk to
    fp32 for a summed cross-entropy and divides by the count of labelled tokens; `del logits`
    before backward. As in torchtune, the bf16 chunks and what each fp32 cross-entropy saves
    for backward stay until backward."""
    import torch
    import torch.nn.functional as F

    hidden = model.base_model(input_ids=input_ids, **_forward_kwargs(model)).last_hidden_state
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)  # torchtune's Gemma 2 caps its output too

    def project(part: "torch.Tensor") -> "torch.Tensor":
        out = head(part)
        return out if softcap is None else torch.tanh(out / softcap) * softcap

    logits = [project(part) for part in hidden.chunk(TORCHTUNE_OUTPUT_CHUNKS, dim=1)]
    ignore = torch.full_like(labels[..., :1], IGNORE_INDEX)
    shifted = torch.hstack((labels[..., 1:], ignore))
    targets = shifted.chunk(TORCHTUNE_OUTPUT_CHUNKS, dim=1)
    total = sum(F.cross_entropy(l.float().reshape(-1, l.shape[-1]), t.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum") for l, t in zip(logits, targets))
    del logits
    return total / (shifted != IGNORE_INDEX).sum()


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


def enable_checkpointing(model: "torch.nn.Module", *, every: int = 1, layers: "list[bool] | None" = None,
                         selective: bool = False) -> None:
    """Activation checkpointing (non-reentrant), as tracer and runtime both use it: HF's own
    `activation_checkpointing_enable` (every decoder layer), then

    - `every` > 1: only decoder layers whose index % every == 0 stay checkpointed (the
      selection of transformers' `every_n_layers`, torchtune's and torchtitan's);
    - `layers`: the per-layer choice given outright (a template's layers stand for full-depth
      layers whose indices differ from their own: planner.replicate);
    - `selective`: op-level selective checkpointing, the checkpoint's `context_fn` from
      `planner.activations.selective_context_fn` (matmul and attention outputs are saved).

    The per-layer choice is the `gradient_checkpointing` flag HF's GradientCheckpointingLayer
    reads (transformers' `every_n_layers` sets the same flag)."""
    from planner.errors import ChunkftError

    kwargs: dict = {"use_reentrant": False}
    if selective:
        from planner.activations import selective_context_fn

        kwargs["context_fn"] = selective_context_fn
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ChunkftError(f"{type(model).__name__} has no activation_checkpointing_enable(): "
                           "activation checkpointing needs a transformers model")
    if every == 1 and layers is None:
        return
    from planner.model import find_layer_list

    found = find_layer_list(model)
    blocks = [] if found is None else list(found[1])
    if not blocks or not all(hasattr(b, "gradient_checkpointing") for b in blocks):
        raise ChunkftError(f"{type(model).__name__}'s decoder layers have no per-layer checkpointing flag: "
                           "checkpointing every K-th layer needs transformers' GradientCheckpointingLayer")
    flags = [i % every == 0 for i in range(len(blocks))] if layers is None else list(layers)
    if len(flags) != len(blocks):
        raise ChunkftError(f"{len(flags)} checkpointing flags for {len(blocks)} decoder layers")
    for block, on in zip(blocks, flags):
        block.gradient_checkpointing = bool(on)


def _forward_kwargs(model: "torch.nn.Module") -> dict:
    # A training step keeps no KV cache: with use_cache=True HF builds a DynamicCache that holds
    # every layer's keys and values to the end of the forward.
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
