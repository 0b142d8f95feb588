"""An output directory belongs to one run: who owns it, what it holds, what a resume must match.

`claim_output(out, resume=..., overwrite=...)` is what `chunkft run` does with `--out` before
it builds anything:
- it takes an exclusive lock on OUT/.lock (fcntl.flock, released when the process exits, kill -9
  included): a second run on the same OUT while the first is alive is refused;
- a run without `--resume` refuses an OUT that already holds checkpoints (another run's
  results are never replaced by accident); `--overwrite` deletes them first;
- it deletes what interrupted writes left behind (runtime.checkpoint.remove_stale_temporaries)
  and the scratch directories of an earlier process (optimizer state on disk, staged
  gradients): a run's state comes from a checkpoint or starts fresh, never from leftovers;
- it names the run: a new id, or the id of the checkpoint a resume continues.

`run_arguments(args)` are the command-line values that change what a run computes. They are
stored in every checkpoint; `check_same_arguments` refuses a resume whose values differ, in one
line listing each difference, unless the user names it in `--allow-changed` (the new value is
then taken). The plan, model and data are compared by fingerprint elsewhere and cannot be
changed on resume.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from planner.errors import ChunkftError

LOCK = ".lock"
RESULT_ARGUMENTS = ("steps", "lr", "schedule", "warmup_steps", "weight_decay", "max_grad_norm", "grad_accum", "seed")
"""`chunkft run` arguments that change the trained weights (the plan, data and tokenizer are
fingerprinted separately)."""
_SCRATCH = ("optimizer-state", "grad-staging")


@dataclass(frozen=True, slots=True)
class ClaimedOutput:
    path: Path
    run_id: str
    latest: Path | None
    """The checkpoint a resume continues (None: the run starts at step 0)."""
    removed: tuple[Path, ...]
    """Leftovers of interrupted writes that were deleted."""
    lock: IO
    """OUT/.lock, flock'ed: closing it (release(), or the process ending) frees OUT."""

    def release(self) -> None:
        self.lock.close()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_arguments(args) -> dict:
    """The values of RESULT_ARGUMENTS on the command line (JSON-able)."""
    return {name: getattr(args, name) for name in RESULT_ARGUMENTS}


def parse_allow_changed(text: str | None) -> frozenset[str]:
    """`--allow-changed steps,lr` -> {"steps", "lr"} (flag spellings with dashes accepted)."""
    if not text:
        return frozenset()
    names = {part.strip().lstrip("-").replace("-", "_") for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(RESULT_ARGUMENTS))
    if unknown:
        raise ChunkftError(f"--allow-changed {text!r}: {', '.join(unknown)} is not a resumable argument; valid: "
                           f"{', '.join(n.replace('_', '-') for n in RESULT_ARGUMENTS)}")
    return frozenset(names)


def check_same_arguments(mine: dict, theirs: dict | None, *, where: str, allow: frozenset[str]) -> None:
    """Refuse (one line) when `mine` differs from the checkpoint's `theirs` outside `allow`."""
    if theirs is None:
        raise ChunkftError(f"{where} records no run arguments (it predates this runtime's resume checks); "
                           f"start a new run with another --out")
    differs = [name for name in RESULT_ARGUMENTS if name not in allow and mine.get(name) != theirs.get(name)]
    if differs:
        listed = ", ".join(f"{_flag(n)} {mine.get(n)} (checkpoint: {theirs.get(n)})" for n in differs)
        raise ChunkftError(f"{where} was written with other arguments: {listed}; resume with the checkpoint's "
                           f"values, or pass --allow-changed {','.join(n.replace('_', '-') for n in differs)} "
                           f"to continue with this command line's")


def _lock(out: Path) -> IO:
    try:
        f = open(out / LOCK, "a")
    except OSError as e:
        raise ChunkftError(f"cannot lock output directory {str(out)!r}: {e.strerror or e}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ChunkftError(f"output directory {str(out)!r} is in use by another chunkft run; wait for it to "
                           f"finish or choose another --out") from None
    return f


def claim_output(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> ClaimedOutput:
    """Lock `out_dir` for this process and decide where the run starts (see the module docstring)."""
    from runtime.checkpoint import latest_checkpoint, read_state, remove_stale_temporaries

    out = Path(out_dir)
    assert not (resume and overwrite), "runtime.run_cli.check_args refuses --resume with --overwrite"
    lock = _lock(out)
    try:
        latest = latest_checkpoint(out)
        previous = sorted(p for p in out.glob("step-*") if p.is_dir())
        if (latest is not None or previous) and not resume:
            if not overwrite:
                held = latest.name if latest is not None else previous[-1].name
                raise ChunkftError(f"output directory {str(out)!r} already holds a run's checkpoints (latest "
                                   f"{held}); pass --resume to continue it, --overwrite to delete them and "
                                   f"start again, or choose another --out")
            for old in previous:
                shutil.rmtree(old)
            (out / "latest").unlink(missing_ok=True)
            latest = None
        for scratch in _SCRATCH:  # state comes from a checkpoint or starts fresh, never from scratch files
            shutil.rmtree(out / scratch, ignore_errors=True)
        removed = tuple(remove_stale_temporaries(out))
        run_id = None
        if latest is not None:
            run_id = read_state(latest).get("run_id")
        return ClaimedOutput(path=out, run_id=run_id or uuid.uuid4().hex[:16], latest=latest, removed=removed,
                             lock=lock)
    except BaseException:
        lock.close()
        raise
