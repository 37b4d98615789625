// Dispatch-plan inputs shared by the CPU twin tests and the CUDA kernel tests: 0 and 1 tokens, experts not a
// power of two, skipped slots (-1), everything to one expert, ranks with no experts, capacity 0 / tight / ample,
// duplicate ids in a row, out-of-range ids.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace epmoe::test {

struct PlanCase {
    int64_t num_tokens = 0;
    int num_topk = 1, num_experts = 1, num_ranks = 1;
    int64_t capacity = -1;
    std::vector<int32_t> topk_idx;        // [num_tokens, num_topk]
    std::vector<int32_t> expert_to_rank;  // [num_experts]
    std::string label;
    std::string name() const {
        return label + " T=" + std::to_string(num_tokens) + " k=" + std::to_string(num_topk) +
               " E=" + std::to_string(num_experts) + " R=" + std::to_string(num_ranks) +
               " capacity=" + std::to_string(capacity);
    }
};

inline std::vector<PlanCase> plan_cases() {
    std::vector<PlanCase> cases;
    std::mt19937 gen(2024);
    const int64_t token_counts[] = {0, 1, 7, 300, 2500};
    const int topks[] = {1, 2, 8};
    const int ranks[] = {1, 2, 3, 4};
    for (int64_t T : token_counts) {
        for (int k : topks) {
            for (int R : ranks) {
                for (int variant = 0; variant < 4; ++variant) {
                    PlanCase c;
                    c.num_tokens = T;
                    c.num_topk = k;
                    c.num_ranks = R;
                    c.num_experts = R * 3 + (variant % 2);  // not a power of two; variant 1/3: uneven placement
                    c.expert_to_rank.resize(c.num_experts);
                    for (int e = 0; e < c.num_experts; ++e) {
                        // variant 3 leaves rank R-1 without experts (when R > 1)
                        const int owners = variant == 3 && R > 1 ? R - 1 : R;
                        c.expert_to_rank[e] = variant == 0 ? e / 3 : static_cast<int32_t>(gen() % owners);
                    }
                    c.topk_idx.resize(T * k);
                    for (int64_t f = 0; f < T * k; ++f) {
                        const uint32_t u = gen();
                        if (variant == 2) {
                            c.topk_idx[f] = f % k == 0 ? 0 : static_cast<int32_t>(u % c.num_experts);  // hot expert
                        } else {
                            c.topk_idx[f] = u % 10 == 0 ? -1 : static_cast<int32_t>(u % c.num_experts);
                        }
                    }
                    const int64_t capacities[] = {-1, 0, 1, T / 3 + 1, T + 5};
                    for (int64_t cap : capacities) {
                        c.capacity = cap;
                        c.label = "variant " + std::to_string(variant);
                        cases.push_back(c);
                    }
                }
            }
        }
    }
    // out-of-range ids: reported, skipped
    PlanCase bad;
    bad.num_tokens = 5;
    bad.num_topk = 2;
    bad.num_experts = 6;
    bad.num_ranks = 2;
    bad.expert_to_rank = {0, 0, 0, 1, 1, 1};
    bad.topk_idx = {0, 5, 1, 6, -2, 3, 2, 2, 4, -1};
    bad.label = "bad ids";
    cases.push_back(bad);
    return cases;
}

}  // namespace epmoe::test
