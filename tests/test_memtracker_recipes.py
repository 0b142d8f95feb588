"""Llama 3-8B at 1K tokens, one recipe axis at a time: the planner's prediction against torch's
MemTracker (torch.distributed._tools.mem_tracker) under FakeTensorMode running the real loop.

The real loop is the step a user of the recipe runs, built from the mechanisms the tracer runs
too, but executed here as an ordinary eager step on the fake model under MemTracker (not the
planner's recording and replay): planner.step.loop_forward ("chunkft" / "hf" loop) and
backward; planner.step.enable_checkpointing (every-K, selective `context_fn`); planner.
activations.OffloadHooks around forward and loss; `requires_grad_(False)` on the frozen
parameters; runtime.lora.apply_lora; the optimizer in backward: planner.train_axes.
SpanStepInBackward (ChunkAdamW's span step from runtime.subgrad's on_complete, as `chunkft run`
steps --optim chunkft) or OptimizerInBackward (one torch.optim.AdamW(foreach=False) per trained
tensor in its post-accumulate-grad hook: pure precision);
planner.optim_step.OptimizerStep (torch.optim.AdamW(foreach=True) / (fused=True), with fp32
masters under mixed precision) after backward.

Peak definition, as tests/test_accuracy.py's 8B comparison (equal to the byte there): bytes
above what is live before the step. MemTracker: its peak "Total" on the device minus its
"current" Total before the step, with the parameters, buffers, LoRA adapters and optimizer
state (masters, moments, step counters: created by a warm-up step, as a running job holds them)
tracked as external before the step. Planner: trace_step(spec, shape, trace_options(recipe,
...)).replay() with the exact-byte allocator (allocator="cpu", no CUDA rounding or cuBLAS
workspace; MemTracker counts exact storage bytes on a cpu device), `step_peak_bytes`. With an
optimizer step after backward the prediction is planner.evaluate.combine's: the higher of the
traced step's peak and its end (the gradients) plus `optimizer_temp_allocs` (planner.optim_step's
traced per-shape step, on fake cuda as the planner prices a GPU).

Offloaded activations: MemTracker books every storage by its tensor's device, and on fake cpu
the pinned host copies and the "device" tensors are both cpu. The copies that OffloadHooks'
pack makes are booked on a device of their own here (`_HostTagged`: storages created inside
pack), so MemTracker's cpu peak is device memory only, compared with the device replay; the
host copies' own peak is compared with replay(tier=HOST).

Every step is 1024 tokens, bf16, batch 1. A full-depth (32-layer) MemTracker step takes about
30 s here, so to keep the suite within its time budget every recipe runs on the preset's config
with SHORT = 8 decoder layers (planner.model.ModelSpec.config_for, the depth override
trace_step's templates use; the default step at full depth is tests/test_accuracy.py's);
bench/memtracker_recipes.py runs every recipe at full depth (all within 8 bytes there).

Two numbers per recipe: the step's peak, and the forward's (the peak up to the loss, before
backward starts: MemTracker's peak snapshot taken before `loss.backward()`, the replay's highest
point before the traced step's first backward op). At 1K tokens Llama 3-8B's step peaks at the
end of backward, where the gradients (16 GB) are live and the activations gone, so every-K,
selective checkpointing and offloading leave the step's peak where it was; the forward's peak is
where they show.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from planner.recipe import Precision, Recipe
from planner.trace import StepShape

TOLERANCE = 0.005
SHAPE = StepShape(batch=1, seq_len=1024, dtype="bf16")
SHORT = 8
"""Depth of the cases run shorter (the file's time budget): Llama 3-8B's config with 8 decoder layers."""
HOST = torch.device("meta")
"""The device MemTracker books the offloaded host copies on (a key of its snapshots, nothing more)."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    flags: str
    recipe: Recipe
    checkpointing: bool = False
    optimizer_after: bool = False
    """The recipe's optimizer steps after backward (planner.optim_step.OptimizerStep)."""
    layers: int | None = None
    """Depth override (None: the preset's 32 layers)."""


CASES = [
    Case("default", "", Recipe(), layers=SHORT),
    Case("hf loop", "--loop hf", Recipe(loop="hf"), layers=SHORT),
    Case("every-2", "--checkpointing every-2", Recipe(checkpoint_every=2), checkpointing=True, layers=SHORT),
    Case("selective", "--checkpointing selective", Recipe(selective_checkpointing=True), checkpointing=True,
         layers=SHORT),
    Case("offload (device)", "--offload-activations", Recipe(offload_activations=True), layers=SHORT),
    Case("freeze embed+head", "--freeze 'model.embed_tokens.*' --freeze 'lm_head.*'",
         Recipe(freeze=("model.embed_tokens.*", "lm_head.*")), layers=SHORT),
    Case("lora 8", "--lora 8", Recipe(lora_rank=8), layers=SHORT),
    Case("opt in bwd mixed", "--optimizer-in-backward", Recipe(optimizer_in_backward=True), layers=SHORT),
    Case("opt in bwd pure", "--optimizer-in-backward --precision pure",
         Recipe(optimizer_in_backward=True, precision="pure"), layers=SHORT),
    Case("adamw_torch mixed", "--optim adamw_torch", Recipe(optim="adamw_torch"), optimizer_after=True, layers=SHORT),
    Case("adamw_torch pure", "--optim adamw_torch --precision pure", Recipe(optim="adamw_torch", precision="pure"),
         optimizer_after=True, layers=SHORT),
    Case("adamw_torch_fused mixed", "--optim adamw_torch_fused", Recipe(optim="adamw_torch_fused"),
         optimizer_after=True, layers=SHORT),
    Case("adamw_torch_fused pure", "--optim adamw_torch_fused --precision pure",
         Recipe(optim="adamw_torch_fused", precision="pure"), optimizer_after=True, layers=SHORT),
]


def model_spec(layers: int | None = None):
    from planner.model import ModelSpec, resolve_model

    spec = resolve_model("llama3-8b")
    if layers is None:
        return spec
    return ModelSpec(name=f"llama3-8b-{layers}l", source="config", config=spec.config_for(layers), num_layers=layers)


# ---------------------------------------------------------------------------- the planner


@dataclasses.dataclass(frozen=True)
class Predicted:
    device_bytes: int
    forward_bytes: int
    host_bytes: int = 0


def predicted(case: Case) -> Predicted:
    from planner.evaluate import one_chunk_active_set, optimizer_temp_allocs, param_layout, trained_grad_spec
    from planner.schema import Tier
    from planner.strategy import Strategy
    from planner.trace import trace_step
    from planner.train_axes import trace_options

    spec = model_spec(case.layers)
    layout = param_layout(spec, SHAPE.dtype)
    options = trace_options(case.recipe, grad=trained_grad_spec(layout, case.recipe), checkpointing=case.checkpointing,
                            loss_chunk_tokens=0)
    graph = trace_step(spec, SHAPE, options)
    timeline = graph.replay()
    peak = timeline.step_peak_bytes
    if case.optimizer_after:
        strategy = Strategy(recipe=case.recipe, checkpointing=case.checkpointing)
        temps = optimizer_temp_allocs(strategy, layout, one_chunk_active_set(layout, case.recipe))
        end = int(timeline.total_bytes[-1]) - timeline.start_bytes
        peak = max(peak, end + sum(a.nbytes for a in temps))
    host = graph.replay(tier=Tier.HOST).step_peak_bytes if case.recipe.offload_activations else 0
    return Predicted(device_bytes=peak, forward_bytes=int(timeline.total_bytes[:forward_end(graph)].max())
                     - timeline.start_bytes, host_bytes=host)


def forward_end(graph) -> int:
    """Index of the step's first backward op: the `ones_like` that seeds the loss's gradient
    (the traced step's ops before it are forward and loss)."""
    from planner.schema import Phase

    for op in graph.ops:
        if op.name == "aten.ones_like.default" and op.phase == Phase.LOSS or op.phase == Phase.BACKWARD:
            return op.index
    raise AssertionError("no backward op in the traced step")


# ---------------------------------------------------------------------------- the real loop


def _tracker(*, host_tagged: bool, grad_hooks: bool):
    """MemTracker; `host_tagged`: the storages created while `host` is set (OffloadHooks' pack:
    the pinned host copy) are booked on HOST instead of their tensor's (fake cpu) device.
    Without `grad_hooks` it installs none of its gradient hooks: MemTracker registers a tensor
    hook on every parameter of each module it enters (`_track_module_params_and_buffers`), which
    raises on a frozen parameter ("cannot register a hook on a tensor that doesn't require
    gradient"), and its post-accumulate-grad hook would read the gradient the optimizer in
    backward has just dropped. The hooks only relabel a gradient's storage "Gradient" (it is
    tracked as an op output anyway), so the totals compared here are the same."""
    from torch.distributed._tools.mem_tracker import MemTracker, _UpdateType, _WeakRefInfo

    class Tracker(MemTracker):
        host = False

        def _track(self, reftype, t):
            if not self.host:
                return super()._track(reftype, t)
            st = t.untyped_storage()
            if self._WINFO.get(st, (None, None))[0] is None:
                winfo, w_st = _WeakRefInfo.create_winfo(st, HOST, reftype, self._delete_callback)
                self._WINFO[st] = (winfo, w_st)
                if winfo.mem_consumed > 0:
                    self._update_snap(_UpdateType.ADD, winfo)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module,
                                                            install_grad_hooks=install_grad_hooks and grad_hooks)

    return Tracker() if host_tagged or not grad_hooks else MemTracker()


def _offload_hooks(tracker):
    from planner.activations import OffloadHooks

    class Tagged(OffloadHooks):
        def _pack(self, tensor):
            tracker.host = True
            try:
                return super()._pack(tensor)
            finally:
                tracker.host = False

    return Tagged()


@dataclasses.dataclass(frozen=True)
class Tracked:
    device_bytes: int
    forward_bytes: int
    host_bytes: int = 0
    seconds: float = 0.0


def tracked(case: Case) -> Tracked:
    """One real step of the recipe on the fake model, under MemTracker (see the module doc)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    from planner.optim_step import OptimizerStep
    from planner.step import enable_checkpointing, loop_forward
    from planner.trace import match_real_attention_branch
    from planner.recipe import chunk_adamw_in_backward
    from planner.train_axes import OptimizerInBackward, SpanStepInBackward, trainable_grad_spec

    recipe = case.recipe
    spec = model_spec(case.layers)
    start = time.perf_counter()
    cpu = torch.device("cpu")
    with FakeTensorMode():
        model = spec.build(device="cpu", dtype=SHAPE.torch_dtype())  # fake: built inside the mode
        model.train()
        external: list = [model]
        grad = trainable_grad_spec(recipe, (n for n, _ in model.named_parameters()))
        if grad is not None and not recipe.lora_rank:
            for n, p in model.named_parameters():
                p.requires_grad_(grad[n])
        match_real_attention_branch(model, SHAPE)  # as trace_step does
        if case.checkpointing:
            enable_checkpointing(model, every=recipe.checkpoint_every, selective=recipe.selective_checkpointing)
        trained = [p for p in model.parameters() if p.requires_grad]
        if recipe.lora_rank:
            from runtime.lora import LoraConfig, apply_lora

            adapters = apply_lora(model, LoraConfig(rank=recipe.lora_rank, targets=recipe.lora_targets))
            external.append(adapters)
            trained = list(adapters.parameters())
        mixed = recipe.precision == Precision.MIXED
        if recipe.optimizer_in_backward and chunk_adamw_in_backward(recipe.optim, mixed):
            oib = SpanStepInBackward(model, grad, optim=recipe.optim, master_weights=mixed)  # ChunkAdamW's step
            external += oib.state_tensors()
        elif recipe.optimizer_in_backward:
            oib = OptimizerInBackward(trained, master_weights=mixed)
            external += oib.state_tensors()
        step = None
        if case.optimizer_after:
            step = OptimizerStep(recipe.optim, recipe.precision.value, trained)
            for p in trained:  # a warm-up step creates the state a running job holds
                p.grad = torch.empty_like(p)
            step.step()
            for p in trained:
                p.grad = None
            external += step.state_tensors()
        ids = torch.randint(0, spec.config.vocab_size, (SHAPE.batch, SHAPE.seq_len))
        labels = torch.randint(0, spec.config.vocab_size, (SHAPE.batch, SHAPE.seq_len))

        frozen = any(not p.requires_grad for p in model.parameters())
        tracker = _tracker(host_tagged=recipe.offload_activations,
                           grad_hooks=not (frozen or recipe.optimizer_in_backward))
        tracker.track_external(*external)
        baseline = tracker.get_tracker_snapshot("current").get(cpu, {}).get("Total", 0)
        with tracker:
            with _offload_hooks(tracker) if recipe.offload_activations else contextlib.nullcontext():
                loss, held = loop_forward(model, ids, labels, loop=recipe.loop.value)
            forward = tracker.get_tracker_snapshot("peak").get(cpu, {}).get("Total", 0)
            loss.backward()
            del loss, held
            if step is not None:
                step.step()
        peak = tracker.get_tracker_snapshot("peak")
    return Tracked(device_bytes=int(peak.get(cpu, {}).get("Total", 0)) - int(baseline),
                   forward_bytes=int(forward) - int(baseline),
                   host_bytes=int(peak.get(HOST, {}).get("Total", 0)), seconds=time.perf_counter() - start)


def compare(case: Case) -> dict:
    """One row of the table: MemTracker's peak, the prediction, the relative error."""
    t0 = time.perf_counter()
    pred = predicted(case)
    t1 = time.perf_counter()
    real = tracked(case)
    row = {"recipe": case.name, "flags": case.flags, "layers": case.layers or 32,
           "memtracker_bytes": real.device_bytes, "predicted_bytes": pred.device_bytes,
           "error": (pred.device_bytes - real.device_bytes) / real.device_bytes,
           "memtracker_fwd_bytes": real.forward_bytes, "predicted_fwd_bytes": pred.forward_bytes,
           "fwd_error": (pred.forward_bytes - real.forward_bytes) / real.forward_bytes,
           "predict_s": round(t1 - t0, 1), "memtracker_s": round(real.seconds, 1)}
    if case.recipe.offload_activations:
        row["memtracker_host_bytes"], row["predicted_host_bytes"] = real.host_bytes, pred.host_bytes
    return row


def format_table(rows: list[dict]) -> str:
    lines = [f"{'recipe':26} {'layers':>6} {'MemTracker B':>16} {'predicted B':>16} {'error':>9}   "
             f"{'fwd MemTracker B':>16} {'fwd predicted B':>16} {'fwd error':>9}"]
    for r in rows:
        lines.append(f"{r['recipe']:26} {r['layers']:>6} {r['memtracker_bytes']:>16,} {r['predicted_bytes']:>16,} "
                     f"{r['error']:>+9.4%}   {r['memtracker_fwd_bytes']:>16,} {r['predicted_fwd_bytes']:>16,} "
                     f"{r['fwd_error']:>+9.4%}")
        if "memtracker_host_bytes" in r:
            h, p = r["memtracker_host_bytes"], r["predicted_host_bytes"]
            lines.append(f"{'  (host copies)':26} {r['layers']:>6} {h:>16,} {p:>16,} "
                         f"{(p - h) / h if h else 0.0:>+9.4%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the tests

_ROWS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if _ROWS:
        print("\n" + format_table(_ROWS))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_recipe_within_half_a_percent_of_memtracker(case):
    row = compare(case)
    _ROWS.append(row)
    print(format_table([row]))
    assert abs(row["error"]) < TOLERANCE, row
    assert abs(row["fwd_error"]) < TOLERANCE, row
    if case.recipe.offload_activations:
        h, p = row["memtracker_host_bytes"], row["predicted_host_bytes"]
        assert h > 0 and abs(p - h) / h < TOLERANCE, row
