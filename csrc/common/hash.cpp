// Block and sequence hashes (DESIGN.md "Hashing"), over whole token arrays in one call. xxh3 comes
// from the vendored xxHash header (BSD-2, csrc/third_party/xxhash), the same code the `xxhash`
// Python package wraps, which is our test oracle.
#include "kvbm.h"
#include "errors.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

#include <cstring>

namespace {

inline uint64_t chain(uint64_t parent, uint64_t block_hash, uint64_t seed) {
    unsigned char buf[16];
    // Little-endian on every platform we build for (x86-64, aarch64); memcpy keeps it explicit.
    static_assert(sizeof(uint64_t) == 8, "u64");
    std::memcpy(buf, &parent, 8);
    std::memcpy(buf + 8, &block_hash, 8);
    return XXH3_64bits_withSeed(buf, sizeof buf, seed);
}

}  // namespace

extern "C" uint64_t kvbm_xxh3_64(const void *data, size_t len, uint64_t seed) {
    return XXH3_64bits_withSeed(data, len, seed);
}

extern "C" int kvbm_hash_blocks(const uint32_t *tokens, int64_t n_blocks, int64_t block_size,
                                uint64_t seed, int has_parent, uint64_t parent_seq_hash,
                                uint64_t *block_hashes, uint64_t *seq_hashes, char *errbuf,
                                size_t errlen) {
    if (n_blocks < 0 || block_size <= 0)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "n_blocks %lld, block_size %lld",
                          (long long)n_blocks, (long long)block_size);
    if (n_blocks > 0 && tokens == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "tokens is NULL");
    uint64_t parent = parent_seq_hash;
    bool have_parent = has_parent != 0;
    const size_t bytes = size_t(block_size) * sizeof(uint32_t);
    for (int64_t i = 0; i < n_blocks; ++i) {
        const uint64_t bh = XXH3_64bits_withSeed(tokens + i * block_size, bytes, seed);
        const uint64_t sh = have_parent ? chain(parent, bh, seed) : bh;
        if (block_hashes != nullptr) block_hashes[i] = bh;
        if (seq_hashes != nullptr) seq_hashes[i] = sh;
        parent = sh;
        have_parent = true;
    }
    return KVBM_OK;
}
