"""The disk tier's journal (kvbm/workers/disk/journal.py): record format pinned, replay (last record of
a slot wins, torn tail ignored, bad records skipped), refusal of another store's journal unless cold,
append failures cut back, compaction, and read-only reads of another instance's journal."""
from __future__ import annotations

import errno
import logging
import os
import struct

import numpy as np
import pytest
import xxhash

from kvbm.errors import DiskError, DiskSpaceError, JournalMismatchError
from kvbm.workers.disk.journal import (
    DELETE,
    PUT,
    RECORD_BYTES,
    Header,
    Journal,
    parse,
    read_journal,
)

HEADER = Header(block_bytes=65536, slot_bytes=65536, num_slots=100, num_files=4, fingerprint=0xF1, model_id=0xA0)
RECORD_FMT = "<4sHBBQqIIQQQQ"  # magic version kind flags hash slot length reserved checksum fingerprint model check


def u64(*xs):
    return np.array(xs, dtype=np.uint64)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "journal")


def live(replay) -> dict[int, tuple[int, int]]:
    return {int(s): (int(h), int(c)) for s, h, c in zip(replay.slots, replay.hashes, replay.checksums)}


def test_record_format_is_pinned(path):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([7], u64(0x1122334455667788), u64(0xCAFE))
    j.close()
    data = open(path, "rb").read()
    assert len(data) == 2 * RECORD_BYTES
    head = struct.unpack("<4sHBBQQQIIQQQ", data[:64])
    assert head[:11] == (b"KVBJ", 1, 0, 0, 65536, 65536, 100, 4, 0, 0xF1, 0xA0)
    rec = struct.unpack(RECORD_FMT, data[64:128])
    assert rec[:11] == (b"KVBJ", 1, PUT, 0, 0x1122334455667788, 7, 65536, 0, 0xCAFE, 0xF1, 0xA0)
    assert rec[11] == xxhash.xxh3_64_intdigest(data[64:120])
    assert head[11] == xxhash.xxh3_64_intdigest(data[:56])


def test_last_record_of_a_slot_wins(path):
    j, replay = Journal.open(path, HEADER)
    assert replay.slots.size == 0 and replay.header == HEADER
    j.append_puts([1, 2, 3], u64(11, 12, 13), u64(21, 22, 23))
    j.append_deletes([2])
    j.append_puts([2, 4], u64(32, 14), u64(42, 24))
    j.append_deletes([3, 4])
    j.append_puts([4], u64(44), u64(54))
    j.close()
    replay = read_journal(path)
    assert live(replay) == {1: (11, 21), 2: (32, 42), 4: (44, 54)}
    assert list(replay.slots) == [1, 2, 4]  # by slot
    assert replay.records == 1 + 3 + 1 + 2 + 2 + 1 and replay.bad_records == 0 and replay.torn_bytes == 0


def test_reopen_replays_and_appends_after(path):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([5], u64(15), u64(25))
    j.close()
    j, replay = Journal.open(path, HEADER)
    assert live(replay) == {5: (15, 25)}
    j.append_puts([6], u64(16), u64(26))
    j.close()
    assert live(read_journal(path)) == {5: (15, 25), 6: (16, 26)}


def test_torn_last_record_is_ignored_and_cut(path):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([1, 2], u64(11, 12), u64(21, 22))
    j.close()
    whole = open(path, "rb").read()
    with open(path, "ab") as fh:  # a writer killed inside its append: 30 bytes of a third record
        fh.write(whole[64:94])
    replay = read_journal(path)
    assert live(replay) == {1: (11, 21), 2: (12, 22)} and replay.torn_bytes == 30
    j, replay = Journal.open(path, HEADER)
    assert os.path.getsize(path) == 3 * RECORD_BYTES  # cut back to the last whole record
    j.append_puts([3], u64(13), u64(23))
    j.close()
    replay = read_journal(path)
    assert live(replay) == {1: (11, 21), 2: (12, 22), 3: (13, 23)} and replay.torn_bytes == 0


def test_a_corrupt_record_is_skipped_and_counted(path, caplog):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([1, 2, 3], u64(11, 12, 13), u64(21, 22, 23))
    j.close()
    data = bytearray(open(path, "rb").read())
    data[2 * RECORD_BYTES + 20] ^= 0x40  # inside slot 2's record
    open(path, "wb").write(data)
    replay = read_journal(path)
    assert live(replay) == {1: (11, 21), 3: (13, 23)} and replay.bad_records == 1
    with caplog.at_level(logging.WARNING):
        j, replay = Journal.open(path, HEADER)
    j.close()
    assert "1 bad records skipped" in caplog.text
    assert live(read_journal(path)) == {1: (11, 21), 3: (13, 23)}
    assert read_journal(path).bad_records == 0  # rewritten without it


def test_records_of_another_layout_or_a_slot_out_of_range_are_skipped(path):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([1], u64(11), u64(21))
    j.header = Header(**{**{f: getattr(HEADER, f) for f in HEADER.__slots__}, "fingerprint": 0xBAD})
    j.append_puts([2], u64(12), u64(22))
    j.header = HEADER
    j.append_puts([100], u64(13), u64(23))  # num_slots is 100
    j.close()
    replay = read_journal(path)
    assert live(replay) == {1: (11, 21)} and replay.bad_records == 2


@pytest.mark.parametrize(("field", "value"), [("fingerprint", 0xF2), ("model_id", 0xA1), ("num_files", 8),
                                              ("block_bytes", 4096)])
def test_another_store_is_refused_unless_cold(path, caplog, field, value):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([1], u64(11), u64(21))
    j.close()
    other = Header(**{**{f: getattr(HEADER, f) for f in HEADER.__slots__}, field: value})
    with pytest.raises(JournalMismatchError, match=rf"holds 1 blocks of another store: {field} "
                                                   rf"{getattr(HEADER, field)} \(journal\) vs {value} \(asked\)"):
        Journal.open(path, other)
    assert live(read_journal(path)) == {1: (11, 21)}  # untouched by the refusal
    with caplog.at_level(logging.WARNING):
        j, replay = Journal.open(path, other, cold=True)
    j.close()
    assert replay.slots.size == 0 and "starting cold, 1 blocks discarded" in caplog.text
    assert read_journal(path).header == other and read_journal(path).slots.size == 0


def test_a_new_slot_count_is_taken(path):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([1, 60], u64(11, 12), u64(21, 22))
    j.close()
    smaller = Header(**{**{f: getattr(HEADER, f) for f in HEADER.__slots__}, "num_slots": 50})
    j, replay = Journal.open(path, smaller)
    j.close()
    assert live(replay) == {1: (11, 21)}
    assert read_journal(path).header == smaller and live(read_journal(path)) == {1: (11, 21)}


def test_a_corrupt_header_is_refused_unless_cold(path):
    j, _ = Journal.open(path, HEADER)
    j.close()
    data = bytearray(open(path, "rb").read())
    data[10] ^= 1
    open(path, "wb").write(data)
    with pytest.raises(JournalMismatchError, match="does not start with a valid header"):
        Journal.open(path, HEADER)
    j, replay = Journal.open(path, HEADER, cold=True)
    j.close()
    assert read_journal(path).header == HEADER


def test_compaction_keeps_exactly_the_live_blocks(path):
    j, _ = Journal.open(path, HEADER)
    for r in range(5):
        j.append_puts(np.arange(10), u64(*range(r * 10, r * 10 + 10)), u64(*range(10)))
        j.append_deletes(np.arange(0, 10, 2))
    before = live(read_journal(path))
    replay = read_journal(path)
    j.compact(replay.slots, replay.hashes, replay.checksums)
    assert os.path.getsize(path) == (1 + len(before)) * RECORD_BYTES
    assert live(read_journal(path)) == before == {s: (40 + s, s) for s in range(1, 10, 2)}
    j.append_puts([0], u64(99), u64(98))  # the writer appends to the new file
    j.close()
    assert live(read_journal(path))[0] == (99, 98)
    assert not os.path.exists(path + ".new")


def test_open_compacts_a_journal_mostly_dead(path):
    j, _ = Journal.open(path, HEADER)
    for _ in range(120):
        j.append_puts(np.arange(10), u64(*range(10)), u64(*range(10)))
        j.append_deletes(np.arange(10))
    j.append_puts([3], u64(7), u64(8))
    j.close()
    assert Journal.worth_compacting(read_journal(path).records, 1)
    j, replay = Journal.open(path, HEADER)
    j.close()
    assert live(replay) == {3: (7, 8)} and os.path.getsize(path) == 2 * RECORD_BYTES


def test_a_failed_append_is_cut_back(path, monkeypatch):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([1], u64(11), u64(21))
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[:40]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskSpaceError, match=r"cannot append 128 bytes \(2 records\) at 128: No space left"):
        j.append_puts([2, 3], u64(12, 13), u64(22, 23))
    monkeypatch.setattr(os, "write", real_write)
    assert os.path.getsize(path) == 2 * RECORD_BYTES
    j.append_puts([4], u64(14), u64(24))
    j.close()
    replay = read_journal(path)
    assert live(replay) == {1: (11, 21), 4: (14, 24)} and replay.torn_bytes == 0 and replay.bad_records == 0


def test_another_instances_journal_is_read_read_only(path):
    j, _ = Journal.open(path, HEADER)
    j.append_puts([1], u64(11), u64(21))
    j.close()
    os.chmod(path, 0o400)
    before = os.stat(path)
    with open(path, "ab") as fh:  # that writer is mid-append
        fh.write(b"KVBJ\x01")
    os.chmod(path, 0o400)
    replay = read_journal(path)
    assert live(replay) == {1: (11, 21)} and replay.torn_bytes == 5
    assert os.stat(path).st_size == before.st_size + 5  # nothing cut: not ours


def test_missing_or_empty_journal(path):
    with pytest.raises(DiskError, match="cannot open journal"):
        read_journal(path)
    assert parse(b"").header is None
    open(path, "wb").close()  # empty: a new journal
    j, replay = Journal.open(path, HEADER)
    j.close()
    assert replay.slots.size == 0 and read_journal(path).header == HEADER


def test_delete_record_kind(path):
    j, _ = Journal.open(path, HEADER)
    j.append_deletes([9])
    j.close()
    rec = struct.unpack(RECORD_FMT, open(path, "rb").read()[64:128])
    assert rec[2] == DELETE and rec[5] == 9
