// Argument checks shared by the CPU and CUDA impls of the expert-path ops (moe_layout, moe_permute,
// moe_unpermute[_backward], grouped_swiglu, grouped_gemm[_wgrad], swiglu_backward). Messages name the Python
// argument. Only checks that need no device data live here; the CPU impls also validate index values.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <limits>
#include <optional>
#include <utility>

#include "cpp/torch/dtype_name.h"

namespace epmoe::experts {

// Floating operand: fp32 / bf16 / fp16, contiguous, with `dim` dimensions.
inline void check_float(const at::Tensor& t, const char* name, int64_t dim) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                     name, " must be float32, bfloat16 or float16, got ", dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_typed(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ",
                     dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                     dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
    TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device(), " like ", ref_name, ", got ",
                      t.device());
}

// Row indices are int32: the row capacity T*k must fit.
inline void check_row_capacity(int64_t num_rows, const char* name) {
    TORCH_CHECK_VALUE(num_rows <= std::numeric_limits<int32_t>::max(), name, " has too many slots for int32 rows: ",
                      num_rows);
}

// expert_offsets int64 [num_experts + 1] for rows [num_rows, ...].
inline void check_expert_offsets(const at::Tensor& expert_offsets, int64_t num_experts, const at::Tensor& x,
                                 const char* x_name) {
    check_typed(expert_offsets, "expert_offsets", at::kLong, 1);
    check_same_device(expert_offsets, "expert_offsets", x, x_name);
    TORCH_CHECK_VALUE(expert_offsets.size(0) == num_experts + 1, "expert_offsets must have shape [", num_experts + 1,
                      "] (num_experts + 1), got ", expert_offsets.sizes());
}

// ---- per-op shape checks

inline void check_layout_args(const at::Tensor& topk_idx, int64_t num_experts,
                              const std::optional<at::Tensor>& expert_map) {
    check_typed(topk_idx, "topk_idx", at::kInt, 2);
    check_row_capacity(topk_idx.numel(), "topk_idx");
    TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(),
                      "num_experts must be positive, got ", num_experts);
    if (expert_map.has_value()) {
        check_typed(*expert_map, "expert_map", at::kInt, 1);
        check_same_device(*expert_map, "expert_map", topk_idx, "topk_idx");
    }
}

inline void check_permute_args(const at::Tensor& x, const at::Tensor& row_to_slot, int64_t num_topk) {
    check_float(x, "x", 2);
    check_typed(row_to_slot, "row_to_slot", at::kInt, 1);
    check_same_device(row_to_slot, "row_to_slot", x, "x");
    TORCH_CHECK_VALUE(num_topk >= 1, "num_topk must be positive, got ", num_topk);
    TORCH_CHECK_VALUE(row_to_slot.size(0) == x.size(0) * num_topk, "row_to_slot must have shape [",
                      x.size(0) * num_topk, "] (num_tokens * num_topk), got ", row_to_slot.sizes());
}

inline void check_unpermute_args(const at::Tensor& rows, const at::Tensor& slot_to_row,
                                 const at::Tensor& topk_weights) {
    check_float(rows, "rows", 2);
    check_typed(slot_to_row, "slot_to_row", at::kInt, 2);
    check_typed(topk_weights, "topk_weights", at::kFloat, 2);
    check_same_device(slot_to_row, "slot_to_row", rows, "rows");
    check_same_device(topk_weights, "topk_weights", rows, "rows");
    TORCH_CHECK_VALUE(topk_weights.sizes() == slot_to_row.sizes(), "topk_weights must have the shape of slot_to_row ",
                      slot_to_row.sizes(), ", got ", topk_weights.sizes());
    TORCH_CHECK_VALUE(rows.size(0) == slot_to_row.numel(), "rows must have ", slot_to_row.numel(),
                      " rows (num_tokens * num_topk), got shape ", rows.sizes());
}

inline void check_unpermute_backward_args(const at::Tensor& grad_out, const at::Tensor& rows,
                                          const at::Tensor& slot_to_row, const at::Tensor& topk_weights) {
    check_unpermute_args(rows, slot_to_row, topk_weights);
    check_float(grad_out, "grad_out", 2);
    check_same_dtype(grad_out, "grad_out", rows, "rows");
    check_same_device(grad_out, "grad_out", rows, "rows");
    TORCH_CHECK_VALUE(grad_out.size(0) == slot_to_row.size(0) && grad_out.size(1) == rows.size(1),
                      "grad_out must have shape [", slot_to_row.size(0), ", ", rows.size(1), "], got ",
                      grad_out.sizes());
}

// grouped_swiglu: x [R, H], w13 [E, 2I, H].
inline void check_swiglu_args(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& w13) {
    check_float(x, "x", 2);
    check_float(w13, "w13", 3);
    check_same_dtype(w13, "w13", x, "x");
    check_same_device(w13, "w13", x, "x");
    TORCH_CHECK_VALUE(w13.size(1) % 2 == 0 && w13.size(2) == x.size(1), "w13 must have shape [num_experts, 2 * I, ",
                      x.size(1), "] (gate rows then up rows), got ", w13.sizes());
    check_expert_offsets(expert_offsets, w13.size(0), x, "x");
}

// grouped_gemm: a [R, K]; w [E, N, K] (trans_w) or [E, K, N].
inline void check_gemm_args(const at::Tensor& a, const at::Tensor& expert_offsets, const at::Tensor& w, bool trans_w) {
    check_float(a, "a", 2);
    check_float(w, "w", 3);
    check_same_dtype(w, "w", a, "a");
    check_same_device(w, "w", a, "a");
    const int64_t k_dim = trans_w ? 2 : 1;
    TORCH_CHECK_VALUE(w.size(k_dim) == a.size(1), "w must have shape ",
                      trans_w ? "[num_experts, N, K]" : "[num_experts, K, N]", " with K = ", a.size(1),
                      " (a.size(1)), got ", w.sizes());
    check_expert_offsets(expert_offsets, w.size(0), a, "a");
}

// grouped_gemm_wgrad: grad_out [R, N], a [R, K].
inline void check_wgrad_args(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& expert_offsets) {
    check_float(grad_out, "grad_out", 2);
    check_float(a, "a", 2);
    check_same_dtype(grad_out, "grad_out", a, "a");
    check_same_device(grad_out, "grad_out", a, "a");
    TORCH_CHECK_VALUE(grad_out.size(0) == a.size(0), "grad_out must have ", a.size(0), " rows like a, got shape ",
                      grad_out.sizes());
    TORCH_CHECK_VALUE(expert_offsets.dim() == 1 && expert_offsets.size(0) >= 2,
                      "expert_offsets must be 1-D [num_experts + 1] with num_experts >= 1, got shape ",
                      expert_offsets.sizes());
    check_expert_offsets(expert_offsets, expert_offsets.size(0) - 1, a, "a");
}

// swiglu_backward: grad_h [R, I], gu [R, 2I].
inline void check_swiglu_backward_args(const at::Tensor& grad_h, const at::Tensor& gu) {
    check_float(grad_h, "grad_h", 2);
    check_float(gu, "gu", 2);
    check_same_dtype(grad_h, "grad_h", gu, "gu");
    check_same_device(grad_h, "grad_h", gu, "gu");
    TORCH_CHECK_VALUE(gu.size(0) == grad_h.size(0) && gu.size(1) == 2 * grad_h.size(1), "gu must have shape [",
                      grad_h.size(0), ", ", 2 * grad_h.size(1), "] (rows, 2 * I), got ", gu.sizes());
}

// fused_experts_forward: x [T, H], topk_idx int32 [T, k], topk_weights float32 [T, k], w13 [E, 2I, H], w2 [E, H, I].
inline void check_fused_experts_args(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                     const at::Tensor& w13, const at::Tensor& w2) {
    check_float(x, "x", 2);
    check_typed(topk_idx, "topk_idx", at::kInt, 2);
    check_typed(topk_weights, "topk_weights", at::kFloat, 2);
    check_float(w13, "w13", 3);
    check_float(w2, "w2", 3);
    for (const auto& [t, name] : {std::pair{&topk_idx, "topk_idx"}, {&topk_weights, "topk_weights"}, {&w13, "w13"},
                                  {&w2, "w2"}}) {
        check_same_device(*t, name, x, "x");
    }
    check_same_dtype(w13, "w13", x, "x");
    check_same_dtype(w2, "w2", x, "x");
    TORCH_CHECK_VALUE(topk_idx.size(0) == x.size(0), "topk_idx must have ", x.size(0), " rows (x.size(0)), got shape ",
                      topk_idx.sizes());
    TORCH_CHECK_VALUE(topk_weights.sizes() == topk_idx.sizes(), "topk_weights must have the shape of topk_idx ",
                      topk_idx.sizes(), ", got ", topk_weights.sizes());
    TORCH_CHECK_VALUE(w13.size(1) % 2 == 0 && w13.size(2) == x.size(1), "w13 must have shape [num_experts, 2 * I, ",
                      x.size(1), "] (gate rows then up rows), got ", w13.sizes());
    TORCH_CHECK_VALUE(w2.size(0) == w13.size(0) && w2.size(1) == x.size(1) && w2.size(2) == w13.size(1) / 2,
                      "w2 must have shape [num_experts, H, I] = [", w13.size(0), ", ", x.size(1), ", ",
                      w13.size(1) / 2, "], got ", w2.sizes());
}

// The optional shared expert of fused_experts_forward: none of shared_gate [Is, H], shared_up [Is, H], shared_down
// [H, Is], or all three, in x's dtype and device. Returns whether they are given.
inline bool check_shared_expert_args(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                     const std::optional<at::Tensor>& up, const std::optional<at::Tensor>& down) {
    const int given = gate.has_value() + up.has_value() + down.has_value();
    TORCH_CHECK_VALUE(given == 0 || given == 3, "shared_gate, shared_up and shared_down must be given together (",
                      given, " of 3 given)");
    if (given == 0) return false;
    for (const auto& [t, name] : {std::pair{&*gate, "shared_gate"}, {&*up, "shared_up"}, {&*down, "shared_down"}}) {
        check_float(*t, name, 2);
        check_same_dtype(*t, name, x, "x");
        check_same_device(*t, name, x, "x");
    }
    TORCH_CHECK_VALUE(gate->size(1) == x.size(1), "shared_gate must have shape [I_shared, ", x.size(1),
                      "] (H of x), got ", gate->sizes());
    TORCH_CHECK_VALUE(up->sizes() == gate->sizes(), "shared_up must have the shape of shared_gate ", gate->sizes(),
                      ", got ", up->sizes());
    TORCH_CHECK_VALUE(down->size(0) == x.size(1) && down->size(1) == gate->size(0), "shared_down must have shape [",
                      x.size(1), ", ", gate->size(0), "] (H, I_shared), got ", down->sizes());
    return true;
}

}  // namespace epmoe::experts
