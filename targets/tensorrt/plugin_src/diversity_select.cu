// DiversitySelect kernel: one block per batch element runs all K greedy steps, keeping one score per candidate
// token in shared memory.
//   mode 0, DivPrune (Alvar et al., CVPR 2025): score = cosine distance (1 - cos) to the nearest chosen token;
//     the first pick is the token farthest from its nearest neighbour; each step picks argmax score.
//   mode 1, MMR: pick argmax lambda * importance - (1 - lambda) * (max cosine similarity to the chosen tokens);
//     the first pick is argmax importance.
// Ties go to the lowest index (torch.argmax). Prefix tokens [0, numPrefix) are never candidates.
// The chosen set is written ascending with the same block scan as TokenCompact.
#include "compact_scan.cuh"
#include "kernels.h"

#include <cuda_fp16.h>

#include <cfloat>

namespace tokensieve {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float toFloat(float v) { return v; }
__device__ __forceinline__ float toFloat(__half v) { return __half2float(v); }

__device__ __forceinline__ float warpSum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// (value, index) argmax with ties to the lower index; index < 0 means "none".
struct Best {
    float value;
    int index;
};
__device__ __forceinline__ Best better(Best a, Best b) {
    if (b.index < 0) return a;
    if (a.index < 0) return b;
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

// Dot product of two C-element rows (float or half, any memory), spread over the lanes of one warp.
template <typename A, typename B>
__device__ __forceinline__ float warpDot(A const* x, B const* y, int64_t C) {
    float s = 0.f;
    for (int64_t c = threadIdx.x & 31; c < C; c += 32) s += toFloat(x[c]) * toFloat(y[c]);
    return warpSum(s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
diversitySelectKernel(T const* features, float const* importance, int64_t N, int64_t C, int64_t K, int64_t P, int mode,
                      float lambda, int32_t* indices) {
    extern __shared__ float smem[];
    float* score = smem;             // [N] mode 0: min distance to the chosen set; mode 1: max similarity to it
    float* invNorm = score + N;      // [N]
    float* chosen = invNorm + N;     // [C] normalized features of the latest pick
    auto* taken = reinterpret_cast<unsigned char*>(chosen + C);  // [N]
    __shared__ Best warpBest[kWarps];
    __shared__ int pick;
    __shared__ typename cub::BlockScan<int, kThreads>::TempStorage scanTemp;

    int64_t const b = blockIdx.x;
    T const* x = features + b * N * C;
    float const* imp = importance ? importance + b * N : nullptr;
    int const warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    for (int64_t i = P + warp; i < N; i += kWarps) {
        float const ss = warpDot(x + i * C, x + i * C, C);
        if (lane == 0) {
            invNorm[i] = rsqrtf(fmaxf(ss, 1e-24f));  // |x| clamped at 1e-12, as F.normalize
            taken[i] = 0;
        }
    }
    __syncthreads();
    for (int64_t i = P + warp; i < N; i += kWarps) {
        float s = -FLT_MAX;  // mode 1: no similarity yet
        if (mode == 0) {     // distance to the nearest other candidate
            s = FLT_MAX;
            for (int64_t j = P; j < N; ++j) {
                if (j == i) continue;
                s = fminf(s, 1.f - warpDot(x + i * C, x + j * C, C) * invNorm[i] * invNorm[j]);
            }
        }
        if (lane == 0) score[i] = s;
    }
    __syncthreads();

    for (int64_t step = 0; step < K; ++step) {
        Best best{0.f, -1};
        for (int64_t i = P + threadIdx.x; i < N; i += kThreads) {
            if (taken[i]) continue;
            // MMR's first pick is argmax importance for every lambda (IDPruner's first round; lambda = 0 too)
            float const v = mode == 0 ? score[i] : step == 0 ? imp[i] : lambda * imp[i] - (1.f - lambda) * score[i];
            best = better(best, Best{v, static_cast<int>(i)});
        }
        for (int o = 16; o > 0; o >>= 1) {
            Best other{__shfl_xor_sync(0xffffffffu, best.value, o), __shfl_xor_sync(0xffffffffu, best.index, o)};
            best = better(best, other);
        }
        if (lane == 0) warpBest[warp] = best;
        __syncthreads();
        if (threadIdx.x == 0) {
            Best all = warpBest[0];
            for (int w = 1; w < kWarps; ++w) all = better(all, warpBest[w]);
            pick = all.index;
            taken[all.index] = 1;
        }
        __syncthreads();
        if (step + 1 == K) break;
        int64_t const s = pick;
        for (int64_t c = threadIdx.x; c < C; c += kThreads) chosen[c] = toFloat(x[s * C + c]) * invNorm[s];
        __syncthreads();
        for (int64_t i = P + warp; i < N; i += kWarps) {
            if (taken[i]) continue;
            float const sim = warpDot(x + i * C, chosen, C) * invNorm[i];
            // DivPrune: after the first pick the state is the min distance to the CHOSEN set only (the first
            // pick's own score, its nearest-neighbour distance, is not part of it).
            if (lane == 0) score[i] = mode == 0 ? (step == 0 ? 1.f - sim : fminf(score[i], 1.f - sim)) : fmaxf(score[i], sim);
        }
        __syncthreads();
    }

    compactFlagged<kThreads>(P, N, [taken](int64_t i) { return taken[i] != 0; }, indices + b * K, K, scanTemp);
}

template <typename T>
cudaError_t launch(T const* features, float const* importance, int64_t B, int64_t N, int64_t C, int64_t K, int64_t P,
                   int mode, float lambda, int32_t* indices, cudaStream_t stream) {
    std::size_t const smem = static_cast<std::size_t>(N) * (2 * sizeof(float) + 1) + C * sizeof(float) + 16;
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    // The static shared memory (cub scan temp, warp results; < 4 KiB) counts against the same limits.
    constexpr std::size_t kStaticBound = 4096, kDefaultLimit = 48 * 1024;
    if (smem + kStaticBound > static_cast<std::size_t>(optin)) return cudaErrorInvalidValue;
    if (smem + kStaticBound > kDefaultLimit) {
        err = cudaFuncSetAttribute(diversitySelectKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem));
        if (err != cudaSuccess) return err;
    }
    diversitySelectKernel<T><<<B, kThreads, smem, stream>>>(features, importance, N, C, K, P, mode, lambda, indices);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launchDiversitySelect(void const* features, bool isHalf, float const* importance, int64_t B, int64_t N,
                                  int64_t C, int64_t K, int64_t numPrefix, int mode, float lambda, int32_t* indices,
                                  cudaStream_t stream) {
    if (B <= 0 || K <= 0) return cudaSuccess;
    if (numPrefix < 0 || N - numPrefix < K || N > 0x7fffffff || (mode == 1 && importance == nullptr)) {
        return cudaErrorInvalidValue;
    }
    if (isHalf) {
        return launch(static_cast<__half const*>(features), importance, B, N, C, K, numPrefix, mode, lambda, indices,
                      stream);
    }
    return launch(static_cast<float const*>(features), importance, B, N, C, K, numPrefix, mode, lambda, indices, stream);
}

}  // namespace tokensieve
