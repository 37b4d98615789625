// Launchers of the grouped expert GEMMs (forward with fused SwiGLU, plain grouped GEMM, weight gradient) and
// the SwiGLU backward. Torch-free: raw pointers, sizes, a stream. Rows are expert-major: expert e owns rows
// [expert_offsets[e], expert_offsets[e + 1]) (int64, on the device); rows >= expert_offsets[num_experts] are
// padding and come out zero. The offsets are not trusted (the device cannot raise without a host sync): they are
// clamped on the device to a non-decreasing sequence inside [0, num_rows], so bad offsets give wrong rows but never
// an access outside the buffers; rows no expert owns come out zero. No host sync: the tile schedule is computed on the device, so every launcher is
// CUDA-graph capturable. bf16/fp16 run on tensor cores (mma.sync m16n8k16, cp.async pipeline, fp32
// accumulation); fp32 takes a SIMT path. Every row length (hidden, inter, n, k) must be a multiple of 8 and
// every pointer 16-byte aligned.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cpp/core/types.h"

namespace epmoe::cuda {

// Bytes of device workspace (the per-expert tile schedule) the M-grouped launchers need.
size_t grouped_gemm_workspace_bytes(int num_experts);

// h[r] = silu(x[r] @ gate_e^T) * (x[r] @ up_e^T) for the expert e owning row r; activation on fp32 accumulators.
//   x [num_rows, hidden]; w13 [num_experts, 2 * inter, hidden] (gate rows, then up rows); h [num_rows, inter].
void launch_grouped_swiglu(const void* x, DType dtype, const int64_t* expert_offsets, int num_experts,
                           int64_t num_rows, int64_t hidden, int64_t inter, const void* w13, void* h,
                           void* workspace, cudaStream_t stream);

// out[r] = a[r] @ w_e^T (trans_w, w [num_experts, n, k]) or a[r] @ w_e (w [num_experts, k, n]).
//   a [num_rows, k]; out [num_rows, n].
void launch_grouped_gemm(const void* a, DType dtype, const int64_t* expert_offsets, int num_experts, int64_t num_rows,
                         int64_t k, int64_t n, const void* w, bool trans_w, void* out, void* workspace,
                         cudaStream_t stream);

// out[e] = grad_out_e^T @ a_e over the rows of expert e (zero for empty experts).
//   grad_out [num_rows, n]; a [num_rows, k]; out [num_experts, n, k].
void launch_grouped_gemm_wgrad(const void* grad_out, const void* a, DType dtype, const int64_t* expert_offsets,
                               int num_experts, int64_t num_rows, int64_t n, int64_t k, void* out,
                               cudaStream_t stream);

// grad_gu = [grad_h * up * silu'(gate), grad_h * silu(gate)] in fp32, rounded to dtype.
//   gu, grad_gu [num_rows, 2 * inter]; grad_h [num_rows, inter].
void launch_swiglu_backward(const void* grad_h, const void* gu, DType dtype, int64_t num_rows, int64_t inter,
                            void* grad_gu, cudaStream_t stream);

}  // namespace epmoe::cuda
