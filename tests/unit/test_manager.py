"""KvBlockManager and pools (metadata only): per-tier match, dedup, stats, cross-tier view, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, KvbmError, RegistryError
from kvbm.hashing import hash_token_blocks
from kvbm.layout import LayoutConfig
from kvbm.manager import KvBlockManager
from kvbm.pools import Tier

LAYOUT = LayoutConfig(num_layers=2, outer_dim=2, page_size=16, inner_dim=64, dtype="bfloat16")


def chain(n: int, start: int = 0) -> np.ndarray:
    return hash_token_blocks(np.arange(start, start + 16 * n, dtype=np.uint32), 16)[1]


def fill(kv: KvBlockManager, hashes: np.ndarray, tier: Tier) -> np.ndarray:
    blocks = kv.allocate(len(hashes), tier)
    assert blocks is not None
    return kv.register(blocks, hashes, np.r_[0, hashes[:-1]], tier, has_parent=np.arange(len(hashes)) > 0)


def test_match_answers_per_tier_and_best_tier():
    with KvBlockManager(device_blocks=16, host_blocks=32) as kv:
        hashes = chain(10)
        kv.release(fill(kv, hashes[:3], Tier.G1), Tier.G1)
        kv.release(fill(kv, hashes[:7], Tier.G2), Tier.G2)
        found = kv.match(hashes)
        assert found.prefix == {Tier.G1: 3, Tier.G2: 7}
        assert found.best() == (Tier.G2, 7)
        assert kv.tiers.tiers_of(hashes[[0, 5, 9]]).tolist() == [0b11, 0b10, 0b00]
        assert kv.tiers.missing_from(Tier.G2, hashes).tolist() == [7, 8, 9]


def test_dedup_returns_existing_block_and_counts_it():
    with KvBlockManager(host_blocks=8) as kv:
        hashes = chain(3)
        first = fill(kv, hashes, Tier.G2)
        second = fill(kv, hashes, Tier.G2)
        assert second.tolist() == first.tolist()
        stats = kv.stats()["G2"]
        assert (stats["registered"], stats["deduplicated"], stats["free"], stats["active"]) == (3, 3, 5, 3)


def test_released_blocks_stay_matchable_until_evicted():
    with KvBlockManager(host_blocks=4) as kv:
        old, new = chain(4), chain(4, start=10_000)
        kv.release(fill(kv, old, Tier.G2), Tier.G2)
        assert kv.match(old).prefix[Tier.G2] == 4
        kv.release(fill(kv, new[:2], Tier.G2), Tier.G2)  # evicts the two least recent
        assert kv.stats()["G2"]["evicted"] == 2
        assert kv.pool(Tier.G2).lookup(old).tolist().count(-1) == 2


def test_allocate_out_of_capacity_is_none_not_an_error():
    with KvBlockManager(device_blocks=4) as kv:
        held = kv.allocate(3)
        assert kv.allocate(2) is None
        assert kv.stats()["G1"]["allocate_failures"] == 1
        kv.release(held)
        assert kv.allocate(4) is not None


def test_sizes_from_bytes_and_layout():
    cfg = KvbmConfig.load(env={}, layout=LAYOUT, host_size=LAYOUT.block_stride * 10, device_blocks=2)
    with KvBlockManager(cfg) as kv:
        assert kv.pool(Tier.G2).num_blocks == 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "no tier has any blocks"),
    (dict(host_size="1GB"), "needs a layout"),
    (dict(host_blocks=4, policy="nope"), "policy"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KvBlockManager(**kwargs)


def test_bad_calls_raise_and_change_nothing():
    with KvBlockManager(device_blocks=8, host_blocks=8) as kv:
        blocks = kv.allocate(2)
        before = kv.stats()
        with pytest.raises(KvbmError, match="not configured"):
            kv.allocate(1, Tier.G3)
        with pytest.raises(KvbmError, match="non-negative"):
            kv.allocate(-1)
        with pytest.raises(KvbmError, match="2 blocks and 3 hashes"):
            kv.register(blocks, chain(3))
        with pytest.raises(KvbmError, match="non-negative"):
            kv.register(blocks, [-1, 2])
        with pytest.raises(KvbmError, match="integers"):
            kv.match(np.array([1.5]))
        with pytest.raises(KvbmError, match="1-D"):
            kv.match(np.zeros((2, 2), dtype=np.uint64))
        with pytest.raises(RegistryError):
            kv.release([99])
        with pytest.raises(RegistryError):
            kv.release(blocks[:1].tolist() * 2)
        assert kv.stats() == before
        kv.register(blocks, chain(2))  # the blocks are still usable after the failed calls
    with pytest.raises(ConfigError, match="not both"):
        KvBlockManager(KvbmConfig.load(env={}, host_blocks=1), host_blocks=2)


def test_closed_manager_refuses_calls():
    kv = KvBlockManager(device_blocks=4)
    kv.close()
    kv.close()  # idempotent
    with pytest.raises(KvbmError, match="closed"):
        kv.match(chain(1))


def test_env_configures_the_manager(monkeypatch):
    monkeypatch.setenv("KVBM_HOST_BLOCKS", "12")
    monkeypatch.setenv("KVBM_DEVICE_BLOCKS", "3")
    with KvBlockManager() as kv:
        assert {t: p.num_blocks for t, p in kv.pools.items()} == {Tier.G1: 3, Tier.G2: 12}


def test_refused_register_leaves_blocks_partial_for_a_retry():
    with KvBlockManager(device_blocks=8) as kv:
        blocks = kv.allocate(3)
        hashes = chain(3)
        for parents, has_parent, message in [
            (hashes[:2], None, "2 parents for 3 hashes"),
            (None, [True, False, True], "without parents"),
            (np.r_[0, hashes[:-1]], [1, 0, 1], "3 bools"),
            (np.array([-5, 1, 2]), None, "non-negative"),
        ]:
            with pytest.raises(KvbmError, match=message):
                kv.register(blocks, hashes, parents, has_parent=has_parent)
        canonical = kv.register(blocks, hashes, np.r_[0, hashes[:-1]], has_parent=np.arange(3) > 0)
        assert canonical.tolist() == blocks.tolist()
        assert kv.pool(Tier.G1).registry.info(int(blocks[1]))["parent"] == int(blocks[0])


def test_same_tokens_under_different_salts_never_match():
    """KvbmConfig.salt (KVBM_SALT) is folded into every key the manager stores and asks for: a block
    registered under one salt is not found under another, with the same engine hashes."""
    hashes = chain(6)
    with KvBlockManager(device_blocks=16, salt="model-a") as a, KvBlockManager(device_blocks=16, salt="model-b") as b, \
            KvBlockManager(device_blocks=16) as plain:
        for kv in (a, b, plain):
            fill(kv, hashes, Tier.G1)
            assert kv.match(hashes).prefix == {Tier.G1: 6}          # each finds its own blocks
        assert not set(a.keys(hashes).tolist()) & set(b.keys(hashes).tolist())
        assert (a.pool(Tier.G1).lookup(b.keys(hashes)) == -1).all()      # b's keys are not in a's index
        assert (a.pool(Tier.G1).lookup(hashes) == -1).all()              # nor are the bare hashes
        assert (plain.pool(Tier.G1).lookup(hashes) >= 0).all()           # no salt: the keys are the hashes
        assert plain.keys(hashes).tolist() == hashes.tolist()
        assert a.keys(hashes).tolist() == KvBlockManager(device_blocks=1, salt="model-a").keys(hashes).tolist()
        a.hint_waiting("r1", hashes[:2])                                  # hints name keys too
        reg = a.pool(Tier.G1).registry
        assert reg.info(int(reg.lookup(a.keys(hashes[:1]))[0]))["priority"] == 1


def test_salt_comes_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("KVBM_SALT", "model-a")
    with KvBlockManager(device_blocks=4) as kv, KvBlockManager(device_blocks=4, salt="model-a") as same:
        assert kv.config.salt == "model-a"
        assert kv.keys(chain(2)).tolist() == same.keys(chain(2)).tolist() != chain(2).tolist()
