// CPU micro-kernels of the expert GEMMs (torch-free): c = a @ b^T with both operands K-contiguous, the layout of
// the activations ([rows, K]) and of the HF expert weights (gate_up_proj [2I, H], down_proj [H, I]), so neither is
// repacked. Rows of `a` come as pointers: the gather of token rows into the expert-major order (the permute) is
// fused into the loads.
//
// fp32 inputs use AVX-512 FMA; bf16 inputs use AVX512_BF16 dot products (vdpbf16ps: pairs of bf16 products summed
// into fp32 lanes). Accumulation and the output are fp32. Every output element is the FMA chain over K in ascending
// order (bf16: one vdpbf16ps step per pair), the order of the panel kernels (gemm_panel.h): blocks of 16 b rows are
// transposed in registers so that lanes run over b rows, and each row of a is broadcast one word at a time. Meant
// for the few rows of decode: each b row is read once.
#pragma once

#include <cstdint>

#include "cpp/core/types.h"

namespace epmoe::core {

// True when gemm_nt has a native kernel for `dtype` on this CPU (fp32: AVX-512; bf16: AVX512_BF16).
bool gemm_nt_supported(DType dtype);

// c[m * ldc + n] = sum_k a_rows[m][k] * b[n * ldb + k] for m < num_rows, n < num_cols, k < depth.
//   a_rows  num_rows pointers, each to depth elements of `dtype` (fp32 or bf16)
//   b       num_cols rows of depth elements, row stride ldb elements
//   c       fp32, row stride ldc
// Requires gemm_nt_supported(dtype). Single-threaded: callers parallelise over row or column ranges.
void gemm_nt(DType dtype, const void* const* a_rows, int64_t num_rows, const void* b, int64_t ldb, int64_t num_cols,
             int64_t depth, float* c, int64_t ldc);

// SwiGLU on fp32 rows: h_rows[m][col + j] = silu(gu[m * ldgu + j]) * gu[m * ldgu + offset + j] for j < width,
// rounded to `dtype` (fp32, bf16 or fp16, round to nearest even). Plain loops, vectorised for the CPU's ISA.
void swiglu_rows(const float* gu, int64_t ldgu, int64_t offset, int64_t num_rows, int64_t width, DType dtype,
                 void* const* h_rows, int64_t col);

// dst_rows[m][col + j] = src[m * lds + j] rounded to `dtype`, j < width.
void store_rows(const float* src, int64_t lds, int64_t num_rows, int64_t width, DType dtype, void* const* dst_rows,
                int64_t col);

}  // namespace epmoe::core
