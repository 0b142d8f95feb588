"""`chunkft fit --max seq|batch`: the search finds the largest fitting value on its grid, and the
CLI's answers fit while the next grid value does not."""

from __future__ import annotations

import json
import random

import pytest

from planner.cli import main
from planner.fit_max import SEQ_QUANTUM, search_largest
from tests.test_fit_cli import TINY_LLAMA


def test_search_finds_the_largest_fitting_grid_value_against_brute_force():
    rng = random.Random(0)
    for _ in range(2000):
        quantum = rng.choice([1, SEQ_QUANTUM])
        limit = rng.choice([1, 7, 130, 1000, 70000]) if quantum == 1 else rng.choice([128, 1024, 262144])
        start = rng.randint(1, limit)
        threshold = rng.randint(0, limit + 3)  # fits iff value <= threshold
        value, est, calls = search_largest(lambda v: ("est", v) if v <= threshold else None, start=start,
                                           limit=limit, quantum=quantum)
        grid = sorted({start} | set(range(quantum, limit + 1, quantum)))
        want = max((g for g in grid if g <= threshold), default=None)
        assert value == want and est == (None if want is None else ("est", want)), (quantum, limit, start, threshold)
        assert calls <= 2 * len(grid).bit_length() + 2  # logarithmic, not a scan


@pytest.mark.parametrize("axis", ["seq", "batch"])
def test_cli_answers_fit_and_the_next_value_does_not(tmp_path, capsys, axis):
    from planner.evaluate import evaluate
    from planner.model import resolve_model
    from planner.strategy import Budget, Strategy
    from planner.trace import StepShape

    config = {**TINY_LLAMA, "max_position_embeddings": 1024}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    gpu = "48MiB"
    code = main(["fit", str(path), "--max", axis, "--gpu", gpu, "--seq", "256", "--batch", "1", "--dtype", "fp32",
                 "--chunks", "2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["axis"] == axis
    model = resolve_model(str(path))
    budget = Budget(gpu_bytes=48 * 2**20)
    answered = [row for row in doc["rows"] if row["largest"] is not None]
    assert answered and any(1 < row["largest"] < row["limit"] for row in answered)
    for row in answered:
        strategy = Strategy.from_json(row["strategy"])
        value, step = row["largest"], (SEQ_QUANTUM if axis == "seq" else 1)

        def shape(v):
            return StepShape(batch=1, seq_len=v, dtype="fp32") if axis == "seq" else StepShape(
                batch=v, seq_len=256, dtype="fp32")

        assert evaluate(model, shape(value), strategy, _hw()).fits(budget), row["label"]
        if value < row["limit"]:
            nxt = (value // step + 1) * step
            assert not evaluate(model, shape(nxt), strategy, _hw()).fits(budget), row["label"]
        assert row["estimate"]["strategy"] == row["strategy"]


def _hw():
    from planner.fit import DEFAULT_HARDWARE
    from planner.hardware import hardware

    return hardware(DEFAULT_HARDWARE)
