# cython: language_level=3
"""ADAPTIVE's credit scale (kvbm.policy.EvictionPolicy.ADAPTIVE): inline helpers, no object, no GIL.
The twin is `_reference.py`'s `_credit_of` and `_f_of`; the tuner that moves the level is
_shadow.pxd; the design and its measurements: research/eviction/POLICY_ADAPTIVE.md.

  level     the credit weight W on a log scale, in the header (so it survives attach): W = 2 **
            (level / 2**16 - 4) blocks' worth of ticks per frequency step, level 0..9 * 2**16 (W =
            1/16..32); level -1 is W = 0 (plain recency). `credit_of` turns it into ticks, integers
            only (the twin computes the same numbers): 2**q * (1 + r/2**16) for level = 2**16 q + r,
            i.e. exact at whole octaves and linear in between.
  f         the frequency steps of a use count: 0 below 2, else its bit length.
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from *:
    int __builtin_clzll(unsigned long long x) noexcept nogil   # x != 0

cdef enum:
    LEVEL_BITS = 16        # levels per doubling of W: 2**16
    LEVEL_MAX = 589824     # 9 << 16: W = 32 (9 octaves above W = 1/16, level 0)


cdef inline uint64_t credit_of(int64_t n, int64_t level) noexcept nogil:
    # Ticks of credit per frequency step for N = n blocks at `level` (-1..LEVEL_MAX): N * W with
    # W = 2**(level / 2**16 - 4), linear between octaves. N < 2**31: N * 2**17 << 9 < 2**57.
    if level < 0:
        return 0
    return ((<uint64_t>n * <uint64_t>((1 << LEVEL_BITS) + (level & ((1 << LEVEL_BITS) - 1))))
            << <uint64_t>(level >> LEVEL_BITS)) >> (LEVEL_BITS + 4)


cdef inline uint32_t f_of(uint32_t u) noexcept nogil:
    # the frequency steps of a use count: 0 below 2, else its bit length
    return 0 if u < 2 else <uint32_t>(64 - __builtin_clzll(u))
