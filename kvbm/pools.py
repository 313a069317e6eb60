"""Device, host and disk pools: one block registry per tier, with the statistics each tier reports.

Parts:
  Tier          G1 (device), G2 (pinned host), G3 (disk), as plain ints on the wire
  PoolStats     counters of one pool (allocations, registrations, dedup hits, match hits/misses, evictions)
  BlockPool     a BlockRegistry (kvbm._fast.registry) plus its stats and tier; every batched registry
                call passes straight through, so a pool adds no per-block Python work
  TierView      the cross-tier view: for a list of sequence hashes, which tiers hold each one

Workflow: allocate -> (bytes arrive) -> complete -> register (dedup) -> release (inactive, still
matchable) -> match/acquire again, or evicted by the pool's policy when space is needed. The bytes of
G2 and G3 are the runtime's (kvbm/workers); pools only keep their metadata.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum

import numpy as np

from kvbm.errors import ConfigError


class Tier(IntEnum):
    G1 = 1  # device (the engine's KV tensors)
    G2 = 2  # pinned host, shared memory
    G3 = 3  # disk


# Registry policy ids by config name. kvbm.policy owns the numbering.
def policy_id(name: str) -> int:
    from kvbm import policy
    ids = {"lru": policy.POLICY_LRU, "lineage": getattr(policy, "POLICY_LINEAGE", None)}
    if ids.get(name) is None:
        raise ConfigError(f"eviction policy {name!r} is not available; known: "
                          f"{sorted(k for k, v in ids.items() if v is not None)}")
    return ids[name]


@dataclass(slots=True)
class PoolStats:
    allocated: int = 0        # blocks handed out by allocate
    allocate_failures: int = 0  # allocate calls answered None (out of capacity)
    registered: int = 0       # blocks newly registered
    deduplicated: int = 0     # register slots answered by an existing block
    match_queries: int = 0    # hashes asked for by match
    match_hits: int = 0       # of those, found in the matched prefix
    evicted: int = 0          # registered blocks that gave way


class BlockPool:
    """The metadata of one tier: a registry of num_blocks blocks under an eviction policy."""

    def __init__(self, tier: Tier, num_blocks: int, policy: str = "lru", buffer=None) -> None:
        from kvbm._fast.registry import BlockRegistry
        if num_blocks < 1:
            raise ConfigError(f"{tier.name} pool needs at least 1 block, got {num_blocks}")
        self.tier = tier
        self.policy = policy
        self.registry = BlockRegistry(num_blocks, buffer, policy_id(policy))
        self.stats = PoolStats()

    @property
    def num_blocks(self) -> int:
        return self.registry.num_blocks

    def allocate(self, n: int) -> np.ndarray | None:
        free_before = self.registry.num_free
        blocks = self.registry.allocate(n)
        if blocks is None:
            self.stats.allocate_failures += 1
            return None
        self.stats.allocated += len(blocks)
        # allocate takes free blocks first; the rest came out of the inactive set by eviction.
        self.stats.evicted += max(0, len(blocks) - free_before)
        return blocks

    def complete(self, blocks) -> None:
        self.registry.complete(blocks)

    def register(self, blocks, hashes, parents=None, has_parent=None) -> np.ndarray:
        before = self.registry.num_free
        canonical = self.registry.register(blocks, hashes, parents, has_parent=has_parent)
        duplicates = self.registry.num_free - before
        self.stats.deduplicated += duplicates
        self.stats.registered += len(canonical) - duplicates
        return canonical

    def match(self, hashes, acquire: bool = True) -> np.ndarray:
        blocks = self.registry.match(hashes, acquire)
        self.stats.match_queries += len(hashes)
        self.stats.match_hits += len(blocks)
        return blocks

    def lookup(self, hashes) -> np.ndarray:
        return self.registry.lookup(hashes)

    def touch(self, blocks) -> None:
        self.registry.touch(blocks)

    def release(self, blocks) -> None:
        self.registry.release(blocks)

    def evict(self, n: int) -> np.ndarray:
        hashes = self.registry.evict(n)
        self.stats.evicted += len(hashes)
        return hashes

    def snapshot(self) -> dict[str, int | str]:
        """Occupancy and counters, for --status, metrics and tests."""
        reg = self.registry
        return {"tier": self.tier.name, "policy": self.policy, "num_blocks": reg.num_blocks,
                "free": reg.num_free, "inactive": reg.num_inactive, "active": reg.num_active,
                **asdict(self.stats)}


class TierView:
    """Which tiers hold each sequence hash: per-tier lookups, answered as a bit per tier."""

    def __init__(self, pools: dict[Tier, BlockPool]) -> None:
        self.pools = pools

    def tiers_of(self, hashes) -> np.ndarray:
        """uint8 per hash: bit (tier - 1) set when that tier holds the hash."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        mask = np.zeros(len(hashes), dtype=np.uint8)
        for tier, pool in self.pools.items():
            mask |= (pool.lookup(hashes) >= 0).astype(np.uint8) << np.uint8(tier - 1)
        return mask

    def missing_from(self, tier: Tier, hashes) -> np.ndarray:
        """Indices of hashes that `tier` does not hold yet: the only ones worth sending there."""
        return np.flatnonzero(self.pools[tier].lookup(np.asarray(hashes, dtype=np.uint64)) < 0)

    def prefix_lengths(self, hashes) -> dict[Tier, int]:
        """Longest prefix each tier holds, without acquiring anything."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        return {tier: len(pool.registry.match(hashes, False)) for tier, pool in self.pools.items()}
