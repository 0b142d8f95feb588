"""Streamed weights (runtime.stream, planner.streaming): plans with `weights: "stream"` run, train
the same weights bit for bit as the resident run, checkpoint and resume, hold at most two
decoder layers on the device, and their CPU heap follows the streamed prediction op by op."""

from __future__ import annotations

import json

import pytest
import torch

from test_train import TINY, _args, make_plan, write_data

WIDE = {**TINY, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "vocab_size": 4096,
        "max_position_embeddings": 256}


def _train(tmp_path, name, *, weights, steps=4, traced=False, **plan_fields):
    from runtime.run_cli import build_run

    plan, spec, plan_obj = make_plan(tmp_path / name, weights=weights, **plan_fields)
    trace = {"trace": tmp_path / f"{name}.trace.jsonl"} if traced else {}
    trainer, _, _, _ = build_run(_args(plan, write_data(tmp_path / f"{name}.jsonl"), tmp_path / name / "out",
                                       steps=steps, **trace))
    result = trainer.train()
    trainer.optimizer.inner.close()
    return trainer, result, plan_obj, spec


@pytest.mark.parametrize("chunks,checkpointing,dtype", [(1, False, "fp32"), (3, True, "fp32"), (3, False, "bf16")])
def test_streamed_run_equals_resident_run_bitwise(tmp_path, chunks, checkpointing, dtype):
    for name in ("gpu", "stream"):
        (tmp_path / name).mkdir()
    resident, r_res, _, _ = _train(tmp_path, "gpu", weights="gpu", chunks=chunks, checkpointing=checkpointing,
                                   dtype=dtype)
    streamed, r_str, _, _ = _train(tmp_path, "stream", weights="stream", chunks=chunks,
                                   checkpointing=checkpointing, dtype=dtype)
    assert streamed.streamer is not None and resident.streamer is None
    assert r_str.losses == r_res.losses
    a, b = resident.model.state_dict(), streamed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # between steps no decoder layer is on the device; the host holds every layer once
    assert streamed.streamer.resident_layers() == []
    layers = [p for n, p in streamed.model.named_parameters() if n.startswith("model.layers.")]
    assert all(p.untyped_storage().nbytes() == 0 for p in layers)
    assert streamed.streamer.host_bytes() >= sum(p.numel() * p.element_size() for p in layers)


def test_at_most_two_layers_on_the_device(tmp_path):
    """Forward, backward and the recomputation under checkpointing: never more than the layer
    computing and the one arriving."""
    from planner.chunks import make_chunk_table_from_model
    from planner.step import enable_checkpointing, step_loss
    from runtime.stream import stream_model

    config = {**TINY, "num_hidden_layers": 5}
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    from planner.model import resolve_model

    model = resolve_model(str(model_dir)).build(dtype=torch.float32, device="cpu")
    enable_checkpointing(model)
    model.train()
    streamer = stream_model(model, "model.layers", "cpu")
    ids = torch.randint(0, 300, (2, 16))
    with _ResidentCounter(streamer) as seen:
        step_loss(model, ids, ids).backward()
    assert max(seen) == 2 and len(seen) > 100  # sampled at every aten op of the step
    assert streamer.fetches == 5 + 5  # each layer once forward, once backward
    streamer.after_backward()
    assert streamer.device_bytes() == 0
    # ChunkFT without checkpointing: a chunk in the last layer only; backward never reaches the
    # first layers, which are neither fetched nor prefetched in backward. (HF's checkpointing
    # makes every layer's output need a gradient, so there backward visits every layer.)
    model = resolve_model(str(model_dir)).build(dtype=torch.float32, device="cpu")
    model.train()
    streamer = stream_model(model, "model.layers", "cpu")
    table = make_chunk_table_from_model(model, 5)
    assert table.num_chunks == 5
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.4.") or n.startswith("lm_head") or n.startswith("model.norm"))
    streamer.fetches = 0
    with _ResidentCounter(streamer) as seen:
        step_loss(model, ids, ids).backward()
    assert streamer.fetches == 5 + 1 and max(seen) == 2


class _ResidentCounter:
    """How many decoder layers are on the device at every aten op (a TorchDispatchMode)."""

    def __init__(self, streamer):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: list[int] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts.append(len(streamer.resident_layers()))
                return func(*args, **(kwargs or {}))

        self.counts, self.mode = counts, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.counts

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_streamed_checkpoint_resumes_bitwise(tmp_path):
    """Checkpoints hold the weights as they rest (the host copies); a resumed streamed run
    equals the uninterrupted one."""
    from runtime.run_cli import build_run

    plan, _, _ = make_plan(tmp_path, weights="stream", chunks=3)
    data = write_data(tmp_path / "d.jsonl")
    full, _, _, _ = build_run(_args(plan, data, tmp_path / "full", steps=6))
    full.train()
    full.optimizer.inner.close()
    first, _, _, _ = build_run(_args(plan, data, tmp_path / "cut", steps=6))
    first.train(stop_after=3)
    first.optimizer.inner.close()
    first.claimed.release()  # the killed run's lock goes with its process
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / (tmp_path / "cut" / "latest").read_text().strip())
    for n, t in saved.state_dict().items():  # the checkpoint is the host copy, every layer distinct
        assert torch.equal(t, first.model.state_dict()[n]), n
    resumed, _, _, _ = build_run(_args(plan, data, tmp_path / "cut", steps=6, resume=True))
    resumed.train()
    resumed.optimizer.inner.close()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_streamed_step_heap_follows_the_streamed_prediction(tmp_path):
    """CPU mallinfo2 of real streamed ChunkFT steps against the replay of the streamed trace
    (planner.streaming.stream_weights on trace_step, allocator="cpu"), chunk by chunk, within 2%.
    A small vocabulary puts the peak inside the decoder layers, where the streamed rise holds
    the two fetched layers that the resident run had before the step began."""
    from planner.evaluate import param_layout
    from planner.streaming import packed_layer_bytes, stream_weights
    from planner.trace import TraceOptions, trace_step

    (tmp_path / "s").mkdir()
    trainer, result, plan_obj, spec = _train(tmp_path, "s", weights="stream", chunks=3, config={**WIDE, "vocab_size": 512},
                                              seq_len=256, batch=1, prefetch_depth=0, traced=True, steps=6)
    layout = param_layout(spec, plan_obj.shape.dtype)
    packed = packed_layer_bytes(layout.named_shapes, layout.layer_prefix, layout.num_layers)
    for step in (3, 4, 5):  # second cycle: every chunk's state exists
        k = step % 3
        graph = trace_step(spec, plan_obj.shape, TraceOptions(grad=plan_obj.chunk_table.grad_spec(k)))
        resident = graph.replay(allocator="cpu")
        streamed = stream_weights(graph, packed).replay(allocator="cpu")
        assert resident.start_bytes - streamed.start_bytes == sum(packed.values())  # fp32: no packing gaps
        assert streamed.step_peak_bytes - resident.step_peak_bytes == 2 * packed[0]
        predicted, measured = streamed.step_peak_bytes, result.step_peaks[step]
        print(f"chunk {k}: measured {measured} B, predicted {predicted} B ({measured / predicted - 1:+.2%})")
        assert abs(measured - predicted) <= 0.02 * predicted, (k, measured, predicted)


def test_streamed_plan_host_and_gpu_bytes():
    """evaluate: a streamed plan holds fewer GPU bytes than the resident one and every layer's
    packed bytes on the host (one buffer per layer, registered in place: no rounding)."""
    from planner.evaluate import evaluate, param_layout
    from planner.hardware import hardware
    from planner.model import resolve_model
    from planner.schema import Component, Tier
    from planner.strategy import Strategy
    from planner.streaming import packed_layer_bytes
    from planner.trace import StepShape

    spec = resolve_model("llama3-8b")
    shape = StepShape(batch=1, seq_len=1024, dtype="bf16")
    hw = hardware("rtx4090")
    resident = evaluate(spec, shape, Strategy(chunks=64, state_tier=Tier.HOST, checkpointing=True), hw)
    streamed = evaluate(spec, shape, Strategy(chunks=64, state_tier=Tier.HOST, checkpointing=True, weights="stream"),
                        hw)
    layout = param_layout(spec, "bf16")
    packed = list(packed_layer_bytes(layout.named_shapes, layout.layer_prefix, layout.num_layers).values())
    assert streamed.components[Tier.HOST][Component.WEIGHTS] == sum(packed)
    saved = resident.components[Tier.GPU][Component.WEIGHTS] - streamed.components[Tier.GPU][Component.WEIGHTS]
    assert saved >= (layout.num_layers - 2) * packed[0]  # at most the computing and the arriving layer
    assert streamed.peak_bytes[Tier.GPU] < resident.peak_bytes[Tier.GPU] - 12 * 2**30  # 30 of 32 layers of 436 MiB


def test_allocator_settings_of_the_plan_are_applied_and_recorded(tmp_path, monkeypatch):
    """The plan's --alloc-conf reaches PyTorch through PYTORCH_CUDA_ALLOC_CONF before CUDA starts
    (CUDA path; here: the refusal of a conflicting environment, and the CPU trace header)."""
    import torch as _torch

    from planner.errors import ChunkftError
    from planner.recipe import Recipe
    from runtime.run_cli import apply_alloc_conf, build_run

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert apply_alloc_conf("expandable_segments:True", _torch.device("cpu")) == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    with pytest.raises(ChunkftError, match="priced for"):
        apply_alloc_conf("expandable_segments:True", _torch.device("cuda"))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:oops")
    with pytest.raises(ChunkftError, match="PYTORCH_CUDA_ALLOC_CONF in the environment"):
        apply_alloc_conf("", _torch.device("cpu"))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    plan, _, _ = make_plan(tmp_path, chunks=1, recipe=Recipe(alloc_conf="expandable_segments:True"))
    trace = tmp_path / "t.jsonl"
    trainer, _, _, _ = build_run(_args(plan, write_data(tmp_path / "d.jsonl"), tmp_path / "out", steps=1, trace=trace))
    trainer.train()
    trainer.optimizer.inner.close()
    header = json.loads(trace.read_text().splitlines()[0])
    assert header["alloc_conf"] == "expandable_segments:True"
