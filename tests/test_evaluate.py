"""evaluate's cost model on hand-made traced steps (bytes worked out by hand), chunk grouping,
the step-time terms, and -- once the tracer can run -- a tiny real model end to end."""

from types import SimpleNamespace

import numpy as np
import pytest

from planner.chunks import make_chunk_table
from planner.evaluate import (
    DISK_BOUNCE_BYTES,
    ActiveSet,
    ParamLayout,
    TracedStep,
    chunk_groups,
    combine,
    timeline_events,
)
from planner.memory import COMPONENTS
from planner.schema import Component, EventKind, Phase, Tier
from planner.steptime import ADAMW_GPU_BYTES_PER_PARAM, ADAMW_HOST_BYTES_PER_PARAM, StepWork, predict_step_time
from planner.strategy import OptimizerDevice, Strategy, WeightResidency

MiB = 2**20
# Four bf16 tensors of 2048 parameters (4096 B each, 8192 B as fp32): P = 8192 parameters.
SHAPES = tuple((n, (256, 8), 2) for n in ("model.embed", "model.layers.0.w", "model.layers.1.w", "lm_head"))
LAYOUT = ParamLayout(named_shapes=SHAPES, elem_bytes=2, layer_prefix="model.layers", num_layers=2,
                     layer_weight_bytes=4096)
FULL = ActiveSet(chunk=None, tensor_bytes=(4096,) * 4)
HW = SimpleNamespace(gpu=SimpleNamespace(name="test", bf16_flops=1e12, fp32_flops=5e11, hbm_bandwidth_Bps=1e9,
                                         pcie_bandwidth_Bps=1e8),
                     host_bandwidth_Bps=1e8, nvme_bandwidth_Bps=1e7, mfu=0.5)


def _traced() -> TracedStep:
    """Four ops: weights 16384 B throughout, activations rise then fall, gradients appear."""
    live = np.zeros((len(COMPONENTS), 4), dtype=np.int64)
    idx = {c: i for i, c in enumerate(COMPONENTS)}
    live[idx[Component.WEIGHTS]] = 16384
    live[idx[Component.ACTIVATIONS]] = [4096, 8192, 2048, 0]
    live[idx[Component.GRADIENTS]] = [0, 0, 8192, 16384]
    reserved = np.maximum.accumulate(live.sum(axis=0)) + 2 * MiB
    return TracedStep(live=live, reserved=reserved, flops=10**12,
                      phases=(Phase.FORWARD, Phase.FORWARD, Phase.BACKWARD, Phase.BACKWARD), layers=(0, 1, 1, 0))


def test_full_ft_on_gpu_peaks_in_the_optimizer_step():
    e = combine(_traced(), Strategy(), LAYOUT, FULL, HW)
    # end of backward (weights 16384 + grads 16384) + master 4 B/param + moments 8 B/param,
    # P = 8192, + the per-tensor step's temporaries for the largest tensor (2048 parameters):
    # fp32 gradient 4 + sqrt(v) 4 + its division 4 B/param
    gpu = e.components[Tier.GPU]
    assert gpu == {Component.WEIGHTS: 16384, Component.GRADIENTS: 16384, Component.MASTER: 4 * 8192,
                   Component.OPTIMIZER: 8 * 8192, Component.TEMPORARIES: 12 * 2048}
    assert e.peak_bytes[Tier.GPU] == 32768 + 12 * 8192 + 12 * 2048 == sum(gpu.values())
    # reserved: the trace's high-water mark + one small 2 MiB segment for the states and one for
    # the temporaries (all allocations are <= 1 MiB and pack)
    assert e.reserved_bytes == 32768 + 2 * MiB + 2 * MiB + 2 * MiB
    assert e.peak_bytes[Tier.HOST] == 0 and e.peak_bytes[Tier.DISK] == 0
    assert e.worst_chunk is None and e.context_bytes > 0


def test_instant_gradient_offload_keeps_a_double_buffer_and_moves_state_to_host():
    s = Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST, grad_staging=Tier.HOST)
    e = combine(_traced(), s, LAYOUT, FULL, HW)
    # gradients capped at 2 x 4096 B: op totals 20480, 24576, 26624, 24576 -> peak at op 2
    assert e.peak_bytes[Tier.GPU] == 16384 + 2048 + 8192
    assert e.components[Tier.GPU] == {Component.WEIGHTS: 16384, Component.ACTIVATIONS: 2048,
                                      Component.GRADIENTS: 8192}
    # host: fp32 master + moments of all P, 16-bit gradients, and one tensor's step temporaries
    # (fp32 cast 4 + sqrt(v) 4 + its division 4 B/param)
    assert e.components[Tier.HOST] == {Component.MASTER: 32768, Component.OPTIMIZER: 65536,
                                       Component.GRADIENTS: 16384, Component.TEMPORARIES: 12 * 2048}


def test_deepspeed_style_baseline_holds_fp32_gradients_on_host():
    ds = combine(_traced(), Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST), LAYOUT, FULL, HW)
    nv = combine(_traced(), Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST,
                                     grad_staging=Tier.HOST), LAYOUT, FULL, HW)
    assert ds.components[Tier.HOST][Component.GRADIENTS] == 4 * 8192
    # fp32 gradients need no cast at the optimizer: 8 instead of 12 B/param of temporaries
    assert ds.peak_bytes[Tier.HOST] - nv.peak_bytes[Tier.HOST] == 4 * 8192 - 2 * 8192 + 8 * 2048 - 12 * 2048
    # DeepSpeed's 2 x 5e8-element buckets hold every gradient of this tiny model
    assert ds.peak_bytes[Tier.GPU] == 32768


def test_chunked_state_on_host_keeps_active_and_prefetched_chunk_on_gpu():
    s = Strategy(chunks=2, state_tier=Tier.HOST)
    active = ActiveSet(chunk=0, tensor_bytes=(4096, 4096), prefetch_bytes=(4096, 4096))
    e = combine(_traced(), s, LAYOUT, active, HW, all_spans=(4096,) * 4)
    gpu = e.components[Tier.GPU]
    # two chunks of 4096 parameters on the GPU (active + prefetched): 12 B each
    assert gpu[Component.MASTER] == 2 * 4 * 4096 and gpu[Component.OPTIMIZER] == 2 * 8 * 4096
    # optimizer step, one span at a time: 12 B x 2048 for the largest span
    assert gpu[Component.TEMPORARIES] == 12 * 2048
    # gradients capped at the chunk's 8192 B (a chunk's gradients never exceed its bytes)
    assert gpu[Component.GRADIENTS] == 8192
    assert e.peak_bytes[Tier.GPU] == 16384 + 8192 + 2 * 12 * 4096 + 12 * 2048
    # pinned host state of every chunk; 8192 B per fp32 span is a power of two: no rounding
    assert e.components[Tier.HOST] == {Component.MASTER: 4 * 8192, Component.OPTIMIZER: 8 * 8192}
    no_prefetch = combine(_traced(), Strategy(chunks=2, state_tier=Tier.HOST, prefetch_depth=0), LAYOUT,
                          ActiveSet(chunk=0, tensor_bytes=(4096, 4096)), HW, all_spans=(4096,) * 4)
    assert e.peak_bytes[Tier.GPU] - no_prefetch.peak_bytes[Tier.GPU] == 12 * 4096
    assert e.worst_chunk == 0


def test_pinned_host_state_is_one_flat_buffer_per_chunk():
    """runtime.host_buffer: each chunk's master and moments packed at 64-byte offsets in one
    buffer registered in place, so no power-of-two rounding (12288 B tensors would pin as 16384
    B each through the caching host allocator); only the alignment gaps count."""
    e = combine(_traced(), Strategy(chunks=2, state_tier=Tier.HOST), LAYOUT,
                ActiveSet(chunk=0, tensor_bytes=(6144,)), HW, all_spans=(6144, 6144))
    assert Component.ROUNDING not in e.components[Tier.HOST]  # 12288 B tensors are 64-byte multiples
    assert e.components[Tier.HOST][Component.OPTIMIZER] == 8 * 6144
    odd = combine(_traced(), Strategy(chunks=2, state_tier=Tier.HOST), LAYOUT,
                  ActiveSet(chunk=0, tensor_bytes=(6150,)), HW, all_spans=(6150, 6150))
    assert odd.components[Tier.HOST][Component.ROUNDING] == 2 * 3 * (12352 - 12300)


def test_state_on_disk_fills_the_disk_and_only_bounce_buffers_on_host():
    active = ActiveSet(chunk=1, tensor_bytes=(4096, 4096))
    e = combine(_traced(), Strategy(chunks=2, state_tier=Tier.DISK, prefetch_depth=0), LAYOUT, active, HW)
    assert e.components[Tier.DISK] == {Component.MASTER: 4 * 8192, Component.OPTIMIZER: 8 * 8192}
    assert e.components[Tier.HOST] == {Component.TEMPORARIES: DISK_BOUNCE_BYTES}
    staged = combine(_traced(), Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.DISK,
                                         grad_staging=Tier.DISK, prefetch_depth=0), LAYOUT, FULL, HW)
    assert staged.components[Tier.DISK] == {Component.MASTER: 32768, Component.OPTIMIZER: 65536,
                                            Component.GRADIENTS: 16384}
    # host: one tensor's state window (12 B x 2048), disk bounce buffers, one tensor's step temporaries
    assert staged.components[Tier.HOST] == {Component.TEMPORARIES: 12 * 2048 + DISK_BOUNCE_BYTES + 12 * 2048}


def test_streamed_weights_come_from_the_trace_and_rest_pinned_on_host():
    """Streaming rewrites the traced step itself (planner.streaming; tests/test_stream.py):
    combine keeps the traced GPU weights and adds every layer's packed buffer on the host
    (registered in place by runtime.host_buffer: no power-of-two rounding)."""
    s = Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST, grad_staging=Tier.HOST,
                 weights=WeightResidency.STREAM)
    e = combine(_traced(), s, LAYOUT, FULL, HW)
    assert e.components[Tier.GPU][Component.WEIGHTS] == 16384
    assert e.components[Tier.HOST][Component.WEIGHTS] == 2 * 4096  # two layers of one (256, 8) bf16 tensor
    shapes = SHAPES[:1] + (("model.layers.0.w", (3, 5), 2), ("model.layers.0.v", (7,), 2)) + SHAPES[-1:]
    odd = ParamLayout(named_shapes=shapes, elem_bytes=2, layer_prefix="model.layers", num_layers=1,
                      layer_weight_bytes=44)
    e = combine(_traced(), s, odd, FULL, HW)
    assert e.components[Tier.HOST][Component.WEIGHTS] == 64 + 14  # the second tensor at a 64-byte offset


def test_timeline_events_end_with_the_optimizer_step_at_the_estimated_peak():
    events = timeline_events(_traced(), Strategy(), LAYOUT, FULL)
    assert [ev.event for ev in events][-2:] == [EventKind.OPTIMIZER_STEP, EventKind.STEP_END]
    assert len(events) == 6
    est = combine(_traced(), Strategy(), LAYOUT, FULL, HW)
    assert max(ev.allocated for ev in events) == est.peak_bytes[Tier.GPU]
    assert events[0].bytes[Component.MASTER] == 4 * 8192 and events[0].phase == Phase.FORWARD
    assert all(ev.reserved >= ev.allocated for ev in events)


def test_chunk_groups_follow_layer_patterns():
    shapes = [(f"model.layers.{i}.{p}", (256, 8), 2) for i in range(4) for p in ("a", "b")]
    assert chunk_groups(make_chunk_table(shapes, 4), "model.layers") == [[0, 1, 2, 3]]
    assert chunk_groups(make_chunk_table(shapes, 8), "model.layers") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with_embed = [("model.embed", (256, 8), 2)] + shapes
    groups = chunk_groups(make_chunk_table(with_embed, 9), "model.layers")
    assert groups[0] == [0] and sorted(k for g in groups for k in g) == list(range(9))


def test_step_time_terms():
    work = StepWork(flops=10**12, params_step=1000, elem_bytes=2, switch_state_bytes=24_000, state_bytes_step=12_000)
    gpu = predict_step_time(work, Strategy(), HW)
    assert gpu == {"compute": 2.0, "optimizer": pytest.approx(ADAMW_GPU_BYTES_PER_PARAM * 1000 / 1e9)}
    host = predict_step_time(work, Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST,
                                            grad_staging=Tier.HOST), HW)
    assert host["optimizer"] == pytest.approx(ADAMW_HOST_BYTES_PER_PARAM * 1000 / 1e8)
    assert host["grads_out"] == 0.0  # 2000 B over PCIe hides behind 4/3 s of backward
    assert host["weights_in"] == pytest.approx(2000 / 1e8)
    # chunk switch: 24 kB over PCIe; with prefetch it hides behind compute, without it is
    # exposed and amortised over the update interval
    slow = StepWork(flops=10**6, params_step=1000, elem_bytes=2, switch_state_bytes=24_000_000)
    hidden = predict_step_time(slow, Strategy(chunks=4, state_tier=Tier.HOST), HW)
    exposed = predict_step_time(slow, Strategy(chunks=4, state_tier=Tier.HOST, prefetch_depth=0,
                                               update_interval=4), HW)
    assert exposed["switch"] == pytest.approx(0.24 / 4)
    assert hidden["switch"] == pytest.approx(0.24 - 2e-6)
    disk = predict_step_time(slow, Strategy(chunks=4, state_tier=Tier.DISK, prefetch_depth=0), HW)
    assert disk["switch"] == pytest.approx(0.24 + 2.4)


# ---------------------------------------------------------------------------------------------
# A tiny real model through the tracer


@pytest.fixture(scope="module")
def tiny():
    import transformers

    from planner.model import ModelSpec
    from planner.trace import StepShape

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return ModelSpec(name="tiny-llama", source="config", config=config, num_layers=4), StepShape(seq_len=64)


def test_bound_mode_is_close_to_exact_chunk_traces(tiny):
    from planner.evaluate import evaluate
    from planner.hardware import hardware

    model, shape = tiny
    hw = hardware()
    for c in (2, 4, 8):
        for ckpt in (False, True):
            s = Strategy(chunks=c, state_tier=Tier.HOST, checkpointing=ckpt)
            exact = evaluate(model, shape, s, hw, chunk_traces="exact")
            bound = evaluate(model, shape, s, hw, chunk_traces="bound")
            # the bound misses only what a sliced span's sub-gradient machinery leaves alive
            assert bound.peak_bytes[Tier.GPU] >= 0.999 * exact.peak_bytes[Tier.GPU], (c, ckpt)
            assert bound.peak_bytes[Tier.HOST] == exact.peak_bytes[Tier.HOST]
            # the bound is tight to within the activations frozen layers would not save
            assert bound.peak_bytes[Tier.GPU] <= 1.25 * exact.peak_bytes[Tier.GPU], (c, ckpt)
            # compute: the full-FT flops minus frozen matrices' gradient matmuls, near the traced ones
            assert bound.step_time_parts_s["compute"] == pytest.approx(exact.step_time_parts_s["compute"], rel=0.2)


def test_timeline_peak_equals_evaluate_peak(tiny):
    from planner.evaluate import evaluate, gpu_timeline
    from planner.hardware import hardware

    model, shape = tiny
    hw = hardware()
    for s in (Strategy(), Strategy(chunks=4, state_tier=Tier.HOST, checkpointing=True),
              Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST, grad_staging=Tier.HOST)):
        est = evaluate(model, shape, s, hw, chunk_traces="exact")
        events = gpu_timeline(model, shape, s, hw, chunk_traces="exact")
        assert max(ev.allocated for ev in events) == est.peak_bytes[Tier.GPU], s.label()
        assert max(ev.reserved for ev in events) <= est.reserved_bytes


def test_vectorised_state_sums_equal_the_allocation_lists():
    """evaluate.state_summary (numpy, for speed) against add_allocs / segment_bytes over
    state_allocs (one Alloc per tensor, the allocator's rounding): the same ints, the same
    component order, on spans from a few bytes to hundreds of MiB."""
    import random

    from planner.evaluate import add_allocs, segment_bytes, state_allocs, state_summary

    rng = random.Random(0)
    sizes = [2, 512, 1 << 19, (1 << 20) - 2, 1 << 20, 5 << 20, (10 << 20) - 6, 10 << 20, 300 << 20]
    cases = [()] + [tuple(rng.choice(sizes) + 2 * rng.randrange(4096) for _ in range(rng.randrange(1, 40)))
                    for _ in range(100)]
    for spans in cases:
        for elem in (2, 4):
            spans_elem = tuple(s - s % elem for s in spans)
            allocs = state_allocs(spans_elem, elem)
            comps: dict = {}
            add_allocs(comps, allocs)
            got, reserved = state_summary(spans_elem, elem)
            assert list(got.items()) == list(comps.items()) and reserved == segment_bytes(allocs), (spans_elem, elem)
