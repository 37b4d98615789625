"""EPLB replica policies: "balanced" (per-batch min-max) against an independent optimum (networkx max flow), on one
process and on 2 and 4 gloo ranks with their own tokens; "weighted" shares from plan(); the policies in the layer."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
import torch.distributed as dist
from ep_harness import run_ranks
from epmoe import reference
from epmoe.eplb import Placement, balancedness, group_counts, map_to_physical, plan, rank_load


def optimum(counts: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> int:
    """Smallest integer max rank load over all assignments of each expert's pairs to its slots: binary search on M
    with a networkx max flow (source -> expert -> holder ranks -> sink of capacity M)."""
    num_per_rank = len(phy2log) // num_ranks
    graph = nx.DiGraph()
    for e, c in enumerate(counts):
        if c:
            graph.add_edge("s", ("e", e), capacity=int(c))
    for p, e in enumerate(phy2log):
        if counts[e]:
            graph.add_edge(("e", e), ("r", p // num_per_rank))
    if "s" not in graph:
        return 0
    for r in range(num_ranks):
        if ("r", r) in graph:
            graph.add_edge(("r", r), "t", capacity=0)
    lo, hi = 0, int(counts.sum())
    while lo < hi:
        mid = (lo + hi) // 2
        for r in range(num_ranks):
            if ("r", r) in graph:
                graph[("r", r)]["t"]["capacity"] = mid
        if nx.maximum_flow_value(graph, "s", "t") == counts.sum():
            hi = mid
        else:
            lo = mid + 1
    return lo


def random_case(rng, num_experts, num_ranks, num_slots, num_tokens, num_topk, skew=1.0):
    """A random valid placement (every expert at least once) and a skewed batch with some -1 ids."""
    phy2log = np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, num_slots - num_experts)])
    rng.shuffle(phy2log)
    placement = Placement(phy2log[None], num_experts, num_ranks)
    probs = np.exp(skew * rng.standard_normal(num_experts))
    topk_idx = torch.from_numpy(rng.choice(num_experts, size=(num_tokens, num_topk), p=probs / probs.sum()))
    if num_tokens:
        topk_idx[rng.random((num_tokens, num_topk)) < 0.05] = -1
    return placement, topk_idx.to(torch.int32)


def rank_loads(slot_idx: torch.Tensor, placement: Placement) -> np.ndarray:
    valid = slot_idx[slot_idx >= 0].long()
    per_slot = torch.bincount(valid, minlength=placement.num_slots).numpy()
    return per_slot.reshape(placement.num_ranks, -1).sum(axis=1)


def counts_of(topk_idx: torch.Tensor, num_experts: int) -> np.ndarray:
    ids = topk_idx[topk_idx >= 0].long()
    return torch.bincount(ids, minlength=num_experts).numpy()


def check_holds_expert(slot_idx, topk_idx, placement, layer=0):
    valid = topk_idx >= 0
    assert torch.equal(slot_idx < 0, ~valid)
    held = placement.phy2log[layer][slot_idx[valid].long()]
    assert torch.equal(held, topk_idx[valid].long())


@pytest.mark.parametrize("num_experts, num_ranks, num_slots", [(7, 3, 9), (16, 4, 24), (12, 6, 12), (5, 4, 16),
                                                              (33, 8, 48), (64, 16, 80)])
def test_balanced_is_optimal_and_never_worse_than_hash(num_experts, num_ranks, num_slots):
    rng = np.random.default_rng(num_experts * 100 + num_ranks)
    for trial in range(6):
        num_tokens = int(rng.integers(1, 300))
        placement, topk_idx = random_case(rng, num_experts, num_ranks, num_slots, num_tokens, 3, skew=0.5 * trial)
        slots = map_to_physical(topk_idx, placement, 0, policy="balanced")
        assert slots.dtype == torch.int32
        check_holds_expert(slots, topk_idx, placement)
        loads = rank_loads(slots, placement)
        best = optimum(counts_of(topk_idx, num_experts), placement.numpy()[0][0], num_ranks)
        assert loads.max() <= 1.01 * best + 1
        assert loads.max() == best  # the solver is exact
        hashed = rank_loads(map_to_physical(topk_idx, placement, 0, token_offset=trial), placement)
        assert loads.max() <= hashed.max()
        # The pure-Python reference gives the same slots, bit for bit.
        _, log2phy, logcnt = placement.numpy()
        ref = reference.balance_replicas_reference(topk_idx, torch.from_numpy(log2phy[0].copy()),
                                                   torch.from_numpy(logcnt[0].copy()), None, None, num_slots,
                                                   num_ranks)
        assert torch.equal(ref, slots)


def test_balanced_edge_cases():
    rng = np.random.default_rng(7)
    placement, _ = random_case(rng, 10, 4, 16, 0, 2)
    # No tokens; all slots skipped; int64 ids.
    for topk_idx in (torch.zeros(0, 4, dtype=torch.int32), torch.full((5, 2), -1, dtype=torch.int64)):
        out = map_to_physical(topk_idx, placement, 0, policy="balanced")
        assert out.dtype == topk_idx.dtype and torch.equal(out, topk_idx)
    # Every pair on one expert: its copies share it evenly (within one pair).
    hot = int(np.argmax(placement.numpy()[2][0]))
    topk_idx = torch.full((101, 1), hot, dtype=torch.int64)
    out = map_to_physical(topk_idx, placement, 0, policy="balanced")
    check_holds_expert(out, topk_idx, placement)
    per_slot = torch.bincount(out.reshape(-1), minlength=16)[placement.log2phy[0, hot, :placement.logcnt[0, hot]]]
    assert int(per_slot.max() - per_slot.min()) <= 1 and int(per_slot.sum()) == 101
    # Experts with one copy keep it; no redundancy at all is the identity map.
    ident = Placement(np.arange(8)[None], 8, 4)
    topk_idx = torch.randint(-1, 8, (50, 3), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(map_to_physical(topk_idx, ident, 0, policy="balanced"), topk_idx)
    # Deterministic.
    placement, topk_idx = random_case(rng, 20, 5, 30, 400, 4, skew=1.5)
    first = map_to_physical(topk_idx, placement, 0, policy="balanced")
    assert torch.equal(first, map_to_physical(topk_idx.clone(), placement, 0, policy="balanced"))


def test_balanced_recovers_the_hot_expert_that_hash_cannot():
    # Two copies of every expert; one expert gets most of the batch: hash overloads its two ranks (0 and 1),
    # balanced moves the other experts' pairs to their copies on ranks 2 and 3.
    num_experts, num_ranks = 8, 4
    phy2log = np.array([0, 1, 2, 3, 0, 4, 5, 6, 7, 1, 4, 2, 3, 5, 6, 7])
    placement = Placement(phy2log[None], num_experts, num_ranks)
    topk_idx = torch.cat([torch.zeros(600, 1), torch.arange(1, 8).repeat(100)[:, None]]).to(torch.int32)
    hashed = rank_loads(map_to_physical(topk_idx, placement, 0), placement)
    balanced = rank_loads(map_to_physical(topk_idx, placement, 0, policy="balanced"), placement)
    assert hashed.max() / hashed.mean() > 1.2
    assert balanced.max() == optimum(counts_of(topk_idx, num_experts), phy2log, num_ranks)
    assert balanced.max() / balanced.mean() < 1.01


def _balanced_worker(rank, world, seed):
    rng = np.random.default_rng(seed)
    placement, _ = random_case(rng, 24, 6, 36, 0, 4)
    # Uneven token counts, rank 1 without tokens; each rank draws its own batch.
    num_tokens = [0 if r == 1 else 50 + 37 * r for r in range(world)]
    batches = [random_case(np.random.default_rng(seed + 1 + r), 24, 6, 36, num_tokens[r], 4, skew=1.2)[1]
               for r in range(world)]
    group = dist.group.WORLD
    out = map_to_physical(batches[rank], placement, 0, policy="balanced", group=group)
    again = map_to_physical(batches[rank], placement, 0, policy="balanced", group=group)
    counts, prefix = group_counts(batches[rank], 24, group)
    # numpy, not tensors: a tensor would travel through shared memory that dies with the worker
    return {"out": out.numpy(), "again": again.numpy(), "batches": [b.numpy() for b in batches],
            "phy2log": placement.numpy()[0][0].copy(), "counts": counts.numpy(),
            "prefix": None if prefix is None else prefix.numpy()}


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_over_gloo_ranks(world):
    results = run_ranks(_balanced_worker, world, 11 * world)
    phy2log = results[0]["phy2log"]
    placement = Placement(phy2log[None], 24, 6)
    batches = [torch.from_numpy(b) for b in results[0]["batches"]]
    outs = [torch.from_numpy(results[r]["out"]) for r in range(world)]
    union = torch.cat(outs)
    all_tokens = torch.cat(batches)
    for r in range(world):
        assert np.array_equal(results[r]["out"], results[r]["again"])  # reproducible
        check_holds_expert(outs[r], batches[r], placement)
        np.testing.assert_array_equal(results[r]["counts"], counts_of(all_tokens, 24))
        np.testing.assert_array_equal(results[r]["prefix"], counts_of(torch.cat(batches[:r] + [batches[r][:0]]), 24))
    loads = rank_loads(union, placement)
    assert loads.max() == optimum(counts_of(all_tokens, 24), phy2log, 6)
    # The group's choice is the single-process choice on the concatenated batch (ranks in order).
    assert torch.equal(union, map_to_physical(all_tokens, placement, 0, policy="balanced"))


def test_balanced_op_rejects_bad_input():
    placement = Placement(np.array([[0, 1, 2, 0, 1, 2]]), 3, 3)
    l2p, cnt = placement.log2phy[0], placement.logcnt[0]
    topk_idx = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    op = torch.ops.epmoe.balance_replicas
    with pytest.raises(ValueError, match="topk_idx values"):
        op(torch.tensor([[3]], dtype=torch.int32), l2p, cnt, None, None, 6, 3)
    with pytest.raises(ValueError, match="counts"):
        op(topk_idx, l2p, cnt, torch.tensor([1, 1, 1]), None, 6, 3)  # fewer than this batch's pairs
    with pytest.raises(ValueError, match="log2phy row"):
        op(topk_idx, torch.tensor([[0, 3], [1, 4], [2, 2]]), cnt, None, None, 6, 3)
    with pytest.raises(ValueError, match="num_slots"):
        op(topk_idx, l2p, cnt, None, None, 7, 3)
    with pytest.raises(TypeError, match="log2phy"):
        op(topk_idx, l2p.int(), cnt, None, None, 6, 3)
    with pytest.raises(ValueError, match="prefix needs counts"):
        op(topk_idx, l2p, cnt, None, torch.zeros(3, dtype=torch.int64), 6, 3)
    with pytest.raises(ValueError, match="policy"):
        map_to_physical(topk_idx, placement, 0, policy="random")
    with pytest.raises(TypeError, match="needs a Placement"):
        map_to_physical(topk_idx, (l2p, cnt), 0, policy="balanced")
    torch.library.opcheck(op.default, (topk_idx, l2p, cnt, None, None, 6, 3))
    torch.library.opcheck(op.default, (topk_idx, l2p, cnt, torch.tensor([9, 9, 9]), torch.tensor([1, 0, 2]), 6, 3))
    _, log2phy, logcnt = placement.numpy()
    maps = (torch.from_numpy(log2phy.copy()), torch.from_numpy(logcnt.copy()))
    torch.library.opcheck(torch.ops.epmoe.replica_quotas.default, (torch.tensor([[5, 0, 7]]), *maps, 6, 3))
    torch.library.opcheck(torch.ops.epmoe.replica_shares.default,
                          (torch.tensor([[5.0, 0.0, 7.0]], dtype=torch.float64), *maps, 6, 3, 4))


@pytest.mark.cuda
def test_balanced_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    for num_tokens, dtype in ((0, torch.int32), (1, torch.int64), (3000, torch.int32), (40000, torch.int64)):
        placement, topk_idx = random_case(rng, 64, 8, 96, num_tokens, 6, skew=1.5)
        topk_idx = topk_idx.to(dtype)
        l2p, cnt = placement.log2phy[0], placement.logcnt[0]
        cpu = torch.ops.epmoe.balance_replicas(topk_idx, l2p, cnt, None, None, 96, 8)
        gpu = torch.ops.epmoe.balance_replicas(topk_idx.cuda(), l2p.cuda(), cnt.cuda(), None, None, 96, 8)
        assert torch.equal(cpu, gpu.cpu())
        # With the group's counts and this rank's prefix (as over 3 ranks of which this is the middle one).
        local = torch.from_numpy(counts_of(topk_idx, 64))
        counts, prefix = 3 * local, local.clone()
        cpu = torch.ops.epmoe.balance_replicas(topk_idx, l2p, cnt, counts, prefix, 96, 8)
        gpu = torch.ops.epmoe.balance_replicas(topk_idx.cuda(), l2p.cuda(), cnt.cuda(), counts.cuda(),
                                               prefix.cuda(), 96, 8)
        assert torch.equal(cpu, gpu.cpu())
    # Graph capture: no host sync inside.
    placement, topk_idx = random_case(rng, 64, 8, 96, 512, 8)
    args = [t.cuda() for t in (topk_idx, placement.log2phy[0], placement.logcnt[0])]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.epmoe.balance_replicas(*args, None, None, 96, 8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), torch.ops.epmoe.balance_replicas(topk_idx, placement.log2phy[0],
                                                                    placement.logcnt[0], None, None, 96, 8))


def bench_layers(cases=None, sigmas=None):
    """Every layer of the EPLB benchmark (benchmarks/bench_eplb.py: its cases, sigmas and seeds) with its plan."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eplb.py"
    spec = importlib.util.spec_from_file_location("bench_eplb", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for _, num_layers, num_experts, num_groups, num_ranks, num_redundant, num_nodes, strategy in (
            cases or bench.CASES):
        for sigma in sigmas or bench.SIGMAS:
            load = bench.synthetic_load(num_layers, num_experts, sigma, int(sigma * 100) + num_ranks)
            yield load, plan(load, num_experts + num_redundant, num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                             strategy=strategy)


def test_weighted_shares_predict_at_least_the_even_split():
    for load, placement in bench_layers():
        share = placement.share.numpy()
        phy2log = placement.numpy()[0]
        sums = np.zeros(load.shape)
        np.add.at(sums, (np.arange(load.shape[0])[:, None], phy2log), share)
        np.testing.assert_allclose(sums, 1.0, atol=1e-9)
        hashed = balancedness(load, placement)
        weighted = balancedness(load, placement, policy="weighted")
        best = balancedness(load, placement, policy="balanced")
        assert np.all(weighted >= hashed - 1e-12)
        np.testing.assert_allclose(weighted, best, rtol=1e-9)  # shares reach the min-max optimum
    # Without a load to fit, shares are the even split and "weighted" predicts what "hash" does.
    even = Placement(placement.phy2log, placement.num_experts, placement.num_ranks)
    assert even.has_even_share()
    np.testing.assert_allclose(rank_load(load, even, policy="weighted"), rank_load(load, even))


def test_weighted_hash_realises_the_shares():
    load, placement = next(iter(bench_layers(sigmas=[1.0])))
    rng = np.random.default_rng(3)
    layer = 2
    probs = load[layer] / load[layer].sum()
    topk_idx = torch.from_numpy(rng.choice(load.shape[1], size=(125_000, 8), p=probs)).to(torch.int32)
    slots = map_to_physical(topk_idx, placement, layer, token_offset=17, policy="weighted")
    check_holds_expert(slots, topk_idx, placement, layer)
    realised = rank_loads(slots, placement)
    # Predicted from this batch's own expert counts: the difference is the hash's split alone.
    counts = np.tile(counts_of(topk_idx, load.shape[1]), (load.shape[0], 1))
    predicted = rank_load(counts, placement, policy="weighted")[layer]
    assert np.abs(realised / predicted - 1).max() <= 0.02
    # And the hash is rank-invariant: two halves with their global offsets choose the same slots.
    halves = torch.cat([map_to_physical(topk_idx[:1000], placement, layer, token_offset=17, policy="weighted"),
                        map_to_physical(topk_idx[1000:2000], placement, layer, token_offset=1017, policy="weighted")])
    assert torch.equal(halves, slots[:2000])


def test_placement_share_validation_and_json(tmp_path):
    phy2log = np.array([[0, 1, 0, 2]])
    with pytest.raises(ValueError, match="sum to 1"):
        Placement(phy2log, 3, 2, share=[[0.5, 1.0, 0.6, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        Placement(phy2log, 3, 2, share=[[1.0, 1.0]])
    with pytest.raises(ValueError, match="non-negative"):
        Placement(phy2log, 3, 2, share=[[1.5, 1.0, -0.5, 1.0]])
    p = Placement(phy2log, 3, 2, share=[[0.25, 1.0, 0.75, 1.0]])
    assert not p.has_even_share() and p != Placement(phy2log, 3, 2)
    p.save(tmp_path / "p.json")
    assert Placement.load(tmp_path / "p.json") == p
    # A file without shares (older epmoe, or written by hand) loads with the even split.
    Placement(phy2log, 3, 2).save(tmp_path / "even.json")
    assert "replica_share" not in (tmp_path / "even.json").read_text()
    assert Placement.load(tmp_path / "even.json").has_even_share()
    np.testing.assert_allclose(rank_load([[4.0, 2.0, 1.0]], p, policy="weighted"), [[1.0 + 2.0, 3.0 + 1.0]])


# ---- the policies in the MoE layer


def _layer(policy: str, num_redundant: int, process_group=None):
    from epmoe.layer import MoE, MoEConfig

    cfg = MoEConfig(hidden_size=32, moe_intermediate_size=16, num_experts=12, top_k=3,
                    num_redundant_experts=num_redundant, replica_policy=policy)
    torch.manual_seed(5)
    moe = MoE(cfg, process_group)
    # A skewed router (a few hot experts) and a placement planned for it, so that copies differ in load.
    with torch.no_grad():
        moe.gate_weight.add_(torch.linspace(2.0, -2.0, 12)[:, None] * torch.ones(32) / 32**0.5)
    return moe


def _skewed_tokens(rank: int, num_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(num_tokens, 32, generator=gen) + 1.0


def test_layer_output_does_not_depend_on_the_policy():
    from epmoe import eplb

    x = _skewed_tokens(0, 300)
    outs, loads = {}, {}
    for policy in ("hash", "weighted", "balanced"):
        moe = _layer(policy, num_redundant=12)
        first = moe.placement.log2phy[0][:, 0]
        w13, w2 = moe.w13.detach()[first].clone(), moe.w2.detach()[first].clone()  # the logical experts
        # 4 "ranks" in one process (so that per-rank loads are measurable), replicas for a skewed load.
        moe._install_placement(eplb.plan(torch.arange(12.0, 0.0, -1.0)[None], 24, 4))
        moe.load_logical_experts(w13, w2)
        with torch.no_grad():
            outs[policy] = moe(x)
        loads[policy] = moe.recorder.window_load()[0].reshape(4, -1).sum(dim=1)
    # Replicas hold bitwise identical weights and the single-process sum runs over the top-k slots in order.
    assert torch.equal(outs["hash"], outs["weighted"]) and torch.equal(outs["hash"], outs["balanced"])
    assert loads["balanced"].max() <= loads["hash"].max()
    with pytest.raises(ValueError, match="replica_policy"):
        _layer("nearest", num_redundant=0)


def _layer_ep_worker(rank, world):
    outs, peaks = {}, {}
    x = _skewed_tokens(rank, [40, 0, 75, 23][rank])
    for policy in ("hash", "weighted", "balanced"):
        moe = _layer(policy, num_redundant=4)
        with torch.no_grad():
            outs[policy] = moe(x).numpy()
        per_rank = moe.recorder.window_load(group=dist.group.WORLD)[0].reshape(world, -1).sum(dim=1)
        peaks[policy] = int(per_rank.max())
    return outs, peaks


def test_layer_policies_over_gloo_ranks():
    results = run_ranks(_layer_ep_worker, 4)
    for rank, (outs, peaks) in results.items():
        np.testing.assert_allclose(outs["weighted"], outs["hash"], rtol=1e-5, atol=1e-6)
        # The partial sums per rank are grouped differently when a slot moves rank: equal to rounding.
        np.testing.assert_allclose(outs["balanced"], outs["hash"], rtol=1e-5, atol=1e-6)
        assert peaks["balanced"] <= peaks["hash"], (rank, peaks)
