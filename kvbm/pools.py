"""Device, host and disk pools: one block registry per tier, with the statistics each tier reports.

Parts:
  Tier          G1 (device), G2 (pinned host), G3 (disk), as plain ints on the wire
  PoolStats     counters of one pool (allocations, registrations, dedup hits, match hits/misses, evictions)
  BlockPool     a BlockRegistry (kvbm._fast.registry) plus its stats and tier; every batched registry
                call passes straight through, so a pool adds no per-block Python work
  TierView      the cross-tier view: for a list of sequence hashes, which tiers hold each one
  WaitingHints  the engine's waiting queue as an eviction hint: per sequence hash, how many waiting
                requests will read it; a cached block with waiting readers has priority
                HINT_PRIORITY (1) in every tier that holds it, and 0 again when none is left
                (bench/POLICY_ROUND2.md section 5)

Workflow: allocate -> (bytes arrive) -> complete -> register (dedup) -> release (inactive, still
matchable) -> match/acquire again, or evicted by the pool's policy when space is needed. The bytes of
G2 and G3 are the runtime's (kvbm/workers); pools only keep their metadata.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum

import numpy as np

from kvbm.errors import ConfigError, KvbmError, LifecycleError
from kvbm.policy import EvictionPolicy


class Tier(IntEnum):
    G1 = 1  # device (the engine's KV tensors)
    G2 = 2  # pinned host, shared memory
    G3 = 3  # disk


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

    def __init__(self, tier: Tier, num_blocks: int, policy: str = "lru", buffer=None,
                 ghost_blocks: int | None = None) -> None:
        from kvbm._fast.registry import BlockRegistry
        if num_blocks < 1:
            raise ConfigError(f"{tier.name} pool needs at least 1 block, got {num_blocks}")
        self.tier = tier
        self.policy = policy
        # ghost_blocks: LINEAGE's (and ADAPTIVE's) table of recently evicted use counts (None: num_blocks)
        self.registry = BlockRegistry(num_blocks, buffer, int(EvictionPolicy.from_name(policy)),
                                      ghost_blocks)
        self.stats = PoolStats()
        self.hints: WaitingHints | None = None   # set by the manager: new blocks of waiting hashes
        self.shared = False    # whether other engines use this registry too (BlockPool.over)

    @classmethod
    def over(cls, tier: Tier, registry, policy: str = "lru") -> BlockPool:
        """A pool over a registry made elsewhere: a shared G2 namespace's SharedBlockRegistry
        (kvbm.shared_g2), which has BlockRegistry's API."""
        pool = cls.__new__(cls)
        pool.tier = tier
        pool.policy = policy
        pool.registry = registry
        pool.stats = PoolStats()
        pool.hints = None
        pool.shared = True
        return pool

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
        canonical = self.registry.register(blocks, hashes, parents, has_parent=has_parent)
        if self.hints is not None:
            self.hints.registered(self.registry, hashes, canonical)
        # a slot answered by another block (not num_free's change: other engines of a shared G2
        # allocate and free at the same time)
        duplicates = int(np.count_nonzero(np.asarray(canonical) != np.asarray(blocks)))
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

    def take_victims(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to `n` inactive blocks evicted and held by the caller with their bytes, and the
        hash each held (BlockRegistry.take_victims): the disk tier's cleaner writes them to G3."""
        blocks, hashes = self.registry.take_victims(n)
        self.stats.allocated += len(blocks)
        self.stats.evicted += len(blocks)
        return blocks, hashes

    DROP_PRIORITY = -(2**31)   # below every priority anything else sets: evicted before all of them

    def drop(self, blocks) -> np.ndarray:
        """Unregisters blocks the caller holds (each acquired once by it) whose bytes are known bad:
        released with the lowest priority and evicted at once. A block someone else still holds
        goes when they release it (first in line). Returns the hashes evicted now."""
        blocks = np.unique(np.asarray(blocks, dtype=np.int64))
        if blocks.size == 0:
            return np.empty(0, np.uint64)
        reg = self.registry
        reg.set_priority(blocks, np.full(blocks.size, self.DROP_PRIORITY, np.int32))
        reg.release(blocks)
        idle = sum(1 for b in blocks.tolist() if reg.info(b)["refcount"] == 0)   # the failure path: rare, small
        return self.evict(idle)

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


class WaitingHints:
    """Blocks that requests in the engine's waiting queue will read are evicted last.

    `add(request_id, hashes)` when a request enters the queue, `done(request_id)` when it is
    scheduled (or dropped). `counts[hash]` is the number of waiting requests that read the hash
    (each request counts a hash once): a dict bounded by the queue's hashes, not by the pools.
    When a count goes 0 -> 1 the blocks holding that hash in every tier get priority HINT_PRIORITY
    (evicted after all priority-0 blocks; among themselves in policy order); when it goes back to 0
    they get priority 0. A block registered while its hash is waiting (computed or moved to another
    tier after the hint) gets HINT_PRIORITY too (`registered`, called by BlockPool.register).
    Lookups and set_priority are one batched call per tier. Not thread-safe: the manager calls it
    under kv.lock.

    The priority is absolute: a hinted block that had another one (the engine's -1 for a partial
    tail block) is at 0 after `done`.
    """

    HINT_PRIORITY = 1

    def __init__(self, pools: dict[Tier, BlockPool]) -> None:
        self.pools = pools
        self.counts: dict[int, int] = {}              # hash -> waiting requests that read it
        self.waiting: dict[object, list[int]] = {}    # request id -> its distinct hashes

    def add(self, request_id, hashes: np.ndarray) -> int:
        """`hashes`: validated uint64 array. Returns how many hashes became hinted."""
        try:
            known = request_id in self.waiting
        except TypeError as err:
            raise KvbmError(f"request id must be hashable, got {type(request_id).__name__}") from err
        if known:
            raise LifecycleError(f"request {request_id!r} is already waiting "
                            f"({len(self.waiting[request_id])} hashes); hint_done it first")
        keys = np.unique(np.asarray(hashes, dtype=np.uint64)).tolist()
        self.waiting[request_id] = keys
        counts = self.counts
        new = []
        for h in keys:
            c = counts.get(h, 0)
            counts[h] = c + 1
            if c == 0:
                new.append(h)
        self._set(new, self.HINT_PRIORITY)
        return len(new)

    def done(self, request_id) -> int:
        """The request left the queue. Returns how many hashes are no longer hinted."""
        try:
            keys = self.waiting.pop(request_id)
        except (KeyError, TypeError) as err:
            raise LifecycleError(f"request {request_id!r} is not waiting "
                            f"({len(self.waiting)} requests are)") from err
        counts = self.counts
        gone = []
        for h in keys:
            c = counts[h] - 1
            if c:
                counts[h] = c
            else:
                del counts[h]
                gone.append(h)
        self._set(gone, 0)
        return len(gone)

    def registered(self, registry, hashes, canonical) -> None:
        """After a register call: blocks whose hash is waiting get HINT_PRIORITY."""
        counts = self.counts
        if not counts:
            return
        idx = [i for i, h in enumerate(np.asarray(hashes, dtype=np.uint64).tolist()) if h in counts]
        if idx:
            registry.set_priority(np.asarray(canonical)[idx], np.full(len(idx), self.HINT_PRIORITY, np.int32))

    def _set(self, keys: list[int], priority: int) -> None:
        if not keys:
            return
        arr = np.array(keys, dtype=np.uint64)
        for pool in self.pools.values():
            blocks = pool.registry.lookup(arr)
            held = blocks[blocks >= 0]
            if held.size:
                pool.registry.set_priority(held, np.full(held.size, priority, np.int32))


def only_int(values) -> int | None:
    """The one int of a one-element list or tuple of an int, or of a one-element integer ndarray;
    None for anything else (the array paths then convert and check it)."""
    kind = type(values)
    if kind is list or kind is tuple:
        if len(values) != 1:
            return None
        value = values[0]
        return value if type(value) is int else None
    if kind is np.ndarray and values.shape == (1,) and values.dtype.kind in "iu":
        return int(values[0])
    return None


def only_u64(values) -> int | None:
    """only_int of a sequence hash: the one int if it is a u64, else None."""
    value = only_int(values)
    return value if value is not None and 0 <= value < 1 << 64 else None
