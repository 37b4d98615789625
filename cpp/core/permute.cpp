// NOTES: no FMA contraction in this file: the weighted sums must round like the CUDA kernel (__fmul_rn, __fadd_rn).
#pragma GCC optimize("fp-contract=off")

#include "cpp/core/permute.h"

#include <cstring>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpp/core/fp_math.h"

namespace epmoe::core {
namespace {

// Local expert of a slot id, -1 when skipped; -2 when the id is out of range.
inline int32_t local_expert(const LayoutParams& p, const int32_t* expert_map, int32_t id) {
    if (id == -1) return -1;
    if (expert_map == nullptr) return (id >= 0 && id < p.num_experts) ? id : -2;
    if (id < 0 || id >= p.num_map_entries) return -2;
    return expert_map[id];  // validated by the caller to lie in [-1, num_experts)
}

template <typename T>
inline float to_float(T v) {
    if constexpr (sizeof(T) == 4) {
        return v;
    } else if constexpr (std::is_same_v<T, uint16_t>) {
        return bf16_to_float(v);
    } else {
        return fp16_to_float(static_cast<uint16_t>(v));
    }
}

// fp32 -> T, round to nearest even.
template <typename T>
inline T from_float(float v) {
    if constexpr (sizeof(T) == 4) {
        return v;
    } else if constexpr (std::is_same_v<T, uint16_t>) {
        return float_to_bf16(v);
    } else {
        return static_cast<T>(float_to_fp16(v));
    }
}

// acc[h] += w * float(src[h]), one row; clones vectorise it for the CPU's ISA.
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void accumulate_row(
    float* __restrict acc, const T* __restrict src, float w, int64_t hidden) {
    for (int64_t h = 0; h < hidden; ++h) acc[h] += w * to_float(src[h]);
}

// acc[h] = float(T(acc[h])) + float(addend[h]): the sum rounded to T, plus a row of T (as ATen adds two T tensors).
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void add_rounded_row(
    float* __restrict acc, const T* __restrict addend, int64_t hidden) {
    for (int64_t h = 0; h < hidden; ++h) acc[h] = to_float(from_float<T>(acc[h])) + to_float(addend[h]);
}

template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void round_row(
    const float* __restrict acc, T* __restrict dst, int64_t hidden) {
    for (int64_t h = 0; h < hidden; ++h) dst[h] = from_float<T>(acc[h]);
}

// T: float (fp32), uint16_t (bf16) or int16_t (fp16 bits; a distinct type only to select the conversion).
template <typename T>
void unpermute_typed(const T* rows, int64_t hidden, const int32_t* slot_to_row, bool rows_by_slot,
                     const float* topk_weights, int num_topk, const T* addend, int64_t token_begin, int64_t token_end,
                     T* out) {
    std::vector<float> acc(hidden);
    for (int64_t t = token_begin; t < token_end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < num_topk; ++j) {
            const int64_t f = t * num_topk + j;
            if (slot_to_row[f] < 0) continue;
            const int64_t r = rows_by_slot ? f : slot_to_row[f];
            accumulate_row(acc.data(), rows + r * hidden, topk_weights[f], hidden);
        }
        if (addend != nullptr) add_rounded_row(acc.data(), addend + t * hidden, hidden);
        round_row(acc.data(), out + t * hidden, hidden);
    }
}

}  // namespace

void unpermute_rows(DType dtype, const void* rows, int64_t hidden, const int32_t* slot_to_row, bool rows_by_slot,
                    const float* topk_weights, int num_topk, const void* addend, int64_t token_begin,
                    int64_t token_end, void* out) {
    switch (dtype) {
        case DType::kFloat32:
            return unpermute_typed(static_cast<const float*>(rows), hidden, slot_to_row, rows_by_slot, topk_weights,
                                   num_topk, static_cast<const float*>(addend), token_begin, token_end,
                                   static_cast<float*>(out));
        case DType::kBFloat16:
            return unpermute_typed(static_cast<const uint16_t*>(rows), hidden, slot_to_row, rows_by_slot,
                                   topk_weights, num_topk, static_cast<const uint16_t*>(addend), token_begin,
                                   token_end, static_cast<uint16_t*>(out));
        case DType::kFloat16:
            return unpermute_typed(static_cast<const int16_t*>(rows), hidden, slot_to_row, rows_by_slot,
                                   topk_weights, num_topk, static_cast<const int16_t*>(addend), token_begin,
                                   token_end, static_cast<int16_t*>(out));
    }
}

int64_t layout_count(const LayoutParams& p, const int32_t* topk_idx, const int32_t* expert_map, int64_t token_begin,
                     int64_t token_end, int64_t* counts) {
    std::memset(counts, 0, sizeof(int64_t) * p.num_experts);
    for (int64_t f = token_begin * p.num_topk; f < token_end * p.num_topk; ++f) {
        const int32_t e = local_expert(p, expert_map, topk_idx[f]);
        if (e == -2) return f;
        if (e >= 0) ++counts[e];
    }
    return -1;
}

void layout_offsets(const int64_t* chunk_counts, int num_chunks, int num_experts, int64_t* tokens_per_expert,
                    int64_t* expert_offsets, int64_t* chunk_cursors) {
    int64_t row = 0;
    expert_offsets[0] = 0;
    for (int e = 0; e < num_experts; ++e) {
        // NOTES: chunks are token ranges in ascending order, so giving each chunk its rows in chunk order keeps
        // the rows of an expert in ascending flat-slot order.
        for (int c = 0; c < num_chunks; ++c) {
            chunk_cursors[static_cast<int64_t>(c) * num_experts + e] = row;
            row += chunk_counts[static_cast<int64_t>(c) * num_experts + e];
        }
        tokens_per_expert[e] = row - expert_offsets[e];
        expert_offsets[e + 1] = row;
    }
}

void layout_place(const LayoutParams& p, const int32_t* topk_idx, const int32_t* expert_map, int64_t token_begin,
                  int64_t token_end, int64_t* cursors, int32_t* slot_to_row, int32_t* row_to_slot) {
    for (int64_t f = token_begin * p.num_topk; f < token_end * p.num_topk; ++f) {
        const int32_t e = local_expert(p, expert_map, topk_idx[f]);
        if (e < 0) {
            slot_to_row[f] = -1;
            continue;
        }
        const int64_t row = cursors[e]++;
        slot_to_row[f] = static_cast<int32_t>(row);
        row_to_slot[row] = static_cast<int32_t>(f);
    }
}

void permute_rows(const void* x, int64_t row_bytes, const int32_t* row_to_slot, int num_topk, int64_t row_begin,
                  int64_t row_end, void* rows) {
    const char* src = static_cast<const char*>(x);
    char* dst = static_cast<char*>(rows);
    for (int64_t r = row_begin; r < row_end; ++r) {
        const int32_t f = row_to_slot[r];
        if (f < 0) {
            std::memset(dst + r * row_bytes, 0, row_bytes);
        } else {
            std::memcpy(dst + r * row_bytes, src + static_cast<int64_t>(f / num_topk) * row_bytes, row_bytes);
        }
    }
}

int64_t find_out_of_range(const int32_t* values, int64_t n, int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < n; ++i) {
        if (values[i] < lo || values[i] >= hi) return i;
    }
    return -1;
}

}  // namespace epmoe::core
