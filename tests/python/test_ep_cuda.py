"""The CUDA path of EPGroup (device-side dispatch planning, NCCL) against the CPU path (host planning, gloo) of the
same inputs in the same process, on a world of one; capacity mode without host syncs and inside CUDA graphs, for
dispatch + combine and for a whole MoE layer forward; bad input reported on the device; the grouped GEMMs' offset
clamp. Plus the CPU contract of grouped_swiglu_experts offsets. CUDA tests are marked and skip without a GPU."""

from __future__ import annotations

import epmoe
import pytest
import torch
from ep_harness import run_ranks
from epmoe.experts import grouped_swiglu_experts

cuda = pytest.mark.cuda


def _routing(num_tokens, num_experts, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]).int()
    if num_tokens > 3:
        idx[3, -1] = -1  # a skipped slot (token 3 goes nowhere when k = 1)
        idx[1, :] = 0  # every slot of token 1 on one expert
    return idx, torch.rand(num_tokens, top_k, generator=gen)


def _identity_combine(ep, x, idx, w, num_experts, **kw):
    d = ep.dispatch(x, idx, w, num_experts, **kw)
    return d, ep.combine(d.recv_x, d.handle)


def _cuda_matches_cpu(rank, world):
    ep = epmoe.EPGroup(timeout=60)
    for dtype, hidden in ((torch.float32, 64), (torch.bfloat16, 67)):  # 67: unaligned wire metadata
        for num_tokens, top_k, num_experts in ((0, 2, 6), (1, 1, 6), (37, 3, 6), (200, 8, 12)):
            gen = torch.Generator().manual_seed(num_tokens)
            x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
            idx, w = _routing(num_tokens, num_experts, top_k, seed=num_tokens + 1)
            case = f"{dtype} T={num_tokens} k={top_k}"
            # exact mode: every array bitwise
            dc, yc = _identity_combine(ep, x, idx, w, num_experts)
            dg, yg = _identity_combine(ep, x.cuda(), idx.cuda(), w.cuda(), num_experts)
            for name in ("recv_x", "recv_topk_weights", "tokens_per_expert", "expert_offsets"):
                assert torch.equal(getattr(dg, name).cpu(), getattr(dc, name)), (case, name)
            for name in ("send_token_idx", "row_src", "row_slot", "recv_src_token", "recv_src_rank"):
                assert torch.equal(getattr(dg.handle, name).cpu(), getattr(dc.handle, name)), (case, name)
            assert dg.handle.num_send_per_rank == dc.handle.num_send_per_rank, case
            torch.testing.assert_close(yg.cpu(), yc, rtol=1e-6, atol=1e-6, msg=case)
            # capacity mode, ample capacity: the exact rows first, then zero padding of fixed size
            cap = max(num_tokens, 1)
            dc, yc = _identity_combine(ep, x, idx, w, num_experts, mode="capacity", capacity=cap)
            dg, yg = _identity_combine(ep, x.cuda(), idx.cuda(), w.cuda(), num_experts, mode="capacity",
                                       capacity=cap)
            m = dc.recv_x.shape[0]
            assert dg.recv_x.shape[0] == cap * top_k, case
            assert torch.equal(dg.recv_x[:m].cpu(), dc.recv_x) and bool((dg.recv_x[m:] == 0).all()), case
            assert torch.equal(dg.recv_topk_weights[:m].cpu(), dc.recv_topk_weights), case
            assert bool((dg.recv_topk_weights[m:] == 0).all()), case
            assert torch.equal(dg.expert_offsets.cpu(), dc.expert_offsets), case
            torch.testing.assert_close(yg.cpu(), yc, rtol=1e-6, atol=1e-6, msg=case)
            dg.handle.check()
            # overflow: dropped like the CPU path when allowed, NaN and an error otherwise
            if num_tokens < 4:
                continue
            small = num_tokens // 3
            dc, yc = _identity_combine(ep, x, idx, w, num_experts, mode="capacity", capacity=small,
                                       drop_overflow=True)
            dg, yg = _identity_combine(ep, x.cuda(), idx.cuda(), w.cuda(), num_experts, mode="capacity",
                                       capacity=small, drop_overflow=True)
            torch.testing.assert_close(yg.cpu(), yc, rtol=1e-6, atol=1e-6, msg=case)
            assert dg.handle.overflow.tolist() == dc.handle.overflow.tolist(), case
            dg, yg = _identity_combine(ep, x.cuda(), idx.cuda(), w.cuda(), num_experts, mode="capacity",
                                       capacity=small)
            sent_somewhere = (idx >= 0).any(1)
            lost = sent_somewhere & (torch.cumsum(sent_somewhere.int(), 0) > small)
            assert torch.equal(yg.isnan().any(1).cpu(), lost), case
            with pytest.raises(RuntimeError, match=f"exceeded capacity={small}"):
                dg.handle.check()
    ep.destroy()
    return True


@cuda
def test_cuda_dispatch_matches_cpu():
    assert all(run_ranks(_cuda_matches_cpu, 1, timeout=300).values())


def _cuda_grads(rank, world):
    ep = epmoe.EPGroup(timeout=60)
    idx, w0 = _routing(23, 6, 2, seed=5)
    x0 = torch.randn(23, 16, generator=torch.Generator().manual_seed(6))
    grads = []
    for device, kw in (("cpu", {}), ("cuda", {}), ("cuda", {"mode": "capacity", "capacity": 23})):
        x = x0.to(device).requires_grad_(True)
        w = w0.to(device).requires_grad_(True)
        d = ep.dispatch(x, idx.to(device), w, 6, **kw)
        y = ep.combine(d.recv_x * 2.0, d.handle)
        (y * torch.arange(16, device=device)).sum().backward()
        grads.append((x.grad.cpu(), w.grad.cpu()))
    for gx, gw in grads[1:]:
        torch.testing.assert_close(gx, grads[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gw, grads[0][1], rtol=1e-6, atol=1e-6)
    ep.destroy()
    return True


@cuda
def test_cuda_dispatch_gradients_match_cpu():
    assert all(run_ranks(_cuda_grads, 1, timeout=300).values())


def _capacity_graph(rank, world):
    ep = epmoe.EPGroup(timeout=60)
    num_tokens, hidden, num_experts, top_k, cap = 64, 128, 8, 4, 64
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    idx, w = _routing(num_tokens, num_experts, top_k, seed=9)
    idx, w = idx.cuda(), w.cuda()

    def step():
        d = ep.dispatch(x, idx, w, num_experts, mode="capacity", capacity=cap)
        return ep.combine(d.recv_x * 3.0, d.handle)

    eager = step()  # the first call of these shapes checks agreement on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host copy or stream sync in the path raises now
    try:
        again = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = step()
    torch.cuda.current_stream().wait_stream(stream)
    for trial in range(3):
        x.copy_(torch.randn_like(x))
        w.copy_(torch.rand_like(w))
        idx.copy_(_routing(num_tokens, num_experts, top_k, seed=20 + trial)[0].cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step()), trial
    ep.synchronize()
    ep.destroy()
    return True


@cuda
def test_cuda_capacity_mode_has_no_host_sync_and_captures():
    assert all(run_ranks(_capacity_graph, 1, timeout=300).values())


def _layer_graph(rank, world):
    cfg = epmoe.MoEConfig(hidden_size=128, moe_intermediate_size=64, num_experts=8, top_k=2, num_shared_experts=1,
                          dtype=torch.bfloat16, exchange_mode="capacity", capacity=96, record_load=False)
    moe = epmoe.MoE(cfg).cuda().eval()
    x = torch.randn(96, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = moe(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = moe(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, moe(x), rtol=1e-2, atol=1e-2)
        assert bool(out.isfinite().all())
    return True


@cuda
def test_cuda_graph_of_a_whole_layer_forward_in_capacity_mode():
    assert all(run_ranks(_layer_graph, 1, timeout=300).values())


def _device_bad_input(rank, world):
    ep = epmoe.EPGroup(timeout=60)
    x = torch.randn(8, 32, device="cuda")
    idx, w = _routing(8, 4, 2, seed=3)
    idx, w = idx.cuda(), w.cuda()
    _identity_combine(ep, x, idx, w, 4, mode="capacity", capacity=8)  # these shapes are now checked across ranks
    bad = idx.clone()
    bad[5, 1] = 11
    with pytest.raises(ValueError, match=r"rank 0 has 11 at token 5 slot 1"):
        ep.dispatch(x, bad, w, 4)  # exact mode: the one host read raises
    d = ep.dispatch(x, bad, w, 4, mode="capacity", capacity=8)  # capacity mode: found on the device
    y = ep.combine(d.recv_x, d.handle)
    assert bool(y.isnan().all())
    with pytest.raises(ValueError, match=r"rank 0 has 11 at token 5 slot 1"):
        d.handle.check()
    ep.destroy()
    return True


@cuda
def test_cuda_bad_expert_id_is_reported():
    assert all(run_ranks(_device_bad_input, 1, timeout=300).values())


@cuda
def test_cuda_grouped_gemm_clamps_bad_offsets():
    rows, hidden, inter = 24, 32, 16
    x = torch.randn(rows, hidden, device="cuda")
    w13 = torch.randn(3, 2 * inter, hidden, device="cuda")
    ops = torch.ops.epmoe
    for bad in ([0, 30, 5, 100], [-4, 2, 9, 20], [6, 6, 12, 40]):
        offsets = torch.tensor(bad, device="cuda")
        clamped = torch.cummax(offsets.clamp_min(0), 0).values.clamp_max(rows)
        h = ops.grouped_swiglu(x, offsets, w13)
        torch.cuda.synchronize()
        assert torch.equal(h, ops.grouped_swiglu(x, clamped, w13)), bad
        lo, hi = int(clamped[0]), int(clamped[-1])
        assert bool((h[:lo] == 0).all()) and bool((h[hi:] == 0).all()), bad


def test_grouped_swiglu_offsets_contract():
    """Rows past expert_offsets[-1] are padding only when asked for (allow_padding=True, e.g. the padded recv_x of
    CUDA capacity mode), and come out zero; a first offset other than 0, decreasing offsets and offsets past the
    rows are always rejected (on CPU; CUDA kernels clamp instead, see above)."""
    rows = torch.randn(10, 16)
    w13, w2 = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    out = grouped_swiglu_experts(rows, torch.tensor([0, 3, 7]), w13, w2, allow_padding=True)
    assert out.shape == (10, 16) and bool((out[7:] == 0).all())
    with pytest.raises(ValueError, match=r"expert_offsets\[-1\] must equal the number of rows"):
        grouped_swiglu_experts(rows, torch.tensor([0, 3, 7]), w13, w2)
    for bad, match in (([1, 3, 7], "must start at 0"), ([0, 6, 4], "non-decreasing"),
                       ([0, 3, 11], r"expert_offsets\[-1\]"), ([-1, 3, 7], "must start at 0")):
        for allow_padding in (False, True):
            with pytest.raises(ValueError, match=match):
                grouped_swiglu_experts(rows, torch.tensor(bad), w13, w2, allow_padding=allow_padding)
