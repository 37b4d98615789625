// epmoe::balance_replicas / epmoe::replica_quotas: schemas and CPU impls of the "balanced" replica policy (EPLB).
// The solver and the assignment are the torch-free core (cpp/core/replica_balance.h); here: checks and buffers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpp/torch/replica_balance_common.h"

namespace epmoe {
namespace {

// The first logcnt entries of each replica list must be valid slots, ascending (the padding is never read).
void check_placement_values(const core::BalanceShape& s, const int64_t* log2phy, const int64_t* logcnt,
                            int64_t num_layers) {
    const int64_t width = s.max_replicas;
    for (int64_t row = 0; row < num_layers * s.num_experts; ++row) {
        const int64_t n = logcnt[row];
        TORCH_CHECK_VALUE(n >= 1 && n <= width, "logcnt values must lie in [1, ", width, "], got ", n,
                          " at flat index ", row);
        const int64_t* slots = log2phy + row * width;
        for (int64_t i = 0; i < n; ++i) {
            const bool ok = slots[i] >= 0 && slots[i] < s.num_slots && (i == 0 || slots[i] > slots[i - 1]);
            TORCH_CHECK_VALUE(ok, "log2phy row ", row, " must start with logcnt ascending slots in [0, ", s.num_slots,
                              "), got ", slots[i], " at column ", i);
        }
    }
}

void check_nonnegative(const int64_t* values, int64_t n, const char* name) {
    for (int64_t i = 0; i < n; ++i)
        TORCH_CHECK_VALUE(values[i] >= 0, name, " must be >= 0, got ", values[i], " at flat index ", i);
}

// per_slot[log2phy[e, i]] = per_replica[e, i] for the logcnt[e] replicas of every expert.
template <typename T>
void scatter_to_slots(const core::BalanceShape& s, const int64_t* log2phy, const int64_t* logcnt,
                      const T* per_replica, T* per_slot) {
    for (int e = 0; e < s.num_experts; ++e) {
        const int64_t row = static_cast<int64_t>(e) * s.max_replicas;
        for (int64_t i = 0; i < logcnt[e]; ++i) per_slot[log2phy[row + i]] = per_replica[row + i];
    }
}

int64_t solve_layer(const core::BalanceShape& s, const int64_t* counts, const int64_t* log2phy, const int64_t* logcnt,
                    std::vector<int64_t>& scratch, int64_t* quota) {
    scratch.resize(core::balance_scratch_bytes(s) / sizeof(int64_t) + 1);
    return core::balance_quotas(s, counts, log2phy, logcnt, core::balance_scratch_carve(scratch.data(), s), quota);
}

template <typename Idx>
void balance_replicas_impl(const at::Tensor& topk_idx, const core::BalanceShape& s, const int64_t* log2phy,
                           const int64_t* logcnt, const int64_t* counts, const int64_t* prefix, at::Tensor& out) {
    const int64_t n = topk_idx.numel();
    const Idx* idx = topk_idx.data_ptr<Idx>();
    std::vector<int64_t> local(s.num_experts, 0);
    const int64_t bad = core::balance_count(idx, n, s.num_experts, local.data());
    TORCH_CHECK_VALUE(bad < 0, "topk_idx values must lie in [-1, ", s.num_experts, ") (num_experts), got ",
                      bad < 0 ? 0 : static_cast<int64_t>(idx[bad]), " at flat index ", bad);
    if (counts == nullptr) {
        counts = local.data();
    } else {
        for (int e = 0; e < s.num_experts; ++e) {
            const int64_t before = prefix != nullptr ? prefix[e] : 0;
            TORCH_CHECK_VALUE(before + local[e] <= counts[e], "counts[", e, "] (", counts[e],
                              ") must be >= prefix[", e, "] (", before, ") + this call's pairs of expert ", e, " (",
                              local[e], ")");
        }
    }
    std::vector<int64_t> quota(static_cast<size_t>(s.num_experts) * s.max_replicas), scratch;
    solve_layer(s, counts, log2phy, logcnt, scratch, quota.data());
    scratch.assign(3 * static_cast<size_t>(s.num_experts), 0);
    core::balance_assign(idx, n, s, log2phy, logcnt, quota.data(), prefix, scratch.data(), out.data_ptr<Idx>());
}

at::Tensor balance_replicas_cpu(const at::Tensor& topk_idx, const at::Tensor& log2phy, const at::Tensor& logcnt,
                                const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& prefix,
                                int64_t num_slots, int64_t num_ranks) {
    const core::BalanceShape s = check_balance_args(topk_idx, log2phy, logcnt, counts, prefix, num_slots, num_ranks);
    const int64_t* l2p = log2phy.data_ptr<int64_t>();
    const int64_t* cnt = logcnt.data_ptr<int64_t>();
    check_placement_values(s, l2p, cnt, 1);
    const int64_t* counts_ptr = counts.has_value() ? counts->data_ptr<int64_t>() : nullptr;
    const int64_t* prefix_ptr = prefix.has_value() ? prefix->data_ptr<int64_t>() : nullptr;
    if (counts_ptr != nullptr) check_nonnegative(counts_ptr, s.num_experts, "counts");
    if (prefix_ptr != nullptr) check_nonnegative(prefix_ptr, s.num_experts, "prefix");
    auto out = at::empty_like(topk_idx);
    if (topk_idx.scalar_type() == at::kInt)
        balance_replicas_impl<int32_t>(topk_idx, s, l2p, cnt, counts_ptr, prefix_ptr, out);
    else
        balance_replicas_impl<int64_t>(topk_idx, s, l2p, cnt, counts_ptr, prefix_ptr, out);
    return out;
}

at::Tensor replica_quotas_cpu(const at::Tensor& counts, const at::Tensor& log2phy, const at::Tensor& logcnt,
                              int64_t num_slots, int64_t num_ranks) {
    TORCH_CHECK_VALUE(log2phy.dim() == 3, "log2phy must have shape [L, E, M], got ", log2phy.sizes());
    const int64_t num_layers = log2phy.size(0);
    const core::BalanceShape s = check_placement_maps(log2phy, logcnt, num_slots, num_ranks, num_layers, counts);
    check_counts(counts, "counts", s, num_layers, counts);
    const int64_t* l2p = log2phy.data_ptr<int64_t>();
    const int64_t* cnt = logcnt.data_ptr<int64_t>();
    const int64_t* counts_ptr = counts.data_ptr<int64_t>();
    check_placement_values(s, l2p, cnt, num_layers);
    check_nonnegative(counts_ptr, num_layers * s.num_experts, "counts");
    auto quota = at::empty({num_layers, s.num_slots}, counts.options());
    int64_t* quota_ptr = quota.data_ptr<int64_t>();
    const int64_t row = static_cast<int64_t>(s.num_experts) * s.max_replicas;
    // Serial: a layer takes microseconds, less than waking the thread pool.
    std::vector<int64_t> scratch, per_replica(row);
    for (int64_t l = 0; l < num_layers; ++l) {
        solve_layer(s, counts_ptr + l * s.num_experts, l2p + l * row, cnt + l * s.num_experts, scratch,
                    per_replica.data());
        scatter_to_slots(s, l2p + l * row, cnt + l * s.num_experts, per_replica.data(), quota_ptr + l * s.num_slots);
    }
    return quota;
}

at::Tensor replica_shares_cpu(const at::Tensor& load, const at::Tensor& log2phy, const at::Tensor& logcnt,
                              int64_t num_slots, int64_t num_ranks, int64_t num_sweeps) {
    TORCH_CHECK_VALUE(log2phy.dim() == 3, "log2phy must have shape [L, E, M], got ", log2phy.sizes());
    const int64_t num_layers = log2phy.size(0);
    const core::BalanceShape s = check_placement_maps(log2phy, logcnt, num_slots, num_ranks, num_layers, load);
    TORCH_CHECK_TYPE(load.scalar_type() == at::kDouble, "load must be float64, got ", load.scalar_type());
    TORCH_CHECK_VALUE(load.is_contiguous() && load.dim() == 2 && load.size(0) == num_layers &&
                          load.size(1) == s.num_experts,
                      "load must be a contiguous [", num_layers, ", ", s.num_experts, "] tensor, got ", load.sizes());
    TORCH_CHECK_VALUE(num_sweeps >= 0, "num_sweeps must be >= 0, got ", num_sweeps);
    const double* load_ptr = load.data_ptr<double>();
    for (int64_t i = 0; i < load.numel(); ++i)
        TORCH_CHECK_VALUE(std::isfinite(load_ptr[i]) && load_ptr[i] >= 0, "load must be finite and >= 0, got ",
                          load_ptr[i], " at flat index ", i);
    const int64_t* l2p = log2phy.data_ptr<int64_t>();
    const int64_t* cnt = logcnt.data_ptr<int64_t>();
    check_placement_values(s, l2p, cnt, num_layers);
    auto share = at::zeros({num_layers, s.num_slots}, load.options());
    double* share_ptr = share.data_ptr<double>();
    const int64_t row = static_cast<int64_t>(s.num_experts) * s.max_replicas;
    std::vector<double> per_replica(row);
    for (int64_t l = 0; l < num_layers; ++l) {
        core::replica_shares(s, load_ptr + l * s.num_experts, l2p + l * row, cnt + l * s.num_experts,
                             static_cast<int>(num_sweeps), per_replica.data());
        scatter_to_slots(s, l2p + l * row, cnt + l * s.num_experts, per_replica.data(), share_ptr + l * s.num_slots);
    }
    return share;
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // "balanced" replica choice: slot_idx [T, k] (topk_idx's dtype) from logical topk_idx [T, k] (-1 = skipped),
    // one layer's log2phy [E, M] / logcnt [E] (int64), the group's pairs per expert counts [E] (None: this call's)
    // and the pairs of lower ranks prefix [E] (None: 0). Per-rank loads of the group are the min-max optimum.
    m.def(
        "balance_replicas(Tensor topk_idx, Tensor log2phy, Tensor logcnt, Tensor? counts, Tensor? prefix, "
        "int num_slots, int num_ranks) -> Tensor");
    // Optimal integer quotas [L, P] int64 (pairs per slot) for counts [L, E] int64 and log2phy [L, E, M].
    m.def("replica_quotas(Tensor counts, Tensor log2phy, Tensor logcnt, int num_slots, int num_ranks) -> Tensor");
    // "weighted" replica shares [L, P] float64 (per slot) for a predicted load [L, E] float64: min-max, then
    // water-filling.
    m.def(
        "replica_shares(Tensor load, Tensor log2phy, Tensor logcnt, int num_slots, int num_ranks, int num_sweeps) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(epmoe, CPU, m) {
    m.impl("balance_replicas", &epmoe::balance_replicas_cpu);
    m.impl("replica_quotas", &epmoe::replica_quotas_cpu);
    m.impl("replica_shares", &epmoe::replica_shares_cpu);
}
