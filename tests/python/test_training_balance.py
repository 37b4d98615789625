"""Balance losses and the aux-loss-free bias update: the DeepSeek-V3 sequence-wise loss, the Switch/GShard global
loss and the router z-loss equal independent formulas (value and gate gradient, 1 and 2 ranks); the bias update
balances a skewed router on 1 and 2 ranks with the same bias everywhere; `.to(dtype)` follows the module."""

from __future__ import annotations

import epmoe
import pytest
import torch
import torch.distributed as dist
from ep_harness import run_ranks
from epmoe import reference
from epmoe.layer import MoE, MoEConfig

H, E, K = 16, 8, 2


def config(**overrides) -> MoEConfig:
    base = dict(hidden_size=H, moe_intermediate_size=8, num_experts=E, top_k=K, scoring="sigmoid", use_bias=True,
                num_shared_experts=1)
    base.update(overrides)
    return MoEConfig(**base)


def formula(cfg: MoEConfig, gate: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The balance terms written out from their definitions, for x [B, S, H] (all sequences of the batch)."""
    batch, seq_len, _ = x.shape
    logits = x.reshape(-1, H).float() @ gate.t()
    _, idx = reference.route_reference(logits.detach(), cfg.top_k, scoring=cfg.scoring, num_groups=cfg.num_groups,
                                       topk_groups=cfg.topk_groups, bias=bias, renormalize=cfg.renormalize,
                                       scaling_factor=cfg.scaling_factor)
    scores = torch.softmax(logits, -1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    p = scores / scores.sum(-1, keepdim=True)
    selected = torch.zeros(logits.shape).scatter_(1, idx.long(), 1.0)  # [T, E] 1 where expert i is in the top-k
    total = torch.zeros(())
    if cfg.aux_loss == "seq":  # DeepSeek-V3 eq. (17)-(20), averaged over sequences
        per_seq = []
        for b in range(batch):
            rows = slice(b * seq_len, (b + 1) * seq_len)
            f = E / (K * seq_len) * selected[rows].sum(0)
            per_seq.append((f * p[rows].mean(0)).sum())
        total = total + cfg.aux_loss_coeff * torch.stack(per_seq).mean()
    elif cfg.aux_loss == "global":  # Switch / GShard over all tokens
        num_tokens = logits.shape[0]
        f = E / (K * num_tokens) * selected.sum(0)
        total = total + cfg.aux_loss_coeff * (f * p.mean(0)).sum()
    if cfg.z_loss_coeff > 0:
        total = total + cfg.z_loss_coeff * (torch.logsumexp(logits, -1) ** 2).mean()
    return total


def inputs(rank: int, batch: int = 3, seq_len: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(40 + rank)
    return torch.randn(batch, seq_len, H, generator=gen) + torch.linspace(-1, 1, H)


CASES = [
    dict(aux_loss="seq", aux_loss_coeff=0.01),
    dict(aux_loss="global", aux_loss_coeff=0.02),
    dict(z_loss_coeff=1e-3),
    dict(aux_loss="seq", aux_loss_coeff=0.01, z_loss_coeff=1e-3, scoring="softmax", use_bias=False),
    dict(aux_loss="global", aux_loss_coeff=0.02, z_loss_coeff=1e-2, num_groups=4, topk_groups=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_balance_losses_equal_formula_and_gradient(case):
    cfg = config(**case)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        if moe.e_score_correction_bias is not None:
            moe.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, E))
    x = inputs(0)
    moe(x)
    gate = moe.gate_weight.detach().clone().requires_grad_(True)
    want = formula(cfg, gate, moe.e_score_correction_bias, x)
    torch.testing.assert_close(moe.aux_loss, want, rtol=1e-5, atol=1e-8)
    moe.aux_loss.backward()
    want.backward()
    torch.testing.assert_close(moe.gate_weight.grad, gate.grad, rtol=1e-4, atol=1e-8)
    # Only the gate: the experts and shared experts get no gradient from the balance terms.
    assert moe.w13.grad is None and moe.w2.grad is None
    assert all(p.grad is None for p in moe.shared_experts.parameters())
    assert torch.equal(epmoe.aux_loss(moe), moe.aux_loss)


def test_aux_loss_is_none_unless_enabled_and_in_training():
    moe = MoE(config())
    moe(inputs(0))
    assert moe.aux_loss is None and epmoe.aux_loss(moe) is None
    moe = MoE(config(aux_loss="seq", aux_loss_coeff=0.01)).eval()
    moe(inputs(0))
    assert moe.aux_loss is None
    moe.train()
    moe(inputs(0))
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad
    # Edge sizes: no tokens, one token, a 2-D input (one sequence).
    for x in (torch.zeros(0, H), torch.randn(1, H), torch.randn(7, H)):
        moe(x)
        assert torch.isfinite(moe.aux_loss)
    two_layers = torch.nn.Sequential(moe, MoE(config(z_loss_coeff=1e-3)))
    two_layers(inputs(0))
    torch.testing.assert_close(epmoe.aux_loss(two_layers), moe.aux_loss + two_layers[1].aux_loss)


def _distributed_losses(rank, world, case):
    cfg = config(**case)
    torch.manual_seed(0)
    moe = MoE(cfg)  # the same logical weights as the single-process layer (seed on rank 0)
    moe(inputs(rank))
    moe.aux_loss.backward()
    epmoe.sync_grads(moe)
    mean = moe.aux_loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / world, moe.gate_weight.grad.tolist()


@pytest.mark.parametrize("case", CASES[:3], ids=["seq", "global", "z"])
def test_balance_losses_on_two_ranks_equal_the_concatenated_batch(case):
    """With sync_grads' contract (mean over ranks), every term equals the single-process value on the
    concatenated batch (the same number of tokens per rank)."""
    results = run_ranks(_distributed_losses, 2, case, timeout=90)
    cfg = config(**case)
    torch.manual_seed(0)
    moe = MoE(cfg)
    gate = moe.gate_weight.detach().clone().requires_grad_(True)
    want = formula(cfg, gate, moe.e_score_correction_bias, torch.cat([inputs(0), inputs(1)]))
    want.backward()
    for value, grad in results.values():
        assert value == pytest.approx(float(want.detach()), rel=1e-5)
        torch.testing.assert_close(torch.tensor(grad), gate.grad, rtol=1e-4, atol=1e-8)


# ---- the aux-loss-free bias update

TOKENS_PER_STEP = 2048


def skewed_layer() -> tuple:
    torch.manual_seed(0)
    moe = MoE(config(bias_update_rate=0.005, num_redundant_experts=2))
    hot = torch.zeros(H)
    hot[0] = 1.0
    with torch.no_grad():
        moe.gate_weight[:2] += 4 * hot  # experts 0 and 1 win most tokens
    return moe, hot


def load_ratio(moe: MoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        _, idx = moe.route(x)
    counts = torch.bincount(idx.reshape(-1).long(), minlength=E).double()
    return float(counts.max() / counts.mean())


def _bias_update(rank, world):
    moe, hot = skewed_layer()
    probe = torch.randn(4096, H, generator=torch.Generator().manual_seed(9)) + hot
    ratios = [load_ratio(moe, probe)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        x = (torch.randn(TOKENS_PER_STEP, H, generator=gen) + hot).chunk(world)[rank]
        with torch.no_grad():
            moe(x)  # a training-mode forward counts the selections
        epmoe.sync_grads(moe)  # applies the update (no backward needed)
    ratios.append(load_ratio(moe, probe))
    return ratios, moe.e_score_correction_bias.tolist()


def test_bias_update_balances_a_skewed_router_on_1_and_2_ranks():
    single_ratios, single_bias = _bias_update(0, 1)
    assert single_ratios[0] >= 3.0
    assert single_ratios[-1] <= 1.5
    results = run_ranks(_bias_update, 2, timeout=120)
    for ratios, bias in results.values():
        # Counts are summed over the ranks: the update, and so the bias, is bitwise the single-process one.
        assert bias == single_bias
        assert ratios == single_ratios


def test_update_bias_explicit_and_counts_restart():
    moe, hot = skewed_layer()
    moe(torch.randn(64, H) + hot)
    before = moe.e_score_correction_bias.clone()
    moe.update_bias()
    step = moe.e_score_correction_bias - before
    assert torch.all(step[:2] == -0.005) and torch.all(step.abs() <= 0.005)
    moe.update_bias()  # nothing routed since the last update: no change
    assert torch.equal(moe.e_score_correction_bias, before + step)
    moe.eval()
    moe(torch.randn(64, H) + hot)  # eval forwards are not counted
    moe.update_bias()
    assert torch.equal(moe.e_score_correction_bias, before + step)
    with pytest.raises(ValueError, match="bias_update_rate"):
        MoE(config()).update_bias()


# ---- the compute dtype follows the module

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_dtype_follows_the_module(dtype):
    torch.manual_seed(0)
    moe = MoE(config(num_redundant_experts=2, aux_loss="seq", aux_loss_coeff=0.01))
    x = inputs(0)
    want = moe(x).detach()
    moe = moe.to(dtype) if dtype == torch.bfloat16 else moe.half()
    assert moe.config.dtype == dtype and moe.w13.dtype == dtype
    assert moe.e_score_correction_bias.dtype == torch.float32  # a selection statistic stays fp32
    got = moe(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    (got.float().square().mean() + moe.aux_loss).backward()
    epmoe.sync_grads(moe)
    assert moe.w13.grad.dtype == dtype
    moe.float()
    torch.testing.assert_close(moe(x), want, rtol=0.05, atol=0.05)
