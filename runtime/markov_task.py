"""A synthetic fine-tuning task small enough for CPU tests: learn a new language with new tokens.

A tiny Llama (2 layers, hidden 64, vocabulary 64, ~90k parameters) is pretrained briefly on
language A, a sparse first-order Markov chain over tokens 0-31, then fine-tuned on language B,
another chain over tokens 0-63: half of B's vocabulary never appeared in A, so a method must
train the embedding and output rows of those tokens. Every token has 3 successors with
probabilities .7/.2/.1, so B's entropy rate, the best achievable eval loss, is about 0.80
nats/token.

`markov_task()` builds the pretrained base once; `MarkovTask.fresh()` returns a copy of it,
`make_loader()` the fine-tuning batches (the same on every call), `eval_batches` B's
held-out sequences.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from runtime.data import Example, PackedLoader, eval_batches
from runtime.train import LoopConfig, Schedule, TorchAdamW, Trainer

VOCAB = 64
SEQ = 64
SUCCESSOR_PROBS = (0.7, 0.2, 0.1)
BATCH = 8


def markov_language(seed: int, vocab: list[int], num_sequences: int) -> list[Example]:
    """Sequences of SEQ tokens from a random sparse Markov chain: each token has 3 successors
    (SUCCESSOR_PROBS). The chain depends only on `seed`; more sequences extend the same stream."""
    rng = random.Random(seed)
    successors = {t: rng.sample(vocab, 3) for t in vocab}
    out = []
    for _ in range(num_sequences):
        t = rng.choice(vocab)
        seq = [t]
        for _ in range(SEQ - 1):
            t = rng.choices(successors[t], weights=SUCCESSOR_PROBS)[0]
            seq.append(t)
        out.append(Example(input_ids=tuple(seq), labels=tuple(seq)))
    return out


def entropy_rate() -> float:
    """Nats per token of either language: the eval loss of a model that knows the chain."""
    return -sum(p * math.log(p) for p in SUCCESSOR_PROBS)


@dataclass(frozen=True, slots=True)
class MarkovTask:
    fresh: Callable[[], nn.Module]
    """A new copy of the pretrained base model."""
    train: list[Example]
    """B's fine-tuning sequences."""
    eval_batches: list
    """B's held-out sequences, batched."""

    def make_loader(self) -> PackedLoader:
        """The fine-tuning batches, the same sequence of them on every call."""
        return PackedLoader(self.train, seq_len=SEQ, batch_size=BATCH, seed=1, pad_token_id=0)


def markov_task(*, train_sequences: int = 256, eval_sequences: int = 32, pretrain_steps: int = 150) -> MarkovTask:
    """Pretrain the tiny Llama on A (seed 0, AdamW at 3e-3) and hold B's sequences."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pretrain = markov_language(1, list(range(VOCAB // 2)), 400)
    Trainer(base, TorchAdamW(dict(base.named_parameters()), schedule=Schedule(lr=3e-3)),
            PackedLoader(pretrain, seq_len=SEQ, batch_size=BATCH, seed=0, pad_token_id=0),
            LoopConfig(steps=pretrain_steps)).train()
    language_b = markov_language(2, list(range(VOCAB)), train_sequences + eval_sequences)
    weights = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh() -> nn.Module:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(weights)
        return model

    return MarkovTask(fresh, language_b[:train_sequences],
                      eval_batches(language_b[train_sequences:], seq_len=SEQ, batch_size=16, pad_token_id=0))
