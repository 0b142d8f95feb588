"""planner.cache: `chunkft fit` on a warm disk cache answers the same, without torch or
transformers; corrupt or stale entries are never trusted; `chunkft cache clear`; the codec."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planner import cache
from planner import evaluate as ev
from planner.chunks import ChunkTable, SliceSpec, make_chunk_table
from planner.cli import main
from planner.recipe import Recipe
from planner.schema import Component, Phase, Tier
from planner.trace import StepShape

ROOT = Path(__file__).resolve().parents[1]

FIT_ARGS = ["--seq", "64", "--gpu", "1GiB", "--chunks", "2,4", "--json"]

# Runs `chunkft` in a fresh process, then reports on stderr which heavy packages it imported.
WRAPPER = """
import json, sys
from planner.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
sys.stderr.write("HEAVY-MODULES " + json.dumps(heavy[:5]) + "\\n")
sys.exit(code)
"""


def _chunkft(*argv: str) -> tuple[int, str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    marker = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY-MODULES ")]
    assert marker, proc.stderr[-2000:]
    return proc.returncode, proc.stdout, json.loads(marker[-1].split(" ", 1)[1])


def _fit_in_process(capsys, *argv: str) -> tuple[int, str]:
    ev.clear_caches()  # the process's own caches would answer before the disk cache is asked
    code = main(["fit", *argv])
    return code, capsys.readouterr().out


def _entries(directory: Path, kind: str) -> list[Path]:
    return sorted((directory / f"v{cache.FORMAT_VERSION}" / kind).glob("*.npz"))


# ------------------------------------------------------------------------------- whole command

def test_warm_fit_imports_neither_torch_nor_transformers_and_answers_the_same(tmp_path, tiny_llama_config, capsys):
    cache_dir = tmp_path / "cache"
    code, cold, heavy = _chunkft("fit", tiny_llama_config, *FIT_ARGS, "--cache-dir", str(cache_dir))
    assert code == 0 and "torch" in heavy  # the cold run traced the model
    for kind in ("trace", "layout", "chunks", "model"):
        assert _entries(cache_dir, kind), kind
    # The key holds a digest of planner's and runtime's sources: in a checkout others edit, an edit
    # between two runs makes the second one cold again (and the one after it warm).
    previous = cold
    for _ in range(3):
        code, warm, heavy = _chunkft("fit", tiny_llama_config, *FIT_ARGS, "--cache-dir", str(cache_dir))
        assert code == 0
        if heavy == []:
            break
        previous = warm
    assert heavy == [], "a warm `chunkft fit` imported torch or transformers"
    assert json.loads(warm) == json.loads(previous) and warm == previous
    # --no-cache: the same answer, traced afresh, and the cache is left as it was
    before = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.npz")}
    code, fresh = _fit_in_process(capsys, tiny_llama_config, *FIT_ARGS, "--no-cache")
    assert code == 0 and fresh == previous
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.npz")} == before


def test_corrupt_or_foreign_entries_are_ignored_and_rewritten(tmp_path, tiny_llama_config, capsys):
    cache_dir = tmp_path / "cache"
    code, cold = _fit_in_process(capsys, tiny_llama_config, *FIT_ARGS, "--cache-dir", str(cache_dir))
    assert code == 0
    files = sorted(cache_dir.rglob("*.npz"))
    traces = _entries(cache_dir, "trace")
    assert len(traces) >= 2
    # a flipped byte, a truncated file, an empty one, and an entry of another key under this name
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:100])
    files[2].write_bytes(b"")
    traces[0].write_bytes(traces[1].read_bytes())
    damaged = {p: p.read_bytes() for p in (files[0], files[1], files[2], traces[0])}
    code, again = _fit_in_process(capsys, tiny_llama_config, *FIT_ARGS, "--cache-dir", str(cache_dir))
    assert code == 0 and again == cold
    for path, bad in damaged.items():
        assert path.read_bytes() != bad, f"{path.name} was not rewritten"
    # and the rewritten entries are good: a third run reads them all
    code, third = _fit_in_process(capsys, tiny_llama_config, *FIT_ARGS, "--cache-dir", str(cache_dir))
    assert third == cold


def test_default_directory_follows_xdg_cache_home(tmp_path, tiny_llama_config, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_dir() == tmp_path / "xdg" / "chunkft"
    code, _ = _fit_in_process(capsys, tiny_llama_config, *FIT_ARGS)
    assert code == 0 and _entries(tmp_path / "xdg" / "chunkft", "trace")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_dir() == tmp_path / "home" / ".cache" / "chunkft"


def test_cache_clear_removes_only_its_entries(tmp_path, tiny_llama_config, capsys):
    cache_dir = tmp_path / "cache"
    assert _fit_in_process(capsys, tiny_llama_config, *FIT_ARGS, "--cache-dir", str(cache_dir))[0] == 0
    mine = tmp_path / "cache" / "notes.txt"
    mine.write_text("not the cache's")
    assert main(["cache", "info", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "trace" in out
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    assert "cleared" in capsys.readouterr().out
    assert not list(cache_dir.rglob("*.npz")) and mine.read_text() == "not the cache's"
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "never-made")]) == 0  # nothing there: fine
    capsys.readouterr()


@pytest.mark.parametrize("argv", [["fit", "--cache-dir"], ["cache", "info", "--cache-dir"]])
def test_a_cache_dir_that_is_a_file_is_one_line_error(tmp_path, capsys, argv):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = main([*argv, str(afile)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("chunkft: error: ")
    assert "--cache-dir" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- pieces

def test_deferred_model_spec_knows_what_the_warm_path_needs_and_builds_the_config_on_use(tmp_path, tiny_llama_config):
    from planner.model import resolve_model

    # transformers changes a config's nested rope_scaling dict in place: the key is taken before
    rope = tmp_path / "rope.json"
    rope.write_text(json.dumps({**json.loads(Path(tiny_llama_config).read_text()), "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                "rope_type": "llama3"}}))
    with cache.using(tmp_path / "cache"):
        first = resolve_model(str(rope))
        again = resolve_model(str(rope))
    assert type(again) is not type(first) and again.fingerprint() == first.fingerprint()
    assert again.config.to_dict() == first.config.to_dict()

    with cache.using(tmp_path / "cache"):
        cold = resolve_model(tiny_llama_config)
        warm = resolve_model(tiny_llama_config)
    assert type(cold) is not type(warm)  # the second is answered from the cache
    assert warm.__dict__["_config"] is None
    assert warm.fingerprint() == cold.fingerprint() and warm.num_layers == cold.num_layers == 4
    assert warm.config_value("max_position_embeddings") == 256
    assert warm.__dict__["_config"] is None  # still not built
    assert warm.config.to_dict() == cold.config.to_dict()
    assert warm.fingerprint() == cold.fingerprint()
    two = dataclasses.replace(warm, config=cold.config_for(2), num_layers=2)
    assert two.num_layers == 2 and two.config.num_hidden_layers == 2
    assert two.fingerprint() == dataclasses.replace(cold, config=cold.config_for(2), num_layers=2).fingerprint()
    with cache.using(None):  # no cache: an ordinary spec
        assert type(resolve_model(tiny_llama_config)) is type(cold)


def test_codec_round_trips_planner_values(tmp_path):
    live = np.arange(len(Component) * 5, dtype=np.int64).reshape(len(Component), 5)
    step = ev.TracedStep(live=live, reserved=np.array([1, 2, 3, 4, 5], dtype=np.int64), flops=10**18,
                         phases=(Phase.FORWARD,) * 3 + (Phase.BACKWARD,) * 2, layers=(None, 0, 1, 1, None), least=7)
    layout = ev.ParamLayout(named_shapes=(("a.weight", (4, 8), 2), ("b.0.w", (8,), 2)), elem_bytes=2,
                            layer_prefix="b", num_layers=1, layer_weight_bytes=16)
    table = make_chunk_table([("a.weight", (4, 8), 2), ("b", (8,), 2)], 3)
    other = {"nan": math.nan, "inf": -math.inf, 3: (Tier.GPU, SliceSpec(dim=0, start=1, end=2)),
             "s": frozenset({1, 2}), "recipe": Recipe(), "shape": StepShape(seq_len=8), "i": np.int64(5)}
    with cache.using(tmp_path):
        for kind, key, value in (("trace", ("k", 1), step), ("layout", "k", layout), ("chunks", ("k",), table),
                                 ("model", {"x": [1, 2.5, None]}, other)):
            cache.store(kind, key, value)
            back = cache.load(kind, key)
            assert type(back) is type(value)
            if kind == "trace":
                for f in dataclasses.fields(step):
                    a, b = getattr(step, f.name), getattr(back, f.name)
                    assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, f.name
                assert back.live.dtype == np.int64 and all(isinstance(p, Phase) for p in back.phases)
            elif kind == "model":
                assert math.isnan(back["nan"]) and back["inf"] == -math.inf
                assert {k: v for k, v in back.items() if k != "nan"} == {k: v for k, v in other.items() if k != "nan"}
            else:
                assert back == value
        assert isinstance(cache.load("chunks", ("k",)), ChunkTable)
        assert cache.load("chunks", ("other key",)) is None


def test_what_cannot_be_encoded_is_not_cached_and_no_cache_means_no_files(tmp_path):
    with cache.using(tmp_path):
        cache.store("model", "k", {"f": object()})
        cache.store("model", "k2", np.array([object()]))
        assert cache.load("model", "k") is None and cache.load("model", "k2") is None
        assert not list(tmp_path.rglob("*.npz"))
    cache.store("model", "k", 1)  # no cache in use: nothing written anywhere
    assert cache.load("model", "k") is None


def test_entries_are_never_unpickled(tmp_path):
    with cache.using(tmp_path):
        cache.store("model", "k", {"a": np.arange(3)})
        path = next(tmp_path.rglob("*.npz"))
        with np.load(path) as npz:
            meta = npz["__meta__"]
        np.savez(path, a0=np.array([{"x": 1}], dtype=object), __meta__=meta)  # an object array: pickled
        assert cache.load("model", "k") is None


def test_key_holds_versions_and_sources(monkeypatch, tmp_path):
    env = cache.environment()
    assert {"torch", "transformers", "numpy", "chunkft", "python", "sources", "format"} <= set(env)
    assert env["torch"] and env["transformers"]
    runtime = {p.name for p in cache.source_files() if p.parent.name == "runtime"}
    assert {"subgrad.py", "lora.py"} <= runtime  # what the tracer runs is in the key
    with cache.using(tmp_path):
        cache.store("model", "k", 1)
        assert cache.load("model", "k") == 1
        monkeypatch.setattr(cache, "environment", lambda: {**env, "transformers": "0.0.0"})
        assert cache.load("model", "k") is None  # another transformers: another key


def test_clear_caches_empties_the_process_caches(tiny_llama_config):
    from planner.model import resolve_model

    ev.param_layout(resolve_model(tiny_llama_config), "bf16")
    assert ev._LAYOUTS
    ev.clear_caches()
    assert not ev._LAYOUTS and not ev._TABLES and not ev._TRACES


def test_fit_path_modules_import_no_torch():
    """The modules `chunkft fit` imports before a trace is needed load neither torch nor transformers."""
    code = ("import sys, planner.cli as c; c.build_parser(); import planner.fit, planner.evaluate, planner.cache, "
            "planner.model, planner.memory, planner.train_axes, planner.activations, planner.optim_step, "
            "planner.trace, planner.recipe, planner.streaming; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
