"""The planner's disk cache: traced steps, parameter layouts, chunk tables and resolved model
configs, so a repeated `chunkft fit` answers without importing torch or transformers.

    chunkft cache [info|clear] [--cache-dir DIR]

Where: `--cache-dir DIR`, else `$XDG_CACHE_HOME/chunkft`, else `~/.cache/chunkft`. `chunkft fit`
reads and writes it (`--no-cache` bypasses it); library calls use it only inside `using(dir)`.

What is kept (planner.evaluate and planner.model call `load` / `store`):
  - "trace":  planner.evaluate.TracedStep (trace_step + the CUDA allocator replay) per model
              fingerprint, step shape, TraceOptions.key(), sm, normalised alloc conf, streaming
              and recipe;
  - "layout": planner.evaluate.ParamLayout per fingerprint and dtype;
  - "chunks": planner.chunks.ChunkTable per fingerprint, dtype, chunk count, trainable set;
  - "pool":   planner.memory.side_stream_pool's (reserved, least) of the prefetch side stream per
              chunk state tensors, depth and alloc conf (an allocator replay and bisection);
  - "model":  what resolving a preset / config.json yields (fingerprint, depth, the config values
              checked before planning) per raw config content, so the warm path builds no
              transformers config (planner.model's deferred spec builds it on first real use);
  - "estimates": planner.evaluate's one-GPU Estimates per model fingerprint, step shape,
              hardware and chunk trace mode, a bucket of strategy -> Estimate (`bucket`; what
              `chunkft size` and `chunkft plan` evaluate: ~1,000 of them for `size`);
  - "sharded": planner.sharding's per-rank ShardedEstimates per model fingerprint, step shape,
              hardware and chunk trace mode, a bucket of (strategy, GPUs per node, nodes,
              embeddings apart) -> ShardedEstimate (the sharded searches of `size` and `plan`).

Every key also holds `environment()`: the torch, transformers, numpy and chunkft versions (read
from importlib.metadata, without importing them), the Python version, and a sha256 of the
planner's sources and the runtime modules they use (`source_files`), so an edit of the tracer or
a new release never reads an old answer. An entry is one `.npz` file written atomically
(planner.fsio): its arrays plus a `__meta__` member holding JSON (format version, kind, the full
key, the value, a sha256 of both); numpy arrays of the value are npz members, loaded with
allow_pickle=False; everything else is JSON with dataclasses and enums of planner's own modules
named and rebuilt field by field (a field added to TracedStep is carried without a change here).
Nothing is unpickled. On read the format, kind, key and digest must match, else the entry is
treated as absent and the caller's fresh result is written over it. A value that cannot be
encoded (a type the codec does not know) is simply not cached.

Known limitations: nothing evicts entries (an old key's files stay until `chunkft cache
clear`); a trace entry is a few hundred KiB (8B) to a few MiB (405B). Monkeypatching planner code
at run time is invisible to the key: tests that do so should not enable the cache. A recipe's
--optim / --precision other than chunkft's own still traces the optimizer step
(planner.optim_step, in-process cache only), so such a warm fit imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

FORMAT_VERSION = 1
KINDS = ("trace", "layout", "chunks", "pool", "model", "estimates", "sharded")
_VERSIONED_PACKAGES = ("torch", "transformers", "numpy", "chunkft")
_ROOT = Path(__file__).resolve().parents[1]
_SOURCE_DIRS = (_ROOT / "planner", _ROOT / "runtime")

_active: Path | None = None


# ---------------------------------------------------------------------------------------------
# Where


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/chunkft` (an absolute XDG_CACHE_HOME only, as the XDG spec says), else
    `~/.cache/chunkft`."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "chunkft"


def resolve_dir(flag: str | None) -> Path:
    """The cache directory for a `--cache-dir` value (None: `default_dir()`); a path that is a
    file (or under one) is a one-line error."""
    if flag is None:
        return default_dir()
    from planner.fsio import check_output_dir

    return check_output_dir(Path(flag).expanduser(), "--cache-dir")


@contextlib.contextmanager
def using(directory: str | os.PathLike | None) -> Iterator[None]:
    """Within the block the planner reads and writes the cache in `directory` (None: no cache);
    the buckets it filled (`bucket`) are written at the block's end."""
    global _active
    previous = _active
    _active = None if directory is None else Path(directory)
    try:
        yield
    finally:
        flush()
        _active = previous


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--cache-dir DIR` and `--no-cache` (as `chunkft fit` has them) on a subcommand."""
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="the planner's disk cache of traces and estimates (default "
                             "$XDG_CACHE_HOME/chunkft, else ~/.cache/chunkft; see `chunkft cache`)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")


def cli_dir(args: argparse.Namespace) -> Path | None:
    """The cache directory `add_arguments`' flags ask for (None: --no-cache)."""
    return None if args.no_cache else resolve_dir(args.cache_dir)


def active() -> Path | None:
    """The cache directory in use, or None."""
    return _active


@functools.cache
def environment() -> dict:
    """What every key holds besides its own parts: package versions, Python, source digest."""
    from importlib import metadata

    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    digest = hashlib.sha256()
    for path, text in sorted(source_files().items()):
        digest.update(f"{path.parent.name}/{path.name}\0".encode())
        digest.update(text)
    return {"format": FORMAT_VERSION, **versions, "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "sources": digest.hexdigest()}


_RUNTIME_NAME = re.compile(rb"\bruntime\.(\w+)")


def source_files() -> dict[Path, bytes]:
    """The sources whose digest is in every key: planner/*.py, and the runtime modules they
    name (runtime.subgrad, runtime.lora, ...), and those these name, transitively: an edit
    anywhere else in runtime/ (the trainer's CLI, data loading) keeps the cache."""
    planner_dir, runtime_dir = _SOURCE_DIRS
    files = {p: p.read_bytes() for p in planner_dir.glob("*.py")}
    todo = list(files.values())
    while todo:
        for name in set(_RUNTIME_NAME.findall(todo.pop())):
            path = runtime_dir / f"{name.decode()}.py"
            if path not in files and path.is_file():
                files[path] = path.read_bytes()
                todo.append(files[path])
    return files


# ---------------------------------------------------------------------------------------------
# Load and store


def load(kind: str, key: Any) -> Any:
    """The value stored under (kind, key) in the active cache, or None (no cache, no entry, or an
    entry that is corrupt, stale or unreadable: never trusted)."""
    if _active is None:
        return None
    try:
        path, key_text = _entry(_active, kind, key)
    except TypeError:
        return None
    if not path.is_file():
        return None
    try:
        return _read(path, kind, key_text)
    except Exception:  # a corrupt, truncated or foreign file: recomputed and written over
        return None


def store(kind: str, key: Any, value: Any) -> None:
    """Write `value` under (kind, key) in the active cache, atomically; best effort (a value the
    codec cannot encode, an unwritable directory or a full disk leave the cache as it was)."""
    if _active is None:
        return
    from planner.errors import ChunkftError

    try:
        path, key_text = _entry(_active, kind, key)
        arrays: list = []
        value_text = json.dumps(_encode(value, arrays), separators=(",", ":"))
        _write(path, kind, key_text, value_text, arrays)
    except (TypeError, ValueError, OSError, ChunkftError):
        return


# path -> [kind, key, the values, how many were read from disk]: written back by `flush`
_buckets: dict[Path, list] = {}
_bucket_paths: dict[tuple, Path] = {}  # (directory, kind, key) -> path: a key is encoded and hashed once


def bucket(kind: str, key: Any) -> dict | None:
    """A dict of many values under one (kind, key) in the active cache (None: no cache): read
    once per process, added to by the caller, written back (atomically, as one entry) when the
    `using` block ends if it grew. For answers made of many small ones (an Estimate per
    strategy): one file read instead of a thousand."""
    if _active is None:
        return None
    try:
        path = _bucket_paths.get((_active, kind, key))
    except TypeError:  # an unhashable key: named by its encoding each time
        path = None
    if path is None:
        try:
            path, _ = _entry(_active, kind, key)
        except TypeError:
            return None
        with contextlib.suppress(TypeError):
            _bucket_paths[(_active, kind, key)] = path
    if path not in _buckets:
        found = load(kind, key)
        values = found if isinstance(found, dict) else {}
        _buckets[path] = [kind, key, values, len(values)]
    return _buckets[path][2]


def flush() -> None:
    """Write the active cache's buckets that grew since they were read (best effort, as store)."""
    for path, entry in list(_buckets.items()):
        kind, key, values, stored = entry
        if _active is not None and path.parent.parent.parent == _active and len(values) > stored:
            store(kind, key, values)
            entry[3] = len(values)
        if _active is None or path.parent.parent.parent == _active:
            del _buckets[path]


def _entry(directory: Path, kind: str, key: Any) -> tuple[Path, str]:
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}")
    key_text = json.dumps({"kind": kind, "key": _encode(key, None), "environment": environment()},
                          sort_keys=True, separators=(",", ":"))
    name = hashlib.sha256(key_text.encode()).hexdigest()
    return directory / f"v{FORMAT_VERSION}" / kind / f"{name}.npz", key_text


def _digest(key_text: str, value_text: str, arrays: list) -> str:
    h = hashlib.sha256()
    h.update(key_text.encode())
    h.update(b"\0")
    h.update(value_text.encode())
    for a in arrays:
        h.update(f"\0{a.dtype.str}{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write(path: Path, kind: str, key_text: str, value_text: str, arrays: list) -> None:
    import numpy as np

    from planner.fsio import atomic_path

    meta = {"format": FORMAT_VERSION, "kind": kind, "key": key_text, "value": value_text,
            "digest": _digest(key_text, value_text, arrays)}
    members = {f"a{i}": a for i, a in enumerate(arrays)}
    members["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **members)


def _read(path: Path, kind: str, key_text: str) -> Any:
    import numpy as np

    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["__meta__"].tobytes().decode())
        if meta.get("format") != FORMAT_VERSION or meta.get("kind") != kind or meta.get("key") != key_text:
            return None
        names = sorted((n for n in npz.files if n != "__meta__"), key=lambda n: int(n[1:]))
        arrays = [npz[n] for n in names]
    if names != [f"a{i}" for i in range(len(names))]:
        return None
    value_text = meta["value"]
    if meta.get("digest") != _digest(key_text, value_text, arrays):
        return None
    return _decode(json.loads(value_text), arrays)


# ---------------------------------------------------------------------------------------------
# The codec: JSON with named planner dataclasses and enums; numpy arrays as npz members


def _type_name(cls: type) -> str:
    module = cls.__module__
    if not (module == "planner" or module.startswith("planner.")):
        raise TypeError(f"cannot cache a {cls.__module__}.{cls.__qualname__}: not a planner type")
    return f"{module}:{cls.__qualname__}"


@functools.lru_cache(maxsize=256)
def _type_of(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not (module == "planner" or module.startswith("planner.")) or not qualname:
        raise TypeError(f"not a planner type: {name!r}")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
        raise TypeError(f"not a dataclass or enum: {name!r}")
    return obj


def _encode(v: Any, arrays: list | None) -> Any:
    """A JSON-able form of `v`; arrays go to `arrays` (None: arrays are not allowed, as in keys)."""
    if isinstance(v, enum.Enum):  # before str and int: planner's enums are str enums
        return {"__enum__": _type_name(type(v)), "value": _encode(v.value, arrays)}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else {"__float__": repr(v)}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"__dataclass__": _type_name(type(v)),
                "fields": {f.name: _encode(getattr(v, f.name), arrays) for f in dataclasses.fields(v) if f.init}}
    if isinstance(v, tuple):
        kinds = {type(x) for x in v}
        if v and len(kinds) == 1 and issubclass(next(iter(kinds)), enum.Enum):  # e.g. TracedStep.phases
            return {"__enums__": _type_name(next(iter(kinds))), "values": [_encode(x.value, arrays) for x in v]}
        return {"__tuple__": [_encode(x, arrays) for x in v]}
    if isinstance(v, list):
        return [_encode(x, arrays) for x in v]
    if isinstance(v, dict):
        return {"__dict__": [[_encode(k, arrays), _encode(x, arrays)] for k, x in v.items()]}
    if isinstance(v, (set, frozenset)):
        items = sorted((_encode(x, arrays) for x in v), key=lambda e: json.dumps(e, sort_keys=True))
        return {"__frozenset__" if isinstance(v, frozenset) else "__set__": items}
    if type(v).__module__ == "numpy":
        import numpy as np

        if isinstance(v, np.ndarray):
            if arrays is None or v.dtype.hasobject:
                raise TypeError("cannot cache this array")
            arrays.append(np.ascontiguousarray(v))
            return {"__array__": len(arrays) - 1}
        if isinstance(v, np.generic):
            return _encode(v.item(), arrays)
    raise TypeError(f"cannot cache a {type(v).__name__}")


def _decode(e: Any, arrays: list) -> Any:
    # scalars are returned in place, not through a call: a 405B layout has thousands of them
    if type(e) is list:
        return [x if type(x) not in _NESTED else _decode(x, arrays) for x in e]
    if type(e) is not dict:
        return e
    if "__tuple__" in e:
        return tuple(x if type(x) not in _NESTED else _decode(x, arrays) for x in e["__tuple__"])
    if "__dataclass__" in e:
        cls = _type_of(e["__dataclass__"])
        return cls(**{k: x if type(x) not in _NESTED else _decode(x, arrays) for k, x in e["fields"].items()})
    if "__enums__" in e:
        members = _type_of(e["__enums__"])._value2member_map_
        return tuple(members[x] for x in e["values"])
    if "__enum__" in e:
        return _type_of(e["__enum__"])(_decode(e["value"], arrays))
    if "__array__" in e:
        return arrays[e["__array__"]]
    if "__dict__" in e:
        return {_decode(k, arrays): _decode(x, arrays) for k, x in e["__dict__"]}
    if "__frozenset__" in e:
        return frozenset(_decode(x, arrays) for x in e["__frozenset__"])
    if "__set__" in e:
        return {_decode(x, arrays) for x in e["__set__"]}
    if "__float__" in e:
        return float(e["__float__"])
    raise TypeError("not a cache value")


_NESTED = (list, dict)


# ---------------------------------------------------------------------------------------------
# Management: `chunkft cache [info|clear]`


def entries(directory: Path) -> list[Path]:
    """The cache's own files in `directory` (entries and leftover temporaries of every format
    version); nothing else there is ever listed or removed."""
    out = []
    for version in sorted(directory.glob("v[0-9]*")):
        for kind in KINDS:
            folder = version / kind
            if folder.is_dir():
                out += sorted(p for p in folder.iterdir() if p.is_file() and
                              (p.suffix == ".npz" or (p.name.startswith(".") and p.name.endswith(".tmp"))))
    return out


def clear(directory: Path) -> tuple[int, int]:
    """Remove the cache's files from `directory`: (files, bytes) removed."""
    files = nbytes = 0
    for path in entries(directory):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        files, nbytes = files + 1, nbytes + size
    for version in directory.glob("v[0-9]*"):
        for folder in [version / k for k in KINDS] + [version]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
    return files, nbytes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="where the planner's cache is, how big, or clear it",
        description="The planner's disk cache of traced steps, parameter layouts, chunk tables and model "
                    "configs (what makes a repeated `chunkft fit` fast). info: its directory and size; "
                    "clear: remove its entries.")
    p.add_argument("action", nargs="?", choices=("info", "clear"), default="info",
                   help="info (default) or clear")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="cache directory (default $XDG_CACHE_HOME/chunkft, else ~/.cache/chunkft)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from planner.units import format_bytes

    directory = resolve_dir(args.cache_dir)
    if args.action == "clear":
        files, nbytes = clear(directory) if directory.is_dir() else (0, 0)
        print(f"cleared {directory}: {files} entries, {format_bytes(nbytes)}")
        return 0
    found = entries(directory) if directory.is_dir() else []
    print(f"cache directory: {directory}")
    for kind in KINDS:
        mine = [p for p in found if p.parent.name == kind and p.suffix == ".npz"]
        print(f"  {kind:<9} {len(mine):>6} entries  {format_bytes(sum(p.stat().st_size for p in mine)):>10}")
    print(f"  total     {len(found):>6} files    {format_bytes(sum(p.stat().st_size for p in found)):>10}")
    return 0
