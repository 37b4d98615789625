// Launcher of the "hash" replica policy (cpp/core/replica_hash.h). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace epmoe::cuda {

// out[f] = log2phy[e * width + replica_of(replica_hash32(f / num_topk + token_offset, f % num_topk, layer),
// logcnt[e])] for e = topk_idx[f] in [0, num_experts); -1 stays -1; any other id, or a count outside [1, width],
// gives -1 (nothing is checked on the host: no sync). idx_is_64: topk_idx and out are int64, else int32.
void launch_replica_hash(const void* topk_idx, bool idx_is_64, int64_t num_tokens, int64_t num_topk,
                         const int64_t* log2phy, int64_t num_experts, int64_t width, const int64_t* logcnt,
                         int64_t token_offset, int64_t layer, void* out, cudaStream_t stream);

}  // namespace epmoe::cuda
