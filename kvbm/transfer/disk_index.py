"""What the engine knows of the disk tier beyond its own G3 registry (kvbm.transfer.disk_offload).

Parts:
  LoadRule   load or recompute: a G3 prefix of n blocks is offered only when reading it is expected
             to take less time (n * block_bytes / read rate) than recomputing its n * page_size
             tokens at `prefill_tokens_per_s`. The read rate is an EWMA of the disk worker's reads
             (bytes / its time per request), DEFAULT_READ_BPS before any measurement (a slow disk:
             a fast one proves itself on its first reads)
  PeerIndex  blocks of other instances in a shared disk_path: per instance, the (hash, slot,
             checksum) arrays its journal named, and one merged hash-sorted copy for lookups (numpy
             arrays, no object per block); refreshed from the disk worker's entries
Both are plain data and arithmetic, used under the engine's pool lock.
"""
from __future__ import annotations

import numpy as np

DEFAULT_READ_BPS = 0.5e9   # assumed G3 read rate before the first measured read
READ_EWMA_ALPHA = 0.25     # weight of the newest read in the rate


class LoadRule:
    """Load from G3 or recompute: the decision and its inputs."""

    def __init__(self, block_bytes: int, page_size: int, prefill_tokens_per_s: float) -> None:
        self.block_bytes = block_bytes
        self.page_size = page_size
        self.prefill_tokens_per_s = float(prefill_tokens_per_s)
        self.read_bytes_per_s = DEFAULT_READ_BPS
        self.measured_reads = 0
        self.offered = 0
        self.declined = 0

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        rate = nbytes / seconds
        if self.measured_reads == 0:
            self.read_bytes_per_s = rate
        else:
            self.read_bytes_per_s += READ_EWMA_ALPHA * (rate - self.read_bytes_per_s)
        self.measured_reads += 1

    def load_s(self, blocks: int) -> float:
        return blocks * self.block_bytes / self.read_bytes_per_s

    def recompute_s(self, blocks: int) -> float:
        return blocks * self.page_size / self.prefill_tokens_per_s

    def offers(self, blocks: int, count: bool = True) -> bool:
        """True when `blocks` blocks are expected to load from G3 faster than they recompute."""
        if blocks <= 0:
            return False
        ok = self.load_s(blocks) < self.recompute_s(blocks)
        if count:
            if ok:
                self.offered += 1
            else:
                self.declined += 1
        return ok

    def describe(self) -> dict:
        return {"read_bytes_per_s": round(self.read_bytes_per_s), "measured_reads": self.measured_reads,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "block_bytes": self.block_bytes,
                "page_size": self.page_size, "load_s_per_block": self.load_s(1),
                "recompute_s_per_block": self.recompute_s(1), "offers": self.offers(1, count=False),
                "offered": self.offered, "declined": self.declined}


class PeerIndex:
    """Blocks of other instances sharing the disk directory, as their journals name them."""

    def __init__(self) -> None:
        self.names: list[str] = []                 # owner i + 1 on the wire = names[i]; append-only
        self.snapshots: dict[str, tuple[list[int], np.ndarray, np.ndarray, np.ndarray]] = {}
        self.skipped: dict[str, str] = {}          # peers of another model or layout, and why
        self._hashes = np.empty(0, np.uint64)      # merged, sorted by hash
        self._owner = np.empty(0, np.uint32)
        self._slots = np.empty(0, np.int64)
        self._sums = np.empty(0, np.uint64)

    @property
    def versions(self) -> dict[str, list[int]]:
        return {name: snap[0] for name, snap in self.snapshots.items()}

    def __len__(self) -> int:
        return int(self._hashes.shape[0])

    def update(self, fresh: dict[str, tuple], present: list[str], skipped: dict[str, str]) -> None:
        """fresh: instance -> (version, hashes, slots, sums) re-read; present: every instance with a
        journal now (the others are gone)."""
        for name in [n for n in self.snapshots if n not in present]:
            del self.snapshots[name]
        self.snapshots.update(fresh)
        self.skipped = dict(skipped)
        for name in self.snapshots:
            if name not in self.names:
                self.names.append(name)
        self._merge()

    def _merge(self) -> None:
        parts = [(self.names.index(name) + 1, snap) for name, snap in self.snapshots.items()]
        if not parts:
            self._hashes, self._owner = np.empty(0, np.uint64), np.empty(0, np.uint32)
            self._slots, self._sums = np.empty(0, np.int64), np.empty(0, np.uint64)
            return
        hashes = np.concatenate([snap[1] for _, snap in parts])
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._owner = np.concatenate([np.full(len(snap[1]), who, np.uint32) for who, snap in parts])[order]
        self._slots = np.concatenate([snap[2] for _, snap in parts])[order]
        self._sums = np.concatenate([snap[3] for _, snap in parts])[order]

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """Index into the merged arrays of each hash, -1 where no peer holds it."""
        if len(self) == 0:
            return np.full(len(hashes), -1, np.int64)
        pos = np.searchsorted(self._hashes, hashes)
        pos = np.minimum(pos, len(self) - 1)
        return np.where(self._hashes[pos] == hashes, pos, -1).astype(np.int64)

    def entries(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(owner, slot, checksum) of merged entries."""
        return self._owner[idx], self._slots[idx], self._sums[idx]

    def remove(self, hashes: np.ndarray) -> int:
        """Forgets entries whose read failed (until that peer's journal changes)."""
        idx = self.find(np.asarray(hashes, np.uint64))
        idx = idx[idx >= 0]
        if idx.size == 0:
            return 0
        keep = np.ones(len(self), bool)
        keep[idx] = False
        self._hashes, self._owner = self._hashes[keep], self._owner[keep]
        self._slots, self._sums = self._slots[keep], self._sums[keep]
        return int(idx.size)
