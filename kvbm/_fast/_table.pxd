# cython: language_level=3
"""What the registry's buffer holds: the block id type, the policy and state ids, the header and
the entry structs, and where each array sits (`table_layout`). Shared by registry.pxd and the
helpers over its arrays (_index.pxd, _heap.pxd); nothing here is a Python object."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

ctypedef int32_t bid_t   # block id inside the table (num_blocks < 2**31 - 1); -1 = none

cdef enum:   # the ids of kvbm.policy.EvictionPolicy, one each (registry.pyx checks at import)
    POLICY_LRU_ID = 0    # kvbm.policy.EvictionPolicy.LRU: priority, then least recent
    POLICY_LINEAGE_ID = 1  # kvbm.policy.EvictionPolicy.LINEAGE: priority, leaves first, then
                           #   last tick + lineage_c * f(use count) (_reference.py `_key`)
    POLICY_ADAPTIVE_ID = 2  # kvbm.policy.EvictionPolicy.ADAPTIVE: LINEAGE's key with the credit
                            #   adapt_credit, tuned online on the ghost hits (_adapt.pxd)

cdef enum:
    ST_RESET = 0         # kvbm.policy.BlockState values, stored as uint8
    ST_PARTIAL = 1
    ST_COMPLETE = 2
    ST_REGISTERED = 3

cdef enum:
    TABLE_ALIGN = 64     # every array starts on a cache line
    NUM_ARRAYS = 21      # header + the arrays of table_layout


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
    int64_t ghost_blocks      # G: entries of the ghost table (0: none; always 0 unless LINEAGE/ADAPTIVE)
    int64_t ghost_size        # live ghost entries (<= G), in the FIFO list
    int64_t ghost_free        # head of the stack of unused ghost slots (through ghost[s].next), -1 none
    int64_t ghost_once        # live ghost entries of blocks evicted after one use (count < 2)
    int64_t adapt_level       # ADAPTIVE: credit weight W = 2**(level/2**16 - 4) blocks' worth of
                              #   ticks (0..9 * 2**16: W = 1/16..32); -1: W = 0 (_adapt.pxd)
    uint64_t adapt_credit     # ADAPTIVE: ticks of credit per frequency step at adapt_level (N * W)
    int64_t adapt_step        # ADAPTIVE: the smallest move per epoch, in levels (0: a fixed setting)
    int64_t adapt_move        # ADAPTIVE: the next move's size (step..growth * step), signed by the last vote
    int64_t adapt_growth      # ADAPTIVE: the largest move, in steps (Rprop's growth; 1: every move one step)
    int64_t adapt_level_max   # ADAPTIVE: the highest level the moves reach (0..9 * 2**16; 9 * 2**16: W = 32)
    int64_t adapt_band        # ADAPTIVE: the vote's dead band, z in quarters: a side wins only if its net
                              #   exceeds the other's by z standard deviations of the counts (0: any)
    int64_t adapt_leaf        # ADAPTIVE: 1 leaves before interior blocks (key1's low bit), 0 not
    int64_t adapt_left        # ADAPTIVE: evictions left in this epoch (an epoch is N/2 evictions)
    int64_t adapt_sweep       # ADAPTIVE: the block whose key the next eviction refreshes (0..N-1)
    uint64_t adapt_evictions  # ADAPTIVE: evictions so far (ghost entries keep its low 32 bits)
    uint64_t adapt_frontier   # ADAPTIVE: highest key2 (last tick) of the victims of priority 0
                              #   without a child used once (a running maximum)
    uint64_t adapt_front0     # ADAPTIVE: adapt_frontier when this epoch began
    uint64_t adapt_rate       # ADAPTIVE: how far the frontier moved in the last epoch that moved
                              #   it (ticks; 0: not known yet)
    uint64_t adapt_fsum       # ADAPTIVE: this epoch's frontier victims: sum of f(use count)
    uint64_t adapt_fcount     # ADAPTIVE: this epoch's frontier victims: count
    uint64_t adapt_phi        # ADAPTIVE: 256 * mean f of the last epoch's frontier victims
    int64_t adapt_gain_up     # ADAPTIVE, this epoch: returns a higher credit would have kept
    int64_t adapt_loss_up     #   hits a higher credit would have lost
    int64_t adapt_gain_down   #   returns a lower credit would have kept
    int64_t adapt_loss_down   #   hits a lower credit would have lost
    uint64_t ghost_hits_once  # ghost hits of blocks evicted after one use (cumulative)
    uint64_t ghost_hits_reused   # ghost hits of blocks evicted after two or more (cumulative)


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
    uint32_t evicted_at       # ADAPTIVE: low 32 bits of adapt_evictions at its eviction, else 0


cdef inline int64_t index_capacity(int64_t n) noexcept nogil:
    # Slots of an index for n entries: the smallest power of two >= 2n (at least 2), so that a
    # probe always ends at an empty slot.
    cdef int64_t cap = 2
    while cap < 2 * n:
        cap <<= 1
    return cap


cdef inline int64_t _round_up(int64_t x, int64_t a) noexcept nogil:
    return (x + a - 1) // a * a


cdef inline int64_t table_layout(int64_t n, int64_t g, int64_t *offsets) noexcept nogil:
    """Offsets (from the aligned base) of the header and each array for N blocks and a ghost table
    of G entries, in BlockRegistry._carve's order; returns the total size."""
    cdef int64_t cap = index_capacity(n + g)   # blocks and ghost entries share the index
    cdef int64_t sizes[NUM_ARRAYS]
    sizes[0] = sizeof(RegistryHeader)
    sizes[1] = n * sizeof(uint8_t)        # state
    sizes[2] = n * sizeof(uint32_t)       # refcount
    sizes[3] = n * sizeof(uint64_t)       # hash
    sizes[4] = n * sizeof(int32_t)        # priority
    sizes[5] = n * sizeof(uint64_t)       # last_tick
    sizes[6] = n * sizeof(uint32_t)       # use_count
    sizes[7] = n * sizeof(bid_t)          # parent
    sizes[8] = n * sizeof(uint32_t)       # children
    sizes[9] = n * sizeof(bid_t)          # first_child
    sizes[10] = n * sizeof(bid_t)         # next_sib
    sizes[11] = n * sizeof(bid_t)         # prev_sib
    sizes[12] = (n + 1) * sizeof(bid_t)   # free_prev
    sizes[13] = (n + 1) * sizeof(bid_t)   # free_next
    sizes[14] = n * sizeof(HeapEntry)     # heap
    sizes[15] = n * sizeof(bid_t)         # heap_pos
    sizes[16] = n * sizeof(uint32_t)      # mark
    sizes[17] = cap * sizeof(uint64_t)    # ikeys
    sizes[18] = cap * sizeof(bid_t)       # ivals
    sizes[19] = n * sizeof(uint64_t)      # ring
    sizes[20] = (g + 1) * sizeof(GhostEntry) if g > 0 else 0   # ghost (FIFO entries, sentinel G)
    cdef int64_t off = 0
    cdef int i
    for i in range(NUM_ARRAYS):
        offsets[i] = off
        off += _round_up(sizes[i], TABLE_ALIGN)
    return off
