"""Training with EP (and DP x EP) on gloo ranks equals single-process training on the concatenated batch: AdamW,
redundant experts, a rebalance in the middle (explicit with the optimizer, and one via eplb_interval), per-rank
RNG states, with and without DDP over the dense parameters. Replicas stay bitwise identical after every step and
the EP checkpoint reloads at EP=1."""

from __future__ import annotations

import epmoe
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ep_harness import run_ranks
from epmoe.eplb import tensor_digest
from epmoe.layer import MoE, MoEConfig
from torch import nn

H, INTER, E, K = 16, 8, 8, 2
SEQ, SEQS_PER_RANK, STEPS = 4, 2, 6
REBALANCE_AT = 2  # explicit rebalance(optimizer=) after this step's sync_grads; eplb_interval=5 adds one at step 4


def config(**overrides) -> MoEConfig:
    base = dict(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, top_k=K, scoring="sigmoid", use_bias=True,
                num_shared_experts=1, num_redundant_experts=4, eplb_window=4, eplb_interval=5, aux_loss="seq",
                aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    base.update(overrides)
    return MoEConfig(**base)


class Net(nn.Module):
    """Dense -> MoE -> dense: the dense layers are DDP's, the MoE is epmoe's."""

    def __init__(self, cfg, group=None, dp_group=None):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = MoE(cfg, group, dp_group=dp_group)
        self.out = nn.Linear(H, H)

    def forward(self, x):
        return self.out(self.moe(self.inp(x)))


def batch(step: int, num_ranks: int):
    """The global batch of a step: [num_ranks * SEQS_PER_RANK, SEQ, H], skewed towards a few experts."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(num_ranks * SEQS_PER_RANK, SEQ, H, generator=gen) + torch.linspace(-1, 2, H)
    y = torch.randn(num_ranks * SEQS_PER_RANK, SEQ, H, generator=gen)
    return x, y


def logical_state(net: Net) -> dict:
    """The MoE's logical weights (merged over the EP group) and the dense weights, as numpy arrays."""
    state = {k: v.detach().clone() for k, v in net.moe.state_dict().items()}
    if net.moe.distributed and net.moe.num_ranks > 1:
        parts = [None] * net.moe.num_ranks
        dist.all_gather_object(parts, state, group=net.moe.group)
        for part in parts:
            state.update(part)
    state.update({f"dense.{k}": v for k, v in net.state_dict().items() if not k.startswith("moe.")})
    return {k: v.numpy() for k, v in state.items()}


def replica_digests(moe: MoE) -> dict:
    """{logical expert: [digest of every replica on this rank]} (weights and gradients)."""
    out: dict = {}
    for slot, expert in enumerate(moe.local_slot_experts().tolist()):
        parts = [moe.w13[slot], moe.w2[slot]]
        if moe.w13.grad is not None:
            parts += [moe.w13.grad[slot], moe.w2.grad[slot]]
        out.setdefault(expert, []).append(torch.cat([tensor_digest(p) for p in parts]).tolist())
    return out


def assert_replicas_bitwise_equal(moe: MoE) -> None:
    mine = replica_digests(moe)
    every = [None] * dist.get_world_size() if dist.is_initialized() else None
    if every is None:
        every = [mine]
    else:
        dist.all_gather_object(every, mine)  # DP replicas of the EP group must agree as well
    merged: dict = {}
    for part in every:
        for expert, digests in part.items():
            merged.setdefault(expert, []).extend(digests)
    for expert, digests in merged.items():
        assert all(d == digests[0] for d in digests), f"replicas of expert {expert} differ"


def train(rank: int, world: int, ep_size: int, use_ddp: bool, num_data: int | None = None,
          replica_policy: str = "hash") -> dict:
    """Runs STEPS AdamW steps on the batches of `num_data` ranks (default: world); world=1 is the single-process
    reference on the whole batch."""
    num_data = num_data or world
    torch.manual_seed(1234 if rank == 0 else 99 + rank)  # only rank 0's RNG state may matter
    group = dp_group = None
    if world > 1:
        epmoe.training._BUCKET_BYTES = 4096  # (a worker process) the replicated gradients travel in several buckets
        num_dp = world // ep_size
        for d in range(num_dp):  # EP groups: consecutive ranks; DP groups: strided (every rank creates every group)
            ranks = list(range(d * ep_size, (d + 1) * ep_size))
            new = dist.new_group(ranks)
            if rank in ranks:
                group = new
        for e in range(ep_size):
            ranks = list(range(e, world, ep_size))
            new = dist.new_group(ranks) if num_dp > 1 else None
            if rank in ranks:
                dp_group = new
    net = Net(config(replica_policy=replica_policy), group, dp_group)
    model = net
    if world > 1:
        if use_ddp:
            model = nn.parallel.DistributedDataParallel(net)  # broadcasts rank 0's dense weights
        else:
            for p in (*net.inp.parameters(), *net.out.parameters()):
                dist.broadcast(p.data, src=0)
    # eps=1e-6: with the default 1e-8, Adam turns the rounding noise of near-zero gradients (an expert that sees
    # almost no tokens) into update differences of up to 1e-5 relative; the gradients themselves agree far closer.
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01, eps=1e-6)
    losses, moved = [], []
    for step in range(STEPS):
        x, y = batch(step, num_data)
        if world > 1:
            mine = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)
            x, y = x[mine], y[mine]
        loss = F.mse_loss(model(x), y) + epmoe.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1 and not use_ddp:
            for p in (*net.inp.parameters(), *net.out.parameters()):
                dist.all_reduce(p.grad)
                p.grad /= world
        before = net.moe.placement
        epmoe.sync_grads(model)
        if step == REBALANCE_AT:
            net.moe.rebalance(optimizer=opt)
        moved.append(net.moe.placement != before)
        assert_replicas_bitwise_equal(net.moe)
        opt.step()
        assert_replicas_bitwise_equal(net.moe)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / max(world, 1))
    result = {"losses": losses, "moved": moved, "state": logical_state(net)}
    if ep_size > 1 and world == ep_size:  # outputs of the final model on this rank's tokens
        x, _ = batch(STEPS, world)
        with torch.no_grad():
            result["x"] = x[rank * SEQS_PER_RANK:(rank + 1) * SEQS_PER_RANK].numpy()
            result["y"] = net.moe(torch.from_numpy(result["x"])).numpy()
    return result


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| in float64."""
    want = want.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def check_equivalence(results: dict, world: int) -> None:
    ref = train(0, 1, 1, False, world)
    for got in results.values():
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
        assert any(got["moved"][REBALANCE_AT:]), "the rebalances moved nothing"
        assert got["moved"][4], "eplb_interval=5 did not rebalance in the 5th sync_grads"
        assert got["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            assert relative_error(got["state"][key], value) <= 1e-5, (key, relative_error(got["state"][key], value))


@pytest.mark.parametrize("use_ddp,replica_policy", [(False, "balanced"), (True, "weighted")])
def test_ep2_training_equals_single_process(use_ddp, replica_policy):
    """The replica policy changes which copy a token uses, never the result (the reference hashes)."""
    results = run_ranks(train, 2, 2, use_ddp, None, replica_policy, timeout=180)
    check_equivalence(results, 2)
    # The EP=2 checkpoint (each rank's state_dict, merged) reloads at EP=1 with equal outputs.
    merged = {k: torch.from_numpy(v) for k, v in results[0]["state"].items() if not k.startswith("dense.")}
    single = MoE(config(num_redundant_experts=0)).eval()
    missing, unexpected = single.load_state_dict(merged, strict=True)
    assert not missing and not unexpected
    for got in results.values():
        with torch.no_grad():
            out = single(torch.from_numpy(got["x"]))
        np.testing.assert_allclose(out.numpy(), got["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_ddp", [False, True])
def test_dp2_ep2_training_equals_single_process(use_ddp):
    results = run_ranks(train, 4, 2, use_ddp, timeout=300)
    check_equivalence(results, 4)


def _resume(rank, world, folder):
    """4 steps straight vs 2 steps, a checkpoint, a fresh process state and 2 more steps (the README recipe)."""
    def build(seed):
        torch.manual_seed(seed)
        moe = MoE(config(eplb_interval=0))
        return moe, torch.optim.AdamW(moe.parameters(), lr=1e-2)

    def step(moe, opt, i):
        x, y = batch(i, world)
        mine = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)
        loss = F.mse_loss(moe(x[mine]), y[mine]) + moe.aux_loss
        opt.zero_grad()
        loss.backward()
        epmoe.sync_grads(moe)
        if i == 1:
            moe.rebalance(optimizer=opt)  # the checkpoint holds a non-initial placement and its optimizer state
        opt.step()

    straight, opt = build(0)
    for i in range(4):
        step(straight, opt, i)
    first, opt = build(0)
    for i in range(2):
        step(first, opt, i)
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict(),
                "placement": first.placement.to_json_dict()}, f"{folder}/rank{rank}.pt")
    dist.barrier()
    resumed, opt = build(1000 + rank)  # other weights, other RNG: all comes from the checkpoint
    ckpts = [torch.load(f"{folder}/rank{r}.pt") for r in range(world)]
    resumed.apply_placement(epmoe.eplb.Placement.from_json_dict(ckpts[rank]["placement"]))
    merged = {}
    for ckpt in ckpts:  # each rank saved the experts whose first replica it holds
        merged.update(ckpt["model"])
    resumed.load_state_dict(merged)
    opt.load_state_dict(ckpts[rank]["optimizer"])
    for i in range(2, 4):
        step(resumed, opt, i)
    for key, value in logical_state_of(straight).items():
        np.testing.assert_allclose(logical_state_of(resumed)[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    return True


def logical_state_of(moe: MoE) -> dict:
    parts = [None] * moe.num_ranks
    dist.all_gather_object(parts, {k: v.detach().clone() for k, v in moe.state_dict().items()}, group=moe.group)
    return {k: v.numpy() for part in parts for k, v in part.items()}


def test_checkpoint_resume_equals_uninterrupted_training(tmp_path):
    assert all(run_ranks(_resume, 2, str(tmp_path), timeout=120).values())
