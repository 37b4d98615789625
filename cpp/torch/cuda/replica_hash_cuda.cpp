// epmoe::replica_hash CUDA impl: shape checks, then the torch-free kernel on the current stream (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cpp/torch/replica_balance_common.h"
#include "cuda/replica_hash.cuh"

namespace epmoe {
namespace {

at::Tensor replica_hash_cuda(const at::Tensor& topk_idx, const at::Tensor& log2phy, const at::Tensor& logcnt,
                             int64_t token_offset, int64_t layer) {
    check_replica_hash_args(topk_idx, log2phy, logcnt);
    const c10::cuda::CUDAGuard guard(topk_idx.device());
    auto out = at::empty_like(topk_idx);
    cuda::launch_replica_hash(topk_idx.data_ptr(), topk_idx.scalar_type() == at::kLong, topk_idx.size(0),
                              topk_idx.size(1), log2phy.data_ptr<int64_t>(), log2phy.size(0), log2phy.size(1),
                              logcnt.data_ptr<int64_t>(), token_offset, layer, out.data_ptr(),
                              c10::cuda::getCurrentCUDAStream().stream());
    return out;
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_IMPL(epmoe, CUDA, m) {
    m.impl("replica_hash", &epmoe::replica_hash_cuda);
}
