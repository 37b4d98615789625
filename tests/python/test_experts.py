"""Grouped SwiGLU ops and epmoe.experts_forward / grouped_swiglu_experts (values, gradients, compile, errors)."""

import epmoe
import pytest
import torch
import torch.nn.functional as F
from epmoe.experts import grouped_gemm, grouped_gemm_wgrad, grouped_swiglu, moe_layout, moe_permute, swiglu_backward
from epmoe.reference import experts_forward_reference

TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
}


def make_problem(num_tokens, num_topk, num_experts, hidden, inter, dtype, seed=0, skip_frac=0.1, hot=None):
    """Random routing (distinct ids per token, some -1); with `hot`, every token's first slot goes to expert `hot`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, num_experts, generator=gen).topk(num_topk, dim=-1).indices.to(torch.int32)
    if hot is not None:
        ids = torch.where(ids == hot, ids[:, :1], ids)
        ids[:, 0] = hot
    ids = torch.where(torch.rand(ids.shape, generator=gen) < skip_frac, torch.full_like(ids, -1), ids)
    weights = torch.rand(num_tokens, num_topk, generator=gen)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5).to(dtype)
    return x, ids, weights, w13, w2


def segments(num_rows, counts):
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    assert int(off[-1]) <= num_rows
    return off


# ---- the grouped ops against per-segment torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_ops_match_per_segment_torch(dtype):
    gen = torch.Generator().manual_seed(1)
    counts = [5, 0, 300, 1, 0, 17]  # empty experts, a segment over the row tile, single rows
    num_rows, hidden, inter = sum(counts) + 7, 32, 24  # 7 padding rows
    off = segments(num_rows, counts)
    x = torch.randn(num_rows, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(len(counts), 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(len(counts), hidden, inter, generator=gen) * 0.2).to(dtype)
    gu = grouped_gemm(x, off, w13, True)
    h = grouped_swiglu(x, off, w13)
    y = grouped_gemm(h, off, w2, True)
    dx = grouped_gemm(gu, off, w13, False)
    dw = grouped_gemm_wgrad(y, x, off)
    grad_h = torch.randn(num_rows, inter, generator=gen).to(dtype)
    dgu = swiglu_backward(grad_h, gu)
    tol = TOL[dtype]
    for e in range(len(counts)):
        lo, hi = int(off[e]), int(off[e + 1])
        xe = x[lo:hi].float()
        gu_ref = xe @ w13[e].float().t()
        torch.testing.assert_close(gu[lo:hi].float(), gu_ref, **tol)
        g, u = gu[lo:hi].float().chunk(2, dim=-1)
        torch.testing.assert_close(h[lo:hi].float(), F.silu(g) * u, **tol)
        torch.testing.assert_close(y[lo:hi].float(), h[lo:hi].float() @ w2[e].float().t(), **tol)
        torch.testing.assert_close(dx[lo:hi].float(), gu[lo:hi].float() @ w13[e].float(), **tol)
        torch.testing.assert_close(dw[e].float(), y[lo:hi].float().t() @ xe, **tol)
    gate, up = gu.float().chunk(2, dim=-1)
    gate.requires_grad_()
    up.requires_grad_()
    (F.silu(gate) * up).backward(grad_h.float())
    torch.testing.assert_close(dgu.float(), torch.cat([gate.grad, up.grad], -1), **tol)
    used = int(off[-1])
    for out in (gu, h, y, dx):
        assert bool((out[used:] == 0).all()), "padding rows must be zero"
    assert bool((dw[1] == 0).all()) and bool((dw[4] == 0).all()), "empty experts' weight gradient must be zero"


def test_grouped_ops_bad_input():
    x, off = torch.randn(10, 16), segments(10, [4, 6])
    w13 = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="w13 must have shape"):
        grouped_swiglu(x, off, torch.randn(2, 8, 12))
    with pytest.raises(ValueError, match="expert_offsets must have shape"):
        grouped_swiglu(x, segments(10, [4, 3, 3]), w13)
    with pytest.raises(TypeError, match="w13 must have the dtype of x"):
        grouped_swiglu(x, off, w13.bfloat16())
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_swiglu(x, torch.tensor([0, 6, 4]), w13)
    with pytest.raises(ValueError, match="expert_offsets\\[-1\\]"):
        grouped_swiglu(x, torch.tensor([0, 6, 11]), w13)
    with pytest.raises(TypeError, match="expert_offsets must be int64, got int32"):
        grouped_swiglu(x, off.int(), w13)
    with pytest.raises(ValueError, match="x must be contiguous"):
        grouped_swiglu(torch.randn(16, 10).t(), off, w13)
    with pytest.raises(ValueError, match="w must have shape"):
        grouped_gemm(x, off, torch.randn(2, 8, 15), True)
    with pytest.raises(ValueError, match="grad_out must have 10 rows"):
        grouped_gemm_wgrad(torch.randn(9, 4), x, off)
    with pytest.raises(ValueError, match="gu must have shape"):
        swiglu_backward(torch.randn(10, 4), torch.randn(10, 6))


def test_opcheck_grouped_ops():
    gen = torch.Generator().manual_seed(4)
    off = segments(12, [3, 0, 7])
    x = torch.randn(12, 8, generator=gen)
    w13 = torch.randn(3, 10, 8, generator=gen)
    w2 = torch.randn(3, 8, 5, generator=gen)
    ops = torch.ops.epmoe
    torch.library.opcheck(ops.grouped_swiglu, (x, off, w13))
    torch.library.opcheck(ops.grouped_gemm, (x, off, w13, True))
    torch.library.opcheck(ops.grouped_gemm, (torch.randn(12, 10, generator=gen), off, w13, False))
    torch.library.opcheck(ops.grouped_gemm_wgrad, (torch.randn(12, 5, generator=gen), x, off))
    torch.library.opcheck(ops.swiglu_backward, (torch.randn(12, 5, generator=gen), torch.randn(12, 10, generator=gen)))
    torch.library.opcheck(ops.grouped_swiglu, (x.bfloat16(), off, w2.new_zeros(3, 10, 8).bfloat16()))


# ---- experts_forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,num_topk,num_experts", [(0, 2, 4), (1, 1, 1), (45, 3, 7), (128, 6, 16)])
def test_experts_forward_matches_reference(dtype, num_tokens, num_topk, num_experts):
    x, ids, weights, w13, w2 = make_problem(num_tokens, num_topk, num_experts, 32, 16, dtype, seed=num_tokens)
    out = epmoe.experts_forward(x, ids, weights, w13, w2)
    assert out.dtype == dtype and out.shape == x.shape
    ref = experts_forward_reference(x, ids, weights, w13, w2)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_forward_gradients_match_reference(dtype):
    x, ids, weights, w13, w2 = make_problem(60, 4, 6, 32, 16, dtype, seed=7)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    out = epmoe.experts_forward(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().float().requires_grad_() for t in (x, weights, w13, w2)]
    ref = experts_forward_reference(ref_leaves[0], ids, ref_leaves[1], ref_leaves[2], ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.float())
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 6e-2}
    for name, g, r in zip(("x", "topk_weights", "w13", "w2"), grads, ref_grads, strict=True):
        assert g.dtype == (torch.float32 if name == "topk_weights" else dtype), name
        torch.testing.assert_close(g.float(), r, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_experts_forward_finite_differences():
    """Finite differences in fp32 on a tiny problem (the ops have no fp64 path): loose but independent check."""
    x, ids, weights, w13, w2 = make_problem(6, 2, 3, 8, 4, torch.float32, seed=3, skip_frac=0.2)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: epmoe.experts_forward(a, ids, b, c, d), leaves, eps=1e-2, atol=2e-2, rtol=2e-2
    )


def test_experts_forward_expert_map_matches_masked_reference():
    num_global = 10
    x, ids, weights, _, _ = make_problem(50, 4, num_global, 32, 16, torch.float32, seed=11)
    local = [2, 5, 9]
    gen = torch.Generator().manual_seed(12)
    w13 = torch.randn(len(local), 32, 32, generator=gen) * 0.2
    w2 = torch.randn(len(local), 32, 16, generator=gen) * 0.2
    expert_map = torch.full((num_global,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(len(local), dtype=torch.int32)
    out = epmoe.experts_forward(x, ids, weights, w13, w2, expert_map=expert_map)
    local_ids = torch.where(ids >= 0, expert_map[ids.long().clamp(min=0)], torch.full_like(ids, -1))
    torch.testing.assert_close(out, experts_forward_reference(x, local_ids, weights, w13, w2), **TOL[torch.float32])


def test_experts_forward_no_grad_and_int64_ids():
    x, ids, weights, w13, w2 = make_problem(20, 2, 5, 16, 8, torch.float32, seed=2)
    w13.requires_grad_()
    with torch.no_grad():
        out = epmoe.experts_forward(x, ids.long(), weights, w13, w2)
    assert not out.requires_grad
    torch.testing.assert_close(out, experts_forward_reference(x, ids, weights, w13, w2), **TOL[torch.float32])


def test_experts_forward_deterministic():
    x, ids, weights, w13, w2 = make_problem(300, 6, 16, 64, 32, torch.bfloat16, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    runs = []
    for _ in range(3):
        out = epmoe.experts_forward(leaves[0], ids, leaves[1], leaves[2], leaves[3])
        runs.append([out.detach()] + list(torch.autograd.grad(out.float().square().sum(), leaves)))
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again, strict=True))


def test_grouped_swiglu_experts_on_permuted_rows():
    x, ids, weights, w13, w2 = make_problem(30, 3, 4, 16, 8, torch.float32, seed=6)
    _, off, _, row_to_slot = moe_layout(ids, 4)
    rows = moe_permute(x, row_to_slot, 3).requires_grad_()
    with pytest.raises(ValueError, match="expert_offsets\\[-1\\] must equal the number of rows"):
        epmoe.grouped_swiglu_experts(rows, off, w13, w2)  # the T*k capacity leaves padding rows
    y = epmoe.grouped_swiglu_experts(rows, off, w13, w2, allow_padding=True)
    used = int(off[-1])
    assert bool((y[used:] == 0).all())
    for e in range(4):
        lo, hi = int(off[e]), int(off[e + 1])
        g, u = (rows[lo:hi] @ w13[e].t()).chunk(2, -1)
        torch.testing.assert_close(y[lo:hi], (F.silu(g) * u) @ w2[e].t(), **TOL[torch.float32])
    y.sum().backward()
    assert rows.grad is not None and bool((rows.grad[used:] == 0).all())


def test_experts_forward_torch_compile():
    x, ids, weights, w13, w2 = make_problem(24, 2, 4, 16, 8, torch.float32, seed=13)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    compiled = torch.compile(epmoe.experts_forward, backend="aot_eager", fullgraph=True)
    out = compiled(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    ref = epmoe.experts_forward(*[t.detach() for t in (x,)], ids, weights, w13, w2)
    torch.testing.assert_close(out.detach(), ref, atol=0, rtol=0)
    grads = torch.autograd.grad(out.sum(), leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    eager_out = epmoe.experts_forward(eager_leaves[0], ids, eager_leaves[1], eager_leaves[2], eager_leaves[3])
    for g, r in zip(grads, torch.autograd.grad(eager_out.sum(), eager_leaves), strict=True):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_experts_forward_bad_input():
    x, ids, weights, w13, w2 = make_problem(8, 2, 4, 16, 8, torch.float32, seed=1, skip_frac=0.0)
    with pytest.raises(ValueError, match="topk_idx"):
        epmoe.experts_forward(x, ids + 4, weights, w13, w2)  # ids >= E
    with pytest.raises(ValueError, match="same T"):
        epmoe.experts_forward(x, ids[:5], weights[:5], w13, w2)
    with pytest.raises(ValueError, match="topk_weights must have the shape"):
        epmoe.experts_forward(x, ids, weights[:, :1], w13, w2)
    with pytest.raises(TypeError, match="w13 must have the dtype of x"):
        epmoe.experts_forward(x, ids, weights, w13.bfloat16(), w2)
    with pytest.raises(TypeError, match="w2 must have the dtype"):
        epmoe.experts_forward(x, ids, weights, w13, w2.bfloat16())
    with pytest.raises(ValueError, match="w13 must have shape"):
        epmoe.experts_forward(x, ids, weights, w13[:, :, :15].contiguous(), w2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        epmoe.experts_forward(x, ids, weights, w13, w2[:, :, :7].contiguous())
    # Non-contiguous inputs are accepted (made contiguous once), with the same result.
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    expected = epmoe.experts_forward(x, ids, weights, w13, w2)
    assert torch.equal(epmoe.experts_forward(xt, ids, weights, w13, w2), expected)
    with pytest.raises(TypeError, match="topk_idx must be int32 or int64"):
        epmoe.experts_forward(x, ids.to(torch.int16), weights, w13, w2)
    with pytest.raises(ValueError, match="must be on"):
        epmoe.experts_forward(x, ids, weights, w13.to("meta"), w2)
