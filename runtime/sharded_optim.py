"""ShardedChunkAdamW: ChunkFT's exact chunked AdamW on FSDP2-sharded parameters.

The model is sharded with FSDP2 (`fully_shard`): every parameter is a DTensor split along dim 0
across the W ranks, ceil(rows / W) rows per rank (the last ranks may hold fewer real rows, or
none: FSDP2 pads dim 0 to a multiple of W and `to_local()` returns the real rows only; a 1-D
tensor's rows are its elements). One chunk of a `planner.chunks.ChunkTable` is active at a time:

- Gradients. The active chunk's GradSpec is installed with `runtime.subgrad.install`, as
  ChunkAdamW does. A whole-tensor span's parameter gets requires_grad=True: FSDP2 computes its
  gradient and reduce-scatters it (averaged over ranks) to each rank's dim-0 shard. A sliced
  span (a tensor that straddles a chunk cut) keeps requires_grad=False, so FSDP2 neither
  computes nor reduces a gradient for it (no dense gradient exists, on any rank); subgrad's
  forward hook on its nn.Linear / nn.Embedding owner adds just the slice's gradient, computed
  in backward from the saved input (x or the ids) and grad_output, to a buffer shaped like the
  full (unsharded) slice, accumulated over the rank's micro-batches. FSDP2's hooks do not
  disturb this: its pre-forward hook is prepended, so subgrad's hook runs after the unshard
  (or after the post-forward reshard of a unit that is the owner itself); the rule reads the
  module's parameter only for its dtype and global shape, which a resharded DTensor keeps.
  At step time each rank all_reduces (SUM) every sliced span's buffer in table order and
  reads its local rows of the result. Every other parameter: requires_grad=False, nothing.
  Fallback: a sliced span whose subgrad rule would recompute its module in backward with
  functional_call (a 1-D norm weight; `subgrad.recomputes_in_backward`) would meet FSDP2's
  resharded (DTensor) parameter there, so it gets its whole gradient (FSDP2's path; 1-D,
  hidden_size elements) and the step reads the span's part. `sub_tensor[k]` names chunk k's
  sub-tensor spans; `grad_bytes()` reports the gradients a rank holds.
- State. For every span of every chunk, only the part inside this rank's shard: a dim-0 span
  (or a 1-D tensor's element range) intersected with the shard's rows, a dim-1 span as all local
  rows x the span's columns (`local_span`). An fp32 master (float64 for a float64 model, as
  ChunkAdamW) and the two AdamW moments of that local slice; a rank may hold an empty slice (no
  state). All of it is created when the optimizer is, from the weights at that moment.
- Step. ChunkAdamW's arithmetic line for line (decoupled weight decay, bias correction with one
  step count per span, LR = config.lr x `LRSchedule.factor(successful steps so far)`); clipping
  by the global L2 norm of the active spans' gradients: each rank sums the squares of its local
  span slices (never the rest of a touched tensor, never padding) and one all_reduce adds them.
  The master is written back into the local shard (cast to the parameter dtype) and every
  gradient is dropped. `grad_multiplier` scales every gradient read, as the ranks' average:
  FSDP2's reduce-scatter averages, a slice's all_reduce sums and the step divides it by W
  (runtime.distributed passes W, turning the average of token-share-weighted gradients into
  their sum: a sliced span's factor is then W / W = 1 exactly). After
  `update_interval` successful steps the next chunk (cyclically) becomes active. The step's
  temporaries are one span slice's at a time, as ChunkAdamW's: its gradient cast to fp32 (none
  for fp32, which is scaled in place) and AdamW's `exp_avg_sq.sqrt()` and its quotient.
- fp16. A `runtime.scaler.LossScaler` scales the loss (`backward`); the step checks its local
  span slices for inf/nan -- of the reduce-scattered shards and of the all_reduced slices (each
  row by the rank that owns it) -- and all_reduces the flag (MAX), so every rank skips the same
  steps and backs off the same scale. The check runs on the reduced gradients, not as each
  gradient is produced (FSDP2 produces them inside its own reduce-scatter). Clipping likewise
  sums the squares of every rank's local rows of both kinds, each row once.
- Memory of a sliced span's gradient, per rank (what planner.sharding models):
  * created during the backward of the step's first micro-batch, when the span's owner module
    runs its backward (runtime.subgrad: the first contribution becomes the buffer);
  * shape: the whole span, unsharded -- dim 0 rows [s, e) of an (R, C) weight: (e - s) x C;
    dim 1 columns: R x (e - s); a bias: e - s -- plus one row for an nn.Embedding owner
    (storage (e - s + 1) x C, or (R + 1) x (e - s): the dummy row subgrad's index_add sends
    other tokens to); dtype: the parameter's (training) dtype, as ChunkAdamW's;
  * every later micro-batch computes its contribution (one more slice-sized tensor in that
    dtype, plus the rule's own operands: grad_output's span columns / the input's span columns
    for a Linear, an int64 index over the tokens for an Embedding) and adds it in place; the
    contribution is freed as soon as it is added;
  * at step(): a 4-byte-per-span flag all_reduce (MAX: which spans got a gradient on any rank),
    then each buffer all_reduced (SUM) in place, one span after another (NCCL: no temporary;
    gloo stages through its own buffers); a rank whose micro-batches gave a span nothing joins
    with a zero buffer of the same size (never for a causal LM's modules). Then, one span at a
    time, the local rows' fp32 cast for bf16 / fp16 (none for fp32) for clipping and for the
    AdamW update, as for any span;
  * freed at the end of step() (or of a skipped fp16 step): the handle's table is emptied.
  The chunk tables planner.chunks makes slice at most two spans per chunk (its first and
  last), so a rank holds at most two such buffers, each at most one chunk's bytes (+ one row).
  No whole-tensor gradient of the parameter exists: neither the unsharded one during backward
  nor its reduce-scattered shard. Communication: one all_reduce of each sliced span per step
  (ring: 2 (W - 1) / W x slice bytes sent per rank) instead of the tensor's reduce-scatter.
- Tiers. GPU: every chunk's state on the step device. HOST: every chunk's state rests in host
  memory, one flat buffer per chunk (`FlatLayout`: its master and moments back to back),
  allocated as plain memory (torch.empty: no CachingHostAllocator, so no power-of-two rounding
  per tensor) and page-locked in place with cudaHostRegister (torch.cuda.cudart()) when CUDA is
  there; the active chunk's state is a working copy on the step device (also on a CPU run,
  where it is a separate clone: the memory layout of a GPU run, like ChunkAdamW's
  host_state_in_place=False), written back into its buffer when the chunk is switched out.
  DISK: every chunk's state in one raw file per chunk in this rank's directory
  (`rank_state_dir(state_dir, rank, W)`: ranks never share a file), written atomically from a
  flat staging buffer, its crc32 checked when read back; the rank holds one staging buffer of
  its largest chunk state (two with prefetch: the background load and the switch's write never
  share one) and the same device working copies as HOST. With prefetch_depth >= 1 a background
  thread (on a side CUDA stream where there is one) copies the next chunk's state to the device
  while the current chunk trains (HOST and DISK).

`state_dict()` / `load_state_dict()` are this rank's state (local slices plus counters);
`save_state_file` / `read_state_file` put them in one safetensors file per rank with a crc32 of
the tensor bytes, checked when read.

Known limitations:
- Only FSDP2's default layout is understood: DTensors with the single placement Shard(0) on a
  1-D mesh (or plain tensors: one process, no sharding); 0-dim parameters are refused.
- A sliced 1-D parameter of a module other than nn.Linear / nn.Embedding (a norm weight) gets
  its whole gradient (hidden_size elements, reduce-scattered by FSDP2), not a sub-tensor one.
- A sliced span's buffer is the whole unsharded slice on every rank and is all_reduced, not
  reduce-scattered: each rank reads only its local rows of it (simple, and at most two spans
  per chunk; a reduce-scatter to the span's row owners would hold less after the reduction).
- subgrad's limitations apply to sliced spans (owners must be nn.Linear / nn.Embedding or 1-D;
  only uses inside the owner's forward are seen). Tied weights under FSDP2 are untested.
- Prefetch depth beyond 1 behaves as 1; eviction is synchronous (as ChunkAdamW).
- The non-finite check (every dtype: fp16 skips and backs its scale off, bf16/fp32 skip;
  runtime.guard) reads each span's reduced gradient once after backward (one extra pass over
  the active spans' gradient bytes), not NVMSA's on-the-fly check; the ranks agree on it.
- The CUDA paths (cudaHostRegister'ed buffers, the side stream) are written for CUDA but tested on
  CPU. DISK files are scratch space (no fsync); a checkpoint (`save_state_file`) is what survives.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from planner.chunks import ChunkSpan, ChunkTable
from planner.errors import ChunkftError
from planner.fsio import atomic_path, atomic_write_json
from planner.schema import Tier
from runtime.chunk_optim import OWNER, AdamWConfig, LRSchedule, StepResult, next_chunk, step_view
from runtime.disk_store import describe_os_error
from runtime.guard import DEFAULT_MAX_NONFINITE_STEPS, SkipGuard, nonfinite_flag
from runtime.scaler import LossScaler
from runtime.subgrad import SubgradHandle, install, recomputes_in_backward

STATE_VERSION = 1
_KINDS = ("master", "exp_avg", "exp_avg_sq")
_META_KEY = "chunkft_sharded_optimizer"
_CRC_KEY = "tensors_crc32"


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalSpan:
    """The part of a chunk span inside this rank's dim-0 shard, in local coordinates:
    `param.to_local().narrow(dim, start, length)`; `length == 0` means this rank holds none."""

    param: str
    dim: int
    start: int
    length: int


def shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """(global row offset, real rows) of this rank's dim-0 shard of parameter `p`: FSDP2 gives
    rank r the rows [r * ceil(rows / W), ...) that exist (torch.chunk's split)."""
    from torch.distributed.tensor import DTensor, Shard

    if p.dim() == 0:
        raise ChunkftError("a 0-dim parameter cannot be sharded along dim 0; sharded ChunkFT needs >= 1-dim parameters")
    if not isinstance(p, DTensor):
        return 0, p.shape[0]
    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ChunkftError(f"parameter placement {p.placements} is not FSDP2's (Shard(0),) on a 1-D mesh")
    world, rank, rows = p.device_mesh.size(), p.device_mesh.get_local_rank(), p.shape[0]
    per = -(-rows // world)
    offset = min(rank * per, rows)
    local = p.to_local().shape[0]
    assert local == min(per, rows - offset), (tuple(p.shape), rank, world, local)
    return offset, local


def local_span(span: ChunkSpan, offset: int, rows: int) -> LocalSpan:
    """`span` cut to the local rows [offset, offset + rows) of its parameter."""
    if span.dim == 0:
        lo, hi = max(span.start, offset), min(span.end, offset + rows)
        return LocalSpan(param=span.param, dim=0, start=lo - offset if hi > lo else 0, length=max(hi - lo, 0))
    return LocalSpan(param=span.param, dim=span.dim, start=span.start, length=(span.end - span.start) if rows else 0)


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


@dataclass(frozen=True, kw_only=True, slots=True)
class FlatLayout:
    """Where each state tensor of one chunk lives inside the chunk's one flat buffer: keys in
    order ("<param>/master", "/exp_avg", "/exp_avg_sq" per local span slice), shapes, element
    offsets; every tensor of a chunk has the master dtype."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{key: view into `flat`} (`flat` holds at least `numel` elements of `dtype`)."""
        out = {}
        for key, shape, offset in zip(self.keys, self.shapes, self.offsets):
            n = 1
            for d in shape:
                n *= d
            out[key] = flat.narrow(0, offset, n).view(shape)
        return out


def _flat_buffer(numel: int, dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, bool]:
    """(one flat host tensor, registered): plain memory (torch.empty, no CachingHostAllocator and
    so no power-of-two rounding); with CUDA, page-locked in place with cudaHostRegister."""
    flat = torch.empty(max(numel, 1), dtype=dtype)
    if not pin:
        return flat, False
    nbytes = flat.numel() * flat.element_size()
    code = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), nbytes, 1)  # cudaHostRegisterPortable
    if int(code) != 0:
        raise ChunkftError(f"cudaHostRegister of {nbytes:,} bytes of host memory failed (cudaError {int(code)}); "
                           "the node may lack the locked-memory limit (ulimit -l) or the RAM for it")
    return flat, True


def _unregister(flat: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())


class _HostStore:
    """HOST tier: every chunk's state resting in one flat host buffer per chunk (plain memory,
    page-locked with cudaHostRegister on CUDA: `_flat_buffer`); a switch writes the working copy
    back into the chunk's buffer in place."""

    def __init__(self, layouts: list[FlatLayout]) -> None:
        self.layouts = layouts
        self._pin = torch.cuda.is_available()
        self.flat: dict[int, torch.Tensor] = {}
        self._registered: list[torch.Tensor] = []

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Chunk k's resting tensors (views into its flat buffer)."""
        return self.layouts[k].views(self.flat[k])

    def put(self, k: int, state: dict[str, torch.Tensor]) -> None:
        if k not in self.flat:
            self.flat[k], registered = _flat_buffer(self.layouts[k].numel, self.layouts[k].dtype, self._pin)
            if registered:
                self._registered.append(self.flat[k])
        views = self.state(k)
        for n, t in state.items():
            views[n].copy_(t)

    def get(self, k: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {n: t.to(device, non_blocking=self._pin, copy=True) for n, t in self.state(k).items()}

    def nbytes(self) -> int:
        return sum(self.layouts[k].nbytes for k in self.flat)

    def close(self) -> None:
        for flat in self._registered:
            _unregister(flat)
        self._registered.clear()


class _DiskStore:
    """DISK tier: every chunk's state in one raw file per chunk under this rank's directory
    (`rank_state_dir`), written atomically (a temporary file renamed over the old one) from a
    flat host staging buffer, its crc32 kept and checked when read back (a file this store did
    not write is never read). The directory is this rank's scratch space: stale chunk files and
    interrupted writes are deleted when the store opens it, and OWNER.json names the run and
    process that own it (runtime.chunk_optim's DISK tier does the same).

    Staging: one flat buffer of the rank's largest chunk state for loads and, with prefetch
    (loads on the background thread while a switch writes the old chunk), a second one for
    writes; plain memory page-locked with cudaHostRegister on CUDA."""

    def __init__(self, layouts: list[FlatLayout], directory: Path, *, run_id: str | None, rank: int,
                 world_size: int, buffers: int) -> None:
        self.layouts = layouts
        self.dir = directory
        self._crc: dict[int, int] = {}
        pin = torch.cuda.is_available()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in [*self.dir.glob("chunk*.bin"), *self.dir.glob(".*.tmp")]:
                stale.unlink()
            atomic_write_json(self.dir / OWNER, {"run_id": run_id, "pid": os.getpid(), "rank": rank,
                                                 "world_size": world_size})
        except OSError as e:
            raise ChunkftError(f"cannot prepare state directory {str(self.dir)!r}: {describe_os_error(e)}") from None
        largest = max((lay.numel for lay in layouts), default=0)
        dtype = layouts[0].dtype if layouts else torch.float32
        made = [_flat_buffer(largest, dtype, pin) for _ in range(buffers)]
        self.staging = [flat for flat, _ in made]
        self._registered = [flat for flat, registered in made if registered]

    def path(self, k: int) -> Path:
        return self.dir / f"chunk{k:05d}.bin"

    def _bytes(self, flat: torch.Tensor, k: int) -> memoryview:
        return memoryview(flat.view(torch.uint8).numpy())[:self.layouts[k].nbytes]

    def put(self, k: int, state: dict[str, torch.Tensor]) -> None:
        staging = self.staging[-1]  # the write buffer (the only one without prefetch)
        views = self.layouts[k].views(staging)
        for n, t in state.items():
            views[n].copy_(t)
        data = self._bytes(staging, k)
        path = self.path(k)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            raise ChunkftError(f"disk tier: cannot write {str(path)!r}: {describe_os_error(e)}") from None
        self._crc[k] = zlib.crc32(data)

    def read(self, k: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Chunk k's file into `flat` (checked); views of its tensors there."""
        path, want = self.path(k), self._crc.get(k)
        if want is None:
            raise ChunkftError(f"disk tier: chunk {k}'s state was never written by this run ({str(path)!r})")
        data = self._bytes(flat, k)
        try:
            with open(path, "rb") as f:
                got = f.readinto(data)
        except OSError as e:
            raise ChunkftError(f"disk tier: cannot read {str(path)!r}: {describe_os_error(e)}") from None
        if got != len(data):
            raise ChunkftError(f"disk tier: {str(path)!r} is truncated: {got} of {len(data)} bytes")
        crc = zlib.crc32(data)
        if crc != want:
            raise ChunkftError(f"disk tier: checksum mismatch in {str(path)!r}: the file changed since it was "
                               f"written (crc32 {crc:08x}, wrote {want:08x})")
        return self.layouts[k].views(flat)

    def get(self, k: int, device: torch.device) -> dict[str, torch.Tensor]:
        # synchronous copies: the staging buffer is rewritten by the next read or write, and the
        # file read dominates the transfer anyway
        return {n: t.to(device, copy=True) for n, t in self.read(k, self.staging[0]).items()}

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Chunk k's tensors as fresh CPU copies (checkpoints)."""
        flat = torch.empty(max(self.layouts[k].numel, 1), dtype=self.layouts[k].dtype)
        return self.read(k, flat)

    def nbytes(self) -> int:
        """Bytes of this rank's chunk files."""
        return sum(self.layouts[k].nbytes for k in self._crc)

    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.staging)

    def close(self) -> None:
        for flat in self._registered:
            _unregister(flat)
        self._registered.clear()


def rank_state_dir(state_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The DISK tier's directory of one rank under a run's state directory."""
    return Path(state_dir) / f"rank{rank}-of-{world_size}"


class ShardedChunkAdamW:
    """Exact AdamW over a ChunkTable on FSDP2-sharded parameters (see the module docstring).

    Args:
        model: the model, already `fully_shard`ed (or plain: one process); weights final (the
            masters are copied from them here).
        table: the chunk table over the model's (global) parameter shapes.
        config / schedule: AdamW hyper-parameters (incl. max_grad_norm) and the LR schedule.
        update_interval: successful steps on a chunk before the next one becomes active.
        state_tier: Tier.GPU, Tier.HOST or Tier.DISK (where resting chunks' state lives).
        prefetch_depth: HOST / DISK: 0 loads the next chunk's state at the switch, >= 1 before.
        state_dir: DISK only: the run's state directory; this rank's files go in its
            `rank_state_dir` (created; stale chunk files there are deleted).
        run_id: written into the rank directory's OWNER.json (DISK).
        scaler: a LossScaler for fp16 (None for bf16 / fp32).
        group: the process group of the clipping and overflow all_reduces (default: world).
        grad_multiplier: every gradient is multiplied by this before use (runtime.distributed
            passes W: its losses are weighted by token shares, so the ranks' gradients must be
            summed, and FSDP2 averages them).
    """

    def __init__(self, model: nn.Module, table: ChunkTable, *, config: AdamWConfig | None = None,
                 schedule: LRSchedule | None = None, update_interval: int = 1, state_tier: Tier | str = Tier.GPU,
                 prefetch_depth: int = 1, scaler: LossScaler | None = None, group=None,
                 grad_multiplier: float = 1.0, max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS,
                 state_dir: str | os.PathLike | None = None, run_id: str | None = None):
        if update_interval < 1:
            raise ChunkftError(f"update_interval must be >= 1, got {update_interval}")
        if prefetch_depth < 0:
            raise ChunkftError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
        try:
            tier = Tier(state_tier)
        except ValueError:
            tier = None
        if tier not in (Tier.GPU, Tier.HOST, Tier.DISK):
            raise ChunkftError(f"state tier {getattr(state_tier, 'value', state_tier)!r} is not supported for sharded "
                               f"runs; valid: gpu, host, disk")
        if tier == Tier.DISK and state_dir is None:
            raise ChunkftError("the disk state tier needs a state directory (state_dir)")
        self._params = dict(model.named_parameters())
        table.validate([(n, tuple(p.shape), p.element_size()) for n, p in self._params.items()])
        self.model, self.table = model, table
        self.config = config or AdamWConfig()
        self.schedule = schedule or LRSchedule()
        self.update_interval = update_interval
        self.tier = tier
        self.scaler = scaler
        self.guard = SkipGuard(max_nonfinite_steps)
        self.group = group
        self.grad_multiplier = grad_multiplier
        self.device = _local(next(iter(self._params.values()))).device
        self._rows = {n: shard_rows(p) for n, p in self._params.items()}
        self.local_spans: tuple[tuple[LocalSpan, ...], ...] = tuple(
            tuple(local_span(s, *self._rows[s.param]) for s in chunk) for chunk in table.chunks)
        # per chunk: the sliced spans' parameters that get sub-tensor gradients (runtime.subgrad);
        # a slice whose rule recomputes its module in backward gets its whole gradient instead
        self.sub_tensor: tuple[frozenset[str], ...] = tuple(
            frozenset(s.param for s in chunk if not table.is_whole(s) and not recomputes_in_backward(model, s.param))
            for chunk in table.chunks)
        self._handle: SubgradHandle | None = None
        self.global_step = 0
        self.active_steps = 0
        self.span_steps: dict[int, dict[str, int]] = {k: {} for k in range(table.num_chunks)}
        self.active_chunk = 0
        self._resting: dict[int, dict[str, torch.Tensor]] = {}  # GPU tier: every chunk's state
        self.layouts = [self._layout(k) for k in range(table.num_chunks)]
        self._prefetch = tier != Tier.GPU and prefetch_depth >= 1 and table.num_chunks > 1
        self._host: _HostStore | _DiskStore | None = None
        if tier == Tier.HOST:
            self._host = _HostStore(self.layouts)
        elif tier == Tier.DISK:
            self._host = _DiskStore(self.layouts, rank_state_dir(state_dir, self._rank(), self._world_size()),
                                    run_id=run_id, rank=self._rank(), world_size=self._world_size(),
                                    buffers=2 if self._prefetch else 1)
        for k in range(table.num_chunks):
            fresh = self._fresh_state(k)
            if self._host is None:
                self._resting[k] = fresh
            else:
                self._host.put(k, fresh)
                del fresh
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1) if self._prefetch else None
        self._stream = torch.cuda.Stream(self.device) if self._prefetch and self.device.type == "cuda" else None
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._activate(0)

    # -- public API ---------------------------------------------------------------------

    def lr(self) -> float:
        """The learning rate the next successful step will use."""
        return self.config.lr * self.schedule.factor(self.global_step)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled by the loss scaler when there is one."""
        (self.scaler.scale_loss(loss) if self.scaler is not None else loss).backward()

    def zero_grad(self) -> None:
        """Drop every gradient: the shards' (FSDP2's) and the sub-tensor slice buffers."""
        for p in self._params.values():
            p.grad = None
        if self._handle is not None:
            self._handle.zero_grad()

    def grad_spec(self, k: int) -> dict:
        """The GradSpec chunk k installs: SliceSpec for its `sub_tensor` spans, True for its
        other spans (whole tensors, and slices whose rule would recompute in backward), False
        for every other parameter."""
        spec = dict.fromkeys(self._params, False)
        for span in self.table.chunks[k]:
            spec[span.param] = span.slice_spec() if span.param in self.sub_tensor[k] else True
        return spec

    def grad_bytes(self) -> dict[str, dict[str, int]]:
        """The gradients this rank holds now, in bytes by parameter: "shard" (a parameter's
        local `.grad`, FSDP2's reduce-scattered shard) and "slice" (a sub-tensor gradient
        buffer's storage), plus "requires_grad" (1 for each parameter that has it): what the
        tests check to see that no dense gradient exists for a sliced parameter."""
        shard = {n: _local(p.grad).numel() * p.grad.element_size()
                 for n, p in self._params.items() if p.grad is not None}
        slices = {n: g.untyped_storage().nbytes() for n, g in self._handle.grads().items()
                  if n in self.sub_tensor[self.active_chunk]}
        return {"shard": shard, "slice": slices,
                "requires_grad": {n: 1 for n, p in self._params.items() if p.requires_grad}}

    def step(self) -> StepResult:
        """One AdamW step on the active chunk's spans (local slices), then drop the gradients;
        every rank must call it (the slice reductions, clipping and the fp16 check are
        collectives)."""
        k = self.active_chunk
        lr = self.lr()
        scale = self.scaler.scale if self.scaler is not None else None
        reduced = self._reduce_slices(k)  # sub-tensor spans: full slices, summed over ranks
        live = [(span, ls) for span, ls in zip(self.table.chunks[k], self.local_spans[k])
                if (span.param in reduced if span.param in self.sub_tensor[k]
                    else self._params[span.param].grad is not None)]
        slices = {ls.param: self._grad_slice(span, ls, reduced) for span, ls in live if ls.length}
        # what the step consumes, on every rank: a rank's inf skips the step everywhere
        bad = nonfinite_flag(slices.values(), self.device).float()
        if self._all_reduce(bad, "MAX") > 0:
            self.zero_grad()
            if self.scaler is not None:
                self.scaler.update(True)
            why = "inf/nan in an accumulated gradient" + (" (fp16 overflow)" if self.scaler is not None else "")
            self.guard.skipped(why)
            return StepResult(stepped=False, chunk=k, lr=lr, grad_norm=None, switched_to=None, loss_scale=scale,
                              skipped_because=why)
        # FSDP2's reduce-scatter averages over the ranks; a slice's all_reduce sums, so it is
        # divided by W here: both are then multiplied by grad_multiplier (W / W = 1 exactly)
        unscale = 1.0 / scale if scale is not None else 1.0
        factor = {n: unscale * (self.grad_multiplier / self._world_size() if n in reduced else self.grad_multiplier)
                  for n in slices}
        coef, grad_norm = None, None
        if self.config.max_grad_norm is not None:  # every rank joins the all_reduce, spans or not
            dtype = self._master_dtype(next(iter(self._params.values())))
            # one span's cast at a time, as ChunkAdamW: no chunk-sized copy. This rank's norm is
            # the norm of its per-span norms (ChunkAdamW's and clip_grad_norm_'s arithmetic), and
            # the ranks sum its square: sqrt(x * x) == x in binary floating point, so one rank
            # clips bit for bit as ChunkAdamW does.
            norms = [torch.linalg.vector_norm(g.to(dtype), 2) * factor[n] for n, g in slices.items()]
            local = (torch.linalg.vector_norm(torch.stack(norms), 2) if norms
                     else torch.zeros((), dtype=dtype, device=self.device))
            total = torch.sqrt(torch.as_tensor(self._all_reduce(local * local, "SUM"), dtype=dtype,
                                               device=self.device))
            coef = torch.clamp(self.config.max_grad_norm / (total + 1e-6), max=1.0)
            grad_norm = float(total)
        for span, ls in live:
            step = self.span_steps[k].get(span.param, 0) + 1
            self.span_steps[k][span.param] = step
            if ls.length:
                g = self._grad32(slices.pop(span.param), factor[span.param])
                if coef is not None:
                    g.mul_(coef)
                self._adamw(ls, g, lr, step)
                del g
        del reduced
        self.zero_grad()
        if self.scaler is not None:
            self.scaler.update(False)
        self.guard.stepped()
        self.global_step += 1
        self.active_steps, switched = next_chunk(k, self.active_steps + 1, self.update_interval, self.table.num_chunks)
        if switched is not None:
            self._evict()
            self._activate(switched)
        return StepResult(stepped=True, chunk=k, lr=lr, grad_norm=grad_norm, switched_to=switched, loss_scale=scale)

    def state_bytes(self) -> dict[str, int]:
        """This rank's optimizer-state bytes: "device" (the GPU tier's state, or the active
        chunk's working copy and a prefetched one), "host" (the HOST tier's flat buffers, or the
        DISK tier's staging buffers) and "disk" (the DISK tier's chunk files)."""
        def nbytes(states) -> int:
            return sum(t.numel() * t.element_size() for s in states for t in s.values())

        if self._host is None:
            return {"device": nbytes(self._resting.values()), "host": 0, "disk": 0}
        pending = [self._pending[1].result()] if self._pending is not None else []
        device = nbytes([self._state, *pending])
        if isinstance(self._host, _DiskStore):
            return {"device": device, "host": self._host.staging_bytes(), "disk": self._host.nbytes()}
        return {"device": device, "host": self._host.nbytes(), "disk": 0}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): this rank's local state as CPU tensors "chunk<k>/<param>/<kind>" and a
        JSON-able dict of counters, hyper-parameters, the chunk table and the world size."""
        self._wait_prefetch()
        tensors: dict[str, torch.Tensor] = {}
        for k in range(self.table.num_chunks):
            if k == self.active_chunk:
                state = self._state
            else:
                state = self._resting[k] if self._host is None else self._host.state(k)
            for key, t in state.items():
                tensors[f"chunk{k}/{key}"] = t.detach().to("cpu", copy=True)
        meta = {
            "version": STATE_VERSION,
            "world_size": self._world_size(),
            "rank": self._rank(),
            "active_chunk": self.active_chunk,
            "active_steps": self.active_steps,
            "global_step": self.global_step,
            "span_steps": {str(k): dict(v) for k, v in self.span_steps.items()},
            "update_interval": self.update_interval,
            "config": asdict(self.config),
            "schedule": asdict(self.schedule),
            "table": self.table.to_json(),
        }
        return tensors, meta

    def check_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """ChunkftError (one line) unless `state_dict()`'s output fits this optimizer exactly:
        same version, world size, rank, chunk table, and every local slice's tensors present
        with the right shape and dtype (nothing else)."""
        try:
            if meta.get("version") != STATE_VERSION:
                raise ChunkftError(f"optimizer state version {meta.get('version')!r} is not {STATE_VERSION}")
            if int(meta["world_size"]) != self._world_size():
                raise ChunkftError(f"optimizer state was saved by {meta['world_size']} ranks; this run has "
                                   f"{self._world_size()} (resuming with another world size is not supported)")
            if int(meta["rank"]) != self._rank():
                raise ChunkftError(f"optimizer state is rank {meta['rank']}'s, not rank {self._rank()}'s")
            if ChunkTable.from_json(meta["table"]) != self.table:
                raise ChunkftError("optimizer state was saved with a different chunk table")
            span_steps = meta["span_steps"]
            if set(span_steps) != {str(k) for k in range(self.table.num_chunks)}:
                raise ChunkftError("optimizer state's step counts do not match the chunk table's chunks")
            if not 0 <= int(meta["active_chunk"]) < self.table.num_chunks:
                raise ChunkftError(f"optimizer state's active chunk {meta['active_chunk']} does not exist")
            _parse_meta(meta)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ChunkftError(f"optimizer state is malformed ({type(e).__name__}: {e})") from None
        expected = {}
        for k, chunk in enumerate(self.local_spans):
            for ls in chunk:
                if ls.length:
                    view = self._view(ls)
                    for kind in _KINDS:
                        expected[f"chunk{k}/{ls.param}/{kind}"] = (tuple(view.shape), self._master_dtype(view))
        got = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
        if got != expected:
            diff = sorted(key for key in set(got) | set(expected) if got.get(key) != expected.get(key))
            raise ChunkftError(f"optimizer state does not match this rank's shards: {len(diff)} tensors differ, "
                               f"e.g. {diff[0]!r} (saved {got.get(diff[0])}, expected {expected.get(diff[0])})")

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore `state_dict()`'s output (checked first; the weights are the caller's)."""
        self.check_state(tensors, meta)
        self.config, self.schedule, self.update_interval, span_steps, counters = _parse_meta(meta)
        self._wait_prefetch()
        self._pending = None
        self._state = {}
        by_chunk: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            head, _, rest = key.partition("/")
            by_chunk.setdefault(int(head[len("chunk"):]), {})[rest] = t
        for k, state in by_chunk.items():
            if self._host is None:
                for rest, t in state.items():
                    self._resting[k][rest].copy_(t)
            else:
                self._host.put(k, state)
        self.span_steps = span_steps
        self.global_step, self.active_steps, active = counters
        self._activate(active)

    def close(self) -> None:
        """Remove the sub-tensor gradient hooks (every parameter's requires_grad as it was before
        this optimizer) and stop the prefetch thread."""
        self._wait_prefetch()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._host is not None:
            self._host.close()

    # -- internals ----------------------------------------------------------------------

    def _world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def _all_reduce(self, value: torch.Tensor, op: str) -> float:
        import torch.distributed as dist

        if not dist.is_initialized():
            return float(value)
        out = value.detach().clone()
        dist.all_reduce(out, op=getattr(dist.ReduceOp, op), group=self.group)
        return float(out)

    @staticmethod
    def _master_dtype(p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _view(self, ls: LocalSpan) -> torch.Tensor:
        """The local slice of the parameter (a view into its shard)."""
        with torch.no_grad():
            return _local(self._params[ls.param].detach()).narrow(ls.dim, ls.start, ls.length)

    def _reduce_slices(self, k: int) -> dict[str, torch.Tensor]:
        """{param: the full slice gradient summed over the ranks} for chunk k's sub-tensor spans
        that received a gradient on any rank: each rank's accumulated buffer (runtime.subgrad's,
        in the parameter dtype), all_reduced (SUM) in place, in table order on every rank. A
        rank whose micro-batches gave none joins with zeros."""
        import torch.distributed as dist

        names = [s.param for s in self.table.chunks[k] if s.param in self.sub_tensor[k]]
        if not names:
            return {}
        grads = self._handle.grads()
        if not dist.is_initialized():
            return {n: grads[n] for n in names if n in grads}
        have = torch.tensor([float(n in grads) for n in names], device=self.device)
        dist.all_reduce(have, op=dist.ReduceOp.MAX, group=self.group)
        out = {}
        for n, h in zip(names, have.tolist()):
            if not h:
                continue
            g = grads.get(n)
            if g is None:
                spec = self._handle.spec[n]
                p = self._params[n]
                shape = list(p.shape)
                shape[spec.dim] = spec.end - spec.start
                g = torch.zeros(shape, dtype=p.dtype, device=self.device)
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.group)
            out[n] = g
        return out

    def _grad_slice(self, span: ChunkSpan, ls: LocalSpan, reduced: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's local rows of the span's gradient: of the parameter's shard gradient (whole
        gradients) or of the reduced full slice (sub-tensor spans)."""
        if span.param not in reduced:
            return _local(self._params[ls.param].grad).narrow(ls.dim, ls.start, ls.length)
        offset, rows = self._rows[span.param]
        if span.dim == 0:  # the slice's rows [span.start, span.end); the local span is in shard rows
            return reduced[span.param].narrow(0, offset + ls.start - span.start, ls.length)
        return reduced[span.param].narrow(0, offset, rows)

    def _grad32(self, g: torch.Tensor, inv_scale: float) -> torch.Tensor:
        """As ChunkAdamW._grad32: cast to the master dtype on the step device, unscaled (in
        place: `g` is a slice of a gradient the step drops anyway, or already a copy)."""
        out = g.to(device=self.device, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
        return out.mul_(inv_scale) if inv_scale != 1.0 else out

    def _adamw(self, ls: LocalSpan, grad: torch.Tensor, lr: float, step: int) -> None:
        """ChunkAdamW's span step (runtime.chunk_optim.step_view: adamw_update of the fp32
        master, then the weights written back) on this rank's slice of the span."""
        with torch.no_grad():
            step_view(self._state, ls.param, grad, self._view(ls), master=True, device=self.device,
                      config=self.config, lr=lr, step=step)

    def _layout(self, k: int) -> FlatLayout:
        """Chunk k's state tensors in its flat buffer (HOST / DISK tiers): `_fresh_state`'s order."""
        keys, shapes, offsets, numel, dtype = [], [], [], 0, torch.float32
        for ls in self.local_spans[k]:
            if ls.length:
                view = self._view(ls)
                dtype = self._master_dtype(view)
                for kind in _KINDS:
                    keys.append(f"{ls.param}/{kind}")
                    shapes.append(tuple(view.shape))
                    offsets.append(numel)
                    numel += view.numel()
        return FlatLayout(keys=tuple(keys), shapes=tuple(shapes), offsets=tuple(offsets), numel=numel, dtype=dtype)

    def _fresh_state(self, k: int) -> dict[str, torch.Tensor]:
        state = {}
        for ls in self.local_spans[k]:
            if ls.length:
                view = self._view(ls)
                master = view.to(device=self.device, dtype=self._master_dtype(view), copy=True)
                state.update({f"{ls.param}/master": master, f"{ls.param}/exp_avg": torch.zeros_like(master),
                              f"{ls.param}/exp_avg_sq": torch.zeros_like(master)})
        return state

    def _load(self, k: int) -> dict[str, torch.Tensor]:
        """Chunk k's working copy on the step device (HOST tier)."""
        if self._stream is None:
            return self._host.get(k, self.device)
        with torch.cuda.stream(self._stream):
            state = self._host.get(k, self.device)
        self._stream.synchronize()
        return state

    def _wait_prefetch(self) -> None:
        if self._pending is not None:
            self._pending[1].result()

    def _activate(self, k: int) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = install(self.model, self.grad_spec(k))
        if self._host is None:
            self._state = self._resting[k]
        elif self._pending is not None and self._pending[0] == k:
            self._state = self._pending[1].result()
            if self._stream is not None:  # allocated on the side stream, used on this one
                for t in self._state.values():
                    t.record_stream(torch.cuda.current_stream(self.device))
        else:
            self._wait_prefetch()
            self._state = self._load(k)
        self._pending = None
        self.active_chunk = k
        if self._prefetch:
            nxt = (k + 1) % self.table.num_chunks
            self._pending = (nxt, self._executor.submit(self._load, nxt))

    def _evict(self) -> None:
        if self._host is not None:
            self._host.put(self.active_chunk, self._state)
        self._state = {}


def _parse_meta(meta: dict):
    """(AdamWConfig, LRSchedule, update interval, span steps, (global step, active steps, active
    chunk)) of `state_dict()`'s meta; KeyError / TypeError / ValueError when malformed."""
    config = dict(meta["config"])
    config["betas"] = tuple(config["betas"])
    span_steps = {int(k): {str(n): int(s) for n, s in v.items()} for k, v in meta["span_steps"].items()}
    counters = (int(meta["global_step"]), int(meta["active_steps"]), int(meta["active_chunk"]))
    return AdamWConfig(**config), LRSchedule(**meta["schedule"]), int(meta["update_interval"]), span_steps, counters


def state_file_name(rank: int, world_size: int) -> str:
    """The file of one rank's optimizer state in a checkpoint directory."""
    return f"optimizer-rank{rank}-of-{world_size}.safetensors"


def _tensors_crc32(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def save_state_file(optimizer: ShardedChunkAdamW, path: str | os.PathLike) -> None:
    """Write this rank's `state_dict()` to one safetensors file, atomically, with the JSON meta
    and a crc32 of the tensor bytes in its header."""
    from safetensors.torch import save_file

    tensors, meta = optimizer.state_dict()
    header = {_META_KEY: json.dumps(meta), _CRC_KEY: f"{_tensors_crc32(tensors):08x}"}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
    except ChunkftError:
        raise
    except Exception as e:  # OSError, or safetensors' own error types
        raise ChunkftError(f"cannot write optimizer state {str(path)!r}: {str(e).splitlines()[0]}") from None


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of `save_state_file`'s file; ChunkftError (one line) if it is missing,
    unreadable or its tensors fail the crc32 written with them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ChunkftError(f"optimizer state {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(header[_META_KEY])
        want = header[_CRC_KEY]
    except Exception as e:  # safetensors' and json's error types, KeyError for a foreign file
        what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ChunkftError(f"optimizer state {str(path)!r} is unreadable or not chunkft's ({what})") from None
    got = f"{_tensors_crc32(tensors):08x}"
    if got != want:
        raise ChunkftError(f"optimizer state {str(path)!r} is corrupted: crc32 of its tensors is {got}, "
                           f"it was written as {want}")
    if not isinstance(meta, dict):
        raise ChunkftError(f"optimizer state {str(path)!r} has malformed metadata")
    return tensors, meta
