/*
 * kvbm.h -- the one boundary between Python (kvbm/_fast) and the native library.
 *
 * Two builds export these symbols:
 *   - CUDA build: csrc/cuda/ (.cu files) implement kvbm_cuda_*; csrc/cpu/ (.cpp) the CPU copy;
 *     csrc/common/ (.cpp) hashing and block checksums, the same code in both builds.
 *   - CPU build (no nvcc, or KVBM_NO_CUDA=1): csrc/cpu/cuda_absent.cpp provides kvbm_cuda_* that
 *     answer "not built with CUDA", so the Cython module links the same way in both.
 *
 * Every call returns 0 on success or a negative KVBM_E* code and, when errbuf is not NULL, writes a
 * NUL-terminated message naming the failing call (and the CUDA error string) into it.
 *
 * Block regions. A KV layout is described by kvbm_layout_t: the address of region
 * (block b, layer l, outer o) is
 *     layer_ptrs[l] + b * block_stride + o * outer_stride
 * and every region is region_bytes long. This one formula covers
 *     FULLY_CONTIGUOUS [block][layer][outer][page*inner]: layer_ptrs[l] = base + l * layer_stride
 *     LAYER_SEPARATE outer-major  [outer][block][...] per layer (vLLM's [2, num_blocks, ...])
 *     LAYER_SEPARATE block-major  [block][outer][...] per layer
 * so a gather (offload) and a scatter (onboard) are the same call with src and dst swapped.
 */
#ifndef KVBM_H
#define KVBM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVBM_OK 0
#define KVBM_EINVAL (-1)   /* bad argument: counts, strides, null pointers */
#define KVBM_ERANGE (-2)   /* a block index outside the layout */
#define KVBM_ECUDA (-3)    /* a CUDA runtime call failed */
#define KVBM_ENOCUDA (-4)  /* built without CUDA, or no device */
#define KVBM_ENOMEM (-5)

#define KVBM_MAX_LAYERS 1024

typedef struct kvbm_layout {
    const uint64_t *layer_ptrs; /* num_layers base addresses (a host array) */
    int32_t num_layers;
    int32_t outer_dim;          /* 2 for K/V, 1 for MLA */
    int64_t num_blocks;         /* valid block indices are [0, num_blocks) */
    int64_t block_stride;       /* bytes between block b and b+1 inside a layer */
    int64_t outer_stride;       /* bytes between outer o and o+1 inside a layer */
    int64_t region_bytes;       /* bytes of one (block, layer, outer) region */
    int32_t flags;              /* KVBM_LAYOUT_*; 0 unless the caller knows better */
} kvbm_layout_t;

/* kvbm_layout_t.flags. UVA_CHECKED: kvbm_cuda_check_uva passed for these layer pointers and they
 * stay device or pinned memory while the layout is used, so the SM kernel's copies skip the
 * per-call check (cudaPointerGetAttributes per layer and side, most of a small copy's host time). */
#define KVBM_LAYOUT_UVA_CHECKED 1

/* Copy methods for the CUDA path (kvbm_cuda_copy_blocks). */
#define KVBM_COPY_AUTO 0     /* pick by the measured rule in csrc/cuda */
#define KVBM_COPY_KERNEL 1   /* SM kernel, UVA loads/stores of pinned host memory */
#define KVBM_COPY_DMA 2      /* copy engines: cudaMemcpyBatchAsync, or a cudaMemcpyAsync loop */
#define KVBM_COPY_DMA_LOOP 3 /* baseline: one cudaMemcpyAsync per region, nothing merged (bench) */
#define KVBM_COPY_STAGED 4   /* SM gather/scatter in device staging slots + one DMA per whole block;
                                needs one side whose blocks are contiguous (G2) */

/* ---- CPU (always built) ---- */

/* Copies region (src_blocks[i], l, o) of src to region (dst_blocks[i], l, o) of dst for every pair
 * i < n, every layer and outer index. Both layouts must agree on num_layers, outer_dim and
 * region_bytes. Runs on up to num_threads threads (0: hardware concurrency, capped at 16). Releases
 * nothing and allocates nothing but the threads. */
int kvbm_cpu_copy_blocks(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                         const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                         int num_threads, char *errbuf, size_t errlen);

/* Hashing (DESIGN.md): for a token array of n_blocks * block_size u32 tokens, writes
 *   block_hashes[i] = xxh3_64(tokens[i*bs : (i+1)*bs] as LE u32, seed)
 *   seq_hashes[0]   = parent_seq_hash == 0 && !has_parent ? block_hashes[0]
 *                     : xxh3_64(parent ‖ block_hashes[0] as LE u64, seed)
 *   seq_hashes[i]   = xxh3_64(seq_hashes[i-1] ‖ block_hashes[i] as LE u64, seed)
 * Either output may be NULL. */
int kvbm_hash_blocks(const uint32_t *tokens, int64_t n_blocks, int64_t block_size, uint64_t seed,
                     int has_parent, uint64_t parent_seq_hash, uint64_t *block_hashes,
                     uint64_t *seq_hashes, char *errbuf, size_t errlen);

/* xxh3_64 of arbitrary bytes (salt -> seed derivation). */
uint64_t kvbm_xxh3_64(const void *data, size_t len, uint64_t seed);

/* Per-block checksums (the disk tier's integrity check): out[i] = xxh3_64(block i, bytes), unseeded.
 * Block i starts at block_ptrs[i] when block_ptrs is not NULL (base is then ignored), else at
 * base + i * stride. The blocks are host memory. Single-threaded; allocates nothing. */
int kvbm_checksum_blocks(const void *base, int64_t stride, const uint64_t *block_ptrs, int64_t count,
                         int64_t bytes, uint64_t *out, char *errbuf, size_t errlen);

/* "cuda" or "cpu": which library this build linked. */
const char *kvbm_build_kind(void);

/* ---- CUDA (real in the CUDA build; KVBM_ENOCUDA in the CPU build) ---- */

/* 1 when this build has CUDA and a device is usable; 0 otherwise, never an error. */
int kvbm_cuda_available(void);

/* Same contract as kvbm_cpu_copy_blocks, on a CUDA stream (cudaStream_t passed as void*; NULL is the
 * legacy default stream). Pointers may be device memory, pinned host memory (UVA), or host memory
 * registered with kvbm_cuda_host_register. Asynchronous: returns once the work is enqueued; the
 * block index arrays are copied before it returns, so the caller may free them. */
int kvbm_cuda_copy_blocks(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                          const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                          int method, int max_sms, void *stream, char *errbuf, size_t errlen);

/* Details of kvbm_cuda_copy_blocks:
 *  - All layers, outer indices and pairs go in one kernel launch (KERNEL) or one batched DMA call
 *    (DMA); each needs the current device to be the one the stream and device pointers belong to.
 *  - KERNEL needs device or pinned (mapped) host memory on both sides; pageable host memory is
 *    refused with KVBM_EINVAL before anything is enqueued. DMA accepts any memory.
 *  - max_sms bounds the kernel's grid (one CTA per SM): 0 takes the default of 8.
 *  - Layer pointer and block id arrays are copied (into a pinned ring whose slots are reused only
 *    after the event behind their kernel fired), so the caller may free them on return.
 *  - STAGED (and AUTO when it picks it) allocates, on first use, 4 x 32 MiB of device staging and
 *    one internal stream per device and direction, kept for the life of the process.
 *  - AUTO: DMA when the average merged copy is >= 512 KiB, else KERNEL under 16 MiB in all, else
 *    STAGED when one side keeps whole blocks contiguous and a block is 256 KiB to 32 MiB, else
 *    KERNEL (measurements in csrc/cuda/copy.cu).
 *  - Argument errors (KVBM_EINVAL / KVBM_ERANGE) are reported before anything is enqueued. */

/* The SM kernel's copy (KVBM_COPY_KERNEL) with layer progress: one launch per layer, with
 * layer_events[l] (cudaEvent_t, created by the caller) recorded after layer l's; num_events must
 * equal the layouts' layer count. The block ids and layer pointers are staged once for all layers.
 * Odd layers run on a second stream of the library's, forked from `stream` and joined back into it
 * (so neighbouring layers overlap): events of the two streams may fire out of order, and layer l
 * has landed once events 0..l have all fired; the last event fires after every layer, on `stream`.
 * Errors as kvbm_cuda_copy_blocks's. */
int kvbm_cuda_copy_layers(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                          const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                          int max_sms, void *stream, void *const *layer_events, int32_t num_events,
                          char *errbuf, size_t errlen);

/* Checks that every layer pointer of `lay` is device or pinned host memory (what the SM kernel
 * dereferences); KVBM_OK, or KVBM_EINVAL naming the pageable layer. The caller may then set
 * KVBM_LAYOUT_UVA_CHECKED in lay->flags for as long as that memory stays as it is. */
int kvbm_cuda_check_uva(const kvbm_layout_t *lay, char *errbuf, size_t errlen);

/* Number of SMs (CTAs) the kernel uses for this max_sms on the current device (>0), or an error. */
int kvbm_cuda_kernel_sms(int max_sms, char *errbuf, size_t errlen);

/* The method AUTO would use for this copy on this stream (KVBM_COPY_KERNEL, _DMA or _STAGED),
 * or an error code. The rule and its measurements are in csrc/cuda/copy.cu. */
int kvbm_cuda_pick_method(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                          const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                          void *stream, char *errbuf, size_t errlen);

int kvbm_cuda_host_register(void *ptr, size_t bytes, char *errbuf, size_t errlen);
int kvbm_cuda_host_unregister(void *ptr, char *errbuf, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* KVBM_H */
