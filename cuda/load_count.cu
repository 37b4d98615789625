// Per-slot load counter: a shared-memory histogram per block, then one global atomic per non-zero bin.
#include "cpp/core/check.h"
#include "cuda/load_count.cuh"

namespace epmoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSharedBins = 8192;  // 32 KiB of uint32 bins; more slots count straight into global memory

__global__ void count_slots_kernel(unsigned long long* counts, int64_t num_slots, const int32_t* slot_idx,
                                   int64_t num_ids, bool use_shared) {
    extern __shared__ unsigned int bins[];
    if (use_shared) {
        for (int64_t s = threadIdx.x; s < num_slots; s += blockDim.x)
            bins[s] = 0;
        __syncthreads();
    }
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_ids; i += stride) {
        const int32_t s = slot_idx[i];
        if (s < 0 or s >= num_slots)
            continue;
        if (use_shared)
            atomicAdd(&bins[s], 1u);
        else
            atomicAdd(&counts[s], 1ull);
    }
    if (use_shared) {
        __syncthreads();
        for (int64_t s = threadIdx.x; s < num_slots; s += blockDim.x)
            if (bins[s] != 0)
                atomicAdd(&counts[s], static_cast<unsigned long long>(bins[s]));
    }
}

}  // namespace

void launch_count_slots(int64_t* counts, int64_t num_slots, const int32_t* slot_idx, int64_t num_ids,
                        cudaStream_t stream) {
    if (num_ids == 0 or num_slots == 0)
        return;
    const bool use_shared = num_slots <= kMaxSharedBins;
    const int64_t wanted = (num_ids + kThreads - 1) / kThreads;
    const int num_blocks = static_cast<int>(wanted < 256 ? wanted : 256);
    const size_t smem = use_shared ? static_cast<size_t>(num_slots) * sizeof(unsigned int) : 0;
    // int64 counters viewed as unsigned long long for atomicAdd: same size, and counts never go negative
    count_slots_kernel<<<num_blocks, kThreads, smem, stream>>>(reinterpret_cast<unsigned long long*>(counts),
                                                               num_slots, slot_idx, num_ids, use_shared);
    EPMOE_LAUNCH_CHECK();
}

}  // namespace epmoe::cuda
