"""CPU ground truth for the memory of a real training step, and torch's MemTracker as a peer.

`MallocSampler` is a TorchDispatchMode that reads glibc's `mallinfo2()` after every aten op
and keeps the maximum of bytes in use, `uordblks` (in-use heap chunks, every arena) plus
`hblkhd` (in-use mmapped chunks). The PyTorch CPU allocator is posix_memalign/free, so every
tensor storage shows up in one of the two, and the maximum over op boundaries is the step's
peak at op granularity: the same granularity the planner's replay has.

The mmap threshold: glibc serves a large request with mmap when it is above a *dynamic*
threshold (128 KiB at start, raised to the size of any mmapped chunk later freed, up to 32 MiB
on 64-bit; glibc malloc/malloc.c, DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long)).
Where a chunk lives changes only its rounding: a heap chunk counts as its request plus 8-16
bytes of header, an mmapped one is rounded up to a 4 KiB page. Measured here on a tiny Llama
step (32.4 MB peak), a process that had first freed a 40 MB tensor (threshold raised) and one
that had not agreed within 0.003%, pinned or not. So by default malloc is left alone:
`mallopt(M_MMAP_THRESHOLD, n)` cannot be undone (glibc switches its dynamic rule off for the
rest of the process), and it changes how freed memory goes back to the OS, which RSS-based
measurements elsewhere in the same process would see. `mmap_threshold_bytes=32 MiB` pins it
for a measurement that needs header-exact counts of many 128 KiB-32 MiB tensors. The trim
threshold only decides how much free heap top returns to the OS (`arena`, RSS), never what
counts as in use, so it is never touched.

What the numbers include beyond tensor storages is small and stable (about 140 KB at the peak
of a tiny Llama step, whatever its size): malloc headers, autograd graph nodes, Python objects
over 512 bytes (pymalloc's own arenas are mmapped directly and are not counted), freed chunks
parked in glibc's per-thread cache (at most 7 per size class up to 1 KiB). The first step a
process runs also allocates lazily initialised state (dispatch caches, kernel tables): measure
after one warm-up step.

Known limitations: scratch memory an aten kernel allocates and frees inside itself is not seen
(no op boundary in between), nor are allocations from other threads between samples apart
from where they land in the next sample. Needs glibc >= 2.33 (mallinfo2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Mallinfo2(ctypes.Structure):
    # struct mallinfo2 from glibc's malloc.h (2.33+): ten size_t fields, in this order.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


# glibc malloc.h: #define M_MMAP_THRESHOLD -3; the largest value mallopt accepts is
# HEAP_MAX_SIZE / 2 = DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB on 64-bit.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX_BYTES = 32 * 2**20


@functools.cache
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@functools.cache
def _mallinfo2_fn():
    fn = getattr(_libc(), "mallinfo2", None)
    if fn is not None:
        fn.restype = _Mallinfo2
        fn.argtypes = []
    return fn


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_MAX_BYTES) -> None:
    """Fix glibc's mmap threshold (for the rest of the process; see the module docstring)."""
    mallopt = _libc().mallopt
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    if mallopt(M_MMAP_THRESHOLD, nbytes) != 1:
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


def mallinfo2_available() -> bool:
    """True where glibc provides mallinfo2 (Linux, glibc >= 2.33)."""
    try:
        return _mallinfo2_fn() is not None
    except OSError:
        return False


def malloc_in_use_bytes() -> int:
    """Bytes in use in the C heap now: mallinfo2().uordblks + hblkhd."""
    fn = _mallinfo2_fn()
    if fn is None:
        raise RuntimeError("glibc mallinfo2() is not available (needs Linux with glibc >= 2.33)")
    info = fn()
    return int(info.uordblks) + int(info.hblkhd)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MallocMeasurement:
    """What a step allocated on the C heap, sampled after every aten op."""

    baseline_bytes: int
    """In-use heap bytes when the context was entered (the model's weights, inputs, ...)."""
    peak_bytes: int
    """Maximum in-use bytes over all samples, minus baseline_bytes."""
    end_bytes: int
    """In-use bytes at exit minus baseline_bytes (e.g. the gradients a step leaves behind)."""
    op_count: int
    """Number of aten ops that ran inside the context."""
    peak_op: str | None
    """The aten op after which the peak was sampled (None if the peak was the baseline)."""
    samples: tuple[tuple[str, int], ...] = ()
    """(op name, bytes above baseline) after every op, when record_samples=True."""


class MallocSampler(TorchDispatchMode):
    """Measure the C-heap peak of the code run inside `with MallocSampler() as s:`.

    Read `s.result` after the block. Ops are dispatched unchanged; sampling costs one
    mallinfo2 call per op (a few microseconds with few arenas). If `mmap_threshold_bytes` is
    given, glibc's mmap threshold is pinned to it on entry, for the rest of the process (see
    the module docstring: not needed for reproducible numbers, and not reversible).
    """

    def __init__(self, *, record_samples: bool = False,
                 mmap_threshold_bytes: int | None = None) -> None:
        super().__init__()
        self.record_samples = record_samples
        self.mmap_threshold_bytes = mmap_threshold_bytes
        self.result: MallocMeasurement | None = None

    def __enter__(self) -> "MallocSampler":
        if self.mmap_threshold_bytes is not None:
            pin_mmap_threshold(self.mmap_threshold_bytes)
        self._baseline = malloc_in_use_bytes()
        self._peak = self._baseline
        self._peak_op: str | None = None
        self._op_count = 0
        self._samples: list[tuple[str, int]] = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = malloc_in_use_bytes()
        self._op_count += 1
        if now > self._peak:
            self._peak, self._peak_op = now, str(func)
        if self.record_samples:
            self._samples.append((str(func), now - self._baseline))
        return out

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        end = malloc_in_use_bytes()
        self._peak = max(self._peak, end)
        self.result = MallocMeasurement(
            baseline_bytes=self._baseline, peak_bytes=self._peak - self._baseline,
            end_bytes=end - self._baseline, op_count=self._op_count, peak_op=self._peak_op,
            samples=tuple(self._samples))


def measure_malloc_peak(step: Callable[[], Any], *, record_samples: bool = False,
                        mmap_threshold_bytes: int | None = None) -> MallocMeasurement:
    """Run `step()` once under MallocSampler, after a garbage collection, and return the result."""
    gc.collect()
    with MallocSampler(record_samples=record_samples, mmap_threshold_bytes=mmap_threshold_bytes) as sampler:
        step()
    assert sampler.result is not None
    return sampler.result


def polled_malloc_peak(step: Callable[[], Any], *, repeats: int = 1) -> int:
    """Peak malloc bytes in use above the level before, while `step` runs `repeats` times, read
    by a thread polling mallinfo2: for code with no aten-op boundaries inside it (a
    torch.compile'd kernel), where MallocSampler sees nothing between ops."""
    import threading

    gc.collect()
    base = malloc_in_use_bytes()
    peak, stop = [base], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], malloc_in_use_bytes())

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for _ in range(repeats):
            step()
    finally:
        stop.set()
        thread.join()
    return peak[0] - base


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrackerMeasurement:
    """Peak of a step as torch's MemTracker counts it, per its memory categories."""

    baseline_bytes: int
    """Tracked bytes when the step started (parameters and buffers of the tracked model)."""
    peak_bytes: int
    """MemTracker's peak total minus baseline_bytes."""
    peak_by_category: dict[str, int]
    """MemTracker's peak snapshot: category ("Parameter", "Gradient", "Activation", ...) -> bytes."""


def memtracker_peak(make_step: Callable[[], tuple[torch.nn.Module, Callable[[], Any]]],
                    *, device: str = "cpu") -> TrackerMeasurement:
    """Run a step under FakeTensorMode with MemTracker and return its peak.

    `make_step()` is called inside FakeTensorMode, so the model and inputs it creates are fake
    (no memory); it returns (model, step) and `step()` runs forward, loss and backward.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        model, step = make_step()
        tracker = MemTracker()
        tracker.track_external(model)
        dev = torch.device(device)
        baseline = tracker.get_tracker_snapshot("current").get(dev, {}).get("Total", 0)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak").get(dev, {})
    by_category = {str(getattr(k, "value", k)): int(v) for k, v in peak.items()}
    return TrackerMeasurement(baseline_bytes=int(baseline), peak_bytes=int(peak.get("Total", 0)) - int(baseline),
                              peak_by_category=by_category)
