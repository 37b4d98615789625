"""Pure-torch references of the expert path (layout, permute, unpermute, grouped SwiGLU experts). Vectorised,
no custom ops; the tests compare the ops against them. Never used as a fallback."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["moe_layout_reference", "moe_permute_reference", "moe_unpermute_reference", "experts_forward_reference"]


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
