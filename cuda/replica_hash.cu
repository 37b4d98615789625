// "hash" replica policy: one thread per (token, top-k position).
#include "cpp/core/check.h"
#include "cpp/core/replica_hash.h"
#include "cuda/replica_hash.cuh"

namespace epmoe::cuda {

namespace {

constexpr int kThreads = 256;

template <typename Idx>
__global__ void replica_hash_kernel(const Idx* topk_idx, int64_t num_slots_total, int64_t num_topk,
                                    const int64_t* log2phy, int64_t num_experts, int64_t width, const int64_t* logcnt,
                                    int64_t token_offset, int64_t layer, Idx* out) {
    const int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (f >= num_slots_total) return;
    const int64_t e = topk_idx[f];
    if (e < 0 || e >= num_experts) {
        out[f] = -1;
        return;
    }
    const int64_t count = logcnt[e];
    if (count < 1 || count > width) {
        out[f] = -1;
        return;
    }
    const int64_t t = f / num_topk, j = f - t * num_topk;
    out[f] = static_cast<Idx>(log2phy[e * width + core::replica_of(core::replica_hash32(t + token_offset, j, layer),
                                                                    count)]);
}

}  // namespace

void launch_replica_hash(const void* topk_idx, bool idx_is_64, int64_t num_tokens, int64_t num_topk,
                         const int64_t* log2phy, int64_t num_experts, int64_t width, const int64_t* logcnt,
                         int64_t token_offset, int64_t layer, void* out, cudaStream_t stream) {
    const int64_t n = num_tokens * num_topk;
    if (n == 0) return;
    const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    if (idx_is_64) {
        replica_hash_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const int64_t*>(topk_idx), n, num_topk,
                                                             log2phy, num_experts, width, logcnt, token_offset, layer,
                                                             static_cast<int64_t*>(out));
    } else {
        replica_hash_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const int32_t*>(topk_idx), n, num_topk,
                                                             log2phy, num_experts, width, logcnt, token_offset, layer,
                                                             static_cast<int32_t*>(out));
    }
    EPMOE_LAUNCH_CHECK();
}

}  // namespace epmoe::cuda
