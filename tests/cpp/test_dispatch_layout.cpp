// Host tests of the torch-free dispatch planning (cpp/core/dispatch_layout.h).
#include <gtest/gtest.h>

#include <vector>

#include "cpp/core/dispatch_layout.h"

namespace epmoe::core {
namespace {

TEST(DispatchLayout, EvenPlacementAndDivisibility) {
    ExpertPlacement p;
    ASSERT_EQ(make_expert_placement(nullptr, 8, 4, &p), "");
    EXPECT_EQ(p.expert_to_rank, (std::vector<int32_t>{0, 0, 1, 1, 2, 2, 3, 3}));
    EXPECT_EQ(p.expert_to_local, (std::vector<int32_t>{0, 1, 0, 1, 0, 1, 0, 1}));
    EXPECT_EQ(p.num_local_experts, (std::vector<int32_t>{2, 2, 2, 2}));
    EXPECT_NE(make_expert_placement(nullptr, 6, 4, &p).find("divisible"), std::string::npos);
}

TEST(DispatchLayout, CustomPlacementOrdersLocalExpertsById) {
    const std::vector<int32_t> map = {1, 0, 1, 1, 0};
    ExpertPlacement p;
    ASSERT_EQ(make_expert_placement(map.data(), 5, 2, &p), "");
    EXPECT_EQ(p.expert_to_local, (std::vector<int32_t>{0, 0, 1, 2, 1}));
    EXPECT_EQ(p.num_local_experts, (std::vector<int32_t>{2, 3}));
    const std::vector<int32_t> bad = {0, 2};
    EXPECT_NE(make_expert_placement(bad.data(), 2, 2, &p).find("expert_to_rank[1]"), std::string::npos);
}

TEST(DispatchLayout, SendPlanDeduplicatesPerRank) {
    ExpertPlacement p;
    ASSERT_EQ(make_expert_placement(nullptr, 4, 2, &p), "");
    // token 0 -> experts 0,1 (rank 0 twice); token 1 -> 3,-1; token 2 -> 1,2 (both ranks)
    const std::vector<int32_t> topk_idx = {0, 1, 3, -1, 1, 2};
    SendPlan plan;
    ASSERT_EQ(plan_dispatch(topk_idx.data(), 3, 2, p, -1, &plan), "");
    EXPECT_EQ(plan.num_send_per_rank, (std::vector<int64_t>{2, 2}));
    EXPECT_EQ(plan.send_token_idx, (std::vector<int32_t>{0, 2, 1, 2}));
    EXPECT_EQ(plan.send_slot_expert, (std::vector<int32_t>{0, 1, 1, -1, 1, -1, -1, 0}));
    EXPECT_EQ(plan.num_overflow_per_rank, (std::vector<int64_t>{0, 0}));
    // each token's rows in ascending rank: token 0 -> row 0, token 1 -> row 2, token 2 -> rows 1 (rank 0), 3
    EXPECT_EQ(plan.token_send_offsets, (std::vector<int64_t>{0, 1, 2, 4}));
    EXPECT_EQ(plan.token_send_rows, (std::vector<int32_t>{0, 2, 1, 3}));
}

TEST(DispatchLayout, CapacityClipsLatestTokensAndCountsOverflow) {
    ExpertPlacement p;
    ASSERT_EQ(make_expert_placement(nullptr, 2, 2, &p), "");
    const std::vector<int32_t> topk_idx = {0, 0, 0, 1};
    SendPlan plan;
    ASSERT_EQ(plan_dispatch(topk_idx.data(), 4, 1, p, 2, &plan), "");
    EXPECT_EQ(plan.num_send_per_rank, (std::vector<int64_t>{2, 1}));
    EXPECT_EQ(plan.num_overflow_per_rank, (std::vector<int64_t>{1, 0}));
    EXPECT_EQ(plan.send_token_idx, (std::vector<int32_t>{0, 1, 3}));
    EXPECT_EQ(plan.send_slot_expert, (std::vector<int32_t>{0, 0, 0}));
    EXPECT_EQ(plan.token_send_offsets, (std::vector<int64_t>{0, 1, 2, 2, 3}));  // token 2 was clipped
}

TEST(DispatchLayout, RejectsOutOfRangeExpertIds) {
    ExpertPlacement p;
    ASSERT_EQ(make_expert_placement(nullptr, 4, 1, &p), "");
    const std::vector<int32_t> topk_idx = {0, 4};
    SendPlan plan;
    EXPECT_NE(plan_dispatch(topk_idx.data(), 1, 2, p, -1, &plan).find("topk_idx"), std::string::npos);
}

TEST(DispatchLayout, ExpansionIsExpertMajorAndStable) {
    // 3 received rows, k=2, 2 local experts.
    const std::vector<int32_t> slots = {1, 0, -1, 1, 0, -1};
    RecvLayout layout;
    ASSERT_EQ(expand_received(slots.data(), 3, 2, 2, &layout), "");
    EXPECT_EQ(layout.tokens_per_expert, (std::vector<int64_t>{2, 2}));
    EXPECT_EQ(layout.expert_offsets, (std::vector<int64_t>{0, 2, 4}));
    EXPECT_EQ(layout.row_src, (std::vector<int32_t>{0, 2, 0, 1}));
    EXPECT_EQ(layout.row_slot, (std::vector<int32_t>{1, 0, 0, 1}));
    EXPECT_EQ(layout.recv_slot_row, (std::vector<int32_t>{2, 0, 4, 3, 1, 4}));
    const std::vector<int32_t> bad = {2, -1};
    EXPECT_NE(expand_received(bad.data(), 1, 2, 2, &layout).find("disagree"), std::string::npos);
}

TEST(DispatchLayout, EmptyInputs) {
    ExpertPlacement p;
    ASSERT_EQ(make_expert_placement(nullptr, 4, 2, &p), "");
    SendPlan plan;
    ASSERT_EQ(plan_dispatch(nullptr, 0, 2, p, -1, &plan), "");
    EXPECT_TRUE(plan.send_token_idx.empty());
    EXPECT_EQ(plan.token_send_offsets, (std::vector<int64_t>{0}));
    RecvLayout layout;
    ASSERT_EQ(expand_received(nullptr, 0, 2, 2, &layout), "");
    EXPECT_EQ(layout.expert_offsets, (std::vector<int64_t>{0, 0, 0}));
}

TEST(DispatchLayout, HeaderMismatchNamesTheField) {
    DispatchHeader a = make_header(8, 64, 1, 2, false, -1, 7, 0, kNoTag);
    DispatchHeader b = a;
    b[kNumRows] = 5;  // row counts may differ
    EXPECT_EQ(check_peer_header(a, b, 0, 1), "");
    b[kHidden] = 32;
    const std::string msg = check_peer_header(a, b, 0, 1);
    EXPECT_NE(msg.find("hidden size"), std::string::npos);
    EXPECT_NE(msg.find("rank 1 has 32"), std::string::npos);
    b = a;
    b[kMagic] = 0;
    EXPECT_NE(check_peer_header(a, b, 0, 1).find("malformed"), std::string::npos);
}

}  // namespace
}  // namespace epmoe::core
