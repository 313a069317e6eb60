# cython: language_level=3
"""Contract of the block registry: the arrays of the table (one buffer, struct of arrays) and the
routines of BlockRegistry. Every array lives inside the buffer handed to BlockRegistry (or
allocated by it), after a fixed header, so the whole table can later be placed in a shared-memory
segment; nothing here is a Python object per block. The header and entry structs, the ids and the
layout are in _table.pxd; the index with its ghost table and the heap are inline helpers over
these arrays in _index.pxd and _heap.pxd, which the methods marked "thin" call."""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from kvbm._fast._shadow cimport ShadowView
from kvbm._fast._table cimport (
    NUM_ARRAYS, POLICY_ADAPTIVE_ID, POLICY_LINEAGE_ID, POLICY_LRU_ID, ST_COMPLETE, ST_PARTIAL, ST_REGISTERED, ST_RESET,
    TABLE_ALIGN, GhostEntry, HeapEntry, RegistryHeader, ShadowMini, bid_t,
)


@cython.final
cdef class BlockRegistry:
    cdef object _mem               # memoryview over the whole buffer (keeps it alive and unresizable)
    cdef RegistryHeader *h         # header at the (64-byte aligned) start of the buffer
    # per-block arrays, length N unless noted
    cdef uint8_t *state            # BlockState of each block
    cdef uint32_t *refcount        # holders; > 0 means active
    cdef uint64_t *hash            # sequence hash (valid when REGISTERED, else 0)
    cdef int32_t *priority         # eviction priority: lower is evicted first; 0 after reset
    cdef uint64_t *last_tick       # tick of the last touch (or registration, or release to inactive)
    cdef uint32_t *use_count       # touches since allocation (register and match count as one);
                                   #   saturates at 2**32 - 1
    cdef bid_t *parent             # block of the parent hash if it was registered here when this
                                   #   block registered, else -1; cleared when the parent is evicted
                                   #   (orphan); a dedup hit keeps the existing block's link
    cdef uint32_t *children        # registered blocks whose parent link points here
    cdef bid_t *first_child        # head of this block's child list (intrusive, through next/prev_sib)
    cdef bid_t *next_sib           # next block with the same parent, -1 at the end
    cdef bid_t *prev_sib           # previous block with the same parent, -1 at the head
    cdef bid_t *free_prev          # length N+1: free list (FIFO: push tail, pop head), sentinel at N;
    cdef bid_t *free_next          #   -1 for blocks not in the free list
    cdef HeapEntry *heap           # inactive set: 4-ary min-heap (parent of i is (i-1)//4) of
                                   #   h.heap_size entries, keys inline so sifting reads one array;
                                   #   an entry whose block was acquired since it went in is a
                                   #   zombie (frozen key): dropped when it reaches the top, re-keyed
                                   #   in place when its block is released again
    cdef bid_t *heap_pos           # position of each block's entry in heap, -1 when it has none
    cdef uint32_t *mark            # scratch for batch validation (duplicate counts); all 0 between calls
    cdef uint64_t *ikeys           # length C: index hash of each slot (0 when empty)
    cdef bid_t *ivals              # length C: block id of each slot, -1 when empty, -2 - s for the
                                   #   ghost entry in FIFO slot s (linear probing, backward-shift
                                   #   deletion: no tombstones)
    cdef uint64_t *ring            # evicted hashes not yet drained, ring of capacity N
    # ghost table (LINEAGE and ADAPTIVE; _index.pxd): the use counts of the last G evicted hashes, FIFO by
    # eviction; an entry is consumed when its hash registers again
    cdef GhostEntry *ghost         # length G+1: entries, a FIFO list of live slots (oldest first)
                                   #   with its sentinel at G; unused slots chained through next
    # ADAPTIVE's shadow tuner (_shadow.pxd): SHADOW_K mini caches of M blocks each, carved for
    # every policy (table_layout), used by ADAPTIVE only
    cdef ShadowView sv

    # index and ghost table (thin over _index.pxd; callers pass hashes only, slots are masked)
    cdef inline bid_t _find(self, uint64_t key) noexcept nogil
    cdef inline int64_t _index_pos(self, uint64_t key) noexcept nogil
    cdef void _index_remove(self, uint64_t key) noexcept nogil
    cdef void _ghost_unlink(self, bid_t s) noexcept nogil
    cdef void _ghost_record(self, uint64_t key, uint32_t count) noexcept nogil
    # free list and heap (callers pass checked block ids; the heap ones thin over _heap.pxd)
    cdef void _free_push(self, bid_t b) noexcept nogil
    cdef bid_t _free_pop(self) noexcept nogil
    cdef void _sift_up(self, int64_t i) noexcept nogil
    cdef void _sift_down(self, int64_t i) noexcept nogil
    cdef void _resift(self, int64_t i) noexcept nogil
    cdef void _heap_push(self, bid_t b) noexcept nogil
    cdef void _heap_remove(self, bid_t b) noexcept nogil
    cdef bid_t _heap_top_live(self) noexcept nogil
    cdef inline void _deactivate(self, bid_t b) noexcept nogil
    cdef inline void _acquire(self, bid_t b) noexcept nogil
    # policy: the one key function, and the hook run whenever metadata a policy reads changes
    cdef inline void _policy_key(self, bid_t b, HeapEntry *e) noexcept nogil
    cdef void _update_key(self, bid_t b) noexcept nogil
    # block life cycle
    cdef inline void _touch(self, bid_t b) noexcept nogil
    cdef void _reset(self, bid_t b) noexcept nogil
    cdef void _link_child(self, bid_t c, bid_t p) noexcept nogil
    cdef bid_t _detach(self, bid_t b) noexcept nogil
    cdef void _orphan_children(self, bid_t b) noexcept nogil
    cdef bid_t _evict_one(self) noexcept nogil
    # batch loops (inputs validated by the def methods)
    cdef void _allocate_core(self, int64_t n, int64_t *out) noexcept nogil
    cdef void _complete_core(self, const int64_t *blocks, int64_t n) noexcept nogil
    cdef void _register_core(self, const int64_t *blocks, const uint64_t *hashes,
                             const uint64_t *parents, const uint8_t *has_parent,
                             const int32_t *priorities, int64_t n, int64_t *out) noexcept nogil
    cdef int64_t _match_core(self, const uint64_t *hashes, int64_t n, bint acquire,
                             int64_t *out) noexcept nogil
    cdef void _lookup_core(self, const uint64_t *hashes, int64_t n, int64_t *out) noexcept nogil
    cdef void _touch_core(self, const int64_t *blocks, int64_t n) noexcept nogil
    cdef void _release_core(self, const int64_t *blocks, int64_t n) noexcept nogil
    cdef void _set_priority_core(self, const int64_t *blocks, const int32_t *prios,
                                 int64_t n) noexcept nogil
    cdef int64_t _evict_core(self, int64_t n, uint64_t *out) noexcept nogil
    # setup and validation helpers (with the GIL; raise RegistryError). The invariant checks are
    # functions over the table in _invariants.pxi, included by registry.pyx.
    cdef _carve(self, unsigned char *base, int64_t n, int64_t g)
    cdef _init_table(self, int64_t n, int64_t g, int64_t pol)
    cdef int _check_not_reset(self, const int64_t[::1] blocks, str op) except -1
    cdef int _check_ids(self, const int64_t[::1] blocks, str op) except -1
    cdef int _check_distinct(self, const int64_t[::1] blocks, str op) except -1
