"""The README's "Try it on a CPU" walkthrough, run as written: the commands are read from the
fenced block under that heading (so the README cannot drift from what is tested) and run
in-process, in order, in a temporary directory holding a copy of examples/tiny/. Each step's
output is then checked for real values: the plan fits its budget, the timeline replays it,
the run learns and traces its steps, compare's errors are small, and report writes its own
directory beside compare's without touching it."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from planner.cli import main
from planner.plan import load_plan
from planner.schema import Tier

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Try it on a CPU"
MIB = 2**20


# Environment settings a README command may start with: torch's thread count, which the suite
# already pins to 1 in-process (tests/conftest.py), so the in-process run matches the README's.
ALLOWED_ENV = {"OMP_NUM_THREADS": "1"}


def readme_commands(text: str) -> list[list[str]]:
    """The `chunkft ...` commands of the first fenced block under HEADING, as argv lists
    (without "chunkft"); a line ending in a backslash continues on the next, and a leading
    NAME=value must be one of ALLOWED_ENV."""
    section = text.split(f"\n{HEADING}\n", 1)
    if len(section) != 2:
        raise AssertionError(f"README.md has no {HEADING!r} section")
    block = re.search(r"```[a-z]*\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    if block is None:
        raise AssertionError(f"no fenced block under {HEADING!r}")
    lines = block.group(1).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    out = []
    for argv in commands:
        while "=" in argv[0] and not argv[0].startswith("-"):
            name, value = argv.pop(0).split("=", 1)
            assert ALLOWED_ENV.get(name) == value, f"unexpected environment setting {name}={value}"
        assert argv[0] == "chunkft", f"the walkthrough runs chunkft only, not {argv[0]!r}"
        out.append(argv[1:])
    return out


def test_readme_commands_parse():
    text = "intro\n\n## Try it on a CPU\n\nprose\n\n```bash\nchunkft fit m --gpu 1GiB\n" \
           "OMP_NUM_THREADS=1 chunkft run p.json \\\n  --steps 2\n```\n\n```bash\nchunkft size\n```\n## Next\n"
    assert readme_commands(text) == [["fit", "m", "--gpu", "1GiB"], ["run", "p.json", "--steps", "2"]]
    with pytest.raises(AssertionError, match="unexpected environment setting"):
        readme_commands(text.replace("OMP_NUM_THREADS=1", "CHUNKFT_FAST=1"))


def flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Run every README command in a fresh directory; returns (directory, {command: (argv, stdout)})."""
    import contextlib
    import io
    import os

    import torch

    assert torch.get_num_threads() == int(ALLOWED_ENV["OMP_NUM_THREADS"])  # tests/conftest.py
    commands = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [c[0] for c in commands] == ["fit", "plan", "simulate", "run", "compare", "report"]
    work = tmp_path_factory.mktemp("walkthrough")
    shutil.copytree(ROOT / "examples" / "tiny", work / "examples" / "tiny")
    here = os.getcwd()
    outputs = {}
    os.chdir(work)
    try:
        for argv in commands:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(argv))
            assert code == 0, f"chunkft {shlex.join(argv)} exited {code}:\n{out.getvalue()}{err.getvalue()}"
            outputs[argv[0]] = (argv, out.getvalue())
    finally:
        os.chdir(here)
    return work, outputs


def test_plan_fits_the_budget_the_walkthrough_gives(walkthrough):
    work, outputs = walkthrough
    fit_argv, fit_out = outputs["fit"]
    assert "<- recommended" in fit_out and "recommended: " in fit_out
    argv, _ = outputs["plan"]
    budget = int(flag(argv, "--gpu").removesuffix("MiB")) * MIB
    plan = load_plan(work / flag(argv, "-o"))
    assert plan.strategy.label() in fit_out.split("recommended: ", 1)[1].splitlines()[0]
    assert 0 < plan.peak_bytes[Tier.GPU] <= plan.reserved_bytes <= budget
    assert plan.shape.seq_len == int(flag(argv, "--seq")) and plan.shape.batch == int(flag(argv, "--batch"))
    assert plan.shape.dtype == flag(argv, "--dtype") == flag(fit_argv, "--dtype")


def test_timeline_replays_the_plan(walkthrough):
    work, outputs = walkthrough
    argv, out = outputs["simulate"]
    plan = load_plan(work / argv[1])
    rows = [json.loads(line) for line in (work / flag(argv, "-o")).read_text().splitlines()]
    assert rows[0]["kind"] == "timeline" and rows[0]["plan_fingerprint"] == plan.fingerprint()
    assert max(r["allocated"] for r in rows[1:] if r["tier"] == "gpu") == plan.peak_bytes[Tier.GPU]
    assert "plan predicted" in out


def test_run_learns_and_traces_its_first_steps(walkthrough):
    work, outputs = walkthrough
    argv, out = outputs["run"]
    steps, traced = int(flag(argv, "--steps")), int(flag(argv, "--trace-steps"))
    done = re.search(r"done: step (\d+), last loss ([\d.]+), .*eval loss ([\d.]+)", out)
    assert done is not None, out
    assert int(done.group(1)) == steps
    # The first step's loss is 6.18 (a uniform guess over 384 ids: 5.95); the run must have learned.
    assert float(done.group(2)) < 4.0 and float(done.group(3)) < 4.0
    rows = [json.loads(line) for line in (work / flag(argv, "--trace")).read_text().splitlines()]
    assert rows[0]["kind"] == "trace"
    step_ends = [r for r in rows[1:] if r["event"] == "step_end"]
    assert sorted({r["step"] for r in step_ends}) == list(range(traced))
    assert all(r["peak"] > 0 for r in step_ends if r["tier"] == "gpu")
    assert (work / flag(argv, "--out") / "latest").exists()


def test_compare_errors_are_small(walkthrough):
    work, outputs = walkthrough
    argv, out = outputs["compare"]
    report = work / flag(argv, "-o", "report/compare")
    for name in ("report.html", "report.md", "peaks.csv", "phases.csv", "memory_gpu.png"):
        assert (report / name).stat().st_size > 0, name
    with open(report / "peaks.csv") as f:
        peaks = {(r["tier"], r["metric"]): r for r in csv.DictReader(f)}
    # On a CPU one heap holds every tier: the process rows are the like-for-like ones.
    for key in (("process", "cpu-equivalent"), ("process", "rise in step")):
        row = peaks[key]
        assert int(row["measured_bytes"]) > MIB and abs(float(row["relative_error"])) < 0.25, row
    assert "process cpu-equivalent peak: predicted" in out


def test_report_writes_beside_compare_without_touching_it(walkthrough):
    work, outputs = walkthrough
    argv, out = outputs["report"]
    fit_dir = work / flag(argv, "-o", "report/fit")
    compare_dir = work / flag(outputs["compare"][0], "-o", "report/compare")
    assert fit_dir != compare_dir
    assert (fit_dir / "report.md").read_text().startswith(f"# chunkft: what fits for {argv[1]}")
    assert (compare_dir / "report.md").read_text().startswith("# chunkft: predicted vs measured memory")
    with open(fit_dir / "fit_map.csv") as f:
        fit_map = list(csv.DictReader(f))
    seqs, batches = flag(argv, "--seq").split(","), flag(argv, "--batch").split(",")
    assert {(r["seq_len"], r["batch"]) for r in fit_map} == {(s, b) for s in seqs for b in batches}
