"""Long planning shows progress on stderr (planner.progress), and `plan` / `size` keep their
estimates in the disk cache (planner.cache buckets): the same answers, byte for byte."""

import json

import pytest

from planner.cli import main

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": False}
# a sharded plan small enough to search in seconds: 2 ranks, exact chunk traces, C = 2
PARALLEL = ["--gpu", "1GiB", "--seq", "64", "--gpus-per-node", "2", "--chunks", "2", "--state", "host",
            "--checkpointing", "on", "--no-shard-embeddings", "--chunk-traces", "exact"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("progress-tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_parallel_plan_shows_what_it_does_on_stderr_only(tiny, tmp_path, capsys):
    # first in this module: the chunk traces are made (and their bar shown) by this run
    code, loud, loud_err = _run(capsys, "plan", tiny, *PARALLEL, "--no-cache", "--progress",
                                "-o", str(tmp_path / "loud.json"))
    assert code == 0
    assert "rank plans for 2 GPUs" in loud_err
    assert "trace chunk patterns of C=2" in loud_err  # the exact traces, one bar per chunk count
    code, quiet, quiet_err = _run(capsys, "plan", tiny, *PARALLEL, "--no-cache", "--no-progress",
                                  "-o", str(tmp_path / "quiet.json"))
    assert code == 0
    assert "rank plans" not in quiet_err and "trace chunk patterns" not in quiet_err
    assert loud.replace("loud.json", "quiet.json") == quiet  # stdout is the same
    assert (tmp_path / "loud.json").read_bytes() == (tmp_path / "quiet.json").read_bytes()


def test_default_is_no_bar_when_stderr_is_not_a_terminal(tiny, tmp_path, capsys):
    code, _, err = _run(capsys, "plan", tiny, *PARALLEL, "--no-cache", "-o", str(tmp_path / "p.json"))
    assert code == 0
    assert "rank plans" not in err and "it/s" not in err and "plan/s" not in err


def test_fit_json_stays_clean_json_with_progress(tiny, capsys):
    code, quiet, _ = _run(capsys, "fit", tiny, "--seq", "64", "--chunks", "2,4", "--json", "--no-cache",
                          "--no-progress")
    assert code == 0
    code, loud, err = _run(capsys, "fit", tiny, "--seq", "64", "--chunks", "2,4", "--json", "--no-cache",
                           "--progress")
    assert code == 0
    assert "evaluate strategies" in err and "/7" in err  # 7 rows: full FT x 3, ChunkFT x 2 x 2
    assert loud == quiet
    assert json.loads(loud)["model"] == json.loads(quiet)["model"]


def test_size_shows_progress(tiny, capsys):
    code, quiet, _ = _run(capsys, "size", tiny, "--seq", "64", "--max-chunks", "4", "--no-cache", "--no-progress")
    assert code == 0
    code, loud, err = _run(capsys, "size", tiny, "--seq", "64", "--max-chunks", "4", "--no-cache", "--progress")
    assert code == 0
    assert "on one GPU" in err
    assert loud == quiet


def test_a_warm_plan_evaluates_nothing_and_answers_the_same(tiny, tmp_path, capsys, monkeypatch):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    code, cold, _ = _run(capsys, "plan", tiny, *PARALLEL, *cache, "-o", str(tmp_path / "cold.json"))
    assert code == 0
    code, info, _ = _run(capsys, "cache", "info", *cache)
    assert [line.split()[1] for line in info.splitlines() if line.split()[0] == "sharded"] == ["1"]
    import planner.evaluate
    import planner.sharding

    def nothing(*args, **kwargs):
        raise AssertionError("a warm plan evaluated a strategy")

    monkeypatch.setattr(planner.sharding, "_evaluate_sharded", nothing)
    monkeypatch.setattr(planner.evaluate, "evaluate", nothing)
    code, warm, _ = _run(capsys, "plan", tiny, *PARALLEL, *cache, "-o", str(tmp_path / "warm.json"))
    assert code == 0
    assert warm.replace("warm.json", "cold.json") == cold
    assert (tmp_path / "warm.json").read_bytes() == (tmp_path / "cold.json").read_bytes()


def test_a_warm_size_answers_the_same(tiny, tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    argv = ["size", tiny, "--seq", "64", "--max-chunks", "4"]
    code, cold, _ = _run(capsys, *argv, *cache)
    assert code == 0
    code, warm, _ = _run(capsys, *argv, *cache)
    code_off, off, _ = _run(capsys, *argv, "--no-cache")
    assert (code, code_off) == (0, 0)
    assert warm == cold == off


def test_buckets_are_checked_on_read_and_need_a_cache(tmp_path):
    from planner import cache

    assert cache.bucket("estimates", ("x",)) is None  # no cache in use: nothing kept
    with cache.using(tmp_path):
        cache.bucket("estimates", ("x",))["a"] = 1
    with cache.using(tmp_path):
        assert cache.bucket("estimates", ("x",)) == {"a": 1}
    [entry] = list((tmp_path / f"v{cache.FORMAT_VERSION}" / "estimates").glob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:-20])  # truncated: never trusted, recomputed
    with cache.using(tmp_path):
        assert cache.bucket("estimates", ("x",)) == {}


def test_one_gpu_plan_with_exact_chunk_traces(tiny, tmp_path, capsys):
    """--chunk-traces exact reaches the one-GPU solver: below 2B parameters auto is exact, so the
    plan's figures are auto's; the plan records the mode."""
    from planner.plan import load_plan

    argv = ["plan", tiny, "--gpu", "1GiB", "--seq", "64", "--chunks", "4", "--state", "host", "--no-cache"]
    assert _run(capsys, *argv, "-o", str(tmp_path / "auto.json"))[0] == 0
    assert _run(capsys, *argv, "--chunk-traces", "exact", "-o", str(tmp_path / "exact.json"))[0] == 0
    auto, exact = load_plan(tmp_path / "auto.json"), load_plan(tmp_path / "exact.json")
    assert exact.chunk_traces == "exact" and auto.chunk_traces == "auto"
    assert json.loads((tmp_path / "exact.json").read_text())["predicted"]["chunk_traces"] == "exact"
    assert exact.strategy == auto.strategy
    assert exact.peak_bytes == auto.peak_bytes and exact.reserved_bytes == auto.reserved_bytes


@pytest.mark.parametrize("command", ["plan", "fit", "size"])
def test_a_bad_chunk_trace_mode_is_one_line(tiny, capsys, command):
    code, out, err = _run(capsys, command, tiny, "--chunk-traces", "guess")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("chunkft: error: ") and "Traceback" not in err
    assert "'guess'" in err and "auto" in err and "exact" in err and "bound" in err
