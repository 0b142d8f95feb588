"""Replay of allocation/free events: hand-made op graphs with known answers, and the CUDA model."""

from __future__ import annotations

import numpy as np
import pytest

from planner.errors import ChunkftError
from planner.memory import (
    K_LARGE_BUFFER,
    K_SMALL_BUFFER,
    cublas_workspace_bytes,
    replay,
    round_size,
    segment_size,
)
from planner.opgraph import OpGraph, OpNode, StorageInfo
from planner.schema import Component, Phase

MiB = 2**20


def make_graph(n_ops: int, storages: list[tuple[int, Component, int | None, int | None]]) -> OpGraph:
    """storages: (nbytes, component, alloc_op, free_op)."""
    infos = {i: StorageInfo(id=i, nbytes=b, component=c, alloc_op=a, free_op=f, saved=False, layer=None)
             for i, (b, c, a, f) in enumerate(storages)}
    ops = [OpNode(index=k, name="aten.empty.memory_format", module="", phase=Phase.FORWARD, layer=None,
                  inputs=(), outputs=tuple(i for i, s in infos.items() if s.alloc_op == k),
                  allocs=tuple(i for i, s in infos.items() if s.alloc_op == k), out_bytes=0, flops=0)
           for k in range(n_ops)]
    return OpGraph(ops, infos)


def test_peak_comes_from_replay_not_from_summing_component_maxima():
    # activations peak at op 1 and die; gradients appear at op 3: never both alive.
    g = make_graph(5, [
        (100, Component.WEIGHTS, None, None),
        (1000, Component.ACTIVATIONS, 0, 1),
        (40, Component.TEMPORARIES, 1, 2),
        (600, Component.GRADIENTS, 3, None),
    ])
    t = replay(g)
    assert t.total_bytes.tolist() == [1100, 1140, 140, 700, 700]
    assert (t.peak_bytes, t.peak_op) == (1140, 1)
    assert t.start_bytes == 100 and t.step_peak_bytes == 1040
    assert t.at_peak() == {**{c: 0 for c in Component}, Component.WEIGHTS: 100, Component.ACTIVATIONS: 1000,
                           Component.TEMPORARIES: 40}
    sum_of_maxima = sum(int(a.max()) for a in t.live_bytes.values())
    assert sum_of_maxima == 1740 > t.peak_bytes
    assert t.reserved_bytes is t.total_bytes


def test_an_op_sees_its_inputs_and_outputs_alive_together():
    # storage 0 is freed right after op 1, which allocates storage 1: both count at op 1.
    g = make_graph(3, [(10, Component.TEMPORARIES, 0, 1), (20, Component.TEMPORARIES, 1, 1)])
    assert replay(g).total_bytes.tolist() == [10, 30, 0]


def test_caching_allocator_rounding_and_segments():
    # c10/cuda/CUDACachingAllocator.cpp: round_size and get_allocation_size
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert segment_size(512) == K_SMALL_BUFFER == 2 * MiB
    assert segment_size(1 * MiB) == 2 * MiB
    assert segment_size(1 * MiB + 512) == K_LARGE_BUFFER == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB) == 12 * MiB
    # CublasHandlePool.cpp: 32 MiB on Hopper/Blackwell, ":4096:2:16:8" elsewhere
    assert cublas_workspace_bytes(9) == cublas_workspace_bytes(10) == 32 * MiB
    assert cublas_workspace_bytes(8) == 8 * MiB + 128 * 1024


def test_cuda_replay_counts_rounding_and_workspace():
    g = make_graph(3, [
        (1000, Component.WEIGHTS, None, None),      # -> 1024 allocated, small segment of 2 MiB
        (3 * MiB, Component.ACTIVATIONS, 0, 1),     # -> large pool: new 20 MiB segment
        (3 * MiB, Component.ACTIVATIONS, 2, None),  # reuses the freed 3 MiB block: no new segment
    ])
    t = replay(g, allocator="cuda", cublas_workspaces=0)
    assert t.live_bytes[Component.ROUNDING].tolist() == [24, 24, 24]
    assert t.total_bytes.tolist() == [1024 + 3 * MiB, 1024 + 3 * MiB, 1024 + 3 * MiB]
    assert t.reserved_bytes.tolist() == [22 * MiB] * 3
    # two workspaces (forward thread, autograd's backward thread), each its own 32 MiB segment
    with_ws = replay(g, allocator="cuda", sm=90)
    assert with_ws.peak_bytes == t.peak_bytes + 64 * MiB
    assert with_ws.at_peak()[Component.OVERHEAD] == 64 * MiB
    assert with_ws.start_bytes == 1024 + 64 * MiB
    assert with_ws.peak_reserved_bytes == 22 * MiB + 64 * MiB
    # 8.125 MiB workspaces on an Ampere GPU (< 10 MiB: a 20 MiB segment, split): both fit in one
    # segment, and the 3 MiB activation in its 3.75 MiB remainder; the weight takes a 2 MiB one.
    ampere = replay(g, allocator="cuda", sm=80)
    assert ampere.peak_reserved_bytes == 20 * MiB + 2 * MiB


def test_cuda_model_splits_and_merges_blocks():
    # two 8 MiB requests share one 20 MiB segment (remainder 12 MiB > 1 MiB: split), a third
    # needs a new segment; after both frees the blocks merge back and a 16 MiB request fits.
    g = make_graph(4, [
        (8 * MiB, Component.TEMPORARIES, 0, 1),
        (8 * MiB, Component.TEMPORARIES, 0, 1),
        (8 * MiB, Component.TEMPORARIES, 1, 2),
        (16 * MiB, Component.TEMPORARIES, 3, None),
    ])
    t = replay(g, allocator="cuda", cublas_workspaces=0)
    assert t.reserved_bytes.tolist() == [20 * MiB, 40 * MiB, 40 * MiB, 40 * MiB]
    assert np.array_equal(t.total_bytes, [16 * MiB, 24 * MiB, 8 * MiB, 16 * MiB])


def test_unknown_allocator_is_an_error():
    with pytest.raises(ChunkftError, match="valid allocators are cpu, cuda"):
        replay(make_graph(1, []), allocator="tpu")


def test_cuda_replay_of_a_traced_step_is_consistent():
    from transformers import LlamaConfig

    from planner.model import ModelSpec
    from planner.trace import StepShape, TraceOptions, trace_step

    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024)
    graph = trace_step(ModelSpec(name="tiny", source="config", config=config, num_layers=2),
                       StepShape(batch=1, seq_len=64), TraceOptions())
    cpu, cuda = graph.replay(), graph.replay(allocator="cuda", sm=90)
    overhead = 2 * 32 * MiB
    rounding = cuda.live_bytes[Component.ROUNDING]
    assert np.array_equal(cuda.total_bytes - rounding - overhead, cpu.total_bytes)
    assert (rounding >= 0).all() and (rounding < 512 * len(graph.storages)).all()
    assert (cuda.reserved_bytes >= cuda.total_bytes).all()
    assert (np.diff(cuda.reserved_bytes) >= 0).all()  # cached segments are never returned
    # every segment is a multiple of 2 MiB (kSmallBuffer, kLargeBuffer, kRoundLarge)
    assert (cuda.reserved_bytes % (2 * MiB) == 0).all()
