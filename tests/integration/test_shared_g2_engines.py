"""Several engine processes on one kvbm-workers, one G2 and one registry (issue 15), in CPU mode:
real KvBlockManagers (tests/support/shared_engine.py, spawned), a real kvbm-workers with its path
workers, the shared registry in between.

What is checked: engine B matches and onboards, byte for byte into poisoned blocks, what engine A
offloaded; four engines under load while one is killed with SIGKILL: the others finish, nothing
wrong is served, the dead engine is reaped and its holds freed, the invariants hold; a D2H worker
stopped (SIGSTOP) while an engine that offloaded through it is killed keeps that engine's G2 blocks
out of the pool until it has let go of it (quarantine); another model gets its own namespace and
quota and cannot evict the first's blocks, and a namespace that does not fit is refused; path
workers refuse a registration that the engine table does not back (wrong pid, an engine of its own
beside members); engines on an instance with a disk tier share one G3 slot table (kvbm.shared_g3,
another model is refused): one reads from disk what another wrote, a later engine rebuilds the
table from the store, and a kill -9 of one under load leaves the others serving right bytes.

No assertion depends on timing: gating is by SIGSTOP, every wait is for a condition with a deadline.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
import uuid

import pytest

import kvbm
from kvbm.cli import ask_status, format_status
from kvbm.layout import BlockLayout, LayoutType
from kvbm.shared_g2 import SharedG2
from kvbm.transfer.launcher import WorkersProcess
from kvbm.wire import protocol as P
from tests.support import shared_engine as E
from tests.support.shared_engine import ask, expect

pytestmark = pytest.mark.slow

WAIT_S = 120.0
CTX = multiprocessing.get_context("spawn")


class Node:
    """A kvbm-workers with a shared G2 of `total` blocks, and the engine processes of one test."""

    def __init__(self, rundir: str, total: int, **config) -> None:
        self.config = kvbm.KvbmConfig(instance_id=f"t{uuid.uuid4().hex[:10]}", runtime_dir=rundir, layout=E.LAYOUT,
                                      device_blocks=E.DEVICE_BLOCKS, host_blocks=total, force_cpu=True, **config)
        self.workers = WorkersProcess(self.config, total * E.LAYOUT.block_stride, layout=E.LAYOUT)
        self.workers.start(WAIT_S)
        self.procs: list = []
        welcome = ask_status(self.config)["tiers"]["g2"]["registry"]
        self.g2 = SharedG2.attach(welcome["segment"])

    def spawn(self, **changes):
        """An engine process with the node's config but `changes`; (process, pipe)."""
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=E.serve, args=(child, dataclasses.replace(self.config, **changes)), daemon=True)
        proc.start()
        child.close()
        self.procs.append(proc)
        return proc, parent

    def engine(self, **changes):
        """An engine process that joined; (process, pipe, its lease info)."""
        proc, conn = self.spawn(**changes)
        return proc, conn, expect(conn, "ready")

    def status(self) -> dict:
        return ask_status(self.config)

    def pid_of(self, path: str) -> int:
        return int(self.status()["workers"][path]["pid"])

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(WAIT_S)
        self.g2.close()
        self.workers.stop()


@pytest.fixture
def node():
    import shutil
    import tempfile
    made, dirs = [], []

    def make(total: int, **config) -> Node:
        dirs.append(tempfile.mkdtemp(prefix="kvs-"))   # short: unix socket paths have 107 bytes
        made.append(Node(dirs[-1], total, **config))
        return made[-1]

    yield make
    for n in made:
        n.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def wait_for(what: str, cond, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def _load_totals(engines) -> dict:
    """Waits for each engine's "load" to end (progress skipped); their stats summed."""
    total = {"requests": 0, "onboarded": 0, "mismatches": 0}
    for _, conn, _ in engines:
        while True:
            assert conn.poll(WAIT_S), "a live engine stopped answering"
            tag, value = conn.recv()
            assert tag != "error", value
            if tag == "done":
                break
        for k in total:
            total[k] += value[k]
    return total


def test_engine_b_onboards_what_engine_a_offloaded_byte_for_byte(node):
    n = node(64)
    _, a, info_a = n.engine()
    _, b, info_b = n.engine()
    assert info_a["namespace"] == info_b["namespace"] and info_a["engine_id"] != info_b["engine_id"]
    assert (info_a["block_offset"], info_a["num_blocks"]) == (0, 64)
    prefix = E.prompt_hashes(0, 8)
    assert ask(b, "match", prefix, tag="matched") == 0
    assert ask(a, "offload", prefix, list(range(8)), True, tag="offloaded") == {"moved": 8, "held": 0, "dropped": 0}
    assert ask(b, "match", prefix + [12345], tag="matched") == 8
    assert ask(b, "onboard", prefix, list(range(20, 28)), tag="onboarded") == (8, 0)   # poisoned, then checked
    # B offloading the same prefix copies nothing: G2 holds it already (another engine's blocks)
    assert ask(b, "offload", prefix, list(range(20, 28)), True, tag="offloaded")["held"] == 8
    reg = n.status()["tiers"]["g2"]["registry"]
    engines = {e["engine_id"]: e for e in reg["engines"]}
    assert engines[info_b["engine_id"]]["match_hits"] == 8 and engines[info_a["engine_id"]]["registered"] == 8
    assert all(e["workers"] == [0, 1] and e["pinned"] == 0 for e in engines.values())   # d2h and h2d hold them
    assert reg["namespaces"][0]["engines"] == 2 and reg["namespaces"][0]["inactive"] == 8
    n.g2.check_invariants()
    ask(a, "close", tag="closed")
    ask(b, "close", tag="closed")
    assert wait_for("the namespace freed", lambda: n.g2.namespaces() == [])


def test_four_engines_under_load_survive_a_kill9_of_one(node):
    n = node(48)
    engines = [n.engine() for _ in range(4)]
    for i, (_, conn, _) in enumerate(engines):
        conn.send(("load", 100 + i, 40 if i < 3 else 10_000, 8, 12))
    victim, vconn, vinfo = engines[3]
    for _ in range(3):                        # under way: three requests done
        assert expect(vconn, "progress") >= 0
    os.kill(victim.pid, signal.SIGKILL)       # at whatever point of an offload, onboard or match it is
    victim.join(WAIT_S)
    assert victim.exitcode == -signal.SIGKILL
    total = _load_totals(engines[:3])
    assert total["requests"] == 120 and total["mismatches"] == 0
    assert total["onboarded"] > 0         # their requests share prompts: each onboards the others' blocks
    gone = vinfo["engine_id"]
    wait_for("the dead engine reaped and let go of", lambda: gone not in {e["engine_id"] for e in n.g2.engines()})
    n.g2.check_invariants()               # refcounts = the live engines' holds: the dead one's are gone
    for _, conn, _ in engines[:3]:
        assert ask(conn, "pinned", tag="pinned") == 0
    ns = n.g2.namespaces()[0]
    assert ns["engines"] == 3 and ns["active"] == 0 and ns["free"] + ns["inactive"] == 48
    assert n.g2.status()["reaped"] >= 1
    for _, conn, _ in engines[:3]:
        ask(conn, "close", tag="closed")
    assert wait_for("the namespace freed", lambda: n.g2.namespaces() == [])


def test_a_dead_engines_blocks_stay_out_of_the_pool_while_its_copy_may_run(node):
    """SIGSTOP the D2H worker; engine A submits an offload (4 G2 blocks allocated, the copy queued
    at the stopped worker) and is killed: it is reaped but RETIRED, its 4 blocks held, so engine B
    cannot be handed them. SIGCONT: the worker drops A's registration and lets go; the blocks
    return to the pool; the invariants hold throughout."""
    n = node(16)
    _, b, _ = n.engine()
    victim, a, info_a = n.engine()
    d2h = n.pid_of("d2h")
    os.kill(d2h, signal.SIGSTOP)
    try:
        assert ask(a, "offload", E.prompt_hashes(1, 4), [0, 1, 2, 3], False, tag="submitted") is None
        wait_for("A's 4 blocks allocated", lambda: n.g2.namespaces()[0]["free"] == 12)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT_S)

        def retired():
            e = {x["engine_id"]: x for x in n.g2.engines()}.get(info_a["engine_id"])
            return e is not None and e["state"] == "retired" and e
        e = wait_for("A reaped (by the supervisor's sweep) and retired", retired)
        assert e["pinned"] == 4 and 0 in e["workers"]
        text = format_status(n.status())
        assert f"engine {info_a['engine_id']} pid {victim.pid} (gone) RETIRED namespace 0: holds 4" in text, text
        assert "workers d2h" in text, text
        n.g2.check_invariants()
        # B fills G2: it gets the 12 blocks A does not hold, never A's 4
        assert ask(b, "offload", E.prompt_hashes(2, 16), list(range(16)), False, tag="submitted") is None
        assert n.g2.namespaces()[0]["free"] == 0
        assert {x["engine_id"]: x for x in n.g2.engines()}[info_a["engine_id"]]["pinned"] == 4
    finally:
        os.kill(d2h, signal.SIGCONT)
    wait_for("A let go of", lambda: info_a["engine_id"] not in {x["engine_id"] for x in n.g2.engines()})
    wait_for("B's 12 copies registered", lambda: n.g2.namespaces()[0]["inactive"] == 12)
    n.g2.check_invariants()
    assert n.g2.namespaces()[0]["free"] == 4                                   # A's, back in the pool
    assert ask(b, "match", E.prompt_hashes(2, 16), tag="matched") == 12
    assert ask(b, "onboard", E.prompt_hashes(2, 12), list(range(16, 28)), tag="onboarded") == (12, 0)
    ask(b, "close", tag="closed")


def test_another_model_gets_its_own_namespace_and_quota(node):
    n = node(64)
    _, a, info_a = n.engine(salt="model-1", host_blocks=24)
    _, c, info_c = n.engine(salt="model-2", host_blocks=24)
    _, a2, info_a2 = n.engine(salt="model-1", host_blocks=8)          # joins model-1: its quota stands
    assert info_a["namespace"] != info_c["namespace"] and info_a2["namespace"] == info_a["namespace"]
    assert (info_a["block_offset"], info_c["block_offset"], info_a2["num_blocks"]) == (0, 24, 24)
    mine = E.prompt_hashes(0, 24)
    assert ask(a, "offload", mine, list(range(24)), True, tag="offloaded")["moved"] == 24
    for p in range(1, 5):    # model-2 offloads 4 x its quota: it evicts its own blocks only
        ask(c, "offload", E.prompt_hashes(p, 24), list(range(24)), True, tag="offloaded")
    assert ask(c, "match", mine, tag="matched") == 0           # another namespace: never sees them
    assert ask(a2, "match", mine, tag="matched") == 24          # every block of model-1 is still there
    assert ask(a2, "onboard", mine, list(range(24)), tag="onboarded") == (24, 0)
    nss = {ns["namespace"]: ns for ns in n.status()["tiers"]["g2"]["registry"]["namespaces"]}
    assert nss[info_a["namespace"]]["num_blocks"] == nss[info_c["namespace"]]["num_blocks"] == 24
    assert nss[info_c["namespace"]]["inactive"] == 24 and nss[info_a["namespace"]]["inactive"] == 24
    # a third model: 16 blocks of G2 left, it asks for 24
    proc, conn = n.spawn(salt="model-3", host_blocks=24)
    assert conn.poll(WAIT_S)
    tag, text = conn.recv()
    assert tag == "error" and "ConfigError" in text and "no room for a namespace of 24 blocks" in text, text
    proc.join(WAIT_S)
    n.g2.check_invariants()
    for conn in (a, c, a2):
        ask(conn, "close", tag="closed")


def test_path_workers_trust_the_engine_table_not_the_message(node):
    """A registration naming a member's engine id from another pid, or one that is not a member
    beside members, or a member's id over another range of G2, is refused; nothing else changes."""
    from kvbm.errors import TransferError
    from kvbm.transfer.launcher import connect_workers
    from kvbm.transfer.memory_map import describe_memory
    n = node(32)
    _, a, info_a = n.engine()
    mgr = kvbm.KvBlockManager(n.config)        # this process: only for its emulated device tensors
    try:
        layout = BlockLayout(E.LAYOUT, LayoutType.LAYER_SEPARATE, E.DEVICE_BLOCKS)
        tensors = mgr.create_device_tensors(layout, device="cpu")
        memory = describe_memory(tensors, layout, mgr._shared)
        host = BlockLayout(E.LAYOUT, LayoutType.FULLY_CONTIGUOUS, 32)
        cases = [(info_a["engine_id"], 0, "the shared G2 has it as pid"),      # a member's id, our pid
                 ("stranger", 0, "would overwrite its host blocks")]           # not a member, beside one
        for engine_id, offset, why in cases:
            tm, _ = connect_workers(n.config, host.total_bytes, "G2", start=False, engine_id=engine_id)
            try:
                with pytest.raises(TransferError, match=why):
                    tm.register(layout, host, memory, 30.0, host_offset=offset, paths=(P.Path.D2H,))
            finally:
                tm.close()
    finally:
        mgr.close()
    assert ask(a, "offload", E.prompt_hashes(0, 4), [0, 1, 2, 3], True, tag="offloaded")["moved"] == 4
    n.g2.check_invariants()
    ask(a, "close", tag="closed")


def _g3(n) -> SharedG2:
    return SharedG2.attach(n.status()["tiers"]["g3"]["registry"]["segment"])


def test_engines_share_one_disk_tier_and_read_each_others_blocks(node, tmp_path):
    """Two engines on an instance with a disk tier: one G3 slot table (kvbm.shared_g3), so B reads
    from disk, byte for byte, what A wrote; after both left, a third engine rebuilds the table from
    the store (warm restart) once and reads it again."""
    n = node(32, disk_path=str(tmp_path / "g3"), disk_blocks=64, disk_admission="write-through")
    g3 = _g3(n)
    try:
        _, a, info_a = n.engine()
        _, b, _ = n.engine()
        prefix = E.prompt_hashes(0, 8)
        assert ask(a, "offload", prefix, list(range(8)), True, tag="offloaded")["moved"] == 8
        assert ask(a, "flush", tag="flushed")["written"] == 8
        for p in range(1, 5):          # B fills G2 (32 blocks) with other prompts: the prefix leaves G2
            assert ask(b, "offload", E.prompt_hashes(p, 8), list(range(8)), True, tag="offloaded")["moved"] == 8
        assert ask(b, "flush", tag="flushed")["written"] == 32
        assert ask(b, "tiers", prefix, tag="tiers") == {"G2": 0, "G3": 8}
        assert ask(b, "onboard_from", prefix, list(range(20, 28)), tag="onboarded") == (8, 0, 0, 8)
        assert ask(a, "tiers", E.prompt_hashes(4, 8), tag="tiers")["G3"] == 8    # B's writes, seen by A
        engines = {e["engine_id"]: e for e in g3.engines()}
        assert len(engines) == 2 and all(e["workers"] == [int(P.Path.H2DISK)] for e in engines.values())
        text = format_status(n.status())             # kvbm-workers --status: the G3 table's engines too
        assert f"G3 registry {g3.name}: 64 blocks" in text and "workers h2disk" in text, text
        assert g3.namespaces()[0]["inactive"] == 40      # one table: 8 + 32 blocks, each written once
        g3.check_invariants()
        n.g2.check_invariants()
        ask(a, "close", tag="closed")
        ask(b, "close", tag="closed")
        assert wait_for("the G3 namespace freed", lambda: g3.namespaces() == [])
        _, c, _ = n.engine()           # the table is gone; the store is not: C rebuilds it once
        assert ask(c, "tiers", prefix, tag="tiers") == {"G2": 0, "G3": 8}
        assert ask(c, "onboard_from", prefix, list(range(8)), tag="onboarded") == (8, 0, 0, 8)
        assert g3.namespaces()[0]["registered"] == 40 and info_a["namespace"] == 0
        g3.check_invariants()
        ask(c, "close", tag="closed")
    finally:
        g3.close()


def test_engines_with_a_disk_tier_under_load_survive_a_kill9_of_one(node, tmp_path):
    """Three engines over a small shared G2 (victims written to the shared G3 by every engine's
    cleaner) and G3 reads of each other's blocks, one killed mid-load: the others finish with every
    loaded block right, the dead engine is reaped from both tables, the invariants hold."""
    n = node(16, disk_path=str(tmp_path / "g3"), disk_blocks=256)
    g3 = _g3(n)
    try:
        engines = [n.engine() for _ in range(3)]
        for i, (_, conn, _) in enumerate(engines):
            conn.send(("load", 200 + i, 30 if i < 2 else 10_000, 12, 8))
        victim, vconn, vinfo = engines[2]
        for _ in range(3):
            assert expect(vconn, "progress") >= 0
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT_S)
        total = _load_totals(engines[:2])
        assert total["requests"] == 60 and total["mismatches"] == 0 and total["onboarded"] > 0
        written = [ask(conn, "flush", tag="flushed")["written"] for _, conn, _ in engines[:2]]
        assert sum(written) > 0
        gone = vinfo["engine_id"]
        for reg in (n.g2, g3):
            wait_for("the dead engine reaped and let go of",
                     lambda reg=reg: gone not in {e["engine_id"] for e in reg.engines()})
            reg.check_invariants()
        assert g3.namespaces()[0]["active"] == 0 and g3.namespaces()[0]["engines"] == 2
        for _, conn, _ in engines[:2]:
            ask(conn, "close", tag="closed")
    finally:
        g3.close()


def test_another_model_on_an_instance_with_a_disk_tier_is_refused(node, tmp_path):
    """One store holds one model's blocks: an engine of another salt is refused when it connects,
    and leaves the shared G2 namespace it had made (nothing of it stays); so is an engine whose G3
    size is not the store's."""
    n = node(32, disk_path=str(tmp_path / "g3"), disk_blocks=64)
    g3 = _g3(n)
    try:
        _, a, _ = n.engine(host_blocks=16)      # half of G2: room for another model's namespace
        proc, conn = n.spawn(salt="another-model", host_blocks=16)
        assert conn.poll(WAIT_S)
        tag, text = conn.recv()
        assert tag == "error" and "holds another model's blocks" in text, text
        proc.join(WAIT_S)
        proc, conn = n.spawn(host_blocks=16, disk_blocks=32)     # the model's, with another G3 size
        assert conn.poll(WAIT_S)
        tag, text = conn.recv()
        assert tag == "error" and "disk tier has 64 slots; this engine's G3 has 32 blocks" in text, text
        proc.join(WAIT_S)
        assert [e["state"] for e in n.g2.engines()] == ["live"] and len(n.g2.namespaces()) == 1
        assert len(g3.engines()) == 1
        n.g2.check_invariants()
        g3.check_invariants()
        ask(a, "close", tag="closed")
    finally:
        g3.close()


def test_a_dead_engines_g3_slots_stay_out_of_the_table_while_its_write_may_run(node, tmp_path):
    """The G3 quarantine: with the disk worker stopped (SIGSTOP), engine A's write-through takes 4 of
    the 8 G3 slots and A is killed. A is retired in the G3 table with its 4 slots held, so B's writes
    get only the other 4; after SIGCONT the disk worker drops A and lets go, and A's slots return."""
    n = node(32, disk_path=str(tmp_path / "g3"), disk_blocks=8, disk_admission="write-through")
    g3 = _g3(n)
    try:
        _, b, _ = n.engine()
        victim, a, info_a = n.engine()
        disk = n.pid_of("h2disk")
        os.kill(disk, signal.SIGSTOP)
        try:
            assert ask(a, "offload", E.prompt_hashes(1, 4), [0, 1, 2, 3], True, tag="offloaded")["moved"] == 4
            wait_for("A's 4 G3 slots taken", lambda: g3.namespaces()[0]["free"] == 4)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(WAIT_S)

            def retired():
                e = {x["engine_id"]: x for x in g3.engines()}.get(info_a["engine_id"])
                return e is not None and e["state"] == "retired" and e
            e = wait_for("A reaped and retired in G3", retired)
            assert e["pinned"] == 4 and e["workers"] == [int(P.Path.H2DISK)]
            g3.check_invariants()
            assert ask(b, "offload", E.prompt_hashes(2, 8), list(range(8)), True, tag="offloaded")["moved"] == 8
            wait_for("B's writes take the 4 free slots", lambda: g3.namespaces()[0]["free"] == 0)
            assert {x["engine_id"]: x for x in g3.engines()}[info_a["engine_id"]]["pinned"] == 4
        finally:
            os.kill(disk, signal.SIGCONT)
        wait_for("A let go of in G3", lambda: info_a["engine_id"] not in {x["engine_id"] for x in g3.engines()})
        st = ask(b, "flush", tag="flushed")
        assert st["written"] == 4 and st["write_skipped"] == 4, st
        g3.check_invariants()
        ns = g3.namespaces()[0]
        assert (ns["free"], ns["inactive"], ns["active"]) == (4, 4, 0)      # A's 4 back in the table
        ask(b, "close", tag="closed")
    finally:
        g3.close()


def test_the_disk_worker_takes_writes_only_to_slots_the_writer_holds(node, tmp_path):
    """An engine of the shared G3 that sends an H2DISK into a slot it does not hold (another
    engine's block) is refused, the block stays readable; an engine without a disk tier on the
    same instance registers and moves G2 blocks, and its disk transfers are refused."""
    n = node(32, disk_path=str(tmp_path / "g3"), disk_blocks=16, disk_admission="write-through")
    g3 = _g3(n)
    try:
        _, a, _ = n.engine(host_blocks=16)
        _, b, _ = n.engine(host_blocks=16)
        prefix = E.prompt_hashes(0, 4)
        assert ask(a, "offload", prefix, list(range(4)), True, tag="offloaded")["moved"] == 4
        ask(a, "flush", tag="flushed")
        text = ask(b, "raw_write", 0, 0, tag="written")       # slot 0: A's block, held by nobody now
        assert text and "writes G3 slots it does not hold" in text, text
        _, plain, _ = n.engine(salt="", host_blocks=16, disk_path=None, disk_blocks=None)
        assert ask(plain, "offload", E.prompt_hashes(5, 4), list(range(4)), True, tag="offloaded")["moved"] == 4
        text = ask(plain, "raw_write", 0, 1, tag="written")
        assert text and "registered without a disk tier" in text, text
        assert len(g3.engines()) == 2                          # the plain engine never joined G3
        assert ask(b, "onboard_from", prefix, list(range(20, 24)), tag="onboarded")[:2] == (4, 0)
        g3.check_invariants()
    finally:
        g3.close()
