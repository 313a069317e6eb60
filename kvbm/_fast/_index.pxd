# cython: language_level=3
"""The registry's hash index and the ghost table that shares it: inline helpers over the plain
arrays of the table (header `h`, `keys`/`vals` of C slots, `ghost` of G + 1 entries), called by
BlockRegistry's thin methods (registry.pyx). No object, no GIL.

Parts:
  index  sequence hash -> block for every REGISTERED block, and -> ghost slot for each ghost
         entry. Linear probing from the home slot (`index_home`: fold the high half of the hash in,
         then Fibonacci hashing: the fold keeps structured keys such as counters from clustering),
         backward-shift deletion (no tombstones). C is a power of two >= 2(N + G), so the table
         is at most half full and every probe ends at an empty slot. vals[i]: the block id, -1 for
         an empty slot, -2 - s for the ghost entry in FIFO slot s. h.num_registered counts the
         block entries.
  ghost  LINEAGE and ADAPTIVE: the last G = h.ghost_blocks evicted (hash, use count) pairs, FIFO by
         eviction, in a doubly linked list of slots, oldest first, sentinel at slot G; unused
         slots are stacked through `next` from h.ghost_free. Each live entry keeps the evicted
         block's slot in the index (value -2 - slot): `ghost_record` rewrites the victim's slot in
         place, and a new block registered under a ghost's hash takes that slot back (its use
         count restored, `ghost_unlink` consumes the entry), so the table costs no probe of its
         own; only forgetting the oldest entry (when G are live) deletes an index slot. A
         consumed entry leaves the FIFO (a plain ring of G slots would keep it as a hole), so the
         live entries are exactly the twin's OrderedDict (kvbm/_fast/_reference.py).
         h.ghost_once counts the live entries of blocks evicted after one use (ADAPTIVE's study).

Callers pass what the registry checked: keys present where a slot is expected, slot ids in
range; a key in the ghost table is never also a block's (keys are unique in the index).
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t

from kvbm._fast._table cimport GhostEntry, RegistryHeader, bid_t


# ---- index ---------------------------------------------------------------------------------------

cdef inline int64_t index_home(uint64_t key, int64_t shift) noexcept nogil:
    # Home slot: top bits of (key ^ key >> 32) * golden ratio (2**64 / phi).
    return <int64_t>(((key ^ (key >> 32)) * <uint64_t>0x9E3779B97F4A7C15ULL) >> shift)


cdef inline int64_t index_shift_of(int64_t cap) noexcept nogil:
    # 64 - log2(cap) for a power of two cap: index_home's shift (the registry's index, the minis').
    cdef int64_t shift = 64
    while cap > 1:
        cap >>= 1
        shift -= 1
    return shift


cdef inline void index_init(RegistryHeader *h, bid_t *vals, int64_t cap) noexcept nogil:
    # Empty index of cap (a power of two) slots; the keys were zeroed with the buffer.
    cdef int64_t shift = index_shift_of(cap), i
    h.index_capacity = cap
    h.index_mask = cap - 1
    h.index_shift = shift
    for i in range(cap):
        vals[i] = -1


cdef inline bid_t index_find(const RegistryHeader *h, const uint64_t *keys, const bid_t *vals,
                             uint64_t key) noexcept nogil:
    # Block registered under key, or -1 (also for a ghost entry).
    cdef int64_t i = index_home(key, h.index_shift)
    cdef int64_t mask = h.index_mask
    cdef bid_t v
    while True:
        v = vals[i]
        if v == -1:
            return -1
        if keys[i] == key:
            return v if v >= 0 else -1
        i = (i + 1) & mask


cdef inline int64_t probe_pos(const uint64_t *keys, const bid_t *vals, int64_t shift, int64_t mask,
                              uint64_t key) noexcept nogil:
    # Slot of key in a table of mask + 1 slots, or -1 - (the empty slot where the probe ended).
    # The registry's index and each of ADAPTIVE's mini caches (_shadow.pxd) probe with it.
    cdef int64_t i = index_home(key, shift)
    while True:
        if vals[i] == -1:
            return -1 - i
        if keys[i] == key:
            return i
        i = (i + 1) & mask


cdef inline int64_t index_pos(const RegistryHeader *h, const uint64_t *keys, const bid_t *vals,
                              uint64_t key) noexcept nogil:
    # Slot of key (a block or a ghost entry), or -1 - (the empty slot where the probe ended).
    return probe_pos(keys, vals, h.index_shift, h.index_mask, key)


cdef inline void probe_erase(uint64_t *keys, bid_t *vals, int64_t shift, int64_t mask,
                             int64_t i) noexcept nogil:
    # Backward-shift deletion of the entry at slot i: pull later entries of the run back over
    # the hole unless their home slot lies cyclically in (hole, j]. Counts are the caller's.
    cdef int64_t j = i, k
    while True:
        j = (j + 1) & mask
        if vals[j] == -1:
            break
        k = index_home(keys[j], shift)
        if i <= j:
            if i < k <= j:
                continue
        elif k > i or k <= j:
            continue
        keys[i] = keys[j]
        vals[i] = vals[j]
        i = j
    keys[i] = 0
    vals[i] = -1


cdef inline void index_erase_at(const RegistryHeader *h, uint64_t *keys, bid_t *vals,
                                int64_t i) noexcept nogil:
    # Backward-shift deletion of the entry at slot i of the registry's index.
    probe_erase(keys, vals, h.index_shift, h.index_mask, i)


cdef inline void index_remove(RegistryHeader *h, uint64_t *keys, bid_t *vals,
                              uint64_t key) noexcept nogil:
    # Caller passes the hash of a REGISTERED block, so the key is present.
    index_erase_at(h, keys, vals, index_pos(h, keys, vals, key))
    h.num_registered -= 1


# ---- ghost table (LINEAGE, ADAPTIVE; G = h.ghost_blocks > 0) --------------------------------------------

cdef inline void ghost_init(RegistryHeader *h, GhostEntry *ghost, int64_t g) noexcept nogil:
    # Empty FIFO (sentinel G), every slot on the unused stack; the entries were zeroed.
    cdef int64_t i
    h.ghost_blocks = g
    h.ghost_free = 0 if g > 0 else -1
    h.ghost_once = 0
    if g > 0:
        ghost[g].prev = <bid_t>g
        ghost[g].next = <bid_t>g
    for i in range(g):
        ghost[i].prev = -1
        ghost[i].next = <bid_t>(i + 1 if i + 1 < g else -1)


cdef inline void ghost_unlink(RegistryHeader *h, GhostEntry *ghost, bid_t s) noexcept nogil:
    # Live slot s leaves the FIFO and goes on the unused stack (its index entry is the caller's
    # business).
    ghost[ghost[s].prev].next = ghost[s].next
    ghost[ghost[s].next].prev = ghost[s].prev
    if ghost[s].count < 2:
        h.ghost_once -= 1
    ghost[s].prev = -1
    ghost[s].next = <bid_t>h.ghost_free
    ghost[s].hash = 0
    ghost[s].count = 0
    h.ghost_free = s
    h.ghost_size -= 1


cdef inline void ghost_record(RegistryHeader *h, uint64_t *keys, bid_t *vals, GhostEntry *ghost,
                              uint64_t key, uint32_t count) noexcept nogil:
    # In place of index_remove(key) for an evicted block: its index entry becomes a ghost entry.
    # A hash in the table is never REGISTERED, so the OrderedDict's update-in-place case cannot
    # arise.
    cdef bid_t g = <bid_t>h.ghost_blocks, s
    if h.ghost_size == g:
        # full: the oldest entry is forgotten (before the victim's slot is looked up: the
        # backward shift may move it); its FIFO slot is reused right away
        s = ghost[g].next
        index_erase_at(h, keys, vals, index_pos(h, keys, vals, ghost[s].hash))
        ghost_unlink(h, ghost, s)
    s = <bid_t>h.ghost_free
    h.ghost_free = ghost[s].next
    ghost[s].hash = key
    ghost[s].count = count
    h.ghost_size += 1
    if count < 2:
        h.ghost_once += 1
    # append at the newest end (before the sentinel)
    ghost[s].prev = ghost[g].prev
    ghost[s].next = g
    ghost[ghost[g].prev].next = s
    ghost[g].prev = s
    vals[index_pos(h, keys, vals, key)] = -2 - s
    h.num_registered -= 1
