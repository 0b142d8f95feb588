"""Evaluate many strategies of one model, the steps they trace made ahead, in parallel processes.

After the imports, a cold `chunkft fit`, `chunkft size` or `chunkft plan` spends its time tracing
the real model code (fake tensors) and replaying the traces through the allocator model, once per
distinct traced step: checkpointing on or off, loss chunking, streamed weights, the recipe, and
with exact chunk traces every chunk pattern. `evaluate_all` lists the traced steps evaluating
the strategies will read (planner.evaluate.trace_requests), keeps those neither held in this
process nor in the disk cache, and batch by batch (BATCH_STEPS steps) makes them ahead, then
evaluates the batch's strategies here, in order, as a serial run does:

    estimates = evaluate_all(model, shape, strategies, hw, jobs=resolve_jobs("auto"))

Steps that share one fake trace (they differ only in GPU kind or streamed weights) are made one
after the other in one process, so the trace is made once: evaluated strategy by strategy, a
step whose graph planner.evaluate no longer holds (it holds a few) is traced again. The solver
does the same per chunk count (`make_ahead`, planner.solve.solve_model).

With `jobs` > 1 a batch's steps are shared out between this process and forked workers. A
worker is a fork of this process after the model was resolved (nothing is imported or built
again); it makes its traced steps with planner.evaluate.traced_step, sends them back through a
pipe and exits, and this process holds them as its own. Every estimate is then computed here by
the same function from the same traced steps, so the answer is the same whatever `jobs` is
(tests hold jobs=2 against jobs=1). A worker that fails (an error, a lost pipe) costs only
time: the evaluation traces what is missing itself, and any error is raised there as a serial
run raises it.

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


BATCH_STEPS = 256
"""Traced steps `evaluate_all` makes ahead at a time: the batch's strategies are evaluated before
the next batch is traced, so the steps are still held in memory (planner.step_store bounds them in
bytes) whatever the number of strategies (a tiny model's `size` with exact chunk traces asks for
~400 steps), and the progress bar moves batch by batch."""


def evaluate_all(model: "ModelSpec", shape: "StepShape", strategies: Sequence["Strategy"], hw: Any, *,
                 chunk_traces: str = "auto", jobs: int = 1, what: str = "evaluate strategies") -> list["Estimate"]:
    """[evaluate(model, shape, s, hw, chunk_traces) for s in strategies], in batches whose traced
    steps are made ahead in up to `jobs` processes (module doc); `what`: the progress bar's text."""
    from planner import progress
    from planner.evaluate import evaluate

    out: list["Estimate"] = []
    with progress.counter(what, total=len(strategies), unit="strategy") as bar:
        for batch, requests in _batches(model, shape, strategies, hw, chunk_traces):
            _make(model, shape, requests, jobs)
            for s in batch:
                out.append(evaluate(model, shape, s, hw, chunk_traces=chunk_traces))
                bar.update(1)
    return out


def prepare_traces(model: "ModelSpec", shape: "StepShape", strategies: Sequence["Strategy"], hw: Any, *,
                   chunk_traces: str = "auto", jobs: int = 1) -> int:
    """Make the first batch of traced steps evaluating `strategies` reads that are not held yet
    (at most BATCH_STEPS) in up to `jobs` processes; returns how many were made in workers."""
    _, requests = next(_batches(model, shape, strategies, hw, chunk_traces), (None, []))
    return _make(model, shape, requests, jobs)


def _batches(model, shape, strategies: Sequence["Strategy"], hw: Any, chunk_traces: str):
    """(strategies, their traced steps not held yet) in runs of at most BATCH_STEPS steps, in order."""
    seen: set[tuple] = set()
    batch: list = []
    pending: list[dict] = []
    for s in strategies:
        missing = _missing(model, shape, s, hw, chunk_traces, seen)
        if batch and len(pending) + len(missing) > BATCH_STEPS:
            yield batch, pending
            batch, pending = [], []
        batch.append(s)
        pending += missing if len(missing) <= BATCH_STEPS else []  # more than a batch: traced as evaluated
    if batch:
        yield batch, pending


def make_ahead(model: "ModelSpec", shape: "StepShape", strategies: Sequence["Strategy"], hw: Any, *,
               chunk_traces: str = "auto", jobs: int = 1) -> int:
    """Make every traced step evaluating `strategies` reads that is not held yet, grouped by fake
    trace, in up to `jobs` processes (module doc): what the solver does before each chunk count.
    Returns how many steps workers made."""
    seen: set[tuple] = set()
    requests = [r for s in strategies for r in _missing(model, shape, s, hw, chunk_traces, seen)]
    return _make(model, shape, requests, jobs)


def make_requests(model: "ModelSpec", shape: "StepShape", requests: Sequence[dict], *, jobs: int = 1) -> int:
    """`make_ahead` for `traced_step` requests listed by the caller (planner.rank_step.chunk_requests:
    the sharded solver's chunk patterns). Returns how many steps workers made."""
    return _make(model, shape, _not_held(model, shape, list(requests), set()), jobs)


def _missing(model, shape, strategy: "Strategy", hw: Any, chunk_traces: str, seen: set) -> list[dict]:
    """The `traced_step` requests evaluating `strategy` makes whose steps are neither in `seen`
    nor held in this process or the disk cache; their keys join `seen`."""
    from planner.evaluate import trace_requests

    try:
        requests = trace_requests(model, shape, strategy, hw, chunk_traces=chunk_traces)
    except ChunkftError:  # refused when it is evaluated, in order, as serially
        return []
    return _not_held(model, shape, requests, seen)


def _not_held(model, shape, requests: list[dict], seen: set) -> list[dict]:
    """`requests` whose steps are neither in `seen` nor held in this process or the disk cache;
    their keys (with `least`) join `seen`."""
    from planner.evaluate import holds_trace, request_keys

    missing = []
    for request in requests:
        key, _ = request_keys(model, shape, request)
        least = request.get("least", True)
        if (key, least) not in seen:
            seen.add((key, least))
            if not holds_trace(key, request.get("recipe"), least):
                missing.append(request)
    return missing


def _make(model, shape, requests: list[dict], jobs: int) -> int:
    """Make `requests` (traced_step keyword arguments), those sharing a fake trace one after the
    other: this process's share here, the others' in forked workers, whose steps are then held
    here (all here where there are fewer than two shares). Returns how many workers made."""
    if not requests:
        return 0
    from planner import progress
    from planner.evaluate import traced_step

    groups = _groups(model, shape, requests)
    shares = _shares(groups, jobs) or [[r for g in groups for r in g]]

    def make(share: list[dict]) -> list:
        for request in share:
            traced_step(model, shape, **request)
        return []

    workers: list[_Worker] = []
    try:
        workers += [_Worker.start(lambda share=share: make(share)) for share in shares[1:]]
        total = sum(len(share) for share in shares)
        where = f" in {len(shares)} processes" if len(shares) > 1 else ""
        with progress.counter(f"trace {total} steps{where}", total=total, unit="step") as bar:
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


def _groups(model, shape, requests: list[dict]) -> list[list[dict]]:
    """`requests` by the fake trace they share (planner.evaluate.request_keys), in order."""
    from planner.evaluate import request_keys

    groups: dict[tuple, list[dict]] = {}
    for request in requests:
        groups.setdefault(request_keys(model, shape, request)[1], []).append(request)
    return list(groups.values())


def _shares(ordered: list[list[dict]], jobs: int) -> list[list[dict]]:
    """Requests per process (this one first) from their `_groups`: a group stays together, groups
    in order, split in runs of about equal size (neighbouring chunk patterns share the template
    layers planner.replicate keeps); none where fewer than two processes would work."""
    if jobs <= 1 or len(ordered) < 2 or not fork_is_safe():
        return []
    count = min(jobs, len(ordered))
    total = sum(len(g) for g in ordered)
    shares: list[list[dict]] = [[] for _ in range(count)]
    done, i = 0, 0
    for group in ordered:
        while i < count - 1 and shares[i] and done >= total * (i + 1) / count:
            i += 1
        shares[i].extend(group)
        done += len(group)
    return [share for share in shares if share]


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
