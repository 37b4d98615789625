// The CPU twins of the device dispatch planner (cpp/core/dispatch_plan.h) against the host planner
// (core::plan_dispatch), bitwise, over many shapes; and the header checks every rank runs after the exchange.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "cpp/core/dispatch_layout.h"
#include "cpp/core/dispatch_plan.h"
#include "tests/cpp/dispatch_plan_cases.h"

namespace epmoe::core {
namespace {

using test::PlanCase;

// Runs the three twin steps and checks every array against the host plan of the same input.
void expect_twins_match_host_plan(const PlanCase& c) {
    SCOPED_TRACE(c.name());
    ExpertPlacement placement;
    ASSERT_EQ(make_expert_placement(c.expert_to_rank.data(), c.num_experts, c.num_ranks, &placement), "");
    const int R = c.num_ranks, k = c.num_topk;
    const int64_t T = c.num_tokens;

    std::vector<int32_t> token_rank_pos(T * R);
    std::vector<int64_t> counts(kNumPlanCounts * R);
    int64_t bad_slot = -1;
    plan_rank_counts(c.topk_idx.data(), T, k, c.expert_to_rank.data(), c.num_experts, R, c.capacity,
                     token_rank_pos.data(), counts.data(), &bad_slot);
    const int64_t bad = find_bad_expert_id(c.topk_idx.data(), T, k, c.num_experts);
    EXPECT_EQ(bad_slot, bad >= 0 ? bad : T * k);
    if (bad >= 0) return;  // the host planner refuses; the twins only report it

    SendPlan plan;
    ASSERT_EQ(plan_dispatch(c.topk_idx.data(), T, k, placement, c.capacity, &plan), "");
    const int64_t num_wire = plan_rank_offsets(R, c.capacity, counts.data());
    std::vector<int32_t> token_wire_row(T * R), wire_token(num_wire, -1);
    plan_wire_rows(token_rank_pos.data(), T, R, counts.data(), token_wire_row.data(), wire_token.data());

    // counts per rank
    std::vector<int64_t> first_row(R + 1, 0);
    for (int r = 0; r < R; ++r) {
        EXPECT_EQ(counts[kSent * R + r], plan.num_send_per_rank[r]) << "rank " << r;
        EXPECT_EQ(counts[kOverflow * R + r], plan.num_overflow_per_rank[r]) << "rank " << r;
        EXPECT_EQ(counts[kWanted * R + r], plan.num_send_per_rank[r] + plan.num_overflow_per_rank[r]);
        first_row[r + 1] = first_row[r] + plan.num_send_per_rank[r];
    }
    EXPECT_EQ(num_wire, c.capacity < 0 ? first_row[R] : R * c.capacity);

    // wire rows: the host plan's rows, rank-major, at base[r] + i; the rest is padding (-1)
    std::vector<int32_t> expected_wire(num_wire, -1);
    std::vector<int64_t> host_wire_pos(plan.send_token_idx.size());
    for (int r = 0; r < R; ++r) {
        const int64_t base = c.capacity < 0 ? first_row[r] : r * c.capacity;
        EXPECT_EQ(counts[kBase * R + r], base);
        for (int64_t i = first_row[r]; i < first_row[r + 1]; ++i) {
            expected_wire[base + i - first_row[r]] = plan.send_token_idx[i];
            host_wire_pos[i] = base + i - first_row[r];
        }
    }
    EXPECT_EQ(wire_token, expected_wire);

    // slot lists and weights of every wire row, and the slots each rank receives
    std::vector<float> weights(T * k);
    for (int64_t f = 0; f < T * k; ++f) weights[f] = 0.25f + static_cast<float>(f);
    std::vector<int64_t> slots_per_rank(R, 0);
    std::vector<int32_t> slots(k);
    std::vector<float> row_weights(k);
    for (int r = 0; r < R; ++r) {
        for (int64_t i = first_row[r]; i < first_row[r + 1]; ++i) {
            const int64_t w = host_wire_pos[i];
            EXPECT_EQ(wire_row_rank(counts.data(), R, w), r) << "wire row " << w;
            wire_row_slots(c.topk_idx.data(), weights.data(), k, c.expert_to_rank.data(),
                           placement.expert_to_local.data(), c.num_experts, r, wire_token[w], slots.data(),
                           row_weights.data());
            for (int j = 0; j < k; ++j) {
                EXPECT_EQ(slots[j], plan.send_slot_expert[i * k + j]) << "row " << i << " slot " << j;
                const float expected = slots[j] >= 0 ? weights[wire_token[w] * k + j] : 0.0f;
                EXPECT_EQ(row_weights[j], expected);
                slots_per_rank[r] += slots[j] >= 0;
            }
        }
        EXPECT_EQ(counts[kSentSlots * R + r], slots_per_rank[r]) << "rank " << r;
    }
    // padding rows carry no slot
    for (int64_t w = 0; w < num_wire; ++w) {
        if (wire_token[w] >= 0) continue;
        wire_row_slots(c.topk_idx.data(), weights.data(), k, c.expert_to_rank.data(), placement.expert_to_local.data(),
                       c.num_experts, wire_row_rank(counts.data(), R, w), -1, slots.data(), row_weights.data());
        for (int j = 0; j < k; ++j) EXPECT_EQ(slots[j], -1);
    }

    // each token's rows in ascending rank (combine's final sum) and what did not fit
    for (int64_t t = 0; t < T; ++t) {
        std::vector<int64_t> mine;
        for (int r = 0; r < R; ++r) {
            const int32_t row = token_wire_row[t * R + r];
            EXPECT_GE(row, kOverflowed);
            if (row >= 0) mine.push_back(row);
        }
        std::vector<int64_t> host;
        for (int64_t p = plan.token_send_offsets[t]; p < plan.token_send_offsets[t + 1]; ++p) {
            host.push_back(host_wire_pos[plan.token_send_rows[p]]);
        }
        EXPECT_EQ(mine, host) << "token " << t;
    }
}

TEST(DispatchPlanTwins, MatchTheHostPlannerBitwise) {
    for (const PlanCase& c : test::plan_cases()) expect_twins_match_host_plan(c);
}

TEST(DispatchPlanTwins, ReportTheFirstOutOfRangeId) {
    const std::vector<int32_t> topk_idx = {0, 1, 2, -1, 5, 1, -3, 0};  // E = 4: slot 4 (id 5) is the first bad one
    const std::vector<int32_t> expert_to_rank = {0, 0, 1, 1};
    std::vector<int32_t> pos(4 * 2);
    std::vector<int64_t> counts(kNumPlanCounts * 2);
    int64_t bad = -1;
    plan_rank_counts(topk_idx.data(), 4, 2, expert_to_rank.data(), 4, 2, -1, pos.data(), counts.data(), &bad);
    EXPECT_EQ(bad, 4);
    // [token, rank]; bad slots are skipped like -1: token 2 only goes to rank 0 (id 1), token 3 too (id 0)
    EXPECT_EQ(pos, (std::vector<int32_t>{0, kNotSent, kNotSent, 0, 1, kNotSent, 2, kNotSent}));
}

TEST(DispatchPlanTwins, CapacityKeepsTheEarliestTokens) {
    const std::vector<int32_t> topk_idx = {0, 0, 1, 0, 1};  // k = 1, E = 2, R = 2, capacity 2
    const std::vector<int32_t> expert_to_rank = {0, 1};
    std::vector<int32_t> pos(5 * 2), wire_row(5 * 2);
    std::vector<int64_t> counts(kNumPlanCounts * 2);
    int64_t bad = -1;
    plan_rank_counts(topk_idx.data(), 5, 1, expert_to_rank.data(), 2, 2, 2, pos.data(), counts.data(), &bad);
    const int64_t num_wire = plan_rank_offsets(2, 2, counts.data());
    ASSERT_EQ(num_wire, 4);
    std::vector<int32_t> wire_token(num_wire, -1);
    plan_wire_rows(pos.data(), 5, 2, counts.data(), wire_row.data(), wire_token.data());
    EXPECT_EQ(wire_token, (std::vector<int32_t>{0, 1, 2, 4}));
    EXPECT_EQ(wire_row, (std::vector<int32_t>{0, kNotSent, 1, kNotSent, kNotSent, 2, kOverflowed, kNotSent,
                                              kNotSent, 3}));
    EXPECT_EQ(counts[kOverflow * 2 + 0], 1);
    EXPECT_EQ(counts[kWanted * 2 + 0], 3);
}

// ---- headers

DispatchHeader header(int64_t sequence = 4, int64_t tag = kNoTag) {
    return make_header(/*num_experts=*/8, /*hidden=*/64, /*dtype=*/0, /*num_topk=*/2, /*capacity_mode=*/false,
                       /*capacity=*/-1, /*fingerprint=*/0x1234, sequence, tag);
}

std::string check_two(const DispatchHeader& mine, const DispatchHeader& theirs, int* field = nullptr) {
    const std::vector<DispatchHeader> recv = {mine, theirs};
    return check_headers(mine, recv.data(), 2, 0, field);
}

TEST(DispatchHeaders, CountsMayDifferEverythingElseMustAgree) {
    DispatchHeader a = header(), b = header();
    b[kNumRows] = 5;
    b[kNumSlots] = 9;
    b[kNumOverflow] = 1;
    EXPECT_EQ(check_two(a, b), "");
    b[kHidden] = 32;
    int field = -1;
    const std::string msg = check_two(a, b, &field);
    EXPECT_NE(msg.find("disagree on hidden size: rank 0 has 64, rank 1 has 32"), std::string::npos) << msg;
    EXPECT_EQ(field, kHidden);
    b = a;
    b[kMagic] = 0;
    EXPECT_NE(check_two(a, b, &field).find("malformed"), std::string::npos);
    EXPECT_EQ(field, kMagic);
}

TEST(DispatchHeaders, DtypeModeTagAndCapacityByName) {
    DispatchHeader a = header(), b = header();
    b[kDType] = 1;
    EXPECT_NE(check_two(a, b).find("dtype: rank 0 has float32, rank 1 has bfloat16"), std::string::npos);
    b = make_header(8, 64, 0, 2, true, 16, 0x1234, 4, kNoTag);
    EXPECT_NE(check_two(a, b).find("mode: rank 0 has exact, rank 1 has capacity"), std::string::npos);
    b = header(4, 7);
    const std::string tag = check_two(a, b);
    EXPECT_NE(tag.find("dispatch tag: rank 0 has none, rank 1 has 7"), std::string::npos) << tag;
    b = header(5);
    int field = -1;
    const std::string seq = check_two(a, b, &field);
    EXPECT_NE(seq.find("out of step: rank 0 is at dispatch 4"), std::string::npos) << seq;
    EXPECT_NE(seq.find("rank 1 at dispatch 5"), std::string::npos) << seq;
    EXPECT_EQ(field, kSequence);
    b = header();
    b[kPlacement] += 1;
    EXPECT_NE(check_two(a, b).find("disagree on expert_to_rank"), std::string::npos);
}

TEST(DispatchHeaders, ErrorsNameTheRankAndTheValueAndComeFirst) {
    DispatchHeader a = header(), b = header();
    b[kError] = kBadExpertId;
    b[kErrorValue] = 9;
    b[kErrorIndex] = 7;  // token 3, slot 1 with k = 2
    b[kHidden] = 32;     // an error is reported before any disagreement
    int field = -1;
    const std::string msg = check_two(a, b, &field);
    EXPECT_NE(msg.find("topk_idx values must be in [-1, 8) (num_experts): rank 1 has 9 at token 3 slot 1"),
              std::string::npos)
        << msg;
    EXPECT_EQ(field, kError);
    // every rank raises the lowest failing rank's message
    DispatchHeader c = header();
    c[kError] = kBadExpertMap;
    c[kErrorValue] = 5;
    c[kErrorIndex] = 2;
    const std::vector<DispatchHeader> recv = {a, c, b};
    const std::string first = check_headers(b, recv.data(), 3, 2);
    EXPECT_NE(first.find("rank 1 has 5 at expert_to_rank[2]"), std::string::npos) << first;
}

TEST(DispatchHeaders, AgreeIsTheSilentCheck) {
    std::mt19937 gen(3);
    const DispatchHeader base = header();
    for (int trial = 0; trial < 500; ++trial) {
        std::vector<DispatchHeader> recv(3, base);
        for (int n = trial % 3; n > 0; --n) {
            const int r = static_cast<int>(gen() % 3), f = static_cast<int>(gen() % kHeaderLen);
            recv[r][f] += 1 + static_cast<int64_t>(gen() % 3);
        }
        EXPECT_EQ(headers_agree(base, recv.data(), 3), check_headers(base, recv.data(), 3, 0).empty());
    }
}

}  // namespace
}  // namespace epmoe::core
