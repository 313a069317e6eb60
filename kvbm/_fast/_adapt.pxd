# cython: language_level=3
"""ADAPTIVE's online tuning of the frequency credit (kvbm.policy.EvictionPolicy.ADAPTIVE): inline
helpers over the registry header; no object, no GIL. The twin is `_reference.py`'s
`_credit_of` / `_adapt`; the design and its measurements: research/eviction/POLICY_ADAPTIVE.md.

Parts:
  level   the credit weight W on a log scale, in the header (so it survives attach): W = 2 **
          (level / 2**16 - 4) blocks' worth of ticks per frequency step, level 0..9 * 2**16 (W =
          1/16..32); level -1 is W = 0 (plain recency, a fixed setting only). `credit_of` turns it
          into ticks, integers only (the twin computes the same numbers): 2**q * (1 + r/2**16) for
          level = 2**16 q + r, i.e. exact at whole octaves and linear in between.
  adapt   a registration that hits a ghost entry is a victim that came back. Evicted after one use:
          the credit pushed it out for reused blocks and was too high -> level - step * max(R/O,
          1). Evicted after two or more: the credit did not protect it enough -> level + step *
          max(O/R, 1) (integer division of step * max(O, R)), where O and R are the live ghost entries of each kind (ARC's weighting: the
          level settles where both kinds of victims come back at the same rate per entry, the
          marginal condition). Clamped to 0..LEVEL_MAX. Keys already in the heap keep the credit they were computed with (no
          O(n) re-key); they meet the new one when they are next re-keyed (touch, release).
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t

from kvbm._fast._table cimport RegistryHeader

cdef enum:
    LEVEL_BITS = 16        # levels per doubling of W: 2**16, fine enough for small steps
    LEVEL_MAX = 589824     # 9 << 16: W = 32 (9 octaves above W = 1/16, level 0)


cdef inline uint64_t credit_of(int64_t n, int64_t level) noexcept nogil:
    # Ticks of credit per frequency step for N = n blocks at `level` (-1..LEVEL_MAX): N * W with
    # W = 2**(level / 2**16 - 4), linear between octaves. N < 2**31: N * 2**17 << 9 < 2**57.
    if level < 0:
        return 0
    return ((<uint64_t>n * <uint64_t>((1 << LEVEL_BITS) + (level & ((1 << LEVEL_BITS) - 1))))
            << <uint64_t>(level >> LEVEL_BITS)) >> (LEVEL_BITS + 4)


cdef inline void adapt_on_ghost_hit(RegistryHeader *h, uint32_t count) noexcept nogil:
    # A new block registered under a live ghost entry evicted with use count `count` (>= 1); the
    # entry is still counted in ghost_size / ghost_once. As ARC, the step grows with the other
    # class's share of the table, so that the level settles where the two classes' victims come
    # back at the same rate per ghost entry, not in the same numbers.
    cdef int64_t once = h.ghost_once, reused = h.ghost_size - h.ghost_once, level = h.adapt_level
    cdef int64_t delta
    if count < 2:
        h.ghost_hits_once += 1
        delta = -(h.adapt_step * (reused if reused > once else once) // once)
    else:
        h.ghost_hits_reused += 1
        delta = h.adapt_step * (once if once > reused else reused) // reused
    if h.adapt_step == 0:
        return
    if delta > LEVEL_MAX:
        delta = LEVEL_MAX
    elif delta < -LEVEL_MAX:
        delta = -LEVEL_MAX
    level += delta
    if level < 0:
        level = 0
    elif level > LEVEL_MAX:
        level = LEVEL_MAX
    h.adapt_level = level
    h.adapt_credit = credit_of(h.num_blocks, level)
