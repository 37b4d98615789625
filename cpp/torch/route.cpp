// epmoe::route: schema and CPU impl (parallel over token ranges, each calling the torch-free core kernel).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "cpp/torch/route_common.h"

namespace epmoe {
namespace {

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& router_logits, int64_t top_k,
                                             c10::string_view scoring, int64_t num_groups, int64_t topk_groups,
                                             const std::optional<at::Tensor>& bias, bool renormalize,
                                             double scaling_factor) {
    const RouteParams p = make_route_params(router_logits, top_k, std::string(scoring), num_groups, topk_groups, bias,
                                            renormalize, scaling_factor);
    auto topk_weights = at::empty({p.num_tokens, p.num_topk}, router_logits.options().dtype(at::kFloat));
    auto topk_idx = at::empty({p.num_tokens, p.num_topk}, router_logits.options().dtype(at::kInt));
    const void* logits_ptr = router_logits.data_ptr();
    const float* bias_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    const DType dtype = to_dtype(router_logits, "router_logits");
    float* weights_ptr = topk_weights.data_ptr<float>();
    int32_t* idx_ptr = topk_idx.data_ptr<int32_t>();
    // ~E*8 flops per token: grain keeps each task above a few microseconds.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max(p.num_experts, 1));
    at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
        core::route_cpu(logits_ptr, dtype, bias_ptr, p, weights_ptr, idx_ptr, begin, end);
    });
    return {topk_weights, topk_idx};
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // Fused grouped top-K routing: returns (topk_weights float32 [T,k], topk_idx int32 [T,k]).
    m.def(
        "route(Tensor router_logits, int top_k, str scoring, int num_groups, int topk_groups, Tensor? bias, "
        "bool renormalize, float scaling_factor) -> (Tensor topk_weights, Tensor topk_idx)");
}

TORCH_LIBRARY_IMPL(epmoe, CPU, m) {
    m.impl("route", &epmoe::route_cpu);
}
