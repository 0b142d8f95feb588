"""The chunk table: byte balance, row-boundary cuts, module order, ties, JSON, validation."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from planner.chunks import ChunkSpan, ChunkTable, SliceSpec, make_chunk_table, make_chunk_table_from_model
from planner.errors import ChunkftError

# A hand-solvable stream: 80 + 8 + 48 + 12 = 148 bytes.
SHAPES = [("e", (10, 4), 2), ("n", (4,), 2), ("w", (6, 4), 2), ("b", (6,), 2)]


def test_one_chunk_is_every_tensor_whole():
    table = make_chunk_table(SHAPES, 1)
    assert table.chunks == (
        (
            ChunkSpan(param="e", dim=0, start=0, end=10, nbytes=80),
            ChunkSpan(param="n", dim=0, start=0, end=4, nbytes=8),
            ChunkSpan(param="w", dim=0, start=0, end=6, nbytes=48),
            ChunkSpan(param="b", dim=0, start=0, end=6, nbytes=12),
        ),
    )
    assert table.grad_spec(0) == {"e": True, "n": True, "w": True, "b": True}


def test_cuts_snap_to_the_nearest_row():
    # ideal cuts at 49 and 98 bytes snap to the nearest 8-byte rows: e's row 6 (48 B), w's row 1 (96 B)
    table = make_chunk_table(SHAPES, 3)
    assert [table.chunk_bytes(k) for k in range(3)] == [48, 48, 52]
    assert table.chunks[0] == (ChunkSpan(param="e", dim=0, start=0, end=6, nbytes=48),)
    assert table.chunks[1] == (
        ChunkSpan(param="e", dim=0, start=6, end=10, nbytes=32),
        ChunkSpan(param="n", dim=0, start=0, end=4, nbytes=8),
        ChunkSpan(param="w", dim=0, start=0, end=1, nbytes=8),
    )
    assert table.grad_spec(1) == {
        "e": SliceSpec(dim=0, start=6, end=10),
        "n": True,
        "w": SliceSpec(dim=0, start=0, end=1),
        "b": False,
    }


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5, 8, 13, 26])
def test_every_count_tiles_the_stream_in_balance(num_chunks):
    table = make_chunk_table(SHAPES, num_chunks)
    table.validate(SHAPES)
    sizes = [table.chunk_bytes(k) for k in range(num_chunks)]
    assert sum(sizes) == 148 and min(sizes) > 0
    # contiguous, in module order
    order = [(s.param, s.start) for c in table.chunks for s in c]
    assert order == sorted(order, key=lambda x: (["e", "n", "w", "b"].index(x[0]), x[1]))


def test_too_many_chunks_is_a_user_error():
    with pytest.raises(ChunkftError, match="only 26 rows"):
        make_chunk_table(SHAPES, 27)
    with pytest.raises(ChunkftError, match=">= 1"):
        make_chunk_table(SHAPES, 0)


def test_column_cuts_on_request():
    table = make_chunk_table(SHAPES, 3, cut_dims={"w": 1})
    table.validate(SHAPES)
    w_spans = [s for c in table.chunks for s in c if s.param == "w"]
    assert [(s.dim, s.start, s.end, s.nbytes) for s in w_spans] == [(1, 0, 1, 12), (1, 1, 4, 36)]


def test_llama_tied_weights_appear_once_and_in_module_order():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    table = make_chunk_table_from_model(model, 4)
    names = list(dict.fromkeys(s.param for c in table.chunks for s in c))
    assert names == [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedupes ties
    assert sum(table.chunk_bytes(k) for k in range(4)) == total
    # byte balance: each chunk within one embedding row (the largest row) of total/C
    for k in range(4):
        assert abs(table.chunk_bytes(k) - total / 4) <= 16 * 4 * 2


def test_json_round_trip():
    table = make_chunk_table(SHAPES, 5)
    data = json.loads(json.dumps(table.to_json()))
    assert ChunkTable.from_json(data) == table
    with pytest.raises(ChunkftError, match="version"):
        ChunkTable.from_json({**data, "version": 99})
    with pytest.raises(ChunkftError, match="malformed"):
        ChunkTable.from_json({"version": 1, "shapes": {}, "chunks": [[{"param": "e"}]]})


def _table(*chunks):
    return ChunkTable(chunks=tuple(tuple(c) for c in chunks), shapes={n: s for n, s, _ in SHAPES})


def _span(param, start, end, dim=0, nbytes=None):
    shapes = {n: (s, e) for n, s, e in SHAPES}
    shape, elem = shapes[param]
    row = (shape[0] * elem if dim == 1 else elem * (shape[1] if len(shape) > 1 else 1))
    return ChunkSpan(param=param, dim=dim, start=start, end=end, nbytes=(end - start) * row if nbytes is None else nbytes)


@pytest.mark.parametrize(
    "chunks,message",
    [
        ([[_span("e", 0, 10), _span("n", 0, 4), _span("w", 0, 6)]], "'b' is in no chunk"),
        ([[_span("e", 0, 10), _span("n", 0, 4), _span("w", 0, 6), _span("b", 0, 6), ChunkSpan(param="x", dim=0, start=0, end=1, nbytes=2)]], "does not have"),
        ([[_span("e", 0, 6), _span("n", 0, 4), _span("w", 0, 6), _span("b", 0, 6)], [_span("e", 5, 10)]], "overlaps"),
        ([[_span("e", 0, 5), _span("n", 0, 4), _span("w", 0, 6), _span("b", 0, 6)], [_span("e", 6, 10)]], "gap"),
        ([[_span("e", 0, 11), _span("n", 0, 4), _span("w", 0, 6), _span("b", 0, 6)]], "out of bounds"),
        ([[_span("e", 0, 10), _span("n", 0, 4), _span("w", 0, 6), _span("b", 0, 6)], []], "chunk 1 is empty"),
        ([[_span("e", 0, 10), _span("n", 0, 4), _span("w", 0, 6, nbytes=96), _span("b", 0, 6)]], "another dtype"),
        ([[_span("e", 0, 10), _span("n", 0, 4), _span("w", 0, 3), _span("b", 0, 6)], [_span("w", 1, 4, dim=1)]], "dims"),
        ([[_span("e", 0, 10), _span("n", 0, 3), _span("w", 0, 6), _span("b", 0, 6)]], "covered up to 3 of 4"),
    ],
)
def test_validate_names_the_problem(chunks, message):
    with pytest.raises(ChunkftError, match=message):
        _table(*chunks).validate(SHAPES)
