"""`chunkft run` and its output directory: a run never reads or replaces state it does not own,
and `--resume` never silently ignores a changed argument."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from planner.cli import main
from runtime.checkpoint import latest_checkpoint
from tests.test_train import make_plan, write_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state")
    plan, _, _ = make_plan(tmp, chunks=2)
    return tmp, plan, write_data(tmp / "train.jsonl")


def run(setup, out, *argv):
    _, plan, data = setup
    return main(["run", str(plan), "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--lr", "1e-3", *map(str, argv)])


def weights(out):
    return load_file(latest_checkpoint(out) / "model.safetensors")


def test_resume_with_changed_arguments_is_refused_unless_named(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(setup, out, "--steps", 4) == 0
    done = weights(out)
    capsys.readouterr()
    # the case: a finished 4-step cosine run resumed with --steps 8 --lr 5e-3
    assert run(setup, out, "--steps", 8, "--lr", 5e-3, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was written with other arguments: --steps 8 (checkpoint: 4), --lr 0.005 " \
                                      "(checkpoint: 0.001)" in err and "--allow-changed steps,lr" in err
    assert latest_checkpoint(out).name == "step-000004"  # nothing was touched
    # naming one of the two is not enough
    assert run(setup, out, "--steps", 8, "--lr", 5e-3, "--resume", "--allow-changed", "steps") == 2
    assert "--lr 0.005 (checkpoint: 0.001)" in capsys.readouterr().err
    assert run(setup, out, "--steps", 8, "--lr", 5e-3, "--resume", "--allow-changed", "steps,lr") == 0
    assert "resumed run" in capsys.readouterr().out
    assert latest_checkpoint(out).name == "step-000008"
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["args"]["steps"] == 8 and state["args"]["lr"] == 5e-3
    # the new schedule ran: steps 5-8 at cosine(8) of 5e-3, not at the old schedule's LR 0
    meta = state["optimizer"]["meta"]
    assert meta["schedule"]["total_steps"] == 8 and meta["config"]["lr"] == 5e-3 and meta["global_step"] == 8
    after = weights(out)
    assert any(not torch.equal(after[k], done[k]) for k in done)


def test_an_output_directory_is_never_taken_over_silently(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(setup, out, "--steps", 2) == 0
    first = weights(out)
    run_id = json.loads((latest_checkpoint(out) / "state.json").read_text())["run_id"]
    capsys.readouterr()
    # a second run without --resume does not replace the first run's checkpoints
    assert run(setup, out, "--steps", 3, "--seed", 1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run's checkpoints (latest step-000002)" in err
    assert all(torch.equal(weights(out)[k], first[k]) for k in first)
    # --overwrite says so: a new run, a new id, the old checkpoints gone
    assert run(setup, out, "--steps", 3, "--seed", 1, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000003"]
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["run_id"] != run_id
    assert run(setup, out, "--steps", 3, "--resume", "--overwrite") == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_locked_output_directory_is_refused(setup, tmp_path, capsys):
    from runtime.outdir import claim_output

    out = tmp_path / "out"
    out.mkdir()
    held = claim_output(out, resume=False, overwrite=False)  # another live run owns OUT
    try:
        assert run(setup, out, "--steps", 1) == 2
        assert "is in use by another chunkft run" in capsys.readouterr().err
    finally:
        held.release()
    assert run(setup, out, "--steps", 1) == 0


def test_leftovers_of_a_killed_run_are_deleted_and_never_read(setup, tmp_path, capsys):
    out = tmp_path / "out"
    reference = tmp_path / "ref"
    assert run(setup, reference, "--steps", 3) == 0
    # what kill -9 leaves: a half-written checkpoint directory, a temporary `latest`, scratch state
    (out / ".step-000002.abcd.tmp").mkdir(parents=True)
    (out / ".step-000002.abcd.tmp" / "model.safetensors").write_bytes(b"\0" * 4096)
    (out / ".latest.x1y2.tmp").write_text("step-000002\n")
    (out / "optimizer-state").mkdir()
    (out / "optimizer-state" / "chunk00000.safetensors").write_bytes(b"not mine")
    capsys.readouterr()
    assert run(setup, out, "--steps", 3, "--resume") == 0
    printed = capsys.readouterr().out
    assert "left by an interrupted write" in printed and "no checkpoint" in printed
    assert not list(out.glob(".*.tmp"))
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0 (0 = no clipping), got -1.0"),
    (["--steps", "10000000000"], "--steps must be an integer in [1, 1000000000], got 10000000000"),
    (["--grad-accum", "0"], "--grad-accum must be an integer in [1, 1000000000], got 0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be an integer in [1, 1000000000], got 0"),
    (["--allow-changed", "lr"], "--allow-changed goes with --resume"),
    (["--resume", "--allow-changed", "lr,plan"], "plan is not a resumable argument; valid: steps, lr"),
])
def test_training_arguments_are_checked_before_anything_is_written(setup, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert run(setup, out, *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_trace_path_that_is_a_directory_is_refused_before_training(setup, tmp_path, capsys):
    (tmp_path / "traces").mkdir()
    assert run(setup, tmp_path / "out", "--trace", tmp_path / "traces") == 2
    err = capsys.readouterr().err
    assert "is a directory; give a file path such as traces/NAME.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_a_file_too_large_for_the_disk_stops_the_run_in_one_line(setup, tmp_path):
    # A real EFBIG from the kernel (RLIMIT_FSIZE in a forked child, SIGXFSZ ignored): the first
    # checkpoint's weights cannot be written. One line, exit 2, no checkpoint, nothing half-written.
    import os
    import resource
    import signal
    import sys

    out, err = tmp_path / "out", tmp_path / "stderr"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            sys.stderr = open(err, "w", buffering=1)  # pytest's capture is not fd 2
            sys.stdout = open(os.devnull, "w")
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
            code = run(setup, out, "--steps", 2, "--checkpoint-every", 1)
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    message = err.read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 2, message
    lines = [line for line in message.splitlines() if line.startswith("chunkft:")]
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0] and "step-000001" in lines[0], message
    assert "Traceback" not in message
    assert not list(out.glob("step-*")) and not list(out.glob(".*.tmp")) and not (out / "latest").exists()
