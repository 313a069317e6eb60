"""Shared-memory lanes (issue 12) through real processes: small transfers go through the lane byte
for byte, layer progress comes back through it, a worker killed with lane requests in flight fails
them (never reported loaded) and the next generation maps the lane again, a lane a worker must not
trust is refused while the registration stands, a corrupt lane makes the engine fall back to
ZeroMQ, and lane segments are private and swept when their engine dies."""
from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from kvbm._fast.lane import spin as spin_lanes
from kvbm.errors import KvbmError, PermissionRefusedError, TransferError
from kvbm.shm import SHM_DIR, clean_stale_segments
from kvbm.transfer.lane import EngineLane
from kvbm.wire import protocol as P
from kvbm.wire.bell import Bell, Ringer
from kvbm.workers.lanes import WorkerBell, WorkerLane
from tests.support.pipeline_harness import wait_for

DEADLINE = 30.0
DONE_TAIL = 384      # byte offset of the completion cursor in a lane segment (tests/unit/test_lane.py)


def _lane_pipeline(make_pipeline, **kw):
    kw.setdefault("device_blocks", 64)
    kw.setdefault("host_blocks", 64)
    pipe = make_pipeline(transport="ipc", **kw)    # lanes need shared memory: never over TCP
    tm = pipe.kv.transfers
    wait_for(lambda: all(lane["gen"] for lane in tm.stats()["lanes"].values()) and len(tm.stats()["lanes"]) == 2,
             DEADLINE, "both workers mapping their lane")
    return pipe, tm


def _round_trip(pipe, tm, dev: int, host: int, rng) -> None:
    """Random bytes in device block `dev` go to host block `host` and back over a poisoned G1."""
    pipe.fill_random([dev], rng)
    expected = pipe.snapshot([dev])
    tm.submit(P.Path.D2H, [dev], [host]).result(DEADLINE)
    pipe.poison()
    tm.submit(P.Path.H2D, [host], [dev]).result(DEADLINE)
    assert np.array_equal(pipe.snapshot([dev]), expected)


def test_single_block_transfers_ride_the_lane_byte_for_byte(make_pipeline, rng):
    pipe, tm = _lane_pipeline(make_pipeline)
    blocks = list(range(16))
    pipe.fill_random(blocks, rng)
    expected = pipe.snapshot(blocks)
    for b in blocks:   # one at a time: each goes straight into the lane
        tm.submit(P.Path.D2H, [b], [40 + b]).result(DEADLINE)
    pipe.poison()
    for b in blocks:
        tm.submit(P.Path.H2D, [40 + b], [b]).result(DEADLINE)
    assert np.array_equal(pipe.snapshot(blocks), expected)
    assert (pipe.snapshot([20, 30]) == 0xA5).all()
    lanes = tm.stats()["lanes"]
    assert lanes["d2h"]["requests"] >= 16 and lanes["h2d"]["requests"] >= 16


def test_bursts_past_the_window_queue_and_still_go_through_the_lane(make_pipeline, rng):
    pipe, tm = _lane_pipeline(make_pipeline)
    pipe.fill_random(range(64), rng)
    expected = pipe.snapshot(range(64))
    futures = [tm.submit(P.Path.D2H, [b], [63 - b]) for b in range(64)]   # WINDOW straight in, the rest coalesced
    for f in futures:
        f.result(DEADLINE)
    pipe.poison()
    futures = [tm.submit(P.Path.H2D, [63 - b], [b], layers=True) for b in range(64)]
    for f in futures:
        f.result(DEADLINE)
        assert f.layers_ready == pipe.device_layout.config.num_layers
    assert np.array_equal(pipe.snapshot(range(64)), expected)


def test_layer_progress_comes_back_through_the_lane(make_pipeline, rng):
    pipe, tm = _lane_pipeline(make_pipeline)
    pipe.fill_random([3], rng)
    expected = pipe.snapshot([3])
    tm.submit(P.Path.D2H, [3], [9]).result(DEADLINE)
    pipe.poison()
    fut = tm.submit(P.Path.H2D, [9], [3], layers=True)
    seen = []
    fut.add_layer_callback(seen.append)
    assert fut.wait_layer(pipe.device_layout.config.num_layers - 1, DEADLINE)
    fut.result(DEADLINE)
    assert seen == list(range(pipe.device_layout.config.num_layers))
    assert np.array_equal(pipe.snapshot([3]), expected)


def _park_io_thread(tm) -> threading.Event:
    """Parks the TransferManager's I/O thread before its next poll, outside its turn (so not
    holding _io_lock), until the returned event is set; returns once it is parked. What a waiter
    then finds settled, it settled itself: no race with the I/O thread to assert on."""
    parked, go = threading.Event(), threading.Event()
    poller = tm._poller
    poll = poller.poll

    def gated_poll(timeout=None):
        parked.set()
        go.wait()
        return poll(timeout)

    poller.poll = gated_poll
    tm._wake()                     # ends the poll it may be in now: its next one parks
    if not parked.wait(DEADLINE):
        go.set()
        raise AssertionError("the I/O thread never parked")
    return go


def _completion_in(lane) -> None:
    """Waits (untimed by the request) until the lane holds a completion: result()'s single spin
    then always finds it, however late a loaded machine ran the worker."""
    wait_for(lambda: spin_lanes([lane.ring], True, 1000.0), DEADLINE, "a completion in the lane")


def test_a_waiting_thread_settles_its_own_small_request(make_pipeline, rng):
    """wait_spin_us: result() of a 1-block lane request spins on the lane and settles the
    completion itself (no hand-off from the I/O thread, parked here); byte for byte, finalize
    once, budget back."""
    pipe, tm = _lane_pipeline(make_pipeline, wait_spin_us=100_000)
    go = _park_io_thread(tm)
    finalized = []
    try:
        for b in range(20):
            pipe.fill_random([b], rng)
            expected = pipe.snapshot([b])
            fut = tm.submit(P.Path.D2H, [b], [40 + b],
                            finalize=lambda outcome, b=b: finalized.append((b, outcome.ok)))
            _completion_in(tm._paths[P.Path.D2H].lane)
            assert fut.result(DEADLINE).blocks == 1
            pipe.poison()
            back = tm.submit(P.Path.H2D, [40 + b], [b])
            _completion_in(tm._paths[P.Path.H2D].lane)
            back.result(DEADLINE)
            assert np.array_equal(pipe.snapshot([b]), expected)
        lanes = tm.stats()["lanes"]
        assert lanes["d2h"]["waiter_settled"] == 20 and lanes["h2d"]["waiter_settled"] == 20
    finally:
        go.set()
    assert finalized == [(b, True) for b in range(20)]
    assert tm.budget.used == 0


def test_with_no_wait_spin_the_io_thread_settles_everything(make_pipeline, rng):
    pipe, tm = _lane_pipeline(make_pipeline, wait_spin_us=0)
    for b in range(8):
        _round_trip(pipe, tm, b, 40 + b, rng)
    lanes = tm.stats()["lanes"]
    assert lanes["d2h"]["waiter_settled"] == lanes["h2d"]["waiter_settled"] == 0
    assert lanes["d2h"]["requests"] >= 8


def test_waiters_on_many_threads_and_callbacks_that_submit_get_every_byte(make_pipeline, rng):
    """Four threads doing round trips at once, each waiter possibly settling others' completions,
    and a done callback (run by whichever thread settles) submitting more work: all byte for byte,
    no deadlock, nothing left in flight."""
    import threading
    pipe, tm = _lane_pipeline(make_pipeline, wait_spin_us=100_000)
    pipe.fill_random(range(32), rng)
    expected = pipe.snapshot(range(32))
    chained, errors = [], []

    def worker(k: int) -> None:
        try:
            for i in range(6):
                b = k * 8 + i
                fut = tm.submit(P.Path.D2H, [b], [32 + b])
                # from a callback: submit on the settling thread never waits for budget it holds up
                fut.add_done_callback(lambda _f, b=b: chained.append(tm.submit(P.Path.D2H, [b], [32 + b])))
                fut.result(DEADLINE)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    # a future's callbacks run just after its waiters are woken: the last ones may still be running
    wait_for(lambda: len(chained) == 24, DEADLINE, "every done callback's submit")
    for f in chained:
        f.result(DEADLINE)
    pipe.poison()
    for k in range(4):
        for i in range(6):
            b = k * 8 + i
            tm.submit(P.Path.H2D, [32 + b], [b]).result(DEADLINE)
    moved = [k * 8 + i for k in range(4) for i in range(6)]
    assert np.array_equal(pipe.snapshot(moved), expected[moved])
    wait_for(lambda: tm.budget.used == 0, DEADLINE, "the budget returned")


def test_close_while_a_waiter_spins_on_its_lane(make_pipeline):
    """close() from one thread while another waits in result() (spinning first) on a request the
    worker holds (gated by worker_delay_ms): the waiter's future fails, nothing hangs; close()
    unmaps no lane a waiter still spins on (TransferManager._spinners)."""
    import threading
    import time
    pipe, tm = _lane_pipeline(make_pipeline, wait_spin_us=100_000, worker_delay_ms=3000)
    fut = tm.submit(P.Path.D2H, [1], [2])
    out = []

    def wait() -> None:
        try:
            out.append(fut.result(DEADLINE))
        except Exception as err:  # noqa: BLE001 - checked below
            out.append(err)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.02)              # inside its spin (100 ms) unless the machine is very busy
    tm.close(timeout=1.0)
    t.join(DEADLINE)
    assert not t.is_alive() and len(out) == 1 and isinstance(out[0], TransferError), out


def test_lanes_off_sends_everything_over_zeromq(make_pipeline, rng):
    pipe = make_pipeline(transport="ipc", device_blocks=64, host_blocks=64, lanes=False)
    tm = pipe.kv.transfers
    _round_trip(pipe, tm, 1, 2, rng)
    assert tm.stats()["lanes"] == {}


def test_every_submission_is_counted_once_when_close_fails_it(make_pipeline):
    """Submissions in the lane, in the queue and racing close are all failed by close() and each
    counted submitted once: submitted == completed + failed afterwards."""
    pipe, tm = _lane_pipeline(make_pipeline)
    d2h = pipe.worker_pids()["d2h"]
    os.kill(d2h, signal.SIGSTOP)        # gate it: nothing completes before close
    futures = [tm.submit(P.Path.D2H, [b], [b]) for b in range(12)]   # the window's worth in the lane, the rest queued
    tm.close(timeout=5.0)
    os.kill(d2h, signal.SIGCONT)
    for f in futures:
        with pytest.raises(TransferError):
            f.result(DEADLINE)
    totals = tm.metrics.totals()
    assert totals["submitted"] == 12 and totals["completed"] + totals["failed"] == 12, totals


def test_a_worker_killed_with_lane_requests_in_flight_fails_them_then_maps_the_lane_again(make_pipeline, rng):
    pipe, tm = _lane_pipeline(make_pipeline)
    d2h = pipe.worker_pids()["d2h"]
    os.kill(d2h, signal.SIGSTOP)        # gate it: the requests are surely in the lane, not run
    futures = [tm.submit(P.Path.D2H, [b], [b]) for b in range(3)]
    wait_for(lambda: tm.stats()["lanes"]["d2h"]["requests"] >= 3, DEADLINE, "three lane requests posted")
    os.kill(d2h, signal.SIGKILL)
    for f in futures:
        with pytest.raises(TransferError, match="died"):
            f.result(DEADLINE)
    wait_for(lambda: pipe.worker_pids().get("d2h") not in (None, d2h), DEADLINE, "a new d2h generation")
    wait_for(lambda: tm.stats()["lanes"]["d2h"]["gen"] > 1, DEADLINE, "the new generation mapping the lane")
    before = tm.stats()["lanes"]["d2h"]["requests"]
    _round_trip(pipe, tm, 5, 6, rng)
    assert tm.stats()["lanes"]["d2h"]["requests"] == before + 1


def test_a_ring_ahead_mark_a_killed_worker_left_is_cleared_for_its_successor(make_pipeline, rng):
    """A worker killed between marking a ring ahead and sending it leaves a mark with no ring
    behind it; the DONEs of the next generation would skip their rings while it stands."""
    pipe, tm = _lane_pipeline(make_pipeline, wait_spin_us=0)
    _round_trip(pipe, tm, 3, 7, rng)
    ring = tm._paths[P.Path.D2H].lane.ring
    wait_for(lambda: ring.states[1] == 1, DEADLINE, "the engine's I/O thread asleep on its lanes")
    assert ring.ring_engine_ahead() is True      # the dead worker's half-done ring ahead
    d2h = pipe.worker_pids()["d2h"]
    os.kill(d2h, signal.SIGKILL)
    wait_for(lambda: pipe.worker_pids().get("d2h") not in (None, d2h), DEADLINE, "a new d2h generation")
    wait_for(lambda: tm.stats()["lanes"]["d2h"]["gen"] > 1, DEADLINE, "the new generation mapping the lane")
    assert ring.states[2] == 0
    _round_trip(pipe, tm, 5, 6, rng)


def test_a_corrupt_completion_ring_falls_back_to_zeromq(make_pipeline, rng, caplog):
    pipe, tm = _lane_pipeline(make_pipeline)
    lane = tm._paths[P.Path.D2H].lane
    struct.pack_into("<Q", lane.segment.map, DONE_TAIL, 10**6)   # what no worker of ours writes
    with caplog.at_level("ERROR", logger="kvbm.transfer.manager"):
        wait_for(lambda: tm.stats()["lanes"]["d2h"]["broken"], DEADLINE, "the engine noticing the corrupt lane")
    assert "ahead" in tm.stats()["lanes"]["d2h"]["broken"]
    posted = tm.stats()["lanes"]["d2h"]["requests"]
    _round_trip(pipe, tm, 7, 8, rng)                          # over ZeroMQ now (d2h's lane is broken)
    assert tm.stats()["lanes"]["d2h"]["requests"] == posted


def test_malformed_lane_records_get_an_error_and_the_worker_goes_on(make_pipeline, rng):
    """A record out of the engine's layout (written past submit()'s checks) is answered ERROR over
    ZeroMQ, with its text; the worker and the lane go on serving."""
    pipe, tm = _lane_pipeline(make_pipeline)
    lane = tm._paths[P.Path.D2H].lane
    with lane.lock:
        assert lane.ring.post(987654, lane.gen, 0, 0, np.array([10**6]), np.array([1])) in (1, 2)
    if lane.worker_bell:
        Ringer().ring(lane.worker_bell)
    wait_for(lambda: pipe.status()["workers"]["d2h"].get("malformed", 0) >= 1, DEADLINE, "the worker refusing it")
    _round_trip(pipe, tm, 2, 3, rng)


def test_lane_segments_are_private_and_removed_at_close(make_pipeline):
    pipe, tm = _lane_pipeline(make_pipeline)
    names = [q.lane.segment.name for q in tm._paths.values() if q.lane is not None]
    for name in names:
        st = os.stat(os.path.join(SHM_DIR, name))
        assert stat.S_IMODE(st.st_mode) == 0o600 and name.startswith(f"kvbm-{pipe.config.instance_id}-lane-")
    rundir = pipe.config.resolved_runtime_dir()
    bells = [p for p in os.listdir(rundir) if p.startswith("bell-")]
    assert len(bells) == 3   # the engine's and each path worker's
    assert all(stat.S_IMODE(os.stat(os.path.join(rundir, p)).st_mode) == 0o600 for p in bells)
    pipe.close()
    assert not any(os.path.exists(os.path.join(SHM_DIR, n)) for n in names)
    assert not os.path.exists(rundir) or not [p for p in os.listdir(rundir) if p.startswith("bell-e")]


def test_a_dead_engines_lanes_are_swept(tmp_path):
    """By the instance's start-up sweep (clean_stale_segments), scoped to a test instance: the
    user-wide sweep would also take what concurrent tests planted."""
    inst = f"tsweep{os.getpid()}"
    code = ("import os, time; from kvbm.transfer.lane import EngineLane; "
            f"lane = EngineLane('{inst}', 'eng-x', 8); print(lane.segment.name, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        name = proc.stdout.readline().strip()
        assert os.path.exists(os.path.join(SHM_DIR, name))
        assert name not in clean_stale_segments(inst, include_host_pool=False)   # its engine lives: kept
        proc.kill()
        proc.wait(10)
        assert name in clean_stale_segments(inst, include_host_pool=False)
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        proc.kill()
        proc.wait(10)


def test_a_worker_refuses_lanes_it_must_not_trust(tmp_path):
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    bells = WorkerBell(f"ipc://{rundir}/d2h.sock", "d2h")
    engine_bell = Bell(str(rundir / "bell-e1.sock"))
    lane = EngineLane("tlanes", "eng-a", 8)
    try:
        offer = lane.offer(engine_bell.path)
        attached = WorkerLane.attach(offer, "eng-a", bells)            # the engine that made it: fine
        attached.close()
        with pytest.raises(KvbmError, match="belongs to engine 'eng-a'"):
            WorkerLane.attach(offer, "eng-b", bells)                   # another engine's lane
        elsewhere = Bell(str(tmp_path / "bell-x.sock"))
        with pytest.raises(ValueError, match="not in the runtime dir"):
            WorkerLane.attach(dict(offer, bell=elsewhere.path), "eng-a", bells)
        elsewhere.close()
        (rundir / "d2h.sock.lock").write_text("")
        with pytest.raises(ValueError, match="not a socket"):
            WorkerLane.attach(dict(offer, bell=str(rundir / "d2h.sock.lock")), "eng-a", bells)
        os.chmod(lane.segment.path, 0o644)
        with pytest.raises(PermissionRefusedError):
            WorkerLane.attach(offer, "eng-a", bells)                   # not private: never trusted
        with pytest.raises(KvbmError):
            WorkerLane.attach(dict(offer, segment="kvbm-nonexistent-lane-1-0"), "eng-a", bells)
        tcp = WorkerBell("tcp://127.0.0.1:5555", "d2h")
        with pytest.raises(KvbmError, match="TCP"):
            WorkerLane.attach(offer, "eng-a", tcp)
        tcp.close()
    finally:
        lane.close()
        engine_bell.close()
        bells.close()


def test_a_record_the_ring_cannot_hold_is_refused_without_a_trace():
    """post() answers False (the caller takes the queue's way) for blocks the ring cannot take, and
    leaves nothing posted: no wire waits for a completion that can never come."""
    import time as _time

    from kvbm.transfer.futures import TransferFuture
    from kvbm.transfer.records import Request, RequestState, Submission, WireRequest

    lane = EngineLane("tpost", "eng-p", 4)
    try:
        sub = Submission(P.Path.D2H, TransferFuture(P.Path.D2H, 5, 1), 0, 0, False, None, None, _time.monotonic())
        for src in (np.arange(5, dtype=np.int64), np.arange(2, dtype=np.int32)):   # too many; not int64
            req = Request(1, sub, src, src)
            assert not lane.post(WireRequest(1, [req], 1, 0.0, 1.0), Ringer(), {}, 4)
            assert lane.posted == [] and req.state is RequestState.QUEUED
        assert lane.ring.counts == (0, 0, 0, 0)
    finally:
        lane.close()


def test_after_the_last_take_at_close_nothing_more_is_posted():
    """close() takes what was posted one last time (final=True): a submit racing it is refused
    from then on (it takes the queue's way, which fails it as closed), never left in a lane that
    no one reads, or written into one about to be unmapped."""
    import time as _time

    from kvbm.transfer.futures import TransferFuture
    from kvbm.transfer.records import Request, RequestState, Submission, WireRequest

    lane = EngineLane("tlast", "eng-l", 4)
    try:
        sub = Submission(P.Path.D2H, TransferFuture(P.Path.D2H, 1, 1), 0, 0, False, None, None, _time.monotonic())
        one = np.arange(1, dtype=np.int64)
        first = Request(1, sub, one, one)
        assert lane.post(WireRequest(1, [first], 1, 0.0, 1.0), Ringer(), {}, 4)
        assert [w.rid for w in lane.take_posted(final=True)] == [1]
        late = Request(2, sub, one, one)
        assert not lane.post(WireRequest(2, [late], 1, 0.0, 1.0), Ringer(), {}, 4)
        assert not lane.post_wire(3, 1, 0, False, one, one, Ringer())
        assert lane.posted == [] and late.state is RequestState.QUEUED
        assert lane.ring.counts[0] == 1              # only the first record reached the ring
    finally:
        lane.close()


def test_a_ring_ahead_that_cannot_be_sent_leaves_no_mark_and_raises_nothing(caplog):
    """The worker's rings follow a CUDA launch: an error there would answer a request whose copy
    still runs. A send that fails (here: the bell's folder is gone) is logged, a ring ahead's mark
    is cleared (the DONE rings as usual), and nothing is raised; the DONE stays in the ring."""
    lane = EngineLane("tring", "eng-r", 4)
    try:
        worker = WorkerLane(lane.segment, lane.ring, "/nonexistent-kvbm-dir/" + "b" * 120 + "/bell.sock", Ringer())
        assert lane.ring.engine_sleep() is True
        worker.ring_ahead()
        assert lane.ring.states[2] == 0
        assert "failed" in caplog.text
        assert worker.complete(1, 8, 0, 0) is True and lane.ring.take_done()[0][0] == 1
    finally:
        lane.close()
