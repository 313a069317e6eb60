"""The disk tier's append-only journal: which block each slot holds, durable only once its bytes are.

Parts, in file order and then in the order the store uses them:
  records       fixed 64-byte little-endian records. The first is a HEADER (store geometry, layout
                fingerprint, model/salt id); then PUT (sequence hash, slot, length, checksum,
                fingerprint, model id) and DELETE (slot) records. Each ends with `check`, the xxh3_64
                of its first 56 bytes (the record's CRC, computed by the same C code as the block
                checksums, over the whole journal in one call at replay)
  read_journal  replay, read-only (an instance's own journal at open, and other instances' journals
                in a shared directory): a torn last record is ignored, a record failing its check is
                skipped and counted, and the last record of each slot decides whether it is live
  Journal       the writer: `open` replays and then refuses a journal of another geometry, layout
                or model (JournalMismatchError) unless started cold (a logged warning, the journal
                emptied); a change of the slot count alone is accepted. `append_puts` and
                `append_deletes` write records and fdatasync them; the caller appends a PUT only
                after the block's data write completed and its file was fdatasync'ed, so the journal
                never names a torn block. A failed append is cut back to the last whole record.
                `compact` writes the header and live records to a new file, fsyncs it, renames it
                over the journal and fsyncs the folder.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, fields

import numpy as np

from kvbm._fast import native
from kvbm.errors import DiskError, DiskSpaceError, JournalMismatchError

logger = logging.getLogger(__name__)

MAGIC = b"KVBJ"
VERSION = 1
RECORD_BYTES = 64
CHECKED_BYTES = 56  # the check covers every byte before it
HEADER, PUT, DELETE = 0, 1, 2

RECORD = np.dtype([
    ("magic", "S4"), ("version", "<u2"), ("kind", "u1"), ("flags", "u1"),
    ("hash", "<u8"),         # sequence hash of the block (PUT)
    ("slot", "<i8"),         # slot written (PUT) or freed (DELETE)
    ("length", "<u4"),       # bytes of the block (PUT)
    ("reserved", "<u4"),
    ("checksum", "<u8"),     # xxh3_64 of the block's bytes (PUT)
    ("fingerprint", "<u8"),  # layout fingerprint the block was written under
    ("model", "<u8"),        # model/salt id the block was written under
    ("check", "<u8"),        # xxh3_64 of the 56 bytes above
])
HEADER_RECORD = np.dtype([
    ("magic", "S4"), ("version", "<u2"), ("kind", "u1"), ("flags", "u1"),
    ("block_bytes", "<u8"), ("slot_bytes", "<u8"), ("num_slots", "<u8"),
    ("num_files", "<u4"), ("reserved", "<u4"),
    ("fingerprint", "<u8"), ("model", "<u8"), ("check", "<u8"),
])
assert RECORD.itemsize == HEADER_RECORD.itemsize == RECORD_BYTES


@dataclass(frozen=True, slots=True)
class Header:
    """What a journal's blocks were written for; a reader of another geometry cannot locate them."""

    block_bytes: int
    slot_bytes: int
    num_slots: int
    num_files: int
    fingerprint: int  # layout fingerprint (the engine's: dtype, shapes, block size, layout type)
    model_id: int     # model/salt id: blocks of another model are never this one's

    def differences(self, other: Header) -> list[str]:
        return [f"{f.name} {getattr(self, f.name)} (journal) vs {getattr(other, f.name)} (asked)"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True, slots=True)
class Replay:
    """A journal read back: its header and the live blocks (one per slot, ascending slot order)."""

    header: Header | None
    slots: np.ndarray       # int64
    hashes: np.ndarray      # uint64
    checksums: np.ndarray   # uint64
    lengths: np.ndarray     # uint32
    records: int            # whole records in the file, header included
    bad_records: int        # records skipped: check failed, or of another layout/model, or slot out of range
    torn_bytes: int         # bytes of a torn last record, ignored
    valid_bytes: int        # where the next record goes: after the last whole record

    @classmethod
    def empty(cls, header: Header | None = None) -> Replay:
        return cls(header, np.empty(0, np.int64), np.empty(0, np.uint64), np.empty(0, np.uint64),
                   np.empty(0, np.uint32), 0, 0, 0, 0)


def _seal(recs: np.ndarray) -> bytes:
    """Fills each record's check and returns the bytes."""
    recs["check"] = native.checksum_buffer(recs.view(np.uint8), CHECKED_BYTES, RECORD_BYTES)
    return recs.tobytes()


def header_bytes(h: Header) -> bytes:
    rec = np.zeros(1, HEADER_RECORD)
    rec["magic"], rec["version"], rec["kind"] = MAGIC, VERSION, HEADER
    for name, value in (("block_bytes", h.block_bytes), ("slot_bytes", h.slot_bytes), ("num_slots", h.num_slots),
                        ("num_files", h.num_files), ("fingerprint", h.fingerprint), ("model", h.model_id)):
        rec[name] = value
    return _seal(rec)


def block_records(kind: int, slots, hashes, lengths, checksums, fingerprint: int, model_id: int) -> bytes:
    n = len(slots)
    recs = np.zeros(n, RECORD)
    recs["magic"], recs["version"], recs["kind"] = MAGIC, VERSION, kind
    recs["slot"] = slots
    recs["hash"] = hashes
    recs["length"] = lengths
    recs["checksum"] = checksums
    recs["fingerprint"], recs["model"] = fingerprint, model_id
    return _seal(recs)


def parse(data: bytes | memoryview) -> Replay:
    """Replays journal bytes: torn tail ignored, bad records skipped, last record per slot wins."""
    n = len(data) // RECORD_BYTES
    torn = len(data) - n * RECORD_BYTES
    if n == 0:
        e = Replay.empty()
        return Replay(None, e.slots, e.hashes, e.checksums, e.lengths, 0, 0, torn, 0)
    buf = np.frombuffer(data, dtype=np.uint8, count=n * RECORD_BYTES)
    recs = buf.view(RECORD)
    checks = native.checksum_buffer(buf, CHECKED_BYTES, RECORD_BYTES)
    ok = (checks == recs["check"]) & (recs["magic"] == MAGIC) & (recs["version"] == VERSION)
    head_rec = buf[:RECORD_BYTES].view(HEADER_RECORD)[0]
    if not ok[0] or head_rec["kind"] != HEADER:
        raise DiskError(f"journal does not start with a valid header record ({n} records, {torn} torn bytes)")
    header = Header(int(head_rec["block_bytes"]), int(head_rec["slot_bytes"]), int(head_rec["num_slots"]),
                    int(head_rec["num_files"]), int(head_rec["fingerprint"]), int(head_rec["model"]))
    body, body_ok = recs[1:], ok[1:].copy()
    body_ok &= np.isin(body["kind"], (PUT, DELETE))
    body_ok &= (body["slot"] >= 0) & (body["slot"] < header.num_slots)
    puts = body["kind"] == PUT
    body_ok &= ~puts | ((body["fingerprint"] == header.fingerprint) & (body["model"] == header.model_id)
                        & (body["length"] == header.block_bytes))
    bad = int((~body_ok).sum())
    # The last valid record of each slot decides: reverse, and np.unique keeps each slot's first.
    valid = np.flatnonzero(body_ok)[::-1]
    _, first = np.unique(body["slot"][valid], return_index=True)
    last = valid[first]
    last = last[body["kind"][last] == PUT]
    live = body[last]
    return Replay(header, live["slot"].astype(np.int64), live["hash"].astype(np.uint64),
                  live["checksum"].astype(np.uint64), live["length"].astype(np.uint32), n, bad, torn,
                  n * RECORD_BYTES)


def read_journal(path: str) -> Replay:
    """Reads a journal read-only (this instance's or another's). A missing file raises DiskError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise DiskError(f"cannot open journal {path}: {err}") from err
    try:
        size = os.fstat(fd).st_size
        chunks, got = [], 0
        while got < size:
            chunk = os.pread(fd, min(size - got, 1 << 24), got)
            if not chunk:
                break  # cut while we read (a compaction renames a new file in; this one is whole up to here)
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    try:
        return parse(b"".join(chunks))
    except DiskError as err:
        raise DiskError(f"{path}: {err}") from err


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The writable journal of this instance. Not thread safe: one store drives it."""

    def __init__(self, path: str, header: Header) -> None:
        self.path = path
        self.header = header
        self._fd = -1
        self._end = 0           # bytes of whole records: a failed append is cut back to here
        self.records = 0        # records in the file, header included
        self.broken: str | None = None

    @classmethod
    def open(cls, path: str, header: Header, cold: bool = False) -> tuple[Journal, Replay]:
        """Replays the journal at `path` (creating it where missing) for a store of `header`.

        Returns the writer and the live blocks. A journal of another geometry, fingerprint or model
        raises JournalMismatchError unless `cold`, which empties it with a warning; a different slot
        count alone is taken (slots past the new count are dropped) and the journal compacted."""
        j = cls(path, header)
        try:
            replay = read_journal(path) if os.path.lexists(path) else Replay.empty()
        except DiskError as err:
            if not cold:
                raise JournalMismatchError(f"{err}; start cold to discard it") from err
            logger.warning("disk tier: %s; starting cold, the journal is emptied", err)
            replay = Replay.empty()
        if replay.header is None:  # new (or empty, or unreadable and cold)
            j._rewrite(Replay.empty(header))
            return j, Replay.empty(header)
        diffs = replay.header.differences(header)
        only_size = bool(diffs) and all(d.startswith("num_slots ") for d in diffs)
        if diffs and not only_size:
            if not cold:
                raise JournalMismatchError(
                    f"disk tier journal {path} holds {len(replay.slots)} blocks of another store: "
                    f"{'; '.join(diffs)}. Start cold to discard them")
            logger.warning("disk tier journal %s (%s): starting cold, %d blocks discarded", path,
                           "; ".join(diffs), len(replay.slots))
            j._rewrite(Replay.empty(header))
            return j, Replay.empty(header)
        if only_size:
            keep = replay.slots < header.num_slots
            logger.info("disk tier journal %s: slots %d -> %d, %d blocks past the end dropped", path,
                        replay.header.num_slots, header.num_slots, int((~keep).sum()))
            replay = Replay(header, replay.slots[keep], replay.hashes[keep], replay.checksums[keep],
                            replay.lengths[keep], replay.records, replay.bad_records, replay.torn_bytes,
                            replay.valid_bytes)
        if replay.torn_bytes or replay.bad_records:
            logger.warning("disk tier journal %s: %d torn bytes at the end ignored, %d bad records skipped",
                           path, replay.torn_bytes, replay.bad_records)
        if only_size or replay.bad_records or j.worth_compacting(replay.records, len(replay.slots)):
            j._rewrite(replay)
        else:
            j._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            if replay.torn_bytes:
                os.ftruncate(j._fd, replay.valid_bytes)  # the next record starts on a record boundary
                os.fdatasync(j._fd)
            j._end = replay.valid_bytes
            j.records = replay.records
        return j, replay

    @staticmethod
    def worth_compacting(records: int, live: int) -> bool:
        """More than half the records are dead (and enough of them to pay for the rewrite)."""
        return records - 1 - live > max(live, 1024)

    @property
    def size(self) -> int:
        return self._end

    def append_puts(self, slots, hashes, checksums) -> None:
        """Records blocks as held. Call only once their bytes are durable (data files fdatasync'ed)."""
        n = len(slots)
        self._append(block_records(PUT, slots, hashes, np.full(n, self.header.block_bytes), checksums,
                                   self.header.fingerprint, self.header.model_id), n)

    def append_deletes(self, slots) -> None:
        """Records slots as free; durable on return, so a slot may be rewritten afterwards."""
        n = len(slots)
        self._append(block_records(DELETE, slots, np.zeros(n, np.uint64), np.zeros(n), np.zeros(n, np.uint64),
                                   self.header.fingerprint, self.header.model_id), n)

    def _append(self, data: bytes, n: int) -> None:
        if self.broken:
            raise DiskError(f"journal {self.path} is unusable: {self.broken}")
        if n == 0:
            return
        view = memoryview(data)
        try:
            done = 0
            while done < len(data):
                done += os.write(self._fd, view[done:])
            os.fdatasync(self._fd)
        except OSError as err:
            self._cut_back(err)
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DiskSpaceError(f"journal {self.path}: cannot append {len(data)} bytes ({n} records) at "
                                     f"{self._end}: {os.strerror(err.errno)}") from err
            raise DiskError(f"journal {self.path}: append of {n} records at {self._end} failed: {err}") from err
        self._end += len(data)
        self.records += n

    def _cut_back(self, err: OSError) -> None:
        """After a failed append: back to the last whole record, or the journal refuses further use."""
        try:
            os.ftruncate(self._fd, self._end)
            os.fdatasync(self._fd)
        except OSError as err2:
            self.broken = f"append failed ({err}) and cutting it back to {self._end} bytes failed ({err2})"
            logger.error("disk tier journal %s: %s", self.path, self.broken)

    def compact(self, slots, hashes, checksums) -> None:
        """Rewrites the journal as its header and these live blocks (new file, fsync, rename)."""
        self._rewrite(Replay(self.header, np.asarray(slots, np.int64), np.asarray(hashes, np.uint64),
                             np.asarray(checksums, np.uint64), np.full(len(slots), self.header.block_bytes,
                                                                        np.uint32), 0, 0, 0, 0))

    def _rewrite(self, replay: Replay) -> None:
        n = len(replay.slots)
        data = header_bytes(self.header) + block_records(
            PUT, replay.slots, replay.hashes, np.full(n, self.header.block_bytes), replay.checksums,
            self.header.fingerprint, self.header.model_id)
        tmp = self.path + ".new"
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)  # a compaction that died before its rename
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                done = 0
                while done < len(data):
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            _fsync_dir(os.path.dirname(self.path))
        except OSError as err:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            cls = DiskSpaceError if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else DiskError
            raise cls(f"journal {self.path}: rewriting {n} live records ({len(data)} bytes) failed: {err}") from err
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._end = len(data)
        self.records = n + 1
        logger.info("disk tier journal %s written: %d live blocks, %d bytes", self.path, n, len(data))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
