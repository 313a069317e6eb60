"""Round 3: how much of the LRU -> Belady gap can a policy close from what it observes?
(POLICY_ROUND3.md beside this file; rounds 1 and 2 are POLICY.md and POLICY_ROUND2.md.)

Two families of reference points, on policy_sim's request semantics:

* `OracleWindow(W)` (a policy_sim Policy): leaf-first LRU that first keeps the blocks used most by
  the W requests after their last use (keyed when the block is released, like every policy_sim
  key). Clairvoyant, but only W requests ahead: it shows how far ahead a policy has to know the
  future to close a given share of the gap.
* `HazardCache`: an eviction rule driven by a reuse-hazard table measured ON THE SAME TRACE
  (in-sample). Every inactive block sits in a class of observable features (its use count, with
  counts that survive eviction; the length of the request that last used it; the previous gap
  between reads of its document); eviction compares the oldest block of each class and takes the
  one whose (class, age) has the lowest measured hazard = reuses per request of exposure.
  With `slices` > 1 the table is measured per time slice of the trace, so it also knows how the
  trace drifts. No online policy over the same features has this table: it has to learn it as
  it goes. So these rows are a generous ceiling for policies built on those features, not a
  policy; the point is whether even the ceiling reaches the target.

Documents: a request's document is its first hash (the trace is a forest of chains, POLICY.md
section 5). Ages and gaps are in requests.

    python -m research.eviction.policy_bounds      # the tables of POLICY_ROUND3.md (~1 minute)
"""
from __future__ import annotations

import argparse
import bisect
import math
import sys
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Sequence

from research.eviction import policy_sim as ps

TAIL = "tail"          # class of a request's partial last block (never reused: evicted first)


def log_bucket(x: int, top: int) -> int:
    """0 for x = 0, then one bucket per doubling, capped at top; -1 stays -1 (no such gap)."""
    return -1 if x < 0 else min(int(math.log2(x + 1)), top)


def length_bucket(n: int) -> int:
    return bisect.bisect_right((8, 16, 32, 64), n)


# features: (use count, request length in blocks, previous gap of the document) -> class
FEATURES: dict[str, Callable[[int, int, int], object]] = {
    "count": lambda c, n, g: min(c, 8),
    "count*length": lambda c, n, g: (min(c, 8), length_bucket(n)),
    "count*gap": lambda c, n, g: (min(c, 8), log_bucket(g, 11)),
    "count*length*gap": lambda c, n, g: (min(c, 6), length_bucket(n), log_bucket(g, 11)),
}


class OracleWindow(ps.Policy):
    """Blocks used by fewer of the W requests after their release go first; among equals, leaves
    before blocks with a cached child, then LRU."""
    needs_future = True
    rekey_on_child = True

    def __init__(self, window: int):
        self.window = window
        self.name = f"oracle-next-{window}"

    def key(self, b, cache):
        uses = cache._occ.get(b.h, ())
        ahead = bisect.bisect_right(uses, cache.req + self.window) - bisect.bisect_right(uses, cache.req)
        return (((min(ahead, 1 << 20) << 1) | (1 if b.children else 0)) << 64) | b.last


class HazardTable:
    """Reuse hazard per (time slice, class, age bucket): reads of a known document divided by the
    document-requests it spent in that cell (exposure sampled every `every` requests). Counts here
    are per document (all of a document's blocks share them). `observe` the requests in order;
    `rate` reads what has been observed so far, so the same table serves the in-sample ceiling
    (observe the whole trace, then replay) and the online learner (observe request i, then serve
    it)."""

    def __init__(self, feature, slices: int = 1, n_requests: int = 1, every: int = 4, prior: str = "low"):
        if prior not in ("low", "mean"):
            raise ValueError(f"prior must be 'low' or 'mean', got {prior!r}")
        self.prior = prior
        self.feature = feature
        self.slices = slices
        self.n_requests = n_requests
        self.every = every
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.length: dict[int, int] = {}
        self.gap: dict[int, int] = {}
        self.exposure: Counter = Counter()
        self.events: Counter = Counter()
        self.total_exposure = 0
        self.total_events = 0

    def slice_of(self, now: int) -> int:
        return min(now * self.slices // self.n_requests, self.slices - 1)

    def _cell(self, doc: int, now: int) -> tuple:
        f = self.feature(self.count[doc], self.length[doc], self.gap[doc])
        return (self.slice_of(now), f, log_bucket(now - self.last[doc], 13))

    def observe(self, chain: Sequence[int], now: int) -> None:
        if not chain:
            return                                       # a request with no full block reads nothing
        doc = chain[0]
        if now % self.every == 0:
            for d in self.count:
                self.exposure[self._cell(d, now)] += self.every
            self.total_exposure += self.every * len(self.count)
        if doc in self.count:
            self.events[self._cell(doc, now)] += 1
            self.total_events += 1
        self.gap[doc] = now - self.last[doc] if doc in self.last else -1
        self.count[doc] = self.count.get(doc, 0) + 1
        self.last[doc] = now
        self.length[doc] = len(chain)

    def rate(self, cell: tuple) -> float:
        x = self.exposure.get(cell, 0)
        if self.prior == "mean":
            # shrunk towards the mean hazard of all cells (worth 200 requests of exposure)
            mean = (self.total_events + 1) / (self.total_exposure + 1000)
            return (self.events.get(cell, 0) + 200 * mean) / (x + 200)
        # "low": a cell never seen ranks lowest; a weak prior (0.5 reads in 50 requests) keeps
        # barely seen cells from ranking as certain reuse. The more generous ceiling here.
        return (self.events.get(cell, 0) + 0.5) / (x + 50) if x else 0.0


class Cached:
    """A cached block: its class, the request that last used it and its use count."""
    __slots__ = ("cls", "last", "count")

    def __init__(self, last: int, count: int) -> None:
        self.cls = None
        self.last = last
        self.count = count


class HazardCache:
    """One tier with policy_sim's request semantics (match -> hits, pin, insert the missing blocks,
    the partial last block in its own class that goes first, release), evicting by a hazard table.
    Within a class blocks are kept in release order; a request's blocks are released deepest first
    so that a document is trimmed from its tail (leaf-first, as lineage does).

    The table is per document (its read count, the age of its last read) and is looked up per block
    (the block's use count, the age of its last use). On this trace they agree but for the partial
    tails and blocks of a document read only in part: the rows are reference points, not bounds."""

    def __init__(self, capacity: int, table: HazardTable):
        self.capacity = capacity
        self.feature = table.feature
        self.table = table
        self.blocks: dict[int, Cached] = {}
        self.classes: dict[object, OrderedDict] = defaultdict(OrderedDict)
        self.history: dict[int, int] = {}               # evicted hash -> use count (unbounded)
        self.doc_last: dict[int, int] = {}
        self.hits = 0
        self.requested = 0

    def _victim(self, now: int) -> int | None:
        tail = self.classes.get(TAIL)
        if tail:
            return tail.popitem(last=False)[0]
        q = self.table.slice_of(now)
        best = None
        for cls, members in self.classes.items():
            if not members or cls == TAIL:
                continue
            h = next(iter(members))
            hazard = self.table.rate((q, cls, log_bucket(now - self.blocks[h].last, 13)))
            if best is None or hazard < best[0]:
                best = (hazard, cls, h)
        if best is None:
            return None                                  # everything cached is this request's
        del self.classes[best[1]][best[2]]
        return best[2]

    def _make_room(self, now: int) -> bool:
        while len(self.blocks) >= self.capacity:
            v = self._victim(now)
            if v is None:
                return False
            self.history[v] = self.blocks.pop(v).count
        return True

    def access(self, chain: Sequence[int], now: int) -> int:
        n = len(chain)
        if n == 0:
            return 0
        k = 0
        while k < n and chain[k] in self.blocks:
            k += 1
        self.hits += k
        self.requested += n
        doc = chain[0]
        gap = now - self.doc_last[doc] if doc in self.doc_last else -1
        self.doc_last[doc] = now
        for h in chain:                                  # pin: out of the eviction order
            e = self.blocks.get(h)
            if e is not None:
                self.classes[e.cls].pop(h, None)
        for h in chain:
            if h in self.blocks:
                continue
            if not self._make_room(now):
                break                                    # longer than the cache: the rest is dropped
            self.blocks[h] = Cached(now, self.history.pop(h, 0))
        for j, h in enumerate(chain):
            e = self.blocks.get(h)
            if e is None:
                continue
            e.count += 1
            e.last = now
            e.cls = TAIL if (j == n - 1 and j >= k and e.count == 1) else self.feature(e.count, n, gap)
        for h in reversed(chain):                        # release, deepest first
            e = self.blocks.get(h)
            if e is not None:
                self.classes[e.cls][h] = None
        return k


def hazard_replay(chains, capacity: int, feature_name: str, slices: int = 1, online: bool = False,
                  prior: str = "low") -> float:
    """In-sample ceiling (the table measured on the whole trace first) or, with `online`, the
    same rule learning its table as the trace goes (a policy one could build)."""
    table = HazardTable(FEATURES[feature_name], slices, len(chains), prior=prior)
    if not online:
        for i, chain in enumerate(chains):
            table.observe(chain, i)
    cache = HazardCache(capacity, table)
    for i, chain in enumerate(chains):
        if online:
            table.observe(chain, i)
        cache.access(chain, i)
    return cache.hits / cache.requested


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None, help=ps.TRACE_HELP)
    ap.add_argument("--capacity", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--prior", choices=["low", "mean"], default="low",
                    help="rate of a cell seen little or never: lowest (default) or the mean")
    ap.add_argument("--windows", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800, 1600, 4000])
    args = ap.parse_args(argv)
    args.trace = ps.trace_arg(ap, args.trace)
    chains = ps.chains_of(ps.load_trace(args.trace))
    print(f"# {args.trace}: {len(chains)} requests, {sum(map(len, chains))} blocks")
    for cap in args.capacity:
        lru = ps.simulate(chains, cap, "lru").hit_ratio
        bel = ps.simulate(chains, cap, "belady").hit_ratio
        target = lru + 0.4 * (bel - lru)
        print(f"\n## {cap} blocks: LRU {lru:.4f}, Belady {bel:.4f}, target {target:.4f}")
        print("| reference | hit | gap closed |\n|---|---|---|")
        for w in args.windows:
            h = ps.simulate(chains, cap, OracleWindow(w)).hit_ratio
            print(f"| oracle: uses in the next {w} requests | {h:.4f} | {ps.gap_closed(h, lru, bel):+.3f} |")
        for name in FEATURES:
            for slices, online in ((1, False), (8, False), (1, True)):
                h = hazard_replay(chains, cap, name, slices, online, args.prior)
                how = args.prior + " prior, " + ("learned online" if online else "in-sample" +
                       (f", per 1/{slices} of the trace" if slices > 1 else ""))
                print(f"| hazard table ({how}): {name} x age | {h:.4f} | "
                      f"{ps.gap_closed(h, lru, bel):+.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
