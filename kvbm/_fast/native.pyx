# cython: language_level=3
"""Thin, validated wrappers over csrc/include/kvbm.h: block copies (CPU and CUDA), hashing and
block checksums.

Each wrapper checks its arguments at the edge (typed memoryviews, equal lengths), drops the GIL for
the native call, and turns a non-zero return code into a KvbmError subclass through `_check_rc`,
the one place that maps codes to exceptions (pyzmq's `_check_rc`). CopyMethod names kvbm.h's
KVBM_COPY_* values; nothing else in Python spells them. Block lists and token
arrays are converted by kvbm._fast._convert, as the registry's inputs are.
"""
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libcpp.vector cimport vector

from kvbm._fast._convert cimport as_array, as_i64, as_u64
from kvbm._fast.kvbm_h cimport (
    KVBM_COPY_AUTO, KVBM_COPY_DMA, KVBM_COPY_DMA_LOOP, KVBM_COPY_KERNEL, KVBM_COPY_STAGED, KVBM_LAYOUT_UVA_CHECKED,
    KVBM_ECUDA, KVBM_EINVAL, KVBM_ENOCUDA, KVBM_ERANGE, kvbm_build_kind, kvbm_cpu_copy_blocks,
    kvbm_cuda_available, kvbm_cuda_check_uva, kvbm_cuda_copy_blocks, kvbm_cuda_copy_layers,
    kvbm_cuda_host_register, kvbm_cuda_host_unregister,
    kvbm_cuda_kernel_sms, kvbm_cuda_pick_method, kvbm_checksum_blocks, kvbm_hash_blocks, kvbm_layout_t,
    kvbm_xxh3_64,
)

from enum import IntEnum

import numpy as np

from kvbm.errors import CudaError, KvbmError, LayoutError

cdef enum:
    ERRLEN = 512


class CopyMethod(IntEnum):
    """How kvbm_cuda_copy_blocks moves the bytes: kvbm.h's KVBM_COPY_* values, named once here."""
    AUTO = KVBM_COPY_AUTO          # the measured rule in csrc/cuda/copy.cu picks KERNEL, DMA or STAGED
    KERNEL = KVBM_COPY_KERNEL      # SM kernel (at most max_sms SMs), UVA access to pinned host memory
    DMA = KVBM_COPY_DMA            # copy engines: one batched DMA call over the merged regions
    DMA_LOOP = KVBM_COPY_DMA_LOOP  # baseline: one cudaMemcpyAsync per region (bench only)
    STAGED = KVBM_COPY_STAGED      # SM gather/scatter in device staging + one DMA per whole G2 block


cdef int _check_rc(int rc, const char *errbuf) except -1:
    if rc == 0:
        return 0
    msg = errbuf.decode("utf-8", "replace")
    if rc == KVBM_ECUDA or rc == KVBM_ENOCUDA:
        raise CudaError(msg)
    if rc == KVBM_EINVAL or rc == KVBM_ERANGE:
        raise LayoutError(msg)
    raise KvbmError(f"native error {rc}: {msg}")


def build_kind() -> str:
    """'cuda' or 'cpu': the library this extension was linked with."""
    return kvbm_build_kind().decode()


def cuda_available() -> bool:
    """True when built with CUDA and a device answers; never raises."""
    return kvbm_cuda_available() == 1


cdef class RegionLayout:
    """A kvbm_layout_t with the layer pointer array it points into kept alive beside it."""

    cdef kvbm_layout_t c
    cdef uint64_t[::1] _ptrs
    cdef readonly object layer_ptrs

    def __init__(self, layer_ptrs, int outer_dim, int64_t num_blocks, int64_t block_stride,
                 int64_t outer_stride, int64_t region_bytes):
        # Our own copy, shown read-only: the pointers are what vouch_uva checked, never changed after.
        arr = np.array(layer_ptrs, dtype=np.uint64, copy=True, order="C")
        if arr.ndim != 1 or arr.shape[0] == 0:
            raise LayoutError(f"layer_ptrs must be a non-empty 1-D array, got shape {arr.shape}")
        self._ptrs = arr
        view = arr.view()
        view.flags.writeable = False
        self.layer_ptrs = view
        self.c.layer_ptrs = &self._ptrs[0]
        self.c.num_layers = <int>arr.shape[0]
        self.c.outer_dim = outer_dim
        self.c.num_blocks = num_blocks
        self.c.block_stride = block_stride
        self.c.outer_stride = outer_stride
        self.c.region_bytes = region_bytes
        self.c.flags = 0

    def vouch_uva(self) -> None:
        """CUDA: checks once that every layer pointer is device or pinned memory, so that the SM
        kernel's copies over this layout skip that check on every call (most of a small copy's
        host time: a pointer lookup per layer and side). The owner keeps the memory as it is for
        the layout's life (a Copier's registered buffers). LayoutError names a pageable layer."""
        cdef char errbuf[ERRLEN]
        cdef int rc
        errbuf[0] = 0
        with nogil:
            rc = kvbm_cuda_check_uva(&self.c, errbuf, ERRLEN)
        _check_rc(rc, errbuf)
        self.c.flags |= KVBM_LAYOUT_UVA_CHECKED

    @property
    def uva_checked(self) -> bool:
        return bool(self.c.flags & KVBM_LAYOUT_UVA_CHECKED)

    @property
    def num_layers(self) -> int:
        return self.c.num_layers

    @property
    def outer_dim(self) -> int:
        return self.c.outer_dim

    @property
    def num_blocks(self) -> int:
        return self.c.num_blocks

    @property
    def region_bytes(self) -> int:
        return self.c.region_bytes

    def region_address(self, int64_t block, int layer, int outer) -> int:
        """Address of region (block, layer, outer), by the formula in kvbm.h."""
        if not (0 <= block < self.c.num_blocks and 0 <= layer < self.c.num_layers
                and 0 <= outer < self.c.outer_dim):
            raise LayoutError(f"region ({block}, {layer}, {outer}) outside {self.c.num_blocks} blocks "
                              f"x {self.c.num_layers} layers x {self.c.outer_dim} outer")
        return int(self._ptrs[layer]) + block * self.c.block_stride + outer * self.c.outer_stride


cdef tuple _pairs(src_blocks, dst_blocks):
    s = as_i64(src_blocks, "src_blocks", LayoutError)
    d = as_i64(dst_blocks, "dst_blocks", LayoutError)
    if s.shape[0] != d.shape[0]:
        raise LayoutError(f"block lists must be 1-D and equally long, got {s.shape} and {d.shape}")
    return s, d


def copy_blocks_cpu(RegionLayout src, RegionLayout dst, src_blocks, dst_blocks, int num_threads=0):
    """Copies every (layer, outer) region of src_blocks[i] to dst_blocks[i]; memcpy on threads."""
    s, d = _pairs(src_blocks, dst_blocks)
    cdef const int64_t[::1] sv = s
    cdef const int64_t[::1] dv = d
    cdef int64_t n = s.shape[0]
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    if n == 0:
        return
    with nogil:
        rc = kvbm_cpu_copy_blocks(&src.c, &dst.c, &sv[0], &dv[0], n, num_threads, errbuf, ERRLEN)
    _check_rc(rc, errbuf)


def copy_blocks_cuda(RegionLayout src, RegionLayout dst, src_blocks, dst_blocks,
                     int method=KVBM_COPY_AUTO, int max_sms=0, size_t stream=0):
    """Enqueues the same copy on a CUDA stream (a cudaStream_t as an integer; 0 = default).

    method: a CopyMethod; max_sms bounds the SM kernel (0 = 8). Returns once enqueued; the block
    lists may be dropped at once. Bad layouts, block ids or methods raise LayoutError before
    anything is enqueued; CUDA failures raise CudaError naming the call.
    """
    s, d = _pairs(src_blocks, dst_blocks)
    cdef const int64_t[::1] sv = s
    cdef const int64_t[::1] dv = d
    cdef int64_t n = s.shape[0]
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    if n == 0:
        return
    with nogil:
        rc = kvbm_cuda_copy_blocks(&src.c, &dst.c, &sv[0], &dv[0], n, method, max_sms,
                                   <void *>stream, errbuf, ERRLEN)
    _check_rc(rc, errbuf)


def copy_layers_cuda(RegionLayout src, RegionLayout dst, src_blocks, dst_blocks, events,
                     int max_sms=0, size_t stream=0):
    """The SM kernel's copy with layer progress: one launch per layer, with events[l] (a created
    cudaEvent_t as an integer) recorded after layer l's. Odd layers run on a second stream forked
    from `stream` and joined back (kvbm.h): layer l has landed once events 0..l have all fired.
    Block ids and layer pointers are staged once for every layer. Errors as copy_blocks_cuda's."""
    s, d = _pairs(src_blocks, dst_blocks)
    cdef const int64_t[::1] sv = s
    cdef const int64_t[::1] dv = d
    cdef int64_t n = s.shape[0]
    cdef char errbuf[ERRLEN]
    cdef int rc
    cdef Py_ssize_t i
    cdef int32_t count = len(events)
    cdef vector[void *] handles
    for i in range(count):
        handles.push_back(<void *><size_t>events[i])
    errbuf[0] = 0
    if n == 0:
        return
    with nogil:
        rc = kvbm_cuda_copy_layers(&src.c, &dst.c, &sv[0], &dv[0], n, max_sms, <void *>stream,
                                   handles.data() if count else NULL, count, errbuf, ERRLEN)
    _check_rc(rc, errbuf)


def cuda_kernel_sms(int max_sms=0) -> int:
    """SMs (one CTA each) the copy kernel runs on for this max_sms, on the current device."""
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    with nogil:
        rc = kvbm_cuda_kernel_sms(max_sms, errbuf, ERRLEN)
    if rc < 0:
        _check_rc(rc, errbuf)
    return rc


def cuda_pick_method(RegionLayout src, RegionLayout dst, src_blocks, dst_blocks,
                     size_t stream=0) -> int:
    """CopyMethod.KERNEL, DMA or STAGED: what AUTO would do for this copy (rule in csrc/cuda/copy.cu)."""
    s, d = _pairs(src_blocks, dst_blocks)
    cdef const int64_t[::1] sv = s
    cdef const int64_t[::1] dv = d
    cdef int64_t n = s.shape[0]
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    if n == 0:
        return CopyMethod.KERNEL
    with nogil:
        rc = kvbm_cuda_pick_method(&src.c, &dst.c, &sv[0], &dv[0], n, <void *>stream, errbuf,
                                   ERRLEN)
    if rc < 0:
        _check_rc(rc, errbuf)
    return CopyMethod(rc)


def cuda_host_register(size_t ptr, size_t nbytes):
    """Pins (page-locks) host memory already mapped at ptr, for DMA and UVA kernel access."""
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    with nogil:
        rc = kvbm_cuda_host_register(<void *>ptr, nbytes, errbuf, ERRLEN)
    _check_rc(rc, errbuf)


def cuda_host_unregister(size_t ptr):
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    with nogil:
        rc = kvbm_cuda_host_unregister(<void *>ptr, errbuf, ERRLEN)
    _check_rc(rc, errbuf)


def hash_blocks(tokens, int64_t block_size, uint64_t seed, parent=None):
    """(block_hashes, sequence_hashes) for the full blocks of a 1-D uint32 token array.

    A trailing partial block is not hashed: it has no identity until it is complete.
    """
    if block_size <= 0:
        raise KvbmError(f"block_size must be >= 1, got {block_size}")
    arr = as_array(tokens, "tokens", KvbmError)
    if arr.dtype != np.uint32:
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise KvbmError(f"tokens must be integers in [0, 2**32), got dtype {arr.dtype}")
        arr = arr.astype(np.uint32)
    arr = np.ascontiguousarray(arr, dtype="<u4")
    cdef int64_t n_blocks = arr.shape[0] // block_size
    bh = np.empty(n_blocks, dtype=np.uint64)
    sh = np.empty(n_blocks, dtype=np.uint64)
    if n_blocks == 0:
        return bh, sh
    cdef const uint32_t[::1] tv = arr
    cdef uint64_t[::1] bv = bh
    cdef uint64_t[::1] shv = sh
    cdef int has_parent = 0 if parent is None else 1
    cdef uint64_t parent_hash = 0 if parent is None else <uint64_t>parent
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    with nogil:
        rc = kvbm_hash_blocks(&tv[0], n_blocks, block_size, seed, has_parent, parent_hash,
                              &bv[0], &shv[0], errbuf, ERRLEN)
    _check_rc(rc, errbuf)
    return bh, sh


def xxh3_64(data: bytes, uint64_t seed=0) -> int:
    cdef const unsigned char[::1] view = data
    if len(data) == 0:
        return kvbm_xxh3_64(NULL, 0, seed)
    return kvbm_xxh3_64(&view[0], len(data), seed)


def checksum_blocks(addrs, int64_t nbytes, size_t region_base, size_t region_bytes):
    """xxh3_64 of the `nbytes` bytes at each address of `addrs` (1-D, absolute addresses), as uint64.

    Every block must lie inside the mapped region [region_base, region_base + region_bytes): the
    addresses are checked against it before the native loop runs without the GIL.
    """
    if nbytes <= 0:
        raise LayoutError(f"checksum_blocks: nbytes must be >= 1, got {nbytes}")
    a = as_u64(addrs, "addrs", LayoutError)
    cdef int64_t n = a.shape[0]
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    if region_base == 0 or region_bytes < <size_t>nbytes:
        raise LayoutError(f"checksum_blocks: region at {region_base:#x} of {region_bytes} bytes "
                          f"cannot hold a {nbytes}-byte block")
    cdef uint64_t last = region_base + region_bytes - <size_t>nbytes
    bad = np.flatnonzero((a < region_base) | (a > last))
    if bad.size:
        i = int(bad[0])
        raise LayoutError(f"checksum_blocks: block {i} at {int(a[i]):#x} (+{nbytes} bytes) outside the "
                          f"region [{region_base:#x}, {region_base + region_bytes:#x}); "
                          f"{bad.size} of {n} blocks outside")
    cdef const uint64_t[::1] av = a
    cdef uint64_t[::1] ov = out
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    with nogil:
        rc = kvbm_checksum_blocks(NULL, 0, &av[0], n, nbytes, &ov[0], errbuf, ERRLEN)
    _check_rc(rc, errbuf)
    return out


def checksum_buffer(buf, int64_t nbytes, int64_t stride=0):
    """xxh3_64 of consecutive blocks of a contiguous buffer (bytes, numpy array, memoryview): block i
    is bytes [i*stride, i*stride + nbytes), stride defaulting to nbytes; as many blocks as fit."""
    if nbytes <= 0 or stride < 0:
        raise LayoutError(f"checksum_buffer: nbytes {nbytes}, stride {stride}: need nbytes >= 1, stride >= 0")
    if stride == 0:
        stride = nbytes
    mv = memoryview(buf)
    cdef int64_t size = mv.nbytes
    cdef int64_t n = 0 if size < nbytes else (size - nbytes) // stride + 1
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    cdef const unsigned char[::1] view = mv.cast("B")
    cdef uint64_t[::1] ov = out
    cdef char errbuf[ERRLEN]
    cdef int rc
    errbuf[0] = 0
    with nogil:
        rc = kvbm_checksum_blocks(&view[0], stride, NULL, n, nbytes, &ov[0], errbuf, ERRLEN)
    _check_rc(rc, errbuf)
    return out
