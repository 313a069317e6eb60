"""The shared G2 registry in one process: the segment (0600, sparse, unlinked on close), join and
namespaces (partitions, quotas, refusals with the numbers), cross-engine holds (pins) and what an
engine may not do to another's, leave and reap (pid reuse is not life), the repair of a table a
holder left half-changed, and BlockRegistry.attach/rebuild underneath.

The dead engines here are slots whose recorded start time is not their pid's: the liveness check
treats them exactly as a process that is gone (tests/integration/test_shared_g2_processes.py kills real
processes)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from kvbm._fast import shared as S
from kvbm._fast.registry import BlockRegistry
from kvbm.errors import ConfigError, LifecycleError, RegistryError
from kvbm.policy import EvictionPolicy
from kvbm.pools import BlockPool, Tier
from kvbm.shared_g2 import SharedG2, namespace_key
from kvbm.shm import Segment, process_start_time

PID = os.getpid()
START = process_start_time(PID)


@pytest.fixture
def make_g2():
    made = []

    def make(total=64, **kw):
        g2 = SharedG2.create(f"kvbm-test-{PID}-{uuid.uuid4().hex[:8]}-g2reg", total, **kw)
        made.append(g2)
        return g2

    yield make
    for g2 in made:
        g2.close()


def fill(reg, hashes, parents=None):
    """allocate + complete + register + release: the hashes end up inactive (matchable)."""
    blocks = reg.allocate(len(hashes))
    reg.complete(blocks)
    canon = reg.register(blocks, np.asarray(hashes, np.uint64), parents=parents)
    reg.release(canon)
    return canon


def dead_join(g2, engine_id, fingerprint="m", salt=b"", blocks=None):
    """An engine slot whose process counts as gone: this pid with another start time (what a
    reused pid looks like)."""
    return g2.join(engine_id, PID, fingerprint, salt, blocks, start_time=START - 1)


# ---- the segment ---------------------------------------------------------------------------------

def test_segment_private_sparse_and_unlinked_on_close(make_g2):
    g2 = make_g2(total=4096, max_engines=4, max_namespaces=2)
    st = os.stat(g2.segment.path)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
    hdr = g2.tables.header[0]
    assert st.st_size == hdr["segment_bytes"]
    assert st.st_blocks * 512 <= hdr["reserved_bytes"] + 4096     # only the tables are claimed
    lease = g2.join("a", PID, "m")
    grown = os.stat(g2.segment.path).st_blocks * 512
    assert grown >= BlockRegistry.bytes_needed(lease.num_blocks, 0)
    lease.leave()                                                   # last engine: namespace freed
    assert os.stat(g2.segment.path).st_blocks * 512 < grown
    path = g2.segment.path
    g2.close()
    assert not os.path.exists(path)


def test_attach_sees_the_same_tables_and_refuses_other_segments(make_g2):
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    fill(a.registry, [5, 6])
    other = SharedG2.attach(g2.name)
    try:
        assert not other.owner and other.total_blocks == 64
        assert [e["engine_id"] for e in other.engines()] == ["a"]
        b = other.join("b", PID, "m")
        assert b.namespace == a.namespace and b.block_offset == a.block_offset
        np.testing.assert_array_equal(b.registry.match([5, 6]), a.registry.lookup([5, 6]))
        b.registry.release(b.registry.match([5]))
    finally:
        other.close()
    assert os.path.exists(g2.segment.path)         # only the creator unlinks
    junk = Segment.create(f"kvbm-test-{PID}-{uuid.uuid4().hex[:8]}-junk", 1 << 16)
    try:
        with pytest.raises(RegistryError, match="not a shared G2 segment"):
            SharedG2.attach(junk.name)
    finally:
        junk.close()
        junk.unlink()
    with pytest.raises(LifecycleError, match="already exists"):
        SharedG2.create(g2.name, 64)


def test_create_refuses_bad_sizes():
    with pytest.raises(ConfigError, match="max_engines 0"):
        SharedG2.create("kvbm-test-never", 64, max_engines=0)
    with pytest.raises(ConfigError, match="total_blocks"):
        SharedG2.create("kvbm-test-never", 0)
    assert not os.path.exists("/dev/shm/kvbm-test-never")


def test_lock_costs_measures_three_locks():
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        costs = S.lock_costs(1000, fd)
    finally:
        os.close(fd)
    assert set(costs) == {"robust_mutex", "plain_mutex", "flock"} and all(v > 0 for v in costs.values())


# ---- join, namespaces, quotas --------------------------------------------------------------------

def test_namespaces_are_partitions_with_quotas(make_g2):
    g2 = make_g2(total=64, max_namespaces=4)
    a = g2.join("a", PID, "llama", b"s1")
    b = g2.join("b", PID, "llama", b"s1")
    c = g2.join("c", PID, "llama", b"s2", blocks=8)        # other salt: another namespace
    d = g2.join("d", PID, "qwen", blocks=20)
    assert (a.namespace, a.block_offset, a.num_blocks) == (b.namespace, 0, 16)   # 64 // 4
    assert (c.block_offset, c.num_blocks) == (16, 8)
    assert (d.block_offset, d.num_blocks) == (24, 20)
    assert len({a.namespace, c.namespace, d.namespace}) == 3
    e = g2.join("e", PID, "qwen", blocks=5)                  # the namespace's quota stands
    assert (e.namespace, e.num_blocks) == (d.namespace, 20)
    fill(a.registry, [1, 2, 3])
    assert c.registry.match([1, 2, 3]).size == 0 and d.registry.lookup([1]).tolist() == [-1]
    # c fills its quota and evicts only its own blocks
    fill(c.registry, list(range(100, 108)))
    assert c.registry.allocate(9) is None
    got = c.registry.allocate(8)
    assert got is not None and c.registry.num_free == 0
    c.registry.release(got)
    assert a.registry.lookup([1, 2, 3]).tolist() == [0, 1, 2]
    spans = sorted((ns["block_offset"], ns["num_blocks"], ns["engines"]) for ns in g2.namespaces())
    assert spans == [(0, 16, 2), (16, 8, 1), (24, 20, 2)]
    g2.check_invariants()


def test_join_refusals_carry_the_numbers(make_g2):
    g2 = make_g2(total=40, max_engines=3, max_namespaces=2)
    g2.join("a", PID, "m1", blocks=30)
    with pytest.raises(ConfigError, match=r"no room for a namespace of 20 blocks: 10 of 40 blocks are free, "
                                          r"the largest free range has 10"):
        g2.join("b", PID, "m2", blocks=20)
    with pytest.raises(ConfigError, match="does not fit a G2 of 40 blocks"):
        g2.join("b", PID, "m2", blocks=41)
    g2.join("b", PID, "m2", blocks=10)
    with pytest.raises(ConfigError, match="all 2 namespaces"):
        g2.join("c", PID, "m3", blocks=1)
    with pytest.raises(LifecycleError, match="'a' is already a member"):
        g2.join("a", PID, "m1")
    g2.join("c", PID, "m1")
    with pytest.raises(ConfigError, match="all 3 engine slots"):
        g2.join("d", PID, "m1")
    with pytest.raises(ConfigError, match="engine id must be 1 to 63 bytes"):
        g2.join("x" * 64, PID, "m1")
    g2.check_invariants()


def test_join_refuses_a_pid_that_is_not_running(make_g2):
    g2 = make_g2()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    with pytest.raises(LifecycleError, match=f"pid {proc.pid} is not a running process"):
        g2.join("a", proc.pid, "m")
    assert g2.engines() == []


def test_namespace_key_depends_on_fingerprint_and_salt():
    assert namespace_key("m", b"s") == namespace_key("m", "s")
    assert len({namespace_key("m"), namespace_key("m", b"s"), namespace_key("m2", b"s")}) == 3


# ---- holds across engines ------------------------------------------------------------------------

def test_engine_b_matches_what_engine_a_registered(make_g2):
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    b = g2.join("b", PID, "m")
    chain = [11, 12, 13, 14]
    canon = fill(a.registry, chain, parents=[0, 11, 12, 13])
    got = b.registry.match(chain + [99])
    np.testing.assert_array_equal(got, canon)
    assert b.registry.held()[canon].tolist() == [1, 1, 1, 1] and a.registry.held().sum() == 0
    assert b.registry.pinned == 4 and a.registry.num_active == 4
    engines = {e["engine_id"]: e for e in g2.engines()}
    assert (engines["b"]["match_calls"], engines["b"]["match_queries"], engines["b"]["match_hits"]) == (1, 5, 4)
    assert (engines["a"]["allocated"], engines["a"]["registered"], engines["a"]["released"]) == (4, 4, 4)
    g2.check_invariants()
    b.registry.release(got)
    assert b.registry.pinned == 0 and a.registry.num_inactive == 4
    g2.check_invariants()


def test_an_engine_cannot_release_or_register_anothers_blocks(make_g2):
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    b = g2.join("b", PID, "m")
    mine = a.registry.allocate(2)
    canon = fill(a.registry, [7])
    held = b.registry.match([7])
    buf = g2.tables.registry_buffer(a.namespace)
    before = bytes(buf), g2.tables.pins.copy()
    with pytest.raises(RegistryError, match=r"release: block 2 \(slot 0\) is released more times than engine "
                                            r"slot 0 holds it"):
        a.registry.release(held)
    with pytest.raises(RegistryError, match="is released more times"):
        b.registry.release(np.concatenate([held, held]))      # b holds it once
    with pytest.raises(RegistryError, match=r"complete: block 0 \(slot 0\) is not held by engine slot 1"):
        b.registry.complete(mine)
    with pytest.raises(RegistryError, match="out of range"):
        b.registry.release([64])
    assert bytes(buf) == before[0]
    np.testing.assert_array_equal(g2.tables.pins, before[1])
    a.registry.complete(mine)
    before = bytes(buf)
    with pytest.raises(RegistryError, match=r"register: block 0 \(slot 0\) is not held by engine slot 1"):
        b.registry.register(mine, [70, 71])
    assert bytes(buf) == before
    a.registry.register(mine, [70, 71])
    g2.check_invariants()
    del canon


def test_dedup_moves_the_hold_to_the_canonical_block(make_g2):
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    b = g2.join("b", PID, "m")
    first = fill(a.registry, [42])
    mine = b.registry.allocate(2)
    b.registry.complete(mine)
    canon = b.registry.register(mine, [42, 43])
    assert canon[0] == first[0] and canon[1] == mine[1]
    held = b.registry.held()
    assert held[first[0]] == 1 and held[mine[0]] == 0 and held[mine[1]] == 1
    assert {e["engine_id"]: e["deduplicated"] for e in g2.engines()} == {"a": 0, "b": 1}
    g2.check_invariants()


def test_block_pool_runs_over_a_shared_registry(make_g2):
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    pool = BlockPool.over(Tier.G2, a.registry)
    blocks = pool.allocate(3)
    pool.complete(blocks)
    canon = pool.register(blocks, np.array([1, 2, 3], np.uint64))
    pool.release(canon)
    assert pool.match(np.array([1, 2], np.uint64)).tolist() == canon[:2].tolist()
    assert pool.drop(canon[:2]).tolist() == [1, 2]
    assert pool.snapshot()["free"] == 15 and pool.stats.match_hits == 2
    g2.check_invariants()


def test_single_engine_matches_block_registry_op_for_op(make_g2, rng):
    """The shared handle changes no result: the same random operations on a BlockRegistry and on
    one engine's SharedBlockRegistry give the same answers and the same errors."""
    g2 = make_g2(total=32, max_namespaces=1)
    shared = g2.join("a", PID, "m")
    plain = BlockRegistry(32)
    held: list[int] = []

    def complete_register(reg, blocks, hashes):
        try:
            reg.complete(blocks)
            return reg.register(blocks, hashes)
        except RegistryError as err:
            return type(err)
    for _ in range(400):
        op = rng.integers(6)
        if op == 0:
            n = int(rng.integers(0, 6))
            x, y = plain.allocate(n), shared.registry.allocate(n)
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)
                held += x.tolist()
        elif op == 1 and held:
            blocks = [held.pop(int(rng.integers(len(held)))) for _ in range(min(len(held), 3))]
            hashes = rng.integers(1, 40, len(blocks)).astype(np.uint64)
            want = complete_register(plain, blocks, hashes)
            out = complete_register(shared.registry, blocks, hashes)
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(want, out)
                held += want.tolist()
            else:
                assert want is out
                held += blocks
        elif op == 2:
            hashes = rng.integers(1, 40, int(rng.integers(1, 6))).astype(np.uint64)
            x, y = plain.match(hashes), shared.registry.match(hashes)
            np.testing.assert_array_equal(x, y)
            held += x.tolist()
        elif op == 3 and held:
            b = held.pop(int(rng.integers(len(held))))
            plain.release([b])
            shared.registry.release([b])
        elif op == 4:
            n = int(rng.integers(0, 3))
            np.testing.assert_array_equal(plain.evict(n), shared.registry.evict(n))
        else:
            hashes = rng.integers(1, 40, 4).astype(np.uint64)
            np.testing.assert_array_equal(plain.lookup(hashes), shared.registry.lookup(hashes))
        assert (plain.num_free, plain.num_inactive) == (shared.registry.num_free, shared.registry.num_inactive)
    g2.check_invariants()


# ---- leave and reap ------------------------------------------------------------------------------

def test_leave_releases_holds_and_frees_the_last_namespace(make_g2):
    g2 = make_g2(total=64, max_namespaces=4)
    a = g2.join("a", PID, "m")
    b = g2.join("b", PID, "m")
    fill(a.registry, [1, 2])
    b.registry.match([1, 2])
    partial = b.registry.allocate(3)
    assert b.leave() is True and b.leave() is False
    assert a.registry.num_inactive == 2 and a.registry.num_free == 14     # partial blocks freed
    with pytest.raises(LifecycleError, match="engine slot 1 left or was reaped"):
        b.registry.match([1])
    assert a.registry.match([1, 2], acquire=False).size == 2
    assert a.leave() is True
    assert g2.namespaces() == []
    c = g2.join("c", PID, "other", blocks=64)       # the whole range is free again
    assert (c.block_offset, c.num_blocks) == (0, 64) and c.registry.lookup([1]).tolist() == [-1]
    g2.check_invariants()
    del partial


def test_reap_takes_dead_engines_and_not_live_ones(make_g2):
    g2 = make_g2()
    live = g2.join("live", PID, "m")
    dead = dead_join(g2, "dead")                 # a reused pid: alive, but not the engine's process
    fill(live.registry, [1, 2, 3])
    held = dead.registry.match([1, 2])
    mine = dead.registry.allocate(2)
    assert {e["engine_id"]: e["alive"] for e in g2.engines()} == {"live": True, "dead": False}
    reaped = g2.reap()
    assert [(r["engine_id"], r["released"]) for r in reaped] == [("dead", 4)]
    assert live.registry.num_inactive == 3 and live.registry.num_free == 13
    assert g2.reap() == [] and g2.tables.header[0]["reaped"] == 1
    with pytest.raises(LifecycleError):
        dead.registry.release(held)
    g2.check_invariants()
    del mine


def test_join_reaps_first_so_a_dead_engines_namespace_makes_room(make_g2):
    g2 = make_g2(total=32, max_namespaces=2)
    dead_join(g2, "old", "m1", blocks=32)
    lease = g2.join("new", PID, "m2", blocks=32)
    assert lease.block_offset == 0 and [ns["label"] for ns in g2.namespaces()] == ["m2"]


# ---- repair --------------------------------------------------------------------------------------

def test_a_mark_left_by_a_dead_holder_is_repaired_by_the_next_locker(make_g2):
    """A dead engine cut short in the middle of a register: its table torn (links, heap, index,
    counts, marks scribbled over; its first block REGISTERED under hash 0) and the mark left set.
    The next call of a live engine rebuilds the table without the dead engine's holds."""
    g2 = make_g2(total=64, max_namespaces=2)
    a = g2.join("a", PID, "m")
    d = dead_join(g2, "d")
    fill(a.registry, [1, 2, 3, 4, 5], parents=[0, 1, 2, 3, 4])
    kept = a.registry.match([1, 2])
    theirs = d.registry.match([1, 2, 3])
    fill(d.registry, [6, 7])
    torn = d.registry.allocate(3)
    d.registry.complete(torn)
    S.tear(g2._registry(d.namespace), int(torn[0]))
    g2.tables.mark(d.slot, d.namespace)           # what a death mid-register leaves
    with pytest.raises(RegistryError):
        g2._registry(d.namespace).check_invariants()
    got = a.registry.match([1, 2, 3, 4, 5, 6, 7, 0])   # hash 0 must not match the torn block
    assert got.size == 7
    assert g2.tables.header[0]["repairs"] == 1 and g2.tables.holder_ns == S.CLEAN
    assert [e["engine_id"] for e in g2.engines()] == ["a"]
    reg = a.registry
    assert reg.num_free == 32 - 7 and reg.num_inactive == 0     # torn blocks and the dead holds gone
    a.registry.release(got)
    a.registry.release(kept)
    assert reg.num_inactive == 7 and a.registry.pinned == 0
    g2.check_invariants()
    del theirs


def test_a_holder_that_died_holding_the_lock_is_reaped_though_proc_shows_it(make_g2):
    """EOWNERDEAD names the holder dead while its process may still be exiting (its /proc entry
    alive): the recovery reaps it anyway (here: called as the locker that got EOWNERDEAD)."""
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    x = g2.join("x", PID, "m")                     # alive as far as /proc can tell
    fill(a.registry, [1, 2])
    x.registry.match([1, 2])
    t = g2.tables
    t.acquire()
    try:
        t.mark(x.slot, x.namespace)
        g2._recover(True)
    finally:
        t.release()
    assert [e["engine_id"] for e in g2.engines()] == ["a"]
    assert a.registry.num_inactive == 2 and g2.tables.header[0]["reaped"] == 1
    with pytest.raises(LifecycleError):
        x.registry.lookup([1])
    g2.check_invariants()


def test_recovery_failure_leaves_the_mark_for_the_next_locker(make_g2, monkeypatch):
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    g2.tables.mark(a.slot, a.namespace)
    calls = []

    def broken(self, owner_died):
        calls.append(owner_died)
        raise RegistryError("repair failed (test)")

    monkeypatch.setattr(SharedG2, "_recover", broken)
    g2.tables.on_recover = g2._recover
    with pytest.raises(RegistryError, match="repair failed"):
        a.registry.lookup([1])
    assert g2.tables.holder_ns == a.namespace and calls == [False]
    monkeypatch.undo()
    g2.tables.on_recover = g2._recover
    assert a.registry.lookup([1]).tolist() == [-1]     # the lock was released; repaired now
    assert g2.tables.holder_ns == S.CLEAN
    g2.check_invariants()


def test_check_invariants_sees_holds_that_disagree_with_refcounts(make_g2):
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    fill(a.registry, [1])
    g2.tables.pins[a.slot, a.block_offset] += 1
    g2.tables.engines["pinned"][a.slot] += 1
    with pytest.raises(RegistryError, match="block 0 has refcount 0 but its engines hold it 1 times"):
        g2.check_invariants()
    g2.tables.engines["pinned"][a.slot] += 1
    with pytest.raises(RegistryError, match="pins sum to 1, pinned says 2"):
        g2.check_invariants()


def test_set_test_kill_checks_its_arguments():
    with pytest.raises(RegistryError, match="set_test_kill"):
        S.set_test_kill("evict", "torn")
    S.set_test_kill(None, None)


# ---- BlockRegistry.attach and rebuild ------------------------------------------------------------

@pytest.mark.parametrize("policy", [EvictionPolicy.LRU, EvictionPolicy.LINEAGE])
def test_attach_shares_the_table(policy):
    buf = np.zeros(BlockRegistry.bytes_needed(16), np.uint8)
    reg = BlockRegistry(16, buf, int(policy))
    fill(reg, [1, 2, 3], parents=[0, 1, 2])
    twin = BlockRegistry.attach(buf)
    assert (twin.num_blocks, twin.policy, twin.ghost_blocks) == (16, int(policy), reg.ghost_blocks)
    np.testing.assert_array_equal(twin.match([1, 2, 3]), [0, 1, 2])
    assert reg.num_active == 3
    twin.check_invariants()
    with pytest.raises(RegistryError, match="holds no registry table"):
        BlockRegistry.attach(np.zeros(BlockRegistry.bytes_needed(16), np.uint8))
    with pytest.raises(RegistryError, match="the table holds 16 blocks"):
        BlockRegistry(8, buf, int(policy), attach=True)


@pytest.mark.parametrize("policy", [EvictionPolicy.LRU, EvictionPolicy.LINEAGE])
def test_rebuild_keeps_the_eviction_order_and_matches(policy, rng):
    """Two registries run the same operations; one is rebuilt from its per-block fields (a torn
    table: derived structures scribbled over first). Matches and the whole eviction order agree
    afterwards (the free list is rebuilt in id order, so allocations are not compared)."""
    regs = [BlockRegistry(64, policy=int(policy)) for _ in range(2)]
    hs = rng.permutation(np.arange(1, 200, dtype=np.uint64))
    held = []
    for i in range(12):
        chain = hs[i * 8:i * 8 + 8]
        parents = np.concatenate([[0], chain[:-1]]).astype(np.uint64)
        outs = [fill(r, chain, parents=parents) for r in regs]
        np.testing.assert_array_equal(*outs)
        if i % 3 == 0:
            outs = [r.match(chain[:4]) for r in regs]
            held.append(outs[0])
    for r in regs:
        r.set_priority(held[0][:2], [5, 5])
    rc = S.table_refcounts(regs[1])
    partials = [r.allocate(2) for r in regs]   # evicts the same blocks in both
    np.testing.assert_array_equal(*partials)
    regs[0].release(partials[0])
    partial = partials[1]                   # the dead holder's allocation: freed by the rebuild
    regs[1].complete(partial)
    S.tear(regs[1], int(partial[0]))
    summary = regs[1].rebuild(rc)
    regs[1].check_invariants()
    assert summary["freed"] == 1 and summary["dropped"] == 1
    assert summary["ghosts_lost"] == (regs[0].num_ghosts if policy == EvictionPolicy.LINEAGE else 0)
    for chain_start in range(0, 96, 8):
        np.testing.assert_array_equal(regs[0].match(hs[chain_start:chain_start + 8], False),
                                      regs[1].match(hs[chain_start:chain_start + 8], False))
    for h in held:
        for r in regs:
            r.release(h)
    np.testing.assert_array_equal(regs[0].evict(64), regs[1].evict(64))


def test_rebuild_refuses_a_held_free_block():
    reg = BlockRegistry(4)
    before = bytes(reg.buffer)
    with pytest.raises(RegistryError, match="block 2 is RESET but holders pin it 1 times"):
        reg.rebuild(np.array([0, 0, 1, 0], np.uint32))
    assert bytes(reg.buffer) == before
    with pytest.raises(RegistryError, match="refcounts for 4 blocks"):
        reg.rebuild(np.zeros(3, np.uint32))



def test_lineage_namespaces_get_their_ghost_tables(make_g2):
    g2 = make_g2(total=64, max_namespaces=2, policy="lineage", ghost_ratio=0.5)
    a = g2.join("a", PID, "m")
    assert (a.registry.policy, a.registry.ghost_blocks) == (int(EvictionPolicy.LINEAGE), 16)
    for lo in range(1, 100, 8):
        fill(a.registry, list(range(lo, lo + 8)), parents=[0] + list(range(lo, lo + 7)))
    assert a.registry.num_ghosts > 0
    g2.check_invariants()


# ---- quarantine: a dead engine's blocks while a path worker holds its registration --------------

D2H_BIT, H2D_BIT = 1 << 1, 1 << 2


def test_a_dead_engine_held_by_a_worker_keeps_its_blocks_until_the_worker_lets_go(make_g2):
    """An offload's G2 blocks (allocated, not registered: a D2H may still write them) of an engine
    that died are not handed out while a worker holds its registration; the worker letting go frees
    them, and the last engine of the namespace then frees it."""
    g2 = make_g2(total=16, max_namespaces=1)
    a = g2.join("a", PID, "m")
    d = dead_join(g2, "d")
    fill(a.registry, [1, 2])
    writing = d.registry.allocate(4)                 # the dead engine's offload, copy in flight
    member = g2.member("d")
    assert member["slot"] == d.slot and member["namespace"] == a.namespace and not member["alive"]
    assert g2.worker_hold(d.slot, d.generation, D2H_BIT) and g2.worker_hold(d.slot, d.generation, H2D_BIT)
    assert g2.reap()[0]["quarantined"] == 4
    info = {e["engine_id"]: e for e in g2.engines()}
    assert info["d"]["state"] == "retired" and info["d"]["pinned"] == 4 and info["d"]["workers"] == [1, 2]
    assert g2.member("d") is None and g2.namespace_of(d.slot, d.generation) == -1
    with pytest.raises(LifecycleError):
        d.registry.allocate(1)                       # a retired slot makes no calls
    got = a.registry.allocate(16 - 4)                # everything but the quarantined blocks
    assert got is not None and not set(got.tolist()) & set(writing.tolist())
    assert a.registry.allocate(1) is None
    g2.check_invariants()
    assert g2.worker_let_go(d.slot, d.generation, D2H_BIT) is None     # H2D still holds it
    assert g2.worker_let_go(d.slot, d.generation, H2D_BIT)["released"] == 4
    assert [e["engine_id"] for e in g2.engines()] == ["a"] and a.registry.num_free == 4
    a.registry.release(got)
    g2.check_invariants()
    assert a.leave() and g2.namespaces() == []


def test_a_dead_worker_lets_go_of_every_registration_and_a_retired_namespace_lives_on(make_g2):
    """worker_gone (the supervisor saw the worker exit) clears its bit everywhere; a namespace whose
    only engine is retired stays until the slot is freed, so a new engine of it shares its blocks."""
    g2 = make_g2(total=16, max_namespaces=1)
    d = dead_join(g2, "d")
    fill(d.registry, [7])
    held = d.registry.match([7])
    assert g2.worker_hold(d.slot, d.generation, D2H_BIT)
    g2.reap()
    b = g2.join("b", PID, "m")                       # joins the retired engine's namespace
    assert b.namespace == d.namespace and b.registry.lookup([7])[0] == held[0]
    assert g2.worker_gone(D2H_BIT)[0]["released"] == 1
    assert [e["engine_id"] for e in g2.engines()] == ["b"]
    assert b.registry.match([7]).tolist() == held.tolist()   # still cached, now inactive -> held by b
    g2.check_invariants()


def test_leave_while_a_worker_holds_the_registration_retires_the_engine(make_g2):
    g2 = make_g2(total=8, max_namespaces=1)
    a = g2.join("a", PID, "m")
    blocks = a.registry.allocate(2)
    assert g2.worker_hold(a.slot, a.generation, D2H_BIT)
    assert a.leave()
    assert g2.engines()[0]["state"] == "retired" and g2.namespaces()[0]["free"] == 6
    assert not g2.worker_hold(a.slot, a.generation, H2D_BIT)    # not live: no new holds
    assert g2.worker_let_go(a.slot, a.generation, D2H_BIT)["released"] == 2
    assert g2.engines() == [] and g2.namespaces() == []
    del blocks


def test_a_holder_that_died_mid_call_keeps_its_unregistered_blocks_while_a_worker_holds_it(make_g2):
    """The recovery drops a dead holder's holds (it may have half-moved them), except those on
    allocated, unregistered blocks while a worker holds its registration: a copy may write them."""
    g2 = make_g2(total=16, max_namespaces=1)
    a = g2.join("a", PID, "m")
    d = dead_join(g2, "d")
    fill(d.registry, [1, 2])
    d.registry.match([1, 2])                         # registered holds: dropped by the repair
    writing = d.registry.allocate(3)                 # unregistered: kept
    assert g2.worker_hold(d.slot, d.generation, D2H_BIT)
    g2.tables.mark(d.slot, d.namespace)              # died mid-call
    a.registry.lookup([1])                           # the next locker repairs
    e = {x["engine_id"]: x for x in g2.engines()}["d"]
    assert e["state"] == "retired" and e["pinned"] == 3
    assert sorted(np.flatnonzero(S.table_refcounts(g2._registry(a.namespace))).tolist()) == sorted(writing.tolist())
    g2.check_invariants()
    g2.worker_let_go(d.slot, d.generation, D2H_BIT)
    assert a.registry.num_free == 14 and a.registry.num_inactive == 2
    g2.check_invariants()


def test_one_engine_drains_a_namespaces_evicted_ring(make_g2):
    """The ring holds every engine's evictions: the first engine to drain it is its drainer, another
    engine's drain is refused, and the ring passes on when the drainer leaves."""
    g2 = make_g2(total=4, max_namespaces=1)
    a = g2.join("a", PID, "m")
    b = g2.join("b", PID, "m")
    fill(a.registry, [1, 2, 3, 4])
    assert a.registry.drain_evicted().tolist() == []
    fill(b.registry, [5, 6])                      # b's allocation evicts two of a's blocks
    with pytest.raises(RegistryError, match="one drainer per namespace"):
        b.registry.drain_evicted()
    assert sorted(a.registry.drain_evicted().tolist()) == [1, 2]
    a.leave()
    fill(b.registry, [7])
    assert b.registry.drain_evicted().tolist() == [3]
    g2.check_invariants()


def test_victims_taken_by_one_engine_are_its_holds_whoever_else_evicts(make_g2):
    """take_victims pairs each victim with its hash in one hold of the lock, so two engines' cleaners
    never mix up victims; the victims are the taker's holds, released at its reap."""
    g2 = make_g2(total=4, max_namespaces=1)
    a = g2.join("a", PID, "m")
    d = dead_join(g2, "d")
    fill(a.registry, [1, 2, 3, 4])
    blocks, hashes = d.registry.take_victims(2)
    assert hashes.tolist() == [1, 2] and d.registry.pinned == 2
    fill(a.registry, [5])                         # evicts 3: not one of d's
    assert a.registry.lookup([3, 4, 5]).tolist()[0] == -1
    g2.check_invariants()
    g2.reap()                                     # d is dead: its victims go back to the free list
    assert a.registry.num_free == 2 and a.registry.num_inactive == 2
    g2.check_invariants()


@pytest.mark.parametrize("spin_ns", [0, 100_000, 2_000_000_000])
def test_a_waiter_spins_then_blocks_and_gets_the_lock_when_it_is_let_go(make_g2, spin_ns):
    """The lock's waiters retry trylock for lock_spin_ns (without the GIL), then block: either way
    a call made while another thread holds the lock completes once it is released, with the
    wait counted; a spin longer than the hold ends with the lock, not with a block."""
    import threading
    g2 = make_g2()
    a = g2.join("a", PID, "m")
    fill(a.registry, [5, 6])
    t = g2.tables
    t.lock_spin_ns = spin_ns
    before = t.lock_stats["contended"]
    got = []
    t.acquire()
    waiter = threading.Thread(target=lambda: got.append(a.registry.lookup([5, 6, 7]).tolist()))
    waiter.start()
    waiter.join(0.05)            # it is waiting (spinning or blocked), the GIL free for us
    assert waiter.is_alive() and not got
    t.release()
    waiter.join(30)
    assert len(got) == 1 and got[0][2] == -1 and min(got[0][:2]) >= 0
    assert t.lock_stats["contended"] == before + 1
    g2.check_invariants()


def test_a_members_part_of_g2_is_admitted_in_each_rank_region_and_nowhere_else(make_g2):
    """Path worker admission (kvbm.workers.admission) with tensor-parallel regions: a member's host
    layout must be its namespace's part of G2 at the same place in one of the g2_ranks regions."""
    from kvbm.errors import ProtocolError
    from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
    from kvbm.workers.admission import Admission
    g2 = make_g2(total=64)
    g2.join("other", PID, "m", blocks=16)           # takes blocks [0, 16): ours start at 16
    lease = g2.join("e", PID, "n", blocks=8)
    adm = Admission()
    cfg = LayoutConfig(num_layers=1, outer_dim=2, page_size=1, inner_dim=256, dtype="float16")
    host = BlockLayout(cfg, LayoutType.FULLY_CONTIGUOUS, lease.num_blocks)
    adm.g2, adm.g2_block_bytes, adm.g2_ranks = g2, host.block_stride, 2
    region, part = 64 * host.block_stride, lease.block_offset * host.block_stride
    assert part == 16 * host.block_stride
    for offset in (part, region + part):             # rank 0's region, rank 1's
        assert adm._membership("e", PID, offset, host).namespace == lease.namespace
    for offset in (2 * region + part, part + host.block_stride, region):   # no third region; misplaced
        with pytest.raises(ProtocolError, match="rank regions"):
            adm._membership("e", PID, offset, host)
    adm.g2_ranks = 1
    with pytest.raises(ProtocolError, match="shared G2 namespace"):
        adm._membership("e", PID, region + part, host)


def test_holds_says_whether_an_engine_holds_every_block(make_g2):
    g2 = make_g2(total=8, max_namespaces=1)
    a = g2.join("a", PID, "m")
    b = g2.join("b", PID, "m")
    mine = a.registry.allocate(2)
    assert g2.holds(a.slot, a.generation, mine) and g2.holds(a.slot, a.generation, [])
    assert not g2.holds(b.slot, b.generation, mine)                  # another engine's
    assert not g2.holds(a.slot, a.generation, [int(mine[0]), 7])     # one of them not held
    assert not g2.holds(a.slot, a.generation, [8]) and not g2.holds(a.slot, a.generation + 1, mine)
    a.registry.release(mine)
    assert not g2.holds(a.slot, a.generation, mine)
