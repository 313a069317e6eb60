# cython: language_level=3
"""ADAPTIVE's online tuning of the frequency credit (kvbm.policy.EvictionPolicy.ADAPTIVE): inline
helpers over the registry header; no object, no GIL. The twin is `_reference.py`'s `_credit_of`,
`_ghost_hit` and `_epoch_step`; the design and its measurements: research/eviction/POLICY_ADAPTIVE.md.

Parts:
  level   the credit weight W on a log scale, in the header (so it survives attach): W = 2 **
          (level / 2**16 - 4) blocks' worth of ticks per frequency step, level 0..9 * 2**16 (W =
          1/16..32); level -1 is W = 0 (plain recency, a fixed setting only). `credit_of` turns it
          into ticks, integers only (the twin computes the same numbers): 2**q * (1 + r/2**16) for
          level = 2**16 q + r, i.e. exact at whole octaves and linear in between.
  epoch   N/2 evictions. A registration that hits a ghost entry is a victim that came back: ho
          counts those evicted after one use (the credit pushed them out), hr those evicted after
          more (the credit did not keep them). At the end of an epoch, with O and R the live ghost
          entries of each kind, the vote: up if hr**k * O > ho**k * R, down if <, none if equal
          (no ghost hits). k = 1 is ARC's rule (equal return rates per ghost entry); k = 0
          compares the counts (ARC without its weights); k = 2 lies between (adapt_power;
          POLICY_ADAPTIVE.md says what it was fitted on). Both sides are products in double
          precision, in the same order in the twin, so the two agree exactly.
  move    Rprop: the level moves by the vote, one step the first time, doubled while the votes
          agree (up to MOVE_GROWTH steps), halved when they turn (down to one step): a long way
          takes a few epochs and a noisy optimum is held within a step or two. Clamped to
          0..LEVEL_MAX. O(1) per eviction and per ghost hit.
  sweep   keys already in the heap keep the credit they were computed with (no O(n) re-key at a
          move); instead each eviction refreshes the key of one block, in block id order
          (registry.pyx `_evict_one`, O(log n)), so no key is more than N evictions old.
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t

from kvbm._fast._table cimport RegistryHeader

cdef enum:
    LEVEL_BITS = 16        # levels per doubling of W: 2**16
    LEVEL_MAX = 589824     # 9 << 16: W = 32 (9 octaves above W = 1/16, level 0)
    POWER_MAX = 4          # largest adapt_power accepted
    MOVE_GROWTH = 8        # the move grows to at most 8 steps


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


cdef inline void adapt_on_ghost_hit(RegistryHeader *h, uint32_t count) noexcept nogil:
    # A new block registered under a ghost entry evicted with use count `count` (>= 1).
    if count < 2:
        h.adapt_once += 1
        h.ghost_hits_once += 1
    else:
        h.adapt_reused += 1
        h.ghost_hits_reused += 1


cdef inline int epoch_vote(uint64_t hr, uint64_t ho, int64_t once, int64_t reused,
                           int64_t power) noexcept nogil:
    # +1: raise the level, -1: lower it, 0: keep it (the module docstring's test).
    cdef double a, b
    cdef int64_t i
    if power == 0:
        return (hr > ho) - (hr < ho)
    a = <double>once
    b = <double>reused
    for i in range(power):
        a = a * <double>hr
        b = b * <double>ho
    return (a > b) - (a < b)


cdef inline int64_t next_move(int64_t move, int vote, int64_t step) noexcept nogil:
    # The signed size of this epoch's move (Rprop's rule): a vote the same way as the last one
    # doubles the move (at most MOVE_GROWTH steps), a reversal halves it (at least one step);
    # move 0: no vote yet.
    cdef int64_t size = move if move >= 0 else -move
    if move == 0:                      # the first vote: one step
        size = step
    elif (move > 0) == (vote > 0):
        size = size * 2 if size * 2 <= MOVE_GROWTH * step else MOVE_GROWTH * step
    else:
        size = size // 2 if size // 2 >= step else step
    return size if vote > 0 else -size


cdef inline void adapt_on_eviction(RegistryHeader *h) noexcept nogil:
    # After each eviction: at the end of an epoch, move the level by the epoch's vote (a fixed
    # setting, step 0, never moves; no vote, no move) and start counting again.
    cdef int64_t level
    cdef int vote
    h.adapt_left -= 1
    if h.adapt_left > 0:
        return
    h.adapt_left = epoch_length(h.num_blocks)
    vote = epoch_vote(h.adapt_reused, h.adapt_once, h.ghost_once, h.ghost_size - h.ghost_once,
                      h.adapt_power)
    h.adapt_once = 0
    h.adapt_reused = 0
    if h.adapt_step == 0 or vote == 0:
        return
    h.adapt_move = next_move(h.adapt_move, vote, h.adapt_step)
    level = h.adapt_level + h.adapt_move
    if level < 0:
        level = 0
    elif level > LEVEL_MAX:
        level = LEVEL_MAX
    h.adapt_level = level
    h.adapt_credit = credit_of(h.num_blocks, level)
