"""Plain-Python twin of kvbm._fast.registry.BlockRegistry, written for clarity (dicts and lists).

Same API, same semantics, same results: block ids handed out, eviction order and tie-breaking,
ticks, dedup, lineage, the evicted-hash ring, LINEAGE's ghost table (an OrderedDict here: FIFO of
at most G live (hash -> use count) entries), ADAPTIVE's credit, its shadow tuner
(_reference_shadow.py, fed at each release of a REGISTERED block) and its sweep. This file
is the spec of the registry's policies (kvbm/policy.py); the study behind them:
research/eviction/. The differential tests drive both with the same random operation sequences and
compare every return value. Speed is irrelevant here, except that the inactive set is a heapq with
lazy deletion so that benchmarks against it finish.

Order of things inside one call mirrors the Cython loops: validate the whole batch (raise
RegistryError, change nothing), then apply slot by slot.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from kvbm._fast._reference_shadow import SHADOW_LEVELS, ShadowTuner, credit_of, f_of
from kvbm.errors import RegistryError
from kvbm.policy import (
    ADAPTIVE_DECAY,
    ADAPTIVE_LEVEL,
    ADAPTIVE_MINI_BLOCKS,
    POLICY_ADAPTIVE,
    POLICY_LINEAGE,
    POLICY_LRU,
    BlockState,
    EvictionPolicy,
    has_ghost_table,
)

_MAX_BLOCKS = 2147483646
_U64 = (1 << 64) - 1
_LEVEL_BITS = 16     # ADAPTIVE: levels per doubling of the credit weight W: 2**16
_LEVEL_MAX = 9 << _LEVEL_BITS   # W = 32; level 0 is W = 1/16, -1 is W = 0 (kvbm/_fast/_adapt.pxd)
_SWEEP_BURST = 16                # ADAPTIVE: keys the sweep re-keys per eviction after a move


@dataclass(slots=True)
class _Block:
    state: BlockState = BlockState.RESET
    refcount: int = 0
    hash: int = 0
    priority: int = 0
    tick: int = 0
    use_count: int = 0
    parent: int = -1
    children: list[int] = field(default_factory=list)  # child block ids (order irrelevant)


def _ints(x, what: str, lo: int, hi: int) -> list[int]:
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as err:
        raise RegistryError(f"{what}: cannot convert to an array ({err})") from err
    if arr.ndim != 1:
        raise RegistryError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iuO":
        raise RegistryError(f"{what} must be integers, got dtype {arr.dtype}")
    values = arr.tolist()
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > hi:
            raise RegistryError(f"{what}: value {v!r} is not an integer in [{lo}, {hi}]")
    return values


def _hashes(x, what: str) -> list[int]:
    return _ints(x, what, 0, _U64)


class ReferenceRegistry:
    """See BlockRegistry (kvbm/_fast/registry.pyx) for the documentation of every method."""

    def __init__(self, num_blocks: int, buffer=None, policy: int = POLICY_LRU,
                 ghost_blocks: int | None = None) -> None:
        if not isinstance(num_blocks, int) or not 1 <= num_blocks <= _MAX_BLOCKS:
            raise RegistryError(f"num_blocks must be in [1, {_MAX_BLOCKS}], got {num_blocks}")
        if policy not in tuple(EvictionPolicy):
            raise RegistryError(f"unknown eviction policy {policy}")
        g = num_blocks if ghost_blocks is None else self._count(ghost_blocks, "ghost_blocks")
        if g > _MAX_BLOCKS:
            raise RegistryError(f"ghost_blocks must be in [0, {_MAX_BLOCKS}], got {g}")
        self._ghost_cap = g if has_ghost_table(policy) else 0
        self._ghost: OrderedDict[int, int] = OrderedDict()   # evicted hash -> use count, oldest first
        self._n = num_blocks
        self._policy = int(policy)
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # FIFO: append right, pop left
        self._index: dict[int, int] = {}                    # hash -> block (REGISTERED)
        self._inactive: dict[int, tuple] = {}               # block -> its heap entry
        self._heap: list[tuple] = []                        # (key1, key2, block), lazy deletion
        self._tick = 0
        self._ring: deque[int] = deque(maxlen=num_blocks)
        self._dropped = 0
        # ADAPTIVE's state (the registry's header; kvbm/_fast/_adapt.pxd, _shadow.pxd)
        self._level = ADAPTIVE_LEVEL
        self._leaf = True
        self._tune = True        # the shadow tuner moves the level
        self._tuner = ShadowTuner(num_blocks, ADAPTIVE_MINI_BLOCKS, ADAPTIVE_DECAY, ADAPTIVE_LEVEL)
        self._hits_once = 0
        self._hits_reused = 0
        self._ghost_once = 0     # live ghost entries with count < 2 (the header's ghost_once)
        self._sweep = 0          # the block the sweep re-keys next
        self._stale = 0          # blocks the sweep has still to re-key since the last move

    # ---- properties ----
    num_blocks = property(lambda self: self._n)
    num_free = property(lambda self: len(self._free))
    num_inactive = property(lambda self: len(self._inactive))
    num_active = property(lambda self: self._n - len(self._free) - len(self._inactive))
    num_registered = property(lambda self: len(self._index))
    tick = property(lambda self: self._tick)
    policy = property(lambda self: self._policy)
    num_evicted_dropped = property(lambda self: self._dropped)
    ghost_blocks = property(lambda self: self._ghost_cap)
    num_ghosts = property(lambda self: len(self._ghost))

    @property
    def adaptive(self) -> dict:
        t = self._tuner
        return dict(level=self._level, credit=credit_of(self._n, self._level), tune=self._tune,
                    leaf_first=self._leaf, stale=self._stale, rate=t.rate, mini_blocks=t.m,
                    epochs=t.epochs, decay=t.decay,
                    current=t.current, levels=list(SHADOW_LEVELS), scores=list(t.score),
                    hits=[m.hits for m in t.minis], evictions=[m.evictions for m in t.minis],
                    ghost_hits_once=self._hits_once, ghost_hits_reused=self._hits_reused,
                    ghost_once=self._ghost_once)

    def set_adaptive(self, level=None, leaf_first=None, tune=None, decay=None) -> None:
        if self._policy != POLICY_ADAPTIVE:
            raise RegistryError(f"set_adaptive: policy {self._policy} is not ADAPTIVE")
        lv = self._level if level is None else self._count(level + 1, "set_adaptive: level + 1") - 1
        dc = self._tuner.decay if decay is None else self._count(decay, "set_adaptive: decay")
        if lv > _LEVEL_MAX or dc > 1 << 16:
            raise RegistryError(f"set_adaptive: level {lv} or decay {dc} out of range")
        tn = self._tune if tune is None else bool(tune)          # before any write
        lf = self._leaf if leaf_first is None else bool(leaf_first)
        self._level = lv
        self._tuner.current = SHADOW_LEVELS.index(lv) if lv in SHADOW_LEVELS else -1
        self._tuner.decay = dc
        self._tune, self._leaf = tn, lf
        self._stale = 0
        for b in list(self._inactive):     # a setting applies to every key
            self._update_key(b)

    # ---- policy ----
    def _key(self, b: int) -> tuple:
        blk = self._blocks[b]
        if self._policy == POLICY_LRU:
            return (blk.priority, blk.tick, b)
        if self._policy in (POLICY_LINEAGE, POLICY_ADAPTIVE):
            # the registry's words: key1 = (priority + 2^31) << 1 | has child, key2 saturating.
            # ADAPTIVE: its current credit (keys already in the heap keep theirs), leaf bit optional
            lineage = self._policy == POLICY_LINEAGE
            unit = 2 * self._n if lineage else credit_of(self._n, self._level)
            leaf = 1 if (lineage or self._leaf) and blk.children else 0
            credit = unit * f_of(blk.use_count)
            return (((blk.priority + (1 << 31)) << 1) | leaf, min(blk.tick + credit, _U64), b)
        raise AssertionError(self._policy)

    def _key_current(self, b: int) -> bool:
        # the stored key is what the policy computes now; ADAPTIVE: a reused block the sweep has
        # not reached since the tuner's last move keeps the credit of when its key was computed,
        # so only key1 and key2 >= its tick are checked there
        have, now = self._inactive[b], self._key(b)
        if self._policy == POLICY_ADAPTIVE and self._blocks[b].use_count >= 2 \
                and (b - self._sweep) % self._n < self._stale:
            return have[0] == now[0] and have[1] >= self._blocks[b].tick and have[2] == b
        return have == now

    def _update_key(self, b: int) -> None:
        if b in self._inactive:
            self._inactive[b] = entry = self._key(b)
            heapq.heappush(self._heap, entry)

    def _make_inactive(self, b: int) -> None:
        self._inactive[b] = entry = self._key(b)
        heapq.heappush(self._heap, entry)

    def _make_active(self, b: int) -> None:
        del self._inactive[b]

    def _pop_victim(self) -> int:
        while True:
            entry = heapq.heappop(self._heap)
            b = entry[-1]
            if self._inactive.get(b) == entry:
                del self._inactive[b]
                return b

    # ---- block life cycle ----
    def _touch(self, b: int) -> None:
        self._tick += 1
        self._blocks[b].tick = self._tick
        self._blocks[b].use_count = min(self._blocks[b].use_count + 1, 0xFFFFFFFF)
        self._update_key(b)

    def _evict_one(self) -> int:
        b = self._pop_victim()
        blk = self._blocks[b]
        del self._index[blk.hash]
        if blk.parent >= 0:
            self._blocks[blk.parent].children.remove(b)
            self._update_key(blk.parent)
        for c in blk.children:
            self._blocks[c].parent = -1
            self._update_key(c)
        if self._ghost_cap:
            if len(self._ghost) == self._ghost_cap:
                self._ghost_pop(next(iter(self._ghost)))      # the oldest is forgotten
            self._ghost[blk.hash] = blk.use_count
            self._ghost_once += blk.use_count < 2
        if len(self._ring) == self._n:
            self._dropped += 1
        self._ring.append(blk.hash)
        self._blocks[b] = _Block()
        if self._policy == POLICY_ADAPTIVE:
            # the sweep: after a move, 16 keys refreshed per eviction in block id order, until
            # all N are
            for _ in range(min(self._stale, _SWEEP_BURST)):
                self._update_key(self._sweep)
                self._sweep = (self._sweep + 1) % self._n
                self._stale -= 1
        return b

    def _ghost_pop(self, h: int) -> int:
        c = self._ghost.pop(h)
        self._ghost_once -= c < 2
        return c

    def _free_block(self, b: int) -> None:
        self._blocks[b] = _Block()
        self._free.append(b)

    # ---- validation ----
    def _check_ids(self, blocks, op: str) -> list[int]:
        ids = _ints(blocks, f"{op}: blocks", -(1 << 63), (1 << 63) - 1)
        for i, b in enumerate(ids):
            if not 0 <= b < self._n:
                raise RegistryError(f"{op}: block {b} (slot {i}) is out of range [0, {self._n})")
        return ids

    def _check_state(self, ids: list[int], op: str, allowed: set[BlockState]) -> None:
        for i, b in enumerate(ids):
            if self._blocks[b].state not in allowed:
                raise RegistryError(f"{op}: block {b} (slot {i}) is {self._blocks[b].state.name}")

    @staticmethod
    def _check_distinct(ids: list[int], op: str) -> None:
        if len(set(ids)) != len(ids):
            raise RegistryError(f"{op}: a block appears more than once")

    @staticmethod
    def _count(n, what: str) -> int:
        if not hasattr(n, "__index__"):
            raise RegistryError(f"{what} must be an integer, got {type(n).__name__}")
        n = n.__index__()
        if n < 0:
            raise RegistryError(f"{what} must be >= 0, got {n}")
        return n

    # ---- public API ----
    def allocate(self, n):
        n = self._count(n, "allocate: n")
        if n > len(self._free) + len(self._inactive):
            return None
        out = []
        for _ in range(n):
            b = self._free.popleft() if self._free else self._evict_one()
            self._blocks[b].state = BlockState.PARTIAL
            self._blocks[b].refcount = 1
            out.append(b)
        return np.array(out, dtype=np.int64)

    def complete(self, blocks) -> None:
        ids = self._check_ids(blocks, "complete")
        self._check_state(ids, "complete", {BlockState.PARTIAL})
        self._check_distinct(ids, "complete")
        for b in ids:
            self._blocks[b].state = BlockState.COMPLETE

    def register(self, blocks, hashes, parents=None, priorities=None, has_parent=None):
        ids = self._check_ids(blocks, "register")
        hs = _hashes(hashes, "register: hashes")
        if len(hs) != len(ids):
            raise RegistryError(f"register: {len(ids)} blocks but {len(hs)} hashes")
        if parents is not None:
            ps = _hashes(parents, "register: parents")
            if len(ps) != len(ids):
                raise RegistryError("register: lengths differ")
            if has_parent is None:
                mask = [True] * len(ids)
            else:
                m = np.asarray(has_parent)
                if m.ndim != 1 or (m.size and m.dtype.kind != "b") or m.size != len(ids):
                    raise RegistryError("register: has_parent must be bool, one per block")
                mask = [bool(v) for v in m.tolist()]
        elif has_parent is not None:
            raise RegistryError("register: has_parent given without parents")
        else:
            ps, mask = [0] * len(ids), [False] * len(ids)
        prios = None
        if priorities is not None:
            prios = _ints(priorities, "register: priorities", -(1 << 31), (1 << 31) - 1)
            if len(prios) != len(ids):
                raise RegistryError("register: lengths differ")
        self._check_state(ids, "register", {BlockState.COMPLETE})
        for b in ids:
            if self._blocks[b].refcount != 1:
                raise RegistryError(f"register: block {b} has refcount {self._blocks[b].refcount}")
        self._check_distinct(ids, "register")
        out = []
        for i, (b, h) in enumerate(zip(ids, hs)):
            e = self._index.get(h)
            if e is not None:
                if self._blocks[e].refcount == 0:
                    self._make_active(e)
                self._blocks[e].refcount += 1
                self._touch(e)
                self._free_block(b)
                out.append(e)
                continue
            p = self._index.get(ps[i], -1) if mask[i] else -1
            blk = self._blocks[b]
            blk.state = BlockState.REGISTERED
            blk.hash = h
            if prios is not None:
                blk.priority = prios[i]
            self._index[h] = b
            if h in self._ghost:
                # restored (replacing any touches while PARTIAL/COMPLETE), entry consumed; ADAPTIVE
                # counts the hit (a statistic)
                if self._policy == POLICY_ADAPTIVE:
                    if self._ghost[h] < 2:
                        self._hits_once += 1
                    else:
                        self._hits_reused += 1
                blk.use_count = self._ghost_pop(h)
            if p >= 0:
                blk.parent = p
                self._blocks[p].children.append(b)
                self._update_key(p)
            self._touch(b)
            out.append(b)
        return np.array(out, dtype=np.int64)

    def match(self, hashes, acquire=True):
        hs = _hashes(hashes, "match: hashes")
        out = []
        for h in hs:
            e = self._index.get(h)
            if e is None:
                break
            if acquire:
                if self._blocks[e].refcount == 0:
                    self._make_active(e)
                self._blocks[e].refcount += 1
                self._touch(e)
            out.append(e)
        return np.array(out, dtype=np.int64)

    def lookup(self, hashes):
        hs = _hashes(hashes, "lookup: hashes")
        return np.array([self._index.get(h, -1) for h in hs], dtype=np.int64)

    def touch(self, blocks) -> None:
        ids = self._check_ids(blocks, "touch")
        self._check_state(ids, "touch", {BlockState.PARTIAL, BlockState.COMPLETE,
                                         BlockState.REGISTERED})
        for b in ids:
            self._touch(b)

    def release(self, blocks) -> None:
        ids = self._check_ids(blocks, "release")
        counts: dict[int, int] = {}
        for b in ids:
            counts[b] = counts.get(b, 0) + 1
            if counts[b] > self._blocks[b].refcount:
                raise RegistryError(f"release: block {b} released {counts[b]} times, "
                                    f"refcount {self._blocks[b].refcount}")
        tune = self._policy == POLICY_ADAPTIVE and self._tune
        for b in ids:
            blk = self._blocks[b]
            blk.refcount -= 1
            if blk.refcount == 0:
                if blk.state != BlockState.REGISTERED:
                    self._free_block(b)
                    continue
                self._tick += 1
                blk.tick = self._tick
                self._make_inactive(b)
            elif blk.state != BlockState.REGISTERED:
                continue
            if tune:       # a use ended: the tuner sees it after the block's own release
                level = self._tuner.use(blk.hash, self._leaf and bool(blk.children))
                if level is not None:
                    self._level = level
                    self._stale = self._n

    def evict(self, n):
        n = min(self._count(n, "evict: n"), len(self._inactive))
        out = []
        for _ in range(n):
            b = self._evict_one()
            out.append(self._ring[-1])
            self._free.append(b)
        return np.array(out, dtype=np.uint64)

    def take_victims(self, n):
        n = min(self._count(n, "take_victims: n"), len(self._inactive))
        blocks, hashes = [], []
        for _ in range(n):
            b = self._evict_one()
            hashes.append(self._ring[-1])
            self._blocks[b].state = BlockState.PARTIAL
            self._blocks[b].refcount = 1
            blocks.append(b)
        return np.array(blocks, dtype=np.int64), np.array(hashes, dtype=np.uint64)

    def drain_evicted(self):
        out = np.array(list(self._ring), dtype=np.uint64)
        self._ring.clear()
        return out

    def set_priority(self, blocks, priorities) -> None:
        ids = self._check_ids(blocks, "set_priority")
        prios = _ints(priorities, "set_priority: priorities", -(1 << 31), (1 << 31) - 1)
        if len(prios) != len(ids):
            raise RegistryError("set_priority: lengths differ")
        self._check_state(ids, "set_priority", {BlockState.PARTIAL, BlockState.COMPLETE,
                                                BlockState.REGISTERED})
        for b, p in zip(ids, prios):
            self._blocks[b].priority = p
            self._update_key(b)

    def info(self, block) -> dict:
        b = self._count(block, "info: block")
        if b >= self._n:
            raise RegistryError(f"info: block {b} is out of range [0, {self._n})")
        blk = self._blocks[b]
        return dict(state=blk.state, refcount=blk.refcount, hash=blk.hash, priority=blk.priority,
                    tick=blk.tick, use_count=blk.use_count, parent=blk.parent,
                    children=len(blk.children))

    def check_invariants(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise RegistryError("free list holds a block twice")
        active = 0
        for b, blk in enumerate(self._blocks):
            if blk.refcount > 0:
                active += 1
            if (blk.state == BlockState.RESET) != (b in free):
                raise RegistryError(f"block {b} is {blk.state.name}, in free list: {b in free}")
            if blk.state == BlockState.REGISTERED:
                if self._index.get(blk.hash) != b:
                    raise RegistryError(f"block {b} not indexed under {blk.hash}")
                if (blk.refcount == 0) != (b in self._inactive):
                    raise RegistryError(f"block {b}: refcount {blk.refcount}, inactive "
                                        f"{b in self._inactive}")
                if b in self._inactive and not self._key_current(b):
                    raise RegistryError(f"block {b} has a stale key")
                if blk.parent >= 0 and b not in self._blocks[blk.parent].children:
                    raise RegistryError(f"block {b} missing from its parent's children")
                for c in blk.children:
                    if self._blocks[c].parent != b:
                        raise RegistryError(f"child {c} of {b} points at {self._blocks[c].parent}")
            elif blk.state in (BlockState.PARTIAL, BlockState.COMPLETE) and blk.refcount != 1:
                raise RegistryError(f"block {b} is {blk.state.name} with refcount {blk.refcount}")
        if len(self._free) + len(self._inactive) + active != self._n:
            raise RegistryError(f"free {len(self._free)} + inactive {len(self._inactive)} + "
                                f"active {active} != {self._n}")
        if len(self._index) != sum(b.state == BlockState.REGISTERED for b in self._blocks):
            raise RegistryError("index size differs from the number of REGISTERED blocks")
        if len(self._ghost) > self._ghost_cap or any(h in self._index for h in self._ghost):
            raise RegistryError("ghost table over capacity or holding a REGISTERED hash")
