"""The model of a distributed run and its FSDP2 layout: build, chunk table, `fully_shard` per decoder layer.

`build_model` makes the HF causal LM of a DistConfig from its seed (the same weights on every
rank), `chunk_table_for` the chunk table `--chunks N` trains (over a meta build),
`chunk_table_of` the table a run executes. `shard_model` is the layout planner.fsdp models:
every decoder layer is its own FSDP2 unit and the root (embeddings, final norm, lm_head) is the
last; with `shard_embeddings` the input embedding and the output head are units of their own
first. With a chunked loss (`loss_chunk_tokens`) the root is a `ChunkedLossRoot` holding the
model: `planner.step.step_loss` then calls the base model and the head itself, and the root's
hooks must run around the whole loss.

Known limitations: one FSDP unit per decoder layer plus the root (optionally the embedding and
the head as units of their own); no mixed-precision policy (weights, gradients and reduce in
the training dtype).
"""

from __future__ import annotations

import torch

from planner.errors import ChunkftError
from runtime.dist_config import DTYPES, DistConfig


def build_model(config: DistConfig) -> torch.nn.Module:
    """The HF causal LM of `config`, randomly initialised from `config.seed` (not yet sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(config.model_config)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[config.dtype])
    model.train()
    if config.checkpointing:
        from planner.step import enable_checkpointing

        enable_checkpointing(model)
    return model


def chunk_table_for(model_config: dict, num_chunks: int, *, dtype: str = "fp32",
                    cut_dims: dict[str, int] | None = None) -> dict:
    """The JSON form of `planner.chunks.make_chunk_table_from_model` over the model of
    `model_config` (built on the meta device) in `dtype`: what `--chunks N` trains."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.chunks import make_chunk_table_from_model

    if dtype not in DTYPES:
        raise ChunkftError(f"invalid dtype {dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    cfg_dict = dict(model_config)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    return make_chunk_table_from_model(model, num_chunks, cut_dims=cut_dims).to_json()


class ChunkedLossRoot(torch.nn.Module):
    """FSDP2's root for a chunked loss: `planner.step.step_loss` then calls the base model and
    the output head itself, never `model.forward`, so the hooks of a root on the model (the
    all-gather of the parameters outside the decoder layers, the end-of-backward callback)
    would never run. Sharded as the root instead, this module's forward -- the whole loss --
    runs between them; it holds no parameters of its own."""

    def __init__(self, model: torch.nn.Module, loss_chunk_tokens: int):
        super().__init__()
        self.lm = model
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from planner.step import step_loss

        return step_loss(self.lm, input_ids, labels, loss_chunk_tokens=self.loss_chunk_tokens)


def shard_model(model: torch.nn.Module, *, shard_embeddings: bool = False, root: torch.nn.Module | None = None) -> None:
    """fully_shard every decoder layer, then the root (the layout planner.sharding models);
    with `shard_embeddings` the input embedding and the output head (the modules of every other
    parameter: final norm, lm_head) become units of their own first. `root` (a module holding
    `model`, e.g. a ChunkedLossRoot) is sharded as the root instead of `model`."""
    from torch.distributed.fsdp import fully_shard

    from planner.model import find_layer_list

    found = find_layer_list(model)
    if found is None:
        raise ChunkftError(f"{type(model).__name__} has no decoder-layer list to shard")
    prefix, layers = found
    if shard_embeddings:
        embedding = model.get_input_embeddings()
        fully_shard(embedding)
        emb_params = {id(p) for p in embedding.parameters()}
        head = []
        for name, p in model.named_parameters():
            if name.startswith(prefix + ".") or id(p) in emb_params:
                continue
            module = model.get_submodule(name.rpartition(".")[0])
            if all(m is not module for m in head):
                head.append(module)
        if head:
            fully_shard(head)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model if root is None else root)


def chunk_table_of(config: DistConfig, model: torch.nn.Module):
    from planner.chunks import ChunkTable, make_chunk_table_from_model

    if config.chunk_table is None:
        return make_chunk_table_from_model(model, 1)
    return ChunkTable.from_json(config.chunk_table)
