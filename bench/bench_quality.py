"""Benchmark: fine-tuning quality on real text -- what ChunkFT costs in eval loss and time.

    nice -n 5 env OMP_NUM_THREADS=1 python bench/bench_quality.py --cache /tmp/qb   # ~40 min, 2 shared cores
    # writes bench/results/quality_bench*.csv and quality_bench_*.png; --workers 1 to run serially
    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_quality.py --scale 10m --workers 1 --cache /tmp/qb10
    # a 10.06 M-parameter model, a reduced run list (below); writes bench/results/quality_bench_10m*

The task (runtime.text_corpus, nothing downloaded): a byte-level BPE tokenizer (vocabulary
4096) is trained on the pretraining domain -- the English prose of Python's reference
documentation (pydoc_data.topics) and 30 general-purpose standard-library modules -- and a
small Llama is pretrained on it. It is then fine-tuned on a held-apart domain, the stdlib's
concurrency packages (asyncio, concurrent, multiprocessing), and evaluated on modules of those
packages it never trains on (every 5th module in sorted order).

Methods (runtime.sweep), every run the same fine-tuning batches (160 steps of 4 x 128 tokens)
from the same pretrained weights, a constant learning rate after a 10-step linear warm-up,
eval loss every 20 steps with the training seconds so far (evaluation excluded):
  full FT                      torch AdamW over every parameter
  ChunkFT C=2/4/8/16           ChunkAdamW over C byte-balanced chunks, update interval K=1;
                               C=4 and C=16 also at K=5 (C=16 cycles twice in 160 steps)
  BAdam-style blocks K=5, 20   one decoder layer per block (embeddings, final norm, lm_head frozen),
                               AdamW on the active block, its moments dropped at each switch,
                               blocks in a fresh random order each cycle (runtime.sweep.BlockAdam)
  LoRA                         adapters on every attention/MLP linear (alpha = 2 r): r=47, the
                               largest rank within ChunkFT C=4's trainable state, without
                               embeddings; r=8 and r=47 with embed_tokens and lm_head trained in
                               full (modules_to_save; those two alone outweigh every ChunkFT
                               chunk at C >= 2, so no LoRA with them matches a ChunkFT budget)
  ChunkFT C=4 lean / in-bwd    bf16 moments, 8-bit moments (runtime.lean_state), optimizer step
                               in backward (ChunkAdamW(step_in_backward=True))
  ablation                     random chunk order per cycle (C=4, C=16); layer-aligned chunks
                               (C=4: embeddings | layers 0-1 | layers 2-3 | norm + lm_head)
Learning rates (seed 0, best = lowest final eval loss): full FT 3e-4, 1e-3, 3e-3; ChunkFT K=1,
every C, 5e-4, 1e-3, 2e-3, 3e-3, 1e-2; BAdam-style K=5 3e-4, 1e-3, 3e-3, 1e-2; LoRA (r=47
without also 3e-4, r=8 with embeddings) 1e-3, 3e-3, 1e-2. The second seed runs at the best rate.
Trimmed to fit ~35 minutes on 2 shared cores: K=5, BAdam-style K=20, the lean formats,
step-in-backward, the ablations and LoRA r=47 with embeddings run only at the best rate of
their swept sibling (ChunkFT K=1 at the same C, BAdam-style K=5, ChunkFT C=4, LoRA r=8 with
embeddings), both seeds (the step in backward one seed: it is the same arithmetic as the step
after backward, only its time differs); no K=5 for C=2 and C=8; no LoRA at C=8/16 budgets.
Seeds change the batch order, LoRA's A initialisation and the random chunk/block orders; the
pretrained base is one. ChunkFT K=1 runs that end above full FT's final loss run once more
(seed 0, best rate) for twice the steps, to see when they reach it.

Peak memory: each method's training memory (weights, optimizer state, gradients, activations:
glibc heap in use, planner.measure's mallinfo2 sampler, after every aten op of a step after two
warm-up steps, minus what the process held before the model was built); for ChunkFT also with
the inactive chunks' state on the DISK tier, which is the memory ChunkFT saves on a GPU.

Outputs (bench/results/): quality_bench.csv (one row per method), quality_bench_runs.csv (every
run), quality_bench_curves.csv (every eval point of every run), quality_bench_steps.png and
quality_bench_seconds.png (eval loss against steps and against wall-clock training seconds,
mean of the seeds with their range shaded), quality_bench_ablation.png. Runs are cached under
--cache (JSON per run), so an interrupted benchmark resumes.

--scale 10m (TEN_M): a 10.06 M-parameter Llama (vocabulary 4096, hidden 320, 6 layers, MLP 864,
5 heads of 64, no GQA; embeddings and head 26% of the parameters, against 57% at 1.85 M), the
same task, tokenizer and fine-tuning batches, pretrained 240 steps of 16 x 128 tokens at 2e-3
(not 300: a full FT step costs ~3.6x the 1.85 M model's, 0.42 CPU s for 4 x 128 tokens on one
thread; pretraining took ~10 minutes). That base is less trained than the 1.85 M one (eval loss
4.59 on its own domain against 4.30; 5.58 on the held-out modules against 5.12). The run list is
cut to fit ~70 minutes on one thread: full FT 3e-4, 1e-3, 3e-3; ChunkFT C=2 and C=4 (K=1) 5e-4,
1e-3, 2e-3 (around the 1.85 M best, 1e-3), and 2.5e-4 added when 1e-3 and 2e-3 diverged for
both C and 5e-4 came out best; LoRA r=8 with embeddings and head 1e-3, 3e-3, 1e-2, and 3e-4
added when 1e-3 came out best; BAdam-style blocks K=5 1e-4, 3e-4, 1e-3 (1.85 M's best, 3e-4,
was at its sweep's edge); both seeds at each best rate; the longer ChunkFT runs as above; no
C=8/16, K=5 ChunkFT, BAdam K=20, LoRA without embeddings, lean formats or ablations.

Known limitations: the model is small (1.85 M parameters, 4 layers; a 2-core CPU shared with
other jobs) and briefly pretrained (300 steps of 16 x 128 tokens, ~1.5 passes over its domain),
so fine-tuning moves it a long way; wall-clock seconds include contention from other processes
(two runs in parallel on a loaded machine), CPU seconds (one torch thread) are in the CSVs beside
them; time-to-loss has the resolution of `eval_every` steps. Embeddings and lm_head are 57% of
this model's parameters (a few percent in a real LLM), so whatever trains them (full FT, LoRA with
modules_to_save, the ChunkFT chunks that hold them) dominates the result. Peak memory varies by a
few MB with which chunk the measured step trains. Measured on a 2-core machine shared with other
agents, about 40 minutes: pretraining ~10, the runs ~25 (two in parallel), the longer runs ~4.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.schema import Tier  # noqa: E402
from runtime.data import PackedLoader, eval_batches  # noqa: E402
from runtime.lean_state import Moments, StateFormat  # noqa: E402
from runtime.lora import LoraConfig, rank_for_budget  # noqa: E402
from runtime.sweep import STATE_COPIES, BlockAdam, ChunkFT, FullFT, Lora, run_method, time_to_loss  # noqa: E402
from runtime.text_corpus import blocks, domains, token_stream, train_bpe  # noqa: E402
from runtime.train import LoopConfig, Schedule, TorchAdamW, Trainer, evaluate_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASK_EVAL_BLOCKS = 64
EMBEDDINGS = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Config:
    vocab: int = 4096
    hidden: int = 128
    layers: int = 4
    intermediate: int = 352
    heads: int = 4
    seq: int = 128
    pretrain_batch: int = 16
    pretrain_steps: int = 300
    pretrain_lr: float = 2e-3
    batch: int = 4
    steps: int = 160
    eval_every: int = 20
    warmup: int = 10
    eval_blocks: int = 40
    """Held-out blocks evaluated (of the 64 the task keeps)."""
    max_prose_chars: int | None = None
    pretrain_modules: tuple[str, ...] | None = None
    """None: runtime.text_corpus.PRETRAIN_MODULES."""
    finetune_packages: tuple[str, ...] | None = None
    """None: runtime.text_corpus.FINETUNE_PACKAGES."""
    seeds: tuple[int, ...] = (0, 1)
    chunks: tuple[int, ...] = (2, 4, 8, 16)
    large_interval: int = 5
    """The larger update interval K (ChunkFT and BAdam-style blocks): C=16 cycles twice in 160 steps."""
    large_chunks: tuple[int, ...] = (4, 16)
    """The C that also run at K = large_interval."""
    ablation_chunks: tuple[int, ...] = (4, 16)
    lrs_full: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    lrs_chunk: tuple[float, ...] = (5e-4, 1e-3, 2e-3, 3e-3, 1e-2)
    """Five rates: a first sweep over 1e-3, 3e-3, 1e-2 put ChunkFT's best at the low edge (3e-3
    and above diverge for every C), so 5e-4 and 2e-3 bracket it."""
    lrs_badam: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    """1e-3, 3e-3, 1e-2 first; 3e-4 added when 1e-3 came out best."""
    badam_long_interval: int = 20
    """BAdam-style blocks also at this K (each of 4 layers twice in 160 steps), at K's best rate
    (0: not run)."""
    lrs_lora: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lrs_lora_no_emb: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    """lrs_lora, and 3e-4 added when 1e-3 came out best."""
    extend_factor: int = 2
    """ChunkFT K=1 runs that end above full FT's final loss run again (first seed, best rate) for
    this many times `steps`, to find when they reach it (0: no extension)."""
    small_lora_rank: int = 8
    lora_small_budget: bool = False
    """Also LoRA without embeddings at ChunkFT C=16's budget (trimmed by default)."""
    lean: bool = True
    memory: bool = True
    lora_no_emb: bool = True
    """LoRA without embeddings at the middle C's trainable state (swept, `lrs_lora_no_emb`)."""
    lora_budget_emb: bool = True
    """LoRA at that rank with embeddings and head too (at the r=small_lora_rank one's best rate)."""
    layer_aligned: bool = True
    """The layer-aligned chunk ablation (at the middle C)."""
    seed_families: tuple[str, ...] | None = None
    """Families ("full", "chunk", "badam", "lora") whose swept methods also run the other seeds at
    their best rate; the rest run the first seed only (None: every family)."""
    prefix: str = "quality_bench"
    """Output file names: {prefix}.csv, {prefix}_runs.csv, {prefix}_steps.png, ..."""

    def seeds_of(self, family: str) -> tuple[int, ...]:
        """The seeds a swept method of `family` runs at its best rate."""
        if self.seed_families is None or family in self.seed_families:
            return self.seeds
        return self.seeds[:1]

    def seeds_text(self) -> str:
        if self.seed_families is None:
            return f"{len(self.seeds)} seeds"
        return f"{len(self.seeds)} seeds for {' and '.join(self.seed_families)}, one for the rest"

    def key(self) -> str:
        return hashlib.sha1(repr(dataclasses.astuple(self)).encode()).hexdigest()[:10]

    def run_key(self) -> str:
        """What one run's result depends on besides its method, rate and seed."""
        return f"{self.task_key()}-{self.batch}-{self.steps}-{self.eval_every}-{self.warmup}-{self.eval_blocks}"

    def task_key(self) -> str:
        """What the corpus, tokenizer and pretrained base depend on."""
        fields = ("vocab", "hidden", "layers", "intermediate", "heads", "seq", "pretrain_batch", "pretrain_steps",
                  "pretrain_lr", "max_prose_chars", "pretrain_modules", "finetune_packages")
        return hashlib.sha1(repr([getattr(self, f) for f in fields]).encode()).hexdigest()[:10]


TINY = Config(vocab=300, hidden=32, layers=2, intermediate=64, heads=2, seq=32, pretrain_batch=8, pretrain_steps=20,
              pretrain_lr=1e-2, batch=4, steps=4, eval_every=2, warmup=1, eval_blocks=8, max_prose_chars=20_000,
              pretrain_modules=("bisect",), finetune_packages=("concurrent",), chunks=(2,), large_interval=2,
              large_chunks=(2,), ablation_chunks=(2,), lrs_full=(3e-3, 1e-2), lrs_chunk=(3e-3, 1e-2),
              lrs_badam=(3e-3, 1e-2), badam_long_interval=0, lrs_lora=(3e-3, 1e-2), lrs_lora_no_emb=(3e-3, 1e-2))
"""The smoke test's configuration: seconds, not minutes."""

TEN_M = Config(hidden=320, layers=6, intermediate=864, heads=5, pretrain_steps=240,
               chunks=(2, 4), large_chunks=(), ablation_chunks=(), badam_long_interval=0, extend_factor=2,
               lrs_full=(3e-4, 1e-3, 3e-3), lrs_chunk=(2.5e-4, 5e-4, 1e-3, 2e-3), lrs_badam=(1e-4, 3e-4, 1e-3),
               lrs_lora=(3e-4, 1e-3, 3e-3, 1e-2), lora_no_emb=False, lora_budget_emb=False, lean=False,
               layer_aligned=False, prefix="quality_bench_10m")
"""`--scale 10m`: a 10.06 M-parameter Llama (hidden 320, 6 layers, MLP 864, 5 heads of 64;
embeddings and head 26% of it), pretrained 240 steps instead of 300, and the reduced run list
of the module docstring: ~50 minutes on one thread."""

SCALES = {"1.85m": Config(), "10m": TEN_M}


# -- the task ------------------------------------------------------------------------------

@dataclass
class Task:
    config: Config
    weights: dict
    train: list
    eval_batches: list
    stats: dict

    def model_config(self):
        from transformers import LlamaConfig

        c = self.config
        return LlamaConfig(hidden_size=c.hidden, intermediate_size=c.intermediate, num_hidden_layers=c.layers,
                           num_attention_heads=c.heads, num_key_value_heads=c.heads, vocab_size=c.vocab,
                           max_position_embeddings=c.seq, tie_word_embeddings=False)

    def fresh(self):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.model_config(), dtype=torch.float32)
        model.load_state_dict(self.weights)
        return model

    def loader(self, seed: int) -> PackedLoader:
        return PackedLoader(self.train, seq_len=self.config.seq, batch_size=self.config.batch, seed=seed + 1,
                            pad_token_id=0)


def build_task(config: Config, cache: Path, log=print) -> Task:
    """Corpus, tokenizer, pretrained base: built once and kept in `cache` (keyed by config)."""
    from transformers import AutoModelForCausalLM

    path = cache / f"task-{config.task_key()}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
    else:
        t0 = time.perf_counter()
        kwargs = {"max_prose_chars": config.max_prose_chars}
        if config.pretrain_modules is not None:
            kwargs["pretrain_modules"] = config.pretrain_modules
        if config.finetune_packages is not None:
            kwargs["finetune_packages"] = config.finetune_packages
        d = domains(**kwargs)
        tok = train_bpe(d.pretrain, config.vocab)
        pre_ids, ft_ids, ev_ids = (token_stream(tok, t) for t in (d.pretrain, d.finetune_train, d.finetune_eval))
        stats = {"prose_chars": d.prose_chars, "pretrain_code_chars": d.code_chars, "pretrain_tokens": len(pre_ids),
                 "finetune_train_chars": sum(map(len, d.finetune_train)), "finetune_train_tokens": len(ft_ids),
                 "finetune_train_modules": len(d.train_modules),
                 "eval_chars": sum(map(len, d.finetune_eval)), "eval_tokens_available": len(ev_ids),
                 "eval_modules": list(d.eval_modules), "vocab": tok.get_vocab_size()}
        task = Task(config, {}, [], [], stats)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(task.model_config(), dtype=torch.float32)
        stats["params"] = sum(p.numel() for p in base.parameters())
        pre = blocks(pre_ids, config.seq)
        sched = Schedule(lr=config.pretrain_lr, warmup_steps=max(1, config.pretrain_steps // 10),
                         total_steps=config.pretrain_steps, min_ratio=0.1)
        log(f"pretraining {stats['params'] / 1e6:.2f} M parameters on {len(pre_ids)} tokens, "
            f"{config.pretrain_steps} steps of {config.pretrain_batch}x{config.seq}")
        result = Trainer(base, TorchAdamW(dict(base.named_parameters()), schedule=sched),
                         PackedLoader(pre, seq_len=config.seq, batch_size=config.pretrain_batch, seed=0,
                                      pad_token_id=0),
                         LoopConfig(steps=config.pretrain_steps)).train()
        stats["pretrain_final_train_loss"] = sum(result.losses[-10:]) / len(result.losses[-10:])
        stats["pretrain_seconds"] = result.seconds
        ev = blocks(ev_ids, config.seq, TASK_EVAL_BLOCKS)
        stats["eval_tokens"] = len(ev) * config.seq
        saved = {"weights": {k: v.clone() for k, v in base.state_dict().items()}, "train": blocks(ft_ids, config.seq),
                 "eval": ev, "stats": stats}
        # the base's loss on its own domain (last blocks of the pretraining stream) for reference
        stats["base_loss_pretrain_domain"] = evaluate_loss(
            base, eval_batches(pre[-config.eval_blocks:], seq_len=config.seq, batch_size=16, pad_token_id=0))
        stats["task_seconds"] = time.perf_counter() - t0
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(saved, path)
    saved["stats"].pop("pretrain_eval_tokens_heldout", None)  # a placeholder an earlier version wrote
    saved["stats"]["eval_tokens"] = len(saved["eval"][:config.eval_blocks]) * config.seq  # what is evaluated
    return Task(config, saved["weights"], saved["train"],
                eval_batches(saved["eval"][:config.eval_blocks], seq_len=config.seq, batch_size=16, pad_token_id=0),
                saved["stats"])


# -- jobs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    name: str
    """The method's row name in the results (unique per method configuration)."""
    method: object
    lr: float
    seed: int
    role: str = "sweep"
    """"sweep" (seed 0, one of the swept rates), "seed" (another seed at the best rate),
    "memory" (peak-memory measurement only), "extend" (a longer run: `steps`)."""
    steps: int | None = None
    """Steps of an "extend" run (None: the config's)."""

    def key(self, config: Config) -> str:
        text = f"{config.run_key()}|{self.name}|{self.lr!r}|{self.seed}|{self.role}"
        if self.steps is not None:
            text += f"|{self.steps}"
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def seeded(method, seed: int):
    """`method` with its own random orders seeded by the run's seed."""
    if isinstance(method, ChunkFT):
        return dataclasses.replace(method, order_seed=seed)
    if isinstance(method, BlockAdam):
        return dataclasses.replace(method, seed=seed)
    return method


_TASK: Task | None = None


def _worker_init(config: Config, cache: str) -> None:
    global _TASK
    torch.set_num_threads(1)
    _TASK = build_task(config, Path(cache))
    gc.collect()
    gc.freeze()  # the task's many small objects: out of every later collection's way


_MEASURED = False


def measure_memory(task: Task, method) -> dict:
    """Training memory of `method` (see the module docstring): host-tier state, and for ChunkFT
    the inactive chunks' state on disk. A process's first measurement reads ~35 MB high (lazily
    built state allocated inside the sampled step), so each process first measures once and
    throws that away."""
    global _MEASURED
    if not _MEASURED:
        _MEASURED = True
        measure_memory(task, FullFT())
    from planner.measure import MallocSampler, malloc_in_use_bytes

    out = {}
    variants = [("peak_bytes", method)]
    tmp = None
    if isinstance(method, ChunkFT):
        tmp = tempfile.TemporaryDirectory(prefix="quality-bench-state-")
        on_disk = dataclasses.replace(method, state_tier=Tier.DISK, state_dir=tmp.name)
        variants.append(("peak_bytes_state_on_disk", on_disk))
    try:
        for column, m in variants:
            gc.collect()
            before = malloc_in_use_bytes()
            model = task.fresh()
            opt = m.optimizer(model, Schedule(lr=1e-4))
            loader = task.loader(0)
            Trainer(model, opt, loader, LoopConfig(steps=2)).train()
            trainer = Trainer(model, opt, loader, LoopConfig(steps=1))
            with MallocSampler() as sampler:
                trainer.train()
            out[column] = sampler.result.baseline_bytes + sampler.result.peak_bytes - before
            inner = getattr(opt, "inner", None)
            if column == "peak_bytes" and inner is not None:  # ChunkAdamW: its largest chunk's real state bytes
                out["state_bytes_measured"] = max(inner.chunk_state_bytes(k) for k in range(inner.table.num_chunks))
            close = getattr(opt, "close", None)
            if close is not None:
                close()
            del model, opt, trainer
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


def run_job(job: Job, cache: str) -> dict:
    task = _TASK
    c = task.config
    path = Path(cache) / "runs" / f"{job.key(c)}.json"
    if path.exists():
        return json.loads(path.read_text())
    if job.role == "memory":
        record = {"name": job.name, "role": job.role, **measure_memory(task, job.method)}
    else:
        method = seeded(job.method, job.seed)
        run = run_method(method, task.fresh(), job.lr, task.loader(job.seed), task.eval_batches,
                         steps=job.steps or c.steps,
                         eval_every=c.eval_every, warmup_steps=c.warmup, seed=job.seed)
        record = {"name": job.name, "role": job.role, "lr": job.lr, "seed": job.seed,
                  "points": [dataclasses.asdict(p) for p in run.points], "train_losses": run.train_losses}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return record


def run_jobs(jobs: list[Job], config: Config, cache: Path, workers: int, log=print) -> list[dict]:
    args = [(j, str(cache)) for j in jobs]
    t0 = time.perf_counter()
    out = []
    if workers <= 1:
        _worker_init(config, str(cache))
        for i, a in enumerate(args):
            out.append(run_job(*a))
            log(f"  [{i + 1}/{len(jobs)}] {jobs[i].name} lr {jobs[i].lr:g} seed {jobs[i].seed} {jobs[i].role} "
                f"({time.perf_counter() - t0:.0f} s)")
        return out
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(config, str(cache))) as pool:
        results = [pool.apply_async(run_job, a) for a in args]
        for i, r in enumerate(results):
            out.append(r.get())
            log(f"  [{i + 1}/{len(jobs)}] {jobs[i].name} lr {jobs[i].lr:g} seed {jobs[i].seed} {jobs[i].role} "
                f"({time.perf_counter() - t0:.0f} s)")
    return out


# -- the plan ------------------------------------------------------------------------------

@dataclass
class Entry:
    name: str
    method: object
    family: str
    """"full", "chunk", "badam", "lora", "lean", "ablation"."""
    lrs: tuple[float, ...] = ()
    """Swept rates (seed 0); empty: runs at `lr_from`'s best rate."""
    lr_from: str | None = None
    budget: str = ""
    one_seed: bool = False
    """Run the first seed only (the step in backward: the same arithmetic as its sibling, only time differs)."""
    runs: list = field(default_factory=list)
    """The runs at the best rate, one per seed."""
    all_runs: list = field(default_factory=list)
    extended: dict | None = None
    """The phase-3 longer run (first seed), if any."""


def plan(config: Config, task: Task) -> list[Entry]:
    probe = task.fresh()
    entries = [Entry("full FT", FullFT(), "full", config.lrs_full)]
    for c in config.chunks:
        entries.append(Entry(f"ChunkFT C={c}", ChunkFT(c), "chunk", config.lrs_chunk))
    for c in config.large_chunks:
        entries.append(Entry(f"ChunkFT C={c} K={config.large_interval}",
                             ChunkFT(c, update_interval=config.large_interval),
                             "chunk", lr_from=f"ChunkFT C={c}"))
    entries.append(Entry(f"BAdam-style blocks K={config.large_interval}", BlockAdam(interval=config.large_interval),
                         "badam", config.lrs_badam))
    if config.badam_long_interval:
        entries.append(Entry(f"BAdam-style blocks K={config.badam_long_interval}",
                             BlockAdam(interval=config.badam_long_interval), "badam",
                             lr_from=f"BAdam-style blocks K={config.large_interval}"))

    def lora(rank: int, full: tuple[str, ...]) -> Lora:
        return Lora(LoraConfig(rank=rank, alpha=2.0 * rank, full=full))

    def budget_rank(c: int, full: tuple[str, ...]) -> int | None:
        try:
            return rank_for_budget(probe, ChunkFT(c).state_bytes(probe) // STATE_COPIES, LoraConfig(full=full))
        except Exception:  # the budget holds no rank (embeddings alone are larger)
            return None

    mid, small = config.chunks[len(config.chunks) // 2 - 1], config.chunks[-1]  # C=4 and C=16
    r_mid, r_small = budget_rank(mid, ()), budget_rank(small, ())
    sweep_no_emb = f"LoRA r={r_mid}"
    if config.lora_no_emb:
        entries.append(Entry(sweep_no_emb, lora(r_mid, ()), "lora", config.lrs_lora_no_emb,
                             budget=f"= ChunkFT C={mid} state"))
    if config.lora_no_emb and config.lora_small_budget and r_small is not None and r_small != r_mid:
        entries.append(Entry(f"LoRA r={r_small}", lora(r_small, ()), "lora", lr_from=sweep_no_emb,
                             budget=f"= ChunkFT C={small} state"))
    r8 = config.small_lora_rank
    sweep_emb = f"LoRA r={r8} + emb/head"
    entries.append(Entry(sweep_emb, lora(r8, EMBEDDINGS), "lora", config.lrs_lora,
                         budget="over every ChunkFT C>=2 budget: embeddings + head alone are larger"))
    if config.lora_budget_emb:
        entries.append(Entry(f"LoRA r={r_mid} + emb/head", lora(r_mid, EMBEDDINGS), "lora", lr_from=sweep_emb))
    base = f"ChunkFT C={mid}"
    if config.lean:
        entries.append(Entry(f"ChunkFT C={mid} bf16 moments",
                             ChunkFT(mid, state_format=StateFormat(moments=Moments.BF16)),
                             "lean", lr_from=base))
        entries.append(Entry(f"ChunkFT C={mid} 8-bit moments",
                             ChunkFT(mid, state_format=StateFormat(moments=Moments.INT8)),
                             "lean", lr_from=base))
        entries.append(Entry(f"ChunkFT C={mid} step in backward", ChunkFT(mid, step_in_backward=True), "lean",
                             lr_from=base, one_seed=True))
    for c in config.ablation_chunks:
        entries.append(Entry(f"ChunkFT C={c} random order", ChunkFT(c, order="random"), "ablation",
                             lr_from=f"ChunkFT C={c}"))
    if config.layer_aligned:
        entries.append(Entry(f"ChunkFT C={mid} layer-aligned", ChunkFT(mid, layout="layers"), "ablation",
                             lr_from=base))
    return entries


def best_lr(entry: Entry, records: dict) -> float:
    runs = [r for r in records.get(entry.name, []) if r["role"] == "sweep"]
    return min(runs, key=lambda r: r["points"][-1]["eval_loss"])["lr"]


# -- analysis ------------------------------------------------------------------------------

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def full_ft_steps_to(full_runs: list[dict], loss: float) -> float | None:
    """The step at which full FT's mean eval curve first reaches `loss`, linearly interpolated
    between eval points (None if it never does): how many full FT steps a method's result is worth."""
    n = min(len(r["points"]) for r in full_runs)
    steps = [full_runs[0]["points"][j]["step"] for j in range(n)]
    curve = [_mean([r["points"][j]["eval_loss"] for r in full_runs]) for j in range(n)]
    for j in range(1, n):
        if curve[j] <= loss:
            a, b = curve[j - 1], curve[j]
            return steps[j - 1] + (steps[j] - steps[j - 1]) * ((a - loss) / (a - b) if a > b else 1.0)
    return None


def loss_at_seconds(points: list[dict], seconds: float) -> float:
    """Eval loss at the last eval point whose training seconds are <= `seconds`."""
    return [p for p in points if p["seconds"] <= seconds + 1e-9][-1]["eval_loss"]


def summarise(entries: list[Entry], records: dict, memory: dict, config: Config, probe) -> list[dict]:
    by_name = {e.name: e for e in entries}
    rows = []
    full = by_name["full FT"]
    full_runs = full.runs
    target = _mean([r["points"][-1]["eval_loss"] for r in full_runs])
    full_seconds = _mean([r["points"][-1]["seconds"] for r in full_runs])
    for e in entries:
        finals = [r["points"][-1]["eval_loss"] for r in e.runs]
        hits = [time_to_loss(_points(r), target) for r in e.runs]
        reached = [h for h in hits if h is not None]
        sweep = {r["lr"]: r["points"][-1]["eval_loss"] for r in records.get(e.name, []) if r["role"] == "sweep"}
        lr = e.runs[0]["lr"]
        mem = memory.get(e.name, {})
        rows.append({
            "method": e.name, "family": e.family, "budget": e.budget,
            "lr_swept": " ".join(f"{k:g}:{v:.4f}" for k, v in sorted(sweep.items())) if e.lrs else f"from {e.lr_from}",
            "best_lr": lr, "best_lr_at_edge": int(bool(e.lrs) and lr in (min(e.lrs), max(e.lrs))),
            "seeds": len(e.runs),
            "final_eval_loss": _mean(finals), "final_min": min(finals), "final_max": max(finals),
            "train_seconds": _mean([r["points"][-1]["seconds"] for r in e.runs]),
            "cpu_seconds": _mean([r["points"][-1]["cpu_seconds"] for r in e.runs]),
            "target_loss": target, "reached_target": f"{len(reached)}/{len(e.runs)}",
            "steps_to_target": _mean([h.step for h in reached]) if reached else None,
            "seconds_to_target": _mean([h.seconds for h in reached]) if reached else None,
            "cpu_seconds_to_target": _mean([h.cpu_seconds for h in reached]) if reached else None,
            "loss_at_full_ft_seconds": _mean([loss_at_seconds(r["points"], full_seconds) for r in e.runs]),
            "full_ft_steps_to_this_loss": full_ft_steps_to(full_runs, _mean(finals)),
            **_extended_columns(e, target),
            "trainable_state_bytes": mem.get("state_bytes_measured") or e.method.state_bytes(probe),
            "peak_bytes": mem.get("peak_bytes"), "peak_bytes_state_on_disk": mem.get("peak_bytes_state_on_disk"),
        })
    return rows


def _extended_columns(e: Entry, target: float) -> dict:
    """When the longer run (phase 3) first reaches `target`: step, wall and CPU seconds."""
    if e.extended is None:
        return {"extended_steps": None, "extended_final_loss": None, "extended_steps_to_target": None,
                "extended_seconds_to_target": None, "extended_cpu_seconds_to_target": None}
    hit = time_to_loss(_points(e.extended), target)
    last = e.extended["points"][-1]
    return {"extended_steps": last["step"], "extended_final_loss": last["eval_loss"],
            "extended_steps_to_target": hit.step if hit else None,
            "extended_seconds_to_target": hit.seconds if hit else None,
            "extended_cpu_seconds_to_target": hit.cpu_seconds if hit else None}


def _points(record: dict):
    from runtime.sweep import CurvePoint

    return [CurvePoint(**p) for p in record["points"]]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write_outputs(rows: list[dict], entries: list[Entry], out: Path, config: Config, task: Task) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prefix = config.prefix
    with open(out / f"{prefix}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(out / f"{prefix}_runs.csv", "w", newline="") as f, \
            open(out / f"{prefix}_curves.csv", "w", newline="") as g:
        w, wc = csv.writer(f), csv.writer(g)
        w.writerow(["method", "role", "lr", "seed", "final_eval_loss", "train_seconds", "cpu_seconds"])
        wc.writerow(["method", "lr", "seed", "step", "seconds", "cpu_seconds", "eval_loss"])
        for e in entries:
            for r in e.all_runs + ([e.extended] if e.extended else []):
                last = r["points"][-1]
                w.writerow([e.name, r["role"], r["lr"], r["seed"], f"{last['eval_loss']:.5f}", f"{last['seconds']:.2f}",
                            f"{last['cpu_seconds']:.2f}"])
                for p in r["points"]:
                    wc.writerow([e.name, r["lr"], r["seed"], p["step"], f"{p['seconds']:.3f}",
                                 f"{p['cpu_seconds']:.3f}",
                                 f"{p['eval_loss']:.5f}"])
    (out / f"{prefix}_task.json").write_text(json.dumps({"config": dataclasses.asdict(config), **task.stats},
                                                          indent=1, default=str) + "\n")
    plot(entries, out, config, task.stats.get("params"))


def plot(entries: list[Entry], out: Path, config: Config, params: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import apply_style

    apply_style()
    by_name = {e.name: e for e in entries}
    main = [n for n in ["full FT", *[f"ChunkFT C={c}" for c in config.chunks],
                        f"BAdam-style blocks K={config.large_interval}",
                        *[e.name for e in entries if e.family == "lora"]] if n in by_name]
    colours = plt.get_cmap("tab10").colors
    target = _mean([r["points"][-1]["eval_loss"] for r in by_name["full FT"].runs])

    def curves(ax, names, x: str, styles=None, extended: bool = False):
        for i, name in enumerate(names):
            e = by_name[name]
            n = min(len(r["points"]) for r in e.runs)
            xs = [_mean([r["points"][j][x] for r in e.runs]) for j in range(n)]
            ys = [[r["points"][j]["eval_loss"] for r in e.runs] for j in range(n)]
            style = (styles or {}).get(name, "-" if e.family != "lora" else "--")
            mean = [sum(y) / len(y) for y in ys]
            line, = ax.plot(xs, mean, style, color=colours[i % 10], lw=2.2 if name == "full FT" else 1.4,
                            label=f"{name} (lr {e.runs[0]['lr']:g})")
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.18, lw=0)
            if extended and e.extended is not None:  # the longer run (seed 0), thin dotted
                ax.plot([p[x] for p in e.extended["points"]], [p["eval_loss"] for p in e.extended["points"]], ":",
                        color=line.get_color(), lw=1.0)
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_ylabel("eval loss (held-out modules, nats/token)")
        ax.grid(alpha=0.3)
        lo = min(min(r["points"][-1]["eval_loss"] for r in by_name[n].runs) for n in names)
        ax.set_ylim(lo - 0.1, lo + 1.6)

    seeds = config.seeds_text()
    for x, fname, xlabel in (("step", f"{config.prefix}_steps.png", "optimizer step (equal tokens: "
                              f"{config.batch}x{config.seq} per step)"),
                             ("seconds", f"{config.prefix}_seconds.png", "training seconds, wall clock (evaluation "
                              "excluded; 1 torch thread, shared CPU)")):
        fig, ax = plt.subplots(figsize=(9.0, 5.6))
        curves(ax, main, x, extended=True)
        ax.set_xlabel(xlabel)
        model = f"{params / 1e6:.2f} M-parameter Llama " if params else ""
        ax.set_title(f"Fine-tuning a {model}on held-apart stdlib code: mean of {seeds}, range shaded;\n"
                     f"grey: full FT's final loss; thin dotted: ChunkFT runs continued to {config.extend_factor}x "
                     "the steps (seed 0)")
        ax.legend(ncol=2, loc="upper right")
        fig.savefig(out / fname, dpi=100, bbox_inches="tight")
        plt.close(fig)
    ablation = [n for n in [f"ChunkFT C={c}" for c in config.ablation_chunks]
                + [e.name for e in entries if e.family in ("ablation", "lean")]
                + [f"ChunkFT C={c} K={config.large_interval}" for c in config.ablation_chunks] if n in by_name]
    if not ablation:  # a reduced run list (--scale 10m) has no ablation
        return
    fig, ax = plt.subplots(figsize=(9.0, 5.6))
    curves(ax, ablation, "step", styles={n: ("-" if n.startswith("ChunkFT C=") and n.count(" ") == 1 else "--")
                                         for n in ablation})
    finals = [r["points"][-1]["eval_loss"] for n in ablation for r in by_name[n].runs]
    start = by_name[ablation[0]].runs[0]["points"][0]["eval_loss"]
    ax.set_ylim(min(finals) - 0.05, start + 0.05)
    ax.set_xlabel("optimizer step")
    ax.set_title(f"ChunkFT ablations: order, layout, interval, state format (mean of {seeds}, range shaded)")
    ax.legend(ncol=2, loc="upper right")
    fig.savefig(out / f"{config.prefix}_ablation.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def print_table(rows: list[dict], log=print) -> None:
    log(f"\n{'method':38s} {'lr':>7s} {'final eval loss':>17s} {'to full FT loss':>21s} {'train s':>8s} "
        f"{'CPU s':>7s} {'loss@fullFT s':>13s} {'=fullFT st':>10s} {'state KiB':>9s} {'peak MiB':>8s} "
        f"{'disk-tier MiB':>13s}")
    for r in rows:
        spread = (r["final_max"] - r["final_min"]) / 2
        reach = (f"{r['reached_target']} @{r['steps_to_target']:.0f} st {r['seconds_to_target']:.0f} s"
                 if r["steps_to_target"] is not None else f"{r['reached_target']} not reached")
        edge = "*" if r["best_lr_at_edge"] else " "
        log(f"{r['method']:38s} {r['best_lr']:7.0e}{edge}{r['final_eval_loss']:9.4f} ± {spread:.4f} {reach:>21s} "
            f"{r['train_seconds']:8.1f} {r['cpu_seconds']:7.1f} {r['loss_at_full_ft_seconds']:13.4f} "
            f"{_fmt(r['full_ft_steps_to_this_loss'], '10.0f')} "
            f"{r['trainable_state_bytes'] / 1024:9.0f} {_fmt(r['peak_bytes'] and r['peak_bytes'] / 2**20, '8.1f')} "
            f"{_fmt(r['peak_bytes_state_on_disk'] and r['peak_bytes_state_on_disk'] / 2**20, '13.1f')}")
        if r.get("extended_steps"):
            hit = (f"reaches it at step {r['extended_steps_to_target']} ({r['extended_seconds_to_target']:.0f} s wall, "
                   f"{r['extended_cpu_seconds_to_target']:.0f} s CPU)" if r["extended_steps_to_target"] is not None
                   else "does not reach it")
            log(f"{'':38s}   longer run (seed 0, {r['extended_steps']} steps): {hit}; final "
                f"{r['extended_final_loss']:.4f}")


def main(config: Config = Config(), *, out: Path = RESULTS, cache: Path | None = None, workers: int = 2,
         log=print) -> list[dict]:
    torch.set_num_threads(1)
    cache = Path(cache or Path(tempfile.gettempdir()) / f"chunkft-quality-bench-{config.key()}")
    t0 = time.perf_counter()
    task = build_task(config, cache, log)
    log(f"task ready ({time.perf_counter() - t0:.0f} s): {json.dumps(task.stats)}")
    entries = plan(config, task)
    by_name = {e.name: e for e in entries}
    records: dict[str, list[dict]] = {}

    def collect(jobs, results):
        for j, r in zip(jobs, results):
            records.setdefault(j.name, []).append(r)

    # phase 1: the sweeps (seed 0) and the memory measurements
    jobs = [Job(e.name, e.method, lr, config.seeds[0]) for e in entries for lr in e.lrs]
    mem_jobs = [Job(e.name, e.method, 0.0, 0, "memory") for e in entries] if config.memory else []
    log(f"phase 1: {len(jobs)} sweep runs, {len(mem_jobs)} memory measurements")
    results = run_jobs(mem_jobs + jobs, config, cache, workers, log)
    memory = {j.name: r for j, r in zip(mem_jobs, results[:len(mem_jobs)])}
    collect(jobs, results[len(mem_jobs):])
    # phase 2: other seeds at each swept method's best rate; the trimmed methods at their sibling's
    jobs = []
    for e in entries:
        lr = best_lr(e, records) if e.lrs else best_lr(by_name[e.lr_from], records)
        seeds = config.seeds_of(e.family)[1:] if e.lrs else config.seeds[:1] if e.one_seed else config.seeds
        jobs += [Job(e.name, e.method, lr, s, "seed") for s in seeds]
    log(f"phase 2: {len(jobs)} runs")
    collect(jobs, run_jobs(jobs, config, cache, workers, log))
    for e in entries:
        lr = best_lr(e, records) if e.lrs else None
        e.all_runs = records[e.name]
        e.runs = [r for r in records[e.name] if r["role"] == "seed" or (r["role"] == "sweep" and r["lr"] == lr)]
        e.runs.sort(key=lambda r: r["seed"])
    # phase 3: ChunkFT (K=1) runs that did not reach full FT's final loss, longer
    target = _mean([r["points"][-1]["eval_loss"] for r in by_name["full FT"].runs])
    jobs = []
    if config.extend_factor > 1:
        for c in config.chunks:
            e = by_name[f"ChunkFT C={c}"]
            if _mean([r["points"][-1]["eval_loss"] for r in e.runs]) > target:
                jobs.append(Job(e.name, e.method, e.runs[0]["lr"], config.seeds[0], "extend",
                                steps=config.extend_factor * config.steps))
    log(f"phase 3: {len(jobs)} longer runs ({config.extend_factor} x {config.steps} steps)")
    for j, r in zip(jobs, run_jobs(jobs, config, cache, workers, log)):
        by_name[j.name].extended = r
    rows = summarise(entries, records, memory, config, task.fresh())
    write_outputs(rows, entries, out, config, task)
    lines: list[str] = []
    print_table(rows, lines.append)
    header = (f"eval loss on {task.stats['eval_tokens']} held-out tokens after {config.steps} steps of "
              f"{config.batch}x{config.seq} tokens; mean ± half the range of {config.seeds_text()}; "
              "* = best rate at the edge of the sweep; 'to full FT loss' = seeds that reach full FT's final "
              "loss, mean step and wall seconds; loss@fullFT s = eval loss when full FT's training seconds "
              "were spent; =fullFT st = full FT steps to the same eval loss")
    (out / f"{config.prefix}.txt").write_text("\n".join([header, *lines]) + "\n")
    for line in lines:
        log(line)
    log(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return rows


def pretrain_only(config: Config, cache: Path | None) -> None:
    torch.set_num_threads(1)
    build_task(config, Path(cache or Path(tempfile.gettempdir()) / f"chunkft-quality-bench-{config.key()}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="processes in parallel (each one torch thread)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=None, help="where the task and each run are cached")
    parser.add_argument("--tiny", action="store_true", help="the smoke test's configuration (seconds)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="1.85m",
                        help="model size and run list: 1.85m (the full sweep) or 10m (a reduced one)")
    a = parser.parse_args()
    main(TINY if a.tiny else SCALES[a.scale], out=a.out, cache=a.cache, workers=a.workers,
         log=lambda s: print(s, flush=True))
