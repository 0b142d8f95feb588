"""The planner's predicted peak against independent measurements of the same step.

CPU ground truth: planner.measure samples glibc's mallinfo2 after every aten op of a real step
of a tiny, randomly initialised HF model (baseline-subtracted), and the prediction is
trace_step + replay(allocator="cpu") of the same step: peak bytes above what was live before it.
What the measurement sees beyond tensor storages (malloc headers, autograd nodes, Python
objects) is a roughly constant 150-300 KiB here, so the models are big enough (hidden 256,
vocab 4096) that it stays well under the 2% the planner has to meet.

Peer: torch's MemTracker on Llama 3-8B (full fine-tuning step, no optimizer).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from planner.chunks import make_chunk_table_from_model
from planner.measure import mallinfo2_available, measure_malloc_peak
from planner.model import ModelSpec
from planner.step import loop_forward, step_loss
from planner.trace import StepShape, TraceOptions, match_real_attention_branch, trace_step

# part of CI's second pass on the newest transformers (.ci/run): the tracer meets HF model code here
pytestmark = pytest.mark.newest_deps

TOLERANCE = 0.02
NUM_CHUNKS = 4


@pytest.fixture(autouse=True, scope="module")
def _quiet_process():
    """A frozen GC so measure_malloc_peak's gc.collect() takes milliseconds (one intra-op
    thread comes from conftest.py)."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def tiny(arch: str) -> ModelSpec:
    if arch == "gpt2":
        config = GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=4096, n_positions=256,
                            bos_token_id=0, eos_token_id=0)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
        config = cls(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=4096)
    return ModelSpec(name=f"tiny-{arch}", source="config", config=config, num_layers=4)


def tiny_recipe_arch(arch: str) -> ModelSpec:
    """Architectures outside the chunkft-step tests: tied embeddings and biases (Qwen2), soft-capping
    and sliding windows (Gemma 2), fused projections (Phi-3), sliding-window Mistral."""
    common = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096)
    config = {"llama": lambda: LlamaConfig(**common),
              "qwen2-tied": lambda: Qwen2Config(**common, tie_word_embeddings=True),
              "gemma2": lambda: Gemma2Config(**common, head_dim=64),
              "phi3": lambda: Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2),
              "mistral": lambda: MistralConfig(**common)}[arch]()
    return ModelSpec(name=f"tiny-{arch}", source="config", config=config, num_layers=4)


def measured_step_peak(spec: ModelSpec, shape: StepShape, grad, *, checkpointing: bool = False,
                       loss_chunk_tokens: int = 0, loop: str = "chunkft") -> int:
    """Peak bytes above baseline of one real CPU step (after a warm-up step)."""
    from planner.step import enable_checkpointing
    from runtime.subgrad import install

    torch.manual_seed(0)
    model = spec.build(device="cpu", dtype=shape.torch_dtype())
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    handle = install(model, grad) if grad is not None else None
    ids = torch.randint(0, 4096, (shape.batch, shape.seq_len))
    labels = torch.randint(0, 4096, (shape.batch, shape.seq_len))

    match_real_attention_branch(model, shape)  # as trace_step does (no data-dependent mask branch)

    def step():
        loss, held = loop_forward(model, ids, labels, loop=loop, loss_chunk_tokens=loss_chunk_tokens)
        loss.backward()
        del loss, held  # the plain HF loop holds its output (logits, cache) through backward

    step()  # first-call allocations (thread pools, kernels' caches) stay out of the measured step
    model.zero_grad(set_to_none=True)
    if handle is not None:
        handle.zero_grad()
    return measure_malloc_peak(step).peak_bytes


def middle_chunk(spec: ModelSpec):
    """Chunk 1 of 4: byte-balanced, so it ends inside a tensor that is cut (a sliced gradient).

    GPT-2's Conv1D weights cannot be sliced (runtime.subgrad), so its chunk is whole tensors:
    the two middle blocks.
    """
    model = spec.build(device="meta", dtype=torch.float32)
    if spec.config.model_type == "gpt2":
        return {n: n.startswith(("transformer.h.1.", "transformer.h.2.")) for n, _ in model.named_parameters()}
    return make_chunk_table_from_model(model, NUM_CHUNKS).grad_spec(1)


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("seq_len", [128, 256])
@pytest.mark.parametrize("which", ["full", "chunk"])
def test_predicted_peak_matches_malloc_measurement(arch, seq_len, which):
    spec = tiny(arch)
    shape = StepShape(batch=1, seq_len=seq_len, dtype="fp32")
    grad = middle_chunk(spec) if which == "chunk" else None
    if grad is not None and arch != "gpt2":
        assert any(not isinstance(v, bool) for v in grad.values()), "the chunk should cut a tensor"
    predicted = trace_step(spec, shape, TraceOptions(grad=grad)).replay(allocator="cpu").step_peak_bytes
    measured = measured_step_peak(spec, shape, grad)
    assert abs(predicted - measured) / measured < TOLERANCE, (predicted, measured)


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.parametrize("dtype,checkpointing,loss_chunk_tokens", [("bf16", False, 0), ("fp32", True, 64)])
def test_bf16_checkpointing_and_chunked_loss_match_malloc_measurement(dtype, checkpointing, loss_chunk_tokens):
    spec = tiny("llama")
    shape = StepShape(batch=1, seq_len=256, dtype=dtype)
    opts = TraceOptions(checkpointing=checkpointing, loss_chunk_tokens=loss_chunk_tokens)
    predicted = trace_step(spec, shape, opts).replay().step_peak_bytes
    measured = measured_step_peak(spec, shape, None, checkpointing=checkpointing,
                                  loss_chunk_tokens=loss_chunk_tokens)
    assert abs(predicted - measured) / measured < TOLERANCE, (predicted, measured)


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
def test_plain_hf_loop_matches_malloc_measurement_on_five_architectures():
    # `out = model(input_ids=ids, labels=ids); out.loss.backward()` with the config's defaults:
    # out keeps the logits and use_cache's keys and values alive through backward (8-14% above
    # chunkft's step here). Five architectures, two shapes each: median within 1%, every one 2%.
    errors = {}
    for arch in ("llama", "qwen2-tied", "gemma2", "phi3", "mistral"):
        spec = tiny_recipe_arch(arch)
        for seq_len in (128, 256):
            shape = StepShape(batch=1, seq_len=seq_len, dtype="fp32")
            predicted = trace_step(spec, shape, TraceOptions(loop="hf")).replay(allocator="cpu").step_peak_bytes
            chunkft = trace_step(spec, shape, TraceOptions()).replay(allocator="cpu").step_peak_bytes
            assert predicted > 1.05 * chunkft, (arch, seq_len)  # the loop's held output is modelled
            measured = measured_step_peak(spec, shape, None, loop="hf")
            errors[arch, seq_len] = (predicted - measured) / measured
    print({k: f"{v:+.2%}" for k, v in errors.items()})
    assert max(abs(e) for e in errors.values()) < TOLERANCE, errors
    assert sorted(abs(e) for e in errors.values())[len(errors) // 2] < 0.01, errors


@pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.parametrize("loop", ["hf-trainer", "torchtune"])
def test_trainer_and_torchtune_loops_match_malloc_measurement(loop):
    # transformers.Trainer's training_step (output dropped before backward) and torchtune's
    # full_finetune_single_device step (8 output chunks, an fp32 cross-entropy per chunk, `del
    # logits`): four architectures, two shapes each, every one within 2%, median within 1%
    # (256 and 512 tokens: malloc's ~0.3 MB of non-tensor bytes is 1% of a 128-token step here)
    errors = {}
    for arch in ("llama", "qwen2-tied", "gemma2", "phi3"):
        spec = tiny_recipe_arch(arch)
        for seq_len in (256, 512):
            shape = StepShape(batch=1, seq_len=seq_len, dtype="fp32")
            predicted = trace_step(spec, shape, TraceOptions(loop=loop)).replay(allocator="cpu").step_peak_bytes
            measured = measured_step_peak(spec, shape, None, loop=loop)
            errors[arch, seq_len] = (predicted - measured) / measured
    print(loop, {k: f"{v:+.2%}" for k, v in errors.items()})
    assert max(abs(e) for e in errors.values()) < TOLERANCE, errors
    assert sorted(abs(e) for e in errors.values())[len(errors) // 2] < 0.01, errors


# ---------------------------------------------------------------------------- 8B against MemTracker

MEMTRACKER_LLAMA3_8B_STEP_PEAK_BYTES = 16_068_911_112
"""MemTracker's peak above parameters and buffers for one Llama 3-8B full fine-tuning step (bf16,
batch 1, 1024 tokens, no optimizer), measured by test_llama3_8b_agrees_with_memtracker_live with
torch 2.13.0 and transformers 5.23 (26 s here, hence pinned for the fast test)."""


def llama3_8b_step_peak() -> int:
    from planner.model import resolve_model

    graph = trace_step(resolve_model("llama3-8b"), StepShape(batch=1, seq_len=1024, dtype="bf16"), TraceOptions())
    assert graph.template_layers == 3 and graph.num_layers == 32
    return graph.replay().step_peak_bytes


def test_llama3_8b_agrees_with_pinned_memtracker_peak():
    predicted = llama3_8b_step_peak()
    assert abs(predicted - MEMTRACKER_LLAMA3_8B_STEP_PEAK_BYTES) / MEMTRACKER_LLAMA3_8B_STEP_PEAK_BYTES < 0.01


@pytest.mark.slow
def test_llama3_8b_agrees_with_memtracker_live():
    from planner.measure import memtracker_peak
    from planner.model import resolve_model

    spec = resolve_model("llama3-8b")

    def make_step():  # inside MemTracker's FakeTensorMode: a cpu build is fake
        model = spec.build(device="cpu")
        model.train()
        match_real_attention_branch(model, StepShape(seq_len=1024))  # as trace_step does
        ids = torch.randint(0, 128256, (1, 1024))
        labels = torch.randint(0, 128256, (1, 1024))
        return model, lambda: step_loss(model, ids, labels).backward()

    tracked = memtracker_peak(make_step).peak_bytes
    assert abs(llama3_8b_step_peak() - tracked) / tracked < 0.01
