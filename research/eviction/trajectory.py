"""ADAPTIVE's path on one validation case, epoch by epoch: the level it moved to, the vote's four
counts, phi, the frontier and its advance, and the epoch's hit ratio. POLICY_ADAPTIVE.md §12 found
the frontier bug with a first version of it: in epochs whose advance read 0, every ghost hit
counted as kept by one move or the other, and those epochs voted up.

The counts are read between requests, so they are approximate: a row shows them as they stood
before the request that ended the epoch (that request's own events before the end are missing),
and a request that ends two epochs shows as one row.

    python -m research.eviction.trajectory sessions/s3 2000
    python -m research.eviction.trajectory shared 8000 --setting '{"band": 4}'

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
    epoch (the counts as they stood before that request, the state after it; approximate, see the
    module docstring), and the hit ratio."""
    eng = tr.RegistryEngine(capacity, "adaptive")
    if setting:
        eng.reg.set_adaptive(**setting)
    prev = eng.reg.adaptive
    rows, hits, total, ep_hits, ep_total = [], 0, 0, 0, 0
    for i, chain in enumerate(chains):
        h = eng.access(chain, i)[0]
        hits, total, ep_hits, ep_total = hits + h, total + len(chain), ep_hits + h, ep_total + len(chain)
        now = eng.reg.adaptive
        if now["epoch_left"] > prev["epoch_left"]:         # an epoch ended during this request
            rows.append(dict(request=i, w=2 ** (now["level"] / ADAPTIVE_OCTAVE - 4),
                             gain_up=prev["gain_up"], loss_up=prev["loss_up"],
                             gain_down=prev["gain_down"], loss_down=prev["loss_down"],
                             phi=now["phi"] / 256, frontier=now["frontier"], rate=now["rate"],
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
    print("| request | W after | gain up | loss up | gain down | loss down | phi | frontier | advance | "
          "epoch hit ratio |")
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['request']} | {r['w']:.3g} | {r['gain_up']} | {r['loss_up']} | {r['gain_down']} | "
              f"{r['loss_down']} | {r['phi']:.2f} | {r['frontier']} | {r['rate']} | {r['hit_ratio']:.3f} |")
    print(f"\n{args.case} at {args.capacity} blocks: hit ratio {ratio:.4f} over {len(rows)} epochs")


if __name__ == "__main__":
    main()
