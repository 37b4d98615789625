// Device helpers shared by the expert-path kernels (permute.cu, grouped_gemm.cu): element conversions,
// aligned vector packs, grid sizing. nvcc-only header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpp/core/check.h"

namespace epmoe::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Round-to-nearest-even conversions, the same rounding as torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// kN consecutive elements moved as one aligned access (kN * sizeof(T) bytes, at most 16).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
    T v[kN];
};

// Number of SMs of the current device, cached per device (a host attribute query, no sync).
inline int current_sm_count() {
    static int cache[64] = {};
    int device = 0;
    EPMOE_CUDA_CHECK(cudaGetDevice(&device));
    int count = device < 64 ? cache[device] : 0;
    if (count == 0) {
        EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
        if (device < 64) cache[device] = count;
    }
    return count;
}

// Grid for a grid-stride loop over `work` items with `threads` per block: enough blocks to fill the device
// `blocks_per_sm` times over, never more than the work needs, at least one.
inline unsigned grid_for(int64_t work, int threads, int blocks_per_sm = 8) {
    const int64_t needed = (work + threads - 1) / threads;
    const int64_t cap = static_cast<int64_t>(current_sm_count()) * blocks_per_sm;
    return static_cast<unsigned>(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

}  // namespace epmoe::cuda
