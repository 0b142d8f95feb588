"""The allocator options (PYTORCH_CUDA_ALLOC_CONF) and "fits" as PyTorch's allocator decides it.

`RefAllocator` below is a second, independent reading of c10/cuda/CUDACachingAllocator.cpp
(DeviceCachingAllocator: malloc, get_free_block, should_split, alloc_block,
release_available_cached_blocks, release_cached_blocks, garbage_collect_cached_blocks, the
expandable segments' find_expandable_block / map_block / unmap_block) and of
c10/core/AllocatorConfig.cpp (round_size's power-of-two divisions). It keeps each segment as an
address-ordered list of [address, size, state] and finds blocks by scanning, where
planner.cuda_alloc keeps linked blocks and sorted free lists. The two are compared on reserved
bytes after every event, on seeded random sequences for every option and on a traced step.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.cuda_alloc import AllocConf, CachingAllocator, OutOfMemory, roundup_power2_next_division
from planner.errors import ChunkftError
from planner.memory import replay, side_stream_pool
from planner.opgraph import OpGraph, OpNode, StorageInfo
from planner.schema import Component, Phase, Tier
from planner.strategy import Budget, Estimate, Strategy

MiB = 2**20
SMALL, LARGE, MIN_LARGE, ROUND = 1 * MiB, 20 * MiB, 10 * MiB, 2 * MiB


class RefOOM(Exception):
    pass


class RefAllocator:
    """Independent model: segments of [addr, size, state] rows, state "A" allocated, "F" free,
    "U" unmapped (expandable segments)."""

    SPACE = 1 << 46

    def __init__(self, *, expandable=False, max_split_mb=None, divisions=None, gc=0.0, cap=None,
                 non_split_rounding=LARGE):
        self.expandable, self.cap, self.gc = expandable, cap, gc if cap is not None else 0.0
        self.max_split = max_split_mb * MiB if max_split_mb else None
        self.divisions = divisions or [0] * 16
        self.nsr = non_split_rounding
        self.segs = []  # dicts: stream, small, base, rows, exp
        self.where = {}  # key -> (seg, addr)
        self.count = 0
        self.calls = {True: 0, False: 0}
        self.base = {}  # (seg id, addr) -> gc base of a free row

    # rounding: round_size / roundup_power2_next_division, from the C++ text
    def round(self, n):
        if n < 512:
            return 512
        idx = min(max(n.bit_length() - 1 - 20, 0), 15)
        d = self.divisions[idx]
        if d > 1 and n > 512 * d:
            if n & (n - 1) == 0:
                return n
            p2 = 1 << (n.bit_length() - 1)
            step = p2 // d
            if step == 0:
                return 2 * p2
            if n % step == 0:
                return n
            return (n // step + 1) * step
        return -(-n // 512) * 512

    @property
    def reserved(self):
        return sum(r[1] for s in self.segs for r in s["rows"] if r[2] != "U")

    def big(self, size):
        return size >= self.max_split if self.max_split else False

    def free_rows(self, stream, small):
        """(size, addr, seg, row) of every free mapped row of this pool and stream."""
        out = [(r[1], r[0], s, r) for s in self.segs if s["stream"] == stream and s["small"] == small
               for r in s["rows"] if r[2] == "F"]
        return sorted(out, key=lambda x: (x[0], x[1]))

    def mark(self, seg, row):
        self.base[(id(seg), row[0])] = self.calls[seg["small"]]

    def coalesce(self, seg):
        rows, out = seg["rows"], []
        for r in rows:
            if out and out[-1][2] == r[2] and r[2] in "FU" and out[-1][0] + out[-1][1] == r[0]:
                out[-1][1] += r[1]
            else:
                out.append(r)
        seg["rows"] = out

    def malloc(self, key, n, stream=0):
        size = self.round(n)
        small = size <= SMALL
        alloc = 2 * MiB if small else LARGE if size < MIN_LARGE else -(-size // ROUND) * ROUND
        found = self.get_free(stream, small, size)
        if found is None:
            if self.gc:
                self.collect()
            found = self.new_block(stream, small, size, alloc)
            if found is None and self.release_oversize(stream, small, size):
                found = self.new_block(stream, small, size, alloc)
            if found is None:
                self.release_all()
                found = self.new_block(stream, small, size, alloc)
                if found is None:
                    raise RefOOM(key)
        seg, row = found
        rest = row[1] - size
        split = rest >= 512 if (small or self.expandable) else (not self.big(size) and rest > SMALL)
        i = seg["rows"].index(row)
        if split:
            seg["rows"][i:i + 1] = [[row[0], size, "A"], [row[0] + size, rest, "F"]]
            self.mark(seg, seg["rows"][i + 1])
        else:
            seg["rows"][i] = [row[0], row[1], "A"]
        self.where[key] = (seg, row[0])

    def free(self, key):
        seg, addr = self.where.pop(key)
        row = next(r for r in seg["rows"] if r[0] == addr)
        row[2] = "F"
        self.coalesce(seg)
        self.mark(seg, next(r for r in seg["rows"] if r[0] <= addr < r[0] + r[1]))

    def span(self, seg, row):
        i = seg["rows"].index(row)
        nxt = seg["rows"][i + 1] if i + 1 < len(seg["rows"]) else None
        return row[1] + (nxt[1] if nxt is not None and nxt[2] == "U" else 0)

    def get_free(self, stream, small, size):
        if self.gc:
            self.calls[small] += 1
        cands = [c for c in self.free_rows(stream, small) if c[0] >= size]
        if not cands:
            return None
        j = 0
        if self.expandable:
            spans = [self.span(c[2], c[3]) for c in cands]
            while j + 1 < len(cands) and spans[j + 1] < spans[j]:
                j += 1
        bsize, _, seg, row = cands[j]
        if self.max_split and size < self.max_split <= bsize:
            return None
        if self.max_split and size >= self.max_split and bsize >= size + self.nsr:
            return None
        return seg, row

    def new_block(self, stream, small, size, alloc):
        if self.cap is not None and self.reserved + alloc > self.cap:
            return None
        if not self.expandable:
            self.count += 1
            seg = {"stream": stream, "small": small, "base": self.count << 50, "rows": [], "exp": False}
            seg["rows"] = [[seg["base"], alloc, "F"]]
            self.segs.append(seg)
            return seg, seg["rows"][0]
        page = 2 * MiB if small else LARGE
        mine = [s for s in self.segs if s["stream"] == stream and s["small"] == small]
        start = None
        for seg in mine:
            rows = seg["rows"]
            for i, r in enumerate(rows):
                if r[2] != "U":
                    continue
                k = i - 1 if i > 0 and rows[i - 1][2] == "F" else i
                total, m = 0, k
                while total < size and m < len(rows) and rows[m][2] != "A":
                    total += rows[m][1]
                    m += 1
                if total >= size:
                    start = (seg, rows[k][0])
                    break
            if start:
                break
        if start is None:
            self.count += 1
            seg = {"stream": stream, "small": small, "base": self.count << 50, "exp": True}
            seg["rows"] = [[seg["base"], self.SPACE, "U"]]
            self.segs.append(seg)
            start = (seg, seg["base"])
        seg, addr = start
        end = seg["base"] + -(-(addr + size - seg["base"]) // page) * page
        for r in [r for r in seg["rows"] if r[2] == "U" and r[0] < end and r[0] + r[1] > addr]:
            top = min(r[0] + r[1], end)  # map this unmapped run's pages up to the end: all or none
            if self.cap is not None and self.reserved + top - r[0] > self.cap:
                return None
            i = seg["rows"].index(r)
            rest = [[top, r[0] + r[1] - top, "U"]] if top < r[0] + r[1] else []
            seg["rows"][i:i + 1] = [[r[0], top - r[0], "F"]] + rest
            self.coalesce(seg)
        row = next(r for r in seg["rows"] if r[0] == addr)
        return seg, row

    def release_oversize(self, stream, small, size):
        if not self.max_split or self.expandable:
            return False
        key = max(size, self.max_split)
        cands = self.free_rows(stream, small)
        fit = [c for c in cands if c[0] >= key]
        if fit:
            self.segs.remove(fit[0][2])
            return True
        got = 0
        for bsize, _, seg, _ in reversed(cands):
            if got >= key or bsize < self.max_split:
                break
            got += bsize
            self.segs.remove(seg)
        return got >= key

    def release_all(self):
        for seg in list(self.segs):
            if not seg["exp"]:
                if len(seg["rows"]) == 1 and seg["rows"][0][2] == "F":
                    self.segs.remove(seg)
                continue
            page = 2 * MiB if seg["small"] else LARGE
            rows = []
            for r in seg["rows"]:
                if r[2] != "F":
                    rows.append(r)
                    continue
                lo = seg["base"] + -(-(r[0] - seg["base"]) // page) * page
                hi = seg["base"] + (r[0] + r[1] - seg["base"]) // page * page
                if lo >= hi:
                    rows.append(r)
                    continue
                for a, b, st in ((r[0], lo, "F"), (lo, hi, "U"), (hi, r[0] + r[1], "F")):
                    if b > a:
                        rows.append([a, b - a, st])
            seg["rows"] = rows
            self.coalesce(seg)
            for r in seg["rows"]:
                if r[2] == "F" and (id(seg), r[0]) not in self.base:
                    self.mark(seg, r)
            if len(seg["rows"]) == 1 and seg["rows"][0][2] == "U":
                self.segs.remove(seg)

    def collect(self):
        limit = int(self.gc * self.cap)
        if self.reserved <= limit:
            return
        target, got = self.reserved - limit, 0
        calls = self.calls[False]

        def whole():
            out = [(s["stream"], s["rows"][0][1], s["rows"][0][0], s) for s in self.segs
                   if not s["small"] and not s["exp"] and len(s["rows"]) == 1 and s["rows"][0][2] == "F"]
            return sorted(out, key=lambda x: x[:3])

        def age(s):
            return calls - self.base[(id(s), s["rows"][0][0])]

        blocks = whole()
        if not blocks:
            return
        total, count = sum(age(s) for *_, s in blocks), len(blocks)
        freed = True
        while got < target and freed and count > 0:
            threshold = total / count
            freed = False
            for *_, s in whole():
                if age(s) >= threshold:
                    freed = True
                    got += s["rows"][0][1]
                    total -= age(s)
                    count -= 1
                    self.segs.remove(s)


CONFS = {
    "default": ("", {}),
    "expandable": ("expandable_segments:True", {"expandable": True}),
    "max_split": ("max_split_size_mb:64", {"max_split_mb": 64}),
    "max_split_rounding": ("max_split_size_mb:32,max_non_split_rounding_mb:24",
                           {"max_split_mb": 32, "non_split_rounding": 24 * MiB}),
    "roundup": ("roundup_power2_divisions:4", {"divisions": [4] * 16}),
    # parseRoundUpPower2Divisions: unlisted intervals between entries keep 0 (512 B rounding) and
    # ">" fills from the last listed interval on, that one included
    "roundup_list": ("roundup_power2_divisions:[1:2,4:8,16:4,>:2]", {"divisions": [2, 0, 8, 0] + [2] * 12}),
    "gc": ("garbage_collection_threshold:0.6", {"gc": 0.6}),
}


def random_events(seed: int, n: int = 500, streams: int = 1):
    rng = random.Random(seed)
    live, out, key = [], [], 0
    for _ in range(n):
        if live and rng.random() < 0.45:
            out.append(("free", live.pop(rng.randrange(len(live)))))
            continue
        kind = rng.random()
        size = (rng.randrange(1, 1 << 20) if kind < 0.4 else rng.randrange(1 << 20, 12 << 20) if kind < 0.75
                else rng.randrange(12 << 20, 160 << 20))
        out.append(("malloc", key, size, rng.randrange(streams)))
        live.append(key)
        key += 1
    return out


def compare(events, text, ref_kwargs, cap=None):
    """Reserved after every event, planner.cuda_alloc vs the reference; OOM at the same event."""
    ours = CachingAllocator(AllocConf.parse(text), cap)
    ref = RefAllocator(cap=cap, **ref_kwargs)
    for i, ev in enumerate(events):
        results = []
        for a, oom in ((ours, OutOfMemory), (ref, RefOOM)):
            try:
                a.malloc(*ev[1:]) if ev[0] == "malloc" else a.free(ev[1])
                results.append(True)
            except oom:
                results.append(False)
        assert results[0] == results[1], f"event {i} {ev}: ours ok={results[0]}, ref ok={results[1]}"
        if not results[0]:
            return i
        assert ours.reserved == ref.reserved, f"event {i} {ev}: {ours.reserved} vs {ref.reserved}"
    return None


@pytest.mark.parametrize("name", sorted(CONFS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_the_reference_event_by_event(name, seed):
    text, kwargs = CONFS[name]
    events = random_events(seed, streams=2 if seed == 3 else 1)
    compare(events, text, kwargs)  # uncapped
    # under a cap: the OOM retry path (release_cached_blocks) and, for gc, garbage collection
    live, top = {}, 0
    for ev in events:
        if ev[0] == "malloc":
            live[ev[1]] = ev[2]
        else:
            live.pop(ev[1])
        top = max(top, sum(live.values()))
    for cap in (int(top * 1.15) // ROUND * ROUND, int(top * 1.4) // ROUND * ROUND):
        compare(events, text, kwargs, cap=cap)


def tiny_graph():
    from transformers import LlamaConfig

    from planner.model import ModelSpec
    from planner.trace import StepShape, TraceOptions, trace_step

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8192)
    return trace_step(ModelSpec(name="tiny", source="config", config=config, num_layers=2),
                      StepShape(batch=2, seq_len=512), TraceOptions())


@pytest.fixture(scope="module")
def graph():
    return tiny_graph()


def graph_events(graph, workspace=32 * MiB, count=2):
    """The traced step as allocator events, in replay's order: workspaces, storages live before
    the step in id order, then per op its frees and its allocations."""
    n = len(graph.ops)
    st = [s for s in graph.storages.values() if s.nbytes > 0]
    pre = [("malloc", ("ws", i), workspace, 0) for i in range(count)]
    pre += [("malloc", s.id, s.nbytes, 0) for s in sorted(st, key=lambda s: s.id) if s.alloc_op is None]
    per_op = [[] for _ in range(n)]
    for s in sorted(st, key=lambda s: s.id):
        if s.free_op is not None and s.free_op + 1 < n:
            per_op[s.free_op + 1].insert(0, ("free", s.id))
    for s in sorted(st, key=lambda s: s.id):
        if s.alloc_op is not None:
            per_op[s.alloc_op].append(("malloc", s.id, s.nbytes, 0))
    for ops in per_op:  # frees first, in id order, then allocations in id order
        ops.sort(key=lambda e: (e[0] != "free", e[1] if e[0] == "free" else 0))
    return pre, per_op


@pytest.mark.parametrize("name", ["default", "expandable", "max_split", "roundup", "roundup_list"])
def test_traced_step_reserved_matches_the_reference_op_by_op(graph, name):
    text, kwargs = CONFS[name]
    tl = replay(graph, allocator="cuda", sm=90, alloc_conf=text)
    pre, per_op = graph_events(graph)
    ref = RefAllocator(**kwargs)
    for ev in pre:
        ref.malloc(*ev[1:])
    got = []
    for ops in per_op:
        for ev in ops:
            ref.malloc(*ev[1:]) if ev[0] == "malloc" else ref.free(ev[1])
        got.append(ref.reserved)
    assert tl.reserved_bytes.tolist() == got


def test_least_memory_lies_between_the_allocated_and_the_reserved_peak(graph):
    tl = replay(graph, allocator="cuda", sm=90, least=True)
    assert tl.peak_bytes <= tl.least_bytes <= tl.peak_reserved_bytes
    # the reference confirms the boundary: the step runs under the least memory, not 2 MiB less
    pre, per_op = graph_events(graph)
    flat = pre + [e for ops in per_op for e in ops]
    assert compare(flat, "", {}, cap=tl.least_bytes) is None
    assert compare(flat, "", {}, cap=tl.least_bytes - ROUND) is not None


def test_least_memory_of_a_fragmenting_step_is_under_its_reserved_peak():
    # 12 MiB and 14 MiB activations one after the other: the second fits in none of the cached
    # segments (reserved 12 + 14), but freeing the cached one and retrying needs only 14.
    g = make_graph(4, [(12 * MiB, Component.ACTIVATIONS, 0, 1), (14 * MiB, Component.ACTIVATIONS, 2, None)])
    tl = replay(g, allocator="cuda", cublas_workspaces=0, least=True)
    assert tl.peak_reserved_bytes == 26 * MiB
    assert tl.least_bytes == 14 * MiB == tl.peak_bytes
    # expandable segments: one segment growing in 20 MiB pages, the freed pages reused; the
    # first page must fit under the cap too
    ex = replay(g, allocator="cuda", cublas_workspaces=0, alloc_conf="expandable_segments:True", least=True)
    assert ex.peak_reserved_bytes == 20 * MiB and ex.least_bytes == 20 * MiB


def make_graph(n_ops, storages):
    infos = {i: StorageInfo(id=i, nbytes=b, component=c, alloc_op=a, free_op=f, saved=False, layer=None)
             for i, (b, c, a, f) in enumerate(storages)}
    ops = [OpNode(index=k, name="aten.empty.memory_format", module="", phase=Phase.FORWARD, layer=None,
                  inputs=(), outputs=tuple(i for i, s in infos.items() if s.alloc_op == k),
                  allocs=tuple(i for i, s in infos.items() if s.alloc_op == k), out_bytes=0, flops=0)
           for k in range(n_ops)]
    return OpGraph(ops, infos)


def test_a_budget_between_least_and_reserved_fits():
    e = Estimate(strategy=Strategy(), peak_bytes={Tier.GPU: 30 * 2**30, Tier.HOST: 0, Tier.DISK: 0},
                 components={Tier.GPU: {Component.WEIGHTS: 30 * 2**30}}, reserved_bytes=36 * 2**30,
                 least_bytes=31 * 2**30, step_time_s=1.0, worst_chunk=None)
    budget = Budget(gpu_bytes=33 * 2**30)
    assert e.fits(budget) and e.need_bytes(Tier.GPU) == 31 * 2**30
    assert not e.fits(Budget(gpu_bytes=31 * 2**30 - 1))
    doc = e.to_json()
    assert doc["least_bytes"] == 31 * 2**30 and Estimate.from_json(doc).least_bytes == 31 * 2**30
    # a plan file from before the field: its reserved bytes stand for the least memory
    del doc["least_bytes"]
    old = Estimate.from_json(doc)
    assert old.least_bytes is None and old.need_bytes(Tier.GPU) == 36 * 2**30 and not old.fits(budget)


# --- PyTorch's own expectations (test/test_cuda.py test_allocator_settings, c10 AllocatorConfig
# parsing), where they are arithmetic


def power2_div(size, div_factor):  # test_cuda.py's helper
    pow2 = 1
    while pow2 < size:
        pow2 *= 2
    if pow2 == size:
        return pow2
    step = pow2 / 2 / div_factor
    ret = pow2 / 2
    while ret < size:
        ret += step
    return ret


def test_roundup_power2_divisions_as_test_cuda_expects():
    nbytes, nbytes_big = 4 * 21 * MiB, 4 * 100 * MiB
    assert AllocConf.parse("").round_size(nbytes) == nbytes
    assert AllocConf.parse("roundup_power2_divisions:4").round_size(nbytes) == power2_div(nbytes, 4) == 96 * MiB
    listed = AllocConf.parse("garbage_collection_threshold:0.5,"
                             "roundup_power2_divisions:[64:8,128:2,256:2,512:2,1024:1,>:1]")
    assert listed.round_size(nbytes) == power2_div(nbytes, 8) == 88 * MiB
    assert listed.round_size(nbytes_big) == power2_div(nbytes_big, 2) == 512 * MiB
    assert listed.garbage_collection_threshold == 0.5
    # roundup_power2_next_division's own comment: 1200 with 4 divisions -> 1280
    assert roundup_power2_next_division(1200, 4) == 1280
    # sizes at or under 512 B x divisions keep the 512 B rounding
    assert AllocConf.parse("roundup_power2_divisions:8").round_size(3000) == 3072


def test_max_split_size_as_test_cuda_exercises_it():
    # test_max_split_expandable's non-expandable half: a 120 MiB cap, max_split_size_mb:40
    a = CachingAllocator(AllocConf.parse("max_split_size_mb:40"), cap=120 * MiB)
    for k in "abc":
        a.malloc(k, 40 * MiB)
    with pytest.raises(OutOfMemory):
        a.malloc("d", 40 * MiB)
    assert a.retries == 1  # the failed request freed what it could (nothing) and retried
    for k in "abc":
        a.free(k)
    # 120 MiB: no oversize block is large enough; release_available_cached_blocks frees the
    # three, before (and instead of) release_cached_blocks' retry
    a.malloc("e", 120 * MiB)
    assert a.reserved == 120 * MiB and a.retries == 1
    # an oversize block serves a request within max_non_split_rounding (20 MiB) of it only
    b = CachingAllocator(AllocConf.parse("max_split_size_mb:40"))
    b.malloc("x", 100 * MiB)
    b.free("x")
    b.malloc("y", 90 * MiB)
    assert b.reserved == 100 * MiB
    b.malloc("z", 50 * MiB)  # 50 + 20 <= 100: a new segment, the 100 MiB block is not split
    assert b.reserved == 150 * MiB


def test_garbage_collection_frees_old_blocks_before_the_retry():
    # test_garbage_collect_expandable's shape: cap 120 MiB, threshold 0.5, two 40 MiB blocks freed
    for text, retries in (("garbage_collection_threshold:0.5", 0), ("", 1)):
        a = CachingAllocator(AllocConf.parse(text), cap=120 * MiB)
        a.malloc("a", 40 * MiB)
        a.malloc("b", 40 * MiB)
        a.free("a")
        a.free("b")
        a.malloc("c", 80 * MiB)
        assert a.reserved == 80 * MiB and a.retries == retries


def test_parse_and_normalise():
    c = AllocConf.parse(" max_split_size_mb:128 , expandable_segments:True,backend:native,"
                        "roundup_power2_divisions:[256:1,512:2,1024:4,>:8]")
    assert c.expandable_segments and c.max_split_size == 128 * MiB
    # the list form: 256 MiB and below -> 1, 512 -> 2, 1024 and above -> 8 (">" also takes the
    # last listed interval, as parseRoundUpPower2Divisions fills from it)
    assert c.divisions(100 * MiB) == 1 and c.divisions(300 * MiB) == 1 and c.divisions(600 * MiB) == 2
    assert c.divisions(1500 * MiB) == 8 and c.divisions(40 * 2**30) == 8
    assert AllocConf.parse(c.normalised()) == c
    assert AllocConf.parse("").normalised() == "" and AllocConf.parse("backend:native").is_default
    assert AllocConf.parse("expandable_segments:False").normalised() == ""


@pytest.mark.parametrize("text, says", [
    ("foo:1,bar:2", "unknown alloc conf key 'foo': valid keys are expandable_segments"),
    ("garbage_collection_threshold:1.2", "invalid garbage_collection_threshold '1.2': must be a number in (0.0, 1.0)"),
    ("max_split_size_mb:2", "invalid max_split_size_mb '2': must be an integer number of MiB >= 20"),
    ("expandable_segments:yes", "invalid expandable_segments 'yes': must be True or False"),
    ("roundup_power2_divisions:3", "invalid roundup_power2_divisions '3'"),
    ("roundup_power2_divisions:[100:2]", "invalid roundup_power2_divisions '[100:2]'"),
    ("backend:cudaMallocAsync", "alloc conf backend 'cudaMallocAsync' is not modelled"),
    ("expandable_segments", "invalid alloc conf item 'expandable_segments': expected key:value"),
    ("max_split_size_mb:64,max_split_size_mb:128", "alloc conf key 'max_split_size_mb' is given twice"),
])
def test_bad_alloc_conf_is_one_line(text, says):
    with pytest.raises(ChunkftError) as e:
        AllocConf.parse(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_recipe_keeps_the_alloc_conf_normalised():
    from planner.recipe import Recipe

    r = Recipe(alloc_conf="max_split_size_mb:128, expandable_segments:True")
    assert r.alloc_conf == "expandable_segments:True,max_split_size_mb:128"
    r.require_modelled()  # priced: no longer refused
    with pytest.raises(ChunkftError, match="unknown alloc conf key 'foo'"):
        Recipe(alloc_conf="foo:1")


def test_side_stream_pool_fragments_with_differently_sized_spans():
    # chunks of (30, 10), (12, 12, 12) and (40) MiB of state, one chunk prefetched ahead: the
    # 40 MiB chunk fits in none of the freed blocks of the first, so the pool holds 116 MiB,
    # while at most 80 MiB (chunks 2 and 0) are ever live: that is what it needs under a cap.
    reserved, least = side_stream_pool(((30 * MiB, 10 * MiB), (12 * MiB,) * 3, (40 * MiB,)), 1)
    assert (reserved, least) == (116 * MiB, 80 * MiB)
    # equal spans reuse each other's blocks: the pool is the live state, two chunks of it
    assert side_stream_pool(((16 * MiB,) * 2,) * 4, 1) == (64 * MiB, 64 * MiB)
