"""`--from FILE` (planner.importers): a torchtune recipe, HF TrainingArguments and a DeepSpeed
config become the recipe, shape and pins of `fit` / `plan`; memory-relevant keys the planner
does not model are refused in one line; command-line flags that disagree with the file are a
conflict."""

from __future__ import annotations

import json

import pytest

from planner.cli import main
from planner.errors import ChunkftError
from planner.importers import read_config

# torchtune's llama3_1/8B_full_single_device.yaml, abridged to the keys that matter plus some that do not
TORCHTUNE = """
output_dir: /tmp/torchtune/llama3_1_8B/full_single_device
tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: /tmp/Meta-Llama-3.1-8B-Instruct/original/tokenizer.model
  max_seq_len: 1024
dataset:
  _component_: torchtune.datasets.alpaca_dataset
  packed: False
seed: null
shuffle: True
model:
  _component_: torchtune.models.llama3_1.llama3_1_8b
batch_size: 2
epochs: 1
optimizer:
  _component_: bitsandbytes.optim.PagedAdamW8bit
  lr: 2e-5
optimizer_in_bwd: True
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
max_steps_per_epoch: null
gradient_accumulation_steps: 1
clip_grad_norm: null
compile: False
device: cuda
enable_activation_checkpointing: True
enable_activation_offloading: False
dtype: bf16
metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
log_every_n_steps: 1
log_peak_memory_stats: True
"""


def test_torchtune_recipe(tmp_path):
    p = tmp_path / "8B_full_single_device.yaml"
    p.write_text(TORCHTUNE)
    got = read_config(p).values
    assert got == {"model": "llama3.1-8b", "batch": 2, "seq": 1024, "dtype": "bf16", "precision": "pure",
                   "optim": "paged_adamw_8bit", "optimizer_in_backward": True, "checkpointing": "on",
                   "offload_activations": False, "loop": "torchtune"}
    lora = TORCHTUNE.replace("llama3_1.llama3_1_8b", "llama3_1.lora_llama3_1_8b\n  lora_attn_modules: "
                             "['q_proj', 'v_proj', 'output_proj']\n  apply_lora_to_mlp: True\n  lora_rank: 8")
    p.write_text(lora.replace("optimizer_in_bwd: True", "optimizer_in_bwd: False")
                 .replace("bitsandbytes.optim.PagedAdamW8bit", "torch.optim.AdamW\n  fused: True"))
    got = read_config(p).values
    assert got["lora"] == 8 and got["lora_targets"] == ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj")
    assert got["optim"] == "adamw_torch_fused" and got["optimizer_in_backward"] is False


def test_hf_training_arguments_and_deepspeed(tmp_path):
    hf = tmp_path / "training_args.json"
    hf.write_text(json.dumps({"output_dir": "out", "per_device_train_batch_size": 4, "bf16": True,
                              "optim": "adamw_torch_fused", "gradient_checkpointing": True, "learning_rate": 2e-5,
                              "logging_steps": 10, "max_length": 2048}))
    got = read_config(hf)
    assert got.values == {"batch": 4, "seq": 2048, "dtype": "bf16", "precision": "pure", "optim": "adamw_torch_fused",
                          "checkpointing": "on", "loop": "hf-trainer"}
    assert any("loaded in bf16" in n for n in got.notes)
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"},
                                                    "offload_param": {"device": "cpu"}}}))
    assert read_config(ds).values == {"batch": 1, "dtype": "bf16", "precision": "mixed", "optimizer": "host",
                                      "state": "disk", "weights": "stream"}


@pytest.mark.parametrize("fmt,doc,words", [
    ("yaml", TORCHTUNE.replace("compile: False", "compile: True"), "compile"),
    ("yaml", TORCHTUNE + "quantizer: int4\n", "'quantizer'"),
    ("yaml", TORCHTUNE.replace("llama3_1_8b", "llama9_1t"), "no preset"),
    ("yaml", TORCHTUNE.replace("bitsandbytes.optim.PagedAdamW8bit", "mylib.Lion"), "mylib.Lion"),
    ("yaml", "model: [unclosed", "not valid YAML"),
    ("yaml", TORCHTUNE.replace("CEWithChunkedOutputLoss", "CrossEntropyLoss"), "CrossEntropyLoss"),
    ("json", {"per_device_train_batch_size": 1, "fp16": True}, "autocast"),
    ("json", {"per_device_train_batch_size": 1, "optim": "lion_8bit"}, "lion_8bit"),
    ("json", {"per_device_train_batch_size": 1, "torch_compile": True}, "torch_compile"),
    ("json", {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"offload_param": {"device": "nvme"}}},
     "offload_param"),
    ("json", {"some": "thing"}, "neither"),
    ("json", {"per_device_train_batch_size": 0}, "positive integer"),
])
def test_unmodelled_or_bad_keys_are_refused(tmp_path, fmt, doc, words):
    p = tmp_path / f"cfg.{fmt}"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ChunkftError, match=words) as e:
        read_config(p)
    assert "\n" not in str(e.value)


def test_fit_from_a_torchtune_recipe_and_conflicts(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text(TORCHTUNE.replace("bitsandbytes.optim.PagedAdamW8bit", "torch.optim.AdamW\n  fused: True")
                 .replace("optimizer_in_bwd: True", "optimizer_in_bwd: False"))
    assert main(["fit", "--from", str(p), "--json", "--chunk-traces", "bound"]) in (0, 1)
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["recipe"]["optim"] == "adamw_torch_fused" and doc["recipe"]["precision"] == "pure"
    assert doc["model"].startswith("llama3.1-8b") and "from " in out.err
    assert main(["fit", "--from", str(p), "--batch", "4"]) == 2
    assert "--batch 4 conflicts with" in capsys.readouterr().err
    assert main(["fit", "--from", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
