"""Round 13's study: choosing ADAPTIVE's credit W by miniature simulation (shadow caches) instead
of the marginal vote (POLICY_ADAPTIVE.md §13). The tuner is the twin's spec
(kvbm/_fast/_reference_shadow.py); here it runs beside the registry, fed each request's hashes
after the request, and moves a fixed-setting registry with set_adaptive (a full re-key). That is the
prototype the fit ran on; the registry's own ADAPTIVE runs the same tuner inside, fed at each
release, its moves re-keyed by the sweep.

Parts:
  replay()   one case on the registry engine with the tuner beside it.
  tune()     the tuner's mini cache size and decay, fitted on hindsight.TRAINING by hindsight.RULE.
"""
from __future__ import annotations

from kvbm._fast._reference_shadow import SHADOW_LEVELS, ShadowTuner
from kvbm.policy import ADAPTIVE_DECAY, ADAPTIVE_LEVEL, ADAPTIVE_MINI_BLOCKS


def replay(chains, capacity: int, mini_blocks: int = ADAPTIVE_MINI_BLOCKS, decay: int = ADAPTIVE_DECAY,
           start_level: int = ADAPTIVE_LEVEL) -> tuple[float, int]:
    """Hit ratio of the registry engine under ADAPTIVE's fixed setting (its tuner off), moved by the
    tuner between requests; returns (hit ratio, final level)."""
    from research.eviction import trace_replay as tr
    eng = tr.RegistryEngine(capacity, "adaptive")
    eng.reg.set_adaptive(level=start_level, tune=False)
    tuner = ShadowTuner(capacity, mini_blocks, decay, start_level)
    hits = total = 0
    for i, chain in enumerate(chains):
        hits += eng.access(chain, i)[0]
        total += len(chain)
        # a block has a child when the registry releases it unless it is its request's last
        moves = [tuner.use(h, j < len(chain) - 1) for j, h in enumerate(chain)]
        if any(lv is not None for lv in moves):
            eng.reg.set_adaptive(level=SHADOW_LEVELS[tuner.current])
    return hits / max(total, 1), eng.reg.adaptive["level"]


# ---- the fit (training set only, hindsight.RULE) ----------------------------------------------------

# the mini cache size target (the sample rate follows: _reference_shadow.shape) and the scores'
# decay per epoch, in 2**-16: .8, .95, .98, .99. Below 1 by design: a tuner that never forgets
# cannot follow a change of workload (tests/unit/test_registry_adaptive.py), which no case of the
# validation set has. (POLICY_ADAPTIVE §13: the first two fits, without the minis' leaf bit, had
# decays from 0 to 1; the second chose 1.)
GRID = dict(mini_blocks=[64, 128, 256, 512], decay=[52429, 62259, 64225, 64881])


def grid_settings(grid: dict = GRID) -> list[dict]:
    return [dict(mini_blocks=m, decay=d) for m in grid["mini_blocks"] for d in grid["decay"]]


def _setting_task(args) -> float:
    from research.eviction import hindsight as hs
    i, setting = args
    _, ch, cap = hs._CASES[i]
    return replay(ch, cap, **setting)[0]


def tune(shared_chains, out=None, grid: dict = GRID, processes: int = 1) -> list[dict]:
    """The tuner's setting on hindsight.TRAINING only, ranked by hindsight.RULE; prints every
    setting's figures and the choice, returns the scored settings in rank order."""
    import sys

    from research.eviction import hindsight as hs
    out = out or sys.stdout
    train = [c for c in hs.cases(shared_chains) if hs.is_training(c[0], c[2])]
    settings = grid_settings(grid)
    print(f"# shadow tuner fit: {len(train)} training cases, {len(settings)} settings; rule: {hs.RULE}",
          file=out, flush=True)
    pool = hs._pool(processes, train)
    try:
        refs = list(hs._map(pool, hs._ref_task, range(len(train))))
        flat = list(hs._map(pool, _setting_task, [(i, s) for s in settings for i in range(len(train))]))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    scored = []
    for k, s in enumerate(settings):
        hits = flat[k * len(train):(k + 1) * len(train)]
        scored.append(dict(setting=s, hits=hits, order=k, **hs.score(hits, refs)))
    ranked = sorted(scored, key=lambda r: (hs.rank_key(r), r["order"]))
    print("\n| rank | mini blocks | decay | failing | < LRU−0.002 | < 0.9 best | min ratio | mean ratio | "
          "mean gap |\n|---|---|---|---|---|---|---|---|---|", file=out)
    for i, r in enumerate(ranked):
        s = r["setting"]
        print(f"| {i + 1} | {s['mini_blocks']} | {s['decay']} | {r['failing']} | {r['below_lru']} | "
              f"{r['below_best']} | {r['min_ratio']:.3f} | {r['mean_ratio']:.3f} | {r['mean_gap']:+.3f} |",
              file=out)
    print(f"\nChoice: {ranked[0]['setting']}", file=out, flush=True)
    return ranked
