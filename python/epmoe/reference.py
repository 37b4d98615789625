"""Pure-torch references of epmoe's ops: the semantics oracle.

Every kernel (CPU and CUDA) is tested against the functions here. They are written for clarity and for
defined behaviour on ties and non-finite input, not for speed, and are never used as a silent fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "balance_quotas_reference",
    "balance_replicas_reference",
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


# --- EPLB "balanced" replica policy ------------------------------------------------------------------------


def balance_quotas_reference(counts: list[int], log2phy: list[list[int]], logcnt: list[int], num_slots: int,
                             num_ranks: int) -> tuple[list[list[int]], int]:
    """Per-replica quotas of one layer and the largest rank load: the algorithm of `cpp/core/replica_balance.h`
    step by step in plain Python, so that its result (one optimum among many) is reproduced exactly.

    Experts whose replicas sit on one rank are fixed (even split over their replicas, the first ones take the
    remainder). The rest is a max flow source -> expert (c_e) -> holder ranks -> sink (M - base load), with M
    starting at a lower bound and raised to ceil(cut demand / cut ranks) while the flow falls short (Newton on the
    cut); it is warm-started by sending each expert's pairs straight to its holders (an even part each, then what
    fits) and augmented with Dinic (edges tried newest first, paths retreating to the first saturated edge).
    """
    per_rank = num_slots // num_ranks
    rank_of = [p // per_rank for p in range(num_slots)]
    quota = [[0] * len(row) for row in log2phy]
    base = [0] * num_ranks
    flexible = []
    for e, c in enumerate(counts):
        n, slots = logcnt[e], log2phy[e]
        if c > 0 and rank_of[slots[n - 1]] != rank_of[slots[0]]:
            flexible.append(e)
            continue
        for i in range(n):
            quota[e][i] = c // n + (1 if i < c % n else 0)
        base[rank_of[slots[0]]] += c
    if not flexible:
        return quota, max(base)
    bound = max(-(-sum(counts) // num_ranks), max(base))
    for e in flexible:
        ranks = sorted({rank_of[p] for p in log2phy[e][:logcnt[e]]})
        bound = max(bound, -(-(counts[e] + sum(base[r] for r in ranks)) // len(ranks)))
    # Graph: node 0 source, 1 sink, 2 + r ranks, 2 + R + k the k-th flexible expert; edges in (edge, reverse) pairs.
    head = [-1] * (2 + num_ranks + len(flexible))
    to, cap, nxt = [], [], []

    def add_edge(u: int, v: int, c: int) -> int:
        for a, b, cc in ((u, v, c), (v, u, 0)):
            to.append(b)
            cap.append(cc)
            nxt.append(head[a])
            head[a] = len(to) - 1
        return len(to) - 2

    unbounded = 1 << 62
    rank_edge = [add_edge(2 + r, 1, bound - base[r]) for r in range(num_ranks)]
    replica_edge = {}
    flow = 0
    for k, e in enumerate(flexible):
        n, slots = logcnt[e], log2phy[e]
        source_edge = add_edge(0, 2 + num_ranks + k, counts[e])
        for i in range(n):
            replica_edge[e, i] = add_edge(2 + num_ranks + k, 2 + rank_of[slots[i]], unbounded)
        left = counts[e]
        for part in (-(-left // n), None):
            part = left if part is None else part
            for i in range(n):
                if left == 0:
                    break
                re = rank_edge[rank_of[slots[i]]]
                push = min(part, left, cap[re])
                if push > 0:
                    cap[replica_edge[e, i]] -= push
                    cap[replica_edge[e, i] ^ 1] += push
                    cap[re] -= push
                    cap[re ^ 1] += push
                    left -= push
            if left == 0:
                break
        cap[source_edge], cap[source_edge ^ 1] = left, counts[e] - left
        flow += counts[e] - left
    need_total = sum(counts[e] for e in flexible)
    num_nodes = len(head)

    def bfs() -> list[int]:
        level = [-1] * num_nodes
        level[0] = 0
        queue = [0]
        for v in queue:
            if level[1] >= 0 and level[v] >= level[1]:
                break
            e = head[v]
            while e >= 0:
                if cap[e] > 0 and level[to[e]] < 0:
                    level[to[e]] = level[v] + 1
                    queue.append(to[e])
                e = nxt[e]
        return level

    def blocking_flow(level: list[int]) -> int:
        arc, path, v, total = list(head), [], 0, 0
        while True:
            if v == 1:
                push = min(cap[e] for e in path)
                keep = len(path)
                for i, e in enumerate(path):
                    cap[e] -= push
                    cap[e ^ 1] += push
                    if cap[e] == 0 and keep == len(path):
                        keep = i
                total += push
                del path[keep:]
                v = to[path[-1]] if path else 0
                continue
            e = arc[v]
            while e >= 0 and not (cap[e] > 0 and level[to[e]] == level[v] + 1):
                e = nxt[e]
            arc[v] = e
            if e >= 0:
                path.append(e)
                v = to[e]
                continue
            if not path:
                return total
            level[v] = -1
            back = path.pop()
            v = to[back ^ 1]
            arc[v] = nxt[arc[v]]

    while True:
        level = None
        while flow < need_total:
            level = bfs()
            if level[1] < 0:
                break
            flow += blocking_flow(level)
        if flow == need_total:
            break
        reached = [r for r in range(num_ranks) if level[2 + r] >= 0]
        need = sum(base[r] for r in reached) + sum(
            counts[e] for k, e in enumerate(flexible) if level[2 + num_ranks + k] >= 0)
        nxt_bound = max(-(-need // len(reached)) if reached else bound + 1, bound + 1)
        for r in range(num_ranks):
            cap[rank_edge[r]] += nxt_bound - bound
        bound = nxt_bound
    for (e, i), edge in replica_edge.items():
        quota[e][i] = cap[edge ^ 1]
    return quota, max(bound - cap[rank_edge[r]] for r in range(num_ranks))


def balance_replicas_reference(topk_idx: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                               counts: torch.Tensor | None, prefix: torch.Tensor | None, num_slots: int,
                               num_ranks: int) -> torch.Tensor:
    """Same output as `torch.ops.epmoe.balance_replicas`: the g-th pair of expert e over the group (g = prefix[e] +
    its rank among this batch's pairs of e in flat order t * k + j) takes the replica i whose quota range
    [sum(quota[:i]), sum(quota[:i + 1])) holds g (the last replica when g is beyond counts[e]); -1 stays -1.

    Arguments: topk_idx int32/int64 [T, k]; log2phy int64 [E, M]; logcnt int64 [E]; counts int64 [E] of the group
    (None: this batch's); prefix int64 [E] of the lower ranks (None: 0).
    """
    num_experts = log2phy.shape[0]
    flat = topk_idx.reshape(-1).tolist()
    local = [0] * num_experts
    for e in flat:
        if e >= 0:
            local[e] += 1
    total = local if counts is None else counts.tolist()
    seen = [0] * num_experts if prefix is None else prefix.tolist()
    rows, cnt = log2phy.tolist(), logcnt.tolist()
    quota, _ = balance_quotas_reference(total, rows, cnt, num_slots, num_ranks)
    out = []
    for e in flat:
        if e < 0:
            out.append(-1)
            continue
        g, i, end = seen[e], 0, quota[e][0]
        seen[e] += 1
        while i < cnt[e] - 1 and g >= end:
            i += 1
            end += quota[e][i]
        out.append(rows[e][i])
    return torch.tensor(out, dtype=topk_idx.dtype).reshape(topk_idx.shape)
