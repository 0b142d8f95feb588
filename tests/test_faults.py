"""kill -9 anywhere in a checkpoint write or an optimizer-state write, then `--resume`: the run
ends bitwise where an uninterrupted run ends.

The run (a tiny Llama, 2 chunks, optimizer on the host with its fp32 state streamed span by
span to disk, a checkpoint after every step) executes in a forked child. A Python audit hook
(`sys.addaudithook`: the interpreter's own events for open, mkdir, rename, remove, rmtree,
chmod; nothing is patched) counts the file-system writes under OUT and sends the child SIGKILL
at the k-th one. A fresh forked child then runs the same command with `--resume`; its final
checkpoint (weights and every chunk's master and moments) must equal the uninterrupted run's,
bit for bit. Kill points are spread evenly over the checkpoint writes (step-N, its temporary
directory, `latest`, pruning) and the disk-state writes (optimizer-state span files).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import make_plan, write_data

STEPS = 3
KILLS_PER_KIND = 12
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.chmod"}


def _argv(plan, data, out, *extra):
    return ["run", str(plan), "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--checkpoint-every",
            "1", "--device", "cpu", "--no-progress", "--lr", "1e-3", *extra]


def _write_path(event: str, args: tuple) -> str | None:
    """The path a file-system write event touches, or None for reads and other events."""
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags is not None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return str(path) if writing and isinstance(path, (str, os.PathLike)) else None
    if event in WRITE_EVENTS and args and isinstance(args[0], (str, os.PathLike)):
        return str(args[0])  # os.rename: the source, e.g. the temporary that becomes step-N
    return None


def _in_child(argv: list[str], out: str, *, kill_at: int | None, log: str) -> int:
    """Fork; the child runs `chunkft run argv` (SIGKILLed at its `kill_at`-th write under OUT,
    or recording every such write to `log`). Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            torch.set_num_threads(1)  # no OpenMP thread pool inherited across fork
            sys.stderr = open(log + ".stderr", "w", buffering=1)  # pytest's capture is not fd 2
            sys.stdout = open(os.devnull, "w")
            seen = []

            def hook(event, args):
                path = _write_path(event, args)
                if path is None or not path.startswith(out):
                    return
                seen.append(f"{event} {os.path.relpath(path, out)}")
                if kill_at is not None and len(seen) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            sys.addaudithook(hook)
            from planner.cli import main

            code = main(argv)
            if kill_at is None:
                with open(log, "w") as f:
                    json.dump(seen, f)
        except BaseException as e:  # noqa: BLE001 -- reported through the exit status and stderr
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {argv} did not finish in 120 s")
        time.sleep(0.02)


def _final(out) -> dict[str, torch.Tensor]:
    step = out / f"step-{STEPS:06d}"
    return {**{f"model/{k}": v for k, v in load_file(step / "model.safetensors").items()},
            **{f"optimizer/{k}": v for k, v in load_file(step / "optimizer.safetensors").items()}}


def _kill_points(events: list[str]) -> list[int]:
    """1-based indices into `events`: KILLS_PER_KIND spread evenly over the checkpoint writes
    and as many over the optimizer-state writes."""
    points = []
    for state in (False, True):
        idx = [i + 1 for i, e in enumerate(events) if ("optimizer-state" in e) == state]
        assert len(idx) >= KILLS_PER_KIND, events
        points += [idx[round(j * (len(idx) - 1) / (KILLS_PER_KIND - 1))] for j in range(KILLS_PER_KIND)]
    return sorted(set(points))


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="fork and audit hooks on Linux")
def test_kill_9_anywhere_in_a_write_then_resume_equals_the_uninterrupted_run(tmp_path):
    from planner.schema import Tier
    from planner.strategy import OptimizerDevice

    plan, _, _ = make_plan(tmp_path, chunks=2, optimizer_device=OptimizerDevice.HOST, state_tier=Tier.DISK)
    assert json.loads(plan.read_text())["strategy"]["state_tier"] == "disk"
    data = write_data(tmp_path / "train.jsonl")

    ref = tmp_path / "ref"
    status = _in_child(_argv(plan, data, ref), str(ref), kill_at=None, log=str(tmp_path / "events.json"))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (tmp_path / "events.json.stderr").read_text()
    events = json.loads((tmp_path / "events.json").read_text())
    assert any(e.startswith("os.rename step-") or ".step-" in e for e in events)  # checkpoint writes seen
    assert any("optimizer-state" in e for e in events)  # disk-state writes seen
    reference = _final(ref)

    points = _kill_points(events)
    assert len(points) >= 20
    for k in points:
        out = tmp_path / f"kill{k}"
        status = _in_child(_argv(plan, data, out), str(out), kill_at=k, log=str(tmp_path / f"k{k}"))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, events[k - 1], status)
        status = _in_child(_argv(plan, data, out, "--resume"), str(out), kill_at=None, log=str(tmp_path / f"r{k}"))
        stderr = (tmp_path / f"r{k}.stderr").read_text()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (k, events[k - 1], stderr)
        got = _final(out)
        assert got.keys() == reference.keys(), (k, events[k - 1])
        differ = [name for name in reference if not torch.equal(got[name], reference[name])]
        assert not differ, (k, events[k - 1], differ[:3])
        assert not list(out.glob(".*.tmp")), (k, events[k - 1])  # nothing half-written is left behind
