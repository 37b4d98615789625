// GPU test of the "balanced" replica launcher (cuda/replica_balance.cuh) against the host core. Skipped without a
// device.
#ifdef EPMOE_WITH_CUDA
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cpp/core/replica_balance.h"
#include "cuda/replica_balance.cuh"
#include "tests/cpp/cuda_test_utils.h"

namespace epmoe::test {
namespace {

TEST(ReplicaBalanceCuda, MatchesHost) {
    EPMOE_SKIP_IF_NO_GPU();
    std::mt19937 rng(4);
    const int num_experts = 40, num_ranks = 8, slots_per_rank = 7;
    core::BalanceShape s;
    s.num_experts = num_experts;
    s.num_ranks = num_ranks;
    s.num_slots = num_ranks * slots_per_rank;
    std::vector<int> phy2log(s.num_slots);
    for (int64_t p = 0; p < s.num_slots; ++p) phy2log[p] = p < num_experts ? p : static_cast<int>(rng() % 5);
    std::vector<int64_t> logcnt(num_experts, 0);
    for (int e : phy2log) ++logcnt[e];
    s.max_replicas = 0;
    for (auto c : logcnt) s.max_replicas = std::max<int>(s.max_replicas, static_cast<int>(c));
    std::vector<int64_t> log2phy(static_cast<size_t>(num_experts) * s.max_replicas, -1);
    std::vector<int> filled(num_experts, 0);
    for (int64_t p = 0; p < s.num_slots; ++p) log2phy[phy2log[p] * s.max_replicas + filled[phy2log[p]]++] = p;
    for (int64_t num_pairs : {int64_t{0}, int64_t{1}, int64_t{5000}, int64_t{70000}}) {
        std::vector<int32_t> topk_idx(num_pairs);
        for (auto& v : topk_idx) v = static_cast<int32_t>(rng() % 8 == 0 ? rng() % num_experts : rng() % 6) - 1;
        // Host: count, solve, assign (as a middle rank of three: the group holds 3x these pairs).
        std::vector<int64_t> local(num_experts, 0), counts(num_experts), prefix(num_experts), quota(log2phy.size());
        ASSERT_EQ(core::balance_count(topk_idx.data(), num_pairs, num_experts, local.data()), -1);
        for (int e = 0; e < num_experts; ++e) {
            counts[e] = 3 * local[e];
            prefix[e] = local[e];
        }
        std::vector<int64_t> scratch(core::balance_scratch_bytes(s) / 8 + 1), assign_scratch(3 * num_experts);
        core::balance_quotas(s, counts.data(), log2phy.data(), logcnt.data(),
                             core::balance_scratch_carve(scratch.data(), s), quota.data());
        std::vector<int32_t> want(num_pairs);
        core::balance_assign(topk_idx.data(), num_pairs, s, log2phy.data(), logcnt.data(), quota.data(), prefix.data(),
                             assign_scratch.data(), want.data());
        DeviceBuffer<int32_t> d_idx(topk_idx.empty() ? std::vector<int32_t>{0} : topk_idx);
        DeviceBuffer<int64_t> d_l2p(log2phy), d_cnt(logcnt), d_counts(counts), d_prefix(prefix);
        DeviceBuffer<int64_t> d_ws(cuda::balance_workspace_bytes(s, num_pairs) / 8 + 1);
        DeviceBuffer<int32_t> d_out(num_pairs ? num_pairs : 1);
        cuda::launch_balance_replicas(d_idx.get(), false, num_pairs, s, d_l2p.get(), d_cnt.get(), d_counts.get(),
                                      d_prefix.get(), d_ws.get(), d_out.get(), nullptr);
        std::vector<int32_t> got = d_out.to_host();
        got.resize(num_pairs);
        EXPECT_EQ(got, want) << num_pairs << " pairs";
    }
}

}  // namespace
}  // namespace epmoe::test
#endif
