"""Typed Python entry points of the torch.ops.epmoe ops, with fake (meta) impls so torch.compile can trace them.

Validation lives in the C++ op (TORCH_CHECK with messages that name the Python argument), so calling
torch.ops.epmoe.* directly is as safe as calling these wrappers.
"""

from __future__ import annotations

import torch

from epmoe import _loader  # noqa: F401  (loads _C, which registers the ops)

__all__ = ["route"]


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    num_groups: int = 1,
    topk_groups: int = 1,
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused grouped top-K routing (DeepSeek-V2/V3, Qwen3-MoE, Mixtral gates).

    Arguments:
        router_logits: [num_tokens, num_experts] float32 / bfloat16 / float16, contiguous; scoring runs in fp32.
        top_k: experts per token, 1 <= top_k <= topk_groups * num_experts / num_groups.
        scoring: "softmax" (over all experts) or "sigmoid" (elementwise).
        num_groups: experts are split into this many contiguous groups (1 = no grouping).
        topk_groups: groups kept per token; a group's score is the sum of its two largest biased scores when
            `bias` is given, its largest score otherwise.
        bias: optional float32 [num_experts] correction bias, added to the scores for selection only.
        renormalize: divide the selected weights by their sum (+1e-20).
        scaling_factor: multiplies the weights after renormalization.

    Returns:
        topk_weights: float32 [num_tokens, top_k], gathered from the unbiased scores.
        topk_idx: int32 [num_tokens, top_k], in descending order of selection score; ties go to the lower index.
    """
    return torch.ops.epmoe.route(
        router_logits, top_k, scoring, num_groups, topk_groups, bias, renormalize, float(scaling_factor)
    )


@torch.library.register_fake("epmoe::route")
def _route_fake(router_logits, top_k, scoring, num_groups, topk_groups, bias, renormalize, scaling_factor):
    torch._check(router_logits.dim() == 2, lambda: "router_logits must be 2-D [num_tokens, num_experts]")
    num_tokens = router_logits.shape[0]
    topk_weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    topk_idx = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    return topk_weights, topk_idx
