"""PyTorch's CUDA caching allocator, replayed: AllocConf (PYTORCH_CUDA_ALLOC_CONF) and the allocator.

A model of c10/cuda/CUDACachingAllocator.cpp (DeviceCachingAllocator) and the generic option
parser of c10/core/AllocatorConfig.cpp, read from PyTorch's source (2.x):

  - round_size: up to a multiple of kMinBlockSize = 512 B, or, with roundup_power2_divisions,
    up to the next of `divisions` equal steps between two powers of two
    (roundup_power2_next_division) when the size exceeds 512 B x divisions; the divisions
    of a size come from its power-of-two interval, [1 MiB, 2 MiB) ... [32 GiB, 64 GiB) (16
    intervals; smaller sizes use the first, larger the last);
  - pools: requests up to kSmallSize = 1 MiB from the small pool, others from the large pool,
    each stream its own (blocks are ordered by stream first, so a stream only ever reuses its
    own blocks); best fit = the smallest free block of the stream's pool that is large enough
    (ties: lowest address);
  - a new segment (cudaMalloc) is get_allocation_size: 2 MiB (small), 20 MiB (large under
    10 MiB), else the request rounded up to 2 MiB; a found block is split when the rest is at
    least 512 B (small pool, or expandable segments) or the request is under max_split_size
    and the rest more than 1 MiB (should_split); a freed block merges with free neighbours;
  - max_split_size_mb: a request under it never takes a free block at or above it; a request
    at or above it takes a free block only if that block is less than the request +
    max_non_split_rounding_mb (default 20 MiB) (get_free_block); on a failed cudaMalloc, free
    oversize blocks of the stream first (release_available_cached_blocks);
  - the cap (torch.cuda.set_per_process_memory_fraction, here the GPU budget): alloc_block
    refuses a new segment when reserved + get_allocation_size(request) exceeds it; then
    release_available_cached_blocks and a retry, then release_cached_blocks (every unsplit
    free segment of every pool and stream, and the whole free pages of expandable segments)
    and a last retry; then OutOfMemory;
  - garbage_collection_threshold (only under a cap, as PyTorch: it needs set_fraction): before
    a new segment, while reserved exceeds threshold x cap, free unsplit free large blocks
    whose age (get_free_block calls of the large pool since the block was cached) is at least
    the mean age, until the excess is reclaimed (garbage_collect_cached_blocks);
  - expandable_segments:True: one segment per pool and stream, a virtual range that grows by
    mapping pages of 2 MiB (small pool) or 20 MiB (large pool, kLargeBuffer); a request that
    no free block serves maps pages at the lowest address where free and unmapped space run
    long enough (find_expandable_block, map_block); every split leaving >= 512 B is made;
    best fit counts a free block that ends at unmapped space as that long (and so takes it
    last); pages are unmapped only by release_cached_blocks (OOM retry, empty_cache): whole
    free pages inside free blocks (unmap_block). The cap check uses get_allocation_size too,
    and the pages mapped must fit under the cap as well (the cap stands for the device's memory:
    cuMemCreate fails past it, and map() keeps what earlier calls mapped).

Not modelled: CUDA events / record_stream (a block freed while another stream still uses it),
graph pools, backend:cudaMallocAsync (refused), and physical memory other than the cap.
"""

from __future__ import annotations

import bisect
import dataclasses
import re

from planner.errors import ChunkftError

K_MIN_BLOCK_SIZE = 512
K_SMALL_SIZE = 1048576
K_SMALL_BUFFER = 2097152
K_LARGE_BUFFER = 20971520
K_MIN_LARGE_ALLOC = 10485760
K_ROUND_LARGE = 2097152
MiB = 1048576
ROUNDUP_INTERVALS = 16  # c10/core/AllocatorConfig.cpp kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB
_ADDRESS_SPACE = 1 << 44  # an expandable segment's virtual range: more than any GPU's memory

# keys PyTorch accepts that change nothing this model prices (values checked loosely)
_NO_EFFECT_KEYS = {
    "release_lock_on_cudamalloc": "True or False",
    "pinned_use_cuda_host_register": "True or False",
    "pinned_use_host_register": "True or False",
    "pinned_num_register_threads": "a power of two",
    "pinned_use_background_threads": "True or False",
    "pinned_reserve_segment_size_mb": "a positive integer",
    "graph_capture_record_stream_reuse": "True or False",
}
MODELLED_KEYS = ("expandable_segments", "max_split_size_mb", "max_non_split_rounding_mb",
                 "roundup_power2_divisions", "garbage_collection_threshold", "backend")
VALID_KEYS = MODELLED_KEYS + tuple(_NO_EFFECT_KEYS)


class OutOfMemory(Exception):
    """The replay's allocator could not serve a request under its cap (after every retry)."""


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, slots=True)
class AllocConf:
    """PYTORCH_CUDA_ALLOC_CONF's options that change memory, typed. Defaults = PyTorch's."""

    expandable_segments: bool = False
    max_split_size: int | None = None
    """Bytes (max_split_size_mb x MiB); None = unlimited (PyTorch's SIZE_MAX)."""
    max_non_split_rounding: int = K_LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    extra: tuple[tuple[str, str], ...] = ()
    """Accepted keys without a memory effect (backend:native, release_lock_on_cudamalloc ...)."""

    @classmethod
    def parse(cls, text: str | None) -> "AllocConf":
        """Parse PYTORCH_CUDA_ALLOC_CONF syntax ("key:value,key:value"); one-line ChunkftError."""
        if text is None or not text.strip():
            return cls()
        if not isinstance(text, str):
            raise ChunkftError(f"invalid alloc conf {text!r}: must be a PYTORCH_CUDA_ALLOC_CONF string")
        values: dict = {}
        extra: list[tuple[str, str]] = []
        seen: set[str] = set()
        for item in _split_items(text):
            key, sep, value = item.partition(":")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ChunkftError(f"invalid alloc conf item {item!r}: expected key:value, keys are "
                                   f"{', '.join(VALID_KEYS)}")
            if key in seen:
                raise ChunkftError(f"alloc conf key {key!r} is given twice")
            seen.add(key)
            if key == "expandable_segments":
                values[key] = _bool(key, value)
            elif key == "max_split_size_mb":
                values["max_split_size"] = _mb(key, value, K_LARGE_BUFFER // MiB)
            elif key == "max_non_split_rounding_mb":
                values["max_non_split_rounding"] = _mb(key, value, K_LARGE_BUFFER // MiB)
            elif key == "roundup_power2_divisions":
                values[key] = _divisions(value)
            elif key == "garbage_collection_threshold":
                try:
                    v = float(value)
                except ValueError:
                    v = -1.0
                if not 0.0 < v < 1.0:
                    raise ChunkftError(f"invalid garbage_collection_threshold {value!r}: "
                                       "must be a number in (0.0, 1.0)")
                values[key] = v
            elif key == "backend":
                if value != "native":
                    raise ChunkftError(f"alloc conf backend {value!r} is not modelled: the planner replays "
                                       "the native caching allocator (backend:native)")
                extra.append((key, value))
            elif key in _NO_EFFECT_KEYS:
                if _NO_EFFECT_KEYS[key] == "True or False":
                    _bool(key, value)
                elif not value.isdigit() or int(value) <= 0:
                    raise ChunkftError(f"invalid {key} {value!r}: must be {_NO_EFFECT_KEYS[key]}")
                extra.append((key, value))
            else:
                raise ChunkftError(f"unknown alloc conf key {key!r}: valid keys are {', '.join(VALID_KEYS)}")
        return cls(**values, extra=tuple(extra))

    def normalised(self) -> str:
        """Canonical PYTORCH_CUDA_ALLOC_CONF text: options that differ from PyTorch's defaults, in
        a fixed order ("" for the defaults)."""
        parts = []
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        if self.max_split_size is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size // MiB}")
        if self.max_non_split_rounding != K_LARGE_BUFFER:
            parts.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding // MiB}")
        d = self.roundup_power2_divisions
        if any(d):
            if len(set(d)) == 1:
                parts.append(f"roundup_power2_divisions:{d[0]}")
            else:
                parts.append("roundup_power2_divisions:[" + ",".join(
                    f"{1 << i}:{v}" for i, v in enumerate(d)) + "]")
        if self.garbage_collection_threshold:
            parts.append(f"garbage_collection_threshold:{self.garbage_collection_threshold:g}")
        parts += [f"{k}:{v}" for k, v in self.extra]
        return ",".join(parts)

    @property
    def is_default(self) -> bool:
        return self == AllocConf(extra=self.extra)

    def divisions(self, size: int) -> int:
        """roundup_power2_divisions(size): the divisions of size's power-of-two interval."""
        index = max(0, min(size.bit_length() - 1 - 20, ROUNDUP_INTERVALS - 1))
        return self.roundup_power2_divisions[index]

    def round_size(self, size: int) -> int:
        """DeviceCachingAllocator::round_size."""
        if size < K_MIN_BLOCK_SIZE:
            return K_MIN_BLOCK_SIZE
        divisions = self.divisions(size) if any(self.roundup_power2_divisions) else 0
        if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
            return roundup_power2_next_division(size, divisions)
        return K_MIN_BLOCK_SIZE * ((size + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """Up to the next of `divisions` equal steps between the powers of two around `size`."""
    if _pow2(size):
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def _split_items(text: str) -> list[str]:
    """Commas split items except inside [...] (roundup_power2_divisions' list form)."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    if depth != 0:
        raise ChunkftError(f"invalid alloc conf {text!r}: unbalanced [ ]")
    return [i for i in (s.strip() for s in items)]


def _bool(key: str, value: str) -> bool:
    if value not in ("True", "False"):
        raise ChunkftError(f"invalid {key} {value!r}: must be True or False")
    return value == "True"


def _mb(key: str, value: str, minimum: int) -> int:
    if not value.isdigit() or int(value) < minimum:
        raise ChunkftError(f"invalid {key} {value!r}: must be an integer number of MiB >= {minimum}")
    return int(value) * MiB


_LIST_ITEM = re.compile(r"^\s*(>|\d+)\s*:\s*(\d+)\s*$")


def _divisions(value: str) -> tuple[int, ...]:
    """roundup_power2_divisions: one power of two for every size, or [MiB:div,...,>:div].

    The list form as AllocatorConfig::parseRoundUpPower2Divisions reads it: an entry "S:d" (S a
    power of two, in MiB) sets the interval [S, 2S) MiB to d and, for the first entry, every
    interval below; ">:d" sets every interval from the last entry's on (that one included)."""
    bad = (f"invalid roundup_power2_divisions {value!r}: a power of two, or a list like "
           "[256:1,512:2,1024:4,>:8] (sizes in MiB, powers of two; divisions powers of two or 0)")
    if not value.startswith("["):
        if not value.isdigit() or not _pow2(int(value)):
            raise ChunkftError(bad)
        return (int(value),) * ROUNDUP_INTERVALS
    if not value.endswith("]") or len(value) < 3:
        raise ChunkftError(bad)
    out = [0] * ROUNDUP_INTERVALS
    first, last = True, 0
    for entry in value[1:-1].split(","):
        m = _LIST_ITEM.match(entry)
        if not m:
            raise ChunkftError(bad)
        interval, div = m.group(1), int(m.group(2))
        if div != 0 and not _pow2(div):
            raise ChunkftError(bad)
        if interval == ">":
            for i in range(last, ROUNDUP_INTERVALS):
                out[i] = div
            continue
        size = int(interval)
        if not _pow2(size):
            raise ChunkftError(bad)
        index = min(size.bit_length() - 1, ROUNDUP_INTERVALS - 1)
        if first:
            for i in range(index):
                out[i] = div
            first = False
        out[index] = div
        last = index
    return tuple(out)


def parse_alloc_conf(text: str | None) -> AllocConf:
    return AllocConf.parse(text)


def allocation_size(size: int) -> int:
    """get_allocation_size: bytes of a new segment for a rounded request."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


# ---------------------------------------------------------------------------------------------
# The allocator


class _Block:
    __slots__ = ("size", "addr", "prev", "next", "allocated", "mapped", "seg", "gc_base")

    def __init__(self, size: int, addr: int, seg=None, mapped: bool = True):
        self.size = size
        self.addr = addr
        self.prev = None
        self.next = None
        self.allocated = False
        self.mapped = mapped
        self.seg = seg  # expandable segment's base address, or None
        self.gc_base = 0


class _Pool:
    __slots__ = ("small", "stream", "blocks", "unmapped")

    def __init__(self, small: bool, stream: int):
        self.small = small
        self.stream = stream
        self.blocks: list = []  # free mapped blocks, sorted (size, addr, block)
        self.unmapped: list = []  # unmapped blocks of expandable segments, sorted (addr, block)


class CachingAllocator:
    """DeviceCachingAllocator's malloc / free over byte counts (see the module docstring).

    `cap`: the per-process memory limit (None: none, and no garbage collection); `reserved` is
    total_allocated_memory (segment bytes, or mapped pages), `peak_reserved` its high-water mark."""

    def __init__(self, conf: AllocConf = AllocConf(), cap: int | None = None, *, rounded: bool = False):
        self.conf = conf
        self._rounded = rounded  # requests arrive already round_size'd (Program.rounded)
        self.cap = cap
        self.reserved = 0
        self.peak_reserved = 0
        self.allocated = 0
        self.retries = 0
        self._pools: dict[tuple[bool, int], _Pool] = {}
        self._owner: dict = {}
        self._next_addr = 1 << 20
        self._gc = cap is not None and conf.garbage_collection_threshold > 0
        self._calls = {True: 0, False: 0}  # get_free_blocks_call_count of the small / large BlockPool
        self._max_split = conf.max_split_size if conf.max_split_size is not None else 1 << 62

    # -- helpers ---------------------------------------------------------------------------

    def _pool(self, small: bool, stream: int) -> _Pool:
        p = self._pools.get((small, stream))
        if p is None:
            p = self._pools[(small, stream)] = _Pool(small, stream)
        return p

    def _insert(self, pool: _Pool, b: _Block) -> None:
        b.gc_base = self._calls[pool.small]
        bisect.insort(pool.blocks, (b.size, b.addr, b))

    @staticmethod
    def _remove(pool: _Pool, b: _Block) -> None:
        lst = pool.blocks
        i = bisect.bisect_left(lst, (b.size, b.addr))
        del lst[i]

    @staticmethod
    def _remove_unmapped(pool: _Pool, b: _Block) -> None:
        lst = pool.unmapped
        i = bisect.bisect_left(lst, (b.addr,))
        del lst[i]

    def _grow(self, n: int) -> None:
        self.reserved += n
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    # -- malloc / free ---------------------------------------------------------------------

    def malloc(self, key, nbytes: int, stream: int = 0) -> int:
        """Allocate `nbytes` for `key`; returns the block's size. Raises OutOfMemory."""
        size = nbytes if self._rounded else self.conf.round_size(nbytes)
        small = size <= K_SMALL_SIZE
        pool = self._pool(small, stream)
        alloc_size = allocation_size(size)
        block = self._get_free_block(pool, size)
        if block is None:
            if self._gc:
                self._garbage_collect()
            block = self._alloc_block(pool, size, alloc_size)
            if block is None and self._release_available(pool, size):
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                self.retries += 1
                self._release_cached()
                block = self._alloc_block(pool, size, alloc_size)
                if block is None:
                    raise OutOfMemory(f"cannot allocate {size} bytes: {self.reserved} reserved, cap {self.cap}")
        remaining = block.size - size
        if pool.small or self.conf.expandable_segments:
            split = remaining >= K_MIN_BLOCK_SIZE
        else:
            split = size < self._max_split and remaining > K_SMALL_SIZE
        if split:
            new = _Block(size, block.addr, block.seg)
            new.prev = block.prev
            if new.prev is not None:
                new.prev.next = new
            new.next = block
            block.prev = new
            block.addr += size
            block.size -= size
            self._insert(pool, block)
            block = new
        block.allocated = True
        self._owner[key] = (block, pool)
        self.allocated += block.size
        return block.size

    def free(self, key) -> None:
        block, pool = self._owner.pop(key)
        block.allocated = False
        self.allocated -= block.size
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        self._insert(pool, block)

    def _merge(self, dst: _Block, src: _Block | None, pool: _Pool) -> None:
        """try_merge_blocks: dst absorbs a free neighbour of the same mapping state."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            self._remove(pool, src)
        else:
            self._remove_unmapped(pool, src)
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        if self._gc:
            self._calls[pool.small] += 1
        lst = pool.blocks
        i = bisect.bisect_left(lst, (size,))
        if i == len(lst):
            return None
        if self.conf.expandable_segments:
            def span(b: _Block) -> int:
                n = b.next
                return b.size + (n.size if n is not None and not n.mapped else 0)
            while i + 1 < len(lst) and span(lst[i + 1][2]) < span(lst[i][2]):
                i += 1
        b = lst[i][2]
        if size < self._max_split and b.size >= self._max_split:
            return None
        if size >= self._max_split and b.size >= size + self.conf.max_non_split_rounding:
            return None
        del lst[i]
        return b

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int) -> _Block | None:
        if self.cap is not None and self.reserved + alloc_size > self.cap:
            return None
        if self.conf.expandable_segments:
            return self._allocate_expandable(pool, size)
        b = _Block(alloc_size, self._next_addr)
        self._next_addr += alloc_size + K_ROUND_LARGE
        self._grow(alloc_size)
        return b

    # -- releasing -------------------------------------------------------------------------

    def _release_block(self, pool: _Pool, b: _Block) -> None:
        self._remove(pool, b)
        self.reserved -= b.size

    def _release_available(self, pool: _Pool, size: int) -> bool:
        """release_available_cached_blocks: free oversize blocks of this stream's pool."""
        if self.conf.max_split_size is None or self.conf.expandable_segments:
            return False
        key = max(size, self._max_split)
        lst = pool.blocks
        i = bisect.bisect_left(lst, (key,))
        if i < len(lst):
            self._release_block(pool, lst[i][2])
            return True
        released = 0
        i = len(lst) - 1
        while i >= 0 and released < key and lst[i][0] >= self._max_split:
            b = lst[i][2]
            released += b.size
            self._release_block(pool, b)
            i -= 1
        return released >= key

    def _release_cached(self) -> None:
        """release_cached_blocks: every unsplit free segment; free pages of expandable ones."""
        for small in (False, True):
            for (s, _), pool in sorted(self._pools.items(), key=lambda kv: kv[0][1]):
                if s != small:
                    continue
                to_unmap = []
                for _, _, b in list(pool.blocks):
                    if b.seg is not None:
                        to_unmap.append(b)
                    elif b.prev is None and b.next is None:
                        self._release_block(pool, b)
                for b in to_unmap:
                    self._unmap(pool, b)
                    if b.prev is None and b.next is None and not b.mapped:
                        self._remove_unmapped(pool, b)  # release_expandable_segment

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks (large pool, every stream)."""
        threshold = int(self.conf.garbage_collection_threshold * self.cap)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        calls = self._calls[False]
        large = [p for (small, _), p in sorted(self._pools.items(), key=lambda kv: kv[0][1]) if not small]

        def freeable():
            return [(p, b) for p in large for _, _, b in p.blocks if b.prev is None and b.next is None]

        cands = freeable()
        if not cands:
            return
        total_age = sum(calls - b.gc_base for _, b in cands)
        count = len(cands)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            age_threshold = total_age / count
            freed = False
            for p, b in freeable():
                if calls - b.gc_base >= age_threshold:
                    freed = True
                    reclaimed += b.size
                    total_age -= calls - b.gc_base
                    count -= 1
                    self._release_block(p, b)

    # -- expandable segments ---------------------------------------------------------------

    def _page(self, pool: _Pool) -> int:
        return K_SMALL_BUFFER if pool.small else K_LARGE_BUFFER

    def _allocate_expandable(self, pool: _Pool, size: int) -> _Block | None:
        c = self._find_expandable(pool, size)
        if not c.mapped and not self._map(pool, c, min(c.size, size)):
            return None
        while c.size < size:
            nxt = c.next
            if not self._map(pool, nxt, min(size - c.size, nxt.size)):
                return None
            c = nxt
        self._remove(pool, c)
        return c

    def _find_expandable(self, pool: _Pool, size: int) -> _Block:
        for _, c in pool.unmapped:
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            b, n = c, 0
            while n < size and b is not None and not b.allocated:
                n += b.size
                b = b.next
            if n >= size:
                return c
        base = self._next_addr
        self._next_addr += _ADDRESS_SPACE
        c = _Block(_ADDRESS_SPACE, base, seg=base, mapped=False)
        bisect.insort(pool.unmapped, (c.addr, c))
        return c

    def _map(self, pool: _Pool, b: _Block, size: int) -> bool:
        page = self._page(pool)
        begin = (b.addr - b.seg) // page
        end = -(-(b.addr + size - b.seg) // page)
        mapped = (end - begin) * page
        if self.cap is not None and self.reserved + mapped > self.cap:
            return False
        self._remove_unmapped(pool, b)
        b.mapped = True
        if mapped < b.size:
            rest = _Block(b.size - mapped, b.addr + mapped, seg=b.seg, mapped=False)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            bisect.insort(pool.unmapped, (rest.addr, rest))
            b.size = mapped
        self._merge(b, b.prev, pool)
        self._merge(b, b.next, pool)
        self._insert(pool, b)
        self._grow(mapped)
        return True

    def _unmap(self, pool: _Pool, b: _Block) -> None:
        page = self._page(pool)
        begin = -(-(b.addr - b.seg) // page)
        end = (b.addr + b.size - b.seg) // page
        if begin >= end:
            return
        self._remove(pool, b)
        ustart, usize = b.seg + begin * page, (end - begin) * page
        before = ustart - b.addr
        if before > 0:
            f = _Block(before, b.addr, seg=b.seg)
            f.prev, f.next = b.prev, b
            if b.prev is not None:
                b.prev.next = f
            b.prev = f
            self._insert(pool, f)
        after = b.size - before - usize
        if after > 0:
            f = _Block(after, ustart + usize, seg=b.seg)
            f.prev, f.next = b, b.next
            if b.next is not None:
                b.next.prev = f
            b.next = f
            self._insert(pool, f)
        b.addr, b.size, b.mapped = ustart, usize, False
        self._merge(b, b.prev, pool)
        self._merge(b, b.next, pool)
        bisect.insort(pool.unmapped, (b.addr, b))
        self.reserved -= usize


# ---------------------------------------------------------------------------------------------
# Programs: a step's allocations and frees, replayed with or without a cap


@dataclasses.dataclass(frozen=True, slots=True)
class Program:
    """A replayable sequence: per op, the keys freed then the (key, bytes, stream) allocated.

    `pre`: allocations made before the first op (live at the step's start); `rounded`: the
    byte counts are round_size'd already (for the AllocConf the program is replayed under)."""

    pre: tuple[tuple[object, int, int], ...]
    ops: tuple[tuple[tuple, tuple], ...]
    rounded: bool = False


def run(program: Program, conf: AllocConf = AllocConf(), cap: int | None = None, *,
        per_op: bool = False) -> tuple[int, list[int] | None]:
    """Replay `program`: (peak reserved, reserved after every op when per_op). OutOfMemory
    propagates when `cap` is too small."""
    a = CachingAllocator(conf, cap, rounded=program.rounded)
    malloc, free = a.malloc, a.free
    for key, nbytes, stream in program.pre:
        malloc(key, nbytes, stream)
    out = [] if per_op else None
    for frees, allocs in program.ops:
        for key in frees:
            free(key)
        for key, nbytes, stream in allocs:
            malloc(key, nbytes, stream)
        if per_op:
            out.append(a.reserved)
    return a.peak_reserved, out


def least_reserved(program: Program, conf: AllocConf, *, low: int, high: int, unit: int = K_ROUND_LARGE) -> int:
    """The smallest cap (a multiple of `unit`) under which `program` replays without
    OutOfMemory, by bisection between `low` (below the allocated peak: fails) and `high`
    (the uncapped reserved peak: succeeds). Assumes a cap that succeeds keeps succeeding when
    raised (the allocator is not monotone in every corner; the search reports the boundary it
    finds). Without expandable segments and garbage collection, a run that succeeds under cap
    X replays identically under its own peak R <= X (every segment it made fitted under R, and
    every refusal under X is one under R), so the search continues below R."""
    exact_peak = not conf.expandable_segments and conf.garbage_collection_threshold == 0
    lo = max(low // unit * unit, 0)
    hi = -(-high // unit) * unit
    # the allocated peak rounded up to whole segments is the usual answer: try it first
    probe = lo + unit
    while hi - lo > unit:
        mid = probe if probe is not None else (lo + (hi - lo) // 2) // unit * unit
        probe = None
        if mid <= lo or mid >= hi:
            mid = (lo + (hi - lo) // 2) // unit * unit
        try:
            peak, _ = run(program, conf, mid)
        except OutOfMemory:
            lo = mid
            continue
        hi = min(mid, -(-peak // unit) * unit) if exact_peak else mid
    return hi
