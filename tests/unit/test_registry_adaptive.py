"""ADAPTIVE (kvbm.policy.EvictionPolicy.ADAPTIVE): its credit in ticks per level, exact eviction
orders of fixed settings, leaves first on and off, the epoch vote that moves the level, the
largest move (growth) and the highest level (level_max) as settings, and its state surviving
attach. Both implementations (the Cython registry and its twin) must give the
same numbers; the random-sequence comparison is in test_registry_differential.py."""
from __future__ import annotations

import numpy as np
import pytest

from kvbm._fast import registry as registry_mod
from kvbm._fast._reference import ReferenceRegistry
from kvbm._fast.registry import BlockRegistry
from kvbm.errors import ConfigError, RegistryError
from kvbm.policy import (
    ADAPTIVE_BAND,
    ADAPTIVE_GROWTH,
    ADAPTIVE_LEVEL,
    ADAPTIVE_LEVEL_MAX,
    ADAPTIVE_OCTAVE,
    ADAPTIVE_STEP,
    POLICY_ADAPTIVE,
    POLICY_LRU,
    EvictionPolicy,
    policy_names,
)
from tests.support.registry_helpers import advance

IMPLS = [BlockRegistry, ReferenceRegistry]
OCT = ADAPTIVE_OCTAVE


def registered(reg, hashes, parents=None, has_parent=None):
    blocks = reg.allocate(len(hashes))
    reg.complete(blocks)
    return reg.register(blocks, np.asarray(hashes, np.uint64), parents=parents, has_parent=has_parent)


def test_adaptive_constants_agree():
    assert registry_mod.POLICY_ADAPTIVE == POLICY_ADAPTIVE == EvictionPolicy.ADAPTIVE == 2
    assert policy_names() == ("lru", "lineage", "adaptive")
    assert EvictionPolicy.from_name("adaptive") == EvictionPolicy.ADAPTIVE
    with pytest.raises(ConfigError):
        EvictionPolicy.from_name("arc")


@pytest.mark.parametrize("impl", IMPLS)
def test_credit_per_level(impl):
    """credit = N * 2**(level / 2**16 - 4) ticks, exact at octaves, linear between; -1 is 0."""
    reg = impl(16, policy=POLICY_ADAPTIVE)
    assert reg.adaptive["level"] == ADAPTIVE_LEVEL and reg.adaptive["step"] == ADAPTIVE_STEP
    assert reg.adaptive["growth"] == ADAPTIVE_GROWTH and reg.adaptive["level_max"] == ADAPTIVE_LEVEL_MAX
    assert reg.adaptive["band"] == ADAPTIVE_BAND
    assert reg.adaptive["credit"] == 16 * 2 ** (ADAPTIVE_LEVEL / OCT - 4)
    assert reg.ghost_blocks == 16                        # LINEAGE's ghost table, same default
    for level, credit in [(-1, 0), (0, 1), (OCT, 2), (5 * OCT, 32), (5 * OCT + OCT // 2, 48),
                          (9 * OCT, 512)]:
        reg.set_adaptive(level, 0)
        assert reg.adaptive["credit"] == credit, level
    big = impl(2**20, policy=POLICY_ADAPTIVE, ghost_blocks=0)
    big.set_adaptive(9 * OCT)
    assert big.adaptive["credit"] == 32 * 2**20


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level,order", [(-1, [10, 11, 12]), (0, [10, 11, 12]), (OCT, [10, 11, 12]),
                                         (3 * OCT, [11, 12, 10]), (5 * OCT, [11, 12, 10])])
def test_fixed_setting_orders_a_reused_block_by_its_credit(impl, level, order):
    reg = impl(16, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(level, 0, True)
    x = registered(reg, [10])                      # tick 1
    reg.release(x)                                 # tick 2
    reg.match([10])                                # tick 3: use count 2, f = 2
    reg.release(x)                                 # tick 4: key2 = 4 + 2 * credit
    advance(reg, 5)                               # tick 9
    reg.release(registered(reg, [11]))             # ticks 10, 11
    reg.release(registered(reg, [12]))             # ticks 12, 13
    # credit 0, 1, 2: key2 of 10 is 4, 6, 8 < 11; credit 8 (W = 1/2): 20 > 13; credit 32: 68
    np.testing.assert_array_equal(reg.evict(3), order)
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("leaf,order", [(True, [11, 10, 20]), (False, [10, 11, 20])])
def test_leaf_first_is_a_setting(impl, leaf, order):
    reg = impl(16, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(5 * OCT, 0, leaf)
    registered(reg, [10, 11], parents=np.array([0, 10], np.uint64), has_parent=np.array([False, True]))
    registered(reg, [20])
    reg.release([0, 1, 2])                         # 10 oldest, then 11, then 20; all used once
    np.testing.assert_array_equal(reg.evict(3), order)
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_set_adaptive_rekeys_every_inactive_block(impl):
    reg = impl(16, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(5 * OCT, 0)
    x = registered(reg, [10])
    reg.release(x)
    reg.match([10])
    reg.release(x)                                 # key2 4 + 64
    reg.release(registered(reg, [11]))             # 6
    reg.set_adaptive(-1)                           # W = 0: 10 is the oldest now
    reg.check_invariants()
    np.testing.assert_array_equal(reg.evict(2), [10, 11])


@pytest.mark.parametrize("impl", IMPLS)
def test_set_adaptive_rejects(impl):
    with pytest.raises(RegistryError):
        impl(4, policy=POLICY_LRU).set_adaptive(0)
    reg = impl(4, policy=POLICY_ADAPTIVE)
    for kw in (dict(level=9 * OCT + 1), dict(level=-2), dict(step=-1), dict(step=9 * OCT + 1),
               dict(growth=0), dict(growth=2**16 + 1), dict(level_max=9 * OCT + 1), dict(level_max=-1),
               dict(band=-1), dict(band=65), dict(band=1.5),
               dict(level=5 * OCT, level_max=4 * OCT)):
        with pytest.raises(RegistryError):
            reg.set_adaptive(**kw)
    assert reg.adaptive == impl(4, policy=POLICY_ADAPTIVE).adaptive      # nothing changed
    reg.set_adaptive(OCT, level_max=2 * OCT)
    with pytest.raises(RegistryError):                 # a level above the kept level_max
        reg.set_adaptive(3 * OCT)


def _requests(reg, n_requests, seed):
    """A small chat-like workload: sessions over a shared prefix, each request re-reading its
    session and appending a block; the levels after each request where the level moved."""
    rng = np.random.default_rng(seed)
    sessions = [[1000 + 10 * i] for i in range(12)]
    fresh = 10_000
    path = []
    for _ in range(n_requests):
        s = sessions[int(rng.zipf(1.3)) % len(sessions)]
        if len(s) > 12 or rng.random() < 0.1:
            s[1:] = []                                  # a new conversation on the same prompt
        fresh += 1
        s.append(fresh)
        hs = np.asarray(s, np.uint64)
        got = reg.match(hs)
        k = got.shape[0]
        held = [got]
        if k < len(s):
            blocks = reg.allocate(len(s) - k)
            if blocks is None:
                reg.release(got)
                continue
            reg.complete(blocks)
            parents = np.asarray([0] + s[k:-1] if k == 0 else s[k - 1:-1], np.uint64)
            mask = np.ones(len(s) - k, bool)
            mask[0] = k > 0
            held.append(reg.register(blocks, hs[k:], parents=parents, has_parent=mask))
        reg.release(np.concatenate(held))
        if not path or path[-1] != reg.adaptive["level"]:
            path.append(reg.adaptive["level"])
    return path


@pytest.mark.parametrize("impl", IMPLS)
def test_epoch_votes_move_the_level(impl):
    """The marginal vote moves the level both ways on a small chat-like workload; the path (the
    twin's, which the registry must match) is pinned. Step 0 counts and never moves."""
    reg = impl(24, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(4 * OCT, OCT // 4, True, growth=8, band=0)
    path = _requests(reg, 600, 3)
    assert path == PINNED_PATH
    moves = [b - a for a, b in zip(path, path[1:])]
    assert max(moves) > 0 > min(moves)                     # it moved both ways
    a = reg.adaptive
    assert a["ghost_hits_once"] + a["ghost_hits_reused"] > 0 and a["evictions"] > 0
    reg.check_invariants()
    fixed = impl(24, policy=POLICY_ADAPTIVE)
    fixed.set_adaptive(4 * OCT, 0, True)
    assert _requests(fixed, 600, 3) == [4 * OCT]


# down a quarter octave, back up, down, then down two and four steps (Rprop: the votes agreed)
PINNED_PATH = [4 * OCT + k * (OCT // 4) for k in (0, -1, 0, -1, -3, -7)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("growth,path", [(1, [0, -1, -2, -3, -4, -5, -6]),
                                         (2, [0, -1, -3, -5, -7, -9]),
                                         (8, [0, -1, -3, -7, -5, -6])])
def test_growth_caps_the_move(impl, growth, path):
    """Rprop doubles the move while the votes agree, up to `growth` steps: on the same workload
    the level goes down 1, 2, 4 steps with growth 8 (then back up 2 and down 1: the vote turned),
    1, 2, 2, 2, 2 with growth 2 and one step at a time with growth 1 (levels in quarter-octave
    steps from W = 1)."""
    reg = impl(40, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(4 * OCT, OCT // 4, True, growth=growth, band=0)
    assert reg.adaptive["growth"] == growth
    assert [(lv - 4 * OCT) // (OCT // 4) for lv in _requests(reg, 600, 4)] == path
    assert abs(reg.adaptive["move"]) <= growth * OCT // 4
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("band,path", [(0, [0, -1, -3, -7, -5, -6]), (1, [0, -1]), (3, [0, -1]),
                                       (4, [0]), (64, [0])])
def test_band_keeps_weak_votes_still(impl, band, path):
    """The dead band: one side's net must exceed the other's by z = band / 4 standard deviations
    of the four counts, with the variance's floor of one tested hit (256). This workload's votes
    rest on a few events each: with z = 1/4 and 3/4 only the first passes (the level stops one
    step down), from z = 1 none does (it never moves)."""
    reg = impl(40, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(4 * OCT, OCT // 4, True, growth=8, band=band)
    assert reg.adaptive["band"] == band
    assert [(lv - 4 * OCT) // (OCT // 4) for lv in _requests(reg, 600, 4)] == path
    assert reg.adaptive["evictions"] > 0
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_level_max_caps_the_level(impl):
    """The moves stop at level_max (here W = 2, four quarter-octave steps above the start; without
    the cap this workload reaches W = 32, test_growth_caps_the_move's workload at 20 blocks)."""
    reg = impl(20, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(4 * OCT, OCT // 4, True, growth=8, level_max=5 * OCT, band=0)
    path = [(lv - 4 * OCT) // (OCT // 4) for lv in _requests(reg, 600, 4)]
    assert path == [0, 1, 3, 4, 2, 3, 4, 3, 4]
    assert reg.adaptive["level"] == reg.adaptive["level_max"] == 5 * OCT
    reg.check_invariants()
    free = impl(20, policy=POLICY_ADAPTIVE)
    free.set_adaptive(4 * OCT, OCT // 4, True, growth=8, band=0)
    assert max(_requests(free, 600, 4)) == 9 * OCT


def test_adaptive_state_survives_attach():
    n = 32
    buf = np.zeros(BlockRegistry.bytes_needed(n), np.uint8)
    reg = BlockRegistry(n, buf, policy=POLICY_ADAPTIVE)
    twin = ReferenceRegistry(n, policy=POLICY_ADAPTIVE)
    rng = np.random.default_rng(5)

    def drive(r, steps):
        out = []
        for _ in range(steps):
            hs = [int(h) for h in rng.integers(0, 3 * n, size=4)]
            blocks = r.allocate(4)
            r.complete(blocks)
            canon = r.register(blocks, np.asarray(hs, np.uint64))
            again = r.match(np.asarray(hs[:2], np.uint64))   # reused: use count 2
            r.release(np.concatenate([canon, again]))
            out.append(r.evict(1).tolist())
        return out

    for r in (reg, twin):
        r.set_adaptive(4 * OCT, OCT // 4, band=0)
    state = rng.bit_generator.state
    got = drive(reg, 60)
    rng.bit_generator.state = state
    assert drive(twin, 60) == got
    for r in (reg, twin):
        r.set_adaptive(band=1)                 # the band travels with the table too
    attached = BlockRegistry.attach(buf)
    assert attached.policy == POLICY_ADAPTIVE
    assert attached.adaptive == reg.adaptive == twin.adaptive
    assert attached.adaptive["ghost_hits_once"] + attached.adaptive["ghost_hits_reused"] > 0
    state = rng.bit_generator.state
    got = drive(attached, 60)
    rng.bit_generator.state = state
    assert drive(twin, 60) == got
    assert attached.adaptive == twin.adaptive and attached.adaptive["level"] != 4 * OCT
    attached.check_invariants()


def _fill(reg, hashes, reused=()):
    """Registers fresh leaves under `hashes` (released), then matches the `reused` ones once more."""
    blocks = reg.allocate(len(hashes))
    reg.complete(blocks)
    reg.release(reg.register(blocks, np.asarray(hashes, np.uint64)))
    for h in reused:
        reg.release(reg.match(np.asarray([h], np.uint64)))


@pytest.mark.parametrize("impl", IMPLS)
def test_frontier_is_the_running_max_of_once_used_victims(impl):
    """The frontier follows the last ticks of victims used once and ignores reused ones (whose
    key2 carries the credit); the advance (rate) is known from the second epoch that moved it on,
    and kept through an epoch whose victims were all reused."""
    reg = impl(4, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(4 * OCT, OCT // 4, band=0)         # epochs of 2 evictions
    _fill(reg, [11, 12, 13, 14], reused=[12])
    seen = []
    for _ in range(4):
        gone = reg.evict(1).tolist()
        a = reg.adaptive
        seen.append((gone, a["frontier"], a["rate"]))
    assert seen == [([11], 5, 0), ([13], 7, 0), ([14], 8, 0), ([12], 8, 1)]
    _fill(reg, [21, 22, 23, 24], reused=[21, 22, 23, 24])
    reg.evict(2)                                        # one epoch, every victim reused
    assert (reg.adaptive["frontier"], reg.adaptive["rate"]) == (8, 1)
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_ghost_votes_before_the_advance_is_known(impl):
    """A victim that comes back in the first epochs counts as a ghost hit, not as a vote: with no
    frontier advance known its distance past the frontier cannot be told."""
    reg = impl(4, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(4 * OCT, OCT // 4, band=0)
    _fill(reg, [11, 12, 13, 14], reused=[11, 12, 13, 14])
    assert reg.evict(1).tolist() == [11]
    _fill(reg, [11])                                    # 11 comes back: a ghost hit
    a = reg.adaptive
    assert a["rate"] == 0 and a["ghost_hits_reused"] == 1 and a["gain_up"] == a["gain_down"] == 0
    reg.check_invariants()


def test_band_boundary():
    """The twin's band test at its edge: with z = 1 and counts of variance 9 + 256 (the floor),
    a difference of 17 passes (17^2 = 289 >= 265) and 16 does not."""
    reg = ReferenceRegistry(4, policy=POLICY_ADAPTIVE)
    reg.set_adaptive(band=4)
    reg._gain_up = 9
    assert reg._outside_band(17) and not reg._outside_band(16)
    reg.set_adaptive(band=0)
    assert reg._outside_band(0)
