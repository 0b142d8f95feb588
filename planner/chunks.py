"""ChunkFT's chunk table: the trainable parameters as one byte stream cut into C chunks.

ChunkFT (arXiv 2605.21177) orders all trainable parameters as the model registers them
(embeddings, decoder layers, final norm, lm_head), concatenates their bytes into one stream
and cuts that stream into C byte-balanced contiguous chunks. Cuts fall on row boundaries --
dim 0 of a 2-D weight, one element of a 1-D tensor -- so most chunks hold whole tensors and
only a tensor that straddles a cut is split into row ranges. A tied weight (lm_head sharing
embed_tokens) is one parameter and appears once, where `named_parameters()` first lists it.

`ChunkTable.grad_spec(k)` says, for every parameter, what chunk k trains: the whole tensor
(True), nothing (False) or a `SliceSpec` -- the contract between this table,
`runtime.subgrad.install` and the planner's tracer.

Known limitations:
- A cut along dim 1 (columns) happens only when the caller asks for it per parameter
  (`cut_dims`); the paper's cuts, and the planner's, are always along dim 0.
- Balancing rounds each ideal cut to the nearest row boundary, so a chunk's size differs
  from total/C by at most one row of the tensor the cut falls in (the embedding's row is the
  largest: hidden_size * elem_bytes).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterable, Union

from planner.errors import ChunkftError

CHUNK_TABLE_VERSION = 1

NamedShape = tuple[str, tuple[int, ...], int]
"""(parameter name, shape, bytes per element), in module order."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SliceSpec:
    """The sub-tensor `param.narrow(dim, start, end - start)` gets a gradient."""

    dim: int
    start: int
    end: int


GradSpec = dict[str, Union[SliceSpec, bool]]
"""Parameter name -> True (whole-tensor gradient), False (none) or a SliceSpec."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkSpan:
    """A contiguous slice [start, end) of parameter `param` along `dim`; `nbytes` its size."""

    param: str
    dim: int
    start: int
    end: int
    nbytes: int

    def slice_spec(self) -> SliceSpec:
        return SliceSpec(dim=self.dim, start=self.start, end=self.end)

    def to_json(self) -> dict:
        return {"param": self.param, "dim": self.dim, "start": self.start, "end": self.end, "nbytes": self.nbytes}


@dataclass(frozen=True, slots=True)
class ChunkTable:
    """C chunks, each a tuple of spans in module order; chunk k is `chunks[k]`.

    `shapes` records every parameter's full shape (name -> shape) so `grad_spec` can tell a
    whole-tensor span from a slice; it is part of the JSON form.
    """

    chunks: tuple[tuple[ChunkSpan, ...], ...]
    shapes: dict[str, tuple[int, ...]]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def chunk_bytes(self, k: int) -> int:
        """Bytes of chunk k in the model's training dtype."""
        return sum(span.nbytes for span in self.chunks[k])

    def is_whole(self, span: ChunkSpan) -> bool:
        """True if `span` covers its whole parameter."""
        shape = self.shapes[span.param]
        size = shape[span.dim] if shape else 1
        return span.start == 0 and span.end == size

    def grad_spec(self, k: int) -> GradSpec:
        """What chunk k trains: every parameter in the table, True / False / SliceSpec."""
        if not 0 <= k < self.num_chunks:
            raise ChunkftError(f"chunk {k} does not exist; valid chunks are 0..{self.num_chunks - 1}")
        spec: GradSpec = {name: False for name in self.shapes}
        for span in self.chunks[k]:
            spec[span.param] = True if self.is_whole(span) else span.slice_spec()
        return spec

    def validate(self, named_shapes: Iterable[NamedShape], *, check_bytes: bool = True) -> None:
        """Check the table against a model: ChunkftError naming the first problem found.

        Every parameter of `named_shapes` is covered exactly once (per parameter, spans along
        one dim whose ranges tile [0, size) with no gap or overlap), every span is in bounds,
        no span names a parameter the model lacks, and -- with `check_bytes` -- every span's
        nbytes matches the model's element size.
        """
        model = {name: (tuple(shape), elem) for name, shape, elem in named_shapes}
        spans: dict[str, list[ChunkSpan]] = {}
        for k, chunk in enumerate(self.chunks):
            if not chunk:
                raise ChunkftError(f"chunk table: chunk {k} is empty")
            for span in chunk:
                if span.param not in model:
                    raise ChunkftError(
                        f"chunk table: chunk {k} names parameter {span.param!r}, which the model does not have"
                    )
                spans.setdefault(span.param, []).append(span)
        for name, (shape, elem) in model.items():
            if name not in spans:
                raise ChunkftError(f"chunk table: parameter {name!r} is in no chunk")
            mine = sorted(spans[name], key=lambda s: s.start)
            dims = {s.dim for s in mine}
            ndim = max(len(shape), 1)
            if len(dims) != 1 or not 0 <= mine[0].dim < ndim:
                raise ChunkftError(
                    f"chunk table: parameter {name!r} (shape {list(shape)}) is cut along dims {sorted(dims)}; "
                    f"use one dim in 0..{ndim - 1}"
                )
            dim = mine[0].dim
            size = shape[dim] if shape else 1
            pos = 0
            for s in mine:
                if s.start != pos or s.end <= s.start or s.end > size:
                    what = "overlaps" if s.start < pos else "leaves a gap or is out of bounds"
                    raise ChunkftError(
                        f"chunk table: span [{s.start}, {s.end}) of {name!r} along dim {dim} {what}; "
                        f"expected to start at {pos} and end by {size}"
                    )
                if check_bytes:
                    want = _span_bytes(shape, elem, dim, s.start, s.end)
                    if s.nbytes != want:
                        raise ChunkftError(
                            f"chunk table: span [{s.start}, {s.end}) of {name!r} says {s.nbytes} bytes, "
                            f"the model's tensor gives {want} (another dtype?)"
                        )
                pos = s.end
            if pos != size:
                raise ChunkftError(f"chunk table: {name!r} is covered up to {pos} of {size} along dim {dim}")

    def to_json(self) -> dict:
        return {
            "version": CHUNK_TABLE_VERSION,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "chunks": [[span.to_json() for span in chunk] for chunk in self.chunks],
        }

    @classmethod
    def from_json(cls, data: dict) -> "ChunkTable":
        """Parse `to_json()`'s form; malformed input is a ChunkftError (validate() checks sense)."""
        try:
            if data.get("version") != CHUNK_TABLE_VERSION:
                raise ChunkftError(
                    f"chunk table version {data.get('version')!r} is not supported; expected {CHUNK_TABLE_VERSION}"
                )
            shapes = {str(n): tuple(int(d) for d in s) for n, s in data["shapes"].items()}
            chunks = tuple(
                tuple(
                    ChunkSpan(
                        param=str(s["param"]),
                        dim=int(s["dim"]),
                        start=int(s["start"]),
                        end=int(s["end"]),
                        nbytes=int(s["nbytes"]),
                    )
                    for s in chunk
                )
                for chunk in data["chunks"]
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ChunkftError(f"chunk table is malformed ({type(e).__name__}: {e})") from None
        return cls(chunks=chunks, shapes=shapes)


def _span_bytes(shape: tuple[int, ...], elem: int, dim: int, start: int, end: int) -> int:
    numel = math.prod(shape)
    size = shape[dim] if shape else 1
    return numel // size * (end - start) * elem if size else 0


def make_chunk_table(
    named_shapes: Iterable[NamedShape], num_chunks: int, *, cut_dims: dict[str, int] | None = None
) -> ChunkTable:
    """Cut the parameters' byte stream into `num_chunks` byte-balanced contiguous chunks.

    `named_shapes` lists (name, shape, elem_bytes) in module order, each parameter once (tied
    weights once). The ideal cut k lies at k * total / C bytes; it moves to the nearest row
    boundary of the tensor it falls in (a row is a slice along dim 0, or along
    `cut_dims[name]` where given). A cut that would leave a chunk empty moves forward to the
    next boundary. Raises ChunkftError if C < 1 or C exceeds the number of rows.
    """
    params = [(str(n), tuple(int(d) for d in s), int(e)) for n, s, e in named_shapes]
    cut_dims = dict(cut_dims or {})
    names = [n for n, _, _ in params]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ChunkftError(f"parameters listed twice (tie them once): {dupes}")
    unknown = sorted(set(cut_dims) - set(names))
    if unknown:
        raise ChunkftError(f"cut_dims names unknown parameters {unknown}")
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ChunkftError(f"number of chunks must be an integer >= 1, got {num_chunks!r}")

    # Per parameter: offset in the stream, cut dim, rows along it and bytes per row.
    offsets: list[int] = []
    layout: list[tuple[int, int, int]] = []
    total = 0
    for name, shape, elem in params:
        dim = cut_dims.get(name, 0)
        if not 0 <= dim < max(len(shape), 1):
            raise ChunkftError(f"cannot cut {name!r} (shape {list(shape)}) along dim {dim}")
        rows = shape[dim] if shape else 1
        row_bytes = _span_bytes(shape, elem, dim, 0, 1) if rows else 0
        offsets.append(total)
        layout.append((dim, rows, row_bytes))
        total += rows * row_bytes
    total_rows = sum(rows for _, rows, rb in layout if rb)
    if num_chunks > total_rows:
        raise ChunkftError(f"{num_chunks} chunks requested but the parameters have only {total_rows} rows")

    def snap(target: int, floor: int) -> int:
        """The row boundary nearest `target`, strictly after `floor`."""
        if floor >= total:
            return total
        i = max(bisect.bisect_right(offsets, target) - 1, 0)
        _, rows, rb = layout[i]
        cut = offsets[i] + (round((target - offsets[i]) / rb) * rb if rb else 0)
        cut = min(cut, offsets[i] + rows * rb)
        if cut <= floor:  # next boundary after floor
            j = max(bisect.bisect_right(offsets, floor) - 1, 0)
            while True:
                _, rows, rb = layout[j]
                end = offsets[j] + rows * rb
                if rb and floor < end:
                    cut = offsets[j] + ((floor - offsets[j]) // rb + 1) * rb
                    break
                j += 1
        return cut

    cuts = [0]
    for k in range(1, num_chunks):
        cuts.append(snap(k * total // num_chunks, cuts[-1]))
    cuts.append(total)
    if cuts[-2] >= total:
        raise ChunkftError(f"cannot cut the parameters into {num_chunks} non-empty chunks")

    chunks: list[tuple[ChunkSpan, ...]] = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        spans = []
        i = max(bisect.bisect_right(offsets, lo) - 1, 0)
        while i < len(params) and offsets[i] < hi:
            name, shape, elem = params[i]
            dim, rows, rb = layout[i]
            end_off = offsets[i] + rows * rb
            if rb and end_off > lo:
                start = max(lo - offsets[i], 0) // rb
                end = min(hi - offsets[i], rows * rb) // rb
                if end > start:
                    spans.append(ChunkSpan(param=name, dim=dim, start=start, end=end, nbytes=(end - start) * rb))
            i += 1
        chunks.append(tuple(spans))
    # Zero-byte parameters (no rows) still need an owner: the chunk at their stream position.
    for i, (name, shape, elem) in enumerate(params):
        dim, rows, rb = layout[i]
        if rows * rb == 0:
            k = min(bisect.bisect_right(cuts, offsets[i]) - 1, num_chunks - 1)
            chunks[k] = chunks[k] + (ChunkSpan(param=name, dim=dim, start=0, end=rows, nbytes=0),)
    table = ChunkTable(chunks=tuple(chunks), shapes={n: s for n, s, _ in params})
    return table


def model_named_shapes(model) -> list[NamedShape]:
    """(name, shape, elem_bytes) of the model's trainable parameters in module order.

    `named_parameters()` lists a tied parameter once. Trainable means requires_grad; call this
    before `runtime.subgrad.install` (or after its handle's remove()), which switches
    requires_grad off for parameters outside the active chunk.
    """
    return [
        (name, tuple(p.shape), p.element_size()) for name, p in model.named_parameters() if p.requires_grad
    ]


def make_chunk_table_from_model(model, num_chunks: int, *, cut_dims: dict[str, int] | None = None) -> ChunkTable:
    """`make_chunk_table` over the model's trainable parameters (see `model_named_shapes`)."""
    return make_chunk_table(model_named_shapes(model), num_chunks, cut_dims=cut_dims)
