// epmoe::grouped_swiglu / grouped_gemm / grouped_gemm_wgrad / swiglu_backward: schemas and CPU impls.
//
// CPU plan: the work of every non-empty expert segment is cut into (expert, row tile, column tile) items so that
// decode (a few rows per expert) and prefill (hundreds) both give every core work; items run under
// at::parallel_for and each calls the platform GEMM (MKL / oneDNN via at::mm_out) on segment views, writing into
// the output buffer. Inside a parallel region the GEMM runs single-threaded, so the items do not oversubscribe.
// Empty experts produce no item.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <vector>

#include "cpp/torch/experts_common.h"

namespace epmoe {
namespace {

constexpr int64_t kRowTile = 256;    // rows of one item: bounds the per-item fp32 scratch
constexpr int64_t kMinColTile = 64;  // narrower column tiles make the GEMM inefficient

struct Item {
    int64_t expert, row_begin, row_end, col_begin, col_end;
};

// Reads and validates the offsets (0 = [0] <= ... <= [E] <= num_rows) on the host.
std::vector<int64_t> read_offsets(const at::Tensor& expert_offsets, int64_t num_rows) {
    const int64_t* off = expert_offsets.data_ptr<int64_t>();
    std::vector<int64_t> v(off, off + expert_offsets.numel());
    TORCH_CHECK_VALUE(v[0] == 0, "expert_offsets[0] must be 0, got ", v[0]);
    for (size_t e = 1; e < v.size(); ++e) {
        TORCH_CHECK_VALUE(v[e] >= v[e - 1], "expert_offsets must be non-decreasing, got ", v[e - 1], " then ", v[e],
                          " at index ", e);
    }
    TORCH_CHECK_VALUE(v.back() <= num_rows, "expert_offsets[-1] must be <= the number of rows ", num_rows, ", got ",
                      v.back());
    return v;
}

// Cuts the non-empty segments into row tiles of <= kRowTile rows, then splits the columns [0, num_cols) evenly
// until there are a few items per thread (so the decode regime, ~1 tile per expert, still spreads).
std::vector<Item> make_items(const std::vector<int64_t>& off, int64_t num_cols, int64_t row_tile) {
    std::vector<Item> row_items;
    for (size_t e = 0; e + 1 < off.size(); ++e) {
        for (int64_t r = off[e]; r < off[e + 1];) {
            const int64_t end = r + std::min(off[e + 1] - r, row_tile);
            row_items.push_back({static_cast<int64_t>(e), r, end, 0, num_cols});
            r = end;
        }
    }
    const int64_t target = 4 * static_cast<int64_t>(at::get_num_threads());
    int64_t num_splits = 1;
    if (!row_items.empty()) {
        num_splits = (target + static_cast<int64_t>(row_items.size()) - 1) / static_cast<int64_t>(row_items.size());
        num_splits = std::clamp<int64_t>(num_splits, 1, std::max<int64_t>(1, num_cols / kMinColTile));
    }
    const int64_t col_tile = (num_cols + num_splits - 1) / num_splits;
    std::vector<Item> items;
    items.reserve(row_items.size() * num_splits);
    for (const Item& it : row_items) {
        for (int64_t c = 0; c < num_cols; c += col_tile) {
            items.push_back({it.expert, it.row_begin, it.row_end, c, std::min(num_cols, c + col_tile)});
        }
    }
    return items;
}

// Runs the items on the intra-op threads, each thread taking the next unclaimed item (segments differ in size
// under skewed routing, so a static split of the item list would leave a core idle).
void run_items(const std::vector<Item>& items, const std::function<void(const Item&)>& fn) {
    const int64_t num_items = static_cast<int64_t>(items.size());
    const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_items);
    std::atomic<int64_t> next{0};
    // NOTES: the ATen calls in the workers must see the caller's thread-local state (grad mode off, autograd keys
    // excluded inside an op); OpenMP worker threads start without it.
    const at::ThreadLocalState state;
    at::parallel_for(0, num_workers, 1, [&](int64_t begin, int64_t end) {
        const at::ThreadLocalStateGuard state_guard(state);
        for (int64_t w = begin; w < end; ++w) {
            for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) fn(items[i]);
        }
    });
}

// Zeroes rows [begin, num_rows) of a 2-D contiguous buffer (the padding rows of an op output).
void zero_rows(at::Tensor& t, int64_t begin) {
    if (begin < t.size(0)) t.narrow(0, begin, t.size(0) - begin).zero_();
}

at::Tensor grouped_swiglu_cpu(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& w13) {
    experts::check_swiglu_args(x, expert_offsets, w13);
    const std::vector<int64_t> off = read_offsets(expert_offsets, x.size(0));
    const int64_t inter = w13.size(1) / 2;
    auto h = at::empty({x.size(0), inter}, x.options());
    zero_rows(h, off.back());
    const std::vector<Item> items = make_items(off, inter, kRowTile);
    run_items(items, [&](const Item& it) {
        const int64_t m = it.row_end - it.row_begin, n = it.col_end - it.col_begin;
        const at::Tensor x_tile = x.narrow(0, it.row_begin, m);
        const at::Tensor w_e = w13.select(0, it.expert);
        at::Tensor gate, up;
        if (n == inter) {  // one GEMM over the gate and up rows together
            const at::Tensor gu = at::mm(x_tile, w_e.t());
            gate = gu.narrow(1, 0, inter);
            up = gu.narrow(1, inter, inter);
        } else {
            gate = at::mm(x_tile, w_e.narrow(0, it.col_begin, n).t());
            up = at::mm(x_tile, w_e.narrow(0, inter + it.col_begin, n).t());
        }
        // NOTES: the GEMM accumulates in fp32; for bf16/fp16 its result is rounded to the input dtype once (the
        // CPU BLAS offers no fp32 output for 16-bit inputs through ATen). The activation then runs in fp32 on
        // the cache-resident tile (vectorised ATen kernels) and is rounded once into h.
        at::Tensor act = gate.to(at::kFloat);
        at::silu_(act);
        act.mul_(up);
        h.narrow(0, it.row_begin, m).narrow(1, it.col_begin, n).copy_(act);
    });
    return h;
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& expert_offsets, const at::Tensor& w, bool trans_w) {
    experts::check_gemm_args(a, expert_offsets, w, trans_w);
    const std::vector<int64_t> off = read_offsets(expert_offsets, a.size(0));
    const int64_t num_cols = trans_w ? w.size(1) : w.size(2);
    auto out = at::empty({a.size(0), num_cols}, a.options());
    zero_rows(out, off.back());
    run_items(make_items(off, num_cols, kRowTile), [&](const Item& it) {
        const int64_t m = it.row_end - it.row_begin, n = it.col_end - it.col_begin;
        const at::Tensor w_e = w.select(0, it.expert);
        const at::Tensor b = trans_w ? w_e.narrow(0, it.col_begin, n).t() : w_e.narrow(1, it.col_begin, n);
        at::Tensor dst = out.narrow(0, it.row_begin, m).narrow(1, it.col_begin, n);
        at::mm_out(dst, a.narrow(0, it.row_begin, m), b);
    });
    return out;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& expert_offsets) {
    experts::check_wgrad_args(grad_out, a, expert_offsets);
    const std::vector<int64_t> off = read_offsets(expert_offsets, a.size(0));
    const int64_t num_experts = expert_offsets.size(0) - 1, n_dim = grad_out.size(1), k_dim = a.size(1);
    auto out = at::empty({num_experts, n_dim, k_dim}, a.options());
    for (int64_t e = 0; e < num_experts; ++e) {
        if (off[e + 1] == off[e]) out.select(0, e).zero_();
    }
    // One item covers all rows of its expert (a single fp32-accumulated GEMM per output tile); the output
    // rows (N) are split for parallelism.
    const int64_t whole_segments = std::numeric_limits<int64_t>::max();
    run_items(make_items(off, n_dim, whole_segments), [&](const Item& it) {
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
