"""Block states and eviction policy ids shared by the registry (Cython) and its Python twin.

Parts:
  BlockState      RESET -> PARTIAL -> COMPLETE -> REGISTERED, the life of one block in a pool.
  EvictionPolicy  which inactive registered block gives way first; the registry takes the id as a
                  plain int (`BlockRegistry(num_blocks, policy=POLICY_LRU)`).

Both are IntEnums so that they cross into Cython and over the wire as plain integers.

How eviction works (kvbm/_fast/registry.pyx):
  Inactive blocks (REGISTERED, refcount 0) sit in an indexed binary min-heap. Each block carries a
  two-word key (key1, key2) computed by one function, `_policy_key`, that switches on the policy id;
  the heap pops the smallest (key1, key2, block id) first. The registry recomputes a block's key
  (`_update_key`) whenever metadata a policy may read changes: touch, release to inactive,
  registration, priority change, child count change (a child registered or evicted).

Adding a policy (e.g. a lineage-aware one):
  1. add a member here (next free id) and the same constant in registry.pxd's `cdef enum`;
  2. add its case to `_policy_key` in registry.pyx (and `_key` in _reference.py, so the
     differential test covers it); the metadata available per block is: priority, last-use tick,
     use count, parent block (-1 if none), number of children still registered here;
  3. add the id to `_KNOWN_POLICIES` in registry.pyx.
"""
from __future__ import annotations

from enum import IntEnum


class BlockState(IntEnum):
    """State of one block of a pool. Plain ints across Cython (uint8 in the registry's table)."""

    RESET = 0       # free: in the free list, no hash, refcount 0
    PARTIAL = 1     # allocated, being filled; refcount 1
    COMPLETE = 2    # filled, not yet registered; refcount 1
    REGISTERED = 3  # in the hash index; shared (refcount > 0, active) or inactive (refcount 0)


class EvictionPolicy(IntEnum):
    """Eviction order of inactive registered blocks."""

    # Lower priority first; among equal priorities the least recently used (oldest last-use tick,
    # where a tick is taken by touch, match(acquire=True), register and the release that makes a
    # block inactive); then the lower block id (never reached in practice: ticks are unique).
    LRU = 0


POLICY_LRU = int(EvictionPolicy.LRU)

__all__ = ["BlockState", "EvictionPolicy", "POLICY_LRU"]
