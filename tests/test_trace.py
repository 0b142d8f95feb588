"""trace_step on tiny HF models: ops, phases, layers, storages, components and the op graph."""

from __future__ import annotations

import networkx
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from planner.errors import ChunkftError
from planner.model import ModelSpec
from planner.opgraph import OpNode
from planner.schema import Component, Phase
from planner.step import step_loss
from planner.trace import StepShape, TraceOptions, match_real_attention_branch, trace_step

# part of CI's second pass on the newest transformers (.ci/run): the tracer meets HF model code here
pytestmark = pytest.mark.newest_deps

FULL = TraceOptions(replicate=False)


def llama_spec(layers: int = 3, *, tied: bool = False) -> ModelSpec:
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=tied)
    return ModelSpec(name="tiny-llama", source="config", config=config, num_layers=layers)


def param_bytes(spec: ModelSpec, names=None) -> int:
    model = spec.build(device="meta")
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if names is None or n in names)


SHAPE = StepShape(batch=2, seq_len=64, dtype="bf16")
INPUT_BYTES = 2 * SHAPE.batch * SHAPE.seq_len * 8  # int64 input_ids and labels


# ---------------------------------------------------------------------------- step_loss

@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_hf_loss_and_gradients(tied):
    torch.manual_seed(0)
    model = llama_spec(2, tied=tied).build(device="cpu", dtype=torch.float64)
    ids = torch.randint(0, 1024, (2, 33))
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens carry no loss
    reference = step_loss(model, ids, labels)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = step_loss(model, ids, labels, loss_chunk_tokens=10)  # 66 tokens: 7 uneven chunks
    chunked.backward()
    # Both losses are computed in fp32 (HF casts logits with .float()); chunk sums round differently.
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------- trace

def test_full_step_matches_memtracker_and_leaves_weights_and_gradients():
    from planner.measure import memtracker_peak

    spec = llama_spec(3)
    graph = trace_step(spec, SHAPE, FULL)
    timeline = graph.replay()
    weights = param_bytes(spec)

    def make_step():  # runs inside MemTracker's FakeTensorMode: a cpu build is fake
        model = spec.build(device="cpu")
        model.train()
        match_real_attention_branch(model, SHAPE)  # as trace_step does
        ids = torch.randint(0, 1024, (SHAPE.batch, SHAPE.seq_len))
        labels = torch.randint(0, 1024, (SHAPE.batch, SHAPE.seq_len))

        def step():
            loss = step_loss(model, ids, labels)
            loss.backward()

        return model, step

    tracked = memtracker_peak(make_step)
    # MemTracker does not count the input ids and labels, which exist before the step.
    assert timeline.step_peak_bytes == tracked.peak_bytes
    assert timeline.start_bytes == weights + INPUT_BYTES + _buffer_bytes(spec)
    end = timeline.at(len(graph) - 1)
    assert end[Component.GRADIENTS] == weights
    assert end[Component.WEIGHTS] == weights + _buffer_bytes(spec)


def _buffer_bytes(spec: ModelSpec) -> int:
    return sum(b.numel() * b.element_size() for b in spec.build(device="meta").buffers())


def test_phases_layers_and_recompute_follow_the_step():
    spec = llama_spec(3)
    plain = trace_step(spec, SHAPE, FULL)
    ckpt = trace_step(spec, SHAPE, TraceOptions(replicate=False, checkpointing=True))
    for graph in (plain, ckpt):
        phases = [op.phase for op in graph.ops]
        first_loss, first_bw = phases.index(Phase.LOSS), phases.index(Phase.BACKWARD)
        assert set(phases[:first_loss]) == {Phase.FORWARD}
        assert first_loss < first_bw
        # forward layers in order 0, 1, 2; backward layers in reverse order
        fw = [op.layer for op in graph.ops[:first_loss] if op.layer is not None]
        bw = [op.layer for op in graph.ops[first_bw:] if op.layer is not None]
        assert _runs(fw) == [0, 1, 2] and _runs(bw) == [2, 1, 0]
        assert all(op.module.startswith("model.layers.1") for op in graph.ops if op.layer == 1
                   and op.phase == Phase.FORWARD)
        mm_fw = [op for op in graph.ops if op.name == "aten.mm.default" and op.phase == Phase.FORWARD]
        # 7 projections per layer: 2 * tokens * in * out flops each
        assert len(mm_fw) == 7 * 3
        q = next(op for op in mm_fw if op.module == "model.layers.0.self_attn.q_proj")
        assert q.flops == 2 * SHAPE.batch * SHAPE.seq_len * 128 * 128
        # attention: QK^T and PV, 2 * 2 * batch * heads * seq^2 * head_dim (no causal discount,
        # as torch.utils.flop_counter counts it); backward recomputes scores: 5 such products
        sdpa = [op for op in graph.ops if "scaled_dot_product" in op.name and op.layer == 0]
        forward_flops = 4 * SHAPE.batch * 4 * SHAPE.seq_len**2 * 32
        assert [op.flops for op in sdpa if op.phase != Phase.BACKWARD][0] == forward_flops
        assert [op.flops for op in sdpa if op.phase == Phase.BACKWARD][0] == forward_flops * 5 // 2
    assert not any(op.phase == Phase.RECOMPUTE for op in plain.ops)
    recompute = [op for op in ckpt.ops if op.phase == Phase.RECOMPUTE]
    assert {op.layer for op in recompute} == {0, 1, 2}
    # the recompute re-runs each layer's projections but down_proj, whose output no backward
    # needs (non-reentrant checkpointing stops early)
    assert sum(op.name == "aten.mm.default" for op in recompute) == 6 * 3
    # checkpointing keeps fewer activations alive at the end of the forward
    end_fw = lambda g: max(i for i, op in enumerate(g.ops) if op.phase == Phase.FORWARD)
    acts = lambda g: g.replay().at(end_fw(g))[Component.ACTIVATIONS]
    assert acts(ckpt) < acts(plain) / 3


def _runs(xs):
    out = []
    for x in xs:
        if not out or out[-1] != x:
            out.append(x)
    return out


def test_frozen_layers_save_fewer_activations_and_get_no_gradient():
    spec = llama_spec(3)
    names = [n for n, _ in spec.build(device="meta").named_parameters()]
    top = {n: n.startswith("model.layers.2.") or n.startswith("lm_head") for n in names}
    full = trace_step(spec, SHAPE, FULL)
    part = trace_step(spec, SHAPE, TraceOptions(grad=top, replicate=False))
    end = part.replay().at(len(part) - 1)
    assert end[Component.GRADIENTS] == param_bytes(spec, {n for n, v in top.items() if v})
    # nothing below layer 2 needs a gradient: no backward ops for layers 0 and 1
    assert {op.layer for op in part.ops if op.phase == Phase.BACKWARD} == {2, None}
    saved = lambda g: sum(s.nbytes for s in g.storages.values() if s.saved and s.component == Component.ACTIVATIONS)
    assert saved(part) < saved(full) / 2


def test_opgraph_is_a_dependency_digraph_with_typed_payloads():
    graph = trace_step(llama_spec(2), SHAPE, FULL)
    g = graph.graph
    assert isinstance(g, networkx.DiGraph) and g.number_of_nodes() == len(graph.ops)
    assert networkx.is_directed_acyclic_graph(g)
    for u, v, data in g.edges(data=True):
        assert u < v
        producer, consumer = g.nodes[u]["op"], g.nodes[v]["op"]
        assert isinstance(producer, OpNode)
        assert set(data["storages"]) <= set(producer.outputs) & set(consumer.inputs)
    # every allocated storage is freed after (or at) the op that allocated it
    for s in graph.storages.values():
        if s.alloc_op is not None and s.free_op is not None:
            assert s.free_op >= s.alloc_op
    # the lm_head matmul produces the logits: batch x seq x vocab bf16
    head = next(op for op in graph.ops if op.module == "lm_head" and op.name == "aten.mm.default")
    assert head.out_bytes == SHAPE.batch * SHAPE.seq_len * 1024 * 2
    assert graph.storages[head.allocs[0]].component == Component.LOGITS


def test_chunked_loss_never_holds_full_logits():
    spec = llama_spec(2)
    shape = StepShape(batch=1, seq_len=256, dtype="bf16")
    plain = trace_step(spec, shape, FULL)
    chunked = trace_step(spec, shape, TraceOptions(replicate=False, loss_chunk_tokens=32))
    full_logits = shape.seq_len * 1024 * 2
    assert max(s.nbytes for s in plain.storages.values() if s.component == Component.LOGITS) >= full_logits
    assert max(s.nbytes for s in chunked.storages.values() if s.component == Component.LOGITS) <= full_logits // 8 * 2
    assert chunked.replay().live_bytes[Component.LOGITS].max() < plain.replay().live_bytes[Component.LOGITS].max() / 3


def test_tied_embeddings_are_one_weight_with_one_gradient():
    spec = llama_spec(2, tied=True)
    weights = param_bytes(spec)  # named_parameters() lists the shared tensor once
    graph = trace_step(spec, SHAPE, FULL)
    end = graph.replay().at(len(graph) - 1)
    assert end[Component.WEIGHTS] == weights + _buffer_bytes(spec)
    assert end[Component.GRADIENTS] == weights
    # training it under its lm_head name trains the embedding too: gradients reach layer 0
    head_only = trace_step(spec, SHAPE, TraceOptions(grad={"lm_head.weight": True}, replicate=False))
    assert head_only.replay().at(len(head_only) - 1)[Component.GRADIENTS] == 1024 * 128 * 2
    assert any(op.layer == 0 and op.phase == Phase.BACKWARD for op in head_only.ops)


def test_qwen2_with_biases_traces():
    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024)
    spec = ModelSpec(name="tiny-qwen2", source="config", config=config, num_layers=2)
    graph = trace_step(spec, SHAPE, FULL)
    assert graph.num_layers == 2
    assert graph.replay().at(len(graph) - 1)[Component.GRADIENTS] == param_bytes(spec)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ChunkftError, match="sequence length"):
        StepShape(seq_len=0)
    with pytest.raises(ChunkftError, match="dtype"):
        StepShape(dtype="int8")
    with pytest.raises(ChunkftError, match="loss_chunk_tokens"):
        TraceOptions(loss_chunk_tokens=-1)
    with pytest.raises(ChunkftError, match="unknown parameters"):
        trace_step(llama_spec(2), SHAPE, TraceOptions(grad={"model.nope.weight": True}, replicate=False))
