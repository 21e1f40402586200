// Block-wide stream compaction of indices, shared by TokenCompact (kept tokens) and DiversitySelect (picked tokens).
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace tokensieve {

// Writes the indices i in [begin, end) with flag(i) true, in ascending order, to out[0, limit); returns how many
// indices were flagged in total (may exceed limit). Every thread of the block must call it; the result is the same
// on all threads. Walks the range in chunks of kThreads, so any length works with fixed shared memory.
template <int kThreads, typename Flag>
__device__ int compactFlagged(int64_t begin, int64_t end, Flag flag, int32_t* out, int64_t limit,
                              typename cub::BlockScan<int, kThreads>::TempStorage& temp) {
    int running = 0;
    for (int64_t base = begin; base < end; base += kThreads) {
        int64_t const i = base + threadIdx.x;
        int const f = (i < end && flag(i)) ? 1 : 0;
        int pos = 0, total = 0;
        cub::BlockScan<int, kThreads>(temp).ExclusiveSum(f, pos, total);
        if (f && running + pos < limit) out[running + pos] = static_cast<int32_t>(i);
        running += total;
        __syncthreads();  // temp is reused by the next chunk
    }
    return running;
}

}  // namespace tokensieve
