// Fused grouped top-K routing, CPU implementation (torch-free). Semantics: DESIGN.md §3.
#pragma once

#include <cstdint>
#include <string>

#include "cpp/core/types.h"

namespace epmoe::core {

// Returns "" when the parameters are valid, else a message naming the offending argument
// (e.g. "top_k must be in [1, 12] (candidates), got 13"). Used by both the CPU and CUDA paths.
std::string validate_route_params(const RouteParams& p);

// Routes tokens [token_begin, token_end).
//   logits          [num_tokens, num_experts] row-major, element type `dtype`
//   bias            [num_experts] float32, or nullptr when !p.has_bias
//   topk_weights    [num_tokens, num_topk] float32 (out)
//   topk_idx        [num_tokens, num_topk] int32 (out)
// Callers parallelise over token ranges; a range is processed with no shared state.
void route_cpu(const void* logits, DType dtype, const float* bias, const RouteParams& p, float* topk_weights,
               int32_t* topk_idx, int64_t token_begin, int64_t token_end);

}  // namespace epmoe::core
