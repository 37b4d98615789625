// Launcher of the fused grouped top-K routing kernel. Torch-free: raw pointers, sizes, a stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpp/core/types.h"

namespace epmoe::cuda {

// Same buffers and semantics as epmoe::core::route_cpu over all p.num_tokens tokens; params must
// already be validated (validate_route_params). Ids are bitwise equal to the CPU's, weights within
// 1 ulp. Throws epmoe::Error on a launch failure.
void launch_route(const void* logits, DType dtype, const float* bias, const RouteParams& p, float* topk_weights,
                  int32_t* topk_idx, cudaStream_t stream);

}  // namespace epmoe::cuda
