"""`chunkft run PLAN --data TRAIN.jsonl`: fine-tune the planned model as the plan says.

The plan (planner.plan) names the model, the step shape (batch, sequence length, dtype) and the
strategy (chunk table, update interval, state tier, optimizer device, activation checkpointing,
chunked loss, prefetch depth); the command line adds what a plan does not decide: data,
learning rate and schedule, steps, output and trace paths. Everything is checked before the
first step: the plan against the model, the tokenizer against the model's vocabulary, every
data line, and that the output directory is writable.

The model is built from the plan's model spec: a directory holding safetensors weights is
loaded from them (a fine-tuning run); anything else (preset, config) is built randomly
initialised from `--seed`.

Gradient staging (NVMSA, runtime.offload): a plan with `grad_staging` host or disk runs
OffloadAdamW -- each 16-bit gradient leaves the device as produced, to host buffers or to a
checksummed staging file under OUT/grad-staging, and AdamW steps on the host.

Known limitations: one device. A plan that streams weights (runtime.stream) builds the model
on the host first, so a checkpoint or random init must fit in host RAM.
"""

from __future__ import annotations

from pathlib import Path

from planner.errors import ChunkftError

_DTYPES = ("bf16", "fp16", "fp32")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="fine-tune a model as a plan says, with a memory trace and checkpoints",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("plan", help="plan JSON file (from `chunkft plan`)")
    p.add_argument("--data", required=True, help='training data, JSON Lines: {"text": ...} or {"prompt": ..., "response": ...}')
    p.add_argument("--eval", default=None, help="evaluation data (same format); eval loss every --eval-every steps")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in total (default 100)")
    p.add_argument("--out", default="out/run", help="output directory for checkpoints (default out/run)")
    p.add_argument("--trace", default=None, help="write the measured memory trace here (e.g. traces/NAME.jsonl)")
    p.add_argument("--trace-steps", type=int, default=20,
                   help="trace the first N steps (default 20; 0 = every step)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--allow-changed", default=None, metavar="NAMES",
                   help="with --resume: arguments that may differ from the checkpoint's, comma-separated "
                        "(steps, lr, schedule, warmup-steps, weight-decay, max-grad-norm, grad-accum, seed); "
                        "the command line's values are taken. Without it a difference is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints already in --out and start again (default: refuse)")
    p.add_argument("--max-nonfinite-steps", type=int, default=25,
                   help="stop after this many optimizer steps in a row whose gradients held inf/nan; each is "
                        "skipped, nothing written to weights or state (default 25)")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer directory (default: the built-in byte-level tokenizer)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    p.add_argument("--schedule", default="cosine", choices=("constant", "cosine"), help="LR schedule (default cosine)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the active chunk's gradient norm (default 1.0; 0 = off)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end only)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--gpu-memory-cap", default=None,
                   help="cap what PyTorch's allocator may reserve on the GPU, e.g. 24GiB, to emulate a smaller "
                        "card (torch.cuda.set_per_process_memory_fraction); CUDA only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to start for a parallel plan (`chunkft plan --gpus-per-node G`); default: the "
                        "plan's GPU count. One GPU each with CUDA (nccl), else CPU ranks (gloo)")
    p.add_argument("--launcher", choices=("spawn", "torchrun"), default="spawn",
                   help="parallel plans: spawn the ranks here (default), or this process is one rank that "
                        "torchrun started (several nodes)")
    p.set_defaults(run=run)


_MAX_COUNT = 10**9  # steps, micro-batches and intervals: more is a typo, and 2**63 overflows torch


def check_args(args) -> None:
    """Every number and path of the command line, before anything is built (one line)."""
    import math

    problems = []

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name, low in (("steps", 1), ("grad_accum", 1), ("max_nonfinite_steps", 1), ("warmup_steps", 0),
                      ("eval_every", 0), ("checkpoint_every", 0), ("trace_steps", 0)):
        value = getattr(args, name)
        if not low <= value <= _MAX_COUNT:
            problems.append(f"{flag(name)} must be an integer in [{low}, {_MAX_COUNT}], got {value}")
    if not 0 <= args.seed < 2**63:
        problems.append(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr must be a finite number > 0, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        problems.append(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0):
        problems.append(f"--max-grad-norm must be a finite number >= 0 (0 = no clipping), got {args.max_grad_norm}")
    if args.schedule == "cosine" and args.steps <= args.warmup_steps:
        problems.append(f"a cosine schedule needs --steps ({args.steps}) > --warmup-steps ({args.warmup_steps})")
    if args.allow_changed and not args.resume:
        problems.append("--allow-changed goes with --resume")
    if args.resume and args.overwrite:
        problems.append("--resume continues the run in --out and --overwrite deletes it; give one of them")
    if args.trace is not None and (Path(args.trace).is_dir() or str(args.trace).endswith(("/", "\\"))):
        problems.append(f"--trace {args.trace!r} is a directory; give a file path such as traces/NAME.jsonl")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        problems.append(f"--out {args.out!r} is a file; give a directory")
    if problems:
        raise ChunkftError("; ".join(problems))
    from runtime.outdir import parse_allow_changed

    parse_allow_changed(args.allow_changed)


def build_run(args):
    """Everything `run` needs, validated, before the first step: (trainer, trace, plan, spec)."""
    import torch

    from planner.model import resolve_model
    from planner.plan import check_plan_model, load_plan
    from planner.schema import Tier
    from planner.step import enable_checkpointing
    from planner.strategy import OptimizerDevice, WeightResidency
    from runtime.checkpoint import check_writable
    from runtime.chunk_optim import ChunkAdamW
    from runtime.lean_state import StateFormat
    from runtime.outdir import claim_output, run_arguments
    from runtime.data import PackedLoader, eval_batches, load_tokenizer, padding_id, read_examples
    from runtime.memtrace import TraceWriter
    from runtime.scaler import LossScaler
    from runtime.train import ChunkOptimizer, LoopConfig, Trainer

    check_args(args)
    plan = load_plan(args.plan)
    spec = resolve_model(plan.model_name)
    check_plan_model(plan, spec)
    strategy = plan.strategy
    strategy.recipe.require_runnable()  # what the runtime executes (planner.recipe), not just what is priced
    if strategy.recipe.optimizer_in_backward:
        check_step_in_backward(args, plan)
    streamed = strategy.weights == WeightResidency.STREAM
    if streamed and spec.layer_prefix() is None:
        raise ChunkftError(f"the plan streams decoder layers, but model {spec.name!r} has no decoder layer list")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChunkftError("--device cuda was given but no CUDA device is available; valid here: cpu")
    alloc_conf = apply_alloc_conf(strategy.recipe.alloc_conf, device)  # before CUDA initialises
    if args.gpu_memory_cap is not None:
        cap_gpu_memory(args.gpu_memory_cap, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.shape.dtype]

    vocab = getattr(spec.config, "vocab_size", None)
    if vocab is None:
        raise ChunkftError(f"model {spec.name!r} has no config.vocab_size to check the tokenizer against")
    tok = load_tokenizer(args.tokenizer, model_vocab_size=vocab)
    train_examples = read_examples(args.data, tok)
    eval_examples = read_examples(args.eval, tok) if args.eval else None
    # only now, with every input read and checked, does anything appear on disk
    out = check_writable(args.out)
    if args.trace is not None:
        check_writable(Path(args.trace).parent if str(Path(args.trace).parent) else ".")
    claimed = claim_output(out, resume=args.resume, overwrite=args.overwrite)

    cpu_baseline = None
    if device.type == "cpu" and args.trace is not None:
        from planner.measure import malloc_in_use_bytes

        cpu_baseline = malloc_in_use_bytes()  # the trace's zero: everything the run adds from here counts
    # a streamed plan builds on the host: only the non-layer weights ever sit on the device whole
    model = load_model(spec, dtype=dtype, device=torch.device("cpu") if streamed else device, seed=args.seed)
    streamer = None
    if streamed:
        from runtime.stream import stream_model

        streamer = stream_model(model, spec.layer_prefix(), device)
    if strategy.checkpointing:  # every layer, every K-th, or op-level selective: the recipe's policy
        enable_checkpointing(model, every=strategy.recipe.checkpoint_every,
                             selective=strategy.recipe.selective_checkpointing)
    model.train()
    weights = streamer.host_weights() if streamer is not None else None

    scaler = LossScaler() if plan.shape.dtype == "fp16" else None
    # the recipe's --optim / --precision: how ChunkAdamW holds its state (runtime.lean_state)
    state_format = StateFormat.from_recipe(strategy.recipe.optim, strategy.recipe.precision)
    state_tier = Tier(strategy.state_tier)
    adamw, schedule = trainer_adamw(args), trainer_schedule(args)
    if strategy.grad_staging is not None:  # NVMSA: the Strategy guarantees a host optimizer
        from runtime.offload import OffloadAdamW, OffloadOptimizer

        staged = OffloadAdamW(
            model, plan.chunk_table, staging=Tier(strategy.grad_staging), staging_dir=out / "grad-staging",
            config=adamw, schedule=schedule, update_interval=strategy.update_interval, state_tier=state_tier,
            state_dir=out / "optimizer-state", prefetch_depth=strategy.prefetch_depth, scaler=scaler,
            max_nonfinite_steps=args.max_nonfinite_steps, run_id=claimed.run_id, weights=weights,
            state_format=state_format)
        optimizer = OffloadOptimizer(staged)
    else:
        inner = ChunkAdamW(
            model, plan.chunk_table, config=adamw, schedule=schedule,
            update_interval=strategy.update_interval, state_tier=state_tier, state_dir=out / "optimizer-state",
            device=torch.device("cpu") if strategy.optimizer_device == OptimizerDevice.HOST else device,
            prefetch_depth=strategy.prefetch_depth, scaler=scaler,
            # a host step with state on disk streams it span by span, as the planner assumes
            stream_state=strategy.optimizer_device == OptimizerDevice.HOST and state_tier == Tier.DISK,
            # a GPU-step plan run on a CPU keeps the active chunk's working copy beside its host
            # slot, as on a GPU, so the measured memory follows the plan's layout
            host_state_in_place=strategy.optimizer_device == OptimizerDevice.HOST,
            max_nonfinite_steps=args.max_nonfinite_steps, run_id=claimed.run_id, weights=weights,
            state_format=state_format, step_in_backward=strategy.recipe.optimizer_in_backward)
        optimizer = ChunkOptimizer(inner)

    pad = padding_id(tok)
    loader = PackedLoader(train_examples, seq_len=plan.shape.seq_len, batch_size=plan.shape.batch, seed=args.seed,
                          pad_token_id=pad)
    evals = eval_batches(eval_examples, seq_len=plan.shape.seq_len, batch_size=plan.shape.batch,
                         pad_token_id=pad) if eval_examples else None
    # the data position of a checkpoint means nothing for other data: resume checks these
    data_print = data_fingerprint(train_examples, plan.shape.seq_len, tok.name, args.seed)
    run_state = {"model_fingerprint": plan.model_fingerprint, "plan_fingerprint": plan.fingerprint(),
                 "data_fingerprint": data_print, "tokenizer": tok.name, "seed": args.seed,
                 "run_id": claimed.run_id, "args": run_arguments(args)}
    config = LoopConfig(steps=args.steps, grad_accum=args.grad_accum, loss_chunk_tokens=strategy.loss_chunk_tokens,
                        loop=strategy.recipe.loop.value, offload_activations=strategy.recipe.offload_activations,
                        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                        progress=not args.no_progress)
    trainer = Trainer(model, optimizer, loader, config, eval_batches=evals, out_dir=out, run_state=run_state,
                      streamer=streamer)
    trainer.claimed = claimed  # holds OUT's lock for the run's lifetime
    trace = None
    if args.trace is not None:
        trace = TraceWriter(args.trace, device=device, accounting=trainer.tier_bytes,
                            model_fingerprint=plan.model_fingerprint, plan_fingerprint=plan.fingerprint(),
                            cpu_baseline_bytes=cpu_baseline, max_steps=args.trace_steps or None,
                            extra_header={"strategy": strategy.to_json(), "alloc_conf": alloc_conf, "shape": {
                                "batch": plan.shape.batch, "seq_len": plan.shape.seq_len, "dtype": plan.shape.dtype}})
        layers = decoder_layers(model, spec)
        if layers:
            trace.attach(layers)
        trainer.trace = trace
    return trainer, trace, plan, spec


def trainer_adamw(args):
    """The command line's AdamW hyper-parameters (max_grad_norm 0 = no clipping)."""
    from runtime.chunk_optim import AdamWConfig

    return AdamWConfig(lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
                       seed=args.seed)


def trainer_schedule(args):
    from runtime.chunk_optim import LRSchedule

    return LRSchedule(kind=args.schedule, warmup_steps=args.warmup_steps, total_steps=args.steps)


def apply_alloc_conf(text: str, device) -> str:
    """Put the plan's CUDA allocator settings (planner.cuda_alloc.AllocConf, normalised text) in
    force before CUDA initialises: PyTorch reads them from PYTORCH_CUDA_ALLOC_CONF once, when its
    caching allocator starts. A different value already in the environment is refused (the plan
    was priced for its own settings); on a CPU run they have no effect. Returns what is in force
    (recorded in the trace header)."""
    import os

    import torch

    from planner.cuda_alloc import AllocConf

    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    try:
        in_force = AllocConf.parse(current).normalised()
    except ChunkftError as e:
        raise ChunkftError(f"PYTORCH_CUDA_ALLOC_CONF in the environment: {e}") from None
    if device.type != "cuda":
        return text
    if current and in_force != text:
        raise ChunkftError(f"PYTORCH_CUDA_ALLOC_CONF={current!r} is set, but the plan was priced for "
                           f"{text or 'the default allocator settings'!r}: unset it, or plan with --alloc-conf "
                           f"{in_force!r}")
    if text and not current:
        if torch.cuda.is_initialized():
            raise ChunkftError("CUDA is initialised already; the plan's allocator settings cannot take effect")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = text
    return text


def cap_gpu_memory(text: str, device) -> int:
    """Limit the caching allocator on `device` to `text` bytes (a smaller card, emulated)."""
    import torch

    from planner.units import describe_size, parse_bytes

    cap = parse_bytes(text, what="--gpu-memory-cap")
    if device.type != "cuda":
        raise ChunkftError(f"--gpu-memory-cap {text} needs a CUDA device; this run is on {device.type}")
    total = torch.cuda.get_device_properties(device).total_memory
    if cap > total:
        raise ChunkftError(f"--gpu-memory-cap {text} ({describe_size(cap)}) is more than the GPU has "
                           f"({describe_size(total)})")
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap


def data_fingerprint(examples, seq_len: int, tokenizer: str, seed: int) -> str:
    """sha256 over the tokenized examples and what orders and packs them."""
    import hashlib
    from array import array

    h = hashlib.sha256(f"{tokenizer}|{seq_len}|{seed}|{len(examples)}".encode())
    for ex in examples:
        h.update(array("q", ex.input_ids).tobytes())
        h.update(array("q", ex.labels).tobytes())
    return h.hexdigest()


def check_step_in_backward(args, plan) -> None:
    """Refuse, before anything is written, what the optimizer step in backward cannot do: each
    span steps as its gradient completes, so nothing may need every gradient at once."""
    problems = []
    if args.max_grad_norm:
        problems.append(f"global gradient-norm clipping (--max-grad-norm {args.max_grad_norm}; give 0)")
    if args.grad_accum != 1:
        problems.append(f"gradient accumulation (--grad-accum {args.grad_accum}; give 1)")
    if plan.shape.dtype == "fp16":
        problems.append("fp16 loss-scale skipping (plan in bf16 or fp32)")
    if plan.strategy.grad_staging is not None:
        problems.append(f"gradient staging to {plan.strategy.grad_staging.value} (plan without --grad-staging)")
    if problems:
        raise ChunkftError("the plan steps the optimizer in backward, which does not combine with " + "; ".join(problems))


def load_model(spec, *, dtype, device, seed: int):
    """The spec's model: from its safetensors weights when it is a directory that has them,
    else built randomly initialised (deterministic under `seed`)."""
    import torch

    if spec.source == "directory" and any(Path(spec.name).glob("*.safetensors")):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(spec.name, dtype=dtype, local_files_only=True).to(device)
        except (OSError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ChunkftError(f"cannot load weights from {spec.name!r}: {first}") from None
    torch.manual_seed(seed)
    return spec.build(dtype=dtype, device=device)


def decoder_layers(model, spec) -> list:
    """The decoder layers (for per-layer trace events), or [] when the model has no layer list."""
    prefix = spec.layer_prefix()
    if prefix is None:
        return []
    return list(model.get_submodule(prefix))


def run(args) -> int:
    from planner.model import resolve_model
    from planner.plan import check_plan_model, load_plan
    from runtime.dist_run import check_parallel_args, run_parallel

    if args.nproc is not None and args.nproc < 1:
        raise ChunkftError(f"invalid --nproc {args.nproc}: must be 1 or more")
    plan = load_plan(args.plan)
    world = check_parallel_args(args, plan)
    if plan.parallel is not None:
        spec = resolve_model(plan.model_name)
        check_plan_model(plan, spec)
        return run_parallel(args, plan, spec, world)
    import sys

    from runtime.lean_state import StateFormat
    from runtime.outdir import parse_allow_changed

    trainer, trace, plan, spec = build_run(args)
    for stale in trainer.claimed.removed:
        print(f"removed {stale}, left by an interrupted write")
    if args.resume and trainer.claimed.latest is not None:
        trainer.resume(trainer.claimed.latest, allow_changed=parse_allow_changed(args.allow_changed))
        # the command line's hyper-parameters and schedule: equal to the checkpoint's, or named
        # in --allow-changed
        trainer.optimizer.adamw.config, trainer.optimizer.adamw.schedule = trainer_adamw(args), trainer_schedule(args)
        print(f"resumed run {trainer.run_state['run_id']} from step {trainer.step} ({trainer.out_dir})")
    elif args.resume:
        print(f"no checkpoint in {trainer.out_dir}; starting from step 0")
    if plan.shape.dtype != "fp16":  # fp16 skips while its loss scale settles: counted in the summary
        trainer.warn = lambda text: print(f"chunkft: warning: {text}", file=sys.stderr)
    chunks = plan.strategy.chunks
    staging = plan.strategy.grad_staging
    print(f"training {spec.name} ({plan.shape.dtype}, batch {plan.shape.batch} x {plan.shape.seq_len} tokens) "
          f"with {chunks} chunk{'s' if chunks != 1 else ''}, state on {plan.strategy.state_tier.value}"
          + (f", 16-bit gradients staged on {staging.value}" if staging is not None else "")
          + (f", optimizer state: {trainer.optimizer.adamw.state_format.describe()}"
             if trainer.optimizer.adamw.state_format != StateFormat() else "")
          + f", for {args.steps} steps")
    result = trainer.train()
    line = f"done: step {result.final_step}"
    if result.losses:
        line += f", last loss {result.losses[-1]:.4f}, {result.tokens_per_s:.0f} tokens/s"
    if result.eval_losses:
        line += f", eval loss {result.eval_losses[-1][1]:.4f}"
    if result.skipped_steps:
        line += f", {result.skipped_steps} steps skipped (non-finite gradients" + (
            ", fp16 loss scale backed off)" if plan.shape.dtype == "fp16" else ")")
    print(line)
    print(f"checkpoint: {trainer.out_dir}/latest" + (f"; trace: {args.trace}" if args.trace else ""))
    trainer.optimizer.inner.close()
    trainer.claimed.release()
    return 0
