// epmoe::grouped_swiglu / grouped_gemm / grouped_gemm_wgrad / swiglu_backward: schemas and CPU impls.
//
// The forward GEMMs (grouped_swiglu, grouped_gemm with trans_w) run through cpp/torch/expert_cpu.h (native
// micro-kernels or at::mm per item); the backward-only GEMMs (grouped_gemm without trans_w, grouped_gemm_wgrad)
// call at::mm_out per item of the same item scheme. Inside a parallel region the GEMM runs single-threaded, so the
// items do not oversubscribe. Empty experts produce no item.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sigmoid.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpp/torch/expert_cpu.h"
#include "cpp/torch/experts_common.h"

namespace epmoe {
namespace {

constexpr int64_t kRowTile = 256;    // rows of one at::mm item
constexpr int64_t kColAlign = 32;    // at::mm items: column chunks of >= 64 columns

// Zeroes rows [begin, num_rows) of a 2-D contiguous buffer (the padding rows of an op output).
void zero_rows(at::Tensor& t, int64_t begin) {
    if (begin < t.size(0)) t.narrow(0, begin, t.size(0) - begin).zero_();
}

// Pointers to the rows [0, num_rows) of a contiguous 2-D tensor.
std::vector<void*> row_pointers(const at::Tensor& t, int64_t num_rows) {
    std::vector<void*> rows(static_cast<size_t>(num_rows));
    char* base = static_cast<char*>(t.data_ptr());
    const int64_t row_bytes = t.size(1) * static_cast<int64_t>(t.element_size());
    for (int64_t r = 0; r < num_rows; ++r) rows[r] = base + r * row_bytes;
    return rows;
}

at::Tensor grouped_swiglu_cpu(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& w13) {
    experts::check_swiglu_args(x, expert_offsets, w13);
    const std::vector<int64_t> off = cpu::read_offsets(expert_offsets, x.size(0));
    auto h = at::empty({x.size(0), w13.size(1) / 2}, x.options());
    zero_rows(h, off.back());
    const std::vector<void*> x_rows = row_pointers(x, off.back()), h_rows = row_pointers(h, off.back());
    cpu::swiglu_segments({cpu::swiglu_group(off, x_rows.data(), w13, h_rows.data())});
    return h;
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& expert_offsets, const at::Tensor& w, bool trans_w) {
    experts::check_gemm_args(a, expert_offsets, w, trans_w);
    const std::vector<int64_t> off = cpu::read_offsets(expert_offsets, a.size(0));
    const int64_t num_cols = trans_w ? w.size(1) : w.size(2);
    auto out = at::empty({a.size(0), num_cols}, a.options());
    zero_rows(out, off.back());
    if (trans_w) {
        const std::vector<void*> a_rows = row_pointers(a, off.back()), out_rows = row_pointers(out, off.back());
        cpu::gemm_segments({cpu::GemmSegments{off, a_rows.data(), w, out_rows.data()}});
        return out;
    }
    cpu::run_items(cpu::make_items(off, num_cols, kRowTile, kColAlign), [&](const cpu::Item& it) {
        const int64_t m = it.row_end - it.row_begin, n = it.col_end - it.col_begin;
        at::Tensor dst = out.narrow(0, it.row_begin, m).narrow(1, it.col_begin, n);
        at::mm_out(dst, a.narrow(0, it.row_begin, m), w.select(0, it.expert).narrow(1, it.col_begin, n));
    });
    return out;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& expert_offsets) {
    experts::check_wgrad_args(grad_out, a, expert_offsets);
    const std::vector<int64_t> off = cpu::read_offsets(expert_offsets, a.size(0));
    const int64_t num_experts = expert_offsets.size(0) - 1, n_dim = grad_out.size(1), k_dim = a.size(1);
    auto out = at::empty({num_experts, n_dim, k_dim}, a.options());
    for (int64_t e = 0; e < num_experts; ++e) {
        if (off[e + 1] == off[e]) out.select(0, e).zero_();
    }
    // One item covers all rows of its expert (a single fp32-accumulated GEMM per output tile); the output
    // rows (N) are split for parallelism.
    const int64_t whole_segments = std::numeric_limits<int64_t>::max();
    cpu::run_items(cpu::make_items(off, n_dim, whole_segments, kColAlign), [&](const cpu::Item& it) {
        const int64_t m = it.row_end - it.row_begin, n = it.col_end - it.col_begin;
        at::Tensor dst = out.select(0, it.expert).narrow(0, it.col_begin, n);
        at::mm_out(dst, grad_out.narrow(0, it.row_begin, m).narrow(1, it.col_begin, n).t(),
                   a.narrow(0, it.row_begin, m));
    });
    return out;
}

void swiglu_backward_rows(const at::Tensor& grad_h, const at::Tensor& gu, at::Tensor& grad_gu, int64_t begin,
                          int64_t end) {
    const int64_t inter = grad_h.size(1);
    const at::Tensor gu_rows = gu.narrow(0, begin, end - begin);
        const at::Tensor gate = gu_rows.narrow(1, 0, inter).to(at::kFloat);
        const at::Tensor up = gu_rows.narrow(1, inter, inter).to(at::kFloat);
        const at::Tensor dh = grad_h.narrow(0, begin, end - begin).to(at::kFloat);
        const at::Tensor s = at::sigmoid(gate);
        at::Tensor out_rows = grad_gu.narrow(0, begin, end - begin);
        // silu(g) = g * s; silu'(g) = s * (1 + g * (1 - s))
        out_rows.narrow(1, inter, inter).copy_(at::mul(dh, gate).mul_(s));
        at::Tensor d_gate = at::rsub(s, 1.0);
        d_gate.mul_(gate).add_(1.0).mul_(s).mul_(up).mul_(dh);
        out_rows.narrow(1, 0, inter).copy_(d_gate);
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_h, const at::Tensor& gu) {
    experts::check_swiglu_backward_args(grad_h, gu);
    const int64_t num_rows = grad_h.size(0), inter = grad_h.size(1);
    auto grad_gu = at::empty_like(gu);
    if (num_rows == 0) return grad_gu;
    // Blocks of ~64 KiB of fp32 temporaries each (cache-resident), computed with vectorised ATen kernels.
    const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(inter, 1));
    const at::ThreadLocalState state;  // see run_items
    at::parallel_for(0, (num_rows + block - 1) / block, 1, [&](int64_t block_begin, int64_t block_end) {
        const at::ThreadLocalStateGuard state_guard(state);
        for (int64_t b = block_begin; b < block_end; ++b) {
            swiglu_backward_rows(grad_h, gu, grad_gu, b * block, std::min(num_rows, (b + 1) * block));
        }
    });
    return grad_gu;
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // h [R, I] = silu(x_e @ gate_e^T) * (x_e @ up_e^T) per expert segment; w13 [E, 2I, H] = gate rows then up rows.
    m.def("grouped_swiglu(Tensor x, Tensor expert_offsets, Tensor w13) -> Tensor");
    // out [R, N] = a_e @ w_e^T (trans_w, w [E, N, K]) or a_e @ w_e (w [E, K, N]) per expert segment.
    m.def("grouped_gemm(Tensor a, Tensor expert_offsets, Tensor w, bool trans_w) -> Tensor");
    // out [E, N, K] = grad_out_e^T @ a_e per expert segment (weight gradient); empty experts are zero.
    m.def("grouped_gemm_wgrad(Tensor grad_out, Tensor a, Tensor expert_offsets) -> Tensor");
    // grad_gu [R, 2I] of h = silu(gate) * up from the pre-activations gu = (gate | up).
    m.def("swiglu_backward(Tensor grad_h, Tensor gu) -> Tensor");
}

TORCH_LIBRARY_IMPL(epmoe, CPU, m) {
    m.impl("grouped_swiglu", &epmoe::grouped_swiglu_cpu);
    m.impl("grouped_gemm", &epmoe::grouped_gemm_cpu);
    m.impl("grouped_gemm_wgrad", &epmoe::grouped_gemm_wgrad_cpu);
    m.impl("swiglu_backward", &epmoe::swiglu_backward_cpu);
}
