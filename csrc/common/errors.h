// Shared argument checks and error formatting for the CPU and CUDA copy paths: both validate the
// same layouts the same way, so a bad call fails with the same message whichever library runs it.
#pragma once
#include "kvbm.h"

#include <cstdarg>
#include <cstdio>

namespace kvbm {

inline int fail(char *errbuf, size_t errlen, int code, const char *fmt, ...) {
    if (errbuf != nullptr && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(errbuf, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

inline int check_layout(const kvbm_layout_t *lay, const char *which, char *errbuf, size_t errlen) {
    if (lay == nullptr || lay->layer_ptrs == nullptr)
        return fail(errbuf, errlen, KVBM_EINVAL, "%s layout is NULL", which);
    if (lay->num_layers <= 0 || lay->num_layers > KVBM_MAX_LAYERS)
        return fail(errbuf, errlen, KVBM_EINVAL, "%s layout: num_layers %d not in [1, %d]", which,
                    lay->num_layers, KVBM_MAX_LAYERS);
    if (lay->outer_dim <= 0)
        return fail(errbuf, errlen, KVBM_EINVAL, "%s layout: outer_dim %d must be >= 1", which,
                    lay->outer_dim);
    if (lay->region_bytes <= 0 || lay->block_stride < 0 || lay->outer_stride < 0 || lay->num_blocks < 0)
        return fail(errbuf, errlen, KVBM_EINVAL,
                    "%s layout: region_bytes %lld, block_stride %lld, outer_stride %lld, num_blocks %lld",
                    which, (long long)lay->region_bytes, (long long)lay->block_stride,
                    (long long)lay->outer_stride, (long long)lay->num_blocks);
    // The farthest byte a region of this layout reaches must be addressable: no int64 overflow in
    // the offset formula, no wrap past the end of the address space from any layer base.
    int64_t span = 0, part = 0;
    if (lay->num_blocks > 0 &&
        (__builtin_mul_overflow(lay->num_blocks - 1, lay->block_stride, &span) ||
         __builtin_mul_overflow(int64_t(lay->outer_dim - 1), lay->outer_stride, &part) ||
         __builtin_add_overflow(span, part, &span) ||
         __builtin_add_overflow(span, lay->region_bytes, &span)))
        return fail(errbuf, errlen, KVBM_EINVAL,
                    "%s layout: %lld blocks x stride %lld overflow a 64-bit offset", which,
                    (long long)lay->num_blocks, (long long)lay->block_stride);
    for (int32_t l = 0; l < lay->num_layers; ++l) {
        if (lay->layer_ptrs[l] == 0)
            return fail(errbuf, errlen, KVBM_EINVAL, "%s layout: layer %d pointer is NULL", which, l);
        if (lay->layer_ptrs[l] > UINT64_MAX - uint64_t(span))
            return fail(errbuf, errlen, KVBM_EINVAL, "%s layout: layer %d at %#llx plus %lld bytes wraps",
                        which, l, (unsigned long long)lay->layer_ptrs[l], (long long)span);
    }
    return KVBM_OK;
}

inline int check_blocks(const int64_t *blocks, int64_t n, int64_t limit, const char *which,
                        char *errbuf, size_t errlen) {
    for (int64_t i = 0; i < n; ++i)
        if (blocks[i] < 0 || blocks[i] >= limit)
            return fail(errbuf, errlen, KVBM_ERANGE, "%s block %lld (pair %lld) outside [0, %lld)",
                        which, (long long)blocks[i], (long long)i, (long long)limit);
    return KVBM_OK;
}

inline int check_copy_args(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                           const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                           char *errbuf, size_t errlen) {
    if (n < 0) return fail(errbuf, errlen, KVBM_EINVAL, "pair count %lld is negative", (long long)n);
    int rc = check_layout(src, "source", errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    rc = check_layout(dst, "destination", errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    if (src->num_layers != dst->num_layers || src->outer_dim != dst->outer_dim ||
        src->region_bytes != dst->region_bytes)
        return fail(errbuf, errlen, KVBM_EINVAL,
                    "layouts disagree: source %d layers x %d outer x %lld bytes, destination %d x %d x %lld",
                    src->num_layers, src->outer_dim, (long long)src->region_bytes, dst->num_layers,
                    dst->outer_dim, (long long)dst->region_bytes);
    if (n > 0 && (src_blocks == nullptr || dst_blocks == nullptr))
        return fail(errbuf, errlen, KVBM_EINVAL, "block index arrays are NULL");
    rc = check_blocks(src_blocks, n, src->num_blocks, "source", errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    return check_blocks(dst_blocks, n, dst->num_blocks, "destination", errbuf, errlen);
}

}  // namespace kvbm
