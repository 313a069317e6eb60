"""shadow.py (round 13's fitting tool): the prototype replay (the tuner beside a fixed-setting
registry) follows the tuner, and the fit ranks its grid by hindsight's rule on the training set.
The tuner itself (the spec and the registry's) is tested in tests/unit/test_registry_adaptive.py.
Small, deterministic, no timing."""
from __future__ import annotations

import pytest

from kvbm._fast._reference_shadow import SHADOW_LEVELS, ShadowTuner
from research.eviction import hindsight as hs
from research.eviction import shadow
from tests.unit.test_registry_adaptive import drifting_hot_sets, scan_with_hot_set

pytest.importorskip("kvbm._fast.registry")


def test_replay_follows_the_tuner():
    chains = scan_with_hot_set(120)
    ratio, level = shadow.replay(chains, 64, mini_blocks=64, decay=32768, start_level=-1)
    tuner = ShadowTuner(64, 64, 32768, -1)
    for chain in chains:
        for j, h in enumerate(chain):
            tuner.use(h, j < len(chain) - 1)       # as replay feeds it: a child unless the last
    assert level == SHADOW_LEVELS[tuner.current] > 0
    assert ratio > hs.hit_ratio(chains, 64, "lru")
    ratio, level = shadow.replay(drifting_hot_sets(20), 40, mini_blocks=64, start_level=9 << 16)
    assert level == -1


def test_grid_and_fit_on_a_small_training_set(monkeypatch):
    assert len(shadow.grid_settings()) == 16
    small = [("drift", drifting_hot_sets(12), 40), ("scan", scan_with_hot_set(60), 64)]
    monkeypatch.setattr(hs, "cases", lambda shared, synthetic=True: small)
    monkeypatch.setattr(hs, "is_training", lambda name, cap: True)
    grid = dict(mini_blocks=[16, 64], decay=[0, 32768])
    ranked = shadow.tune([], out=open("/dev/null", "w"), grid=grid)
    assert len(ranked) == 4
    keys = [hs.rank_key(r) for r in ranked]
    assert keys == sorted(keys)
