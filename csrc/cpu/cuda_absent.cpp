// Linked instead of csrc/cuda/ in the CPU build, so kvbm/_fast links the same symbols either way.
// Each entry point says plainly that this build has no CUDA; none pretends to copy.
#include "kvbm.h"
#include "errors.h"

extern "C" const char *kvbm_build_kind(void) { return "cpu"; }

extern "C" int kvbm_cuda_available(void) { return 0; }

extern "C" int kvbm_cuda_copy_blocks(const kvbm_layout_t *, const kvbm_layout_t *, const int64_t *,
                                     const int64_t *, int64_t, int, int, void *, char *errbuf,
                                     size_t errlen) {
    return kvbm::fail(errbuf, errlen, KVBM_ENOCUDA,
                      "kvbm_cuda_copy_blocks: kvbm was built without CUDA (KVBM_NO_CUDA or no nvcc)");
}

extern "C" int kvbm_cuda_host_register(void *, size_t, char *errbuf, size_t errlen) {
    return kvbm::fail(errbuf, errlen, KVBM_ENOCUDA,
                      "kvbm_cuda_host_register: kvbm was built without CUDA");
}

extern "C" int kvbm_cuda_host_unregister(void *, char *errbuf, size_t errlen) {
    return kvbm::fail(errbuf, errlen, KVBM_ENOCUDA,
                      "kvbm_cuda_host_unregister: kvbm was built without CUDA");
}

#define KVBM_NO_CUDA_STUB(name, ...)                                                         \
    extern "C" int name(__VA_ARGS__, char *errbuf, size_t errlen) {                          \
        return kvbm::fail(errbuf, errlen, KVBM_ENOCUDA, #name ": kvbm was built without CUDA"); \
    }

KVBM_NO_CUDA_STUB(kvbm_cuda_kernel_sms, int)
KVBM_NO_CUDA_STUB(kvbm_cuda_pick_method, const kvbm_layout_t *, const kvbm_layout_t *, const int64_t *,
                  const int64_t *, int64_t, void *)
KVBM_NO_CUDA_STUB(kvbm_cuda_copy_layers, const kvbm_layout_t *, const kvbm_layout_t *, const int64_t *,
                  const int64_t *, int64_t, int, void *, void *const *, int32_t)
KVBM_NO_CUDA_STUB(kvbm_cuda_check_uva, const kvbm_layout_t *)
