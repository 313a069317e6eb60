"""KvBlockManager: the public facade an engine (or its connector) talks to.

Parts:
  KvBlockManager   builds one BlockPool per configured tier from a KvbmConfig, answers `match`
                   per tier through the cross-tier TierView, and passes allocate/register/release to
                   the pool of the tier asked for; `stats()` reports every tier; `close()` (or the
                   context manager) shuts down whatever the manager started.
  TierMatch        the answer of `match`: the longest prefix each tier holds.

Workflow of one request: hash its token blocks (kvbm.hashing) -> `match` -> onboard the prefix the
fastest tier holds -> allocate device blocks for the rest -> register them once computed -> release
when the request ends; the runtime (kvbm.transfer, kvbm.workers) moves the bytes between tiers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, KvbmError
from kvbm.pools import BlockPool, Tier, TierView

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TierMatch:
    prefix: dict[Tier, int]  # longest prefix of the asked hashes that each tier holds

    def best(self) -> tuple[Tier | None, int]:
        """The tier holding the longest prefix (the fastest one on ties) and its length."""
        tier, length = None, 0
        for t in sorted(self.prefix):
            if self.prefix[t] > length:
                tier, length = t, self.prefix[t]
        return tier, length


def _hashes(hashes) -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.ndim != 1:
        raise KvbmError(f"hashes must be a 1-D sequence of u64, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise KvbmError(f"hashes must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise KvbmError("hashes must be non-negative u64 values")
    return arr.astype(np.uint64, copy=False)


class KvBlockManager:
    """Tiers G1/G2/G3 of one engine: block metadata here, bytes in the engine and in kvbm-workers."""

    def __init__(self, config: KvbmConfig | None = None, **overrides) -> None:
        if config is None:
            config = KvbmConfig.load(**overrides)
        elif overrides:
            raise ConfigError("pass a KvbmConfig or keyword arguments, not both")
        self.config = config
        self.pools: dict[Tier, BlockPool] = {}
        layout = config.layout
        sizes = {Tier.G1: config.device_blocks}
        if config.host_blocks is not None or config.host_size is not None:
            if config.host_blocks is None and layout is None:
                raise ConfigError("host_size needs a layout to turn bytes into blocks; give host_blocks or layout")
            sizes[Tier.G2] = config.host_blocks if layout is None else config.host_blocks_for(layout)
        if config.disk_blocks or config.disk_size:
            if config.disk_blocks is None and layout is None:
                raise ConfigError("disk_size needs a layout to turn bytes into blocks; give disk_blocks or layout")
            sizes[Tier.G3] = config.disk_blocks if layout is None else config.disk_blocks_for(layout)
        for tier, blocks in sizes.items():
            if blocks:
                self.pools[tier] = BlockPool(tier, blocks, config.policy)
        if not self.pools:
            raise ConfigError("no tier has any blocks: set device_blocks, host_blocks/host_size or disk_blocks/disk_size")
        self.tiers = TierView(self.pools)
        self._closed = False

    # ---- metadata API ---------------------------------------------------------------------------
    def pool(self, tier: Tier | int) -> BlockPool:
        self._check_open()
        try:
            return self.pools[Tier(tier)]
        except (KeyError, ValueError) as err:
            raise KvbmError(f"tier {tier!r} is not configured; configured: {[t.name for t in self.pools]}") from err

    def match(self, hashes) -> TierMatch:
        """The longest prefix of `hashes` that each tier holds (nothing is acquired)."""
        self._check_open()
        return TierMatch(self.tiers.prefix_lengths(_hashes(hashes)))

    def allocate(self, n: int, tier: Tier | int = Tier.G1) -> np.ndarray | None:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise KvbmError(f"allocate needs a non-negative block count, got {n!r}")
        return self.pool(tier).allocate(int(n))

    def register(self, blocks, hashes, parents=None, tier: Tier | int = Tier.G1) -> np.ndarray:
        """Registers complete blocks under their sequence hashes; returns the canonical block per slot."""
        pool = self.pool(tier)
        pool.complete(blocks)
        return pool.register(blocks, _hashes(hashes), parents)

    def release(self, blocks, tier: Tier | int = Tier.G1) -> None:
        self.pool(tier).release(blocks)

    def stats(self) -> dict[str, dict]:
        self._check_open()
        return {tier.name: pool.snapshot() for tier, pool in self.pools.items()}

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        logger.debug("KvBlockManager %s closed", self.config.instance_id)

    def _check_open(self) -> None:
        if self._closed:
            raise KvbmError("KvBlockManager is closed")

    def __enter__(self) -> "KvBlockManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
