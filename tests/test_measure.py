"""CPU ground truth: mallinfo2 sampled per aten op measures what a step really allocates."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from planner.measure import (MallocSampler, malloc_in_use_bytes, mallinfo2_available, measure_malloc_peak,
                             memtracker_peak)

pytestmark = pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc >= 2.33 (mallinfo2)")

TOLERANCE_BYTES = 64 * 2**10
TINY = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024)
BATCH, SEQ = 1, 512


@pytest.mark.parametrize("nbytes", [100_000, 10_000_000, 50_000_000])
def test_known_tensor_is_measured_exactly(nbytes):
    # warm-up (planner.measure's rule): the first sampled op of a process allocates lazily
    # initialised state (7.5 MB here when this file runs alone)
    measure_malloc_peak(lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(7))
    kept = []
    result = measure_malloc_peak(lambda: kept.append(torch.empty(nbytes, dtype=torch.uint8).fill_(7)))
    assert abs(result.peak_bytes - nbytes) <= TOLERANCE_BYTES
    assert abs(result.end_bytes - nbytes) <= TOLERANCE_BYTES  # still alive in `kept`
    assert result.op_count == 2 and result.peak_op is not None
    kept.clear()


def test_freed_tensor_counts_at_peak_not_at_end():
    nbytes = 20_000_000
    with MallocSampler(record_samples=True) as sampler:
        a = torch.ones(nbytes // 4)  # float32
        b = a * 2
        del a
        c = b + 1
        del b, c
    result = sampler.result
    # a and b were alive together; b and c too; never three at once
    assert abs(result.peak_bytes - 2 * nbytes) <= TOLERANCE_BYTES
    assert abs(result.end_bytes) <= TOLERANCE_BYTES
    assert [name for name, _ in result.samples] == ["aten.ones.default", "aten.mul.Tensor", "aten.add.Tensor"]
    assert abs(result.samples[0][1] - nbytes) <= TOLERANCE_BYTES
    assert result.baseline_bytes <= malloc_in_use_bytes() + TOLERANCE_BYTES


def make_tiny_step():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY, dtype=torch.float32)
    ids = torch.randint(0, TINY.vocab_size, (BATCH, SEQ))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    return model, step


def test_tiny_llama_step_is_reproducible_and_agrees_with_memtracker():
    model, step = make_tiny_step()
    step()  # warm-up: the first step of a process also allocates lazily initialised state
    peaks = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        result = measure_malloc_peak(step)
        peaks.append(result.peak_bytes)
        n_params = sum(p.numel() for p in model.parameters())
        # the gradients (fp32, one per parameter) are what the step leaves behind
        assert abs(result.end_bytes - 4 * n_params) <= TOLERANCE_BYTES
    logits_bytes = BATCH * SEQ * TINY.vocab_size * 4
    assert min(peaks) > 4 * logits_bytes
    assert (max(peaks) - min(peaks)) / min(peaks) < 0.005

    tracked = memtracker_peak(make_tiny_step)
    assert tracked.baseline_bytes == 4 * n_params + tracked.peak_by_category["Buffer"]
    # MemTracker counts tensor storages only; malloc also sees autograd nodes and headers
    # (about 140 KB at this peak, measured at three model sizes).
    assert 0 <= min(peaks) - tracked.peak_bytes < 256 * 2**10
    assert abs(min(peaks) / tracked.peak_bytes - 1) < 0.01


PIN_SCRIPT = """
import torch
from planner.measure import MMAP_THRESHOLD_MAX_BYTES, _mallinfo2_fn, pin_mmap_threshold
def hblkhd():
    return _mallinfo2_fn()().hblkhd
before = hblkhd(); a = torch.empty(4_000_000, dtype=torch.uint8); mmapped = hblkhd() - before; del a
pin_mmap_threshold(MMAP_THRESHOLD_MAX_BYTES)
before = hblkhd(); b = torch.empty(4_000_000, dtype=torch.uint8); after_pin = hblkhd() - before
print(mmapped, after_pin)
"""


def test_pinned_mmap_threshold_moves_mid_sized_tensors_to_the_heap():
    # In a subprocess: the pin cannot be undone and would change this process's allocator.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", PIN_SCRIPT], capture_output=True, text=True, check=True, env=env)
    mmapped, after_pin = map(int, out.stdout.split())
    assert 4_000_000 <= mmapped <= 4_000_000 + 8192  # fresh process: above the 128 KiB threshold
    assert after_pin == 0  # pinned at 32 MiB: served from the heap
