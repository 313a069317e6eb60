"""Who may talk to a kvbm instance: CURVE keys kept in the 0600 runtime dir, and the ZAP
gatekeeper that admits only them.

DESIGN
  Threat: another local user (or, later, another machine) reaching the sockets. Over ipc:// the
  0700 runtime dir keeps other uids away from the socket files, but a tcp://127.0.0.1 port is open
  to every process of the machine: without authentication it got `welcome`, `status`, overwrote
  device and G2 blocks with `xfer`, re-registered an engine's id and killed workers with `restart`.
  The proof we ask of a peer is the one the ipc:// transport already relies on: it can read files
  in the 0600 runtime dir.
  Choice: ZeroMQ CURVE with a ZAP handler, on every transport. At start the supervisor makes a
  server keypair and one client keypair and writes them to the runtime dir (0600, O_EXCL |
  O_NOFOLLOW; removed at a clean stop and by the next start's clean-up of a killed one). Every
  server socket (control ROUTER, events PUB, each path worker's ROUTER) is a CURVE server, and the
  Gatekeeper of its process answers ZAP with "200" only for the client public key; every client
  (engines, `--status`, the supervisor's and workers' own sockets) connects with the client
  keypair. A peer without the keys fails the handshake: ZeroMQ hands the server nothing it sent,
  so it gets no welcome, no status, no event, and nothing it sends is executed.
  Why CURVE rather than a shared secret in each message: the secret would have to be checked by
  every handler of every message type (one forgotten check reopens the hole) and travels in clear
  over TCP; CURVE refuses the connection before any handler runs, covers the PUB/SUB event socket
  (a secret in messages cannot keep a SUB from reading), and encrypts what crosses a wire.
  Why on ipc:// too: one code path, tested by the whole suite rather than by the TCP tests alone,
  and nothing to redo when a transport crosses machines. Its cost, measured on a shared 2-core
  machine (ipc round trip, pyzmq 27 / libzmq 4.3.5): +3 us for a 100 B message, +9 us for 4 KiB
  (a 256-block xfer), +2.1 ms for 1 MiB (a 65,536-block xfer, whose copy takes far longer); the
  pipeline benchmark's one-block round trip stayed within its run-to-run noise (p50 ~0.4 ms).
  Why two files: the client file (client keypair and the server's public key) is all a client
  needs, so a client on another machine can later be handed that file alone; on one machine the
  same uid reads both, and the 0600 folder is the boundary.

Parts:
  ServerKeys / ClientKeys   z85 CURVE keys, `read(runtime_dir)` each (None while the file is
                            missing; PermissionRefusedError unless ours and 0600, not a symlink)
  create_keys               the supervisor's: fresh keypairs, written once (O_EXCL)
  configure_server / configure_client
                            CURVE options of one socket; a server also names the ZAP domain and
                            asks libzmq to enforce it, so it admits nobody while no ZAP handler
                            is bound (by default libzmq lets every CURVE peer in then)
  Gatekeeper                one per process that serves: a thread answering ZAP requests of its
                            ZeroMQ context; started before the first server socket binds, stopped
                            after the last one closed (the enforced domain is the second fence).
                            Refusals are logged (1st, 2nd, 4th, 8th...); a request it cannot
                            answer is refused too, never left to a dead handler.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from kvbm.errors import KvbmError, PermissionRefusedError
from kvbm.shm import check_private, check_private_dir

logger = logging.getLogger(__name__)

SERVER_KEYS_FILE = "server.key"
CLIENT_KEYS_FILE = "client.key"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"   # fixed by RFC 27: one handler per context
ZAP_VERSION = b"1.0"
ZAP_DOMAIN = b"kvbm"
ZAP_POLL_MS = 100                         # how often the ZAP thread looks at its stop flag
Z85_KEY_CHARS = 40                        # a 32-byte CURVE key in z85


@dataclass(frozen=True, slots=True)
class ServerKeys:
    public: bytes          # z85
    secret: bytes          # z85
    client_public: bytes   # z85: the one client key the Gatekeeper admits

    @classmethod
    def read(cls, runtime_dir: str) -> ServerKeys | None:
        data = _read_private_json(runtime_dir, SERVER_KEYS_FILE)
        if data is None:
            return None
        return cls(*(_key(data, name, runtime_dir) for name in ("public", "secret", "client_public")))


@dataclass(frozen=True, slots=True)
class ClientKeys:
    server_public: bytes   # z85
    public: bytes          # z85
    secret: bytes          # z85

    @classmethod
    def read(cls, runtime_dir: str) -> ClientKeys | None:
        data = _read_private_json(runtime_dir, CLIENT_KEYS_FILE)
        if data is None:
            return None
        return cls(*(_key(data, name, runtime_dir) for name in ("server_public", "public", "secret")))


def create_keys(runtime_dir: str) -> tuple[ServerKeys, ClientKeys]:
    """Fresh keypairs for one run of an instance, written to `runtime_dir` (which the caller holds
    the instance lock of and has emptied). A file already there is an error, never overwritten."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    server = ServerKeys(server_public, server_secret, client_public)
    client = ClientKeys(server_public, client_public, client_secret)
    _write_private_json(runtime_dir, SERVER_KEYS_FILE,
                        {"public": server_public, "secret": server_secret, "client_public": client_public})
    _write_private_json(runtime_dir, CLIENT_KEYS_FILE,
                        {"server_public": server_public, "public": client_public, "secret": client_secret})
    return server, client


def _write_private_json(runtime_dir: str, name: str, keys: dict[str, bytes]) -> None:
    path = os.path.join(runtime_dir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)  # whatever the umask
        json.dump({k: v.decode("ascii") for k, v in keys.items()}, fh)


def _read_private_json(runtime_dir: str, name: str) -> dict | None:
    if not check_private_dir(runtime_dir):
        return None
    path = os.path.join(runtime_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise PermissionRefusedError(f"cannot open {path}: {err} (a symlink is refused)") from err
    with os.fdopen(fd) as fh:
        check_private(os.fstat(fd), path)  # keys someone else could have written are not ours
        try:
            data = json.load(fh)
        except ValueError as err:
            raise KvbmError(f"{path} is not a kvbm key file: {err}") from err
    if not isinstance(data, dict):
        raise KvbmError(f"{path} is not a kvbm key file: expected a map")
    return data


def _key(data: dict, name: str, runtime_dir: str) -> bytes:
    value = data.get(name)
    if not isinstance(value, str) or len(value) != Z85_KEY_CHARS:
        raise KvbmError(f"key file in {runtime_dir}: {name} is not a {Z85_KEY_CHARS}-character z85 key")
    raw = value.encode("ascii")
    try:
        z85.decode(raw)
    except (ValueError, KeyError, TypeError) as err:
        raise KvbmError(f"key file in {runtime_dir}: {name} is not valid z85: {err}") from err
    return raw


def configure_server(sock: zmq.Socket, keys: ServerKeys) -> None:
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.zap_domain = ZAP_DOMAIN
    try:
        # With a domain and this option libzmq refuses peers while no ZAP handler answers;
        # without it, it admits every CURVE peer then. A libzmq without the option still has
        # the Gatekeeper, bound before any server socket.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):
        logger.debug("this libzmq cannot enforce the ZAP domain; relying on the Gatekeeper's start order")


def configure_client(sock: zmq.Socket, keys: ClientKeys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


class Gatekeeper:
    """The ZAP handler of one ZeroMQ context: admits CURVE peers holding the client key, refuses
    every other peer (another key, another mechanism, a malformed request)."""

    def __init__(self, ctx: zmq.Context, keys: ServerKeys) -> None:
        self.ctx = ctx
        self.keys = keys
        self._admitted = z85.decode(keys.client_public)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.admitted = 0
        self.refused = 0

    def start(self) -> Gatekeeper:
        zap = self.ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)  # here, not in the thread: bound before start() returns
        self._thread = threading.Thread(target=self._serve, args=(zap,), name="kvbm-zap", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """After every server socket of the context is closed (libzmq admits CURVE peers unchecked
        once no handler is bound)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _serve(self, zap: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not zap.poll(ZAP_POLL_MS):
                    continue
                frames = zap.recv_multipart()
                try:
                    reply = self.answer(frames)
                except Exception:  # noqa: BLE001 - refuse, and keep answering: no handler, no check
                    logger.error("ZAP request of %d frames could not be answered; refused", len(frames),
                                 exc_info=True)
                    reply = [ZAP_VERSION, frames[1] if len(frames) > 1 else b"", b"500", b"internal error", b"", b""]
                zap.send_multipart(reply)
        except zmq.ContextTerminated:
            pass
        finally:
            zap.close(0)

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply (RFC 27) to one request: [version, request id, domain, address, routing
        id, mechanism, credentials...] -> [version, request id, status, text, user id, metadata]."""
        request_id = frames[1] if len(frames) > 1 else b""
        if len(frames) < 6 or frames[0] != ZAP_VERSION:
            return self._refuse(request_id, b"malformed ZAP request", "?", f"{len(frames)} frames")
        address = frames[3].decode("utf-8", "replace")
        mechanism, credentials = frames[5], frames[6:]
        if mechanism != b"CURVE" or len(credentials) != 1:
            return self._refuse(request_id, b"CURVE required", address, mechanism.decode("ascii", "replace"))
        if not hmac.compare_digest(credentials[0], self._admitted):
            return self._refuse(request_id, b"unknown client key", address,
                                f"key {z85.encode(credentials[0])[:8].decode()}...")
        self.admitted += 1
        return [ZAP_VERSION, request_id, b"200", b"OK", b"kvbm-client", b""]

    def _refuse(self, request_id: bytes, reason: bytes, address: str, detail: str) -> list[bytes]:
        self.refused += 1
        # A refused peer reconnects every 100 ms: log the 1st, 2nd, 4th, 8th... refusal only.
        if self.refused & (self.refused - 1) == 0:
            logger.warning("refused a connection from %s: %s (%s); %d refused so far", address or "ipc peer",
                           reason.decode(), detail, self.refused)
        return [ZAP_VERSION, request_id, b"400", reason, b"", b""]
