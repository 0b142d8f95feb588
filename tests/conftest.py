"""Suite-wide test settings, and the tiny Llama config several tests plan and trace."""

import json

import pytest
import torch

# A 4-layer Llama small enough to trace every chunk pattern in well under a second.
TINY_LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.fixture
def tiny_llama_config(tmp_path) -> str:
    """TINY_LLAMA_CONFIG written as a model directory's config.json; the file's path."""
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_LLAMA_CONFIG))
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """The tests run tiny models: one intra-op thread is fastest, and on a shared 2-core
    machine two threads that spin-wait on each other make a step 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def private_fit_cache(tmp_path_factory):
    """`chunkft fit` keeps a disk cache in $XDG_CACHE_HOME/chunkft (planner.cache): the suite and
    the subprocesses it starts use one of their own, never the user's."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
