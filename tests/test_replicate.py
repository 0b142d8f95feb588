"""Replicated traces equal full traces: same ops, same storages, same bytes after every op."""

from __future__ import annotations

import types

import numpy as np
import pytest
from torch import nn
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from planner.model import ModelSpec
from planner.schema import Component
from planner.trace import StepShape, TraceOptions, trace_step

SHAPE = StepShape(batch=1, seq_len=64, dtype="bf16")


def spec_of(arch: str, layers: int) -> ModelSpec:
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**common)
    return ModelSpec(name=f"tiny-{arch}", source="config", config=config, num_layers=layers)


def names_of(spec: ModelSpec) -> list[str]:
    return [n for n, _ in spec.build(num_layers=spec.num_layers, device="meta").named_parameters()]


def assert_same_step(full, rep):
    assert rep.template_layers is not None, "fell back to a full trace"
    assert len(rep.ops) == len(full.ops) and len(rep.storages) == len(full.storages)
    assert [(o.name, o.phase, o.layer, o.module) for o in rep.ops] == [(o.name, o.phase, o.layer, o.module) for o in full.ops]
    assert [o.flops for o in rep.ops] == [o.flops for o in full.ops]
    a, b = full.replay(), rep.replay()
    assert (a.peak_bytes, a.peak_op, a.start_bytes) == (b.peak_bytes, b.peak_op, b.start_bytes)
    for c in Component:
        assert np.array_equal(a.live_bytes[c], b.live_bytes[c]), c
    ca, cb = full.replay(allocator="cuda"), rep.replay(allocator="cuda")
    assert np.array_equal(ca.reserved_bytes, cb.reserved_bytes)
    # same dependency structure: edge count and per-node degree
    assert full.graph.number_of_edges() == rep.graph.number_of_edges()
    assert [d for _, d in full.graph.in_degree()] == [d for _, d in rep.graph.in_degree()]


def middle_and_head(spec: ModelSpec, layers: set[int]) -> dict[str, bool]:
    return {n: n.startswith("lm_head") or any(n.startswith(f"model.layers.{i}.") for i in layers)
            for n in names_of(spec)}


@pytest.mark.parametrize("arch,checkpointing,grad", [
    ("llama", False, "all"), ("llama", True, "all"), ("llama", False, "middle"), ("llama", True, "middle"),
    ("qwen2", False, "all"), ("qwen2", True, "middle"),
])
def test_six_layers_replicated_equal_full_trace(arch, checkpointing, grad):
    spec = spec_of(arch, 6)
    spec_grad = None if grad == "all" else middle_and_head(spec, {2, 3})
    opts = dict(checkpointing=checkpointing, grad=spec_grad)
    full = trace_step(spec, SHAPE, TraceOptions(replicate=False, **opts))
    rep = trace_step(spec, SHAPE, TraceOptions(replicate=True, **opts))
    assert_same_step(full, rep)
    if grad == "all":
        assert rep.template_layers == 3  # first, one interior layer standing for four, last


def test_long_runs_are_cut_to_three_template_layers():
    # runs: layers 0-3 frozen with nothing below training; 4-5 trained; 6-9 frozen, gradient passes
    spec = spec_of("mistral", 10)
    grad = middle_and_head(spec, {4, 5})
    full = trace_step(spec, SHAPE, TraceOptions(replicate=False, grad=grad))
    rep = trace_step(spec, SHAPE, TraceOptions(replicate=True, grad=grad))
    assert rep.template_layers == 3 + 2 + 3
    assert_same_step(full, rep)


def test_alternating_layer_types_replicate_in_blocks():
    # Gemma 2 alternates sliding-window and full attention: blocks of two layers repeat.
    config = Gemma2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=10, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, vocab_size=512, sliding_window=32)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    spec = ModelSpec(name="tiny-gemma2", source="config", config=config, num_layers=10)
    full = trace_step(spec, SHAPE, TraceOptions(replicate=False))
    rep = trace_step(spec, SHAPE, TraceOptions())
    assert rep.template_layers == 6  # first, one interior and last pair
    assert_same_step(full, rep)


def test_sliced_chunk_cut_replicates():
    import runtime.subgrad  # noqa: F401  (the tracer installs the slices with it: a broken import fails here)
    from planner.chunks import SliceSpec
    spec = spec_of("llama", 8)
    grad = middle_and_head(spec, {4})
    grad["model.layers.3.mlp.down_proj.weight"] = SliceSpec(dim=0, start=64, end=128)
    grad["model.layers.5.self_attn.q_proj.weight"] = SliceSpec(dim=1, start=0, end=32)
    full = trace_step(spec, SHAPE, TraceOptions(replicate=False, grad=grad))
    rep = trace_step(spec, SHAPE, TraceOptions(replicate=True, grad=grad))
    assert_same_step(full, rep)
    # the slices' gradients are the only gradients of layers 3 and 5
    grads = {s.layer: 0 for s in full.storages.values()}
    for s in full.storages.values():
        if s.component == Component.GRADIENTS and s.free_op is None:
            grads[s.layer] += s.nbytes
    assert grads[3] == 64 * 256 * 2  # rows 64:128 of down_proj (128 x 256)
    assert grads[5] == 128 * 32 * 2  # columns 0:32 of q_proj (128 x 128)


class _NoLayerListLM(nn.Module):
    """A causal LM without a ModuleList of layers: replication must fall back to a full trace."""

    def __init__(self, num_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.block = nn.Sequential(*[nn.Linear(64, 64) for _ in range(num_layers)])
        self.head = nn.Linear(64, 256, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, labels):
        logits = self.head(self.block(self.embed(input_ids)))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return types.SimpleNamespace(loss=loss, logits=logits)


def test_model_without_layer_list_falls_back_to_full_trace():
    spec = ModelSpec(name="tests:_NoLayerListLM", source="factory", config=None, num_layers=None,
                     factory=_NoLayerListLM)
    graph = trace_step(spec, SHAPE, TraceOptions())
    assert graph.template_layers is None and graph.num_layers is None
    params = sum(p.numel() * 2 for p in _NoLayerListLM().parameters())
    assert graph.replay().at(len(graph) - 1)[Component.GRADIENTS] == params


def test_template_traces_are_cached():
    from planner import replicate

    spec = spec_of("llama", 5)
    trace_step(spec, SHAPE, TraceOptions())
    before = len(replicate._TEMPLATE_CACHE)
    again = trace_step(spec, SHAPE, TraceOptions())
    assert len(replicate._TEMPLATE_CACHE) == before and again.template_layers == 3
