// Host tests of the CPU expert micro-kernels (gemm_nt, panel kernels, expert_gemm dispatch) against naive double
// loops, and of unpermute_rows' fixed summation order. Skipped where the CPU lacks the instructions.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cpp/core/check.h"
#include "cpp/core/cpu_peak.h"
#include "cpp/core/expert_gemm.h"
#include "cpp/core/fp_math.h"
#include "cpp/core/gemm_nt.h"
#include "cpp/core/gemm_panel.h"
#include "cpp/core/permute.h"

namespace {

using epmoe::DType;
namespace core = epmoe::core;

// Row-major matrix of values representable in the element type (bf16-rounded when bf16), with its raw storage.
struct Matrix {
    int64_t rows = 0, cols = 0;
    DType dtype = DType::kFloat32;
    std::vector<float> values;
    std::vector<float> f32;
    std::vector<uint16_t> bf16;

    Matrix(int64_t r, int64_t c, DType dt, std::mt19937& gen) : rows(r), cols(c), dtype(dt), values(r * c) {
        std::normal_distribution<float> dist(0.0f, 0.5f);
        for (auto& v : values) v = dt == DType::kBFloat16 ? core::bf16_to_float(core::float_to_bf16(dist(gen))) : dist(gen);
        if (dt == DType::kFloat32) {
            f32 = values;
        } else {
            for (float v : values) bf16.push_back(core::float_to_bf16(v));
        }
    }
    const void* row(int64_t r) const {
        return dtype == DType::kFloat32 ? static_cast<const void*>(f32.data() + r * cols)
                                        : static_cast<const void*>(bf16.data() + r * cols);
    }
    const void* data() const { return row(0); }
    double at(int64_t r, int64_t c) const { return values[r * cols + c]; }
};

double dot(const Matrix& a, int64_t i, const Matrix& b, int64_t j) {
    double s = 0.0;
    for (int64_t k = 0; k < a.cols; ++k) s += a.at(i, k) * b.at(j, k);
    return s;
}

// Output rows of `dtype` read back as float.
struct Output {
    DType dtype;
    int64_t cols;
    std::vector<float> f32;
    std::vector<uint16_t> bf16;
    std::vector<void*> rows;

    Output(int64_t r, int64_t c, DType dt) : dtype(dt), cols(c), f32(r * c, -7.0f), bf16(r * c, 0xdead) {
        for (int64_t i = 0; i < r; ++i)
            rows.push_back(dt == DType::kFloat32 ? static_cast<void*>(f32.data() + i * c)
                                                 : static_cast<void*>(bf16.data() + i * c));
    }
    float at(int64_t r, int64_t c) const {
        return dtype == DType::kFloat32 ? f32[r * cols + c] : core::bf16_to_float(bf16[r * cols + c]);
    }
};

double tolerance(DType dtype, double ref) { return dtype == DType::kFloat32 ? 1e-4 + 1e-4 * std::fabs(ref)
                                                                            : 2e-2 + 1e-2 * std::fabs(ref); }

class CpuGemm : public ::testing::TestWithParam<DType> {
  protected:
    void SetUp() override {
        if (!core::gemm_nt_supported(GetParam())) GTEST_SKIP() << "no native kernel for this dtype on this CPU";
    }
};

// Rows from 1 to 70 (NT tails, panel row tails), depths with every kind of K tail, columns with tile tails.
const int64_t kRows[] = {1, 3, 4, 5, 23, 24, 33, 70};
const int64_t kDepths[] = {8, 24, 40, 57, 1030};
const int64_t kCols[] = {1, 7, 13, 30};

TEST_P(CpuGemm, ExpertGemmMatchesNaiveOnBothPaths) {
    std::mt19937 gen(1);
    for (int64_t m : kRows) {
        for (int64_t depth : kDepths) {
            for (int64_t n : kCols) {
                const Matrix a(m, depth, GetParam(), gen), w(n + 5, depth, GetParam(), gen);
                std::vector<const void*> a_rows;
                for (int64_t i = 0; i < m; ++i) a_rows.push_back(a.row(i));
                Output out(m, n + 5, GetParam());
                const int64_t col_begin = 2, col_end = std::min<int64_t>(n + 2, n + 5);
                std::vector<char> scratch(core::expert_gemm_scratch_bytes(GetParam(), m, depth, n + 5) + 64);
                void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~63ul);
                core::expert_gemm(GetParam(), a_rows.data(), m, depth, w.data(), col_begin, col_end, out.rows.data(),
                                  aligned);
                for (int64_t i = 0; i < m; ++i) {
                    for (int64_t c = 0; c < n + 5; ++c) {
                        if (c < col_begin || c >= col_end) {
                            ASSERT_EQ(out.at(i, c), GetParam() == DType::kFloat32 ? -7.0f : core::bf16_to_float(0xdead))
                                << "column outside the range written, m=" << m << " depth=" << depth;
                            continue;
                        }
                        const double ref = dot(a, i, w, c);
                        ASSERT_NEAR(out.at(i, c), ref, tolerance(GetParam(), ref))
                            << "m=" << m << " depth=" << depth << " n=" << n << " row " << i << " col " << c;
                    }
                }
            }
        }
    }
}

TEST_P(CpuGemm, ExpertSwigluMatchesNaiveOnBothPaths) {
    std::mt19937 gen(2);
    for (int64_t m : kRows) {
        for (int64_t hidden : {8, 40, 136}) {
            for (int64_t inter : {1, 6, 11, 25}) {
                const Matrix a(m, hidden, GetParam(), gen), w13(2 * inter, hidden, GetParam(), gen);
                std::vector<const void*> a_rows;
                for (int64_t i = 0; i < m; ++i) a_rows.push_back(a.row(i));
                Output h(m, inter, GetParam());
                std::vector<char> scratch(core::expert_swiglu_scratch_bytes(GetParam(), m, hidden, inter) + 64);
                void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~63ul);
                core::expert_swiglu(GetParam(), a_rows.data(), m, hidden, w13.row(0), w13.row(inter), 0, inter,
                                    h.rows.data(), aligned);
                for (int64_t i = 0; i < m; ++i) {
                    for (int64_t c = 0; c < inter; ++c) {
                        const double g = dot(a, i, w13, c), u = dot(a, i, w13, inter + c);
                        const double ref = g / (1.0 + std::exp(-g)) * u;
                        ASSERT_NEAR(h.at(i, c), ref, tolerance(GetParam(), ref))
                            << "m=" << m << " hidden=" << hidden << " inter=" << inter;
                    }
                }
            }
        }
    }
}

// Each output is one fixed-order sum: computing a column range alone gives the same bits as within a wider call.
TEST_P(CpuGemm, ResultsDoNotDependOnTheColumnSplit) {
    std::mt19937 gen(3);
    for (int64_t m : {5, 40}) {
        const Matrix a(m, 96, GetParam(), gen), w(30, 96, GetParam(), gen);
        std::vector<const void*> a_rows;
        for (int64_t i = 0; i < m; ++i) a_rows.push_back(a.row(i));
        Output whole(m, 30, GetParam()), split(m, 30, GetParam());
        std::vector<char> scratch(core::expert_gemm_scratch_bytes(GetParam(), m, 96, 30) + 64);
        void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~63ul);
        core::expert_gemm(GetParam(), a_rows.data(), m, 96, w.data(), 0, 30, whole.rows.data(), aligned);
        for (int64_t c0 = 0; c0 < 30; c0 += 12)
            core::expert_gemm(GetParam(), a_rows.data(), m, 96, w.data(), c0, std::min<int64_t>(c0 + 12, 30),
                              split.rows.data(), aligned);
        EXPECT_EQ(whole.f32, split.f32);
        EXPECT_EQ(whole.bf16, split.bf16);
    }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CpuGemm, ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         [](const auto& info) { return info.param == DType::kFloat32 ? "fp32" : "bf16"; });

TEST(CpuGemmUnsupported, RaisesInsteadOfRunning) {
    if (core::gemm_nt_supported(DType::kFloat16) == false) {
        const float a = 0.0f;
        const void* rows[] = {&a};
        float c = 0.0f;
        EXPECT_THROW(core::gemm_nt(DType::kFloat16, rows, 1, &a, 1, 1, 1, &c, 1), epmoe::Error);
    }
}

TEST(UnpermuteRows, AscendingSlotsSeparateMultiplyAndAdd) {
    // 2 tokens x 3 slots, hidden 5; slot (1, 1) skipped; rows in slot order (rows_by_slot) and through slot_to_row.
    const int64_t hidden = 5;
    std::vector<float> rows(6 * hidden);
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = 0.1f * static_cast<float>(i) + 1e-3f;
    const std::vector<int32_t> slot_to_row = {0, 1, 2, 3, -1, 5};
    const std::vector<float> w = {0.3f, 0.7f, 1.1f, 0.2f, 9.0f, 0.5f};
    std::vector<float> out(2 * hidden), out_by_slot(2 * hidden);
    core::unpermute_rows(DType::kFloat32, rows.data(), hidden, slot_to_row.data(), false, w.data(), 3, nullptr, 0, 2,
                         out.data());
    core::unpermute_rows(DType::kFloat32, rows.data(), hidden, slot_to_row.data(), true, w.data(), 3, nullptr, 0, 2,
                         out_by_slot.data());
    for (int64_t t = 0; t < 2; ++t) {
        for (int64_t h = 0; h < hidden; ++h) {
            float acc = 0.0f;
            for (int64_t j = 0; j < 3; ++j) {
                const int32_t r = slot_to_row[t * 3 + j];
                if (r < 0) continue;
                const volatile float product = w[t * 3 + j] * rows[r * hidden + h];  // no FMA
                acc = acc + product;
            }
            EXPECT_EQ(out[t * hidden + h], acc);
            EXPECT_EQ(out_by_slot[t * hidden + h], acc);
        }
    }
}

TEST(UnpermuteRows, AddendIsAddedToTheRoundedSum) {
    // bf16: out = bf16(float(bf16(sum)) + float(addend)), the two roundings of adding two bf16 tensors.
    const int64_t hidden = 3;
    const float values[] = {1.0f, 1.0f / 256.0f, 3.0f, 1.5f, 0.0078125f, -2.0f};  // 2 rows (slots of token 0)
    std::vector<uint16_t> rows, addend = {core::float_to_bf16(1.0f / 512.0f), core::float_to_bf16(0.5f),
                                          core::float_to_bf16(-1.0f)};
    for (float v : values) rows.push_back(core::float_to_bf16(v));
    const std::vector<int32_t> slot_to_row = {0, 1};
    const std::vector<float> w = {1.0f, 1.0f};
    std::vector<uint16_t> out(hidden);
    core::unpermute_rows(DType::kBFloat16, rows.data(), hidden, slot_to_row.data(), false, w.data(), 2,
                         addend.data(), 0, 1, out.data());
    for (int64_t h = 0; h < hidden; ++h) {
        const float sum = core::bf16_to_float(rows[h]) + core::bf16_to_float(rows[hidden + h]);
        const float expected = core::bf16_to_float(core::float_to_bf16(
            core::bf16_to_float(core::float_to_bf16(sum)) + core::bf16_to_float(addend[h])));
        EXPECT_EQ(core::bf16_to_float(out[h]), expected) << h;
    }
    // fp32: one more addition.
    const std::vector<float> rows32 = {0.25f, 3.0f}, addend32 = {1e-8f};
    float out32 = 0.0f;
    core::unpermute_rows(DType::kFloat32, rows32.data(), 1, slot_to_row.data(), false, w.data(), 2, addend32.data(),
                         0, 1, &out32);
    EXPECT_EQ(out32, (0.25f + 3.0f) + 1e-8f);
}

TEST(CpuPeak, CountsFlops) {
    if (!core::cpu_peak_supported(core::PeakKind::kFp32Fma)) GTEST_SKIP() << "no AVX-512";
    EXPECT_EQ(core::cpu_peak_run(core::PeakKind::kFp32Fma, 10), 10.0 * 24 * 16 * 2);
}

}  // namespace
