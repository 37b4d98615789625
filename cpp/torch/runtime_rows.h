// CPU row kernels of the EP runtime (host path: CPU tensors over gloo): one pass each, parallel over rows, memcpy
// of whole rows. Wire layout: runtime.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpp/core/dispatch_layout.h"
#include "cpp/torch/runtime_handle.h"

namespace epmoe::host {

// Writes the sent rows into the wire buffer [N_wire, row_bytes]: row i at wire_pos[i] gets x[token] and its meta.
// Capacity padding rows (not in wire_pos) must already hold 0xFF.
void pack_rows(uint8_t* wire, int64_t row_bytes, const uint8_t* x, int64_t x_bytes, const float* topk_weights,
               const core::SendPlan& plan, const int64_t* wire_pos);

// Expert-major rows from the received wire: recv_x[m] = x bytes of wire row row_src[m], recv_w[m] = its weight of
// slot row_slot[m].
void unpack_rows(const uint8_t* wire, int64_t row_bytes, int64_t x_bytes, int64_t k, const core::RecvLayout& layout,
                 uint8_t* recv_x, float* recv_w);

// Combine on the expert rank: partial [N_wire_recv, H] in expert_out's dtype, partial[i] = sum_j w[row(i, j)] *
// expert_out[row(i, j)] over the slots j of received row i that landed here (recv_slot_row, M = none), ascending
// j, fp32 accumulation. weights undefined: unweighted sum.
at::Tensor reduce_slots(const at::Tensor& expert_out, const at::Tensor& weights, const at::Tensor& recv_slot_row,
                        int64_t num_rows);

// Combine on the source rank: out [num_tokens, C] = sum of the returned rows of each token in ascending rank order,
// fp32 accumulation; tokens sent nowhere get zeros. back is the returned wire [N_wire_send, C].
at::Tensor sum_partials(const at::Tensor& back, const DispatchHandle& h);

}  // namespace epmoe::host
