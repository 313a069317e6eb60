"""Who may drive a kvbm instance (issue 13, security).

  1. authentication: a peer without the CURVE keys of the 0600 runtime dir gets no welcome, status,
     event, transfer, registration or restart, over TCP (and ipc, the same code path); a process of
     another uid cannot read the keys
  2. a registration belongs to the connection that made it: a re-registration, xfer or unregister
     under a live engine's id from another connection is refused; a restart is taken only from the
     engine's own connection, for the generation its transfers use
  3. a path worker's queue is bounded in bytes, and its memory with it

Each test failed on the code before these changes. Processes are started through the pipeline
harness (SIGKILLed by pid in its finalizer); every wait has a deadline; a refused peer is given
SILENCE_MS to get the answer it must not get."""
from __future__ import annotations

import json
import os
import signal

import msgpack
import numpy as np
import pytest
import zmq

from kvbm.layout import BlockLayout, InnerOrder, LayoutType
from kvbm.transfer.memory_map import describe_memory
from kvbm.wire import protocol as P
from kvbm.wire.auth import CLIENT_KEYS_FILE, ClientKeys, configure_client
from kvbm.wire.channel import make_context
from tests.support.pipeline_harness import wait_for

DEADLINE = 30.0
SILENCE_MS = 1500
DEAD_PID = 2**22 + 1  # above the default pid_max: never a live pid
NOBODY = 65534


class Client:
    """A DEALER (or SUB) with the credentials a test picks: the instance's keys, other keys, none."""

    def __init__(self, endpoint: str, keys: ClientKeys | None, kind: int = zmq.DEALER, **options: int) -> None:
        self.ctx = make_context()
        self.sock = self.ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        for opt, value in options.items():  # before connect: a send HWM applies to pipes made after it
            self.sock.setsockopt(getattr(zmq, opt), value)
        if keys is not None:
            configure_client(self.sock, keys)
        if kind == zmq.SUB:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    def send(self, msg: dict | bytes) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else P.encode(msg))

    def recv(self, timeout_ms: int) -> dict | None:
        if not self.sock.poll(timeout_ms):
            return None
        return P.decode(self.sock.recv())

    def ask(self, msg: dict, timeout_ms: int = 5000) -> dict | None:
        self.send(msg)
        return self.recv(timeout_ms)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _answered(clients: list[tuple[str, Client]]) -> list[str]:
    """Which of `clients` got anything within SILENCE_MS (all waited on together)."""
    poller = zmq.Poller()
    for _, client in clients:
        poller.register(client.sock, zmq.POLLIN)
    ready = dict(poller.poll(SILENCE_MS))
    return [label for label, client in clients if client.sock in ready]


def _other_keys(keys: ClientKeys, know_server: bool) -> ClientKeys:
    """A CURVE client keypair of its own, with (or without) the server's public key."""
    public, secret = zmq.curve_keypair()
    return ClientKeys(keys.server_public if know_server else zmq.curve_keypair()[0], public, secret)


def random_hashes(rng, n):
    return rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64)


def _register_msg(pipe, engine: str, pid: int, order: InnerOrder | None = None) -> dict:
    lay = pipe.device_layout
    device = BlockLayout(lay.config, lay.layout_type, lay.num_blocks, lay.order if order is None else order)
    host = BlockLayout(lay.config, LayoutType.FULLY_CONTIGUOUS, pipe.kv.pool(2).num_blocks)
    return {"t": P.MsgType.REGISTER, "id": 31, "engine": engine, "pid": pid, "device": P.layout_to_wire(device),
            "host": P.layout_to_wire(host), "memory": describe_memory(pipe.tensors, lay, pipe.kv._shared)}


def _round_trip(pipe, rng, blocks) -> None:
    """offload -> poison -> onboard of `blocks`, byte-exact."""
    hashes = random_hashes(rng, len(blocks))
    pipe.fill_random(blocks, rng)
    expected = pipe.snapshot(blocks)
    assert pipe.kv.offload(blocks, hashes).result(DEADLINE).value.moved == len(blocks)
    pipe.poison(blocks)
    assert pipe.kv.onboard(hashes, blocks).result(DEADLINE).value.loaded == len(blocks)
    assert np.array_equal(pipe.snapshot(blocks), expected)


# ---- 1. authentication ----------------------------------------------------------------------------

def test_tcp_peer_without_the_keys_gets_no_answer_no_event_and_moves_no_byte(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=128, host_blocks=64, transport="tcp", tcp_port=0)
    tm = pipe.kv.transfers
    assert tm.control_endpoint.startswith("tcp://127.0.0.1:")
    workers = {p: tm._paths[p].endpoint for p in P.WORKER_PATHS}
    gens = tm.stats()["generations"]
    pids = pipe.worker_pids()
    # The engine's own blocks: 0..7 offloaded to G2 (registered hashes), 100..107 on the device.
    offloaded, resident = np.arange(8), np.arange(100, 108)
    hashes = random_hashes(rng, 8)
    pipe.fill_random(np.concatenate([offloaded, resident, np.arange(64, 100)]), rng)
    expected, kept = pipe.snapshot(offloaded), pipe.snapshot(resident)
    assert pipe.kv.offload(offloaded, hashes).result(DEADLINE).value.moved == 8

    attacks = [  # what the hostile peer sent, each to where it did damage
        (tm.control_endpoint, {"t": P.MsgType.HELLO, "id": 1}),
        (tm.control_endpoint, {"t": P.MsgType.STATUS, "id": 2}),
        (tm.control_endpoint, {"t": P.MsgType.RESTART, "id": 3, "path": 0, "gen": gens["d2h"],
                               "engine": tm.engine_id, "reason": "hostile"}),
        # G2 blocks -> the engine's device blocks 100..107; other device blocks over every G2 block
        (workers[P.Path.H2D], P.make_xfer(4, tm.engine_id, gens["h2d"], P.Path.H2D, np.arange(8), resident)),
        (workers[P.Path.D2H], P.make_xfer(5, tm.engine_id, gens["d2h"], P.Path.D2H, np.arange(64, 128),
                                          np.arange(64))),
        (workers[P.Path.D2H], _register_msg(pipe, tm.engine_id, os.getpid(), InnerOrder.BLOCK_MAJOR)),
        (workers[P.Path.H2D], {"t": P.MsgType.UNREGISTER, "id": 6, "engine": tm.engine_id}),
    ]
    kinds = {"no keys": None, "its own keypair": _other_keys(pipe.keys, know_server=True),
             "no server key": _other_keys(pipe.keys, know_server=False)}
    clients, subs = [], []
    try:
        for label, keys in kinds.items():
            subs.append((label, Client(tm.welcome["events"], keys, zmq.SUB)))
            for endpoint, msg in attacks:
                client = Client(endpoint, keys)
                client.send(msg)
                clients.append((label, msg["t"], client))
        assert _answered([(f"{label}: {kind}", client) for label, kind, client in clients]) == []

        # Nothing was restarted, moved, registered or dropped.
        st = pipe.status()
        assert pipe.worker_pids() == pids and all(st["workers"][w]["restarts"] == 0 for w in ("d2h", "h2d"))
        assert np.array_equal(pipe.snapshot(resident), kept)
        pipe.poison(offloaded)
        assert pipe.kv.onboard(hashes, offloaded).result(DEADLINE).value.loaded == 8
        assert np.array_equal(pipe.snapshot(offloaded), expected)  # G2 blocks intact, layout order too
        _round_trip(pipe, rng, np.arange(20, 40))

        # Events: a worker death is published (the engine, subscribed with the keys, re-registers with
        # the new generation); no subscriber without the keys hears of it.
        os.kill(pids["d2h"], signal.SIGKILL)
        wait_for(lambda: tm.stats()["generations"]["d2h"] == gens["d2h"] + 1, DEADLINE, "the engine on gen 2")
        assert _answered(subs) == []
    finally:
        for _, _, client in clients:
            client.close()
        for _, sub in subs:
            sub.close()


def test_a_process_of_another_uid_cannot_read_the_keys_nor_get_an_answer(make_pipeline):
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    pipe = make_pipeline(device_blocks=64, host_blocks=64, transport="tcp", tcp_port=0)
    control = pipe.kv.transfers.control_endpoint
    keys_path = os.path.join(pipe.config.resolved_runtime_dir(), CLIENT_KEYS_FILE)
    st_before = pipe.status()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, with only what it inherited (no exec: nobody may not run this venv)
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = {"uid": os.getuid()}
            try:
                with open(keys_path, "rb"):
                    out["keys"] = "read"
            except PermissionError:
                out["keys"] = "denied"
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(control)
            for msg in ({"v": 1, "t": "hello", "id": 1}, {"v": 1, "t": "status", "id": 2},
                        {"v": 1, "t": "restart", "id": 3, "path": 0, "gen": 1, "engine": "x", "reason": "x"}):
                sock.send(msgpack.packb(msg, use_bin_type=True))
            out["answers"] = 0
            while sock.poll(SILENCE_MS):
                sock.recv()
                out["answers"] += 1
            sock.close(0)
            ctx.term()
            os.write(write_fd, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as fh:
            out = json.loads(fh.read() or b"{}")
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert out == {"uid": NOBODY, "keys": "denied", "answers": 0}
    st = pipe.status()
    assert [st["workers"][w]["pid"] for w in ("d2h", "h2d")] == [st_before["workers"][w]["pid"] for w in ("d2h", "h2d")]


def test_key_files_are_private_written_once_and_never_read_through_a_symlink(tmp_path):
    from kvbm.errors import KvbmError
    from kvbm.wire.auth import SERVER_KEYS_FILE, ServerKeys, create_keys
    rundir = tmp_path / "kvbm-k"
    assert ClientKeys.read(str(rundir)) is None  # nothing yet: not an error
    rundir.mkdir(mode=0o700)
    assert ClientKeys.read(str(rundir)) is None
    server, client = create_keys(str(rundir))
    assert ServerKeys.read(str(rundir)) == server and ClientKeys.read(str(rundir)) == client
    assert server.client_public == client.public and client.server_public == server.public
    for name in (SERVER_KEYS_FILE, CLIENT_KEYS_FILE):
        assert (rundir / name).stat().st_mode & 0o777 == 0o600, name
    with pytest.raises(FileExistsError):
        create_keys(str(rundir))  # never overwritten: a start removes a predecessor's first
    assert ClientKeys.read(str(rundir)) == client
    target = rundir / CLIENT_KEYS_FILE
    target.chmod(0o640)
    with pytest.raises(KvbmError, match="mode 0o640"):
        ClientKeys.read(str(rundir))
    target.unlink()
    planted = tmp_path / "planted.key"
    planted.write_text(json.dumps({"server_public": "x" * 40, "public": "y" * 40, "secret": "z" * 40}))
    planted.chmod(0o600)
    target.symlink_to(planted)
    with pytest.raises(KvbmError, match="symlink"):
        ClientKeys.read(str(rundir))


def test_a_server_socket_admits_nobody_without_its_gatekeeper_and_only_the_client_key_with_it(tmp_path):
    from kvbm.errors import PermissionRefusedError
    from kvbm.wire.auth import Gatekeeper, configure_server, create_keys
    from kvbm.wire.channel import bind_socket
    rundir = tmp_path / "kvbm-g"
    rundir.mkdir(mode=0o700)
    server, client = create_keys(str(rundir))
    ctx = make_context()
    with pytest.raises(PermissionRefusedError, match="without CURVE"):
        bind_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:1")  # TCP is never served unauthenticated

    def router() -> tuple[zmq.Socket, str]:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        configure_server(sock, server)
        return sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"

    gate = None
    sock, endpoint = router()
    peers = [Client(endpoint, client)]
    try:
        # No ZAP handler answers in this context: even the client key gets nothing through (libzmq
        # would let every CURVE peer in unless told to enforce the ZAP domain).
        peers[0].send(b"early")
        assert not sock.poll(SILENCE_MS)
        sock.close(0)
        gate = Gatekeeper(ctx, server).start()
        sock, endpoint = router()
        peers += [Client(endpoint, client), Client(endpoint, _other_keys(client, know_server=True))]
        peers[1].send(b"admitted")
        peers[2].send(b"refused")
        assert sock.poll(int(DEADLINE * 1000))
        assert sock.recv_multipart()[1:] == [b"admitted"]
        assert not sock.poll(SILENCE_MS)
        assert gate.admitted >= 1 and gate.refused >= 1
        assert gate.answer([b"1.0", b"7"])[1:3] == [b"7", b"400"]  # a malformed request is refused
    finally:
        for peer in peers:
            peer.close()
        sock.close(0)
        if gate is not None:
            gate.stop()
        ctx.term()


# ---- 2. a registration belongs to its connection ----------------------------------------------------

def test_reregistration_under_a_live_engines_id_from_another_connection_is_refused(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    tm = pipe.kv.transfers
    flipped = _register_msg(pipe, tm.engine_id, os.getpid(), InnerOrder.BLOCK_MAJOR)
    for path in P.WORKER_PATHS:
        client = Client(tm._paths[path].endpoint, pipe.keys)
        try:
            reply = client.ask(flipped)
        finally:
            client.close()
        assert reply is not None and reply["t"] == P.MsgType.DONE and reply["status"] == P.Status.ERROR, reply
        assert f"engine {tm.engine_id!r}" in reply["error"] and "registered by another connection" in reply["error"]
    _round_trip(pipe, rng, np.arange(16))
    # The engine itself registers again on its own connections (re-register()): accepted.
    pipe.kv.register_device_tensors(pipe.tensors, pipe.device_layout, timeout=DEADLINE)
    _round_trip(pipe, rng, np.arange(16, 32))


def test_xfer_and_unregister_for_an_engine_from_another_connection_are_refused(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    tm = pipe.kv.transfers
    gens = tm.stats()["generations"]
    blocks = np.arange(8)
    pipe.fill_random(blocks, rng)
    kept = pipe.snapshot(blocks)
    requests = {P.Path.H2D: P.make_xfer(7, tm.engine_id, gens["h2d"], P.Path.H2D, np.arange(8), blocks),
                P.Path.D2H: P.make_xfer(8, tm.engine_id, gens["d2h"], P.Path.D2H, blocks, np.arange(8))}
    for path, xfer in requests.items():
        client = Client(tm._paths[path].endpoint, pipe.keys)
        try:
            for msg in (xfer, {"t": P.MsgType.UNREGISTER, "id": 9, "engine": tm.engine_id}):
                reply = client.ask(msg)
                assert reply is not None and reply["status"] == P.Status.ERROR, (path, msg["t"], reply)
                assert "registered by another connection" in reply["error"], reply
        finally:
            client.close()
    assert np.array_equal(pipe.snapshot(blocks), kept)  # H2D wrote nothing into the engine's blocks
    _round_trip(pipe, rng, blocks)  # still registered on both paths, G2 as the engine left it


def test_a_registration_is_freed_by_its_connection_or_by_its_engines_death(make_pipeline):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    endpoint = pipe.kv.transfers._paths[P.Path.D2H].endpoint
    pipe.kv.transfers.close()  # the harness engine unregisters: the one-engine slot is free
    first, second = Client(endpoint, pipe.keys), Client(endpoint, pipe.keys)
    try:
        live = _register_msg(pipe, "e1", os.getpid())
        assert first.ask(live)["t"] == P.MsgType.REGISTERED
        refused = second.ask(live)
        assert refused["status"] == P.Status.ERROR and "registered by another connection" in refused["error"]
        assert first.ask(live)["t"] == P.MsgType.REGISTERED  # the same connection again: fine
        assert first.ask({"t": P.MsgType.UNREGISTER, "id": 1, "engine": "e1"})["dropped"] is True
        assert second.ask(live)["t"] == P.MsgType.REGISTERED  # unregistered by its owner: free
        assert second.ask({"t": P.MsgType.UNREGISTER, "id": 2, "engine": "e1"})["dropped"] is True
        # An engine that died without unregistering: another connection may take its id.
        assert first.ask(_register_msg(pipe, "ghost", DEAD_PID))["t"] == P.MsgType.REGISTERED
        assert second.ask(_register_msg(pipe, "ghost", os.getpid()))["t"] == P.MsgType.REGISTERED
    finally:
        first.close()
        second.close()


def test_restart_only_from_the_engines_connection_for_the_generation_it_uses(make_pipeline):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    tm = pipe.kv.transfers
    pids = pipe.worker_pids()
    gen = tm.stats()["generations"]["d2h"]
    wait_for(lambda: tm.engine_id in pipe.status()["engines"], DEADLINE, "the engine's first report")

    def restart(client, engine, gen_):
        return client.ask({"t": P.MsgType.RESTART, "id": 5, "path": 0, "gen": gen_, "engine": engine,
                           "reason": "test"})

    client = Client(tm.control_endpoint, pipe.keys)
    try:
        reply = restart(client, tm.engine_id, gen)  # the engine's id, another connection
        assert reply["status"] == P.Status.ERROR and "not an engine reporting on this connection" in reply["error"]
        client.send({"t": P.MsgType.STATS, "engine": tm.engine_id, "generations": {"d2h": gen}})
        reply = restart(client, tm.engine_id, gen)  # a report under a live engine's id moves nothing
        assert reply["status"] == P.Status.ERROR and "not an engine reporting on this connection" in reply["error"]
        client.send({"t": P.MsgType.STATS, "engine": "other", "generations": {"d2h": gen + 4}})
        reply = restart(client, "other", gen)  # a generation its transfers do not use
        assert reply["status"] == P.Status.ERROR and f"use gen {gen + 4}" in reply["error"]
        assert restart(client, "other", gen + 4) == {"v": 1, "t": P.MsgType.PONG, "id": 5, "restarted": False}
    finally:
        client.close()
    st = pipe.status()
    assert pipe.worker_pids() == pids and st["workers"]["d2h"]["restarts"] == 0


# ---- 3. bounded in bytes ----------------------------------------------------------------------------

class _FakeRouter:
    def __init__(self, frames: list[list[bytes]]) -> None:
        self.frames = frames

    def recv_multipart(self, flags=0, copy=True):
        if not self.frames:
            raise zmq.Again()
        return self.frames.pop(0)


def test_path_worker_queue_is_bounded_in_bytes():
    from kvbm.workers import path_worker as W
    worker = W.PathWorker.__new__(W.PathWorker)  # no process, no sockets: just the drain step
    worker.path, worker.gen, worker.stats, worker.engines = P.Path.D2H, 1, W.WorkerStats(), {}
    worker._queue, worker._seq, worker._in_flight, worker._queued_bytes = [], 0, [], 0
    replies: list[dict] = []
    worker._reply = lambda ident, msg: replies.append(msg)
    half = np.zeros(512 << 10, dtype="<i8")  # 4 MiB of block indices: an 8 MiB frame
    frame = P.encode(P.make_xfer(0, "e", 1, P.Path.D2H, half, half))
    fits = W.MAX_QUEUED_BYTES // len(frame)
    count = fits + 5
    frames = [[b"id", P.encode(P.make_xfer(i, "e", 1, P.Path.D2H, half, half))] for i in range(count)]
    # A request with a field of its own is refused before it is queued: nested lists decode to many
    # times their frame, so only a request's own fields may stay.
    junk = P.make_xfer(count, "e", 1, P.Path.D2H, [0], [0]) | {"pad": [[]] * 1000}
    worker.sock = _FakeRouter(frames + [[b"id", P.encode(junk)]])
    worker._drain()
    assert W.MAX_QUEUED_BYTES == 64 << 20
    assert len(worker._queue) == fits and worker._queued_bytes == fits * len(frame) <= W.MAX_QUEUED_BYTES
    assert [r["id"] for r in replies] == list(range(fits, count + 1))
    full, rejected = replies[:-1], replies[-1]
    assert all(r["status"] == P.Status.ERROR and r["error"].startswith("worker queue full:") for r in full)
    assert f"{fits * len(frame)} bytes queued" in full[0]["error"]
    assert rejected["status"] == P.Status.ERROR and "unknown fields ['pad']" in rejected["error"]


def _vm(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _wait_until_sleeping(pid: int, timeout: float = 5.0) -> None:
    """Best effort: until the worker's main thread sleeps in the delay hook (so the frames that follow
    pile up while it is busy). Kernels that hide wchan make this a no-op; no assertion rests on it."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/wchan") as fh:
                if "nanosleep" in fh.read():
                    return
        except OSError:
            return
        time.sleep(0.01)


def test_large_frames_past_the_byte_bound_are_refused_and_the_worker_stays_small(make_pipeline, rng):
    from kvbm.wire.channel import RECV_HWM
    from kvbm.workers.path_worker import MAX_QUEUED_BYTES
    # Every copy sleeps 3 s: the frames below arrive while the worker is busy, as a flood would.
    pipe = make_pipeline(device_blocks=64, host_blocks=64, worker_delay_ms=3000, request_timeout_ms=120000)
    tm = pipe.kv.transfers
    pid = pipe.worker_pids()["d2h"]
    base = _vm(pid, "VmHWM")
    fut = pipe.kv.offload(np.arange(4), random_hashes(rng, 4))
    _wait_until_sleeping(pid)
    half = np.zeros((15 << 20) // 16, dtype="<i8")  # 7.5 MiB each for src and dst: 15 MiB frames, decodable
    count = 60
    # A small send queue (and a send timeout) keep the flood out of this process's memory.
    client = Client(tm._paths[P.Path.D2H].endpoint, pipe.keys, SNDHWM=2, SNDTIMEO=int(DEADLINE * 1000))
    try:
        size = 0
        for i in range(count):
            frame = P.encode(P.make_xfer(1000 + i, "junk", 1, P.Path.D2H, half, half, priority=-1000))
            size = len(frame)
            client.sock.send(frame, copy=False)
        assert P.MAX_MESSAGE_BYTES - (1 << 20) < size <= P.MAX_MESSAGE_BYTES
        replies = [client.recv(int(DEADLINE * 1000)) for _ in range(count)]
    finally:
        client.close()
    assert None not in replies
    assert sorted(r["id"] for r in replies) == list(range(1000, 1000 + count))
    assert all(r["status"] == P.Status.ERROR for r in replies), [r["error"] for r in replies][:3]
    assert fut.result(DEADLINE).value.moved == 4  # the engine's transfer was not disturbed
    grown = _vm(pid, "VmHWM") - base
    # What may be held at once: ZeroMQ's queue of RECV_HWM frames, the queue's bound, and a few
    # frames being copied out and decoded, plus 128 MiB for the allocator. Before the bounds the
    # worker held every one of the 60 frames (900 MiB) at once.
    bound = RECV_HWM * size + MAX_QUEUED_BYTES + 4 * size + (128 << 20)
    assert grown <= bound, f"worker peak RSS grew {grown >> 20} MiB (bound {bound >> 20} MiB)"
    assert pipe.worker_pids()["d2h"] == pid
