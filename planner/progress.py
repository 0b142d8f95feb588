"""Progress bars on stderr for planning that can take more than a few seconds.

    with progress.showing(args.progress):     # True: always, False: never, None: when stderr is a TTY
        for k in progress.bar(groups, "trace chunk pattern"):   # "trace chunk pattern 3/64"
            ...

The CLI (`chunkft plan`, `chunkft size`, `chunkft fit`: `--progress / --no-progress`) turns
bars on for its block; library calls outside such a block show none. A bar writes to stderr only
(tqdm), so stdout (`--json` included) is the same with and without it. tqdm is imported only when
a bar is shown: a warm `chunkft fit` stays free of it.

`bar(items, what)` wraps an iterable (total known) and `counter(what, total=None)` counts events
by hand (`update()`), for searches whose length pruning decides. Both say what is being done
("trace chunk pattern 3/64", "rank plans for 2 GPUs: 7 evaluated").
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

_enabled: bool | None = False  # outside `showing`: no bars (library calls, tests)


@contextlib.contextmanager
def showing(enabled: bool | None) -> Iterator[None]:
    """Within the block bars are shown (True), not shown (False), or shown when stderr is a
    terminal (None, the CLI's default)."""
    global _enabled
    previous = _enabled
    _enabled = enabled
    try:
        yield
    finally:
        _enabled = previous


def active() -> bool:
    """Whether a bar made now would be shown."""
    if _enabled is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(_enabled)


class _Silent:
    """The bar when bars are off: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def counter(what: str, total: int | None = None, unit: str = "step") -> Any:
    """A bar to `update()` by hand (a context manager; closes on exit): `what` is its text."""
    if not active():
        return _Silent()
    return _bar_class()(total=total, desc=what, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                        mininterval=0.2, disable=False)


@functools.cache
def _bar_class() -> type:
    """tqdm without its monitor thread (`monitor_interval = 0`, tqdm's documented switch): a bar
    starts no thread, so planner.parallel_eval may still fork while one is shown."""
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0

    return Bar


def bar(items: Iterable[T], what: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
    """Iterate `items` with a bar reading "`what` i/n" (n: `total`, else len(items) if known)."""
    if not active():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with counter(what, total=total, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)


def add_argument(parser: Any) -> None:
    """`--progress / --no-progress` on a subcommand (default: when stderr is a terminal)."""
    import argparse

    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr for long planning, or none (default: when stderr is "
                             "a terminal); stdout is the same either way")
