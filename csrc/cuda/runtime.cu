// CUDA build of the small runtime entry points of kvbm.h: availability, host registration, and the
// stream/event helpers that let a worker without torch order its copies against other work.
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

extern "C" int kvbm_cuda_stream_create(void **stream, int priority, char *errbuf, size_t errlen) {
    if (stream == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_stream_create: stream is NULL");
    cudaStream_t s = nullptr;
    // Non-blocking: the copy streams must not serialize with the legacy default stream, or an
    // offload would wait for every kernel the engine queued there.
    KVBM_CUDA_TRY(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, priority));
    *stream = s;
    return KVBM_OK;
}

extern "C" int kvbm_cuda_stream_destroy(void *stream, char *errbuf, size_t errlen) {
    if (stream == nullptr) return KVBM_OK;
    KVBM_CUDA_TRY(cudaStreamDestroy(static_cast<cudaStream_t>(stream)));
    return KVBM_OK;
}

extern "C" int kvbm_cuda_stream_synchronize(void *stream, char *errbuf, size_t errlen) {
    KVBM_CUDA_TRY(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
    return KVBM_OK;
}

extern "C" int kvbm_cuda_event_create(void **event, char *errbuf, size_t errlen) {
    if (event == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_event_create: event is NULL");
    cudaEvent_t e = nullptr;
    KVBM_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    *event = e;
    return KVBM_OK;
}

extern "C" int kvbm_cuda_event_destroy(void *event, char *errbuf, size_t errlen) {
    if (event == nullptr) return KVBM_OK;
    KVBM_CUDA_TRY(cudaEventDestroy(static_cast<cudaEvent_t>(event)));
    return KVBM_OK;
}

extern "C" int kvbm_cuda_event_record(void *event, void *stream, char *errbuf, size_t errlen) {
    if (event == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_event_record: event is NULL");
    KVBM_CUDA_TRY(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
    return KVBM_OK;
}

extern "C" int kvbm_cuda_stream_wait_event(void *stream, void *event, char *errbuf, size_t errlen) {
    if (event == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_stream_wait_event: event is NULL");
    KVBM_CUDA_TRY(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream),
                                      static_cast<cudaEvent_t>(event), 0));
    return KVBM_OK;
}

extern "C" int kvbm_cuda_event_synchronize(void *event, char *errbuf, size_t errlen) {
    if (event == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_event_synchronize: event is NULL");
    KVBM_CUDA_TRY(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
    return KVBM_OK;
}

extern "C" int kvbm_cuda_event_query(void *event, char *errbuf, size_t errlen) {
    if (event == nullptr)
        return kvbm::fail(errbuf, errlen, KVBM_EINVAL, "kvbm_cuda_event_query: event is NULL");
    cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event));
    if (err == cudaSuccess) return 1;
    if (err == cudaErrorNotReady) {
        (void)cudaGetLastError();
        return 0;
    }
    return kvbm::cuda_fail(errbuf, errlen, "cudaEventQuery", err);
}
