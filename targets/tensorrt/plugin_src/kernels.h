// Kernel launchers. Plain types only, so the .cu files never include TensorRT headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tokensieve {

// tokens [B,N,C] (elemBytes 4 = float, 2 = half), mask [B,N] (maskBytes 4 = int32, 1 = bool; nonzero = keep)
// -> out [B,K,C]: the first K kept rows in their original order, zero rows after them; count [B] = rows written.
// With `size` (device int32, data-dependent form): *size = S = max(max_b count_b, minCount) and out is [B,S,C]
// instead (row stride S; S = 0 for B = 0); minCount is ignored without it.
// workspace: tokenCompactWorkspaceSize(B, K) bytes.
std::size_t tokenCompactWorkspaceSize(int64_t B, int64_t K);
cudaError_t launchTokenCompact(void const* tokens, int elemBytes, void const* mask, int maskBytes, int64_t B, int64_t N,
                               int64_t C, int64_t K, int32_t minCount, void* workspace, void* out, int32_t* count,
                               int32_t* size, cudaStream_t stream);

// features [B,N,C] (float, or half when isHalf), importance [B,N] float (MMR only, may be null in mode 0)
// -> indices [B,K] int32, ascending, each in [numPrefix, N). mode 0: DivPrune, mode 1: MMR with weight lambda.
// cudaErrorInvalidValue when N - numPrefix < K or the per-block shared memory (8N + 4C + N bytes) does not fit.
cudaError_t launchDiversitySelect(void const* features, bool isHalf, float const* importance, int64_t B, int64_t N,
                                  int64_t C, int64_t K, int64_t numPrefix, int mode, float lambda, int32_t* indices,
                                  cudaStream_t stream);

}  // namespace tokensieve
