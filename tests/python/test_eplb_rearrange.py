"""EPLB weight rearrangement over real gloo processes (2 and 4 ranks)."""

import datetime
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from epmoe.eplb import LoadRecorder, Placement, RearrangeError, plan, rearrange, tensor_digest, transfer_plan

NUM_LAYERS, NUM_EXPERTS, NUM_SLOTS, HIDDEN, INTER = 2, 8, 12, 16, 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_weights(layer, expert):
    """The original weights of a logical expert: w13 [2I, H], w2 [H, I], a float32 scale [4], an int8 extra [3]."""
    gen = torch.Generator().manual_seed(1000 * layer + expert)
    return [torch.randn(2 * INTER, HIDDEN, generator=gen) / 4, torch.randn(HIDDEN, INTER, generator=gen) / 4,
            torch.rand(4, generator=gen) + 0.5, torch.randint(-100, 100, (3,), generator=gen, dtype=torch.int8)]


def build_registry(placement, rank):
    local = placement.num_local_slots
    registry = []
    for layer in range(placement.num_layers):
        experts = placement.phy2log[layer, rank * local:(rank + 1) * local].tolist()
        per_slot = [expert_weights(layer, e) for e in experts]
        registry.append([torch.stack([w[i] for w in per_slot]).contiguous() for i in range(4)])
    return registry


def check_slots(registry, placement, rank, layers):
    """Every local slot of `layers` holds its logical expert's original tensors (checked by digest)."""
    local = placement.num_local_slots
    for layer in layers:
        for j in range(local):
            expert = int(placement.phy2log[layer, rank * local + j])
            for t, ref in zip(registry[layer], expert_weights(layer, expert), strict=True):
                assert torch.equal(tensor_digest(t[j]), tensor_digest(ref)), (layer, j, expert)


def moe_output(registry, placement, rank, x):
    """Sum over all ranks of each local slot's SwiGLU output scaled by 1/replica count: equals the sum over logical
    experts whatever the placement."""
    local = placement.num_local_slots
    out = torch.zeros(NUM_LAYERS, *x.shape, dtype=torch.float64)
    for layer in range(NUM_LAYERS):
        w13, w2, scale = registry[layer][:3]
        for j in range(local):
            expert = int(placement.phy2log[layer, rank * local + j])
            gate, up = (x @ w13[j].T).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ w2[j].T * scale[j].sum()
            out[layer] += y.double() / int(placement.logcnt[layer, expert])
    dist.all_reduce(out)
    return out


def loads(seed):
    rng = np.random.default_rng(seed)
    return np.exp(1.5 * rng.standard_normal((NUM_LAYERS, NUM_EXPERTS))) * 100


def worker(rank, world, port, errors):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        run_scenarios(rank, world)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


def run_scenarios(rank, world):
    old = Placement(np.tile(np.arange(NUM_SLOTS) % NUM_EXPERTS, (NUM_LAYERS, 1)), NUM_EXPERTS, world)
    new = plan(loads(1), NUM_SLOTS, world)
    registry = build_registry(old, rank)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(7))
    before = moe_output(registry, old, rank, x)

    # 1. Invalid or mismatched plans are rejected before anything moves.
    snapshot = [[t.clone() for t in layer] for layer in registry]
    with pytest.raises(ValueError, match="ranks"):
        rearrange(registry, old, Placement(new.phy2log, NUM_EXPERTS, 1))
    other = plan(loads(2), NUM_SLOTS, world)
    assert not torch.equal(other.phy2log, new.phy2log)
    with pytest.raises(ValueError, match="disagree"):
        rearrange(registry, old, other if rank == 0 else new)
    with pytest.raises(ValueError, match="first"):
        rearrange([[t[:1] for t in layer] for layer in registry], old, new)
    for la, lb in zip(registry, snapshot, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(la, lb, strict=True))

    # 2. A corrupted buffer in layer 1 on the last rank: layer 0 moves, layer 1 stays old on every rank.
    transfers = transfer_plan(old.phy2log[1].numpy(), new.phy2log[1].numpy(), world)[0]
    victim = max(tr.dst_rank for tr in transfers)

    def corrupt(layer, dst_slot, bufs):
        if layer == 1 and rank == victim:
            bufs[0].view(-1)[0] += 1.0

    committed = []
    with pytest.raises(RearrangeError) as info:
        rearrange(registry, old, new, batch_size=2, recv_hook=corrupt, on_commit=committed.append)
    assert info.value.layer == 1 and committed == [0] and info.value.report.committed_layers == [0]
    check_slots(registry, new, rank, [0])
    check_slots(registry, old, rank, [1])
    # Layer 0 is on the new placement now: go back to the old one for both layers.
    mixed = Placement(np.stack([new.phy2log[0].numpy(), old.phy2log[1].numpy()]), NUM_EXPERTS, world)
    rearrange(registry, mixed, old)
    check_slots(registry, old, rank, [0, 1])

    # 3. A hook that raises on rank 0 in layer 0: nothing moves anywhere.
    def explode(layer, dst_slot, bufs):
        if rank == 0:
            raise RuntimeError("injected")

    receives_on_0 = any(tr.dst_rank == 0 for tr in transfer_plan(old.phy2log[0].numpy(), new.phy2log[0].numpy(),
                                                                 world)[0])
    if receives_on_0:
        with pytest.raises(RearrangeError, match="layer 0"):
            rearrange(registry, old, new, recv_hook=explode)
        check_slots(registry, old, rank, [0, 1])

    # 4. The real move: every slot ends with its logical expert's original tensors; the output is unchanged.
    report = rearrange(registry, old, new, batch_size=3)
    assert report.committed_layers == [0, 1]
    check_slots(registry, new, rank, [0, 1])
    after = moe_output(registry, new, rank, x)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)
    sent = torch.tensor([report.bytes_sent, report.bytes_received])
    dist.all_reduce(sent)
    assert sent[0] == sent[1] > 0
    # And an incremental step from there.
    repaired = plan(loads(3), NUM_SLOTS, world, previous=new, max_moves=2)
    rearrange(registry, new, repaired)
    check_slots(registry, repaired, rank, [0, 1])

    # 5. The recorder sums its window across ranks.
    rec = LoadRecorder(NUM_LAYERS, NUM_SLOTS, window_size=2)
    rec.record(0, torch.tensor([[rank, -1]], dtype=torch.int32))
    rec.step()
    expected = torch.zeros(NUM_LAYERS, NUM_SLOTS, dtype=torch.int64)
    expected[0, :world] = 1
    assert torch.equal(rec.window_load(), expected)


@pytest.mark.parametrize("world", [2, 4])
def test_rearrange_gloo(world):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    context = mp.start_processes(worker, args=(world, free_port(), errors), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = 50.0
    start = time.monotonic()
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() - start > deadline:
                pytest.fail(f"rearrange test with {world} ranks exceeded {deadline} s")
    except mp.ProcessRaisedException:
        messages = []
        while not errors.empty():
            failed_rank, trace = errors.get()
            messages.append(f"rank {failed_rank}:\n{trace}")
        pytest.fail("\n".join(messages) or "a worker failed")
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
