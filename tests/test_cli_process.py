"""`chunkft` as its own process (planner.cli.entry, what the console script runs): it prints
what main() prints in process, a reader that closes stdout early ends it quietly, and import
warnings about library parts the planner never runs (torchao's CUDA kernels) are not shown."""

import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fit_argv(tiny_llama_config):
    return ["fit", tiny_llama_config, "--seq", "64", "--gpu", "1GiB", "--chunks", "2", "--chunk-traces", "bound",
            "--no-cache", "--no-progress"]


def test_process_prints_what_main_prints_and_no_import_noise(fit_argv, capsys):
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *fit_argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    code = main(fit_argv)
    out, _ = capsys.readouterr()
    assert proc.returncode == code == 0
    assert proc.stdout == out and "recommended:" in out
    assert "Failed to load" not in proc.stderr and "register_constant" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_closed_stdout_ends_quietly(fit_argv):
    proc = subprocess.Popen([sys.executable, "-m", "planner.cli", *fit_argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the answer is printed (`chunkft fit | head -0`)
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err
