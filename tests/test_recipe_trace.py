"""Recipe axes that change the traced step, traced under fake tensors and held against the same
step run for real on the CPU (planner.measure's mallinfo2 sampling, as tests/test_accuracy.py).

Each axis runs its real implementation in both: fnmatch-selected trainable sets by
requires_grad, transformers' own `every_n_layers` checkpointing, torch's selective-checkpoint
contexts, runtime.lora's adapters, one torch AdamW per tensor stepped in
register_post_accumulate_grad_hook. Four architectures (Llama, Qwen2 with tied embeddings,
Gemma 2, Phi-3), two shapes each; the models are big enough in activations (hidden 256, up to
1,024 tokens) that the axis moves the peak.
"""

from __future__ import annotations

import contextlib
import math
import statistics

import pytest
import torch

from planner.activations import OffloadHooks, host_bytes
from planner.measure import mallinfo2_available, measure_malloc_peak
from planner.model import ModelSpec
from planner.recipe import Recipe
from planner.schema import Component, Phase, Tier
from planner.step import loop_forward
from planner.trace import StepShape, TraceOptions, match_real_attention_branch, trace_step
from planner.train_axes import OptimizerInBackward, trainable_grad_spec

pytestmark = [pytest.mark.newest_deps,
              pytest.mark.skipif(not mallinfo2_available(), reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")]

TOLERANCE = 0.02
ARCHS = ("llama", "qwen2-tied", "gemma2", "phi3")
SHAPES = ((1, 256), (2, 192))


@pytest.fixture(autouse=True, scope="module")
def _quiet_process():
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def tiny(arch: str, vocab: int | None = None) -> ModelSpec:
    import copy
    import dataclasses

    from tests.test_accuracy import tiny_recipe_arch

    spec = tiny_recipe_arch(arch)
    if vocab is None:
        return spec
    config = copy.deepcopy(spec.config)
    config.vocab_size = vocab
    return dataclasses.replace(spec, config=config)


def measured(spec: ModelSpec, shape: StepShape, *, trainable=None, every: int = 0, selective: bool = False,
             lora: tuple = (), optimizer_in_backward: bool = False, offload: bool = False) -> int:
    """Peak bytes above baseline of one real CPU step with the axes applied by their real APIs."""
    torch.manual_seed(0)
    model = spec.build(device="cpu", dtype=shape.torch_dtype())
    model.train()
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
    if every or selective:
        kwargs = {"use_reentrant": False}
        if selective:
            from planner.activations import selective_context_fn

            kwargs["context_fn"] = selective_context_fn
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every or 1)
    trained = [p for p in model.parameters() if p.requires_grad]
    if lora:
        from runtime.lora import LoraConfig, apply_lora

        trained = list(apply_lora(model, LoraConfig(rank=lora[0], targets=lora[1])).parameters())
    oib = OptimizerInBackward(trained, master_weights=True) if optimizer_in_backward else None
    vocab = spec.config.vocab_size
    ids = torch.randint(0, vocab, (shape.batch, shape.seq_len))
    labels = torch.randint(0, vocab, (shape.batch, shape.seq_len))
    match_real_attention_branch(model, shape)

    def step():
        with OffloadHooks() if offload else contextlib.nullcontext():
            loss, held = loop_forward(model, ids, labels)
        loss.backward()
        del loss, held

    step()
    model.zero_grad(set_to_none=True)
    for p in trained:
        p.grad = None
    peak = measure_malloc_peak(step).peak_bytes
    del oib
    return peak


def predicted(spec: ModelSpec, shape: StepShape, options: TraceOptions) -> int:
    """The traced step's peak on the CPU: the device's and the host's bytes together, as one CPU
    process holds both (offloaded activations are host-tier storages)."""
    return trace_step(spec, shape, options).replay(allocator="cpu", tier=None).step_peak_bytes


def check(errors: dict) -> None:
    print({k: f"{v:+.2%}" for k, v in errors.items()})
    assert max(abs(e) for e in errors.values()) < TOLERANCE, errors
    assert statistics.median(abs(e) for e in errors.values()) < 0.01, errors


def param_names(spec: ModelSpec) -> list[str]:
    return [n for n, _ in spec.build(device="meta").named_parameters()]


FREEZE = Recipe(freeze=("*embed_tokens*", "*.layers.0.*", "*.layers.1.self_attn.*"))
LORA = (8, ("q_proj", "v_proj", "o_proj"))


def run_axis(axis: str) -> dict:
    """Prediction error of `axis` on every architecture and shape, with a value check per case."""
    errors = {}
    for arch in ARCHS:
        spec = tiny(arch)
        for batch, seq in SHAPES:
            shape = StepShape(batch=batch, seq_len=seq, dtype="fp32")
            base = predicted(spec, shape, TraceOptions())
            if axis == "freeze":
                grad = trainable_grad_spec(FREEZE, param_names(spec))
                opts, kwargs = TraceOptions(grad=grad), dict(trainable=FREEZE.is_trainable)
            elif axis == "every-2":
                opts, kwargs = TraceOptions(checkpointing=True, checkpoint_every=2), dict(every=2)
            elif axis == "selective":
                opts, kwargs = TraceOptions(checkpointing=True, selective_checkpointing=True), dict(selective=True)
            elif axis == "lora":
                opts, kwargs = TraceOptions(lora_rank=LORA[0], lora_targets=LORA[1]), dict(lora=LORA)
            elif axis == "offload":
                opts, kwargs = TraceOptions(offload_activations=True), dict(offload=True)
            else:
                opts, kwargs = TraceOptions(optimizer_in_backward=True, optim=FORLOOP), dict(optimizer_in_backward=True)
            p = predicted(spec, shape, opts)
            if axis == "offload":  # the device keeps what autograd does not save; the host gains it
                graph = trace_step(spec, shape, opts)
                assert graph.replay(allocator="cpu").step_peak_bytes < 0.75 * base, arch
                assert host_bytes(graph)[0] > 0.5 * base, arch
            if axis in ("every-2", "selective"):
                full = predicted(spec, shape, TraceOptions(checkpointing=True))
                assert full < p < base, (arch, axis, full, p, base)  # between full checkpointing and none
            elif axis in ("freeze", "lora"):
                assert p < 0.95 * base, (arch, axis, p, base)  # frozen weights save fewer inputs, no gradients
            m = measured(spec, shape, **kwargs)
            errors[arch, batch, seq] = (p - m) / m
    return errors


def test_trainable_and_freeze_patterns_match_malloc_measurement():
    check(run_axis("freeze"))


def test_every_second_layer_checkpointing_matches_malloc_measurement():
    check(run_axis("every-2"))


def test_selective_checkpointing_matches_malloc_measurement():
    check(run_axis("selective"))


def test_lora_adapters_match_malloc_measurement():
    check(run_axis("lora"))


def test_offloaded_activations_match_malloc_measurement():
    # Measured: device and host bytes together (one CPU process), against the replay of both tiers.
    check(run_axis("offload"))


FORLOOP = "adamw_torch_forloop"


def test_optimizer_in_backward_matches_malloc_measurement():
    # Short sequences, where the gradients (not the activations) set a plain step's peak: the
    # per-tensor step frees each gradient at once, so the peak is one tensor's step (the
    # embedding's: its gradient, sqrt(v) and its division). A 16K vocabulary makes that step
    # tens of MB, well above the ~0.3 MB the measurement sees beyond tensor storages.
    errors = {}
    for arch in ARCHS:
        spec = tiny(arch, vocab=16384)
        numels = [p.numel() for p in spec.build(device="meta").parameters()]
        largest = max(numels)
        for batch, seq in ((1, 64), (2, 48)):
            shape = StepShape(batch=batch, seq_len=seq, dtype="fp32")
            # torch's per-tensor AdamW hooks, measured with the same hooks (ChunkAdamW's span step in
            # backward is held against `chunkft run`: tests/test_step_in_backward.py)
            graph = trace_step(spec, shape, TraceOptions(optimizer_in_backward=True, optim=FORLOOP))
            grads = graph.replay().live_bytes[Component.GRADIENTS]
            assert all(s.free_op is not None for s in graph.storages.values() if s.component == Component.GRADIENTS)
            # one tensor's gradient at a time (a tied embedding's two contributions while they add
            # up), where a plain step ends with every gradient
            assert grads.max() <= 2 * 4 * largest, (arch, grads.max(), largest)
            tied = spec.config.tie_word_embeddings  # Qwen2 here and Gemma 2: one weight, two gradients
            assert tied or grads.max() < 0.7 * 4 * sum(numels), (arch, grads.max(), sum(numels))
            assert any(op.phase == Phase.OPTIMIZER for op in graph.ops)
            m = measured(spec, shape, optimizer_in_backward=True)
            errors[arch, batch, seq] = (graph.replay(allocator="cpu").step_peak_bytes - m) / m
        # bf16 with an fp32 master (mixed) casts each gradient to fp32 and steps in fp32: the
        # embedding's step holds 2 + 4 + 4 + 4 bytes per parameter, pure bf16 2 + 2 + 2
        if arch != "llama":
            continue
        shape = StepShape(batch=1, seq_len=64, dtype="bf16")
        mixed = trace_step(spec, shape, TraceOptions(optimizer_in_backward=True, optim=FORLOOP)).replay().step_peak_bytes
        pure = trace_step(spec, shape, TraceOptions(optimizer_in_backward=True, optim=FORLOOP,
                                                    master_weights=False)).replay()
        assert mixed - pure.step_peak_bytes >= 7 * largest, (arch, mixed, pure.step_peak_bytes)
    check(errors)


def test_template_replication_equals_the_full_trace_for_every_axis():
    # 7 layers: every-3 checkpoints layers 0, 3 and 6, a key pattern with period 3; LoRA gives
    # layer 0 (no input gradient) its own key. Replicated and fully traced steps must agree op by op.
    import copy
    import dataclasses

    spec = tiny("llama")
    config = copy.deepcopy(spec.config)
    config.num_hidden_layers = 7
    spec = dataclasses.replace(spec, config=config, num_layers=7)
    shape = StepShape(batch=1, seq_len=64, dtype="fp32")
    for opts in (TraceOptions(checkpointing=True, checkpoint_every=3),
                 TraceOptions(lora_rank=4, lora_targets=("q_proj", "o_proj"), checkpointing=True),
                 TraceOptions(optimizer_in_backward=True, grad=trainable_grad_spec(FREEZE, param_names(spec))),
                 TraceOptions(offload_activations=True, checkpointing=True, checkpoint_every=2)):
        graph = trace_step(spec, shape, opts)
        full = trace_step(spec, shape, dataclasses.replace(opts, replicate=False))
        assert graph.template_layers is not None and len(graph) == len(full)
        for tier in (None, Tier.GPU):
            a, b = graph.replay(tier=tier), full.replay(tier=tier)
            assert (a.total_bytes == b.total_bytes).all(), opts


# ---------------------------------------------------------------------------- the cost model and the CLI

def test_optimizer_state_and_chunks_follow_the_trainable_set():
    from planner.evaluate import chunk_table, evaluate, param_layout
    from planner.hardware import hardware
    from planner.strategy import Strategy
    from planner.train_axes import trained_shapes

    spec, shape, hw = tiny("llama"), StepShape(batch=1, seq_len=128, dtype="bf16"), hardware("rtx4090")
    layout = param_layout(spec, "bf16")
    total = layout.total_params
    for recipe in (Recipe(), FREEZE, Recipe(trainable=("*.mlp.*",)), Recipe(lora_rank=8)):
        trained = sum(math.prod(s) for _, s, _ in trained_shapes(recipe, layout.named_shapes))
        est = evaluate(spec, shape, Strategy(recipe=recipe), hw)
        gpu = est.components[Tier.GPU]
        # fp32 master (4 B) and two fp32 moments (8 B) per trained parameter, nothing for the rest
        assert gpu[Component.MASTER] == 4 * trained and gpu[Component.OPTIMIZER] == 8 * trained, recipe
        if recipe == Recipe():
            assert trained == total
        elif recipe.lora_rank:  # A (8 x in) and B (out x 8) on every q_proj and v_proj
            assert trained == 4 * 8 * 2 * (256 + 256) - 4 * 8 * 256 + 4 * 8 * 128  # v_proj: 128 outputs (2 KV heads)
        else:
            assert 0 < trained < 0.8 * total
    # ChunkFT with a trainable set cuts only the trainable parameters into chunks
    table = chunk_table(spec, "bf16", 4, FREEZE)
    names = {s.param for chunk in table.chunks for s in chunk}
    assert names and all(FREEZE.is_trainable(n) for n in names)
    assert sum(s.nbytes for chunk in table.chunks for s in chunk) == 2 * sum(
        math.prod(s) for n, s, _ in layout.named_shapes if FREEZE.is_trainable(n))
    est = evaluate(spec, shape, Strategy(chunks=4, state_tier=Tier.HOST, checkpointing=True, recipe=FREEZE), hw)
    assert est.peak_bytes[Tier.HOST] > 0


def test_offloaded_activations_leave_the_gpu_for_pinned_host_memory():
    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.strategy import Strategy

    spec, shape, hw = tiny("llama"), StepShape(batch=2, seq_len=1024, dtype="bf16"), hardware("rtx4090")
    for ckpt in (False, True):
        plain = evaluate(spec, shape, Strategy(checkpointing=ckpt), hw)
        off = evaluate(spec, shape, Strategy(checkpointing=ckpt, recipe=Recipe(offload_activations=True)), hw)
        assert plain.peak_bytes[Tier.HOST] == 0
        # without checkpointing the saved activations set the GPU peak; with it, the optimizer step may
        assert off.peak_bytes[Tier.GPU] < (0.8 if not ckpt else 1.0001) * plain.peak_bytes[Tier.GPU], ckpt
        host = off.components[Tier.HOST]
        assert host[Component.ACTIVATIONS] > 0 and off.peak_bytes[Tier.HOST] == sum(host.values())
        graph = trace_step(spec, shape, TraceOptions(checkpointing=ckpt, offload_activations=True))
        assert (host[Component.ACTIVATIONS], host.get(Component.ROUNDING, 0)) == host_bytes(graph)


def test_recipe_refuses_what_it_cannot_price_or_run():
    from planner.errors import ChunkftError
    from planner.evaluate import evaluate
    from planner.hardware import hardware
    from planner.strategy import OptimizerDevice, Strategy

    spec, hw = tiny("llama"), hardware("rtx4090")
    shape = StepShape(batch=1, seq_len=64, dtype="fp16")
    oib = Recipe(optimizer_in_backward=True)
    for strategy, dtype, words in [
        (Strategy(chunks=4, state_tier=Tier.HOST, recipe=Recipe(optimizer_in_backward=True, precision="pure")),
         "bf16", "only ChunkAdamW steps in backward"),
        (Strategy(recipe=Recipe(optimizer_in_backward=True, optim="adamw_torch")), "bf16", "is neither"),
        (Strategy(optimizer_device=OptimizerDevice.HOST, state_tier=Tier.HOST, recipe=oib), "bf16", "host optimizer"),
        (Strategy(recipe=oib), "fp16", "loss-scale"),
        (Strategy(chunks=2, state_tier=Tier.HOST, recipe=Recipe(lora_rank=8)), "bf16", "--lora"),
        (Strategy(checkpointing=False, recipe=Recipe(checkpoint_every=2)), "bf16", "every-2"),
    ]:
        with pytest.raises(ChunkftError, match=words):
            evaluate(spec, StepShape(batch=1, seq_len=64, dtype=dtype), strategy, hw)
    with pytest.raises(ChunkftError, match="leave no parameter"):
        evaluate(spec, shape, Strategy(recipe=Recipe(trainable=("nothing.*",))), hw)
    for recipe, flag in ((Recipe(lora_rank=8), "--lora 8"), (FREEZE, "--trainable/--freeze"),
                         (Recipe(checkpoint_every=3), "every-3"), (Recipe(selective_checkpointing=True), "selective"),
                         (Recipe(offload_activations=True), "--offload-activations")):
        if recipe.lora_rank or recipe.trainable or recipe.freeze:  # chunkft run trains every parameter
            with pytest.raises(ChunkftError, match=flag):
                recipe.require_runnable()
        else:  # the activation policies run (tests/test_lean_activations.py)
            recipe.require_runnable()
        with pytest.raises(ChunkftError, match=flag):
            recipe.require_sharded_modelled()
    with pytest.raises(ChunkftError, match="--optimizer-in-backward"):
        oib.require_sharded_modelled()
    Recipe(loop="hf").require_runnable()  # the runtime runs both loops


def test_fit_and_plan_carry_the_recipe_and_run_refuses_it(tmp_path, capsys):
    import json

    from planner.cli import main

    common = ["examples/tiny", "--gpu", "1GiB", "--seq", "256", "--batch", "2", "--dtype", "fp32", "--chunks", "4"]
    peaks = {}
    for extra in ([], ["--checkpointing", "every-2"], ["--lora", "8"], ["--optimizer-in-backward"],
                  ["--offload-activations"]):
        assert main(["fit", *common, *extra, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        # labels end with the recipe's own axes (Strategy.label); key rows by the strategy part
        suffix = ", " + Recipe.from_json(doc["recipe"]).label()
        rows = {r["label"].removesuffix(suffix) if suffix != ", " else r["label"]: r for r in doc["rows"]}
        peaks[tuple(extra)] = rows
        if extra:
            assert doc["recipe"] != {"loop": "chunkft"} and doc["recipe_description"] != "chunkft's step"
    assert peaks[("--lora", "8")]["full FT"]["peak_bytes"]["gpu"] < peaks[()]["full FT"]["peak_bytes"]["gpu"]
    assert not any(label.startswith("ChunkFT") for label in peaks[("--lora", "8")])  # LoRA: one chunk
    # ChunkFT's spans step in backward too (ChunkAdamW's on_complete): below the step after backward
    oib_rows = {k.removesuffix(", opt in bwd"): r for k, r in peaks[("--optimizer-in-backward",)].items()}
    chunked = [k for k in oib_rows if k.startswith("ChunkFT")]
    assert chunked and all(oib_rows[k]["peak_bytes"]["gpu"] < peaks[()][k]["peak_bytes"]["gpu"] for k in chunked)
    assert all("ckpt" in label for label in peaks[("--checkpointing", "every-2")])
    assert (peaks[("--checkpointing", "every-2")]["full FT, ckpt"]["peak_bytes"]["gpu"]
            > peaks[()]["full FT, ckpt"]["peak_bytes"]["gpu"])
    assert (peaks[("--offload-activations",)]["full FT"]["peak_bytes"]["host"]
            > peaks[()]["full FT"]["peak_bytes"]["host"] == 0)
    assert main(["fit", *common, "--lora", "8"]) == 0
    assert "recipe: chunkft's step, LoRA r=8 on q_proj,v_proj" in capsys.readouterr().out

    plan = tmp_path / "plan.json"
    assert main(["plan", "examples/tiny", "--gpu", "1GiB", "--seq", "128", "--batch", "1", "--dtype", "fp32",
                 "--lora", "8", "-o", str(plan)]) == 0
    assert json.loads(plan.read_text())["strategy"]["recipe"]["lora_rank"] == 8
    capsys.readouterr()
    code = main(["run", str(plan), "--data", "examples/tiny/train.jsonl", "--device", "cpu", "--steps", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--lora 8" in err and "chunkft run does not execute" in err, err
