"""Pure-torch references of epmoe's ops: the semantics oracle.

Every kernel (CPU and CUDA) is tested against the functions here. They are written for clarity and for
defined behaviour on ties and non-finite input, not for speed, and are never used as a silent fallback.
"""

from __future__ import annotations

import torch

__all__ = ["route_reference"]


def route_reference(
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
    """Grouped top-K routing (DESIGN.md §3), vectorised over tokens.

    Semantics, in fp32 whatever the input dtype:

    * ``s = softmax(logits)`` over all experts, or ``sigmoid(logits)``; ``sel = s + bias`` (bias only selects).
    * With ``num_groups > 1``: a group's score is the sum of its two largest ``sel`` when a bias is given (a
      repeated maximum counts twice), its largest ``sel`` otherwise; the ``topk_groups`` best groups are kept.
    * ``topk_idx`` are the ``top_k`` experts of the kept groups with the largest ``sel``, best first; experts of
      other groups are never picked. ``topk_weights = s[topk_idx]``, divided by their sum (+1e-20) when
      ``renormalize``, then multiplied by ``scaling_factor``.

    Total order, ties and non-finite input:

    * Experts are ranked by ``sel`` descending, and equal values by ascending expert index; groups likewise by
      score, then ascending group index. ``-0.0`` and ``0.0`` are equal.
    * A NaN ``sel`` (or NaN group score) ranks as ``-inf``. Rows with NaN or +-inf logits therefore still get
      ``top_k`` distinct ids: the best finite candidates, then the lowest-index ones among the ``-inf``-ranked.
      Their weights are whatever the fp32 arithmetic gives (softmax of a row holding NaN or +inf is all NaN).

    Arguments:
        router_logits: ``[num_tokens, num_experts]`` float32, bfloat16 or float16.
        top_k: experts per token, ``1 <= top_k <= topk_groups * num_experts / num_groups``.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        num_groups: number of contiguous expert groups (divides ``num_experts``).
        topk_groups: groups kept per token.
        bias: ``[num_experts]`` float32 selection bias, or None.
        renormalize: divide the weights by their sum.
        scaling_factor: multiplies the weights last.

    Returns:
        ``(topk_weights, topk_idx)``: float32 ``[num_tokens, top_k]`` and int32 ``[num_tokens, top_k]``.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [num_tokens, num_experts], got shape {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if num_groups < 1 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups must divide the number of experts ({num_experts}), got {num_groups}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, {num_groups}] (num_groups), got {topk_groups}")
    num_per_group = num_experts // num_groups
    if bias is not None and num_groups > 1 and num_per_group < 2:
        raise ValueError("bias with num_groups > 1 needs at least 2 experts per group")
    num_candidates = topk_groups * num_per_group
    if not 1 <= top_k <= num_candidates:
        raise ValueError(f"top_k must be in [1, {num_candidates}] (candidates), got {top_k}")

    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    sel = scores + bias.float() if bias is not None else scores
    sel = sel.masked_fill(sel.isnan(), float("-inf"))

    kept = torch.ones_like(sel, dtype=torch.bool)
    if num_groups > 1:
        grouped = sel.view(num_tokens, num_groups, num_per_group)
        if bias is not None:
            top2 = torch.sort(grouped, dim=-1, descending=True, stable=True).values
            group_scores = top2[..., 0] + top2[..., 1]
        else:
            group_scores = grouped.amax(dim=-1)
        group_scores = group_scores.masked_fill(group_scores.isnan(), float("-inf"))
        group_order = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        group_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_order, True)
        kept = group_kept.repeat_interleave(num_per_group, dim=1)

    # Rank by (kept desc, sel desc, index asc): two stable sorts, the secondary key first
    order = torch.sort(sel, dim=-1, descending=True, stable=True).indices
    kept_first = torch.sort(kept.gather(1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices
    topk_idx = order.gather(1, kept_first)[:, :top_k]

    topk_weights = scores.gather(1, topk_idx)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * scaling_factor
    return topk_weights, topk_idx.to(torch.int32)
