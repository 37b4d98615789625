"""Rebalancing at safe points: `rebalance(optimizer=)` between backward and step (before or after sync_grads) gives
the same next step as no rebalance; weights, .grad and Adam's moments move with their expert; outputs do not
change whatever the ranks' RNG states; `rebalance_model` plans all layers at once; `apply_placement`; logging."""

from __future__ import annotations

import logging

import epmoe
import pytest
import torch
import torch.distributed as dist
from ep_harness import run_ranks
from epmoe import eplb
from epmoe.layer import MoE, MoEConfig

H, E = 16, 8


def config(**overrides) -> MoEConfig:
    base = dict(hidden_size=H, moe_intermediate_size=8, num_experts=E, top_k=2, scoring="sigmoid", use_bias=True,
                num_shared_experts=1, num_redundant_experts=4, eplb_window=8)
    base.update(overrides)
    return MoEConfig(**base)


def skewed(step: int, rank: int, num_tokens: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(num_tokens, H, generator=gen) + torch.linspace(-1.5, 2.5, H)


def by_expert(moe: MoE, t: torch.Tensor) -> dict:
    """{logical expert: tensor of its first local slot} for a per-slot tensor t [num_local_slots, ...]."""
    out = {}
    for slot, expert in enumerate(moe.local_slot_experts().tolist()):
        out.setdefault(expert, t[slot].detach().clone())
    return out


def gathered(moe: MoE, t: torch.Tensor) -> dict:
    mine = {e: v.tolist() for e, v in by_expert(moe, t).items()}
    if not moe.distributed:
        return mine
    parts = [None] * moe.num_ranks
    dist.all_gather_object(parts, mine, group=moe.group)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _next_step_unchanged(rank, world):
    for order in ("after_sync", "before_sync"):
        _compare_with_and_without_rebalance(rank, world, order)
    return True


def _compare_with_and_without_rebalance(rank, world, order):
    torch.manual_seed(1234 if rank == 0 else 7 + rank)
    moved = MoE(config())
    torch.manual_seed(1234 if rank == 0 else 70 + rank)
    kept = MoE(config())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-6) for m in (moved, kept)]  # eps: see test_training
    for step in range(4):
        x = skewed(step, rank)
        for moe, opt in zip((moved, kept), opts, strict=True):
            opt.zero_grad()
            loss = moe(x).square().mean()
            loss.backward()
            if moe is moved and step == 2 and order == "before_sync":
                stats = moe.rebalance(optimizer=opt)  # raw gradients move too
            epmoe.sync_grads(moe)
            if moe is moved and step == 2 and order == "after_sync":
                stats = moe.rebalance(optimizer=opt)
            opt.step()
    assert stats["bytes_moved"] > 0 or world == 1
    assert moved.placement != kept.placement
    for name in ("w13", "w2"):
        a, b = getattr(moved, name), getattr(kept, name)
        assert _close(gathered(moved, a), gathered(kept, b))
        for key in ("exp_avg", "exp_avg_sq"):  # the moments moved with their expert
            assert _close(gathered(moved, opts[0].state[a][key]), gathered(kept, opts[1].state[b][key]))
    with torch.no_grad():
        x = skewed(9, rank)
        torch.testing.assert_close(moved(x), kept(x), rtol=1e-5, atol=1e-6)


def _close(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=1e-5, atol=1e-7)
    return True


def test_rebalance_between_backward_and_step_keeps_the_next_step():
    """Both orders: backward, sync_grads, rebalance, step and backward, rebalance, sync_grads, step."""
    assert _next_step_unchanged(0, 1)
    assert all(run_ranks(_next_step_unchanged, 2, timeout=120).values())


def _outputs_unchanged(rank, world):
    torch.manual_seed(1234 if rank == 0 else 5 + 11 * rank)  # the other ranks' RNG states must not matter
    moe = MoE(config(num_redundant_experts=2 * world))
    torch.manual_seed(1234)
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    single = MoE(config(num_redundant_experts=0), alone)  # a group of one rank: the EP=1 layer
    with torch.no_grad():
        for step in range(3):
            moe(skewed(step, rank))
        x = skewed(5, rank)
        before = moe(x)
        torch.testing.assert_close(before, single(x), rtol=1e-5, atol=1e-6)
        stats = moe.rebalance()
        torch.testing.assert_close(moe(x), before, rtol=1e-6, atol=1e-6)
    return stats


def test_rebalance_keeps_outputs_with_per_rank_rng():
    stats = run_ranks(_outputs_unchanged, 2, timeout=90)
    assert stats[0]["balancedness_after"] > stats[0]["balancedness_before"]


def _rebalance_model(rank, world, monkeypatch_plan):
    calls = []
    plan = eplb.plan

    def counting_plan(load, *args, **kwargs):
        calls.append(tuple(load.shape))
        return plan(load, *args, **kwargs)

    epmoe.training.eplb.plan = counting_plan
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(MoE(config(), layer_idx=0), MoE(config(), layer_idx=1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(3):
            opt.zero_grad()
            model(skewed(step, rank)).square().mean().backward()
            epmoe.sync_grads(model)
            opt.step()
        x = skewed(7, rank)
        with torch.no_grad():
            before = model(x)
        placements = [m.placement for m in model]
        calls.clear()  # construction planned each layer's initial placement
        stats = epmoe.rebalance_model(model, optimizer=opt)
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    finally:
        epmoe.training.eplb.plan = plan
    assert calls == [(2, E)], calls  # one planning call over both layers
    assert all(m.placement != p for m, p in zip(model, placements, strict=True))
    assert len(stats) == 2 and all(s["balancedness_after"] >= s["balancedness_before"] for s in stats)
    return True


def test_rebalance_model_plans_all_layers_at_once():
    assert _rebalance_model(0, 1, True)
    assert all(run_ranks(_rebalance_model, 2, True, timeout=90).values())


def _apply_placement(rank, world):
    torch.manual_seed(0)
    moe = MoE(config(), layer_idx=1)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-3)
    moe(skewed(0, rank)).square().mean().backward()
    epmoe.sync_grads(moe)
    opt.step()
    moe(skewed(1, rank)).square().mean().backward()
    epmoe.sync_grads(moe)
    load = torch.arange(2 * E, dtype=torch.float64).reshape(2, E) ** 2
    target = eplb.plan(load, config().num_slots, world)  # two layers: row layer_idx=1 applies
    expected = {name: gathered(moe, t) for name, t in (("w", moe.w13), ("g", moe.w13.grad),
                                                        ("m", opt.state[moe.w13]["exp_avg"]))}
    with torch.no_grad():
        x = skewed(2, rank)
        before = moe(x)
        moe.apply_placement(target)  # the optimizer that stepped these parameters is found by itself
        torch.testing.assert_close(moe(x), before, rtol=1e-6, atol=1e-6)
    assert torch.equal(moe.placement.phy2log[0], target.phy2log[1])
    for name, t in (("w", moe.w13), ("g", moe.w13.grad), ("m", opt.state[moe.w13]["exp_avg"])):
        assert gathered(moe, t) == expected[name], name
    with pytest.raises(ValueError, match="num_experts"):
        moe.apply_placement(eplb.plan(torch.ones(1, E + 2), E + 2, world))
    with pytest.raises(TypeError, match="Placement"):
        moe.apply_placement(target.phy2log)
    return True


def test_apply_placement_moves_weights_grads_and_state():
    assert _apply_placement(0, 1)
    assert all(run_ranks(_apply_placement, 2, timeout=90).values())


def test_rebalance_and_apply_placement_log_at_info(caplog):
    moe = MoE(config())
    with torch.no_grad():
        moe(skewed(0, 0))
    with caplog.at_level(logging.INFO, logger="epmoe"):
        stats = moe.rebalance()
        moe.apply_placement(eplb.plan(torch.ones(1, E), config().num_slots, 1))
    messages = [r.getMessage() for r in caplog.records if r.name == "epmoe.layer" and r.levelno == logging.INFO]
    assert any(m.startswith("layer 0: EPLB rebalance:") and f"{stats['balancedness_after']:.4f}" in m
               for m in messages), messages
    assert any(m.startswith("layer 0: placement applied") for m in messages), messages


def test_sync_grads_twice_is_idempotent_and_counts_steps():
    torch.manual_seed(0)
    moe = MoE(config(eplb_interval=2))
    moe(skewed(0, 0)).square().mean().backward()
    epmoe.sync_grads(moe)
    grads = [p.grad.clone() for p in moe.parameters()]
    placement = moe.placement
    epmoe.sync_grads(moe)  # no backward since: nothing changes, and it is not a new step
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, moe.parameters(), strict=True))
    assert moe.placement == placement
    moe(skewed(1, 0)).square().mean().backward()
    epmoe.sync_grads(moe)  # the second step: eplb_interval=2 rebalances after the sync
    assert moe.placement != placement


def _many_holders(rank, world):
    """Expert 0 on every rank (and twice on one: an owner reduces it), others on two ranks (pairs) or one: each
    replica's gradient after sync_grads is bitwise the same and equals the single-process gradient of the mean loss
    (float32 within 1e-5, bfloat16 within its rounding)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        cfg = config(num_experts=8, num_redundant_experts=8, num_shared_experts=0, dtype=dtype)
        torch.manual_seed(3)
        moe = MoE(cfg)
        phy2log = torch.tensor([[0, 1, 2, 0, 0, 4, 5, 6, 0, 7, 1, 2, 0, 3, 4, 5]])
        moe.apply_placement(eplb.Placement(phy2log, 8, world))
        xs = [skewed(20, r, num_tokens=16).to(dtype) for r in range(world)]
        moe(xs[rank]).float().square().mean().backward()
        epmoe.sync_grads(moe)
        torch.manual_seed(3)
        single = MoE(cfg, [dist.new_group([r]) for r in range(world)][rank])
        (sum(single(x).float().square().mean() for x in xs) / world).backward()
        epmoe.sync_grads(single)
        want = {e: single.w13.grad[s].float() for s, e in enumerate(single.local_slot_experts().tolist())}
        got = [None] * world
        mine = [(e, moe.w13.grad[s].float().tolist()) for s, e in enumerate(moe.local_slot_experts().tolist())]
        dist.all_gather_object(got, mine)
        replicas: dict = {}
        for part in got:
            for expert, grad in part:
                replicas.setdefault(expert, []).append(grad)
        assert len(replicas[0]) == 5
        for expert, grads in replicas.items():
            assert all(g == grads[0] for g in grads), f"{dtype}: replicas of expert {expert} differ"
            # bfloat16: elementwise error relative to the tensor's scale (cancelling sums lose all relative digits).
            scale = 1e-2 if dtype == torch.float32 else float(want[expert].abs().max())
            torch.testing.assert_close(torch.tensor(grads[0]), want[expert], rtol=tol, atol=tol * scale)
    return True


def test_experts_with_many_holders_on_four_ranks():
    assert all(run_ranks(_many_holders, 4, timeout=120).values())


class _FakeLayer:
    def __init__(self, rank, dp_size):
        self.placement = eplb.Placement(torch.tensor([[0, 1, 2, 3, 0, 4, 5, 1]]), 6, 2)
        self.num_ranks, self.num_local_slots, self.rank, self.dp_size = 2, 4, rank, dp_size


def test_pairs_only_where_the_dp_all_reduce_commutes():
    """Two-rank experts are summed by both holders when the DP group has at most two ranks; with more, an owner
    reduces them (a DP all-reduce of more than two values depends on where the value sits in the buffer)."""
    from epmoe.training import _ExpertPlan

    for rank in (0, 1):
        pairs = _ExpertPlan(_FakeLayer(rank, 2))
        assert pairs.pair == {1 - rank: [0, 1]} and not pairs.send and not pairs.recv
        owners = _ExpertPlan(_FakeLayer(rank, 3))
        assert not owners.pair
        assert owners.recv == ({1: [0]} if rank == 0 else {0: [1]})  # expert e is owned by holder e mod 2
        assert owners.send == ({1: [1]} if rank == 0 else {0: [0]})


def _edits_after_sync(rank, world):
    """Gradients edited in place after sync_grads (clip_grad_norm_, GradScaler.unscale_) are final: a rebalance or
    a second sync_grads afterwards moves them as they are instead of reducing them again."""
    torch.manual_seed(0)
    moe = MoE(config(eplb_window=4))
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    moe(skewed(0, rank)).square().mean().backward()
    epmoe.sync_grads(moe)
    for p in moe.parameters():  # in place, by the same factor on every rank (as GradScaler.unscale_ does)
        p.grad.mul_(1 / 3)
    want = {name: gathered(moe, getattr(moe, name).grad) for name in ("w13", "w2")}
    gate = moe.gate_weight.grad.clone()
    placement = moe.placement
    moe.rebalance(optimizer=opt)
    assert moe.placement != placement
    epmoe.sync_grads(moe)  # no forward since the last one: nothing new to reduce
    for name in ("w13", "w2"):
        assert gathered(moe, getattr(moe, name).grad) == want[name], name
    assert torch.equal(moe.gate_weight.grad, gate)
    # The next step's backward is new again, even into the same (in place zeroed) gradient tensors.
    opt.zero_grad(set_to_none=False)
    moe(skewed(1, rank)).square().mean().backward()
    raw = moe.gate_weight.grad.clone()
    epmoe.sync_grads(moe)
    mean = raw.clone()
    if world > 1:
        dist.all_reduce(mean)
    torch.testing.assert_close(moe.gate_weight.grad, mean / world, rtol=1e-6, atol=0)
    return True


def test_gradient_edits_after_sync_grads_are_not_reduced_again():
    assert _edits_after_sync(0, 1)
    assert all(run_ranks(_edits_after_sync, 2, timeout=90).values())
