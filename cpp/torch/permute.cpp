// epmoe::moe_layout / moe_permute / moe_unpermute / moe_unpermute_backward: schemas and CPU impls.
// The layout is the torch-free core (count, offsets, place) run over token chunks; the weighted sums are here
// because they need the element types.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpp/core/permute.h"
#include "cpp/torch/core_dtype.h"
#include "cpp/torch/experts_common.h"

namespace epmoe {
namespace {

// Slots per parallel task of the layout passes and of the row loops (each slot costs a few ns).
constexpr int64_t kLayoutGrainSlots = 1 << 15;

void check_index_range(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
    const int64_t bad = core::find_out_of_range(t.data_ptr<int32_t>(), t.numel(), lo, hi);
    TORCH_CHECK_VALUE(bad < 0, name, " values must lie in [", lo, ", ", hi, "), got ",
                      bad < 0 ? 0 : t.data_ptr<int32_t>()[bad], " at flat index ", bad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_layout_cpu(const at::Tensor& topk_idx,
                                                                          int64_t num_experts,
                                                                          const std::optional<at::Tensor>& expert_map) {
    experts::check_layout_args(topk_idx, num_experts, expert_map);
    core::LayoutParams p;
    p.num_tokens = topk_idx.size(0);
    p.num_topk = static_cast<int>(topk_idx.size(1));
    p.num_experts = static_cast<int>(num_experts);
    const int32_t* map_ptr = nullptr;
    if (expert_map.has_value()) {
        check_index_range(*expert_map, "expert_map", -1, num_experts);
        p.num_map_entries = expert_map->size(0);
        map_ptr = expert_map->data_ptr<int32_t>();
    }
    const int64_t num_rows = topk_idx.numel();
    auto opts = topk_idx.options();
    auto tokens_per_expert = at::empty({num_experts}, opts.dtype(at::kLong));
    auto expert_offsets = at::empty({num_experts + 1}, opts.dtype(at::kLong));
    auto slot_to_row = at::empty({p.num_tokens, p.num_topk}, opts.dtype(at::kInt));
    auto row_to_slot = at::empty({num_rows}, opts.dtype(at::kInt));

    // ---- count per token chunk (fixed chunking: the result does not depend on it, only the speed does)
    const int64_t tokens_per_chunk = std::max<int64_t>(1, kLayoutGrainSlots / std::max(p.num_topk, 1));
    const int num_chunks = static_cast<int>(std::max<int64_t>(1, (p.num_tokens + tokens_per_chunk - 1) / tokens_per_chunk));
    std::vector<int64_t> chunk_counts(static_cast<size_t>(num_chunks) * num_experts);
    std::vector<int64_t> chunk_cursors(chunk_counts.size());
    std::vector<int64_t> first_bad(num_chunks, -1);
    const int32_t* idx_ptr = topk_idx.data_ptr<int32_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            first_bad[c] = core::layout_count(p, idx_ptr, map_ptr, c * tokens_per_chunk,
                                              std::min(p.num_tokens, (c + 1) * tokens_per_chunk),
                                              chunk_counts.data() + c * num_experts);
        }
    });
    for (int64_t bad : first_bad) {
        TORCH_CHECK_VALUE(bad < 0, "topk_idx values must lie in [-1, ",
                          expert_map.has_value() ? p.num_map_entries : num_experts, ")",
                          expert_map.has_value() ? " (expert_map entries)" : " (num_experts)", ", got ",
                          bad < 0 ? 0 : idx_ptr[bad], " at flat index ", bad);
    }
    // ---- offsets, then stable placement per chunk
    core::layout_offsets(chunk_counts.data(), num_chunks, p.num_experts, tokens_per_expert.data_ptr<int64_t>(),
                         expert_offsets.data_ptr<int64_t>(), chunk_cursors.data());
    int32_t* s2r_ptr = slot_to_row.data_ptr<int32_t>();
    int32_t* r2s_ptr = row_to_slot.data_ptr<int32_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            core::layout_place(p, idx_ptr, map_ptr, c * tokens_per_chunk,
                               std::min(p.num_tokens, (c + 1) * tokens_per_chunk), chunk_cursors.data() + c * num_experts,
                               s2r_ptr, r2s_ptr);
        }
    });
    const int64_t num_used = expert_offsets.data_ptr<int64_t>()[num_experts];
    std::fill(r2s_ptr + num_used, r2s_ptr + num_rows, -1);
    return {tokens_per_expert, expert_offsets, slot_to_row, row_to_slot};
}

at::Tensor moe_permute_cpu(const at::Tensor& x, const at::Tensor& row_to_slot, int64_t num_topk) {
    experts::check_permute_args(x, row_to_slot, num_topk);
    check_index_range(row_to_slot, "row_to_slot", -1, row_to_slot.size(0));
    auto rows = at::empty({row_to_slot.size(0), x.size(1)}, x.options());
    const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
    const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(row_bytes, 1));
    const void* x_ptr = x.data_ptr();
    void* rows_ptr = rows.data_ptr();
    const int32_t* r2s_ptr = row_to_slot.data_ptr<int32_t>();
    at::parallel_for(0, rows.size(0), grain, [&](int64_t begin, int64_t end) {
        core::permute_rows(x_ptr, row_bytes, r2s_ptr, static_cast<int>(num_topk), begin, end, rows_ptr);
    });
    return rows;
}

// Rows per parallel task of the per-token loops, ~256 KiB of row data.
int64_t token_grain(int64_t hidden, int64_t num_topk) {
    return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(hidden * num_topk, 1));
}

at::Tensor moe_unpermute_cpu(const at::Tensor& rows, const at::Tensor& slot_to_row, const at::Tensor& topk_weights) {
    experts::check_unpermute_args(rows, slot_to_row, topk_weights);
    check_index_range(slot_to_row, "slot_to_row", -1, rows.size(0));
    const int64_t num_tokens = slot_to_row.size(0), num_topk = slot_to_row.size(1), hidden = rows.size(1);
    auto out = at::empty({num_tokens, hidden}, rows.options());
    const int32_t* s2r = slot_to_row.data_ptr<int32_t>();
    const float* w = topk_weights.data_ptr<float>();
    const void* rows_ptr = rows.data_ptr();
    void* out_ptr = out.data_ptr();
    const DType dtype = core_dtype(rows.scalar_type());
    // NOTES: ascending j, fp32, no FMA: the same order as the CUDA kernel, so both agree bitwise on fp32 sums.
    at::parallel_for(0, num_tokens, token_grain(hidden, num_topk), [&](int64_t begin, int64_t end) {
        core::unpermute_rows(dtype, rows_ptr, hidden, s2r, /*rows_by_slot=*/false, w, static_cast<int>(num_topk),
                             /*addend=*/nullptr, begin, end, out_ptr);
    });
    return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cpu(const at::Tensor& grad_out, const at::Tensor& rows,
                                                              const at::Tensor& slot_to_row,
                                                              const at::Tensor& topk_weights) {
    experts::check_unpermute_backward_args(grad_out, rows, slot_to_row, topk_weights);
    check_index_range(slot_to_row, "slot_to_row", -1, rows.size(0));
    const int64_t num_tokens = slot_to_row.size(0), num_topk = slot_to_row.size(1), hidden = rows.size(1);
    auto grad_rows = at::zeros_like(rows);  // rows no slot points at (padding) stay zero
    auto grad_weights = at::empty({num_tokens, num_topk}, topk_weights.options());
    const int32_t* s2r = slot_to_row.data_ptr<int32_t>();
    const float* w = topk_weights.data_ptr<float>();
    float* gw = grad_weights.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "moe_unpermute_backward", [&] {
        const scalar_t* rows_ptr = rows.data_ptr<scalar_t>();
        const scalar_t* go_ptr = grad_out.data_ptr<scalar_t>();
        scalar_t* gr_ptr = grad_rows.data_ptr<scalar_t>();
        at::parallel_for(0, num_tokens, token_grain(hidden, num_topk), [&](int64_t begin, int64_t end) {
            for (int64_t t = begin; t < end; ++t) {
                const scalar_t* go = go_ptr + t * hidden;
                for (int64_t j = 0; j < num_topk; ++j) {
                    const int64_t f = t * num_topk + j;
                    const int32_t r = s2r[f];
                    if (r < 0) {
                        gw[f] = 0.0f;
                        continue;
                    }
                    const scalar_t* src = rows_ptr + static_cast<int64_t>(r) * hidden;
                    scalar_t* dst = gr_ptr + static_cast<int64_t>(r) * hidden;
                    float dot = 0.0f;
                    for (int64_t h = 0; h < hidden; ++h) {
                        const float g = static_cast<float>(go[h]);
                        dot += g * static_cast<float>(src[h]);
                        dst[h] = static_cast<scalar_t>(w[f] * g);
                    }
                    gw[f] = dot;
                }
            }
        });
    });
    return {grad_rows, grad_weights};
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // Expert-major layout of the routed slots: (tokens_per_expert int64 [E], expert_offsets int64 [E+1],
    // slot_to_row int32 [T,k], row_to_slot int32 [T*k]); expert_map int32 [E_global] maps ids to local experts.
    m.def(
        "moe_layout(Tensor topk_idx, int num_experts, Tensor? expert_map) -> (Tensor tokens_per_expert, "
        "Tensor expert_offsets, Tensor slot_to_row, Tensor row_to_slot)");
    // Gathers token rows into expert-major rows [T*k, H]; padding rows are zero.
    m.def("moe_permute(Tensor x, Tensor row_to_slot, int num_topk) -> Tensor");
    // out[t] = sum_j topk_weights[t,j] * rows[slot_to_row[t,j]] in fp32, ascending j.
    m.def("moe_unpermute(Tensor rows, Tensor slot_to_row, Tensor topk_weights) -> Tensor");
    // Gradients of moe_unpermute w.r.t. rows and topk_weights.
    m.def(
        "moe_unpermute_backward(Tensor grad_out, Tensor rows, Tensor slot_to_row, Tensor topk_weights) -> "
        "(Tensor grad_rows, Tensor grad_topk_weights)");
}

TORCH_LIBRARY_IMPL(epmoe, CPU, m) {
    m.impl("moe_layout", &epmoe::moe_layout_cpu);
    m.impl("moe_permute", &epmoe::moe_permute_cpu);
    m.impl("moe_unpermute", &epmoe::moe_unpermute_cpu);
    m.impl("moe_unpermute_backward", &epmoe::moe_unpermute_backward_cpu);
}
