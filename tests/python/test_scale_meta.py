"""MoE construction: meta-device builds (no memory, no RNG, no collective) that `to_empty` + `reset_parameters`
turn into exactly the eager weights, on 1 and 2 ranks; no initialisation work thrown away; the `placement=`
argument; forward after `to_empty`."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ep_harness import run_ranks
from epmoe import eplb
from epmoe.layer import MoE, MoEConfig


def config(**kw) -> MoEConfig:
    base = dict(hidden_size=32, moe_intermediate_size=16, num_experts=6, top_k=2, scoring="sigmoid", num_groups=2,
                topk_groups=1, use_bias=True, num_shared_experts=1, num_redundant_experts=2)
    base.update(kw)
    return MoEConfig(**base)


def assert_same_state(a: MoE, b: MoE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_meta_build_draws_nothing_and_matches_eager_after_to_empty():
    cfg = config()
    torch.manual_seed(7)
    eager = MoE(cfg)
    state = torch.get_rng_state()
    with torch.device("meta"):
        meta_ctx = MoE(cfg)
    meta_arg = MoE(cfg, device="meta")
    meta_positional = MoE(cfg, None, "meta")  # MoE(cfg, process_group, device)
    assert torch.equal(torch.get_rng_state(), state)  # no RNG drawn on meta
    for meta in (meta_ctx, meta_arg, meta_positional):
        assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
        torch.manual_seed(7)
        meta.to_empty(device="cpu")
        meta.reset_parameters()
        assert_same_state(meta, eager)
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(meta(x), eager(x))
        assert int(meta.recorder.window_load().sum()) == 5 * cfg.top_k  # the recorder was rebuilt on the CPU


def test_forward_after_to_empty_and_load_state_dict():
    cfg = config()
    eager = MoE(cfg)
    meta = MoE(cfg, device="meta").to_empty(device="cpu")
    meta.load_state_dict(eager.state_dict())
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(meta(x), eager(x))


def test_load_state_dict_assign_into_a_meta_layer():
    # assign=True takes the checkpoint's tensors (dtype and device) for every parameter, the expert slots included;
    # the routing maps and the recorder follow them off meta.
    cfg = config(dtype=torch.bfloat16)
    eager = MoE(cfg)
    meta = MoE(cfg, device="meta")
    assert not meta.load_state_dict(eager.state_dict(), assign=True).missing_keys
    assert_same_state(meta, eager)
    assert not any(t.is_meta for t in [*meta.parameters(), *meta.buffers(), meta._log2phy])
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(meta(x), eager(x))
    # An expert missing: reported, and the slots stay unallocated (meta) rather than half-filled.
    state = eager.state_dict()
    state.pop("experts.3.down_proj")
    partial = MoE(cfg, device="meta")
    assert partial.load_state_dict(state, assign=True, strict=False).missing_keys == ["experts.3.down_proj"]
    assert partial.w2.is_meta and not partial.w13.is_meta
    with pytest.raises(RuntimeError, match="experts.3.down_proj"):
        MoE(cfg, device="meta").load_state_dict(state, assign=True)


def test_placement_from_meta_tensors_is_refused():
    # A placement is host-side data: meta tensors have none (the layer keeps placements off the meta path).
    with pytest.raises(ValueError, match="phy2log is a meta tensor"):
        eplb.Placement(torch.zeros(1, 8, dtype=torch.int64, device="meta"), 6, 2)
    plan = eplb.plan(torch.ones(1, 6), 8, 2)
    with pytest.raises(ValueError, match="share is a meta tensor"):
        plan.with_share(torch.ones(1, 8, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="load is a meta tensor"):
        eplb.plan(torch.ones(1, 6, device="meta"), 8, 2)
    ids = torch.zeros(4, 2, dtype=torch.int32, device="meta")
    for policy in eplb.POLICIES:  # replica choice runs on meta ids (shapes only)
        slots = eplb.map_to_physical(ids, plan, 0, policy=policy)
        assert slots.is_meta and slots.shape == (4, 2)


def test_construction_draws_one_seed_only():
    # The base seed is the only draw from the global generator: nn.Linear's own init of the shared experts is
    # skipped, not run and overwritten.
    torch.manual_seed(3)
    MoE(config())
    after = torch.get_rng_state()
    torch.manual_seed(3)
    torch.randint(0, 2**62, (1,), dtype=torch.int64)
    assert torch.equal(after, torch.get_rng_state())


def test_placement_argument():
    cfg = config(num_redundant_experts=2)
    three = eplb.plan(torch.rand(3, 6, generator=torch.Generator().manual_seed(0)), 8, 1)
    for layer_idx in range(3):
        moe = MoE(cfg, layer_idx=layer_idx, placement=three)
        assert moe.placement.phy2log.tolist() == three.phy2log[layer_idx : layer_idx + 1].tolist()
        assert torch.equal(moe.placement.share, three.share[layer_idx : layer_idx + 1])  # the plan's replica shares
    one = eplb.Placement(three.phy2log[2:3], 6, 1)
    assert MoE(cfg, layer_idx=5, placement=one).placement == one
    with pytest.raises(ValueError, match="placement.num_experts is 6, expected 8"):
        MoE(config(num_experts=8, num_redundant_experts=0), placement=eplb.plan(torch.ones(1, 6), 8, 1))
    with pytest.raises(ValueError, match="placement.num_slots is 6, expected 8"):
        MoE(cfg, placement=eplb.plan(torch.ones(1, 6), 6, 1))
    with pytest.raises(ValueError, match="placement.num_ranks is 2, expected 1"):
        MoE(cfg, placement=eplb.plan(torch.ones(1, 6), 8, 2))
    with pytest.raises(ValueError, match="no row for layer_idx=3"):
        MoE(cfg, layer_idx=3, placement=three)
    with pytest.raises(TypeError, match="placement must be an epmoe.eplb.Placement"):
        MoE(cfg, placement=[[0, 1, 2, 3, 4, 5, 0, 1]])


def test_placement_json_round_trip(tmp_path):
    plan = eplb.plan(torch.rand(4, 6, generator=torch.Generator().manual_seed(1)), 8, 2)
    plan.save(tmp_path / "plan.json")
    assert eplb.Placement.load(tmp_path / "plan.json") == plan
    assert not plan.has_even_share()  # the plan's replica shares travel too
    sglang = {"physical_to_logical_map": plan.phy2log.tolist()}  # SGLang's map: slots only, even shares
    from_sglang = eplb.Placement.from_json_dict(sglang, num_experts=6, num_ranks=2)
    assert torch.equal(from_sglang.phy2log, plan.phy2log) and from_sglang.has_even_share()
    with pytest.raises(ValueError, match="lacks the field 'num_logical_experts'"):
        eplb.Placement.from_json_dict(sglang)
    with pytest.raises(ValueError, match="'num_ranks' is 2, expected 4"):
        eplb.Placement.from_json_dict(plan.to_json_dict(), num_ranks=4)
    with pytest.raises(ValueError, match="lacks the field 'physical_to_logical_map'"):
        eplb.Placement.from_json_dict({"logical_count": [[1, 2]]})
    with pytest.raises(ValueError, match="list of ints"):
        eplb.Placement.from_json_dict({"physical_to_logical_map": [[0, 1], [2]]}, num_experts=3, num_ranks=1)


def _meta_on_ranks(rank, world):
    cfg = config(num_redundant_experts=2)
    torch.manual_seed(11)
    eager = MoE(cfg)
    torch.manual_seed(1000 + rank)  # other ranks' RNG states never matter
    with torch.device("meta"):
        meta = MoE(cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(11 if rank == 0 else 2000 + rank)
    meta.reset_parameters()
    assert_same_state(meta, eager)
    x = torch.randn(3 + rank, 32, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        assert torch.equal(meta(x), eager(x))
    assert meta.num_ranks == world and dist.is_initialized()
    return {k: v.tolist() for k, v in meta.state_dict().items()}  # plain lists travel through the queue


def test_meta_build_on_two_ranks_matches_single_process():
    states = run_ranks(_meta_on_ranks, 2, timeout=90)
    torch.manual_seed(11)
    single = MoE(config(num_redundant_experts=0)).state_dict()  # same seed: the same logical weights
    for state in states.values():
        for key, value in state.items():
            assert torch.equal(torch.tensor(value), single[key]), key
