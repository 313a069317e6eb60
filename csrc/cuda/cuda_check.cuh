// Error plumbing shared by csrc/cuda/*.cu: every CUDA runtime call goes through KVBM_CUDA_TRY, which
// turns a failure into KVBM_ECUDA with a message naming the call and the CUDA error, and returns
// from the enclosing function. Python maps KVBM_ECUDA to kvbm.errors.CudaError (native.pyx _check_rc).
#pragma once
#include <cuda_runtime.h>

#include "errors.h"
#include "kvbm.h"

namespace kvbm {

inline int cuda_fail(char *errbuf, size_t errlen, const char *what, cudaError_t err) {
    // Clear the error so that a later unrelated call does not report it again (sticky errors,
    // such as an illegal address, stay: the context is lost and every later call says so).
    (void)cudaGetLastError();
    return fail(errbuf, errlen, KVBM_ECUDA, "%s failed: %s (%s)", what, cudaGetErrorString(err),
                cudaGetErrorName(err));
}

}  // namespace kvbm

#define KVBM_CUDA_TRY(call)                                                        \
    do {                                                                           \
        cudaError_t kvbm_err_ = (call);                                            \
        if (kvbm_err_ != cudaSuccess) return kvbm::cuda_fail(errbuf, errlen, #call, kvbm_err_); \
    } while (0)
