// Host tests of route_cpu / validate_route_params, and GPU tests of launch_route against route_cpu.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "cpp/core/check.h"
#include "cpp/core/route.h"

#ifdef EPMOE_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/route.cuh"
#include "tests/cpp/cuda_test_utils.h"
#endif

namespace {

using epmoe::DType;
using epmoe::RouteParams;
using epmoe::Scoring;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

RouteParams make_params(int64_t num_tokens, int num_experts, int num_topk, Scoring scoring = Scoring::kSoftmax,
                        int num_groups = 1, int num_topk_groups = 1, bool has_bias = false) {
    RouteParams p;
    p.num_tokens = num_tokens;
    p.num_experts = num_experts;
    p.num_topk = num_topk;
    p.scoring = scoring;
    p.num_groups = num_groups;
    p.num_topk_groups = num_topk_groups;
    p.has_bias = has_bias;
    return p;
}

struct Routed {
    std::vector<float> topk_weights;
    std::vector<int32_t> topk_idx;
};

Routed run_cpu(const void* logits, DType dtype, const float* bias, const RouteParams& p) {
    Routed out{std::vector<float>(p.num_tokens * p.num_topk), std::vector<int32_t>(p.num_tokens * p.num_topk)};
    epmoe::core::route_cpu(logits, dtype, bias, p, out.topk_weights.data(), out.topk_idx.data(), 0, p.num_tokens);
    return out;
}

void expect_distinct_rows(const Routed& r, const RouteParams& p) {
    for (int64_t t = 0; t < p.num_tokens; ++t) {
        std::set<int32_t> ids(r.topk_idx.begin() + t * p.num_topk, r.topk_idx.begin() + (t + 1) * p.num_topk);
        EXPECT_EQ(static_cast<int>(ids.size()), p.num_topk) << "duplicate ids in row " << t;
        for (int32_t id : ids)
            EXPECT_TRUE(0 <= id and id < p.num_experts) << "id " << id << " out of range in row " << t;
    }
}

std::vector<float> random_logits(int64_t n, uint32_t seed, float scale = 2.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v)
        x = dist(rng);
    return v;
}

TEST(RouteValidate, AcceptsDeepSeekV3Shape) {
    EXPECT_EQ(epmoe::core::validate_route_params(make_params(16, 256, 8, Scoring::kSigmoid, 8, 4, true)), "");
}

TEST(RouteValidate, RejectsBadArgumentsNamingThem) {
    struct Case {
        RouteParams p;
        const char* name;
    };
    RouteParams bad_scaling = make_params(4, 8, 2);
    bad_scaling.scaling_factor = kNaN;
    RouteParams bad_scoring = make_params(4, 8, 2);
    bad_scoring.scoring = static_cast<Scoring>(7);
    const Case cases[] = {
        {make_params(4, 8, 0), "top_k"},
        {make_params(4, 8, 9), "top_k"},
        {make_params(4, 256, 129, Scoring::kSigmoid, 8, 4, true), "top_k"},  // 4 groups * 32 = 128 candidates
        {make_params(4, 10, 2, Scoring::kSoftmax, 4, 1), "num_groups"},
        {make_params(4, 8, 2, Scoring::kSoftmax, 0, 1), "num_groups"},
        {make_params(4, 8, 2, Scoring::kSoftmax, 4, 5), "topk_groups"},
        {make_params(4, 8, 2, Scoring::kSoftmax, 4, 0), "topk_groups"},
        {make_params(4, 8, 2, Scoring::kSigmoid, 8, 4, true), "bias"},
        {make_params(4, 0, 1), "router_logits"},
        {make_params(-1, 8, 2), "router_logits"},
        {bad_scaling, "scaling_factor"},
        {bad_scoring, "scoring"},
    };
    for (const Case& c : cases) {
        const std::string msg = epmoe::core::validate_route_params(c.p);
        EXPECT_NE(msg.find(c.name), std::string::npos) << "expected '" << c.name << "' in: " << msg;
    }
    // Size-1 groups are fine without a bias
    EXPECT_EQ(epmoe::core::validate_route_params(make_params(4, 8, 2, Scoring::kSoftmax, 8, 4)), "");
}

TEST(RouteCpu, RouteCpuRejectsInvalidParams) {
    const RouteParams p = make_params(1, 8, 9);
    std::vector<float> logits(8), w(9);
    std::vector<int32_t> idx(9);
    EXPECT_THROW(epmoe::core::route_cpu(logits.data(), DType::kFloat32, nullptr, p, w.data(), idx.data(), 0, 1),
                 epmoe::Error);
}

TEST(RouteCpu, SoftmaxHandComputed) {
    const float logits[4] = {0.0f, std::log(3.0f), std::log(2.0f), std::log(4.0f)};  // softmax = {1,3,2,4}/10
    RouteParams p = make_params(1, 4, 2);
    p.renormalize = false;
    const Routed r = run_cpu(logits, DType::kFloat32, nullptr, p);
    EXPECT_EQ(r.topk_idx, (std::vector<int32_t>{3, 1}));
    EXPECT_NEAR(r.topk_weights[0], 0.4f, 1e-7f);
    EXPECT_NEAR(r.topk_weights[1], 0.3f, 1e-7f);

    p.renormalize = true;
    p.scaling_factor = 2.0f;
    const Routed rn = run_cpu(logits, DType::kFloat32, nullptr, p);
    EXPECT_NEAR(rn.topk_weights[0], 2.0f * 4.0f / 7.0f, 1e-6f);
    EXPECT_NEAR(rn.topk_weights[1], 2.0f * 3.0f / 7.0f, 1e-6f);
}

TEST(RouteCpu, SigmoidBiasSelectsButDoesNotWeigh) {
    const float logits[4] = {2.0f, 0.0f, -1.0f, 1.0f};
    const float bias[4] = {0.0f, 0.0f, 10.0f, 0.0f};
    RouteParams p = make_params(1, 4, 2, Scoring::kSigmoid, 1, 1, true);
    p.renormalize = false;
    const Routed r = run_cpu(logits, DType::kFloat32, bias, p);
    EXPECT_EQ(r.topk_idx, (std::vector<int32_t>{2, 0}));
    EXPECT_NEAR(r.topk_weights[0], 1.0f / (1.0f + std::exp(1.0f)), 1e-7f);
    EXPECT_NEAR(r.topk_weights[1], 1.0f / (1.0f + std::exp(-2.0f)), 1e-7f);
}

TEST(RouteCpu, GroupsTopTwoSumWithBias) {
    // 3 groups of 3 experts; sigmoid(0) = 0.5 everywhere, so sel = 0.5 + bias (all exact in fp32).
    // group 0: {0.75, 0.75, 1.75} -> top-2 sum 2.5
    // group 1: {1.5, 1.5, 0.5}    -> 3.0 (a repeated maximum counts twice)
    // group 2: {2.0, 0.5, 0.5}    -> 2.5, ties with group 0: the lower index wins
    const float bias[9] = {0.25f, 0.25f, 1.25f, 1.0f, 1.0f, 0.0f, 1.5f, 0.0f, 0.0f};
    const std::vector<float> logits(9, 0.0f);
    const RouteParams p = make_params(1, 9, 3, Scoring::kSigmoid, 3, 2, true);
    const Routed r = run_cpu(logits.data(), DType::kFloat32, bias, p);
    // Kept groups: 1 and 0; expert 6 (the best sel, 2.0) is in group 2 and excluded
    EXPECT_EQ(r.topk_idx, (std::vector<int32_t>{2, 3, 4}));
    for (float w : r.topk_weights)
        EXPECT_FLOAT_EQ(w, 1.0f / 3.0f);
}

TEST(RouteCpu, GroupsMaxWithoutBias) {
    const float logits[8] = {5.0f, 0.0f, 1.0f, 4.5f, 3.0f, 3.0f, -1.0f, 4.9f};  // groups of 2: max 5, 4.5, 3, 4.9
    const RouteParams p = make_params(1, 8, 3, Scoring::kSoftmax, 4, 2);
    const Routed r = run_cpu(logits, DType::kFloat32, nullptr, p);
    EXPECT_EQ(r.topk_idx, (std::vector<int32_t>{0, 7, 1}));  // groups 0 and 3 kept; 4.5 (group 1) is not
}

TEST(RouteCpu, TiesPreferLowerIndex) {
    const std::vector<float> logits(16, 0.25f);
    const RouteParams p = make_params(1, 16, 5);
    const Routed r = run_cpu(logits.data(), DType::kFloat32, nullptr, p);
    EXPECT_EQ(r.topk_idx, (std::vector<int32_t>{0, 1, 2, 3, 4}));
    for (float w : r.topk_weights)
        EXPECT_FLOAT_EQ(w, 0.2f);
    // Repeated values among distinct ones, and all-equal groups
    const float repeated[8] = {1.0f, 3.0f, 2.0f, 3.0f, 1.0f, 3.0f, 0.0f, 2.0f};
    const Routed r2 = run_cpu(repeated, DType::kFloat32, nullptr, make_params(1, 8, 5));
    EXPECT_EQ(r2.topk_idx, (std::vector<int32_t>{1, 3, 5, 2, 7}));
    const Routed r3 =
        run_cpu(logits.data(), DType::kFloat32, nullptr, make_params(1, 16, 6, Scoring::kSigmoid, 4, 2));
    EXPECT_EQ(r3.topk_idx, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
}

TEST(RouteCpu, NonFiniteRowsGiveDistinctIds) {
    const int num_experts = 64;
    std::vector<float> logits(6 * num_experts, 0.0f);
    for (int i = 0; i < num_experts; ++i) {
        logits[0 * num_experts + i] = kNaN;                  // all NaN
        logits[1 * num_experts + i] = i % 3 == 0 ? kNaN : 0.1f * i;  // some NaN
        logits[2 * num_experts + i] = i == 5 ? kInf : 0.0f;  // +inf
        logits[3 * num_experts + i] = -kInf;                 // all -inf
        logits[4 * num_experts + i] = i % 2 ? -kInf : kInf;  // +-inf
        logits[5 * num_experts + i] = i == 9 ? kNaN : 0.0f;  // one NaN
    }
    std::vector<float> bias(num_experts, 0.5f);
    for (Scoring scoring : {Scoring::kSoftmax, Scoring::kSigmoid}) {
        for (int num_groups : {1, 8}) {
            const RouteParams p = make_params(6, num_experts, 8, scoring, num_groups, num_groups == 1 ? 1 : 4, true);
            const Routed r = run_cpu(logits.data(), DType::kFloat32, bias.data(), p);
            expect_distinct_rows(r, p);
        }
    }
    // All-NaN softmax row: every sel ranks as -inf, so the lowest ids win; weights are NaN
    const Routed r = run_cpu(logits.data(), DType::kFloat32, nullptr, make_params(1, num_experts, 4));
    EXPECT_EQ(r.topk_idx, (std::vector<int32_t>{0, 1, 2, 3}));
    EXPECT_TRUE(std::isnan(r.topk_weights[0]));
    // Sigmoid with some NaN: finite candidates first (largest logits), NaN ones never before them
    const Routed rs = run_cpu(logits.data() + num_experts, DType::kFloat32, nullptr,
                              make_params(1, num_experts, 3, Scoring::kSigmoid));
    EXPECT_EQ(rs.topk_idx, (std::vector<int32_t>{62, 61, 59}));
}

TEST(RouteCpu, HalfAndBFloat16MatchFloat32OfTheSameValues) {
    const int num_tokens = 33, num_experts = 96;
    const std::vector<float> logits = random_logits(num_tokens * num_experts, 7);
    std::vector<uint16_t> bf16(logits.size()), fp16(logits.size());
    std::vector<float> bf16_values(logits.size()), fp16_values(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
        uint32_t bits;
        std::memcpy(&bits, &logits[i], 4);
        bf16[i] = static_cast<uint16_t>(bits >> 16);  // truncation: any bit pattern is a valid input
        const uint32_t back = static_cast<uint32_t>(bf16[i]) << 16;
        std::memcpy(&bf16_values[i], &back, 4);
        const _Float16 h = static_cast<_Float16>(logits[i] * 1e-3f);  // small values: fp16 subnormals too
        std::memcpy(&fp16[i], &h, 2);
        fp16_values[i] = static_cast<float>(h);
    }
    const RouteParams p = make_params(num_tokens, num_experts, 6, Scoring::kSoftmax, 4, 2);
    const Routed a = run_cpu(bf16.data(), DType::kBFloat16, nullptr, p);
    const Routed b = run_cpu(bf16_values.data(), DType::kFloat32, nullptr, p);
    EXPECT_EQ(a.topk_idx, b.topk_idx);
    EXPECT_EQ(a.topk_weights, b.topk_weights);
    const Routed c = run_cpu(fp16.data(), DType::kFloat16, nullptr, p);
    const Routed d = run_cpu(fp16_values.data(), DType::kFloat32, nullptr, p);
    EXPECT_EQ(c.topk_idx, d.topk_idx);
    EXPECT_EQ(c.topk_weights, d.topk_weights);
}

TEST(RouteCpu, TokenRangesAreIndependent) {
    const int num_tokens = 50, num_experts = 256;
    const std::vector<float> logits = random_logits(num_tokens * num_experts, 3);
    const std::vector<float> bias = random_logits(num_experts, 4, 0.1f);
    const RouteParams p = make_params(num_tokens, num_experts, 8, Scoring::kSigmoid, 8, 4, true);
    const Routed whole = run_cpu(logits.data(), DType::kFloat32, bias.data(), p);
    Routed parts{std::vector<float>(num_tokens * 8), std::vector<int32_t>(num_tokens * 8)};
    for (int64_t begin : {0, 17, 18, 41}) {
        const int64_t end = begin == 0 ? 17 : begin == 17 ? 18 : begin == 18 ? 41 : num_tokens;
        epmoe::core::route_cpu(logits.data(), DType::kFloat32, bias.data(), p, parts.topk_weights.data(),
                               parts.topk_idx.data(), begin, end);
    }
    EXPECT_EQ(whole.topk_idx, parts.topk_idx);
    EXPECT_EQ(whole.topk_weights, parts.topk_weights);
    expect_distinct_rows(whole, p);
}

TEST(RouteCpu, LargeExpertCountAndTopK) {
    const int num_tokens = 20, num_experts = 1024, num_topk = 32;
    const std::vector<float> logits = random_logits(num_tokens * num_experts, 11);
    const RouteParams p = make_params(num_tokens, num_experts, num_topk);
    const Routed r = run_cpu(logits.data(), DType::kFloat32, nullptr, p);
    expect_distinct_rows(r, p);
    for (int t = 0; t < num_tokens; ++t) {
        // Best first, and nothing outside the selection beats the last pick
        const float* row = logits.data() + t * num_experts;
        const int32_t* ids = r.topk_idx.data() + t * num_topk;
        float sum = 0.0f;
        for (int j = 0; j < num_topk; ++j) {
            sum += r.topk_weights[t * num_topk + j];
            if (j > 0) {
                EXPECT_GE(row[ids[j - 1]], row[ids[j]]);
            }
        }
        const std::set<int32_t> picked(ids, ids + num_topk);
        for (int i = 0; i < num_experts; ++i) {
            if (not picked.count(i)) {
                EXPECT_LE(row[i], row[ids[num_topk - 1]]);
            }
        }
        EXPECT_NEAR(sum, 1.0f, 1e-5f);
    }
}

#ifdef EPMOE_WITH_CUDA

template <typename T>
T* to_device(const std::vector<T>& host) {
    T* ptr = nullptr;
    EPMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(host.size(), 1) * sizeof(T)));
    EPMOE_CUDA_CHECK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    return ptr;
}

Routed run_gpu(const void* logits_host, size_t logits_bytes, DType dtype, const std::vector<float>* bias,
               const RouteParams& p) {
    void* logits = nullptr;
    EPMOE_CUDA_CHECK(cudaMalloc(&logits, std::max<size_t>(logits_bytes, 1)));
    EPMOE_CUDA_CHECK(cudaMemcpy(logits, logits_host, logits_bytes, cudaMemcpyHostToDevice));
    float* bias_dev = bias != nullptr ? to_device(*bias) : nullptr;
    Routed out{std::vector<float>(p.num_tokens * p.num_topk), std::vector<int32_t>(p.num_tokens * p.num_topk)};
    float* weights = to_device(out.topk_weights);
    int32_t* idx = to_device(out.topk_idx);
    epmoe::cuda::launch_route(logits, dtype, bias_dev, p, weights, idx, nullptr);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    EPMOE_CUDA_CHECK(cudaMemcpy(out.topk_weights.data(), weights, out.topk_weights.size() * 4, cudaMemcpyDeviceToHost));
    EPMOE_CUDA_CHECK(cudaMemcpy(out.topk_idx.data(), idx, out.topk_idx.size() * 4, cudaMemcpyDeviceToHost));
    for (void* ptr : {logits, static_cast<void*>(bias_dev), static_cast<void*>(weights), static_cast<void*>(idx)})
        EPMOE_CUDA_CHECK(cudaFree(ptr));
    return out;
}

void expect_gpu_matches_cpu(const Routed& gpu, const Routed& cpu) {
    EXPECT_EQ(gpu.topk_idx, cpu.topk_idx);
    ASSERT_EQ(gpu.topk_weights.size(), cpu.topk_weights.size());
    for (size_t i = 0; i < cpu.topk_weights.size(); ++i) {
        const float a = gpu.topk_weights[i], b = cpu.topk_weights[i];
        if (std::isnan(b)) {
            EXPECT_TRUE(std::isnan(a)) << "slot " << i;
        } else {
            EXPECT_LE(std::fabs(a - b), std::fabs(std::nextafter(b, kInf) - b)) << "slot " << i;  // 1 ulp
        }
    }
}

TEST(RouteCuda, MatchesCpuOnShapes) {
    EPMOE_SKIP_IF_NO_GPU();
    struct Shape {
        int num_experts, num_topk, num_groups, num_topk_groups;
        Scoring scoring;
        bool has_bias;
    };
    const Shape shapes[] = {
        {256, 8, 8, 4, Scoring::kSigmoid, true}, {128, 8, 1, 1, Scoring::kSoftmax, false},
        {8, 2, 1, 1, Scoring::kSoftmax, false},  {60, 6, 6, 3, Scoring::kSoftmax, false},
        {160, 6, 5, 2, Scoring::kSigmoid, true}, {384, 8, 1, 1, Scoring::kSigmoid, false},
        {1024, 32, 1, 1, Scoring::kSoftmax, false}, {64, 1, 64, 7, Scoring::kSoftmax, false},
    };
    for (const Shape& s : shapes) {
        for (int64_t num_tokens : {1, 7, 300}) {
            RouteParams p = make_params(num_tokens, s.num_experts, s.num_topk, s.scoring, s.num_groups,
                                        s.num_topk_groups, s.has_bias);
            p.scaling_factor = 2.5f;
            std::vector<float> logits = random_logits(num_tokens * s.num_experts, 5 + s.num_experts);
            logits[0] = kNaN;  // non-finite entries in the first rows
            if (num_tokens > 1)
                logits[s.num_experts + 3] = kInf;
            const std::vector<float> bias = random_logits(s.num_experts, 9, 0.2f);
            const std::vector<float>* bias_ptr = s.has_bias ? &bias : nullptr;
            const Routed cpu = run_cpu(logits.data(), DType::kFloat32, s.has_bias ? bias.data() : nullptr, p);
            const Routed gpu = run_gpu(logits.data(), logits.size() * 4, DType::kFloat32, bias_ptr, p);
            SCOPED_TRACE(::testing::Message() << "E=" << s.num_experts << " k=" << s.num_topk << " T=" << num_tokens);
            expect_gpu_matches_cpu(gpu, cpu);
            // bf16: the top halves of the fp32 patterns
            std::vector<uint16_t> bf16(logits.size());
            for (size_t i = 0; i < logits.size(); ++i) {
                uint32_t bits;
                std::memcpy(&bits, &logits[i], 4);
                bf16[i] = static_cast<uint16_t>(bits >> 16);
            }
            expect_gpu_matches_cpu(run_gpu(bf16.data(), bf16.size() * 2, DType::kBFloat16, bias_ptr, p),
                                   run_cpu(bf16.data(), DType::kBFloat16, s.has_bias ? bias.data() : nullptr, p));
        }
    }
}

TEST(RouteCuda, EmptyBatchLaunchesNothing) {
    EPMOE_SKIP_IF_NO_GPU();
    const RouteParams p = make_params(0, 64, 4);
    epmoe::cuda::launch_route(nullptr, DType::kFloat32, nullptr, p, nullptr, nullptr, nullptr);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
}

#endif  // EPMOE_WITH_CUDA

}  // namespace
