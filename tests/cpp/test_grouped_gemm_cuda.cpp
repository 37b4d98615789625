// GPU tests of the grouped GEMM launchers (cuda/grouped_gemm.cuh) against host loops in double precision, for
// fp32 (SIMT path) and bf16 (tensor-core path, large and decode tiles). Skipped without a device.
#ifdef EPMOE_WITH_CUDA
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cuda/grouped_gemm.cuh"
#include "tests/cpp/cuda_test_utils.h"

namespace epmoe::test {
namespace {

uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
double silu(double g) { return g / (1.0 + std::exp(-g)); }

// Values exactly representable in bf16 so both precisions see the same operands.
std::vector<float> random_values(size_t n, std::mt19937& rng) {
    std::normal_distribution<float> normal;
    std::vector<float> v(n);
    for (auto& x : v) x = from_bf16(to_bf16(normal(rng)));
    return v;
}

struct Problem {
    std::vector<int64_t> offsets;  // [E + 1]
    int64_t num_rows;              // capacity (>= offsets[E])
};

Problem make_problem(const std::vector<int64_t>& counts, int64_t extra_rows) {
    Problem p{{0}, 0};
    for (int64_t c : counts) p.offsets.push_back(p.offsets.back() + c);
    p.num_rows = p.offsets.back() + extra_rows;
    return p;
}

int expert_of(const Problem& p, int64_t r) {
    for (size_t e = 0; e + 1 < p.offsets.size(); ++e)
        if (r < p.offsets[e + 1]) return static_cast<int>(e);
    return -1;
}

// Runs all four GEMM launchers on one problem in `dtype` and checks them against double host loops.
void check_gemms(const Problem& prob, int64_t hidden, int64_t inter, DType dtype, uint32_t seed) {
    const int num_experts = static_cast<int>(prob.offsets.size()) - 1;
    const int64_t R = prob.num_rows;
    std::mt19937 rng(seed);
    auto x = random_values(R * hidden, rng);
    for (int64_t i = prob.offsets.back() * hidden; i < R * hidden; ++i) x[i] = 0.0f;  // padding rows are zero
    const auto w13 = random_values(num_experts * 2 * inter * hidden, rng);
    const auto w_kn = random_values(num_experts * hidden * inter, rng);  // [E, K=hidden, N=inter]
    const bool bf16 = dtype == DType::kBFloat16;
    const double tol = bf16 ? 2e-2 : 1e-4;

    auto upload = [&](const std::vector<float>& v) {
        if (!bf16) return std::make_unique<DeviceBuffer<float>>(v);
        std::vector<float> packed((v.size() + 1) / 2);
        auto* bits = reinterpret_cast<uint16_t*>(packed.data());
        for (size_t i = 0; i < v.size(); ++i) bits[i] = to_bf16(v[i]);
        return std::make_unique<DeviceBuffer<float>>(packed);
    };
    auto download = [&](const DeviceBuffer<float>& d, size_t n) {
        const auto raw = d.to_host();
        std::vector<float> v(n);
        const auto* bits = reinterpret_cast<const uint16_t*>(raw.data());
        for (size_t i = 0; i < n; ++i) v[i] = bf16 ? from_bf16(bits[i]) : raw[i];
        return v;
    };
    auto alloc = [&](size_t n) { return std::make_unique<DeviceBuffer<float>>(bf16 ? (n + 1) / 2 : n); };
    auto expect_close = [&](double got, double want, const char* what, int64_t i) {
        ASSERT_NEAR(got, want, tol * (1.0 + std::abs(want))) << what << " at " << i;
    };

    auto d_x = upload(x), d_w13 = upload(w13), d_wkn = upload(w_kn);
    DeviceBuffer<int64_t> d_off(prob.offsets);
    DeviceBuffer<uint8_t> ws(cuda::grouped_gemm_workspace_bytes(num_experts));

    // grouped_swiglu and grouped_gemm(trans_w=True) on the gate half: h and gate pre-activations.
    auto d_h = alloc(R * inter);
    auto d_gu = alloc(R * 2 * inter);
    auto d_y = alloc(R * inter);
    cuda::launch_grouped_swiglu(d_x->get(), dtype, d_off.get(), num_experts, R, hidden, inter, d_w13->get(),
                                d_h->get(), ws.get(), nullptr);
    cuda::launch_grouped_gemm(d_x->get(), dtype, d_off.get(), num_experts, R, hidden, 2 * inter, d_w13->get(), true,
                              d_gu->get(), ws.get(), nullptr);
    cuda::launch_grouped_gemm(d_x->get(), dtype, d_off.get(), num_experts, R, hidden, inter, d_wkn->get(), false,
                              d_y->get(), ws.get(), nullptr);
    const auto h = download(*d_h, R * inter);
    const auto gu = download(*d_gu, R * 2 * inter);
    const auto y = download(*d_y, R * inter);
    for (int64_t r = 0; r < R; ++r) {
        const int e = expert_of(prob, r);
        for (int64_t i = 0; i < inter; ++i) {
            double gate = 0, up = 0, kn = 0;
            if (e >= 0) {
                for (int64_t c = 0; c < hidden; ++c) {
                    const double xv = x[r * hidden + c];
                    gate += xv * w13[(e * 2 * inter + i) * hidden + c];
                    up += xv * w13[(e * 2 * inter + inter + i) * hidden + c];
                    kn += xv * w_kn[(e * hidden + c) * inter + i];
                }
            }
            expect_close(h[r * inter + i], silu(gate) * up, "swiglu", r * inter + i);
            expect_close(gu[r * 2 * inter + i], gate, "gemm trans_w", r * 2 * inter + i);
            expect_close(gu[r * 2 * inter + inter + i], up, "gemm trans_w", r * 2 * inter + inter + i);
            expect_close(y[r * inter + i], kn, "gemm no trans_w", r * inter + i);
        }
    }

    // wgrad: out[e] = h_e^T @ x_e  ([E, inter, hidden]).
    auto d_wg = alloc(num_experts * inter * hidden);
    cuda::launch_grouped_gemm_wgrad(d_h->get(), d_x->get(), dtype, d_off.get(), num_experts, R, inter, hidden,
                                    d_wg->get(), nullptr);
    const auto wg = download(*d_wg, num_experts * inter * hidden);
    for (int e = 0; e < num_experts; ++e) {
        for (int64_t n = 0; n < inter; ++n) {
            for (int64_t c = 0; c < hidden; ++c) {
                double acc = 0;
                for (int64_t r = prob.offsets[e]; r < prob.offsets[e + 1]; ++r)
                    acc += double(h[r * inter + n]) * x[r * hidden + c];
                const int64_t i = (e * inter + n) * hidden + c;
                ASSERT_NEAR(wg[i], acc, tol * (1.0 + std::abs(acc)) * std::sqrt(1.0 + prob.offsets[e + 1] -
                                                                                  prob.offsets[e]))
                    << "wgrad at " << i;
            }
        }
    }
}

TEST(GroupedGemmCuda, Float32Simt) {
    EPMOE_SKIP_IF_NO_GPU();
    check_gemms(make_problem({5, 0, 70, 1}, 9), 72, 40, DType::kFloat32, 1);
}

TEST(GroupedGemmCuda, Bf16LargeTiles) {
    EPMOE_SKIP_IF_NO_GPU();
    // 160 rows/expert on average: 128-row tiles with masked tails; n, k not multiples of the tile sizes.
    check_gemms(make_problem({300, 0, 129, 191}, 20), 200, 136, DType::kBFloat16, 2);
}

TEST(GroupedGemmCuda, Bf16DecodeTiles) {
    EPMOE_SKIP_IF_NO_GPU();
    check_gemms(make_problem({3, 0, 16, 1, 40, 0, 7, 2}, 5), 136, 72, DType::kBFloat16, 3);
}

// The offsets a kernel uses after its device-side clamp: non-decreasing inside [0, num_rows].
std::vector<int64_t> clamp_offsets(const std::vector<int64_t>& offsets, int64_t num_rows) {
    std::vector<int64_t> out(offsets.size());
    int64_t running = 0;
    for (size_t e = 0; e < offsets.size(); ++e) {
        running = std::max(running, offsets[e]);
        out[e] = std::min(running, num_rows);
    }
    return out;
}

// Bad expert_offsets (non-monotone, negative, first != 0, past the last row) never reach outside the buffers
// (compute-sanitizer memcheck runs this on the GPU check): the forward GEMMs compute what the clamped offsets
// describe, rows no expert owns come out zero, and wgrad stays finite.
TEST(GroupedGemmCuda, BadOffsetsStayInBounds) {
    EPMOE_SKIP_IF_NO_GPU();
    const int64_t rows = 12, hidden = 16, inter = 8;
    const int num_experts = 3;
    std::mt19937 rng(5);
    const auto x = random_values(rows * hidden, rng);
    const auto w13 = random_values(num_experts * 2 * inter * hidden, rng);
    const auto w2 = random_values(num_experts * hidden * inter, rng);
    DeviceBuffer<float> d_x(x), d_w13(w13), d_w2(w2);
    DeviceBuffer<uint8_t> ws(cuda::grouped_gemm_workspace_bytes(num_experts));
    const std::vector<std::vector<int64_t>> bad_offsets = {
        {0, 9, 4, 40}, {-7, 3, 2, 12}, {5, 5, 11, 10}, {0, 1 << 30, -1, 3}, {-100, -50, -1, -1}};
    for (const auto& offsets : bad_offsets) {
        const std::vector<int64_t> clamped = clamp_offsets(offsets, rows);
        DeviceBuffer<int64_t> d_bad(offsets), d_clamped(clamped);
        DeviceBuffer<float> h_bad(rows * inter), h_ok(rows * inter), y_bad(rows * hidden), wg(num_experts * hidden * inter);
        cuda::launch_grouped_swiglu(d_x.get(), DType::kFloat32, d_bad.get(), num_experts, rows, hidden, inter,
                                    d_w13.get(), h_bad.get(), ws.get(), nullptr);
        cuda::launch_grouped_swiglu(d_x.get(), DType::kFloat32, d_clamped.get(), num_experts, rows, hidden, inter,
                                    d_w13.get(), h_ok.get(), ws.get(), nullptr);
        cuda::launch_grouped_gemm(h_bad.get(), DType::kFloat32, d_bad.get(), num_experts, rows, inter, hidden,
                                  d_w2.get(), true, y_bad.get(), ws.get(), nullptr);
        cuda::launch_grouped_gemm_wgrad(y_bad.get(), h_bad.get(), DType::kFloat32, d_bad.get(), num_experts, rows,
                                        hidden, inter, wg.get(), nullptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const auto got = h_bad.to_host(), want = h_ok.to_host(), y = y_bad.to_host(), w = wg.to_host();
        EXPECT_EQ(got, want) << "offsets " << offsets[0] << "," << offsets[1] << "," << offsets[2] << "," << offsets[3];
        for (int64_t r = 0; r < rows; ++r) {
            if (r >= clamped.front() && r < clamped.back()) continue;
            for (int64_t c = 0; c < inter; ++c) EXPECT_EQ(got[r * inter + c], 0.0f) << "unowned row " << r;
            for (int64_t c = 0; c < hidden; ++c) EXPECT_EQ(y[r * hidden + c], 0.0f) << "unowned row " << r;
        }
        for (float v : w) EXPECT_TRUE(std::isfinite(v));
    }
}

TEST(GroupedGemmCuda, SwigluBackwardFloat32) {
    EPMOE_SKIP_IF_NO_GPU();
    const int64_t rows = 37, inter = 24;
    std::mt19937 rng(4);
    const auto gu = random_values(rows * 2 * inter, rng);
    const auto gh = random_values(rows * inter, rng);
    DeviceBuffer<float> d_gu(gu), d_gh(gh), d_out(rows * 2 * inter);
    cuda::launch_swiglu_backward(d_gh.get(), d_gu.get(), DType::kFloat32, rows, inter, d_out.get(), nullptr);
    const auto out = d_out.to_host();
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < inter; ++i) {
            const double g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i], dh = gh[r * inter + i];
            const double s = 1.0 / (1.0 + std::exp(-g));
            ASSERT_NEAR(out[r * 2 * inter + i], dh * u * s * (1 + g * (1 - s)), 1e-5) << r << "," << i;
            ASSERT_NEAR(out[r * 2 * inter + inter + i], dh * g * s, 1e-5) << r << "," << i;
        }
    }
}

}  // namespace
}  // namespace epmoe::test
#endif
