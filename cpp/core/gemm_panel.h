// Prefill micro-kernels of the expert GEMMs (torch-free): out = a @ w^T computed transposed, out^T = w @ a^T, so that
// the weights are read in place (HF layout, K-contiguous rows) and each weight value is broadcast against a vector
// of 16 token rows. The token rows are packed once per call into panels of 32 rows (a^T, K-major; bf16 as pairs of
// consecutive K values, the vdpbf16ps operand layout), a cheap transpose next to the GEMM. A tile is 12 weight rows
// x 32 token rows (24 zmm accumulators), 24 FMAs (fp32) or 24 vdpbf16ps (bf16) per 14 loads; the result is
// transposed back in registers and written to the output rows.
//
// Each output element is one fp32 sum over K in ascending order (bf16: pairs of products per step), independent
// of the tiling: results do not depend on how callers split rows or columns.
#pragma once

#include <cstdint>

#include "cpp/core/types.h"

namespace epmoe::core {

constexpr int64_t kPanelRows = 32;

// Bytes of panel scratch for num_rows rows of depth elements.
int64_t panel_scratch_bytes(DType dtype, int64_t num_rows, int64_t depth);

// h[m][c] = silu(a[m] . gate[c]) * (a[m] . up[c]) for c in [col_begin, col_end), rounded to dtype.
//   a_rows   num_rows pointers to rows of `hidden` elements (dtype fp32 or bf16)
//   gate/up  [*, hidden] row-major weight rows of one expert (HF w13 [2I, H]: gate = w13, up = w13 + I * hidden)
//   h_rows   num_rows pointers to rows of the output (column c at h_rows[m] + c)
//   scratch  panel_scratch_bytes(dtype, num_rows, hidden) bytes, 64-byte aligned
// Requires gemm_nt_supported(dtype) (the same ISA).
void panel_swiglu(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t hidden, const void* gate,
                  const void* up, int64_t col_begin, int64_t col_end, void* const* out_rows, void* scratch);

// out[m][c] = a[m] . w[c] for c in [col_begin, col_end), rounded to dtype; w [*, depth] row-major.
void panel_gemm(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t depth, const void* w,
                int64_t col_begin, int64_t col_end, void* const* out_rows, void* scratch);

}  // namespace epmoe::core
