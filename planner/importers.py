"""`--from FILE`: read the recipe a user already trains with from their own config file.

Three formats, told apart by name and content (never executed, never unpickled):

- a torchtune recipe config (`*.yaml` / `*.yml`, read with pyyaml's safe loader), e.g.
  `full_finetune_single_device`: model, batch_size, tokenizer.max_seq_len, dataset.packed,
  dtype, optimizer (torch, torchao and bitsandbytes classes), optimizer_in_bwd,
  enable_activation_checkpointing, ac_mode/ac_option, enable_activation_offloading, compile,
  and LoRA configs' lora_rank / lora_attn_modules / apply_lora_to_mlp / apply_lora_to_output.
  torchtune trains in `dtype` throughout (no fp32 master): precision pure; its loop and chunked
  cross-entropy are `--loop torchtune` (planner.step.torchtune_loss).
- HF TrainingArguments as JSON (`training_args.json`, `TrainingArguments.to_json_string()`):
  bf16/fp16, optim, gradient_checkpointing (+ gradient_checkpointing_kwargs), per_device_
  train_batch_size, torch_compile, fsdp, deepspeed, max_length / max_seq_length (SFTConfig).
  The Trainer's training_step drops the model output inside compute_loss, before backward
  (`--loop hf-trainer`), unlike the plain loop that holds the logits. `bf16: true` is
  read as a model loaded in bf16 and trained pure (HF's optimizers keep state in the weights'
  dtype), the usual fine-tuning setup; autocast over fp32 weights is not modelled.
- a DeepSpeed config (`ds_config.json`: has `zero_optimization` or `train_micro_batch_size_per_gpu`):
  bf16/fp16 (DeepSpeed keeps an fp32 master: precision mixed), train_micro_batch_size_per_gpu,
  zero_optimization.offload_optimizer.device (cpu: the AdamW step on the host, state on host;
  nvme: state on disk) and offload_param (stage 3: weights streamed from host).

A key that changes memory in a way the planner does not model is refused in one line naming it
(exit 2); keys with no effect on memory (paths, logging, learning rates, seeds, schedules) are
ignored. What the file decides is applied to the command's flags; a flag given on the command
line with a different value is refused as a conflict, naming both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import ChunkftError

# torchtune model builders -> our presets (the builder's name without the family module)
_TORCHTUNE_MODELS = {
    "llama2_7b": "llama2-7b", "llama2_13b": "llama2-13b", "llama2_70b": "llama2-70b",
    "llama3_8b": "llama3-8b", "llama3_70b": "llama3-70b", "llama3_1_8b": "llama3.1-8b",
    "llama3_1_70b": "llama3.1-70b", "llama3_1_405b": "llama3.1-405b", "llama3_2_1b": "llama3.2-1b",
    "mistral_7b": "mistral-7b", "qwen2_5_7b_base": "qwen2.5-7b", "qwen2_5_7b_instruct": "qwen2.5-7b",
    "qwen2_5_72b_instruct": "qwen2.5-72b", "gemma2_9b": "gemma2-9b", "phi3_mini": "phi3-mini",
}
# torchtune's attention projection names -> HF module names (what runtime.lora adapts)
_TORCHTUNE_LORA = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
_TORCH_OPTIMS = {
    "torch.optim.AdamW": "adamw_torch", "torch.optim.Adam": "adamw_torch", "torch.optim.SGD": "sgd",
    "torch.optim.Adafactor": "adafactor", "torchao.optim.AdamW8bit": "adamw_torch_8bit",
    "torchao.prototype.low_bit_optim.AdamW8bit": "adamw_torch_8bit", "bitsandbytes.optim.AdamW8bit": "adamw_bnb_8bit",
    "bitsandbytes.optim.PagedAdamW8bit": "paged_adamw_8bit", "bitsandbytes.optim.PagedAdamW": "paged_adamw_32bit",
    "bitsandbytes.optim.PagedAdamW32bit": "paged_adamw_32bit",
}
# HF `optim` names this planner prices under another name
_HF_OPTIMS = {"adamw_torch": "adamw_torch", "adamw_torch_fused": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit",
              "adamw_bnb_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit", "adamw_torch_8bit": "adamw_torch_8bit",
              "adafactor": "adafactor", "sgd": "sgd"}
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class Imported:
    """What a config file decides: destination of a command-line flag -> value."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_config(path: str | Path) -> Imported:
    """Parse `path` as one of the three formats (module docstring)."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ChunkftError(f"--from {str(p)!r} is {p.stat().st_size:,} bytes; a training config is at most "
                               f"{MAX_CONFIG_BYTES:,}")
        text = p.read_text()
    except OSError as e:
        raise ChunkftError(f"--from {str(p)!r}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ChunkftError(f"--from {str(p)!r} is not text: give a torchtune YAML, training_args.json or "
                           "ds_config.json") from None
    if p.suffix in (".yaml", ".yml"):
        return _torchtune(_yaml(text, p), str(p))
    if p.suffix != ".json":
        raise ChunkftError(f"--from {str(p)!r}: valid files are a torchtune recipe (.yaml/.yml), HF "
                           "TrainingArguments (.json) or a DeepSpeed config (.json)")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ChunkftError(f"--from {str(p)!r} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ChunkftError(f"--from {str(p)!r} must hold a JSON object")
    if "zero_optimization" in doc or "train_micro_batch_size_per_gpu" in doc:
        return _deepspeed(doc, str(p))
    if {"per_device_train_batch_size", "optim", "output_dir", "gradient_checkpointing"} & set(doc):
        return _hf(doc, str(p))
    raise ChunkftError(f"--from {str(p)!r}: neither HF TrainingArguments (per_device_train_batch_size, optim, ...) "
                       "nor a DeepSpeed config (zero_optimization, train_micro_batch_size_per_gpu)")


def apply_import(args, parser) -> Imported:
    """Set `args` (a parsed fit / plan / size namespace) from `args.from_file`; a flag the user
    also gave with another value is a conflict. Dests the command has no flag for are noted."""
    imported = read_config(args.from_file)
    for dest, value in imported.values.items():
        if not hasattr(args, dest):
            imported.notes.append(f"{dest}={value!r} is not a choice of `chunkft {args.command}`; ignored")
            continue
        current, default = getattr(args, dest), parser.get_default(dest)
        if current != default and current != value:
            flag = "MODEL" if dest == "model" else "--" + dest.replace("_", "-")
            raise ChunkftError(f"{flag} {current!r} conflicts with {imported.source}, which says {value!r}; "
                               "give one of them")
        setattr(args, dest, value)
    return imported


# -- torchtune --------------------------------------------------------------------------------

# keys read below, or without a memory effect (paths, logging, learning-rate schedules, seeds)
_TT_KNOWN = {"output_dir", "tokenizer", "checkpointer", "resume_from_checkpoint", "seed", "shuffle", "epochs",
               "max_steps_per_epoch", "gradient_accumulation_steps", "clip_grad_norm", "lr_scheduler", "loss",
               "device", "metric_logger", "log_every_n_steps", "log_peak_memory_stats", "profiler",
               "log_level", "save_adapter_weights_only", "dataset", "batch_size", "model", "optimizer",
               "optimizer_in_bwd", "enable_activation_checkpointing", "enable_activation_offloading", "compile",
               "dtype", "ac_mode", "ac_option", "custom_sharded_layers", "fsdp_cpu_offload", "collate_fn",
               "run_val_every_n_steps", "dataset_val", "base_model_path", "cudnn_deterministic_mode",
               "enable_kv_cache", "low_cpu_ram", "tokenizer_dir"}


def _torchtune(doc: Any, source: str) -> Imported:
    if not isinstance(doc, dict):
        raise ChunkftError(f"--from {source!r}: a torchtune config is a YAML mapping")
    out = Imported(source=source)
    v = out.values
    unknown = sorted(k for k in doc if k not in _TT_KNOWN)
    if unknown:
        raise ChunkftError(f"--from {source!r}: key {unknown[0]!r} is not understood by this planner; it may change "
                           "memory, so it is refused (remove it or plan without --from)")
    model = doc.get("model") or {}
    comp = str(model.get("_component_", "")) if isinstance(model, dict) else ""
    builder = comp.rsplit(".", 1)[-1]
    lora = builder.startswith("lora_")
    preset = _TORCHTUNE_MODELS.get(builder[5:] if lora else builder)
    if preset is None:
        raise ChunkftError(f"--from {source!r}: model {comp!r} has no preset here; valid builders: "
                           f"{', '.join(sorted(_TORCHTUNE_MODELS))} (and their lora_ versions)")
    v["model"] = preset
    if lora:
        targets = [_TORCHTUNE_LORA.get(m) for m in model.get("lora_attn_modules") or ()]
        if None in targets:
            raise ChunkftError(f"--from {source!r}: lora_attn_modules {model.get('lora_attn_modules')!r}: valid "
                               f"names are {', '.join(_TORCHTUNE_LORA)}")
        if model.get("apply_lora_to_mlp"):
            targets += ["gate_proj", "up_proj", "down_proj"]
        if model.get("apply_lora_to_output"):
            targets.append("lm_head")
        if model.get("quantize_base"):
            raise ChunkftError(f"--from {source!r}: model.quantize_base (QLoRA's 4-bit base) is not modelled")
        v["lora"] = _int(model.get("lora_rank"), "model.lora_rank", source)
        v["lora_targets"] = tuple(targets)
    v["batch"] = _int(doc.get("batch_size", 1), "batch_size", source)
    seq = (doc.get("tokenizer") or {}).get("max_seq_len") if isinstance(doc.get("tokenizer"), dict) else None
    if seq is not None:
        v["seq"] = _int(seq, "tokenizer.max_seq_len", source)
    dataset = doc.get("dataset")
    if isinstance(dataset, dict) and dataset.get("packed") and seq is None:
        raise ChunkftError(f"--from {source!r}: dataset.packed needs tokenizer.max_seq_len (the packed length)")
    dtype = str(doc.get("dtype", "bf16"))
    if dtype not in ("bf16", "fp32"):
        raise ChunkftError(f"--from {source!r}: dtype {dtype!r}: torchtune's valid dtypes here are bf16, fp32")
    v["dtype"], v["precision"] = dtype, "pure"
    optimizer = doc.get("optimizer") or {}
    ocomp = str(optimizer.get("_component_", "torch.optim.AdamW")) if isinstance(optimizer, dict) else ""
    optim = _TORCH_OPTIMS.get(ocomp)
    if optim is None:
        raise ChunkftError(f"--from {source!r}: optimizer {ocomp!r} is not modelled; valid: "
                           f"{', '.join(sorted(_TORCH_OPTIMS))}")
    if optim == "adamw_torch" and optimizer.get("fused"):
        optim = "adamw_torch_fused"
    elif optim == "adamw_torch" and optimizer.get("foreach") is False:
        optim = "adamw_torch_forloop"
    v["optim"] = optim
    v["optimizer_in_backward"] = bool(doc.get("optimizer_in_bwd", False))
    if doc.get("compile"):
        raise ChunkftError(f"--from {source!r}: compile: true (torch.compile's fused kernels) is not modelled")
    if doc.get("fsdp_cpu_offload") or doc.get("custom_sharded_layers"):
        raise ChunkftError(f"--from {source!r}: FSDP settings belong to a distributed recipe; plan it with "
                           "--gpus-per-node")
    if doc.get("enable_activation_checkpointing"):
        mode, option = doc.get("ac_mode"), doc.get("ac_option")
        if mode == "selective" and isinstance(option, int) and option > 1:
            v["checkpointing"] = f"every-{option}"
        elif mode == "selective" and option == "op":
            v["checkpointing"] = "selective"
        else:
            v["checkpointing"] = "on"
    else:
        v["checkpointing"] = "off"
    v["offload_activations"] = bool(doc.get("enable_activation_offloading", False))
    loss = doc.get("loss") or {}
    lcomp = str(loss.get("_component_", "")) if isinstance(loss, dict) else ""
    if lcomp.rsplit(".", 1)[-1] != "CEWithChunkedOutputLoss":
        raise ChunkftError(f"--from {source!r}: loss {lcomp or loss!r} is not modelled; the torchtune loop here is "
                           "full_finetune_single_device's with torchtune.modules.loss.CEWithChunkedOutputLoss")
    v["loop"] = "torchtune"
    return out


def _yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ChunkftError(f"--from {str(path)!r} is not valid YAML: {' '.join(str(e).split())[:160]}") from None


# -- HF TrainingArguments -----------------------------------------------------------------------

def _hf(doc: dict, source: str) -> Imported:
    out = Imported(source=source)
    v = out.values
    v["batch"] = _int(doc.get("per_device_train_batch_size", 8), "per_device_train_batch_size", source)
    seq = doc.get("max_length", doc.get("max_seq_length"))
    if seq is not None:
        v["seq"] = _int(seq, "max_length", source)
    if doc.get("fp16"):
        raise ChunkftError(f"--from {source!r}: fp16: true is AMP autocast over fp32 weights, which is not "
                           "modelled; plan with --dtype fp16 for 16-bit weights with an fp32 master")
    v["dtype"], v["precision"] = ("bf16", "pure") if doc.get("bf16") else ("fp32", "pure")
    if doc.get("bf16"):
        out.notes.append("bf16: true is read as a model loaded in bf16 and trained in bf16 (no fp32 master)")
    optim = str(doc.get("optim", "adamw_torch"))
    if optim not in _HF_OPTIMS:
        raise ChunkftError(f"--from {source!r}: optim {optim!r} is not modelled; valid: {', '.join(sorted(_HF_OPTIMS))}")
    if doc.get("optim_args"):
        raise ChunkftError(f"--from {source!r}: optim_args {doc['optim_args']!r} is not modelled")
    v["optim"] = _HF_OPTIMS[optim]
    for key in ("torch_compile",):
        if doc.get(key):
            raise ChunkftError(f"--from {source!r}: {key}: true is not modelled")
    if doc.get("fsdp") or doc.get("deepspeed"):
        key = "fsdp" if doc.get("fsdp") else "deepspeed"
        raise ChunkftError(f"--from {source!r}: {key} {doc[key]!r}: pass the DeepSpeed config itself with --from, "
                           "or plan several GPUs with --gpus-per-node")
    v["checkpointing"] = "on" if doc.get("gradient_checkpointing") else "off"
    kwargs = doc.get("gradient_checkpointing_kwargs") or {}
    if isinstance(kwargs, dict) and kwargs.get("use_reentrant", False) is not False:
        out.notes.append("use_reentrant: true checkpointing is priced as non-reentrant (the same saved tensors)")
    v["loop"] = "hf-trainer"
    return out


# -- DeepSpeed ---------------------------------------------------------------------------------

def _deepspeed(doc: dict, source: str) -> Imported:
    out = Imported(source=source)
    v = out.values
    micro = doc.get("train_micro_batch_size_per_gpu")
    if micro not in (None, "auto"):
        v["batch"] = _int(micro, "train_micro_batch_size_per_gpu", source)
    bf16 = (doc.get("bf16") or {}).get("enabled") is True
    fp16 = (doc.get("fp16") or {}).get("enabled") is True
    v["dtype"] = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    v["precision"] = "mixed"  # DeepSpeed's optimizer keeps an fp32 master copy
    zero = doc.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ChunkftError(f"--from {source!r}: zero_optimization must be an object")
    off_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
    off_param = (zero.get("offload_param") or {}).get("device", "none")
    if off_opt == "cpu":
        v["optimizer"], v["state"] = "host", "host"
    elif off_opt == "nvme":
        v["optimizer"], v["state"] = "host", "disk"
    elif off_opt != "none":
        raise ChunkftError(f"--from {source!r}: offload_optimizer.device {off_opt!r}: valid values are cpu, nvme, none")
    if off_param == "cpu":
        v["weights"] = "stream"
    elif off_param != "none":
        raise ChunkftError(f"--from {source!r}: offload_param.device {off_param!r}: this planner streams weights "
                           "from host memory (cpu) only")
    ac = doc.get("activation_checkpointing") or {}
    if isinstance(ac, dict) and (ac.get("cpu_checkpointing") or ac.get("partition_activations")):
        raise ChunkftError(f"--from {source!r}: activation_checkpointing.cpu_checkpointing / partition_activations "
                           "are not modelled")
    if doc.get("compile", {}).get("enabled") if isinstance(doc.get("compile"), dict) else False:
        raise ChunkftError(f"--from {source!r}: compile.enabled is not modelled")
    out.notes.append("ZeRO on one GPU shards nothing; several GPUs: plan with --gpus-per-node")
    return out


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 20:
        raise ChunkftError(f"--from {source!r}: {key} {value!r} must be a positive integer")
    return value


def describe(imported: Imported) -> str:
    """One line: what was read from where."""
    parts = [f"{k}={v}" for k, v in imported.values.items()]
    return f"from {imported.source}: " + ", ".join(parts) + "".join(f"; {n}" for n in imported.notes)

