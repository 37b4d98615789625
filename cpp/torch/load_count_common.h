// Argument checks of epmoe::count_slots, shared by the CPU and CUDA impls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpp/torch/dtype_name.h"

namespace epmoe {

inline void check_count_slots_args(const at::Tensor& counts, const at::Tensor& slot_idx) {
    TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "counts must be int64, got ", dtype_name(counts.scalar_type()));
    TORCH_CHECK_VALUE(counts.dim() == 1 and counts.is_contiguous(), "counts must be a contiguous 1-D tensor [P]");
    TORCH_CHECK_TYPE(slot_idx.scalar_type() == at::kInt, "slot_idx must be int32, got ",
                     dtype_name(slot_idx.scalar_type()));
    TORCH_CHECK_VALUE(slot_idx.is_contiguous(), "slot_idx must be contiguous");
    TORCH_CHECK_VALUE(slot_idx.device() == counts.device(), "slot_idx must be on ", counts.device(), " like counts, got ",
                      slot_idx.device());
}

}  // namespace epmoe
