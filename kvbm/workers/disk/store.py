"""DiskStore: one instance's disk tier (G3) on the worker side: files, journal, NIXL I/O and checksums.

Parts, in the order `DiskStore.open` builds them:
  InstanceDir   <disk_path>/<instance_id>/ (0700), locked against a second writer (files.py)
  Journal       replayed first: the live blocks, or a refusal when the journal is of another
                geometry, layout fingerprint or model (unless `cold`) (journal.py)
  DataFiles     the preallocated data files, O_DIRECT where allowed (files.py)
  NixlIO        the NIXL agent with host memory and the data files registered (io.py)
  slot table    arrays indexed by slot: state (FREE, RESERVED, LIVE), sequence hash, checksum; a
                stack of free slots. No Python object per block.

Then, per call:
  put   checksums of the host blocks (C, kvbm_checksum_blocks) -> NIXL writes -> fdatasync of the
        data files written -> journal PUT records, fdatasync'ed -> the slots are LIVE. A LIVE slot
        being overwritten gets a durable DELETE record first, so a crash mid-write leaves it free,
        never naming a torn block. Slots come from the store's own free stack, or from the caller
        (the engine's G3 BlockRegistry later), which can `mark` and `free_slot` them.
  get   only LIVE slots are read; NIXL reads into the host blocks -> checksums recomputed and
        compared with the journal's (and the caller's, when given: a slot rewritten since the
        caller looked is stale) -> a mismatch fails the block, counts it and drops it from the
        store; I/O failures fail their blocks (ReadResult says which and why).
  drop  durable DELETE records, then the slots are free. The journal is compacted when more than
        half its records are dead.
  peers another instance in the same (shared) directory: its journal is read read-only
        (`peer_entries`), its files opened read-only and read with the checksums its journal gave
        (`read_peer`); a vanished, replaced or truncated file fails those blocks cleanly.

Not thread safe: one caller (the disk worker's loop) drives a store. The worker should ignore
SIGXFSZ, so that a file size limit fails a write with EFBIG instead of killing the process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from kvbm._fast import native
from kvbm.errors import DiskError, DiskSpaceError, JournalMismatchError, LayoutError
from kvbm.workers.disk.files import DataFiles, Geometry, InstanceDir, check_instance_id
from kvbm.workers.disk.io import NixlIO, load_nixl
from kvbm.workers.disk.journal import Header, Journal, read_journal

logger = logging.getLogger(__name__)


class SlotState(IntEnum):
    FREE = 0      # on the free stack, holds nothing
    RESERVED = 1  # taken by `allocate`/`mark`, holds nothing yet
    LIVE = 2      # holds a block whose PUT record is durable


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Outcome of a read, per block of the call."""

    ok: np.ndarray        # bool: bytes are in host memory and match their checksum
    corrupt: np.ndarray   # int64 slots read whose bytes did not match (dropped from this store)
    failed: np.ndarray    # int64 slots not read: I/O error, truncated or vanished file, not LIVE, stale
    errors: tuple[str, ...]

    @property
    def all_ok(self) -> bool:
        return bool(self.ok.all())


@dataclass(slots=True)
class StoreStats:
    """Counters since open (for metrics and `kvbm-workers --status`)."""

    blocks_written: int = 0
    blocks_read: int = 0
    write_failures: int = 0
    read_failures: int = 0        # I/O failures and blocks not LIVE or stale
    checksum_failures: int = 0
    peer_blocks_read: int = 0
    journal_compactions: int = 0
    replay_bad_records: int = 0
    replay_torn_bytes: int = 0
    errors: list[str] = field(default_factory=list)  # the last few failure reasons


@dataclass(slots=True)
class _Peer:
    header: Header
    files: DataFiles
    inodes: list[int]


class DiskStore:
    """The G3 store of one instance. Build it with `DiskStore.open`."""

    def __init__(self, folder: InstanceDir, geometry: Geometry, journal: Journal, files: DataFiles, io: NixlIO,
                 fingerprint: int, model_id: int) -> None:
        self.folder = folder
        self.geometry = geometry
        self.journal = journal
        self.files = files
        self.io = io
        self.fingerprint = fingerprint
        self.model_id = model_id
        n = geometry.num_slots
        self._state = np.zeros(n, dtype=np.uint8)
        self._hash = np.zeros(n, dtype=np.uint64)
        self._checksum = np.zeros(n, dtype=np.uint64)
        self._stack = np.empty(n, dtype=np.int64)  # free slots; the top is popped first
        self._in_stack = np.zeros(n, dtype=bool)
        self._top = 0
        self._peers: dict[str, _Peer] = {}
        self.stats = StoreStats()

    # -- open / close -----------------------------------------------------------------------------

    @classmethod
    def open(cls, disk_path: str, instance_id: str, block_bytes: int, num_slots: int, fingerprint: int,
             model_id: int, *, host_regions: list[tuple[int, int]] = (), cold: bool = False, num_files: int = 4,
             direct: bool = True, backend: str = "auto", blocks_per_request: int = 16,
             max_inflight: int = 4, read_blocks_per_request: int | None = None,
             read_inflight: int | None = None) -> DiskStore:
        """Opens (creating where missing) the store of `instance_id` under `disk_path` and rebuilds
        its slot table from the journal: every block a previous process wrote durably is LIVE again.

        fingerprint, model_id: u64 ids of the KV layout and of the model/salt; a journal written
        under others raises JournalMismatchError unless `cold` (discard it, with a warning).
        host_regions: (address, bytes) of host memory blocks move from and to (the G2 segment).
        blocks_per_request, max_inflight: NIXL requests of writes; read_blocks_per_request,
        read_inflight: those of reads (default: the same)."""
        load_nixl()  # a missing NIXL fails here, before anything is created on disk
        folder = InstanceDir(disk_path, instance_id)
        geometry = Geometry.of(block_bytes, num_slots, num_files)
        header = Header(geometry.block_bytes, geometry.slot_bytes, geometry.num_slots, geometry.num_files,
                        int(fingerprint), int(model_id))
        folder.ensure()
        folder.lock()
        journal = files = io = None
        try:
            journal, replay = Journal.open(folder.journal_path, header, cold=cold)
            files = DataFiles.create(folder, geometry, direct=direct)
            io = NixlIO(f"kvbm-g3-{instance_id}-{os.getpid()}", files, list(host_regions), backend=backend,
                        blocks_per_request=blocks_per_request, max_inflight=max_inflight,
                        read_blocks_per_request=read_blocks_per_request, read_inflight=read_inflight)
        except BaseException:
            for part in (io, files, journal):
                if part is not None:
                    part.close()
            folder.unlock()
            raise
        store = cls(folder, geometry, journal, files, io, int(fingerprint), int(model_id))
        store._state[replay.slots] = SlotState.LIVE
        store._hash[replay.slots] = replay.hashes
        store._checksum[replay.slots] = replay.checksums
        store.stats.replay_bad_records = replay.bad_records
        store.stats.replay_torn_bytes = replay.torn_bytes
        store._push(np.flatnonzero(store._state == SlotState.FREE)[::-1])  # slot 0 on top: files in turn
        logger.info("disk tier %s: %d of %d slots hold blocks after replay (%d-byte blocks, %d files, %s)",
                    folder.path, len(replay.slots), num_slots, block_bytes, geometry.num_files, io.backend)
        return store

    def register_host(self, base: int, nbytes: int) -> None:
        self.io.register_host(base, nbytes)

    def close(self) -> None:
        for name in list(self._peers):
            self._close_peer(name)
        for part in (self.io, self.files, self.journal):
            part.close()
        self.folder.unlock()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- slots ------------------------------------------------------------------------------------

    def _push(self, slots: np.ndarray) -> None:
        slots = slots[~self._in_stack[slots]]
        self._stack[self._top:self._top + slots.size] = slots
        self._top += slots.size
        self._in_stack[slots] = True

    def allocate(self, n: int) -> np.ndarray:
        """Up to n FREE slots, now RESERVED; fewer when the store is full (not an error)."""
        out = []
        while len(out) < n and self._top > 0:
            self._top -= 1
            s = int(self._stack[self._top])
            self._in_stack[s] = False
            if self._state[s] == SlotState.FREE:  # marked from outside while on the stack: skipped
                self._state[s] = SlotState.RESERVED
                out.append(s)
        return np.asarray(out, dtype=np.int64)

    def mark(self, slots) -> None:
        """Reserves slots chosen by the caller, so that `allocate` does not hand them out."""
        s = self._slots(slots)
        live = s[self._state[s] == SlotState.LIVE]
        if live.size:
            raise DiskError(f"mark: {live.size} of {s.size} slots hold blocks (first {int(live[0])}); drop them first")
        self._state[s] = SlotState.RESERVED

    def free_slot(self, slots) -> None:
        """Returns slots to the free stack: a reservation is released, a LIVE block dropped."""
        s = self._slots(slots)
        self.drop(s[self._state[s] == SlotState.LIVE])
        reserved = s[self._state[s] == SlotState.RESERVED]
        self._state[reserved] = SlotState.FREE
        self._push(reserved)

    def _slots(self, slots) -> np.ndarray:
        s = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
        bad = np.flatnonzero((s < 0) | (s >= self.geometry.num_slots))
        if bad.size:
            raise LayoutError(f"slot {int(s[bad[0]])} outside [0, {self.geometry.num_slots}) "
                              f"({bad.size} of {s.size})")
        return s

    @property
    def num_live(self) -> int:
        return int((self._state == SlotState.LIVE).sum())

    @property
    def num_free(self) -> int:
        return int((self._state == SlotState.FREE).sum())

    def checksums_of(self, slots) -> np.ndarray:
        """The recorded checksum of each slot (0 where it holds no block)."""
        s = self._slots(slots)
        return np.where(self._state[s] == SlotState.LIVE, self._checksum[s], np.uint64(0))

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sequence hashes, slots, checksums) of every LIVE block, by slot: what the engine rebuilds
        its G3 registry from after a restart."""
        live = np.flatnonzero(self._state == SlotState.LIVE)
        return self._hash[live].copy(), live.astype(np.int64), self._checksum[live].copy()

    # -- put / get / drop -------------------------------------------------------------------------

    def put(self, hashes, host_addrs, slots=None) -> np.ndarray:
        """Writes host blocks to the disk and records them; returns the slot of each block, -1 where
        none was free. An I/O or journal failure raises DiskError (DiskSpaceError when the disk
        or a size limit refused) whose `.slots` is that outcome, the blocks that did land kept."""
        h = np.ascontiguousarray(hashes, dtype=np.uint64).reshape(-1)
        a = np.ascontiguousarray(host_addrs, dtype=np.uint64).reshape(-1)
        if h.size != a.size:
            raise LayoutError(f"put: {h.size} hashes for {a.size} host blocks")
        outcome = np.full(h.size, -1, dtype=np.int64)
        if slots is None:
            s = self.allocate(h.size)
        else:
            s = self._slots(slots)
            if s.size != h.size:
                raise LayoutError(f"put: {s.size} slots for {h.size} blocks")
            if np.unique(s).size != s.size:
                raise LayoutError(f"put: slots repeat ({s.size} slots, {np.unique(s).size} distinct)")
        n = s.size
        if n == 0:
            return outcome
        h, a = h[:n], a[:n]
        try:
            self.io.check_args(a, s, self.files)  # argument errors raise before any state changes
        except BaseException:
            if slots is None:
                self._release(s)
            raise
        sums = np.zeros(n, dtype=np.uint64)

        def checksum(start: int, end: int, _ok: np.ndarray) -> None:  # while NIXL writes those blocks
            sums[start:end] = self._checksums(a[start:end])

        try:
            live = s[self._state[s] == SlotState.LIVE]
            if live.size:  # overwritten: free durably first, so a crash mid-write leaves them free
                self.journal.append_deletes(live)
            self._state[s] = SlotState.RESERVED
            res = self.io.transfer("WRITE", a, s, on_chunk=checksum)
            done = np.flatnonzero(res.ok)
            errors, no_space = list(res.errors), res.no_space
            if done.size:
                try:
                    self.files.sync(self.geometry.locate(s[done])[0])
                    self.journal.append_puts(s[done], h[done], sums[done])
                except DiskError as err:
                    errors.append(str(err))
                    no_space = no_space or isinstance(err, DiskSpaceError)
                    done = done[:0]
        except BaseException:
            self._release(s)
            raise
        self._state[s[done]] = SlotState.LIVE
        self._hash[s[done]] = h[done]
        self._checksum[s[done]] = sums[done]
        outcome[done] = s[done]
        failed = np.setdiff1d(np.arange(n), done)
        self._release(s[failed])
        self.stats.blocks_written += done.size
        self._maybe_compact()
        if failed.size:
            self.stats.write_failures += failed.size
            self._note(errors)
            cls = DiskSpaceError if no_space else DiskError
            raise cls(f"disk put: {failed.size} of {n} blocks not stored: " + "; ".join(errors[:4]), slots=outcome)
        return outcome

    def _release(self, slots: np.ndarray) -> None:
        slots = slots[self._state[slots] != SlotState.LIVE]
        self._state[slots] = SlotState.FREE
        self._push(slots)

    def get(self, slots, host_addrs, expected_checksums=None) -> ReadResult:
        """Reads LIVE slots into host blocks and verifies each block's checksum before it counts.

        expected_checksums: the caller's record of each block (the engine's registry); a slot whose
        journal checksum differs was rewritten since, and fails as stale without being read."""
        s = self._slots(slots)
        a = np.ascontiguousarray(host_addrs, dtype=np.uint64).reshape(-1)
        if a.size != s.size:
            raise LayoutError(f"get: {s.size} slots for {a.size} host blocks")
        want = self._checksum[s]
        readable = self._state[s] == SlotState.LIVE
        errors = []
        if not readable.all():
            errors.append(f"{int((~readable).sum())} slots hold no block (first {int(s[~readable][0])})")
        if expected_checksums is not None:
            exp = np.ascontiguousarray(expected_checksums, dtype=np.uint64).reshape(-1)
            if exp.size != s.size:
                raise LayoutError(f"get: {exp.size} expected checksums for {s.size} slots")
            stale = readable & (exp != want)
            if stale.any():
                errors.append(f"{int(stale.sum())} slots were rewritten since (first {int(s[stale][0])})")
            readable &= ~stale
        result = self._read(s, a, want, readable, self.files, errors)
        if result.corrupt.size:
            try:
                self.drop(result.corrupt)
            except DiskError as err:  # the read's outcome stands; the next open's read fails them again
                logger.error("disk tier: dropping %d corrupt blocks failed: %s", result.corrupt.size, err)
                self._note([str(err)])
        return result

    def _read(self, s: np.ndarray, a: np.ndarray, want: np.ndarray, readable: np.ndarray, files: DataFiles,
              errors: list[str]) -> ReadResult:
        ok = np.zeros(s.size, dtype=bool)
        idx = np.flatnonzero(readable)
        bad: list[np.ndarray] = []
        if idx.size:
            def verify(start: int, end: int, arrived: np.ndarray) -> None:  # while NIXL reads the next requests
                moved = idx[start:end][arrived[start:end]]
                match = self._checksums(a[moved]) == want[moved]
                ok[moved[match]] = True
                bad.append(s[moved[~match]])

            res = self.io.transfer("READ", a[idx], s[idx], files, on_chunk=verify)
            errors.extend(res.errors)
        corrupt = np.concatenate(bad) if bad else np.empty(0, np.int64)
        if corrupt.size:
            errors.append(f"{corrupt.size} blocks failed their checksum (slots {corrupt[:8].tolist()})")
            logger.error("disk tier: %d blocks read from %s failed their checksum: slots %s", corrupt.size,
                         os.path.dirname(files.paths[0]), corrupt[:8].tolist())
        failed = s[~ok & ~np.isin(s, corrupt)]
        self.stats.blocks_read += int(ok.sum())
        self.stats.checksum_failures += corrupt.size
        self.stats.read_failures += failed.size
        self._note(errors)
        return ReadResult(ok, corrupt, failed, tuple(errors))

    def drop(self, slots) -> int:
        """Frees LIVE slots durably (DELETE records); returns how many were LIVE. Others are ignored."""
        s = self._slots(slots)
        live = np.unique(s[self._state[s] == SlotState.LIVE])
        if live.size == 0:
            return 0
        self.journal.append_deletes(live)
        self._state[live] = SlotState.FREE
        self._push(live)
        self._maybe_compact()
        return int(live.size)

    def compact(self) -> None:
        hashes, slots, sums = self.entries()
        self.journal.compact(slots, hashes, sums)
        self.stats.journal_compactions += 1

    def _maybe_compact(self) -> None:
        if self.journal.worth_compacting(self.journal.records, self.num_live):
            self.compact()

    def _checksums(self, addrs: np.ndarray) -> np.ndarray:
        out = np.zeros(addrs.size, dtype=np.uint64)
        todo = np.ones(addrs.size, dtype=bool)
        bb = self.geometry.block_bytes
        for base, nbytes in self.io.regions:
            inside = todo & (addrs >= base) & (addrs <= base + nbytes - bb)
            if inside.any():
                out[inside] = native.checksum_blocks(addrs[inside], bb, base, nbytes)
                todo &= ~inside
        if todo.any():
            i = int(np.flatnonzero(todo)[0])
            raise LayoutError(f"host block {i} at {int(addrs[i]):#x} is outside the registered host memory")
        return out

    def _note(self, errors: list[str]) -> None:
        if errors:
            self.stats.errors = (self.stats.errors + errors)[-8:]

    # -- other instances in the same directory ------------------------------------------------------

    def peers(self) -> list[str]:
        """Instance ids of the other stores in disk_path (folders holding a journal)."""
        out = []
        for name in sorted(os.listdir(self.folder.disk_path)):
            if name == self.folder.instance_id:
                continue
            try:
                check_instance_id(name)
            except DiskError:
                continue
            if os.path.isfile(os.path.join(self.folder.disk_path, name, InstanceDir.JOURNAL)):
                out.append(name)
        return out

    def peer_version(self, instance_id: str) -> list[int] | None:
        """(inode, size, mtime ns) of another instance's journal, None when it has none: a reader
        re-reads its entries only when this changed."""
        try:
            st = os.stat(InstanceDir(self.folder.disk_path, instance_id).journal_path)
        except (OSError, DiskError):
            return None
        return [st.st_ino, st.st_size, st.st_mtime_ns]

    def peer_entries(self, instance_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sequence hashes, slots, checksums) of another instance's blocks, from its journal read
        read-only. JournalMismatchError when its blocks are of another size, layout or model."""
        replay = read_journal(InstanceDir(self.folder.disk_path, instance_id).journal_path)
        self._check_peer_header(instance_id, replay.header)
        return replay.hashes, replay.slots, replay.checksums

    def _check_peer_header(self, instance_id: str, h: Header | None) -> Header:
        if h is None:
            raise JournalMismatchError(f"instance {instance_id}: its journal has no header yet")
        mine = (self.geometry.block_bytes, self.fingerprint, self.model_id)
        if (h.block_bytes, h.fingerprint, h.model_id) != mine:
            raise JournalMismatchError(f"instance {instance_id} holds blocks of {h.block_bytes} bytes, fingerprint "
                                       f"{h.fingerprint:#x}, model {h.model_id:#x}; this store: {mine[0]} bytes, "
                                       f"{mine[1]:#x}, {mine[2]:#x}")
        return h

    def read_peer(self, instance_id: str, slots, host_addrs, expected_checksums) -> ReadResult:
        """Reads another instance's slots (as its journal named them, with the checksums it gave)
        into host blocks. Its files are opened read-only on first use and reopened when replaced;
        one that vanished or was cut fails those blocks, never returning wrong bytes."""
        s = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
        a = np.ascontiguousarray(host_addrs, dtype=np.uint64).reshape(-1)
        want = np.ascontiguousarray(expected_checksums, dtype=np.uint64).reshape(-1)
        if not (s.size == a.size == want.size):
            raise LayoutError(f"read_peer: {s.size} slots, {a.size} host blocks, {want.size} checksums")
        try:
            peer = self._open_peer(instance_id)
        except (DiskError, OSError) as err:
            self._close_peer(instance_id)
            reason = f"instance {instance_id}: {err}"
            self.stats.read_failures += s.size
            self._note([reason])
            return ReadResult(np.zeros(s.size, bool), np.empty(0, np.int64), s.copy(), (reason,))
        inside = (s >= 0) & (s < peer.header.num_slots)
        errors = [] if inside.all() else [f"{int((~inside).sum())} slots outside instance {instance_id}'s "
                                          f"{peer.header.num_slots}"]
        result = self._read(s, a, want, inside, peer.files, errors)
        self.stats.peer_blocks_read += int(result.ok.sum())
        if not result.all_ok:
            self._close_peer(instance_id)  # reopened next time: the peer may have restarted
        return result

    def _open_peer(self, instance_id: str) -> _Peer:
        folder = InstanceDir(self.folder.disk_path, instance_id)
        peer = self._peers.get(instance_id)
        if peer is not None:
            try:
                current = [os.stat(p).st_ino for p in peer.files.paths]
            except OSError:
                current = None
            if current == peer.inodes:
                return peer
            self._close_peer(instance_id)
        header = self._check_peer_header(instance_id, read_journal(folder.journal_path).header)
        geometry = Geometry(header.block_bytes, header.slot_bytes, header.num_slots, header.num_files)
        files = DataFiles.open_peer(folder, geometry)
        try:
            self.io.register_files(files)
        except BaseException:
            files.close()
            raise
        peer = _Peer(header, files, [os.fstat(fd).st_ino for fd in files.fds])
        self._peers[instance_id] = peer
        return peer

    def _close_peer(self, instance_id: str) -> None:
        peer = self._peers.pop(instance_id, None)
        if peer is not None:
            self.io.deregister_files(peer.files)
            peer.files.close()
