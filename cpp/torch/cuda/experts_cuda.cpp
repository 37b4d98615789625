// CUDA impls of the expert-path ops (schemas and CPU impls: cpp/torch/permute.cpp, cpp/torch/grouped_gemm.cpp).
// Same argument checks as the CPU impls (experts_common.h), then the torch-free launchers on the current stream.
// NOTES: nothing here reads device data, so no op syncs with the host and all are CUDA-graph capturable; for the
// same reason ids outside [-1, num_experts) (resp. the expert_map range) are skipped on CUDA instead of raising.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpp/torch/experts_common.h"
#include "cpp/torch/route_common.h"
#include "cuda/grouped_gemm.cuh"
#include "cuda/permute.cuh"

namespace epmoe {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The CUDA GEMMs move 16-byte chunks: every row length must be a multiple of 8 elements.
void check_multiple_of_8(int64_t size, const char* what) {
    TORCH_CHECK_VALUE(size % 8 == 0, what, " must be a multiple of 8 on CUDA, got ", size);
}

using LayoutResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LayoutResult moe_layout_cuda(const at::Tensor& topk_idx, int64_t num_experts,
                             const std::optional<at::Tensor>& expert_map) {
    experts::check_layout_args(topk_idx, num_experts, expert_map);
    TORCH_CHECK_VALUE(num_experts <= cuda::kMaxLayoutExperts, "num_experts must be at most ", cuda::kMaxLayoutExperts,
                      " on CUDA, got ", num_experts);
    const c10::cuda::CUDAGuard guard(topk_idx.device());
    const int64_t num_slots = topk_idx.numel();
    const int e = static_cast<int>(num_experts);
    const auto i64 = topk_idx.options().dtype(at::kLong);
    auto tokens_per_expert = at::empty({num_experts}, i64);
    auto expert_offsets = at::empty({num_experts + 1}, i64);
    auto slot_to_row = at::empty(topk_idx.sizes(), topk_idx.options());
    auto row_to_slot = at::empty({num_slots}, topk_idx.options());
    auto workspace = at::empty({static_cast<int64_t>(cuda::moe_layout_workspace_bytes(num_slots, e))},
                               topk_idx.options().dtype(at::kByte));
    const int32_t* map = expert_map.has_value() ? expert_map->data_ptr<int32_t>() : nullptr;
    const int num_global = expert_map.has_value() ? static_cast<int>(expert_map->numel()) : e;
    cuda::launch_moe_layout(topk_idx.data_ptr<int32_t>(), num_slots, e, map, num_global,
                            tokens_per_expert.data_ptr<int64_t>(), expert_offsets.data_ptr<int64_t>(),
                            slot_to_row.data_ptr<int32_t>(), row_to_slot.data_ptr<int32_t>(), workspace.data_ptr(),
                            current_stream());
    return {tokens_per_expert, expert_offsets, slot_to_row, row_to_slot};
}

at::Tensor moe_permute_cuda(const at::Tensor& x, const at::Tensor& row_to_slot, int64_t num_topk) {
    experts::check_permute_args(x, row_to_slot, num_topk);
    const c10::cuda::CUDAGuard guard(x.device());
    auto rows = at::empty({row_to_slot.size(0), x.size(1)}, x.options());
    cuda::launch_moe_permute(x.data_ptr(), to_dtype(x, "x"), row_to_slot.data_ptr<int32_t>(), rows.size(0),
                             x.size(1), static_cast<int>(num_topk), rows.data_ptr(), current_stream());
    return rows;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& rows, const at::Tensor& slot_to_row, const at::Tensor& topk_weights) {
    experts::check_unpermute_args(rows, slot_to_row, topk_weights);
    const c10::cuda::CUDAGuard guard(rows.device());
    auto out = at::empty({slot_to_row.size(0), rows.size(1)}, rows.options());
    cuda::launch_moe_unpermute(rows.data_ptr(), to_dtype(rows, "rows"), slot_to_row.data_ptr<int32_t>(),
                               topk_weights.data_ptr<float>(), slot_to_row.size(0),
                               static_cast<int>(slot_to_row.size(1)), rows.size(1), out.data_ptr(), current_stream());
    return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_out, const at::Tensor& rows,
                                                               const at::Tensor& slot_to_row,
                                                               const at::Tensor& topk_weights) {
    experts::check_unpermute_backward_args(grad_out, rows, slot_to_row, topk_weights);
    const c10::cuda::CUDAGuard guard(rows.device());
    auto grad_rows = at::empty(rows.sizes(), rows.options());
    auto grad_topk_weights = at::empty(topk_weights.sizes(), topk_weights.options());
    cuda::launch_moe_unpermute_backward(grad_out.data_ptr(), rows.data_ptr(), to_dtype(rows, "rows"),
                                        slot_to_row.data_ptr<int32_t>(), topk_weights.data_ptr<float>(),
                                        slot_to_row.size(0), static_cast<int>(slot_to_row.size(1)), rows.size(0),
                                        rows.size(1), grad_rows.data_ptr(), grad_topk_weights.data_ptr<float>(),
                                        current_stream());
    return {grad_rows, grad_topk_weights};
}

at::Tensor gemm_workspace(const at::Tensor& like, int64_t num_experts) {
    return at::empty({static_cast<int64_t>(cuda::grouped_gemm_workspace_bytes(static_cast<int>(num_experts)))},
                     like.options().dtype(at::kByte));
}

at::Tensor grouped_swiglu_cuda(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& w13) {
    experts::check_swiglu_args(x, expert_offsets, w13);
    check_multiple_of_8(x.size(1), "x.size(1) (hidden)");
    check_multiple_of_8(w13.size(1) / 2, "w13.size(1) / 2 (intermediate)");
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t inter = w13.size(1) / 2;
    auto h = at::empty({x.size(0), inter}, x.options());
    auto workspace = gemm_workspace(x, w13.size(0));
    cuda::launch_grouped_swiglu(x.data_ptr(), to_dtype(x, "x"), expert_offsets.data_ptr<int64_t>(),
                                static_cast<int>(w13.size(0)), x.size(0), x.size(1), inter, w13.data_ptr(),
                                h.data_ptr(), workspace.data_ptr(), current_stream());
    return h;
}

at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& expert_offsets, const at::Tensor& w,
                             bool trans_w) {
    experts::check_gemm_args(a, expert_offsets, w, trans_w);
    const int64_t n = trans_w ? w.size(1) : w.size(2);
    check_multiple_of_8(a.size(1), "a.size(1) (K)");
    check_multiple_of_8(n, "N (output columns of w)");
    const c10::cuda::CUDAGuard guard(a.device());
    auto out = at::empty({a.size(0), n}, a.options());
    auto workspace = gemm_workspace(a, w.size(0));
    cuda::launch_grouped_gemm(a.data_ptr(), to_dtype(a, "a"), expert_offsets.data_ptr<int64_t>(),
                              static_cast<int>(w.size(0)), a.size(0), a.size(1), n, w.data_ptr(), trans_w,
                              out.data_ptr(), workspace.data_ptr(), current_stream());
    return out;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& expert_offsets) {
    experts::check_wgrad_args(grad_out, a, expert_offsets);
    check_multiple_of_8(grad_out.size(1), "grad_out.size(1) (N)");
    check_multiple_of_8(a.size(1), "a.size(1) (K)");
    const c10::cuda::CUDAGuard guard(a.device());
    const int64_t num_experts = expert_offsets.size(0) - 1;
    auto out = at::empty({num_experts, grad_out.size(1), a.size(1)}, a.options());
    cuda::launch_grouped_gemm_wgrad(grad_out.data_ptr(), a.data_ptr(), to_dtype(a, "a"),
                                    expert_offsets.data_ptr<int64_t>(), static_cast<int>(num_experts), a.size(0),
                                    grad_out.size(1), a.size(1), out.data_ptr(), current_stream());
    return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_h, const at::Tensor& gu) {
    experts::check_swiglu_backward_args(grad_h, gu);
    check_multiple_of_8(grad_h.size(1), "grad_h.size(1) (intermediate)");
    const c10::cuda::CUDAGuard guard(gu.device());
    auto grad_gu = at::empty(gu.sizes(), gu.options());
    cuda::launch_swiglu_backward(grad_h.data_ptr(), gu.data_ptr(), to_dtype(gu, "gu"), gu.size(0), grad_h.size(1),
                                 grad_gu.data_ptr(), current_stream());
    return grad_gu;
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_IMPL(epmoe, CUDA, m) {
    m.impl("moe_layout", &epmoe::moe_layout_cuda);
    m.impl("moe_permute", &epmoe::moe_permute_cuda);
    m.impl("moe_unpermute", &epmoe::moe_unpermute_cuda);
    m.impl("moe_unpermute_backward", &epmoe::moe_unpermute_backward_cuda);
    m.impl("grouped_swiglu", &epmoe::grouped_swiglu_cuda);
    m.impl("grouped_gemm", &epmoe::grouped_gemm_cuda);
    m.impl("grouped_gemm_wgrad", &epmoe::grouped_gemm_wgrad_cuda);
    m.impl("swiglu_backward", &epmoe::swiglu_backward_cuda);
}
