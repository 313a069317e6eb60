# cython: language_level=3
"""Contract of the block registry: the table layout (one buffer, struct of arrays) and the
nogil routines that run the batch loops. Every array lives inside the buffer handed to
BlockRegistry (or allocated by it), after a fixed header, so the whole table can later be placed in
a shared-memory segment; nothing here is a Python object per block."""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

ctypedef int32_t bid_t   # block id inside the table (num_blocks < 2**31 - 1); -1 = none

cdef enum:
    POLICY_LRU_ID = 0    # kvbm.policy.EvictionPolicy.LRU: priority, then least recent
    POLICY_LINEAGE_ID = 1  # kvbm.policy.EvictionPolicy.LINEAGE: priority, leaves first, then
                           #   last tick + lineage_c * f(use count) (bench/POLICY.md section 2)

cdef enum:
    ST_RESET = 0         # kvbm.policy.BlockState values, stored as uint8
    ST_PARTIAL = 1
    ST_COMPLETE = 2
    ST_REGISTERED = 3


ctypedef struct RegistryHeader:
    uint64_t magic            # REGISTRY_MAGIC once initialised (for a later attach-to-segment)
    uint64_t version          # layout version of this struct and the arrays after it
    int64_t num_blocks        # N: block ids are 0..N-1; slot N of free_prev/free_next is the sentinel
    int64_t index_capacity    # C: power of two >= 2(N + G), slots of the open-addressing index
    int64_t index_mask        # C - 1
    int64_t index_shift       # 64 - log2(C): home slot = top bits of (h ^ h >> 32) * golden
    int64_t policy            # EvictionPolicy id used by _policy_key
    uint64_t tick             # logical clock; every touch/register/match/release-to-inactive does ++tick
    int64_t num_free          # blocks in the free list (state RESET)
    int64_t num_inactive      # REGISTERED blocks with refcount 0 (each has a live heap entry)
    int64_t heap_size         # heap entries: live ones plus zombies (acquired since they went in)
    int64_t num_registered    # entries in the index (REGISTERED blocks, active or inactive)
    int64_t ring_head         # next slot of the evicted-hash ring to write
    int64_t ring_count        # hashes in the ring not yet drained (<= N)
    uint64_t ring_dropped     # hashes overwritten before anyone drained them (cumulative)
    uint64_t lineage_c        # LINEAGE credit unit in ticks: 2 * num_blocks (one LRU lifetime)
    int64_t ghost_blocks      # G: entries of the ghost table (0: none; always 0 unless LINEAGE)
    int64_t ghost_size        # live ghost entries (<= G), in the FIFO list
    int64_t ghost_free        # head of the stack of unused ghost slots (through ghost[s].next), -1 none


ctypedef struct HeapEntry:
    uint64_t key1             # policy key, first word (compared first)
    uint64_t key2             # policy key, second word; then the block id breaks ties
    bid_t block               # the block; its heap_pos points back here
    uint32_t pad              # 0 (keeps the entry 24 bytes, the buffer deterministic)


ctypedef struct GhostEntry:
    uint64_t hash             # evicted sequence hash (0 when unused)
    uint32_t count            # its use count at eviction (>= 1 while live, 0 when unused)
    bid_t prev                # FIFO neighbours (slot ids, G = sentinel); prev -1 when unused
    bid_t next                #   next also chains the unused slots (-1 ends)
    uint32_t pad              # 0 (24-byte entries, the buffer deterministic)


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
    # ghost table (LINEAGE only; bench/POLICY_ROUND2.md section 3): the use counts of the last G
    # evicted hashes, FIFO by eviction; an entry is consumed when its hash registers again
    cdef GhostEntry *ghost         # length G+1: entries, a FIFO list of live slots (oldest first)
                                   #   with its sentinel at G; unused slots chained through next

    # index (nogil, callers pass hashes only; slots are masked)
    cdef inline bid_t _find(self, uint64_t key) noexcept nogil
    cdef inline int64_t _index_pos(self, uint64_t key) noexcept nogil
    cdef void _index_insert(self, uint64_t key, bid_t b) noexcept nogil
    cdef void _index_erase_at(self, int64_t i) noexcept nogil
    cdef void _index_remove(self, uint64_t key) noexcept nogil
    # ghost table (callers: LINEAGE with ghost_blocks > 0)
    cdef void _ghost_unlink(self, bid_t s) noexcept nogil
    cdef void _ghost_record(self, uint64_t key, uint32_t count) noexcept nogil
    # free list and heap (callers pass checked block ids)
    cdef void _free_push(self, bid_t b) noexcept nogil
    cdef bid_t _free_pop(self) noexcept nogil
    cdef inline bint _less(self, const HeapEntry *a, const HeapEntry *b) noexcept nogil
    cdef void _sift_up(self, int64_t i) noexcept nogil
    cdef void _sift_down(self, int64_t i) noexcept nogil
    cdef inline void _resift(self, int64_t i) noexcept nogil
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
    # setup and validation helpers (with the GIL; raise RegistryError)
    cdef _carve(self, unsigned char *base, int64_t n, int64_t g)
    cdef _init_table(self, int64_t n, int64_t g, int64_t pol)
    cdef _check_ghost(self)
    cdef _debug_check(self)
    cdef int _check_not_reset(self, const int64_t[::1] blocks, str op) except -1
    cdef int _check_ids(self, const int64_t[::1] blocks, str op) except -1
    cdef int _check_distinct(self, const int64_t[::1] blocks, str op) except -1
