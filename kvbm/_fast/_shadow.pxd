# cython: language_level=3
"""ADAPTIVE's shadow tuner: inline helpers over the registry header and the tuner's arrays in the
table; no object, no GIL. The twin and the spec is kvbm/_fast/_reference_shadow.py; the study:
research/eviction/POLICY_ADAPTIVE.md §13 (round 13: it replaced the marginal vote of rounds 4-12).

ADAPTIVE keys inactive blocks by last tick + credit * f(use count) (_adapt.pxd). Which credit is
best depends on the workload (frequency pays on hot sets among scans, costs under drift); the
tuner measures it instead of modelling it, by miniature simulation (Waldspurger et al., ATC 2017):

  sample    one block use in R (a power of two; `shadow_rate` in _table.pxd: M = N // R in
            [SHADOW_MINI, 2 SHADOW_MINI)) by the top 24 bits of hash * MIX, a hash the mixing
            spreads whatever the ids' structure. A use is the release of a REGISTERED block
            (each acquire or registration is released once), fed by the registry. (The minis'
            index homes multiply by the same constant: for hashes below 2**32 and R >= 2**15,
            about 4M blocks, the sampled ones share low home bits and probe longer. kvbm's
            sequence hashes are 64-bit xxhash values, so only synthetic ids meet it.)
  minis     SHADOW_K small caches of M blocks, one per candidate W = 0, 1/8, 1/4, ..., 32, each
            keyed like ADAPTIVE at that W: (has a child << 63 | last tick + credit_of(M, level) *
            f(use count), last tick), smallest evicted first (a HeapEntry heap: key1, key2, slot),
            so leaves go first as in the registry; the child bit is the registry's at the use
            (children > 0, under leaves-first; else 0). The clock ticks
            twice per sampled use, as the registry's at a use and its release. Each mini keeps a
            ring of its last M victims (hash, use count); a hash used again while in the ring gets
            its count back (the entry is consumed, its position stays empty until the ring wraps),
            as the registry's ghost table does. One index per mini (linear probing, _index.pxd's
            probe_pos/probe_erase) maps a hash to its slot or to -2 - its ring position. No
            priority.
  epoch     M / 2 evictions of mini 0 (W = 0: leaves first, then least recent), as the registry's
            N / 2. At its end each mini's hits of the epoch join its score, decayed: score = score
            * decay / 2**16 + hits * 2**16, saturating at SCORE_MAX; the level follows the best
            score (the current candidate on a tie, else the lowest W). Keys already in the heap
            keep their credit; after a move the sweep (registry.pyx `_evict_one`) refreshes 16 per
            eviction until all N are.
  cost      per sampled use, SHADOW_K index probes and heap sifts of log2(M) levels; per use
            1 / R of that (R = 64 at 10**4 blocks, 256 at 2**15, 4096 at 10**6), and nothing on
            match.
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset

from kvbm._fast._adapt cimport LEVEL_BITS, credit_of, f_of
from kvbm._fast._heap cimport heap_append, heap_resift, heap_sift_down, heap_sift_up, heap_take
from kvbm._fast._index cimport index_shift_of, probe_erase, probe_pos
from kvbm._fast._table cimport (
    SHADOW_K, HeapEntry, RegistryHeader, ShadowMini, bid_t, shadow_capacity, shadow_rate,
)

cdef extern from *:
    """
    #define KVBM_SHADOW_MIX 0x9E3779B97F4A7C15ULL
    """
    const uint64_t KVBM_SHADOW_MIX

cdef enum:
    SHADOW_NO_MOVE = -2    # shadow_use: the level stays
    EPOCH_HITS_MAX = 1 << 30    # an epoch's hits counted into a score at most (the score stays < 2**47)

cdef extern from *:
    """
    #define KVBM_SHADOW_SCORE_MAX (1LL << 46)
    """
    const int64_t SCORE_MAX "KVBM_SHADOW_SCORE_MAX"   # a score saturates here: score * 2**16 < 2**63


ctypedef struct ShadowView:        # the tuner's arrays in the table (BlockRegistry._carve)
    ShadowMini *mini               # SHADOW_K candidates
    uint64_t *hash                 # SHADOW_K * M: each slot's hash (mini k's slots at k * M)
    uint32_t *count                # SHADOW_K * M: each slot's use count
    HeapEntry *heap                # SHADOW_K * M: each mini's heap (key, last tick, slot)
    bid_t *pos                     # SHADOW_K * M: each slot's heap position
    uint64_t *ring_hash            # SHADOW_K * M: each mini's last M victims
    uint32_t *ring_count           #   and their use counts (0: an empty position)
    uint64_t *ikeys                # SHADOW_K * P: each mini's index
    bid_t *ivals                   #   slot, -2 - ring position, -1 empty


cdef inline int64_t shadow_level(int64_t k) noexcept nogil:
    # Candidate k's credit level: W = 0 (-1) for k = 0, else W = 2**(k - 4) (k octaves).
    return -1 if k == 0 else k << LEVEL_BITS


cdef inline int64_t shadow_epoch(int64_t m) noexcept nogil:
    # Evictions of mini 0 per epoch: half a mini turnover, as the registry's N / 2.
    return m // 2 if m >= 2 else 1


cdef inline int64_t shadow_candidate(int64_t level) noexcept nogil:
    # The candidate of a level, or -1 if it is none.
    if level == -1:
        return 0
    if level > 0 and level & ((1 << LEVEL_BITS) - 1) == 0 and level >> LEVEL_BITS < SHADOW_K:
        return level >> LEVEL_BITS
    return -1


cdef inline void shadow_init(RegistryHeader *h, ShadowView *v, int64_t rate) noexcept nogil:
    # Empty mini caches for the header's num_blocks; the arrays were zeroed with the buffer.
    cdef int64_t m = h.num_blocks // rate, cap = shadow_capacity(m), k, i
    h.shadow_rate = rate
    h.shadow_m = m
    h.shadow_cap = cap
    h.shadow_shift = index_shift_of(cap)
    h.shadow_tick = 0
    h.shadow_next = shadow_epoch(m)
    h.shadow_epochs = 0
    for k in range(SHADOW_K):
        v.mini[k].credit = credit_of(m, shadow_level(k))
        v.mini[k].hits = v.mini[k].last_hits = v.mini[k].evictions = 0
        v.mini[k].score = v.mini[k].size = v.mini[k].head = v.mini[k].pad = 0
    for i in range(SHADOW_K * m):
        v.pos[i] = -1
    for i in range(SHADOW_K * cap):
        v.ivals[i] = -1


cdef inline void shadow_clear(RegistryHeader *h, ShadowView *v) noexcept nogil:
    # Empties the mini caches in place (rebuild: a call cut short may have left one half-updated).
    # Sizes come from num_blocks, as the layout's, not from the header fields being repaired. The
    # decay stays; the level, its credit and the candidate it follows are the caller's.
    cdef int64_t rate = shadow_rate(h.num_blocks), m = h.num_blocks // rate
    cdef int64_t km = SHADOW_K * m, kp = SHADOW_K * shadow_capacity(m)
    memset(<void *>v.hash, 0, km * sizeof(uint64_t))
    memset(<void *>v.count, 0, km * sizeof(uint32_t))
    memset(<void *>v.heap, 0, km * sizeof(HeapEntry))
    memset(<void *>v.ring_hash, 0, km * sizeof(uint64_t))
    memset(<void *>v.ring_count, 0, km * sizeof(uint32_t))
    memset(<void *>v.ikeys, 0, kp * sizeof(uint64_t))
    shadow_init(h, v, rate)


cdef inline bint shadow_sampled(const RegistryHeader *h, uint64_t key) noexcept nogil:
    return ((key * KVBM_SHADOW_MIX) >> 40) & <uint64_t>(h.shadow_rate - 1) == 0


cdef inline uint64_t mini_key(uint64_t tick, uint64_t credit, uint32_t count, bint child) noexcept nogil:
    # child << 63 | tick + credit * f(count), the sum saturating at 2**63 - 1 (credit * f < 2**25 *
    # 32, and the clock would need 2**62 sampled uses to get there)
    cdef uint64_t c = tick + credit * f_of(count)
    if c < tick or c > <uint64_t>0x7FFFFFFFFFFFFFFFULL:
        c = <uint64_t>0x7FFFFFFFFFFFFFFFULL
    return (<uint64_t>1 << 63) | c if child else c


cdef inline bid_t _mini_evict(const RegistryHeader *h, ShadowView *v, int64_t k) noexcept nogil:
    # Mini k is full: its smallest entry leaves for the ring (overwriting the oldest position);
    # returns its slot, free for the caller.
    cdef int64_t m = h.shadow_m, base = k * m, ib = k * h.shadow_cap, mask = h.shadow_cap - 1
    cdef ShadowMini *mini = &v.mini[k]
    cdef HeapEntry *heap = v.heap + base
    cdef bid_t *pos = v.pos + base
    cdef bid_t s = heap[0].block
    cdef int64_t i = heap_take(heap, pos, &mini.size, s), r = mini.head
    if i >= 0:
        heap_sift_down(heap, pos, mini.size, i)
    if v.ring_count[base + r] != 0:          # the oldest victim is forgotten
        probe_erase(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask,
                    probe_pos(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask, v.ring_hash[base + r]))
    v.ring_hash[base + r] = v.hash[base + s]
    v.ring_count[base + r] = v.count[base + s]
    # the victim's index entry now points at its ring position (looked up after the erase above,
    # whose backward shift may have moved it)
    v.ivals[ib + probe_pos(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask, v.hash[base + s])] = <bid_t>(-2 - r)
    mini.head = r + 1 if r + 1 < m else 0
    mini.evictions += 1
    return s


cdef inline void _mini_use(RegistryHeader *h, ShadowView *v, int64_t k, uint64_t key,
                           bint child) noexcept nogil:
    # One sampled use of hash `key` (with a child or not) in mini k at the tuner's clock.
    cdef int64_t m = h.shadow_m, base = k * m, ib = k * h.shadow_cap, mask = h.shadow_cap - 1
    cdef ShadowMini *mini = &v.mini[k]
    cdef HeapEntry *heap = v.heap + base
    cdef bid_t *pos = v.pos + base
    cdef int64_t i = probe_pos(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask, key), r
    cdef bid_t s
    cdef uint32_t count = 1
    cdef HeapEntry e
    if i >= 0 and v.ivals[ib + i] >= 0:       # in the mini cache: a hit; its key only grows
        s = v.ivals[ib + i]
        mini.hits += 1
        if v.count[base + s] != 0xFFFFFFFFU:
            v.count[base + s] += 1
        heap[pos[s]].key1 = mini_key(h.shadow_tick, mini.credit, v.count[base + s], child)
        heap[pos[s]].key2 = h.shadow_tick
        heap_resift(heap, pos, mini.size, pos[s])     # the child bit may have gone
        return
    if i >= 0:                                # in the ring: its use count comes back
        r = -2 - v.ivals[ib + i]
        count = v.ring_count[base + r] + 1 if v.ring_count[base + r] != 0xFFFFFFFFU else 0xFFFFFFFFU
        v.ring_count[base + r] = 0
        v.ring_hash[base + r] = 0
        probe_erase(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask, i)
    if mini.size == m:
        s = _mini_evict(h, v, k)
    else:
        s = <bid_t>mini.size
    v.hash[base + s] = key
    v.count[base + s] = count
    i = -1 - probe_pos(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask, key)
    v.ikeys[ib + i] = key
    v.ivals[ib + i] = s
    e.key1 = mini_key(h.shadow_tick, mini.credit, count, child)
    e.key2 = h.shadow_tick
    e.block = s
    e.pad = 0
    heap_sift_up(heap, pos, heap_append(heap, pos, &mini.size, &e))


cdef inline int64_t shadow_use(RegistryHeader *h, ShadowView *v, uint64_t key, bint child) noexcept nogil:
    # A sampled block use with hash `key` ended (the registry released a REGISTERED block, with
    # a child or not; the caller tested shadow_sampled first): every mini sees it; at an epoch's
    # end, the scores. Returns the level to move to, or SHADOW_NO_MOVE.
    cdef int64_t k, best = 0, hits
    h.shadow_tick += 2
    for k in range(SHADOW_K):
        _mini_use(h, v, k, key, child)
    if v.mini[0].evictions < h.shadow_next:
        return SHADOW_NO_MOVE
    h.shadow_next += shadow_epoch(h.shadow_m)
    h.shadow_epochs += 1
    for k in range(SHADOW_K):
        hits = <int64_t>(v.mini[k].hits - v.mini[k].last_hits)
        if hits > EPOCH_HITS_MAX:
            hits = EPOCH_HITS_MAX
        v.mini[k].score = ((v.mini[k].score * h.shadow_decay) >> 16) + (hits << 16)
        if v.mini[k].score > SCORE_MAX:
            v.mini[k].score = SCORE_MAX
        v.mini[k].last_hits = v.mini[k].hits
        if v.mini[k].score > v.mini[best].score:
            best = k
    if h.shadow_current >= 0 and v.mini[h.shadow_current].score == v.mini[best].score:
        return SHADOW_NO_MOVE
    h.shadow_current = best
    return shadow_level(best)
