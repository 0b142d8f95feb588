"""planner.step_store: traced steps held within a byte limit, the oldest dropped first."""

from dataclasses import dataclass

import numpy as np

from planner.evaluate import TracedStep
from planner.step_store import StepStore


@dataclass(frozen=True)
class Step:
    nbytes: int


def test_oldest_steps_go_first_once_the_limit_is_passed():
    store = StepStore(limit=100)
    store["a"], store["b"], store["c"] = Step(40), Step(40), Step(20)
    assert list(store) == ["a", "b", "c"] and store.bytes == 100
    store["d"] = Step(30)  # 130 > 100: "a" goes (b, c, d = 90)
    assert list(store) == ["b", "c", "d"] and store.bytes == 90
    store["b"] = Step(10)  # held again: replaced in place of its old size, now the newest
    assert list(store) == ["c", "d", "b"] and store.bytes == 60
    store["huge"] = Step(500)  # larger than the limit: everything else goes, it stays
    assert list(store) == ["huge"] and store.bytes == 500 and store["huge"].nbytes == 500
    assert store.pop("missing") is None and store.get("missing") is None
    store.clear()
    assert len(store) == 0 and store.bytes == 0 and "huge" not in store


def test_a_traced_step_counts_its_arrays_and_per_op_tuples():
    live = np.zeros((6, 1000), dtype=np.int64)
    step = TracedStep(live=live, reserved=np.zeros(1000, dtype=np.int64), flops=1,
                      phases=(None,) * 1000, layers=(0,) * 1000, host_live=np.zeros((2, 1000), dtype=np.int64))
    assert step.nbytes == 6 * 8000 + 8000 + 2 * 8000 + 8 * 2000
