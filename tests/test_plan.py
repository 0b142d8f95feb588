"""Plan files: JSON round trip, and every refusal is one line naming the problem."""

from __future__ import annotations

import json

import pytest

from planner.errors import ChunkftError
from planner.hardware import hardware
from planner.model import resolve_model
from planner.plan import PLAN_SCHEMA_VERSION, Plan, check_plan_model, load_plan, make_plan, named_shapes, save_plan
from planner.schema import Component, Tier
from planner.solve import Objective
from planner.strategy import Budget, Estimate, Strategy
from planner.trace import StepShape


def tiny_config(path, *, hidden=64, layers=2, tie=False):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    return resolve_model(str(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("tiny"))


def a_plan(model, chunks=3) -> Plan:
    strategy = Strategy(chunks=chunks, state_tier=Tier.HOST, checkpointing=True, update_interval=4)
    est = Estimate(strategy=strategy, peak_bytes={Tier.GPU: 1000, Tier.HOST: 200, Tier.DISK: 0},
                   components={Tier.GPU: {Component.WEIGHTS: 600, Component.ACTIVATIONS: 400},
                               Tier.HOST: {Component.MASTER: 200}, Tier.DISK: {}},
                   reserved_bytes=2 * 2**20, step_time_s=0.25, worst_chunk=1, context_bytes=512,
                   step_time_parts_s={"compute": 0.2, "transfer": 0.05})
    return make_plan(model, StepShape(seq_len=64, batch=2), hardware("h100"),
                     Budget(gpu_bytes=24 * 2**30, host_bytes=64 * 2**30), Objective.MEMORY, est)


def test_plan_round_trip(tiny, tmp_path):
    plan = a_plan(tiny)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    loaded = load_plan(path, model=tiny)
    assert loaded == plan
    assert loaded.fingerprint() == plan.fingerprint()
    data = json.loads(path.read_text())
    assert data["schema_version"] == PLAN_SCHEMA_VERSION
    assert data["model"]["fingerprint"] == tiny.fingerprint()
    assert data["shape"] == {"batch": 2, "seq_len": 64, "dtype": "bf16"}
    assert data["objective"]["text"].startswith("fit every tier, then fewest chunks")
    assert data["hardware"]["gpu"]["name"] == "h100-80gb"
    # the chunk table covers every parameter with byte counts in the step's dtype
    table = loaded.chunk_table
    assert table.num_chunks == 3
    total = sum(table.chunk_bytes(k) for k in range(3))
    assert total == sum(2 * __import__("math").prod(s) for _, s, _ in named_shapes(tiny, "bf16"))
    span = data["chunk_table"]["chunks"][0][0]
    assert set(span) == {"param", "dim", "start", "end", "nbytes"}
    assert loaded.estimate().peak_bytes == {Tier.GPU: 1000, Tier.HOST: 200, Tier.DISK: 0}


def write(tmp_path, data) -> str:
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def edited(tiny, edit) -> dict:
    data = a_plan(tiny).to_json()
    edit(data)
    return data


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=99), "plan schema_version 99 is not supported"),
    (lambda d: d.update(schema_version="1"), "'schema_version' must be an integer"),
    (lambda d: d["budget"].update(gpu_bytes="24GiB"), "'budget.gpu_bytes' must be an integer, got \"24GiB\""),
    (lambda d: d["budget"].update(gpu_bytes=-5), "'budget.gpu_bytes' must be positive"),
    (lambda d: d["predicted"].pop("step_time_s"), "missing field 'predicted.step_time_s'"),
    (lambda d: d.pop("chunk_table"), "missing field 'chunk_table'"),
    (lambda d: d["predicted"]["peak_bytes"].update(gpu=True), "'predicted.peak_bytes.gpu' must be an integer"),
    (lambda d: d["predicted"]["peak_bytes"].update(vram=3), "'predicted.peak_bytes' has 'vram'; valid values are: gpu, host, disk"),
    (lambda d: d["strategy"].update(optimizer_device="tpu"), "invalid optimizer_device 'tpu'"),
    (lambda d: d["strategy"].update(chunks=4), "chunk table has 3 chunks but the strategy says 4"),
    (lambda d: d["shape"].update(seq_len=0), "invalid sequence length 0"),
    (lambda d: d["hardware"]["gpu"].update(bf16_flops="fast"), "'hardware.gpu.bf16_flops' must be a number"),
    (lambda d: d["objective"].update(name="cheap"), "valid values are: speed, fidelity"),
    (lambda d: d["chunk_table"]["chunks"][1][0].update(start=d["chunk_table"]["chunks"][1][0]["start"] + 1),
     "leaves a gap"),
    (lambda d: d["chunk_table"]["chunks"][0][0].pop("dim"), "chunk table is malformed"),
])
def test_plan_refusals_are_one_line(tiny, tmp_path, edit, message):
    path = write(tmp_path, edited(tiny, edit))
    with pytest.raises(ChunkftError) as info:
        load_plan(path)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.startswith(f"plan file {path!r}: ")


def test_plan_for_another_model_is_refused(tiny, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(a_plan(tiny), path)
    other = tiny_config(tmp_path / "other", hidden=96)
    with pytest.raises(ChunkftError, match=r"the plan was made for model .* not .*other"):
        load_plan(path, model=other)


def test_chunk_table_not_covering_the_model_is_refused(tiny, tmp_path):
    data = a_plan(tiny).to_json()
    # drop the last parameter from the table (and from its recorded shapes): internally
    # consistent, but the model has a parameter no chunk trains
    table = data["chunk_table"]
    last = table["chunks"][-1].pop()
    del table["shapes"][last["param"]]
    plan = Plan.from_json(data)
    with pytest.raises(ChunkftError, match=rf"parameter '{last['param']}' is in no chunk"):
        check_plan_model(plan, tiny)


def test_unreadable_plan_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ChunkftError, match="is not valid JSON"):
        load_plan(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ChunkftError, match="plan must be a JSON object, got list"):
        load_plan(bad)
    with pytest.raises(ChunkftError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


# ------------------------------------------------------------------ `chunkft plan` from the shell

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The 3-layer Llama the solver and simulator tests trace (same config: shared trace cache)."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("small-llama")
    LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    return str(path)


SMALL_ARGS = ["--seq", "128", "--batch", "2", "--max-chunks", "4"]


def test_cli_infeasible_budget_is_an_answer(small, tmp_path, capsys):
    from planner.cli import main

    out_path = tmp_path / "plan.json"
    code = main(["plan", small, "--gpu", "8MiB", "--host-ram", "30MiB", *SMALL_ARGS, "-o", str(out_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "INFEASIBLE" in out and "GPU short by" in out
    assert "smallest GPU budget that works with this host RAM:" in out
    assert not out_path.exists()


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "24XB"], "invalid GPU budget '24XB'"),
    (["--gpu=-3GiB"], "invalid GPU budget '-3GiB'"),
    (["--gpu", "100GiB", "--gpu-kind", "rtx4090"], "is more than a rtx4090 has"),
    (["--gpu-kind", "tpu-v5"], "unknown GPU 'tpu-v5'"),
    (["--seq", "0"], "invalid sequence length 0"),
    (["--max-chunks", "0"], "invalid --max-chunks 0"),
    (["--chunks", "4,x"], "invalid --chunks '4,x'"),
    (["--optimizer", "host", "--state", "gpu"], "leave no valid strategy"),
])
def test_cli_bad_flags_are_one_line_errors(small, tmp_path, capsys, argv, message):
    from planner.cli import main

    code = main(["plan", small, *argv, "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_objective_speed_changes_the_order(small, tmp_path, capsys):
    from planner.cli import main

    assert main(["plan", small, "--gpu", "120MiB", *SMALL_ARGS, "--objective", "speed",
                 "-o", str(tmp_path / "fast.json")]) == 0
    out = capsys.readouterr().out
    assert "objective fit every tier, then shortest predicted step time, then fewest chunks" in out
    fast = load_plan(tmp_path / "fast.json")
    assert main(["plan", small, "--gpu", "120MiB", *SMALL_ARGS, "-o", str(tmp_path / "mem.json")]) == 0
    mem = load_plan(tmp_path / "mem.json")
    assert mem.strategy.chunks <= fast.strategy.chunks
    assert fast.step_time_s <= mem.step_time_s


def test_cli_pinned_flags_restrict_the_search(small, tmp_path, capsys):
    """--chunks/--optimizer/--state pin those fields; the solver still picks the rest."""
    from planner.cli import main
    from planner.schema import Tier
    from planner.strategy import OptimizerDevice

    path = tmp_path / "pinned.json"
    assert main(["plan", small, "--gpu", "120MiB", *SMALL_ARGS, "--chunks", "2",
                 "--optimizer", "gpu", "--state", "host", "-o", str(path)]) == 0
    plan = load_plan(path)
    assert plan.strategy.chunks == 2
    assert plan.strategy.optimizer_device == OptimizerDevice.GPU
    assert plan.strategy.state_tier == Tier.HOST
    assert len(plan.chunk_table.chunks) == 2


def test_cli_one_gpu_plan_honours_chunk_traces(small, tmp_path, capsys):
    """--chunk-traces reaches the one-GPU solver (it was silently ignored there): the plan's
    figures are the mode's, the plan records the mode, and simulate replays with it."""
    import json

    from planner.cli import main
    from planner.evaluate import evaluate
    from planner.model import resolve_model

    path = tmp_path / "bound.json"
    assert main(["plan", small, "--gpu", "1GiB", *SMALL_ARGS, "--chunks", "3", "--state", "host",
                 "--optimizer", "gpu", "--checkpointing", "off", "--chunk-traces", "bound", "-o", str(path)]) == 0
    plan = load_plan(path)
    assert plan.chunk_traces == "bound" and json.loads(path.read_text())["predicted"]["chunk_traces"] == "bound"
    model = resolve_model(small)
    bound = evaluate(model, plan.shape, plan.strategy, plan.hardware, chunk_traces="bound")
    exact = evaluate(model, plan.shape, plan.strategy, plan.hardware, chunk_traces="exact")
    assert bound.peak_bytes[Tier.GPU] != exact.peak_bytes[Tier.GPU]  # the modes differ on this model
    assert plan.peak_bytes[Tier.GPU] == bound.peak_bytes[Tier.GPU]
    assert main(["simulate", str(path), "-o", str(tmp_path / "t.jsonl")]) == 0
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()[1:]]
    assert max(e["allocated"] for e in events if e["tier"] == "gpu") == plan.peak_bytes[Tier.GPU]
    # an auto plan records nothing (its fingerprint is unchanged by the field)
    assert main(["plan", small, "--gpu", "1GiB", *SMALL_ARGS, "--chunks", "3", "-o", str(tmp_path / "a.json")]) == 0
    assert "chunk_traces" not in json.loads((tmp_path / "a.json").read_text())["predicted"]
