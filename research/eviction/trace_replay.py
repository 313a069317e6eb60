"""Replay a Mooncake-format request trace against a prefix KV cache and report prefix-hit ratios.

Run from the repository root (the modules import each other as the package research.eviction):

    python -m research.eviction.trace_replay                  # shared trace, 2000 & 8000 blocks
    python -m research.eviction.trace_replay --capacity 1000 4000 16000 --policy lru lineage belady
    python -m research.eviction.trace_replay --g2 2000 --g3 8000 --admission all reused   # tiered G2 -> G3
    python -m research.eviction.trace_replay --engine registry --g1 1000 --g2 4000 --g3 16000  # kvbm's tiers
    python -m research.eviction.trace_replay --engine registry --policy lru   # the real BlockRegistry
    python -m research.eviction.trace_replay --engine registry --policy lru lineage belady --queue-depth 4 16 96
    python -m research.eviction.trace_replay --engine registry --policy lru lineage --load 0.9 1.0 1.2
    python -m research.eviction.trace_replay --engines 2 4 8 --route round-robin prefix --policy lru lineage
    python -m research.eviction.trace_replay --engine registry --engines 8 --g1 1000 --g2 8000   # shared G2
    python -m research.eviction.trace_replay --suite > results.md   # POLICY.md's validation tables
    python -m research.eviction.trace_replay --generate chat --out chat.jsonl.gz   # a synthetic trace
    python -m research.eviction.trace_replay --hindsight   # POLICY_ADAPTIVE.md's validation table
    python -m research.eviction.trace_replay --hindsight --tune --processes 2   # the tuner's fit (training set only)

Hit ratio = prefix hits / requested blocks over the whole trace (a request's hits are the longest
prefix of its hash chain found cached). "gap" = share of the LRU -> Belady gap closed.

Engines: `sim` (policy_sim.py, any number of tiers, every policy; tiers are exclusive, a
block evicted from one is offered to the next) and `registry` (the real
kvbm._fast.registry.BlockRegistry, for the policies it implements: lru, lineage; an offline
reference such as belady runs on the simulator there, marked "(sim)"). With --g1/--g2/--g3 the
registry engine replays kvbm's own tiering (TieredRegistryEngine): inclusive tiers, every block
offloaded to G2, G3 as G2's victim cache. Both implement `Engine.access(chain, req) -> per-tier
hits`, so a new backend only has to provide that.

Registry policies: `lru`; `lineage` = the product's LINEAGE with its default ghost table
(G = num_blocks; policy_research's `ghost1-lineage`); `adaptive` = ADAPTIVE (same table, the
credit tuned online; hindsight.py sweeps its fixed settings); `lineage-noghost` (G = 0; the simulator's
round-1 `lineage`); `ghost4-lineage` (G = 4 * num_blocks).

Queue hint (`--queue-depth K ...`, registry engine): while request i is served, requests i+1..i+K
are "waiting" -- hinted through kvbm.pools.WaitingHints, the code behind
KvBlockManager.hint_waiting/hint_done (request i+K is hinted and request i done before i is served).
Depth K means the engine sees K requests queued; at the shared trace's ~256 ms mean inter-arrival,
K = 96 is ~25 s of backlog. Rows `policy+qK` for each registry policy.

Engine replicas (`--engines N ... --route RULE ...`, routing.py): N engines on one node, each
request routed to one of them; the hit ratio of one cache of C shared by all against N private
caches of C/N each, per policy and route (`round-robin`, `prefix`, `first-block`: routing.Router).
One tier on both engines; with --g1/--g2/--g3 (registry engine) each engine has its own G1 and the
tiers below are shared or split.

Queue hint behind a prefill server (`--load RHO ...`, registry engine): instead of a fixed K, a
FIFO prefill server (PrefillServer) fed by the trace's own timestamps decides what is waiting;
RHO is its utilisation with nothing cached. Rows `policy+loadRHO` give the mean queue depth and
wait beside the hit ratio (POLICY_ROUND3.md section 3).
"""

from __future__ import annotations

import argparse
import bisect
import math
import statistics
import sys
import time
from collections.abc import Sequence

from research.eviction import hindsight, shadow, workloads
from research.eviction import policy_research as pr
from research.eviction import policy_sim as ps


# --------------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------------
class Engine:
    """A cache replayed request by request. access() returns the prefix hits per tier."""
    name = "engine"
    tiers: int = 1

    def access(self, chain: Sequence[int], req: int) -> list[int]:
        raise NotImplementedError

    def writes(self) -> list[int] | None:
        return None

    def prefix_held(self, chain: Sequence[int]) -> int:
        """The longest prefix of `chain` held in the engine's own tiers; changes nothing (what a
        prefix-aware router asks, routing.Router)."""
        raise NotImplementedError


class SimEngine(Engine):
    """policy_sim.py: exclusive tiers G1 -> G2 -> G3 with demotion and admission."""
    name = "sim"

    def __init__(self, capacities: Sequence[int], policy: str, admission: str = "all",
                 chains: Sequence[Sequence[int]] | None = None):
        fut = chains if ps.make_policy(policy).needs_future else None
        self.tc = ps.TieredCache(capacities, lambda: ps.make_policy(policy),
                                 admission=ps.ADMISSION[admission], future=fut)
        self.tiers = len(capacities)

    def access(self, chain, req):
        before = list(self.tc.stats.hits)
        self.tc.access(chain, req)
        return [a - b for a, b in zip(self.tc.stats.hits, before)]

    def writes(self):
        return list(self.tc.stats.writes)

    def prefix_held(self, chain):
        where = self.tc.where
        k = 0
        for h in chain:
            if where(h) < 0:
                break
            k += 1
        return k


# name -> (EvictionPolicy member, ghost table size in multiples of num_blocks (None: default),
#          the simulator policy whose tail priority the engine uses)
REGISTRY_POLICIES = {"lru": ("LRU", None, "lru"), "lineage": ("LINEAGE", None, "lineage"),
                     "adaptive": ("ADAPTIVE", None, "lineage"),
                     "lineage-noghost": ("LINEAGE", 0, "lineage"),
                     "ghost4-lineage": ("LINEAGE", 4, "lineage"),
                     "leaf-lru": ("LEAF_LRU", None, "leaf-lru")}


# Admission to G3 on the tiered registry engine (TieredRegistryEngine's docstring, step 4).
REGISTRY_ADMISSION = ("all", "full", "victim-freq2", "victim-freq3", "write-through", "write-through-full",
                      "freq2", "freq3")


class PrefillServer:
    """The engine in front of the cache, for the queue hint: one FIFO prefill server fed by the
    trace's own arrival times (`timestamp`, ms). A request starts when it has arrived and the one
    before it has finished; it takes (uncached input tokens) / rate seconds, so cache hits shorten
    the queue as they would in an engine. Every request that has arrived by the time request i
    starts is waiting, and hinted, while i is served.

    `load` sets the rate from the trace alone: rate = (input tokens of the trace / its duration) /
    load, i.e. `load` is the server's utilisation if nothing were cached (1.0: it keeps up only
    thanks to the cache). The queue that forms is whatever the arrivals and hits make it; the
    report gives its mean depth and the mean and p99 wait."""

    def __init__(self, trace: Sequence[dict], load: float, block_tokens: int = 512):
        if not (math.isfinite(load) and load > 0):
            raise ValueError(f"load must be a finite number > 0, got {load}")
        try:
            self.arrival = [float(r["timestamp"]) / 1000.0 for r in trace]
        except KeyError:
            raise ValueError("a prefill server needs every request's timestamp (ms)") from None
        if not self.arrival:
            raise ValueError("a prefill server needs at least one request")
        if any(b < a for a, b in zip(self.arrival, self.arrival[1:])):
            raise ValueError("trace timestamps must not decrease")
        span = self.arrival[-1] - self.arrival[0]
        if len(self.arrival) > 1 and span <= 0:
            raise ValueError("trace timestamps span no time: no arrival rate to size the server by")
        self.tokens = [int(r.get("input_length") or len(r["hash_ids"]) * block_tokens) for r in trace]
        # one request: any rate will do (it never waits); else the offered load over the span
        self.rate = sum(self.tokens) / (span if span > 0 else 1.0) / load   # prefill tokens per second
        self.block_tokens = block_tokens
        self.free_at = self.arrival[0]
        self._start = 0.0
        self.waits: list[float] = []
        self.depths: list[int] = []

    def start(self, req: int) -> int:
        """Start request req; returns the last request index that has arrived by then."""
        self._start = max(self.arrival[req], self.free_at)
        last = bisect.bisect_right(self.arrival, self._start) - 1
        self.waits.append(self._start - self.arrival[req])
        self.depths.append(last - req)
        return last

    def finish(self, req: int, hit_blocks: int) -> None:
        uncached = max(self.tokens[req] - hit_blocks * self.block_tokens, 0)
        self.free_at = self._start + uncached / self.rate

    def summary(self) -> str:
        w = sorted(self.waits)
        return (f"queue {statistics.mean(self.depths):.1f} deep, wait mean {statistics.mean(w):.1f} s, "
                f"p99 {w[int(0.99 * (len(w) - 1))]:.1f} s")


class RegistryEngine(Engine):
    """One tier on kvbm._fast.registry.BlockRegistry -- the same request semantics as the simulator:
    match (acquire) the longest prefix = hits; acquire the request's other cached runs (touched, not
    hits); allocate + complete + register the missing runs (register touches; the partial last
    block gets the policy's tail priority); release everything in chain order (release stamps a
    tick). allocate() evicts inactive blocks in the registry's policy order.

    `lru` -> POLICY_LRU, `lineage` -> POLICY_LINEAGE with a ghost table of G entries: the same
    hit counts as the simulator (policy_sim `lru`; policy_research.GhostLineage with the same G,
    or policy_sim `lineage` for G = 0), up to exact key ties, which the registry breaks by block id
    and the simulator by insertion version (lineage only: a credited block and an uncredited one C
    ticks younger; round 1 measured 19 of 121,877 hits moved at 1,000 blocks, none at 2,000 to
    16,000). Offline references (belady) run on the simulator (make_engine).

    queue_depth K > 0 (needs `chains`): the queue hint, see the module docstring."""
    name = "registry"

    def __init__(self, capacity: int, policy: str, ghost_blocks: int | None = None,
                 queue_depth: int = 0, chains: Sequence[Sequence[int]] | None = None,
                 server: PrefillServer | None = None):
        import numpy as np

        from kvbm.policy import EvictionPolicy
        from kvbm.pools import BlockPool, Tier, WaitingHints

        member, mult, sim_name = REGISTRY_POLICIES.get(policy, (None, None, None))
        if member is None or not hasattr(EvictionPolicy, member):
            have = [m.name for m in EvictionPolicy]
            raise SystemExit(f"registry engine: policy {policy!r} is not implemented by the registry "
                             f"(EvictionPolicy has {have})")
        if ghost_blocks is None and mult is not None:
            ghost_blocks = mult * capacity
        self.np = np
        self.pool = BlockPool(Tier.G1, capacity, member.lower(), ghost_blocks=ghost_blocks)
        self.reg = self.pool.registry
        self.tail_priority = ps.make_policy(sim_name).tail_priority
        self.queue_depth = queue_depth
        self.chains = chains
        self.server = server
        self.hints = WaitingHints({Tier.G1: self.pool}) if queue_depth or server else None
        self._next_hint = 1     # first request not hinted yet
        if (queue_depth or server) and chains is None:
            raise ValueError("a queue hint needs the trace (chains)")

    def _queue(self, req: int) -> None:
        # Request req leaves the queue (it is served now); requests up to req + K are waiting.
        hints = self.hints
        if req in hints.waiting:
            hints.done(req)
        if self.server is not None:
            last = self.server.start(req)       # what has arrived by the time req starts
        else:
            last = min(req + self.queue_depth, len(self.chains) - 1)
        for r in range(max(self._next_hint, req + 1), last + 1):
            hints.add(r, self.np.asarray(self.chains[r], dtype=self.np.uint64))
        self._next_hint = max(self._next_hint, last + 1)

    def access(self, chain, req):
        np = self.np
        reg = self.reg
        if self.hints is not None:
            self._queue(req)
        hs = np.asarray(chain, dtype=np.uint64)
        n = hs.shape[0]
        held = []   # (start position, block ids): released in chain order
        prefix = reg.match(hs, acquire=True)
        k = int(prefix.shape[0])
        held.append((0, prefix))
        if k < n:
            present = reg.lookup(hs[k:]) >= 0
            j = k
            runs = []   # (start, end, cached)
            while j < n:
                c = bool(present[j - k])
                e = j
                while e < n and bool(present[e - k]) == c:
                    e += 1
                runs.append((j, e, c))
                j = e
            for a, e, c in runs:          # pin the cached runs first (as the simulator does)
                if c:
                    got = reg.match(hs[a:e], acquire=True)
                    held.append((a, got))
            for a, e, c in runs:
                if c:
                    continue
                avail = int(reg.num_free) + int(reg.num_inactive)
                short = avail < e - a            # request longer than the free room: keep a prefix
                if short:
                    e = a + avail
                    if e == a:
                        break
                ids = reg.allocate(e - a)
                if ids is None:
                    break
                reg.complete(ids)
                parents = np.empty(e - a, dtype=np.uint64)
                has_parent = np.ones(e - a, dtype=bool)
                if a > 0:
                    parents[0] = hs[a - 1]
                else:
                    parents[0] = 0
                    has_parent[0] = False
                parents[1:] = hs[a:e - 1]
                prios = np.zeros(e - a, dtype=np.int32)
                if e == n:
                    prios[-1] = self.tail_priority
                canon = reg.register(ids, hs[a:e], parents, priorities=prios, has_parent=has_parent)
                if self.hints is not None:
                    self.hints.registered(reg, hs[a:e], canon)
                held.append((a, canon))
                if short:
                    break
        held.sort(key=lambda x: x[0])
        reg.release(np.concatenate([ids for _, ids in held]))
        if self.server is not None:
            self.server.finish(req, k)
        return [k]

    def prefix_held(self, chain):
        return _held(self.np, [self.reg], chain)


def _held(np, regs, chain) -> int:
    """Longest prefix of `chain` registered in any of `regs` (lookups only)."""
    if len(chain) == 0:
        return 0
    hs = np.asarray(chain, dtype=np.uint64)
    held = np.zeros(hs.shape[0], dtype=bool)
    for reg in regs:
        held |= reg.lookup(hs) >= 0
    return int(np.argmin(held)) if not held.all() else int(hs.shape[0])


def ghost_lineage_sim(chains: Sequence[Sequence[int]], capacity: int, ghost_blocks: int) -> ps.Stats:
    """policy_research.GhostLineage (its OrderedDict ghost table of `ghost_blocks` entries) on the
    simulator, in the registry's allocation order: the blocks a missing run needs are evicted
    before any of them registers (allocate, then register: the order of an engine and of
    RegistryEngine). policy_research's HookCache interleaves instead (restore block j, then evict
    one for it), so an entry that expires during the run's own evictions is restored there and
    not here; on small tables that moves hits either way (POLICY_ROUND2's ghost1 figures: 0.1464 /
    0.3923 vs 0.1466 / 0.3925 in this order at 2000 / 8000 blocks). RegistryEngine's `lineage`
    with G = ghost_blocks gives exactly these hits (tests/test_trace_replay.py)."""

    class RunFirstCache(pr.HookCache):
        def access(self, chain, req=None, tail_partial=True):
            blocks = self.blocks
            present = [h in blocks for h in chain]
            n = len(chain)
            i = 0
            while i < n and present[i]:
                i += 1
            # make room for each missing run before anything of it registers (the puts then never
            # evict), as allocate() does; a run that does not fit is cut by put() as before
            self._room = {}
            while i < n:
                e = i
                while e < n and not present[e]:
                    e += 1
                self._room[i] = e - i
                while e < n and present[e]:
                    e += 1
                i = e
            return super().access(chain, req, tail_partial)

        def put(self, b):
            need = self._room.pop(b.depth, 0)     # depth = position in the chain
            if need:
                # pins of this request are taken already (access pins cached blocks first)
                while len(self.blocks) + need > self.capacity:
                    if self.evict_one() is None:
                        break
            return super().put(b)

    c = RunFirstCache(capacity, pr.GhostLineage(ghost_mult=ghost_blocks / capacity))
    for i, ch in enumerate(chains):
        c.access(ch, i)
    return c.stats


def registry_available() -> bool:
    try:
        from kvbm._fast import registry  # noqa: F401
        return True
    except Exception:
        return False


class TieredRegistryEngine(Engine):
    """G1, G2 and optionally G3 on real registries, with kvbm's own data flow (the demo's), so the
    tiers are inclusive, unlike the simulator's exclusive ones:

    1. each block of the request is attributed to the highest tier holding it; the request hits
       the longest prefix held somewhere (lookups only, before anything changes);
    2. G1 (the engine's blocks) serves the request as RegistryEngine does: its cached blocks are
       acquired, every other block -- onboarded from G2/G3 or computed -- is allocated and
       registered there; the G2 and G3 blocks it read are touched where they are;
    3. every block of the request is offloaded to G2 (HostTransfers.offload: blocks G2 holds
       already are left alone, the rest registered and released, inactive);
    4. G3, when given, takes blocks by `admission` (REGISTRY_ADMISSION; the disk tier's admission
       rules, kvbm's `disk_admission`):
       - victim cache: hashes G2 evicted are registered in G3 ("all"; "full": not a request's
         partial last block; "victim-freqK": only those read by K or more requests so far);
       - write-through on registration ("write-through"): every block newly registered in G2
         is written to G3 too ("write-through-full": not a partial last block);
       - frequency threshold ("freqK"): a block is written to G3 once K or more requests have read
         it (counted per hash over the trace, as kvbm's count sketch does), from G2 where it is.
       ("reused" of the simulator needs use counts of evicted blocks, which the registry does not
       report, so it is refused.)
    Each tier evicts by its own registry policy.

    `share_below` (another TieredRegistryEngine): this engine has its own G1 and uses the other's
    G2 and G3 -- their registries and what they know of the trace (parents, tails, read counts,
    writes) --, as engine replicas sharing one node's host and disk tiers (routing.py).
    `own_tiers`: the tiers a prefix-aware router may count as this engine's (prefix_held): all of
    them, or G1 alone where G2 and G3 are shared (set to 1 here, and by routing.shared_node on the
    engine whose tiers the others share)."""
    name = "registry"

    def __init__(self, capacities: Sequence[int], policy: str, admission: str = "all",
                 share_below: TieredRegistryEngine | None = None):
        import numpy as np
        if len(capacities) not in (2, 3):
            raise SystemExit("tiered registry engine: give G1 and G2 (and G3)")
        if admission not in REGISTRY_ADMISSION:
            raise SystemExit(f"tiered registry engine: admission {admission!r} is not one of "
                             f"{', '.join(REGISTRY_ADMISSION)} (\"reused\" needs the use counts of evicted "
                             "blocks, which the registry does not report)")
        self.np = np
        self.tiers = len(capacities)
        self.g1 = RegistryEngine(capacities[0], policy)
        self.tail_priority = self.g1.tail_priority
        self.admission = admission
        if share_below is None:
            self.lower = [RegistryEngine(c, policy).reg for c in capacities[1:]]
            self.parent: dict[int, int] = {}     # hash -> parent hash, for blocks registered below G1
            self.tails: set[int] = set()         # hashes that were a request's partial last block
            self.stored = [0] * self.tiers       # blocks written to each tier below G1
            self.count: dict[int, int] = {}      # hash -> requests that read it (frequency admissions)
            self.own_tiers = self.tiers
        else:
            other = share_below
            below = [int(r.num_blocks) for r in other.lower]
            if below != list(capacities[1:]) or other.admission != admission:
                raise ValueError(f"share_below: the shared tiers hold {below} blocks with admission "
                                 f"{other.admission!r}, asked {list(capacities[1:])} and {admission!r}")
            self.lower, self.parent, self.tails = other.lower, other.parent, other.tails
            self.stored, self.count = other.stored, other.count
            self.own_tiers = 1
        kind, _, k = admission.partition("freq")
        self.threshold = int(k) if k else 0  # freqK / victim-freqK: K

    def _store(self, tier: int, reg, hashes) -> list[int]:
        """Registers the hashes `reg` does not hold (runs of consecutive ones), then releases them;
        returns the hashes stored."""
        np = self.np
        stored: list[int] = []
        if len(hashes) == 0:
            return stored
        hs = np.asarray(hashes, dtype=np.uint64)
        missing = np.flatnonzero(reg.lookup(hs) < 0)
        for run in np.split(missing, np.flatnonzero(np.diff(missing) != 1) + 1):
            if run.size == 0:
                continue
            room = int(reg.num_free) + int(reg.num_inactive)
            run = run[:room]
            if run.size == 0:
                return stored
            ids = reg.allocate(int(run.size))
            reg.complete(ids)
            part = hs[run]
            parents = np.array([self.parent.get(int(h), 0) for h in part], dtype=np.uint64)
            has_parent = np.array([int(h) in self.parent for h in part], dtype=bool)
            prios = np.array([self.tail_priority if int(h) in self.tails else 0 for h in part], dtype=np.int32)
            canon = reg.register(ids, part, parents, priorities=prios, has_parent=has_parent)
            reg.release(canon)
            self.stored[tier] += int(run.size)
            stored += part.tolist()
        return stored

    def access(self, chain, req):
        np = self.np
        hs = np.asarray(chain, dtype=np.uint64)
        n = hs.shape[0]
        if n == 0:
            return [0] * self.tiers
        for j in range(1, n):
            self.parent.setdefault(int(hs[j]), int(hs[j - 1]))
        self.tails.add(int(hs[-1]))
        count = self.count
        for h in chain:
            count[h] = count.get(h, 0) + 1
        found = [reg.lookup(hs) for reg in [self.g1.reg] + self.lower]   # block ids, -1 if absent
        where = np.full(n, -1)
        for t in reversed(range(self.tiers)):
            where[found[t] >= 0] = t                        # the highest tier wins
        k = int(np.argmax(where < 0)) if (where < 0).any() else n
        hits = [int((where[:k] == t).sum()) for t in range(self.tiers)]
        for t, reg in enumerate(self.lower, start=1):       # read there: touched
            ids = found[t][:k][where[:k] == t]
            if ids.size:
                reg.touch(ids)
        self.g1.access(chain, req)                          # onboarded + computed blocks land in G1
        new_in_g2 = self._store(1, self.lower[0], hs)       # offload to G2
        if len(self.lower) > 1:
            victims = self.lower[0].drain_evicted().tolist()
            adm = self.admission
            if adm in ("all", "full", "victim-freq2", "victim-freq3"):
                if adm == "full":
                    victims = [h for h in victims if h not in self.tails]
                elif self.threshold:
                    victims = [h for h in victims if count.get(h, 0) >= self.threshold]
                self._store(2, self.lower[1], victims)
            elif adm.startswith("write-through"):
                if adm == "write-through-full":
                    new_in_g2 = [h for h in new_in_g2 if h not in self.tails]
                self._store(2, self.lower[1], new_in_g2)
            else:                                           # freqK: from G2, where the request left them
                self._store(2, self.lower[1], [h for h in chain if count[h] >= self.threshold])
        return hits

    def writes(self):
        return self.stored

    def prefix_held(self, chain):
        return _held(self.np, ([self.g1.reg] + self.lower)[:self.own_tiers], chain)


# --------------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------------
def replay(engine: Engine, chains: Sequence[Sequence[int]]) -> tuple[int, list[int]]:
    hits = [0] * engine.tiers
    total = 0
    for i, ch in enumerate(chains):
        h = engine.access(ch, i)
        for t, x in enumerate(h):
            hits[t] += x
        total += len(ch)
    return total, hits


def make_engine(kind: str, capacities: Sequence[int], policy: str, admission: str,
                chains, queue_depth: int = 0, server: PrefillServer | None = None) -> Engine:
    if kind == "registry":
        if not registry_available():
            raise SystemExit("registry engine: kvbm._fast.registry does not import (build it first)")
        if policy not in REGISTRY_POLICIES and ps.make_policy(policy).needs_future:
            # An offline reference (Belady) reads the future trace: no registry policy can be one.
            # It runs on the simulator and its row says so.
            return SimEngine(capacities, policy, admission, chains)
        if len(capacities) > 1:
            if queue_depth or server:
                raise SystemExit("--queue-depth and --load: one tier only on the registry engine")
            return TieredRegistryEngine(capacities, policy, admission)
        return RegistryEngine(capacities[0], policy, queue_depth=queue_depth, chains=chains, server=server)
    if queue_depth or server:
        raise SystemExit("--queue-depth and --load need --engine registry")
    return SimEngine(capacities, policy, admission, chains)


def run_table(chains, capacities_list: list[list[int]], policies: list[str], engine: str,
              admissions: list[str], out=sys.stdout, tier_names: list[str] | None = None,
              queue_depths: Sequence[int] = (), loads: Sequence[float] = (),
              trace: Sequence[dict] | None = None) -> list[dict]:
    rows = []
    for caps in capacities_list:
        label = "+".join(str(c) for c in caps)
        ref = {}
        for p in ("lru", "belady"):       # LRU -> Belady gap, one tier of the total capacity
            ref[p] = ps.simulate(chains, sum(caps), p).hit_ratio
        tiers = len(caps)
        names = (tier_names or ["G1", "G2", "G3"])[:tiers] if tiers > 1 else ["hit"]
        print(f"\n## capacity {label} blocks  (one tier of {sum(caps)}: LRU {ref['lru']:.4f}, "
              f"Belady {ref['belady']:.4f})", file=out)
        hdr = "| policy | admission | " + " | ".join(names) + (" | overall" if tiers > 1 else "") + \
              " | gap closed | writes below G1 | s |"
        print(hdr, file=out)
        print("|" + "---|" * (hdr.count("|") - 1), file=out)
        variants = [(p, 0, 0.0) for p in policies]
        hinted = [p for p in policies if engine == "registry" and p in REGISTRY_POLICIES]
        variants += [(p, k, 0.0) for k in queue_depths if k for p in hinted]
        variants += [(p, 0, rho) for rho in loads for p in hinted]
        for p, depth, rho in variants:
            for adm in (admissions if tiers > 1 else ["all"]):
                t0 = time.time()
                server = PrefillServer(trace, rho) if rho > 0 else None   # rho 0.0: no server
                eng = make_engine(engine, caps, p, adm, chains, depth, server)
                total, hits = replay(eng, chains)
                hr = sum(hits) / total
                g = ps.gap_closed(hr, ref["lru"], ref["belady"])
                w = eng.writes()
                wtxt = "/".join(str(x) for x in w[1:]) if w and tiers > 1 else "-"
                cells = [f"{h / total:.4f}" for h in hits] + ([f"{hr:.4f}"] if tiers > 1 else [])
                label = p if eng.name == engine else f"{p} ({eng.name})"
                if depth:
                    label += f"+q{depth}"
                if server is not None:
                    label += f"+load{rho:g} ({server.summary()})"
                print(f"| {label} | {adm if tiers > 1 else '-'} | " + " | ".join(cells) +
                      f" | {g:+.3f} | {wtxt} | {time.time() - t0:.1f} |", file=out, flush=True)
                rows.append(dict(caps=caps, policy=p, admission=adm, hits=hits, total=total,
                                 hit=hr, gap=g, writes=w, queue_depth=depth, load=rho,
                                 server=server.summary() if server else None))
    return rows


def suite(chains, policies: list[str], out=sys.stdout) -> None:
    """The validation tables of POLICY.md: shared trace at several capacities, its time-split
    halves, and the synthetic suite (seeds 1 and 2) at 1000 and 4000 blocks."""
    cases = ps.suite_cases(chains)
    gaps: dict[str, list[float]] = {p: [] for p in policies}
    print("| trace | blocks | LRU | Belady | " + " | ".join(policies) + " |", file=out)
    print("|" + "---|" * (4 + len(policies)), file=out)
    for name, ch, cap in cases:
        lru = ps.simulate(ch, cap, "lru").hit_ratio
        bel = ps.simulate(ch, cap, "belady").hit_ratio
        cells = []
        for p in policies:
            h = ps.simulate(ch, cap, p).hit_ratio
            g = ps.gap_closed(h, lru, bel)
            gaps[p].append(g)
            cells.append(f"{h:.3f} ({g:+.2f})")
        print(f"| {name} | {cap} | {lru:.3f} | {bel:.3f} | " + " | ".join(cells) + " |", file=out, flush=True)
    print("\n| policy | mean gap closed | min | max | cases worse than LRU |", file=out)
    print("|---|---|---|---|---|", file=out)
    for p in policies:
        g = gaps[p]
        print(f"| {p} | {statistics.mean(g):+.3f} | {min(g):+.3f} | {max(g):+.3f} | "
              f"{sum(x < -0.005 for x in g)}/{len(g)} |", file=out)


def _positive_load(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a load is a finite number > 0, got {text!r}")
    return value


def main(argv=None) -> int:
    # routing.py builds on this module's engines, so it is imported here, not at the top
    from research.eviction import routing
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None, help=ps.TRACE_HELP)
    ap.add_argument("--capacity", type=int, nargs="+", default=None,
                    help="one-tier capacities in blocks (default 2000 8000)")
    ap.add_argument("--g1", type=int, default=None, help="G1 (device) capacity: tiered replay")
    ap.add_argument("--g2", type=int, default=None, help="G2 (host) capacity: tiered replay")
    ap.add_argument("--g3", type=int, default=None, help="G3 (disk) capacity: tiered replay")
    ap.add_argument("--policy", nargs="+", default=None,
                    help=f"policies: {', '.join(ps.POLICIES)} (default lru leaf-lru lineage belady; "
                         "with --engines lru lineage)")
    ap.add_argument("--admission", nargs="+", default=None,
                    choices=list(dict.fromkeys(list(ps.ADMISSION) + list(REGISTRY_ADMISSION))),
                    help="admission to the lowest tier (tiered replay; default: all reused on the "
                         "simulator, all full on the registry, which cannot tell use counts of evicted blocks)")
    ap.add_argument("--engine", choices=["sim", "registry"], default="sim")
    ap.add_argument("--queue-depth", type=int, nargs="+", default=[],
                    help="registry engine: also replay each registry policy with the next K "
                         "requests hinted as waiting (KvBlockManager.hint_waiting), per K")
    ap.add_argument("--load", type=_positive_load, nargs="+", default=[],
                    help="registry engine: also replay each registry policy behind a FIFO prefill "
                         "server (PrefillServer) whose waiting queue is hinted; LOAD = its "
                         "utilisation if nothing were cached, per LOAD")
    ap.add_argument("--engines", type=int, nargs="+", default=[],
                    help="replay N engine replicas, per N: one shared cache of the capacity against N "
                         "private caches of capacity / N (routing.py)")
    ap.add_argument("--route", nargs="+", choices=routing.ROUTES, default=["round-robin", "prefix"],
                    help="with --engines: how requests are routed to engines, per rule (routing.Router)")
    ap.add_argument("--split", type=int, default=0, help="replay only this time-split half (1 or 2)")
    ap.add_argument("--suite", action="store_true", help="print POLICY.md's validation tables")
    ap.add_argument("--hindsight", action="store_true",
                    help="print POLICY_ADAPTIVE.md's validation table (hindsight.py): LRU, lineage, "
                         "adaptive, the hindsight-best fixed setting and Belady per case, with the checks")
    ap.add_argument("--shared-only", action="store_true",
                    help="with --hindsight: only the shared trace and its halves")
    ap.add_argument("--tune", action="store_true",
                    help="with --hindsight: fit ADAPTIVE's tuner (mini cache size, decay) on the training "
                         "set only (shadow.tune: hindsight.TRAINING and RULE, shadow.GRID)")
    ap.add_argument("--processes", type=int, default=1,
                    help="with --hindsight: worker processes for the replays (fork)")
    ap.add_argument("--generate", choices=["rag", "sysprompt", "chat", "agent", "mixed", *workloads.SHAPES],
                    default=None, help="write a synthetic trace to --out and exit")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args(argv)
    if args.policy is None:
        args.policy = ["lru", "lineage"] if args.engines else ["lru", "leaf-lru", "lineage", "belady"]

    if args.generate:
        if args.generate in workloads.SHAPES:
            tr = workloads.generate(args.generate, n_requests=args.requests, seed=args.seed)
        else:
            tr = ps.generate_trace(args.generate, n_requests=args.requests, seed=args.seed)
        ps.save_trace(args.out or f"{args.generate}.jsonl", tr)
        return 0
    args.trace = ps.trace_arg(ap, args.trace)
    trace = ps.load_trace(args.trace)
    chains = ps.chains_of(trace)
    if args.split:
        chains = ps.split_trace(chains, 2)[args.split - 1]
        trace = ps.split_trace(trace, 2)[args.split - 1]
    print(f"# {args.trace}: {len(chains)} requests, {sum(map(len, chains))} blocks requested, "
          f"engine {args.engine}")
    if args.hindsight:
        if args.split:
            raise SystemExit("--hindsight: its cases include both halves; give no --split")
        if args.tune:
            shadow.tune(chains, processes=args.processes)
        else:
            hindsight.validate(chains, synthetic=not args.shared_only, processes=args.processes)
        return 0
    if args.suite:
        suite(chains, [p for p in args.policy if p not in ("lru", "belady")] or ["lineage"])
        return 0
    named = [(n, c) for n, c in (("G1", args.g1), ("G2", args.g2), ("G3", args.g3)) if c]
    if named and args.engine == "registry" and not args.g1:
        raise SystemExit("the registry engine's tiers start at the engine's own: give --g1 (and --g2, --g3)")
    if args.admission is None:
        args.admission = ["all", "full"] if args.engine == "registry" else ["all", "reused"]
    if named:
        caps_list = [[c for _, c in named]]
    else:
        caps_list = [[c] for c in (args.capacity or [2000, 8000])]
    if (args.queue_depth or args.load) and args.engine != "registry":
        raise SystemExit("--queue-depth and --load need --engine registry")
    if args.engines:
        if args.queue_depth or args.load:
            raise SystemExit("--engines: give no --queue-depth or --load (one queue per engine is not modelled)")
        if min(args.engines) < 1:
            raise SystemExit(f"--engines: at least 1 engine, got {min(args.engines)}")
        routing.run_node_table(chains, args.engines, caps_list, args.policy, args.engine, args.route,
                               admissions=args.admission)
        return 0
    run_table(chains, caps_list, args.policy, args.engine, args.admission,
              tier_names=[n for n, _ in named] or None, queue_depths=args.queue_depth,
              loads=args.load, trace=trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
