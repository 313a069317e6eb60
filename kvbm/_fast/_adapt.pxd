# cython: language_level=3
"""ADAPTIVE's online tuning of the frequency credit (kvbm.policy.EvictionPolicy.ADAPTIVE): inline
helpers over the registry header; no object, no GIL. The twin is `_reference.py`'s
`_credit_of` / `_adapt`; the design and its measurements: research/eviction/POLICY_ADAPTIVE.md.

Parts:
  level   the credit weight W on a log scale, in the header (so it survives attach): W = 2 **
          (level / 256 - 4) blocks' worth of ticks per frequency step, level 0..2304 (W = 1/16..32);
          level -1 is W = 0 (plain recency, a fixed setting only). `credit_of` turns it into ticks,
          integers only (the twin computes the same numbers): 2**q * (1 + r/256) for level =
          256 q + r, i.e. exact at whole octaves and linear in between.
  adapt   a registration that hits a ghost entry is a victim that came back. Evicted after one use:
          the credit pushed it out for reused blocks and was too high -> level - step. Evicted
          after two or more: the credit did not protect it enough -> level + step. Clamped to
          0..LEVEL_MAX. Keys already in the heap keep the credit they were computed with (no
          O(n) re-key); they meet the new one when they are next re-keyed (touch, release).
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t

from kvbm._fast._table cimport RegistryHeader

cdef enum:
    LEVEL_OCTAVE = 256     # levels per doubling of W
    LEVEL_MAX = 2304       # W = 32 (9 octaves above W = 1/16, level 0)


cdef inline uint64_t credit_of(int64_t n, int64_t level) noexcept nogil:
    # Ticks of credit per frequency step for N = n blocks at `level` (-1..LEVEL_MAX): N * W with
    # W = 2**(level/256 - 4), linear between octaves. N < 2**31, so N * 511 << 9 < 2**49.
    if level < 0:
        return 0
    return ((<uint64_t>n * <uint64_t>(LEVEL_OCTAVE + (level & (LEVEL_OCTAVE - 1))))
            << <uint64_t>(level >> 8)) >> 12


cdef inline void adapt_on_ghost_hit(RegistryHeader *h, uint32_t count) noexcept nogil:
    # A new block registered under a ghost entry evicted with use count `count` (>= 1).
    cdef int64_t level = h.adapt_level
    if count < 2:
        h.ghost_hits_once += 1
        level -= h.adapt_step
    else:
        h.ghost_hits_reused += 1
        level += h.adapt_step
    if h.adapt_step == 0:
        return
    if level < 0:
        level = 0
    elif level > LEVEL_MAX:
        level = LEVEL_MAX
    h.adapt_level = level
    h.adapt_credit = credit_of(h.num_blocks, level)
