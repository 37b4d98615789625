"""CUDA impls of the expert-path ops against their CPU impls (the oracle): integer outputs bitwise, GEMM outputs
within tolerances set by bf16/fp16 rounding of the output, plus experts_forward forward/backward, CUDA graph
capture/replay and determinism. Run on a GPU machine with EPMOE_REQUIRE_CUDA=1 (scripts/gpu_check.sh)."""

import epmoe
import pytest
import torch

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance of one rounded output element: fp32 accumulation, then one rounding to the output dtype.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _routing(num_tokens, num_experts, top_k, seed, skip_fraction=0.1):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    topk_idx = scores.topk(top_k, dim=1).indices.to(torch.int32)
    topk_idx[torch.rand(num_tokens, top_k, generator=g) < skip_fraction] = -1
    topk_weights = torch.rand(num_tokens, top_k, generator=g)
    return topk_idx, topk_weights


def _close(got, want, dtype, scale=1.0):
    """got (CUDA, dtype) vs want (CPU fp32 reference): elementwise, scaled by the reference magnitude."""
    got = got.float().cpu()
    want = want.float()
    tol = RTOL[dtype] * (want.abs() + scale * 0.05 * (want.abs().max() if want.numel() else 0))
    assert torch.all((got - want).abs() <= tol + 1e-6), f"max err {(got - want).abs().max().item()}"


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(0, 4, 2), (1, 1, 1), (257, 7, 2), (4096, 256, 8)])
@pytest.mark.parametrize("with_map", [False, True])
def test_moe_layout_bitwise(num_tokens, num_experts, top_k, with_map):
    topk_idx, _ = _routing(num_tokens, num_experts, top_k, seed=1)
    expert_map = None
    num_local = num_experts
    if with_map:
        num_local = max(1, num_experts // 2)
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[num_experts - num_local :] = torch.arange(num_local, dtype=torch.int32)
    want = torch.ops.epmoe.moe_layout(topk_idx, num_local, expert_map)
    got = torch.ops.epmoe.moe_layout(topk_idx.cuda(), num_local, None if expert_map is None else expert_map.cuda())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.cpu(), w)


def test_moe_layout_large():
    topk_idx, _ = _routing(1 << 18, 1024, 8, seed=2)  # 2^21 slots, E = 1024
    want = torch.ops.epmoe.moe_layout(topk_idx, 1024, None)
    got = torch.ops.epmoe.moe_layout(topk_idx.cuda(), 1024, None)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 72, 2048, 7170])  # 7170: narrower vector accesses
def test_permute_unpermute(dtype, hidden):
    num_tokens, num_experts, top_k = 131, 9, 4
    topk_idx, topk_weights = _routing(num_tokens, num_experts, top_k, seed=3)
    _, _, slot_to_row, row_to_slot = torch.ops.epmoe.moe_layout(topk_idx, num_experts, None)
    x = torch.randn(num_tokens, hidden).to(dtype)
    rows = torch.ops.epmoe.moe_permute(x, row_to_slot, top_k)
    assert torch.equal(torch.ops.epmoe.moe_permute(x.cuda(), row_to_slot.cuda(), top_k).cpu(), rows)
    out = torch.ops.epmoe.moe_unpermute(rows, slot_to_row, topk_weights)
    out_cuda = torch.ops.epmoe.moe_unpermute(rows.cuda(), slot_to_row.cuda(), topk_weights.cuda())
    torch.testing.assert_close(out_cuda.cpu(), out, rtol=RTOL[dtype], atol=RTOL[dtype])
    grad_out = torch.randn(num_tokens, hidden).to(dtype)
    g_rows, g_w = torch.ops.epmoe.moe_unpermute_backward(grad_out, rows, slot_to_row, topk_weights)
    g_rows_c, g_w_c = torch.ops.epmoe.moe_unpermute_backward(
        grad_out.cuda(), rows.cuda(), slot_to_row.cuda(), topk_weights.cuda()
    )
    torch.testing.assert_close(g_rows_c.cpu(), g_rows, rtol=RTOL[dtype], atol=RTOL[dtype])
    torch.testing.assert_close(g_w_c.cpu(), g_w, rtol=1e-4, atol=1e-3 * hidden**0.5)


def _expert_problem(rows_per_expert, num_experts, hidden, inter, dtype, seed, padding=13):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * rows_per_expert + 1, (num_experts,), generator=g)
    counts[0] = 0  # an empty expert
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    num_rows = int(offsets[-1]) + padding
    x = torch.randn(num_rows, hidden, generator=g).to(dtype)
    x[int(offsets[-1]) :] = 0
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return offsets, x, w13, w2


GEMM_CASES = [(4, 6, 136, 72), (200, 4, 200, 136), (3, 64, 256, 128)]  # decode tiles, large tiles, many experts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_expert,num_experts,hidden,inter", GEMM_CASES)
def test_grouped_gemms_match_cpu(dtype, rows_per_expert, num_experts, hidden, inter):
    offsets, x, w13, w2 = _expert_problem(rows_per_expert, num_experts, hidden, inter, dtype, seed=4)
    ops = torch.ops.epmoe
    oc, xc, w13c, w2c = offsets.cuda(), x.cuda(), w13.cuda(), w2.cuda()
    # Reference: the CPU ops on fp32 copies of the same (rounded) operands.
    xf, w13f, w2f = x.float(), w13.float(), w2.float()
    h_ref = ops.grouped_swiglu(xf, offsets, w13f)
    h = ops.grouped_swiglu(xc, oc, w13c)
    _close(h, h_ref, dtype)
    assert torch.all(h[int(offsets[-1]) :] == 0)
    gu_ref = ops.grouped_gemm(xf, offsets, w13f, True)
    _close(ops.grouped_gemm(xc, oc, w13c, True), gu_ref, dtype)
    y_ref = ops.grouped_gemm(h.float().cpu(), offsets, w2f, True)
    _close(ops.grouped_gemm(h, oc, w2c, True), y_ref, dtype)
    dgu = torch.randn_like(gu_ref).to(dtype)
    dx_ref = ops.grouped_gemm(dgu.float(), offsets, w13f, False)
    _close(ops.grouped_gemm(dgu.cuda(), oc, w13c, False), dx_ref, dtype)
    wg_ref = ops.grouped_gemm_wgrad(dgu.float(), xf, offsets)
    _close(ops.grouped_gemm_wgrad(dgu.cuda(), xc, oc), wg_ref, dtype, scale=4.0)
    grad_h = torch.randn_like(h_ref).to(dtype)
    sb_ref = ops.swiglu_backward(grad_h.float(), gu_ref)
    _close(ops.swiglu_backward(grad_h.cuda(), gu_ref.to(dtype).cuda()), sb_ref, dtype, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_forward_backward(dtype):
    torch.manual_seed(5)
    num_tokens, num_experts, top_k, hidden, inter = 96, 8, 2, 64, 32
    topk_idx, topk_weights = _routing(num_tokens, num_experts, top_k, seed=5)
    x = torch.randn(num_tokens, hidden).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter) / inter**0.5).to(dtype)

    def run(device):
        leaves = [t.to(device).float().to(dtype).requires_grad_() for t in (x, w13, w2)]
        tw = topk_weights.to(device).requires_grad_()
        out = epmoe.experts_forward(leaves[0], topk_idx.to(device), tw, leaves[1], leaves[2])
        out.float().square().sum().backward()
        return [out] + [t.grad for t in leaves] + [tw.grad]

    for got, want in zip(run("cuda"), run("cpu"), strict=True):
        _close(got, want.float(), dtype, scale=4.0)


def test_cuda_graph_capture_and_replay():
    num_tokens, num_experts, top_k, hidden, inter = 64, 8, 2, 64, 32
    topk_idx, topk_weights = _routing(num_tokens, num_experts, top_k, seed=6)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / 8
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / 8
    idx, tw = topk_idx.cuda(), topk_weights.cuda()
    eager = epmoe.experts_forward(x, idx, tw, w13, w2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        epmoe.experts_forward(x, idx, tw, w13, w2)  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = epmoe.experts_forward(x, idx, tw, w13, w2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    # New routing in the same buffers: the device-side schedule follows it without re-capture.
    new_idx, new_tw = _routing(num_tokens, num_experts, top_k, seed=7)
    idx.copy_(new_idx)
    tw.copy_(new_tw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, epmoe.experts_forward(x, idx, tw, w13, w2))


def test_deterministic():
    num_tokens, num_experts, top_k, hidden, inter = 512, 16, 4, 128, 64
    topk_idx, topk_weights = _routing(num_tokens, num_experts, top_k, seed=8)
    args = [
        torch.randn(num_tokens, hidden, dtype=torch.bfloat16).cuda(),
        topk_idx.cuda(),
        topk_weights.cuda(),
        (torch.randn(num_experts, 2 * inter, hidden) / 10).to(torch.bfloat16).cuda(),
        (torch.randn(num_experts, hidden, inter) / 10).to(torch.bfloat16).cuda(),
    ]
    first = epmoe.experts_forward(*args)
    for _ in range(5):
        assert torch.equal(epmoe.experts_forward(*args), first)


def test_cuda_errors_name_arguments():
    x = torch.randn(4, 12, device="cuda", dtype=torch.bfloat16)  # hidden 12: not a multiple of 8
    offsets = torch.tensor([0, 4], device="cuda")
    w13 = torch.randn(1, 16, 12, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="hidden"):
        torch.ops.epmoe.grouped_swiglu(x, offsets, w13)
    with pytest.raises(ValueError, match="num_experts"):
        torch.ops.epmoe.moe_layout(torch.zeros(2, 2, dtype=torch.int32, device="cuda"), 1 << 20, None)
