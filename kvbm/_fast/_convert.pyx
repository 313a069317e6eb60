# cython: language_level=3
"""Input conversion at the edge of kvbm/_fast; the contract is _convert.pxd.

Every function takes `what` (the argument's name, which the message starts with) and `err` (the
KvbmError subclass to raise). An empty input converts to an empty array of the target dtype,
whatever its own dtype (numpy makes `[]` float64)."""
from libc.stdint cimport int64_t

import numpy as np


cdef object as_array(x, str what, type err):
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise err(f"{what}: cannot convert to an array ({e})") from e
    if arr.ndim != 1:
        raise err(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not isinstance(x, np.ndarray):
        # numpy turns a list mixing ints >= 2**63 and smaller ones into float64 (lossy); keep
        # the Python ints and let the caller check them one by one.
        arr = np.array(x, dtype=object)
    return arr


cdef object as_i64(x, str what, type err):
    arr = as_array(x, what, err)
    if arr.shape[0] == 0:
        return np.empty(0, np.int64)
    kind = arr.dtype.kind
    if kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > 0x7FFFFFFFFFFFFFFF:
        raise err(f"{what}: value {int(arr.max())} does not fit int64")
    if kind != "i" and kind != "u":
        raise err(f"{what} must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


cdef object as_u64(x, str what, type err):
    arr = as_array(x, what, err)
    if arr.shape[0] == 0:
        return np.empty(0, np.uint64)
    kind = arr.dtype.kind
    if kind == "u":
        return np.ascontiguousarray(arr, dtype=np.uint64)
    if kind == "i":
        lo = int(arr.min())
        if lo < 0:
            raise err(f"{what}: value {lo} is negative, hashes are uint64")
        return np.ascontiguousarray(arr, dtype=np.uint64)
    if kind == "O":
        values = arr.tolist()
        for v in values:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise err(f"{what}: {v!r} is not an integer")
        try:
            return np.array(values, dtype=np.uint64)
        except (TypeError, ValueError, OverflowError) as e:
            raise err(f"{what}: not all values are uint64 ({e})") from e
    raise err(f"{what} must be uint64 integers, got dtype {arr.dtype}")


cdef object as_i32(x, str what, type err):
    arr = as_array(x, what, err)
    if arr.shape[0] == 0:
        return np.empty(0, np.int32)
    if arr.dtype.kind != "i" and arr.dtype.kind != "u":
        raise err(f"{what} must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < -2147483648 or hi > 2147483647:
        raise err(f"{what}: values [{lo}, {hi}] do not fit int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


cdef object as_mask(x, str what, type err):
    arr = as_array(x, what, err)
    if arr.shape[0] == 0:
        return np.empty(0, np.uint8)
    if arr.dtype.kind != "b":
        raise err(f"{what} must be bool, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


cdef int64_t as_count(n, str what, type err) except -1:
    try:
        v = n.__index__()
    except AttributeError as e:
        raise err(f"{what} must be an integer, got {type(n).__name__}") from e
    if v < 0:
        raise err(f"{what} must be >= 0, got {v}")
    if v > 0x7FFFFFFFFFFFFFFF:
        raise err(f"{what} = {v} is too large")
    return v
