#include "cpp/core/replica_balance.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace epmoe::core {

template <typename Idx>
int64_t balance_count(const Idx* topk_idx, int64_t n, int num_experts, int64_t* counts) {
    for (int64_t f = 0; f < n; ++f) {
        const Idx e = topk_idx[f];
        if (e >= 0 && e < num_experts)
            ++counts[e];
        else if (e != -1)
            return f;
    }
    return -1;
}

template <typename Idx>
void balance_assign(const Idx* topk_idx, int64_t n, const BalanceShape& s, const int64_t* log2phy,
                    const int64_t* logcnt, const int64_t* quota, const int64_t* prefix, int64_t* scratch,
                    Idx* slot_idx) {
    const int width = s.max_replicas;
    // Per expert: next group index g, current replica, exclusive end of the current replica's range.
    int64_t* next = scratch;
    int64_t* replica = scratch + s.num_experts;
    int64_t* range_end = scratch + 2 * static_cast<int64_t>(s.num_experts);
    for (int e = 0; e < s.num_experts; ++e) {
        next[e] = prefix != nullptr ? prefix[e] : 0;
        replica[e] = 0;
        range_end[e] = quota[static_cast<int64_t>(e) * width];
    }
    // NOTES: g only grows per expert, so each replica range is entered once: O(n + E * M) in all.
    for (int64_t f = 0; f < n; ++f) {
        const Idx e = topk_idx[f];
        if (e < 0) {
            slot_idx[f] = -1;
            continue;
        }
        const int64_t* q = quota + static_cast<int64_t>(e) * width;
        const int64_t last = logcnt[e] - 1, g = next[e]++;
        while (replica[e] < last && g >= range_end[e]) range_end[e] += q[++replica[e]];
        slot_idx[f] = static_cast<Idx>(log2phy[static_cast<int64_t>(e) * width + replica[e]]);
    }
}

void replica_shares(const BalanceShape& s, const double* load, const int64_t* log2phy, const int64_t* logcnt,
                    int num_sweeps, double* share) {
    const int width = s.max_replicas;
    const int64_t slots_per_rank = s.num_slots / s.num_ranks;
    const int64_t row = static_cast<int64_t>(s.num_experts) * width;
    double total = 0;
    for (int e = 0; e < s.num_experts; ++e) total += load[e];
    // ---- exact min-max on the load scaled to 2^40 pairs (integer rounding: ~1e-12 of the total)
    const double unit = total > 0 ? total / 1099511627776.0 : 0;
    std::vector<int64_t> counts(s.num_experts), quota(row);
    for (int e = 0; e < s.num_experts; ++e) counts[e] = unit > 0 ? std::llround(load[e] / unit) : 0;
    std::vector<int64_t> scratch(balance_scratch_bytes(s) / sizeof(int64_t) + 1);
    balance_quotas(s, counts.data(), log2phy, logcnt, balance_scratch_carve(scratch.data(), s), quota.data());
    // x: load per replica, rank_load: per rank
    std::vector<double> x(row, 0.0), rank_load(s.num_ranks, 0.0);
    for (int e = 0; e < s.num_experts; ++e) {
        if (counts[e] == 0) continue;
        const int64_t first = static_cast<int64_t>(e) * width;
        for (int64_t i = first; i < first + logcnt[e]; ++i) {
            x[i] = load[e] * (static_cast<double>(quota[i]) / static_cast<double>(counts[e]));
            rank_load[log2phy[i] / slots_per_rank] += x[i];
        }
    }
    // ---- water-filling sweeps over the experts held by several ranks
    std::vector<double> others(s.num_ranks), sorted(s.num_ranks);
    std::vector<int64_t> holders(s.num_ranks);
    for (int sweep = 0; sweep < num_sweeps; ++sweep) {
        for (int e = 0; e < s.num_experts; ++e) {
            const int64_t n = logcnt[e];
            const int64_t* slots = log2phy + static_cast<int64_t>(e) * width;
            double* xe = x.data() + static_cast<int64_t>(e) * width;
            if (load[e] <= 0 || slots[n - 1] / slots_per_rank == slots[0] / slots_per_rank) continue;
            int num_holders = 0;
            for (int64_t i = 0; i < n; ++i) {
                const int64_t r = slots[i] / slots_per_rank;
                if (num_holders == 0 || holders[num_holders - 1] != r) holders[num_holders++] = r;
                rank_load[r] -= xe[i];
            }
            for (int h = 0; h < num_holders; ++h) others[h] = rank_load[holders[h]];
            // Level: the smallest j with (load + sum of the j lowest) / j <= the (j+1)-th lowest.
            std::copy(others.begin(), others.begin() + num_holders, sorted.begin());
            std::sort(sorted.begin(), sorted.begin() + num_holders);
            double acc = load[e], level = 0;
            for (int j = 0; j < num_holders; ++j) {
                acc += sorted[j];
                level = acc / (j + 1);
                if (j + 1 == num_holders || level <= sorted[j + 1]) break;
            }
            // A rank's part goes to its first replica of e (replicas of one rank are adjacent).
            int h = -1;
            for (int64_t i = 0; i < n; ++i) {
                const int64_t r = slots[i] / slots_per_rank;
                const bool first = h < 0 || holders[h] != r;
                if (first) ++h;
                xe[i] = first ? std::max(0.0, level - others[h]) : 0.0;
                rank_load[r] += xe[i];
            }
        }
    }
    // ---- shares
    for (int e = 0; e < s.num_experts; ++e) {
        const int64_t n = logcnt[e];
        const double* xe = x.data() + static_cast<int64_t>(e) * width;
        double* out = share + static_cast<int64_t>(e) * width;
        double sum = 0;
        for (int64_t i = 0; i < n; ++i) sum += xe[i];
        for (int64_t i = 0; i < width; ++i) out[i] = i >= n ? 0.0 : (sum > 0 ? xe[i] / sum : 1.0 / n);
    }
}

template int64_t balance_count<int32_t>(const int32_t*, int64_t, int, int64_t*);
template int64_t balance_count<int64_t>(const int64_t*, int64_t, int, int64_t*);
template void balance_assign<int32_t>(const int32_t*, int64_t, const BalanceShape&, const int64_t*, const int64_t*,
                                      const int64_t*, const int64_t*, int64_t*, int32_t*);
template void balance_assign<int64_t>(const int64_t*, int64_t, const BalanceShape&, const int64_t*, const int64_t*,
                                      const int64_t*, const int64_t*, int64_t*, int64_t*);

}  // namespace epmoe::core
