"""Round-2 eviction-policy research for the prefix KV cache (see POLICY_ROUND2.md).

A standalone segmented simulator with the *same request semantics* as policy_sim.py
(match the cached prefix -> hits; pin every cached block of the request; touch matched blocks in
chain order; insert the rest in chain order (already-cached blocks are touched, not hits); release
in chain order stamping a new tick), plus:

* `SegCache`: a window-TinyLFU style cache for prefix chains ("wtlfu"):
    - segments: WINDOW (small LRU for new blocks), PROBATION and PROTECTED (the main area, SLRU);
    - a bounded frequency sketch (count-min, 4 rows of 4-bit counters, periodic halving) that also
      remembers evicted hashes -- the bounded "ghost" history;
    - admission: when a block must go, the window's LRU block (candidate) competes with the main
      area's victim; the candidate enters the main area only if its estimated frequency is
      strictly higher, else the candidate itself is evicted (incumbents stay: scan/loop resistance);
    - prefix awareness: leaves (no cached child) go before interior blocks inside every segment,
      and the request's partial tail block (priority -1) goes first.
  With window = capacity it is exactly the registry's LRU (checked against policy_sim).
* `GhostLineage` (the round-2 proposal, "ghost-lineage"): round 1's lineage key, with use counts
  that survive eviction in a bounded FIFO ghost table (<= ghost_mult * capacity hashes);
  `SketchLineage`: the same with counts from a count-min sketch (TinyLFU) or exact aging counts.
* analysis helpers (`--measure`): reuse gaps by use count, what Belady keeps vs LRU.
* `--suite`: the validation table (shared trace 1k-16k, time halves, synthetic shapes).

Run (from the repository root): python -m research.eviction.policy_research --suite
"""
from __future__ import annotations

import argparse
import heapq
import sys
import time
from collections.abc import Sequence

from research.eviction import policy_sim as ps

WINDOW, PROBATION, PROTECTED = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# frequency sketches (bounded history)
# --------------------------------------------------------------------------------------------------
class ExactFreq:
    """Reference: exact counts with TinyLFU aging (halve everything after `sample` increments),
    capped at `cap`. Not bounded in memory -- only used to check the sketch loses nothing."""

    def __init__(self, capacity: int, sample_mult: int = 10, cap: int = 15):
        self.c: dict[int, int] = {}
        self.sample = max(1, sample_mult * capacity)
        self.cap = cap
        self.n = 0

    def add(self, h: int) -> None:
        v = self.c.get(h, 0)
        if v < self.cap:
            self.c[h] = v + 1
        self.n += 1
        if self.n >= self.sample:
            self.n //= 2
            self.c = {k: v >> 1 for k, v in self.c.items() if v > 1}

    def get(self, h: int) -> int:
        return self.c.get(h, 0)


_MIX = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_M64 = (1 << 64) - 1


def _hash(h: int, i: int) -> int:
    x = ((h + 1) * _MIX[i]) & _M64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 29
    return x


class CountMinSketch:
    """The portable form: depth 4, width = next power of two >= capacity, 4-bit counters (cap 15),
    conservative update, halve every counter after `sample_mult * capacity` increments
    (TinyLFU aging). Memory: 4 * width * 4 bits = 2 bytes per cache block."""

    def __init__(self, capacity: int, sample_mult: int = 10, cap: int = 15, depth: int = 4,
                 width_mult: int = 1):
        w = 1
        while w < max(16, width_mult * capacity):
            w <<= 1
        self._memo: dict[int, list[int]] = {}
        self.mask = w - 1
        self.rows = [[0] * w for _ in range(depth)]
        self.depth = depth
        self.sample = max(1, sample_mult * capacity)
        self.cap = cap
        self.n = 0

    def _idx(self, h: int):
        r = self._memo.get(h)          # simulator speed-up only (the registry hashes each time)
        if r is None:
            if len(self._memo) > 1 << 20:
                self._memo.clear()
            r = self._memo[h] = [(_hash(h, i) & self.mask) for i in range(self.depth)]
        return r

    def add(self, h: int) -> None:
        idx = self._idx(h)
        rows = self.rows
        m = min(rows[i][j] for i, j in enumerate(idx))
        if m < self.cap:
            for i, j in enumerate(idx):       # conservative update: raise only the minimum cells
                if rows[i][j] == m:
                    rows[i][j] = m + 1
        self.n += 1
        if self.n >= self.sample:
            self.n //= 2
            for r in rows:
                for j in range(len(r)):
                    r[j] >>= 1

    def get(self, h: int) -> int:
        rows = self.rows
        return min(rows[i][j] for i, j in enumerate(self._idx(h)))


# --------------------------------------------------------------------------------------------------
# segmented prefix cache
# --------------------------------------------------------------------------------------------------
class Blk:
    __slots__ = ("h", "parent", "nchild", "depth", "last", "count", "pins", "ver", "seg", "prio")

    def __init__(self, h, parent, depth):
        self.h = h
        self.parent = parent
        self.nchild = 0
        self.depth = depth
        self.last = 0
        self.count = 0
        self.pins = 0
        self.ver = 0
        self.seg = WINDOW
        self.prio = 0


class SegCache:
    """Window-TinyLFU for prefix chains. Parameters (all scale-free, none fitted to a trace):

    window:      window size as a fraction of capacity (1.0 = plain LRU: no admission filter)
    protected:   protected share of the main area (SLRU; Caffeine's 0.8)
    sketch:      "cms" (count-min, bounded), "exact" (reference), None (use the resident use count
                 only: no history)
    leaf_first:  inside each segment, leaves before interior blocks
    tail_prio:   priority of a request's last (partial) block (-1: evicted first, never admitted)
    orphan_zero: a window candidate whose parent is not cached has frequency 0 (useless block)
    sample_mult: sketch aging period in multiples of the capacity (TinyLFU: 10)
    """

    def __init__(self, capacity: int, *, window: float = 0.01, protected: float = 0.8,
                 sketch: str | None = "cms", leaf_first: bool = True, tail_prio: int = -1,
                 orphan_zero: bool = True, sample_mult: int = 10, on_evict=None, tie_admit: bool = False):
        self.C = capacity
        self.W = max(1, int(round(window * capacity))) if window < 1 else capacity + 1
        self.P = int(protected * (capacity - min(self.W, capacity)))
        self.blocks: dict[int, Blk] = {}
        self.heaps = ([], [], [])
        self.size = [0, 0, 0]
        self.tick = 0
        self.leaf_first = leaf_first
        self.tail_prio = tail_prio
        self.orphan_zero = orphan_zero
        self.tie_admit = tie_admit
        self.freq = (CountMinSketch(capacity, sample_mult) if sketch == "cms" else
                     ExactFreq(capacity, sample_mult) if sketch == "exact" else None)
        self.requested = 0
        self.hits = 0
        self.on_evict = on_evict
        self.admitted = 0
        self.rejected = 0
        self.filled = False      # the main area filled up once (warm-up moves need no contest)

    # -- keys / heaps --
    def _key(self, b: Blk):
        return (b.prio, 1 if (self.leaf_first and b.nchild) else 0, b.last)

    def _push(self, b: Blk):
        b.ver += 1
        heapq.heappush(self.heaps[b.seg], (self._key(b), b.ver, b.h))

    def _rekey(self, b: Blk):
        if b.pins == 0:
            self._push(b)

    def _peek(self, seg: int) -> Blk | None:
        hp = self.heaps[seg]
        blocks = self.blocks
        while hp:
            _, ver, h = hp[0]
            b = blocks.get(h)
            if b is None or b.ver != ver or b.pins or b.seg != seg:
                heapq.heappop(hp)
                continue
            return b
        return None

    def _move(self, b: Blk, seg: int):
        self.size[b.seg] -= 1
        b.seg = seg
        self.size[seg] += 1
        self._rekey(b)

    def _f(self, b: Blk) -> int:
        if self.freq is None:
            return b.count
        return self.freq.get(b.h)

    # -- eviction --
    def _remove(self, b: Blk):
        del self.blocks[b.h]
        self.size[b.seg] -= 1
        b.ver += 1
        if b.parent is not None:
            p = self.blocks.get(b.parent)
            if p is not None:
                p.nchild -= 1
                if p.nchild == 0:
                    self._rekey(p)
        if self.on_evict is not None:
            self.on_evict(b.h)

    def _main_victim(self) -> Blk | None:
        # protected overflow is demoted to probation first (SLRU)
        while self.size[PROTECTED] > self.P:
            d = self._peek(PROTECTED)
            if d is None:
                break
            self._move(d, PROBATION)
        v = self._peek(PROBATION)
        if v is None:
            v = self._peek(PROTECTED)
        return v

    def evict_one(self) -> bool:
        cand = self._peek(WINDOW) if self.size[WINDOW] > self.W else None
        if cand is not None and cand.prio < 0:      # partial tail: never admitted
            self._remove(cand)
            return True
        if cand is not None and not self.filled:
            self._move(cand, PROBATION)              # main area not full yet: no contest
            if self.size[PROBATION] + self.size[PROTECTED] >= self.C - self.W:
                self.filled = True
            return True
        vict = self._main_victim()
        if cand is None:
            if vict is None:
                vict = self._peek(WINDOW)
            if vict is None:
                return False
            self._remove(vict)
            return True
        if vict is None:
            self._remove(cand)
            return True
        if vict.prio < 0 or (vict.nchild == 0 and self._admit(cand, vict)):
            self._remove(vict)
            self._move(cand, PROBATION)
            self.admitted += 1
        else:
            self._remove(cand)
            self.rejected += 1
        return True

    def _admit(self, cand: Blk, vict: Blk) -> bool:
        fc = self._f(cand)
        if self.orphan_zero and cand.parent is not None and cand.parent not in self.blocks:
            fc = 0
        fv = self._f(vict)
        return fc > fv or (self.tie_admit and fc == fv)

    # -- request --
    def _touch(self, b: Blk):
        self.tick += 1
        b.last = self.tick
        b.count += 1
        if self.freq is not None:
            self.freq.add(b.h)

    def access(self, chain: Sequence[int], tail_partial: bool = True) -> int:
        blocks = self.blocks
        n = len(chain)
        k = 0
        for h in chain:
            if h not in blocks:
                break
            k += 1
        self.requested += n
        self.hits += k
        for h in chain:
            b = blocks.get(h)
            if b is not None:
                if b.pins == 0:
                    b.ver += 1
                b.pins += 1
        pinned = []
        for i in range(n):
            h = chain[i]
            b = blocks.get(h)
            if b is not None:
                self._touch(b)
                if b.seg == PROBATION:           # a hit in probation promotes (SLRU)
                    self._move(b, PROTECTED)
                pinned.append(b)
                continue
            while len(blocks) >= self.C:
                if not self.evict_one():
                    break
            if len(blocks) >= self.C:
                break
            b = Blk(h, chain[i - 1] if i else None, i)
            if tail_partial and i == n - 1:
                b.prio = self.tail_prio
            b.pins = 1
            blocks[h] = b
            self.size[WINDOW] += 1
            if b.parent is not None:
                p = blocks.get(b.parent)
                if p is not None:
                    p.nchild += 1
                    if p.nchild == 1:
                        self._rekey(p)
            self._touch(b)
            pinned.append(b)
        for b in pinned:
            b.pins -= 1
            if b.pins == 0:
                self.tick += 1
                b.last = self.tick
                self._push(b)
        return k

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requested if self.requested else 0.0


def run_seg(chains, capacity, **kw) -> float:
    c = SegCache(capacity, **kw)
    for ch in chains:
        c.access(ch)
    return c.hit_ratio


# --------------------------------------------------------------------------------------------------
# the round-2 proposal: lineage keyed by a bounded, aging frequency sketch ("sketch-lineage")
# --------------------------------------------------------------------------------------------------
class SketchLineage(ps.Lineage):
    """Round 1's lineage key with the use count taken from a TinyLFU count-min sketch that
    outlives eviction (bounded history), see POLICY_ROUND2.md:

        key1 = (priority + 2^31) << 1 | (children > 0)
        key2 = last_tick + C * f(u),   u = max(use_count, cms.estimate(hash)),   C = 2 * capacity
        f(u) = 0 if u < 2 else bit_length(min(u, 15))

    cms: depth 4, width = next_pow2(width_mult * capacity), 4-bit saturating counters, conservative
    increment on every touch (match / register / refresh; not on release), all counters halved
    after sample_mult * capacity increments (TinyLFU aging). width_mult = 4 -> 8 bytes per block.
    """
    name = "sketch-lineage"

    def __init__(self, *, width_mult: int = 4, sample_mult: int = 10, exact: bool = False,
                 name: str | None = None, **kw):
        super().__init__(name=name, **kw)
        self.width_mult = width_mult
        self.sample_mult = sample_mult
        self.exact = exact

    def reset(self, cache):
        super().reset(cache)
        self.sk = (ExactFreq(cache.capacity, self.sample_mult) if self.exact else
                   CountMinSketch(cache.capacity, self.sample_mult, width_mult=self.width_mult))

    def on_touch(self, b) -> None:
        self.sk.add(b.h)

    def key(self, b, cache):
        k1 = (b.prio + ps.PRIO_BIAS) << 1
        if b.children:
            k1 |= 1
        u = max(b.count, self.sk.get(b.h))
        return (k1 << 64) | ((b.last + self.C * ps._f_count(u)) & ps.MASK64)


def sketch_lineage_key(priority: int, children: int, last_tick: int, use_count: int, estimate: int,
                       capacity: int) -> tuple[int, int]:
    """(key1, key2) as the registry would compute it (estimate = the sketch's count for the hash)."""
    return ps.lineage_key(priority, children, last_tick, max(use_count, estimate), capacity)


class GhostLineage(ps.Lineage):
    """Round 1's lineage key; a block's use count survives its eviction in a *bounded* ghost
    table: a FIFO of at most `ghost_mult * capacity` evicted hashes with their use counts. A block
    registered again while its hash is in the table gets its old count back (the ghost entry is
    consumed), so the frequency credit of a document re-read after a gap longer than the cache's
    lifetime (but within ~ghost_mult more cache turnovers) is not lost. ghost_mult = 1 is the
    "<= num_blocks hashes" budget; the unbounded version is policy_sim's `ghost-lineage`. The
    product's table (ReferenceRegistry in kvbm/_fast/_reference.py, G = ghost_mult * capacity) gives
    these hits when the simulator allocates in the registry's order: trace_replay.ghost_lineage_sim,
    checked in tests/test_trace_replay.py."""
    name = "ghost1-lineage"

    def __init__(self, *, ghost_mult: float = 1.0, name: str | None = None, **kw):
        super().__init__(name=name, **kw)
        self.ghost_mult = ghost_mult

    def reset(self, cache):
        super().reset(cache)
        from collections import OrderedDict
        self.gtab: OrderedDict[int, int] = OrderedDict()   # (policy_sim's `ghost` is a flag)
        self.ghost_cap = max(1, int(self.ghost_mult * cache.capacity))

    def on_evict(self, b, key, cache):
        g = self.gtab
        g[b.h] = b.count
        g.move_to_end(b.h)
        while len(g) > self.ghost_cap:
            g.popitem(last=False)

    def on_register(self, b) -> None:
        c = self.gtab.pop(b.h, None)
        if c:
            b.count = c


class HookCache(ps.PrefixCache):
    """policy_sim's PrefixCache with hooks: per touch (sketch policies) and at the registration
    of a new block (ghost-table policies: restore the use count before the registration touch)."""

    def touch(self, b) -> None:
        super().touch(b)
        hook = getattr(self.policy, "on_touch", None)
        if hook is not None:
            hook(b)

    def put(self, b) -> bool:
        hook = getattr(self.policy, "on_register", None)
        if hook is not None and b.count == 0:
            hook(b)
        return super().put(b)


class QueueHint(ps.Lineage):
    """Not an eviction order but an *engine hint* bound: the engine knows its waiting queue (the
    next `k` requests). Blocks that a queued request will read get priority +1 (evicted after every
    unqueued block); lineage order otherwise. In an engine: a map queued_refs[hash] maintained at
    enqueue/dequeue; a cached block's priority is set to 1 while queued_refs[hash] > 0 (registry
    set_priority; also at registration of a new block whose hash is queued). The simulator reads it
    from the trace: next use within k requests."""
    name = "queue-hint"
    needs_future = True

    def __init__(self, k: int = 16, name: str | None = None, **kw):
        super().__init__(name=name or f"queue{k}-lineage", **kw)
        self.k = k

    def key(self, b, cache):
        k = super().key(b, cache)
        if cache.next_use(b.h) <= cache.req + self.k:
            k += 1 << 65          # key1 += 2: priority + 1 (key1 = (prio + 2^31) << 1 | children)
        return k


class QueueCache(HookCache):
    """Re-keys the cached blocks of the request entering the queue window (req + k) after each
    request -- the engine's set_priority at enqueue."""

    def __init__(self, capacity, policy, chains, **kw):
        super().__init__(capacity, policy, future=chains, **kw)
        self._chains = chains

    def access(self, chain, req=None, tail_partial=True):
        r = super().access(chain, req, tail_partial)
        nxt = self.req + self.policy.k
        if nxt < len(self._chains):
            for h in self._chains[nxt]:
                b = self.blocks.get(h)
                if b is not None and b.pins == 0:
                    self._push(b)
        return r


class QueueGhostLineage(QueueHint, GhostLineage):
    """The queue hint on top of ghost-lineage (ghost table of ghost_mult * capacity)."""


RESEARCH_POLICIES = {
    "sketch-lineage": SketchLineage,
    "sketch-lineage-w1": lambda: SketchLineage(width_mult=1, name="sketch-lineage-w1"),
    "aging-exact-lineage": lambda: SketchLineage(exact=True, name="aging-exact-lineage"),
    "ghost1-lineage": GhostLineage,
    "ghost2-lineage": lambda: GhostLineage(ghost_mult=2, name="ghost2-lineage"),
    "ghost4-lineage": lambda: GhostLineage(ghost_mult=4, name="ghost4-lineage"),
    "ghost8-lineage": lambda: GhostLineage(ghost_mult=8, name="ghost8-lineage"),
    "queue4-lineage": lambda: QueueHint(4),
    "queue16-lineage": lambda: QueueHint(16),
    "queue64-lineage": lambda: QueueHint(64),
    "queue128-lineage": lambda: QueueHint(128),
    "queue16-ghost4-lineage": lambda: QueueGhostLineage(16, ghost_mult=4, name="queue16-ghost4-lineage"),
    "queue64-ghost4-lineage": lambda: QueueGhostLineage(64, ghost_mult=4, name="queue64-ghost4-lineage"),
}


def make(name: str) -> ps.Policy:
    if name in RESEARCH_POLICIES:
        return RESEARCH_POLICIES[name]()
    return ps.make_policy(name)


def simulate(chains, capacity: int, policy) -> ps.Stats:
    pol = make(policy) if isinstance(policy, str) else policy
    if isinstance(pol, QueueHint):
        c = QueueCache(capacity, pol, chains)
        for i, ch in enumerate(chains):
            c.access(ch, i)
        return c.stats
    if not (hasattr(pol, "on_touch") or hasattr(pol, "on_register")):
        return ps.simulate(chains, capacity, pol)
    c = HookCache(capacity, pol)
    for i, ch in enumerate(chains):
        c.access(ch, i)
    return c.stats


# segmented (window-TinyLFU) variants are run through SegCache
SEG_POLICIES = {
    "wtinylfu-1%": dict(window=0.01),
    "wtinylfu-20%": dict(window=0.2),
}


def hit_ratio(chains, capacity: int, policy: str) -> float:
    if policy in SEG_POLICIES:
        return run_seg(chains, capacity, **SEG_POLICIES[policy])
    return simulate(chains, capacity, policy).hit_ratio


def _case(args):
    name, ch, cap, policies = args
    lru = hit_ratio(ch, cap, "lru")
    bel = hit_ratio(ch, cap, "belady")
    return name, cap, lru, bel, [hit_ratio(ch, cap, p) for p in policies]


def suite(shared_chains, policies, out=sys.stdout, jobs: int = 1) -> dict:
    import statistics
    cases = [(n, ch, c, policies) for n, ch, c in ps.suite_cases(shared_chains)]
    print("| trace | blocks | LRU | Belady | " + " | ".join(policies) + " |", file=out)
    print("|" + "---|" * (4 + len(policies)), file=out)
    gaps = {p: [] for p in policies}
    if jobs > 1:
        import multiprocessing as mp
        with mp.Pool(jobs) as pool:
            rows = pool.imap(_case, cases)
            rows = list(_emit(rows, policies, gaps, out))
    else:
        rows = list(_emit(map(_case, cases), policies, gaps, out))
    print("\n| policy | mean gap closed | min | max | cases worse than LRU (< -0.005) |", file=out)
    print("|---|---|---|---|---|", file=out)
    for p in policies:
        g = gaps[p]
        print(f"| {p} | {statistics.mean(g):+.3f} | {min(g):+.3f} | {max(g):+.3f} | "
              f"{sum(x < -0.005 for x in g)}/{len(g)} |", file=out)
    return {"rows": rows, "gaps": gaps}


def _emit(rows, policies, gaps, out):
    for name, cap, lru, bel, hs in rows:
        cells = []
        for p, h in zip(policies, hs):
            g = ps.gap_closed(h, lru, bel)
            gaps[p].append(g)
            cells.append(f"{h:.3f} ({g:+.2f})")
        print(f"| {name} | {cap} | {lru:.3f} | {bel:.3f} | " + " | ".join(cells) + " |", file=out, flush=True)
        yield name, cap, lru, bel, hs


# --------------------------------------------------------------------------------------------------
# measurements (POLICY_ROUND2.md section 1)
# --------------------------------------------------------------------------------------------------
def measure(chains, trace=None, capacity: int = 2000, out=sys.stdout) -> None:
    import collections
    P = lambda *a: print(*a, file=out)  # noqa: E731
    # reuse gaps (blocks requested in between) by global use count so far
    cnt = collections.Counter()
    lastpos = {}
    pos = 0
    byc = collections.defaultdict(list)
    for c in chains:
        for h in c:
            k = cnt[h]
            if k:
                byc[min(k, 10)].append(pos - lastpos[h])
            cnt[h] += 1
            lastpos[h] = pos
            pos += 1
    P(f"## reuse gaps by use count so far (capacity {capacity}: LRU covers gaps < ~{capacity})")
    P("| uses so far | reuses | median gap | P(gap < C) | P(gap < 4C) |")
    P("|---|---|---|---|---|")
    for k in sorted(byc):
        v = sorted(byc[k])
        n = len(v)
        P(f"| {k}{'+' if k == 10 else ''} | {n} | {v[n // 2]} | {sum(x < capacity for x in v) / n:.3f} | "
          f"{sum(x < 4 * capacity for x in v) / n:.3f} |")
    # what Belady keeps vs evicts, against LRU's choice at the same moments
    pol = ps.make_policy("belady")
    cache = ps.PrefixCache(capacity, pol, future=chains)
    vict = collections.Counter()
    oldest = collections.Counter()
    comp = collections.Counter()
    nsnap = 0
    orig = cache.evict_one
    state = {"n": 0}

    def age_class(b):
        a = (cache.tick - b.last) / (2 * capacity)
        return "<1" if a < 1 else "1-2" if a < 2 else "2-4" if a < 4 else ">=4"

    def ev():
        state["n"] += 1
        if state["n"] % 25 == 0:
            inact = [b for b in cache.blocks.values() if b.pins == 0]
            v = min(inact, key=lambda b: b.key)
            o = min(inact, key=lambda b: b.last)
            vict[(min(v.count, 3), age_class(v))] += 1
            oldest[(min(o.count, 3), age_class(o))] += 1
        return orig()

    cache.evict_one = ev
    for i, x in enumerate(chains):
        cache.access(x, i)
        if i % 50 == 0 and i > len(chains) // 8:
            nsnap += 1
            for b in cache.blocks.values():
                comp[age_class(b)] += 1
    P(f"\n## Belady at {capacity}: its victim vs the LRU-order block at the same evictions (sampled 1/25)")
    P("| (resident use count, age in LRU lifetimes) | Belady victim | oldest (LRU's victim) |")
    P("|---|---|---|")
    for k in sorted(set(vict) | set(oldest), key=str):
        P(f"| {k} | {vict[k]} | {oldest[k]} |")
    tot = sum(comp.values())
    P("\nBelady's resident set by age (LRU lifetimes): " +
      ", ".join(f"{k}: {v / tot:.2f}" for k, v in sorted(comp.items())))
    if trace is not None:
        roots = collections.Counter(c[0] for c in chains if c)
        seen = set()
        b = collections.defaultdict(lambda: [0, 0])
        for r in trace:
            ids = r["hash_ids"]
            if not ids or ids[0] in seen:
                continue
            seen.add(ids[0])
            o = r.get("output_length", 0)
            k = next(e for e in (4, 16, 64, 256, 1 << 30) if o < e)
            b[k][0] += 1
            b[k][1] += roots[ids[0]] > 1
        P("\n## first request of a root: P(root ever re-read) by output_length (< bucket)")
        P(" ".join(f"<{k}: {v[1] / v[0]:.2f} (n={v[0]})" for k, v in sorted(b.items())))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=None, help=ps.TRACE_HELP)
    ap.add_argument("--capacity", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--window", type=float, nargs="+", default=[0.01])
    ap.add_argument("--sketch", default="cms")
    ap.add_argument("--suite", action="store_true", help="print the validation table")
    ap.add_argument("--policy", nargs="+", default=["lineage", "ghost1-lineage", "ghost4-lineage"])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--measure", action="store_true", help="print the trace measurements")
    args = ap.parse_args(argv)
    args.trace = ps.trace_arg(ap, args.trace)
    chains = ps.chains_of(ps.load_trace(args.trace))
    if args.suite:
        suite(chains, args.policy, jobs=args.jobs)
        return
    if args.measure:
        measure(chains, ps.load_trace(args.trace))
        return
    for cap in args.capacity:
        for w in args.window:
            t = time.time()
            hr = run_seg(chains, cap, window=w, sketch=None if args.sketch == "none" else args.sketch)
            print(f"cap {cap} window {w}: {hr:.4f} ({time.time()-t:.1f}s)")


if __name__ == "__main__":
    main()
