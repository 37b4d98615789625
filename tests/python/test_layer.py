"""The EP MoE layer on 1, 2 and 4 gloo ranks: equal to the single-process reference (forward and gradients),
unchanged by an EPLB rebalance, checkpoints portable across EP sizes, a tiny training loop identical at EP=1 and
EP=2, and bad configurations rejected."""

from __future__ import annotations

import epmoe
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ep_harness import run_ranks
from epmoe import reference
from epmoe.layer import MoE, MoEConfig

HIDDEN, INTER = 32, 16


def small_config(**overrides) -> MoEConfig:
    """A DeepSeek-V3-style layer: sigmoid + bias, 4 groups of 4 (2 kept), top-4, one shared expert."""
    base = dict(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=16, top_k=4, scoring="sigmoid", num_groups=4,
        topk_groups=2, use_bias=True, renormalize=True, scaling_factor=2.5, num_shared_experts=1,
    )
    base.update(overrides)
    return MoEConfig(**base)


def full_weights(cfg: MoEConfig, seed: int = 0) -> dict:
    """Logical weights of the whole layer, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    weights = {
        "gate": torch.randn(cfg.num_experts, cfg.hidden_size, generator=gen) / cfg.hidden_size**0.5,
        "w13": torch.randn(cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size, generator=gen) / 6,
        "w2": torch.randn(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, generator=gen) / 4,
        "bias": 0.1 * torch.randn(cfg.num_experts, generator=gen) if cfg.use_bias else None,
        "shared": None,
    }
    if cfg.shared_size:
        weights["shared"] = [torch.randn(cfg.shared_size, cfg.hidden_size, generator=gen) / 6,
                             torch.randn(cfg.shared_size, cfg.hidden_size, generator=gen) / 6,
                             torch.randn(cfg.hidden_size, cfg.shared_size, generator=gen) / 4]
    return weights


def build_layer(cfg: MoEConfig, weights: dict, process_group=None) -> MoE:
    moe = MoE(cfg, process_group)
    with torch.no_grad():
        moe.gate_weight.copy_(weights["gate"])
        if weights["bias"] is not None:
            moe.e_score_correction_bias.copy_(weights["bias"])
        moe.load_logical_experts(weights["w13"], weights["w2"])
        if weights["shared"] is not None:
            projs = (moe.shared_experts.gate_proj, moe.shared_experts.up_proj, moe.shared_experts.down_proj)
            for lin, w in zip(projs, weights["shared"], strict=True):
                lin.weight.copy_(w)
    return moe


def reference_layer(cfg: MoEConfig, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """Pure-torch single-process layer over all logical experts (differentiable in the weights)."""
    logits = F.linear(x.float(), weights["gate"])
    topk_weights, topk_idx = reference.route_reference(
        logits, cfg.top_k, scoring=cfg.scoring, num_groups=cfg.num_groups, topk_groups=cfg.topk_groups,
        bias=weights["bias"], renormalize=cfg.renormalize, scaling_factor=cfg.scaling_factor,
    )
    out = reference.experts_forward_reference(x, topk_idx, topk_weights, weights["w13"], weights["w2"])
    if weights["shared"] is not None:
        g, u, d = weights["shared"]
        out = out + F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
    return out


def tokens(rank: int, num_tokens: int, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + rank)
    return torch.randn(num_tokens, HIDDEN, generator=gen)


def tokens_per_rank(rank: int, world: int) -> int:
    # Uneven, and the last rank of a multi-rank world has no tokens at all.
    return 0 if world > 1 and rank == world - 1 else 24 + 8 * rank


def _forward_backward(rank, world, redundant):
    cfg = small_config(num_redundant_experts=redundant)
    weights = full_weights(cfg)
    moe = build_layer(cfg, weights)
    x = tokens(rank, tokens_per_rank(rank, world)).requires_grad_(True)
    grad_out = tokens(rank + 100, x.shape[0])
    out = moe(x)
    (out * grad_out).sum().backward()
    if moe.distributed:  # raw gradients (before epmoe.sync_grads): the gate's summed over the ranks
        dist.all_reduce(moe.gate_weight.grad)

    # Reference: every rank's tokens through the full layer in one process.
    ref_weights = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) and k in ("gate", "w13", "w2")
                       else v) for k, v in weights.items()}
    all_x = [tokens(r, tokens_per_rank(r, world)).requires_grad_(True) for r in range(world)]
    all_g = [tokens(r + 100, tokens_per_rank(r, world)) for r in range(world)]
    ref_out = [reference_layer(cfg, ref_weights, xr) for xr in all_x]
    sum((o * g).sum() for o, g in zip(ref_out, all_g, strict=True)).backward()

    torch.testing.assert_close(out, ref_out[rank], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, all_x[rank].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe.gate_weight.grad, ref_weights["gate"].grad, rtol=1e-4, atol=1e-5)
    # An expert's gradient is split over its replicas: their sum is the reference gradient.
    experts = moe.local_slot_experts()
    grads = torch.zeros_like(ref_weights["w13"]), torch.zeros_like(ref_weights["w2"])
    grads[0].index_add_(0, experts, moe.w13.grad)
    grads[1].index_add_(0, experts, moe.w2.grad)
    if moe.distributed:
        dist.all_reduce(grads[0])
        dist.all_reduce(grads[1])
    torch.testing.assert_close(grads[0], ref_weights["w13"].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], ref_weights["w2"].grad, rtol=1e-4, atol=1e-5)
    return True


def test_layer_single_process_matches_reference():
    assert _forward_backward(0, 1, redundant=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_inference_runs_the_shared_expert_in_the_fused_op(dtype):
    """Under no_grad the single-process layer runs routed and shared experts in one op: equal to the fused routed op
    plus the shared expert as a one-slot routed expert, close to the reference; a hook on the shared experts (or a
    wrapped projection) keeps the module call, so it still fires."""
    cfg = small_config(dtype=dtype)
    weights = full_weights(cfg)
    moe = build_layer(cfg, weights).eval()
    x = tokens(0, 40).to(dtype)
    with torch.no_grad():
        out = moe(x)
        topk_weights, topk_idx = moe.route(x)
        slot_idx = epmoe.eplb.map_to_physical(topk_idx, moe.placement, 0, token_offset=0)
        routed = epmoe.experts_forward(x, slot_idx, topk_weights, moe.w13, moe.w2)
        se = moe.shared_experts
        w13_shared = torch.cat([se.gate_proj.weight, se.up_proj.weight])[None]
        shared = epmoe.experts_forward(x, torch.zeros(40, 1, dtype=torch.int32), torch.ones(40, 1), w13_shared,
                                       se.down_proj.weight[None])
    assert out.dtype == dtype and torch.equal(out, routed + shared)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.float(), moe(x).detach().float(), **tol)  # the autograd path
    torch.testing.assert_close(out.float(), reference_layer(cfg, weights, x.float()), **tol)
    calls = []
    handle = se.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        hooked = moe(x)
    handle.remove()
    assert calls == [1]
    torch.testing.assert_close(hooked.float(), out.float(), **tol)


@pytest.mark.parametrize("world,redundant", [(2, 0), (2, 2), (4, 4)])
def test_layer_ep_matches_reference(world, redundant):
    results = run_ranks(_forward_backward, world, redundant, timeout=120)
    assert all(results.values())


def _rebalance(rank, world):
    cfg = small_config(num_redundant_experts=world, eplb_window=4)
    weights = full_weights(cfg)
    moe = build_layer(cfg, weights).eval()
    # Skewed tokens: a shared direction that the gate favours for a few experts.
    x = tokens(rank, 64) + 3.0 * weights["gate"][:3].sum(0)
    with torch.no_grad():
        before = moe(x)
        stats = moe.rebalance()
        after = moe(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert stats["balancedness_after"] >= stats["balancedness_before"]
    # Every slot holds its logical expert's weights after the move.
    experts = moe.local_slot_experts()
    assert torch.equal(moe.w13.detach(), weights["w13"][experts])
    assert torch.equal(moe.w2.detach(), weights["w2"][experts])
    return stats


def test_rebalance_leaves_outputs_unchanged():
    stats = run_ranks(_rebalance, 2, timeout=90)
    assert stats[0]["balancedness_after"] > stats[0]["balancedness_before"]
    assert stats[0]["bytes_moved"] + stats[1]["bytes_moved"] > 0


def _save(rank, world, folder):
    cfg = small_config(num_redundant_experts=4)
    moe = build_layer(cfg, full_weights(cfg))
    torch.save(moe.state_dict(), f"{folder}/rank{rank}.pt")
    x = tokens(rank, 16)
    with torch.no_grad():
        return moe(x)


def _load(rank, world, folder, num_files):
    cfg = small_config(num_redundant_experts=0 if world == 1 else 2)
    moe = MoE(cfg)  # fresh random weights, overwritten by the checkpoint
    merged = {}
    for r in range(num_files):
        merged.update(torch.load(f"{folder}/rank{r}.pt"))
    missing, unexpected = moe.load_state_dict(merged, strict=True)
    assert not missing and not unexpected
    outs = []
    with torch.no_grad():
        for r in range(num_files):
            outs.append(moe(tokens(r, 16)))
    return outs


def test_checkpoint_ep4_loads_at_ep2_and_ep1(tmp_path):
    saved = run_ranks(_save, 4, str(tmp_path), timeout=120)
    at_ep2 = run_ranks(_load, 2, str(tmp_path), 4, timeout=90)
    at_ep1 = _load(0, 1, str(tmp_path), 4)
    for r in range(4):
        torch.testing.assert_close(at_ep2[0][r], saved[r], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(at_ep1[r], saved[r], rtol=1e-5, atol=1e-5)


def _train(rank, world, steps):
    cfg = small_config(num_redundant_experts=0)
    moe = build_layer(cfg, full_weights(cfg))
    opt = torch.optim.SGD(moe.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        batch = [tokens(1000 * step + r, 16) for r in range(2)]
        target = [tokens(2000 * step + r, 16) for r in range(2)]
        # EP=2: each rank its half of the batch; EP=1: the whole batch. Loss = mean over the halves.
        mine = range(2) if world == 1 else [rank]
        loss = sum(((moe(batch[i]) - target[i]) ** 2).sum() for i in mine) / len(mine)
        opt.zero_grad()
        loss.backward()
        epmoe.sync_grads(moe)
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def test_training_loop_identical_at_ep1_and_ep2():
    ep1 = _train(0, 1, steps=4)
    ep2 = run_ranks(_train, 2, 4, timeout=90)[0]
    assert ep1[-1] < ep1[0]
    assert ep2 == pytest.approx(ep1, rel=1e-5)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="top_k"):
        MoE(small_config(top_k=9))  # only 2 groups x 4 experts are candidates
    with pytest.raises(ValueError, match="scoring"):
        MoE(small_config(scoring="relu"))
    with pytest.raises(ValueError, match="num_groups"):
        MoE(small_config(num_experts=18))
    with pytest.raises(ValueError, match="hidden_size"):
        MoE(small_config())(torch.randn(4, HIDDEN + 1))


def _not_divisible(rank, world):
    with pytest.raises(ValueError, match="divisible by the EP size"):
        MoE(small_config(num_experts=6, num_groups=1, topk_groups=1, use_bias=False))
    return True


def _mismatched(rank, world):
    # Ranks that disagree on the number of slots must fail on every rank, not hang or mix data.
    cfg = small_config(num_redundant_experts=0 if rank == 0 else 2)
    moe = MoE(cfg)
    with pytest.raises((RuntimeError, ValueError), match="disagree"):
        moe(tokens(rank, 8))
    return True


def test_bad_configs_across_ranks_raise():
    assert all(run_ranks(_not_divisible, 4, timeout=60).values())
    assert all(run_ranks(_mismatched, 2, timeout=60).values())


def test_exported_names():
    assert epmoe.MoE is MoE and epmoe.MoEConfig is MoEConfig


def _init_logical_weights(rank, world, redundant):
    # Only rank 0's RNG state may matter: every other rank starts from a different seed.
    torch.manual_seed(1234 if rank == 0 else 99 + rank)
    cfg = small_config(num_redundant_experts=redundant)
    moe = MoE(cfg)
    experts = moe.local_slot_experts().tolist()
    return {
        "gate": moe.gate_weight.detach().clone(),
        "shared": moe.shared_experts.down_proj.weight.detach().clone(),
        "experts": {e: (moe.w13[s].detach().clone(), moe.w2[s].detach().clone()) for s, e in enumerate(experts)},
    }


def test_initialisation_is_ep_size_invariant_and_seed_safe():
    torch.manual_seed(1234)
    single = MoE(small_config())
    for world, redundant in ((2, 2), (4, 0)):
        results = run_ranks(_init_logical_weights, world, redundant)
        for got in results.values():
            assert torch.equal(got["gate"], single.gate_weight.detach())
            assert torch.equal(got["shared"], single.shared_experts.down_proj.weight.detach())
            for expert, (w13, w2) in got["experts"].items():
                assert torch.equal(w13, single.w13[expert].detach()), expert
                assert torch.equal(w2, single.w2[expert].detach()), expert
