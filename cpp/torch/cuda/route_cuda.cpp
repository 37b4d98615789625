// epmoe::route CUDA impl: validates, then calls the torch-free launcher on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cpp/torch/route_common.h"
#include "cuda/route.cuh"

namespace epmoe {
namespace {

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& router_logits, int64_t top_k,
                                              c10::string_view scoring, int64_t num_groups, int64_t topk_groups,
                                              const std::optional<at::Tensor>& bias, bool renormalize,
                                              double scaling_factor) {
    const RouteParams p = make_route_params(router_logits, top_k, std::string(scoring), num_groups, topk_groups, bias,
                                            renormalize, scaling_factor);
    const c10::cuda::CUDAGuard guard(router_logits.device());
    auto topk_weights = at::empty({p.num_tokens, p.num_topk}, router_logits.options().dtype(at::kFloat));
    auto topk_idx = at::empty({p.num_tokens, p.num_topk}, router_logits.options().dtype(at::kInt));
    if (p.num_tokens > 0) {
        cuda::launch_route(router_logits.data_ptr(), to_dtype(router_logits, "router_logits"),
                           bias.has_value() ? bias->data_ptr<float>() : nullptr, p, topk_weights.data_ptr<float>(),
                           topk_idx.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
    }
    return {topk_weights, topk_idx};
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_IMPL(epmoe, CUDA, m) {
    m.impl("route", &epmoe::route_cuda);
}
