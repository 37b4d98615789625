// Plain types shared by the CPU kernels (cpp/core), the CUDA launchers (cuda/) and the torch glue.
#pragma once

#include <cstdint>

namespace epmoe {

// Element type of a raw buffer. The torch layer maps at::ScalarType onto it.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

enum class Scoring : int { kSoftmax = 0, kSigmoid = 1 };

// Everything the routing kernels need besides the buffers. Validated by validate_route_params().
struct RouteParams {
    int64_t num_tokens = 0;
    int num_experts = 0;
    int num_topk = 0;
    Scoring scoring = Scoring::kSoftmax;
    int num_groups = 1;       // experts are split into num_groups contiguous groups
    int num_topk_groups = 1;  // groups kept per token
    bool has_bias = false;    // fp32 correction bias [num_experts], selection only
    bool renormalize = true;
    float scaling_factor = 1.0f;
};

}  // namespace epmoe
