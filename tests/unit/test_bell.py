"""Doorbells (kvbm.wire.bell): a ring wakes its bell; a gone bell is reported, not an error; a bell
bound again at the same path (a restarted worker's) is rung through a fresh connection; deep
runtime dirs past a Unix socket address's length work; the socket file is private."""
import os
import select
import stat
import threading

from kvbm.wire.bell import Bell, Ringer


def _rung(bell: Bell) -> bool:
    return bool(select.select([bell.fileno()], [], [], 5.0)[0]) and bell.drain() > 0


def test_a_ring_wakes_its_bell_and_the_file_is_private(tmp_path):
    bell, ringer = Bell(str(tmp_path / "b.sock")), Ringer()
    try:
        assert stat.S_IMODE(os.stat(bell.path).st_mode) == 0o600
        assert ringer.ring(bell.path) is True
        assert _rung(bell)
        assert bell.drain() == 0
    finally:
        ringer.close()
        bell.close()
    assert not os.path.exists(bell.path)


def test_a_gone_bell_rings_false(tmp_path):
    ringer = Ringer()
    path = str(tmp_path / "b.sock")
    assert ringer.ring(path) is False                  # never bound
    bell = Bell(path)
    assert ringer.ring(path) is True
    bell.close()
    assert ringer.ring(path) is False                  # its owner closed it
    ringer.close()


def test_a_bell_bound_again_at_the_same_path_is_rung(tmp_path):
    path = str(tmp_path / "b.sock")
    ringer = Ringer()
    first = Bell(path)
    assert ringer.ring(path) and _rung(first)
    first.sock.close()                                 # killed: its file stays behind
    second = Bell(path)                                # its successor unlinks it and binds again
    try:
        assert ringer.ring(path) is True               # the old connection is refused: reconnected
        assert _rung(second)
    finally:
        ringer.close()
        second.close()


def test_a_full_bell_is_not_an_error(tmp_path):
    bell, ringer = Bell(str(tmp_path / "b.sock")), Ringer()
    try:
        assert all(ringer.ring(bell.path) for _ in range(5000))   # far past its receive buffer
        assert bell.drain() > 0
    finally:
        ringer.close()
        bell.close()


def _deep_dir(tmp_path):
    """A folder whose socket paths pass the 107 bytes a Unix socket address holds."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    return deep


def test_deep_runtime_dirs_past_the_address_length(tmp_path):
    deep = _deep_dir(tmp_path)
    bell, ringer = Bell(str(deep / "bell.sock")), Ringer()
    try:
        assert len(bell.path) > 108
        assert ringer.ring(bell.path) and _rung(bell)
    finally:
        ringer.close()
        bell.close()


def test_a_deep_bell_whose_folder_is_gone_rings_false(tmp_path):
    deep = _deep_dir(tmp_path)
    bell, ringer = Bell(str(deep / "bell.sock")), Ringer()
    try:
        assert ringer.ring(bell.path) and _rung(bell)
        bell.close()
        deep.rmdir()                                   # its owner's runtime dir, removed at stop
        assert ringer.ring(bell.path) is False         # not an error: nothing to wake
    finally:
        ringer.close()


def test_forget_closes_the_socket_kept_for_a_bell(tmp_path):
    bell, ringer = Bell(str(tmp_path / "b.sock")), Ringer()
    try:
        assert ringer.ring(bell.path) and _rung(bell)
        before = len(os.listdir("/proc/self/fd"))
        ringer.forget(bell.path)
        assert len(os.listdir("/proc/self/fd")) == before - 1
        ringer.forget(bell.path)                       # twice: nothing to do
        assert ringer.ring(bell.path) and _rung(bell)  # rung again on a fresh connection
    finally:
        ringer.close()
        bell.close()


def test_a_ring_in_flight_keeps_its_socket_from_another_thread(tmp_path, monkeypatch):
    """One Ringer is shared by an engine's submitting threads and its I/O thread: a thread that
    forgets a bell (or reconnects it) waits for a send in flight on that bell's socket instead of
    closing the socket under it (the send then failed with EBADF, or hit a reused fd)."""
    from kvbm.wire import bell as B

    bell, ringer = Bell(str(tmp_path / "b.sock")), Ringer()
    real_send, entered, go = B.send_empty, threading.Event(), threading.Event()

    def parked_send(fd):
        if not entered.is_set():
            entered.set()
            go.wait(30)                  # the first send waits here, its fd in hand
        return real_send(fd)

    monkeypatch.setattr(B, "send_empty", parked_send)
    results, forgot = [], threading.Event()
    ringing = threading.Thread(target=lambda: results.append(ringer.ring(bell.path)))
    forgetting = threading.Thread(target=lambda: (ringer.forget(bell.path), forgot.set()))
    try:
        ringing.start()
        assert entered.wait(30)
        forgetting.start()
        assert not forgot.wait(1.0)      # blocked behind the send in flight (unlocked: done at once)
        go.set()
        ringing.join(30)
        forgetting.join(30)
        assert results == [True] and forgot.is_set()
        assert _rung(bell)
    finally:
        go.set()
        ringer.close()
        bell.close()
