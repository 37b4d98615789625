"""`epmoe.MoE.from_hf` and `shard_model` against the transformers modules they replace, on 2 gloo ranks: the same
outputs and gradients as the unsharded block/model (each rank feeds its own tokens)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from ep_harness import run_ranks

transformers = pytest.importorskip("transformers")

from epmoe.integrations.transformers import moe_from_hf, shard_model  # noqa: E402
from epmoe.layer import MoE  # noqa: E402
from test_transformers_experts import (  # noqa: E402
    deepseek_v2_config,
    deepseek_v3_config,
    mixtral_config,
    qwen3_moe_config,
)

CONFIGS = {
    "deepseek_v3": deepseek_v3_config,
    "deepseek_v2": lambda: deepseek_v2_config(topk_method="group_limited_greedy", n_group=2, topk_group=1),
    "qwen3_moe": qwen3_moe_config,
    "mixtral": mixtral_config,
}


def randomized_model(name: str):
    """A tiny model with random router, bias and expert weights, identical on every rank (seeded)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), experts_implementation="eager")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gate_up_proj"):
                module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=gen) * 0.2)
                module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=gen) * 0.2)
            if hasattr(module, "top_k") and hasattr(module, "weight"):  # routers
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.5)
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.rand(module.e_score_correction_bias.shape, generator=gen))
    return model


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith(("MoE", "Moe", "SparseMoeBlock"))]


def _block_matches(rank, world, name):
    block = moe_blocks(randomized_model(name))[-1]
    moe = MoE.from_hf(block, num_redundant_experts="auto")
    assert moe.num_ranks == world and moe.w13.shape[0] == moe.config.num_slots // world
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(2, 5 + 3 * rank, block.experts.gate_up_proj.shape[-1], generator=gen)
    x_ref = x.clone().requires_grad_(True)
    x_ep = x.clone().requires_grad_(True)
    ref = block(x_ref)
    out = moe(x_ep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=gen)
    (ref * grad).sum().backward()
    (out * grad).sum().backward()
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    return True


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_from_hf_block_matches_transformers(name):
    assert all(run_ranks(_block_matches, 2, name, timeout=120).values())


def _sharded_model_matches(rank, world, name):
    model = randomized_model(name)
    sharded = shard_model(copy.deepcopy(model), dist.group.WORLD)
    assert len(moe_blocks(model)) == sum(isinstance(m, MoE) for m in sharded.modules())
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(20 + rank))
    ref = model(input_ids=input_ids, labels=input_ids)
    out = sharded(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    # Replicated (non-expert) parameters: this rank's loss only reaches them through this rank's tokens.
    ref_params = dict(model.named_parameters())
    for pname, p in sharded.named_parameters():
        if pname in ref_params and p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)
    # Expert weights: a slot's gradient sums every rank's loss; compare with the unsharded grads summed over ranks.
    for (bname, block), moe in zip(
        [(n, m) for n, m in model.named_modules() if m in moe_blocks(model)],
        [m for m in sharded.modules() if isinstance(m, MoE)],
        strict=True,
    ):
        total = block.experts.gate_up_proj.grad.clone()
        dist.all_reduce(total)
        experts = moe.local_slot_experts()
        torch.testing.assert_close(moe.w13.grad, total[experts], rtol=1e-4, atol=1e-6, msg=bname)
    return True


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_shard_model_matches_unsharded(name):
    assert all(run_ranks(_sharded_model_matches, 2, name, timeout=150).values())


def test_unsupported_block_raises():
    with pytest.raises(ValueError, match="unsupported MoE block"):
        moe_from_hf(torch.nn.Linear(4, 4))
    block = moe_blocks(randomized_model("qwen3_moe"))[-1]
    block.experts.config.hidden_act = "gelu"
    with pytest.raises(NotImplementedError, match="activation"):
        moe_from_hf(block)
