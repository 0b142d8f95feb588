"""`chunkft fit` in process: exit codes, one-line errors, the JSON report's keys and values."""

import json

import pytest

from planner.cli import main
from planner.schema import Tier

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
# bf16 parameters of TINY_LLAMA: embed + lm_head 2 x 512 x 64, per layer q/o 64x64, k/v 32x64,
# gate/up/down 128x64 each, two norms of 64; final norm 64.
TINY_PARAMS = 2 * 512 * 64 + 4 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) + 64


def _run(capsys, *argv):
    code = main(["fit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


@pytest.mark.parametrize("argv, words", [
    (["--seq", "0"], ["sequence length 0"]),
    (["--seq", "-5"], ["sequence length -5"]),
    (["--batch", "0"], ["batch size 0"]),
    (["--dtype", "int8"], ["dtype 'int8'", "bf16, fp16, fp32"]),
    (["--gpu", "24XB"], ["'24XB'", "GiB"]),
    (["--gpu", "0"], ["'0'", "greater than zero"]),
    (["--host-ram=-3GiB"], ["'-3GiB'"]),
    (["--chunks", "4,x"], ["chunk count 'x'"]),
    (["--chunks", "1"], ["chunk count '1'", ">= 2"]),
    (["--hardware", "tpu9"], ["unknown GPU 'tpu9'", "rtx4090"]),
    (["no-such-model"], ["no-such-model", "llama3-8b"]),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, words):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("chunkft: error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_missing_and_malformed_config_files(capsys, tmp_path):
    code, _, err = _run(capsys, str(tmp_path / "absent" / "config.json"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = _run(capsys, str(bad))
    assert code == 2 and err.count("\n") == 1 and "config.json" in err


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--seq", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'abc'" in err


def test_tiny_model_json_report(capsys, tiny_config):
    code, out, err = _run(capsys, tiny_config, "--seq", "32", "--chunks", "2,4,8", "--gpu", "1GiB", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert {"model", "parameters", "shape", "budget", "budget_read_as", "hardware", "objective", "rows",
            "recommended", "recommended_label"} <= set(r)
    assert r["parameters"] == TINY_PARAMS and r["num_layers"] == 4
    assert r["shape"] == {"batch": 1, "seq_len": 32, "dtype": "bf16"}
    assert r["budget"] == {"gpu_bytes": 2**30, "host_bytes": None, "disk_bytes": None}
    assert r["budget_read_as"]["gpu"] == "1.00 GiB (1.07 GB)"
    labels = [row["label"] for row in r["rows"]]
    assert labels[:5] == ["full FT", "full FT, ckpt", "ChunkFT C=2, state host, ckpt",
                          "ChunkFT C=4, state host, ckpt", "ChunkFT C=8, state host, ckpt"]
    assert any("fp32 grads on host" in l for l in labels) and any("16-bit grads to host" in l for l in labels)
    for row in r["rows"]:
        assert set(row["peak_bytes"]) == {"gpu", "host", "disk"}
        assert sum(row["components"]["gpu"].values()) == row["peak_bytes"]["gpu"]
        assert row["reserved_bytes"] >= row["peak_bytes"]["gpu"]
        assert row["step_time_s"] > 0
        assert row["fits"]["host"] is None and row["fits"]["disk"] is None
    full = r["rows"][0]
    # full FT on the GPU holds at least 16-bit weights and gradients and 12 B/param of AdamW state
    assert full["peak_bytes"]["gpu"] >= (2 + 2 + 12) * TINY_PARAMS
    assert full["components"]["gpu"]["master"] == 4 * TINY_PARAMS
    assert full["components"]["gpu"]["optimizer"] == 8 * TINY_PARAMS
    assert full["peak_bytes"]["host"] == 0 and full["worst_chunk"] is None
    assert r["chunk_traces"] == "auto"
    chunked = [row["peak_bytes"]["gpu"] for row in r["rows"][2:5]]
    assert chunked[0] > chunked[1] > chunked[2]
    # ChunkFT keeps every chunk's fp32 master + moments in host memory (power-of-two pinned)
    for row in r["rows"][2:5]:
        assert row["peak_bytes"]["host"] >= 12 * TINY_PARAMS
        assert row["worst_chunk"] is not None
    assert r["recommended"] == 0 and r["recommended_label"] == "full FT"  # 1 GiB holds everything
    assert r["rows"][r["fastest"]]["step_time_s"] == min(row["step_time_s"] for row in r["rows"])


def test_bound_chunk_traces_match_exact_for_the_tiny_model(capsys, tiny_config):
    peaks = {}
    for mode in ("exact", "bound"):
        code, out, _ = _run(capsys, tiny_config, "--seq", "32", "--chunks", "2,4,8", "--chunk-traces", mode, "--json")
        assert code == 0
        peaks[mode] = [row["peak_bytes"]["gpu"] for row in json.loads(out)["rows"]]
    assert peaks["exact"][:2] == peaks["bound"][:2]  # C = 1 rows trace the same step either way
    # the one-trace bound sits within 0.1% below (sub-gradient leftovers) to 5% above exact
    for b, e in zip(peaks["bound"], peaks["exact"]):
        assert 0.999 * e <= b <= 1.05 * e


def test_tiny_model_text_report_and_nothing_fits(capsys, tiny_config):
    code, out, _ = _run(capsys, tiny_config, "--seq", "32", "--chunks", "2", "--gpu", "1MiB", "--host-ram", "64GB")
    assert code == 1
    assert "GPU budget: 1.00 MiB (0.00 GB)" in out
    assert "host RAM:   59.60 GiB (64.00 GB)" in out
    assert "nothing fits" in out
    code, out, _ = _run(capsys, tiny_config, "--seq", "32", "--chunks", "2", "--gpu", "1GiB")
    assert code == 0
    assert "recommended: full FT\n" in out and "<- recommended" in out
    assert "master" in out and "optimizer" in out


def test_default_is_llama3_8b_and_full_ft_does_not_fit_24gib(capsys):
    code, out, err = _run(capsys, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["model"] == "llama3-8b" and r["shape"] == {"batch": 1, "seq_len": 1024, "dtype": "bf16"}
    assert r["budget"]["gpu_bytes"] == 24 * 2**30
    rows = {row["label"]: row for row in r["rows"]}
    assert rows["full FT"]["fits"]["gpu"] is False
    assert rows["full FT, ckpt"]["fits"]["gpu"] is False
    chunk_rows = [row for label, row in rows.items() if label.startswith("ChunkFT")]
    assert any(row["fits"]["gpu"] for row in chunk_rows)
    # ChunkFT keeps the moving state small: more chunks, less GPU
    peaks = [row["peak_bytes"]["gpu"] for row in chunk_rows]
    assert peaks == sorted(peaks, reverse=True)
    # host tier holds every chunk's fp32 master + moments: at least 12 B/param
    assert all(row["peak_bytes"]["host"] >= 12 * r["parameters"] for row in chunk_rows)
    # bf16 weights alone are 14.96 GiB: every row that keeps them resident is above that
    assert all(row["peak_bytes"]["gpu"] > 14.96 * 2**30 for row in r["rows"])
    assert r["rows"][0]["peak_bytes"]["gpu"] >= 16 * 8.03e9
    assert Tier.GPU.value in r["rows"][0]["components"]
