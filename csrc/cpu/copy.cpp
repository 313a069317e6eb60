// CPU twin of the block copy: the same region formula as the CUDA kernels (kvbm.h), run with
// memcpy on a few threads. Used for CPU mode (the "device" is a shared-memory tensor) and by the
// G2 <-> staging paths that never touch a GPU.
#include "kvbm.h"
#include "errors.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace {

inline char *region_ptr(const kvbm_layout_t *lay, int64_t block, int32_t layer, int32_t outer) {
    return reinterpret_cast<char *>(lay->layer_ptrs[layer]) + block * lay->block_stride +
           outer * lay->outer_stride;
}

// Each thread takes a contiguous share of the flattened (pair, layer, outer) index space, so
// neighbouring regions of one block stay on one thread and reads/writes stream.
void copy_range(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *src_blocks,
                const int64_t *dst_blocks, int64_t begin, int64_t end) {
    const int64_t per_pair = int64_t(src->num_layers) * src->outer_dim;
    for (int64_t r = begin; r < end; ++r) {
        const int64_t pair = r / per_pair;
        const int64_t rest = r % per_pair;
        const int32_t layer = int32_t(rest / src->outer_dim);
        const int32_t outer = int32_t(rest % src->outer_dim);
        std::memcpy(region_ptr(dst, dst_blocks[pair], layer, outer),
                    region_ptr(src, src_blocks[pair], layer, outer), size_t(src->region_bytes));
    }
}

}  // namespace

extern "C" int kvbm_cpu_copy_blocks(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                                    const int64_t *src_blocks, const int64_t *dst_blocks,
                                    int64_t n, int num_threads, char *errbuf, size_t errlen) {
    int rc = kvbm::check_copy_args(src, dst, src_blocks, dst_blocks, n, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    if (n == 0) return KVBM_OK;

    const int64_t regions = n * src->num_layers * src->outer_dim;
    const int64_t bytes = regions * src->region_bytes;
    int hw = int(std::thread::hardware_concurrency());
    if (num_threads <= 0) num_threads = std::min(std::max(hw, 1), 16);
    // Below ~4 MiB a thread start costs more than the copy it would share.
    const int64_t by_size = std::max<int64_t>(1, bytes / (4 << 20));
    const int threads = int(std::min<int64_t>({num_threads, by_size, regions}));
    if (threads <= 1) {
        copy_range(src, dst, src_blocks, dst_blocks, 0, regions);
        return KVBM_OK;
    }
    std::vector<std::thread> pool;
    pool.reserve(threads);
    try {
        for (int t = 0; t < threads; ++t) {
            const int64_t begin = regions * t / threads;
            const int64_t end = regions * (t + 1) / threads;
            pool.emplace_back(copy_range, src, dst, src_blocks, dst_blocks, begin, end);
        }
    } catch (const std::exception &err) {
        for (auto &th : pool) th.join();
        return kvbm::fail(errbuf, errlen, KVBM_ENOMEM, "kvbm_cpu_copy_blocks: thread start failed: %s",
                          err.what());
    }
    for (auto &th : pool) th.join();
    return KVBM_OK;
}
