"""TransferManager against a scripted kvbm-workers (one thread-free fake: a control ROUTER, an events
XPUB and one ROUTER per path worker, all ipc:// under tmp_path), so that event orders a real
supervisor produces only by chance (a generation dying between a register and its reply, "stopping"
before "died", a STALE reply) can be played exactly."""
from __future__ import annotations

import logging
import subprocess
import threading
import time

import numpy as np
import pytest
import zmq

from kvbm.errors import BackpressureError, KvbmError, LifecycleError, TransferError
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.transfer.link import REGISTER_RETRIES
from kvbm.transfer.manager import WINDOW, TransferManager
from kvbm.transfer.scheduler import Gate
from kvbm.wire import protocol as P
from kvbm.wire.channel import bind_socket, make_context
from tests.support.pipeline_harness import wait_for

DEADLINE = 10.0
LAYOUT = LayoutConfig(num_layers=4, outer_dim=2, page_size=16, inner_dim=64, dtype="bfloat16")
DEV_BLOCKS, HOST_BLOCKS = 64, 128


class FakeWorkers:
    """Answers the way kvbm-workers does, one message at a time, when the test says so."""

    def __init__(self, tmp_path) -> None:
        self.ctx = make_context()
        self.control_ep = f"ipc://{tmp_path}/ctl"
        self.events_ep = f"ipc://{tmp_path}/ev"
        self.control = bind_socket(self.ctx, zmq.ROUTER, self.control_ep)
        self.events = self.ctx.socket(zmq.XPUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(self.events_ep)
        self.workers = {p: bind_socket(self.ctx, zmq.ROUTER, f"ipc://{tmp_path}/w{int(p)}") for p in P.WORKER_PATHS}
        self.ident: dict[P.Path, bytes] = {}

    def welcome(self) -> dict:
        return {"t": P.MsgType.WELCOME, "events": self.events_ep, "max_batch_blocks": 256, "cuda": False,
                "workers": {p.label: {"path": int(p), "endpoint": f"{self.control_ep[:-3]}w{int(p)}", "gen": 1}
                            for p in P.WORKER_PATHS}}

    def recv(self, path: P.Path, t: str | None = None, timeout: float = DEADLINE) -> dict:
        """The next message the engine sent to `path`'s worker (of type t, skipping others)."""
        sock = self.workers[path]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                raise AssertionError(f"no {t or 'message'} for the {path.label} worker within {timeout} s")
            ident, payload = sock.recv_multipart()
            self.ident[path] = ident
            msg = P.decode(payload)
            if t is None or msg["t"] == t:
                return msg

    def pending(self, path: P.Path, timeout: float = 0.2) -> list[dict]:
        out = []
        while self.workers[path].poll(int(timeout * 1000)):
            ident, payload = self.workers[path].recv_multipart()
            self.ident[path] = ident
            out.append(P.decode(payload))
        return out

    def reply(self, path: P.Path, msg: dict) -> None:
        self.workers[path].send_multipart([self.ident[path], P.encode(msg)])

    def registered(self, path: P.Path, rid: int, gen: int, pid: int | None = None) -> None:
        self.reply(path, {"t": P.MsgType.REGISTERED, "id": rid, "gen": gen} | ({"pid": pid} if pid else {}))

    def done(self, path: P.Path, rid: int, status=P.Status.OK, error: str = "", gen: int = 1) -> None:
        self.reply(path, P.make_done(rid, status, error, gen=gen))

    def event(self, kind: str, path: P.Path | None, gen: int, **extra) -> None:
        self.events.send(P.encode(P.make_event(kind, path, gen, **extra)))

    def close(self) -> None:
        for sock in [self.control, self.events, *self.workers.values()]:
            sock.close(0)
        self.ctx.term()


@pytest.fixture
def fake(tmp_path):
    fw = FakeWorkers(tmp_path)
    yield fw
    fw.close()


def start(fake: FakeWorkers, worker_pids: dict[P.Path, int] | None = None, **kw) -> TransferManager:
    """connect() + register() against the fake; every path registered with gen 1 (by the process
    `worker_pids` names for it, if any)."""
    tm = TransferManager(fake.control_ep, **kw)
    errors: list[BaseException] = []

    def connect_and_register():
        try:
            tm.connect(timeout=DEADLINE)
            dev = BlockLayout(LAYOUT, LayoutType.LAYER_SEPARATE, DEV_BLOCKS)
            host = BlockLayout(LAYOUT, LayoutType.FULLY_CONTIGUOUS, HOST_BLOCKS)
            tm.register(dev, host, {"kind": "shm", "segment": "x", "size": 1, "buffers": []}, timeout=DEADLINE)
        except BaseException as err:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(err)

    th = threading.Thread(target=connect_and_register)
    th.start()
    assert fake.control.poll(int(DEADLINE * 1000))
    ident, _hello = fake.control.recv_multipart()
    fake.control.send_multipart([ident, P.encode(fake.welcome())])
    assert fake.events.poll(int(DEADLINE * 1000))  # the engine's subscription arrived
    fake.events.recv()
    for path in P.WORKER_PATHS:
        reg = fake.recv(path, P.MsgType.REGISTER)
        fake.registered(path, reg["id"], 1, (worker_pids or {}).get(path))
    th.join(DEADLINE)
    if errors:
        raise errors[0]
    return tm


@pytest.fixture
def make_tm(fake):
    made: list[TransferManager] = []

    def make(**kw) -> TransferManager:
        made.append(start(fake, **kw))
        return made[-1]

    yield make
    for tm in made:
        tm.close(timeout=2.0)


def gen_of(tm: TransferManager, path: P.Path) -> int:
    return tm.stats()["generations"][path.label]


# ---- 1. registration across restarts ---------------------------------------------------------

def test_generation_that_dies_before_answering_the_register_does_not_strand_the_path(fake, make_tm):
    tm = make_tm(request_timeout_s=DEADLINE)
    fake.event("died", P.Path.D2H, 1, pid=1, exitcode=-9)
    fake.recv(P.Path.D2H, P.MsgType.REGISTER)          # sent for gen 2, which dies before replying
    fake.event("started", P.Path.D2H, 2, pid=2)
    fake.event("died", P.Path.D2H, 2, pid=2, exitcode=-9)
    fake.event("started", P.Path.D2H, 3, pid=3)
    regs = [fake.recv(P.Path.D2H, P.MsgType.REGISTER)]  # gen 3 must be asked again
    regs += [m for m in fake.pending(P.Path.D2H) if m["t"] == P.MsgType.REGISTER]
    fake.registered(P.Path.D2H, regs[-1]["id"], 3)      # only the latest register_rid counts
    wait_for(lambda: gen_of(tm, P.Path.D2H) == 3, DEADLINE, "the d2h path registered with gen 3")
    fut = tm.submit(P.Path.D2H, [1], [2])
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    assert xfer["gen"] == 3
    fake.done(P.Path.D2H, xfer["id"], gen=3)
    assert fut.result(DEADLINE).blocks == 1


def test_a_rejected_re_registration_is_retried_then_fails_queued_work(fake, make_tm):
    tm = make_tm(request_timeout_s=30.0)
    fake.event("died", P.Path.D2H, 1, pid=1, exitcode=-9)
    fake.event("started", P.Path.D2H, 2, pid=2)
    wait_for(lambda: gen_of(tm, P.Path.D2H) == 0, DEADLINE, "the engine saw gen 1 die")
    fut = tm.submit(P.Path.D2H, [1], [2])
    t0 = time.monotonic()
    rids = []
    while len(rids) < REGISTER_RETRIES + 1:
        # Answer the latest registration only (the died and the started events each sent one).
        regs = [fake.recv(P.Path.D2H, P.MsgType.REGISTER)]
        regs += [m for m in fake.pending(P.Path.D2H, 0.05) if m["t"] == P.MsgType.REGISTER]
        rids.append(regs[-1]["id"])
        fake.done(P.Path.D2H, rids[-1], P.Status.ERROR, "cannot map the segment")
    with pytest.raises(TransferError, match=r"d2h worker rejected the registration .*cannot map the segment"):
        fut.result(DEADLINE)
    assert len(set(rids)) == len(rids)
    assert time.monotonic() - t0 < 15.0      # bounded, far below the 30 s request timeout
    assert tm.inflight_bytes == 0
    # A later generation is registered again.
    fake.event("started", P.Path.D2H, 3, pid=3)
    reg = fake.recv(P.Path.D2H, P.MsgType.REGISTER)
    fake.registered(P.Path.D2H, reg["id"], 3)
    wait_for(lambda: gen_of(tm, P.Path.D2H) == 3, DEADLINE, "the d2h path registered with gen 3")


# ---- 2. gates ----------------------------------------------------------------------------------

def test_layer_gate_opens_across_iterations_and_a_gate_that_never_opens_fails(fake, make_tm):
    tm = make_tm(gate_timeout_s=0.5)
    fut = tm.submit(P.Path.H2D, [1], [2], gate=Gate(layer=2))
    assert tm.stats()["held"] == 1
    tm.scheduler.reached(iteration=0)
    tm.scheduler.reached(iteration=1)
    assert tm.stats()["held"] == 0
    xfer = fake.recv(P.Path.H2D, P.MsgType.XFER)
    fake.done(P.Path.H2D, xfer["id"])
    fut.result(DEADLINE)

    stuck = tm.submit(P.Path.D2H, [3], [4], gate=Gate(iteration=99))
    assert tm.inflight_bytes == tm.block_bytes
    with pytest.raises(TransferError, match=r"gate Gate\(iteration=99, layer=None\) never opened"):
        stuck.result(DEADLINE)
    assert tm.stats()["held"] == 0 and tm.inflight_bytes == 0


# ---- 3. failure while a copy may still write -------------------------------------------------

class FakePool:
    """The host pool API HostTransfers uses, recording what it is asked."""

    def __init__(self, fail_register: bool = False) -> None:
        self.released: list[list[int]] = []
        self.registered: list[list[int]] = []
        self.fail_register = fail_register
        self.next = 0

    def lookup(self, hashes):
        return np.full(len(hashes), -1, np.int64)

    def allocate(self, n):
        out = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        return out

    def complete(self, blocks):
        pass

    def register(self, blocks, hashes, parents=None):
        if self.fail_register:
            raise KvbmError("registry: hash table full")
        self.registered.append(np.asarray(blocks).tolist())
        return blocks

    def release(self, blocks):
        self.released.append(np.asarray(blocks).tolist())

    def match(self, hashes, acquire=True):
        return np.arange(len(hashes), dtype=np.int64)


def test_stopping_fails_unsent_work_at_once_and_sent_work_on_the_died_event(fake, make_tm):
    tm = make_tm()
    sent = tm.submit(P.Path.D2H, [1], [2])
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    held = tm.submit(P.Path.D2H, [3], [4], gate=Gate(iteration=5))
    fake.event("stopping", None, 0)
    with pytest.raises(TransferError, match="kvbm-workers stopped"):
        held.result(DEADLINE)
    assert not sent.done()                       # its worker may still be copying
    fake.event("died", P.Path.D2H, 1, pid=1, exitcode=0)
    with pytest.raises(TransferError, match="d2h worker generation 1 .*died") as info:
        sent.result(DEADLINE)
    assert not info.value.blocks_may_be_written
    fake.done(P.Path.D2H, xfer["id"])            # a late reply changes nothing
    assert tm.inflight_bytes == 0
    with pytest.raises(TransferError, match="kvbm-workers stopped"):
        tm.submit(P.Path.D2H, [5], [6]).result(DEADLINE)


def test_died_before_stopping_is_tolerated(fake, make_tm):
    tm = make_tm()
    sent = tm.submit(P.Path.H2D, [1], [2])
    fake.recv(P.Path.H2D, P.MsgType.XFER)
    fake.event("died", P.Path.H2D, 1, pid=1, exitcode=0)
    fake.event("stopping", None, 0)
    with pytest.raises(TransferError, match="h2d worker generation 1 .*died"):
        sent.result(DEADLINE)
    wait_for(lambda: tm.stats()["generations"] == {"d2h": 0, "h2d": 0}, DEADLINE, "stopping handled")
    assert tm.inflight_bytes == 0


def test_stopping_without_died_fails_late_and_keeps_offload_host_blocks(fake, make_tm, caplog):
    from kvbm.transfer.host_offload import HostTransfers
    tm = make_tm()
    tm.stop_grace_s = 0.3
    pool = FakePool()
    ht = HostTransfers(tm, pool)
    off = ht.offload([1, 2, 3], [11, 12, 13])
    on = tm.submit(P.Path.H2D, [7], [8])
    fake.recv(P.Path.D2H, P.MsgType.XFER)
    fake.recv(P.Path.H2D, P.MsgType.XFER)
    fake.event("stopping", None, 0)
    for fut in (off, on):
        with pytest.raises(TransferError, match="may still be written") as info:
            fut.result(DEADLINE)
        assert info.value.blocks_may_be_written
    assert pool.released == [] and pool.registered == []   # allocated, unregistered: never reused
    assert ht.leaked_host_blocks == 3
    assert "leaving 3 host blocks allocated" in caplog.text
    assert tm.inflight_bytes == 0


def test_hard_deadline_says_the_blocks_may_still_be_written(fake, make_tm):
    tm = make_tm(request_timeout_s=0.2)
    fut = tm.submit(P.Path.H2D, [1], [2])
    fake.recv(P.Path.H2D, P.MsgType.XFER)   # never answered, the worker never dies
    with pytest.raises(TransferError, match=r"timed out after 0.6 s.*may still be written") as info:
        fut.result(DEADLINE)
    assert info.value.blocks_may_be_written


# ---- 4. budget -----------------------------------------------------------------------------------

def test_a_lock_holder_waiting_for_budget_does_not_deadlock_finalize(fake, make_tm):
    tm = make_tm(max_inflight_bytes=16384)       # one block
    pool_lock = threading.Lock()

    def finalize(outcome):
        with pool_lock:                           # as HostTransfers' finalize takes the pool lock
            return outcome.ok

    first = tm.submit(P.Path.D2H, [1], [2], finalize=finalize)
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    with pool_lock:
        fake.done(P.Path.D2H, xfer["id"])
        second = tm.submit(P.Path.D2H, [3], [4], timeout=5.0)   # waits for first's budget
    assert first.result(DEADLINE).value is True
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    fake.done(P.Path.D2H, xfer["id"])
    second.result(DEADLINE)
    assert tm.inflight_bytes == 0


def test_submit_from_the_io_thread_raises_backpressure_instead_of_hanging(fake, make_tm):
    tm = make_tm(max_inflight_bytes=16384)
    seen: list = []

    def on_layer(layer):
        if layer != 0:
            return
        try:
            tm.submit(P.Path.D2H, [5], [6])
        except BackpressureError as err:
            seen.append(err)

    fut = tm.submit(P.Path.H2D, [1], [2], layers=True)
    fut.add_layer_callback(on_layer)
    xfer = fake.recv(P.Path.H2D, P.MsgType.XFER)
    fake.reply(P.Path.H2D, P.make_layer(xfer["id"], 0))
    wait_for(lambda: seen, DEADLINE, "the callback's submit refused")
    fake.done(P.Path.H2D, xfer["id"])
    fut.result(DEADLINE)
    assert tm.inflight_bytes == 0


# ---- 5. closing races ----------------------------------------------------------------------------

def test_a_gated_release_racing_close_fails_the_submission(fake, make_tm):
    tm = make_tm()
    fut = tm.submit(P.Path.D2H, [1], [2], gate=Gate(iteration=3))
    # reached() took it out of the scheduler under its lock, then close() ran before the release.
    with tm.scheduler._lock:
        (_, sub, _), = tm.scheduler._held
        tm.scheduler._held.clear()
    tm.close(timeout=2.0)
    tm.scheduler._release([sub])
    with pytest.raises(TransferError, match="transfer manager is closed"):
        fut.result(DEADLINE)
    assert tm.inflight_bytes == 0
    assert tm.scheduler.hold(Gate(iteration=9), object()) is False


# ---- 6. one bad submission does not fail unrelated ones -------------------------------------

def test_bad_block_indices_raise_before_anything_is_queued(fake, make_tm):
    tm = make_tm()
    with pytest.raises(KvbmError, match=rf"d2h: destination block {HOST_BLOCKS} out of range \[0, {HOST_BLOCKS}\)"):
        tm.submit(P.Path.D2H, [0, 1], [5, HOST_BLOCKS])
    with pytest.raises(KvbmError, match=rf"h2d: destination block {DEV_BLOCKS} out of range \[0, {DEV_BLOCKS}\)"):
        tm.submit(P.Path.H2D, [HOST_BLOCKS - 1], [DEV_BLOCKS])
    with pytest.raises(KvbmError, match=r"d2h: source block -1 out of range"):
        tm.submit(P.Path.D2H, [-1], [0])
    with pytest.raises(KvbmError, match=r"1 destination block\(s\) named more than once"):
        tm.submit(P.Path.H2D, [1, 2], [3, 3])
    assert tm.inflight_bytes == 0 and tm.stats()["submitted"] == 0
    assert fake.pending(P.Path.D2H) == [] and fake.pending(P.Path.H2D) == []


def test_submissions_with_overlapping_destinations_are_not_merged(fake, make_tm):
    tm = make_tm()
    # Fill the window (distinct priorities: never coalesced), so a, b and c queue up together.
    window = [tm.submit(P.Path.H2D, [i], [40 + i], priority=10 + i) for i in range(WINDOW)]
    first = [fake.recv(P.Path.H2D, P.MsgType.XFER) for _ in window]
    a = tm.submit(P.Path.H2D, [1, 2], [10, 11])
    b = tm.submit(P.Path.H2D, [3, 4], [11, 12])    # same priority, shares block 11 with a
    c = tm.submit(P.Path.H2D, [5], [20])
    for x in first:
        fake.done(P.Path.H2D, x["id"])
    got = []
    while sum(map(len, got)) < 5:                  # a, b and c: 5 blocks
        x = fake.recv(P.Path.H2D, P.MsgType.XFER)
        dst = P.unpack_blocks(x["dst"], "dst", DEV_BLOCKS)
        got.append(sorted(dst.tolist()))
        ok = np.unique(dst).shape[0] == dst.shape[0]    # what a real worker checks
        fake.done(P.Path.H2D, x["id"], P.Status.OK if ok else P.Status.ERROR, "" if ok else "dst names a block twice")
    for f in window + [a, b, c]:
        f.result(DEADLINE)
    assert got == [[10, 11], [11, 12, 20]]


# ---- 7. offload finalize ------------------------------------------------------------------------

def test_offload_whose_register_raises_releases_its_host_blocks(fake, make_tm):
    from kvbm.transfer.host_offload import HostTransfers
    tm = make_tm()
    pool = FakePool(fail_register=True)
    fut = HostTransfers(tm, pool).offload([1, 2, 3], [11, 12, 13])
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    fake.done(P.Path.D2H, xfer["id"])
    with pytest.raises(TransferError, match="finalize failed: KvbmError: registry: hash table full"):
        fut.result(DEADLINE)
    assert pool.released == [[0, 1, 2]] and pool.registered == []
    assert tm.inflight_bytes == 0


# ---- 8. layer callbacks, STALE replies ----------------------------------------------------------

def test_late_layer_callback_sees_layers_in_order():
    from kvbm.transfer.futures import TransferFuture
    fut = TransferFuture(P.Path.H2D, 1, 4)
    fut._advance(2)
    seen: list[int] = []
    io_done = threading.Event()

    def advance_on_io_thread():
        fut._advance(4)
        io_done.set()

    io = threading.Thread(target=advance_on_io_thread)

    def fn(layer):
        seen.append(layer)
        if layer == 0:           # the I/O thread reports layers 2 and 3 during this catch-up
            io.start()
            io_done.wait(DEADLINE)   # the I/O thread leaves layers 2 and 3 to this delivery

    fut.add_layer_callback(fn)
    io.join(DEADLINE)
    assert seen == [0, 1, 2, 3]


def test_a_stale_reply_is_sent_again_once_to_the_new_generation(fake, make_tm):
    tm = make_tm()
    fut = tm.submit(P.Path.D2H, [1, 2], [3, 4])
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    fake.done(P.Path.D2H, xfer["id"], P.Status.STALE, "request for gen 1, this is gen 2", gen=2)
    reg = fake.recv(P.Path.D2H, P.MsgType.REGISTER)
    fake.registered(P.Path.D2H, reg["id"], 2)
    again = fake.recv(P.Path.D2H, P.MsgType.XFER)
    assert again["gen"] == 2 and again["src"] == xfer["src"] and again["dst"] == xfer["dst"]
    fake.done(P.Path.D2H, again["id"], P.Status.STALE, "request for gen 2, this is gen 3", gen=3)
    with pytest.raises(TransferError, match="d2h worker gen 2: request for gen 2, this is gen 3"):
        fut.result(DEADLINE)                 # once only: a second STALE fails it
    reg = fake.recv(P.Path.D2H, P.MsgType.REGISTER)
    fake.registered(P.Path.D2H, reg["id"], 3)
    ok = tm.submit(P.Path.D2H, [5], [6])
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    fake.done(P.Path.D2H, xfer["id"], gen=3)
    ok.result(DEADLINE)
    assert tm.inflight_bytes == 0


# ---- 9. the supervisor itself dies --------------------------------------------------------------

@pytest.fixture
def stand_ins(request):
    """`sleep` processes standing in for the supervisor and its workers (pidfds watch them);
    killed by pid in a finalizer."""
    procs: list[subprocess.Popen] = []

    def make() -> subprocess.Popen:
        procs.append(subprocess.Popen(["sleep", "600"]))
        return procs[-1]

    yield make
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(DEADLINE)


def test_supervisor_death_fails_unsent_work_at_once_and_sent_work_once_its_worker_is_gone(fake, make_tm, stand_ins):
    from kvbm.transfer.host_offload import HostTransfers
    sup, d2h, h2d = stand_ins(), stand_ins(), stand_ins()
    tm = make_tm(supervisor_pid=sup.pid, worker_pids={P.Path.D2H: d2h.pid, P.Path.H2D: h2d.pid},
                 request_timeout_s=60.0)
    pool = FakePool()
    ht = HostTransfers(tm, pool)
    sent = ht.offload([1, 2, 3], [11, 12, 13])
    fake.recv(P.Path.D2H, P.MsgType.XFER)               # at the worker, never answered
    held = tm.submit(P.Path.H2D, [1], [2], gate=Gate(iteration=9))   # never reaches a worker
    sup.kill()
    sup.wait(DEADLINE)
    with pytest.raises(TransferError, match=rf"kvbm-workers \(pid {sup.pid}\) died; the transfer never reached"):
        held.result(DEADLINE)
    with pytest.raises(LifecycleError, match=rf"kvbm-workers \(pid {sup.pid}\) died: no new transfers"):
        ht.offload([4], [14])
    assert pool.released == [[3]]                        # the refused offload's host block went back
    assert not sent.done()                               # its worker still runs: the copy may still land
    d2h.kill()
    with pytest.raises(TransferError, match="its d2h worker generation 1 exited with this transfer in flight") as info:
        sent.result(DEADLINE)
    assert not info.value.blocks_may_be_written
    assert pool.released == [[3], [0, 1, 2]] and pool.registered == [] and ht.leaked_host_blocks == 0
    assert tm.inflight_bytes == 0


def test_a_worker_not_seen_exiting_after_its_supervisor_died_keeps_its_blocks(fake, make_tm, stand_ins):
    from kvbm.transfer.host_offload import HostTransfers
    sup, d2h, h2d = stand_ins(), stand_ins(), stand_ins()
    tm = make_tm(supervisor_pid=sup.pid, worker_pids={P.Path.D2H: d2h.pid, P.Path.H2D: h2d.pid},
                 request_timeout_s=60.0)
    tm.stop_grace_s = 0.5
    pool = FakePool()
    ht = HostTransfers(tm, pool)
    sent = ht.offload([1, 2], [11, 12])
    fake.recv(P.Path.D2H, P.MsgType.XFER)
    sup.kill()
    with pytest.raises(TransferError, match=r"not seen exiting within 0.5 s.*may still be written") as info:
        sent.result(DEADLINE)
    assert info.value.blocks_may_be_written
    assert pool.released == [] and pool.registered == [] and ht.leaked_host_blocks == 2
    assert tm.inflight_bytes == 0


def test_a_worker_death_says_in_flight_only_when_something_was(fake, make_tm, caplog):
    caplog.set_level(logging.WARNING, logger="kvbm.transfer.manager")
    tm = make_tm()
    fake.event("died", P.Path.D2H, 1, pid=7, exitcode=-9)
    wait_for(lambda: "d2h worker generation 1 (pid 7) died" in caplog.text, DEADLINE, "the death logged")
    assert "in flight; the blocks were not loaded" not in caplog.text
    assert "no request of this engine was in flight" in caplog.text
    reg = fake.recv(P.Path.D2H, P.MsgType.REGISTER)
    fake.registered(P.Path.D2H, reg["id"], 2)
    wait_for(lambda: gen_of(tm, P.Path.D2H) == 2, DEADLINE, "the d2h path registered with gen 2")
    fut = tm.submit(P.Path.D2H, [1], [2])
    fake.recv(P.Path.D2H, P.MsgType.XFER)
    caplog.clear()
    fake.event("died", P.Path.D2H, 2, pid=8, exitcode=-9)
    with pytest.raises(TransferError, match=r"generation 2 \(pid 8\) died \(exit code -9\) with this transfer in"):
        fut.result(DEADLINE)
    wait_for(lambda: "with 1 request(s) of this engine in flight" in caplog.text, DEADLINE, "the death logged")


def test_a_stale_reply_after_the_supervisor_died_fails_at_once(fake, make_tm, stand_ins):
    sup, d2h, h2d = stand_ins(), stand_ins(), stand_ins()
    tm = make_tm(supervisor_pid=sup.pid, worker_pids={P.Path.D2H: d2h.pid, P.Path.H2D: h2d.pid},
                 request_timeout_s=60.0)
    fut = tm.submit(P.Path.D2H, [1, 2], [3, 4])
    xfer = fake.recv(P.Path.D2H, P.MsgType.XFER)
    sup.kill()
    wait_for(lambda: tm._dead, DEADLINE, "the supervisor's death noticed")
    # Nothing was copied (STALE): no worker generation will ever take it again, so it fails now.
    fake.done(P.Path.D2H, xfer["id"], P.Status.STALE, "request for gen 1, this is gen 2", gen=2)
    with pytest.raises(TransferError, match="request for gen 1, this is gen 2") as info:
        fut.result(DEADLINE)
    assert not info.value.blocks_may_be_written
    assert fake.pending(P.Path.D2H) == []       # not sent again, no registration either
    assert tm.inflight_bytes == 0
