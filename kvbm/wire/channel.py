"""ZeroMQ sockets and endpoints of one kvbm instance.

Parts:
  Endpoints      where the control socket, the event socket and each path worker listen: ipc://
                 files in the 0700 runtime dir by default, tcp://127.0.0.1:PORT when asked (never
                 another interface); written by the supervisor to endpoints.json (0600) so an engine
                 can find tcp ports picked at random
  make_context / bind_socket / connect_socket
                 every socket with linger 0, a hard receive-size cap (ZMQ drops a peer that sends
                 more than 4x the protocol's soft cap), ipc socket files chmod 0600 after bind.
                 A server socket is a CURVE server behind its process's Gatekeeper, a client a
                 CURVE client with the instance's client keys (kvbm.wire.auth); TCP is never
                 served without them. A bound ROUTER queues at most RECV_HWM messages per peer.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import zmq

from kvbm.errors import ConfigError, PermissionRefusedError
from kvbm.shm import check_private, check_private_dir
from kvbm.wire.auth import ClientKeys, Gatekeeper, configure_client, configure_server
from kvbm.wire.protocol import MAX_MESSAGE_BYTES, PROCESS_PATHS, Path

ENDPOINTS_FILE = "endpoints.json"
HARD_MESSAGE_CAP = 4 * MAX_MESSAGE_BYTES
IPC_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
# Messages a bound ROUTER's ZeroMQ queue holds per peer before it stops reading that peer (the
# peer's sends then wait on its side): an engine keeps transfer.manager.WINDOW requests at a worker
# plus a registration, the supervisor one stats request. At ZeroMQ's default (1000), a peer sending
# large frames while the process was busy made ZeroMQ hold 60 frames of 15 MiB at once.
RECV_HWM = 16


@dataclass(frozen=True, slots=True)
class Endpoints:
    control: str
    events: str
    workers: dict[str, str]  # path label -> endpoint

    @classmethod
    def for_config(cls, runtime_dir: str, transport: str, tcp_port: int) -> Endpoints:
        if transport == "ipc":
            longest = os.path.join(runtime_dir, "control.sock")
            if len(longest.encode()) > IPC_PATH_MAX:
                raise ConfigError(f"ipc socket path {longest} is {len(longest.encode())} bytes; unix sockets "
                                  f"take at most {IPC_PATH_MAX}: use a shorter runtime_dir (or transport tcp)")
            return cls(f"ipc://{runtime_dir}/control.sock", f"ipc://{runtime_dir}/events.sock",
                       {p.label: f"ipc://{runtime_dir}/{p.label}.sock" for p in PROCESS_PATHS})
        ports = [tcp_port + i for i in range(2 + len(PROCESS_PATHS))] if tcp_port else \
            _free_ports(2 + len(PROCESS_PATHS))
        if max(ports) > 65535:
            raise ConfigError(f"tcp ports {ports[0]}..{ports[-1]} exceed 65535")
        urls = [f"tcp://127.0.0.1:{p}" for p in ports]
        return cls(urls[0], urls[1], {p.label: urls[2 + i] for i, p in enumerate(PROCESS_PATHS)})

    def worker(self, path: Path) -> str:
        return self.workers[path.label]

    def write(self, runtime_dir: str) -> None:
        target = os.path.join(runtime_dir, ENDPOINTS_FILE)
        tmp = target + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self) | {"pid": os.getpid()}, fh)
        os.replace(tmp, target)

    @classmethod
    def read(cls, runtime_dir: str) -> Endpoints | None:
        """The endpoints a running supervisor wrote; None while there are none. KvbmError when the
        runtime dir (ours, 0700, not a symlink) or the file (ours, 0600, not a symlink) could have
        been written by someone else: their endpoints would receive our engine's KV handles."""
        if not check_private_dir(runtime_dir):
            return None
        path = os.path.join(runtime_dir, ENDPOINTS_FILE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise PermissionRefusedError(f"cannot open {path}: {err} (a symlink is refused)") from err
        with os.fdopen(fd) as fh:
            check_private(os.fstat(fd), path)
            try:
                data = json.load(fh)
                return cls(str(data["control"]), str(data["events"]), dict(data["workers"]))
            except (OSError, ValueError, KeyError, TypeError):
                return None


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def make_context() -> zmq.Context:
    ctx = zmq.Context(io_threads=1)
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("tcp://") and not endpoint.startswith("tcp://127.0.0.1:"):
        raise PermissionRefusedError(f"refusing endpoint {endpoint}: TCP is served on loopback (127.0.0.1) only")
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"unsupported endpoint {endpoint}; expected ipc:// or tcp://127.0.0.1:PORT")


def bind_socket(ctx: zmq.Context, kind: int, endpoint: str, gate: Gatekeeper | None = None) -> zmq.Socket:
    """A server socket; with `gate` (the running Gatekeeper of `ctx`) a CURVE server that admits
    only the instance's client key. TCP without a gate is refused: any local process could drive it."""
    check_endpoint(endpoint)
    if gate is None and endpoint.startswith("tcp://"):
        raise PermissionRefusedError(f"refusing to serve {endpoint} without CURVE authentication")
    if gate is not None and (gate.ctx is not ctx or not gate.running):
        raise PermissionRefusedError("no running Gatekeeper answers ZAP for this socket's ZeroMQ context")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if gate is not None:
        configure_server(sock, gate.keys)
    if kind != zmq.PUB:
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_MESSAGE_CAP)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a vanished engine is dropped, not raised
        sock.setsockopt(zmq.RCVHWM, RECV_HWM)
    path = _ipc_path(endpoint)
    if path is not None:
        try:
            os.unlink(path)  # a socket file left by a killed predecessor
        except FileNotFoundError:
            pass
    old = os.umask(0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    if path is not None:
        os.chmod(path, 0o600)
    return sock


def pending(sock: zmq.Socket) -> Iterator[bytes]:
    """Every single-frame message already waiting on `sock`, without blocking."""
    while True:
        try:
            yield sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def connect_socket(ctx: zmq.Context, kind: int, endpoint: str, keys: ClientKeys | None = None,
                   routing_id: bytes | None = None) -> zmq.Socket:
    """A client socket; with `keys` a CURVE client (what every kvbm server socket requires). A
    `routing_id` (not starting with a zero byte: those are ZeroMQ's) names this connection to a
    ROUTER across reconnects; without one the ROUTER makes up a new id per connection."""
    check_endpoint(endpoint)
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        configure_client(sock, keys)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.setsockopt(zmq.MAXMSGSIZE, HARD_MESSAGE_CAP)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock
