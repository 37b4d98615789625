// CPU row kernels of the EP runtime. See runtime_rows.h.
#include "cpp/torch/runtime_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

namespace epmoe::host {
namespace {

constexpr int64_t kRowGrain = 64;  // rows per task: each row is H elements, so a task is tens of microseconds

// Combine on the expert rank: partial[i] = sum_j w[row(i, j)] * expert_out[row(i, j)] over the slots j of received
// row i that landed here, ascending j, fp32 accumulation, one pass. weights == nullptr: unweighted sum.
template <typename scalar_t>
void reduce_slots_typed(const scalar_t* expert_out, const float* weights, const int32_t* slot_row, int64_t num_rows,
                      int64_t num_recv, int64_t k, int64_t hidden, scalar_t* partial) {
    at::parallel_for(0, num_recv, kRowGrain / 4, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(hidden);
        for (int64_t i = begin; i < end; ++i) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t j = 0; j < k; ++j) {
                const int64_t row = slot_row[i * k + j];
                if (row == num_rows) continue;  // slot not on this rank
                const scalar_t* src = expert_out + row * hidden;
                if (weights != nullptr) {
                    const float w = weights[row];
                    for (int64_t c = 0; c < hidden; ++c) acc[c] += w * static_cast<float>(src[c]);
                } else {
                    for (int64_t c = 0; c < hidden; ++c) acc[c] += static_cast<float>(src[c]);
                }
            }
            scalar_t* dst = partial + i * hidden;
            for (int64_t c = 0; c < hidden; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
    });
}

// Combine on the source rank: out[t] = sum of the returned rows of token t in ascending rank order, fp32
// accumulation; tokens sent nowhere get zeros. back is the returned wire [N_wire_send, C].
template <typename scalar_t>
void sum_partials_typed(const scalar_t* back, const DispatchHandle& h, int64_t num_cols, scalar_t* out) {
    const int64_t* wire_pos = h.send_wire_pos.data_ptr<int64_t>();
    at::parallel_for(0, h.num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(num_cols);
        for (int64_t t = begin; t < end; ++t) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t p = h.token_send_offsets[t]; p < h.token_send_offsets[t + 1]; ++p) {
                const scalar_t* src = back + wire_pos[h.token_send_rows[p]] * num_cols;
                for (int64_t c = 0; c < num_cols; ++c) acc[c] += static_cast<float>(src[c]);
            }
            scalar_t* dst = out + t * num_cols;
            for (int64_t c = 0; c < num_cols; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
    });
}

}  // namespace

void pack_rows(uint8_t* wire, int64_t row_bytes, const uint8_t* x, int64_t x_bytes, const float* topk_weights,
               const core::SendPlan& plan, const int64_t* wire_pos) {
    const int64_t k = plan.num_topk;
    const int64_t num_send = static_cast<int64_t>(plan.send_token_idx.size());
    at::parallel_for(0, num_send, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int32_t token = plan.send_token_idx[i];
            const int32_t* slots = plan.send_slot_expert.data() + i * k;
            uint8_t* dst = wire + wire_pos[i] * row_bytes;
            std::memcpy(dst, x + token * x_bytes, x_bytes);
            uint8_t* meta = dst + x_bytes;
            std::memcpy(meta, &token, 4);
            std::memcpy(meta + 4, slots, 4 * k);
            for (int64_t j = 0; j < k; ++j) {
                const float w = slots[j] >= 0 ? topk_weights[token * k + j] : 0.0f;
                std::memcpy(meta + 4 * (1 + k + j), &w, 4);
            }
        }
    });
}

void unpack_rows(const uint8_t* wire, int64_t row_bytes, int64_t x_bytes, int64_t k, const core::RecvLayout& layout,
                 uint8_t* recv_x, float* recv_w) {
    const int64_t num_rows = static_cast<int64_t>(layout.row_src.size());
    at::parallel_for(0, num_rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            const uint8_t* src = wire + layout.row_src[m] * row_bytes;
            std::memcpy(recv_x + m * x_bytes, src, x_bytes);
            std::memcpy(recv_w + m, src + x_bytes + 4 * (1 + k + layout.row_slot[m]), 4);
        }
    });
}

at::Tensor reduce_slots(const at::Tensor& expert_out, const at::Tensor& weights, const at::Tensor& recv_slot_row,
                        int64_t num_rows) {
    const at::Tensor out_c = expert_out.contiguous();
    const at::Tensor w_c = weights.defined() ? weights.to(at::kFloat).contiguous() : at::Tensor();
    const int64_t num_recv = recv_slot_row.size(0), k = recv_slot_row.size(1), hidden = expert_out.size(1);
    auto partial = at::empty({num_recv, hidden}, expert_out.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, expert_out.scalar_type(), "epmoe_combine_reduce", [&] {
        const float* w_ptr = w_c.defined() ? w_c.data_ptr<float>() : nullptr;
        reduce_slots_typed<scalar_t>(out_c.data_ptr<scalar_t>(), w_ptr, recv_slot_row.data_ptr<int32_t>(), num_rows,
                                     num_recv, k, hidden, partial.data_ptr<scalar_t>());
    });
    return partial;
}

at::Tensor sum_partials(const at::Tensor& back, const DispatchHandle& h) {
    const int64_t num_cols = back.size(1);
    auto out = at::empty({h.num_tokens, num_cols}, back.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, back.scalar_type(), "epmoe_sum", [&] {
        sum_partials_typed<scalar_t>(back.data_ptr<scalar_t>(), h, num_cols, out.data_ptr<scalar_t>());
    });
    return out;
}

}  // namespace epmoe::host
