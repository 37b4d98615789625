// Argument checks shared by the CPU and CUDA impls of epmoe::route. Messages name the Python argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "cpp/core/route.h"
#include "cpp/torch/core_dtype.h"
#include "cpp/torch/dtype_name.h"
#include "cpp/core/types.h"

namespace epmoe {

inline Scoring to_scoring(const std::string& scoring) {
    if (scoring == "softmax") return Scoring::kSoftmax;
    if (scoring == "sigmoid") return Scoring::kSigmoid;
    TORCH_CHECK_VALUE(false, "scoring must be 'softmax' or 'sigmoid', got '", scoring, "'");
}

// Validates every argument of epmoe::route and returns the kernel parameters.
inline RouteParams make_route_params(const at::Tensor& router_logits, int64_t top_k, const std::string& scoring,
                                     int64_t num_groups, int64_t topk_groups, const std::optional<at::Tensor>& bias,
                                     bool renormalize, double scaling_factor) {
    TORCH_CHECK_VALUE(router_logits.dim() == 2, "router_logits must be 2-D [num_tokens, num_experts], got shape ",
                      router_logits.sizes());
    TORCH_CHECK_VALUE(router_logits.is_contiguous(), "router_logits must be contiguous");
    to_dtype(router_logits, "router_logits");
    TORCH_CHECK_VALUE(router_logits.size(1) <= (1 << 20), "router_logits has too many experts: ", router_logits.size(1));
    if (bias.has_value()) {
        const at::Tensor& b = *bias;
        TORCH_CHECK_TYPE(b.scalar_type() == at::kFloat, "bias must be float32, got ", dtype_name(b.scalar_type()));
        TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == router_logits.size(1), "bias must have shape [",
                          router_logits.size(1), "] (num_experts), got ", b.sizes());
        TORCH_CHECK_VALUE(b.device() == router_logits.device(), "bias must be on ", router_logits.device(),
                          " like router_logits, got ", b.device());
        TORCH_CHECK_VALUE(b.is_contiguous(), "bias must be contiguous");
    }
    RouteParams p;
    p.num_tokens = router_logits.size(0);
    p.num_experts = static_cast<int>(router_logits.size(1));
    p.num_topk = static_cast<int>(std::clamp<int64_t>(top_k, -1, 1 << 20));
    p.scoring = to_scoring(scoring);
    p.num_groups = static_cast<int>(std::clamp<int64_t>(num_groups, -1, 1 << 20));
    p.num_topk_groups = static_cast<int>(std::clamp<int64_t>(topk_groups, -1, 1 << 20));
    p.has_bias = bias.has_value();
    p.renormalize = renormalize;
    p.scaling_factor = static_cast<float>(scaling_factor);
    const std::string error = core::validate_route_params(p);
    TORCH_CHECK_VALUE(error.empty(), error);
    return p;
}

}  // namespace epmoe
