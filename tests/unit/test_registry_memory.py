"""No Python object per block: building a registry and running every operation over all of its
blocks allocates a bounded number of Python objects, independent of the pool size.

Measured with gc.get_objects() (container objects) and sys.getallocatedblocks() (every pymalloc
block: ints, tuples, dicts...). The numpy arrays handed back are a constant number per call. The
same measurement on the plain-Python twin (one object per block) fails the bound, which shows
that the test can fail.
"""
from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

from kvbm._fast._reference import ReferenceRegistry
from kvbm._fast.registry import BlockRegistry

BOUND = 200   # Python objects/allocator blocks, whatever the pool size


def _exercise(impl, n: int, policy: int = 0) -> tuple[int, int, object]:
    """Build a registry of n blocks and run each operation over all of them; returns the growth
    of gc-tracked objects and of allocated blocks while the registry is alive. Under LINEAGE the
    evictions fill the ghost table and the re-registration below takes entries back out."""
    gc.collect()
    objs0, blocks0 = len(gc.get_objects()), sys.getallocatedblocks()
    reg = impl(n, policy=policy)
    blocks = reg.allocate(n)
    reg.complete(blocks)
    hashes = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    reg.register(blocks, hashes, parents=np.roll(hashes, 1))
    reg.touch(blocks)
    reg.set_priority(blocks, np.zeros(n, np.int32))
    reg.release(blocks)
    reg.match(hashes[: n // 2])
    reg.lookup(hashes)
    gone = reg.evict(n // 4)
    reg.drain_evicted()
    again = reg.allocate(len(gone))
    reg.complete(again)
    reg.release(reg.register(again, gone))
    del blocks, hashes, gone, again
    gc.collect()
    return len(gc.get_objects()) - objs0, sys.getallocatedblocks() - blocks0, reg


@pytest.mark.parametrize("policy", [0, 1], ids=["lru", "lineage"])
@pytest.mark.parametrize("n", [1_000, 1_000_000])
def test_no_python_object_per_block(n, policy):
    objs, blocks, reg = _exercise(BlockRegistry, n, policy)
    assert reg.num_ghosts == 0   # LRU: no table; LINEAGE: every entry taken back by register
    assert reg.num_blocks == n
    assert objs < BOUND, f"{objs} new gc-tracked objects for {n} blocks"
    assert blocks < BOUND, f"{blocks} new allocator blocks for {n} blocks"


def test_bound_catches_per_block_objects():
    objs, blocks, _ = _exercise(ReferenceRegistry, 2_000)
    assert objs > BOUND and blocks > 2_000
