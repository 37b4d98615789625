"""The one-process inference forward (grad mode off): the layer calls `torch.ops.epmoe.fused_moe_forward` (routing,
replica choice, load count, routed + shared experts in one op) and its result, recorded load and router-logits
capture are those of the general path, bit for bit, for every routing style, dtype, token count and placement; the
op itself equals the composition of the four ops it replaces and passes torch.library's schema checks."""

from __future__ import annotations

import copy

import epmoe
import pytest
import torch
from epmoe import eplb
from epmoe.layer import MoE
from test_layer import build_layer, full_weights, small_config, tokens

CONFIGS = {
    "deepseek_v3": {},  # sigmoid + bias, grouped top-k, one shared expert
    "no_shared": {"num_shared_experts": 0},
    "qwen3": {"scoring": "softmax", "num_groups": 1, "topk_groups": 1, "use_bias": False, "scaling_factor": 1.0,
              "num_shared_experts": 0},
    "mixtral_unnormalized": {"scoring": "softmax", "num_groups": 1, "topk_groups": 1, "use_bias": False,
                             "renormalize": False, "scaling_factor": 1.0, "top_k": 2},
    "redundant": {"num_redundant_experts": 4},  # replicas: the hash picks a copy per (token, slot)
}


def general_path(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the layer computes without the fused op: the public pieces in its order; (out, slot_idx)."""
    logits = moe.router_logits(x)
    topk_weights, topk_idx = moe.route(x, logits)
    slot_idx = eplb.map_to_physical(topk_idx, moe.placement, moe.layer_idx, token_offset=0, policy="hash")
    se = moe.shared_experts
    shared = () if se is None else (se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight)
    out = epmoe.experts.fused_experts_forward(x.to(moe.w13.dtype), slot_idx, topk_weights, moe.w13, moe.w2,
                                              shared=shared)
    return out.to(x.dtype), slot_idx


def recorded(moe: MoE) -> torch.Tensor:
    return moe.recorder.window_load().sum(0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [0, 1, 8, 67])
def test_inference_forward_is_the_general_path_bitwise(name, dtype, num_tokens):
    cfg = small_config(dtype=dtype, **CONFIGS[name])
    moe = build_layer(cfg, full_weights(cfg)).eval()
    moe.layer_idx = 5 if name == "redundant" else 0  # the layer index salts the replica hash
    x = tokens(0, num_tokens).to(dtype)
    with torch.no_grad():
        want, slot_idx = general_path(moe, x)
        before = recorded(moe).clone()
        got = moe(x.reshape(1, num_tokens, cfg.hidden_size))  # any leading shape
    assert got.shape == (1, num_tokens, cfg.hidden_size) and got.dtype == dtype
    assert torch.equal(got.reshape(num_tokens, cfg.hidden_size), want)
    # The step's load: exactly the slots the general path routes to.
    counts = torch.bincount(slot_idx.flatten().long(), minlength=cfg.num_slots)
    assert torch.equal(recorded(moe) - before, counts)
    assert moe.recorder.num_steps == 1
    assert moe.aux_loss is None


def test_inference_forward_under_inference_mode_and_on_fp32_input_to_a_bf16_layer():
    cfg = small_config(dtype=torch.bfloat16)
    moe = build_layer(cfg, full_weights(cfg)).eval()
    x = tokens(0, 9)
    with torch.no_grad():
        want, _ = general_path(moe, x)
    with torch.inference_mode():
        got = moe(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_inference_forward_skips_recording_when_disabled():
    cfg = small_config(record_load=False)
    moe = build_layer(cfg, full_weights(cfg)).eval()
    with torch.no_grad():
        moe(tokens(0, 8))
    assert moe.recorder.num_steps == 0 and int(recorded(moe).sum()) == 0


def test_training_mode_without_balance_terms_takes_the_fused_op_and_with_them_the_general_path(monkeypatch):
    calls = []
    real = torch.ops.epmoe.fused_moe_forward

    class Spy:
        def __call__(self, *args):
            calls.append(1)
            return real(*args)

    monkeypatch.setattr(torch.ops.epmoe, "fused_moe_forward", Spy())
    x = tokens(0, 16)
    plain = build_layer(small_config(), full_weights(small_config()))  # training mode, no aux loss
    with torch.no_grad():
        want, _ = general_path(plain, x)
        assert torch.equal(plain(x), want)
    assert calls == [1] and plain.aux_loss is None
    cfg = small_config(aux_loss="seq", aux_loss_coeff=0.01)
    balanced = build_layer(cfg, full_weights(cfg))
    with torch.no_grad():
        out = balanced(x)
    assert calls == [1]  # the general path: a training forward computes its balance terms
    assert balanced.aux_loss is not None and torch.equal(out, want)
    with torch.no_grad():
        balanced.eval()(x)
    assert calls == [1, 1] and balanced.aux_loss is None


def test_hooked_shared_experts_and_other_policies_take_the_general_path():
    cfg = small_config(num_redundant_experts=4)
    moe = build_layer(cfg, full_weights(cfg)).eval()
    x = tokens(0, 12)
    with torch.no_grad():
        want, _ = general_path(moe, x)
        fired = []
        handle = moe.shared_experts.register_forward_hook(lambda *args: fired.append(1))
        assert moe._forward_inference(x) is None
        torch.testing.assert_close(moe(x), want, rtol=1e-6, atol=1e-6)
        handle.remove()
        assert fired == [1]
        moe.config.replica_policy = "weighted"
        assert moe._forward_inference(x) is None
        weighted = moe(x)
    torch.testing.assert_close(weighted, want, rtol=1e-5, atol=1e-5)  # another copy, same expert


@pytest.mark.cuda
def test_inference_forward_on_cuda_matches_cpu():
    cfg = small_config(num_redundant_experts=4)
    moe = build_layer(cfg, full_weights(cfg)).eval()
    dev = copy.deepcopy(moe).cuda()
    x = tokens(0, 33)
    with torch.no_grad():
        want = moe(x)
        got = dev(x.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert int(recorded(dev).sum()) == int(recorded(moe).sum()) == 33 * cfg.top_k


def test_fused_moe_forward_op_is_the_composition_of_its_ops():
    cfg = small_config(num_redundant_experts=4)
    moe = build_layer(cfg, full_weights(cfg)).eval()
    x = tokens(0, 20)
    se = moe.shared_experts
    shared = (se.gate_proj.weight.detach(), se.up_proj.weight.detach(), se.down_proj.weight.detach())
    bias = moe.e_score_correction_bias
    with torch.no_grad():
        logits = moe.router_logits(x)
    args = (x, logits, cfg.top_k, cfg.scoring, cfg.num_groups, cfg.topk_groups, bias, cfg.renormalize,
            cfg.scaling_factor, moe._log2phy, moe._logcnt, 5 << 24, 3, moe.w13.detach(), moe.w2.detach())
    counts = torch.zeros(cfg.num_slots, dtype=torch.int64)
    out = torch.ops.epmoe.fused_moe_forward(*args, counts, *shared)
    topk_weights, topk_idx = torch.ops.epmoe.route(logits, cfg.top_k, cfg.scoring, cfg.num_groups, cfg.topk_groups,
                                                   bias, cfg.renormalize, cfg.scaling_factor)
    slot_idx = torch.ops.epmoe.replica_hash(topk_idx, moe._log2phy, moe._logcnt, 5 << 24, 3)
    want = torch.ops.epmoe.fused_experts_forward(x, slot_idx, topk_weights, moe.w13.detach(), moe.w2.detach(), None,
                                                 *shared)
    assert torch.equal(out, want)
    assert torch.equal(counts, torch.bincount(slot_idx.flatten().long(), minlength=cfg.num_slots))
    assert torch.equal(torch.ops.epmoe.fused_moe_forward(*args), torch.ops.epmoe.fused_experts_forward(
        x, slot_idx, topk_weights, moe.w13.detach(), moe.w2.detach(), None))
    torch.library.opcheck(torch.ops.epmoe.fused_moe_forward, (*args, counts.clone(), *shared))


def test_fused_moe_forward_op_reports_the_bad_argument():
    cfg = small_config()
    moe = build_layer(cfg, full_weights(cfg)).eval()
    x = tokens(0, 4)
    logits = torch.randn(4, cfg.num_experts)
    ok = dict(top_k=cfg.top_k, scoring="sigmoid", num_groups=4, topk_groups=2, bias=moe.e_score_correction_bias)

    def call(**kw):
        a = {**ok, **kw}
        return torch.ops.epmoe.fused_moe_forward(x, a.get("logits", logits), a["top_k"], a["scoring"],
                                                 a["num_groups"], a["topk_groups"], a["bias"], True, 1.0,
                                                 moe._log2phy, moe._logcnt, 0, 0, moe.w13.detach(),
                                                 a.get("w2", moe.w2.detach()))

    with pytest.raises(ValueError, match="scoring"):
        call(scoring="relu")
    with pytest.raises(ValueError, match="top_k|candidates"):
        call(top_k=cfg.num_experts + 1)
    with pytest.raises(ValueError, match="router_logits"):
        call(logits=torch.randn(4, cfg.num_experts, 2))
    with pytest.raises((ValueError, RuntimeError), match="w2"):
        call(w2=moe.w2.detach()[:, :, :3].contiguous())


def test_transformers_output_router_logits_at_inference():
    """A sharded one-process transformers model in eval mode under no_grad (the fused op) returns the logits and
    the router logits of the unsharded model."""
    pytest.importorskip("transformers")
    from epmoe.integrations.transformers import shard_model
    from test_layer_hf import randomized_model

    model = randomized_model("deepseek_v3").eval()
    sharded = shard_model(copy.deepcopy(model)).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=input_ids, output_router_logits=True)
        out = sharded(input_ids=input_ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for got, want in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_torch_compile_of_the_layer():
    """torch.compile wraps a model holding epmoe layers (the DDP-name hook sees the wrapper before its module is
    set); the compiled inference forward equals the eager one bit for bit and still records the load, and the
    compiled training forward and backward equal the eager ones."""
    cfg = small_config(num_redundant_experts=4)
    moe = build_layer(cfg, full_weights(cfg)).eval()
    x = tokens(0, 8)
    with torch.no_grad():
        want = moe(x)
        got = torch.compile(moe, backend="aot_eager")(x)
    assert torch.equal(got, want)
    assert moe.recorder.num_steps == 2 and int(recorded(moe).sum()) == 2 * 8 * cfg.top_k
    moe.train()
    xg = x.clone().requires_grad_(True)
    moe(xg).sum().backward()
    grads = [p.grad.clone() for p in (moe.w13, moe.w2, moe.gate_weight)]
    moe.zero_grad()
    out = torch.compile(moe, backend="aot_eager")(xg)
    out.sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for p, g in zip((moe.w13, moe.w2, moe.gate_weight), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
