"""The disk tier (G3) on the engine side: which blocks G3 holds, Host -> Disk admission, and onboards
that read from disk, over the G2 and G3 pools through a TransferManager. Runs in the engine's process.

Parts:
  LoadRule, PeerIndex   (disk_index.py) load or recompute; other instances' blocks in a shared disk_path
  DiskTransfers the G3 pool's registry is this instance's slot table (block id = slot, the tier's own
                eviction policy); a numpy array keeps each slot's checksum. With several engines
                on the instance (the shared G2) both are the shared G3's (kvbm.shared_g3): every
                engine writes and reads the one store through one table.

Order of things:
  start    `sync(timeout)` asks the disk worker for the entries of its store (rebuilt from its
           journal: a warm restart) and of its peers; the G3 registry is rebuilt from them once
           (slot = block id; a shared G3 once per life of its namespace, by its first engine, and
           nobody writes to it before). Peers are asked again at most every PEER_REFRESH_S (from `match`),
           or at once with `refresh(timeout)`.
  admission (disk_admission):
           victim        G2's victim cache. A cleaner keeps `reserve` G2 blocks free ahead of need:
                         after each G2 allocation it takes the next victims in eviction order
                         (take_victims hands them over with their hashes), writes those G3 does
                         not hold to G3 (H2DISK) and frees the blocks once written. Victims an
                         allocation evicts before the cleaner reached them are counted as lost
                         (with a private G2; a shared G2's evictions are not drained). Every engine
                         of a shared G2 runs its own cleaner: up to one reserve each in flight.
           write-through every block newly registered in G2 is written to G3 (held in G2 until written).
           A write: G3 slots allocated (evicting in G3's policy order), H2DISK with the sequence
           hashes, then per block: OK -> registered in G3 with its checksum; FAILED (ENOSPC,
           EIO, a worker death) -> slot freed, the block stays in G2 (a victim is registered in G2
           again: its bytes are still in its block). After a write refused for space the cleaner
           rests NO_SPACE_BACKOFF_S.
  onboard  the longest prefix across tiers: G2's prefix, then the run after it that G3 holds
           (own slots or a peer's), if LoadRule offers it. One CompositeFuture: the G2 part is H2D
           at once; the G3 part is read in chunks (chunk_blocks each, evenly split), each a DISK2H
           into G2 staging blocks (checksums verified by the worker) that is never coalesced with
           another, all submitted at once: the disk worker reads them back to back, and each
           chunk's H2D is submitted as soon as its read has landed, so the copy of one chunk
           overlaps the read of the next (layer progress is the least over the H2D parts, none
           until every chunk's H2D is submitted). Any block not read intact fails the whole
           onboard (never reported as loaded, even when the chunks before it were copied): own
           blocks are dropped from G3, peer blocks from the PeerIndex, and counted (one failed
           load); chunks whose reads land after a failure are not copied to the device. The
           onboard resolves only once every chunk has settled. A chunk read intact is registered
           in G2 (its staging blocks become G2 blocks), so the next hit is a G2 one.
  stage    (no device: the vLLM connector's scheduler side, `host` None) the G3 run of the given
           hashes read into G2 staging blocks and registered in G2 there, handed to the caller
           acquired; its workers then copy G2 to the device. A read not intact fails as onboard's.
           `stored_log`, when a list, collects the hashes each write put in G3 (for KV events).
The pool lock (kv.lock) guards every registry call; it is never held while waiting for budget
(submissions made under it never wait: block=False, or chained parts with charge=False).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvbm.errors import (
    BackpressureError,
    KvbmTimeoutError,
    LayoutError,
    LifecycleError,
    ProtocolError,
    RegistryError,
    TransferError,
)
from kvbm.metrics import DiskMetrics
from kvbm.pools import BlockPool
from kvbm.transfer.disk_index import LoadRule, PeerIndex
from kvbm.transfer.futures import CompositeFuture, TransferFuture, TransferResult
from kvbm.transfer.host_offload import HostTransfers, OnboardResult
from kvbm.transfer.manager import TransferManager
from kvbm.transfer.records import Outcome
from kvbm.transfer.scheduler import Gate
from kvbm.wire import protocol as P

logger = logging.getLogger(__name__)

PEER_REFRESH_S = 2.0       # other instances' journals are asked for at most this often (from match)
NO_SPACE_BACKOFF_S = 5.0   # after a write refused for space (ENOSPC, EDQUOT, EFBIG), the cleaner rests this long
BUILD_WAIT_S = 30.0        # a shared G3's next engine waits this long for the first one's rebuild
WRITE_PRIORITY = -1        # disk writes give way to everything an engine waits for


@dataclass(slots=True)
class DiskCounters:
    written: int = 0            # blocks registered in G3 after their write
    write_failed: int = 0       # blocks whose write failed (they stay in G2)
    write_skipped: int = 0      # admitted blocks not written: no G3 slot free, or the in-flight budget was full
    no_space: int = 0           # writes the disk refused for space (the cleaner then rests a while)
    victims_lost: int = 0       # G2 victims evicted before the cleaner got to them
    loads: int = 0              # onboards with a G3 part that loaded
    loads_failed: int = 0       # onboards with a G3 part that failed (the engine recomputes)
    loaded: int = 0             # blocks onboarded from G3
    loaded_peer: int = 0        # of those, from another instance's files
    dropped_corrupt: int = 0    # own G3 blocks dropped after a checksum mismatch
    dropped_failed: int = 0     # own G3 blocks dropped after a failed read (I/O error, truncated file)
    peer_forgotten: int = 0     # peer entries forgotten after a failed or corrupt read
    promoted: int = 0           # loaded G3 blocks registered in G2 from their staging blocks


@dataclass(slots=True)
class _Chunk:
    """One chunk [lo, hi) of a G3 onboard's run: its hashes, G3 blocks held (-1: a peer's), owners,
    G2 staging blocks and device blocks."""
    lo: int
    hi: int
    g3h: np.ndarray
    own_ids: np.ndarray
    owner: np.ndarray
    staging: np.ndarray
    dst: np.ndarray


class _G3Load:
    """One G3 onboard's chunks as their reads settle (on the I/O thread, or a submitter's)."""

    def __init__(self, chunks: int) -> None:
        self._lock = threading.Lock()
        self._left = chunks
        self.failed = False
        self.blocks = 0          # blocks of the reads that landed
        self.peer_blocks = 0
        self.read_path = ""

    def fail(self) -> bool:
        """Marks the onboard failed; True the first time (one failed load is counted)."""
        with self._lock:
            first, self.failed = not self.failed, True
            return first

    def landed(self, blocks: int, peer_blocks: int) -> bool:
        """A chunk's read landed; True once every chunk's has and none failed."""
        with self._lock:
            self.blocks += blocks
            self.peer_blocks += peer_blocks
            self._left -= 1
            return self._left == 0 and not self.failed


def _settled_part(error: str | None = None) -> TransferFuture:
    """A part of a G3 onboard that will not run, settled: failed with `error`, or empty."""
    fut = TransferFuture(P.Path.DISK2D, 0, 0)
    if error is None:
        fut.set_result(TransferResult(P.Path.DISK2D, 0, 0, 0.0))
    else:
        fut.set_exception(TransferError(error))
    return fut


class DiskTransfers:
    """G3 over a TransferManager: see the module docstring."""

    def __init__(self, tm: TransferManager, host: HostTransfers | None, host_pool: BlockPool, disk_pool: BlockPool,
                 lock: threading.RLock, *, page_size: int, admission: str, prefill_tokens_per_s: float,
                 max_batch_blocks: int, chunk_blocks: int = 0, shared=None) -> None:
        self.tm = tm
        self.host = host
        self.g2 = host_pool
        self.g3 = disk_pool
        self.lock = lock
        self.admission = admission
        self.max_batch = max(1, max_batch_blocks)
        # Blocks per chunk of an onboard's G3 run (0: one chunk); each chunk is its own DISK2H
        # request (at most one wire request), so its H2D can start while the next is read.
        self.chunk_blocks = min(chunk_blocks, self.max_batch) if chunk_blocks > 0 else self.max_batch
        self.rule = LoadRule(tm.block_bytes, page_size, prefill_tokens_per_s)
        self.peers = PeerIndex()
        # The shared G3 (kvbm.shared_g3.SharedG3) when other engines use this store too: its
        # checksums are every engine's, and its rebuild happens once.
        self.shared = shared
        self.sums = shared.sums if shared is not None else np.zeros(disk_pool.num_blocks, np.uint64)
        self.counters = DiskCounters()
        self.metrics = DiskMetrics(tm.metrics.registry)
        self.metrics.prefill_rate.set(self.rule.prefill_tokens_per_s)
        self.metrics.read_rate.set(self.rule.read_bytes_per_s)
        # G2 blocks the victim cleaner keeps free or being written: a few wire requests' worth, at
        # most 1/8 of G2 (what the cache gives up for never making an offload wait on a disk write).
        self.reserve = max(1, min(host_pool.num_blocks // 8, 4 * self.max_batch))
        self._cleaning = 0                  # G2 blocks being written by the cleaner
        self._writing: set[int] = set()     # hashes being written to G3 (a second write is not started)
        self._synced = False
        self._no_space_until = 0.0          # the cleaner rests until then after a disk-full write
        self._refresh_at = 0.0
        self._refreshing = 0.0              # when the peer refresh in flight was asked (0: none)
        self._read_paths: dict[str, int] = {}
        self.worker_info: dict = {}
        self.stored_log: list[np.ndarray] | None = None   # hashes newly written to G3, kept for events when a list
        if host is not None:      # None: metadata only (the vLLM connector's scheduler side): stage(), no onboard()
            host.disk = self

    # ---- entries: warm restart and peers ------------------------------------------------------
    def sync(self, timeout: float = 30.0) -> None:
        """Rebuilds G3 from the disk worker's store (once) and reads the peers' journals; waits."""
        if self.shared is not None and self.shared.built:
            self._synced = True          # another engine rebuilt the shared G3
        self._ask(own=not self._synced, timeout=timeout)

    def refresh(self, timeout: float = 30.0) -> None:
        """Re-reads the peers' journals that changed; waits."""
        self._ask(own=False, timeout=timeout)

    def maybe_refresh(self) -> None:
        """From match(): asks for the peers again when PEER_REFRESH_S has passed (no waiting)."""
        now = time.monotonic()
        if now < self._refresh_at or (self._refreshing and now - self._refreshing < 10 * PEER_REFRESH_S):
            return   # (a refresh unanswered that long went to a worker that died: ask again)
        self._refresh_at = now + PEER_REFRESH_S
        try:
            self._ask(own=False, timeout=None)
        except LifecycleError:
            pass

    def _ask(self, own: bool, timeout: float | None) -> None:
        done = threading.Event()
        got: dict[str, Any] = {"chunks": {}, "error": None}

        def on_reply(msg: dict) -> bool:
            if msg.get("last"):
                try:
                    self._apply(got["chunks"], msg, own)
                except Exception as err:  # noqa: BLE001 - reported to the waiter
                    got["error"] = f"{type(err).__name__}: {err}"
                    logger.error("disk tier: applying the disk worker's entries failed", exc_info=True)
                self._refreshing = 0.0
                done.set()
                return True
            try:
                inst = msg["instance"]
                n = len(msg["slots"]) // 8
                chunk = (P.unpack_field(msg, "hashes", n).copy(), P.unpack_blocks(msg["slots"], "slots", 2**62, n)
                         if n else np.empty(0, np.int64), P.unpack_field(msg, "sums", n).copy())
                got["chunks"].setdefault(inst, (msg.get("version"), []))[1].append(chunk)
            except (KeyError, TypeError, ProtocolError) as err:
                got["error"] = f"bad entries message: {err}"
            return False

        self._refreshing = time.monotonic()
        try:
            rid = self.tm.ask(P.Path.H2DISK, {"t": P.MsgType.ENTRIES, "own": own,
                                              "known": {} if own else self.peers.versions}, on_reply)
        except BaseException:
            self._refreshing = 0.0
            raise
        if timeout is None:
            return
        if not done.wait(timeout):
            self.tm.forget(rid)
            self._refreshing = 0.0
            raise KvbmTimeoutError(f"the disk worker did not list its G3 entries within {timeout} s")
        if got["error"]:
            raise TransferError(f"G3 entries: {got['error']}")

    def _apply(self, chunks: dict, last: dict, own: bool) -> None:
        if last.get("error"):
            raise TransferError(last["error"])
        fresh = {}
        for inst, (version, parts) in chunks.items():
            hashes = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.uint64)
            slots = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
            sums = np.concatenate([p[2] for p in parts]) if parts else np.empty(0, np.uint64)
            if inst == "":
                if own:
                    self._rebuild_once(hashes, slots, sums)
            else:
                fresh[inst] = (version, hashes, slots, sums)
        peers = last.get("peers") or []
        with self.lock:
            self.peers.update(fresh, [p for p in peers if isinstance(p, str)],
                              last.get("skipped") if isinstance(last.get("skipped"), dict) else {})
        for name, why in self.peers.skipped.items():
            logger.debug("disk tier: peer %s not read: %s", name, why)

    def _rebuild_once(self, hashes: np.ndarray, slots: np.ndarray, sums: np.ndarray) -> None:
        """The rebuild, by this engine alone, or for a shared G3 by the first of its engines (under
        its build lock; the others find it built). A builder that waits longer than BUILD_WAIT_S
        for another's lock goes on without: reads work on the table as it is, and no engine writes
        before it is built."""
        if self.shared is None:
            with self.lock:
                self._rebuild(hashes, slots, sums)
            return
        with self.shared.building(BUILD_WAIT_S) as todo:
            if todo:
                with self.lock:
                    self._rebuild(hashes, slots, sums)
            else:
                self._synced = True   # built by another engine (or still building: it will mark it)

    def _rebuild(self, hashes: np.ndarray, slots: np.ndarray, sums: np.ndarray) -> None:
        """G3's registry from the store's entries (a warm restart): block id = slot. Each entry
        whose slot is free in the table is registered there; the free slots that no entry names
        stay free. On a fresh table that is every entry; on a shared one that an engine left half
        rebuilt (it died: what it registered came from the store, its other holds were released
        when it was reaped) the rest. A failure gives back what this call held, so a retry (this
        engine's next sync, or the next engine's) starts again from the table as it is."""
        if self._synced:
            return
        reg = self.g3.registry
        n = reg.num_blocks
        if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= n):
            raise LayoutError(f"G3 rebuild: the store names slots up to {int(slots.max())}, G3 has {n}")
        free = int(reg.num_free)
        if free != n:
            logger.warning("G3: the slot table was half rebuilt (%d of %d slots in use); the store's entries "
                           "for its free slots are added", n - free, n)
        ids = reg.allocate(free) if free else np.empty(0, np.int64)    # the free slots, none evicted
        holding = ids
        try:
            ours = np.zeros(n, bool)
            ours[ids] = True
            take = ours[slots] if len(slots) else np.zeros(0, bool)
            found, rest = slots[take], ids[~np.isin(ids, slots[take])]
            if found.size:
                self.g3.complete(found)
                self.sums[found] = sums[take]      # before register: a shared G3's readers find it set
                canonical = self.g3.register(found, hashes[take])
                holding = np.concatenate([canonical, rest])
                self.g3.release(canonical)
            holding = rest
            if rest.size:
                reg.release(rest)
            holding = np.empty(0, np.int64)
        except BaseException:
            if holding.size:
                try:
                    reg.release(holding)
                except Exception:   # noqa: BLE001 - the first error is the one to report
                    logger.error("G3 rebuild: giving back %d slots failed", holding.size, exc_info=True)
            raise
        self._synced = True
        if found.size:
            logger.info("G3: %d blocks found on disk (warm restart)", int(found.size))

    # ---- what G3 holds ----------------------------------------------------------------------
    def held(self, hashes: np.ndarray) -> np.ndarray:
        """bool per hash: this instance's G3 or a peer's holds it (call under the lock)."""
        return (self.g3.lookup(hashes) >= 0) | (self.peers.find(hashes) >= 0)

    def prefix(self, hashes: np.ndarray) -> int:
        h = self.held(hashes)
        return int(h.shape[0]) if h.all() else int(np.argmin(h))

    def plan(self, hashes: np.ndarray, count: bool = False) -> tuple[int, int, bool]:
        """(G2 prefix, G3 run after it, offered): what onboard would load (call under the lock)."""
        k2 = len(self.g2.registry.match(hashes, False))
        k3 = self.prefix(hashes[k2:])
        offered = self.rule.offers(k3, count) if k3 else False
        if count and k3:
            self.metrics.decisions.labels("load" if offered else "recompute").inc()
        return k2, k3, offered

    # ---- admission ------------------------------------------------------------------------------
    def host_allocated(self) -> None:
        """After a G2 allocation (under the lock): the victim cleaner's turn."""
        if self.admission == "victim":
            self._clean()

    def host_registered(self, hashes: np.ndarray) -> None:
        """After blocks were registered in G2 (under the lock, still held by the registrant)."""
        if self.admission != "write-through":
            return
        hashes = np.asarray(hashes, np.uint64)
        todo = hashes[self._admissible(hashes)]
        if todo.size and time.monotonic() < self._no_space_until:
            self.counters.write_skipped += int(todo.size)   # the disk was full a moment ago
        elif todo.size:
            blocks = self.g2.match(todo, acquire=True)   # every one was just registered: all of them
            self._write(blocks, todo[:len(blocks)], victims=False)

    def _admissible(self, hashes: np.ndarray) -> np.ndarray:
        mask = self.g3.lookup(hashes) < 0
        if self._writing:
            mask &= np.fromiter((h not in self._writing for h in hashes.tolist()), bool, len(hashes))
        return mask

    def _clean(self) -> None:
        reg = self.g2.registry
        # The eviction ring says which victims an allocation took before the cleaner did, while
        # this engine is the only one allocating: a private G2, or a shared one it is alone in
        # (with others, their cleaners' victims are in it too; then nobody counts lost victims).
        drains = not self.g2.shared or reg.namespace_engines == 1
        if drains:
            try:
                lost = reg.drain_evicted()    # evicted by an allocation before the cleaner got to them
            except RegistryError:             # a shared G2's ring drained by an engine that has left
                drains, lost = False, None
            if lost is not None and lost.size:
                n = int((self.g3.lookup(lost) < 0).sum())
                self.counters.victims_lost += n
                self.metrics.victims_lost.inc(n)
        if time.monotonic() < self._no_space_until or not self._may_write():
            return
        free = int(reg.num_free)
        # Every engine of a shared G2 cleans for itself: each keeps its share of the reserve in
        # flight, so that together they hold no more of G2 than one engine would.
        reserve = self.reserve if not self.g2.shared else max(1, self.reserve // max(1, reg.namespace_engines))
        want = min(reserve - free - self._cleaning, int(reg.num_inactive), self.max_batch)
        if want < max(1, reserve // 4) and not (want > 0 and free == 0):
            return                        # batch the writes, unless G2 has nothing free at all
        vblocks, victims = self.g2.take_victims(want)
        if drains:
            reg.drain_evicted()           # the victims' own entries
        if not vblocks.shape[0]:
            return
        admit = self._admissible(victims)
        if (~admit).any():
            self.g2.release(vblocks[~admit])   # G3 holds them already
        if admit.any():
            self._write(vblocks[admit], victims[admit], victims=True)

    def _may_write(self) -> bool:
        """A shared G3 takes writes only once rebuilt from the store (kvbm.shared_g3)."""
        return self.shared is None or self.shared.built

    def _write(self, g2_blocks: np.ndarray, hashes: np.ndarray, victims: bool) -> None:
        """H2DISK of G2 blocks the caller holds (victims: PARTIAL blocks holding evicted bytes;
        write-through: registered blocks it acquired); they are released once written."""
        n = int(hashes.shape[0])
        reg = self.g3.registry
        fit = min(n, int(reg.num_free) + int(reg.num_inactive)) if self._may_write() else 0
        slots = self.g3.allocate(fit) if fit else None
        if slots is None or fit < n:
            self.counters.write_skipped += n - (fit if slots is not None else 0)
            cut = fit if slots is not None else 0
            self._give_back(g2_blocks[cut:], hashes[cut:], victims)
            g2_blocks, hashes = g2_blocks[:cut], hashes[:cut]
            n = cut
            if n == 0:
                return
        keys = hashes.tolist()
        self._writing.update(keys)
        if victims:
            self._cleaning += n

        def finalize(outcome: Outcome):
            with self.lock:
                self._writing.difference_update(keys)
                if victims:
                    self._cleaning -= n
                detail = outcome.detail or {}
                state = detail.get("state")
                ok = np.zeros(n, bool) if not outcome.ok or state is None else state == P.BlockState.OK
                if outcome.may_still_be_written:
                    ok[:] = False   # a write of unknown fate: its slots hold nothing we vouch for
                # Not on disk: a victim goes back into G2 (a write only reads its source block, so
                # its bytes are intact whatever became of the write).
                self._give_back(g2_blocks[~ok], hashes[~ok], victims)
                self.g2.release(g2_blocks[ok])
                if detail.get("no_space"):
                    self._no_space_until = time.monotonic() + NO_SPACE_BACKOFF_S
                    self.counters.no_space += 1
                done = slots[ok]
                if done.size:
                    self.g3.complete(done)
                    self.sums[done] = detail["sums"][ok]   # before register: see kvbm.shared_g3
                    canonical = self.g3.register(done, hashes[ok])
                    self.g3.release(canonical)
                    if self.stored_log is not None:
                        self.stored_log.append(hashes[ok])
                if (~ok).any():
                    self.g3.release(slots[~ok])
                    self.counters.write_failed += int((~ok).sum())
                    self.metrics.write_failed.inc(int((~ok).sum()))
                self.counters.written += int(done.size)
                self.metrics.written.inc(int(done.size))
                if self.admission == "victim":
                    self._clean()
            if (~ok).any():
                logger.warning("disk tier: %d of %d blocks not written to G3 (they stay in G2): %s",
                               int((~ok).sum()), n, outcome.error or detail.get("error") or "see the disk worker")
            return int(done.size)

        try:
            self.tm.submit(P.Path.H2DISK, g2_blocks, slots, priority=WRITE_PRIORITY, block=False,
                           finalize=finalize, extra={"hashes": hashes})
        except (BackpressureError, TransferError, LifecycleError, LayoutError) as err:
            self._writing.difference_update(keys)
            if victims:
                self._cleaning -= n
            self._give_back(g2_blocks, hashes, victims)
            self.g3.release(slots)
            self.counters.write_skipped += n
            logger.debug("disk tier: %d blocks not written: %s", n, err)

    def _give_back(self, g2_blocks: np.ndarray, hashes: np.ndarray, victims: bool) -> None:
        """G2 blocks a write held and did not put on disk: victims are registered in G2 again (their
        bytes never left), write-through blocks (registered already) just released."""
        if not g2_blocks.size:
            return
        if victims:
            self.g2.complete(g2_blocks)
            g2_blocks = self.g2.register(g2_blocks, hashes)
        self.g2.release(g2_blocks)

    # ---- onboard ------------------------------------------------------------------------------
    def onboard(self, hashes, device_blocks, *, priority: int = 1, gate: Gate | None = None, layers: bool = True,
                block: bool = True, timeout: float | None = None) -> TransferFuture:
        """The longest prefix across G2 and G3 (see the module docstring), as one future."""
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        device_blocks = np.asarray(device_blocks, dtype=np.int64).reshape(-1)
        if device_blocks.shape[0] < hashes.shape[0]:
            raise LayoutError(f"onboard: {hashes.shape[0]} hashes but only {device_blocks.shape[0]} device blocks")
        requested = int(hashes.shape[0])
        if self.host is None:
            raise LifecycleError("onboard: this disk tier has no host transfers (a metadata-only engine stages "
                                 "G3 into G2 with stage(); its workers copy G2 to the device)")
        with self.lock:
            _, k3, offered = self.plan(hashes, count=True)
            if not offered:
                k3 = 0
            if k3:
                parts = self._acquire(hashes, k3)
                if not parts[1].shape[0]:   # no G2 block free for staging: the G2 prefix alone
                    self.g2.release(parts[0])
                    k3 = 0
        if not k3:
            return self.host.onboard(hashes, device_blocks, priority=priority, gate=gate, layers=layers,
                                     block=block, timeout=timeout)
        host_prefix, g3h, own_ids, owner, slots, sums, staging = parts
        k2, k3 = int(host_prefix.shape[0]), int(g3h.shape[0])
        bpb = self.tm.block_bytes
        chunks = self.chunks(k3)
        load = _G3Load(len(chunks))

        def finish(_results: list[TransferResult]) -> OnboardResult:
            return OnboardResult(requested, k2 + k3, (k2 + k3) * bpb, k2, k3, load.read_path)

        # Parts: the G2 prefix's H2D, then per chunk its read and its H2D (or a stand-in, see _chunk_read_done).
        comp = CompositeFuture(P.Path.DISK2D, k2 + k3, self.tm.num_layers, parts=2 * len(chunks) + (k2 > 0),
                               layer_parts=len(chunks) + (k2 > 0), finish=finish)
        if k2:
            def host_done(_outcome: Outcome):
                with self.lock:
                    self.g2.release(host_prefix)
                return None

            try:
                f2 = self.tm.submit(P.Path.H2D, host_prefix, device_blocks[:k2], priority=priority, gate=gate,
                                    layers=layers, block=block, timeout=timeout, finalize=host_done)
            except BaseException:
                with self.lock:
                    self.g2.release(host_prefix)
                    self._unwind(own_ids, staging)
                raise
            comp.attach(f2, layers=True)
        dst = device_blocks[k2:k2 + k3]
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, (lo, hi) in enumerate(chunks):
            part = _Chunk(lo, hi, g3h[lo:hi], own_ids[lo:hi], owner[lo:hi], staging[lo:hi], dst[lo:hi])
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                fr = self.tm.submit(P.Path.DISK2H, slots[lo:hi], part.staging, priority=priority, block=block,
                                    timeout=left, alone=len(chunks) > 1,
                                    finalize=lambda outcome, part=part: self._chunk_read_done(
                                        outcome, part, load, comp, priority=priority, gate=gate, layers=layers),
                                    extra={"sums": sums[lo:hi], "owner": part.owner},
                                    meta={"peers": list(self.peers.names)})
            except BaseException as err:
                with self.lock:
                    self._unwind(own_ids[lo:], staging[lo:])
                if i == 0:
                    comp.close()
                    raise
                # Chunks before this one are in flight: the onboard fails once they have settled.
                if load.fail():
                    self._count_failed_load()
                logger.error("G3 load: chunk %d of %d (%d blocks) not submitted: %s; the onboard fails",
                             i + 1, len(chunks), k3 - lo, err)
                comp.attach(_settled_part(f"G3 load: chunk {i + 1} of {len(chunks)} not submitted: "
                                          f"{type(err).__name__}: {err}"), layers=False)
                for _ in range(2 * (len(chunks) - i) - 1):
                    comp.attach(_settled_part(), layers=False)
                break
            comp.attach(fr, layers=False)
        return comp

    def chunks(self, k3: int) -> list[tuple[int, int]]:
        """[lo, hi) of each chunk of a G3 run of k3 blocks: about chunk_blocks each, evenly split."""
        n = max(1, -(-k3 // self.chunk_blocks))
        cuts = [k3 * i // n for i in range(n + 1)]
        return list(zip(cuts[:-1], cuts[1:]))

    def _chunk_read_done(self, outcome: Outcome, part: _Chunk, load: _G3Load, comp: CompositeFuture, *,
                         priority: int, gate: Gate | None, layers: bool) -> None:
        """A chunk's read settled (finalize of its DISK2H): its H2D starts now, while later chunks
        are still read. Attaches exactly one more part to `comp` (the H2D, or a stand-in), so the
        onboard resolves once every chunk has settled, however they end (a bug here included)."""
        attached: list[bool] = []

        def attach(fut: TransferFuture, layered: bool) -> None:
            comp.attach(fut, layers=layered)
            attached.append(True)

        try:
            self._chunk_landed(outcome, part, load, attach, priority=priority, gate=gate, layers=layers)
        except Exception as err:  # noqa: BLE001 - the onboard must still resolve
            logger.error("G3 load: handling a chunk's read failed", exc_info=True)
            if load.fail():
                self._count_failed_load()
            if not attached:
                attach(_settled_part(f"G3 load: {type(err).__name__}: {err}"), False)

    def _chunk_landed(self, outcome: Outcome, part: _Chunk, load: _G3Load, attach, *,
                      priority: int, gate: Gate | None, layers: bool) -> None:
        detail = outcome.detail or {}
        n = part.hi - part.lo
        if not outcome.ok:
            first = load.fail()
            self._read_failed(detail.get("state"), part.g3h, part.own_ids, part.owner, part.staging, count=first)
            attach(_settled_part(), False)   # its H2D never runs; the failed read fails the onboard
            return None
        load.read_path = detail.get("read_path") or "staged"
        self.rule.observe(int(detail.get("bytes") or 0), int(detail.get("copy_us") or 0) / 1e6)
        self.metrics.read_rate.set(self.rule.read_bytes_per_s)
        if load.failed:
            # Another chunk failed: the onboard fails, so nothing more is copied into the engine's
            # blocks. The bytes read are verified: they still become G2 blocks.
            self._staged_done(Outcome(True), part)
            attach(_settled_part(), False)
            return None
        try:
            f3 = self.tm.submit(P.Path.H2D, part.staging, part.dst, priority=priority, gate=gate, layers=layers,
                                charge=False, finalize=lambda outcome: self._staged_done(outcome, part))
        except BaseException as err:  # noqa: BLE001 - fails the onboard through its future
            self._staged_done(Outcome(False, str(err)), part)
            if load.fail():
                self._count_failed_load()
            attach(_settled_part(f"G3 load: H2D of {n} staged blocks not submitted: "
                                 f"{type(err).__name__}: {err}"), False)
            return None
        attach(f3, True)
        if load.landed(n, int((part.owner > 0).sum())):
            with self.lock:
                self.counters.loads += 1
                self.counters.loaded += load.blocks
                self.counters.loaded_peer += load.peer_blocks
                self._read_paths[load.read_path] = self._read_paths.get(load.read_path, 0) + load.blocks
            self.metrics.loaded.labels(load.read_path).inc(load.blocks)
        return None

    def _staged_done(self, outcome: Outcome, part: _Chunk) -> None:
        """A chunk's H2D settled: its staging blocks become G2 blocks (loaded) or go back (failed)."""
        with self.lock:
            self.g3.release(part.own_ids[part.own_ids >= 0])
            if outcome.ok:
                self.g2.complete(part.staging)
                canonical = self.g2.register(part.staging, part.g3h)
                self.g2.release(canonical)
                self.counters.promoted += part.hi - part.lo
            else:
                self.g2.release(part.staging)
        return None

    def _acquire(self, hashes: np.ndarray, k3: int):
        """Under the lock: the G2 prefix acquired, the G3 run's own blocks acquired (before anything
        that could evict them: the staging allocation's cleaner writes to G3), its peer entries
        looked up, and k3 staging blocks allocated in G2 (fewer when G2 is short)."""
        host_prefix = np.asarray(self.g2.match(hashes, acquire=True), dtype=np.int64)
        k2 = int(host_prefix.shape[0])
        try:
            staged = self._acquire_run(hashes[k2:k2 + k3])
        except BaseException:
            self.g2.release(host_prefix)
            raise
        return (host_prefix, *staged)

    def _acquire_run(self, g3h: np.ndarray):
        """Under the lock: a run of hashes G3 holds (own or a peer's) acquired for a read into G2
        staging blocks: (hashes, own ids, owners, slots, checksums, staging), cut to the staging
        blocks G2 could give."""
        k3 = int(g3h.shape[0])
        own_ids = np.full(k3, -1, np.int64)
        own = self.g3.lookup(g3h) >= 0
        # Own blocks, acquired run by run (match takes a run of hashes held in order).
        i = 0
        while i < k3:
            if not own[i]:
                i += 1
                continue
            j = i
            while j < k3 and own[j]:
                j += 1
            got = self.g3.match(g3h[i:j], acquire=True)
            own_ids[i:i + len(got)] = got
            i = j
        # With a shared G2 or G3 the lock does not stop other engines: since plan() looked, one may
        # have evicted a block of the run (then it is neither acquired nor a peer's) or moved the
        # G2 prefix. The run is cut at the first such block.
        peer_idx = np.full(k3, -1, np.int64)
        peer_idx[own_ids < 0] = self.peers.find(g3h[own_ids < 0])
        gone = np.flatnonzero((own_ids < 0) & (peer_idx < 0))
        if gone.size:
            cut = int(gone[0])
            self.g3.release(own_ids[cut:][own_ids[cut:] >= 0])
            g3h, own_ids, peer_idx, k3 = g3h[:cut], own_ids[:cut], peer_idx[:cut], cut
        peer = own_ids < 0
        idx = peer_idx[peer]
        staging = self.g2.allocate(k3) if k3 else np.empty(0, np.int64)
        if staging is None:
            room = int(self.g2.registry.num_free) + int(self.g2.registry.num_inactive)
            staging = self.g2.allocate(room) if room else np.empty(0, np.int64)
            staging = np.empty(0, np.int64) if staging is None else staging
        n = int(staging.shape[0])
        if n < k3:              # G2 could stage only n of them: the run is cut there
            self.g3.release(own_ids[n:][own_ids[n:] >= 0])
        owner = np.zeros(k3, np.uint32)
        slots = np.where(own_ids >= 0, own_ids, 0).astype(np.int64)
        sums = np.zeros(k3, np.uint64)
        sums[~peer] = self.sums[own_ids[~peer]]
        if peer.any():
            owner[peer], slots[peer], sums[peer] = self.peers.entries(idx)
        if self.admission == "victim":
            self._clean()       # the staging allocation may have taken G2's free reserve
        return g3h[:n], own_ids[:n], owner[:n], slots[:n], sums[:n], staging

    def stage(self, hashes, *, priority: int = 1, timeout: float | None = None) -> TransferFuture:
        """G3 -> G2 without a device: the longest run of `hashes` (from the first) that G3 holds is
        read into G2 staging blocks (DISK2H, checksums verified by the worker) and registered in G2
        there, as onboard's G3 part does before its H2D. The future's result().value is the G2 block
        of each staged hash, in order (fewer than asked when G3 or G2's staging room ran short; none
        when G3 holds no first block), each ACQUIRED for the caller, who releases them once its own
        copy out of G2 is over. A read that is not intact fails the future (TransferError): bad own
        blocks are dropped from G3, bad peer entries forgotten, nothing is registered in G2. The
        caller decided to load (LoadRule, through plan()); stage() does not ask again."""
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        with self.lock:
            k3 = self.prefix(hashes)
            parts = self._acquire_run(hashes[:k3]) if k3 else None
            if parts is not None and not parts[5].shape[0]:
                parts = None         # no G2 block free for staging
        if parts is None:
            return self.tm.submit(P.Path.DISK2H, np.empty(0, np.int64), np.empty(0, np.int64),
                                  finalize=lambda _o: np.empty(0, np.int64))
        g3h, own_ids, owner, slots, sums, staging = parts
        k3 = int(g3h.shape[0])

        def read_done(outcome: Outcome):
            detail = outcome.detail or {}
            path = detail.get("read_path") or "staged"
            if not outcome.ok:
                self._read_failed(detail.get("state"), g3h, own_ids, owner, staging, count=True)
                return None
            self.rule.observe(int(detail.get("bytes") or 0), int(detail.get("copy_us") or 0) / 1e6)
            self.metrics.read_rate.set(self.rule.read_bytes_per_s)
            with self.lock:
                self.g3.release(own_ids[own_ids >= 0])
                self.g2.complete(staging)
                canonical = self.g2.register(staging, g3h)    # held: the caller releases them
                self.counters.promoted += k3
                self.counters.loads += 1
                self.counters.loaded += k3
                self.counters.loaded_peer += int((owner > 0).sum())
                self._read_paths[path] = self._read_paths.get(path, 0) + k3
            self.metrics.loaded.labels(path).inc(k3)
            return np.asarray(canonical, dtype=np.int64)

        try:
            return self.tm.submit(P.Path.DISK2H, slots, staging, priority=priority, block=False, timeout=timeout,
                                  finalize=read_done, extra={"sums": sums, "owner": owner},
                                  meta={"peers": list(self.peers.names)})
        except BaseException:
            with self.lock:
                self._unwind(own_ids, staging)
            raise

    def _unwind(self, own_ids: np.ndarray, staging: np.ndarray) -> None:
        self.g3.release(own_ids[own_ids >= 0])
        self.g2.release(staging)

    def _count_failed_load(self) -> None:
        with self.lock:
            self.counters.loads_failed += 1

    def _read_failed(self, state, g3h: np.ndarray, own_ids: np.ndarray, owner: np.ndarray,
                     staging: np.ndarray, count: bool) -> None:
        """A G3 read did not deliver every block: drop the bad ones, free what the load held
        (`count`: the onboard's first failure, counted as a failed load)."""
        n = int(g3h.shape[0])
        state = np.full(n, P.BlockState.FAILED, np.uint8) if state is None or len(state) != n else state
        bad = state != P.BlockState.OK
        corrupt = state == P.BlockState.CORRUPT
        with self.lock:
            if count:
                self.counters.loads_failed += 1
            mine = bad & (own_ids >= 0)
            if mine.any():
                self.g3.drop(own_ids[mine])
                nc, nf = int((mine & corrupt).sum()), int((mine & ~corrupt).sum())
                self.counters.dropped_corrupt += nc
                self.counters.dropped_failed += nf
                self.metrics.dropped.labels("corrupt").inc(nc)
                self.metrics.dropped.labels("failed").inc(nf)
            keep = own_ids >= 0
            keep[mine] = False
            self.g3.release(own_ids[keep])
            theirs = bad & (owner > 0)
            if theirs.any():
                forgotten = self.peers.remove(g3h[theirs])
                self.counters.peer_forgotten += forgotten
                self.metrics.dropped.labels("peer").inc(forgotten)
            self.g2.release(staging)
        logger.error("G3 load of %d blocks failed (%d corrupt, %d failed): dropped %d own blocks, forgot %d peer "
                     "entries; the engine recomputes them", n, int(corrupt.sum()), int((bad & ~corrupt).sum()),
                     int(mine.sum()), int(theirs.sum()))

    def flush(self, timeout: float = 30.0) -> None:
        """Waits until no G3 write is in flight (tests, the demo, a clean shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                busy = self._cleaning + len(self._writing)
            if not busy:
                return
            if time.monotonic() >= deadline:
                raise KvbmTimeoutError(f"{busy} G3 writes still in flight after {timeout} s")
            time.sleep(0.005)

    # ---- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            return {**asdict(self.counters), "admission": self.admission, "reserve": self.reserve,
                    "cleaning": self._cleaning, "writing": len(self._writing), "peers": len(self.peers.snapshots),
                    "peer_blocks": len(self.peers), "peers_skipped": dict(self.peers.skipped),
                    "read_paths": dict(self._read_paths), "load_rule": self.rule.describe(),
                    "worker": dict(self.worker_info)}
