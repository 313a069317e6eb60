"""Bad input and crashes: fuzzed frames never kill a worker or the supervisor, file modes are private,
and a killed kvbm-workers' leftovers are found and removed at the next start."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm.shm import Segment, segment_name
from kvbm.wire import protocol as P
from kvbm.wire.channel import connect_socket, make_context
from tests.support.pipeline_harness import pid_alive, wait_for

DEADLINE = 30.0


class RawClient:
    """A DEALER straight to a worker or the control socket, for hand-made frames (with the
    instance's keys: nothing is answered without them)."""

    def __init__(self, endpoint: str, keys) -> None:
        self.ctx = make_context()
        self.sock = connect_socket(self.ctx, zmq.DEALER, endpoint, keys)

    def ask(self, frames: list[bytes], timeout_ms: int = 5000) -> dict | None:
        self.sock.send_multipart(frames)
        if not self.sock.poll(timeout_ms):
            return None
        return P.decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def fuzz_target(make_pipeline):
    """The pipeline and a raw client of its D2H worker. A crash would go unseen through a DEALER
    (the restarted worker answers the next ping), so the tests compare the worker generation and
    this fixture asserts, after every example, that nothing was restarted."""
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    tm = pipe.kv.transfers
    client = RawClient(tm._paths[P.Path.D2H].endpoint, pipe.keys)
    pids = pipe.worker_pids()
    yield pipe, client
    client.close()
    st = pipe.status()
    assert {label: w["restarts"] for label, w in st["workers"].items() if "restarts" in w} == {"d2h": 0, "h2d": 0}
    assert pipe.worker_pids() == pids


def _still_serves(pipe, client, rng) -> None:
    reply = client.ask([P.encode({"t": P.MsgType.PING, "id": 5})])
    assert reply is not None and reply["t"] == P.MsgType.PONG
    hashes = rng.integers(1, 2**63, size=4, dtype=np.int64).astype(np.uint64)
    res = pipe.kv.offload([0, 1, 2, 3], hashes).result(DEADLINE).value
    assert res.moved + res.held == 4


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                     st.text(max_size=20), st.binary(max_size=64))
_values = st.recursive(_scalars, lambda inner: (st.lists(inner, max_size=4)
                                                | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=10)


@st.composite
def xfer_like(draw):
    """Messages close to a valid xfer, with one or more fields broken."""
    msg = {"v": draw(st.sampled_from([1, 1, 1, 0, 2, "1"])),
           "t": draw(st.sampled_from(["xfer", "xfer", "register", "unregister", "stats", "ping", "nope"])),
           "id": draw(st.one_of(st.integers(-5, 2**64 - 1), st.text(max_size=3))),
           "engine": draw(st.one_of(st.sampled_from(["", "x" * 5000, "someone"]), _values)),
           "gen": draw(st.integers(-1, 3)),
           "path": draw(st.integers(-1, 5)), "prio": draw(st.one_of(st.integers(-2**40, 2**40), st.booleans())),
           "layers": draw(st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1))),
           "src": draw(st.one_of(st.binary(max_size=80), st.just(np.arange(8, dtype="<i8").tobytes()),
                                 st.just(np.array([-1, 10**9], dtype="<i8").tobytes()),
                                 st.integers(-2**63, 2**63 - 1))),
           "dst": draw(st.one_of(st.binary(max_size=80), st.just(np.arange(8, dtype="<i8").tobytes()),
                                 st.just(np.zeros(8, dtype="<i8").tobytes()))),
           "gate": draw(st.one_of(st.none(), _values))}
    drop = draw(st.lists(st.sampled_from(sorted(msg)), max_size=3))
    for key in drop:
        msg.pop(key, None)
    return msgpack.packb(msg, use_bin_type=True)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.one_of(st.binary(max_size=200),
                                 st.builds(lambda v: msgpack.packb(v, use_bin_type=True), _values),
                                 xfer_like()), min_size=1, max_size=3))
def test_fuzzed_frames_get_answers_and_the_worker_survives(fuzz_target, frames):
    pipe, client = fuzz_target
    reply = client.ask(frames)
    if len(frames) == 1:
        # One payload frame: always answered. Anything but a ping/stats/valid request is an error completion.
        assert reply is not None
        if reply["t"] == P.MsgType.DONE:
            assert reply["status"] in (P.Status.ERROR, P.Status.STALE, P.Status.OK)
    else:
        assert reply is None or reply["status"] == P.Status.ERROR
    pong = client.ask([P.encode({"t": P.MsgType.PING, "id": 1})])  # still serving after every example
    assert pong is not None and pong["t"] == P.MsgType.PONG
    assert pong["gen"] == 1, "the worker was restarted: a fuzzed frame crashed it"


_numbers = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True))
_junk = st.one_of(_values, _numbers, st.sampled_from(["abc", "", "1e400", [0], {"a": 1}, None, True]))


@st.composite
def control_like(draw, pids):
    """READY and STATS messages for the control socket: valid ones with one or two fields broken
    (junk of any type, or dropped), so most examples get past the checks that come first."""
    if draw(st.booleans()):
        msg = {"t": "ready", "path": draw(st.sampled_from([0, 1])), "gen": 1, "pid": draw(st.sampled_from(pids)),
               "pin_s": draw(st.floats(0, 10)), "pinned_bytes": draw(st.integers(0, 2**40))}
    else:
        counts = st.dictionaries(st.text(max_size=40), st.one_of(_numbers, _junk), max_size=20)
        msg = {"t": "stats", "engine": draw(st.text(min_size=1, max_size=40)),
               "pools": {"g2": {"blocks": 64, "used": 3, "inactive": 1}},
               "queues": {"d2h": {"queued": 0, "outstanding": 1}}, "counters": {"submitted": 4},
               "inflight_bytes": 0, "held": 0}
        msg["pools"]["g2"] = draw(st.one_of(st.just(msg["pools"]["g2"]), counts, _junk))
    for key in draw(st.lists(st.sampled_from(sorted(k for k in msg if k != "t")), min_size=1, max_size=2)):
        if draw(st.integers(0, 3)):
            msg[key] = draw(_junk)
        else:
            msg.pop(key, None)
    msg["v"] = 1
    return msgpack.packb(msg, use_bin_type=True)


def test_fuzzed_ready_and_stats_never_take_down_the_supervisor(make_pipeline):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    pids = pipe.worker_pids()
    client = RawClient(pipe.kv.transfers.control_endpoint, pipe.keys)

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frame=control_like(sorted(pids.values())))
    def check(frame):
        client.sock.send(frame)  # READY may be answered (ERROR), STATS never is: drain by pinging
        for _ in range(3):
            reply = client.ask([P.encode({"t": P.MsgType.PING, "id": 77})])
            assert reply is not None, "the supervisor stopped answering"
            if reply.get("t") == P.MsgType.PONG and reply.get("id") == 77:
                break
        else:
            raise AssertionError("no pong from the control socket")

    try:
        check()
    finally:
        client.close()
    st_ = pipe.status()
    assert pid_alive(pipe.supervisor_pid) and pipe.worker_pids() == pids
    assert all(st_["workers"][label]["restarts"] == 0 for label in ("d2h", "h2d"))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["xfer", "register", "unregister", "stats", "ping"]),
       engine=st.one_of(_values, st.sampled_from([[1], {"a": 1}, b"x", 7, 1.5, True, None])))
def test_fuzzed_engine_field_is_answered_without_a_restart(fuzz_target, kind, engine):
    pipe, client = fuzz_target
    tm = pipe.kv.transfers
    msg = P.make_xfer(9, tm.engine_id, 1, P.Path.D2H, [0], [1])  # a valid request but for its engine
    msg.update(t=kind, engine=engine)
    reply = client.ask([msgpack.packb(msg, use_bin_type=True)])
    assert reply is not None
    pong = client.ask([P.encode({"t": P.MsgType.PING, "id": 1})])
    assert pong is not None and pong["gen"] == 1, "the worker was restarted: the engine field crashed it"


def test_out_of_range_and_oversized_requests_are_rejected(fuzz_target, rng):
    pipe, client = fuzz_target
    tm = pipe.kv.transfers
    gen = tm.stats()["generations"]["d2h"]

    def xfer(s, d, **kw):
        msg = P.make_xfer(77, tm.engine_id, gen, P.Path.D2H, s, d)
        msg.update(kw)
        return client.ask([P.encode(msg)])

    cases = {
        "outside": xfer([0, 64], [0, 1]),                      # device has 64 blocks
        "negative": xfer([0, -1], [0, 1]),
        "lengths": xfer([0, 1, 2], [0, 1]),
        "dup dst": xfer([0, 1], [3, 3]),
        "wrong path": xfer([0], [0], path=int(P.Path.H2D)),
        "engine": xfer([0], [0], engine="stranger"),
        "bytes": xfer([0], [0], src=b"\x00" * 7),
        "big": xfer(np.zeros(P.MAX_BATCH_BLOCKS + 1, np.int64), np.arange(P.MAX_BATCH_BLOCKS + 1)),
    }
    for name, reply in cases.items():
        assert reply is not None, name
        assert reply["status"] == P.Status.ERROR, (name, reply)
        assert reply["id"] == 77, name
    assert "outside [0, 64)" in cases["outside"]["error"]
    stale = xfer([0], [0], gen=gen + 5)
    assert stale["status"] == P.Status.STALE
    oversized = client.ask([b"\x00" * (P.MAX_MESSAGE_BYTES + 1)])
    assert oversized["status"] == P.Status.ERROR and "exceeds" in oversized["error"]
    _still_serves(pipe, client, rng)
    st_ = pipe.status()["workers"]["d2h"]
    assert st_["restarts"] == 0


def test_control_socket_survives_garbage(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    client = RawClient(pipe.kv.transfers.control_endpoint, pipe.keys)
    try:
        for frame in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "t": "bogus"}),
                      msgpack.packb({"v": 1, "t": "restart", "path": 99}), msgpack.packb({"v": 9, "t": "hello"})):
            reply = client.ask([frame])
            assert reply is not None and reply["status"] == P.Status.ERROR
        assert client.ask([P.encode({"t": P.MsgType.PING})])["t"] == P.MsgType.PONG
    finally:
        client.close()
    assert pipe.status()["workers"]["d2h"]["ready"]


def _modes(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_private_modes_and_removal_after_shutdown(make_pipeline):
    pipe = make_pipeline(device_blocks=64, host_blocks=64, transport="ipc")  # it checks the socket files
    rundir = pipe.config.resolved_runtime_dir()
    inst = pipe.config.instance_id
    assert _modes(rundir) == 0o700
    sockets = [n for n in os.listdir(rundir) if n.endswith(".sock")]
    bells = [n for n in sockets if n.startswith("bell-e")]    # the engine's lane doorbell (kvbm.wire.bell)
    assert len(bells) == 1
    assert sorted(set(sockets) - set(bells)) == ["bell-d2h.sock", "bell-h2d.sock", "control.sock", "d2h.sock",
                                                 "events.sock", "h2d.sock"]
    for name in os.listdir(rundir):
        assert _modes(os.path.join(rundir, name)) == 0o600, name
    g2 = f"/dev/shm/{segment_name(inst)}"
    assert _modes(g2) == 0o600
    dev = [n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{inst}-dev-")]
    assert len(dev) == 1 and _modes(f"/dev/shm/{dev[0]}") == 0o600
    lanes = [n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{inst}-lane-")]
    assert len(lanes) == 2 and all(_modes(f"/dev/shm/{n}") == 0o600 for n in lanes)
    pids = list(pipe.worker_pids().values()) + [pipe.supervisor_pid]
    pipe.close()
    assert not os.path.exists(rundir)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{inst}-")]
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "every kvbm process gone")


def test_sigkilled_supervisor_leftovers_are_cleaned_at_next_start(tmp_path, make_pipeline, rng):
    pipe = make_pipeline(device_blocks=64, host_blocks=64, transport="ipc")  # it checks the socket files
    inst, rundir = pipe.config.instance_id, pipe.config.resolved_runtime_dir()
    workers = pipe.worker_pids()
    os.kill(pipe.supervisor_pid, signal.SIGKILL)
    # Path workers follow their supervisor (PR_SET_PDEATHSIG); the files stay behind.
    wait_for(lambda: not any(pid_alive(p) for p in workers.values()), 10, "orphaned path workers exiting")
    assert os.path.exists(os.path.join(rundir, "control.sock"))
    assert os.path.exists(f"/dev/shm/{segment_name(inst)}")
    # A dead engine's device segment (pid 2**22 + 1 is above pid_max's default range: never alive).
    stale_dev = Segment.create(segment_name(inst, f"dev-{2**22 + 1}-1"), 4096)
    stale_dev.close()
    pipe.kv._workers.proc.wait(5)
    pipe.kv._workers = None
    pipe.close()

    cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", inst, "--runtime-dir", pipe.runtime_dir,
           "--host-size", "1MB", "--force-cpu", "--duration", "1.5", "--interval", "0"]
    # Any kvbm process that starts or stops sweeps dead engines' device segments, of every
    # instance: one running beside this test (another test run on the machine) may take it first.
    swept_elsewhere = not os.path.exists(f"/dev/shm/{stale_dev.name}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert "cleaned up after a previous run" in out.stderr
    assert "control.sock" in out.stderr
    assert swept_elsewhere or f"kvbm-{inst}-dev-{2**22 + 1}-1" in out.stderr
    assert not os.path.exists(rundir)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{inst}-")]


def test_second_instance_is_refused_and_status_answers(make_pipeline):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    base = [sys.executable, "-m", "kvbm.cli", "--instance-id", pipe.config.instance_id,
            "--runtime-dir", pipe.runtime_dir]
    second = subprocess.run(base + ["--host-size", "1MB", "--force-cpu"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "already runs" in second.stderr
    status = subprocess.run(base + ["--status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "d2h" in status.stdout and "h2disk  no disk tier" in status.stdout and "  G3 none" in status.stdout
    help_ = subprocess.run([sys.executable, "-m", "kvbm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--status" in help_.stdout


def test_disk_tier_folder_is_created_private(tmp_path):
    disk = tmp_path / "g3" / "files"
    cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", f"d{os.getpid()}", "--runtime-dir", str(tmp_path),
           "--host-size", "1MB", "--force-cpu", "--duration", "0.5", "--interval", "0", "--disk-path", str(disk),
           "--disk-size", "1GB"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "G3 folder" in out.stderr and disk.is_dir() and _modes(disk) == 0o700
