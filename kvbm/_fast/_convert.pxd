# cython: language_level=3
"""Input conversion at the edge of kvbm/_fast (registry.pyx, native.pyx): Python sequences and
numpy arrays to C-contiguous 1-D arrays of one dtype, and counts to int64, raising `err` (the
caller's KvbmError subclass) with the offending value. Called once per batch, never per block."""
from libc.stdint cimport int64_t

cdef object as_array(x, str what, type err)            # any 1-D array (lossless for big ints)
cdef object as_i64(x, str what, type err)              # integers -> int64
cdef object as_u64(x, str what, type err)              # non-negative integers -> uint64 (hashes)
cdef object as_i32(x, str what, type err)              # integers in int32 range -> int32
cdef object as_mask(x, str what, type err)             # bools -> uint8
cdef int64_t as_count(n, str what, type err) except -1  # an index()-able int in [0, 2**63)
