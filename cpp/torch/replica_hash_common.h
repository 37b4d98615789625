// Argument checks of epmoe::replica_hash, shared by the CPU and CUDA impls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpp/torch/dtype_name.h"

namespace epmoe {

// topk_idx int32/int64 [T, k]; log2phy int64 [E, M]; logcnt int64 [E]; all contiguous on one device.
inline void check_replica_hash_args(const at::Tensor& topk_idx, const at::Tensor& log2phy, const at::Tensor& logcnt) {
    TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kInt || topk_idx.scalar_type() == at::kLong,
                     "topk_idx must be int32 or int64, got ", dtype_name(topk_idx.scalar_type()));
    TORCH_CHECK_VALUE(topk_idx.dim() == 2 && topk_idx.is_contiguous(),
                      "topk_idx must be a contiguous [num_tokens, num_topk] tensor, got shape ", topk_idx.sizes());
    for (const auto& [t, name] : {std::pair{&log2phy, "log2phy"}, {&logcnt, "logcnt"}}) {
        TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, name, " must be int64, got ", dtype_name(t->scalar_type()));
        TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
        TORCH_CHECK_VALUE(t->device() == topk_idx.device(), name, " must be on ", topk_idx.device(),
                          " like topk_idx, got ", t->device());
    }
    TORCH_CHECK_VALUE(log2phy.dim() == 2 && log2phy.size(0) >= 1 && log2phy.size(1) >= 1,
                      "log2phy must have shape [num_experts, max_replicas], got ", log2phy.sizes());
    TORCH_CHECK_VALUE(logcnt.dim() == 1 && logcnt.size(0) == log2phy.size(0), "logcnt must have shape [",
                      log2phy.size(0), "] (num_experts of log2phy), got ", logcnt.sizes());
}

}  // namespace epmoe
