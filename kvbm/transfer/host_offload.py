"""Host offload: offload(device_blocks, hashes) G1->G2 and onboard(hashes, device_blocks) G2->G1
over a host pool with the registry API (lookup/allocate/complete/register/release/match), through a
TransferManager; each returns a TransferFuture.

Offload order: lookup (hashes already held move nothing) -> allocate host blocks -> D2H ->
on success complete + register (dedup) + release (inactive, matchable); on failure release the
host blocks unregistered (freed), except when the failure says a copy may still write them
(Outcome.may_still_be_written: hard deadline, kvbm-workers stopped without reporting the worker
dead): those stay allocated and unregistered for good (leaked_host_blocks, a logged warning), the
safe choice over a free list a late write could corrupt. A block is registered in G2 only after its
bytes are there.
Onboard order: match the longest held prefix (acquiring the host blocks, so eviction cannot take
them mid-copy) -> H2D layer by layer -> release the host blocks whatever the outcome (a late read
of a reused host block cannot hurt it; the device blocks of a failure with
TransferError.blocks_may_be_written are the engine's to quarantine).
The pool lock is never held while waiting for in-flight budget (finalize runs on the I/O thread and
takes it).
With a disk tier, `disk` (kvbm.transfer.disk_offload.DiskTransfers) is told, under the pool lock,
after each G2 allocation (its victim cleaner keeps free G2 blocks ahead of need) and after each G2
registration (write-through admission).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from kvbm.errors import LayoutError
from kvbm.pools import only_int, only_u64
from kvbm.transfer.futures import TransferFuture, TransferResult
from kvbm.transfer.manager import TransferManager
from kvbm.transfer.records import Outcome
from kvbm.transfer.scheduler import Gate
from kvbm.wire import protocol as P

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OffloadResult:
    requested: int    # hashes asked for (after removing repeats)
    moved: int        # blocks copied into G2 and registered
    held: int         # hashes G2 already held (or another offload is moving): nothing copied
    dropped: int      # blocks that found no room in G2 (out of capacity is an outcome, not an error)
    bytes: int


@dataclass(frozen=True, slots=True)
class OnboardResult:
    requested: int    # hashes asked for
    loaded: int       # leading blocks copied into the device blocks (the rest: recompute)
    bytes: int
    from_host: int = -1   # of those, from G2 (-1: all of them, a G2-only onboard)
    from_disk: int = 0    # of those, from G3 (read into G2 staging blocks, then H2D)
    read_path: str = ""   # how the G3 part was read: "staged" (GDS direct reads: not in this version)


@dataclass(slots=True)
class _Claim:
    """What an offload found and took under the pool lock, for its submit and its finalize."""

    requested: int              # hashes asked for (after removing repeats)
    held: int
    dropped: int
    device_blocks: Any          # to copy from (None: nothing to copy)
    host: Any                   # host blocks allocated for them, claimed in _offloading
    hashes: Any                 # their sequence hashes (u64 array)
    parents: Any                # their parents' hashes (u64 array) or None
    hashes_claimed: Any         # the same hashes as ints (in _offloading until finalize)

    @property
    def moving(self) -> int:
        return 0 if self.host is None else len(self.host)


def _one_block(device_blocks, hashes, parents) -> tuple[int, int, int | None] | None:
    """(device block, hash, parent) of a one-block offload (what engines issue most), else None:
    _claim's numpy conversions and checks then apply."""
    d, h = only_int(device_blocks), only_u64(hashes)
    if d is None or h is None:
        return None
    if parents is None:
        return d, h, None
    p = only_u64(parents)
    return None if p is None else (d, h, p)


def _done_future(path: P.Path, value: Any, num_layers: int) -> TransferFuture:
    fut = TransferFuture(path, 0, num_layers)
    fut._advance(num_layers)
    fut.set_result(TransferResult(path, 0, 0, 0.0, value))
    return fut


class HostTransfers:
    """offload / onboard between the engine's device blocks and a host pool, through a TransferManager."""

    def __init__(self, tm: TransferManager, host_pool: Any, lock: threading.RLock | None = None) -> None:
        self.tm = tm
        self.pool = host_pool
        self.lock = lock or threading.RLock()
        # Hashes whose offload is in flight: a second offload of one copies nothing (counted as held).
        self._offloading: set[int] = set()
        # Host blocks of offloads failed while a copy into them may still run: never freed.
        self.leaked_host_blocks = 0
        self.disk = None   # DiskTransfers, when there is a disk tier

    def _capacity(self) -> int:
        reg = getattr(self.pool, "registry", self.pool)  # a BlockPool, or a bare registry
        free = getattr(reg, "num_free", None)
        inactive = getattr(reg, "num_inactive", None)
        free = free() if callable(free) else free
        inactive = inactive() if callable(inactive) else inactive
        return int(free or 0) + int(inactive or 0)

    def offload(self, device_blocks, hashes, *, parents=None, priority: int = 0, gate: Gate | None = None,
                block: bool = True, timeout: float | None = None) -> TransferFuture:
        one = _one_block(device_blocks, hashes, parents)
        claim = self._claim_one(*one) if one is not None else self._claim(device_blocks, hashes, parents)
        if claim.moving == 0:
            return _done_future(P.Path.D2H, OffloadResult(claim.requested, 0, claim.held, claim.dropped, 0),
                                self.tm.num_layers)
        try:
            return self.tm.submit(P.Path.D2H, claim.device_blocks, claim.host, priority=priority, gate=gate,
                                  block=block, timeout=timeout, finalize=partial(self._offloaded, claim))
        except BaseException:
            with self.lock:
                self._offloading.difference_update(claim.hashes_claimed)
                self.pool.release(claim.host)
            raise

    def _claim(self, device_blocks, hashes, parents) -> _Claim:
        """Under the pool lock: which hashes G2 holds (or another offload is moving), and host blocks
        allocated for the rest (as many as fit), claimed in _offloading."""
        device_blocks = np.asarray(device_blocks, dtype=np.int64).reshape(-1)
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        if device_blocks.shape != hashes.shape:
            raise LayoutError(f"offload: {device_blocks.shape[0]} device blocks but {hashes.shape[0]} hashes")
        if parents is not None:
            parents = np.asarray(parents, dtype=np.uint64).reshape(-1)
            if parents.shape != hashes.shape:
                raise LayoutError(f"offload: {parents.shape[0]} parents for {hashes.shape[0]} hashes")
        if hashes.shape[0] > 1:   # one hash is unique: np.unique is most of a 1-block offload's numpy
            _, first = np.unique(hashes, return_index=True)
            first.sort()
            device_blocks, hashes = device_blocks[first], hashes[first]
            if parents is not None:
                parents = parents[first]
        with self.lock:
            in_flight = np.zeros(len(hashes), bool)
            if self._offloading:
                in_flight = np.fromiter((int(h) in self._offloading for h in hashes.tolist()), bool, len(hashes))
            held_mask = (np.asarray(self.pool.lookup(hashes)) >= 0) | in_flight
            todo = np.flatnonzero(~held_mask)
            want = int(todo.shape[0])
            host = self.pool.allocate(want) if want else np.empty(0, np.int64)
            if host is None:
                fit = min(want, self._capacity())
                host = self.pool.allocate(fit) if fit else np.empty(0, np.int64)
                if host is None:
                    host = np.empty(0, np.int64)
            host = np.asarray(host, dtype=np.int64)
            if self.disk is not None:
                self.disk.host_allocated()
            n = int(host.shape[0])
            todo = todo[:n]
            claimed = [int(h) for h in hashes[todo].tolist()]
            self._offloading.update(claimed)
            # Making room may have evicted blocks counted as held a moment ago: they are neither
            # held nor copied now, so they are reported as dropped, never as held.
            lost = 0
            if held_mask.any():
                still_held = (np.asarray(self.pool.lookup(hashes)) >= 0) | in_flight
                lost = int((held_mask & ~still_held).sum())
        return _Claim(int(hashes.shape[0]), int(held_mask.sum()) - lost, want - n + lost, device_blocks[todo], host,
                      hashes[todo], parents[todo] if parents is not None else None, claimed)

    def _claim_one(self, device_block: int, key: int, parent: int | None) -> _Claim:
        """_claim of one block, in plain ints where _claim's numpy would cost most of the call (the
        registry still takes arrays: one of one element each)."""
        hashes = np.array((key,), np.uint64)
        with self.lock:
            held = key in self._offloading or self.pool.lookup(hashes)[0] >= 0
            host = None if held else self.pool.allocate(1)
            if self.disk is not None:
                self.disk.host_allocated()   # as _claim: after every offload's allocation, or its attempt
            if host is None:
                return _Claim(1, int(held), int(not held), None, None, None, None, ())
            self._offloading.add(key)
        parents = np.array((parent,), np.uint64) if parent is not None else None
        return _Claim(1, 0, 0, (device_block,), host, hashes, parents, (key,))

    def _offloaded(self, claim: _Claim, outcome: Outcome) -> OffloadResult | None:
        """An offload's finalize (the I/O thread): its host blocks registered, or given back."""
        host, n = claim.host, claim.moving
        with self.lock:
            self._offloading.difference_update(claim.hashes_claimed)
            if not outcome.ok:
                if outcome.may_still_be_written:
                    # A copy may still land in these host blocks: on the free list the next
                    # offload could register them and a late write would corrupt that data.
                    # They stay allocated and unregistered (never matched, never handed out):
                    # leaked, with a warning, rather than reused unsafely.
                    self.leaked_host_blocks += n
                    logger.warning("offload failed while its copy may still run; leaving %d host blocks "
                                   "allocated (leaked, %d in all): %s", n, self.leaked_host_blocks, outcome.error)
                    return None
                self.pool.release(host)   # never registered: back to the free list
                return None
            try:
                self.pool.complete(host)
                canonical = self.pool.register(host, claim.hashes, claim.parents) if claim.parents is not None \
                    else self.pool.register(host, claim.hashes)
            except BaseException:
                # Not registered: hand them back (else they stay allocated, refcount 1, for
                # good); the error fails the submission through the manager.
                self.pool.release(host)
                raise
            if self.disk is not None:
                self.disk.host_registered(claim.hashes)
            self.pool.release(canonical)  # inactive and matchable; duplicates were freed by register
        return OffloadResult(claim.requested, n, claim.held, claim.dropped, n * self.tm.block_bytes)

    def onboard(self, hashes, device_blocks, *, priority: int = 1, gate: Gate | None = None, layers: bool = True,
                block: bool = True, timeout: float | None = None) -> TransferFuture:
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        device_blocks = np.asarray(device_blocks, dtype=np.int64).reshape(-1)
        if device_blocks.shape[0] < hashes.shape[0]:
            raise LayoutError(f"onboard: {hashes.shape[0]} hashes but only {device_blocks.shape[0]} device blocks")
        requested = int(hashes.shape[0])
        with self.lock:
            host = np.asarray(self.pool.match(hashes, acquire=True), dtype=np.int64)
        k = int(host.shape[0])
        if k == 0:
            return _done_future(P.Path.H2D, OnboardResult(requested, 0, 0), self.tm.num_layers)
        bytes_per_block = self.tm.block_bytes

        def finalize(outcome: Outcome):
            with self.lock:
                self.pool.release(host)
            return OnboardResult(requested, k, k * bytes_per_block) if outcome.ok else None

        try:
            return self.tm.submit(P.Path.H2D, host, device_blocks[:k], priority=priority, gate=gate,
                                  layers=layers, block=block, timeout=timeout, finalize=finalize)
        except BaseException:
            with self.lock:
                self.pool.release(host)
            raise
