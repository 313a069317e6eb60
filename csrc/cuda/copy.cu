// kvbm_cuda_copy_blocks: G1 <-> G2 block transfers on a CUDA stream, three ways.
//
// Parts
//   copy_regions<V>   SM kernel. A few persistent CTAs (one per SM, at most max_sms, default 8) whose
//                     warps stride over work items (pair, layer, outer, 4 KiB chunk); each lane keeps
//                     kUnroll independent V-wide loads in flight, then stores them. Host memory is
//                     pinned and reached through UVA, so one kernel gathers (offload) or scatters
//                     (onboard) every layer of every block in one launch. V is 16 bytes unless a
//                     pointer, a stride or the region size forbids it (then 8, 4, 1).
//   MetaRing          Pinned host ring + device mirror for the kernel's metadata (layer pointers and
//                     block ids). The call copies the caller's arrays into the ring and a small staging
//                     kernel (stage_meta, UVA reads, no copy engine) moves them to the device mirror
//                     ahead of the copy kernel, so the caller may free its arrays on return.
//                     A slot is reused only after the event recorded behind its kernel has fired.
//   DMA               Copy engines, no SMs: one cudaMemcpyBatchAsync (CUDA >= 12.8; CUDA 13's
//                     signature) over the region list, or a cudaMemcpyAsync loop on the legacy
//                     stream (which the batch call refuses). Adjacent regions that are contiguous on
//                     both sides are merged into one copy first.
//   Stager            STAGED: the kernel gathers a few blocks into a device slot (or scatters them
//                     out of one) on an internal stream while the copy engines move whole G2 blocks
//                     of the previous slot; events order the two streams and the caller's stream.
//   pick_method       The AUTO rule (numbers below, from bench/bench_transfer.py).
//
// Order of a call: check the arguments (errors.h, same messages as the CPU twin) -> AUTO picks a way
// -> the kernel path checks that both sides are device or pinned memory (a pageable pointer would
// fault inside the kernel and lose the whole CUDA context), stages metadata, launches, checks
// cudaGetLastError, records the ring event; the DMA path builds and merges the region list and
// enqueues it. Nothing waits for the copy: ordering against other work is the caller's (events).
#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda_check.cuh"

namespace {

constexpr int kThreads = 512;       // 16 warps per CTA
constexpr int kUnroll = 8;          // independent loads in flight per lane
constexpr int kDefaultMaxSms = 8;   // the kernel's SM budget when the caller passes 0
constexpr int kMaxDevices = 64;

// ---- AUTO rule ------------------------------------------------------------------------------
// Measured by bench/bench_transfer.py on one H100 80GB HBM3 (PCIe Gen5 x16, driver 580.159.04,
// CUDA 13.0), 32 layers x 2 outer, scattered blocks, engine layer-separate outer-major <-> G2 fully
// contiguous, 2026-11-28 (bench/RESULTS.md, "Transfer"). GB/s D2H / H2D / both at once; the bulk
// pinned copy_ roofline was 54.6 / 54.6 / 88.4 in the same run:
//   region  kernel@8 SMs        dma (batched)       staged (8 SMs + DMA)
//   16K     52.2 / 50.8 / 74.4  26.2 /  9.0 / 14.2  53.3 / 53.7 / 81.1
//   64K     51.8 / 50.7 / 74.3  43.0 / 39.8 / 59.7  53.3 / 52.7 / 82.0
//   128K    52.2 / 50.7 / 74.5  46.7 / 45.1 / 61.0  53.3 / 53.4 / 78.5
//   256K    52.1 / 50.7 / 74.7  50.0 / 49.9 / 78.3  (16 MiB blocks > the 8 MiB slot of that run)
//   512K    52.2 / 50.7 / 74.7  52.5 / 52.2 / 81.0
//   1M      52.4 / 50.8 / 74.8  53.5 / 53.5 / 87.0
//   2M      52.2 / 50.7 / 75.0  54.4 / 53.8 / 87.5
// The SM kernel is flat at ~52 / ~51 / ~75 from 2 to 16 SMs and any region size: what SM (and
// bulk-copy/TMA, also tried) traffic gets out of PCIe, short of the copy engines' larger requests,
// most of all with both directions at once. The copy engines pay ~1-2.5 us per copy, so they
// reach the roofline only with copies of >= 512 KiB. Hence:
//   1. average copy (after merging) >= kDmaMinOpBytes -> DMA (no SMs at all);
//   2. else, when G2's blocks are contiguous, fit a staging slot and are >= kStagedMinBlockBytes
//      -> STAGED: the scattered part runs at device-memory speed on <= 8 SMs, the PCIe part is
//      whole-block DMA (of blocks big enough for the copy engines: one layer of a block, as a
//      per-layer call copies, is 32 KiB, and STAGED ran 64 such blocks a call at 22.5 GB/s on the
//      H200 against 35.8 for the kernel and 43.5 for the whole block staged: bench_layer_copy.py);
//   3. else the SM kernel.
// The legacy NULL stream refuses the batch call; its per-copy loop needs >= 2 MiB copies to keep up.
constexpr int64_t kDmaMinOpBytes = 512 << 10;
constexpr int64_t kDmaLoopMinOpBytes = 2 << 20;
constexpr bool kAutoStaged = true;
constexpr int64_t kStagedMinBlockBytes = 256 << 10;   // DMA of 256 KiB ops: ~50 of ~54 GB/s (table)
constexpr int64_t kKernelMaxSmallBytes = 16 << 20;   // below it the kernel beats staging (pick_method)

struct KernelParams {
    const uint64_t *src_layers;  // device copy of src layer_ptrs
    const uint64_t *dst_layers;  // device copy of dst layer_ptrs
    const int64_t *src_blocks;   // device copy of the source block ids
    const int64_t *dst_blocks;   // device copy of the destination block ids
    int64_t src_block_stride, src_outer_stride;
    int64_t dst_block_stride, dst_outer_stride;
    int64_t region_bytes;
    int64_t chunks_per_region;   // ceil(region_bytes / chunk bytes)
    int64_t total_items;         // regions * chunks_per_region
    int32_t num_layers, outer_dim;
};

// Streaming (evict-first) accesses: neither side is read again by this kernel, so keep the copy
// out of L2's way; both work on device and on mapped pinned host addresses.
template <typename V> __device__ __forceinline__ V load_cs(const V *p) { return __ldcs(p); }
template <typename V> __device__ __forceinline__ void store_cs(V *p, const V &v) { __stcs(p, v); }

template <typename V>
__global__ void __launch_bounds__(kThreads) copy_regions(const KernelParams p) {
    constexpr int64_t kChunk = 32 * kUnroll * int64_t(sizeof(V));
    const int lane = threadIdx.x & 31;
    const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    const int64_t per_pair = int64_t(p.num_layers) * p.outer_dim;
    // Items run pair-major, then layer, outer, chunk: consecutive warps touch consecutive bytes of
    // a fully contiguous G2 block, so host-side PCIe traffic streams.
    for (int64_t item = warp; item < p.total_items; item += nwarps) {
        const int64_t region = item / p.chunks_per_region;
        const int64_t chunk = item - region * p.chunks_per_region;
        const int64_t pair = region / per_pair;
        const int32_t rest = int32_t(region - pair * per_pair);
        const int32_t layer = rest / p.outer_dim;
        const int32_t outer = rest - layer * p.outer_dim;
        const int64_t off = chunk * kChunk;
        const V *s = reinterpret_cast<const V *>(
            reinterpret_cast<const char *>(p.src_layers[layer]) + p.src_blocks[pair] * p.src_block_stride +
            outer * p.src_outer_stride + off);
        V *d = reinterpret_cast<V *>(reinterpret_cast<char *>(p.dst_layers[layer]) +
                                     p.dst_blocks[pair] * p.dst_block_stride +
                                     outer * p.dst_outer_stride + off);
        const int64_t remain = p.region_bytes - off;
        V r[kUnroll];
        if (remain >= kChunk) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) r[u] = load_cs(s + u * 32 + lane);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) store_cs(d + u * 32 + lane, r[u]);
        } else {
            const int64_t nv = remain / int64_t(sizeof(V));
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (u * 32 + lane < nv) r[u] = load_cs(s + u * 32 + lane);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (u * 32 + lane < nv) store_cs(d + u * 32 + lane, r[u]);
        }
    }
}

// Copies the call's metadata from its pinned ring slot (read through UVA) to the device mirror.
__global__ void __launch_bounds__(kThreads) stage_meta(const uint64_t *__restrict__ src,
                                                       uint64_t *__restrict__ dst, int64_t words) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < words;
         i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = src[i];
}

// ---- device facts, cached per device --------------------------------------------------------
int g_sms[kMaxDevices];  // 0 = not read yet
std::mutex g_sms_mu;

int device_sms(int dev, int *sms, char *errbuf, size_t errlen) {
    if (dev < 0 || dev >= kMaxDevices)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "device %d beyond kvbm's limit of %d", dev,
                          kMaxDevices);
    std::lock_guard<std::mutex> lock(g_sms_mu);
    if (g_sms[dev] == 0)
        KVBM_CUDA_TRY(cudaDeviceGetAttribute(&g_sms[dev], cudaDevAttrMultiProcessorCount, dev));
    *sms = g_sms[dev];
    return KVBM_OK;
}

int kernel_ctas(int max_sms, int sms) {
    const int want = max_sms > 0 ? max_sms : kDefaultMaxSms;
    return std::max(1, std::min(want, sms));
}

// ---- metadata ring ---------------------------------------------------------------------------
class MetaRing {
  public:
    // Reserves `bytes` in the ring (waiting for the oldest users if it must), returns host and
    // device addresses of the slot. Caller holds mu_ through the launch and then calls commit.
    int acquire(size_t bytes, char **host, char **dev, size_t *off, char *errbuf, size_t errlen) {
        bytes = (bytes + 255) & ~size_t(255);
        int rc = reap(false, errbuf, errlen);
        if (rc != KVBM_OK) return rc;
        if (bytes > cap_) {
            rc = grow(bytes, errbuf, errlen);
            if (rc != KVBM_OK) return rc;
        }
        if (head_ + bytes > cap_) head_ = 0;
        // Oldest slots first: the ring is allocated in order, so waiting from the front until the
        // wanted range is clear never waits for a slot younger than one that overlaps.
        while (overlaps(head_, head_ + bytes)) {
            rc = pop_front(true, errbuf, errlen);
            if (rc != KVBM_OK) return rc;
        }
        *off = head_;
        *host = host_ + head_;
        *dev = dev_ + head_;
        pending_ = bytes;
        return KVBM_OK;
    }

    // Records the event that frees the slot once the stream has consumed it.
    int commit(cudaStream_t stream, char *errbuf, size_t errlen) {
        cudaEvent_t ev = nullptr;
        if (!free_events_.empty()) {
            ev = free_events_.back();
            free_events_.pop_back();
        } else {
            KVBM_CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
        }
        cudaError_t err = cudaEventRecord(ev, stream);
        if (err != cudaSuccess) {
            free_events_.push_back(ev);
            abandon(stream);
            return kvbm::cuda_fail(errbuf, errlen, "cudaEventRecord (metadata slot)", err);
        }
        inflight_.push_back(Slot{head_, head_ + pending_, ev});
        head_ += pending_;
        pending_ = 0;
        return KVBM_OK;
    }

    // A launch failed after the slot was handed out: the H2D copy may still read it, so wait for
    // the stream (its own error is the one already being reported) before handing it out again.
    void abandon(cudaStream_t stream) {
        (void)cudaStreamSynchronize(stream);
        (void)cudaGetLastError();
        pending_ = 0;
    }

    std::mutex mu;

  private:
    struct Slot {
        size_t begin, end;
        cudaEvent_t ev;
    };

    bool overlaps(size_t b, size_t e) const {
        for (const Slot &s : inflight_)
            if (s.begin < e && b < s.end) return true;
        return false;
    }

    int pop_front(bool wait, char *errbuf, size_t errlen) {
        Slot s = inflight_.front();
        if (wait) {
            KVBM_CUDA_TRY(cudaEventSynchronize(s.ev));
        }
        inflight_.pop_front();
        free_events_.push_back(s.ev);
        return KVBM_OK;
    }

    int reap(bool all, char *errbuf, size_t errlen) {
        while (!inflight_.empty()) {
            if (all) {
                int rc = pop_front(true, errbuf, errlen);
                if (rc != KVBM_OK) return rc;
                continue;
            }
            cudaError_t err = cudaEventQuery(inflight_.front().ev);
            if (err == cudaErrorNotReady) break;
            if (err != cudaSuccess) return kvbm::cuda_fail(errbuf, errlen, "cudaEventQuery (metadata slot)", err);
            free_events_.push_back(inflight_.front().ev);
            inflight_.pop_front();
        }
        return KVBM_OK;
    }

    int grow(size_t bytes, char *errbuf, size_t errlen) {
        int rc = reap(true, errbuf, errlen);
        if (rc != KVBM_OK) return rc;
        size_t cap = std::max<size_t>(cap_ * 2, 1 << 20);
        while (cap < bytes) cap *= 2;
        if (host_ != nullptr) KVBM_CUDA_TRY(cudaFreeHost(host_));
        if (dev_ != nullptr) KVBM_CUDA_TRY(cudaFree(dev_));
        host_ = nullptr;
        dev_ = nullptr;
        cap_ = 0;
        head_ = 0;
        KVBM_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void **>(&host_), cap, cudaHostAllocPortable));
        KVBM_CUDA_TRY(cudaMalloc(reinterpret_cast<void **>(&dev_), cap));
        cap_ = cap;
        return KVBM_OK;
    }

    char *host_ = nullptr;
    char *dev_ = nullptr;
    size_t cap_ = 0;
    size_t head_ = 0;
    size_t pending_ = 0;
    std::deque<Slot> inflight_;
    std::vector<cudaEvent_t> free_events_;
};

// One ring per device, created on first use and kept for the process's life (its memory is
// released by the driver at exit; destroying CUDA objects from a static destructor races the
// runtime's own teardown).
MetaRing *g_rings[kMaxDevices];
std::mutex g_rings_mu;

MetaRing *ring_for(int dev) {
    std::lock_guard<std::mutex> lock(g_rings_mu);
    if (g_rings[dev] == nullptr) g_rings[dev] = new MetaRing();
    return g_rings[dev];
}

// ---- checks ----------------------------------------------------------------------------------
int vector_width(const kvbm_layout_t *src, const kvbm_layout_t *dst) {
    uint64_t bits = uint64_t(src->block_stride) | uint64_t(src->outer_stride) |
                    uint64_t(dst->block_stride) | uint64_t(dst->outer_stride) |
                    uint64_t(src->region_bytes);
    for (int32_t l = 0; l < src->num_layers; ++l) bits |= src->layer_ptrs[l] | dst->layer_ptrs[l];
    for (int w : {16, 8, 4})
        if ((bits & uint64_t(w - 1)) == 0) return w;
    return 1;
}

// The kernel dereferences these addresses itself: pageable host memory would fault there and
// take the CUDA context down with it, so refuse it here, for every layer (layers are separate
// allocations; a host-side attribute lookup costs well under a microsecond each).
int check_uva(const kvbm_layout_t *lay, const char *which, char *errbuf, size_t errlen) {
    if (lay->flags & KVBM_LAYOUT_UVA_CHECKED) return KVBM_OK;   // checked once by its owner
    for (int32_t l = 0; l < lay->num_layers; ++l) {
        cudaPointerAttributes attr{};
        const void *ptr = reinterpret_cast<const void *>(lay->layer_ptrs[l]);
        KVBM_CUDA_TRY(cudaPointerGetAttributes(&attr, ptr));
        if (attr.type == cudaMemoryTypeUnregistered)
            return kvbm::fail(errbuf, errlen, KVBM_EINVAL,
                              "%s layer %d at %p is pageable host memory: the SM kernel needs device "
                              "or pinned memory (kvbm_cuda_host_register it, or use the DMA method)",
                              which, l, ptr);
    }
    return KVBM_OK;
}

bool is_legacy(cudaStream_t stream) { return stream == nullptr || stream == cudaStreamLegacy; }

// ---- kernel path -----------------------------------------------------------------------------
int check_kernel_args(const kvbm_layout_t *src, const kvbm_layout_t *dst, int *dev, int *sms,
                      char *errbuf, size_t errlen) {
    int rc = check_uva(src, "source", errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    rc = check_uva(dst, "destination", errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    KVBM_CUDA_TRY(cudaGetDevice(dev));
    return device_sms(*dev, sms, errbuf, errlen);
}

// Layered launches alternate between the caller's stream and a second stream of its own, forked
// from the caller's at the start and joined back at the end: one layer's kernel then overlaps the
// next one's start and the previous one's tail, which on one stream left PCIe idle between layers
// (16 launches of 2 MiB ran at 84 % of one launch on the H200: bench/bench_layer_copy.py).
struct LayerFork {
    cudaStream_t aux = nullptr;
    cudaEvent_t fork = nullptr, join = nullptr;
};
// Keyed by (device, stream): the legacy and per-thread default streams have one handle on every
// device. Kept for the process's life (a few per worker: one per copier stream).
std::map<std::pair<int, cudaStream_t>, LayerFork> g_forks;
std::mutex g_forks_mu;

int fork_for(int dev, cudaStream_t stream, LayerFork *out, char *errbuf, size_t errlen) {
    std::lock_guard<std::mutex> lock(g_forks_mu);
    const auto key = std::make_pair(dev, stream);
    auto it = g_forks.find(key);
    if (it != g_forks.end()) {
        *out = it->second;
        return KVBM_OK;
    }
    LayerFork f;
    cudaError_t err = cudaStreamCreateWithFlags(&f.aux, cudaStreamNonBlocking);
    if (err == cudaSuccess) err = cudaEventCreateWithFlags(&f.fork, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventCreateWithFlags(&f.join, cudaEventDisableTiming);
    if (err != cudaSuccess) {
        if (f.fork) cudaEventDestroy(f.fork);
        if (f.aux) cudaStreamDestroy(f.aux);
        return kvbm::cuda_fail(errbuf, errlen, "creating the layered copy's second stream", err);
    }
    g_forks[key] = f;
    *out = f;
    return KVBM_OK;
}

// copy_regions for n pairs (arguments already checked): one launch, or with `layer_events` one
// launch per layer with layer_events[l] recorded after layer l's. The metadata (every layer's
// pointers and the block ids) is staged once either way: per-layer calls of their own each staged
// it again and launched two kernels, and ran at 82 % of one call (bench/bench_layer_copy.py).
int launch_copy(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *src_blocks,
                const int64_t *dst_blocks, int64_t n, int max_sms, int dev, int sms,
                cudaStream_t stream, char *errbuf, size_t errlen,
                void *const *layer_events = nullptr) {
    int rc = KVBM_OK;
    const int width = vector_width(src, dst);
    const int64_t chunk = 32 * kUnroll * int64_t(width);
    const int32_t L = src->num_layers;
    KernelParams p{};
    p.src_block_stride = src->block_stride;
    p.src_outer_stride = src->outer_stride;
    p.dst_block_stride = dst->block_stride;
    p.dst_outer_stride = dst->outer_stride;
    p.region_bytes = src->region_bytes;
    p.chunks_per_region = (src->region_bytes + chunk - 1) / chunk;
    p.total_items = n * L * src->outer_dim * p.chunks_per_region;
    p.num_layers = L;
    p.outer_dim = src->outer_dim;
    const int64_t warps_per_cta = kThreads / 32;
    const int ctas = int(std::min<int64_t>(kernel_ctas(max_sms, sms),
                                           (p.total_items + warps_per_cta - 1) / warps_per_cta));

    const size_t meta = size_t(L) * 2 * sizeof(uint64_t) + size_t(n) * 2 * sizeof(int64_t);
    MetaRing *ring = ring_for(dev);
    std::lock_guard<std::mutex> lock(ring->mu);
    char *host = nullptr, *devp = nullptr;
    size_t off = 0;
    rc = ring->acquire(meta, &host, &devp, &off, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    std::memcpy(host, src->layer_ptrs, size_t(L) * sizeof(uint64_t));
    std::memcpy(host + L * sizeof(uint64_t), dst->layer_ptrs, size_t(L) * sizeof(uint64_t));
    char *blocks = host + 2 * L * sizeof(uint64_t);
    std::memcpy(blocks, src_blocks, size_t(n) * sizeof(int64_t));
    std::memcpy(blocks + n * sizeof(int64_t), dst_blocks, size_t(n) * sizeof(int64_t));
    p.src_layers = reinterpret_cast<const uint64_t *>(devp);
    p.dst_layers = p.src_layers + L;
    p.src_blocks = reinterpret_cast<const int64_t *>(p.dst_layers + L);
    p.dst_blocks = p.src_blocks + n;

    // Staged by a small kernel rather than cudaMemcpyAsync: a copy would queue on a copy engine,
    // possibly behind a bulk DMA of the other direction, and hold this kernel back until it ends.
    const int64_t words = int64_t(meta / sizeof(uint64_t));
    const int stage_ctas = int(std::min<int64_t>(ctas, (words + kThreads - 1) / kThreads));
    stage_meta<<<stage_ctas, kThreads, 0, stream>>>(reinterpret_cast<const uint64_t *>(host),
                                                     reinterpret_cast<uint64_t *>(devp), words);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        ring->abandon(stream);
        return kvbm::cuda_fail(errbuf, errlen, "stage_meta launch (block ids to device)", err);
    }
    const int32_t launches = layer_events != nullptr ? L : 1;
    KernelParams lp = p;
    int lctas = ctas;
    LayerFork fork;
    if (layer_events != nullptr) {   // one layer a launch: its slice of the staged layer pointers
        lp.num_layers = 1;
        lp.total_items = n * src->outer_dim * p.chunks_per_region;
        lctas = int(std::min<int64_t>(ctas, (lp.total_items + warps_per_cta - 1) / warps_per_cta));
        if (L > 1) {
            rc = fork_for(dev, stream, &fork, errbuf, errlen);
            if (rc == KVBM_OK && (err = cudaEventRecord(fork.fork, stream)) == cudaSuccess)
                err = cudaStreamWaitEvent(fork.aux, fork.fork, 0);
            if (rc == KVBM_OK && err != cudaSuccess)
                rc = kvbm::cuda_fail(errbuf, errlen, "forking the layered copy's second stream", err);
            if (rc != KVBM_OK) {
                ring->abandon(stream);
                return rc;
            }
        }
    }
    for (int32_t l = 0; l < launches; ++l) {
        cudaStream_t on = (fork.aux != nullptr && l % 2 == 1) ? fork.aux : stream;
        if (layer_events != nullptr) {
            lp.src_layers = p.src_layers + l;
            lp.dst_layers = p.dst_layers + l;
        }
        switch (width) {
            case 16: copy_regions<int4><<<lctas, kThreads, 0, on>>>(lp); break;
            case 8: copy_regions<int2><<<lctas, kThreads, 0, on>>>(lp); break;
            case 4: copy_regions<int><<<lctas, kThreads, 0, on>>>(lp); break;
            default: copy_regions<char><<<lctas, kThreads, 0, on>>>(lp); break;
        }
        err = cudaGetLastError();
        if (err == cudaSuccess && layer_events != nullptr)
            err = cudaEventRecord(static_cast<cudaEvent_t>(layer_events[l]), on);
        if (err == cudaSuccess && fork.aux != nullptr && l == launches - 1) {
            // Join: the caller's stream waits for the second one, and the last layer's event is
            // recorded (again) behind that wait, so it fires only once every layer has landed.
            err = cudaEventRecord(fork.join, fork.aux);
            if (err == cudaSuccess) err = cudaStreamWaitEvent(stream, fork.join, 0);
            if (err == cudaSuccess) err = cudaEventRecord(static_cast<cudaEvent_t>(layer_events[l]), stream);
        }
        if (err != cudaSuccess) {
            if (fork.aux != nullptr) {   // whatever the second stream holds is the caller's too
                (void)cudaStreamSynchronize(fork.aux);
            }
            ring->abandon(stream);
            return kvbm::fail(errbuf, errlen, KVBM_ECUDA,
                              "copy_regions<%d-byte> launch of layer %d (%d CTAs x %d threads) failed: %s (%s)",
                              width, int(l), lctas, kThreads, cudaGetErrorString(err), cudaGetErrorName(err));
        }
    }
    return ring->commit(stream, errbuf, errlen);
}

int run_kernel(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *src_blocks,
               const int64_t *dst_blocks, int64_t n, int max_sms, cudaStream_t stream, char *errbuf,
               size_t errlen, void *const *layer_events = nullptr) {
    int dev = 0, sms = 0;
    int rc = check_kernel_args(src, dst, &dev, &sms, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    return launch_copy(src, dst, src_blocks, dst_blocks, n, max_sms, dev, sms, stream, errbuf, errlen,
                       layer_events);
}

// ---- DMA path --------------------------------------------------------------------------------
struct OpList {
    std::vector<void *> dst;
    std::vector<const void *> src;
    std::vector<size_t> size;
    int64_t bytes = 0;
    void clear() {
        dst.clear();
        src.clear();
        size.clear();
        bytes = 0;
    }
    void add(char *d, const char *s, size_t n) {
        bytes += int64_t(n);
        if (!size.empty()) {
            const size_t k = size.size() - 1;
            if (static_cast<char *>(dst[k]) + size[k] == d &&
                static_cast<const char *>(src[k]) + size[k] == s) {
                size[k] += n;
                return;
            }
        }
        dst.push_back(d);
        src.push_back(s);
        size.push_back(n);
    }
};

inline const char *region(const kvbm_layout_t *lay, int64_t b, int32_t l, int32_t o) {
    return reinterpret_cast<const char *>(lay->layer_ptrs[l]) + b * lay->block_stride +
           o * lay->outer_stride;
}

// Region list in the order that lets the most neighbours merge: block ids running along one
// (layer, outer) row when both sides keep blocks of a row adjacent (outer-major layer-separate on
// both sides), else block by block (fully contiguous and block-major keep a block's regions together).
void build_ops(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *sb,
               const int64_t *db, int64_t n, OpList *ops) {
    ops->clear();
    const int32_t L = src->num_layers, O = src->outer_dim;
    const size_t rb = size_t(src->region_bytes);
    const bool rows = src->block_stride == src->region_bytes && dst->block_stride == dst->region_bytes;
    ops->dst.reserve(size_t(n) * L * O);
    ops->src.reserve(size_t(n) * L * O);
    ops->size.reserve(size_t(n) * L * O);
    if (rows) {
        for (int32_t l = 0; l < L; ++l)
            for (int32_t o = 0; o < O; ++o)
                for (int64_t i = 0; i < n; ++i)
                    ops->add(const_cast<char *>(region(dst, db[i], l, o)), region(src, sb[i], l, o), rb);
    } else {
        for (int64_t i = 0; i < n; ++i)
            for (int32_t l = 0; l < L; ++l)
                for (int32_t o = 0; o < O; ++o)
                    ops->add(const_cast<char *>(region(dst, db[i], l, o)), region(src, sb[i], l, o), rb);
    }
}

int run_dma(const OpList &ops, cudaStream_t stream, char *errbuf, size_t errlen) {
    const size_t count = ops.size.size();
#if CUDART_VERSION >= 12080
    if (!is_legacy(stream)) {
        cudaMemcpyAttributes attr{};
        attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // sources may be written earlier in stream
        attr.flags = cudaMemcpyFlagDefault;
        size_t attr_idx = 0;
        constexpr size_t kBatch = 16384;  // bounds one driver call's host-side work
        for (size_t b = 0; b < count; b += kBatch) {
            const size_t m = std::min(kBatch, count - b);
#if CUDART_VERSION >= 13000
            cudaError_t err = cudaMemcpyBatchAsync(ops.dst.data() + b, ops.src.data() + b,
                                                   ops.size.data() + b, m, &attr, &attr_idx, 1, stream);
#else
            size_t fail_idx = 0;
            cudaError_t err = cudaMemcpyBatchAsync(
                const_cast<void **>(ops.dst.data() + b), const_cast<void **>(ops.src.data() + b),
                const_cast<size_t *>(ops.size.data() + b), m, &attr, &attr_idx, 1, &fail_idx, stream);
#endif
            if (err != cudaSuccess) {
                (void)cudaGetLastError();
                return kvbm::fail(errbuf, errlen, KVBM_ECUDA,
                                  "cudaMemcpyBatchAsync (copies %zu..%zu of %zu) failed: %s (%s)", b,
                                  b + m - 1, count, cudaGetErrorString(err), cudaGetErrorName(err));
            }
        }
        return KVBM_OK;
    }
#endif
    for (size_t k = 0; k < count; ++k) {
        cudaError_t err = cudaMemcpyAsync(ops.dst[k], ops.src[k], ops.size[k], cudaMemcpyDefault, stream);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            return kvbm::fail(errbuf, errlen, KVBM_ECUDA,
                              "cudaMemcpyAsync (copy %zu of %zu, %zu bytes) failed: %s (%s)", k, count,
                              ops.size[k], cudaGetErrorString(err), cudaGetErrorName(err));
        }
    }
    return KVBM_OK;
}

// The per-region loop the DMA path replaces: one cudaMemcpyAsync per region, nothing merged.
int run_dma_loop(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *sb,
                 const int64_t *db, int64_t n, cudaStream_t stream, char *errbuf, size_t errlen) {
    const size_t rb = size_t(src->region_bytes);
    for (int64_t i = 0; i < n; ++i)
        for (int32_t l = 0; l < src->num_layers; ++l)
            for (int32_t o = 0; o < src->outer_dim; ++o) {
                cudaError_t err = cudaMemcpyAsync(const_cast<char *>(region(dst, db[i], l, o)),
                                                  region(src, sb[i], l, o), rb, cudaMemcpyDefault, stream);
                if (err != cudaSuccess)
                    return kvbm::cuda_fail(errbuf, errlen, "cudaMemcpyAsync (per-region loop)", err);
            }
    return KVBM_OK;
}

thread_local OpList tl_ops;

// ---- staged path: SM gather/scatter in device memory + whole-block DMA ----------------------
// The far side (G2) keeps each block as one contiguous run, so the copy engines can move whole
// blocks (L * O * region bytes, >= 256 KiB for any real model) at their full rate, while an SM
// kernel does the scattered part at device-memory speed: offload gathers the engine's regions of a
// few blocks into a device staging slot, then one DMA op per block writes them to G2; onboard is the
// mirror (DMA into a slot, then scatter). Slots rotate so that the kernel of chunk c+1 overlaps the
// DMA of chunk c; the kernels run on an internal stream ordered by events, and the caller's stream
// ends behind every part of the copy. One stager per device and direction (gather, scatter).
constexpr int kStageSlots = 4;
// 32 MiB slots take blocks of 32 layers x K/V x 512 KiB regions; at 8 MiB, 256 KiB regions (16 MiB
// blocks) fell back to the kernel (93% H2D, 87% both ways). Cost: 4 x 32 MiB of device memory per
// direction that uses STAGED, allocated on first use.
constexpr int64_t kStageSlotBytes = 32 << 20;
// A call of a few slots' worth is cut into kStageSlots chunks (none under this size), so that its
// own gathers overlap its own DMA: a 64 x 512 KiB call filled one 32 MiB slot and ran gather then
// DMA back to back. H100, one call of 64 such blocks, same lease: D2H 45.1-46.0 -> 48.7-50.1 GB/s,
// H2D 42.8-43.0 -> 47.4-49.1 GB/s (bench/RESULTS.md).
constexpr int64_t kStageMinChunkBytes = 4 << 20;

struct Stager {
    std::mutex mu;
    bool ready = false;
    cudaStream_t aux = nullptr;
    char *buf = nullptr;
    cudaEvent_t entry = nullptr, done = nullptr;
    cudaEvent_t ready_ev[kStageSlots] = {};
    cudaEvent_t free_ev[kStageSlots] = {};
    bool used[kStageSlots] = {};
    int next = 0;
    std::vector<int64_t> iota;

    int init(char *errbuf, size_t errlen) {
        if (ready) return KVBM_OK;
        const int rc = create(errbuf, errlen);
        if (rc != KVBM_OK) destroy();  // a later call starts over instead of leaking a half-built stager
        return rc;
    }

    void destroy() {
        for (int i = 0; i < kStageSlots; ++i) {
            if (ready_ev[i]) cudaEventDestroy(ready_ev[i]);
            if (free_ev[i]) cudaEventDestroy(free_ev[i]);
            ready_ev[i] = free_ev[i] = nullptr;
        }
        if (entry) cudaEventDestroy(entry);
        if (done) cudaEventDestroy(done);
        if (buf) cudaFree(buf);
        if (aux) cudaStreamDestroy(aux);
        entry = done = nullptr;
        buf = nullptr;
        aux = nullptr;
    }

    int create(char *errbuf, size_t errlen) {
        KVBM_CUDA_TRY(cudaStreamCreateWithFlags(&aux, cudaStreamNonBlocking));
        KVBM_CUDA_TRY(cudaMalloc(reinterpret_cast<void **>(&buf), size_t(kStageSlots) * kStageSlotBytes));
        KVBM_CUDA_TRY(cudaEventCreateWithFlags(&entry, cudaEventDisableTiming));
        KVBM_CUDA_TRY(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        for (int i = 0; i < kStageSlots; ++i) {
            KVBM_CUDA_TRY(cudaEventCreateWithFlags(&ready_ev[i], cudaEventDisableTiming));
            KVBM_CUDA_TRY(cudaEventCreateWithFlags(&free_ev[i], cudaEventDisableTiming));
        }
        ready = true;
        return KVBM_OK;
    }
};

Stager *g_stagers[kMaxDevices][2];
std::mutex g_stagers_mu;

Stager *stager_for(int dev, int scatter) {
    std::lock_guard<std::mutex> lock(g_stagers_mu);
    if (g_stagers[dev][scatter] == nullptr) g_stagers[dev][scatter] = new Stager();
    return g_stagers[dev][scatter];
}

// True when every block of the layout is one contiguous run: [layer][outer][region] at
// layer_ptrs[0] + b * block_stride (G2 and G3 staging always are).
bool block_contiguous(const kvbm_layout_t *lay) {
    if (lay->outer_dim > 1 && lay->outer_stride != lay->region_bytes) return false;
    const uint64_t step = uint64_t(lay->outer_dim) * uint64_t(lay->region_bytes);
    for (int32_t l = 0; l < lay->num_layers; ++l)
        if (lay->layer_ptrs[l] != lay->layer_ptrs[0] + uint64_t(l) * step) return false;
    return true;
}

int64_t staged_block_bytes(const kvbm_layout_t *lay) {
    return int64_t(lay->num_layers) * lay->outer_dim * lay->region_bytes;
}

// Which side the DMA moves whole blocks of: 0 = destination (gather first), 1 = source (scatter
// after), -1 = staging does not apply (neither side block-contiguous, or a block beyond a slot).
int staged_mode(const kvbm_layout_t *src, const kvbm_layout_t *dst) {
    if (staged_block_bytes(src) > kStageSlotBytes) return -1;
    if (block_contiguous(dst)) return 0;
    if (block_contiguous(src)) return 1;
    return -1;
}

int run_staged(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *sb,
               const int64_t *db, int64_t n, int max_sms, cudaStream_t stream, char *errbuf,
               size_t errlen) {
    const int mode = staged_mode(src, dst);
    if (mode < 0)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL,
                          "staged copy needs one side with contiguous blocks of at most %lld bytes "
                          "(blocks here are %lld bytes)", (long long)kStageSlotBytes,
                          (long long)staged_block_bytes(src));
    int dev = 0, sms = 0;
    // The kernel touches the engine side and the device staging slot only.
    int rc = check_kernel_args(mode == 0 ? src : dst, mode == 0 ? src : dst, &dev, &sms, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    Stager *st = stager_for(dev, mode);
    std::lock_guard<std::mutex> lock(st->mu);
    rc = st->init(errbuf, errlen);
    if (rc != KVBM_OK) return rc;

    const int32_t L = src->num_layers, O = src->outer_dim;
    const int64_t rb = src->region_bytes;
    const int64_t bb = staged_block_bytes(src);
    const int64_t fit = std::max<int64_t>(1, kStageSlotBytes / bb);
    const int64_t spread = (n + kStageSlots - 1) / kStageSlots;
    const int64_t least = std::max<int64_t>(1, (kStageMinChunkBytes + bb - 1) / bb);
    const int64_t per_slot = std::min(fit, std::max(spread, least));
    if (int64_t(st->iota.size()) < per_slot) {
        st->iota.resize(size_t(per_slot));
        for (int64_t i = 0; i < per_slot; ++i) st->iota[size_t(i)] = i;
    }
    std::vector<uint64_t> stage_ptrs(static_cast<size_t>(L));
    kvbm_layout_t stage{};
    stage.layer_ptrs = stage_ptrs.data();
    stage.num_layers = L;
    stage.outer_dim = O;
    stage.block_stride = bb;
    stage.outer_stride = rb;
    stage.region_bytes = rb;
    stage.flags = KVBM_LAYOUT_UVA_CHECKED;   // our own device slots
    const kvbm_layout_t *far = mode == 0 ? dst : src;
    const int64_t *far_ids = mode == 0 ? db : sb;
    const char *far_base = reinterpret_cast<const char *>(far->layer_ptrs[0]);

    // The kernels on the internal stream start behind the work already on the caller's stream.
    KVBM_CUDA_TRY(cudaEventRecord(st->entry, stream));
    KVBM_CUDA_TRY(cudaStreamWaitEvent(st->aux, st->entry, 0));
    // Whatever fails below, the caller's stream must still end behind every kernel already queued
    // on aux: its events and syncs are what the caller trusts before reusing the blocks.
    struct JoinAux {
        Stager *st;
        cudaStream_t stream;
        ~JoinAux() {
            if (cudaEventRecord(st->done, st->aux) == cudaSuccess)
                cudaStreamWaitEvent(stream, st->done, 0);
        }
    } join{st, stream};
    OpList ops;
    for (int64_t c0 = 0; c0 < n; c0 += per_slot) {
        const int64_t k = std::min(per_slot, n - c0);
        const int slot = st->next;
        st->next = (st->next + 1) % kStageSlots;
        char *base = st->buf + int64_t(slot) * kStageSlotBytes;
        for (int32_t l = 0; l < L; ++l) stage_ptrs[size_t(l)] = uint64_t(base) + uint64_t(l) * O * rb;
        stage.num_blocks = k;
        ops.clear();
        for (int64_t i = 0; i < k; ++i) {
            char *far_block = const_cast<char *>(far_base) + far_ids[c0 + i] * far->block_stride;
            if (mode == 0) ops.add(far_block, base + i * bb, size_t(bb));
            else ops.add(base + i * bb, far_block, size_t(bb));
        }
        if (mode == 0) {
            // gather on aux (after the slot's previous DMA drained it) -> DMA on the caller's stream
            if (st->used[slot]) KVBM_CUDA_TRY(cudaStreamWaitEvent(st->aux, st->free_ev[slot], 0));
            rc = launch_copy(src, &stage, sb + c0, st->iota.data(), k, max_sms, dev, sms, st->aux,
                             errbuf, errlen);
            if (rc != KVBM_OK) return rc;
            KVBM_CUDA_TRY(cudaEventRecord(st->ready_ev[slot], st->aux));
            KVBM_CUDA_TRY(cudaStreamWaitEvent(stream, st->ready_ev[slot], 0));
            rc = run_dma(ops, stream, errbuf, errlen);
            if (rc != KVBM_OK) return rc;
            KVBM_CUDA_TRY(cudaEventRecord(st->free_ev[slot], stream));
        } else {
            // DMA on the caller's stream (after the slot's previous scatter read it) -> scatter on aux
            if (st->used[slot]) KVBM_CUDA_TRY(cudaStreamWaitEvent(stream, st->free_ev[slot], 0));
            rc = run_dma(ops, stream, errbuf, errlen);
            if (rc != KVBM_OK) return rc;
            KVBM_CUDA_TRY(cudaEventRecord(st->ready_ev[slot], stream));
            KVBM_CUDA_TRY(cudaStreamWaitEvent(st->aux, st->ready_ev[slot], 0));
            rc = launch_copy(&stage, dst, st->iota.data(), db + c0, k, max_sms, dev, sms, st->aux,
                             errbuf, errlen);
            if (rc != KVBM_OK) return rc;
            KVBM_CUDA_TRY(cudaEventRecord(st->free_ev[slot], st->aux));
        }
        st->used[slot] = true;
    }
    // The caller's stream ends behind the last scatter (aux runs them in order): JoinAux's
    // destructor does that on this path too. Its errors would surface at the caller's next sync.
    return KVBM_OK;
}

// How many copies build_ops would make, counted in O(n) without building the list (AUTO must not
// spend host time that the copy then waits for): whole blocks merge when both sides keep blocks
// contiguous, block rows merge when both sides keep a (layer, outer) row contiguous, else one
// copy per region (or per layer when both sides keep a block's outer regions adjacent).
int64_t estimate_ops(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *sb,
                     const int64_t *db, int64_t n) {
    const int64_t per_block = int64_t(src->num_layers) * src->outer_dim;
    const bool rows = src->block_stride == src->region_bytes && dst->block_stride == dst->region_bytes;
    if (rows) {
        int64_t runs = 1;
        for (int64_t i = 1; i < n; ++i) runs += !(sb[i] == sb[i - 1] + 1 && db[i] == db[i - 1] + 1);
        return runs * per_block;
    }
    if (block_contiguous(src) && block_contiguous(dst)) {
        const int64_t bb = staged_block_bytes(src);
        const bool abut = src->block_stride == bb && dst->block_stride == bb;
        int64_t runs = 1;
        for (int64_t i = 1; i < n; ++i)
            runs += !(abut && sb[i] == sb[i - 1] + 1 && db[i] == db[i - 1] + 1);
        return runs;
    }
    if (src->outer_stride == src->region_bytes && dst->outer_stride == dst->region_bytes)
        return n * src->num_layers;
    return n * per_block;
}

// Whether the SM kernel may dereference every layer of `lay` (vouched for, or checked now).
bool uva_ok(const kvbm_layout_t *lay) {
    char scratch[8];
    return check_uva(lay, "layout", scratch, sizeof(scratch)) == KVBM_OK;
}

int pick_method(const kvbm_layout_t *src, const kvbm_layout_t *dst, const int64_t *sb,
                const int64_t *db, int64_t n, cudaStream_t stream) {
    const bool legacy = is_legacy(stream);
    const int64_t total = n * staged_block_bytes(src);
    const int64_t avg = total / std::max<int64_t>(1, estimate_ops(src, dst, sb, db, n));
    if (avg >= (legacy ? kDmaLoopMinOpBytes : kDmaMinOpBytes)) return KVBM_COPY_DMA;
    // Small copies are about latency: the kernel starts sooner than staging's DMA and scatter on
    // two streams (H200, one at a time, launch to event: 60 / 80 / 118 / 257 us for 2 / 4 / 8 / 16
    // blocks of 512 KiB H2D against 63 / 87 / 131 / 270 staged; equal at 1; staged ahead from 16 MiB).
    if (total < kKernelMaxSmallBytes && uva_ok(src) && uva_ok(dst)) return KVBM_COPY_KERNEL;
    if (kAutoStaged && staged_mode(src, dst) >= 0 && staged_block_bytes(src) >= kStagedMinBlockBytes &&
        (!legacy || staged_block_bytes(src) >= kDmaLoopMinOpBytes))
        return KVBM_COPY_STAGED;
    return KVBM_COPY_KERNEL;
}

}  // namespace

extern "C" int kvbm_cuda_kernel_sms(int max_sms, char *errbuf, size_t errlen) {
    int dev = 0, sms = 0;
    KVBM_CUDA_TRY(cudaGetDevice(&dev));
    int rc = device_sms(dev, &sms, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    return kernel_ctas(max_sms, sms);
}

extern "C" int kvbm_cuda_pick_method(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                                     const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                                     void *stream, char *errbuf, size_t errlen) {
    int rc = kvbm::check_copy_args(src, dst, src_blocks, dst_blocks, n, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    return pick_method(src, dst, src_blocks, dst_blocks, n, static_cast<cudaStream_t>(stream));
}

extern "C" int kvbm_cuda_check_uva(const kvbm_layout_t *lay, char *errbuf, size_t errlen) {
    if (lay == nullptr || lay->layer_ptrs == nullptr || lay->num_layers <= 0)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "check_uva: no layer pointers");
    kvbm_layout_t probe = *lay;
    probe.flags = 0;
    return check_uva(&probe, "layout", errbuf, errlen);
}

extern "C" int kvbm_cuda_copy_layers(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                                     const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                                     int max_sms, void *stream, void *const *layer_events,
                                     int32_t num_events, char *errbuf, size_t errlen) {
    int rc = kvbm::check_copy_args(src, dst, src_blocks, dst_blocks, n, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    if (max_sms < 0)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "max_sms %d is negative", max_sms);
    if (layer_events == nullptr || num_events != src->num_layers)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "%d layer events for %d layers", int(num_events),
                          int(src->num_layers));
    for (int32_t l = 0; l < num_events; ++l)
        if (layer_events[l] == nullptr)
            return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "layer event %d is null (not created)", int(l));
    if (n == 0) return KVBM_OK;
    return run_kernel(src, dst, src_blocks, dst_blocks, n, max_sms, static_cast<cudaStream_t>(stream), errbuf,
                      errlen, layer_events);
}

extern "C" int kvbm_cuda_copy_blocks(const kvbm_layout_t *src, const kvbm_layout_t *dst,
                                     const int64_t *src_blocks, const int64_t *dst_blocks, int64_t n,
                                     int method, int max_sms, void *stream, char *errbuf,
                                     size_t errlen) {
    int rc = kvbm::check_copy_args(src, dst, src_blocks, dst_blocks, n, errbuf, errlen);
    if (rc != KVBM_OK) return rc;
    if (method < KVBM_COPY_AUTO || method > KVBM_COPY_STAGED)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "copy method %d not in [%d, %d]", method,
                          KVBM_COPY_AUTO, KVBM_COPY_STAGED);
    if (max_sms < 0)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "max_sms %d is negative", max_sms);
    if (n == 0) return KVBM_OK;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (method == KVBM_COPY_DMA_LOOP)
        return run_dma_loop(src, dst, src_blocks, dst_blocks, n, s, errbuf, errlen);
    if (method == KVBM_COPY_KERNEL)
        return run_kernel(src, dst, src_blocks, dst_blocks, n, max_sms, s, errbuf, errlen);
    if (method == KVBM_COPY_STAGED)
        return run_staged(src, dst, src_blocks, dst_blocks, n, max_sms, s, errbuf, errlen);
    if (method == KVBM_COPY_AUTO) method = pick_method(src, dst, src_blocks, dst_blocks, n, s);
    if (method == KVBM_COPY_KERNEL)
        return run_kernel(src, dst, src_blocks, dst_blocks, n, max_sms, s, errbuf, errlen);
    if (method == KVBM_COPY_STAGED)
        return run_staged(src, dst, src_blocks, dst_blocks, n, max_sms, s, errbuf, errlen);
    build_ops(src, dst, src_blocks, dst_blocks, n, &tl_ops);
    return run_dma(tl_ops, s, errbuf, errlen);
}
