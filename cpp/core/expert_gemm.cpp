#include "cpp/core/expert_gemm.h"

#include "cpp/core/gemm_nt.h"
#include "cpp/core/gemm_panel.h"

namespace epmoe::core {
namespace {

int64_t elem_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace

bool expert_kernels_supported(DType dtype) { return gemm_nt_supported(dtype); }

int64_t expert_swiglu_scratch_bytes(DType dtype, int64_t num_rows, int64_t hidden, int64_t num_cols) {
    if (num_rows >= panel_min_rows(dtype)) return panel_scratch_bytes(dtype, num_rows, hidden);
    return num_rows * 2 * num_cols * 4;  // fp32 gate | up
}

int64_t expert_gemm_scratch_bytes(DType dtype, int64_t num_rows, int64_t depth, int64_t num_cols) {
    if (num_rows >= panel_min_rows(dtype)) return panel_scratch_bytes(dtype, num_rows, depth);
    return num_rows * num_cols * 4;
}

void expert_swiglu(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t hidden, const void* gate,
                   const void* up, int64_t col_begin, int64_t col_end, void* const* h_rows, void* scratch) {
    if (num_rows >= panel_min_rows(dtype)) {
        panel_swiglu(dtype, a_rows, num_rows, hidden, gate, up, col_begin, col_end, h_rows, scratch);
        return;
    }
    const int64_t num_cols = col_end - col_begin, row_bytes = hidden * elem_bytes(dtype);
    float* gu = static_cast<float*>(scratch);  // [num_rows, 2 * num_cols]: gate columns, then up columns
    gemm_nt(dtype, a_rows, num_rows, static_cast<const char*>(gate) + col_begin * row_bytes, hidden, num_cols, hidden,
            gu, 2 * num_cols);
    gemm_nt(dtype, a_rows, num_rows, static_cast<const char*>(up) + col_begin * row_bytes, hidden, num_cols, hidden,
            gu + num_cols, 2 * num_cols);
    swiglu_rows(gu, 2 * num_cols, num_cols, num_rows, num_cols, dtype, h_rows, col_begin);
}

void expert_gemm(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t depth, const void* w,
                 int64_t col_begin, int64_t col_end, void* const* out_rows, void* scratch) {
    if (num_rows >= panel_min_rows(dtype)) {
        panel_gemm(dtype, a_rows, num_rows, depth, w, col_begin, col_end, out_rows, scratch);
        return;
    }
    const int64_t num_cols = col_end - col_begin;
    float* c = static_cast<float*>(scratch);
    gemm_nt(dtype, a_rows, num_rows, static_cast<const char*>(w) + col_begin * depth * elem_bytes(dtype), depth,
            num_cols, depth, c, num_cols);
    store_rows(c, num_cols, num_rows, num_cols, dtype, out_rows, col_begin);
}

}  // namespace epmoe::core
