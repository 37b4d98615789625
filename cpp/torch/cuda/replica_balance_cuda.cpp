// epmoe::balance_replicas CUDA impl: checks shapes (not values: that would sync), then the torch-free launcher on
// the current stream with a workspace from the caching allocator. No host sync: graph-capturable.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cpp/torch/replica_balance_common.h"
#include "cuda/replica_balance.cuh"

namespace epmoe {
namespace {

at::Tensor balance_replicas_cuda(const at::Tensor& topk_idx, const at::Tensor& log2phy, const at::Tensor& logcnt,
                                 const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& prefix,
                                 int64_t num_slots, int64_t num_ranks) {
    const core::BalanceShape s = check_balance_args(topk_idx, log2phy, logcnt, counts, prefix, num_slots, num_ranks);
    TORCH_CHECK_VALUE(s.num_experts <= cuda::kBalanceMaxExperts, "balance_replicas on CUDA supports at most ",
                      cuda::kBalanceMaxExperts, " experts, got ", s.num_experts);
    const c10::cuda::CUDAGuard guard(topk_idx.device());
    const int64_t num_pairs = topk_idx.numel();
    const int64_t words = static_cast<int64_t>(cuda::balance_workspace_bytes(s, num_pairs) / 8 + 1);
    auto workspace = at::empty({words}, topk_idx.options().dtype(at::kLong));
    auto out = at::empty_like(topk_idx);
    cuda::launch_balance_replicas(topk_idx.data_ptr(), topk_idx.scalar_type() == at::kLong, num_pairs, s,
                                  log2phy.data_ptr<int64_t>(), logcnt.data_ptr<int64_t>(),
                                  counts.has_value() ? counts->data_ptr<int64_t>() : nullptr,
                                  prefix.has_value() ? prefix->data_ptr<int64_t>() : nullptr, workspace.data_ptr(),
                                  out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    return out;
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_IMPL(epmoe, CUDA, m) {
    m.impl("balance_replicas", &epmoe::balance_replicas_cuda);
}
