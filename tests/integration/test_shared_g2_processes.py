"""The shared G2 registry across real processes (CPU only; tests/support/shared_g2_engine.py runs
the engines, started with multiprocessing's spawn context).

What is checked: engine B (another process) matches what engine A offloaded, byte for byte;
namespaces never see each other's blocks and a namespace cannot outgrow its quota; four engines
hammering one namespace while one of them is killed with SIGKILL (by itself at a chosen point of
a call while it holds the lock, or from outside at whatever point it has reached): the others
finish, no match ever serves the wrong bytes, the next locker repairs, the dead engine is reaped
with its holds, and the invariants hold (refcounts = the live engines' holds); a process killed
while it holds the lock (an engine with holds, or a non-engine); a reused pid is not taken for the
engine; the segment is 0600 and unlinked when its creator closes it.

No assertion depends on timing: every wait has a deadline, and whatever the interleaving of the
processes, the same facts must hold at the end.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import uuid

import numpy as np
import pytest

from kvbm._fast import shared as S
from kvbm.shared_g2 import SharedG2
from kvbm.shm import Segment, process_start_time
from tests.support import shared_g2_engine as E

pytestmark = pytest.mark.slow

WAIT_S = 120.0
CTX = multiprocessing.get_context("spawn")


class Node:
    """The shared G2 segment, the data segment, and the engine processes of one test."""

    def __init__(self, total: int, **kw) -> None:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.g2 = SharedG2.create(f"kvbm-test-{tag}-g2reg", total, **kw)
        self.data = Segment.create(f"kvbm-test-{tag}-g2data", total * E.BLOCK_BYTES)
        self.procs: list[multiprocessing.Process] = []

    def spawn(self, target, *args, **kwargs):
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=target, args=(child, *args), kwargs=kwargs, daemon=True)
        proc.start()
        child.close()
        self.procs.append(proc)
        return proc, parent

    def engine(self, engine_id: str, fingerprint: str = "m", salt: bytes = b"", blocks: int | None = None):
        proc, conn = self.spawn(E.serve, self.g2.name, self.data.name, engine_id, fingerprint, salt, blocks)
        info = expect(conn, "joined")
        return proc, conn, info

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(WAIT_S)
        path = self.g2.segment.path
        self.g2.close()
        self.data.close()
        self.data.unlink()
        assert not os.path.exists(path)


@pytest.fixture
def node():
    made = []

    def make(total: int, **kw) -> Node:
        made.append(Node(total, **kw))
        return made[-1]

    yield make
    for n in made:
        n.close()


def expect(conn, tag: str):
    assert conn.poll(WAIT_S), f"no {tag!r} from the child within {WAIT_S} s"
    got = conn.recv()
    if isinstance(got, tuple) and got[0] == "error":
        pytest.fail(f"child failed:\n{got[1]}")
    assert got[0] == tag, got
    return got[1]


def ask(conn, *cmd):
    conn.send(cmd)
    return expect(conn, "ok")


def kill_and_wait(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(WAIT_S)
    assert proc.exitcode == -signal.SIGKILL


def test_segment_is_private_and_goes_with_its_creator(node):
    n = node(64)
    st = os.stat(n.g2.segment.path)
    assert st.st_mode & 0o777 == 0o600
    proc, conn, _ = n.engine("a")
    ask(conn, "exit")
    proc.join(WAIT_S)
    assert os.path.exists(n.g2.segment.path)   # an engine's close does not unlink it


def test_engine_b_matches_what_engine_a_offloaded_byte_for_byte(node):
    n = node(64)
    _, a, info_a = n.engine("a")
    _, b, info_b = n.engine("b")
    assert info_a["namespace"] == info_b["namespace"] and info_a["block_offset"] == info_b["block_offset"]
    chain = list(range(1, 17))
    canon = ask(a, "register", chain, [0] + chain[:-1])
    got = ask(b, "match", chain + [99])
    assert got == {"blocks": canon, "bad": 0}
    engines = {e["engine_id"]: e for e in n.g2.engines()}
    assert engines["b"]["pinned"] == 16 and engines["b"]["match_hits"] == 16 and engines["a"]["pinned"] == 0
    n.g2.check_invariants()
    ask(b, "release")
    assert ask(b, "leave") is True and ask(a, "leave") is True
    assert n.g2.namespaces() == []
    n.g2.check_invariants()


def test_namespaces_are_separate_and_quotas_hold(node):
    n = node(64, max_namespaces=4)
    _, a, info_a = n.engine("a", "model-1", blocks=16)
    _, b, info_b = n.engine("b", "model-2", blocks=8)
    _, c, info_c = n.engine("c", "model-1", b"", blocks=40)       # joins model-1: its quota stands
    assert (info_a["block_offset"], info_b["block_offset"]) == (0, 16)
    assert (info_c["namespace"], info_c["num_blocks"]) == (info_a["namespace"], 16)
    chain = list(range(1, 11))
    ask(a, "register", chain)
    assert ask(b, "match", chain) == {"blocks": [], "bad": 0}
    assert ask(b, "allocate", 9) is None                    # 8 blocks is all model-2 has
    assert len(ask(b, "allocate", 8)) == 8
    ask(b, "release")
    assert ask(b, "register", list(range(100, 140))) == []     # 40 blocks do not fit
    for lo in (100, 108):                                       # fills model-2, then evicts there
        assert len(ask(b, "register", list(range(lo, lo + 8)))) == 8
    got = ask(c, "match", chain)
    assert len(got["blocks"]) == 10 and got["bad"] == 0
    ask(c, "release")
    sizes = {ns["label"]: (ns["num_blocks"], ns["engines"], ns["registered"]) for ns in n.g2.namespaces()}
    assert sizes == {"model-1": (16, 2, 10), "model-2": (8, 1, 8)}
    n.g2.check_invariants()


def _hammer(n: Node, victim_kill=None, halfway=False, iters=300):
    """Three engines and a victim hammer one namespace of 48 blocks (80 hashes: eviction
    pressure). Returns the survivors' counts, after the victim died and the survivors are done."""
    chains = 10
    procs = []
    for i in range(4):
        is_victim = i == 3
        proc, conn = n.spawn(E.hammer, n.g2.name, n.data.name, f"e{i}", "m", 1000 + i, iters, chains,
                             victim_kill if is_victim else None, halfway and is_victim)
        procs.append((proc, conn))
    for _, conn in procs:
        expect(conn, "joined")
    for _, conn in procs:
        conn.send("go")
    victim, vconn = procs[3]
    if halfway:
        expect(vconn, "halfway")
        kill_and_wait(victim)
    else:
        victim.join(WAIT_S)
        try:
            msg = vconn.recv() if vconn.poll(0) else None
        except EOFError:                # its end of the pipe went with it
            msg = None
        assert msg is None, f"the victim said {msg!r}"
        assert victim.exitcode == -signal.SIGKILL, "the victim was to kill itself"
    counts = [expect(conn, "done") for _, conn in procs[:3]]
    return counts, procs


def _check_after_hammer(n: Node, counts, procs, lock_was_held: bool) -> None:
    for c in counts:
        assert c["bad"] == 0, counts
        assert c["pinned_at_end"] == 0
    assert sum(c["hits"] for c in counts) > 0 and sum(c["registered"] for c in counts) > 0
    n.g2.reap()           # reaped already when a locker found it dead, else here
    assert sorted(e["engine_id"] for e in n.g2.engines()) == ["e0", "e1", "e2"]
    h = n.g2.tables.header[0]
    if lock_was_held:
        assert h["repairs"] >= 1
    assert h["reaped"] == 1
    n.g2.check_invariants()
    assert [ns["active"] for ns in n.g2.namespaces()] == [0]   # nobody holds anything now
    for _, conn in procs[:3]:
        conn.send("leave")
        assert expect(conn, "left") is True
    assert n.g2.namespaces() == []


@pytest.mark.parametrize("kill", [
    ("register", "torn", 20),       # derived structures scribbled over, a block REGISTERED with hash 0
    ("register", "pins", 10),       # registry changed, half the dedup holds moved
    ("allocate", "pins", 15),       # blocks allocated, half of them recorded as held
    ("match", "registry", 25),      # blocks acquired, none recorded as held
    ("release", "locked", 30),      # holds given back, the registry not told
])
def test_four_engines_one_killed_while_holding_the_lock(node, kill):
    n = node(48, max_namespaces=1)
    counts, procs = _hammer(n, victim_kill=kill)
    _check_after_hammer(n, counts, procs, lock_was_held=True)


def test_four_engines_one_killed_from_outside(node):
    n = node(48, max_namespaces=1)
    counts, procs = _hammer(n, halfway=True)
    _check_after_hammer(n, counts, procs, lock_was_held=False)


def test_engine_killed_holding_the_lock_and_blocks(node):
    """An engine holds blocks (matched and freshly allocated), takes the lock, marks its namespace
    and is killed: the next locker gets EOWNERDEAD, rebuilds without its holds and reaps it."""
    n = node(32, max_namespaces=1)
    mine = n.g2.join("parent", os.getpid(), "m")
    chain = np.arange(1, 9, dtype=np.uint64)
    blocks = mine.registry.allocate(8)
    mine.registry.complete(blocks)
    canon = mine.registry.register(blocks, chain)
    mine.registry.release(canon[4:])
    proc, conn, _ = n.engine("victim")
    assert len(ask(conn, "match", list(range(1, 9)))["blocks"]) == 8
    assert len(ask(conn, "allocate", 3)) == 3
    assert ask(conn, "lock") == "held"
    kill_and_wait(proc)
    got = mine.registry.match(chain)             # the next locker: repair, then the call
    h = n.g2.tables.header[0]
    assert h["repairs"] == 1 and h["reaped"] == 1
    assert [e["engine_id"] for e in n.g2.engines()] == ["parent"]
    assert mine.registry.num_active == 8 and mine.registry.num_free == 24 and mine.registry.pinned == 12
    n.g2.check_invariants()
    mine.registry.release(np.concatenate([got, canon[:4]]))
    assert mine.registry.num_inactive == 8
    n.g2.check_invariants()


def test_non_engine_killed_holding_the_lock(node):
    n = node(32, max_namespaces=1)
    mine = n.g2.join("parent", os.getpid(), "m")
    canon = mine.registry.allocate(4)
    mine.registry.complete(canon)
    mine.registry.release(mine.registry.register(canon, [1, 2, 3, 4]))
    proc, conn = n.spawn(E.hold_lock, n.g2.name, mine.namespace)
    assert conn.poll(WAIT_S) and conn.recv() == "held"
    kill_and_wait(proc)
    assert mine.registry.match([1, 2, 3, 4]).tolist() == canon.tolist()
    assert n.g2.tables.header[0]["repairs"] == 1 and n.g2.tables.holder_ns == S.CLEAN
    n.g2.check_invariants()


def test_a_reused_pid_is_not_taken_for_the_engine(node):
    """The engine's process dies and its pid goes to another live process (here: this one, whose
    start time differs): reap must still take the engine and its holds."""
    n = node(32, max_namespaces=1)
    mine = n.g2.join("parent", os.getpid(), "m")
    mine.registry.release(_registered(mine.registry, [1, 2, 3]))
    proc, conn, info = n.engine("child")
    assert len(ask(conn, "match", [1, 2, 3])["blocks"]) == 3
    kill_and_wait(proc)
    slot = info["slot"]
    assert n.g2.tables.engines["start_time"][slot] != process_start_time(os.getpid())
    n.g2.tables.engines["pid"][slot] = os.getpid()          # the pid now belongs to a live process
    assert {e["engine_id"]: e["alive"] for e in n.g2.engines()} == {"parent": True, "child": False}
    reaped = n.g2.reap()
    assert [(r["engine_id"], r["released"]) for r in reaped] == [("child", 3)]
    assert mine.registry.num_inactive == 3
    n.g2.check_invariants()


def _registered(reg, hashes):
    blocks = reg.allocate(len(hashes))
    reg.complete(blocks)
    return reg.register(blocks, np.asarray(hashes, np.uint64))


def test_supervisor_makes_names_reaps_and_removes_the_registry(tmp_path):
    """kvbm-workers with a layout creates the registry segment (0600), names it in the welcome,
    reaps a dead engine on its own within a sweep, lists engines and namespaces in --status, and
    unlinks the segment when it stops."""
    import subprocess
    import sys

    import zmq

    from kvbm.cli import format_status
    from kvbm.shm import REGISTRY_KIND, segment_name
    from kvbm.wire import protocol as P
    from kvbm.wire.auth import ClientKeys
    from kvbm.wire.channel import Endpoints, connect_socket, make_context
    from tests.support.pipeline_harness import wait_for

    class Client:
        def __init__(self, endpoint: str, keys: ClientKeys) -> None:
            self.ctx = make_context()
            self.sock = connect_socket(self.ctx, zmq.DEALER, endpoint, keys)

        def ask(self, msg: dict, timeout_ms: int) -> dict:
            self.sock.send(P.encode(msg))
            assert self.sock.poll(timeout_ms), f"no answer to {msg}"
            return P.decode(self.sock.recv())

        def close(self) -> None:
            self.sock.close(0)
            self.ctx.term()

    instance = f"r{uuid.uuid4().hex[:8]}"
    rundir_parent = tmp_path / "run"
    rundir_parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "--instance-id", instance, "--runtime-dir",
                             str(rundir_parent), "--host-blocks", "64", "--layout", "layers=2,outer=2,page=16,inner=64",
                             "--force-cpu", "--interval", "0"], stdin=subprocess.DEVNULL)
    client = None
    g2 = None
    try:
        rundir = str(rundir_parent / f"kvbm-{instance}")
        def started():
            assert proc.poll() is None, f"kvbm-workers exited with {proc.returncode}"
            return Endpoints.read(rundir)

        endpoints = wait_for(started, WAIT_S, "endpoints.json")
        client = Client(endpoints.control, ClientKeys.read(rundir))
        welcome = client.ask({"t": P.MsgType.HELLO, "id": 1}, int(WAIT_S * 1000))
        reg = welcome["registry"]
        assert reg["segment"] == segment_name(instance, REGISTRY_KIND) and reg["blocks"] == 64
        assert reg["block_bytes"] == 2 * 2 * 16 * 64 * 2          # layers * outer * page * inner * bf16
        assert os.stat(f"/dev/shm/{reg['segment']}").st_mode & 0o777 == 0o600
        g2 = SharedG2.attach(reg["segment"])
        live = g2.join("live", os.getpid(), "m")
        start = process_start_time(os.getpid())
        ghost = g2.join("ghost", os.getpid(), "m", start_time=start - 1)    # a gone engine
        ghost.registry.allocate(4)
        assert len(g2.engines()) == 2
        wait_for(lambda: [e["engine_id"] for e in g2.engines()] == ["live"], WAIT_S, "the supervisor's reap")
        st = client.ask({"t": P.MsgType.STATUS, "id": 2}, int(WAIT_S * 1000))
        shown = st["tiers"]["g2"]["registry"]
        assert [e["engine_id"] for e in shown["engines"]] == ["live"] and shown["reaped"] == 1
        assert [(ns["label"], ns["num_blocks"], ns["free"]) for ns in shown["namespaces"]] == [("m", 16, 16)]
        text = format_status(st)
        assert "G2 registry" in text and "namespace 0 m: blocks [0, 16) quota 16, 1 engines" in text, text
        assert "engine live pid" in text
        live.leave()
    finally:
        if client is not None:
            client.close()
        if g2 is not None:
            g2.close()
        proc.terminate()
        proc.wait(WAIT_S)
    assert not os.path.exists(f"/dev/shm/{segment_name(instance, REGISTRY_KIND)}")
