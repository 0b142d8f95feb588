"""Model intake: presets match published parameter counts, meta builds allocate nothing,
depth overrides stay consistent, and every kind of bad spec is a one-line ChunkftError."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import torch

from planner.errors import ChunkftError
from planner.model import list_presets, resolve_model

# part of CI's second pass on the newest transformers (.ci/run): the tracer meets HF model code here
pytestmark = pytest.mark.newest_deps

# Published parameter counts (model cards / safetensors index totals).
PUBLISHED_PARAMETERS = {
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.02e9,
    "llama2-70b": 68.98e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "llama3.1-8b": 8.03e9,
    "llama3.1-70b": 70.6e9,
    "llama3.1-405b": 405.9e9,
    "mistral-7b": 7.25e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-72b": 72.7e9,
    "gemma2-9b": 9.24e9,
    "phi3-mini": 3.82e9,
    "llama3.2-1b": 1.24e9,
}

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128, "tie_word_embeddings": False,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_required_preset_exists():
    assert set(PUBLISHED_PARAMETERS) <= set(list_presets())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_preset_parameter_count_matches_published(name):
    model = resolve_model(name).build()
    assert abs(n_params(model) / PUBLISHED_PARAMETERS[name] - 1) < 0.005


def test_meta_build_allocates_nothing_and_uses_dtype():
    model = resolve_model("llama3-8b").build()
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert n_params(model) == 8_030_261_248


def test_two_layer_meta_build_is_fast():
    spec = resolve_model("llama3-8b")
    spec.build(num_layers=2)  # first call imports the modeling module
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        spec.build(num_layers=2)
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.1  # about 3 ms measured here


def test_aliases_and_case_resolve_to_the_preset():
    a = resolve_model("meta-llama/Meta-Llama-3-8B")
    b = resolve_model("LLAMA3-8B")
    assert a.source == b.source == "preset"
    assert a.name == "meta-llama/Meta-Llama-3-8B"
    assert a.fingerprint() == b.fingerprint()
    assert a.num_layers == 32


def test_num_layers_override_changes_only_depth():
    spec = resolve_model("llama3-8b")
    full, two = spec.build(), spec.build(num_layers=2)
    # q,k,v,o: 4096*(4096+1024+1024+4096); gate,up,down: 3*4096*14336; two RMSNorms: 2*4096
    per_layer = 218_112_000
    assert n_params(full) - n_params(two) == 30 * per_layer
    assert spec.config.num_hidden_layers == 32  # the original config is untouched
    assert len(two.model.layers) == 2


def test_num_layers_override_keeps_per_layer_lists_consistent():
    spec = resolve_model("gemma2-9b")
    assert spec.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    cfg = spec.config_for(3)
    assert cfg.num_hidden_layers == 3
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert len(spec.build(num_layers=3).model.layers) == 3
    with pytest.raises(ChunkftError, match="num_layers 0"):
        spec.build(num_layers=0)


def test_layer_prefix(tmp_path):
    assert resolve_model("qwen2.5-7b").layer_prefix() == "model.layers"
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 2,
                                "vocab_size": 100, "n_positions": 64}))
    spec = resolve_model(str(gpt2))
    assert spec.num_layers == 3 and spec.layer_prefix() == "transformer.h"
    assert len(spec.build(num_layers=1).transformer.h) == 1


def test_config_directory_and_file(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, "transformers_version": "4.40.0"}))
    by_dir = resolve_model(str(d))
    by_file = resolve_model(str(d / "config.json"))
    assert (by_dir.source, by_file.source) == ("directory", "config")
    assert by_dir.num_layers == 3
    # volatile keys do not change the fingerprint; a real change does
    assert by_dir.fingerprint() == by_file.fingerprint()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_LLAMA, "_name_or_path": "x", "architectures": ["LlamaForCausalLM"]}))
    assert resolve_model(str(other)).fingerprint() == by_dir.fingerprint()
    other.write_text(json.dumps({**TINY_LLAMA, "hidden_size": 32}))
    assert resolve_model(str(other)).fingerprint() != by_dir.fingerprint()


def test_cpu_build_is_real_and_deterministic(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    spec = resolve_model(str(tmp_path))
    torch.manual_seed(0)
    a = spec.build(device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    b = spec.build(device="cpu", dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = a.model.layers[0].mlp.up_proj.weight
    assert w.device.type == "cpu" and w.dtype == torch.float32 and 0.01 < w.std().item() < 0.03
    logits = a(torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, 256) and torch.isfinite(logits).all()


FACTORY_MODULE = textwrap.dedent("""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

    class Net(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(n))

    def make(num_layers=4):
        return Net(num_layers)

    def fixed():
        return Net(2)

    def broken():
        raise RuntimeError("out of coffee")

    def not_a_module():
        return 42
""")


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "chunkft_test_factories.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "chunkft_test_factories"


def test_factory(factory_module):
    spec = resolve_model(f"{factory_module}:make")
    assert spec.source == "factory" and spec.config is None and spec.num_layers == 4
    assert spec.layer_prefix() == "blocks"
    model = spec.build(num_layers=2, device="meta")
    assert len(model.blocks) == 2 and model.embed.weight.device.type == "meta"
    assert model.embed.weight.dtype == torch.bfloat16
    assert spec.fingerprint() == resolve_model(f"{factory_module}:make").fingerprint()
    with pytest.raises(ChunkftError, match="takes no num_layers"):
        resolve_model(f"{factory_module}:fixed").build(num_layers=1)


def assert_one_line_error(spec: str, *fragments: str) -> str:
    with pytest.raises(ChunkftError) as info:
        resolve_model(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_factory_errors(factory_module):
    assert_one_line_error(f"{factory_module}:broken", "broken", "RuntimeError", "out of coffee")
    assert_one_line_error(f"{factory_module}:not_a_module", "not_a_module", "int", "not a torch.nn.Module")
    assert_one_line_error(f"{factory_module}:missing", "has no attribute 'missing'")
    assert_one_line_error("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'")


def test_bad_specs(tmp_path):
    assert_one_line_error("llama9-1t", "'llama9-1t'", "llama3-8b", "gemma2-9b")
    assert_one_line_error("", "preset")
    assert_one_line_error(str(tmp_path / "nope"), "does not exist")
    assert_one_line_error(str(tmp_path / "nope.json"), "does not exist")
    assert_one_line_error(str(tmp_path), "has no config.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "llama",')
    assert_one_line_error(str(bad), "not valid JSON")
    bad.write_text("[1, 2]")
    assert_one_line_error(str(bad), "not a JSON object")
    bad.write_text('{"hidden_size": 64}')
    assert_one_line_error(str(bad), "no \"model_type\"", "llama")
    bad.write_text('{"model_type": "llamaa"}')
    assert_one_line_error(str(bad), "unknown model_type 'llamaa'", "mistral")
    bad.write_text(json.dumps({**TINY_LLAMA, "hidden_size": "wide"}))
    assert_one_line_error(str(bad), "not a valid llama config", "hidden_size")
