// Per-block checksums of the disk tier (G3): xxh3_64 of each block's bytes, computed by the worker
// before a block is written and after it is read back. One implementation for the CPU and CUDA
// builds (the blocks are host memory: G2 or its staging blocks). xxh3 comes from the vendored
// xxHash header, the code the `xxhash` Python package wraps (the test oracle).
#include "kvbm.h"
#include "errors.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

extern "C" int kvbm_checksum_blocks(const void *base, int64_t stride, const uint64_t *block_ptrs,
                                    int64_t count, int64_t bytes, uint64_t *out, char *errbuf,
                                    size_t errlen) {
    if (count < 0 || bytes < 0)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_checksum_blocks: count %lld, bytes %lld",
                          (long long)count, (long long)bytes);
    if (count == 0) return KVBM_OK;
    if (out == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_checksum_blocks: out is NULL");
    if (block_ptrs == nullptr) {
        if (base == nullptr)
            return kvbm::fail(errbuf, errlen, KVBM_EINVAL,
                              "kvbm_checksum_blocks: base and block_ptrs are both NULL");
        // The last block must end inside the address space: no wrap of base + (count-1)*stride + bytes.
        int64_t span = 0;
        if (stride < 0 || __builtin_mul_overflow(count - 1, stride, &span) ||
            __builtin_add_overflow(span, bytes, &span) ||
            uint64_t(uintptr_t(base)) > UINT64_MAX - uint64_t(span))
            return kvbm::fail(errbuf, errlen, KVBM_EINVAL,
                              "kvbm_checksum_blocks: %lld blocks x stride %lld from %p overflow",
                              (long long)count, (long long)stride, base);
    } else {
        for (int64_t i = 0; i < count; ++i)
            if (block_ptrs[i] == 0 && bytes > 0)
                return kvbm::fail(errbuf, errlen, KVBM_EINVAL,
                                  "kvbm_checksum_blocks: block %lld pointer is NULL", (long long)i);
    }
    const char *b = static_cast<const char *>(base);
    for (int64_t i = 0; i < count; ++i) {
        const void *p = block_ptrs != nullptr ? reinterpret_cast<const void *>(uintptr_t(block_ptrs[i]))
                                              : static_cast<const void *>(b + i * stride);
        out[i] = XXH3_64bits(p, size_t(bytes));
    }
    return KVBM_OK;
}
