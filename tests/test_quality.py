"""Fine-tuning quality: ChunkFT against full fine-tuning and LoRA on a task the test generates.

A tiny Llama is pretrained briefly on language A (a sparse first-order Markov chain over tokens
0-31), then fine-tuned on language B (another chain, over tokens 0-63: half of B's vocabulary
never appeared in A). Every method sees the same batches for the same number of passes, with
the same learning rate and schedule:
  - full fine-tuning: torch.optim.AdamW over every parameter;
  - ChunkFT: runtime.chunk_optim.ChunkAdamW, C = 3 byte-balanced chunks, update interval 1;
  - LoRA: rank chosen so its trainable state (fp32 A/B + two AdamW moments) is at most
    ChunkFT's (fp32 master + two moments of its largest chunk), on every attention and MLP
    linear.
B's entropy rate (the best achievable eval loss) is about 0.80 nats/token (successor
probabilities 0.7/0.2/0.1).

Measured here (2 shared cores): full FT 0.90, ChunkFT 0.92, LoRA (rank 13) 2.0; the test runs
in about 10 s.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from planner.chunks import make_chunk_table_from_model
from planner.schema import Tier
from runtime.chunk_optim import AdamWConfig, ChunkAdamW, LRSchedule
from runtime.data import Example, PackedLoader, eval_batches
from runtime.lora import LoraConfig, apply_lora
from runtime.train import ChunkOptimizer, LoopConfig, Schedule, TorchAdamW, Trainer, evaluate_loss

VOCAB = 64
SEQ = 64
FINETUNE_STEPS = 300  # ~9 passes over B's 256 training sequences at batch 8
LR = 2e-3
CHUNKS = 3


def markov_language(seed: int, vocab: list[int], num_sequences: int) -> list[Example]:
    """Sequences from a random sparse Markov chain: each token has 3 successors (p = .7/.2/.1).
    The chain depends only on `seed`; more sequences extend the same stream."""
    rng = random.Random(seed)
    successors = {t: rng.sample(vocab, 3) for t in vocab}
    out = []
    for _ in range(num_sequences):
        t = rng.choice(vocab)
        seq = [t]
        for _ in range(SEQ - 1):
            t = rng.choices(successors[t], weights=(0.7, 0.2, 0.1))[0]
            seq.append(t)
        out.append(Example(input_ids=tuple(seq), labels=tuple(seq)))
    return out


def entropy_rate() -> float:
    return -sum(p * math.log(p) for p in (0.7, 0.2, 0.1))


@pytest.fixture(scope="module")
def task():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pretrain = markov_language(1, list(range(32)), 400)
    Trainer(base, TorchAdamW(dict(base.named_parameters()), schedule=Schedule(lr=3e-3)),
            PackedLoader(pretrain, seq_len=SEQ, batch_size=8, seed=0, pad_token_id=0), LoopConfig(steps=150)).train()
    language_b = markov_language(2, list(range(VOCAB)), 256 + 32)
    weights = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(weights)
        return model

    return fresh, language_b[:256], eval_batches(language_b[256:], seq_len=SEQ, batch_size=16, pad_token_id=0)


def finetune(model, optimizer, train) -> None:
    loader = PackedLoader(train, seq_len=SEQ, batch_size=8, seed=1, pad_token_id=0)
    Trainer(model, optimizer, loader, LoopConfig(steps=FINETUNE_STEPS)).train()


def test_chunkft_matches_full_finetuning_and_beats_lora(task):
    fresh, train, evaluation = task
    before = evaluate_loss(fresh(), evaluation)

    full = fresh()
    finetune(full, TorchAdamW(dict(full.named_parameters()), schedule=Schedule(lr=LR)), train)
    full_loss = evaluate_loss(full, evaluation)

    chunked = fresh()
    table = make_chunk_table_from_model(chunked, CHUNKS)
    inner = ChunkAdamW(chunked, table, config=AdamWConfig(lr=LR), schedule=LRSchedule(), state_tier=Tier.HOST)
    finetune(chunked, ChunkOptimizer(inner, state_tier=Tier.HOST), train)
    inner.close()
    chunk_loss = evaluate_loss(chunked, evaluation)
    # trainable state of ChunkFT at any moment: fp32 master + 2 moments of the active chunk
    chunk_state_bytes = max(3 * table.chunk_bytes(k) for k in range(CHUNKS))  # fp32 model: 4 B/elem

    lora_model = fresh()
    per_rank = apply_lora(fresh(), LoraConfig(rank=1)).trainable_bytes()  # bytes of A and B at rank 1
    rank = chunk_state_bytes // (3 * per_rank)
    adapters = apply_lora(lora_model, LoraConfig(rank=rank, alpha=2.0 * rank))
    lora_state_bytes = 3 * adapters.trainable_bytes()
    assert 0.9 * chunk_state_bytes < lora_state_bytes <= chunk_state_bytes  # equal trainable-state memory
    finetune(lora_model, TorchAdamW(dict(adapters.named_parameters()), schedule=Schedule(lr=LR)), train)
    lora_loss = evaluate_loss(lora_model, evaluation)

    print(f"eval loss on B: before {before:.3f}, full FT {full_loss:.3f}, ChunkFT(C={CHUNKS}) {chunk_loss:.3f}, "
          f"LoRA(r={rank}) {lora_loss:.3f}; entropy rate {entropy_rate():.3f}")
    assert before > 5.0  # B is new: the pretrained model is far from it
    assert full_loss < 1.2 * entropy_rate() + 0.1  # full fine-tuning learned B
    assert chunk_loss <= 1.05 * full_loss  # ChunkFT within 5% of full fine-tuning ...
    assert abs(chunk_loss - full_loss) <= 0.05 * full_loss  # ... on either side
    assert lora_loss > 1.2 * chunk_loss  # and clearly better than LoRA at equal state memory


def test_lora_baseline_starts_at_the_base_model_and_trains_only_adapters():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 16))
    base_logits = model(input_ids=ids).logits
    adapters = apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    assert len(adapters.a) == 7  # q, k, v, o, gate, up, down of the one layer
    # B = 0: the adapted model starts exactly at the base model
    assert torch.equal(model(input_ids=ids).logits, base_logits)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in adapters.b.values())
    # bytes: rank x (in + out) fp32 per adapted linear
    q = model.model.layers[0].self_attn.q_proj
    assert adapters.a["model__layers__0__self_attn__q_proj"].shape == (4, q.in_features)
    assert adapters.trainable_bytes() == 4 * 4 * sum(
        m.in_features + m.out_features for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LoraConfig().targets)
    with torch.no_grad():
        for b in adapters.b.values():
            b.fill_(0.01)
    assert not torch.equal(model(input_ids=ids).logits, base_logits)
    adapters.remove()
    assert torch.equal(model(input_ids=ids).logits, base_logits)
