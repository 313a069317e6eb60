"""Engine replicas on one node: one shared cache against a private cache each (issue 15).

A node runs N engine replicas (data parallel). Each request is routed to one of them. Either the
replicas share one cache of C blocks (kvbm's shared G2), or each has a private cache of C/N
blocks; the replay compares the two on the same trace, with the same routing.

Parts, in the order a request meets them:

- `Router`: which engine serves request i (`ROUTES`):
  - `round-robin`: engine i mod N, i = the request's position in the replayed trace (its arrival
    order);
  - `prefix`: the engine whose own cache holds the longest prefix of the request's hash chain
    (`Engine.prefix_held`: lookups, nothing changes). Ties go to the engine with the least load (the
    fewest requests routed to it so far), then to the first tied engine in cyclic order after the
    one that took the previous request (round-robin). The longest prefix always wins, however loaded
    its engine; a request nobody holds any of goes to the least-loaded engine;
  - `first-block`: engine = the first block's hash id mod N (a sticky router that knows nothing of
    the caches: every request that starts with the same block lands on the same engine). The
    issue's "prefix-aware router" figures are this rule's (RESULTS.md).
- `Node` (a trace_replay.Engine): N engines behind a Router; `access` routes, then the chosen
  engine serves the request as it would alone. Built by `private_node` (N engines with C/N each)
  or `shared_node` (one cache of C; with tiers, N engines each with its own G1 over one shared G2
  and G3, which a prefix-aware router does not see).
- `run_node_table`: for each engine count, capacity, policy and route, the hit ratio of the shared
  cache against the private ones, and the load spread the router left.

Capacities: C/N is C // N, the first C mod N engines one block more (the private caches hold C in
all). With tiers (`--g1 G --g2 C [--g3 D]`, registry engine only), G1 is each engine's own (G
blocks each, never divided) and the tiers below are shared or split. The simulator's tiers are
exclusive (an onboarded block leaves G2), which no shared G2 does, so it replays one tier only.
Offline policies (Belady) read the future of the trace each cache sees, which depends on the
routing: refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from research.eviction import policy_sim as ps
from research.eviction import trace_replay as tr

ROUTES = ("round-robin", "prefix", "first-block")


class Router:
    """Picks the engine of each request (the module docstring gives the rules); counts the
    requests routed to each engine (`load`)."""

    def __init__(self, engines: int, rule: str):
        if rule not in ROUTES:
            raise ValueError(f"route {rule!r} is not one of {', '.join(ROUTES)}")
        if engines < 1:
            raise ValueError(f"a router needs at least 1 engine, got {engines}")
        self.n = engines
        self.rule = rule
        self.load = [0] * engines
        self.last = -1          # the engine that took the previous request

    def pick(self, req: int, chain: Sequence[int], held: Callable[[int], int]) -> int:
        """The engine of request `req`; held(e) = the longest prefix of `chain` engine e holds
        (asked by `prefix` only)."""
        n = self.n
        if n == 1:
            e = 0
        elif self.rule == "round-robin":
            e = req % n
        elif self.rule == "first-block":
            e = int(chain[0]) % n if len(chain) else req % n
        else:
            lens = [held(j) for j in range(n)]
            best = max(lens)
            load, last = self.load, self.last
            e = min((j for j in range(n) if lens[j] == best),
                    key=lambda j: (load[j], (j - last - 1) % n))
        self.load[e] += 1
        self.last = e
        return e

    def spread(self) -> float:
        """Requests of the busiest engine over the mean (1.0: perfectly even)."""
        total = sum(self.load)
        return max(self.load) * self.n / total if total else 1.0


class Node(tr.Engine):
    """N engines behind a Router: access() routes the request, the chosen engine serves it."""
    name = "node"

    def __init__(self, engines: Sequence[tr.Engine], route: str):
        self.engines = list(engines)
        self.router = Router(len(self.engines), route)
        self.tiers = self.engines[0].tiers
        self.name = self.engines[0].name

    def access(self, chain, req):
        engines = self.engines
        e = self.router.pick(req, chain, lambda j: engines[j].prefix_held(chain))
        return engines[e].access(chain, req)


def split(capacity: int, engines: int) -> list[int]:
    """C blocks over N private caches: C // N each, the first C mod N one more."""
    if capacity < engines:
        raise SystemExit(f"{capacity} blocks cannot be split over {engines} engines (each needs >= 1)")
    return [capacity // engines + (1 if e < capacity % engines else 0) for e in range(engines)]


def _check(kind: str, caps: Sequence[int], policy: str) -> None:
    if kind == "sim" and len(caps) > 1:
        raise SystemExit("--engines with tiers needs --engine registry: the simulator's tiers are "
                         "exclusive (an onboarded block leaves G2), which no shared G2 is")
    if policy not in tr.REGISTRY_POLICIES and ps.make_policy(policy).needs_future:
        raise SystemExit(f"--engines: {policy} reads the future of the trace each cache sees, which "
                         "depends on the routing; give online policies")
    if kind == "registry" and not tr.registry_available():
        raise SystemExit("registry engine: kvbm._fast.registry does not import (build it first)")


def private_node(kind: str, caps: Sequence[int], policy: str, engines: int, route: str,
                 admission: str = "all") -> Node:
    """N engines, each with its own cache: one tier of C/N blocks, or its own G1 of caps[0] and
    C/N of each tier below."""
    _check(kind, caps, policy)
    shares = [split(c, engines) for c in caps[1:]] if len(caps) > 1 else [split(caps[0], engines)]
    out = []
    for e in range(engines):
        mine = [caps[0]] + [s[e] for s in shares] if len(caps) > 1 else [shares[0][e]]
        out.append(tr.make_engine(kind, mine, policy, admission, chains=None))
    return Node(out, route)


def shared_node(kind: str, caps: Sequence[int], policy: str, engines: int, route: str,
                admission: str = "all") -> Node:
    """One cache of C for all engines: one tier, or N engines with a G1 of caps[0] each over one
    G2 (and G3) of caps[1:]. With one tier the route does not matter (one cache sees every
    request in arrival order)."""
    _check(kind, caps, policy)
    if len(caps) == 1:
        return Node([tr.make_engine(kind, caps, policy, admission, chains=None)], route)
    first = tr.TieredRegistryEngine(caps, policy, admission)
    first.own_tiers = 1                   # its G2 and G3 are everyone's: a router sees its G1 only
    rest = [tr.TieredRegistryEngine(caps, policy, admission, share_below=first)
            for _ in range(engines - 1)]
    return Node([first] + rest, route)


def run_node_table(chains, engine_counts: Sequence[int], capacities_list: Sequence[Sequence[int]],
                   policies: Sequence[str], kind: str, routes: Sequence[str],
                   admissions: Sequence[str] = ("all",), out=None) -> list[dict]:
    """Shared against private hit ratios, a table per (engine count, capacities); rows per policy,
    admission (with three tiers) and route. Returns one dict per row."""
    out = out or sys.stdout
    for caps in capacities_list:          # refuse what cannot run before printing anything
        for p in policies:
            _check(kind, caps, p)
        for n in engine_counts:
            for c in caps[1:] if len(caps) > 1 else caps:
                split(c, n)
    rows = []
    for n in engine_counts:
        for caps in capacities_list:
            tiered = len(caps) > 1
            if tiered:
                below = " + ".join(f"{c}" for c in caps[1:])
                title = (f"{n} engines, G1 {caps[0]} each; below: shared {below} vs private "
                         f"{' + '.join(_each(c, n) for c in caps[1:])} each")
            else:
                title = f"{n} engines, {caps[0]} blocks: shared 1 x {caps[0]} vs private {n} x {_each(caps[0], n)}"
            print(f"\n## {title}", file=out)
            detail = " (" + "/".join(["G1", "G2", "G3"][:len(caps)]) + ")" if tiered else ""
            hdr = (f"| policy | admission | route | shared{detail} | private{detail} | shared / private | "
                   "busiest engine / mean (private) | s |")
            print(hdr, file=out)
            print("|" + "---|" * (hdr.count("|") - 1), file=out)
            for p in policies:
                for adm in (admissions if len(caps) > 2 else ["all"]):
                    one_tier_shared = None
                    for route in routes:
                        t0 = time.time()
                        if tiered or one_tier_shared is None:
                            node = shared_node(kind, caps, p, n, route, adm)
                            total, sh = tr.replay(node, chains)
                            if not tiered:
                                one_tier_shared = sh
                        else:
                            sh = one_tier_shared          # one cache: the route changes nothing
                        node = private_node(kind, caps, p, n, route, adm)
                        total, pv = tr.replay(node, chains)
                        s_hr, p_hr = sum(sh) / total, sum(pv) / total
                        ratio = f"{s_hr / p_hr:.2f}" if p_hr else "-"
                        print(f"| {p} | {adm if len(caps) > 2 else '-'} | {route} | {_cell(sh, total)} | "
                              f"{_cell(pv, total)} | {ratio} | {node.router.spread():.2f} | "
                              f"{time.time() - t0:.1f} |", file=out, flush=True)
                        rows.append(dict(engines=n, caps=list(caps), policy=p, admission=adm, route=route,
                                         total=total, shared_hits=sh, private_hits=pv, shared=s_hr,
                                         private=p_hr, load=list(node.router.load)))
    return rows


def _cell(hits: Sequence[int], total: int) -> str:
    """Hit ratio; with tiers, each tier's share after it."""
    cell = f"{sum(hits) / total:.4f}"
    return cell + (" (" + "/".join(f"{h / total:.4f}" for h in hits) + ")" if len(hits) > 1 else "")


def _each(capacity: int, engines: int) -> str:
    sizes = split(capacity, engines)
    return str(sizes[0]) if sizes[0] == sizes[-1] else f"{sizes[-1]}-{sizes[0]}"
