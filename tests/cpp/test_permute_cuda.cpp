// GPU tests of the permutation launchers (cuda/permute.cuh) against plain host loops. Skipped without a device.
#ifdef EPMOE_WITH_CUDA
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/permute.cuh"
#include "tests/cpp/cuda_test_utils.h"

namespace epmoe::test {
namespace {

struct HostLayout {
    std::vector<int64_t> tokens_per_expert, expert_offsets;
    std::vector<int32_t> slot_to_row, row_to_slot;
};

// Stable counting sort of the flat slots by (mapped) expert: the contract's order.
HostLayout host_layout(const std::vector<int32_t>& topk_idx, int num_experts, const std::vector<int32_t>& map) {
    const int64_t n = static_cast<int64_t>(topk_idx.size());
    auto local = [&](int32_t id) {
        if (!map.empty()) id = (id >= 0 && id < static_cast<int32_t>(map.size())) ? map[id] : -1;
        return (id >= 0 && id < num_experts) ? id : -1;
    };
    HostLayout h;
    h.tokens_per_expert.assign(num_experts, 0);
    for (int32_t id : topk_idx)
        if (local(id) >= 0) ++h.tokens_per_expert[local(id)];
    h.expert_offsets.assign(num_experts + 1, 0);
    for (int e = 0; e < num_experts; ++e) h.expert_offsets[e + 1] = h.expert_offsets[e] + h.tokens_per_expert[e];
    std::vector<int64_t> next(h.expert_offsets.begin(), h.expert_offsets.end() - 1);
    h.slot_to_row.assign(n, -1);
    h.row_to_slot.assign(n, -1);
    for (int64_t f = 0; f < n; ++f) {
        const int e = local(topk_idx[f]);
        if (e < 0) continue;
        h.slot_to_row[f] = static_cast<int32_t>(next[e]);
        h.row_to_slot[next[e]++] = static_cast<int32_t>(f);
    }
    return h;
}

void check_layout(int64_t num_slots, int num_experts, int num_global, bool with_map, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int32_t> id(-1, num_global - 1);
    std::vector<int32_t> topk_idx(num_slots);
    for (auto& v : topk_idx) v = id(rng);
    std::vector<int32_t> map;
    if (with_map) {
        map.assign(num_global, -1);
        for (int g = 0; g < num_global; ++g)
            if (g % 3 != 0) map[g] = g % num_experts;
    }
    const HostLayout want = host_layout(topk_idx, num_experts, map);

    DeviceBuffer<int32_t> d_idx(topk_idx);
    DeviceBuffer<int32_t> d_map(with_map ? map : std::vector<int32_t>{0});
    DeviceBuffer<int64_t> tpe(num_experts), off(num_experts + 1);
    DeviceBuffer<int32_t> s2r(num_slots), r2s(num_slots);
    DeviceBuffer<uint8_t> ws(cuda::moe_layout_workspace_bytes(num_slots, num_experts));
    cuda::launch_moe_layout(d_idx.get(), num_slots, num_experts, with_map ? d_map.get() : nullptr,
                            with_map ? num_global : num_experts, tpe.get(), off.get(), s2r.get(), r2s.get(),
                            ws.get(), nullptr);
    EXPECT_EQ(tpe.to_host(), want.tokens_per_expert);
    EXPECT_EQ(off.to_host(), want.expert_offsets);
    EXPECT_EQ(s2r.to_host(), want.slot_to_row);
    EXPECT_EQ(r2s.to_host(), want.row_to_slot);
}

TEST(PermuteCuda, LayoutMatchesStableSort) {
    EPMOE_SKIP_IF_NO_GPU();
    check_layout(0, 4, 4, false, 1);
    check_layout(1, 1, 1, false, 2);
    check_layout(37 * 3, 7, 7, false, 3);
    check_layout(4096 * 8, 256, 256, false, 4);
    check_layout(4096 * 8, 32, 256, true, 5);
    check_layout(3'000'001, 1024, 1024, false, 6);  // many blocks, chunks not aligned to the tail
    check_layout(100'000, 12288, 12288, false, 7);  // largest expert count: one-warp scatter blocks
}

TEST(PermuteCuda, LayoutLargeSlotCount) {
    EPMOE_SKIP_IF_NO_GPU();
    check_layout(int64_t{1} << 24, 1024, 1024, false, 8);
}

TEST(PermuteCuda, PermuteUnpermuteAndBackwardFloat) {
    EPMOE_SKIP_IF_NO_GPU();
    const int64_t num_tokens = 300, hidden = 72;
    const int num_topk = 4, num_experts = 9;
    std::mt19937 rng(11);
    std::uniform_int_distribution<int32_t> id(-1, num_experts - 1);
    std::normal_distribution<float> normal;
    std::vector<int32_t> topk_idx(num_tokens * num_topk);
    for (auto& v : topk_idx) v = id(rng);
    std::vector<float> x(num_tokens * hidden), w(num_tokens * num_topk), g(num_tokens * hidden);
    for (auto& v : x) v = normal(rng);
    for (auto& v : w) v = normal(rng);
    for (auto& v : g) v = normal(rng);
    const HostLayout lay = host_layout(topk_idx, num_experts, {});
    const int64_t num_rows = num_tokens * num_topk;

    DeviceBuffer<float> d_x(x), d_w(w), d_g(g), rows(num_rows * hidden), out(num_tokens * hidden);
    DeviceBuffer<float> grad_rows(num_rows * hidden), grad_w(num_rows);
    DeviceBuffer<int32_t> s2r(lay.slot_to_row), r2s(lay.row_to_slot);
    cuda::launch_moe_permute(d_x.get(), DType::kFloat32, r2s.get(), num_rows, hidden, num_topk, rows.get(), nullptr);
    cuda::launch_moe_unpermute(rows.get(), DType::kFloat32, s2r.get(), d_w.get(), num_tokens, num_topk, hidden,
                               out.get(), nullptr);
    cuda::launch_moe_unpermute_backward(d_g.get(), rows.get(), DType::kFloat32, s2r.get(), d_w.get(), num_tokens,
                                        num_topk, num_rows, hidden, grad_rows.get(), grad_w.get(), nullptr);
    const auto h_rows = rows.to_host();
    const auto h_out = out.to_host();
    const auto h_grad_rows = grad_rows.to_host();
    const auto h_grad_w = grad_w.to_host();
    for (int64_t r = 0; r < num_rows; ++r) {
        const int32_t f = lay.row_to_slot[r];
        for (int64_t c = 0; c < hidden; ++c) {
            ASSERT_EQ(h_rows[r * hidden + c], f < 0 ? 0.0f : x[(f / num_topk) * hidden + c]) << r << "," << c;
            const float want_grad = f < 0 ? 0.0f : w[f] * g[(f / num_topk) * hidden + c];
            ASSERT_EQ(h_grad_rows[r * hidden + c], want_grad) << r << "," << c;
        }
    }
    for (int64_t t = 0; t < num_tokens; ++t) {
        for (int64_t c = 0; c < hidden; ++c) {
            float acc = 0.0f;
            for (int j = 0; j < num_topk; ++j) {
                const int32_t row = lay.slot_to_row[t * num_topk + j];
                if (row >= 0) acc += w[t * num_topk + j] * x[t * hidden + c];
            }
            ASSERT_EQ(h_out[t * hidden + c], acc) << t << "," << c;
        }
        for (int j = 0; j < num_topk; ++j) {
            const int64_t f = t * num_topk + j;
            double dot = 0.0;
            if (lay.slot_to_row[f] >= 0)
                for (int64_t c = 0; c < hidden; ++c) dot += double(g[t * hidden + c]) * x[t * hidden + c];
            ASSERT_NEAR(h_grad_w[f], dot, 1e-4 * (1.0 + std::abs(dot))) << f;
        }
    }
}

}  // namespace
}  // namespace epmoe::test
#endif
