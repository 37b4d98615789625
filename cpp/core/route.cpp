// Fused grouped top-K routing on the CPU: one pass per token, fp32 inside. Semantics: DESIGN.md §3.
//
// NOTES: this file is the bitwise oracle of cuda/route.cu. Both evaluate the same fp32 operations in the same
// order: the exp below (explicit fmaf, Taylor polynomial), softmax sums over 32 strided partials merged like a
// warp butterfly, sequential sums of the k weights. fp-contract is off so that g++ never fuses a multiply and
// an add that the CUDA side rounds separately (nvcc gets __fmul_rn/__fadd_rn there).
#pragma GCC optimize("fp-contract=off")
// The vector helpers below are always inlined into the ISA clones: the vector-argument ABI GCC warns about (for the
// baseline clone) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "cpp/core/route.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <vector>

#include "cpp/core/check.h"
#include "cpp/core/cpu_features.h"
#include "cpp/core/fp_math.h"

namespace epmoe::core {

std::string validate_route_params(const RouteParams& p) {
    std::ostringstream os;
    const int num_experts = p.num_experts, num_groups = p.num_groups;
    if (p.num_tokens < 0) {
        os << "router_logits must have num_tokens >= 0, got " << p.num_tokens;
    } else if (num_experts < 1) {
        os << "router_logits must have at least 1 expert (dim 1), got " << num_experts;
    } else if (p.scoring != Scoring::kSoftmax and p.scoring != Scoring::kSigmoid) {
        os << "scoring must be 'softmax' or 'sigmoid', got enum value " << static_cast<int>(p.scoring);
    } else if (num_groups < 1 or num_experts % num_groups != 0) {
        os << "num_groups must be >= 1 and divide the number of experts (" << num_experts << "), got " << num_groups;
    } else if (p.num_topk_groups < 1 or p.num_topk_groups > num_groups) {
        os << "topk_groups must be in [1, " << num_groups << "] (num_groups), got " << p.num_topk_groups;
    } else if (p.has_bias and num_groups > 1 and num_experts / num_groups < 2) {
        // The group score of the bias path is a top-2 sum, undefined for single-expert groups
        os << "bias with num_groups > 1 needs at least 2 experts per group, got " << num_experts / num_groups
           << " (num_experts " << num_experts << " / num_groups " << num_groups << ")";
    } else if (not std::isfinite(p.scaling_factor)) {
        os << "scaling_factor must be finite, got " << p.scaling_factor;
    } else {
        const int num_candidates = p.num_topk_groups * (num_experts / num_groups);
        if (p.num_topk < 1 or p.num_topk > num_candidates)
            os << "top_k must be in [1, " << num_candidates << "] (candidates), got " << p.num_topk;
    }
    return os.str();
}

namespace {

constexpr int kNumLanes = 32;  // softmax partial sums: lane l owns experts l, l + 32, ... (a CUDA warp's order)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// lanes[l] = lanes[l] + lanes[l + w] (or their max) for w = 16, 8, 4, 2, 1; returns lanes[0]. The order of a warp's xor
// butterfly, on vectors (GCC vector extensions: whatever the clone's ISA).
template <bool kSum, typename V>
[[gnu::always_inline]] inline V lane_op(V a, V b) {
    if constexpr (kSum) {
        return a + b;
    } else {
        return b > a ? b : a;
    }
}

template <bool kSum>
inline float lane_tree(const float* lanes) {
    static_assert(kNumLanes == 32);
    typedef float V16 __attribute__((vector_size(64)));
    typedef float V8 __attribute__((vector_size(32)));
    typedef float V4 __attribute__((vector_size(16)));
    typedef float V2 __attribute__((vector_size(8)));
    V16 lo, hi;
    std::memcpy(&lo, lanes, sizeof(V16));
    std::memcpy(&hi, lanes + 16, sizeof(V16));
    const V16 a = lane_op<kSum>(lo, hi);
    const V8 b = lane_op<kSum>(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                               __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15));
    const V4 c = lane_op<kSum>(__builtin_shufflevector(b, b, 0, 1, 2, 3), __builtin_shufflevector(b, b, 4, 5, 6, 7));
    const V2 d = lane_op<kSum>(__builtin_shufflevector(c, c, 0, 1), __builtin_shufflevector(c, c, 2, 3));
    return lane_op<kSum>(d[0], d[1]);
}

// Stable insertion of (value, idx) into the descending list (values, ids) of size num_kept < capacity, or
// replacing its last entry when full. Equal values keep their earlier (lower-index) entries first.
inline void insert_sorted(float* values, int32_t* ids, int& num_kept, int capacity, float value, int32_t idx) {
    int pos;
    if (num_kept < capacity) {
        pos = num_kept++;
    } else {
        if (not(value > values[capacity - 1]))
            return;
        pos = capacity - 1;
    }
    for (; pos > 0 and values[pos - 1] < value; --pos) {
        values[pos] = values[pos - 1];
        ids[pos] = ids[pos - 1];
    }
    values[pos] = value;
    ids[pos] = idx;
}

// Copies the (value, id) pairs with value >= threshold, in index order, to (survivor_values, survivor_ids), 16 at a
// time; returns their number. The outputs need 16 entries of slack (whole vectors are stored).
__attribute__((target("avx512f"))) int compact_avx512(const float* __restrict values, const int32_t* __restrict ids,
                                                       int n, float threshold, float* __restrict survivor_values,
                                                       int32_t* __restrict survivor_ids) {
    const __m512 thr = _mm512_set1_ps(threshold);
    __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int num = 0;
    for (int i = 0; i < n; i += 16) {
        const __mmask16 valid = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(valid, values + i);
        const __m512i id = ids != nullptr ? _mm512_maskz_loadu_epi32(valid, ids + i) : iota;
        const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, v, thr, _CMP_GE_OQ);
        _mm512_storeu_ps(survivor_values + num, _mm512_maskz_compress_ps(keep, v));
        _mm512_storeu_si512(survivor_ids + num, _mm512_maskz_compress_epi32(keep, id));
        num += __builtin_popcount(keep);
        iota = _mm512_add_epi32(iota, _mm512_set1_epi32(16));
    }
    return num;
}

// The ranking of select_topk for n <= 64 survivors (in index order), 16 of them per vector: rank(a) = #{b : v_b > v_a
// or (v_b == v_a and b < a)}; entries of rank < k go to (top_values, top_ids). The inputs need 16 entries of slack.
__attribute__((target("avx512f"))) void rank_select_avx512(const float* __restrict values,
                                                           const int32_t* __restrict ids, int n, int k,
                                                           float* __restrict top_values, int32_t* __restrict top_ids) {
    constexpr int kMaxBlocks = 4;
    const int num_blocks = (n + 15) / 16;
    __m512 v[kMaxBlocks];
    __m512i pos[kMaxBlocks], rank[kMaxBlocks];
    for (int c = 0; c < kMaxBlocks; ++c) {
        v[c] = c < num_blocks ? _mm512_loadu_ps(values + 16 * c) : _mm512_setzero_ps();
        pos[c] = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                  _mm512_set1_epi32(16 * c));
        rank[c] = _mm512_setzero_si512();
    }
    const __m512i one = _mm512_set1_epi32(1);
    for (int b = 0; b < n; ++b) {
        const __m512 vb = _mm512_set1_ps(values[b]);
        const __m512i ib = _mm512_set1_epi32(b);
        for (int c = 0; c < num_blocks; ++c) {
            const __mmask16 before = _mm512_cmp_ps_mask(vb, v[c], _CMP_GT_OQ) |
                                     (_mm512_cmp_ps_mask(vb, v[c], _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(ib, pos[c]));
            rank[c] = _mm512_mask_add_epi32(rank[c], before, rank[c], one);
        }
    }
    for (int c = 0; c < num_blocks; ++c) {
        alignas(64) int32_t r[16];
        _mm512_store_si512(r, rank[c]);
        for (int l = 0; l < 16 && 16 * c + l < n; ++l) {
            if (r[l] < k) {
                top_values[r[l]] = values[16 * c + l];
                top_ids[r[l]] = ids[16 * c + l];
            }
        }
    }
}

// Top-k of values[0, n) by (value desc, index asc) into (top_values, top_ids), ids mapped through `ids` when
// given; scratch holds n floats and n ints. NOTES: the k-th largest of 16 lane maxima is a lower bound of the
// k-th largest value (k lane maxima are >= it), so everything below it can be dropped without changing the
// result; the few survivors are then ranked branch-free.
inline void select_topk(const float* __restrict values, const int32_t* __restrict ids, int n, int k,
                        float* __restrict top_values, int32_t* __restrict top_ids, float* __restrict survivor_values,
                        int32_t* __restrict survivor_ids, bool use_avx512) {
    constexpr int kNumFilterLanes = 16, kMaxRanked = 64;
    float threshold = kNegInf;
    if (k <= kNumFilterLanes and n >= 2 * kNumFilterLanes) {
        // GCC vector extension: one 16-lane max per block, whatever the clone's ISA (1 zmm, 2 ymm or 4 xmm)
        typedef float Lanes __attribute__((vector_size(kNumFilterLanes * sizeof(float))));
        Lanes maxima;
        std::memcpy(&maxima, values, sizeof(Lanes));
        for (int base = kNumFilterLanes; base + kNumFilterLanes <= n; base += kNumFilterLanes) {
            Lanes block;
            std::memcpy(&block, values + base, sizeof(Lanes));
            maxima = block > maxima ? block : maxima;
        }
        float lane_max[kNumFilterLanes];
        std::memcpy(lane_max, &maxima, sizeof(Lanes));
        // The k-th largest lane maximum v: fewer than k maxima above v, at least k at or above it
        for (int l = 0; l < kNumFilterLanes; ++l) {
            int num_greater = 0, num_greater_equal = 0;
            for (int m = 0; m < kNumFilterLanes; ++m) {
                num_greater += lane_max[m] > lane_max[l];
                num_greater_equal += lane_max[m] >= lane_max[l];
            }
            threshold = num_greater < k and k <= num_greater_equal ? lane_max[l] : threshold;
        }
    }
    int num_survivors = 0;
    if (use_avx512) {
        num_survivors = compact_avx512(values, ids, n, threshold, survivor_values, survivor_ids);
    } else {
        for (int i = 0; i < n; ++i) {
            survivor_values[num_survivors] = values[i];
            survivor_ids[num_survivors] = ids != nullptr ? ids[i] : i;
            num_survivors += values[i] >= threshold;
        }
    }
    if (num_survivors <= kMaxRanked) {
        // Rank of a = number of survivors ordered before it; ranks are distinct (survivors are in index order)
        if (use_avx512) {
            rank_select_avx512(survivor_values, survivor_ids, num_survivors, k, top_values, top_ids);
            return;
        }
        for (int a = 0; a < num_survivors; ++a) {
            const float v = survivor_values[a];
            int rank = 0;
            for (int b = 0; b < num_survivors; ++b)
                rank += (survivor_values[b] > v) | ((survivor_values[b] == v) & (b < a));
            if (rank < k) {
                top_values[rank] = v;
                top_ids[rank] = survivor_ids[a];
            }
        }
    } else {
        int num_kept = 0;  // many ties: stable insertion, O(n k)
        for (int a = 0; a < num_survivors; ++a)
            insert_sorted(top_values, top_ids, num_kept, k, survivor_values[a], survivor_ids[a]);
    }
}

// top2(a ∪ b) = (max(a1, b1), max(min(a1, b1), max(a2, b2))), lane by lane (scalars or GCC vectors).
template <typename V>
[[gnu::always_inline]] inline void merge_top2(V a1, V a2, V b1, V b2, V& first, V& second) {
    const V lower = a1 < b1 ? a1 : b1;
    const V second_max = a2 > b2 ? a2 : b2;
    first = a1 > b1 ? a1 : b1;
    second = lower > second_max ? lower : second_max;
}

// Largest and second largest of values[0, n) (a repeated maximum counts twice), lane-parallel then tree-merged.
// max / min are exact, so the lane split changes no value (up to the sign of a zero, which no comparison sees).
inline void top2(const float* __restrict values, int n, float& first, float& second) {
    if (n % 16 == 0) {  // 16 lanes (one zmm, or two ymm): the DeepSeek group sizes
        typedef float V16 __attribute__((vector_size(64)));
        typedef float V8 __attribute__((vector_size(32)));
        typedef float V4 __attribute__((vector_size(16)));
        typedef float V2 __attribute__((vector_size(8)));
        V16 f, sec = V16{} + kNegInf;
        std::memcpy(&f, values, sizeof(V16));
        for (int base = 16; base < n; base += 16) {
            V16 v;
            std::memcpy(&v, values + base, sizeof(V16));
            const V16 lower = v < f ? v : f;
            sec = lower > sec ? lower : sec;
            f = v > f ? v : f;
        }
        V8 f8, s8;
        merge_top2(__builtin_shufflevector(f, f, 0, 1, 2, 3, 4, 5, 6, 7), __builtin_shufflevector(sec, sec, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(f, f, 8, 9, 10, 11, 12, 13, 14, 15),
                   __builtin_shufflevector(sec, sec, 8, 9, 10, 11, 12, 13, 14, 15), f8, s8);
        V4 f4, s4;
        merge_top2(__builtin_shufflevector(f8, f8, 0, 1, 2, 3), __builtin_shufflevector(s8, s8, 0, 1, 2, 3),
                   __builtin_shufflevector(f8, f8, 4, 5, 6, 7), __builtin_shufflevector(s8, s8, 4, 5, 6, 7), f4, s4);
        V2 f2, s2;
        merge_top2(__builtin_shufflevector(f4, f4, 0, 1), __builtin_shufflevector(s4, s4, 0, 1),
                   __builtin_shufflevector(f4, f4, 2, 3), __builtin_shufflevector(s4, s4, 2, 3), f2, s2);
        merge_top2(f2[0], s2[0], f2[1], s2[1], first, second);
        return;
    }
    constexpr int kNumTop2Lanes = 8;
    float lane_first[kNumTop2Lanes], lane_second[kNumTop2Lanes];
    for (int l = 0; l < kNumTop2Lanes; ++l)
        lane_first[l] = kNegInf, lane_second[l] = kNegInf;
    int base = 0;
    for (; base + kNumTop2Lanes <= n; base += kNumTop2Lanes) {
        for (int l = 0; l < kNumTop2Lanes; ++l) {
            const float v = values[base + l];
            const float lower = v < lane_first[l] ? v : lane_first[l];
            lane_second[l] = lower > lane_second[l] ? lower : lane_second[l];
            lane_first[l] = v > lane_first[l] ? v : lane_first[l];
        }
    }
    for (int l = 0; base + l < n; ++l) {
        const float v = values[base + l];
        const float lower = v < lane_first[l] ? v : lane_first[l];
        lane_second[l] = lower > lane_second[l] ? lower : lane_second[l];
        lane_first[l] = v > lane_first[l] ? v : lane_first[l];
    }
    for (int width = kNumTop2Lanes / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) {
            merge_top2(lane_first[l], lane_second[l], lane_first[l + width], lane_second[l + width], lane_first[l],
                       lane_second[l]);
        }
    }
    first = lane_first[0];
    second = lane_second[0];
}

struct Scratch {
    std::vector<float> x, scores, sel, group_scores, top_values;
    std::vector<float> survivor_values;
    std::vector<int32_t> top_ids, candidate_ids, survivor_ids;
    std::vector<uint8_t> group_kept;
};

// One token: logits row -> (topk_weights, topk_idx). Cloned per ISA; the helpers above inline into each clone.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void route_range(
    const void* logits, DType dtype, const float* bias, const RouteParams& p, float* topk_weights, int32_t* topk_idx,
    int64_t token_begin, int64_t token_end, Scratch& scratch, bool use_avx512) {
    const int num_experts = p.num_experts, num_topk = p.num_topk, num_groups = p.num_groups;
    const int num_per_group = num_experts / num_groups;
    float* __restrict x = scratch.x.data();
    float* __restrict scores = scratch.scores.data();
    float* __restrict sel = scratch.sel.data();
    float* __restrict top_values = scratch.top_values.data();
    int32_t* __restrict top_ids = scratch.top_ids.data();
    float* __restrict survivor_values = scratch.survivor_values.data();
    int32_t* __restrict survivor_ids = scratch.survivor_ids.data();

    for (int64_t token = token_begin; token < token_end; ++token) {
        // Logits row in fp32
        const float* __restrict row;
        if (dtype == DType::kFloat32) {
            row = static_cast<const float*>(logits) + token * num_experts;
        } else {
            const uint16_t* __restrict raw = static_cast<const uint16_t*>(logits) + token * num_experts;
            if (dtype == DType::kBFloat16) {
                for (int i = 0; i < num_experts; ++i)
                    x[i] = bf16_to_float(raw[i]);
            } else {
                for (int i = 0; i < num_experts; ++i)
                    x[i] = fp16_to_float(raw[i]);
            }
            row = x;
        }

        // Scores
        if (p.scoring == Scoring::kSigmoid) {
            for (int i = 0; i < num_experts; ++i)
                scores[i] = 1.0f / (1.0f + exp_fp32(-row[i]));
        } else {
            // NOTES: a NaN or +inf anywhere makes the sum NaN and so every score NaN, as in torch.softmax
            float lane_max[kNumLanes], lane_sum[kNumLanes];
            for (int l = 0; l < kNumLanes; ++l)
                lane_max[l] = kNegInf, lane_sum[l] = 0.0f;
            int base = 0;
            for (; base + kNumLanes <= num_experts; base += kNumLanes)
                for (int l = 0; l < kNumLanes; ++l)
                    lane_max[l] = row[base + l] > lane_max[l] ? row[base + l] : lane_max[l];
            for (int l = 0; base + l < num_experts; ++l)
                lane_max[l] = row[base + l] > lane_max[l] ? row[base + l] : lane_max[l];
            const float row_max = lane_tree</*kSum=*/false>(lane_max);

            for (int i = 0; i < num_experts; ++i)
                scores[i] = exp_fp32(row[i] - row_max);
            for (base = 0; base + kNumLanes <= num_experts; base += kNumLanes)
                for (int l = 0; l < kNumLanes; ++l)
                    lane_sum[l] += scores[base + l];
            for (int l = 0; base + l < num_experts; ++l)
                lane_sum[l] += scores[base + l];
            // Butterfly merge (xor 16, 8, 4, 2, 1), the order of a warp reduction
            const float inv_sum = 1.0f / lane_tree</*kSum=*/true>(lane_sum);
            for (int i = 0; i < num_experts; ++i)
                scores[i] *= inv_sum;
        }

        // Selection scores: biased, NaN ranks as -inf
        if (bias != nullptr) {
            for (int i = 0; i < num_experts; ++i) {
                const float v = scores[i] + bias[i];
                sel[i] = v == v ? v : kNegInf;
            }
        } else {
            for (int i = 0; i < num_experts; ++i)
                sel[i] = scores[i] == scores[i] ? scores[i] : kNegInf;
        }

        // Top-k over the experts of the kept groups
        if (num_groups == 1) {
            select_topk(sel, nullptr, num_experts, num_topk, top_values, top_ids, survivor_values, survivor_ids,
                        use_avx512);
        } else {
            float* __restrict group_scores = scratch.group_scores.data();
            uint8_t* __restrict group_kept = scratch.group_kept.data();
            for (int g = 0; g < num_groups; ++g) {
                float first, second;
                top2(sel + g * num_per_group, num_per_group, first, second);
                const float score = bias != nullptr ? first + second : first;
                group_scores[g] = score == score ? score : kNegInf;  // -inf + inf
                group_kept[g] = 0;
            }
            select_topk(group_scores, nullptr, num_groups, p.num_topk_groups, top_values, top_ids, survivor_values,
                        survivor_ids, use_avx512);
            for (int j = 0; j < p.num_topk_groups; ++j)
                group_kept[top_ids[j]] = 1;
            // Candidates: the kept groups' experts, compacted in ascending expert order (sel reused in place)
            int32_t* __restrict candidate_ids = scratch.candidate_ids.data();
            int num_candidates = 0;
            for (int g = 0; g < num_groups; ++g) {
                if (not group_kept[g])
                    continue;
                for (int i = g * num_per_group; i < (g + 1) * num_per_group; ++i, ++num_candidates) {
                    sel[num_candidates] = sel[i];
                    candidate_ids[num_candidates] = i;
                }
            }
            select_topk(sel, candidate_ids, num_candidates, num_topk, top_values, top_ids, survivor_values,
                        survivor_ids, use_avx512);
        }

        // Weights from the unbiased scores
        float* __restrict out_weights = topk_weights + token * num_topk;
        int32_t* __restrict out_idx = topk_idx + token * num_topk;
        float weight_sum = 0.0f;
        for (int j = 0; j < num_topk; ++j) {
            out_idx[j] = top_ids[j];
            out_weights[j] = scores[top_ids[j]];
            weight_sum += out_weights[j];
        }
        const float denom = weight_sum + 1e-20f;
        if (p.renormalize) {
            for (int j = 0; j < num_topk; ++j)
                out_weights[j] = out_weights[j] / denom;
        }
        for (int j = 0; j < num_topk; ++j)
            out_weights[j] *= p.scaling_factor;
    }
}

}  // namespace

void route_cpu(const void* logits, DType dtype, const float* bias, const RouteParams& p, float* topk_weights,
               int32_t* topk_idx, int64_t token_begin, int64_t token_end) {
    EPMOE_HOST_CHECK(0 <= token_begin and token_begin <= token_end and token_end <= p.num_tokens,
                     "token range [", token_begin, ", ", token_end, ") outside [0, ", p.num_tokens, ")");
    EPMOE_HOST_CHECK(p.has_bias == (bias != nullptr), "has_bias must match the bias pointer");
    const std::string error = validate_route_params(p);
    EPMOE_HOST_CHECK(error.empty(), error);
    if (token_begin == token_end)
        return;
    const int num_experts = p.num_experts;
    Scratch scratch;
    scratch.x.resize(num_experts);
    scratch.scores.resize(num_experts);
    scratch.sel.resize(num_experts);
    scratch.group_scores.resize(p.num_groups);
    scratch.group_kept.resize(p.num_groups);
    const int capacity = p.num_topk > p.num_topk_groups ? p.num_topk : p.num_topk_groups;
    scratch.top_values.resize(capacity);
    scratch.top_ids.resize(capacity);
    scratch.candidate_ids.resize(num_experts);
    scratch.survivor_values.resize(num_experts + 16);  // + slack for whole-vector stores
    scratch.survivor_ids.resize(num_experts + 16);
    route_range(logits, dtype, bias, p, topk_weights, topk_idx, token_begin, token_end, scratch,
                cpu_features().avx512);
}

}  // namespace epmoe::core
