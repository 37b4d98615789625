// The two GEMMs of a SwiGLU expert on CPU rows given by pointers (torch-free): the panel kernels (gemm_panel.h)
// for segments of >= panel_min_rows(dtype) rows, the NT kernels (gemm_nt.h, one pass over the weights, no padding)
// for the few rows per expert of decode. Both compute every output as the same fp32 FMA chain over K, so the
// choice (a matter of speed only) never changes a result: a row's output does not depend on the other rows of its
// segment (batch-invariant). Row pointers let callers gather token rows (the permute) and scatter results without
// copies.
#pragma once

#include <cstdint>

#include "cpp/core/types.h"

namespace epmoe::core {

// Segments from this many rows use the panel kernels (measured crossover: fp32 ~12 rows; bf16 ~24, where the
// transposed NT kernel keeps the dot-product units busier than half-empty panels).
inline int64_t panel_min_rows(DType dtype) { return dtype == DType::kFloat32 ? 12 : 24; }

// True when this CPU has the native kernels for `dtype` (fp32: AVX-512; bf16: AVX512_BF16).
bool expert_kernels_supported(DType dtype);

// Scratch bytes for expert_swiglu (num_cols = col_end - col_begin) / expert_gemm on num_rows rows of depth values.
int64_t expert_swiglu_scratch_bytes(DType dtype, int64_t num_rows, int64_t hidden, int64_t num_cols);
int64_t expert_gemm_scratch_bytes(DType dtype, int64_t num_rows, int64_t depth, int64_t num_cols);

// h_rows[m][c] = silu(a[m] . gate[c]) * (a[m] . up[c]), c in [col_begin, col_end), fp32 accumulation, rounded to
// dtype. gate / up: one expert's row-major [*, hidden] weight rows (HF w13 [2I, H]: gate = w13, up = w13 + I * hidden).
// scratch: 64-byte aligned.
void expert_swiglu(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t hidden, const void* gate,
                   const void* up, int64_t col_begin, int64_t col_end, void* const* h_rows, void* scratch);

// out_rows[m][c] = a[m] . w[c], c in [col_begin, col_end), fp32 accumulation, rounded to dtype; w [*, depth].
void expert_gemm(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t depth, const void* w,
                 int64_t col_begin, int64_t col_end, void* const* out_rows, void* scratch);

}  // namespace epmoe::core
