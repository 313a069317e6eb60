"""The lane ring (kvbm._fast.lane): records both ways, full rings, the sleep handshake, and a
segment holding what no peer of ours writes (LaneError, never a read outside the segment)."""
from __future__ import annotations

import ctypes
import mmap
import struct
from array import array

import numpy as np
import pytest

from kvbm._fast.lane import DONE_LAYER, DONE_OK, FLAG_LAYERS, FLAG_RING_AHEAD, Lane, LaneError, bytes_needed

HEADER = 640          # sizeof(LaneHeader): 4 lines of fields, then six cursor lines
REQ_TAIL, REQ_HEAD, DONE_TAIL, DONE_HEAD = 256, 320, 384, 448


@pytest.fixture
def mapped():
    def make(req_slots=4, done_slots=8, max_blocks=8):
        size = bytes_needed(req_slots, done_slots, max_blocks)
        m = mmap.mmap(-1, size)
        addr = ctypes.addressof((ctypes.c_char * size).from_buffer(m))
        engine = Lane.init(addr, size, "eng-1", req_slots, done_slots, max_blocks, m)
        worker = Lane(addr, size, m)
        return m, engine, worker
    return make


def test_requests_and_completions_round_trip(mapped):
    _, engine, worker = mapped()
    assert worker.engine == "eng-1" and (worker.req_slots, worker.done_slots, worker.max_blocks) == (4, 8, 8)
    assert engine.post(11, 3, -2, FLAG_LAYERS, array("q", [5, 6, 7]), np.array([1, 2, 3])) == 1
    assert engine.post(12, 3, 4, 0, np.array([9]), array("q", [0])) == 1
    got = worker.take(10)
    assert [(r[0], r[1], r[2], r[3]) for r in got] == [(11, 3, -2, FLAG_LAYERS), (12, 3, 4, 0)]
    assert got[0][4].tolist() == [5, 6, 7] and got[0][5].tolist() == [1, 2, 3]
    assert got[1][4].tolist() == [9] and got[1][5].tolist() == [0]
    assert worker.take(10) == []
    assert worker.put_done(11, DONE_LAYER, 0, 0, 0, 0) == 1
    assert worker.put_done(11, DONE_OK, 0, 4096, 7, 9) == 1
    assert engine.take_done() == [(11, DONE_LAYER, 0, 0, 0, 0), (11, DONE_OK, 0, 4096, 7, 9)]
    assert engine.take_done() == []


def test_full_rings_refuse_and_layer_records_leave_room_for_dones(mapped):
    _, engine, worker = mapped(req_slots=2, done_slots=4)
    one = array("q", [1])
    assert engine.post(1, 1, 0, 0, one, one) == 1
    assert engine.post(2, 1, 0, 0, one, one) == 1
    assert engine.post(3, 1, 0, 0, one, one) == 0         # full: nothing written
    assert [r[0] for r in worker.take(1)] == [1]            # the limit is honoured
    assert engine.post(3, 1, 0, 0, one, one) == 1
    assert [r[0] for r in worker.take(10)] == [2, 3]
    assert worker.put_done(1, DONE_LAYER, 0, 0, 0, 0) == 1
    assert worker.put_done(1, DONE_LAYER, 1, 0, 0, 0) == 1
    assert worker.put_done(1, DONE_LAYER, 2, 0, 0, 0) == 0  # would leave less than req_slots for DONEs
    assert worker.put_done(1, DONE_OK, 0, 1, 0, 0) == 1
    assert worker.put_done(2, DONE_OK, 0, 1, 0, 0) == 1
    assert worker.put_done(3, DONE_OK, 0, 1, 0, 0) == 0     # no room at all: the worker answers over ZeroMQ
    assert [d[0] for d in engine.take_done()] == [1, 1, 1, 2]


def test_sleep_handshake_never_loses_a_wakeup(mapped):
    _, engine, worker = mapped()
    one = array("q", [1])
    assert worker.worker_sleep() is True
    assert engine.post(1, 1, 0, 0, one, one) == 2            # the worker sleeps: ring its bell
    worker.worker_wake()
    assert engine.post(2, 1, 0, 0, one, one) == 1
    assert worker.worker_sleep() is False                    # work is waiting: it must not block
    assert worker.has_requests()
    assert len(worker.take(10)) == 2 and not worker.has_requests()
    assert engine.engine_sleep() is True
    assert worker.put_done(1, DONE_OK, 0, 1, 0, 0) == 2
    engine.engine_wake()
    assert worker.put_done(2, DONE_OK, 0, 1, 0, 0) == 1
    assert engine.engine_sleep() is False


def test_the_worker_rings_ahead_of_a_flagged_completion_once(mapped):
    _, engine, worker = mapped()
    one = array("q", [1])
    assert engine.post(1, 1, 0, FLAG_RING_AHEAD, one, one) == 1
    assert worker.take(10)[0][3] == FLAG_RING_AHEAD           # the flag reaches the worker
    assert worker.ring_engine_ahead() is False                # the engine is awake: nothing to ring
    assert engine.engine_sleep() is True
    assert worker.ring_engine_ahead() is True                 # copy starting: ring ahead, once
    assert worker.ring_engine_ahead() is False
    assert worker.put_done(1, DONE_OK, 0, 1, 0, 0) == 1       # that ring is pending: the DONE won't ring
    assert engine.states == (0, 1, 1)
    engine.engine_wake()
    assert engine.take_engine_rung() is True
    assert engine.take_engine_rung() is False
    assert [d[0] for d in engine.take_done()] == [1]
    assert engine.engine_sleep() is True                      # asleep again, the ring drained:
    assert worker.put_done(2, DONE_OK, 0, 1, 0, 0) == 2       # the next DONE must ring


def test_skip_drops_what_a_predecessor_left(mapped):
    _, engine, worker = mapped()
    one = array("q", [1])
    engine.post(1, 1, 0, 0, one, one)
    engine.post(2, 1, 0, 0, one, one)
    assert worker.skip() == 2 and worker.take(10) == []


@pytest.mark.parametrize("src,dst", [([], []), ([1, 2], [1]), (list(range(9)), list(range(9)))])
def test_bad_requests_are_refused_before_anything_is_written(mapped, src, dst):
    _, engine, worker = mapped()
    with pytest.raises(LaneError):
        engine.post(1, 1, 0, 0, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64))
    assert worker.take(10) == []


def test_a_wrong_dtype_is_refused(mapped):
    _, engine, _ = mapped()
    with pytest.raises(ValueError):
        engine.post(1, 1, 0, 0, np.array([1], dtype=np.int32), np.array([1], dtype=np.int32))


def test_a_foreign_or_short_segment_is_refused(mapped):
    m, _, _ = mapped()
    addr = ctypes.addressof((ctypes.c_char * len(m)).from_buffer(m))
    with pytest.raises(LaneError, match="segment of 100 bytes"):
        Lane(addr, 100, m)                                   # shorter than the header
    with pytest.raises(LaneError, match="describes"):
        Lane(addr, HEADER + 64, m)                           # shorter than its header says
    zeros = mmap.mmap(-1, len(m))
    with pytest.raises(LaneError, match="not a lane segment"):
        Lane(ctypes.addressof((ctypes.c_char * len(zeros)).from_buffer(zeros)), len(zeros), zeros)
    struct.pack_into("<Q", m, 16, 3)                         # req_slots not a power of two
    with pytest.raises(LaneError, match="out of range"):
        Lane(addr, len(m), m)


def test_corrupt_cursors_raise_instead_of_reading_past_the_ring(mapped):
    m, engine, worker = mapped()
    struct.pack_into("<Q", m, REQ_TAIL, 1000)                # 1000 requests "posted" into 4 slots
    with pytest.raises(LaneError, match="ahead"):
        worker.take(10)
    struct.pack_into("<Q", m, REQ_TAIL, 0)
    struct.pack_into("<Q", m, DONE_TAIL, 99)
    with pytest.raises(LaneError, match="ahead"):
        engine.take_done()
    struct.pack_into("<Q", m, DONE_TAIL, 0)
    struct.pack_into("<Q", m, DONE_HEAD, 5)                  # the engine "took" more than was posted
    with pytest.raises(LaneError, match="backwards"):
        worker.put_done(1, DONE_OK, 0, 1, 0, 0)


def test_a_record_naming_too_many_blocks_is_refused(mapped):
    m, engine, worker = mapped()
    engine.post(1, 1, 0, 0, array("q", [1]), array("q", [1]))
    struct.pack_into("<I", m, HEADER + 20, 500)              # n of the first record, past max_blocks
    with pytest.raises(LaneError, match="names 500 blocks"):
        worker.take(10)
