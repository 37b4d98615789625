"""CPU expert kernels: the native micro-kernels (AVX-512 fp32, AVX512_BF16 bf16: panel kernels for large segments,
NT kernels for decode, both computing every output as the same FMA chain) and the at::mm backend, selected with
EPMOE_CPU_GEMM, against the fp32 reference; the fused inference op against the differentiable composition;
batch invariance and determinism across thread counts; the peak probe."""

import threading

import epmoe
import pytest
import torch
import torch.nn.functional as F
from epmoe.experts import grouped_gemm, grouped_swiglu
from epmoe.reference import experts_forward_reference
from test_experts import TOL, make_problem

_ops = torch.ops.epmoe


def native_supported(dtype, monkeypatch) -> bool:
    """Whether this CPU has the native kernels for dtype (EPMOE_CPU_GEMM=native raises where it has not)."""
    monkeypatch.setenv("EPMOE_CPU_GEMM", "native")
    try:
        grouped_swiglu(torch.zeros(1, 16, dtype=dtype), torch.tensor([0, 1]), torch.zeros(1, 2, 16, dtype=dtype))
        return True
    except RuntimeError as err:
        assert "has no native" in str(err)
        return False
    finally:
        monkeypatch.delenv("EPMOE_CPU_GEMM")


@pytest.fixture(params=["native", "aten", "auto"])
def backend(request, monkeypatch):
    """Runs the test under one EPMOE_CPU_GEMM setting (native skips where the CPU lacks the kernels)."""
    return request.param


def use_backend(backend, dtype, monkeypatch):
    if backend == "native" and (dtype == torch.float16 or not native_supported(dtype, monkeypatch)):
        pytest.skip(f"no native {dtype} kernel on this CPU")
    monkeypatch.setenv("EPMOE_CPU_GEMM", backend)


# Shapes: decode (NT kernels), segments of 24..100 rows (panel kernels with row tails), K tails of every kind
# (H a multiple of 8 but not of 16, odd I), one hot expert with more rows than one item holds, 0 and 1 tokens.
SHAPES = [
    # (num_tokens, num_topk, num_experts, hidden, inter, hot)
    (0, 2, 4, 32, 16, None),
    (1, 1, 1, 8, 4, None),
    (3, 2, 5, 40, 13, None),
    (60, 3, 7, 72, 24, None),
    (200, 4, 9, 56, 29, None),
    (700, 1, 3, 24, 5, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_k{}_E{}_H{}_I{}".format(*s[:5]))
def test_fused_forward_matches_reference(backend, dtype, shape, monkeypatch):
    use_backend(backend, dtype, monkeypatch)
    num_tokens, num_topk, num_experts, hidden, inter, hot = shape
    x, ids, weights, w13, w2 = make_problem(num_tokens, num_topk, num_experts, hidden, inter, dtype, seed=len(SHAPES),
                                            hot=hot)
    with torch.no_grad():
        out = epmoe.experts_forward(x, ids, weights, w13, w2)
    assert out.dtype == dtype and out.shape == x.shape
    ref = experts_forward_reference(x, ids, weights, w13, w2)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_equals_composition_bitwise(backend, dtype, monkeypatch):
    """The inference op runs the same kernels on the same rows as the differentiable path: identical results."""
    use_backend(backend, dtype, monkeypatch)
    x, ids, weights, w13, w2 = make_problem(150, 6, 10, 64, 40, dtype, seed=3)
    fused = _ops.fused_experts_forward(x, ids, weights, w13, w2, None)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    composed = epmoe.experts_forward(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    assert torch.equal(fused, composed.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 30, 1, 0, 97], [0, 0, 0], [512 + 77]])
def test_grouped_ops_match_per_segment_torch(backend, dtype, counts, monkeypatch):
    """grouped_swiglu / grouped_gemm(trans_w) on expert-major rows, empty experts and padding rows included."""
    use_backend(backend, dtype, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    num_rows, hidden, inter = sum(counts) + 3, 48, 19
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    x = torch.randn(num_rows, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(len(counts), 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(len(counts), hidden, inter, generator=gen) * 0.2).to(dtype)
    h = grouped_swiglu(x, off, w13)
    y = grouped_gemm(h, off, w2, True)
    for e in range(len(counts)):
        lo, hi = int(off[e]), int(off[e + 1])
        g, u = (x[lo:hi].float() @ w13[e].float().t()).chunk(2, dim=-1)
        torch.testing.assert_close(h[lo:hi].float(), F.silu(g) * u, **TOL[dtype])
        torch.testing.assert_close(y[lo:hi].float(), h[lo:hi].float() @ w2[e].float().t(), **TOL[dtype])
    used = int(off[-1])
    assert bool((h[used:] == 0).all()) and bool((y[used:] == 0).all())


def test_native_results_do_not_depend_on_the_thread_count(monkeypatch):
    """Native kernels: each output is one fixed-order sum whatever the split of rows and columns over threads
    (prefill: panels; decode: a few rows per expert, where the down GEMM items wait for their expert's SwiGLU items
    inside one parallel region)."""
    results = {}
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        use_backend("native", dtype, monkeypatch)
        for num_tokens in (300, 5):
            x, ids, weights, w13, w2 = make_problem(num_tokens, 6, 16, 64, 40, dtype, seed=5, hot=2)
            try:
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    results[dtype, n] = _ops.fused_experts_forward(x, ids, weights, w13, w2, None)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(results[dtype, 1], results[dtype, 2])
            assert torch.equal(results[dtype, 1], results[dtype, 3])
            again = _ops.fused_experts_forward(x, ids, weights, w13, w2, None)
            assert torch.equal(again, _ops.fused_experts_forward(x, ids, weights, w13, w2, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rows_are_batch_invariant(dtype, monkeypatch):
    """A token's output is the same bits whatever else is in the batch: alone (decode kernels) or among hundreds of
    rows per expert (panel kernels) -- what makes EP outputs equal to one process's."""
    use_backend("native", dtype, monkeypatch)
    x, ids, weights, w13, w2 = make_problem(400, 2, 3, 48, 40, dtype, seed=21, skip_frac=0.0)
    batch = _ops.fused_experts_forward(x, ids, weights, w13, w2, None)
    for t in (0, 7, 399):
        alone = _ops.fused_experts_forward(x[t:t + 1], ids[t:t + 1], weights[t:t + 1], w13, w2, None)
        assert torch.equal(alone[0], batch[t]), t
    few = _ops.fused_experts_forward(x[:20], ids[:20], weights[:20], w13, w2, None)  # 10-20 rows per expert
    assert torch.equal(few, batch[:20])


@pytest.mark.parametrize("num_tokens,bad_rows", [(80, (5, 40)), (9, (2, 7))])  # panel / NT kernels
def test_fused_forward_nonfinite_rows_stay_local(backend, num_tokens, bad_rows, monkeypatch):
    """A NaN / Inf token row affects only its own output row (padded panel lanes and tails are zeros)."""
    use_backend(backend, torch.float32, monkeypatch)
    x, ids, weights, w13, w2 = make_problem(num_tokens, 2, 3, 32, 16, torch.float32, seed=9, skip_frac=0.0)
    x[bad_rows[0], 3] = float("nan")
    x[bad_rows[1], 0] = float("inf")
    with torch.no_grad():
        out = epmoe.experts_forward(x, ids, weights, w13, w2)
    bad = ~torch.isfinite(out).all(dim=1)
    assert bad[bad_rows[0]] and bad[bad_rows[1]] and int(bad.sum()) == 2
    keep = torch.ones(num_tokens, dtype=torch.bool)
    keep[list(bad_rows)] = False
    ref = experts_forward_reference(x[keep], ids[keep], weights[keep], w13, w2)
    torch.testing.assert_close(out[keep], ref, **TOL[torch.float32])


def test_fused_forward_expert_map_and_concurrent_callers():
    """expert_map (remote experts skipped) and two Python threads calling at once (pooled scratch per call)."""
    num_global = 12
    x, ids, weights, _, _ = make_problem(90, 4, num_global, 32, 16, torch.float32, seed=11)
    local = [1, 4, 7, 11]
    gen = torch.Generator().manual_seed(12)
    w13 = torch.randn(len(local), 32, 32, generator=gen) * 0.2
    w2 = torch.randn(len(local), 32, 16, generator=gen) * 0.2
    expert_map = torch.full((num_global,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(len(local), dtype=torch.int32)
    want = _ops.fused_experts_forward(x, ids, weights, w13, w2, expert_map)
    local_ids = torch.where(ids >= 0, expert_map[ids.long().clamp(min=0)], torch.full_like(ids, -1))
    torch.testing.assert_close(want, experts_forward_reference(x, local_ids, weights, w13, w2), **TOL[torch.float32])
    outs = [None] * 4

    def work(i):
        outs[i] = _ops.fused_experts_forward(x, ids, weights, w13, w2, expert_map)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert all(torch.equal(o, want) for o in outs)


def test_fused_forward_opcheck_and_bad_input(monkeypatch):
    x, ids, weights, w13, w2 = make_problem(12, 2, 3, 16, 8, torch.float32, seed=1)
    torch.library.opcheck(_ops.fused_experts_forward, (x, ids, weights, w13, w2, None))
    with pytest.raises(ValueError, match="w2 must have shape"):
        _ops.fused_experts_forward(x, ids, weights, w13, w2[:, :, :7].contiguous(), None)
    with pytest.raises(TypeError, match="topk_weights must be float32"):
        _ops.fused_experts_forward(x, ids, weights.double(), w13, w2, None)
    with pytest.raises(ValueError, match="topk_idx values must lie in"):
        _ops.fused_experts_forward(x, ids + 3, weights, w13, w2, None)
    monkeypatch.setenv("EPMOE_CPU_GEMM", "fastest")
    with pytest.raises(ValueError, match="EPMOE_CPU_GEMM must be"):
        _ops.fused_experts_forward(x, ids, weights, w13, w2, None)
    monkeypatch.setenv("EPMOE_CPU_GEMM", "native")
    with pytest.raises(RuntimeError, match="no native"):
        _ops.fused_experts_forward(x.half(), ids, weights, w13.half(), w2.half(), None)


def test_cpu_peak_probe():
    try:
        peak = _ops.cpu_peak_gflops("fp32_fma", 0.01)
    except RuntimeError as err:
        assert "has no AVX-512" in str(err)
    else:
        assert peak > 1.0
    with pytest.raises(ValueError, match="kind must be"):
        _ops.cpu_peak_gflops("int8", 0.01)


def make_shared(hidden, shared_inter, dtype, seed=31):
    gen = torch.Generator().manual_seed(seed)
    gate, up = ((torch.randn(shared_inter, hidden, generator=gen) * hidden**-0.5).to(dtype) for _ in range(2))
    down = (torch.randn(hidden, shared_inter, generator=gen) * shared_inter**-0.5).to(dtype)
    return gate, up, down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 150])
def test_fused_forward_shared_expert(backend, dtype, num_tokens, monkeypatch):
    """With a shared expert: the routed result plus the shared expert run as a one-slot routed expert (weight 1, so
    its sum is its row), added as two x.dtype tensors add -- bitwise with the native kernels (at::mm's result may
    depend on its shape: one GEMM over gate|up there, two here); and close to the dense torch MLP."""
    use_backend(backend, dtype, monkeypatch)
    x, ids, weights, w13, w2 = make_problem(num_tokens, 6, 10, 64, 40, dtype, seed=4)
    gate, up, down = make_shared(64, 56, dtype)
    fused = _ops.fused_experts_forward(x, ids, weights, w13, w2, None, gate, up, down)
    routed = _ops.fused_experts_forward(x, ids, weights, w13, w2, None)
    one_slot = torch.zeros(num_tokens, 1, dtype=torch.int32)
    shared = _ops.fused_experts_forward(x, one_slot, torch.ones(num_tokens, 1), torch.cat([gate, up])[None],
                                        down[None], None)
    assert fused.dtype == dtype
    if backend == "native":
        assert torch.equal(fused, routed + shared)
    else:
        torch.testing.assert_close(fused, routed + shared, **TOL[dtype])
    dense = F.linear(F.silu(F.linear(x.float(), gate.float())) * F.linear(x.float(), up.float()), down.float())
    torch.testing.assert_close(shared.float(), dense, **TOL[dtype])
    assert torch.equal(epmoe.experts.fused_experts_forward(x, ids, weights, w13, w2, shared=(gate, up, down)), fused)


def test_fused_forward_shared_expert_is_batch_invariant(monkeypatch):
    use_backend("native", torch.float32, monkeypatch)
    x, ids, weights, w13, w2 = make_problem(120, 2, 3, 48, 40, torch.float32, seed=22, skip_frac=0.0)
    shared = make_shared(48, 24, torch.float32)
    batch = _ops.fused_experts_forward(x, ids, weights, w13, w2, None, *shared)
    for t in (0, 119):
        alone = _ops.fused_experts_forward(x[t:t + 1], ids[t:t + 1], weights[t:t + 1], w13, w2, None, *shared)
        assert torch.equal(alone[0], batch[t]), t


def test_fused_forward_shared_expert_bad_input():
    x, ids, weights, w13, w2 = make_problem(12, 2, 3, 16, 8, torch.float32, seed=1)
    gate, up, down = make_shared(16, 12, torch.float32)
    torch.library.opcheck(_ops.fused_experts_forward, (x, ids, weights, w13, w2, None, gate, up, down))
    with pytest.raises(ValueError, match="must be given together"):
        _ops.fused_experts_forward(x, ids, weights, w13, w2, None, gate, up, None)
    with pytest.raises(ValueError, match="shared_down must have shape"):
        _ops.fused_experts_forward(x, ids, weights, w13, w2, None, gate, up, down[:, :5].contiguous())
    with pytest.raises(ValueError, match="shared_gate must have shape"):
        _ops.fused_experts_forward(x, ids, weights, w13, w2, None, gate[:, :8].contiguous(), up, down)
    with pytest.raises(TypeError, match="shared_up must have the dtype of x"):
        _ops.fused_experts_forward(x, ids, weights, w13, w2, None, gate, up.half(), down)
    with pytest.raises(ValueError, match="shared must be"):
        epmoe.experts.fused_experts_forward(x, ids, weights, w13, w2, shared=(gate, up))
