"""Pure-torch references of epmoe's ops: the semantics oracle.

Every kernel (CPU and CUDA) is tested against the functions here. They are written for clarity and for
defined behaviour on ties and non-finite input, not for speed, and are never used as a silent fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "experts_forward_reference",
    "moe_layout_reference",
    "moe_permute_reference",
    "moe_unpermute_reference",
    "route_reference",
]


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
    """Grouped top-K routing (docs/semantics.md), vectorised over tokens.

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


# --- expert path: layout, permute, unpermute, grouped SwiGLU experts ---------------------------------------


def moe_layout_reference(
    topk_idx: torch.Tensor, num_experts: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same outputs as `epmoe.experts.moe_layout` (expert-major rows, ascending flat slot inside an expert),
    from a stable sort of the flat slots by local expert."""
    num_tokens, num_topk = topk_idx.shape
    num_slots = num_tokens * num_topk
    ids = topk_idx.reshape(-1).long()
    if expert_map is not None:
        local = torch.where(ids >= 0, expert_map.long()[ids.clamp(min=0)], torch.full_like(ids, -1))
    else:
        local = ids
    skipped = local < 0
    key = torch.where(skipped, torch.full_like(local, num_experts), local)  # skipped slots sort last
    order = torch.sort(key, stable=True).indices
    tokens_per_expert = torch.bincount(local[~skipped], minlength=num_experts)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    expert_offsets[1:] = torch.cumsum(tokens_per_expert, 0)
    num_used = int(expert_offsets[-1])
    row_to_slot = torch.full((num_slots,), -1, dtype=torch.int32)
    row_to_slot[:num_used] = order[:num_used].to(torch.int32)
    slot_to_row = torch.full((num_slots,), -1, dtype=torch.int32)
    slot_to_row[order[:num_used]] = torch.arange(num_used, dtype=torch.int32)
    return tokens_per_expert, expert_offsets, slot_to_row.view(num_tokens, num_topk), row_to_slot


def moe_permute_reference(x: torch.Tensor, row_to_slot: torch.Tensor, num_topk: int) -> torch.Tensor:
    """rows[r] = x[row_to_slot[r] // num_topk], zero for padding rows (row_to_slot == -1)."""
    valid = row_to_slot >= 0
    rows = x[(row_to_slot.long().clamp(min=0) // num_topk)]
    return rows * valid.unsqueeze(-1).to(x.dtype)


def moe_unpermute_reference(rows: torch.Tensor, slot_to_row: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * rows[slot_to_row[t, j]] in fp32, ascending j, skipping slot_to_row == -1."""
    num_tokens, num_topk = slot_to_row.shape
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float32)
    for j in range(num_topk):  # fixed order over the k slots (k is small), vectorised over tokens
        r = slot_to_row[:, j].long()
        contrib = topk_weights[:, j, None] * rows[r.clamp(min=0)].float()
        out = out + torch.where((r >= 0).unsqueeze(-1), contrib, torch.zeros_like(contrib))
    return out.to(rows.dtype)


def experts_forward_reference(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF experts semantics in fp32: sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), result in x.dtype.
    Differentiable (plain torch ops), so it also gives reference gradients."""
    num_experts = w13.shape[0]
    _, expert_offsets, slot_to_row, row_to_slot = moe_layout_reference(topk_idx, num_experts, expert_map)
    num_topk = topk_idx.shape[1]
    xf, w13f, w2f = x.float(), w13.float(), w2.float()
    row_token = row_to_slot.long().clamp(min=0) // num_topk
    ys = []
    for e in range(num_experts):  # a loop over experts, not tokens: each is one batched GEMM pair
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        xe = xf[row_token[lo:hi]]
        gate, up = F.linear(xe, w13f[e]).chunk(2, dim=-1)
        ys.append(F.linear(F.silu(gate) * up, w2f[e]))
    num_used = int(expert_offsets[-1])
    y = torch.cat(ys + [xf.new_zeros(slot_to_row.numel() - num_used, x.shape[1])])
    out = xf.new_zeros(x.shape)
    w = topk_weights.float()
    for j in range(num_topk):
        r = slot_to_row[:, j].long()
        keep = (r >= 0).unsqueeze(-1)
        out = out + torch.where(keep, w[:, j, None] * y[r.clamp(min=0)], torch.zeros_like(out))
    return out.to(x.dtype)
