"""Atomic file writes: write to a temporary file in the same directory, then rename.

A reader never sees a half-written plan, trace or checkpoint, and a crash leaves the previous
version intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from planner.errors import ChunkftError

# The process umask, read once: os.umask can only be read by setting it, which must not race
# with threads creating files (the optimizer's prefetch thread, a DataLoader worker).
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ChunkftError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the final file the mode an ordinary open() would.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        # A full disk (ENOSPC), a file-size limit (EFBIG), a directory in the way (EISDIR): the
        # previous file is intact (nothing was renamed over it); say so in one line.
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            reason = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
            raise ChunkftError(f"cannot write {str(path)!r}: {reason} (nothing was replaced)") from None
        raise


def check_output_file(path: str | os.PathLike, flag: str, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output file path that cannot become a file: an existing
    directory, a parent that is a file, or one of the command's own `inputs`."""
    if not str(path).strip():
        raise ChunkftError(f"invalid {flag} {str(path)!r}: give a file path, e.g. plan.json")
    path = Path(path)
    if path.is_dir():
        raise ChunkftError(f"invalid {flag} {str(path)!r}: it is a directory; give a file path, "
                           f"e.g. {str(path / 'NAME')!r}")
    _check_parent(path, flag)
    for other in inputs:
        if other is not None and _same_file(path, Path(other)):
            raise ChunkftError(f"invalid {flag} {str(path)!r}: it is an input of this command; "
                               "give another path so the input is not overwritten")
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Refuse an output directory path that is an existing file (or under one)."""
    if not str(path).strip():
        raise ChunkftError(f"invalid {flag} {str(path)!r}: give a directory path, e.g. report/")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ChunkftError(f"invalid {flag} {str(path)!r}: it is a file, not a directory; give a directory path")
    _check_parent(path, flag)
    return path


def _check_parent(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ChunkftError(f"invalid {flag} {str(path)!r}: {str(parent)!r} is a file, not a directory")
            return


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "JSON file"):
    """Read a JSON file; a missing or malformed file is a one-line ChunkftError."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ChunkftError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChunkftError(f"cannot read {what} {str(path)!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise ChunkftError(f"{what} {str(path)!r} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise ChunkftError(f"{what} {str(path)!r} is nested too deeply to be read; "
                           f"a {what} is a few levels deep") from None


def read_jsonl(path: str | os.PathLike, *, what: str = "JSON Lines file") -> list[dict]:
    """Read a JSON Lines file; a bad line is reported by its number."""
    rows: list[dict] = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChunkftError(f"{what} {str(path)!r} line {lineno} is not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise ChunkftError(f"{what} {str(path)!r} line {lineno} is nested too deeply to be read") from None
                if not isinstance(row, dict):
                    raise ChunkftError(f"{what} {str(path)!r} line {lineno} is not a JSON object")
                rows.append(row)
    except FileNotFoundError:
        raise ChunkftError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChunkftError(f"cannot read {what} {str(path)!r}: {e}") from None
    return rows
