"""The transformers "epmoe" experts backend against transformers' own eager experts (modules and whole models)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from epmoe.integrations import transformers as epmoe_transformers  # noqa: E402

epmoe_transformers.register()

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def qwen3_moe_config(**kw):
    return transformers.Qwen3MoeConfig(
        **TINY,
        num_key_value_heads=2,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=6,
        num_experts_per_tok=2,
        head_dim=16,
        **kw,
    )


def deepseek_v3_config(**kw):
    return transformers.DeepseekV3Config(
        **TINY,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        **kw,
    )


def deepseek_v2_config(**kw):
    return transformers.DeepseekV2Config(
        **TINY,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        **kw,
    )


def mixtral_config(**kw):
    return transformers.MixtralConfig(**TINY, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2, **kw)


def experts_module(config):
    """The (only) experts module of a fresh model built from config, with random weights."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    assert experts, "no experts module found"
    module = experts[-1]
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.2)
        module.down_proj.normal_(0, 0.2)
    return module


@pytest.mark.parametrize("make_config", [qwen3_moe_config, deepseek_v3_config, deepseek_v2_config, mixtral_config])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_module_matches_eager(make_config, dtype):
    module = experts_module(make_config()).to(dtype)
    num_experts = module.gate_up_proj.shape[0]
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_topk = 40, 2
    x = torch.randn(num_tokens, module.gate_up_proj.shape[2], generator=gen).to(dtype)
    ids = torch.rand(num_tokens, num_experts, generator=gen).topk(num_topk, -1).indices  # int64, as HF routers give
    weights = torch.rand(num_tokens, num_topk, generator=gen).to(dtype)

    def run(impl):
        module.config._experts_implementation = impl
        xr, wr = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = module(xr, ids, wr)
        grads = torch.autograd.grad(out.float().square().sum(), [xr, wr, module.gate_up_proj, module.down_proj])
        return out, grads

    out, grads = run("epmoe")
    ref, ref_grads = run("eager")
    assert out.dtype == dtype
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(out, ref, **tol)
    for name, g, r in zip(("x", "top_k_weights", "gate_up_proj", "down_proj"), grads, ref_grads, strict=True):
        scale = max(float(r.float().abs().max()), 1.0)
        torch.testing.assert_close(g.float() / scale, r.float() / scale, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("make_config", [qwen3_moe_config, deepseek_v3_config])
def test_whole_model_matches_eager(make_config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(), experts_implementation="epmoe")
    assert model.config._experts_implementation == "epmoe"
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = run()
    model.set_experts_implementation("eager")
    ref_logits, ref_grads = run()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    assert any("gate_up_proj" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], atol=1e-5, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_unsupported_experts_raise():
    module = experts_module(qwen3_moe_config())
    module.config._experts_implementation = "epmoe"
    x = torch.randn(4, 64)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    weights = torch.ones(4, 2)
    module.has_bias = True
    with pytest.raises(NotImplementedError, match="bias"):
        module(x, ids, weights)
    module.has_bias = False
    module.is_concatenated = False
    with pytest.raises(NotImplementedError, match="interleaved"):
        module(x, ids, weights)
    module.is_concatenated = True
    module.config.hidden_act = "gelu"
    with pytest.raises(NotImplementedError, match="activation 'gelu'"):
        module(x, ids, weights)
