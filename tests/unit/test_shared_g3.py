"""The shared G3 slot table in one process (kvbm.shared_g3): its two segments private (0600) and
unlinked by their creator, one namespace (another model is refused with the reason), checksums seen
by every member, and the rebuild from the store once per life of the namespace: the first member
builds, the others find it built, an engine that died mid-build leaves a table that is kept.

Dead engines are slots whose start time is not their pid's (tests/unit/test_shared_g2.py says why
that is what a gone process looks like); the two-process paths are in
tests/integration/test_shared_g2_engines.py."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from kvbm.errors import ConfigError
from kvbm.layout import LayoutConfig
from kvbm.shared_g2 import layout_namespace
from kvbm.shared_g3 import SharedG3, create_g3
from kvbm.shm import process_start_time

PID = os.getpid()
LAYOUT = LayoutConfig(num_layers=2, outer_dim=2, page_size=4, inner_dim=32, dtype="float16")


@pytest.fixture
def g3():
    reg, sums = create_g3(f"t{uuid.uuid4().hex[:10]}", 16, max_engines=8, policy="lru", ghost_ratio=1.0)
    members: list[SharedG3] = []

    def join(engine_id, salt=b""):
        members.append(SharedG3({"segment": reg.name, "sums": sums.name}, engine_id, PID, LAYOUT, salt))
        return members[-1]

    yield reg, sums, join
    for m in members:
        m.close()
    reg.close()
    sums.close()
    sums.unlink()


def test_segments_are_private_and_one_namespace_holds_every_slot(g3):
    reg, sums, join = g3
    for path in (reg.segment.path, sums.path):
        assert os.stat(path).st_mode & 0o777 == 0o600
    a, b = join("a"), join("b")
    assert a.lease.namespace == b.lease.namespace and a.num_blocks == b.num_blocks == 16
    with pytest.raises(ConfigError, match="holds another model's blocks"):
        join("c", salt=b"another model")
    assert [e["engine_id"] for e in reg.engines()] == ["a", "b"]


def test_checksums_and_blocks_are_every_members(g3):
    _, _, join = g3
    a, b = join("a"), join("b")
    slots = a.lease.registry.allocate(2)
    a.lease.registry.complete(slots)
    a.sums[slots] = [11, 22]
    a.lease.registry.release(a.lease.registry.register(slots, np.array([7, 8], np.uint64)))
    held = b.lease.registry.match(np.array([7, 8], np.uint64))
    assert b.sums[held].tolist() == [11, 22]
    b.lease.registry.release(held)


def test_the_first_member_rebuilds_once_per_life_of_the_namespace(g3):
    reg, _, join = g3
    a, b = join("a"), join("b")
    assert not a.built and not b.built
    with a.building(5.0) as todo:
        assert todo
    assert a.built and b.built
    with b.building(5.0) as todo:
        assert not todo                     # a did it
    a.close()
    b.close()                               # the namespace goes with its last member...
    c = join("c")
    assert not c.built                      # ...and its next life starts unbuilt
    with c.building(5.0) as todo:
        assert todo
    assert c.built


def test_a_builder_that_died_is_reaped_before_the_next_one_judges_the_table(g3):
    reg, _, join = g3
    a = join("a")
    dead = reg.join("dead", PID, layout_namespace(LAYOUT), b"", 16, start_time=process_start_time(PID) - 1)
    half = dead.registry.allocate(16)        # a rebuild that got as far as taking every slot
    dead.registry.complete(half[:3])
    dead.registry.register(half[:3], np.array([1, 2, 3], np.uint64))
    with a.building(5.0) as todo:              # the dead one is reaped first: 3 registered slots kept
        assert todo
        assert a.lease.registry.num_free == 13 and a.lease.registry.num_inactive == 3
    reg.check_invariants()


def test_a_member_waiting_too_long_for_the_build_lock_goes_on_without_it(g3):
    _, _, join = g3
    a, b = join("a"), join("b")
    with a.building(5.0) as todo:
        assert todo
        with b.building(0.05) as other:     # a holds the lock: b gives up, builds nothing
            assert not other
        assert not b.built
    assert b.built
