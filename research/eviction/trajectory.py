"""ADAPTIVE's path on one validation case, epoch by epoch: the level its shadow tuner chose, each
candidate's hits in the epoch (its mini cache's; W = 0, 1/8, ..., 32), and the epoch's hit ratio
on the registry. Round 12 found the marginal vote's frontier bug with a first version of it
(POLICY_ADAPTIVE.md §12); round 13's tuner replaced the vote (§13).

The hits are read between requests, so a row sums the epochs that ended during one request.

    python -m research.eviction.trajectory rag-z0.8/s2 1000
    python -m research.eviction.trajectory shared 8000 --setting '{"decay": 0}'

The case names and traces are hindsight.cases()'s; the setting overrides the defaults of
kvbm/policy.py through set_adaptive.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from kvbm.policy import ADAPTIVE_OCTAVE
from research.eviction import hindsight
from research.eviction import policy_sim as ps
from research.eviction import trace_replay as tr


def epochs(chains: Sequence[Sequence[int]], capacity: int, setting: dict | None = None) -> tuple[list[dict], float]:
    """Replays the chains on a registry engine under ADAPTIVE; one row per request that ended an
    epoch of the tuner (its candidates' hits since the last row, the state after it), and the
    hit ratio."""
    eng = tr.RegistryEngine(capacity, "adaptive")
    if setting:
        eng.reg.set_adaptive(**setting)
    prev = eng.reg.adaptive
    rows, hits, total, ep_hits, ep_total = [], 0, 0, 0, 0
    for i, chain in enumerate(chains):
        h = eng.access(chain, i)[0]
        hits, total, ep_hits, ep_total = hits + h, total + len(chain), ep_hits + h, ep_total + len(chain)
        now = eng.reg.adaptive
        if now["epochs"] > prev["epochs"]:
            level = now["level"]
            rows.append(dict(request=i, w=2 ** (level / ADAPTIVE_OCTAVE - 4) if level >= 0 else 0.0,
                             hits=[a - b for a, b in zip(now["hits"], prev["hits"])],
                             hit_ratio=ep_hits / max(ep_total, 1)))
            ep_hits = ep_total = 0
            prev = now
    return rows, hits / max(total, 1)


def case_chains(ap: argparse.ArgumentParser, case: str, trace: str | None) -> list:
    """The chains of one hindsight case name: the shared trace or one of its halves (read from
    the trace), or `shape/sSEED` (generated alone, not the whole validation set)."""
    if case.startswith("shared"):
        shared = ps.chains_of(ps.load_trace(ps.trace_arg(ap, trace)))
        found = [ch for name, ch, _ in hindsight.cases(shared, synthetic=False) if name == case]
    else:
        shape, _, seed = case.rpartition("/s")
        try:
            found = [hindsight.shape_chains(shape, int(seed))]
        except (KeyError, ValueError):
            found = []
    if not found:
        raise SystemExit(f"trajectory: no case {case!r} (hindsight.cases() names them)")
    return found[0]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", help="a hindsight case name: shared, shared-half1, rag-z0.8/s2, sessions/s3, ...")
    ap.add_argument("capacity", type=int)
    ap.add_argument("--trace", default=None, help=ps.TRACE_HELP)
    ap.add_argument("--setting", default=None, help="set_adaptive keyword arguments as JSON")
    args = ap.parse_args(argv)
    rows, ratio = epochs(case_chains(ap, args.case, args.trace), args.capacity,
                         json.loads(args.setting) if args.setting else None)
    print("| request | W after | hits of the candidates W = 0, 1/8, 1/4, 1/2, 1, 2, 4, 8, 16, 32 | "
          "epoch hit ratio |")
    print("|" + "---|" * 4)
    for r in rows:
        print(f"| {r['request']} | {r['w']:.3g} | {' '.join(map(str, r['hits']))} | {r['hit_ratio']:.3f} |")
    print(f"\n{args.case} at {args.capacity} blocks: hit ratio {ratio:.4f} over {len(rows)} epochs")


if __name__ == "__main__":
    main()
