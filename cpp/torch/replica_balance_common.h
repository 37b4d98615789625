// Argument checks of epmoe::balance_replicas, epmoe::replica_quotas and epmoe::replica_hash, shared by the CPU and
// CUDA impls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "cpp/core/replica_balance.h"
#include "cpp/torch/dtype_name.h"

namespace epmoe {

inline void check_int64_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

// Checks the placement maps of `num_layers` layers (0: a single layer, log2phy [E, M] and logcnt [E]) and returns
// the problem shape. Values are checked by the CPU impls only (reading them on a GPU would sync).
inline core::BalanceShape check_placement_maps(const at::Tensor& log2phy, const at::Tensor& logcnt, int64_t num_slots,
                                               int64_t num_ranks, int64_t num_layers, const at::Tensor& like) {
    check_int64_tensor(log2phy, "log2phy", like);
    check_int64_tensor(logcnt, "logcnt", like);
    const int64_t lead = num_layers > 0 ? 1 : 0;
    TORCH_CHECK_VALUE(log2phy.dim() == 2 + lead, "log2phy must have shape ", num_layers > 0 ? "[L, E, M]" : "[E, M]",
                      ", got ", log2phy.sizes());
    TORCH_CHECK_VALUE(logcnt.dim() == 1 + lead && logcnt.size(lead) == log2phy.size(lead) &&
                          (lead == 0 || logcnt.size(0) == log2phy.size(0)),
                      "logcnt must have shape ", num_layers > 0 ? "[L, E]" : "[E]", " matching log2phy ",
                      log2phy.sizes(), ", got ", logcnt.sizes());
    if (num_layers > 0) {
        TORCH_CHECK_VALUE(log2phy.size(0) == num_layers, "log2phy must hold ", num_layers, " layers, got ",
                          log2phy.size(0));
    }
    TORCH_CHECK_VALUE(num_ranks >= 1, "num_ranks must be >= 1, got ", num_ranks);
    TORCH_CHECK_VALUE(num_slots >= 1 && num_slots % num_ranks == 0 && num_slots < (int64_t{1} << 30),
                      "num_slots must be a positive multiple of num_ranks (", num_ranks, "), got ", num_slots);
    const int64_t num_experts = log2phy.size(lead), width = log2phy.size(lead + 1);
    TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= num_slots, "log2phy must hold 1 to num_slots (", num_slots,
                      ") experts, got ", num_experts);
    TORCH_CHECK_VALUE(width >= 1 && width <= num_slots, "log2phy must have 1 to num_slots replica columns, got ", width);
    core::BalanceShape s;
    s.num_experts = static_cast<int>(num_experts);
    s.max_replicas = static_cast<int>(width);
    s.num_ranks = static_cast<int>(num_ranks);
    s.num_slots = num_slots;
    return s;
}

// counts / prefix: int64 [E] (or [L, E] with `num_layers` > 0) on the device of `like`.
inline void check_counts(const std::optional<at::Tensor>& t, const char* name, const core::BalanceShape& s,
                         int64_t num_layers, const at::Tensor& like) {
    if (!t.has_value()) return;
    check_int64_tensor(*t, name, like);
    if (num_layers > 0) {
        TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == num_layers && t->size(1) == s.num_experts, name,
                          " must have shape [", num_layers, ", ", s.num_experts, "], got ", t->sizes());
    } else {
        TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == s.num_experts, name, " must have shape [", s.num_experts,
                          "] (num_experts), got ", t->sizes());
    }
}

inline void check_topk_idx(const at::Tensor& topk_idx) {
    TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kInt || topk_idx.scalar_type() == at::kLong,
                     "topk_idx must be int32 or int64, got ", dtype_name(topk_idx.scalar_type()));
    TORCH_CHECK_VALUE(topk_idx.dim() == 2, "topk_idx must have shape [num_tokens, num_topk], got ", topk_idx.sizes());
    TORCH_CHECK_VALUE(topk_idx.is_contiguous(), "topk_idx must be contiguous");
}

// The arguments of balance_replicas (one layer), as both impls take them; returns the problem shape.
inline core::BalanceShape check_balance_args(const at::Tensor& topk_idx, const at::Tensor& log2phy,
                                             const at::Tensor& logcnt, const std::optional<at::Tensor>& counts,
                                             const std::optional<at::Tensor>& prefix, int64_t num_slots,
                                             int64_t num_ranks) {
    check_topk_idx(topk_idx);
    const core::BalanceShape s = check_placement_maps(log2phy, logcnt, num_slots, num_ranks, 0, topk_idx);
    check_counts(counts, "counts", s, 0, topk_idx);
    check_counts(prefix, "prefix", s, 0, topk_idx);
    TORCH_CHECK_VALUE(!prefix.has_value() || counts.has_value(), "prefix needs counts (the group's total pairs)");
    return s;
}

// replica_hash: topk_idx int32/int64 [T, k]; log2phy int64 [E, M]; logcnt int64 [E]; contiguous, on one device.
inline void check_replica_hash_args(const at::Tensor& topk_idx, const at::Tensor& log2phy, const at::Tensor& logcnt) {
    check_topk_idx(topk_idx);
    check_int64_tensor(log2phy, "log2phy", topk_idx);
    check_int64_tensor(logcnt, "logcnt", topk_idx);
    TORCH_CHECK_VALUE(log2phy.dim() == 2 && log2phy.size(0) >= 1 && log2phy.size(1) >= 1,
                      "log2phy must have shape [num_experts, max_replicas], got ", log2phy.sizes());
    TORCH_CHECK_VALUE(logcnt.dim() == 1 && logcnt.size(0) == log2phy.size(0), "logcnt must have shape [",
                      log2phy.size(0), "] (num_experts of log2phy), got ", logcnt.sizes());
}

}  // namespace epmoe
