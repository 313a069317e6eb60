"""Worker-side hardening: one engine per instance, malformed messages answered (never a crash),
bounded queues, shutdown order, ownership checks on shared files, parent-death handling.

Each test here failed before the fix it pins. Processes are started with their pids recorded and
SIGKILLed in a finalizer; every wait has a deadline."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import zmq

import kvbm
from kvbm.errors import KvbmError
from kvbm.layout import BlockLayout, LayoutType
from kvbm.wire import protocol as P
from kvbm.wire.auth import ClientKeys
from kvbm.wire.channel import Endpoints, connect_socket, make_context
from tests.support.bare_worker import bare_path_worker
from tests.support.pipeline_harness import DEFAULT_LAYOUT, pid_alive, wait_for

DEADLINE = 30.0


class Raw:
    """A DEALER to one endpoint, for hand-made frames (with the instance's keys: nothing is
    answered without them)."""

    def __init__(self, endpoint: str, keys: ClientKeys | None) -> None:
        self.ctx = make_context()
        self.sock = connect_socket(self.ctx, zmq.DEALER, endpoint, keys)

    def ask(self, msg: dict | bytes, timeout_ms: int = 5000) -> dict | None:
        self.sock.send(msg if isinstance(msg, bytes) else P.encode(msg))
        if not self.sock.poll(timeout_ms):
            return None
        return P.decode(self.sock.recv())

    def send(self, msg: dict | bytes) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else P.encode(msg))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class Standalone:
    """kvbm-workers started on its own (not by an engine), so engines can come and go."""

    def __init__(self, tmp_path, request, host_size: str = "4MB", extra: list[str] | None = None) -> None:
        self.instance = f"h{uuid.uuid4().hex[:8]}"
        self.runtime_dir = str(tmp_path / "run")
        os.makedirs(self.runtime_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", self.instance, "--runtime-dir", self.runtime_dir,
               "--host-size", host_size, "--force-cpu", "--interval", "0"] + (extra or [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.pids = {self.proc.pid}
        self._engines: list[kvbm.KvBlockManager] = []
        request.addfinalizer(self.kill_all)
        self.config = kvbm.KvbmConfig(instance_id=self.instance, runtime_dir=self.runtime_dir, host_blocks=64,
                                      layout=DEFAULT_LAYOUT, device_blocks=64, force_cpu=True,
                                      request_timeout_ms=20000)
        rundir = self.config.resolved_runtime_dir()
        self.endpoints = wait_for(lambda: Endpoints.read(rundir), DEADLINE, "endpoints.json")
        self.keys = ClientKeys.read(rundir)
        self.status = wait_for(self._ready, DEADLINE, "both path workers ready")
        self.pids.update(w["pid"] for w in self.status["workers"].values() if w.get("pid"))

    def _ready(self) -> dict | None:
        client = Raw(self.endpoints.control, self.keys)
        try:
            st = client.ask({"t": P.MsgType.STATUS, "id": 1}, 2000)
        finally:
            client.close()
        if st and all(st["workers"][label]["ready"] for label in ("d2h", "h2d")):
            return st
        return None

    def worker_pids(self) -> dict[str, int]:
        st = wait_for(self._ready, DEADLINE, "both path workers ready")
        return {label: st["workers"][label]["pid"] for label in ("d2h", "h2d")}

    def engine(self) -> kvbm.KvBlockManager:
        kv = kvbm.KvBlockManager(self.config)
        self._engines.append(kv)
        return kv

    def attach(self, kv: kvbm.KvBlockManager) -> list:
        layout = BlockLayout(DEFAULT_LAYOUT, LayoutType.LAYER_SEPARATE, 64)
        tensors = kv.create_device_tensors(layout, device="cpu")
        kv.register_device_tensors(tensors, layout, start=False, timeout=DEADLINE)
        return tensors

    def kill_all(self) -> None:
        for kv in self._engines:
            try:
                kv.close()
            except Exception:  # noqa: BLE001 - finalizer: best effort after a failed test
                pass
        self._engines.clear()
        if self.proc.poll() is None:
            self.proc.terminate()  # a clean stop removes the G2 segment and the runtime dir
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        from kvbm.shm import clean_stale_segments
        clean_stale_segments(self.instance, include_host_pool=True)  # what a SIGKILL left behind


@pytest.fixture
def standalone(tmp_path, request):
    return Standalone(tmp_path, request)


def _hashes(rng, n):
    return rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64)


# ---- 1. one engine per instance -----------------------------------------------------------------

def test_second_engine_on_one_instance_is_refused_until_the_first_closes(standalone, rng):
    first = standalone.engine()
    standalone.attach(first)
    second = standalone.engine()
    with pytest.raises(KvbmError) as info:
        standalone.attach(second)
    text = str(info.value)
    assert "already attached" in text, text
    assert first.transfers.engine_id in text and f"pid {os.getpid()}" in text, text
    second.close()
    # The first engine still works: its blocks were not touched.
    res = first.offload([0, 1, 2, 3], _hashes(rng, 4)).result(DEADLINE).value
    assert res.moved == 4
    first.close()
    third = standalone.engine()
    standalone.attach(third)  # the slot is free once the first one unregistered
    assert third.offload([0, 1], _hashes(rng, 2)).result(DEADLINE).value.moved == 2
    third.close()


def test_a_dead_engine_frees_the_slot(standalone, rng):
    # A registration from a pid that is gone (2**22 + 1 is above the default pid_max: never alive).
    kv = standalone.engine()
    layout = BlockLayout(DEFAULT_LAYOUT, LayoutType.LAYER_SEPARATE, 64)
    tensors = kv.create_device_tensors(layout, device="cpu")
    from kvbm.transfer.memory_map import describe_memory
    host = BlockLayout(DEFAULT_LAYOUT, LayoutType.FULLY_CONTIGUOUS, 64)
    ghost = {"t": P.MsgType.REGISTER, "id": 9, "engine": "ghost", "pid": 2**22 + 1,
             "device": P.layout_to_wire(layout), "host": P.layout_to_wire(host),
             "memory": describe_memory(tensors, layout, kv._shared)}
    for label in ("d2h", "h2d"):
        client = Raw(standalone.endpoints.workers[label], standalone.keys)
        try:
            assert client.ask(ghost)["t"] == P.MsgType.REGISTERED
        finally:
            client.close()
    kv.register_device_tensors(tensors, layout, start=False, timeout=DEADLINE)
    assert kv.offload([0, 1], _hashes(rng, 2)).result(DEADLINE).value.moved == 2
    kv.close()


# ---- 2. malformed messages never kill a path worker -------------------------------------------

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


BAD_ENGINES = [[1], {"a": 1}, 7, 1.5, b"bytes", None, True, "", "x" * 300]


def test_unhashable_or_bad_engine_is_answered_and_the_worker_keeps_its_pid(standalone):
    standalone.attach(standalone.engine())  # a registered engine: {}.pop([1]) would not even hash
    before = standalone.worker_pids()
    client = Raw(standalone.endpoints.workers["d2h"], standalone.keys)
    try:
        for kind in ("unregister", "register", "xfer"):
            for engine in BAD_ENGINES:
                reply = client.ask({"t": kind, "id": 3, "engine": engine, "gen": 1, "path": 0})
                assert reply is not None and reply["t"] == P.MsgType.DONE, (kind, engine, reply)
                assert reply["status"] == P.Status.ERROR and "engine" in reply["error"], (kind, engine, reply)
                pong = client.ask({"t": P.MsgType.PING, "id": 4})
                assert pong["t"] == P.MsgType.PONG and pong["gen"] == 1, (kind, engine, pong)
    finally:
        client.close()
    assert standalone.worker_pids() == before


def test_validate_register_checks_device_and_layer_count():
    layout = BlockLayout(DEFAULT_LAYOUT, LayoutType.LAYER_SEPARATE, 8)
    host = BlockLayout(DEFAULT_LAYOUT, LayoutType.FULLY_CONTIGUOUS, 8)

    def msg(**mem):
        return {"t": "register", "engine": "e", "pid": 1, "device": P.layout_to_wire(layout),
                "host": P.layout_to_wire(host),
                "memory": {"kind": "shm", "segment": "kvbm-x-dev-1-1", "buffers": [{"offset": 0, "nbytes": 4096}],
                           **mem}}

    P.validate_register(msg())
    P.validate_register(msg(device=3))
    for bad in ("0", -1, 1.0, [0], 1024):
        with pytest.raises(KvbmError, match="device"):
            P.validate_register(msg(device=bad))
    big = msg()
    big["device"]["config"] = dict(big["device"]["config"], num_layers=1025)
    with pytest.raises(KvbmError, match="num_layers"):
        P.validate_register(big)
    assert P.MAX_LAYERS == 1024


def test_attach_of_an_empty_segment_raises_kvbm_error_and_closes_its_fd():
    from kvbm.shm import SHM_DIR, Segment
    name = f"kvbm-h{uuid.uuid4().hex[:8]}-dev-{os.getpid()}-9"
    path = os.path.join(SHM_DIR, name)
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        before = _fds()
        with pytest.raises(KvbmError, match="0 bytes"):
            Segment.attach(name)
        assert _fds() == before
    finally:
        os.unlink(path)


def test_device_memory_closes_its_segment_when_registration_fails():
    from kvbm.shm import Segment
    from kvbm.workers.copy import DeviceMemory
    layout = BlockLayout(DEFAULT_LAYOUT, LayoutType.FULLY_CONTIGUOUS, 1)
    name = f"kvbm-h{uuid.uuid4().hex[:8]}-dev-{os.getpid()}-8"
    seg = Segment.create(name, 1 << 20)
    try:
        memory = {"kind": "shm", "segment": name,
                  "buffers": [{"offset": (1 << 20) - 4096, "nbytes": layout.total_bytes}]}
        before = _fds()
        with pytest.raises(KvbmError, match="outside segment"):
            DeviceMemory(memory, layout, cuda=False)
        assert _fds() == before  # the attached segment's fd went with the failure
    finally:
        seg.close()
        seg.unlink()


# ---- 3. malformed control messages never kill the supervisor -----------------------------------

def test_malformed_ready_and_stats_are_rejected_and_the_supervisor_keeps_serving(standalone):
    before = standalone.worker_pids()
    gen = standalone.status["workers"]["d2h"]["gen"]
    client = Raw(standalone.endpoints.control, standalone.keys)
    try:
        for bad in ({"pin_s": "abc"}, {"pinned_bytes": "x"}, {"pin_s": [1]}, {"pinned_bytes": 2.5},
                    {"pin_s": float("nan")}, {"pid": before["d2h"] + 1}, {"gen": gen + 1}, {"path": [0]},
                    {"path": 7}):
            ready = {"t": P.MsgType.READY, "id": 2, "path": 0, "gen": gen, "pid": before["d2h"], "pin_s": 0.0,
                     "pinned_bytes": 0} | bad
            reply = client.ask(ready)
            assert reply is not None and reply["status"] == P.Status.ERROR, (bad, reply)
        for pools in ({"g2": 5}, [1], "x", {"g2": {"used": "many"}}, {"g2": {"a": {"b": {"c": 1}}}}):
            client.send({"t": P.MsgType.STATS, "engine": "e1", "pools": pools, "junk": "y" * 1000, "held": "no"})
        st = client.ask({"t": P.MsgType.STATUS, "id": 1})
        assert st["t"] == P.MsgType.STATUS
        assert st["engines"]["e1"].keys() == {"at"}, st["engines"]  # nothing it sent was a map of numbers
    finally:
        client.close()
    assert pid_alive(standalone.proc.pid) and standalone.worker_pids() == before
    assert all(st["workers"][label]["restarts"] == 0 for label in ("d2h", "h2d"))


def test_a_multi_frame_control_message_is_answered_with_an_error(standalone):
    client = Raw(standalone.endpoints.control, standalone.keys)
    try:
        client.sock.send_multipart([P.encode({"t": P.MsgType.PING, "id": 3}), b"extra"])
        assert client.sock.poll(int(DEADLINE * 1000)), "no answer to a 2-frame message"
        reply = P.decode(client.sock.recv())
        assert reply["status"] == P.Status.ERROR and reply["error"] == "expected 1 payload frame, got 2", reply
        assert client.ask({"t": P.MsgType.PING, "id": 4})["t"] == P.MsgType.PONG
    finally:
        client.close()


def test_summary_line_survives_any_engine_report(tmp_path):
    from kvbm.workers.supervisor import Supervisor
    cfg = kvbm.KvbmConfig(instance_id="s1", runtime_dir=str(tmp_path), host_size=1 << 20, force_cpu=True)
    sup = Supervisor(cfg, 1 << 20, cuda=False, interval=1.0)
    for pools in ({"g2": 5}, [1], "x", {"g2": [1, 2]}, {"g2": {"used": 3, "blocks": 8}}):
        sup._handle_control({"t": P.MsgType.STATS, "engine": "e", "pools": pools, "queues": {"d2h": "x"},
                             "extra": "z" * 100})
        line = sup.summary_line()
    assert "engine e g2 3/8 blocks" in line
    assert set(sup.engines["e"]) == {"pools", "at"}


# ---- 4. bounded memory ----------------------------------------------------------------------------

def test_path_worker_queue_is_capped_and_the_rest_is_answered_queue_full():
    cap = 4096
    count = cap + 100
    worker, replies = bare_path_worker([[b"id", P.encode(P.make_xfer(i, "e", 1, P.Path.D2H, [0], [0]))]
                                        for i in range(count)])
    worker._drain()
    assert len(worker._queue) == cap
    assert len(replies) == 100 and all(r["status"] == P.Status.ERROR and "queue full" in r["error"] for r in replies)
    assert [r["id"] for r in replies] == list(range(cap, count))


def test_supervisor_drops_silent_engines_without_a_status_call(tmp_path):
    import time

    from kvbm.workers import supervisor as S
    cfg = kvbm.KvbmConfig(instance_id=f"s{uuid.uuid4().hex[:6]}", runtime_dir=str(tmp_path), host_size=1 << 20,
                          force_cpu=True)
    sup = S.Supervisor(cfg, 1 << 20, cuda=False, interval=0)
    sup.slots = {}
    ctx = make_context()
    sup._control = ctx.socket(zmq.ROUTER)
    sup._control.bind(f"inproc://c{uuid.uuid4().hex}")
    try:
        sup.engines = {"gone": {"at": time.time() - 100}, "here": {"at": time.time()}}
        sup.serve(duration=0.2)
        assert list(sup.engines) == ["here"]
    finally:
        sup._control.close(0)
        ctx.term()


# ---- 5. shutdown order -----------------------------------------------------------------------------

def test_shutdown_reaps_workers_then_reports_them_died_then_stopping(standalone):
    import time
    ctx = make_context()
    sub = connect_socket(ctx, zmq.SUB, standalone.endpoints.events, standalone.keys)
    control = Raw(standalone.endpoints.control, standalone.keys)
    try:
        # A worker restart proves the subscription is live (PUB drops what a joining SUB misses).
        # Only an engine reporting on this connection, for the generation it uses, may ask for one.
        control.send({"t": P.MsgType.STATS, "engine": "test", "generations": {"d2h": 1}})
        control.ask({"t": P.MsgType.RESTART, "id": 1, "path": 0, "gen": 1, "engine": "test", "reason": "test"})
        deadline = time.monotonic() + DEADLINE
        while True:
            assert sub.poll(max(1, int((deadline - time.monotonic()) * 1000))), "no started event"
            ev = P.decode(sub.recv())
            if ev["kind"] == "started" and ev["path"] == 0 and ev["gen"] == 2:
                break
        pids = standalone.worker_pids()
        os.kill(standalone.proc.pid, signal.SIGTERM)
        seen = []
        while not seen or seen[-1][0] != "stopping":
            assert sub.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"events so far: {seen}"
            ev = P.decode(sub.recv())
            # When "died" is published the worker is already reaped: no copy of it can still run.
            gone = ev["kind"] != "died" or not pid_alive(pids[P.Path(ev["path"]).label])
            seen.append((ev["kind"], ev["path"], ev["gen"], gone))
        assert seen == [("died", 0, 2, True), ("died", 1, 1, True), ("stopping", None, 0, True)]
        assert standalone.proc.wait(DEADLINE) == 0
    finally:
        control.close()
        sub.close(0)
        ctx.term()


# ---- 6. worker-side CUDA error handling (no GPU needed: the CUDA calls are faked) ------------------

def test_failed_launch_drains_the_stream_before_the_error_reply():
    import time
    import types

    from kvbm.workers import path_worker as W
    log: list[str] = []

    class FailingCopier:
        cuda = True
        src = dst = types.SimpleNamespace(num_blocks=8)
        block_bytes = 16

        def launch_groups(self, src, dst, layers):   # what the worker launches with
            log.append("launch")
            raise RuntimeError("CUDA error: an illegal memory access (layer 3 of 4)")

        def drain(self):
            log.append("drain")

    worker = W.PathWorker.__new__(W.PathWorker)
    worker.path, worker.gen, worker.stats, worker.delay_s, worker.max_batch = P.Path.D2H, 1, W.WorkerStats(), 0, 64
    worker._in_flight = []
    worker.engines = {"e": types.SimpleNamespace(copier=FailingCopier(), ident=b"id")}  # registered by b"id"
    worker._reply = lambda ident, msg: log.append(f"reply {P.Status(msg['status']).name}")
    worker._execute(b"id", P.make_xfer(5, "e", 1, P.Path.D2H, [0, 1], [2, 3], layers=True), time.monotonic())
    assert log == ["launch", "drain", "reply ERROR"]
    assert worker._in_flight == []


def test_cuda_copy_events_block_for_large_copies_and_spin_for_small_ones(monkeypatch):
    """A worker waits on a large CUDA copy by sleeping on a blocking event (a core is not spun for
    milliseconds) and on a small one (<= SPIN_WAIT_BYTES) by spinning (tens of microseconds, less
    than a blocking event's wake-up); a layered AUTO copy is one library call with an event per layer."""
    import contextlib
    import types

    from kvbm.workers import copy as C
    made: list[dict] = []

    class Event:
        def __init__(self, **kw):
            made.append(kw)
            self.cuda_event = len(made)

        def record(self, stream):
            pass

    calls: list[tuple] = []
    copier = C.Copier.__new__(C.Copier)
    copier._torch = types.SimpleNamespace(cuda=types.SimpleNamespace(Event=Event, current_device=lambda: 0,
                                                                     device=lambda d: contextlib.nullcontext()))
    copier._stream, copier._device = types.SimpleNamespace(cuda_stream=0), types.SimpleNamespace(index=0)
    copier._spare_events = {True: [], False: []}
    copier.src_layers = copier.dst_layers = [object(), object()]
    copier.src_region = copier.dst_region = types.SimpleNamespace(uva_checked=True)
    copier.method, copier.max_sms = C.native.CopyMethod.AUTO, 0
    monkeypatch.setattr(C.native, "copy_blocks_cuda", lambda *args: calls.append(("blocks",)))
    monkeypatch.setattr(C.native, "copy_layers_cuda", lambda *args: calls.append(("layers", tuple(args[4]))))
    one = np.zeros(1, np.int64)
    copier.block_bytes = C.SPIN_WAIT_BYTES + 1
    assert len(copier.launch(one, one, layers=True)) == 2
    assert made == [{"blocking": True}, {"blocking": True}] and calls == [("layers", (1, 2))]
    assert [last for _, last in copier.launch_groups(one, one, True)] == [0, 1]
    made.clear()
    copier.block_bytes = C.SPIN_WAIT_BYTES
    assert len(copier.launch(one, one, layers=False)) == 1 and made == [{"blocking": False}]
    copier.method = C.native.CopyMethod.DMA      # other methods: a call and an event per layer
    calls.clear()
    copier.launch(one, one, layers=True)
    assert calls == [("blocks",), ("blocks",)]
    copier.method = C.native.CopyMethod.AUTO     # and memory not vouched for (pageable): the same
    copier.dst_region = types.SimpleNamespace(uva_checked=False)
    calls.clear()
    copier.launch(one, one, layers=True)
    assert calls == [("blocks",), ("blocks",)]
    # Events of an answered request are reused by later copies of the same kind, not created again.
    copier.dst_region = types.SimpleNamespace(uva_checked=True)
    made.clear()
    events = copier.launch_groups(one, one, True)
    assert made == [{"blocking": False}, {"blocking": False}]
    copier.recycle(events, C.SPIN_WAIT_BYTES)
    assert {id(e) for e, _ in copier.launch_groups(one, one, True)} == {id(e) for e, _ in events}
    assert len(made) == 2
    copier.block_bytes = C.SPIN_WAIT_BYTES + 1    # a blocking kind: none spare, made anew
    copier.launch_groups(one, one, False)
    assert made[-1] == {"blocking": True} and len(made) == 3


# ---- 7. ownership checks on what another local user could plant ------------------------------------

def test_segment_attach_refuses_open_modes_and_other_owners():
    from kvbm.shm import SHM_DIR, Segment
    name = f"kvbm-h{uuid.uuid4().hex[:8]}-dev-{os.getpid()}-7"
    path = os.path.join(SHM_DIR, name)
    seg = Segment.create(name, 4096)
    try:
        Segment.attach(name).close()  # ours and 0600: fine
        os.chmod(path, 0o644)
        before = _fds()
        with pytest.raises(KvbmError, match="mode 0o644"):
            Segment.attach(name)
        os.chmod(path, 0o600)
        if os.getuid() == 0:  # only root can give a file away
            os.chown(path, 12345, -1)
            with pytest.raises(KvbmError, match="uid 12345"):
                Segment.attach(name)
        assert _fds() == before
    finally:
        seg.close()
        seg.unlink()


def test_runtime_dir_must_be_ours_0700_and_not_a_symlink(tmp_path):
    from kvbm.shm import RuntimeDir
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "kvbm-link"
    link.symlink_to(real)
    with pytest.raises(KvbmError, match="not a directory"):
        RuntimeDir(str(link)).ensure()
    open_dir = tmp_path / "kvbm-open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(KvbmError, match="mode 0o755"):
        RuntimeDir(str(open_dir)).ensure()
    assert (open_dir.stat().st_mode & 0o777) == 0o755  # refused, not silently repaired
    fresh = tmp_path / "kvbm-fresh"
    RuntimeDir(str(fresh)).ensure()
    assert (fresh.stat().st_mode & 0o777) == 0o700


def test_endpoints_json_is_trusted_only_when_ours_and_private(tmp_path):
    import json
    rundir = tmp_path / "kvbm-x"
    assert Endpoints.read(str(rundir)) is None  # nothing yet: not an error
    rundir.mkdir(mode=0o700)
    assert Endpoints.read(str(rundir)) is None
    eps = Endpoints.for_config(str(rundir), "ipc", 0)
    eps.write(str(rundir))
    assert Endpoints.read(str(rundir)) == eps
    target = rundir / "endpoints.json"
    target.chmod(0o644)
    with pytest.raises(KvbmError, match="mode 0o644"):
        Endpoints.read(str(rundir))
    target.unlink()
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps({"control": "ipc:///tmp/evil", "events": "x", "workers": {}}))
    planted.chmod(0o600)
    target.symlink_to(planted)
    with pytest.raises(KvbmError, match="symlink"):
        Endpoints.read(str(rundir))
    target.unlink()
    eps.write(str(rundir))
    rundir.chmod(0o755)
    with pytest.raises(KvbmError, match="mode 0o755"):
        Endpoints.read(str(rundir))


# ---- 8. parent death ----------------------------------------------------------------------------------

_STARTER = r"""
import os, subprocess, sys, threading, time
rundir, cmd = sys.argv[1], sys.argv[2:]
box = {}

def start():  # kvbm-workers started from a thread that exits while this process lives on
    box["proc"] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(rundir, "endpoints.json")) and time.monotonic() < deadline:
        time.sleep(0.02)

t = threading.Thread(target=start)
t.start()
t.join()
print(box["proc"].pid, flush=True)
sys.stdin.read()
"""


def test_embedded_supervisor_outlives_its_starting_thread_and_follows_its_parent_process(tmp_path, request):
    instance = f"h{uuid.uuid4().hex[:8]}"
    base = str(tmp_path / "run")
    rundir = os.path.join(base, f"kvbm-{instance}")
    cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", instance, "--runtime-dir", base, "--host-size", "1MB",
           "--force-cpu", "--interval", "0", "--exit-with-parent"]
    starter = subprocess.Popen([sys.executable, "-c", _STARTER, rundir, *cmd], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    pids = [starter.pid]

    def kill():
        from kvbm.shm import clean_stale_segments
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        starter.wait(10)
        clean_stale_segments(instance, include_host_pool=True)
    request.addfinalizer(kill)
    sup_pid = int(starter.stdout.readline())
    pids.append(sup_pid)
    workers = wait_for(lambda: _ready_workers(rundir), DEADLINE, "path workers ready")
    pids.extend(workers)
    # The thread that ran Popen is gone; the process is not: kvbm-workers must keep serving.
    assert _ready_workers(rundir) == workers and pid_alive(sup_pid)
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait(10)
    wait_for(lambda: not pid_alive(sup_pid) and not any(pid_alive(p) for p in workers), DEADLINE,
             "kvbm-workers and its workers exiting after their engine died")
    assert not os.path.exists(rundir)  # a clean stop, not a kill


def _ready_workers(rundir: str) -> list[int] | None:
    eps = Endpoints.read(rundir)
    if eps is None:
        return None
    client = Raw(eps.control, ClientKeys.read(rundir))
    try:
        st = client.ask({"t": P.MsgType.STATUS, "id": 1}, 2000)
    finally:
        client.close()
    if not st or not all(st["workers"][label]["ready"] for label in ("d2h", "h2d")):
        return None
    return sorted(st["workers"][label]["pid"] for label in ("d2h", "h2d"))


def test_path_worker_whose_supervisor_is_already_gone_exits_at_once():
    dead = 2**22 + 1  # above the default pid_max: never a live pid, never our parent
    cmd = [sys.executable, "-m", "kvbm.workers.path_worker", "--path", "d2h", "--gen", "1", "--endpoint",
           "ipc:///nonexistent/x.sock", "--control", "ipc:///nonexistent/c.sock", "--segment", "kvbm-none-g2",
           "--segment-size", "4096", "--parent-pid", str(dead)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"supervisor {dead} is gone before this worker started" in out.stderr, out.stderr
