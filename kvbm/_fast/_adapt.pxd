# cython: language_level=3
"""ADAPTIVE's online tuning of the frequency credit (kvbm.policy.EvictionPolicy.ADAPTIVE): inline
helpers over the registry header; no object, no GIL. The twin is `_reference.py`'s `_credit_of`,
`_inactive_hit`, `_ghost_hit`, `_after_eviction` and `_epoch_step`; the design and its
measurements: research/eviction/POLICY_ADAPTIVE.md.

Parts:
  level     the credit weight W on a log scale, in the header (so it survives attach): W = 2 **
            (level / 2**16 - 4) blocks' worth of ticks per frequency step, level 0..9 * 2**16 (W =
            1/16..32); level -1 is W = 0 (plain recency, a fixed setting only). `credit_of` turns
            it into ticks, integers only (the twin computes the same numbers): 2**q * (1 + r/2**16)
            for level = 2**16 q + r, i.e. exact at whole octaves and linear in between.
  frontier  the highest key2 (its last tick) of the victims of priority 0 without a registered
            child that were used once: a block of that class stays while its key2 is above it. A
            block's margin is key2 - frontier. (Version 11 took the key2 of the last victim of
            the class, used once or not. With a large credit, a reused victim's key2 lies far
            ahead of the ticks, so that frontier jumped forward and back; its advance over an
            epoch often read 0, every ghost hit then counted as kept by either move, and the
            vote climbed to W = 32 where the best W was below 1. Round 12, POLICY_ADAPTIVE.md §12.)
            Raising the credit by dC (one step) moves a block's key2 by dC * f and, to keep N blocks,
            the frontier by about dC * phi, phi the mean f of the frontier's victims (last epoch).
            So a block whose f is above phi gains margin dC * (f - phi), one below loses it.
  marginal  each event a one-step change would flip is counted (O(1) each, doubles computed in
            the same order as the twin): a hit on an inactive block (match or dedup; one in
            HIT_SAMPLE by tick, weighted HIT_SAMPLE, so a long match pays for few) with margin m =
            last tick + credit * f - frontier is lost by raising if f < phi and
            m < dC_up * (phi - f), and by lowering if f > phi and m < dC_down * (f - phi); a
            ghost hit (a victim that came back), whose margin is -(evictions since it left) *
            (frontier advance per eviction, the last epoch that advanced it; ghost hits are not
            voted on before one has), is kept by raising if f > phi and -m <= dC_up * (f - phi),
            by lowering if f < phi and -m <= dC_down * (phi - f). f and phi are in 1/256.
  epoch     N/2 evictions. At its end the vote: up if gains - losses of raising is positive,
            above lowering's by the dead band, down in the mirror case, else none. The band: the
            difference of the two nets must reach z standard deviations of the four counts (z =
            the header's adapt_band / 4; counts taken as Poisson, a tested hit weighing
            HIT_SAMPLE, so the variance is the gains + HIT_SAMPLE * the losses, plus a floor of
            HIT_SAMPLE**2: a loss count sampled one in HIT_SAMPLE that reads 0 may still be
            HIT_SAMPLE). An epoch whose vote is noise, or rests on a handful of events, as on
            traces where every setting scores alike, or where both sides claim about the same
            gain, does not move the level. Then the move (Rprop): one step
            the first time, doubled while the votes agree (up to the header's adapt_growth steps),
            halved when they turn (down to one step); clamped to 0..adapt_level_max (at most
            LEVEL_MAX).
  sweep     keys already in the heap keep the credit they were computed with (no O(n) re-key at a
            move); instead each eviction refreshes the key of one block, in block id order
            (registry.pyx `_evict_one`, O(log n)), so no key is more than N evictions old.
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t

from kvbm._fast._table cimport RegistryHeader

cdef extern from *:
    int __builtin_clzll(unsigned long long x) noexcept nogil   # x != 0

cdef enum:
    LEVEL_BITS = 16        # levels per doubling of W: 2**16
    HIT_SAMPLE = 16        # one hit on an inactive block in 16 is tested (by tick), weighted 16
    LEVEL_MAX = 589824     # 9 << 16: W = 32 (9 octaves above W = 1/16, level 0)
    GROWTH_MAX = 65536     # the largest adapt_growth set_adaptive accepts (moves of 2**16 steps)
    BAND_MAX = 64          # the largest adapt_band set_adaptive accepts (z = 16)


cdef inline uint64_t credit_of(int64_t n, int64_t level) noexcept nogil:
    # Ticks of credit per frequency step for N = n blocks at `level` (-1..LEVEL_MAX): N * W with
    # W = 2**(level / 2**16 - 4), linear between octaves. N < 2**31: N * 2**17 << 9 < 2**57.
    if level < 0:
        return 0
    return ((<uint64_t>n * <uint64_t>((1 << LEVEL_BITS) + (level & ((1 << LEVEL_BITS) - 1))))
            << <uint64_t>(level >> LEVEL_BITS)) >> (LEVEL_BITS + 4)


cdef inline int64_t epoch_length(int64_t n) noexcept nogil:
    # Evictions per epoch: half a cache turnover.
    return n // 2 if n >= 2 else 1


cdef inline uint32_t f_of(uint32_t u) noexcept nogil:
    # the frequency steps of a use count: 0 below 2, else its bit length
    return 0 if u < 2 else <uint32_t>(64 - __builtin_clzll(u))


cdef inline void one_step(const RegistryHeader *h, double *up, double *down) noexcept nogil:
    # Credit ticks gained by one step up and lost by one step down from the current level.
    cdef int64_t hi = h.adapt_level + h.adapt_step, lo = h.adapt_level - h.adapt_step
    if hi > h.adapt_level_max:
        hi = h.adapt_level_max
    if lo < 0:
        lo = 0
    up[0] = <double>credit_of(h.num_blocks, hi) - <double>h.adapt_credit
    down[0] = <double>h.adapt_credit - <double>credit_of(h.num_blocks, lo)


cdef inline void adapt_on_inactive_hit(RegistryHeader *h, uint64_t last_tick,
                                       uint32_t count) noexcept nogil:
    # A match or dedup acquired an inactive block with last tick `last_tick` and use count
    # `count`; the caller tested one in HIT_SAMPLE (h.tick % HIT_SAMPLE == 0, step > 0). Its margin
    # is taken at the current credit (its heap key may be older: reading it would cost a miss).
    cdef double up, down, m, f, phi
    cdef uint32_t steps = f_of(count)
    one_step(h, &up, &down)
    m = ((<double>last_tick - <double>h.adapt_frontier) + <double>h.adapt_credit * <double>steps) * 256.0
    f = <double>(256 * steps)
    phi = <double>h.adapt_phi
    if f < phi and m < up * (phi - f):
        h.adapt_loss_up += HIT_SAMPLE
    if f > phi and m < down * (f - phi):
        h.adapt_loss_down += HIT_SAMPLE


cdef inline void adapt_on_ghost_hit(RegistryHeader *h, uint32_t count, uint32_t evicted_at) noexcept nogil:
    # A new block registered under a ghost entry evicted with use count `count` (>= 1) when the
    # eviction clock's low 32 bits read `evicted_at`.
    cdef double up, down, dist, f, phi
    cdef uint32_t age = <uint32_t>h.adapt_evictions - evicted_at
    if count < 2:
        h.ghost_hits_once += 1
    else:
        h.ghost_hits_reused += 1
    if h.adapt_step == 0 or h.adapt_rate == 0:   # a fixed setting, or no advance known yet
        return
    one_step(h, &up, &down)
    dist = <double>age * <double>h.adapt_rate / <double>epoch_length(h.num_blocks) * 256.0
    f = <double>(256 * f_of(count))
    phi = <double>h.adapt_phi
    if f > phi and dist <= up * (f - phi):
        h.adapt_gain_up += 1
    if f < phi and dist <= down * (phi - f):
        h.adapt_gain_down += 1


cdef inline void adapt_on_victim(RegistryHeader *h, uint64_t key1, uint64_t key2,
                                 uint32_t count) noexcept nogil:
    # A victim left with heap key (key1, key2) and use count `count`; the clock ticks first (its
    # ghost entry records the new value).
    if key1 == (<uint64_t>1 << 32):       # priority 0, no registered child: the frontier's class
        if count < 2 and key2 > h.adapt_frontier:   # used once: key2 is its last tick
            h.adapt_frontier = key2
        h.adapt_fsum += f_of(count)
        h.adapt_fcount += 1


cdef inline int64_t next_move(int64_t move, int vote, int64_t step, int64_t growth) noexcept nogil:
    # The signed size of this epoch's move (Rprop's rule): a vote the same way as the last one
    # doubles the move (at most `growth` steps), a reversal halves it (at least one step);
    # move 0: no vote yet.
    cdef int64_t size = move if move >= 0 else -move
    if move == 0:                      # the first vote: one step
        size = step
    elif (move > 0) == (vote > 0):
        size = size * 2 if size * 2 <= growth * step else growth * step
    else:
        size = size // 2 if size // 2 >= step else step
    return size if vote > 0 else -size


cdef inline bint outside_band(const RegistryHeader *h, int64_t diff) noexcept nogil:
    # |diff| >= (band / 4) * sqrt(variance of the four counts), squared; doubles (the twin's order).
    # The variance has a floor of one tested hit's (HIT_SAMPLE**2): a loss count sampled one in
    # HIT_SAMPLE that reads 0 may still be HIT_SAMPLE, so a vote of a few events stays still.
    return 16.0 * <double>diff * <double>diff >= <double>h.adapt_band * <double>h.adapt_band * (
        <double>h.adapt_gain_up + <double>h.adapt_gain_down
        + <double>HIT_SAMPLE * (<double>h.adapt_loss_up + <double>h.adapt_loss_down
                                + <double>HIT_SAMPLE))


cdef inline void adapt_on_eviction(RegistryHeader *h) noexcept nogil:
    # After each eviction: at the end of an epoch, vote, move the level (a fixed setting, step 0,
    # never moves; no vote, no move) and start the next epoch's counts.
    cdef int64_t level, up, down
    cdef int vote = 0
    h.adapt_left -= 1
    if h.adapt_left > 0:
        return
    h.adapt_left = epoch_length(h.num_blocks)
    up = h.adapt_gain_up - h.adapt_loss_up
    down = h.adapt_gain_down - h.adapt_loss_down
    if up > 0 and up > down and outside_band(h, up - down):
        vote = 1
    elif down > 0 and down > up and outside_band(h, down - up):
        vote = -1
    h.adapt_gain_up = 0
    h.adapt_loss_up = 0
    h.adapt_gain_down = 0
    h.adapt_loss_down = 0
    if h.adapt_fcount > 0:
        h.adapt_phi = 256 * h.adapt_fsum // h.adapt_fcount
    h.adapt_fsum = 0
    h.adapt_fcount = 0
    if h.adapt_front0 > 0 and h.adapt_frontier > h.adapt_front0:   # else keep the last known
        h.adapt_rate = h.adapt_frontier - h.adapt_front0
    h.adapt_front0 = h.adapt_frontier
    if h.adapt_step == 0 or vote == 0:
        return
    h.adapt_move = next_move(h.adapt_move, vote, h.adapt_step, h.adapt_growth)
    level = h.adapt_level + h.adapt_move
    if level < 0:
        level = 0
    elif level > h.adapt_level_max:
        level = h.adapt_level_max
    h.adapt_level = level
    h.adapt_credit = credit_of(h.num_blocks, level)
