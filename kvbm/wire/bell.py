"""Doorbells of the shared-memory lanes (kvbm._fast.lane): a Unix datagram socket a process sleeps
on (its fd sits in the same zmq_poll as its ZeroMQ sockets) and another process rings with one
empty datagram. A bell carries no data: whoever rings it only wakes the sleeper, who then reads its
lane. Kernel to kernel, a ring wakes the sleeper in a few microseconds, where a ZeroMQ message
passes through two ZeroMQ I/O threads.

Parts:
  Bell        bind(path): the socket file is created 0600 inside the instance's 0700 runtime dir
              (umask), unlinked by close(); fileno() for the poller; drain() empties it
  Ringer      ring(path): sends on a socket connected to that bell (reconnected once when its
              owner's socket is gone: a restarted owner binds the same path); a full receive
              buffer means the sleeper has bells pending already, so EAGAIN is not an error;
              forget(path) once its owner is gone for good (else its socket stays open)
  bell_dir    the runtime dir an ipc:// endpoint lives in (lanes exist only beside ipc endpoints:
              a TCP peer shares no memory with us)
  check_bell_path   a peer names a bell to ring: only a socket file in our runtime dir is rung
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import threading

from kvbm._fast.lane import send_empty


def bell_dir(endpoint: str) -> str | None:
    if not endpoint.startswith("ipc://"):
        return None
    return os.path.dirname(endpoint[len("ipc://"):]) or None


def _reachable(path: str) -> tuple[str, int]:
    """A name bind/sendto accept for `path`: the path itself, or, past the 107 bytes a Unix socket
    address holds (deep runtime dirs, e.g. pytest's), /proc/self/fd/<fd of its folder>/<name>, with
    that folder's O_PATH fd (the caller closes it; -1 when none was needed)."""
    if len(path.encode()) < 100:
        return path, -1
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}", fd


def check_bell_path(path: object, directory: str) -> str:
    """`path` if it names a socket file of ours inside `directory`; ValueError otherwise."""
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise ValueError(f"bell path {path!r:.120}: expected a socket path")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(directory):
        raise ValueError(f"bell {path!r:.120} is not in the runtime dir {directory}")
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise ValueError(f"bell {path!r:.120} is not a socket of this user")
    return path


class Bell:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            os.unlink(path)   # left by a killed predecessor of the same name
        except FileNotFoundError:
            pass
        name, dir_fd = _reachable(path)
        old = os.umask(0o177)
        try:
            self.sock.bind(name)
        except BaseException:
            self.sock.close()
            raise
        finally:
            os.umask(old)
            if dir_fd >= 0:
                os.close(dir_fd)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return n
            n += 1

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Ringer:
    """Rings bells from one connected socket per bell: a send on a connected socket skips the
    path lookup a sendto() makes each time (~2 us of the 5-7 a ring of a sleeper costs). Shared by
    the threads of a process (an engine's submitting threads and its I/O thread): a lock keeps one
    thread from closing a socket another is about to send on."""

    def __init__(self) -> None:
        self._socks: dict[str, socket.socket] = {}   # bell path -> a socket connected to it
        self._lock = threading.Lock()                 # every call under it is non-blocking
        self._closed = False

    def ring(self, path: str) -> bool:
        """False when the bell is gone (its owner exited, or its folder): nothing to wake."""
        with self._lock:
            if self._closed:
                return False   # its owner closed: a ring racing that close opens nothing new
            for _ in (0, 1):
                sock = self._socks.get(path) or self._connect(path)
                if sock is None:
                    return False
                err = send_empty(sock.fileno())   # keeps the GIL (kvbm._fast.lane says why)
                if err == 0 or err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return True    # rung, or bells already pending: the sleeper wakes anyway
                if err not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
                    raise OSError(err, os.strerror(err))
                # The socket it was connected to has closed. A successor may have bound the same
                # path (a restarted worker's bell): connect again, once.
                self._socks.pop(path).close()
            return False

    def forget(self, path: str) -> None:
        """Closes the socket kept for `path` (its owner is gone for good: a worker's engine left)."""
        with self._lock:
            sock = self._socks.pop(path, None)
        if sock is not None:
            sock.close()

    def _connect(self, path: str) -> socket.socket | None:
        try:
            name, dir_fd = _reachable(path)
        except FileNotFoundError:
            return None    # a deep path's folder is gone with its owner
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.connect(name)
            except OSError as err:
                sock.close()
                if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    return None
                raise
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)   # connect() resolved the name: the folder's fd is done with
        self._socks[path] = sock
        return sock

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, {}
        for sock in socks.values():
            sock.close()
