"""Traced steps held in memory, bounded by the bytes they hold rather than by their count.

planner.evaluate keeps every step it traced and replayed, so that the many strategies of one
model read each step once. A count cannot bound both ends: a 1B model's step holds about a
quarter of a megabyte, and a one-GPU plan with exact chunk traces reads up to ~140 of them per
chunk count (17 chunk patterns x checkpointing x chunked loss x streamed weights); a 405B
model's step holds a few megabytes. Once more than `limit` bytes are held, the steps held
longest are dropped first (they are made again, or read from the disk cache, when asked for):

    store = StepStore(512 * 2**20)
    store[key] = step          # step.nbytes: what it holds
    if key in store: step = store[key]
"""

from __future__ import annotations

from typing import Any, Iterator

TRACE_STORE_BYTES = 512 * 2**20
"""What planner.evaluate's stores of traced steps hold at most (each of the full and lean ones)."""


class StepStore:
    """A dict of traced steps (anything with an `nbytes`), oldest dropped past `limit` bytes."""

    def __init__(self, limit: int = TRACE_STORE_BYTES):
        self.limit = limit
        self._steps: dict[Any, Any] = {}
        self._sizes: dict[Any, int] = {}
        self.bytes = 0
        """Bytes held now: the sum of the held steps' `nbytes`."""

    def __contains__(self, key: Any) -> bool:
        return key in self._steps

    def __getitem__(self, key: Any) -> Any:
        return self._steps[key]

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._steps)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._steps.get(key, default)

    def items(self):
        return self._steps.items()

    def __setitem__(self, key: Any, step: Any) -> None:
        """Hold `step`, dropping the oldest steps until the store is within its limit again (the
        new step itself is always held, even one larger than the limit)."""
        self.pop(key)
        size = int(step.nbytes)
        while self._steps and self.bytes + size > self.limit:
            self.pop(next(iter(self._steps)))
        self._steps[key] = step
        self._sizes[key] = size
        self.bytes += size

    def pop(self, key: Any) -> Any:
        """Drop `key` (no error when not held); returns its step or None."""
        step = self._steps.pop(key, None)
        self.bytes -= self._sizes.pop(key, 0)
        return step

    def clear(self) -> None:
        self._steps.clear()
        self._sizes.clear()
        self.bytes = 0
