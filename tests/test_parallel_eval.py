"""planner.parallel_eval: traced steps made ahead in forked workers change no answer.

Forking is only done in a process with no other thread (pytest-xdist workers have some), so
the parallel path runs in fresh processes here: `chunkft fit` / `chunkft size` with --jobs 2
print byte for byte what --jobs 1 prints, and a script holds evaluate_all(jobs=2) against a
serial evaluation, checks that workers made traced steps, and that a failing worker costs
nothing but time."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from planner.cli import main
from planner.errors import ChunkftError
from planner.parallel_eval import MAX_AUTO_JOBS, fork_is_safe, prepare_traces, resolve_jobs

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys
from planner import evaluate as ev
from planner.fit import fit_strategies
from planner.hardware import hardware
from planner.model import resolve_model
from planner.parallel_eval import _Worker, evaluate_all, prepare_traces
from planner.recipe import Recipe
from planner.trace import StepShape

model, shape, hw = resolve_model(sys.argv[1]), StepShape(batch=1, seq_len=64, dtype="bf16"), hardware("rtx4090")
strategies = fit_strategies((2,), Recipe(), None, "none")
made = prepare_traces(model, shape, strategies, hw, jobs=2)
held = sorted(map(repr, ev.held_traces()[0]))
parallel = [e.to_json() for e in evaluate_all(model, shape, strategies, hw, jobs=2)]
ev.clear_caches()
serial = [e.to_json() for e in evaluate_all(model, shape, strategies, hw, jobs=1)]
serial_held = sorted(map(repr, ev.held_traces()[0]))
failed = _Worker.start(lambda: 1 / 0).result()
killed = _Worker.start(lambda: os._exit(3)).result()
fine = _Worker.start(lambda: [1, 2]).result()
stuck = _Worker.start(lambda: list(range(10**6)))  # more than a pipe holds: it waits for a reader
stuck.abandon()  # an error in this process: the worker is stopped and reaped, not left blocked
try:
    os.waitpid(stuck.pid, os.WNOHANG)
    reaped = False
except ChildProcessError:
    reaped = True
print(json.dumps({"made": made, "same": parallel == serial, "rows": len(serial), "held_same": held == serial_held,
                  "failed": failed, "killed": killed, "fine": fine, "reaped": reaped}))
"""


def _python(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc.stdout


def test_workers_make_the_traces_and_the_estimates_equal_a_serial_run(tiny_llama_config):
    out = json.loads(_python("-c", SCRIPT, tiny_llama_config).splitlines()[-1])
    assert out["made"] > 0  # the exact chunk patterns of C=2 and the one-chunk steps, shared out
    assert out["rows"] == 6 and out["same"] and out["held_same"]  # fit's rows for chunks 2
    assert out["failed"] is None and out["killed"] is None and out["fine"] == [1, 2] and out["reaped"]


@pytest.mark.parametrize("argv", [["fit", "--seq", "64", "--gpu", "1GiB", "--chunks", "2", "--json"],
                                  ["size", "--seq", "64", "--max-gpus", "4", "--chunk-traces", "bound"]],
                         ids=["fit", "size"])  # size's exact chunk traces of a tiny model take ~90 s: bound here
def test_cli_answers_byte_for_byte_the_same_with_two_jobs(tiny_llama_config, argv):
    argv = [argv[0], tiny_llama_config, *argv[1:], "--no-cache", "--no-progress"]
    one = _python("-m", "planner.cli", *argv, "--jobs", "1")
    two = _python("-m", "planner.cli", *argv, "--jobs", "2")
    assert one == two and len(one) > 200


PLAN_SCRIPT = r"""
import contextlib, io, json, sys
from pathlib import Path
from planner import evaluate as ev, rank_step
from planner.cli import main

config, out = sys.argv[1], Path(sys.argv[2])
result = {}
for name, extra in (("one GPU", []), ("two GPUs", ["--gpus-per-node", "2"])):
    runs = []
    for jobs in ("1", "2"):
        ev.clear_caches()
        rank_step._PREPARED.clear()
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["plan", config, "--seq", "64", "--gpu", "64MiB", "--chunks", "4", *extra, "-o", str(out),
                         "--no-cache", "--progress", "--jobs", jobs])
        runs.append((code, stdout.getvalue(), out.read_text(), "in 2 processes" in stderr.getvalue()))
    result[name] = {"same": runs[0][:3] == runs[1][:3], "code": runs[0][0], "chunkft": "ChunkFT C=4" in runs[0][1],
                    "forked": [r[3] for r in runs]}
print(json.dumps(result))
"""


def test_plans_are_the_same_with_two_jobs(tiny_llama_config, tmp_path):
    """One-GPU and sharded `plan` make each chunk count's steps ahead (exact chunk traces of C = 4
    here), in a forked worker with --jobs 2: the same stdout and the same plan file as one process
    making them itself."""
    out = json.loads(_python("-c", PLAN_SCRIPT, tiny_llama_config, str(tmp_path / "plan.json")).splitlines()[-1])
    for name in ("one GPU", "two GPUs"):
        assert out[name] == {"same": True, "code": 0, "chunkft": True, "forked": [False, True]}, name


def test_jobs_values():
    assert 1 <= resolve_jobs("auto") <= MAX_AUTO_JOBS and resolve_jobs(None) == resolve_jobs("auto")
    assert resolve_jobs("3") == 3 and resolve_jobs(1) == 1
    for bad in ("0", "-1", "1.5", "x", "", "2x"):
        with pytest.raises(ChunkftError, match="invalid --jobs"):
            resolve_jobs(bad)


def test_no_fork_while_another_thread_runs(tiny_llama_config):
    from planner.fit import fit_strategies
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.recipe import Recipe
    from planner.trace import StepShape

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not fork_is_safe()
        model = resolve_model(tiny_llama_config)
        made = prepare_traces(model, StepShape(batch=1, seq_len=64, dtype="bf16"),
                              fit_strategies((2,), Recipe(), None, "none"), hardware("rtx4090"), jobs=4)
        assert made == 0
    finally:
        stop.set()
        thread.join()


def test_bad_jobs_is_one_line_error(capsys):
    assert main(["fit", "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid --jobs '0'" in err


def test_a_plan_makes_each_fake_trace_once_and_answers_as_before(tiny_llama_config, monkeypatch):
    """solve_model makes each chunk count's steps ahead, grouped by fake trace: a graph is traced
    once however many strategies (streamed weights or not, state on GPU or host) read it, where
    strategy-by-strategy evaluation re-traced graphs dropped from evaluate's few held ones. The
    answer equals plain strategy-by-strategy evaluation."""
    from planner import evaluate as ev
    from planner import trace
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.solve import SearchSpace, solve, solve_model
    from planner.strategy import Budget
    from planner.trace import StepShape

    model, shape, hw = resolve_model(tiny_llama_config), StepShape(batch=1, seq_len=32), hardware("rtx4090")
    space = SearchSpace(chunk_counts=(8,), update_intervals=(1,), loss_chunk_tokens=(0,))
    budget = Budget(gpu_bytes=2**30)
    real, graphs = trace.trace_step, []
    monkeypatch.setattr(trace, "trace_step", lambda m, s, options: graphs.append(options.key()) or real(m, s, options))
    ev.clear_caches()
    made = solve_model(model, shape, hw, budget, space=space, chunk_traces="exact", prune=False)
    assert len(graphs) == len(set(graphs)) > 4  # C = 8: 16 graphs, 32 traces without make_ahead
    ev.clear_caches()
    plain = solve(space, lambda s: ev.evaluate(model, shape, s, hw, chunk_traces="exact"), budget, prune=False)
    assert [e.to_json() for e in made.estimates] == [e.to_json() for e in plain.estimates]
    assert made.best.strategy == plain.best.strategy
