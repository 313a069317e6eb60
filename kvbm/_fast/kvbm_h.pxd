# The contract with csrc/include/kvbm.h: declarations only, mirrored field by field.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t


cdef extern from "kvbm.h" nogil:
    int KVBM_OK
    int KVBM_EINVAL
    int KVBM_ERANGE
    int KVBM_ECUDA
    int KVBM_ENOCUDA
    int KVBM_ENOMEM
    int KVBM_MAX_LAYERS
    int KVBM_COPY_AUTO
    int KVBM_COPY_KERNEL
    int KVBM_COPY_DMA
    int KVBM_COPY_DMA_LOOP
    int KVBM_COPY_STAGED
    int KVBM_LAYOUT_UVA_CHECKED

    ctypedef struct kvbm_layout_t:
        const uint64_t *layer_ptrs    # num_layers base addresses (host array)
        int32_t num_layers            # layers in the model
        int32_t outer_dim             # 2 for K/V, 1 for MLA
        int64_t num_blocks            # valid block ids are [0, num_blocks)
        int64_t block_stride          # bytes between block b and b+1 in a layer
        int64_t outer_stride          # bytes between outer o and o+1 in a layer
        int64_t region_bytes          # bytes of one (block, layer, outer) region
        int32_t flags                 # KVBM_LAYOUT_* (UVA_CHECKED: the kernel skips its per-call check)

    int kvbm_cpu_copy_blocks(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                             const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                             int num_threads, char *errbuf, size_t errlen)
    int kvbm_hash_blocks(const uint32_t *tokens, int64_t n_blocks, int64_t block_size,
                         uint64_t seed, int has_parent, uint64_t parent_seq_hash,
                         uint64_t *block_hashes, uint64_t *seq_hashes, char *errbuf, size_t errlen)
    uint64_t kvbm_xxh3_64(const void *data, size_t length, uint64_t seed)
    int kvbm_checksum_blocks(const void *base, int64_t stride, const uint64_t *block_ptrs,
                             int64_t count, int64_t nbytes, uint64_t *out, char *errbuf, size_t errlen)
    const char *kvbm_build_kind()
    int kvbm_cuda_available()
    int kvbm_cuda_copy_blocks(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                              const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                              int method, int max_sms, void *stream, char *errbuf, size_t errlen)
    int kvbm_cuda_copy_layers(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                              const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                              int max_sms, void *stream, void *const *layer_events, int32_t num_events,
                              char *errbuf, size_t errlen)
    int kvbm_cuda_check_uva(const kvbm_layout_t *lay, char *errbuf, size_t errlen)
    int kvbm_cuda_host_register(void *ptr, size_t nbytes, char *errbuf, size_t errlen)
    int kvbm_cuda_host_unregister(void *ptr, char *errbuf, size_t errlen)
    int kvbm_cuda_kernel_sms(int max_sms, char *errbuf, size_t errlen)
    int kvbm_cuda_pick_method(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                              const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                              void *stream, char *errbuf, size_t errlen)
