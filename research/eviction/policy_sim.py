"""Pure-Python prefix KV-cache simulator, eviction policies, a tiered (G1/G2/G3) replay model and a
synthetic Mooncake-like trace generator.

Every policy is a *priority key* per inactive block in a min-heap (the smallest key is evicted),
computed from O(1) per-block metadata -- exactly the fields kvbm/_fast/registry.pyx keeps (priority,
last-use tick, use count, children count, parent link) plus constants fixed at construction -- so a
policy ports into the registry's `_policy_key` mechanically. Keys are two words (key1, key2) like
the registry's heap entries; here a key is the Python int key1 << 64 | key2. The product's own
policies are specified by its twin, kvbm/_fast/_reference.py (`ReferenceRegistry._key`); `LRU` and
`Lineage` here are their models on this simulator (parametrised for the ablations), held to the
product by `lineage_key()` and by the replays of tests/test_policy_sim.py on the real registry.
See POLICY.md (beside this file) for the semantics, the formulas and the results.

Simulation semantics (they reproduce the issue's LRU / Belady numbers, see POLICY.md):
  for each request, in trace order:
    1. match: the longest prefix of its hash chain that is cached -> those blocks are hits;
    2. every block of the request that is cached is pinned (acquired: out of the eviction order);
    3. matched blocks are touched in chain order (tick += 1, last := tick, count += 1);
    4. the remaining blocks are inserted in chain order: a block already cached (an orphan or a
       later block) is touched, not a hit; a new block evicts the min-key inactive block while the
       cache is full, is registered (touched: count 1), and is pinned; if nothing is evictable the
       rest of the chain is dropped;
    5. release in chain order: each block becomes inactive stamped with a new tick (last := ++tick,
       count unchanged) and is keyed into the heap -- as the registry's release() does.
"""

from __future__ import annotations

import bisect
import gzip
import heapq
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from kvbm._fast._reference import ReferenceRegistry, _Block
from kvbm.policy import POLICY_LINEAGE

W64 = 1 << 64
MASK64 = W64 - 1
PRIO_BIAS = 1 << 31          # int32 priority -> uint64, lower priority sorts first (as the registry)
TRACE_ENV = "KVBM_TRACE"
SHARED_TRACE = Path("shared", "traces", "mooncake_synthetic_trace.jsonl")   # the public trace
TRACE_HELP = ("Mooncake jsonl (.gz ok); default $KVBM_TRACE, else shared/traces/"
              "mooncake_synthetic_trace.jsonl in the checkout's parent folder")


# --------------------------------------------------------------------------------------------------
# traces
# --------------------------------------------------------------------------------------------------
def find_trace(given: str | None = None) -> str:
    """The trace a study reads: `given` (its --trace), else $KVBM_TRACE, else the public trace
    shared/traces/mooncake_synthetic_trace.jsonl in the folder that holds this checkout (it lives
    in /work/shared/traces beside /work/main) or in the checkout itself. FileNotFoundError saying
    how to give one when none is there."""
    if given:
        return given
    if os.environ.get(TRACE_ENV):
        return os.environ[TRACE_ENV]
    root = Path(__file__).resolve().parents[2]          # research/eviction/ -> the checkout
    places = [root.parent / SHARED_TRACE, root / SHARED_TRACE]
    for place in places:
        if place.is_file():
            return str(place)
    raise FileNotFoundError(f"no trace: give --trace PATH or set {TRACE_ENV}=PATH (a Mooncake jsonl, "
                            f".gz ok); looked for {' and '.join(map(str, places))}")


def trace_arg(ap, given: str | None) -> str:
    """find_trace for a study's argparse main: the missing trace is a usage error (exit 2)."""
    try:
        return find_trace(given)
    except FileNotFoundError as err:
        ap.error(str(err))


def load_trace(path: str) -> list[dict]:
    """Mooncake jsonl (one request a line with `hash_ids`, `timestamp`); `.gz` is read transparently."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def chains_of(trace: Iterable[dict]) -> list[list[int]]:
    return [list(r["hash_ids"]) for r in trace]


def save_trace(path: str, trace: list[dict]) -> None:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        for r in trace:
            f.write(json.dumps(r) + "\n")


def split_trace(chains: list, parts: int = 2) -> list[list]:
    """Time split (the trace is in timestamp order): `parts` consecutive slices."""
    n = len(chains)
    return [chains[i * n // parts:(i + 1) * n // parts] for i in range(parts)]


# --------------------------------------------------------------------------------------------------
# per-block metadata (what the registry keeps per block, all O(1))
# --------------------------------------------------------------------------------------------------
class Block:
    __slots__ = ("h", "parent", "children", "depth", "last", "count", "pins", "ver", "key",
                 "parent_present", "prio", "ghost_h", "ghost_c")

    def __init__(self, h: int, parent: int | None, depth: int):
        self.h = h
        self.parent = parent          # parent hash (None for a root)
        self.children: set[int] = set()   # cached children (the registry keeps their count)
        self.depth = depth            # position in the chain (0 = first block)
        self.last = 0                 # last-use tick
        self.count = 0                # use count: touches (match, registration, refresh)
        self.pins = 0                 # refcount
        self.ver = 0                  # invalidates stale heap entries (the registry: indexed heap)
        self.key = 0
        self.parent_present = True    # False: an orphan (its parent was evicted)
        self.prio = 0                 # int32 registration priority (lower is evicted first)
        self.ghost_h = None           # stub memory: hash and use count of the last evicted child
        self.ghost_c = 0

    @property
    def nchild(self) -> int:
        return len(self.children)


# --------------------------------------------------------------------------------------------------
# policies: key(block, cache) -> key1 << 64 | key2; the cache evicts the min key
# --------------------------------------------------------------------------------------------------
class Policy:
    name = "base"
    rekey_on_child = False   # key depends on the children count (registry: _update_key on link/unlink)
    rekey_on_parent = False  # key depends on the parent-present flag
    tail_priority = 0        # priority given to a request's last (partial) block at registration
    needs_future = False
    ghost = False            # bound only: use counts survive eviction (unbounded history)
    stub = 0                 # child memory: 0 off, 1 the re-registered child, 2 and the rest of its run

    def reset(self, cache: PrefixCache) -> None:
        pass

    def key(self, b: Block, cache: PrefixCache) -> int:
        raise NotImplementedError

    def on_evict(self, b: Block, key: int, cache: PrefixCache) -> None:
        pass


class LRU(Policy):
    """The registry's POLICY_LRU: key1 = priority + 2^31, key2 = last-use tick."""
    name = "lru"

    def key(self, b, cache):
        return ((b.prio + PRIO_BIAS) << 64) | b.last


class LeafLRU(Policy):
    """Leaves (no cached child) first, LRU among them: key1 = (prio+2^31) << 1 | has_child."""
    name = "leaf-lru"
    rekey_on_child = True

    def key(self, b, cache):
        return ((((b.prio + PRIO_BIAS) << 1) | (1 if b.children else 0)) << 64) | b.last


class LFU(Policy):
    """Ablation: least use count first, LRU among equal counts."""
    name = "lfu"

    def key(self, b, cache):
        return (b.count << 64) | b.last


class GDSF(Policy):
    """Ablation: Greedy-Dual (size 1, cost 1) with frequency: H = L + count, L := H of the last
    evicted block (the inflation clock); LRU among equal H."""
    name = "gdsf"

    def reset(self, cache):
        self.L = 0

    def key(self, b, cache):
        return ((self.L + b.count) << 64) | b.last

    def on_evict(self, b, key, cache):
        self.L = max(self.L, key >> 64)


class Belady(Policy):
    """Offline reference: evict the block whose next use (index of the next request that contains
    it) is furthest in the future; among equal next uses, LRU (`tie="lru"`, the default: this
    reproduces the issue's numbers best) or deepest first (`tie="deep"`, slightly better)."""
    name = "belady"
    needs_future = True

    def __init__(self, tie: str = "lru"):
        self.tie = tie
        if tie != "lru":
            self.name = f"belady-{tie}"

    def key(self, b, cache):
        far = cache.NEVER - cache.next_use(b.h)
        if self.tie == "deep":
            return (far << 64) | ((0xFFFF - min(b.depth, 0xFFFF)) << 40) | (b.last & ((1 << 40) - 1))
        return (far << 64) | b.last


def _f_count(count: int) -> int:
    """Frequency steps of the lineage policy: 0 for a block used once, else bit_length(count)
    (= floor(log2(count)) + 1): 2-3 uses -> 2, 4-7 -> 3, 8-15 -> 4, ..."""
    return count.bit_length() if count >= 2 else 0


class Lineage(Policy):
    """Lineage-aware frequency/recency ("LFR"), see POLICY.md:

        key1 = (priority + 2^31) << 1 | (children > 0)
        key2 = last_tick + C * f(use_count),   C = ticks_per_use * capacity
        f(u) = 0 if u < 2 else bit_length(u)

    * leaves first: a block with a cached child is evicted only when no leaf is left, so an
      eviction never orphans a cached descendant (chains are trimmed from the tail);
    * among leaves, recency with a frequency credit: a reused block gets one extra "LRU
      lifetime" of the cache (C ticks) per doubling of its use count, two for the first reuse;
      a block used once (one-shot content, the bulk of a trace) gets none;
    * priority: the engine registers a request's last, partial block with priority -1
      (`tail_priority`); it is never reused (its hash changes when the block fills up), so it goes
      first.  With tail_priority = 0 the policy uses no engine hint at all.
    C is a scale, not a tuned constant: one LRU lifetime in ticks. The registry stamps two ticks per
    block use (touch + release), so ticks_per_use = 2 in both the registry and this simulator.
    """
    name = "lineage"
    rekey_on_child = True

    def __init__(self, *, tail_priority: int = -1, ticks_per_use: int = 2, steps: Callable[[int], int] = _f_count,
                 leaf_first: bool = True, name: str | None = None):
        self.tail_priority = tail_priority
        self.ticks_per_use = ticks_per_use
        self.steps = steps
        self.leaf_first = leaf_first
        if name:
            self.name = name

    def reset(self, cache):
        self.C = self.ticks_per_use * cache.capacity

    def key(self, b, cache):
        k1 = (b.prio + PRIO_BIAS) << 1
        if self.leaf_first and b.children:
            k1 |= 1
        return (k1 << 64) | ((b.last + self.C * self.steps(b.count)) & MASK64)


def lineage_key(priority: int, children: int, last_tick: int, use_count: int, capacity: int) -> tuple[int, int]:
    """The product's LINEAGE key of one inactive block, (key1, key2), uint64 each, for a registry of
    `capacity` blocks. Not a copy: the product's spec computes it, ReferenceRegistry._key in
    kvbm/_fast/_reference.py, run on a table of one block (the twin keeps the formula inside its
    method, with no free function to call). `Lineage` with its defaults is this key as one int
    (tests/test_policy_sim.py), so its figures are the product's."""
    table = SimpleNamespace(_policy=POLICY_LINEAGE, _n=capacity,
                            _blocks=[_Block(priority=priority, tick=last_tick, use_count=use_count,
                                            children=[0] * children)])
    key1, key2, _ = ReferenceRegistry._key(table, 0)
    return key1, key2


class RootStubLineage(Lineage):
    """Explored extension (not the recommendation): lineage + child memory (stub=2: a parent
    remembers the hash and use count of its last evicted child; a re-registered child and the rest
    of its registration run get that count back) + 4*C extra credit for roots (depth 0), so that the
    root of a trimmed chain survives as its memory. Needs two more registry fields per block."""
    name = "lineage-rootstub"
    root_credit = 4

    def key(self, b, cache):
        k = super().key(b, cache)
        return k + (self.C * self.root_credit if b.depth == 0 else 0)


class GhostLineage(Lineage):
    """Bound, not a candidate: the lineage key with a use count that survives eviction (an
    unbounded ghost history the registry does not have)."""
    name = "ghost-lineage"
    ghost = True


class OracleReuse(Policy):
    """Bound, not a candidate: leaf-first LRU that knows whether a block will ever be used again."""
    name = "oracle-reuse"
    needs_future = True
    rekey_on_child = True

    def key(self, b, cache):
        again = 1 if cache.next_use(b.h) < cache.NEVER else 0
        return (((again << 1) | (1 if b.children else 0)) << 64) | b.last


POLICIES: dict[str, Callable[[], Policy]] = {
    "lru": LRU,
    "leaf-lru": LeafLRU,
    "lfu": LFU,
    "gdsf": GDSF,
    "belady": Belady,
    "belady-deep": lambda: Belady("deep"),
    "lineage": Lineage,
    # ablations of the lineage policy
    "lineage-nohint": lambda: Lineage(tail_priority=0, name="lineage-nohint"),
    "lineage-noleaf": lambda: Lineage(leaf_first=False, name="lineage-noleaf"),
    "lru+tail": lambda: _with_tail(LRU(), "lru+tail"),
    "lineage-stubrun": lambda: _with(Lineage(name="lineage-stubrun"), stub=2),
    "lineage-rootstub": lambda: _with(RootStubLineage(), stub=2),
    # bounds (more information than the registry has)
    "ghost-lineage": GhostLineage,
    "oracle-reuse": OracleReuse,
}


def _with(p: Policy, **kw) -> Policy:
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _with_tail(p: Policy, name: str) -> Policy:
    p.tail_priority = -1
    p.name = name
    return p


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise SystemExit(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None


# --------------------------------------------------------------------------------------------------
# the cache (one tier)
# --------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    requested: int = 0
    hits: int = 0
    inserted: int = 0
    evicted: int = 0
    refreshed: int = 0   # already cached, not a prefix hit (orphan/later block)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requested if self.requested else 0.0


class PrefixCache:
    """One tier: blocks by hash, a lazy min-heap of inactive blocks (a stale entry is skipped by its
    version -- the same order as the registry's indexed heap), lineage links."""
    NEVER = (1 << 40) - 1

    def __init__(self, capacity: int, policy: Policy, *, future: Sequence[Sequence[int]] | None = None,
                 on_evict: Callable[[Block], None] | None = None):
        self.capacity = capacity
        self.policy = policy
        self.blocks: dict[int, Block] = {}
        self.heap: list[tuple[int, int, int]] = []
        self.tick = 0
        self.req = -1
        self.stats = Stats()
        self.on_evict_cb = on_evict
        self.history: dict[int, int] = {}   # ghost counts (bound policies only)
        # parent hash -> cached children whose parent was evicted (re-adopted if it comes back,
        # as the registry relinks through its hash index)
        self._orphans: dict[int, set[int]] = {}
        self._occ: dict[int, list[int]] | None = None
        if future is not None:
            occ: dict[int, list[int]] = {}
            for i, ch in enumerate(future):
                for h in ch:
                    lst = occ.setdefault(h, [])
                    if not lst or lst[-1] != i:
                        lst.append(i)
            self._occ = occ
        elif policy.needs_future:
            raise ValueError(f"policy {policy.name} needs the future trace")
        policy.reset(self)

    # -- oracle (Belady) --
    def next_use(self, h: int) -> int:
        lst = self._occ.get(h) if self._occ is not None else None
        if not lst:
            return self.NEVER
        j = bisect.bisect_right(lst, self.req)
        return lst[j] if j < len(lst) else self.NEVER

    # -- heap --
    def _push(self, b: Block) -> None:
        b.ver += 1
        b.key = self.policy.key(b, self)
        heapq.heappush(self.heap, (b.key, b.ver, b.h))

    def _rekey(self, b: Block) -> None:
        if b.pins == 0:
            self._push(b)

    def pin(self, b: Block) -> None:
        if b.pins == 0:
            b.ver += 1  # out of the eviction order (the registry: zombie / heap removal)
        b.pins += 1

    def unpin(self, b: Block) -> None:
        b.pins -= 1
        if b.pins == 0:
            self.tick += 1           # release stamps a new tick (registry: _release_core)
            b.last = self.tick
            self._push(b)

    def touch(self, b: Block) -> None:
        self.tick += 1
        b.last = self.tick
        b.count += 1

    def evict_one(self) -> Block | None:
        heap = self.heap
        while heap:
            key, ver, h = heapq.heappop(heap)
            b = self.blocks.get(h)
            if b is None or b.ver != ver or b.pins:
                continue
            self.stats.evicted += 1
            if self.policy.ghost:
                self.history[h] = b.count
            if self.policy.stub and b.parent is not None:
                p = self.blocks.get(b.parent)
                if p is not None:
                    p.ghost_h = b.h
                    p.ghost_c = b.count
            self.policy.on_evict(b, key, self)
            self._detach(b)
            if self.on_evict_cb is not None:
                self.on_evict_cb(b)
            return b
        return None

    def _detach(self, b: Block) -> None:
        """b leaves this tier: unlink from its parent, orphan its children."""
        del self.blocks[b.h]
        b.ver += 1
        if b.parent is not None:
            p = self.blocks.get(b.parent)
            if p is not None:
                p.children.discard(b.h)
                if self.policy.rekey_on_child:
                    self._rekey(p)
        if b.children:
            self._orphans.setdefault(b.h, set()).update(b.children)
            for c in b.children:
                cb = self.blocks.get(c)
                if cb is not None:
                    cb.parent_present = False
                    if self.policy.rekey_on_parent:
                        self._rekey(cb)
        b.children = set()

    def take(self, h: int) -> Block | None:
        """Remove a block without counting an eviction (it moves to another tier)."""
        b = self.blocks.get(h)
        if b is not None:
            self._detach(b)
            b.pins = 0
        return b

    def put(self, b: Block) -> bool:
        """Add a block (new, or moved from another tier with its metadata), evicting as needed.
        The block keeps its pin count; an unpinned block is keyed into the heap."""
        while len(self.blocks) >= self.capacity:
            if self.evict_one() is None:
                return False
        self.blocks[b.h] = b
        b.children = set()
        b.parent_present = True
        if b.parent is not None:
            p = self.blocks.get(b.parent)
            if p is not None:
                p.children.add(b.h)
                if self.policy.rekey_on_child:
                    self._rekey(p)
            else:
                b.parent_present = False
        kids = self._orphans.pop(b.h, None)
        if kids:
            for c in kids:
                cb = self.blocks.get(c)
                if cb is not None and cb.parent == b.h:
                    b.children.add(c)
                    cb.parent_present = True
                    if self.policy.rekey_on_parent:
                        self._rekey(cb)
        if b.pins == 0:
            self._push(b)
        return True

    def match_len(self, chain: Sequence[int]) -> int:
        k = 0
        blocks = self.blocks
        for h in chain:
            if h not in blocks:
                break
            k += 1
        return k

    def access(self, chain: Sequence[int], req: int | None = None, tail_partial: bool = True) -> int:
        """Process one request; returns the number of prefix hits."""
        self.req = self.req + 1 if req is None else req
        blocks = self.blocks
        k = self.match_len(chain)
        n = len(chain)
        self.stats.requested += n
        self.stats.hits += k
        run_c = 0
        pinned: list[Block] = []     # in chain order: released in chain order
        for h in chain:
            b = blocks.get(h)
            if b is not None:
                self.pin(b)
        for i in range(k):
            b = blocks[chain[i]]
            self.touch(b)
            pinned.append(b)
        for i in range(k, n):
            h = chain[i]
            b = blocks.get(h)
            if b is not None:
                self.touch(b)
                pinned.append(b)
                self.stats.refreshed += 1
                continue
            b = Block(h, chain[i - 1] if i else None, i)
            if tail_partial and i == n - 1:
                b.prio = self.policy.tail_priority
            if self.policy.ghost:
                b.count = self.history.get(h, 0)
            elif self.policy.stub and i:
                p = blocks.get(chain[i - 1])
                if p is not None and p.ghost_h == h:
                    run_c = p.ghost_c
                    b.count = run_c
                    p.ghost_h = None
                elif self.policy.stub == 2 and run_c:
                    b.count = run_c
            b.pins = 1
            if not self.put(b):
                for j in range(i + 1, n):   # dropped rest of the chain: release what is pinned
                    b2 = blocks.get(chain[j])
                    if b2 is not None and b2.pins:
                        pinned.append(b2)
                break
            pinned.append(b)
            self.touch(b)
            self.stats.inserted += 1
        for b in pinned:
            self.unpin(b)
        return k


def simulate(chains: Sequence[Sequence[int]], capacity: int, policy: Policy | str) -> Stats:
    if isinstance(policy, str):
        policy = make_policy(policy)
    cache = PrefixCache(capacity, policy, future=chains if policy.needs_future else None)
    for i, ch in enumerate(chains):
        cache.access(ch, i)
    return cache.stats


def gap_closed(hit: float, lru: float, belady: float) -> float:
    return (hit - lru) / (belady - lru) if belady > lru + 1e-12 else 0.0


# --------------------------------------------------------------------------------------------------
# tiers: G1 (device) -> G2 (host) -> G3 (disk), exclusive, with admission to the lower tiers
# --------------------------------------------------------------------------------------------------
def admit_all(level: int, b: Block, lowest: bool) -> bool:
    return True


def admit_reused(level: int, b: Block, lowest: bool) -> bool:
    """Admission for the lowest (disk) tier: only blocks that were reused (use count >= 2) when
    they fall out of the tier above; the tiers in between admit everything."""
    return not lowest or b.count >= 2


def admit_full(level: int, b: Block, lowest: bool) -> bool:
    """Lowest tier: refuse blocks registered with a negative priority (a request's partial last
    block: its hash never recurs)."""
    return not lowest or b.prio >= 0


ADMISSION = {"all": admit_all, "reused": admit_reused, "full": admit_full}


@dataclass
class TierStats:
    requested: int = 0
    hits: list[int] = field(default_factory=list)     # prefix hits served from each tier
    writes: list[int] = field(default_factory=list)   # blocks written into each tier (G1: inserts+onboards)
    rejected: list[int] = field(default_factory=list)  # blocks refused by admission

    @property
    def hit_ratio(self) -> float:
        return sum(self.hits) / self.requested if self.requested else 0.0

    def tier_ratio(self, t: int) -> float:
        return self.hits[t] / self.requested if self.requested else 0.0


class TieredCache:
    """Exclusive tiers: a block lives in one tier. A request's prefix is matched across all tiers
    (a block counts as a hit of the tier it was found in); blocks found below G1 are onboarded
    (moved) into G1; a block evicted from tier i is offered to tier i+1 (if admitted) -- its
    metadata (use count, last tick) travels with it. Each tier runs its own policy instance."""

    def __init__(self, capacities: Sequence[int], policy_factory: Callable[[], Policy], *,
                 admission: Callable[[int, Block, bool], bool] = admit_all,
                 future: Sequence[Sequence[int]] | None = None):
        self.admission = admission
        self.tiers: list[PrefixCache] = []
        for lvl, cap in enumerate(capacities):
            def cb(b, lvl=lvl):  # lvl bound now (a default), not looked up when called
                return self._demote(lvl, b)
            self.tiers.append(PrefixCache(cap, policy_factory(), future=future, on_evict=cb))
        n = len(capacities)
        self.stats = TierStats(hits=[0] * n, writes=[0] * n, rejected=[0] * n)

    def _demote(self, lvl: int, b: Block) -> None:
        nxt = lvl + 1
        if nxt >= len(self.tiers):
            return
        if not self.admission(nxt, b, nxt == len(self.tiers) - 1):
            self.stats.rejected[nxt] += 1
            return
        b.pins = 0
        if self.tiers[nxt].put(b):
            self.stats.writes[nxt] += 1

    def where(self, h: int) -> int:
        for t, c in enumerate(self.tiers):
            if h in c.blocks:
                return t
        return -1

    def access(self, chain: Sequence[int], req: int, tail_partial: bool = True) -> int:
        g1 = self.tiers[0]
        for c in self.tiers:
            c.req = req
        n = len(chain)
        locs = [self.where(h) for h in chain]
        k = 0
        while k < n and locs[k] >= 0:
            k += 1
        self.stats.requested += n
        for t, c in enumerate(self.tiers):       # pin everything of this request where it is
            for i, h in enumerate(chain):
                if locs[i] == t:
                    c.pin(c.blocks[h])
        pinned: list[Block] = []
        for i, h in enumerate(chain):
            t = locs[i]
            if t == 0:
                b = g1.blocks[h]
            else:
                if t > 0:
                    b = self.tiers[t].take(h)    # onboard: move into G1, keeps its metadata
                else:
                    b = Block(h, chain[i - 1] if i else None, i)
                    if tail_partial and i == n - 1:
                        b.prio = g1.policy.tail_priority
                b.pins = 1
                if not g1.put(b):                # G1 all pinned: drop the rest of the chain
                    for j in range(i + 1, n):
                        for c in self.tiers:
                            b2 = c.blocks.get(chain[j])
                            if b2 is not None and b2.pins:
                                c.unpin(b2)
                    break
                self.stats.writes[0] += 1
            g1.touch(b)
            pinned.append(b)
            if i < k:
                self.stats.hits[t] += 1
        for b in pinned:
            g1.unpin(b)
        return k


def simulate_tiered(chains: Sequence[Sequence[int]], capacities: Sequence[int], policy: str,
                    admission: str = "all") -> TierStats:
    fut = chains if make_policy(policy).needs_future else None
    tc = TieredCache(capacities, lambda: make_policy(policy), admission=ADMISSION[admission], future=fut)
    for i, ch in enumerate(chains):
        tc.access(ch, i)
    return tc.stats


# --------------------------------------------------------------------------------------------------
# synthetic Mooncake-like traces
# --------------------------------------------------------------------------------------------------
class _Hasher:
    """Tree-consistent block ids: id(parent, label) is unique per (parent, label) like chained hashes."""

    def __init__(self):
        self.ids: dict[tuple, int] = {}

    def chain(self, labels: Sequence, parent: int | None = None) -> list[int]:
        out = []
        for lab in labels:
            k = (parent, lab)
            h = self.ids.get(k)
            if h is None:
                h = self.ids[k] = len(self.ids)
            out.append(h)
            parent = h
        return out


def _zipf_sampler(rng: random.Random, n: int, s: float) -> Callable[[], int]:
    cum = []
    t = 0.0
    for i in range(n):
        t += 1.0 / (i + 1) ** s
        cum.append(t)
    return lambda: min(bisect.bisect_left(cum, rng.random() * t), n - 1)


def _lognormal_len(rng: random.Random, median: float, sigma: float, lo: int = 1, hi: int = 400) -> int:
    return max(lo, min(hi, int(round(rng.lognormvariate(math.log(median), sigma)))))


def generate_trace(shape: str = "mixed", n_requests: int = 4000, seed: int = 0, *,
                   zipf_s: float = 1.0, n_system: int = 8, n_docs: int = 2000, n_sessions: int = 600,
                   sys_len: float = 8, doc_len: float = 20, turn_len: float = 3, drift: float = 0.0,
                   rate_ms: float = 250.0) -> list[dict]:
    """Mooncake-format synthetic trace (timestamp ms, input_length, output_length, hash_ids).

    shapes:
      "rag"       documents re-read with Zipf popularity; request = doc + 1-2 unique question blocks;
      "sysprompt" a few shared system prompts (Zipf) + one-shot user content: a wide, shallow tree;
      "chat"      multi-turn sessions (Zipf-active, interleaved): each turn re-sends the session's
                  chain and appends new blocks; sessions start from a shared system prompt;
      "agent"     deep trees: system prompt -> one of 4 tool specs -> doc -> one of 3 few-shot
                  branches -> unique block;
      "mixed"     a random shape per request.
    Every request ends with a unique partial block (its hash changes once it fills up).
    drift: probability per request that the popularity ranking rotates by one (non-stationary).
    """
    rng = random.Random(seed)
    H = _Hasher()
    pick_sys = _zipf_sampler(rng, n_system, zipf_s)
    pick_doc = _zipf_sampler(rng, n_docs, zipf_s)
    pick_sess = _zipf_sampler(rng, n_sessions, zipf_s)
    sys_lens = [_lognormal_len(rng, sys_len, 0.5) for _ in range(n_system)]
    doc_lens = [_lognormal_len(rng, doc_len, 0.9) for _ in range(n_docs)]
    sessions: dict[int, list] = {}
    uniq = [0]
    doc_perm = list(range(n_docs))
    sess_perm = list(range(n_sessions))

    def fresh(n):
        out = []
        for _ in range(n):
            uniq[0] += 1
            out.append(("u", uniq[0]))
        return out

    out = []
    t = 0.0
    shapes = ["rag", "sysprompt", "chat", "agent"]
    for _ in range(n_requests):
        if drift and rng.random() < drift:
            doc_perm.append(doc_perm.pop(0))
            sess_perm.append(sess_perm.pop(0))
        sh = rng.choice(shapes) if shape == "mixed" else shape
        if sh == "rag":
            d = doc_perm[pick_doc()]
            labels = [("d", d, i) for i in range(doc_lens[d])] + fresh(rng.randint(1, 2))
        elif sh == "sysprompt":
            s = pick_sys()
            labels = [("s", s, i) for i in range(sys_lens[s])] + fresh(_lognormal_len(rng, doc_len, 0.8))
        elif sh == "chat":
            s = sess_perm[pick_sess()]
            sp = s % n_system
            if s not in sessions or rng.random() < 0.1:   # a new conversation in that slot
                sessions[s] = ([("s", sp, i) for i in range(sys_lens[sp])]
                               + fresh(_lognormal_len(rng, turn_len * 3, 0.8)))
            else:
                sessions[s] = sessions[s] + fresh(_lognormal_len(rng, turn_len, 0.7))
                if len(sessions[s]) > 350:
                    sessions[s] = sessions[s][:sys_lens[sp]]
            labels = sessions[s] + fresh(1)
        else:  # agent
            s = pick_sys()
            tool = ("t", s, rng.randrange(4))
            d = doc_perm[pick_doc()] % 200
            labels = ([("s", s, i) for i in range(sys_lens[s])] + [tool + (i,) for i in range(4)]
                      + [("a", d, i) for i in range(max(1, doc_lens[d] // 2))]
                      + [("b", rng.randrange(3), i) for i in range(2)] + fresh(1))
        ids = H.chain(labels)
        t += rng.expovariate(1.0 / rate_ms)
        out.append({"timestamp": int(t), "input_length": 512 * len(ids) - 1 - rng.randrange(511),
                    "output_length": rng.randint(1, 400), "hash_ids": ids})
    return out


SYNTHETIC_SUITE = {
    # name: generate_trace kwargs -- shapes x popularity skew x drift x lengths; none fitted to the
    # shared trace (its parameters were fixed before the policy was chosen)
    "rag-z0.8": dict(shape="rag", zipf_s=0.8),
    "rag-z1.1-drift": dict(shape="rag", zipf_s=1.1, drift=0.05),
    "sysprompt-z1.0": dict(shape="sysprompt", zipf_s=1.0, n_system=32),
    "chat-z0.9": dict(shape="chat", zipf_s=0.9),
    "chat-z1.2-long": dict(shape="chat", zipf_s=1.2, turn_len=6),
    "agent-z1.0": dict(shape="agent", zipf_s=1.0),
    "mixed-z1.0": dict(shape="mixed", zipf_s=1.0),
    "mixed-z0.7-drift": dict(shape="mixed", zipf_s=0.7, drift=0.02, doc_len=40),
}


def suite_cases(shared_chains) -> list[tuple[str, list, int]]:
    """The validation cases (name, chains, capacity): the shared trace at 1k-16k blocks, its time
    halves at 2k and 8k, and SYNTHETIC_SUITE (seeds 1 and 2) at 1k and 4k."""
    cases = [("shared", shared_chains, c) for c in (1000, 2000, 4000, 8000, 16000)]
    for i, part in enumerate(split_trace(shared_chains, 2)):
        cases += [(f"shared-half{i + 1}", part, c) for c in (2000, 8000)]
    for name, kw in SYNTHETIC_SUITE.items():
        for seed in (1, 2):
            ch = chains_of(generate_trace(seed=seed, **kw))
            cases += [(f"{name}/s{seed}", ch, c) for c in (1000, 4000)]
    return cases
