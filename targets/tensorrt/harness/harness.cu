// Kernel harness: the plugins' CUDA kernels (plugin_src/token_compact.cu, diversity_select.cu, compiled next to this
// file, never copied) behind extern "C" entry points that ctypes can call without TensorRT.
//   ts_*_host:   host arrays in and out; device buffers are allocated, copied and freed inside.
//   ts_*_device: device pointers (from torch / cupy) and a stream; nothing is copied or synchronized.
//   ts_time_diversity_select_host: mean ms per launch over `iters` launches, timed with CUDA events.
// Every entry point returns a cudaError_t (0 = success); ts_error_string names it.
#include "kernels.h"

#include <cuda_runtime_api.h>

#include <cstdint>

namespace {

struct DeviceBuffers {  // frees whatever it allocated, on every return path
    void* ptrs[8] = {};
    int n = 0;
    cudaError_t alloc(void** out, std::size_t bytes) {
        cudaError_t const err = cudaMalloc(out, bytes > 0 ? bytes : 1);
        if (err == cudaSuccess) ptrs[n++] = *out;
        return err;
    }
    ~DeviceBuffers() {
        for (int i = 0; i < n; ++i) cudaFree(ptrs[i]);
    }
};

#define TS_TRY(expr)                                  \
    do {                                              \
        cudaError_t const ts_err_ = (expr);           \
        if (ts_err_ != cudaSuccess) return ts_err_;   \
    } while (0)

}  // namespace

extern "C" {

int ts_device_count() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

char const* ts_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

int ts_token_compact_device(void const* tokens, int elemBytes, void const* mask, int maskBytes, int64_t B, int64_t N,
                            int64_t C, int64_t K, int32_t minCount, void* workspace, void* out, int32_t* count,
                            int32_t* size, void* stream) {
    return tokensieve::launchTokenCompact(tokens, elemBytes, mask, maskBytes, B, N, C, K, minCount, workspace, out,
                                          count, size, static_cast<cudaStream_t>(stream));
}

size_t ts_token_compact_workspace_size(int64_t B, int64_t K) { return tokensieve::tokenCompactWorkspaceSize(B, K); }

// out_host holds B*K*C elements; with `dynamic`, the first B*S*C of them are written (row stride S = *size_host).
int ts_token_compact_host(void const* tokens_host, int elemBytes, void const* mask_host, int maskBytes, int64_t B,
                          int64_t N, int64_t C, int64_t K, int32_t minCount, int dynamic, void* out_host,
                          int32_t* count_host, int32_t* size_host) {
    DeviceBuffers buf;
    void *tokens, *mask, *ws, *out, *count, *size = nullptr;
    std::size_t const tokenBytes = static_cast<std::size_t>(B * N * C) * elemBytes;
    std::size_t const outBytes = static_cast<std::size_t>(B * K * C) * elemBytes;
    TS_TRY(buf.alloc(&tokens, tokenBytes));
    TS_TRY(buf.alloc(&mask, static_cast<std::size_t>(B * N) * maskBytes));
    TS_TRY(buf.alloc(&ws, tokensieve::tokenCompactWorkspaceSize(B, K)));
    TS_TRY(buf.alloc(&out, outBytes));
    TS_TRY(buf.alloc(&count, static_cast<std::size_t>(B) * sizeof(int32_t)));
    if (dynamic) TS_TRY(buf.alloc(&size, sizeof(int32_t)));
    TS_TRY(cudaMemcpy(tokens, tokens_host, tokenBytes, cudaMemcpyHostToDevice));
    TS_TRY(cudaMemcpy(mask, mask_host, static_cast<std::size_t>(B * N) * maskBytes, cudaMemcpyHostToDevice));
    TS_TRY(cudaMemset(out, 0xff, outBytes));  // garbage the kernel must overwrite (capped form: every row)
    TS_TRY(tokensieve::launchTokenCompact(tokens, elemBytes, mask, maskBytes, B, N, C, K, minCount, ws, out,
                                          static_cast<int32_t*>(count), static_cast<int32_t*>(size), nullptr));
    TS_TRY(cudaDeviceSynchronize());
    std::size_t copyBytes = outBytes;
    if (dynamic) {
        TS_TRY(cudaMemcpy(size_host, size, sizeof(int32_t), cudaMemcpyDeviceToHost));
        copyBytes = static_cast<std::size_t>(B * (*size_host) * C) * elemBytes;
    }
    TS_TRY(cudaMemcpy(out_host, out, copyBytes, cudaMemcpyDeviceToHost));
    TS_TRY(cudaMemcpy(count_host, count, static_cast<std::size_t>(B) * sizeof(int32_t), cudaMemcpyDeviceToHost));
    return cudaSuccess;
}

int ts_diversity_select_device(void const* features, int isHalf, float const* importance, int64_t B, int64_t N,
                               int64_t C, int64_t K, int64_t numPrefix, int mode, float lambda, int32_t* indices,
                               void* stream) {
    return tokensieve::launchDiversitySelect(features, isHalf != 0, importance, B, N, C, K, numPrefix, mode, lambda,
                                             indices, static_cast<cudaStream_t>(stream));
}

namespace {
cudaError_t uploadSelect(DeviceBuffers& buf, void const* features_host, int isHalf, float const* importance_host,
                         int64_t B, int64_t N, int64_t C, int64_t K, void** features, float** importance,
                         int32_t** indices) {
    std::size_t const featureBytes = static_cast<std::size_t>(B * N * C) * (isHalf ? 2 : 4);
    TS_TRY(buf.alloc(features, featureBytes));
    TS_TRY(cudaMemcpy(*features, features_host, featureBytes, cudaMemcpyHostToDevice));
    *importance = nullptr;
    if (importance_host != nullptr) {
        TS_TRY(buf.alloc(reinterpret_cast<void**>(importance), static_cast<std::size_t>(B * N) * sizeof(float)));
        TS_TRY(cudaMemcpy(*importance, importance_host, static_cast<std::size_t>(B * N) * sizeof(float),
                          cudaMemcpyHostToDevice));
    }
    TS_TRY(buf.alloc(reinterpret_cast<void**>(indices), static_cast<std::size_t>(B * K) * sizeof(int32_t)));
    return cudaMemset(*indices, 0xff, static_cast<std::size_t>(B * K) * sizeof(int32_t));
}
}  // namespace

int ts_diversity_select_host(void const* features_host, int isHalf, float const* importance_host, int64_t B, int64_t N,
                             int64_t C, int64_t K, int64_t numPrefix, int mode, float lambda, int32_t* indices_host) {
    DeviceBuffers buf;
    void* features;
    float* importance;
    int32_t* indices;
    TS_TRY(uploadSelect(buf, features_host, isHalf, importance_host, B, N, C, K, &features, &importance, &indices));
    TS_TRY(tokensieve::launchDiversitySelect(features, isHalf != 0, importance, B, N, C, K, numPrefix, mode, lambda,
                                             indices, nullptr));
    TS_TRY(cudaDeviceSynchronize());
    return cudaMemcpy(indices_host, indices, static_cast<std::size_t>(B * K) * sizeof(int32_t), cudaMemcpyDeviceToHost);
}

int ts_time_diversity_select_host(void const* features_host, int isHalf, float const* importance_host, int64_t B,
                                  int64_t N, int64_t C, int64_t K, int64_t numPrefix, int mode, float lambda, int warmup,
                                  int iters, float* ms_per_call) {
    if (iters < 1 || warmup < 0) return cudaErrorInvalidValue;
    DeviceBuffers buf;
    void* features;
    float* importance;
    int32_t* indices;
    TS_TRY(uploadSelect(buf, features_host, isHalf, importance_host, B, N, C, K, &features, &importance, &indices));
    for (int i = 0; i < warmup; ++i) {
        TS_TRY(tokensieve::launchDiversitySelect(features, isHalf != 0, importance, B, N, C, K, numPrefix, mode,
                                                 lambda, indices, nullptr));
    }
    cudaEvent_t start, stop;
    TS_TRY(cudaEventCreate(&start));
    TS_TRY(cudaEventCreate(&stop));
    cudaError_t err = cudaEventRecord(start, nullptr);
    for (int i = 0; i < iters && err == cudaSuccess; ++i) {
        err = tokensieve::launchDiversitySelect(features, isHalf != 0, importance, B, N, C, K, numPrefix, mode, lambda,
                                                indices, nullptr);
    }
    if (err == cudaSuccess) err = cudaEventRecord(stop, nullptr);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
    float total = 0.f;
    if (err == cudaSuccess) err = cudaEventElapsedTime(&total, start, stop);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (err == cudaSuccess) *ms_per_call = total / iters;
    return err;
}

}  // extern "C"
