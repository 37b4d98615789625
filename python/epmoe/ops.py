"""Typed Python entry points of the torch.ops.epmoe ops, with fake (meta) impls so torch.compile can trace them.

The wrappers validate their arguments (`epmoe._validate`: TypeError / ValueError naming the argument) and make
non-contiguous inputs contiguous; the C++ ops keep their own TORCH_CHECKs, so calling torch.ops.epmoe.* directly
is safe too (it only requires contiguous inputs).
"""

from __future__ import annotations

import torch

from epmoe import _loader  # noqa: F401  (loads _C, which registers the ops)
from epmoe import _validate as v

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
        router_logits: [num_tokens, num_experts] float32 / bfloat16 / float16 (any strides); scoring runs in fp32.
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
    v.check_tensor("router_logits", router_logits, dtypes=v.FLOAT_DTYPES, dim=2, layout="[num_tokens, num_experts]")
    top_k = v.check_int("top_k", top_k, minimum=1)
    v.check_choice("scoring", scoring, ("softmax", "sigmoid"))
    num_groups = v.check_int("num_groups", num_groups, minimum=1)
    topk_groups = v.check_int("topk_groups", topk_groups, minimum=1)
    if bias is not None:
        v.check_tensor("bias", bias, dtypes=(torch.float32,), shape=(router_logits.shape[1],), layout="(num_experts)",
                       device=router_logits.device, like="router_logits")
        bias = bias.contiguous()
    renormalize = v.check_bool("renormalize", renormalize)
    scaling_factor = v.check_float("scaling_factor", scaling_factor)
    return torch.ops.epmoe.route(
        router_logits.contiguous(), top_k, scoring, num_groups, topk_groups, bias, renormalize, scaling_factor
    )


@torch.library.register_fake("epmoe::route")
def _route_fake(router_logits, top_k, scoring, num_groups, topk_groups, bias, renormalize, scaling_factor):
    torch._check(router_logits.dim() == 2, lambda: "router_logits must be 2-D [num_tokens, num_experts]")
    num_tokens = router_logits.shape[0]
    topk_weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    topk_idx = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    return topk_weights, topk_idx


def _route_setup_context(ctx, inputs, output):
    router_logits, _top_k, scoring, _num_groups, _topk_groups, _bias, renormalize, scaling_factor = inputs
    _topk_weights, topk_idx = output
    ctx.save_for_backward(router_logits, topk_idx)
    ctx.scoring, ctx.renormalize, ctx.scaling_factor = scoring, renormalize, scaling_factor


def _route_backward(ctx, grad_weights, _grad_idx):
    """Gradient of the routing weights wrt the logits (the bias and the selection are not differentiable).

    With s the scores of the selected experts, S = sum(s) + 1e-20 and c = scaling_factor: w = c*s/S when
    renormalizing (dL/ds_j = c/S * (g_j - sum_i g_i s_i / S)), else w = c*s (dL/ds_j = c*g_j); then through the
    sigmoid (s(1-s)) or the softmax over all experts.
    """
    router_logits, topk_idx = ctx.saved_tensors
    if grad_weights is None:
        return (None,) * 8
    logits = router_logits.float()
    scores = torch.sigmoid(logits) if ctx.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    idx = topk_idx.long()
    selected = scores.gather(1, idx)
    grad_weights = grad_weights.float()
    if ctx.renormalize:
        denom = selected.sum(dim=-1, keepdim=True) + 1e-20
        grad_selected = ctx.scaling_factor / denom * (grad_weights - (grad_weights * selected).sum(-1, True) / denom)
    else:
        grad_selected = ctx.scaling_factor * grad_weights
    grad_scores = torch.zeros_like(scores).scatter_(1, idx, grad_selected)
    if ctx.scoring == "sigmoid":
        grad_logits = grad_scores * scores * (1.0 - scores)
    else:
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    return grad_logits.to(router_logits.dtype), None, None, None, None, None, None, None


torch.library.register_autograd("epmoe::route", _route_backward, setup_context=_route_setup_context)


@torch.library.register_fake("epmoe::count_slots")
def _count_slots_fake(counts, slot_idx):
    return None
