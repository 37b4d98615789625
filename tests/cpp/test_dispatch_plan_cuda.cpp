// GPU tests of the device dispatch planner and wire kernels (cuda/dispatch_plan.cuh) against their CPU twins
// (cpp/core/dispatch_plan.h), bitwise. Skipped without a device.
#ifdef EPMOE_WITH_CUDA
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "cpp/core/dispatch_layout.h"
#include "cpp/core/dispatch_plan.h"
#include "cuda/dispatch_plan.cuh"
#include "tests/cpp/cuda_test_utils.h"
#include "tests/cpp/dispatch_plan_cases.h"

namespace epmoe::test {
namespace {

using namespace epmoe::core;

cuda::HeaderRow row_of(const DispatchHeader& h) {
    cuda::HeaderRow row;
    std::copy(h.begin(), h.end(), row.v);
    return row;
}

// The wire the pack kernel must produce, built from the twins (x bytes, token, slots, weights per row).
std::vector<uint8_t> host_wire(const PlanCase& c, const std::vector<int32_t>& expert_to_local,
                               const std::vector<int64_t>& counts, const std::vector<int32_t>& wire_token,
                               const std::vector<uint8_t>& x, int64_t x_bytes, const std::vector<float>& weights) {
    const int k = c.num_topk;
    const int64_t row_bytes = x_bytes + 4 * (1 + 2 * k);
    std::vector<uint8_t> wire(wire_token.size() * row_bytes, 0);
    std::vector<int32_t> slots(k);
    std::vector<float> w(k);
    for (size_t r = 0; r < wire_token.size(); ++r) {
        uint8_t* dst = wire.data() + r * row_bytes;
        const int32_t t = wire_token[r];
        if (t >= 0) std::memcpy(dst, x.data() + t * x_bytes, x_bytes);
        wire_row_slots(c.topk_idx.data(), weights.data(), k, c.expert_to_rank.data(), expert_to_local.data(),
                       c.num_experts, wire_row_rank(counts.data(), c.num_ranks, static_cast<int64_t>(r)), t,
                       slots.data(), w.data());
        std::memcpy(dst + x_bytes, &t, 4);
        std::memcpy(dst + x_bytes + 4, slots.data(), 4 * k);
        std::memcpy(dst + x_bytes + 4 * (1 + k), w.data(), 4 * k);
    }
    return wire;
}

void expect_device_matches_twins(const PlanCase& c, int64_t x_bytes) {
    SCOPED_TRACE(c.name() + " x_bytes=" + std::to_string(x_bytes));
    const int R = c.num_ranks, k = c.num_topk;
    const int64_t T = c.num_tokens;
    ExpertPlacement placement;
    ASSERT_EQ(make_expert_placement(c.expert_to_rank.data(), c.num_experts, R, &placement), "");
    DispatchHeader mine = make_header(c.num_experts, x_bytes, 1, k, c.capacity >= 0, c.capacity,
                                      placement.fingerprint, 3, kNoTag);

    // twins
    std::vector<int32_t> pos(T * R);
    std::vector<int64_t> counts(kNumPlanCounts * R);
    int64_t bad = 0;
    plan_rank_counts(c.topk_idx.data(), T, k, c.expert_to_rank.data(), c.num_experts, R, c.capacity, pos.data(),
                     counts.data(), &bad);
    const int64_t num_wire = plan_rank_offsets(R, c.capacity, counts.data());
    std::vector<int32_t> wire_row(T * R), wire_token(num_wire, -1);
    plan_wire_rows(pos.data(), T, R, counts.data(), wire_row.data(), wire_token.data());

    // device
    DeviceBuffer<int32_t> d_idx(c.topk_idx.empty() ? std::vector<int32_t>{0} : c.topk_idx);
    DeviceBuffer<int32_t> d_e2r(c.expert_to_rank), d_e2l(placement.expert_to_local);
    DeviceBuffer<int32_t> d_pos(T * R), d_wire_row(T * R), d_wire_token(num_wire);
    DeviceBuffer<int64_t> d_counts(kNumPlanCounts * R), d_bad(1), d_headers(R * kHeaderLen);
    cuda::launch_plan_send(d_idx.get(), T, k, d_e2r.get(), c.num_experts, R, c.capacity, row_of(mine), d_pos.get(),
                           d_counts.get(), d_bad.get(), d_headers.get(), nullptr);
    cuda::launch_plan_wire_rows(d_pos.get(), T, R, d_counts.get(), num_wire, d_wire_row.get(), d_wire_token.get(),
                                nullptr);
    EXPECT_EQ(d_pos.to_host(), pos);
    EXPECT_EQ(d_counts.to_host(), counts);
    EXPECT_EQ(d_bad.to_host()[0], bad);
    EXPECT_EQ(d_wire_row.to_host(), wire_row);
    EXPECT_EQ(d_wire_token.to_host(), wire_token);

    // headers: the twin's counts, and the first bad id as this rank's error
    const std::vector<int64_t> headers = d_headers.to_host();
    for (int r = 0; r < R; ++r) {
        DispatchHeader want = mine;
        want[kNumRows] = counts[kSent * R + r];
        want[kNumOverflow] = counts[kOverflow * R + r];
        want[kNumSlots] = counts[kSentSlots * R + r];
        if (bad < T * k) {
            want[kError] = kBadExpertId;
            want[kErrorValue] = c.topk_idx[bad];
            want[kErrorIndex] = bad;
        }
        EXPECT_EQ(std::vector<int64_t>(headers.begin() + r * kHeaderLen, headers.begin() + (r + 1) * kHeaderLen),
                  std::vector<int64_t>(want.begin(), want.end()))
            << "header to rank " << r;
    }
    std::vector<DispatchHeader> recv(R);
    for (int r = 0; r < R; ++r) std::copy_n(headers.begin() + r * kHeaderLen, kHeaderLen, recv[r].begin());
    DeviceBuffer<int32_t> d_ok(1);
    cuda::launch_headers_agree(row_of(mine), d_headers.get(), R, d_ok.get(), nullptr);
    EXPECT_EQ(d_ok.to_host()[0], headers_agree(mine, recv.data(), R) ? 1 : 0);

    // pack: bitwise the twin-built wire; then the receiver's gather of x rows per (row, slot)
    std::mt19937 gen(static_cast<uint32_t>(T * 31 + k));
    std::vector<uint8_t> x(T * x_bytes);
    for (auto& b : x) b = static_cast<uint8_t>(gen());
    std::vector<float> weights(T * k);
    for (auto& w : weights) w = static_cast<float>(gen() % 1000) / 7.0f;
    DeviceBuffer<uint8_t> d_x(x.empty() ? std::vector<uint8_t>{0} : x);
    DeviceBuffer<float> d_w(weights.empty() ? std::vector<float>{0.0f} : weights);
    const int64_t row_bytes = x_bytes + 4 * (1 + 2 * k);
    DeviceBuffer<uint8_t> d_wire(num_wire * row_bytes);
    cuda::launch_pack_wire(d_x.get(), x_bytes, d_idx.get(), d_w.get(), k, d_e2r.get(), d_e2l.get(), c.num_experts,
                           d_counts.get(), R, d_wire_token.get(), num_wire, row_bytes, d_wire.get(), nullptr);
    const std::vector<uint8_t> wire = host_wire(c, placement.expert_to_local, counts, wire_token, x, x_bytes, weights);
    EXPECT_TRUE(d_wire.to_host() == wire) << "packed wire differs";

    std::vector<int32_t> index(num_wire * k);
    for (int64_t f = 0; f < num_wire * k; ++f) index[f] = (f % 3 == 1) ? -1 : static_cast<int32_t>((f * 7) % (num_wire * k));
    DeviceBuffer<int32_t> d_index(index.empty() ? std::vector<int32_t>{0} : index);
    DeviceBuffer<uint8_t> d_rows(index.size() * x_bytes);
    cuda::launch_gather_rows(d_wire.get(), row_bytes, x_bytes, d_index.get(), k, static_cast<int64_t>(index.size()),
                             d_rows.get(), x_bytes, nullptr);
    std::vector<uint8_t> want_rows(index.size() * x_bytes, 0);
    for (size_t m = 0; m < index.size(); ++m) {
        if (index[m] >= 0) std::memcpy(want_rows.data() + m * x_bytes, wire.data() + (index[m] / k) * row_bytes, x_bytes);
    }
    EXPECT_TRUE(d_rows.to_host() == want_rows) << "gathered rows differ";
}

TEST(DispatchPlanCuda, KernelsMatchTheCpuTwinsBitwise) {
    EPMOE_SKIP_IF_NO_GPU();
    const std::vector<PlanCase> cases = plan_cases();
    for (size_t i = 0; i < cases.size(); ++i) {
        if (i % 7 != 0 && i + 1 != cases.size()) continue;  // a spread of shapes (the whole set runs on the CPU)
        // bf16 rows with an odd hidden size (unaligned metadata) and fp32 rows (16-byte accesses)
        expect_device_matches_twins(cases[i], i % 2 ? 2 * 67 : 4 * 64);
    }
}

}  // namespace
}  // namespace epmoe::test
#endif
