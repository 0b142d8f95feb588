"""Suite-wide test settings."""

import pytest
import torch


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
