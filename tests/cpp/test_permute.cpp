// Torch-free layout core: counting, offsets and stable placement, chunked like the torch glue chunks it.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "cpp/core/permute.h"

namespace {

struct Layout {
    std::vector<int64_t> tokens_per_expert, expert_offsets;
    std::vector<int32_t> slot_to_row, row_to_slot;
};

Layout build(const std::vector<int32_t>& topk_idx, int num_topk, int num_experts, int tokens_per_chunk,
             const std::vector<int32_t>* expert_map = nullptr) {
    epmoe::core::LayoutParams p;
    p.num_tokens = static_cast<int64_t>(topk_idx.size()) / num_topk;
    p.num_topk = num_topk;
    p.num_experts = num_experts;
    p.num_map_entries = expert_map ? static_cast<int64_t>(expert_map->size()) : 0;
    const int32_t* map = expert_map ? expert_map->data() : nullptr;
    const int num_chunks = static_cast<int>((p.num_tokens + tokens_per_chunk - 1) / tokens_per_chunk);
    std::vector<int64_t> counts(num_chunks * num_experts), cursors(counts.size());
    for (int c = 0; c < num_chunks; ++c) {
        EXPECT_EQ(epmoe::core::layout_count(p, topk_idx.data(), map, c * tokens_per_chunk,
                                            std::min<int64_t>(p.num_tokens, (c + 1) * tokens_per_chunk),
                                            counts.data() + c * num_experts),
                  -1);
    }
    Layout l{std::vector<int64_t>(num_experts), std::vector<int64_t>(num_experts + 1),
             std::vector<int32_t>(topk_idx.size()), std::vector<int32_t>(topk_idx.size(), -1)};
    epmoe::core::layout_offsets(counts.data(), num_chunks, num_experts, l.tokens_per_expert.data(),
                                l.expert_offsets.data(), cursors.data());
    for (int c = 0; c < num_chunks; ++c) {
        epmoe::core::layout_place(p, topk_idx.data(), map, c * tokens_per_chunk,
                                  std::min<int64_t>(p.num_tokens, (c + 1) * tokens_per_chunk),
                                  cursors.data() + c * num_experts, l.slot_to_row.data(), l.row_to_slot.data());
    }
    return l;
}

TEST(PermuteCore, StableExpertMajorLayoutIndependentOfChunking) {
    // 4 tokens, k = 2, 3 experts; slot ids (f = t*2+j): expert 2 gets f=0,3,6; expert 0 gets f=1,4; 5 and 7 skipped.
    const std::vector<int32_t> topk_idx = {2, 0, -1, 2, 0, -1, 2, -1};
    for (int chunk : {1, 2, 3, 4}) {
        const Layout l = build(topk_idx, 2, 3, chunk);
        EXPECT_EQ(l.tokens_per_expert, (std::vector<int64_t>{2, 0, 3}));
        EXPECT_EQ(l.expert_offsets, (std::vector<int64_t>{0, 2, 2, 5}));
        EXPECT_EQ(l.row_to_slot, (std::vector<int32_t>{1, 4, 0, 3, 6, -1, -1, -1}));
        EXPECT_EQ(l.slot_to_row, (std::vector<int32_t>{2, 0, -1, 3, 1, -1, 4, -1}));
    }
}

TEST(PermuteCore, ExpertMapKeepsLocalExperts) {
    const std::vector<int32_t> topk_idx = {3, 1, 0, 3};
    const std::vector<int32_t> expert_map = {-1, 0, -1, 1};  // global 1 -> local 0, global 3 -> local 1
    const Layout l = build(topk_idx, 2, 2, 1, &expert_map);
    EXPECT_EQ(l.expert_offsets, (std::vector<int64_t>{0, 1, 3}));
    EXPECT_EQ(l.row_to_slot, (std::vector<int32_t>{1, 0, 3, -1}));
    EXPECT_EQ(l.slot_to_row, (std::vector<int32_t>{1, 0, -1, 2}));
}

TEST(PermuteCore, OutOfRangeIdsAreReported) {
    epmoe::core::LayoutParams p;
    p.num_tokens = 2;
    p.num_topk = 2;
    p.num_experts = 4;
    const std::vector<int32_t> topk_idx = {0, 1, 4, -2};
    std::vector<int64_t> counts(4);
    EXPECT_EQ(epmoe::core::layout_count(p, topk_idx.data(), nullptr, 0, 2, counts.data()), 2);
    EXPECT_EQ(epmoe::core::layout_count(p, topk_idx.data(), nullptr, 0, 1, counts.data()), -1);
    EXPECT_EQ(epmoe::core::find_out_of_range(topk_idx.data(), 4, -1, 4), 2);
}

TEST(PermuteCore, PermuteRowsGathersAndZeroesPadding) {
    const std::vector<float> x = {1, 2, 3, 4};  // 2 tokens, H = 2
    const std::vector<int32_t> row_to_slot = {3, 0, -1, -1};  // k = 2
    std::vector<float> rows(8, 7.0f);
    epmoe::core::permute_rows(x.data(), 2 * sizeof(float), row_to_slot.data(), 2, 0, 4, rows.data());
    EXPECT_EQ(rows, (std::vector<float>{3, 4, 1, 2, 0, 0, 0, 0}));
}

}  // namespace
