"""EPGroup dispatch/combine over gloo on real processes: round trips, SwiGLU experts vs a single-process reference
(forward and gradients), uneven and empty ranks, skewed routing, custom placement, async, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ep_harness import run_ranks

H, INTER = 16, 8


def swiglu_experts_reference(x, topk_idx, topk_weights, w13, w2):
    """out[t] = sum_j w[t,j] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_idx[t,j] (-1 skipped); fp32."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32)
    inter = w13.shape[1] // 2
    for e in range(w13.shape[0]):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w13[e].float().t()
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].float().t()
        out = out.index_add(0, tok, y * topk_weights[tok, slot].float().unsqueeze(1))
    return out.to(x.dtype)


def local_experts(recv_x, expert_offsets, w13, w2):
    """Runs each local expert on its rows of the expert-major recv_x."""
    outs = []
    inter = w13.shape[1] // 2
    offs = expert_offsets.tolist()
    for e in range(w13.shape[0]):
        rows = recv_x[offs[e] : offs[e + 1]].float()
        h = rows @ w13[e].float().t()
        outs.append((F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].float().t())
    return torch.cat(outs).to(recv_x.dtype) if outs else recv_x[:0]


def make_routing(gen, num_tokens, num_experts, top_k, skip_some=True):
    topk_idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    if num_tokens == 0:
        topk_idx = torch.empty(0, top_k, dtype=torch.long)
    if skip_some and num_tokens > 3:
        topk_idx[3, -1] = -1
    topk_weights = torch.rand(num_tokens, top_k, generator=gen)
    return topk_idx.to(torch.int32), topk_weights


def _scenario(rank, world, tokens_per_rank, num_experts, top_k, seed, expert_to_rank, skew):
    import epmoe

    gen = torch.Generator().manual_seed(seed)
    total = sum(tokens_per_rank)
    x_all = torch.randn(total, H, generator=gen)
    topk_idx_all, w_all = make_routing(gen, total, num_experts, top_k)
    if skew:
        topk_idx_all[:, 0] = 0  # every token hits expert 0
        topk_idx_all[:, 1:] = torch.where(topk_idx_all[:, 1:] == 0, 1, topk_idx_all[:, 1:])
    w13 = torch.randn(num_experts, 2 * INTER, H, generator=gen) * 0.3
    w2 = torch.randn(num_experts, H, INTER, generator=gen) * 0.3
    grad_y_all = torch.randn(total, H, generator=gen)
    begin = sum(tokens_per_rank[:rank])
    sl = slice(begin, begin + tokens_per_rank[rank])
    if expert_to_rank is None:
        local_ids = list(range(rank * num_experts // world, (rank + 1) * num_experts // world))
    else:
        local_ids = [e for e in range(num_experts) if expert_to_rank[e] == rank]
    map_t = None if expert_to_rank is None else torch.tensor(expert_to_rank)

    ep = epmoe.EPGroup()
    x = x_all[sl].clone().requires_grad_(True)
    topk_idx = topk_idx_all[sl]
    w = w_all[sl].clone().requires_grad_(True)

    # 1. identity experts: combine(dispatch(x)) == sum_j w x
    d = ep.dispatch(x, topk_idx, w, num_experts, expert_to_rank=map_t)
    assert d.recv_x.shape[0] == int(d.tokens_per_expert.sum()) == int(d.expert_offsets[-1])
    assert d.tokens_per_expert.dtype == torch.int64 and d.tokens_per_expert.shape == (len(local_ids),)
    expected_counts = [int((topk_idx_all == e).sum()) for e in local_ids]
    assert d.tokens_per_expert.tolist() == expected_counts
    y = ep.combine(d.recv_x, d.handle)
    ref = (x.detach() * (w.detach() * (topk_idx >= 0)).sum(1, keepdim=True)).float()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # provenance: every recv_x row equals x_all[source token]
    h = d.handle
    src_global = torch.tensor([sum(tokens_per_rank[:r]) for r in range(world)])[h.recv_src_rank[h.row_src]]
    src_global = src_global + h.recv_src_token[h.row_src]
    assert torch.equal(d.recv_x, x_all[src_global])
    # deduplication: rows sent == distinct (token, destination rank) pairs
    dest = [set() for _ in range(tokens_per_rank[rank])]
    for t in range(tokens_per_rank[rank]):
        for e in topk_idx[t].tolist():
            if e >= 0:
                dest[t].add(expert_to_rank[e] if expert_to_rank is not None else e // (num_experts // world))
    assert sum(h.num_send_per_rank) == sum(len(s) for s in dest)
    row_bytes = H * 4 + 4 * (1 + 2 * top_k)
    assert h.num_bytes_sent == sum(n for r, n in enumerate(h.num_send_per_rank) if r != rank) * row_bytes

    # 2. SwiGLU experts: forward and gradients vs the single-process computation over all experts
    w13_l = w13[local_ids].clone().requires_grad_(True)
    w2_l = w2[local_ids].clone().requires_grad_(True)
    d = ep.dispatch(x, topk_idx, w, num_experts, expert_to_rank=map_t)
    y = ep.combine(local_experts(d.recv_x, d.expert_offsets, w13_l, w2_l), d.handle)
    (y * grad_y_all[sl]).sum().backward()

    x_r = x_all.clone().requires_grad_(True)
    w_r = w_all.clone().requires_grad_(True)
    w13_r = w13.clone().requires_grad_(True)
    w2_r = w2.clone().requires_grad_(True)
    y_r = swiglu_experts_reference(x_r, topk_idx_all.long(), w_r, w13_r, w2_r)
    (y_r * grad_y_all).sum().backward()
    torch.testing.assert_close(y.detach(), y_r.detach()[sl], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_r.grad[sl], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, w_r.grad[sl], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w13_l.grad, w13_r.grad[local_ids], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w2_l.grad, w2_r.grad[local_ids], atol=1e-5, rtol=1e-4)

    # 3. async + determinism: the same inputs twice give bitwise equal outputs
    outs = []
    for _ in range(2):
        pending = ep.dispatch(x.detach(), topk_idx, w.detach(), num_experts, expert_to_rank=map_t, async_op=True)
        shared = x.detach() * 2  # work overlapped with the transfer
        d = pending.wait()
        expert_out = local_experts(d.recv_x, d.expert_offsets, w13[local_ids], w2[local_ids])
        out = ep.combine(expert_out, d.handle, async_op=True).wait()
        outs.append(out + shared)
    assert torch.equal(outs[0], outs[1])
    assert ep.bytes_sent >= h.num_bytes_sent
    ep.destroy()
    return True


@pytest.mark.parametrize(
    "world,tokens,num_experts,top_k,expert_to_rank,skew",
    [
        (2, [13, 0], 8, 3, None, False),  # uneven T, a rank with no tokens
        (2, [9, 11], 5, 2, [1, 0, 1, 1, 0], False),  # custom placement, E % R != 0
        (4, [7, 0, 12, 5], 8, 2, None, True),  # skewed: every token hits expert 0
    ],
)
def test_dispatch_combine_matches_single_process(world, tokens, num_experts, top_k, expert_to_rank, skew):
    results = run_ranks(_scenario, world, tokens, num_experts, top_k, 1234, expert_to_rank, skew)
    assert all(results.values())


def _bf16_unaligned(rank, world, mode):
    """bf16 with an odd hidden size (wire rows not 4-byte aligned), exact and capacity (padded) modes."""
    import epmoe

    hidden, num_experts, top_k, num_tokens = 7, 6, 3, 11

    def inputs(r):
        gen = torch.Generator().manual_seed(99 + r)
        x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
        return (x, *make_routing(gen, num_tokens, num_experts, top_k))

    x, topk_idx, w = inputs(rank)
    sources = [inputs(r) for r in range(world)]
    ep = epmoe.EPGroup()
    capacity = num_tokens + 2 if mode == "capacity" else None
    outs = []
    for _ in range(2):
        d = ep.dispatch(x, topk_idx, w, num_experts, mode=mode, capacity=capacity)
        h = d.handle
        assert h.row_src.dtype == torch.int32 and h.recv_src_token.dtype == torch.int32
        # provenance of every row and weight, from the source rank's inputs (rebuilt from its seed)
        src_rank, src_token = h.recv_src_rank[h.row_src].tolist(), h.recv_src_token[h.row_src].tolist()
        for m, (r, t, j) in enumerate(zip(src_rank, src_token, h.row_slot.tolist(), strict=True)):
            assert torch.equal(d.recv_x[m], sources[r][0][t]) and d.recv_topk_weights[m] == sources[r][2][t, j]
        y = ep.combine(d.recv_x, d.handle)
        assert y.dtype == torch.bfloat16
        ref = (x.float() * (w * (topk_idx >= 0)).sum(1, keepdim=True)).to(torch.bfloat16)
        torch.testing.assert_close(y, ref, atol=3e-2, rtol=3e-2)
        outs.append(y)
    assert torch.equal(outs[0], outs[1])
    ep.destroy()
    return True


@pytest.mark.parametrize("mode", ["exact", "capacity"])
def test_bf16_odd_hidden_round_trip(mode):
    assert all(run_ranks(_bf16_unaligned, 2, mode).values())
