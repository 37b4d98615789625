// The "balanced" replica solver (cpp/core/replica_balance.h): optimal against exhaustive search on small layers,
// quotas consistent with the counts, and the assignment of pairs split over ranks equal to one call on all of them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "cpp/core/replica_balance.h"

namespace {

using epmoe::core::BalanceShape;

struct Layer {
    BalanceShape shape;
    std::vector<int64_t> log2phy, logcnt;
};

// Every expert at least once, then random extra replicas; slots listed ascending per expert.
Layer random_layer(std::mt19937& rng, int num_experts, int num_ranks, int slots_per_rank) {
    Layer l;
    l.shape.num_experts = num_experts;
    l.shape.num_ranks = num_ranks;
    l.shape.num_slots = static_cast<int64_t>(num_ranks) * slots_per_rank;
    std::vector<int> phy2log(l.shape.num_slots);
    for (int64_t p = 0; p < l.shape.num_slots; ++p)
        phy2log[p] = p < num_experts ? static_cast<int>(p) : static_cast<int>(rng() % num_experts);
    std::shuffle(phy2log.begin(), phy2log.end(), rng);
    l.logcnt.assign(num_experts, 0);
    for (int e : phy2log) ++l.logcnt[e];
    l.shape.max_replicas = static_cast<int>(*std::max_element(l.logcnt.begin(), l.logcnt.end()));
    l.log2phy.assign(static_cast<size_t>(num_experts) * l.shape.max_replicas, -1);
    std::vector<int> filled(num_experts, 0);
    for (int64_t p = 0; p < l.shape.num_slots; ++p) {
        const int e = phy2log[p];
        l.log2phy[static_cast<size_t>(e) * l.shape.max_replicas + filled[e]++] = p;
    }
    return l;
}

int64_t solve(const Layer& l, const std::vector<int64_t>& counts, std::vector<int64_t>& quota) {
    std::vector<int64_t> scratch(epmoe::core::balance_scratch_bytes(l.shape) / 8 + 1);
    quota.assign(l.log2phy.size(), 0);
    return epmoe::core::balance_quotas(l.shape, counts.data(), l.log2phy.data(), l.logcnt.data(),
                                       epmoe::core::balance_scratch_carve(scratch.data(), l.shape), quota.data());
}

// Smallest max rank load over every split of every expert's pairs over its replicas.
int64_t exhaustive(const Layer& l, const std::vector<int64_t>& counts) {
    const int64_t per_rank = l.shape.num_slots / l.shape.num_ranks;
    std::vector<int64_t> load(l.shape.num_ranks, 0);
    int64_t best = INT64_MAX;
    std::function<void(int, int, int64_t)> rec = [&](int e, int i, int64_t left) {
        if (e == l.shape.num_experts) {
            best = std::min(best, *std::max_element(load.begin(), load.end()));
            return;
        }
        const int64_t slot = l.log2phy[static_cast<size_t>(e) * l.shape.max_replicas + i];
        const int64_t rank = slot / per_rank;
        if (i == l.logcnt[e] - 1) {
            load[rank] += left;
            rec(e + 1, 0, e + 1 < l.shape.num_experts ? counts[e + 1] : 0);
            load[rank] -= left;
            return;
        }
        for (int64_t take = 0; take <= left; ++take) {
            load[rank] += take;
            rec(e, i + 1, left - take);
            load[rank] -= take;
        }
    };
    rec(0, 0, counts[0]);
    return best;
}

TEST(ReplicaBalance, OptimalOnSmallLayers) {
    std::mt19937 rng(1);
    for (int trial = 0; trial < 300; ++trial) {
        const int num_ranks = 1 + static_cast<int>(rng() % 3), slots_per_rank = 1 + static_cast<int>(rng() % 3);
        const int num_experts = 1 + static_cast<int>(rng() % std::min(4, num_ranks * slots_per_rank));
        const Layer l = random_layer(rng, num_experts, num_ranks, slots_per_rank);
        std::vector<int64_t> counts(num_experts);
        for (auto& c : counts) c = rng() % 7;
        std::vector<int64_t> quota;
        const int64_t peak = solve(l, counts, quota);
        EXPECT_EQ(peak, exhaustive(l, counts)) << "trial " << trial;
        // Quotas sum to the counts, and their rank loads peak at the returned value.
        std::vector<int64_t> load(num_ranks, 0);
        for (int e = 0; e < num_experts; ++e) {
            int64_t sum = 0;
            for (int i = 0; i < l.logcnt[e]; ++i) {
                const size_t k = static_cast<size_t>(e) * l.shape.max_replicas + i;
                EXPECT_GE(quota[k], 0);
                sum += quota[k];
                load[l.log2phy[k] / slots_per_rank] += quota[k];
            }
            EXPECT_EQ(sum, counts[e]);
        }
        EXPECT_EQ(*std::max_element(load.begin(), load.end()), peak);
    }
}

TEST(ReplicaBalance, LargeCountsAndEdgeCases) {
    std::mt19937 rng(2);
    const Layer l = random_layer(rng, 64, 16, 5);
    std::vector<int64_t> counts(64, 0), quota;
    EXPECT_EQ(solve(l, counts, quota), 0);  // no pairs at all
    counts[7] = int64_t{1} << 40;           // every pair on one expert: spread over its copies
    const int64_t peak = solve(l, counts, quota);
    EXPECT_EQ(peak, ((int64_t{1} << 40) + l.logcnt[7] - 1) / l.logcnt[7]);
    for (auto& c : counts) c = 1000 + rng() % 100000;
    const int64_t total = [&] { int64_t t = 0; for (auto c : counts) t += c; return t; }();
    EXPECT_GE(solve(l, counts, quota) * 16, total);
}

TEST(ReplicaBalance, AssignmentSplitOverRanksEqualsOneCall) {
    std::mt19937 rng(3);
    const Layer l = random_layer(rng, 12, 4, 4);
    std::vector<int32_t> topk_idx(3000);
    for (auto& v : topk_idx) v = static_cast<int32_t>(rng() % 13) - 1;  // -1 skipped slots included
    std::vector<int64_t> counts(12, 0), quota, scratch(3 * 12);
    ASSERT_EQ(epmoe::core::balance_count(topk_idx.data(), 3000, 12, counts.data()), -1);
    solve(l, counts, quota);
    std::vector<int32_t> whole(3000), parts(3000);
    epmoe::core::balance_assign(topk_idx.data(), 3000, l.shape, l.log2phy.data(), l.logcnt.data(), quota.data(),
                                nullptr, scratch.data(), whole.data());
    // Three "ranks" with 1000 pairs each: prefix = the pairs of the lower ranks.
    std::vector<int64_t> prefix(12, 0);
    for (int r = 0; r < 3; ++r) {
        epmoe::core::balance_assign(topk_idx.data() + 1000 * r, 1000, l.shape, l.log2phy.data(), l.logcnt.data(),
                                    quota.data(), prefix.data(), scratch.data(), parts.data() + 1000 * r);
        ASSERT_EQ(epmoe::core::balance_count(topk_idx.data() + 1000 * r, 1000, 12, prefix.data()), -1);
    }
    EXPECT_EQ(parts, whole);
    // Each replica received exactly its quota, and every slot holds the pair's expert.
    std::vector<int64_t> per_slot(l.shape.num_slots, 0);
    for (size_t f = 0; f < whole.size(); ++f) {
        if (topk_idx[f] < 0) {
            EXPECT_EQ(whole[f], -1);
            continue;
        }
        ++per_slot[whole[f]];
    }
    for (int e = 0; e < 12; ++e)
        for (int i = 0; i < l.logcnt[e]; ++i) {
            const size_t k = static_cast<size_t>(e) * l.shape.max_replicas + i;
            EXPECT_EQ(per_slot[l.log2phy[k]], quota[k]);
        }
    std::vector<int32_t> bad = {0, 12};
    EXPECT_EQ(epmoe::core::balance_count(bad.data(), 2, 12, counts.data()), 1);
}

}  // namespace
