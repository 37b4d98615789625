"""EPLB at routing time: replica choice (map_to_physical) and the load recorder."""

import numpy as np
import pytest
import torch
from epmoe.eplb import LoadRecorder, Placement, map_to_physical, plan


@pytest.mark.parametrize("num_topk", [1, 2, 6, 8])
def test_replica_choice_is_balanced(num_topk):
    # Adversarial for `position mod count`: every token routes to expert j at top-k position j. Expert j gets
    # the j-th count of the round, so every count 1..8 is covered in ceil(8 / k) rounds of 10^6 tokens.
    num_tokens = 1_000_000
    topk_idx = torch.arange(num_topk, dtype=torch.int32).expand(num_tokens, num_topk)
    all_counts = list(range(1, 9))
    for begin in range(0, 8, num_topk):
        counts = (all_counts[begin:] + all_counts)[:num_topk]
        logcnt = torch.tensor(counts, dtype=torch.int64)
        log2phy = torch.full((num_topk, 8), -1, dtype=torch.int64)
        offsets = torch.cumsum(logcnt, 0) - logcnt
        for e, count in enumerate(counts):
            log2phy[e, :count] = torch.arange(count) + offsets[e]
        phys = map_to_physical(topk_idx, (log2phy, logcnt), layer=3).long()
        per_slot = torch.bincount(phys.reshape(-1), minlength=int(logcnt.sum())).double()
        for e, count in enumerate(counts):
            replicas = per_slot[offsets[e]:offsets[e] + count]
            imbalance = (replicas.max() / replicas.mean()).item()
            assert imbalance <= 1.02, (count, num_topk, imbalance)
        # Each (token, position) picked one of its expert's own replicas.
        assert bool((torch.bucketize(phys, offsets, right=True) - 1 == topk_idx).all())


def test_replica_choice_is_rank_invariant_and_keeps_skips():
    load = np.exp(np.random.default_rng(0).standard_normal((2, 16)))
    p = plan(load, 32, 4)
    gen = torch.Generator().manual_seed(0)
    topk_idx = torch.randint(0, 16, (1000, 4), generator=gen, dtype=torch.int32)
    topk_idx[::7, 1] = -1
    whole = map_to_physical(topk_idx, p, layer=1, token_offset=500)
    # Two "ranks" holding halves of the same global batch choose the same replicas.
    first = map_to_physical(topk_idx[:300], p, layer=1, token_offset=500)
    second = map_to_physical(topk_idx[300:], (p.log2phy, p.logcnt), layer=1, token_offset=800)
    assert torch.equal(torch.cat([first, second]), whole)
    assert whole.dtype == torch.int32
    assert bool((whole[::7, 1] == -1).all())
    valid = topk_idx >= 0
    assert bool((p.phy2log[1][whole[valid].long()] == topk_idx[valid].long()).all())
    # Another layer salts the hash differently.
    assert not torch.equal(map_to_physical(topk_idx, p, layer=0, token_offset=500), whole)


def test_replica_choice_rejects_bad_input():
    log2phy, logcnt = torch.arange(8).reshape(4, 2), torch.full((4,), 2)
    with pytest.raises(TypeError, match="topk_idx"):
        map_to_physical(torch.zeros(3, 2), (log2phy, logcnt), 0)
    with pytest.raises(ValueError, match="topk_idx"):
        map_to_physical(torch.zeros(3, dtype=torch.int32), (log2phy, logcnt), 0)
    with pytest.raises(ValueError, match="layer"):
        map_to_physical(torch.zeros(3, 2, dtype=torch.int32), (log2phy[None], logcnt[None]), 1)
    with pytest.raises(TypeError, match="placement"):
        map_to_physical(torch.zeros(3, 2, dtype=torch.int32), log2phy, 0)


@pytest.mark.cuda
def test_replica_choice_cuda_matches_cpu():
    p = Placement(np.array([[0, 1, 2, 3, 0, 0, 1, 2]]), 4, 2)
    topk_idx = torch.randint(-1, 4, (4096, 2), dtype=torch.int32)
    cpu = map_to_physical(topk_idx, p, 0, token_offset=7)
    dev = map_to_physical(topk_idx.cuda(), (p.log2phy.cuda(), p.logcnt.cuda()), 0, token_offset=7)
    assert torch.equal(cpu, dev.cpu())


def test_recorder_counts_routed_tokens():
    num_layers, num_experts, window = 2, 8, 3
    p = plan(np.exp(np.random.default_rng(1).standard_normal((num_layers, num_experts))), 12, 4)
    rec = LoadRecorder(num_layers, 12, window_size=window)
    gen = torch.Generator().manual_seed(1)
    per_step = []
    for step in range(5):
        step_counts = torch.zeros(num_layers, 12, dtype=torch.int64)
        for layer in range(num_layers):
            topk_idx = torch.randint(-1, num_experts, (50 + step, 2), generator=gen, dtype=torch.int32)
            phys = map_to_physical(topk_idx, p, layer, token_offset=step * 1000)
            rec.record(layer, phys)
            valid = phys[phys >= 0].long()
            step_counts[layer] += torch.bincount(valid, minlength=12)
        rec.step()
        per_step.append(step_counts)
    expected = sum(per_step[-window:])
    assert torch.equal(rec.window_load(), expected)
    logical = rec.logical_load(p.phy2log, num_experts)
    assert torch.equal(logical, torch.zeros(num_layers, num_experts, dtype=torch.int64).scatter_add_(
        1, p.phy2log, expected))
    assert logical.sum() == expected.sum()
    rec.reset()
    assert int(rec.window_load().sum()) == 0


def test_recorder_rejects_bad_input():
    rec = LoadRecorder(2, 8, 4)
    with pytest.raises(ValueError, match="layer"):
        rec.record(2, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="phys_idx"):
        rec.record(0, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="window_size"):
        LoadRecorder(2, 8, 0)
    with pytest.raises(ValueError, match="phy2log"):
        rec.logical_load(torch.zeros(2, 7, dtype=torch.int64), 4)


def test_count_slots_op():
    counts = torch.zeros(5, dtype=torch.int64)
    slot_idx = torch.tensor([[0, 4, -1], [4, 4, 2]], dtype=torch.int32)
    torch.ops.epmoe.count_slots(counts, slot_idx)
    torch.ops.epmoe.count_slots(counts, slot_idx[:1])
    assert counts.tolist() == [2, 0, 1, 0, 4]
    torch.library.opcheck(torch.ops.epmoe.count_slots.default, (torch.zeros(5, dtype=torch.int64), slot_idx))
    with pytest.raises(ValueError, match="slot_idx"):
        torch.ops.epmoe.count_slots(counts, torch.tensor([5], dtype=torch.int32))
    with pytest.raises(TypeError, match="slot_idx"):
        torch.ops.epmoe.count_slots(counts, slot_idx.long())
    with pytest.raises(TypeError, match="counts"):
        torch.ops.epmoe.count_slots(counts.int(), slot_idx)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_count_slots_large_batches_any_thread_count(threads):
    """Batches large enough for the multi-chunk pass: equal to bincount whatever the thread count; a bad id anywhere
    (e.g. in the last chunk, or -2) is reported, and the valid ids of the call are still counted."""
    gen = torch.Generator().manual_seed(4)
    slot_idx = torch.randint(-1, 300, (8191, 8), generator=gen, dtype=torch.int32)
    valid = slot_idx[slot_idx >= 0].long()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        counts = torch.ones(300, dtype=torch.int64)
        torch.ops.epmoe.count_slots(counts, slot_idx)
        assert torch.equal(counts, torch.bincount(valid, minlength=300) + 1)
        for bad in (300, -2):
            bad_idx = slot_idx.clone()
            bad_idx[-1, -1] = bad
            counts = torch.zeros(300, dtype=torch.int64)
            with pytest.raises(ValueError, match="outside"):
                torch.ops.epmoe.count_slots(counts, bad_idx)
            kept = bad_idx[bad_idx >= 0]
            assert torch.equal(counts, torch.bincount(kept[kept < 300].long(), minlength=300))
    finally:
        torch.set_num_threads(before)


@pytest.mark.cuda
def test_count_slots_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    slot_idx = torch.randint(-1, 300, (4096, 8), generator=gen, dtype=torch.int32)
    for num_slots in (300, 9000):  # shared-memory and global-memory histograms
        cpu = torch.zeros(num_slots, dtype=torch.int64)
        torch.ops.epmoe.count_slots(cpu, slot_idx)
        gpu = torch.zeros(num_slots, dtype=torch.int64, device="cuda")
        torch.ops.epmoe.count_slots(gpu, slot_idx.cuda())
        assert torch.equal(gpu.cpu(), cpu)


def _hash_reference(topk_idx, log2phy, logcnt, token_offset, layer):
    """The "hash" policy in plain int64 torch ops, from epmoe.eplb.hash32 (the fused op must give the same ints)."""
    from epmoe.eplb import hash32

    num_tokens, num_topk = topk_idx.shape
    token = torch.arange(num_tokens, dtype=torch.int64)[:, None] + token_offset
    slot = torch.arange(num_topk, dtype=torch.int64)[None, :]
    expert = topk_idx.clamp(min=0).long()
    replica = (hash32(token, slot, layer) * logcnt[expert]) >> 32
    return torch.where(topk_idx >= 0, log2phy[expert, replica].to(topk_idx.dtype), topk_idx)


def _hash_case(dtype, num_tokens=777, num_experts=13, num_topk=6, seed=5):
    gen = torch.Generator().manual_seed(seed)
    logcnt = torch.randint(1, 5, (num_experts,), generator=gen, dtype=torch.int64)
    log2phy = torch.full((num_experts, 4), -1, dtype=torch.int64)
    offsets = torch.cumsum(logcnt, 0) - logcnt
    for e in range(num_experts):
        log2phy[e, : logcnt[e]] = torch.arange(int(logcnt[e])) + offsets[e]
    topk_idx = torch.randint(0, num_experts, (num_tokens, num_topk), generator=gen).to(dtype)
    topk_idx[::5, 2] = -1
    return topk_idx, log2phy, logcnt


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("token_offset,layer", [(0, 0), (12345, 3), (2**33 + 7, 61), (0, 70000)])
def test_replica_hash_op_matches_python_hash32(dtype, token_offset, layer):
    topk_idx, log2phy, logcnt = _hash_case(dtype)
    out = torch.ops.epmoe.replica_hash(topk_idx, log2phy, logcnt, token_offset, layer)
    assert out.dtype == dtype
    assert torch.equal(out, _hash_reference(topk_idx, log2phy, logcnt, token_offset, layer))
    # map_to_physical's "hash" policy is that op.
    assert torch.equal(map_to_physical(topk_idx, (log2phy, logcnt), layer=layer, token_offset=token_offset), out)
    # 0 and 1 tokens.
    for n in (0, 1):
        sub = topk_idx[:n].contiguous()
        assert torch.equal(torch.ops.epmoe.replica_hash(sub, log2phy, logcnt, token_offset, layer),
                           _hash_reference(sub, log2phy, logcnt, token_offset, layer))


def test_replica_hash_op_rejects_bad_ids_and_counts():
    topk_idx, log2phy, logcnt = _hash_case(torch.int32)
    bad = topk_idx.clone()
    bad[3, 1] = 13
    with pytest.raises(ValueError, match="topk_idx values must lie in"):
        torch.ops.epmoe.replica_hash(bad, log2phy, logcnt, 0, 0)
    bad_cnt = logcnt.clone()
    bad_cnt[0] = 0
    with pytest.raises(ValueError, match="logcnt values must lie in"):
        torch.ops.epmoe.replica_hash(topk_idx, log2phy, bad_cnt, 0, 0)
    with pytest.raises(TypeError, match="log2phy must be int64"):
        torch.ops.epmoe.replica_hash(topk_idx, log2phy.int(), logcnt, 0, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_replica_hash_cuda_matches_cpu(dtype):
    topk_idx, log2phy, logcnt = _hash_case(dtype, num_tokens=4099)
    want = torch.ops.epmoe.replica_hash(topk_idx, log2phy, logcnt, 2**32 + 99, 5)
    got = torch.ops.epmoe.replica_hash(topk_idx.cuda(), log2phy.cuda(), logcnt.cuda(), 2**32 + 99, 5)
    assert torch.equal(got.cpu(), want)
