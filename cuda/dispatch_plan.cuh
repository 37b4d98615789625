// Launchers of the device dispatch planner and the wire-row kernels of the EP runtime (cpp/torch/runtime.cpp).
// Torch-free: raw pointers, sizes, a stream. The plan is the one of cpp/core/dispatch_plan.h, whose functions are
// the CPU twins of these kernels (same arrays, same values: the tests compare them bitwise). Nothing here reads
// device data on the host, so capacity-mode dispatch and combine are CUDA-graph capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpp/core/dispatch_layout.h"
#include "cpp/core/dispatch_plan.h"

namespace epmoe::cuda {

// A dispatch header row passed by value to the kernels.
struct HeaderRow {
    int64_t v[core::kHeaderLen];
};

// Steps 1 and 2 of the plan (core::plan_rank_counts, then the kBase row of core::plan_rank_offsets) and the
// headers sent to each rank: headers[r] = mine with kNumRows, kNumOverflow, kNumSlots of rank r and, when mine
// has no error and an id was out of range, kError = kBadExpertId with its value and flat slot.
//   topk_idx [num_tokens, num_topk] int32; expert_to_rank [num_experts] int32 (valid rank ids)
//   token_rank_pos [num_tokens, num_ranks] int32, counts [kNumPlanCounts, num_ranks] int64, bad_slot [1] int64,
//   headers [num_ranks, kHeaderLen] int64 (all out)
void launch_plan_send(const int32_t* topk_idx, int64_t num_tokens, int num_topk, const int32_t* expert_to_rank,
                      int num_experts, int num_ranks, int64_t capacity, const HeaderRow& mine,
                      int32_t* token_rank_pos, int64_t* counts, int64_t* bad_slot, int64_t* headers,
                      cudaStream_t stream);

// Step 3 (core::plan_wire_rows): token_wire_row [num_tokens, num_ranks] int32 and wire_token [num_wire_rows]
// int32 (filled with -1 first: capacity padding).
void launch_plan_wire_rows(const int32_t* token_rank_pos, int64_t num_tokens, int num_ranks, const int64_t* counts,
                           int64_t num_wire_rows, int32_t* token_wire_row, int32_t* wire_token, cudaStream_t stream);

// ok[0] = 1 when core::headers_agree(mine, recv) holds, else 0. recv [num_ranks, kHeaderLen] int64.
void launch_headers_agree(const HeaderRow& mine, const int64_t* recv, int num_ranks, int32_t* ok,
                          cudaStream_t stream);

// The send wire [num_wire_rows, row_bytes] (layout: cpp/torch/runtime.cpp): row w holds x[wire_token[w]] (zeros
// for padding), then token (int32), the slot list and the weights of core::wire_row_slots for the row's rank
// (core::wire_row_rank). x [num_tokens, x_bytes] raw rows; topk_weights float32 [num_tokens, num_topk].
void launch_pack_wire(const void* x, int64_t x_bytes, const int32_t* topk_idx, const float* topk_weights,
                      int num_topk, const int32_t* expert_to_rank, const int32_t* expert_to_local, int num_experts,
                      const int64_t* counts, int num_ranks, const int32_t* wire_token, int64_t num_wire_rows,
                      int64_t row_bytes, void* wire, cudaStream_t stream);

// dst row m (row_bytes at dst + m * dst_stride) = src row index[m] / divisor (at src + row * src_stride), or zeros
// where index[m] < 0. Any byte sizes; the widest access that divides them and the addresses is used.
void launch_gather_rows(const void* src, int64_t src_stride, int64_t row_bytes, const int32_t* index, int divisor,
                        int64_t num_rows, void* dst, int64_t dst_stride, cudaStream_t stream);

}  // namespace epmoe::cuda
