"""Every sub-tensor gradient equals the slice of the dense autograd gradient (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from planner.chunks import SliceSpec, make_chunk_table_from_model
from planner.errors import ChunkftError
from runtime.subgrad import install

# part of CI's second pass on the newest transformers (.ci/run): the tracer meets HF model code here
pytestmark = pytest.mark.newest_deps

SMALL = dict(
    vocab_size=96,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    pad_token_id=0,
)




def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic non-trivial weights (norm weights away from their 1 / 0 init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


def _model(kind: str = "llama", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "tie_word_embeddings": True, **overrides}))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**SMALL, "tie_word_embeddings": False, **overrides}))
    else:
        model = GemmaForCausalLM(GemmaConfig(**{**SMALL, **overrides}))
    return _randomize(model.double(), 1)


def _batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=g)
    ids[0, :3] = 0  # padding tokens: the embedding's padding row must get no gradient
    return ids, ids.clone()


def _loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def _dense_grads(model, batch) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    _loss(model, *batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    return grads


def _check(model, spec, dense, batch, passes: int = 1) -> dict[str, torch.Tensor]:
    handle = install(model, spec)
    try:
        for _ in range(passes):
            _loss(model, *batch).backward()
        grads = handle.grads()
        trained = {n for n, v in spec.items() if v is not False}
        assert set(grads) == trained
        params = dict(model.named_parameters())
        for name, value in spec.items():
            if isinstance(value, SliceSpec):
                # no dense gradient for a sliced parameter, ever
                assert params[name].grad is None and not params[name].requires_grad
                want = dense[name].narrow(value.dim, value.start, value.end - value.start)
            elif value is True:
                want = dense[name]
            else:
                assert params[name].grad is None
                continue
            assert_close(grads[name], want * passes, rtol=1e-10, atol=1e-12, msg=name)
        return grads
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def llama():
    model = _model("llama")
    batch = _batch()
    return model, batch, _dense_grads(model, batch)


@pytest.mark.parametrize(
    "name,spec",
    [
        ("model.layers.0.self_attn.q_proj.weight", SliceSpec(dim=0, start=3, end=11)),  # Linear rows
        ("model.layers.1.mlp.down_proj.weight", SliceSpec(dim=1, start=7, end=29)),  # Linear columns
        ("model.embed_tokens.weight", SliceSpec(dim=0, start=0, end=40)),  # rows incl. padding row 0
        ("model.embed_tokens.weight", SliceSpec(dim=1, start=5, end=13)),  # embedding columns
        ("model.layers.0.input_layernorm.weight", SliceSpec(dim=0, start=4, end=17)),  # RMSNorm w * x
        ("model.norm.weight", SliceSpec(dim=0, start=0, end=23)),
    ],
)
def test_single_slice_matches_dense(llama, name, spec):
    model, batch, dense = llama
    _check(model, {name: spec}, dense, batch)


def test_tied_parameter_by_its_other_name(llama):
    model, batch, dense = llama
    handle = install(model, {"lm_head.weight": SliceSpec(dim=0, start=4, end=12)})
    _loss(model, *batch).backward()
    grads = handle.grads()
    handle.remove()
    assert list(grads) == ["model.embed_tokens.weight"]
    assert_close(grads["model.embed_tokens.weight"], dense["model.embed_tokens.weight"][4:12], rtol=1e-10, atol=0)


def test_tied_embedding_slice_gets_both_contributions(llama):
    model, batch, dense = llama
    assert model.lm_head.weight is model.model.embed_tokens.weight
    spec = SliceSpec(dim=0, start=30, end=70)
    grads = _check(model, {"model.embed_tokens.weight": spec}, dense, batch)
    # the lm_head matmul alone would give a different answer: both uses contributed
    untied_ids = batch[0][(batch[0] >= 30) & (batch[0] < 70)]
    assert untied_ids.numel() > 0 and grads["model.embed_tokens.weight"].abs().sum() > 0


def test_padding_row_gets_no_gradient(llama):
    model, batch, dense = llama
    # pad row 0 only gets the lm_head contribution: exactly what the dense gradient holds
    grads = _check(model, {"model.embed_tokens.weight": SliceSpec(dim=0, start=0, end=1)}, dense, batch)
    assert_close(grads["model.embed_tokens.weight"], dense["model.embed_tokens.weight"][:1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("num_chunks", [3, 7])
def test_every_chunk_of_a_table_matches_dense(llama, num_chunks):
    model, batch, dense = llama
    table = make_chunk_table_from_model(model, num_chunks)
    assert sum(1 for c in table.chunks for s in c if not table.is_whole(s)) > 0
    for k in range(num_chunks):
        _check(model, table.grad_spec(k), dense, batch)


def test_gradients_accumulate_over_micro_batches(llama):
    model, batch, dense = llama
    spec = {
        "model.layers.0.mlp.up_proj.weight": SliceSpec(dim=0, start=2, end=9),
        "model.layers.0.mlp.down_proj.weight": True,
        "model.layers.0.post_attention_layernorm.weight": SliceSpec(dim=0, start=1, end=5),
    }
    _check(model, spec, dense, batch, passes=2)


def test_remove_restores_requires_grad(llama):
    model, batch, _ = llama
    handle = install(model, {"model.layers.0.self_attn.q_proj.weight": SliceSpec(dim=0, start=0, end=2)})
    assert not any(p.requires_grad for p in model.parameters())
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_checkpointing_gives_the_same_slice_gradients():
    model = _model("llama")
    batch = _batch()
    dense = _dense_grads(model, batch)
    model.activation_checkpointing_enable()
    model.train()
    spec = {
        "model.layers.1.self_attn.o_proj.weight": SliceSpec(dim=1, start=3, end=10),
        "model.layers.0.input_layernorm.weight": SliceSpec(dim=0, start=0, end=12),
        "model.layers.0.mlp.gate_proj.weight": True,
    }
    _check(model, spec, dense, batch)


def test_qwen2_linear_bias_slice():
    model = _model("qwen2")
    batch = _batch()
    dense = _dense_grads(model, batch)
    spec = {
        "model.layers.0.self_attn.q_proj.bias": SliceSpec(dim=0, start=5, end=19),
        "model.layers.1.self_attn.v_proj.weight": SliceSpec(dim=0, start=1, end=4),
        "lm_head.weight": SliceSpec(dim=0, start=50, end=96),
    }
    _check(model, spec, dense, batch)


def test_gemma_one_plus_weight_norm_slice():
    model = _model("gemma")
    batch = _batch()
    dense = _dense_grads(model, batch)
    spec = {
        "model.layers.0.input_layernorm.weight": SliceSpec(dim=0, start=3, end=20),
        "model.norm.weight": SliceSpec(dim=0, start=10, end=24),
        "model.layers.1.mlp.up_proj.weight": SliceSpec(dim=1, start=0, end=6),
    }
    _check(model, spec, dense, batch)
    # Gemma's embedding subclass overrides forward (lookup * sqrt(hidden)), and lm_head is tied
    assert type(model.model.embed_tokens).__name__ == "GemmaTextScaledWordEmbedding"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _check(model, {"model.embed_tokens.weight": SliceSpec(dim=0, start=0, end=50)}, dense, batch)
    _check(model, {"model.embed_tokens.weight": SliceSpec(dim=1, start=4, end=9)}, dense, batch)


def test_on_grad_sees_every_contribution(llama):
    model, batch, dense = llama
    seen: dict[str, int] = {}

    def on_grad(name, g):
        seen[name] = seen.get(name, 0) + 1

    spec = {"model.embed_tokens.weight": SliceSpec(dim=0, start=0, end=8), "model.norm.weight": True}
    handle = install(model, spec, on_grad=on_grad)
    _loss(model, *batch).backward()
    handle.remove()
    # tied slice: one contribution from the embedding, one from lm_head; whole: one
    assert seen == {"model.embed_tokens.weight": 2, "model.norm.weight": 1}


def test_bad_specs_are_user_errors(llama):
    model, _, _ = llama
    with pytest.raises(ChunkftError, match="does not have"):
        install(model, {"nope.weight": True})
    with pytest.raises(ChunkftError, match="two different values"):
        install(model, {"lm_head.weight": True, "model.embed_tokens.weight": False})
    with pytest.raises(ChunkftError, match="out of bounds"):
        install(model, {"model.norm.weight": SliceSpec(dim=0, start=3, end=99)})
    assert all(p.requires_grad for p in model.parameters())


def test_install_on_a_fake_model():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "tie_word_embeddings": True}))
        spec = {
            "model.embed_tokens.weight": SliceSpec(dim=0, start=10, end=30),
            "model.layers.0.self_attn.q_proj.weight": SliceSpec(dim=1, start=0, end=5),
            "model.layers.0.input_layernorm.weight": SliceSpec(dim=0, start=2, end=9),
            "model.norm.weight": True,
        }
        handle = install(model, spec)
        ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        shapes = {n: tuple(g.shape) for n, g in handle.grads().items()}
        handle.remove()
    assert shapes == {
        "model.embed_tokens.weight": (20, 24),
        "model.layers.0.self_attn.q_proj.weight": (24, 5),
        "model.layers.0.input_layernorm.weight": (7,),
        "model.norm.weight": (24,),
    }


def test_install_on_a_fake_gemma_with_scaled_embedding():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = GemmaForCausalLM(GemmaConfig(**SMALL))
        spec = {"model.embed_tokens.weight": SliceSpec(dim=0, start=3, end=20), "model.norm.weight": SliceSpec(dim=0, start=0, end=5)}
        handle = install(model, spec)
        ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        shapes = {n: tuple(g.shape) for n, g in handle.grads().items()}
        handle.remove()
    assert shapes == {"model.embed_tokens.weight": (17, 24), "model.norm.weight": (5,)}


def _full_shape_outputs(model, batch, shapes: set[tuple[int, ...]]) -> list[str]:
    """Non-view tensors of a parameter's full shape created during backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.hits: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and tuple(t.shape) in shapes:
                        self.hits.append(f"{func} {tuple(t.shape)}")
            return out

    loss = _loss(model, *batch)
    with Watch() as watch:
        loss.backward()
    return watch.hits


def test_no_dense_gradient_is_ever_allocated(llama):
    model, batch, _ = llama
    params = dict(model.named_parameters())
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"]  # tied (96, 24); (24, 40)
    shapes = {tuple(params[n].shape) for n in names}
    # the detector sees the dense gradients when they are whole
    handle = install(model, {n: True for n in names})
    assert len(_full_shape_outputs(model, batch, shapes)) >= 2
    handle.remove()
    handle = install(
        model,
        {names[0]: SliceSpec(dim=0, start=10, end=90), names[1]: SliceSpec(dim=1, start=0, end=39)},
    )
    assert _full_shape_outputs(model, batch, shapes) == []
    assert set(handle.grads()) == set(names)
    handle.remove()


def test_chunked_loss_and_checkpointing_through_step_loss():
    """The runtime's step (planner.step): lm_head runs per token chunk under checkpoint."""
    from planner.step import enable_checkpointing, step_loss

    model = _model("llama")
    ids, labels = _batch()
    dense = _dense_grads(model, (ids, labels))
    enable_checkpointing(model)
    model.train()
    spec = {
        "model.embed_tokens.weight": SliceSpec(dim=0, start=20, end=80),  # tied: lm_head per chunk
        "model.layers.1.self_attn.q_proj.weight": SliceSpec(dim=1, start=2, end=14),
        "model.norm.weight": SliceSpec(dim=0, start=0, end=9),
    }
    handle = install(model, spec)
    step_loss(model, ids, labels, loss_chunk_tokens=5).backward()
    grads = handle.grads()
    handle.remove()
    for name, s in spec.items():
        want = dense[name].narrow(s.dim, s.start, s.end - s.start)
        assert_close(grads[name], want, rtol=1e-9, atol=1e-12, msg=name)


def test_norm_slice_under_saved_tensors_hooks(llama):
    """The planner's tracer runs the step under saved_tensors_hooks; a sliced norm weight's
    gradient (recomputed in backward) must still work there and equal the dense slice."""
    model, batch, dense = llama
    spec = {"model.layers.1.post_attention_layernorm.weight": SliceSpec(dim=0, start=2, end=19)}
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _check(model, spec, dense, batch)
    assert saved  # the hooks really were active
