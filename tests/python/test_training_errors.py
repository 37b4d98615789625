"""Bad input and cross-rank mistakes in training: clear errors naming what is wrong, raised on every rank within
the group timeout (a skipped sync_grads, a rebalance on one rank only), DDP combinations that cannot be right."""

from __future__ import annotations

import time

import epmoe
import pytest
import torch
import torch.distributed as dist
from ep_harness import run_ranks
from epmoe.layer import MoE, MoEConfig
from torch import nn

H = 16
PG_TIMEOUT = 10


def config(**overrides) -> MoEConfig:
    base = dict(hidden_size=H, moe_intermediate_size=8, num_experts=8, top_k=2, scoring="sigmoid", use_bias=True,
                num_redundant_experts=2)
    base.update(overrides)
    return MoEConfig(**base)


@pytest.mark.parametrize("overrides,match", [
    (dict(aux_loss="switch"), "aux_loss must be None, 'seq' or 'global', got 'switch'"),
    (dict(aux_loss="seq", aux_loss_coeff=-0.01), "aux_loss_coeff must be a finite number >= 0, got -0.01"),
    (dict(z_loss_coeff=-1e-3), "z_loss_coeff must be"),
    (dict(z_loss_coeff=float("nan")), "z_loss_coeff must be"),
    (dict(bias_update_rate=-1e-3), "bias_update_rate must be"),
    (dict(bias_update_rate=1e-3, use_bias=False), "bias_update_rate=0.001 needs use_bias=True"),
    (dict(aux_loss_coeff=0.01), "aux_loss_coeff=0.01 has no effect with aux_loss=None"),
    (dict(eplb_interval=-1), "eplb_interval must be an int >= 0"),
])
def test_bad_training_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        config(**overrides)
    good = config()
    for name, value in overrides.items():  # a config changed after construction fails when the layer is built
        setattr(good, name, value)
    with pytest.raises(ValueError, match=match):
        MoE(good)


def test_rebalance_with_a_foreign_optimizer_raises():
    moe, other = MoE(config()), nn.Linear(4, 4)
    foreign = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match="does not hold the w13/w2 parameters of MoE layer 0"):
        moe.rebalance(optimizer=foreign)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        moe.rebalance(optimizer="adam")
    with pytest.raises(ValueError, match="extra_tensors"):
        moe.rebalance(extra_tensors=[torch.zeros(3)])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        epmoe.sync_grads([moe])
    # Nothing was moved or counted by the failed calls: a valid one still works.
    assert moe.rebalance(optimizer=torch.optim.AdamW(moe.parameters()))["bytes_moved"] == 0


def test_backward_after_a_rebalance_of_raw_gradients_raises():
    moe = MoE(config())
    moe(torch.randn(8, H)).sum().backward()
    moe.rebalance()  # moves unsynchronised gradients: replicas now each hold their expert's sum
    moe(torch.randn(8, H)).sum().backward()
    with pytest.raises(RuntimeError, match="a backward ran after a rebalance"):
        epmoe.sync_grads(moe)


def _timed(call) -> str:
    start = time.monotonic()
    try:
        call()
    except RuntimeError as exc:
        elapsed = time.monotonic() - start
        assert elapsed < PG_TIMEOUT + 5, f"raised after {elapsed:.1f} s"
        return str(exc)
    return "no error"


def _skipped_sync(rank, world):
    moe = MoE(config())

    def steps():
        for step in range(3):
            moe(torch.randn(4, H)).sum().backward()
            if rank == 1 and step == 1:
                continue  # rank 1 forgets sync_grads once
            epmoe.sync_grads(moe)

    return _timed(steps)


def _rebalance_on_one_rank(rank, world):
    moe = MoE(config())

    def steps():
        for step in range(2):
            moe(torch.randn(4, H)).sum().backward()
            if rank == 0 and step == 1:
                moe.rebalance()
            epmoe.sync_grads(moe)

    return _timed(steps)


def _optimizer_on_one_rank(rank, world):
    moe = MoE(config())
    opt = torch.optim.Adam(moe.parameters())
    moe(torch.randn(4, H)).sum().backward()
    epmoe.sync_grads(moe)
    opt.step()
    del opt  # rank 1 drops its optimizer: its state cannot move along on rank 1 alone
    if rank == 0:
        keep = torch.optim.Adam(moe.parameters())
        keep.state[moe.w13]["exp_avg"] = torch.zeros_like(moe.w13)
        return _timed(lambda: moe.rebalance(optimizer=keep))
    return _timed(moe.rebalance)


def test_desynchronised_ranks_raise_on_every_rank():
    skipped = run_ranks(_skipped_sync, 2, timeout=60, pg_timeout=PG_TIMEOUT)
    for message in skipped.values():  # within the group timeout, on both ranks
        assert message != "no error"
    assert "did not complete on the EP group" in skipped[0]
    alone = run_ranks(_rebalance_on_one_rank, 2, timeout=60, pg_timeout=PG_TIMEOUT)
    for message in alone.values():
        assert "EP rank 0 is in rebalance" in message and "EP rank 1 is in sync_grads" in message, message
    state = run_ranks(_optimizer_on_one_rank, 2, timeout=60, pg_timeout=PG_TIMEOUT)
    for message in state.values():
        assert "disagree" in message, message


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(H, H)
        self.moe = MoE(config(num_redundant_experts=0))

    def forward(self, x):
        return self.moe(self.dense(x))


def _ddp(rank, world):
    model = nn.Sequential(Block(), nn.Linear(H, H))  # built bottom-up: excluded from DDP automatically
    assert {f"0.moe.{n}" for n, _ in model[0].moe.named_parameters()} <= set(model._ddp_params_and_buffers_to_ignore)
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp(torch.randn(4, H)).sum().backward()
    epmoe.sync_grads(ddp)
    # Swapped in after the tree was built: the root does not know; DDP would corrupt the experts.
    late = nn.Sequential(nn.Sequential(nn.Linear(H, H)), nn.Linear(H, H))
    late[0].append(MoE(config(num_redundant_experts=0)))
    wrapped = nn.parallel.DistributedDataParallel(late)
    with pytest.raises(RuntimeError, match="exclude_from_ddp"):
        epmoe.sync_grads(wrapped)
    fixed = nn.parallel.DistributedDataParallel(epmoe.training.exclude_from_ddp(late))
    fixed(torch.randn(4, H)).sum().backward()
    epmoe.sync_grads(fixed)
    # DDP over the layer alone has nothing to do.
    with pytest.raises(RuntimeError, match="DistributedDataParallel is not needed"):
        nn.parallel.DistributedDataParallel(MoE(config()))
    return True


def test_ddp_combinations():
    assert all(run_ranks(_ddp, 2, timeout=90).values())


def _bad_dp_group(rank, world):
    with pytest.raises(ValueError, match="share no other rank with the EP group"):
        MoE(config(), dp_group=dist.group.WORLD)  # the EP group is WORLD too
    other = dist.new_group([0, 1])
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    with pytest.raises(ValueError, match="different groups"):
        MoE(config(dp_group=other), alone, dp_group=dist.group.WORLD)
    return True


def test_bad_dp_group_raises():
    assert all(run_ranks(_bad_dp_group, 2, timeout=60).values())
