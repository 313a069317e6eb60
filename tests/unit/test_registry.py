"""BlockRegistry: exact eviction order, dedup, prefix match, lineage, the evicted ring, buffers, and
every bad input of every public call rejected with RegistryError and no change to the table.

The table lives in one buffer, so `bytes(reg.buffer)` before and after a call is a complete
snapshot: a rejected call must leave it byte for byte equal.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvbm._fast import registry as registry_mod
from kvbm._fast._reference import ReferenceRegistry
from kvbm._fast.registry import POLICY_LRU, BlockRegistry
from kvbm.errors import RegistryError
from kvbm.policy import POLICY_LINEAGE, BlockState, EvictionPolicy
from tests.support.registry_helpers import advance

IMPLS = [BlockRegistry, ReferenceRegistry]


def registered(reg, hashes, priorities=None, parents=None, has_parent=None):
    """Allocate, complete and register one block per hash; returns the canonical blocks."""
    blocks = reg.allocate(len(hashes))
    reg.complete(blocks)
    return reg.register(blocks, np.asarray(hashes, np.uint64), parents=parents,
                        priorities=priorities, has_parent=has_parent)


def test_constants_agree():
    assert POLICY_LRU == EvictionPolicy.LRU == 0
    assert [s.value for s in BlockState] == [0, 1, 2, 3]


# ---- eviction order (both implementations: the twin must agree exactly) ---------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_eviction_follows_release_order(impl):
    reg = impl(4)
    blocks = registered(reg, [10, 11, 12, 13])
    np.testing.assert_array_equal(blocks, [0, 1, 2, 3])
    reg.release([2, 0, 3, 1])
    assert reg.num_inactive == 4 and reg.num_free == 0 and reg.num_active == 0
    np.testing.assert_array_equal(reg.evict(4), [12, 10, 13, 11])
    np.testing.assert_array_equal(reg.drain_evicted(), [12, 10, 13, 11])
    assert reg.drain_evicted().size == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_priority_before_recency(impl):
    reg = impl(4)
    registered(reg, [10, 11, 12, 13], priorities=[5, 0, 5, -1])
    reg.release([0, 1, 2, 3])
    # -1 (block 3), then 0 (block 1), then the two 5s by release order (0 before 2)
    np.testing.assert_array_equal(reg.evict(4), [13, 11, 10, 12])


@pytest.mark.parametrize("impl", IMPLS)
def test_touch_and_set_priority_reorder_inactive(impl):
    reg = impl(3)
    registered(reg, [10, 11, 12])
    reg.release([0, 1, 2])
    reg.touch([0])                 # 0 becomes the most recent
    np.testing.assert_array_equal(reg.evict(1), [11])
    reg.set_priority([0], [-3])    # lowest priority goes first whatever its recency
    np.testing.assert_array_equal(reg.evict(2), [10, 12])


@pytest.mark.parametrize("impl", IMPLS)
def test_reacquired_block_leaves_eviction_order_and_rejoins_at_release(impl):
    reg = impl(4)
    registered(reg, [1, 2, 3])
    reg.release([0, 1, 2])
    np.testing.assert_array_equal(reg.match([1]), [0])     # the next victim becomes active
    assert reg.num_inactive == 2
    np.testing.assert_array_equal(reg.evict(1), [2])
    reg.release([0])                                       # rejoins as the most recent
    np.testing.assert_array_equal(reg.evict(5), [3, 1])
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_allocate_takes_free_then_evicts_in_order(impl):
    reg = impl(4)
    registered(reg, [10, 11, 12])             # blocks 0, 1, 2; block 3 free
    reg.release([1, 0, 2])
    out = reg.allocate(3)
    np.testing.assert_array_equal(out, [3, 1, 0])
    np.testing.assert_array_equal(reg.drain_evicted(), [11, 10])
    assert reg.info(1)["state"] == BlockState.PARTIAL and reg.info(1)["refcount"] == 1
    np.testing.assert_array_equal(reg.lookup([10, 11, 12]), [-1, -1, 2])


@pytest.mark.parametrize("impl", IMPLS)
def test_take_victims_hands_over_inactive_blocks_in_order_with_their_hashes(impl):
    reg = impl(5)
    registered(reg, [10, 11, 12, 13])         # blocks 0-3; block 4 free: never a victim
    reg.release([2, 0, 3])                    # block 1 stays held
    blocks, hashes = reg.take_victims(5)      # asks for more than the 3 inactive ones
    np.testing.assert_array_equal(blocks, [2, 0, 3])
    np.testing.assert_array_equal(hashes, [12, 10, 13])
    assert all(reg.info(b)["state"] == BlockState.PARTIAL and reg.info(b)["refcount"] == 1 for b in blocks)
    assert (reg.num_free, reg.num_inactive, reg.num_active) == (1, 0, 4)
    np.testing.assert_array_equal(reg.lookup([10, 11, 12, 13]), [-1, 1, -1, -1])
    np.testing.assert_array_equal(reg.drain_evicted(), [12, 10, 13])   # evictions like any other
    empty_blocks, empty_hashes = reg.take_victims(2)
    assert empty_blocks.dtype == np.int64 and empty_hashes.dtype == np.uint64 and empty_blocks.size == 0
    reg.complete(blocks[:1])                  # a victim written nowhere goes back under its hash
    np.testing.assert_array_equal(reg.register(blocks[:1], [12]), [2])
    reg.release(blocks)
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_free_list_is_fifo(impl):
    reg = impl(4)
    a = reg.allocate(4)
    reg.release([a[2], a[0]])
    np.testing.assert_array_equal(reg.allocate(2), [2, 0])


# ---- dedup, match, release ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_dedup_within_batch_and_against_registered(impl):
    reg = impl(6)
    blocks = reg.allocate(3)
    reg.complete(blocks)
    out = reg.register(blocks, np.array([7, 8, 7], np.uint64))
    np.testing.assert_array_equal(out, [0, 1, 0])
    assert reg.info(0)["refcount"] == 2 and reg.info(2)["state"] == BlockState.RESET
    assert reg.num_free == 4
    reg.release([0, 0, 1])                    # both inactive now
    assert reg.num_inactive == 2
    more = reg.allocate(1)                    # block 3 (free list head)
    reg.complete(more)
    np.testing.assert_array_equal(reg.register(more, [8]), [1])   # inactive 1 becomes active
    assert reg.info(1)["refcount"] == 1 and reg.num_inactive == 1
    assert reg.info(3)["state"] == BlockState.RESET
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_match_stops_at_first_miss(impl):
    reg = impl(8)
    registered(reg, [1, 2, 3, 5])
    np.testing.assert_array_equal(reg.match([1, 2, 3, 4, 5], acquire=False), [0, 1, 2])
    np.testing.assert_array_equal(reg.match([9, 1], acquire=False), [])
    np.testing.assert_array_equal(reg.lookup([1, 4, 5]), [0, -1, 3])


@pytest.mark.parametrize("impl", IMPLS)
def test_released_blocks_stay_matchable(impl):
    reg = impl(4)
    blocks = registered(reg, [1, 2])
    reg.release(blocks)
    assert reg.num_inactive == 2 and reg.num_active == 0
    got = reg.match([1, 2, 3])
    np.testing.assert_array_equal(got, [0, 1])
    assert reg.num_inactive == 0 and reg.num_active == 2
    assert reg.info(0)["refcount"] == 1 and reg.info(0)["use_count"] == 2
    reg.release([1])
    np.testing.assert_array_equal(reg.evict(5), [2])   # only the inactive one
    reg.check_invariants()


def test_non_acquiring_calls_change_nothing():
    reg = BlockRegistry(8)
    blocks = registered(reg, [1, 2, 3])
    reg.release(blocks[:2])
    before = bytes(reg.buffer)
    reg.match([1, 2, 3, 4], acquire=False)
    reg.lookup([1, 2, 3, 4, 99])
    assert bytes(reg.buffer) == before


@pytest.mark.parametrize("impl", IMPLS)
def test_release_of_unregistered_block_frees_it(impl):
    reg = impl(2)
    a = reg.allocate(2)
    reg.complete(a[:1])
    reg.release(a)
    assert reg.num_free == 2 and reg.info(0)["state"] == BlockState.RESET


@pytest.mark.parametrize("impl", IMPLS)
def test_allocate_short_returns_none_and_changes_nothing(impl):
    reg = impl(4)
    blocks = registered(reg, [1, 2])
    reg.release(blocks[:1])                   # 2 free + 1 inactive
    snap = [reg.info(b) for b in range(4)]
    assert reg.allocate(4) is None
    assert [reg.info(b) for b in range(4)] == snap
    assert reg.allocate(0).size == 0
    assert reg.allocate(3) is not None


def test_allocate_short_leaves_buffer_identical():
    reg = BlockRegistry(4)
    registered(reg, [1, 2])
    before = bytes(reg.buffer)
    assert reg.allocate(3) is None
    assert bytes(reg.buffer) == before


# ---- lineage --------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_lineage_links_and_orphaning(impl):
    reg = impl(6)
    # chain 100 <- 101 <- 102 and a sibling 103 of 101; 104 names a parent not registered here
    out = registered(reg, [100, 101, 102, 103, 104], parents=[0, 100, 101, 100, 555],
                     has_parent=[False, True, True, True, True])
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 4])
    assert [reg.info(b)["parent"] for b in range(5)] == [-1, 0, 1, 0, -1]
    assert [reg.info(b)["children"] for b in range(5)] == [2, 1, 0, 0, 0]
    reg.release([1, 2, 3, 4])
    reg.release([0])                          # 0 released last
    np.testing.assert_array_equal(reg.evict(1), [101])  # 1 was released first
    assert reg.info(0)["children"] == 1 and reg.info(2)["parent"] == -1
    reg.check_invariants()
    np.testing.assert_array_equal(reg.evict(3), [102, 103, 104])
    assert reg.info(0)["children"] == 0
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_parents_none_means_roots(impl):
    reg = impl(2)
    registered(reg, [1, 2])
    assert reg.info(1)["parent"] == -1 and reg.info(0)["children"] == 0


# ---- LINEAGE policy (kvbm/policy.py; study: research/eviction/POLICY.md section 2) ----------------
# key1 = (priority + 2^31) << 1 | (children > 0); key2 = last_tick + C * f(use_count), C = 2 * N,
# f(u) = 0 for u < 2 else bit_length(u). Ticks: register/match/touch take one, release to
# refcount 0 takes one.

def _chain(reg, hashes, priorities=None):
    """Register one chain (each hash the child of the previous); returns its blocks."""
    parents = [0] + list(hashes[:-1])
    has_parent = [False] + [True] * (len(hashes) - 1)
    return registered(reg, hashes, priorities=priorities, parents=np.array(parents, np.uint64),
                      has_parent=np.array(has_parent, bool))


def test_lineage_constants_agree():
    assert registry_mod.POLICY_LINEAGE == POLICY_LINEAGE == EvictionPolicy.LINEAGE == 1
    assert BlockRegistry(4, policy=POLICY_LINEAGE).policy == POLICY_LINEAGE
    assert ReferenceRegistry(4, policy=POLICY_LINEAGE).policy == POLICY_LINEAGE


@pytest.mark.parametrize("impl", IMPLS)
def test_lineage_evicts_leaf_before_older_parent(impl):
    reg = impl(4, policy=POLICY_LINEAGE)
    _chain(reg, [10, 11])          # blocks 0 <- 1
    registered(reg, [20])          # block 2, a root leaf
    reg.release([0, 1, 2])         # ticks: 10 oldest, then 11, then 20
    # LRU would give 10, 11, 20 (the root first, orphaning 11); lineage trims the chain from the
    # tail: 11 before its older parent, then 10 (now a leaf, and the oldest), then 20
    np.testing.assert_array_equal(reg.evict(3), [11, 10, 20])
    reg.check_invariants()
    # a parent whose child is still held stays behind every newer leaf
    reg = impl(4, policy=POLICY_LINEAGE)
    _chain(reg, [10, 11])
    registered(reg, [20])
    reg.release([0, 2])            # 10 older than 20; 11 stays active
    np.testing.assert_array_equal(reg.evict(1), [20])
    np.testing.assert_array_equal(reg.evict(1), [10])   # the only inactive block left
    assert reg.info(1)["parent"] == -1
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_lineage_child_count_changes_rekey_parent(impl):
    reg = impl(4, policy=POLICY_LINEAGE)
    _chain(reg, [10, 11])
    registered(reg, [20])
    reg.release([0, 1, 2])
    np.testing.assert_array_equal(reg.evict(1), [11])
    # 1 -> 0 children: 10 is a leaf again and the oldest, so it goes before 20
    assert reg.info(0)["children"] == 0
    reg.check_invariants()
    np.testing.assert_array_equal(reg.evict(1), [10])
    # 0 -> 1: an inactive root that gains a (still active) child moves behind every leaf
    reg = impl(4, policy=POLICY_LINEAGE)
    registered(reg, [10])
    registered(reg, [20])
    reg.release([0, 1])            # 10 is the oldest
    blocks = reg.allocate(1)
    reg.complete(blocks)
    reg.register(blocks, np.array([11], np.uint64), parents=np.array([10], np.uint64))
    assert reg.info(0)["children"] == 1
    reg.check_invariants()
    np.testing.assert_array_equal(reg.evict(1), [20])
    reg.release(blocks)            # 11 (the leaf) before its parent
    np.testing.assert_array_equal(reg.evict(2), [11, 10])


@pytest.mark.parametrize("impl", IMPLS)
def test_lineage_reused_block_outlives_newer_one_shot_blocks_by_its_credit(impl):
    n = 4                                          # C = 2 * n = 8 ticks
    reg = impl(n, policy=POLICY_LINEAGE)
    x = registered(reg, [10])                      # tick 1
    reg.release(x)                                 # tick 2
    reg.match([10])                                # tick 3, use count 2: f = 2
    reg.release(x)                                 # tick 4: key2 = 4 + 2 * 8 = 20
    assert reg.info(0)["use_count"] == 2 and reg.tick == 4
    advance(reg, 13)                              # tick 17
    y = registered(reg, [11])                      # tick 18
    reg.release(y)                                 # tick 19: key2 19 < 20
    z = registered(reg, [12])                      # tick 20
    reg.release(z)                                 # tick 21: key2 21 > 20
    # LRU would give 10, 11, 12; the credit of 2C ticks keeps 10 past 11 (released 15 ticks
    # after it) but not past 12 (17 ticks after it)
    np.testing.assert_array_equal(reg.evict(3), [11, 10, 12])
    # four uses: f = 3, a credit of 3C = 24 ticks
    reg = impl(n, policy=POLICY_LINEAGE)
    x = registered(reg, [10])
    reg.release(x)
    for _ in range(3):
        reg.match([10])
        reg.release(x)                             # last release: tick 8, key2 = 8 + 24 = 32
    advance(reg, 21)                              # tick 29
    y = registered(reg, [11])
    reg.release(y)                                 # key2 31
    z = registered(reg, [12])
    reg.release(z)                                 # key2 33
    np.testing.assert_array_equal(reg.evict(3), [11, 10, 12])


@pytest.mark.parametrize("impl", IMPLS)
def test_lineage_priority_first_then_leaves_then_credited_recency(impl):
    reg = impl(8, policy=POLICY_LINEAGE)
    registered(reg, [20])                                   # block 0, tick 1
    reg.release([0])                                        # key2 2
    _chain(reg, [10, 11, 12], priorities=[0, 0, -1])        # blocks 1-3; 12 = the partial tail
    _chain(reg, [30, 31], priorities=[-1, 0])               # blocks 4, 5
    reg.release([1, 2, 3, 4, 5])                            # key2 8, 9, 10, 11, 12
    # priority -1 first, even with a child (30 goes before the older leaf 20, orphaning 31);
    # then the priority-0 leaves by key2: 20, 11 (a leaf once 12 is gone), then 10 (a leaf once
    # 11 is gone, key2 8 < 12), then 31
    np.testing.assert_array_equal(reg.evict(6), [12, 30, 20, 11, 10, 31])
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_lineage_touch_and_set_priority_rekey_inactive(impl):
    reg = impl(4, policy=POLICY_LINEAGE)
    registered(reg, [10, 11, 12])
    reg.release([0, 1, 2])                 # key2 4, 5, 6
    reg.touch([0])                         # tick 7, use count 2: key2 7 + 2 * 8 = 23
    reg.set_priority([2], [-1])
    np.testing.assert_array_equal(reg.evict(3), [12, 11, 10])


def test_lineage_key2_saturates_instead_of_wrapping():
    reg = BlockRegistry(4, policy=POLICY_LINEAGE)
    header = np.frombuffer(reg.buffer, np.uint64, count=8, offset=_header_offset(reg))
    header[7] = 2 ** 64 - 20                                # the clock, near the end of uint64
    x = registered(reg, [10])
    reg.release(x)
    reg.match([10])
    reg.release(x)            # last tick 2^64 - 16, + 2C * 2 = 32: saturates at 2^64 - 1
    y = registered(reg, [11])
    reg.release(y)            # 2^64 - 14: a wrapped key2 of 10 would be 16 and go first
    reg.check_invariants()
    np.testing.assert_array_equal(reg.evict(2), [11, 10])
    ref = ReferenceRegistry(4, policy=POLICY_LINEAGE)
    ref._tick = 2 ** 64 - 20
    x = registered(ref, [10])
    ref.release(x)
    ref.match([10])
    ref.release(x)
    y = registered(ref, [11])
    ref.release(y)
    assert ref._key(0)[1] == 2 ** 64 - 1
    np.testing.assert_array_equal(ref.evict(2), [11, 10])


@pytest.mark.parametrize("impl", IMPLS)
def test_lineage_order_is_the_reference_key(impl):
    """Random chains, reuse and priorities, driven identically on `impl` and on the plain-Python
    twin; then the two tables agree block for block (info()), and every eviction takes the block
    with the smallest twin's LINEAGE key (ReferenceRegistry._key: the spec, block id last),
    recomputed after each eviction."""
    import random

    def drive(reg):
        rnd = random.Random(5)
        for _ in range(120):
            start, k = rnd.randrange(30), rnd.randint(1, 6)
            hashes = [100 + (start + i) % 30 for i in range(k)]
            held = reg.match(hashes)
            rest = hashes[len(held):]
            if rest and reg.num_free + reg.num_inactive >= len(rest):
                prios = [0] * (len(rest) - 1) + [rnd.choice([-1, 0, 0])]
                blocks = reg.allocate(len(rest))
                reg.complete(blocks)
                parents = [hashes[len(held) - 1] if held.size else 0] + rest[:-1]
                mask = [held.size > 0] + [True] * (len(rest) - 1)
                held = np.concatenate([held, reg.register(blocks, np.array(rest, np.uint64),
                                                          np.array(parents, np.uint64), prios,
                                                          np.array(mask, bool))])
            reg.release(held)

    n = 40
    reg, twin = impl(n, policy=POLICY_LINEAGE), ReferenceRegistry(n, policy=POLICY_LINEAGE)
    drive(reg)
    drive(twin)
    while reg.num_inactive:
        infos = {b: reg.info(b) for b in range(n)}
        assert infos == {b: twin.info(b) for b in range(n)}
        want = min(twin._key(b) for b, i in infos.items()
                   if i["state"] == BlockState.REGISTERED and i["refcount"] == 0)
        np.testing.assert_array_equal(reg.evict(1), [infos[want[-1]]["hash"]])
        twin.evict(1)


# ---- LINEAGE ghost table (kvbm/policy.py; study: research/eviction/POLICY_ROUND2.md section 3) ----

def use(reg, hashes):
    """One request reading `hashes` (roots): match the cached ones, register the rest, release."""
    held = []
    for h in hashes:
        m = reg.match([h])
        held.append(m if m.size else registered(reg, [h]))
    reg.release(np.concatenate(held))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ghost", [None, 0])
def test_ghost_restores_use_count_and_outlives_one_shot_block(impl, ghost):
    # N = 2, C = 2N = 4 ticks; a request takes two ticks (register or match, release)
    reg = impl(2, policy=POLICY_LINEAGE, ghost_blocks=ghost)
    assert reg.ghost_blocks == (2 if ghost is None else 0)
    use(reg, [10])
    use(reg, [10])
    use(reg, [10])                                  # 10: 3 uses, last tick 6
    np.testing.assert_array_equal(reg.evict(1), [10])
    assert reg.num_ghosts == (1 if ghost is None else 0)
    use(reg, [11])                                  # one use, key 8
    use(reg, [10])                                  # new block, registered at tick 9
    b10 = int(reg.lookup([10])[0])
    if ghost is None:
        # 3 uses restored + the registration: key2 = 10 + C * bit_length(4) = 22
        assert reg.info(b10)["use_count"] == 4 and reg.num_ghosts == 0
        use(reg, [12])                              # evicts 11 (8)
        use(reg, [13])                              # evicts 12 (key 12, younger than 10 but one-shot)
        assert reg.lookup([10, 11, 12, 13]).tolist() == [b10, -1, -1, 1 - b10]
        assert reg.num_ghosts == 2                  # 11 and 12, one use each
    else:
        # no table: 10 is a one-shot block (key 10) and goes right after 11
        assert reg.info(b10)["use_count"] == 1
        use(reg, [12])                              # evicts 11 (8)
        use(reg, [13])                              # evicts 10 (10)
        assert reg.lookup([10, 11]).tolist() == [-1, -1] and reg.lookup([12, 13]).min() >= 0
    reg.check_invariants()


def evict_hash(reg, h):
    """Evict the block of hash h now (priority -5 puts it first; the ghost keeps its use count)."""
    reg.set_priority(reg.lookup([h]), [-5])
    np.testing.assert_array_equal(reg.evict(1), [h])


@pytest.mark.parametrize("impl", IMPLS)
def test_ghost_entry_forgotten_after_g_later_evictions(impl):
    reg = impl(4, policy=POLICY_LINEAGE, ghost_blocks=3)
    use(reg, [10])
    use(reg, [10])
    use(reg, [11])
    use(reg, [12])
    use(reg, [13])
    evict_hash(reg, 10)                             # ghost (oldest first) [10:2]
    evict_hash(reg, 11)
    evict_hash(reg, 12)                             # [10:2, 11:1, 12:1], full
    use(reg, [10])                                  # restored: 2 + the registration
    assert reg.info(int(reg.lookup([10])[0]))["use_count"] == 3 and reg.num_ghosts == 2
    use(reg, [10])                                  # 10: 4 uses
    evict_hash(reg, 13)                             # [11, 12, 13]
    evict_hash(reg, 10)                             # [12, 13, 10:4]: 11 forgotten
    use(reg, [20])
    use(reg, [21])
    evict_hash(reg, 20)
    evict_hash(reg, 21)                             # [10:4, 20, 21]: two later evictions
    use(reg, [10])
    assert reg.info(int(reg.lookup([10])[0]))["use_count"] == 5
    use(reg, [10])
    evict_hash(reg, 10)                             # [20, 21, 10:6]
    use(reg, [30])
    use(reg, [31])
    use(reg, [32])
    evict_hash(reg, 30)
    evict_hash(reg, 31)                             # [10:6, 30, 31]
    evict_hash(reg, 32)                             # G = 3 later evictions: [30, 31, 32]
    assert reg.num_ghosts == 3
    use(reg, [10])
    assert reg.info(int(reg.lookup([10])[0]))["use_count"] == 1     # forgotten
    use(reg, [11])
    assert reg.info(int(reg.lookup([11])[0]))["use_count"] == 1
    use(reg, [31])
    assert reg.info(int(reg.lookup([31])[0]))["use_count"] == 2     # still remembered
    assert reg.num_ghosts == 2
    reg.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_ghost_dedup_hit_keeps_count_and_lru_has_no_table(impl):
    reg = impl(2, policy=POLICY_LINEAGE, ghost_blocks=4)
    use(reg, [10])
    use(reg, [10])
    use(reg, [11])
    use(reg, [12])  # evicts 10 (count 2)
    b = reg.allocate(1)
    reg.complete(b)
    got = reg.register(np.concatenate([b, b[:0]]), np.array([12], np.uint64))   # dedup hit
    assert reg.info(int(got[0]))["use_count"] == 2 and reg.num_ghosts == 1     # 10 still there
    reg.release(got)
    lru = impl(2, policy=POLICY_LRU, ghost_blocks=4)
    assert lru.ghost_blocks == 0
    for hs in ([10], [10], [10], [11], [12], [10]):
        use(lru, hs)
    assert lru.info(int(lru.lookup([10])[0]))["use_count"] == 1 and lru.num_ghosts == 0
    use(lru, [13])                                  # plain LRU: 12 (older) goes, not 10
    assert lru.lookup([12])[0] == -1 and lru.lookup([10])[0] >= 0


def test_ghost_table_sizes_the_buffer_and_rejects_bad_sizes():
    n = 100
    assert BlockRegistry.bytes_needed(n) == BlockRegistry.bytes_needed(n, n)
    assert BlockRegistry.bytes_needed(n, 0) < BlockRegistry.bytes_needed(n) < BlockRegistry.bytes_needed(n, 4 * n)
    need = BlockRegistry.bytes_needed(n)
    reg = BlockRegistry(n, buffer=bytearray(need), policy=POLICY_LINEAGE)
    assert reg.ghost_blocks == n
    with pytest.raises(RegistryError, match="bytes"):
        BlockRegistry(n, buffer=bytearray(need), policy=POLICY_LINEAGE, ghost_blocks=2 * n)
    BlockRegistry(n, buffer=bytearray(BlockRegistry.bytes_needed(n, 0)))   # LRU: no table
    for bad in (-1, "3", 1.5):
        with pytest.raises(RegistryError):
            BlockRegistry(n, policy=POLICY_LINEAGE, ghost_blocks=bad)
        with pytest.raises(RegistryError):
            ReferenceRegistry(n, policy=POLICY_LINEAGE, ghost_blocks=bad)


# ---- evicted ring ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_evicted_ring_keeps_newest_and_counts_drops(impl):
    reg = impl(2)
    for h in range(5):
        b = registered(reg, [100 + h])
        reg.release(b)
        if h >= 1:
            reg.evict(1)
    # evicted 100, 101, 102, 103 in that order; the ring keeps the newest 2
    np.testing.assert_array_equal(reg.drain_evicted(), [102, 103])
    assert reg.num_evicted_dropped == 2


# ---- buffers --------------------------------------------------------------------------------------

def test_bytes_needed_and_buffers():
    need = BlockRegistry.bytes_needed(100, 0)       # LRU: no ghost table
    assert BlockRegistry.bytes_needed(200) > need > 100
    with pytest.raises(RegistryError, match="bytes"):
        BlockRegistry(100, buffer=bytearray(need - 1))
    with pytest.raises(RegistryError, match="read-only"):
        BlockRegistry(100, buffer=bytes(need))
    with pytest.raises(RegistryError, match="contiguous"):
        BlockRegistry(100, buffer=np.zeros(2 * need, np.uint8)[::2])
    with pytest.raises(RegistryError):
        BlockRegistry(0)
    with pytest.raises(RegistryError):
        BlockRegistry(10, policy=99)
    with pytest.raises(RegistryError):
        BlockRegistry.bytes_needed(-1)
    for buf in (bytearray(need), np.empty(need, np.uint8), np.empty(need + 3, np.uint8)[3:]):
        reg = BlockRegistry(100, buffer=buf)
        blocks = registered(reg, list(range(100)))
        reg.release(blocks)
        reg.check_invariants()
        assert reg.num_inactive == 100
        assert np.frombuffer(reg.buffer, np.uint8).ctypes.data == np.frombuffer(buf, np.uint8).ctypes.data


def test_external_buffer_holds_the_table():
    """Two registries over the same bytes: the table is entirely in the buffer."""
    n = 50
    buf = bytearray(BlockRegistry.bytes_needed(n))
    reg = BlockRegistry(n, buffer=buf)
    registered(reg, [1, 2, 3])
    copy = bytearray(buf)
    reg.allocate(10)
    buf[:] = copy                 # roll the bytes back: the registry's view follows
    assert reg.num_free == n - 3 and reg.num_active == 3
    np.testing.assert_array_equal(reg.lookup([1, 2, 3]), [0, 1, 2])
    reg.check_invariants()


def _header_offset(reg) -> int:
    raw = bytes(reg.buffer)
    off = raw.find((0x6B76626D52454731).to_bytes(8, "little"))
    assert 0 <= off < 64
    return off


def test_check_invariants_catches_corruption():
    reg = BlockRegistry(16)
    registered(reg, [1, 2, 3])
    reg.check_invariants()
    header = np.frombuffer(reg.buffer, np.int64, count=9, offset=_header_offset(reg))
    header[8] += 1                # num_free
    with pytest.raises(RegistryError, match="num_free"):
        reg.check_invariants()
    header[8] -= 1
    reg.check_invariants()


@pytest.mark.skipif(not registry_mod.DEBUG, reason="invariant checks run inside calls only in "
                    "a KVBM_DEBUG=1 build")
def test_debug_build_checks_invariants_after_each_call():
    reg = BlockRegistry(16)
    registered(reg, [1, 2, 3])
    header = np.frombuffer(reg.buffer, np.int64, count=9, offset=_header_offset(reg))
    header[8] += 1                # num_free
    with pytest.raises(RegistryError, match="num_free"):
        reg.touch([0])


# ---- bad inputs: every public call, nothing changes ------------------------------------------------

def _populated() -> BlockRegistry:
    reg = BlockRegistry(10)
    reg_blocks = registered(reg, [1, 2, 3])      # 0, 1, 2 REGISTERED, refcount 1
    reg.release(reg_blocks[2:])                  # 2 inactive
    partial = reg.allocate(2)                    # 3, 4 PARTIAL
    complete = reg.allocate(2)                   # 5, 6 COMPLETE
    reg.complete(complete)
    assert partial.tolist() == [3, 4] and complete.tolist() == [5, 6]
    return reg                                   # 7, 8, 9 free


BAD_CALLS = {
    "allocate-negative": lambda r: r.allocate(-1),
    "allocate-float": lambda r: r.allocate(1.5),
    "complete-out-of-range": lambda r: r.complete([3, 10]),
    "complete-negative": lambda r: r.complete([3, -1]),
    "complete-complete": lambda r: r.complete([3, 5]),
    "complete-registered": lambda r: r.complete([3, 0]),
    "complete-reset": lambda r: r.complete([3, 7]),
    "complete-duplicate": lambda r: r.complete([3, 4, 3]),
    "complete-float-dtype": lambda r: r.complete(np.array([3.0])),
    "complete-2d": lambda r: r.complete([[3, 4]]),
    "register-partial": lambda r: r.register([5, 3], [50, 51]),
    "register-registered": lambda r: r.register([5, 0], [50, 51]),
    "register-reset": lambda r: r.register([5, 8], [50, 51]),
    "register-duplicate-block": lambda r: r.register([5, 5], [50, 51]),
    "register-length": lambda r: r.register([5, 6], [50]),
    "register-negative-hash": lambda r: r.register([5, 6], [50, -51]),
    "register-float-hash": lambda r: r.register([5, 6], np.array([50.0, 51.0])),
    "register-list-float-hash": lambda r: r.register([5, 6], [50, 1.5]),
    "register-hash-too-big": lambda r: r.register([5], [2 ** 64]),
    "register-parents-length": lambda r: r.register([5, 6], [50, 51], parents=[1]),
    "register-mask-length": lambda r: r.register([5, 6], [50, 51], parents=[1, 50],
                                                  has_parent=[True]),
    "register-mask-dtype": lambda r: r.register([5, 6], [50, 51], parents=[1, 50],
                                                has_parent=[1, 0]),
    "register-mask-without-parents": lambda r: r.register([5, 6], [50, 51], has_parent=[True, True]),
    "register-priority-range": lambda r: r.register([5, 6], [50, 51], priorities=[0, 2 ** 31]),
    "register-priority-length": lambda r: r.register([5, 6], [50, 51], priorities=[0]),
    "match-negative": lambda r: r.match([1, -2]),
    "match-2d": lambda r: r.match([[1, 2]]),
    "match-str": lambda r: r.match(["a"]),
    "lookup-negative": lambda r: r.lookup([-1]),
    "touch-reset": lambda r: r.touch([0, 8]),
    "touch-out-of-range": lambda r: r.touch([0, 11]),
    "release-reset": lambda r: r.release([0, 9]),
    "release-inactive": lambda r: r.release([0, 2]),
    "release-too-often": lambda r: r.release([3, 0, 0]),
    "release-out-of-range": lambda r: r.release([0, 99]),
    "evict-negative": lambda r: r.evict(-3),
    "evict-none": lambda r: r.evict(None),
    "set_priority-length": lambda r: r.set_priority([0, 1], [1]),
    "set_priority-reset": lambda r: r.set_priority([0, 7], [1, 1]),
    "set_priority-range": lambda r: r.set_priority([0], [-2 ** 31 - 1]),
    "set_priority-float": lambda r: r.set_priority([0], [0.5]),
    "info-out-of-range": lambda r: r.info(10),
    "info-negative": lambda r: r.info(-1),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(name):
    reg = _populated()
    before = bytes(reg.buffer)
    with pytest.raises(RegistryError):
        BAD_CALLS[name](reg)
    assert bytes(reg.buffer) == before
    reg.check_invariants()


def test_error_messages_carry_numbers():
    reg = _populated()
    with pytest.raises(RegistryError, match=r"block 7 \(slot 1\) is RESET, register needs COMPLETE"):
        reg.register([5, 7], [50, 51])
    with pytest.raises(RegistryError, match=r"block 0 \(slot 2\) is released 2 times .* refcount 1"):
        reg.release([3, 0, 0])
    with pytest.raises(RegistryError, match=r"2 blocks but 1 hashes"):
        reg.register([5, 6], [50])


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_reference_rejects_the_same_inputs(name):
    ref = ReferenceRegistry(10)
    blocks = registered(ref, [1, 2, 3])
    ref.release(blocks[2:])
    ref.allocate(2)
    ref.complete(ref.allocate(2))
    snap = [ref.info(b) for b in range(10)]
    with pytest.raises(RegistryError):
        BAD_CALLS[name](ref)
    assert [ref.info(b) for b in range(10)] == snap


def test_accepts_lists_and_other_integer_dtypes():
    reg = BlockRegistry(8)
    blocks = reg.allocate(3)
    reg.complete(blocks.astype(np.uint32))
    out = reg.register(list(blocks), [2 ** 64 - 1, 0, 2 ** 63], priorities=np.array([1, 2, 3], np.int8))
    np.testing.assert_array_equal(out, blocks)
    np.testing.assert_array_equal(reg.lookup(np.array([2 ** 64 - 1, 0, 2 ** 63], np.uint64)), blocks)
    assert reg.info(1)["hash"] == 0 and reg.info(2)["priority"] == 3
    for empty in ([], np.array([], np.float64)):
        reg.release(empty)
        assert reg.match(empty).size == 0
