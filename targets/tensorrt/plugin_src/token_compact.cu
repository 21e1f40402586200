// TokenCompact kernels: (1) one block per batch element turns the keep mask into the source row of each output
// row (a block scan, so kept tokens stay in order), writes count[b] and, in the data-dependent form, folds it into
// S = max(max_b count_b, minCount) with an atomicMax; (2) one block per output row copies that row, or writes zeros.
// S is only known on the device, so kernel (2) reads it from the size output (stream order makes it final) and
// lays rows out with stride S, skipping rows k >= S. The copy moves raw words, so it serves float and half alike.
#include "compact_scan.cuh"
#include "kernels.h"

namespace tokensieve {
namespace {

constexpr int kScanThreads = 256;
constexpr int kCopyThreads = 128;

template <typename M>
__global__ void sourceRowsKernel(M const* mask, int64_t N, int64_t K, int32_t minCount, int32_t* srcRows,
                                 int32_t* count, int32_t* size) {
    __shared__ typename cub::BlockScan<int, kScanThreads>::TempStorage temp;
    int64_t const b = blockIdx.x;
    M const* m = mask + b * N;
    int32_t* rows = srcRows + b * K;
    int const kept = compactFlagged<kScanThreads>(0, N, [m](int64_t i) { return m[i] != 0; }, rows, K, temp);
    int64_t const written = kept < K ? kept : K;
    for (int64_t p = written + threadIdx.x; p < K; p += kScanThreads) rows[p] = -1;  // padding rows
    if (threadIdx.x == 0) {
        count[b] = static_cast<int32_t>(written);
        if (size != nullptr) atomicMax(size, written > minCount ? static_cast<int32_t>(written) : minCount);
    }
}

// grid (K, B): block (k, b) fills output row k of batch b; rowWords = row size in units of W. The row stride is
// *size when it is given (data-dependent form, rows k >= S do not exist), else K.
template <typename W>
__global__ void copyRowsKernel(W const* tokens, int32_t const* srcRows, int64_t N, int64_t K, int32_t const* size,
                               int64_t rowWords, W* out) {
    int64_t const b = blockIdx.y, k = blockIdx.x;
    int64_t const S = size != nullptr ? *size : K;
    if (k >= S) return;
    int32_t const src = srcRows[b * K + k];
    W* dst = out + (b * S + k) * rowWords;
    if (src < 0) {
        W zero;
        memset(&zero, 0, sizeof(W));
        for (int64_t i = threadIdx.x; i < rowWords; i += kCopyThreads) dst[i] = zero;
        return;
    }
    W const* row = tokens + (b * N + src) * rowWords;
    for (int64_t i = threadIdx.x; i < rowWords; i += kCopyThreads) dst[i] = row[i];
}

template <typename W>
void launchCopy(void const* tokens, int32_t const* rows, int64_t B, int64_t N, int64_t K, int32_t const* size,
                int64_t rowBytes, void* out, cudaStream_t stream) {
    dim3 const grid(static_cast<unsigned>(K), static_cast<unsigned>(B));
    copyRowsKernel<W><<<grid, kCopyThreads, 0, stream>>>(static_cast<W const*>(tokens), rows, N, K, size,
                                                          rowBytes / static_cast<int64_t>(sizeof(W)), static_cast<W*>(out));
}

}  // namespace

std::size_t tokenCompactWorkspaceSize(int64_t B, int64_t K) {
    return static_cast<std::size_t>(B * K) * sizeof(int32_t);
}

cudaError_t launchTokenCompact(void const* tokens, int elemBytes, void const* mask, int maskBytes, int64_t B, int64_t N,
                               int64_t C, int64_t K, int32_t minCount, void* workspace, void* out, int32_t* count,
                               int32_t* size, cudaStream_t stream) {
    if (size != nullptr) {  // the atomicMax in sourceRowsKernel starts from 0 (an empty batch has S = 0)
        cudaError_t const err = cudaMemsetAsync(size, 0, sizeof(int32_t), stream);
        if (err != cudaSuccess) return err;
    }
    if (B <= 0 || K <= 0) return cudaSuccess;
    if (B > 65535 || K > 0x7fffffff || N > 0x7fffffff || (maskBytes != 1 && maskBytes != 4)) return cudaErrorInvalidValue;
    auto* rows = static_cast<int32_t*>(workspace);
    if (maskBytes == 4) {
        sourceRowsKernel<int32_t><<<B, kScanThreads, 0, stream>>>(static_cast<int32_t const*>(mask), N, K, minCount,
                                                                   rows, count, size);
    } else {
        sourceRowsKernel<uint8_t><<<B, kScanThreads, 0, stream>>>(static_cast<uint8_t const*>(mask), N, K, minCount,
                                                                   rows, count, size);
    }
    int64_t const rowBytes = C * elemBytes;
    // TensorRT hands out 256-byte aligned buffers, so the widest word that divides a row keeps every row aligned.
    if (rowBytes % 16 == 0) {
        launchCopy<uint4>(tokens, rows, B, N, K, size, rowBytes, out, stream);
    } else if (rowBytes % 4 == 0) {
        launchCopy<uint32_t>(tokens, rows, B, N, K, size, rowBytes, out, stream);
    } else {
        launchCopy<uint16_t>(tokens, rows, B, N, K, size, rowBytes, out, stream);
    }
    return cudaGetLastError();
}

}  // namespace tokensieve
