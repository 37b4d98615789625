// Launchers of the token permutation kernels (moe_layout, moe_permute, moe_unpermute and its backward).
// Torch-free: raw pointers, sizes, a stream. Semantics: DESIGN.md §3 and the op contract in ops.py.
// Nothing here synchronises with the host, so every launcher is CUDA-graph capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cpp/core/types.h"

namespace epmoe::cuda {

// Largest num_experts the layout kernels accept (their per-block histograms live in 48 KB of shared memory).
constexpr int kMaxLayoutExperts = 12288;

// Bytes of device workspace launch_moe_layout needs for these sizes (16-byte aligned pointer expected).
size_t moe_layout_workspace_bytes(int64_t num_slots, int num_experts);

// Expert-major layout of the flat slots f = t*num_topk + j, ascending f inside an expert (deterministic:
// per-block histograms, a prefix scan, then an ordered per-warp scatter; no atomics decide any order).
//   topk_idx           [num_slots] int32; an id outside [0, num_global) (num_global = num_experts without a
//                      map) is skipped, like -1: the GPU cannot raise without a host sync
//   expert_map         [num_global] int32 or nullptr; ids are mapped through it, -1 / out of range = skipped
//   tokens_per_expert  [num_experts] int64 (out)
//   expert_offsets     [num_experts + 1] int64 (out), exclusive prefix sum
//   slot_to_row        [num_slots] int32 (out), -1 for skipped slots
//   row_to_slot        [num_slots] int32 (out), -1 for rows >= expert_offsets[num_experts]
// Requires 1 <= num_experts <= kMaxLayoutExperts and num_slots < 2^31.
void launch_moe_layout(const int32_t* topk_idx, int64_t num_slots, int num_experts, const int32_t* expert_map,
                       int num_global, int64_t* tokens_per_expert, int64_t* expert_offsets, int32_t* slot_to_row,
                       int32_t* row_to_slot, void* workspace, cudaStream_t stream);

// rows[r] = x[row_to_slot[r] / num_topk], zero where row_to_slot[r] == -1.
//   x [num_tokens, hidden], rows [num_rows, hidden] in dtype; row_to_slot [num_rows] int32.
void launch_moe_permute(const void* x, DType dtype, const int32_t* row_to_slot, int64_t num_rows, int64_t hidden,
                        int num_topk, void* rows, cudaStream_t stream);

// out[t] = sum_j topk_weights[t, j] * rows[slot_to_row[t, j]] in fp32, ascending j, skipping row -1.
//   rows [*, hidden] and out [num_tokens, hidden] in dtype; slot_to_row, topk_weights [num_tokens, num_topk].
void launch_moe_unpermute(const void* rows, DType dtype, const int32_t* slot_to_row, const float* topk_weights,
                          int64_t num_tokens, int num_topk, int64_t hidden, void* out, cudaStream_t stream);

// grad_rows[slot_to_row[t, j]] = topk_weights[t, j] * grad_out[t] (other rows zero);
// grad_topk_weights[t, j] = <grad_out[t], rows[slot_to_row[t, j]]> in fp32 (0 for skipped slots).
//   grad_out [num_tokens, hidden], rows and grad_rows [num_rows, hidden] in dtype.
void launch_moe_unpermute_backward(const void* grad_out, const void* rows, DType dtype, const int32_t* slot_to_row,
                                   const float* topk_weights, int64_t num_tokens, int num_topk, int64_t num_rows,
                                   int64_t hidden, void* grad_rows, float* grad_topk_weights, cudaStream_t stream);

}  // namespace epmoe::cuda
