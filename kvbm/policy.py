"""Block states and eviction policies shared by the registry (Cython) and its Python twin.

Parts:
  BlockState      RESET -> PARTIAL -> COMPLETE -> REGISTERED, the life of one block in a pool.
  EvictionPolicy  which inactive registered block gives way first; the registry takes the id as a
                  plain int (`BlockRegistry(num_blocks, policy=POLICY_LRU)`). The one list of
                  policies: config names (`policy_names()`, `EvictionPolicy.from_name("lru")`), the
                  ids the registry and its twin accept, and the bench's choices all come from it.

Both are IntEnums so that they cross into Cython and over the wire as plain integers.

How eviction works (kvbm/_fast/registry.pyx; the spec is its plain-Python twin,
kvbm/_fast/_reference.py, which the differential tests hold it to):
  Inactive blocks (REGISTERED, refcount 0) sit in an indexed 4-ary min-heap whose entries carry a
  two-word key (key1, key2); the heap pops the smallest (key1, key2, block id) first. One function,
  `_policy_key(b, &entry)`, computes the key and switches on the policy id. The registry calls the
  hook `_update_key(b)` whenever metadata a policy may read changes: touch, priority change, child
  count change (a child registered; a child evicted: `_evict_one` re-keys the parent in place of
  the victim at the root), parent link cleared (parent evicted). A block's key
  is also computed when it becomes inactive (release to refcount 0). Active blocks need no key.

Policies: LRU (priority, then last-use tick), LINEAGE (leaf-first, frequency-credited recency;
the formula is at the member below and `_key` in _reference.py; use counts survive eviction in a
bounded ghost table) and ADAPTIVE (LINEAGE's key with a credit its shadow tuner moves online). The
studies behind them: research/eviction/.

Engine hint (not a policy): blocks that requests in the engine's waiting queue will read get
priority 1 while they wait (KvBlockManager.hint_waiting / hint_done, kvbm.pools.WaitingHints), so
under either policy they are evicted after every priority-0 block.

Adding a policy:
  1. add a member here (next free id) and the same constant in kvbm/_fast/_table.pxd's
     `cdef enum` (the registry refuses to import when the two lists differ);
  2. add its case to `_policy_key` in registry.pyx and to `_key` in _reference.py (a tuple that
     sorts the same way, block id last), so the differential tests cover it. Per block there are:
     priority, last_tick, use_count, parent (block id or -1), children (count of registered
     children here), first_child/next_sib (the child list), hash;
  3. any new metadata: a field in registry.pxd and in `table_layout` (_table.pxd)/`_carve`, reset in `_reset`,
     and a call to `_update_key` wherever it changes.
"""
from __future__ import annotations

from enum import IntEnum

from kvbm.errors import ConfigError


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
    # Leaf-first, frequency-credited recency ("lineage"). Two words:
    #   key1 = ((uint64)(priority + 2**31) << 1) | (children > 0)
    #   key2 = min(last_tick + C * f(use_count), 2**64 - 1),  C = 2 * num_blocks (fixed)
    #   f(u) = 0 if u < 2 else u.bit_length()      (2-3 uses -> 2, 4-7 -> 3, ...)
    # So within a priority, blocks without a registered child here (leaves) go before blocks with
    # one (eviction trims chains from the tail and never orphans a cached descendant); among
    # those, a block used once is plain LRU and a reused one gets f(u) extra "LRU lifetimes" of
    # C ticks (the registry stamps two ticks per block use: touch and release). key2 saturates
    # instead of wrapping (never reached below ~2**58 ticks). Engines register a request's last,
    # partial block with priority -1 so that it goes first. The key changes on release (computed
    # at push), on touch / set_priority of an inactive block, and when the children count goes
    # 0 <-> 1 (_link_child runs _update_key on the parent; on eviction, _evict_one puts the
    # parent's new entry in the victim's place at the heap's root).
    # Ghost table ("ghost-lineage"): the registry remembers the use counts of the last G evicted
    # hashes (BlockRegistry(..., ghost_blocks=G); None means G = num_blocks, 0 none), FIFO by
    # eviction. A new block registered under a remembered hash starts from that count (then the
    # registration touch adds one) and the entry is consumed; a dedup hit changes nothing. The
    # key formula is unchanged. Memory: 24 B per entry plus its index slots (the block index
    # grows to >= 2(N + G) slots): ~49 B per entry at G = N = 10**6.
    # Spec: kvbm/_fast/_reference.py (`_key`, and the ghost table in the registry's order of
    # eviction and registration); the study behind it: research/eviction/.
    LINEAGE = 1
    # LINEAGE's key whose credit tunes itself online ("adaptive"). Two words:
    #   key1 = ((uint64)(priority + 2**31) << 1) | (leaf_first and children > 0)
    #   key2 = min(last_tick + credit * f(use_count), 2**64 - 1),   f as LINEAGE's
    #   credit = N * W ticks, W = 2**(level/2**16 - 4) (linear between octaves; level -1: W = 0)
    # The registry keeps LINEAGE's ghost table (same size, same restore) and a shadow tuner
    # (kvbm/_fast/_shadow.pxd): one block use in R (by hash; R a power of two, M = N / R in
    # [ADAPTIVE_MINI_BLOCKS, 2 ADAPTIVE_MINI_BLOCKS)) is replayed on ten mini caches of M
    # blocks, one per W in {0, 1/8, 1/4, ..., 32}, keyed the same way; every M/2 evictions of the
    # W = 0 mini (an epoch), each mini's hits of the epoch join its score, decayed by
    # ADAPTIVE_DECAY / 2**16, and the level moves to the best score's W. Keys already in the heap
    # keep their credit; after a move each eviction re-keys 16 blocks in id order (the sweep)
    # until all N are. Per use: 1/R of ten index probes and heap sifts of log2(M) levels,
    # on release only; the state lives in the table (header and arrays), so it survives attach.
    # BlockRegistry.set_adaptive(level, leaf_first, tune, decay) sets it (tune False: a fixed
    # setting, the family trace_replay's hindsight sweep runs). Spec: _reference.py (`_key`) and
    # _reference_shadow.py (the tuner); the study: research/eviction/POLICY_ADAPTIVE.md §13.
    ADAPTIVE = 2

    @classmethod
    def from_name(cls, name: str) -> EvictionPolicy:
        """The policy of a config name ("lru", "lineage", "adaptive": the member's name in lower case);
        ConfigError naming the known ones otherwise."""
        member = _BY_NAME.get(name) if isinstance(name, str) else None
        if member is None:
            raise ConfigError(f"policy: expected one of {policy_names()}, got {name!r}")
        return member


_BY_NAME = {p.name.lower(): p for p in EvictionPolicy}


def policy_names() -> tuple[str, ...]:
    """Config names of every policy, in id order: ("lru", "lineage", "adaptive")."""
    return tuple(_BY_NAME)


def has_ghost_table(policy: int) -> bool:
    """Whether the policy keeps the ghost table of evicted use counts (LINEAGE, ADAPTIVE)."""
    return int(policy) in (POLICY_LINEAGE, POLICY_ADAPTIVE)


POLICY_LRU = int(EvictionPolicy.LRU)
POLICY_LINEAGE = int(EvictionPolicy.LINEAGE)
POLICY_ADAPTIVE = int(EvictionPolicy.ADAPTIVE)
# ADAPTIVE's starting credit level (W = 2**(level/2**16 - 4); 4 << 16 is W = 1, one of the
# tuner's candidates), the tuner's mini cache size target (kvbm/_fast/_table.pxd's SHADOW_MINI,
# which the registry checks at import) and its scores' decay per epoch (in 2**-16). Round 13's fit
# on the training set (research/eviction/POLICY_ADAPTIVE.md §13, research/eviction/shadow.py).
ADAPTIVE_OCTAVE = 1 << 16
ADAPTIVE_LEVEL = 4 << 16
ADAPTIVE_MINI_BLOCKS = 128
ADAPTIVE_DECAY = 62259

__all__ = ["ADAPTIVE_DECAY", "ADAPTIVE_LEVEL", "ADAPTIVE_MINI_BLOCKS", "ADAPTIVE_OCTAVE", "BlockState",
           "EvictionPolicy", "POLICY_ADAPTIVE", "POLICY_LINEAGE", "POLICY_LRU", "has_ghost_table",
           "policy_names"]
