"""Validation at the edge: numbers, step shapes and model configs, before any work starts.

Every check raises a one-line `ChunkftError` naming the bad value and what is valid. The upper
bounds are far above any real fine-tuning job and exist so that a typo (`--batch 100000000000`)
is refused instead of overflowing a tensor's storage size or looping for hours in the tracer's
chunked loss (one loop turn per 256 tokens).

Known limitations: a step of more than MAX_STEP_TOKENS tokens (e.g. 4 x 128K) is refused, not
planned; a factory model (`package.module:function`) has no config, so only its step
shape is checked; config checks read the common HF field names (through each config's
`attribute_map`, so GPT-2's `n_embd` is `hidden_size`) and skip fields a config lacks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from planner.errors import ChunkftError

if TYPE_CHECKING:
    import transformers

    from planner.model import ModelSpec

MAX_SEQ_LEN = 2**18
"""Tokens per sequence, even with --allow-long-seq (twice the 128K context of Llama 3.1)."""
MAX_BATCH = 2**16
"""Sequences per micro-batch."""
MAX_STEP_TOKENS = 2**18
"""batch x seq. The tracer's chunked loss takes one loop turn per 256 tokens: 2**18 tokens plan in
about a minute on a 2-core machine (2**21 took eight), and logits are tokens x vocab bytes."""
MAX_CHUNKS = 2**16
"""ChunkFT chunk counts (a chunk is at least one row of a parameter)."""
MAX_GPUS_PER_NODE = 64
MAX_NODES = 1024
MAX_GPUS = 4096
"""GPUs in all (`size --max-gpus`, `plan --gpus-per-node x --nodes`)."""
MAX_LIST_VALUES = 16
"""Values in one comma-separated list flag (each is a traced shape or strategy)."""

# Config fields: (name, smallest, largest). The largest are about 8x the biggest released
# models (405B: hidden 16384, 126 layers, 128 heads; vocabularies up to 256K).
CONFIG_BOUNDS: tuple[tuple[str, int, int], ...] = (
    ("vocab_size", 1, 2**22),
    ("hidden_size", 1, 2**17),
    ("intermediate_size", 1, 2**19),
    ("num_hidden_layers", 1, 2**10),
    ("num_attention_heads", 1, 2**12),
    ("num_key_value_heads", 1, 2**12),
    ("head_dim", 1, 2**12),
    ("max_position_embeddings", 1, 2**31),
)

# Model types transformers maps to a causal-LM class that are not decoder-only language models:
# encoder-decoder models (their ForCausalLM is the decoder alone, built to take cross-attention)
# and bidirectional encoders (their LMHeadModel needs `is_decoder`, and is not what they are).
ENCODER_MODEL_TYPES = frozenset({
    "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "blenderbot", "blenderbot-small",
    "camembert", "data2vec-text", "electra", "ernie", "marian", "mbart", "megatron-bert", "musicgen",
    "musicgen_melody", "mvp", "pegasus", "plbart", "prophetnet", "reformer", "rembert", "roberta",
    "roberta-prelayernorm", "roc_bert", "roformer", "whisper", "xlm", "xlm-prophetnet", "xlm-roberta",
    "xlm-roberta-xl", "xmod",
})


def check_int(value: Any, what: str, *, low: int, high: int, flag: str | None = None) -> int:
    """`value` as an int in [low, high]; `what` names it ("--max-gpus", "sequence length"),
    `flag` says where it came from when `what` does not."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        where = f" ({flag})" if flag else ""
        raise ChunkftError(f"invalid {what} {value!r}{where}: must be an integer from {low:,} to {high:,}")
    return value


def check_count(value: Any, flag: str, high: int) -> int:
    """A count flag (--nodes): an integer from 1 to `high`."""
    return check_int(value, flag, low=1, high=high)


def check_number(value: Any, what: str, *, positive: bool = True) -> float:
    """A finite (and by default positive) number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ChunkftError(f"invalid {what} {value!r}: must be a finite {'positive ' if positive else ''}number")
    return float(value)


def check_step(*, seq: Any, batch: Any, seq_flag: str = "--seq", batch_flag: str = "--batch") -> None:
    """Sequence length and batch within range, and their product within MAX_STEP_TOKENS."""
    check_int(seq, "sequence length", low=1, high=MAX_SEQ_LEN, flag=seq_flag)
    check_int(batch, "batch size", low=1, high=MAX_BATCH, flag=batch_flag)
    if seq * batch > MAX_STEP_TOKENS:
        raise ChunkftError(f"invalid batch size {batch} x sequence length {seq} ({batch_flag} x {seq_flag}): "
                           f"{seq * batch:,} tokens per step; at most {MAX_STEP_TOKENS:,} tokens per step are planned")


def check_seq_for_model(seq: int, model: "ModelSpec", *, allow_long: bool, flag: str = "--seq") -> None:
    """seq <= the model's max_position_embeddings, unless --allow-long-seq."""
    limit = model.config_value("max_position_embeddings")  # a deferred spec (planner.cache) knows it
    if allow_long or not isinstance(limit, int) or seq <= limit:
        return
    raise ChunkftError(f"invalid {flag} {seq}: model {model.name!r} has max_position_embeddings {limit}; "
                       f"use {flag} {limit} or less, or --allow-long-seq to plan beyond it")


def check_config(config: "transformers.PretrainedConfig", where: str) -> None:
    """Refuse configs the tracer cannot build or that describe no decoder-only causal LM."""
    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        raise ChunkftError(f"{where} has model_type {model_type!r}, an encoder or encoder-decoder model; chunkft "
                           "plans decoder-only causal LMs (e.g. llama, mistral, qwen2, gemma2, phi3, gpt2)")
    values = {}
    for name, low, high in CONFIG_BOUNDS:
        value = _config_value(config, name)
        if value is None:
            continue
        values[name] = check_int(value, name, low=low, high=high, flag=where)
    heads, kv = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv != 0:
        raise ChunkftError(f"invalid num_key_value_heads {kv} in {where}: must divide num_attention_heads "
                           f"{heads} (e.g. {', '.join(str(d) for d in _divisors(heads))})")
    hidden = values.get("hidden_size")
    if heads is not None and hidden is not None and "head_dim" not in values and hidden % heads != 0:
        raise ChunkftError(f"invalid hidden_size {hidden} in {where}: must be a multiple of num_attention_heads "
                           f"{heads} (or give head_dim)")


def _config_value(config, name: str):
    try:
        value = getattr(config, name, None)
    except Exception:  # some configs compute attributes from others
        return None
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:8]
