// The device side of the EP runtime (runtime.cpp): the dispatch plan and the row moves of dispatch and combine as
// kernels on the current CUDA stream (cuda/dispatch_plan.cuh, cuda/permute.cuh), without any host read. Only
// built with CUDA (cpp/torch/cuda/runtime_cuda.cpp).
#pragma once

#ifdef EPMOE_WITH_CUDA

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "cpp/core/dispatch_layout.h"

namespace epmoe::device {

// True while the current CUDA stream of `device` is being captured into a graph (host reads are then impossible).
bool capturing(const at::Device& device);

// The plan of one dispatch, on the device (cpp/core/dispatch_plan.h describes every array).
struct SendPlan {
    at::Tensor token_rank_pos;  // int32 [T, R]
    at::Tensor counts;          // int64 [kNumPlanCounts, R]
    at::Tensor bad_slot;        // int64 [1]
    at::Tensor headers;         // int64 [R, kHeaderLen]: the header sent to each rank
};

// Steps 1-2 of the plan and the headers. topk_idx int32 [T, k] and expert_to_rank int32 [E] on the device.
SendPlan plan_send(const at::Tensor& topk_idx, const at::Tensor& expert_to_rank, int64_t num_experts,
                   int64_t num_ranks, int64_t capacity, const core::DispatchHeader& mine);

// Step 3: (token_wire_row int32 [T, R], wire_token int32 [num_wire_rows]).
std::tuple<at::Tensor, at::Tensor> plan_wire_rows(const SendPlan& plan, int64_t num_wire_rows);

// int32 [1]: 1 when the received headers agree with mine and report no error (core::headers_agree).
at::Tensor headers_agree(const core::DispatchHeader& mine, const at::Tensor& recv_headers);

// The send wire uint8 [num_wire_rows, row_bytes] (layout: runtime.cpp). x contiguous [T, H]; topk_weights float32.
at::Tensor pack_wire(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                     const at::Tensor& expert_to_rank, const at::Tensor& expert_to_local, const at::Tensor& counts,
                     const at::Tensor& wire_token, int64_t row_bytes);

// out [index.numel(), row_bytes] uint8: row m = the first row_bytes of src row index[m] / divisor, zeros where
// index[m] < 0. src is a 2-D uint8 tensor whose rows may be strided (a column range of the wire).
at::Tensor gather_rows(const at::Tensor& src, int64_t row_bytes, const at::Tensor& index, int64_t divisor);

// out [I, C] in rows' dtype: out[i] = sum_j weights[i, j] * rows[index[i, j]] in fp32, ascending j, skipping
// index < 0; weights undefined = all ones. rows [*, C] float32 / bfloat16 / float16; index int32 [I, J].
at::Tensor sum_rows(const at::Tensor& rows, const at::Tensor& index, const at::Tensor& weights);

// Expert-major layout of received slot lists [N, k] (local expert ids, -1 = none) over num_local_experts >= 1:
// (tokens_per_expert int64 [L], expert_offsets int64 [L + 1], slot_to_row int32 [N, k], row_to_slot int32 [N * k]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_layout(const at::Tensor& slots,
                                                                         int64_t num_local_experts);

}  // namespace epmoe::device

#endif  // EPMOE_WITH_CUDA
