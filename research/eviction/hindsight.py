"""The adaptive policy's validation (POLICY_ADAPTIVE.md): per trace and capacity, LRU, lineage and
adaptive on kvbm's own registry, beside the hindsight-best fixed setting of adaptive's family
(found by sweeping) and Belady, with the issue's checks. `trace_replay --hindsight` prints it.

Parts, in the order a run uses them:
  FAMILY        the fixed settings: key2 = last_tick + W * N * f(use_count) with W in {0, 1/8, ...,
                32}, leaves first or not; each is the registry's ADAPTIVE policy with its step set
                to 0 (BlockRegistry.set_adaptive), so the sweep runs the real Cython key.
  cases()       the validation set: the shared trace at 1k-16k blocks and its halves at 2k and 8k,
                policy_sim's SYNTHETIC_SUITE and workloads.py's shapes (seeds 1, 2) at 1k and 4k.
                TRAINING names the one set the defaults were fitted on (the shared trace's first
                half); its rows are marked and left out of the held-out summary.
  hit_ratio()   one replay on the registry engine (trace_replay.RegistryEngine).
  validate()    the table: every case, every policy, the best setting, the checks, the means.
  tune()        the fit of ADAPTIVE_LEVEL and ADAPTIVE_STEP: the same table on TRAINING only, for a
                grid of (start level, step).
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

from kvbm.policy import ADAPTIVE_OCTAVE
from research.eviction import policy_sim as ps
from research.eviction import workloads

# W grid (in units of num_blocks of credit per frequency step) -> ADAPTIVE level (-1 is W = 0)
W_LEVELS = {"0": -1, **{w: (k + 1) * ADAPTIVE_OCTAVE for k, w in
                        enumerate(("1/8", "1/4", "1/2", "1", "2", "4", "8", "16", "32"))}}
FAMILY = [(f"W={w}{'' if leaf else ' noleaf'}", level, leaf)
          for leaf in (True, False) for w, level in W_LEVELS.items()]
TRAINING = ("shared-half1",)
# The new shapes of the validation set: workloads.generate kwargs
NEW_SHAPES = {
    "sessions": dict(shape="sessions"),
    "sessions-long": dict(shape="sessions", concurrent=300, mean_turns=20, turn_len=5),
    "rag-shared": dict(shape="rag-shared"),
    "agent-loop": dict(shape="agent-loop"),
    "sysprompt-heavy": dict(shape="sysprompt-heavy"),
    "scan-mix": dict(shape="scan-mix"),
}


def cases(shared_chains, synthetic: bool = True) -> list[tuple[str, list, int]]:
    """(name, chains, capacity) of the validation set (see the module docstring)."""
    out = [("shared", shared_chains, c) for c in (1000, 2000, 4000, 8000, 16000)]
    for i, part in enumerate(ps.split_trace(shared_chains, 2)):
        out += [(f"shared-half{i + 1}", part, c) for c in (2000, 8000)]
    if not synthetic:
        return out
    for name, kw in ps.SYNTHETIC_SUITE.items():
        for seed in (1, 2):
            ch = ps.chains_of(ps.generate_trace(seed=seed, **kw))
            out += [(f"{name}/s{seed}", ch, c) for c in (1000, 4000)]
    for name, kw in NEW_SHAPES.items():
        for seed in (1, 2):
            ch = ps.chains_of(workloads.generate(seed=seed, **kw))
            out += [(f"{name}/s{seed}", ch, c) for c in (1000, 4000)]
    return out


def hit_ratio(chains, capacity: int, policy: str, setting: tuple | None = None) -> float:
    """Hit ratio of one registry-engine replay; `setting` = set_adaptive's (level, step,
    leaf_first) for ADAPTIVE."""
    from research.eviction import trace_replay as tr
    eng = tr.RegistryEngine(capacity, policy)
    if setting is not None:
        eng.reg.set_adaptive(*setting)
    total, hits = tr.replay(eng, chains)
    return hits[0] / total


def hindsight_best(chains, capacity: int) -> tuple[str, float, dict[str, float]]:
    """The family's best fixed setting on this trace and capacity: (label, hit ratio, all)."""
    every = {label: hit_ratio(chains, capacity, "adaptive", (level, 0, leaf)) for label, level, leaf in FAMILY}
    best = max(every, key=lambda k: (every[k], k))
    return best, every[best], every


def validate(shared_chains, out=sys.stdout, synthetic: bool = True,
             adaptive: tuple[int, int] | None = None) -> list[dict]:
    """Prints the validation table; returns its rows. `adaptive` = (start level, step) overrides
    the defaults (tune())."""
    rows = []
    print("| case | blocks | LRU | lineage | adaptive (final W) | hindsight best (setting) | Belady | "
          "≥ LRU−0.002 | ≥ 0.9 × best | s |", file=out)
    print("|" + "---|" * 10, file=out)
    for name, ch, cap in cases(shared_chains, synthetic):
        rows.append(_case(name, ch, cap, adaptive, out))
    _summary(rows, out)
    return rows


def _case(name, ch, cap, adaptive, out) -> dict:
    t0 = time.time()
    lru = hit_ratio(ch, cap, "lru")
    lin = hit_ratio(ch, cap, "lineage")
    from research.eviction import trace_replay as tr
    eng = tr.RegistryEngine(cap, "adaptive")
    if adaptive is not None:
        eng.reg.set_adaptive(adaptive[0], adaptive[1], True)
    total, hits = tr.replay(eng, ch)
    ada = hits[0] / total
    level = eng.reg.adaptive["level"]
    best_label, best, _ = hindsight_best(ch, cap)
    bel = ps.simulate(ch, cap, "belady").hit_ratio
    ok_lru = ada >= lru - 0.002
    ok_best = ada >= 0.9 * best
    train = name.split("/")[0] in TRAINING
    row = dict(case=name, cap=cap, lru=lru, lineage=lin, adaptive=ada, level=level, best=best,
               best_setting=best_label, belady=bel, ok_lru=ok_lru, ok_best=ok_best, training=train,
               gap={p: ps.gap_closed(v, lru, bel) for p, v in
                    (("lineage", lin), ("adaptive", ada), ("best", best))})
    g = row["gap"]
    w = 2 ** (level / ADAPTIVE_OCTAVE - 4) if level >= 0 else 0.0
    print(f"| {name}{' (training)' if train else ''} | {cap} | {lru:.4f} | {lin:.4f} ({g['lineage']:+.2f}) | "
          f"{ada:.4f} ({g['adaptive']:+.2f}; W≈{w:.2g}) | {best:.4f} ({g['best']:+.2f}; {best_label}) | "
          f"{bel:.4f} | {'yes' if ok_lru else '**no**'} | {'yes' if ok_best else '**no**'} "
          f"({ada / best if best else 1:.3f}) | {time.time() - t0:.1f} |", file=out, flush=True)
    return row


def _summary(rows: Sequence[dict], out) -> None:
    held = [r for r in rows if not r["training"]]
    print(f"\nHeld-out cases: {len(held)} (training: {len(rows) - len(held)}, {', '.join(TRAINING)})", file=out)
    print("\n| policy | mean gap closed | min | cases < LRU − 0.002 | cases < 0.9 × hindsight best | "
          "mean ratio to hindsight best |", file=out)
    print("|---|---|---|---|---|---|", file=out)
    for p in ("lineage", "adaptive", "best"):
        gaps = [r["gap"][p] for r in held]
        vals = [r[p] for r in held]
        worse = sum(v < r["lru"] - 0.002 for v, r in zip(vals, held))
        below = sum(v < 0.9 * r["best"] for v, r in zip(vals, held))
        ratio = statistics.mean(v / r["best"] if r["best"] else 1.0 for v, r in zip(vals, held))
        label = "hindsight best" if p == "best" else p
        print(f"| {label} | {statistics.mean(gaps):+.3f} | {min(gaps):+.3f} | {worse}/{len(held)} | "
              f"{below}/{len(held)} | {ratio:.3f} |", file=out)


def tune(shared_chains, levels: Sequence[int], steps: Sequence[int], out=sys.stdout) -> None:
    """ADAPTIVE's (start level, step) on TRAINING only: per pair, the worst ratio to the hindsight
    best and the worst margin over LRU across the training cases."""
    train = [c for c in cases(shared_chains, synthetic=False) if c[0] in TRAINING]
    ref = {}
    for name, ch, cap in train:
        ref[name, cap] = (hit_ratio(ch, cap, "lru"), hindsight_best(ch, cap))
        print(f"# {name} {cap}: LRU {ref[name, cap][0]:.4f}, best {ref[name, cap][1][1]:.4f} "
              f"({ref[name, cap][1][0]})", file=out, flush=True)
    print("| start level | step | " + " | ".join(f"{n} {c}" for n, _, c in train) +
          " | min ratio to best | min margin over LRU |", file=out)
    print("|" + "---|" * (4 + len(train)), file=out)
    for level in levels:
        for step in steps:
            hs = [hit_ratio(ch, cap, "adaptive", (level, step, True)) for _, ch, cap in train]
            ratios = [h / ref[n, c][1][1] for h, (n, _, c) in zip(hs, train)]
            margins = [h - ref[n, c][0] for h, (n, _, c) in zip(hs, train)]
            print(f"| {level} | {step} | " + " | ".join(f"{h:.4f}" for h in hs) +
                  f" | {min(ratios):.3f} | {min(margins):+.4f} |", file=out, flush=True)
