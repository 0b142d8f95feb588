"""The disk tier: tensors in append-only files of large sequential blocks, with checksums.

A `DiskLog` is one data file under a user-given directory plus a JSON sidecar
(`<name>.index.json`). `append(key, tensor)` writes the tensor's bytes at the end of the file
in blocks of `BLOCK_BYTES`, computing a crc32 per block; `read(key)` seeks to the record and
reads it back block by block into one preallocated CPU tensor, verifying every block's crc32
(a flipped byte is a one-line ChunkftError naming the file, the record and the block). A key may
be appended several times (a gradient per micro-batch): `read_all(key)` returns every record in
the order written. `seal()` writes the sidecar atomically (record offsets, shapes, dtypes,
per-block crc32s), so another process can verify the file with `DiskLog.open`.

Failure policy: any OSError while creating, writing, reading or sealing (ENOSPC, EIO, EACCES,
...) becomes a one-line ChunkftError naming the file and the cause. The log never writes over
a byte it wrote before (append only; the sidecar is replaced atomically), and it is scratch
space apart from checkpoints (runtime.checkpoint writes those atomically elsewhere), so a full
disk stops the run without touching the last good checkpoint.

The file opener is a constructor argument (`opener=open` by default), so a test can hand in a
file object whose write raises OSError(ENOSPC) without patching any library.

Known limitations: no fsync (this is scratch space for one run, not a durable store); a torn
final record after a crash is simply not in the sidecar; block size is fixed per log.
"""

from __future__ import annotations

import errno
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from planner.errors import ChunkftError
from planner.fsio import atomic_write_json, read_json

INDEX_VERSION = 1
# 8 MiB requests: NVMe SSDs reach their sequential bandwidth at >= 1 MiB per request (queue
# depth 1); 8 MiB keeps the Python per-block overhead (crc32, one write call) below 1%.
BLOCK_BYTES = 8 * 2**20

Opener = Callable[[Path, str], BinaryIO]
"""open(path, mode) -> binary file object; the default is the builtin `open`."""

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8)}


def _cause(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    text = e.strerror or str(e) or type(e).__name__
    return f"{text} ({name})" if name else text


def describe_os_error(e: OSError) -> str:
    """"No space left on device (ENOSPC)": strerror plus the errno's name, for one-line errors."""
    return _cause(e)


def file_crc32(path: str | os.PathLike, *, block_bytes: int = BLOCK_BYTES) -> int:
    """zlib.crc32 of a whole file, read in large sequential blocks (OSError propagates)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_bytes), b""):
            crc = zlib.crc32(block, crc)
    return crc


@dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    """Where one appended tensor lives in the data file."""

    key: str
    offset: int
    """Byte offset of the record's first byte in the data file."""
    nbytes: int
    dtype: str
    """torch dtype name without "torch." ("bfloat16")."""
    shape: tuple[int, ...]
    crc32: tuple[int, ...]
    """zlib.crc32 of each BLOCK_BYTES block of the record (the last one may be shorter)."""

    def to_json(self) -> dict:
        return {"key": self.key, "offset": self.offset, "nbytes": self.nbytes, "dtype": self.dtype,
                "shape": list(self.shape), "crc32": list(self.crc32)}


class DiskLog:
    """An append-only file of tensors under `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, name: str, *, opener: Opener = open,
                 block_bytes: int = BLOCK_BYTES) -> None:
        assert block_bytes > 0
        self.dir = Path(directory)
        self.path = self.dir / name
        self.index_path = self.dir / f"{name}.index.json"
        self.block_bytes = block_bytes
        self._opener = opener
        self._records: list[Record] = []
        self._by_key: dict[str, list[int]] = {}
        self._end = 0
        self._writer: BinaryIO | None = None
        self._reader: BinaryIO | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike, name: str, *, opener: Opener = open) -> "DiskLog":
        """An existing sealed log, read back from its sidecar (for reading and verifying)."""
        log = cls(directory, name, opener=opener)
        doc = read_json(log.index_path, what="disk-tier index")
        if doc.get("version") != INDEX_VERSION:
            raise ChunkftError(f"disk-tier index {str(log.index_path)!r} has version {doc.get('version')!r}; "
                               f"this runtime reads version {INDEX_VERSION}")
        log.block_bytes = int(doc["block_bytes"])
        for row in doc["records"]:
            log._add(Record(key=row["key"], offset=int(row["offset"]), nbytes=int(row["nbytes"]), dtype=row["dtype"],
                            shape=tuple(row["shape"]), crc32=tuple(row["crc32"])))
        log._end = int(doc["end"])
        return log

    # -- writing ------------------------------------------------------------------------------
    def append(self, key: str, tensor: torch.Tensor) -> Record:
        """Write `tensor` (any device; copied to CPU) at the end of the file."""
        t = tensor.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ChunkftError(f"the disk tier stores {sorted(_DTYPES)}, not {dtype}")
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        crcs = []
        try:
            if self._writer is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._writer = self._opener(self.path, "wb")  # a new log: no stale bytes before offset 0
            for start in range(0, len(data), self.block_bytes):
                block = data[start:start + self.block_bytes]
                written = self._writer.write(block)
                if written is not None and written != len(block):  # a raw file may write short
                    raise OSError(errno.EIO, f"short write ({written} of {len(block)} bytes)")
                crcs.append(zlib.crc32(block))
            self._writer.flush()
        except OSError as e:
            raise ChunkftError(f"disk tier: cannot write {str(self.path)!r}: {_cause(e)}") from None
        record = Record(key=key, offset=self._end, nbytes=len(data), dtype=dtype, shape=tuple(t.shape),
                        crc32=tuple(crcs))
        self._end += len(data)
        self._add(record)
        return record

    def seal(self) -> None:
        """Flush the data and write the sidecar atomically (the file is verifiable from here)."""
        doc = {"version": INDEX_VERSION, "block_bytes": self.block_bytes, "end": self._end,
               "records": [r.to_json() for r in self._records]}
        try:
            if self._writer is not None:
                self._writer.flush()
            atomic_write_json(self.index_path, doc)
        except OSError as e:
            raise ChunkftError(f"disk tier: cannot write {str(self.index_path)!r}: {_cause(e)}") from None

    # -- reading ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def read_all(self, key: str) -> list[torch.Tensor]:
        """Every record of `key`, in the order appended, each verified."""
        return [self._read(self._records[i]) for i in self._by_key.get(key, [])]

    def read(self, key: str) -> torch.Tensor:
        """The last record of `key` (KeyError if there is none)."""
        return self._read(self._records[self._by_key[key][-1]])

    def nbytes(self) -> int:
        """Bytes of data in the file (records only)."""
        return self._end

    def _read(self, r: Record) -> torch.Tensor:
        out = torch.empty(r.nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy()) if r.nbytes else memoryview(bytearray())
        try:
            if self._writer is not None:
                self._writer.flush()
            if self._reader is None:
                self._reader = self._opener(self.path, "rb")
            self._reader.seek(r.offset)
            for i, start in enumerate(range(0, r.nbytes, self.block_bytes)):
                block = view[start:start + self.block_bytes]
                got = self._reader.readinto(block)
                if got != len(block):
                    raise ChunkftError(f"disk tier: {str(self.path)!r} is truncated: record {r.key!r} needs "
                                       f"{r.nbytes} bytes at offset {r.offset}")
                if zlib.crc32(block) != r.crc32[i]:
                    raise ChunkftError(f"disk tier: checksum mismatch in {str(self.path)!r}: record {r.key!r}, "
                                       f"block {i} (bytes {r.offset + start}..{r.offset + start + len(block)})")
        except OSError as e:
            raise ChunkftError(f"disk tier: cannot read {str(self.path)!r}: {_cause(e)}") from None
        return out.view(_DTYPES[r.dtype]).reshape(r.shape)

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        for f in (self._writer, self._reader):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass  # closing a file we no longer need; its data is not needed either
        self._writer = self._reader = None

    def remove(self) -> None:
        """Close and delete the data file and its sidecar (scratch space is given back)."""
        self.close()
        self.path.unlink(missing_ok=True)
        self.index_path.unlink(missing_ok=True)
        self._records.clear()
        self._by_key.clear()
        self._end = 0

    def _add(self, record: Record) -> None:
        self._by_key.setdefault(record.key, []).append(len(self._records))
        self._records.append(record)
