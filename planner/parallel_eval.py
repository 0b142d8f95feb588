"""Evaluate many strategies of one model, the steps they trace made ahead in parallel processes.

After the imports, a cold `chunkft fit` or `chunkft size` spends its time tracing the real model
code (fake tensors) and replaying the traces through the allocator model, once per distinct
traced step: checkpointing on or off, loss chunking, streamed weights, the recipe, and with
exact chunk traces every chunk pattern. `evaluate_all` first lists the traced steps evaluating
the strategies will read (planner.evaluate.trace_requests), keeps those neither held in this
process nor in the disk cache, and with `jobs` > 1 shares them out between this process and
forked workers; then it evaluates every strategy here, in order, as a serial run does:

    estimates = evaluate_all(model, shape, strategies, hw, jobs=resolve_jobs("auto"))

A worker is a fork of this process after the model was resolved (nothing is imported or built
again); it makes its traced steps with planner.evaluate.traced_step, sends them back through a
pipe and exits, and this process holds them as its own. Every estimate is then computed here by
the same function from the same traced steps, so the answer is the same whatever `jobs` is
(tests hold jobs=2 against jobs=1). A worker that fails (an error, a lost pipe) costs only
time: the evaluation traces what is missing itself, and any error is raised there as a serial
run raises it. Requests that share one fake trace (they differ only in GPU kind or streamed
weights) go to one process.

Fork is used only where it is safe: on Linux, in a process with no other Python thread running
at the fork (a thread could hold a lock that the worker would then wait on forever: pytest-xdist
workers have such threads). `jobs` is an upper bound; where forking is not safe the steps are
made here, one after the other. The pipe carries pickles
between this process and its own forks only: nothing a user hands in is unpickled.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

from planner.errors import ChunkftError

if TYPE_CHECKING:
    from planner.model import ModelSpec
    from planner.strategy import Estimate, Strategy
    from planner.trace import StepShape

MAX_AUTO_JOBS = 8
"""`--jobs auto` uses at most this many processes (a fit or size has a handful of trace groups)."""


def fork_is_safe() -> bool:
    """Linux, and no Python thread but this one (pytest-xdist workers, tqdm's monitor: not safe)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and threading.active_count() == 1


def resolve_jobs(flag: str | int | None) -> int:
    """`--jobs` as a process count: "auto" (or None) is the CPUs this process may run on, at most
    MAX_AUTO_JOBS (1 off Linux); an integer >= 1 as given."""
    if flag is None or flag == "auto":
        if not sys.platform.startswith("linux"):
            return 1
        return max(1, min(MAX_AUTO_JOBS, len(os.sched_getaffinity(0))))
    try:
        jobs = int(flag)
    except (TypeError, ValueError):
        jobs = 0
    if jobs < 1 or str(flag).strip() != str(jobs):
        raise ChunkftError(f"invalid --jobs {flag!r}: must be 'auto' or a whole number of processes >= 1")
    return jobs


def add_argument(parser: Any) -> None:
    """`--jobs N|auto` on a planning subcommand."""
    parser.add_argument("--jobs", default="auto", metavar="N",
                        help="at most this many processes trace distinct steps in parallel (forked workers, "
                             "Linux, when no other thread runs): a number >= 1, or auto (default: the CPUs "
                             f"available, at most {MAX_AUTO_JOBS})")


def evaluate_all(model: "ModelSpec", shape: "StepShape", strategies: Sequence["Strategy"], hw: Any, *,
                 chunk_traces: str = "auto", jobs: int = 1, what: str = "evaluate strategies") -> list["Estimate"]:
    """[evaluate(model, shape, s, hw, chunk_traces) for s in strategies], the traced steps made
    ahead in `jobs` processes (module doc); `what`: the progress bar's text (planner.progress)."""
    from planner import progress
    from planner.evaluate import evaluate

    prepare_traces(model, shape, strategies, hw, chunk_traces=chunk_traces, jobs=jobs)
    return [evaluate(model, shape, s, hw, chunk_traces=chunk_traces)
            for s in progress.bar(strategies, what, unit="strategy")]


def prepare_traces(model: "ModelSpec", shape: "StepShape", strategies: Sequence["Strategy"], hw: Any, *,
                   chunk_traces: str = "auto", jobs: int = 1) -> int:
    """Make the traced steps evaluating `strategies` reads that are not held yet, in up to
    `jobs` processes; returns how many were made in workers (0: nothing to share out)."""
    if jobs <= 1 or not fork_is_safe():
        return 0
    shares = _shares(model, shape, strategies, hw, chunk_traces, jobs)
    if len(shares) < 2:
        return 0
    from planner import progress
    from planner.evaluate import traced_step

    def make(share: list[dict]) -> list:
        for request in share:
            traced_step(model, shape, **request)
        return []

    workers: list[_Worker] = []
    try:
        workers += [_Worker.start(lambda share=share: make(share)) for share in shares[1:]]
        total = sum(len(share) for share in shares)
        with progress.counter(f"trace {total} steps in {len(shares)} processes", total=total, unit="step") as bar:
            for request in shares[0]:
                traced_step(model, shape, **request)
                bar.update(1)
            for share, worker in zip(shares[1:], workers):
                worker.result()  # None (failed): evaluate traces what is missing
                bar.update(len(share))
    except BaseException:  # an error or Ctrl-C here: no worker is left behind, blocked on its pipe
        for worker in workers:
            worker.abandon()
        raise
    return sum(len(share) for share in shares[1:])


def _shares(model, shape, strategies: Sequence["Strategy"], hw: Any, chunk_traces: str, jobs: int) -> list[list[dict]]:
    """The traced steps to make, per process (this one first): requests sharing a fake trace
    stay together, the largest groups first, each to the process with the fewest so far."""
    from planner.evaluate import holds_trace, request_keys, trace_requests

    seen: set[tuple] = set()
    groups: dict[tuple, list[dict]] = {}
    for s in strategies:
        try:
            requests = trace_requests(model, shape, s, hw, chunk_traces=chunk_traces)
        except ChunkftError:  # refused when it is evaluated, in order, as serially
            continue
        for request in requests:
            key, graph_key = request_keys(model, shape, request)
            if key in seen:
                continue
            seen.add(key)
            if not holds_trace(key, request["recipe"]):
                groups.setdefault(graph_key, []).append(request)
    if len(groups) < 2:
        return []
    shares: list[list[dict]] = [[] for _ in range(min(jobs, len(groups)))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    return shares


class _Worker:
    """A forked process running one call; its result (and the traces it made) come back by pipe."""

    def __init__(self, pid: int, fd: int):
        self.pid, self.fd = pid, fd  # fd: the pipe's read end, None once read or abandoned

    @classmethod
    def start(cls, call: Callable[[], list]) -> "_Worker":
        from planner.evaluate import held_traces

        full, lean = held_traces()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            os.close(read_fd)
            code = 0
            try:
                from planner import progress

                with progress.showing(False):
                    result = call()
                after_full, after_lean = held_traces()
                payload = pickle.dumps(("ok", result, {k: v for k, v in after_full.items() if k not in full},
                                        {k: v for k, v in after_lean.items() if k not in lean}),
                                       protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which redoes the share
                payload, code = pickle.dumps(("error", f"{type(e).__name__}: {e}")), 1
            try:
                with os.fdopen(write_fd, "wb") as f:
                    f.write(payload)
            finally:
                os._exit(code)
        os.close(write_fd)
        return cls(pid, read_fd)

    def abandon(self) -> None:
        """Stop the worker (if it still runs) and reap it; its result is not read."""
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)

    def result(self) -> list | None:
        """The call's result, its traces held here; None if the worker failed."""
        from planner.evaluate import hold_traces

        fd, self.fd = self.fd, None
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        os.waitpid(self.pid, 0)
        try:
            status, *rest = pickle.loads(data)  # written by this process's own fork (class doc)
        except Exception:  # noqa: BLE001 - a worker killed mid-write: redo its share
            return None
        if status != "ok":
            return None
        result, full, lean = rest
        hold_traces(full, lean)
        return result
