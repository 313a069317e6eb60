// CUDA build of the small runtime entry points of kvbm.h: availability and host registration.
// csrc/cpu/cuda_absent.cpp has the same symbols for the CPU build.
#include "cuda_check.cuh"

extern "C" const char *kvbm_build_kind(void) { return "cuda"; }

extern "C" int kvbm_cuda_available(void) {
    // Documented never to fail: no driver, no device or a driver older than this cudart all
    // answer 0 (cudaGetDeviceCount reports them as errors).
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return count > 0 ? 1 : 0;
}

extern "C" int kvbm_cuda_host_register(void *ptr, size_t bytes, char *errbuf, size_t errlen) {
    if (ptr == nullptr || bytes == 0)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_host_register: ptr %p, %zu bytes",
                          ptr, bytes);
    // Portable: usable from every device's context; Mapped: the SM kernel reads and writes it
    // through UVA (the device address equals the host address).
    KVBM_CUDA_TRY(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped));
    return KVBM_OK;
}

extern "C" int kvbm_cuda_host_unregister(void *ptr, char *errbuf, size_t errlen) {
    if (ptr == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_host_unregister: ptr is NULL");
    KVBM_CUDA_TRY(cudaHostUnregister(ptr));
    return KVBM_OK;
}
