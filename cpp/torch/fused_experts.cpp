// epmoe::fused_experts_forward: the routed experts with HF semantics in one op, for inference (no autograd), plus
// optionally a shared expert (a dense SwiGLU MLP every token goes through) added to their sum.
//
// Same result definition as the composition experts_forward runs under autograd (moe_layout -> moe_permute ->
// grouped_swiglu -> grouped_gemm -> moe_unpermute, then `+ shared(x)` in x.dtype), which is also this op's impl on
// other devices. The CPU impl skips the permuted copy of x: the SwiGLU GEMM reads token rows through pointers, the
// down GEMM writes its rows slot-major (row of slot t * k + j) into reused scratch, and the combine reads each
// token's k rows contiguously. Both GEMMs run in one parallel region (cpu::swiglu_gemm_segments), the shared
// expert's items among the routed ones (its weights stream alongside theirs at decode); its rows are added in the
// combine pass.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpp/core/permute.h"
#include "cpp/torch/core_dtype.h"
#include "cpp/torch/cpu_scratch.h"
#include "cpp/torch/expert_cpu.h"
#include "cpp/torch/experts_common.h"

namespace epmoe {
namespace {

using Layout = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Layout call_layout(const at::Tensor& topk_idx, int64_t num_experts, const std::optional<at::Tensor>& expert_map) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("epmoe::moe_layout", "")
                               .typed<Layout(const at::Tensor&, int64_t, const std::optional<at::Tensor>&)>();
    return op.call(topk_idx, num_experts, expert_map);
}

at::Tensor fused_experts_forward_cpu(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                     const at::Tensor& w13, const at::Tensor& w2,
                                     const std::optional<at::Tensor>& expert_map,
                                     const std::optional<at::Tensor>& shared_gate,
                                     const std::optional<at::Tensor>& shared_up,
                                     const std::optional<at::Tensor>& shared_down) {
    experts::check_fused_experts_args(x, topk_idx, topk_weights, w13, w2);
    const bool has_shared = experts::check_shared_expert_args(x, shared_gate, shared_up, shared_down);
    const auto [tokens_per_expert, expert_offsets, slot_to_row, row_to_slot] =
        call_layout(topk_idx, w13.size(0), expert_map);
    const int64_t num_tokens = x.size(0), num_topk = topk_idx.size(1), hidden = x.size(1), inter = w13.size(1) / 2;
    const int64_t elem = static_cast<int64_t>(x.element_size());
    std::vector<int64_t> off = cpu::read_offsets(expert_offsets, num_tokens * num_topk);
    const int64_t num_used = off.back();
    const int32_t* r2s = row_to_slot.data_ptr<int32_t>();

    // ---- row pointers: token rows of x (gathered), h rows, slot-major y rows
    cpu::ScratchBuffer h_buffer(static_cast<size_t>(num_used * inter * elem));
    cpu::ScratchBuffer y_buffer(static_cast<size_t>(num_tokens * num_topk * hidden * elem));
    std::vector<const void*> x_rows(num_used);
    std::vector<void*> h_rows(num_used), y_rows(num_used);
    const char* x_ptr = static_cast<const char*>(x.data_ptr());
    char* h_ptr = static_cast<char*>(h_buffer.data());
    char* y_ptr = static_cast<char*>(y_buffer.data());
    for (int64_t r = 0; r < num_used; ++r) {
        x_rows[r] = x_ptr + (r2s[r] / num_topk) * hidden * elem;
        h_rows[r] = h_ptr + r * inter * elem;
        y_rows[r] = y_ptr + static_cast<int64_t>(r2s[r]) * hidden * elem;
    }
    std::vector<cpu::SwigluSegments> swiglu_groups = {
        cpu::swiglu_group(off, reinterpret_cast<const void* const*>(x_rows.data()), w13, h_rows.data())};
    std::vector<cpu::GemmSegments> gemm_groups = {
        cpu::GemmSegments{std::move(off), reinterpret_cast<const void* const*>(h_rows.data()), w2, y_rows.data()}};

    // ---- the shared expert: every token, in token order, into its own h and y rows
    const int64_t shared_inter = has_shared ? shared_gate->size(0) : 0;
    cpu::ScratchBuffer hs_buffer(static_cast<size_t>(num_tokens * shared_inter * elem));
    cpu::ScratchBuffer ys_buffer(static_cast<size_t>(has_shared ? num_tokens * hidden * elem : 0));
    std::vector<const void*> xs_rows, hs_in_rows;
    std::vector<void*> hs_rows, ys_rows;
    if (has_shared) {
        for (int64_t t = 0; t < num_tokens; ++t) {
            xs_rows.push_back(x_ptr + t * hidden * elem);
            hs_rows.push_back(static_cast<char*>(hs_buffer.data()) + t * shared_inter * elem);
            hs_in_rows.push_back(hs_rows.back());
            ys_rows.push_back(static_cast<char*>(ys_buffer.data()) + t * hidden * elem);
        }
        swiglu_groups.push_back(cpu::SwigluSegments{{0, num_tokens}, xs_rows.data(), shared_gate->unsqueeze(0),
                                                    shared_up->unsqueeze(0), hs_rows.data()});
        gemm_groups.push_back(
            cpu::GemmSegments{{0, num_tokens}, hs_in_rows.data(), shared_down->unsqueeze(0), ys_rows.data()});
    }
    cpu::swiglu_gemm_segments(swiglu_groups, gemm_groups);

    // ---- combine: out[t] = sum_j w[t, j] * y[t * k + j] in fp32, ascending j (+ the shared row)
    auto out = at::empty({num_tokens, hidden}, x.options());
    const int32_t* s2r = slot_to_row.data_ptr<int32_t>();
    const float* w_ptr = topk_weights.data_ptr<float>();
    const void* addend = has_shared ? ys_buffer.data() : nullptr;
    void* out_ptr = out.data_ptr();
    const DType dtype = core_dtype(x.scalar_type());
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(hidden * num_topk, 1));
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
        core::unpermute_rows(dtype, y_ptr, hidden, s2r, /*rows_by_slot=*/true, w_ptr, static_cast<int>(num_topk),
                             addend, begin, end, out_ptr);
    });
    return out;
}

// Any other device: the composition of the expert-path ops, then the shared expert in ATen ops.
at::Tensor fused_experts_forward_composite(const at::Tensor& x, const at::Tensor& topk_idx,
                                           const at::Tensor& topk_weights, const at::Tensor& w13, const at::Tensor& w2,
                                           const std::optional<at::Tensor>& expert_map,
                                           const std::optional<at::Tensor>& shared_gate,
                                           const std::optional<at::Tensor>& shared_up,
                                           const std::optional<at::Tensor>& shared_down) {
    experts::check_fused_experts_args(x, topk_idx, topk_weights, w13, w2);
    const bool has_shared = experts::check_shared_expert_args(x, shared_gate, shared_up, shared_down);
    static const auto permute = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("epmoe::moe_permute", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
    static const auto swiglu = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("epmoe::grouped_swiglu", "")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    static const auto gemm = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("epmoe::grouped_gemm", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
    static const auto unpermute = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("epmoe::moe_unpermute", "")
                                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    const auto [tokens_per_expert, expert_offsets, slot_to_row, row_to_slot] =
        call_layout(topk_idx, w13.size(0), expert_map);
    const at::Tensor rows = permute.call(x, row_to_slot, topk_idx.size(1));
    const at::Tensor h = swiglu.call(rows, expert_offsets, w13);
    at::Tensor out = unpermute.call(gemm.call(h, expert_offsets, w2, true), slot_to_row, topk_weights);
    if (!has_shared) return out;
    const at::Tensor shared_h = at::mul(at::silu(at::mm(x, shared_gate->t())), at::mm(x, shared_up->t()));
    return out.add_(at::mm(shared_h, shared_down->t()));
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // out [T, H] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_idx[t, j] (-1 skipped,
    // mapped through expert_map when given), rounded to x.dtype; with shared_gate [Is, H], shared_up [Is, H] and
    // shared_down [H, Is], plus shared_down(silu(shared_gate(x_t)) * shared_up(x_t)) rounded to x.dtype (then the
    // sum rounded again). No autograd (experts_forward uses the differentiable composition).
    m.def(
        "fused_experts_forward(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor w13, Tensor w2, "
        "Tensor? expert_map, Tensor? shared_gate=None, Tensor? shared_up=None, Tensor? shared_down=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(epmoe, CPU, m) {
    m.impl("fused_experts_forward", &epmoe::fused_experts_forward_cpu);
}

TORCH_LIBRARY_IMPL(epmoe, CompositeExplicitAutograd, m) {
    m.impl("fused_experts_forward", &epmoe::fused_experts_forward_composite);
}
