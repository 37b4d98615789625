// The dispatch handle of the EP runtime (runtime.cpp): everything combine and the backward passes need.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "cpp/core/dispatch_layout.h"
#include "cpp/torch/runtime.h"

namespace epmoe {

// Tensors live on x's device, int32 unless noted. Two layouts of the plan:
//   host path (CPU tensors, gloo): the host plan (core::SendPlan / core::RecvLayout) and exact row counts;
//   device path (CUDA tensors, NCCL): the device plan (cpp/core/dispatch_plan.h); in capacity mode its counts
//   stay on the device and are read only when Python asks for them (check(), the num_* properties).
struct DispatchHandle {
    int64_t rank = 0, num_ranks = 1, num_tokens = 0, hidden = 0, num_topk = 0, num_local_experts = 0;
    at::ScalarType dtype = at::kFloat;
    bool capacity_mode = false, drop_overflow = false, device_path = false;
    int64_t capacity = -1;
    core::DispatchHeader mine{};                    // this rank's header (counts zero)
    std::vector<int64_t> send_splits, recv_splits;  // rows on the wire per rank (capacity mode: `capacity` each)
    int64_t num_recv_rows = 0;                      // M, rows of recv_x (device capacity mode: padded)
    int64_t num_bytes_sent = 0;                     // dispatch payload bytes sent to other ranks

    // Exposed to Python.
    at::Tensor send_token_idx;  // [N_send] source token of each sent row (rank-major, token ascending; device
                                // capacity mode: [R * capacity], -1 for padding rows)
    at::Tensor recv_src_rank;   // [N_wire_recv] source rank of each received wire row
    at::Tensor recv_src_token;  // [N_wire_recv] source token, -1 for capacity padding
    at::Tensor row_src, row_slot;  // [M] received wire row and slot of each expert-major row (padding rows: 0)
    at::Tensor overflow;           // int64 [R] rows this rank could not send to each rank (capacity mode)

    // Host-known counts (host path, and the device path in exact mode, whose one host read brings them).
    bool counts_on_host = true;
    std::vector<int64_t> host_send_per_rank, host_recv_per_rank;  // rows carrying data, per rank pair
    int64_t host_send_overflow = 0, host_recv_overflow = 0;

    // Host path.
    at::Tensor send_wire_pos;                 // int64 [N_send] row of each sent row in the send wire buffer
    std::vector<int64_t> token_send_offsets;  // [num_tokens + 1] and [N_send]: each token's sent rows,
    std::vector<int32_t> token_send_rows;     // ascending rank (core::SendPlan)
    at::Tensor recv_slot_row;                 // [N_wire_recv, k] expert-major row of each (received row, slot), M = none

    // Device path.
    at::Tensor counts;          // int64 [kNumPlanCounts, R] (core::PlanCount rows)
    at::Tensor recv_headers;    // int64 [R, kHeaderLen]: the headers this rank received
    at::Tensor headers_ok;      // int32 [1]: core::headers_agree of recv_headers (capacity mode)
    at::Tensor token_wire_row;  // [T, R] wire row of each (token, destination), kNotSent / kOverflowed
    at::Tensor slot_to_row;     // [N_wire_recv, k] expert-major row of each (received row, slot), -1 = none
    std::shared_ptr<CommWork> fence;  // completes with the dispatch's transfers (capacity mode, not captured)

    std::vector<int64_t> num_send_per_rank() const;
    std::vector<int64_t> num_recv_per_rank() const;
    int64_t num_send_overflow() const;
    int64_t num_recv_overflow() const;

    // Raises when the ranks disagreed or reported bad input (device capacity mode: found on the device) or rows
    // overflowed the capacity without drop_overflow. Reads the device in device capacity mode (a host sync).
    void check() const;
};
using HandlePtr = std::shared_ptr<DispatchHandle>;

}  // namespace epmoe
