"""EPGroup capacity mode (overflow reporting, dropping, errors without hangs), cross-rank disagreement with values
named, bad input on one rank failing every rank, tags and ranks out of step, input validation and a dead peer, on
real gloo processes."""

from __future__ import annotations

import os
import time

import pytest
import torch
from ep_harness import run_ranks

H = 8


def _capacity(rank, world):
    import epmoe

    ep = epmoe.EPGroup()
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(6, H, generator=gen)
    w = torch.rand(6, 1, generator=gen)
    # rank 0 sends all 6 tokens to expert 2 (rank 1); rank 1 keeps 3 tokens local (expert 3), skips the rest
    idx = torch.full((6, 1), 2 if rank == 0 else 3, dtype=torch.int32)
    if rank == 1:
        idx[3:] = -1
    ident = x * w * (idx >= 0)

    # a capacity that fits equals exact mode bitwise, and moves capacity rows per remote pair
    exact = ep.dispatch(x, idx, w, 4)
    y_exact = ep.combine(exact.recv_x, exact.handle)
    d = ep.dispatch(x, idx, w, 4, mode="capacity", capacity=6)
    assert torch.equal(d.recv_x, exact.recv_x) and torch.equal(d.tokens_per_expert, exact.tokens_per_expert)
    assert torch.equal(ep.combine(d.recv_x, d.handle), y_exact)
    assert d.handle.num_bytes_sent == 6 * (H * 4 + 4 * 3)  # capacity rows to the one remote rank
    torch.testing.assert_close(y_exact, ident)

    # overflow with dropping: counted on the device tensor and reported on both sides, rows beyond dropped
    d = ep.dispatch(x, idx, w, 4, mode="capacity", capacity=4, drop_overflow=True)
    h = d.handle
    assert h.overflow.tolist() == ([0, 2] if rank == 0 else [0, 0])
    assert h.num_recv_overflow == (2 if rank == 1 else 0)
    d.handle.check()
    y = ep.combine(d.recv_x, d.handle)
    if rank == 0:
        torch.testing.assert_close(y[:4], ident[:4])
        assert torch.equal(y[4:], torch.zeros(2, H))
    else:
        torch.testing.assert_close(y, ident)

    # overflow without dropping: the sender raises at check() and at combine, after the exchange (no peer hangs)
    d = ep.dispatch(x, idx, w, 4, mode="capacity", capacity=4)
    if rank == 0:
        with pytest.raises(RuntimeError, match="exceeded capacity=4") as info:
            d.handle.check()
        assert "overflow per destination rank: [0, 2])" in str(info.value) and "Tensor" not in str(info.value)
        with pytest.raises(RuntimeError, match="drop_overflow=True"):
            ep.combine(d.recv_x, d.handle)
    else:
        d.handle.check()
        ep.combine(d.recv_x, d.handle)
    # the group is still usable
    d = ep.dispatch(x, idx, w, 4)
    assert torch.equal(ep.combine(d.recv_x, d.handle), y_exact)
    return True


def test_capacity_mode_overflow():
    assert all(run_ranks(_capacity, 2).values())


def _mismatch(rank, world):
    import epmoe

    ep = epmoe.EPGroup()
    x = torch.randn(4, H)
    idx = torch.zeros(4, 2, dtype=torch.int32)
    idx[:, 1] = 1
    w = torch.rand(4, 2)
    cases = [
        ("hidden size", lambda: ep.dispatch(torch.randn(4, H * (rank + 1)), idx, w, 4)),
        ("num_experts", lambda: ep.dispatch(x, idx, w, 4 * (rank + 1))),
        ("dtype", lambda: ep.dispatch(x.to(torch.bfloat16) if rank else x, idx, w, 4)),
        ("mode", lambda: ep.dispatch(x, idx, w, 4, mode="capacity" if rank else "exact", capacity=8)),
        ("top-k", lambda: ep.dispatch(x, idx[:, : rank + 1].contiguous(), w[:, : rank + 1], 4)),
        ("expert_to_rank", lambda: ep.dispatch(x, idx, w, 4, expert_to_rank=torch.tensor([0, 1, rank, 1]))),
    ]
    for field, call in cases:
        with pytest.raises(ValueError, match=f"disagree on {field}"):
            call()
    # values by name, both ranks named
    other = 1 - rank
    with pytest.raises(ValueError, match=rf"dtype: rank {rank} has {'bfloat16' if rank else 'float32'}, rank {other} "
                                         rf"has {'float32' if rank else 'bfloat16'}"):
        ep.dispatch(x.to(torch.bfloat16) if rank else x, idx, w, 4)
    with pytest.raises(ValueError, match=rf"mode: rank {rank} has {'capacity' if rank else 'exact'}, rank {other} "
                                         rf"has {'exact' if rank else 'capacity'}"):
        ep.dispatch(x, idx, w, 4, mode="capacity" if rank else "exact", capacity=8)
    with pytest.raises(ValueError, match=rf"hidden size: rank {rank} has {H * (rank + 1)}, rank {other} has "
                                         rf"{H * (other + 1)}"):
        ep.dispatch(torch.randn(4, H * (rank + 1)), idx, w, 4)
    # local validation (the same bad input on every rank), messages name the argument
    with pytest.raises(ValueError, match="topk_idx values must be in"):
        ep.dispatch(x, idx + 3, w, 4)
    with pytest.raises(ValueError, match="divisible"):
        ep.dispatch(x, idx, w, 3)
    with pytest.raises(ValueError, match="mode must be"):
        ep.dispatch(x, idx, w, 4, mode="fast")
    with pytest.raises(ValueError, match="capacity must be given .*when mode='capacity'") as info:
        ep.dispatch(x, idx, w, 4, mode="capacity")
    assert "-1" not in str(info.value)
    with pytest.raises(ValueError, match="capacity must be >= 0, got -3"):
        ep.dispatch(x, idx, w, 4, mode="capacity", capacity=-3)
    with pytest.raises(ValueError, match=r"capacity \* EP size \* top_k must be < 2\^31"):
        ep.dispatch(x, idx, w, 4, mode="capacity", capacity=2**30)
    with pytest.raises(ValueError, match="topk_weights must have shape"):
        ep.dispatch(x, idx, w[:, :1], 4)
    with pytest.raises(TypeError, match="topk_idx must be int32 or int64"):
        ep.dispatch(x, idx.float(), w, 4)
    with pytest.raises(ValueError, match="expert_to_rank"):
        ep.dispatch(x, idx, w, 4, expert_to_rank=torch.tensor([0, 1, 2, 1]))
    d = ep.dispatch(x, idx, w, 4)  # still in step after all of the above
    with pytest.raises(ValueError, match="expert_out must have shape"):
        ep.combine(d.recv_x[:, :1], d.handle)
    with pytest.raises(TypeError, match="expert_out must have the dispatched dtype"):
        ep.combine(d.recv_x.double(), d.handle)
    torch.testing.assert_close(ep.combine(d.recv_x, d.handle), x * w.sum(1, keepdim=True))
    return True


def test_cross_rank_mismatch_and_validation():
    assert all(run_ranks(_mismatch, 2).values())


def _one_rank_bad(rank, world):
    """Bad input on one rank only fails that rank and its peer in the same dispatch, naming the rank and the value;
    ranks out of step or with different tags raise on both; the group stays usable after each."""
    import epmoe

    ep = epmoe.EPGroup(timeout=20)
    x = torch.randn(4, H)
    w = torch.rand(4, 2)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]], dtype=torch.int32)
    for mode, capacity in (("exact", None), ("capacity", 4)):
        bad = idx.clone()
        if rank == 1:
            bad[2, 1] = 9
        with pytest.raises(ValueError, match=r"topk_idx values must be in \[-1, 4\) \(num_experts\): rank 1 has 9 "
                                             r"at token 2 slot 1"):
            ep.dispatch(x, bad, w, 4, mode=mode, capacity=capacity)
    bad_map = torch.tensor([0, 0, 1, 5 if rank == 0 else 1])
    with pytest.raises(ValueError, match=r"expert_to_rank values must be rank ids.*rank 0 has 5 at "
                                         r"expert_to_rank\[3\]"):
        ep.dispatch(x, idx, w, 4, expert_to_rank=bad_map)
    with pytest.raises(ValueError, match=rf"dispatch tag: rank {rank} has {10 + rank}, rank {1 - rank} has "
                                         rf"{11 - rank}"):
        ep.dispatch(x, idx, w, 4, tag=10 + rank)
    with pytest.raises(ValueError, match=rf"dispatch tag: rank {rank} has {'7' if rank == 0 else 'none'}"):
        ep.dispatch(x, idx, w, 4, tag=7 if rank == 0 else None)
    d = ep.dispatch(x, idx, w, 4, tag=3)  # same tag: fine
    y = ep.combine(d.recv_x, d.handle)
    torch.testing.assert_close(y, x * w.sum(1, keepdim=True))
    # a rank whose EPGroup restarted its count (a fresh group object) is out of step with its peer
    fresh = epmoe.EPGroup(timeout=20) if rank == 1 else ep
    with pytest.raises(RuntimeError, match="EP ranks are out of step") as info:
        fresh.dispatch(x, idx, w, 4)
    assert f"rank {rank} is at dispatch {fresh.num_dispatches - 1}" in str(info.value)
    return True


def test_one_rank_bad_input_fails_every_rank():
    assert all(run_ranks(_one_rank_bad, 2, timeout=120).values())


def _dead_peer(rank, world):
    import epmoe

    ep = epmoe.EPGroup(timeout=10)
    x = torch.randn(4, H)
    idx = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    w = torch.ones(4, 1)
    d = ep.dispatch(x, idx, w, 2)
    if rank == 1:
        os._exit(0)  # dies between dispatch and combine
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        ep.combine(d.recv_x, d.handle)
    return time.monotonic() - start


def test_dead_peer_raises_within_timeout():
    results = run_ranks(_dead_peer, 2, allow_exit=(1,), timeout=60, pg_timeout=10)
    assert results[0] < 15


def _cuda_self(rank, world):
    import epmoe

    ep = epmoe.EPGroup()
    x = torch.randn(10, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 8, (10, 2), device="cuda", dtype=torch.int32)
    idx[:, 1] = (idx[:, 0] + 1) % 8
    w = torch.rand(10, 2, device="cuda")
    d = ep.dispatch(x, idx, w, 8)
    assert d.recv_x.is_cuda and d.tokens_per_expert.is_cuda
    y = ep.combine(d.recv_x, d.handle)
    torch.testing.assert_close(y.float(), x.float() * w.sum(1, keepdim=True), atol=2e-2, rtol=2e-2)
    ep.destroy()
    return True


@pytest.mark.cuda
def test_nccl_world_of_one():
    assert all(run_ranks(_cuda_self, 1).values())
