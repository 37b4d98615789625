"""Training a sharded transformers model: `output_router_logits=True` returns the router logits per MoE layer
and the model's own load-balancing loss equals the unsharded model's on each rank's tokens; `model.to(dtype)`
converts the epmoe layers; the epmoe parameters are excluded from DDP."""

from __future__ import annotations

import copy

import epmoe
import pytest
import torch
import torch.distributed as dist
from ep_harness import run_ranks

transformers = pytest.importorskip("transformers")

from epmoe.integrations.transformers import shard_model  # noqa: E402
from epmoe.layer import MoE  # noqa: E402
from test_layer_hf import CONFIGS, randomized_model  # noqa: E402
from test_transformers_experts import mixtral_config  # noqa: E402

CONFIGS.setdefault("mixtral_model", lambda: mixtral_config(num_key_value_heads=2))  # a whole model runs attention


def _router_logits(rank, world):
    for name in ("qwen3_moe", "mixtral_model", "deepseek_v3"):  # one spawn for the three models
        _check_router_logits(rank, name)
    return True


def _check_router_logits(rank, name):
    model = randomized_model(name)
    model.config.router_aux_loss_coef = 0.05
    sharded = shard_model(copy.deepcopy(model), dist.group.WORLD, num_redundant_experts="auto")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3 + rank))
    ref = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    out = sharded(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    num_moe = sum(isinstance(m, MoE) for m in sharded.modules())
    assert len(out.router_logits) == len(ref.router_logits) == num_moe
    for got, want in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    if ref.aux_loss is not None:  # Qwen3-MoE and Mixtral add the Switch loss of this rank's tokens
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    gates = [m.gate_weight.grad for m in sharded.modules() if isinstance(m, MoE)]
    routers = [m.weight.grad for m in model.modules() if hasattr(m, "top_k") and hasattr(m, "weight")]
    for got, want in zip(gates, routers[-len(gates):], strict=True):  # the aux loss reaches the gate
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)
    # No output capture requested: nothing recorded, nothing breaks.
    assert not sharded(input_ids=input_ids).router_logits
    # DDP leaves the epmoe parameters and buffers to sync_grads, and only them.
    owned = {f"{prefix}.{n}" for prefix, m in sharded.named_modules() if isinstance(m, MoE)
             for n, _ in (*m.named_parameters(), *m.named_buffers())}
    assert set(sharded._ddp_params_and_buffers_to_ignore) == owned


def test_output_router_logits_on_sharded_model():
    assert all(run_ranks(_router_logits, 2, timeout=180).values())


def test_sharded_model_follows_dtype():
    model = randomized_model("qwen3_moe")
    sharded = shard_model(copy.deepcopy(model))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    want = model.to(torch.bfloat16)(input_ids=input_ids).logits
    got = sharded.to(torch.bfloat16)(input_ids=input_ids).logits
    assert got.dtype == torch.bfloat16
    for moe in (m for m in sharded.modules() if isinstance(m, MoE)):
        assert moe.w13.dtype == moe.config.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    out = sharded.half()(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    epmoe.sync_grads(sharded)
    assert all(m.w13.grad.dtype == torch.float16 for m in sharded.modules() if isinstance(m, MoE))
