"""epmoe.route against reference.route_reference, transformers' routers, opcheck, bad input and the CUDA kernel."""

import itertools

import epmoe
import pytest
import torch
from epmoe.reference import route_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_case(num_tokens, num_experts, seed, dtype=torch.float32, scale=2.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * scale).to(dtype)
    bias = torch.rand(num_experts, generator=gen) * 0.2 + 2.0
    return logits.to(device), bias.to(device)


def check_matches_reference(logits, top_k, rtol=1e-6, **kwargs):
    weights, idx = epmoe.route(logits, top_k, **kwargs)
    ref_weights, ref_idx = route_reference(logits, top_k, **kwargs)
    assert weights.dtype == torch.float32 and idx.dtype == torch.int32
    assert weights.shape == idx.shape == (logits.shape[0], top_k)
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, rtol=rtol, atol=1e-12, equal_nan=True)
    assert_distinct(idx)
    return weights, idx


def assert_distinct(idx):
    if idx.numel():
        sorted_idx = idx.sort(dim=-1).values
        assert (sorted_idx[:, 1:] != sorted_idx[:, :-1]).all(), "duplicate ids in a row"


# (num_experts, top_k, num_groups, topk_groups): every E and k value, with and without groups
SHAPES = [
    (8, 1, 1, 1), (8, 2, 4, 2), (60, 6, 1, 1), (60, 6, 6, 3), (64, 8, 8, 4), (64, 1, 1, 1),
    (128, 8, 1, 1), (128, 2, 4, 2), (160, 6, 5, 2), (160, 8, 1, 1), (256, 8, 8, 4), (256, 1, 1, 1),
    (384, 8, 1, 1), (384, 6, 8, 3),
]  # fmt: skip


@pytest.mark.parametrize("num_experts,top_k,num_groups,topk_groups", SHAPES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_reference_grid(num_experts, top_k, num_groups, topk_groups, scoring, use_bias):
    seed = num_experts * 1000 + top_k * 10 + num_groups
    for num_tokens, dtype in zip((0, 1, 7, 256), DTYPES + (torch.float32,), strict=True):
        logits, bias = make_case(num_tokens, num_experts, seed, dtype)
        check_matches_reference(
            logits, top_k, scoring=scoring, num_groups=num_groups, topk_groups=topk_groups,
            bias=bias if use_bias else None, scaling_factor=2.5,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_experts,top_k,num_groups,topk_groups,scoring,use_bias",
    [(256, 8, 8, 4, "sigmoid", True), (128, 8, 1, 1, "softmax", False), (160, 6, 5, 2, "softmax", False)],
)
def test_matches_reference_many_tokens(dtype, num_experts, top_k, num_groups, topk_groups, scoring, use_bias):
    logits, bias = make_case(4099, num_experts, 17, dtype)
    check_matches_reference(
        logits, top_k, scoring=scoring, num_groups=num_groups, topk_groups=topk_groups,
        bias=bias if use_bias else None,
    )  # fmt: skip


@pytest.mark.parametrize("renormalize,scaling_factor", [(False, 1.0), (False, 2.5), (True, 0.5)])
def test_renormalize_and_scaling(renormalize, scaling_factor):
    logits, bias = make_case(64, 64, 5)
    weights, _ = check_matches_reference(
        logits, 6, scoring="sigmoid", num_groups=8, topk_groups=4, bias=bias, renormalize=renormalize,
        scaling_factor=scaling_factor,
    )  # fmt: skip
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.full((64,), scaling_factor), rtol=1e-5, atol=0)


def test_large_expert_count():
    logits, _ = make_case(300, 1024, 23)
    check_matches_reference(logits, 32)
    check_matches_reference(logits, 32, scoring="sigmoid", num_groups=16, topk_groups=4)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_ties(scoring):
    equal = torch.zeros(5, 64)
    weights, idx = check_matches_reference(equal, 6, scoring=scoring)
    assert (idx == torch.arange(6, dtype=torch.int32)).all()
    check_matches_reference(equal, 6, scoring=scoring, num_groups=8, topk_groups=3, bias=torch.zeros(64))
    # Repeated values: few distinct levels, so ties at every boundary (experts and groups)
    gen = torch.Generator().manual_seed(3)
    repeated = torch.randint(0, 4, (257, 96), generator=gen).float()
    check_matches_reference(repeated, 8, scoring=scoring)
    check_matches_reference(repeated, 8, scoring=scoring, num_groups=8, topk_groups=3)
    check_matches_reference(repeated, 8, scoring=scoring, num_groups=8, topk_groups=3, bias=torch.ones(96))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True])
def test_non_finite_rows(scoring, grouped):
    nan, inf = float("nan"), float("inf")
    logits, bias = make_case(8, 64, 31)
    logits[0] = nan
    logits[1, ::3] = nan
    logits[2, 5] = inf
    logits[3] = -inf
    logits[4, ::2] = inf
    logits[4, 1::2] = -inf
    logits[5, 9] = nan
    logits[6, 40:] = -inf
    kwargs = dict(scoring=scoring, num_groups=8, topk_groups=4, bias=bias) if grouped else dict(scoring=scoring)
    for dtype in DTYPES:
        check_matches_reference(logits.to(dtype), 8, **kwargs)


def test_deterministic():
    logits, bias = make_case(4099, 256, 41)
    first = epmoe.route(logits, 8, scoring="sigmoid", num_groups=8, topk_groups=4, bias=bias, scaling_factor=2.5)
    for _ in range(3):
        again = epmoe.route(logits, 8, scoring="sigmoid", num_groups=8, topk_groups=4, bias=bias, scaling_factor=2.5)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# --- real routers from transformers, fed our logits through an identity router weight ---------------------


def identity_router(router, num_experts):
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def sorted_pairs(weights, idx):
    order = idx.long().argsort(dim=-1)
    return weights.gather(1, order), idx.long().gather(1, order)


def compare_sets(weights, idx, hf_weights, hf_idx, rtol=1e-6):
    weights, idx = sorted_pairs(weights, idx)
    hf_weights, hf_idx = sorted_pairs(hf_weights.float(), hf_idx)
    torch.testing.assert_close(idx, hf_idx, rtol=0, atol=0)
    torch.testing.assert_close(weights, hf_weights, rtol=rtol, atol=1e-12)


def test_matches_transformers_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    num_experts = 64
    config = DeepseekV3Config(
        hidden_size=num_experts, n_routed_experts=num_experts, num_experts_per_tok=6, n_group=8, topk_group=3,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    )  # fmt: skip
    router = identity_router(DeepseekV3TopkRouter(config), num_experts)
    logits, bias = make_case(513, num_experts, 7)
    # NOTES: positive biases (as in DeepSeek-V3, all >= +2): older transformers masked dropped groups with 0.0
    # instead of -inf, which only matters when a kept biased score is negative.
    with torch.no_grad():
        router.e_score_correction_bias.copy_(bias)
        _, hf_weights, hf_idx = router(logits)
    weights, idx = epmoe.route(
        logits, 6, scoring="sigmoid", num_groups=8, topk_groups=3, bias=bias, renormalize=True, scaling_factor=2.5
    )
    compare_sets(weights, idx, hf_weights, hf_idx)


def test_matches_transformers_deepseek_v2():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    num_experts = 64
    config = DeepseekV2Config(
        hidden_size=num_experts, n_routed_experts=num_experts, num_experts_per_tok=6, n_group=8, topk_group=3,
        topk_method="group_limited_greedy", routed_scaling_factor=16.0,
    )  # fmt: skip
    router = identity_router(DeepseekV2TopkRouter(config), num_experts)
    logits, _ = make_case(513, num_experts, 8)
    with torch.no_grad():
        _, hf_weights, hf_idx = router(logits)
    # transformers' V2 router does not renormalize (softmax scores are > 0, so its 0.0 mask never wins)
    weights, idx = epmoe.route(
        logits, 6, scoring="softmax", num_groups=8, topk_groups=3, renormalize=False, scaling_factor=16.0
    )
    compare_sets(weights, idx, hf_weights, hf_idx)


@pytest.mark.parametrize("model", ["qwen3_moe", "mixtral"])
def test_matches_transformers_softmax_topk(model):
    if model == "qwen3_moe":
        from transformers import Qwen3MoeConfig as Config
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Router

        num_experts, top_k = 128, 8
        config = Config(
            hidden_size=num_experts, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True
        )
    else:
        from transformers import MixtralConfig as Config
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as Router

        num_experts, top_k = 8, 2
        config = Config(hidden_size=num_experts, num_local_experts=num_experts, num_experts_per_tok=top_k)
    router = identity_router(Router(config), num_experts)
    logits, _ = make_case(513, num_experts, 9)
    with torch.no_grad():
        _, hf_weights, hf_idx = router(logits)
    weights, idx = epmoe.route(logits, top_k, scoring="softmax", renormalize=True)
    compare_sets(weights, idx, hf_weights, hf_idx)


# --- op registration and bad input ------------------------------------------------------------------------


def opcheck_args(device):
    logits, bias = make_case(33, 64, 2, device=device)
    return [
        (logits, 6, "sigmoid", 8, 4, bias, True, 2.5),
        (logits.bfloat16(), 8, "softmax", 1, 1, None, True, 1.0),
        (logits.half(), 2, "softmax", 4, 2, None, False, 1.0),
    ]


def test_opcheck_cpu():
    for args in opcheck_args("cpu"):
        torch.library.opcheck(torch.ops.epmoe.route.default, args)


@pytest.mark.parametrize(
    "scoring,num_groups,topk_groups,with_bias,renormalize",
    [("sigmoid", 8, 4, True, True), ("softmax", 1, 1, False, True), ("softmax", 4, 2, False, False)],
)
def test_route_gradient_matches_reference(scoring, num_groups, topk_groups, with_bias, renormalize):
    # The weights are differentiable in the logits (training the gate); selection and bias are not.
    logits, bias = make_case(37, 64, 3)
    bias = bias if with_bias else None
    kwargs = dict(scoring=scoring, num_groups=num_groups, topk_groups=topk_groups, bias=bias,
                  renormalize=renormalize, scaling_factor=2.5)
    grad = torch.randn(37, 6, generator=torch.Generator().manual_seed(4))
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    weights, idx = epmoe.route(ours, 6, **kwargs)
    ref_weights, ref_idx = route_reference(ref, 6, **kwargs)
    assert torch.equal(idx, ref_idx)
    (weights * grad).sum().backward()
    (ref_weights * grad).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)


BAD_INPUT = [
    (lambda x, b: epmoe.route(x[0], 2), "router_logits"),
    (lambda x, b: epmoe.route(x.unsqueeze(0), 2), "router_logits"),
    (lambda x, b: epmoe.route(x.double(), 2), "router_logits"),
    (lambda x, b: epmoe.route(x.to(torch.int32), 2), "router_logits"),
    (lambda x, b: epmoe.route(x, 2, bias=b.double()), "bias"),
    (lambda x, b: epmoe.route(x, 2, bias=b[:-1]), "bias"),
    (lambda x, b: epmoe.route(x, 2, bias=b.view(2, -1)), "bias"),
    (lambda x, b: epmoe.route(x, 0), "top_k"),
    (lambda x, b: epmoe.route(x, 65), "top_k"),
    (lambda x, b: epmoe.route(x, 40, num_groups=8, topk_groups=4), "top_k"),
    (lambda x, b: epmoe.route(x, 2, num_groups=7), "num_groups"),
    (lambda x, b: epmoe.route(x, 2, num_groups=8, topk_groups=9), "topk_groups"),
    (lambda x, b: epmoe.route(x, 2, num_groups=8, topk_groups=0), "topk_groups"),
    (lambda x, b: epmoe.route(x, 2, num_groups=64, topk_groups=4, bias=b), "bias"),
    (lambda x, b: epmoe.route(x, 2, scoring="relu"), "scoring"),
]


@pytest.mark.parametrize("call,name", BAD_INPUT, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD_INPUT)])
def test_bad_input_raises(call, name):
    logits, bias = make_case(4, 64, 1)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
        call(logits, bias)


@pytest.mark.cuda
def test_bias_on_wrong_device_raises():
    logits, bias = make_case(4, 64, 1, device="cuda")
    with pytest.raises((ValueError, TypeError, RuntimeError), match="bias"):
        epmoe.route(logits, 2, num_groups=8, topk_groups=4, bias=bias.cpu())


# --- CUDA kernel against the CPU op ---------------------------------------------------------------------


def check_cuda_matches_cpu(logits, top_k, **kwargs):
    cpu_weights, cpu_idx = epmoe.route(logits, top_k, **kwargs)
    cuda_kwargs = {key: (v.cuda() if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    weights, idx = epmoe.route(logits.cuda(), top_k, **cuda_kwargs)
    torch.testing.assert_close(idx.cpu(), cpu_idx, rtol=0, atol=0)
    ulp = torch.finfo(torch.float32).eps * cpu_weights.abs()
    diff = (weights.cpu() - cpu_weights).abs()
    assert ((diff <= ulp) | (cpu_weights.isnan() & weights.cpu().isnan())).all(), "weights differ by more than 1 ulp"


@pytest.mark.cuda
@pytest.mark.parametrize("num_experts,top_k,num_groups,topk_groups", SHAPES + [(1024, 32, 1, 1), (1024, 8, 16, 4)])
@pytest.mark.parametrize("scoring,use_bias", [("softmax", False), ("sigmoid", True)])
def test_cuda_matches_cpu(num_experts, top_k, num_groups, topk_groups, scoring, use_bias):
    if use_bias and num_groups > 1 and num_experts // num_groups < 2:
        pytest.skip("bias needs groups of >= 2 experts")
    for num_tokens, dtype in itertools.product((1, 7, 4099), DTYPES):
        logits, bias = make_case(num_tokens, num_experts, num_experts + top_k, dtype)
        logits[0, 0] = float("nan")
        check_cuda_matches_cpu(
            logits, top_k, scoring=scoring, num_groups=num_groups, topk_groups=topk_groups,
            bias=bias if use_bias else None, scaling_factor=2.5,
        )  # fmt: skip


@pytest.mark.cuda
def test_cuda_ties_non_finite_and_determinism():
    zeros = torch.zeros(9, 256)
    check_cuda_matches_cpu(zeros, 8, scoring="sigmoid", num_groups=8, topk_groups=4, bias=torch.zeros(256))
    logits, bias = make_case(8, 64, 31)
    logits[0] = float("nan")
    logits[1, ::2] = float("inf")
    logits[2] = -float("inf")
    check_cuda_matches_cpu(logits, 8, scoring="softmax", num_groups=8, topk_groups=4)
    logits, bias = make_case(32768, 256, 4, device="cuda")
    first = epmoe.route(logits, 8, scoring="sigmoid", num_groups=8, topk_groups=4, bias=bias)
    for _ in range(3):
        again = epmoe.route(logits, 8, scoring="sigmoid", num_groups=8, topk_groups=4, bias=bias)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.cuda
def test_opcheck_cuda():
    for args in opcheck_args("cuda"):
        torch.library.opcheck(torch.ops.epmoe.route.default, args)
