// Fused grouped top-K routing kernel: one warp per token, scores + group selection + top-k + weights in one pass.
//
// NOTES: cpp/core/route.cpp is the bitwise oracle. This kernel evaluates the same fp32 operations in the same
// order (the exp polynomial with fmaf, softmax partial sums of experts l, l+32, ... merged by an xor butterfly,
// sequential weight sums), with explicit __f*_rn intrinsics so that nvcc never fuses a multiply into an add.
// Denormals must not be flushed (no --use_fast_math / -ftz=true): exp results in the subnormal range are kept.
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "cpp/core/check.h"
#include "cuda/route.cuh"

namespace epmoe::cuda {

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 4;
constexpr int kMaxSmemPerBlock = 48 * 1024;
constexpr uint32_t kFullMask = 0xffffffffu;
// Selection keys: an order-preserving uint32 image of the (non-NaN) fp32 value; -inf maps to 0x007fffff, so 0
// is free to mean "taken or outside the kept groups" and can never win against a real candidate.
constexpr uint32_t kExcludedKey = 0;

__device__ __forceinline__ float exp_fp32(float x) {
    x = x < -120.0f ? -120.0f : x;  // comparisons keep NaN
    x = x > 90.0f ? 90.0f : x;
    const float t = fmaf(x, 1.44269504088896341f, 12582912.0f);
    const float n = __fsub_rn(t, 12582912.0f);
    const int32_t n_int = static_cast<int32_t>(__float_as_uint(t) - 0x4B400000u);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187045e-06f, r);
    float poly = 1.0f / 5040.0f;
    poly = fmaf(poly, r, 1.0f / 720.0f);
    poly = fmaf(poly, r, 1.0f / 120.0f);
    poly = fmaf(poly, r, 1.0f / 24.0f);
    poly = fmaf(poly, r, 1.0f / 6.0f);
    poly = fmaf(poly, r, 0.5f);
    poly = fmaf(poly, r, 1.0f);
    poly = fmaf(poly, r, 1.0f);
    const int32_t n_lo = n_int >> 1, n_hi = n_int - n_lo;
    return __fmul_rn(__fmul_rn(poly, __uint_as_float(static_cast<uint32_t>(n_lo + 127) << 23)),
                     __uint_as_float(static_cast<uint32_t>(n_hi + 127) << 23));
}

__device__ __forceinline__ uint32_t to_key(float v) {
    v = v == 0.0f ? 0.0f : v;  // -0 ties with +0, as in fp32 comparisons on the CPU
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_key(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

template <DType kDType>
__device__ __forceinline__ float load_logit(const void* row, int i) {
    if constexpr (kDType == DType::kFloat32) {
        return __ldg(static_cast<const float*>(row) + i);
    } else if constexpr (kDType == DType::kBFloat16) {
        return __uint_as_float(static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(row) + i)) << 16);
    } else {
        return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(row) + i)));
    }
}

// Scans this lane's entries (i = lane, lane + 32, ...) for the best (key desc, index asc).
__device__ __forceinline__ void lane_best(const uint32_t* keys, int n, int lane, uint32_t& best_key, int& best_idx) {
    best_key = kExcludedKey;
    best_idx = INT_MAX;
    for (int i = lane; i < n; i += kWarpSize) {
        const uint32_t key = keys[i];
        if (key > best_key)
            best_key = key, best_idx = i;
    }
}

// k rounds of warp arg-max over keys[0, n) in shared memory; picked entries become kExcludedKey. Calls
// on_pick(round, idx) on every lane. Only the lane that owned the winner rescans its entries.
template <typename OnPick>
__device__ __forceinline__ void warp_select(uint32_t* keys, int n, int k, int lane, OnPick on_pick) {
    uint32_t best_key;
    int best_idx;
    lane_best(keys, n, lane, best_key, best_idx);
    for (int round = 0; round < k; ++round) {
        uint32_t key = best_key;
        int idx = best_idx;
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
            const uint32_t other_key = __shfl_xor_sync(kFullMask, key, offset);
            const int other_idx = __shfl_xor_sync(kFullMask, idx, offset);
            if (other_key > key or (other_key == key and other_idx < idx))
                key = other_key, idx = other_idx;
        }
        on_pick(round, idx);
        if ((idx & (kWarpSize - 1)) == lane) {
            keys[idx] = kExcludedKey;
            lane_best(keys, n, lane, best_key, best_idx);
        }
    }
}

// Per-warp shared memory: keys [num_experts] u32 | group_keys [num_groups] u32 | picked ids [num_topk] i32 |
// weights [num_topk] f32.
__host__ __device__ __forceinline__ int smem_words_per_warp(const RouteParams& p) {
    return p.num_experts + p.num_groups + 2 * p.num_topk;
}

template <DType kDType>
__global__ void route_kernel(const void* __restrict__ logits, const float* __restrict__ bias, const RouteParams p,
                             float* __restrict__ topk_weights, int32_t* __restrict__ topk_idx) {
    extern __shared__ uint32_t smem[];
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int64_t token = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
    if (token >= p.num_tokens)
        return;  // whole warps only: nothing below synchronises the block

    const int num_experts = p.num_experts, num_groups = p.num_groups, num_topk = p.num_topk;
    const int num_per_group = num_experts / num_groups;
    uint32_t* keys = smem + warp * smem_words_per_warp(p);
    uint32_t* group_keys = keys + num_experts;
    int32_t* picked_ids = reinterpret_cast<int32_t*>(group_keys + num_groups);
    float* picked_weights = reinterpret_cast<float*>(picked_ids + num_topk);
    const size_t elem_size = kDType == DType::kFloat32 ? 4 : 2;
    const void* row = static_cast<const char*>(logits) + token * num_experts * elem_size;
    const bool is_softmax = p.scoring == Scoring::kSoftmax;

    // Softmax statistics; every lane ends with the same row_max and inv_sum
    float row_max = -INFINITY, inv_sum = 0.0f;
    if (is_softmax) {
        for (int i = lane; i < num_experts; i += kWarpSize) {
            const float x = load_logit<kDType>(row, i);
            row_max = x > row_max ? x : row_max;
        }
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
            const float other = __shfl_xor_sync(kFullMask, row_max, offset);
            row_max = other > row_max ? other : row_max;
        }
        float partial = 0.0f;
        for (int i = lane; i < num_experts; i += kWarpSize) {
            const float e = exp_fp32(__fsub_rn(load_logit<kDType>(row, i), row_max));
            keys[i] = __float_as_uint(e);
            partial = __fadd_rn(partial, e);
        }
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
            partial = __fadd_rn(partial, __shfl_xor_sync(kFullMask, partial, offset));
        inv_sum = __fdiv_rn(1.0f, partial);
    }
    auto score_of = [&](float x_or_e) {
        return is_softmax ? __fmul_rn(x_or_e, inv_sum) : __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_fp32(-x_or_e)));
    };

    // Selection keys (each lane touches only its own experts here)
    for (int i = lane; i < num_experts; i += kWarpSize) {
        const float s = score_of(is_softmax ? __uint_as_float(keys[i]) : load_logit<kDType>(row, i));
        float sel = bias != nullptr ? __fadd_rn(s, __ldg(bias + i)) : s;
        sel = sel == sel ? sel : -INFINITY;
        keys[i] = to_key(sel);
    }

    // Group selection: lane g scores group g; kept groups end as kExcludedKey (picked) in group_keys
    if (num_groups > 1) {
        __syncwarp();
        for (int g = lane; g < num_groups; g += kWarpSize) {
            uint32_t first = 0, second = 0;  // a repeated maximum counts twice
            for (int i = g * num_per_group; i < (g + 1) * num_per_group; ++i) {
                const uint32_t key = keys[i];
                second = max(second, min(first, key));
                first = max(first, key);
            }
            float score = bias != nullptr ? __fadd_rn(from_key(first), from_key(second)) : from_key(first);
            score = score == score ? score : -INFINITY;  // -inf + inf
            group_keys[g] = to_key(score);
        }
        __syncwarp();
        warp_select(group_keys, num_groups, p.num_topk_groups, lane, [](int, int) {});
        __syncwarp();
        for (int i = lane; i < num_experts; i += kWarpSize) {
            if (group_keys[i / num_per_group] != kExcludedKey)
                keys[i] = kExcludedKey;
        }
        __syncwarp();
    }

    // Top-k experts, best first
    warp_select(keys, num_experts, num_topk, lane, [&](int round, int idx) {
        if (lane == 0)
            picked_ids[round] = idx;
    });
    __syncwarp();

    // Weights from the unbiased scores, recomputed with the same operations as above
    for (int r = lane; r < num_topk; r += kWarpSize) {
        const int idx = picked_ids[r];
        const float x = load_logit<kDType>(row, idx);
        picked_weights[r] = score_of(is_softmax ? exp_fp32(__fsub_rn(x, row_max)) : x);
    }
    __syncwarp();
    float weight_sum = 0.0f;
    for (int r = 0; r < num_topk; ++r)
        weight_sum = __fadd_rn(weight_sum, picked_weights[r]);
    const float denom = __fadd_rn(weight_sum, 1e-20f);
    for (int r = lane; r < num_topk; r += kWarpSize) {
        float w = picked_weights[r];
        if (p.renormalize)
            w = __fdiv_rn(w, denom);
        topk_weights[token * num_topk + r] = __fmul_rn(w, p.scaling_factor);
        topk_idx[token * num_topk + r] = picked_ids[r];
    }
}

}  // namespace

void launch_route(const void* logits, DType dtype, const float* bias, const RouteParams& p, float* topk_weights,
                  int32_t* topk_idx, cudaStream_t stream) {
    EPMOE_HOST_CHECK(p.has_bias == (bias != nullptr), "has_bias must match the bias pointer");
    if (p.num_tokens == 0)
        return;
    const int smem_per_warp = smem_words_per_warp(p) * static_cast<int>(sizeof(uint32_t));
    EPMOE_HOST_CHECK(smem_per_warp <= kMaxSmemPerBlock, "route: num_experts ", p.num_experts,
                     " needs more shared memory per token than the kernel supports");
    int num_warps = kMaxSmemPerBlock / smem_per_warp;
    num_warps = num_warps < kMaxWarpsPerBlock ? num_warps : kMaxWarpsPerBlock;
    const int64_t num_blocks = (p.num_tokens + num_warps - 1) / num_warps;
    EPMOE_HOST_CHECK(num_blocks <= INT_MAX, "route: too many tokens for one launch: ", p.num_tokens);
    const dim3 grid(static_cast<unsigned>(num_blocks)), block(num_warps * kWarpSize);
    const size_t smem = static_cast<size_t>(num_warps) * smem_per_warp;
    switch (dtype) {
        case DType::kFloat32:
            route_kernel<DType::kFloat32><<<grid, block, smem, stream>>>(logits, bias, p, topk_weights, topk_idx);
            break;
        case DType::kBFloat16:
            route_kernel<DType::kBFloat16><<<grid, block, smem, stream>>>(logits, bias, p, topk_weights, topk_idx);
            break;
        case DType::kFloat16:
            route_kernel<DType::kFloat16><<<grid, block, smem, stream>>>(logits, bias, p, topk_weights, topk_idx);
            break;
        default:
            EPMOE_HOST_CHECK(false, "route: unsupported dtype ", static_cast<int>(dtype));
    }
    EPMOE_LAUNCH_CHECK();
}

}  // namespace epmoe::cuda
