"""Queue hint: KvBlockManager.hint_waiting / hint_done (kvbm.pools.WaitingHints).

Exact eviction orders: a block that a waiting request will read is evicted after every unhinted
block, in every tier that holds it (also when it registers after the hint); after hint_done it is
back in plain policy order; bad input raises KvbmError and changes nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvbm.errors import KvbmError
from kvbm.manager import KvBlockManager
from kvbm.pools import Tier


def fill(kv, hashes, tier=Tier.G1):
    """Register one block per hash in `tier` and release them in order (inactive, LRU by order)."""
    blocks = kv.allocate(len(hashes), tier)
    canon = kv.register(blocks, np.asarray(hashes, np.uint64), tier=tier)
    kv.release(canon, tier)
    return canon


def evict_all(kv, tier=Tier.G1):
    pool = kv.pool(tier)
    return pool.evict(pool.registry.num_inactive).tolist()


def priority(kv, h, tier=Tier.G1):
    reg = kv.pool(tier).registry
    return reg.info(int(reg.lookup([h])[0]))["priority"]


@pytest.mark.parametrize("policy", ["lru", "lineage"])
def test_hinted_block_outlives_older_unhinted_ones(policy):
    with KvBlockManager(device_blocks=4, policy=policy) as kv:
        fill(kv, [10, 11, 12, 13])
        assert kv.hint_waiting("r1", [10]) == 1
        assert priority(kv, 10) == 1 and kv.num_waiting == 1
        got = kv.allocate(1)                       # evicts 11, the oldest unhinted block
        assert kv.pool(Tier.G1).registry.lookup([10, 11]).tolist()[1] == -1
        kv.register(got, [14])
        kv.release(got)
        assert evict_all(kv) == [12, 13, 14, 10]


def test_hint_done_restores_lru_order():
    with KvBlockManager(device_blocks=4) as kv:
        fill(kv, [10, 11, 12, 13])
        kv.hint_waiting("r1", [10, 12])
        assert kv.hint_done("r1") == 2
        assert priority(kv, 10) == 0 and kv.num_waiting == 0
        assert evict_all(kv) == [10, 11, 12, 13]   # release order again (ticks were untouched)


def test_refcount_per_hash_across_requests():
    with KvBlockManager(device_blocks=4) as kv:
        fill(kv, [10, 11, 12, 13])
        assert kv.hint_waiting("r1", [10, 11]) == 2
        assert kv.hint_waiting(7, [11, 11, 99]) == 1     # 11 already hinted; 99 not cached anywhere
        assert kv.hint_done("r1") == 1                   # 10 drops, 11 is still waited for by 7
        assert priority(kv, 10) == 0 and priority(kv, 11) == 1
        assert evict_all(kv) == [10, 12, 13, 11]
        assert kv.hint_done(7) == 2


def test_blocks_registered_after_the_hint_and_other_tiers():
    with KvBlockManager(device_blocks=3, host_blocks=3) as kv:
        kv.hint_waiting("r", [20, 21])
        fill(kv, [20, 30, 31])                           # 20 computed after the hint
        fill(kv, [21, 32, 33], Tier.G2)                  # 21 offloaded/stored after the hint
        assert priority(kv, 20) == 1 and priority(kv, 30) == 0
        assert priority(kv, 21, Tier.G2) == 1
        fill(kv, [30])                                   # dedup hit keeps the priority as it is
        assert priority(kv, 30) == 0
        kv.hint_waiting("s", [30, 32])                   # cached blocks of both tiers
        assert priority(kv, 30) == 1 and priority(kv, 32, Tier.G2) == 1
        kv.hint_done("s")
        assert evict_all(kv) == [31, 30, 20]
        assert evict_all(kv, Tier.G2) == [32, 33, 21]


def test_bad_input_raises_and_changes_nothing():
    with KvBlockManager(device_blocks=4, host_blocks=4) as kv:
        fill(kv, [10, 11])
        kv.hint_waiting("r1", [10])
        before = {t: bytes(p.registry.buffer) for t, p in kv.pools.items()}
        state = (dict(kv._hints.counts), {k: list(v) for k, v in kv._hints.waiting.items()})
        bad = [
            lambda: kv.hint_waiting("r1", [11]),               # already waiting
            lambda: kv.hint_waiting(["x"], [11]),              # unhashable id
            lambda: kv.hint_waiting("r2", [[10, 11]]),         # 2-D
            lambda: kv.hint_waiting("r2", [11, -1]),           # negative
            lambda: kv.hint_waiting("r2", [1.5]),              # not integers
            lambda: kv.hint_done("nobody"),
            lambda: kv.hint_done(["x"]),
        ]
        for call in bad:
            with pytest.raises(KvbmError):
                call()
            assert {t: bytes(p.registry.buffer) for t, p in kv.pools.items()} == before
            assert (kv._hints.counts, kv._hints.waiting) == state
        kv.close()
        with pytest.raises(KvbmError, match="closed"):
            kv.hint_waiting("r3", [10])
