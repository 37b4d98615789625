"""moe_layout / moe_permute / moe_unpermute(+backward) against the pure-torch reference (bitwise for integers)."""

import pytest
import torch
from epmoe.experts import moe_layout, moe_permute, moe_unpermute, moe_unpermute_backward
from epmoe.reference import moe_layout_reference, moe_permute_reference, moe_unpermute_reference


def random_ids(num_tokens, num_topk, num_experts, gen, skip_frac=0.0, distinct=True):
    if distinct and num_topk <= num_experts:
        ids = torch.rand(num_tokens, num_experts, generator=gen).topk(num_topk, dim=-1).indices
    else:
        ids = torch.randint(0, num_experts, (num_tokens, num_topk), generator=gen)
    if skip_frac > 0:
        ids = torch.where(torch.rand(ids.shape, generator=gen) < skip_frac, torch.full_like(ids, -1), ids)
    return ids.to(torch.int32)


def assert_layout_equal(ids, num_experts, expert_map=None):
    got = moe_layout(ids, num_experts, expert_map)
    want = moe_layout_reference(ids, num_experts, expert_map)
    names = ("tokens_per_expert", "expert_offsets", "slot_to_row", "row_to_slot")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, name
        assert torch.equal(g, w), name
    return got


@pytest.mark.parametrize(
    "num_tokens,num_topk,num_experts,skip_frac",
    [
        (0, 2, 4, 0.0),
        (1, 1, 1, 0.0),
        (5, 1, 3, 0.0),
        (64, 2, 7, 0.0),
        (37, 6, 64, 0.2),
        (300, 8, 257, 0.1),
        (40000, 2, 6, 0.05),
    ],  # the last one spans several layout chunks
)
def test_layout_matches_reference(num_tokens, num_topk, num_experts, skip_frac):
    gen = torch.Generator().manual_seed(num_tokens * 31 + num_experts)
    ids = random_ids(num_tokens, num_topk, num_experts, gen, skip_frac)
    tokens_per_expert, expert_offsets, slot_to_row, row_to_slot = assert_layout_equal(ids, num_experts)
    assert row_to_slot.shape == (num_tokens * num_topk,)
    assert int(tokens_per_expert.sum()) == int((ids >= 0).sum()) == int(expert_offsets[-1])


def test_layout_edge_routings():
    gen = torch.Generator().manual_seed(1)
    all_one = torch.full((50, 3), 2, dtype=torch.int32)  # duplicates within a token, one expert gets everything
    tpe, off, s2r, r2s = assert_layout_equal(all_one, 5)
    assert tpe.tolist() == [0, 0, 150, 0, 0]
    assert torch.equal(r2s, torch.arange(150, dtype=torch.int32))  # ascending flat slot inside the expert
    all_skipped = torch.full((9, 2), -1, dtype=torch.int32)
    tpe, off, s2r, r2s = assert_layout_equal(all_skipped, 3)
    assert int(off[-1]) == 0 and bool((s2r == -1).all()) and bool((r2s == -1).all())
    assert_layout_equal(random_ids(100, 4, 10, gen, distinct=False), 10)  # experts with no tokens, repeats


def test_layout_expert_map():
    gen = torch.Generator().manual_seed(2)
    num_global, num_local = 12, 5
    ids = random_ids(80, 4, num_global, gen, skip_frac=0.1)
    expert_map = torch.full((num_global,), -1, dtype=torch.int32)
    expert_map[torch.tensor([3, 7, 8, 0, 11])] = torch.arange(num_local, dtype=torch.int32)
    tpe, off, s2r, r2s = assert_layout_equal(ids, num_local, expert_map)
    local = (ids >= 0) & (expert_map[ids.long().clamp(min=0)] >= 0)
    assert torch.equal(s2r >= 0, local)


def test_layout_bad_input():
    ids = torch.tensor([[0, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_idx"):
        moe_layout(ids, 4)
    with pytest.raises(ValueError, match="topk_idx"):
        moe_layout(torch.tensor([[0, -2]], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="topk_idx must be int32, got int64"):
        moe_layout(ids.long(), 8)
    with pytest.raises(ValueError, match="topk_idx must be contiguous"):
        moe_layout(torch.zeros(4, 2, dtype=torch.int32).t(), 8)
    with pytest.raises(ValueError, match="expert_map"):
        moe_layout(ids, 2, torch.tensor([0, 1, 2, -1, 1], dtype=torch.int32))  # value 2 >= num_experts
    with pytest.raises(ValueError, match="topk_idx"):
        moe_layout(torch.tensor([[0, 5]], dtype=torch.int32), 2, torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_experts"):
        moe_layout(ids, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,num_topk,num_experts", [(0, 2, 3), (1, 1, 1), (33, 3, 7), (200, 6, 64)])
def test_permute_unpermute(dtype, num_tokens, num_topk, num_experts):
    gen = torch.Generator().manual_seed(num_tokens + num_topk)
    ids = random_ids(num_tokens, num_topk, num_experts, gen, skip_frac=0.15)
    _, _, slot_to_row, row_to_slot = moe_layout(ids, num_experts)
    x = torch.randn(num_tokens, 24, generator=gen).to(dtype)
    rows = moe_permute(x, row_to_slot, num_topk)
    assert torch.equal(rows, moe_permute_reference(x, row_to_slot, num_topk))
    weights = torch.rand(num_tokens, num_topk, generator=gen)
    out = moe_unpermute(rows, slot_to_row, weights)
    ref = moe_unpermute_reference(rows, slot_to_row, weights)
    assert torch.equal(out, ref)  # the same fp32 operations in the same order, one rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_backward_matches_autograd(dtype):
    gen = torch.Generator().manual_seed(5)
    ids = random_ids(40, 3, 6, gen, skip_frac=0.2)
    _, _, slot_to_row, row_to_slot = moe_layout(ids, 6)
    rows = torch.randn(120, 16, generator=gen).to(dtype)
    rows[row_to_slot < 0] = 0
    weights = torch.rand(40, 3, generator=gen)
    grad_out = torch.randn(40, 16, generator=gen).to(dtype)
    grad_rows, grad_weights = moe_unpermute_backward(grad_out, rows, slot_to_row, weights)
    rows_ref = rows.float().requires_grad_()
    weights_ref = weights.clone().requires_grad_()
    out = moe_unpermute_reference(rows_ref, slot_to_row, weights_ref)
    out.backward(grad_out.float())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(grad_rows.float(), rows_ref.grad, **tol)
    torch.testing.assert_close(grad_weights, weights_ref.grad, **tol)
    assert bool((grad_rows[row_to_slot < 0] == 0).all())
    assert bool((grad_weights[slot_to_row < 0] == 0).all())


def test_permute_bad_input():
    x = torch.randn(4, 8)
    r2s = torch.arange(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="row_to_slot must have shape"):
        moe_permute(x, r2s[:7], 2)
    with pytest.raises(ValueError, match="row_to_slot values"):
        moe_permute(x, torch.full((8,), 8, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="x must be float32"):
        moe_permute(x.double(), r2s, 2)
    s2r = torch.arange(8, dtype=torch.int32).view(4, 2)
    with pytest.raises(TypeError, match="topk_weights must be float32, got float64"):
        moe_unpermute(x.repeat(2, 1), s2r, torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="topk_weights must have the shape"):
        moe_unpermute(x.repeat(2, 1), s2r, torch.ones(4, 3))
    with pytest.raises(ValueError, match="slot_to_row values"):
        moe_unpermute(x.repeat(2, 1), s2r + 1, torch.ones(4, 2))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        moe_unpermute_backward(torch.randn(3, 8), x.repeat(2, 1), s2r, torch.ones(4, 2))


def test_layout_and_permute_are_deterministic():
    gen = torch.Generator().manual_seed(9)
    ids = random_ids(5000, 4, 33, gen, skip_frac=0.1)
    x = torch.randn(5000, 32, generator=gen)
    first = moe_layout(ids, 33)
    rows = moe_permute(x, first[3], 4)
    for _ in range(3):
        again = moe_layout(ids, 33)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert torch.equal(moe_permute(x, again[3], 4), rows)


def test_opcheck_permutation_ops():
    gen = torch.Generator().manual_seed(3)
    ids = random_ids(10, 2, 4, gen, skip_frac=0.2)
    expert_map = torch.tensor([1, 0, -1, 2], dtype=torch.int32)
    _, _, s2r, r2s = moe_layout(ids, 4)
    x = torch.randn(10, 8, generator=gen)
    rows = moe_permute(x, r2s, 2)
    w = torch.rand(10, 2, generator=gen)
    ops = torch.ops.epmoe
    torch.library.opcheck(ops.moe_layout, (ids, 4, None))
    torch.library.opcheck(ops.moe_layout, (ids, 3, expert_map))
    torch.library.opcheck(ops.moe_permute, (x, r2s, 2))
    torch.library.opcheck(ops.moe_unpermute, (rows, s2r, w))
    torch.library.opcheck(ops.moe_unpermute_backward, (torch.randn(10, 8, generator=gen), rows, s2r, w))
