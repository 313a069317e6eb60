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
                            #   adapt_credit, tuned online by miniature simulation (_shadow.pxd)

cdef enum:
    ST_RESET = 0         # kvbm.policy.BlockState values, stored as uint8
    ST_PARTIAL = 1
    ST_COMPLETE = 2
    ST_REGISTERED = 3

cdef enum:
    TABLE_ALIGN = 64     # every array starts on a cache line
    NUM_ARRAYS = 30      # header + the arrays of table_layout
    SHADOW_K = 10        # ADAPTIVE's tuner: candidates W = 0, 1/8, 1/4, ..., 32 (_shadow.pxd)
    SHADOW_MINI = 128    # ADAPTIVE's tuner: mini cache size target (M in [SHADOW_MINI, 2 SHADOW_MINI))
    SWEEP_BURST = 16     # ADAPTIVE: keys the sweep refreshes per eviction after a move


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
    int64_t adapt_tune        # ADAPTIVE: 1 the shadow tuner moves the level (_shadow.pxd), 0 a fixed setting
    int64_t adapt_leaf        # ADAPTIVE: 1 leaves before interior blocks (key1's low bit), 0 not
    int64_t adapt_sweep       # ADAPTIVE: the block whose key the sweep refreshes next (0..N-1)
    int64_t adapt_stale       # ADAPTIVE: blocks the sweep has still to refresh since the last move (0..N)
    int64_t shadow_rate       # ADAPTIVE's tuner: R, a power of two: one block use in R is sampled
    int64_t shadow_m          # ADAPTIVE's tuner: M = N // R blocks per mini cache (SHADOW_K of them)
    int64_t shadow_cap        # ADAPTIVE's tuner: P, index slots per mini cache (a power of two >= 4M)
    int64_t shadow_shift      # ADAPTIVE's tuner: 64 - log2(P), for index_home
    uint64_t shadow_tick      # ADAPTIVE's tuner: the mini caches' clock (two ticks per sampled use)
    uint64_t shadow_next      # ADAPTIVE's tuner: mini 0's eviction count that ends this epoch
    uint64_t shadow_epochs    # ADAPTIVE's tuner: epochs so far
    int64_t shadow_decay      # ADAPTIVE's tuner: the scores' decay per epoch, in 2**-16 (0..2**16)
    int64_t shadow_current    # ADAPTIVE's tuner: the candidate the level follows (-1: none yet)
    uint64_t ghost_hits_once  # ghost hits of blocks evicted after one use (cumulative)
    uint64_t ghost_hits_reused   # ghost hits of blocks evicted after two or more (cumulative)


ctypedef struct HeapEntry:
    uint64_t key1             # policy key, first word (compared first)
    uint64_t key2             # policy key, second word; then the block id breaks ties
    bid_t block               # the block; its heap_pos points back here
    uint32_t pad              # 0 (keeps the entry 24 bytes, the buffer deterministic)


ctypedef struct ShadowMini:      # one candidate of ADAPTIVE's tuner (_shadow.pxd)
    uint64_t credit           # ticks of credit per frequency step: credit_of(M, its level)
    uint64_t hits             # sampled uses that found their block in this mini cache (cumulative)
    uint64_t last_hits        # hits when the last epoch ended
    uint64_t evictions        # blocks this mini cache evicted (cumulative)
    int64_t score             # decayed hits per epoch, in 2**-16
    int64_t size              # blocks in it (<= M): slots 0..size-1, its heap's entries
    int64_t head              # the ring position the next eviction writes (0..M-1)
    int64_t pad               # 0 (64 bytes)


ctypedef struct GhostEntry:
    uint64_t hash             # evicted sequence hash (0 when unused)
    uint32_t count            # its use count at eviction (>= 1 while live, 0 when unused)
    bid_t prev                # FIFO neighbours (slot ids, G = sentinel); prev -1 when unused
    bid_t next                #   next also chains the unused slots (-1 ends)
    uint32_t pad              # 0 (keeps the entry 24 bytes, the buffer deterministic)


cdef inline int64_t index_capacity(int64_t n) noexcept nogil:
    # Slots of an index for n entries: the smallest power of two >= 2n (at least 2), so that a
    # probe always ends at an empty slot.
    cdef int64_t cap = 2
    while cap < 2 * n:
        cap <<= 1
    return cap


cdef inline int64_t _round_up(int64_t x, int64_t a) noexcept nogil:
    return (x + a - 1) // a * a


cdef inline int64_t shadow_rate(int64_t n) noexcept nogil:
    # R: the largest power of two with R * SHADOW_MINI <= N (1 below), so M = N // R lies in
    # [SHADOW_MINI, 2 SHADOW_MINI) once N >= SHADOW_MINI, and is N below.
    cdef int64_t r = 1
    while r * 2 * SHADOW_MINI <= n:
        r *= 2
    return r


cdef inline int64_t shadow_capacity(int64_t m) noexcept nogil:
    # P: index slots of one mini cache, for its M blocks and M ring entries at most half full.
    return index_capacity(2 * m)


cdef inline int64_t table_layout(int64_t n, int64_t g, int64_t *offsets) noexcept nogil:
    """Offsets (from the aligned base) of the header and each array for N blocks and a ghost table
    of G entries, in BlockRegistry._carve's order; returns the total size. ADAPTIVE's tuner's
    arrays (SHADOW_K mini caches of M blocks) are carved for every policy, as the ghost table is
    for G > 0 (under 1 MB: M < 2 SHADOW_MINI), so bytes_needed needs no policy."""
    cdef int64_t cap = index_capacity(n + g)   # blocks and ghost entries share the index
    cdef int64_t km = SHADOW_K * (n // shadow_rate(n))            # mini cache slots, all candidates
    cdef int64_t kp = SHADOW_K * shadow_capacity(n // shadow_rate(n))
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
    sizes[21] = SHADOW_K * sizeof(ShadowMini)   # shadow_mini
    sizes[22] = km * sizeof(uint64_t)     # shadow_hash: each mini slot's hash
    sizes[23] = km * sizeof(uint32_t)     # shadow_count: its use count
    sizes[24] = km * sizeof(HeapEntry)    # shadow_heap: (key, last tick, slot), per mini
    sizes[25] = km * sizeof(bid_t)        # shadow_pos: each slot's heap position
    sizes[26] = km * sizeof(uint64_t)     # shadow_ring_hash: the last M victims, per mini
    sizes[27] = km * sizeof(uint32_t)     # shadow_ring_count: their use counts (0: empty)
    sizes[28] = kp * sizeof(uint64_t)     # shadow_ikeys: per mini index of slots and ring entries
    sizes[29] = kp * sizeof(bid_t)        # shadow_ivals: slot, -2 - ring position, -1 empty
    cdef int64_t off = 0
    cdef int i
    for i in range(NUM_ARRAYS):
        offsets[i] = off
        off += _round_up(sizes[i], TABLE_ALIGN)
    return off
