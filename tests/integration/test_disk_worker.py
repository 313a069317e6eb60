"""The disk worker (kvbm.workers.disk_worker) through its wire protocol, CPU mode, real NIXL: a
kvbm-workers started with a disk tier, spoken to with hand-made messages (no engine), its G2
segment mapped here to fill and check host blocks.

H2DISK writes with per-block outcomes and checksums (the xxhash package is the oracle), DISK2H
reads byte for byte, a flipped byte answered CORRUPT and dropped, the entries listed, a journal of
another layout refused (then started cold when asked), and a kill -9 of the worker announced
for both of its paths, with the restarted generation finding every block in the journal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import xxhash
import zmq

from kvbm.errors import DiskError
from kvbm.layout import BlockLayout, LayoutType
from kvbm.shm import Segment
from kvbm.wire import protocol as P
from kvbm.wire.auth import ClientKeys
from kvbm.wire.channel import Endpoints, connect_socket, make_context
from kvbm.workers.disk.io import load_nixl
from tests.support.disk_helpers import content
from tests.support.pipeline_harness import DEFAULT_LAYOUT, pid_alive, wait_for

try:
    load_nixl()
except DiskError as _err:
    pytest.skip(f"needs NIXL: {_err}", allow_module_level=True)

DEADLINE = 30.0
HOST_BLOCKS = 64
BB = DEFAULT_LAYOUT.block_bytes           # 16 KiB
FP, MODEL = 0xF1F1, 0xA0A0


class Raw:
    """A client socket with the instance's keys (kvbm's servers answer CURVE clients only)."""

    def __init__(self, ctx, endpoint: str, keys: ClientKeys, kind=zmq.DEALER) -> None:
        self.sock = connect_socket(ctx, kind, endpoint, keys)

    def ask(self, msg: dict, timeout_ms: int = 10000) -> dict:
        self.sock.send(P.encode(msg))
        return self.recv(timeout_ms)

    def recv(self, timeout_ms: int = 10000) -> dict:
        assert self.sock.poll(timeout_ms), "no answer within the deadline"
        return P.decode(self.sock.recv())


class DiskWorkers:
    """kvbm-workers with a disk tier, started on its own; every process SIGKILLed in the finalizer."""

    def __init__(self, tmp_path, request, extra: list[str] = ()) -> None:
        self.instance = f"w{uuid.uuid4().hex[:8]}"
        self.disk = tmp_path / "g3"
        rundir = tmp_path / "run"
        rundir.mkdir()
        cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", self.instance, "--runtime-dir", str(rundir),
               "--host-size", str(HOST_BLOCKS * BB), "--force-cpu", "--interval", "0", "--disk-path", str(self.disk),
               "--disk-size", "4MB", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.pids = {self.proc.pid}
        self.segment = None
        self.ctx = make_context()
        request.addfinalizer(self.kill_all)
        instance_dir = str(rundir / f"kvbm-{self.instance}")
        self.endpoints = wait_for(lambda: Endpoints.read(instance_dir), DEADLINE, "endpoints.json")
        self.keys = ClientKeys.read(instance_dir)
        self.control = Raw(self.ctx, self.endpoints.control, self.keys)
        self.welcome = wait_for(self._ready, DEADLINE, "every worker ready")
        self.segment = Segment.attach(self.welcome["host"]["segment"])
        self.host = np.frombuffer(self.segment.map, dtype=np.uint8, count=HOST_BLOCKS * BB).reshape(HOST_BLOCKS, BB)

    def _ready(self) -> dict | None:
        w = self.control.ask({"t": P.MsgType.HELLO, "id": 0})
        if all(info["ready"] for info in w["workers"].values()):
            self.pids.update(s["pid"] for s in self.status()["workers"].values() if s.get("pid"))
            return w
        return None

    def status(self) -> dict:
        return self.control.ask({"t": P.MsgType.STATUS, "id": 1})

    def disk_worker(self) -> Raw:
        return Raw(self.ctx, self.welcome["workers"]["h2disk"]["endpoint"], self.keys)

    def kill_all(self) -> None:
        # The context first: one left open (a failed setup) blocks in Context.__del__ at a later
        # garbage collection, hanging whichever test runs then.
        self.ctx.destroy(0)
        self.host = None   # the view's export would keep the mapping from closing
        if self.segment is not None:
            self.segment.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workers(tmp_path, request) -> DiskWorkers:
    return DiskWorkers(tmp_path, request)


def register(raw: Raw, fingerprint: int = FP, model: int = MODEL, cold: bool = False, rid: int = 1) -> dict:
    device = BlockLayout(DEFAULT_LAYOUT, LayoutType.LAYER_SEPARATE, 64)
    host = BlockLayout(DEFAULT_LAYOUT, LayoutType.FULLY_CONTIGUOUS, HOST_BLOCKS)
    return raw.ask({"t": P.MsgType.REGISTER, "id": rid, "engine": "e1", "pid": os.getpid(),
                    "device": P.layout_to_wire(device), "host": P.layout_to_wire(host),
                    "memory": {"kind": "shm", "segment": "kvbm-none", "buffers": [{"nbytes": 1}]},
                    "disk": {"blocks": 64, "fingerprint": fingerprint, "model": model, "cold": cold}})


def write(raw: Raw, rid: int, gen: int, host_blocks, slots, hashes) -> dict:
    return raw.ask(P.make_xfer(rid, "e1", gen, P.Path.H2DISK, host_blocks, slots, hashes=hashes))


def read(raw: Raw, rid: int, gen: int, slots, host_blocks, sums) -> dict:
    return raw.ask(P.make_xfer(rid, "e1", gen, P.Path.DISK2H, slots, host_blocks, priority=1, sums=sums,
                               owner=np.zeros(len(slots), np.uint32), peers=[]))


def entries(raw: Raw, rid: int) -> dict[int, tuple[int, int]]:
    """slot -> (hash, checksum) of the worker's own store."""
    raw.sock.send(P.encode({"t": P.MsgType.ENTRIES, "id": rid, "engine": "e1", "own": True, "known": {}}))
    out = {}
    while True:
        msg = raw.recv()
        assert msg["id"] == rid
        if msg.get("last"):
            return out
        n = len(msg["slots"]) // 8
        if n:
            slots = P.unpack_blocks(msg["slots"], "slots", 2**62, n)
            for s, h, c in zip(slots, P.unpack_field(msg, "hashes", n), P.unpack_field(msg, "sums", n)):
                out[int(s)] = (int(h), int(c))


def fill(workers: DiskWorkers, blocks, hashes) -> None:
    for b, h in zip(blocks, hashes):
        workers.host[b] = content(h, BB)


def test_writes_reads_and_lists_blocks_and_a_flipped_byte_is_corrupt(workers):
    w = workers.welcome["workers"]
    assert w["h2disk"]["endpoint"] == w["disk2h"]["endpoint"] and w["h2disk"]["path"] == int(P.Path.H2DISK)
    assert w["disk2h"]["path"] == int(P.Path.DISK2H)
    raw = workers.disk_worker()
    reg = register(raw)
    assert reg["t"] == P.MsgType.REGISTERED, reg
    gen = reg["gen"]
    assert reg["disk"]["open"] and reg["disk"]["slots"] == 64 and reg["disk"]["live"] == 0
    assert reg["disk"]["read_path"] == "staged" and reg["disk"]["gds"] == "unavailable: CPU mode"

    n = 8
    hashes = np.arange(1000, 1000 + n, dtype=np.uint64)
    slots = np.array([3, 9, 10, 11, 40, 41, 62, 63])
    fill(workers, range(n), hashes)
    done = write(raw, 2, gen, range(n), slots, hashes)
    assert (done["t"], done["status"], done["error"]) == (P.MsgType.DONE, P.Status.OK, ""), done
    assert P.unpack_field(done, "state", n).tolist() == [P.BlockState.OK] * n
    sums = P.unpack_field(done, "sums", n)
    assert sums.tolist() == [xxhash.xxh3_64_intdigest(workers.host[i].tobytes()) for i in range(n)]
    assert done["bytes"] == n * BB

    workers.host[n:2 * n] = 0xA5
    got = read(raw, 3, gen, slots, range(n, 2 * n), sums)
    assert (got["status"], got["read_path"]) == (P.Status.OK, "staged"), got
    assert P.unpack_field(got, "state", n).tolist() == [P.BlockState.OK] * n
    assert np.array_equal(workers.host[n:2 * n], workers.host[:n])
    assert entries(raw, 4) == {int(s): (int(h), int(c)) for s, h, c in zip(slots, hashes, sums)}

    # A flipped byte in slot 41's file: that block is CORRUPT (dropped), the others arrive.
    folder = workers.disk / workers.instance
    f, off = 41 % 4, (41 // 4) * BB
    with open(folder / f"data.{f:03d}", "r+b") as fh:
        fh.seek(off + 777)
        byte = fh.read(1)[0]
        fh.seek(off + 777)
        fh.write(bytes([byte ^ 0x01]))
    workers.host[n:2 * n] = 0xA5
    bad = read(raw, 5, gen, slots, range(n, 2 * n), sums)
    assert bad["status"] == P.Status.ERROR and "failed their checksum" in bad["error"], bad
    state = P.unpack_field(bad, "state", n).tolist()
    assert state == [P.BlockState.OK] * 5 + [P.BlockState.CORRUPT] + [P.BlockState.OK] * 2
    good = [0, 1, 2, 3, 4, 6, 7]
    assert np.array_equal(workers.host[[n + i for i in good]], workers.host[good])
    assert 41 not in entries(raw, 6)
    g3 = wait_for(lambda: (st := workers.status()["tiers"]["g3"]).get("checksum_failures") == 1 and st, DEADLINE,
                  "the worker's stats")
    assert (g3["live"], g3["slots"], g3["read_path"], g3["journal_records"]) == (7, 64, "staged", 1 + 8 + 1)


def test_a_journal_of_another_layout_is_refused_unless_cold(workers):
    raw = workers.disk_worker()
    gen = register(raw)["gen"]
    fill(workers, [0, 1], [7, 8])
    assert write(raw, 2, gen, [0, 1], [0, 1], [7, 8])["status"] == P.Status.OK
    refused = register(raw, fingerprint=0xBAD, rid=3)
    assert refused["t"] == P.MsgType.DONE and refused["status"] == P.Status.ERROR, refused
    assert "JournalMismatch" not in refused["error"] and "holds 2 blocks of another store" in refused["error"]
    assert "fingerprint 61937 (journal) vs 2989 (asked)" in refused["error"] and "Start cold" in refused["error"]
    xfer = read(raw, 4, gen, [0], [5], [0])
    assert xfer["status"] == P.Status.ERROR and "not open" in xfer["error"]   # no store until one opens
    cold = register(raw, fingerprint=0xBAD, cold=True, rid=5)
    assert cold["t"] == P.MsgType.REGISTERED and cold["disk"]["live"] == 0, cold
    assert register(raw, rid=6)["status"] == P.Status.ERROR   # the journal is 0xBAD's now


def test_killed_worker_is_announced_for_both_paths_and_its_successor_finds_the_blocks(workers):
    events = Raw(workers.ctx, workers.welcome["events"], workers.keys, zmq.SUB)
    raw = workers.disk_worker()
    gen = register(raw)["gen"]
    hashes = np.arange(1, 5, dtype=np.uint64)
    fill(workers, range(4), hashes)
    sums = P.unpack_field(write(raw, 2, gen, range(4), [20, 21, 22, 23], hashes), "sums", 4)
    pid = workers.status()["workers"]["h2disk"]["pid"]
    os.kill(pid, signal.SIGKILL)
    seen = set()
    while not {("died", P.Path.H2DISK, gen), ("died", P.Path.DISK2H, gen), ("started", P.Path.H2DISK, gen + 1),
               ("started", P.Path.DISK2H, gen + 1)} <= seen:
        ev = events.recv(int(DEADLINE * 1000))
        seen.add((ev["kind"], P.Path(ev["path"]), ev["gen"]))
    workers.pids.add(workers.status()["workers"]["h2disk"]["pid"])
    stale = read(raw, 3, gen, [20], [10], sums[:1])
    assert stale["status"] == P.Status.STALE
    reg = register(raw, rid=4)
    assert reg["gen"] == gen + 1 and reg["disk"]["live"] == 4   # replayed from the journal
    workers.host[10:14] = 0
    got = read(raw, 5, gen + 1, [20, 21, 22, 23], range(10, 14), sums)
    assert got["status"] == P.Status.OK and np.array_equal(workers.host[10:14], workers.host[0:4])


def test_gds_on_is_refused_without_cuda_and_the_probe_reports_why(tmp_path, request):
    workers = DiskWorkers(tmp_path, request, ["--gds", "on"])
    refused = register(workers.disk_worker())
    assert refused["t"] == P.MsgType.DONE and refused["status"] == P.Status.ERROR, refused
    assert "gds=on needs CUDA; this kvbm-workers runs in CPU mode" in refused["error"], refused
    again = register(workers.disk_worker(), rid=2)          # refused again: the store was not kept open
    assert again["status"] == P.Status.ERROR and "gds=on needs CUDA" in again["error"], again
    from kvbm.workers.disk.files import DataFiles, Geometry, InstanceDir
    from kvbm.workers.disk.io import probe_gds
    folder = InstanceDir(str(tmp_path / "probe"), "p")
    folder.ensure()
    files = DataFiles.create(folder, Geometry.of(4096, 4, 1))
    try:
        why = probe_gds(files)        # no GPU here: a reason, never an exception
    finally:
        files.close()
    assert why and isinstance(why, str)


def test_a_second_engine_and_another_connection_are_refused(workers):
    """One live engine per instance, and a registration belongs to the connection that made it:
    another connection can neither register the same engine again, nor register a second engine,
    nor move blocks in its name; the first connection goes on unharmed."""
    first = workers.disk_worker()
    gen = register(first)["gen"]
    other = workers.disk_worker()                       # another DEALER: another connection
    again = register(other, rid=2)
    assert again["t"] == P.MsgType.DONE and again["status"] == P.Status.ERROR, again
    assert "registered by another connection" in again["error"], again
    second = other.ask({"t": P.MsgType.REGISTER, "id": 3, "engine": "e2", "pid": os.getpid(),
                        "device": P.layout_to_wire(BlockLayout(DEFAULT_LAYOUT, LayoutType.LAYER_SEPARATE, 64)),
                        "host": P.layout_to_wire(BlockLayout(DEFAULT_LAYOUT, LayoutType.FULLY_CONTIGUOUS,
                                                             HOST_BLOCKS)),
                        "memory": {"kind": "shm", "segment": "kvbm-none", "buffers": [{"nbytes": 1}]},
                        "disk": {"blocks": 64, "fingerprint": FP, "model": MODEL, "cold": False}})
    assert second["status"] == P.Status.ERROR and "is already attached to this kvbm instance" in second["error"]
    hashes = np.array([11, 12], np.uint64)
    fill(workers, [0, 1], hashes)
    stolen = write(other, 4, gen, [0, 1], [5, 6], hashes)
    assert stolen["status"] == P.Status.ERROR and "registered by another connection" in stolen["error"], stolen
    stolen = read(other, 5, gen, [5], [2], [0])
    assert stolen["status"] == P.Status.ERROR and "registered by another connection" in stolen["error"], stolen
    assert entries(first, 6) == {}                     # nothing was written for the other connection
    done = write(first, 7, gen, [0, 1], [5, 6], hashes)
    assert done["status"] == P.Status.OK and P.unpack_field(done, "state", 2).tolist() == [P.BlockState.OK] * 2
    workers.host[2:4] = 0
    got = read(first, 8, gen, [5, 6], [2, 3], P.unpack_field(done, "sums", 2))
    assert got["status"] == P.Status.OK and np.array_equal(workers.host[2:4], workers.host[0:2])


def read_only_folder(path):
    """Makes `path` a folder nobody can write into, root included, or skips: mode 0500 for a user;
    for root (whom modes do not stop) the immutable attribute, where the file system has one.
    Returns the undo."""
    import shutil
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        return lambda: path.chmod(0o700)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i here: no folder is read-only to this user")
    return lambda: subprocess.run([chattr, "-i", str(path)], check=True)


def test_a_read_only_disk_path_is_refused_at_start_with_the_reason(tmp_path):
    ro = tmp_path / "ro"
    undo = read_only_folder(ro)
    try:
        cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", f"ro{uuid.uuid4().hex[:8]}", "--runtime-dir",
               str(tmp_path), "--host-size", str(HOST_BLOCKS * BB), "--force-cpu", "--interval", "0",
               "--duration", "30", "--disk-path", str(ro), "--disk-size", "4MB"]
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    finally:
        undo()
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert f"disk tier folder {ro} is not a writable directory" in out.stderr, out.stderr
    assert "Permission denied" in out.stderr or "Operation not permitted" in out.stderr, out.stderr
    assert os.listdir(ro) == []
