"""One rank's training loop (train_rank): micro-batches, loss weighting, optimizer steps, memory trace.

The global batch of a step (`batches[s]`, labels `labels[s]` or the ids, -100 = ignored) is
split evenly across ranks and each rank's part into micro-batches of `micro_batch_size` rows
(gradients accumulate; one optimizer step per global batch). Each micro-batch's mean loss
(`planner.step.step_loss`) is weighted by its share of the global batch's labelled tokens and
the optimizer multiplies FSDP2's average of the ranks' gradients by W, so the gradient is the
one-process gradient of the global batch's mean loss even when ranks hold different numbers of
labelled tokens, and every backward sees one-process gradient magnitudes (what an fp16 loss
scale has to fit). With `record_grad_bytes`, `RankResult.grad_bytes` reports, per step, the
gradients each rank held after backward; with `measure_step`, that step's C-heap peak.

Memory trace (`DistConfig.trace_path`): every rank writes its own runtime.memtrace trace,
`rank_trace_path(trace_path, rank)`, atomically at each checkpoint and at the end, in the
one-GPU trace's schema; its header adds `rank` and `world_size` to `trace_header` (the CLI puts
the plan and model fingerprints, the layout, strategy and shape there). Events: the phases of
each micro-batch (forward, backward), each decoder layer's start (forward, recompute, backward:
memtrace's module hooks on the sharded layers), the optimizer phase and step, the chunk switch
and the step end. The GPU tier is what the allocator says (CUDA on this rank's device; on CPU
the C heap above a reading taken before the model was built, and each traced step runs under
planner.measure's MallocSampler, so its STEP_END `peak` is the op-level peak, the step's rise
being that peak less the step's first event); its `bytes` are this rank's accounting: weight
shards, the gradients it holds (`ShardedChunkAdamW.grad_bytes`), the optimizer state on the
step device. The HOST tier is `ShardedChunkAdamW.state_bytes()["host"]` (resting state), split
into masters and moments (a third and two thirds: the three have one shape and dtype); with
the DISK state tier, host is the staging buffers (temporaries) and the DISK tier the rank's
chunk files (`state_bytes()["disk"]`), split likewise; the files go in
`runtime.sharded_optim.rank_state_dir(config.state_dir, rank, W)`.

Known limitations: every micro-batch must hold at least one labelled token; a traced step waits
for the HOST / DISK tier's prefetch at the chunk switch (the accounting reads `state_bytes()`, which
does), so a traced step's prefetch no longer overlaps its forward, and the trace's
optimizer-state bytes are refreshed at step boundaries only.
"""

from __future__ import annotations

import torch

from runtime.dist_checkpoint import load_weights, read_checkpoint, restore_checkpoint, save_checkpoint
from runtime.dist_config import DistConfig, RankResult, check_config, labelled_tokens
from runtime.dist_model import ChunkedLossRoot, build_model, chunk_table_of, shard_model


class _RankTrace:
    """One rank's TraceWriter and the accounting behind its `bytes` (module docstring)."""

    def __init__(self, config: DistConfig, model, optimizer, rank: int, world: int,
                 cpu_baseline: int | None) -> None:
        from planner.model import find_layer_list
        from runtime.memtrace import TraceWriter, rank_trace_path

        self.optimizer = optimizer
        self.weights = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())
        self.refresh()
        header = dict(config.trace_header)
        model_fp, plan_fp = header.pop("model_fingerprint"), header.pop("plan_fingerprint")
        device = torch.device("cuda", torch.cuda.current_device()) if config.device.startswith("cuda") \
            else torch.device("cpu")
        self.writer = TraceWriter(rank_trace_path(config.trace_path, rank), device=device, accounting=self.accounting,
                                  model_fingerprint=model_fp, plan_fingerprint=plan_fp,
                                  extra_header={**header, "rank": rank, "world_size": world},
                                  cpu_baseline_bytes=cpu_baseline, max_steps=config.trace_steps)
        self.writer.attach(list(find_layer_list(model)[1]))

    def refresh(self) -> None:
        """Re-read the optimizer's state bytes (waits for a pending HOST prefetch)."""
        self.state = self.optimizer.state_bytes()

    def accounting(self):
        from planner.schema import Component, Tier

        held = self.optimizer.grad_bytes()
        dev, host = self.state["device"], self.state["host"]
        tiers = {Tier.GPU: {Component.WEIGHTS: self.weights,
                            Component.GRADIENTS: sum(held["shard"].values()) + sum(held["slice"].values()),
                            Component.MASTER: dev // 3, Component.OPTIMIZER: dev - dev // 3}}
        if host and self.state.get("disk"):  # DISK tier: the host holds staging buffers only
            tiers[Tier.HOST] = {Component.TEMPORARIES: host}
        elif host:
            tiers[Tier.HOST] = {Component.MASTER: host // 3, Component.OPTIMIZER: host - host // 3}
        disk = self.state.get("disk", 0)
        if disk:
            tiers[Tier.DISK] = {Component.MASTER: disk // 3, Component.OPTIMIZER: disk - disk // 3}
        return tiers

    def traced(self, step: int) -> bool:
        return self.writer.max_steps is None or step < self.writer.max_steps

    def event(self, kind, phase=None, *, name: str | None = None, peak: int | None = None) -> None:
        self.writer.chunk = self.optimizer.active_chunk
        self.writer.record(kind, phase=phase, name=name, peak=peak)

    def end_step(self, result, chunk_before: int, peak: int | None) -> None:
        """The optimizer step's, the chunk switch's and the step end's events (after the step)."""
        from planner.schema import EventKind, Phase

        self.refresh()
        self.event(EventKind.OPTIMIZER_STEP, name="step" if result.stepped else f"skipped ({result.skipped_because})")
        if self.optimizer.active_chunk != chunk_before:
            self.event(EventKind.CHUNK_SWITCH, Phase.CHUNK_SWITCH,
                       name=f"chunk {chunk_before} -> {self.optimizer.active_chunk}")
        self.event(EventKind.STEP_END, peak=peak)

    def close(self) -> None:
        self.writer.detach()
        self.writer.flush()


def _micro_steps(model, optimizer, config: DistConfig, step: int, rank: int, world: int, root=None,
                 trace: _RankTrace | None = None) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of `step` (the loss from `root`, a
    ChunkedLossRoot, where there is one); returns this rank's share of the global mean loss
    (the ranks' shares add up to it)."""
    from planner.schema import EventKind, Phase
    from planner.step import loop_forward

    ids_all, labels_all = config.batches[step], config.step_labels(step)
    total = labelled_tokens(labels_all)
    local = ids_all.shape[0] // world
    micro = config.micro_batch_size or local
    share = torch.zeros((), dtype=torch.float64)
    for start in range(rank * local, (rank + 1) * local, micro):
        ids = ids_all[start:start + micro].to(config.device)
        labels = labels_all[start:start + micro].to(config.device)
        count = labelled_tokens(labels)
        if trace is not None:
            trace.event(EventKind.PHASE, Phase.FORWARD)
        held = None  # the plain HF loop's output, alive through backward as in the user's loop
        loss = root(ids, labels) if root is not None else None
        if loss is None:
            loss, held = loop_forward(model, ids, labels, loop=config.loop)
        if trace is not None:
            trace.event(EventKind.PHASE, Phase.BACKWARD)
        # this micro-batch's share of the global mean; the optimizer multiplies FSDP2's average
        # of the ranks' gradients by W (grad_multiplier): their sum, the global gradient. The
        # backward then sees the one-process magnitudes (what an fp16 loss scale must fit)
        weight = count / total
        optimizer.backward(loss * weight)
        share += loss.detach().double().cpu() * (count / total)
        del loss, held
    return share


def _train_step(model, optimizer, config: DistConfig, step: int, rank: int, world: int, root=None,
                trace: _RankTrace | None = None):
    from planner.schema import EventKind, Phase

    share = _micro_steps(model, optimizer, config, step, rank, world, root, trace)
    held = optimizer.grad_bytes() if config.record_grad_bytes else None
    if trace is not None:
        trace.event(EventKind.PHASE, Phase.OPTIMIZER)
    return share, optimizer.step(), held


def _global_sum(value: torch.Tensor, device: str) -> float:
    import torch.distributed as dist

    out = value.detach().to(device=device, dtype=torch.float64 if device == "cpu" else torch.float32)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return float(out)


def train_rank(config: DistConfig) -> RankResult:
    """Train on this rank (process group already initialised)."""
    import torch.distributed as dist

    from planner.measure import measure_malloc_peak
    from planner.schema import Tier
    from runtime.scaler import LossScaler
    from runtime.sharded_optim import ShardedChunkAdamW

    rank, world = dist.get_rank(), dist.get_world_size()
    check_config(config, world)  # deterministic: every rank raises the same error, or none does
    saved = read_checkpoint(config.resume_from) if config.resume_from else None  # fail before building
    steps = config.batches.shape[0]
    cpu_baseline = None
    if config.trace_path is not None and not config.device.startswith("cuda"):
        from planner.measure import malloc_in_use_bytes

        cpu_baseline = malloc_in_use_bytes()  # the trace's zero: everything the rank adds from here counts
    model = build_model(config)
    table = chunk_table_of(config, model)
    root = ChunkedLossRoot(model, config.loss_chunk_tokens) if config.loss_chunk_tokens > 0 else None
    shard_model(model, shard_embeddings=config.shard_embeddings, root=root)
    if config.init_from and not config.resume_from:
        load_weights(model, config.init_from)
    scaler = LossScaler(config.loss_scaler) if config.dtype == "fp16" else None
    optimizer = ShardedChunkAdamW(model, table, config=config.adamw, schedule=config.schedule,
                                  update_interval=config.update_interval, state_tier=Tier(config.state_tier),
                                  prefetch_depth=config.prefetch_depth, scaler=scaler, grad_multiplier=world,
                                  state_dir=config.state_dir)
    trace = None
    try:
        start = 0 if saved is None else restore_checkpoint(model, optimizer, config.resume_from, saved, scaler=scaler)
        # the command line's hyper-parameters and schedule (resume checked them against run.json)
        optimizer.config, optimizer.schedule = config.adamw, config.schedule
        if config.trace_path is not None:
            trace = _RankTrace(config, model, optimizer, rank, world, cpu_baseline)
        losses, norms, held = [], [], []
        skipped = 0
        peak = baseline = None
        samples: tuple = ()
        end = steps if config.stop_after is None else min(steps, config.stop_after)
        for step in range(start, end):
            traced = trace if trace is not None and trace.traced(step) else None
            chunk_before = optimizer.active_chunk
            step_peak = None  # the trace's STEP_END peak (CPU: the sampled op-level peak)
            if trace is not None:  # past trace_steps too: the layer hooks then record nothing
                trace.writer.step = step
            if step == config.measure_step or (traced is not None and cpu_baseline is not None):
                optimizer.zero_grad()
                out: list = []
                m = measure_malloc_peak(
                    lambda: out.append(_train_step(model, optimizer, config, step, rank, world, root, traced)),
                    record_samples=config.record_samples and step == config.measure_step)
                if step == config.measure_step:
                    peak, baseline, samples = m.peak_bytes, m.baseline_bytes, m.samples
                if traced is not None:
                    step_peak = m.peak_bytes + m.baseline_bytes - traced.writer.cpu_baseline_bytes
                share, result, grads = out[0]
            else:
                share, result, grads = _train_step(model, optimizer, config, step, rank, world, root, traced)
            if traced is not None:
                traced.end_step(result, chunk_before, step_peak)
            if grads is not None:
                held.append(grads)
            skipped += not result.stepped
            norms.append(result.grad_norm)
            for at, directory in config.save_at:
                if at == step + 1:
                    save_checkpoint(model, optimizer, directory, step=step + 1, scaler=scaler)
                    if trace is not None:
                        trace.writer.flush()
            losses.append(_global_sum(share, config.device))
        if config.out_dir is not None:
            save_checkpoint(model, optimizer, config.out_dir, step=end, scaler=scaler)
        state_bytes = optimizer.state_bytes()
        if trace is not None:
            trace.close()
    finally:
        optimizer.close()
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return RankResult(rank=rank, world_size=world, losses=tuple(losses), start_step=start, grad_norms=tuple(norms),
                      skipped_steps=skipped,
                      peak_bytes=peak, baseline_bytes=baseline, local_param_bytes=local_bytes,
                      state_bytes=state_bytes, samples=samples, grad_bytes=tuple(held))
