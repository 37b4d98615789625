"""The bad-input contract (docs/errors.md), table-driven: every case is a clear TypeError / ValueError /
RuntimeError naming the argument, never a crash or a hang. Single-process cases for the ops, the layer and EPLB;
two-rank cases for EPGroup and the EP layer (run in one pair of processes, one test item per case), and bad input
on one rank only, where every rank must finish within the timeout."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import epmoe
import numpy as np
import pytest
import torch
from ep_harness import run_ranks
from epmoe import eplb

E, H, INTER, T, K = 8, 16, 8, 6, 2


def _inputs() -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, E, (T, K), generator=gen, dtype=torch.int32)
    idx[:, 1] = (idx[:, 0] + 1) % E
    w13 = torch.randn(E, 2 * INTER, H, generator=gen) / 4
    w2 = torch.randn(E, H, INTER, generator=gen) / 4
    offsets = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11, 12])  # E + 1 segments of T * K = 12 rows
    rows = torch.randn(T * K, H, generator=gen)
    return SimpleNamespace(
        logits=torch.randn(T, E, generator=gen), bias=torch.zeros(E), x=torch.randn(T, H, generator=gen), idx=idx,
        w=torch.rand(T, K, generator=gen), w13=w13, w2=w2, rows=rows, offsets=offsets, load=np.ones((2, E)),
        placement=eplb.plan(np.ones((2, E)), E, 4),
        moe=epmoe.MoE(epmoe.MoEConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, top_k=K)),
        recorder=eplb.LoadRecorder(1, E, 4),
    )


def _config(**overrides):
    return epmoe.MoEConfig(**{**dict(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, top_k=K), **overrides})


# (id, call(inputs), exception type, regex the message must match: it names the argument)
SINGLE = [
    # epmoe.route
    ("route-logits-list", lambda s: epmoe.route(s.logits.tolist(), K), TypeError, "router_logits must be a torch"),
    ("route-logits-int64", lambda s: epmoe.route(s.logits.long(), K), TypeError, "router_logits must be float32"),
    ("route-logits-float64", lambda s: epmoe.route(s.logits.double(), K), TypeError, "router_logits .*got float64"),
    ("route-logits-0d", lambda s: epmoe.route(s.logits[0, 0], K), ValueError, "router_logits must be 2-D"),
    ("route-logits-1d", lambda s: epmoe.route(s.logits[0], K), ValueError, "router_logits must be 2-D"),
    ("route-top_k-0", lambda s: epmoe.route(s.logits, 0), ValueError, "top_k must be >= 1"),
    ("route-top_k-float", lambda s: epmoe.route(s.logits, 2.0), TypeError, "top_k must be an int"),
    ("route-top_k-too-big", lambda s: epmoe.route(s.logits, E + 1), ValueError, "top_k"),
    ("route-scoring", lambda s: epmoe.route(s.logits, K, scoring="relu"), ValueError, "scoring must be one of"),
    ("route-num_groups", lambda s: epmoe.route(s.logits, K, num_groups=3), ValueError, "num_groups"),
    ("route-topk_groups", lambda s: epmoe.route(s.logits, K, num_groups=4, topk_groups=5), ValueError,
     "topk_groups"),
    ("route-bias-float64", lambda s: epmoe.route(s.logits, K, bias=s.bias.double()), TypeError,
     "bias must be float32"),
    ("route-bias-shape", lambda s: epmoe.route(s.logits, K, bias=s.bias[:-1]), ValueError, "bias must have shape"),
    ("route-bias-device", lambda s: epmoe.route(s.logits, K, bias=s.bias.to("meta")), ValueError, "bias must be on"),
    ("route-renormalize", lambda s: epmoe.route(s.logits, K, renormalize="yes"), TypeError, "renormalize"),
    ("route-scaling_factor", lambda s: epmoe.route(s.logits, K, scaling_factor="2"), TypeError, "scaling_factor"),
    # epmoe.experts_forward
    ("experts-x-list", lambda s: epmoe.experts_forward(s.x.tolist(), s.idx, s.w, s.w13, s.w2), TypeError,
     "x must be a torch.Tensor"),
    ("experts-x-int", lambda s: epmoe.experts_forward(s.x.long(), s.idx, s.w, s.w13, s.w2), TypeError,
     "x must be float32"),
    ("experts-x-1d", lambda s: epmoe.experts_forward(s.x[0], s.idx, s.w, s.w13, s.w2), ValueError,
     "x must be 2-D"),
    ("experts-x-hidden", lambda s: epmoe.experts_forward(torch.randn(T, H + 2), s.idx, s.w, s.w13, s.w2),
     ValueError, "^x has hidden size 18 but the expert weights have H = 16"),
    ("experts-w13-hidden", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13[:, :, :-2], s.w2), ValueError,
     "^w13 must have shape .* H = 16"),
    ("experts-w2-hidden", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13, s.w2[:, :-2]), ValueError,
     "^w2 must have shape"),
    ("experts-w13-odd", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13[:, :-1], s.w2), ValueError,
     "w13 .*even"),
    ("experts-w2-inter", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13, s.w2[:, :, :-1]), ValueError,
     "^w2 must have shape"),
    ("experts-w2-experts", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13, s.w2[:-1]), ValueError,
     "^w2 must have shape"),
    ("experts-w13-no-experts", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13[:0], s.w2[:0]), ValueError,
     "^w13 must have shape .* num_experts >= 1"),
    ("swiglu-w13-no-experts", lambda s: epmoe.grouped_swiglu_experts(s.rows[:0], s.offsets[:1], s.w13[:0],
                                                                       s.w2[:0]), ValueError,
     "^w13 must have shape .* num_experts >= 1"),
    ("experts-w13-2d", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13[0], s.w2), ValueError,
     "w13 must be 3-D"),
    ("experts-idx-float", lambda s: epmoe.experts_forward(s.x, s.idx.float(), s.w, s.w13, s.w2), TypeError,
     "topk_idx must be int32 or int64"),
    ("experts-idx-1d", lambda s: epmoe.experts_forward(s.x, s.idx[:, 0], s.w, s.w13, s.w2), ValueError,
     "topk_idx must be 2-D"),
    ("experts-idx-tokens", lambda s: epmoe.experts_forward(s.x, s.idx[:3], s.w[:3], s.w13, s.w2), ValueError,
     "same T"),
    ("experts-idx-range", lambda s: epmoe.experts_forward(s.x, s.idx + E, s.w, s.w13, s.w2), ValueError,
     "topk_idx values"),
    ("experts-idx-negative", lambda s: epmoe.experts_forward(s.x, s.idx - E, s.w, s.w13, s.w2), ValueError,
     "topk_idx values"),
    ("experts-weights-int", lambda s: epmoe.experts_forward(s.x, s.idx, s.idx, s.w13, s.w2), TypeError,
     "topk_weights must be a floating-point"),
    ("experts-weights-shape", lambda s: epmoe.experts_forward(s.x, s.idx, s.w[:, :1], s.w13, s.w2), ValueError,
     "topk_weights must have the shape of topk_idx"),
    ("experts-w13-dtype", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13.bfloat16(), s.w2), TypeError,
     "w13 must have the dtype of x"),
    ("experts-w2-device", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13, s.w2.to("meta")), ValueError,
     "w2 must be on cpu"),
    ("experts-expert_map-float", lambda s: epmoe.experts_forward(s.x, s.idx, s.w, s.w13, s.w2,
                                                                  expert_map=torch.zeros(E)), TypeError, "expert_map"),
    # epmoe.grouped_swiglu_experts
    ("swiglu-rows-int", lambda s: epmoe.grouped_swiglu_experts(s.rows.long(), s.offsets, s.w13, s.w2), TypeError,
     "rows must be float32"),
    ("swiglu-offsets-int32", lambda s: epmoe.grouped_swiglu_experts(s.rows, s.offsets.int(), s.w13, s.w2),
     TypeError, "expert_offsets must be int64"),
    ("swiglu-offsets-length", lambda s: epmoe.grouped_swiglu_experts(s.rows, s.offsets[:-1], s.w13, s.w2),
     ValueError, "expert_offsets must have shape"),
    ("swiglu-offsets-short", lambda s: epmoe.grouped_swiglu_experts(s.rows[:-1].repeat(2, 1)[:13], s.offsets,
                                                                     s.w13, s.w2),
     ValueError, r"expert_offsets\[-1\] must equal the number of rows \(13\)"),
    ("swiglu-offsets-past-end", lambda s: epmoe.grouped_swiglu_experts(s.rows[:-1], s.offsets, s.w13, s.w2,
                                                                        allow_padding=True),
     ValueError, r"expert_offsets\[-1\]"),
    ("swiglu-offsets-decreasing", lambda s: epmoe.grouped_swiglu_experts(s.rows, s.offsets.flip(0), s.w13, s.w2),
     ValueError, "non-decreasing"),
    ("swiglu-rows-hidden", lambda s: epmoe.grouped_swiglu_experts(s.rows[:, :-1], s.offsets, s.w13, s.w2),
     ValueError, "^rows has hidden size"),
    # epmoe.MoE.forward and MoEConfig
    ("moe-input-list", lambda s: s.moe(s.x.tolist()), TypeError, "hidden_states must be a torch.Tensor"),
    ("moe-input-int64", lambda s: s.moe(s.x.long()), TypeError, "hidden_states must be float32, bfloat16 or float16"),
    ("moe-input-float64", lambda s: s.moe(s.x.double()), TypeError, "hidden_states .*got float64"),
    ("moe-input-bool", lambda s: s.moe(s.x > 0), TypeError, "hidden_states .*got bool"),
    ("moe-input-0d", lambda s: s.moe(torch.tensor(1.0)), ValueError, r"hidden_states must have shape \[\.\.\., 16\]"),
    ("moe-input-hidden", lambda s: s.moe(torch.randn(3, H + 1)), ValueError, "hidden_states must have shape"),
    ("moe-input-meta", lambda s: s.moe(torch.randn(3, H, device="meta")), ValueError, "hidden_states is on the meta"),
    ("config-hidden_size", lambda s: epmoe.MoE(_config(hidden_size=0)), ValueError, "MoEConfig.hidden_size"),
    ("config-scoring", lambda s: epmoe.MoE(_config(scoring="relu")), ValueError, "MoEConfig.scoring"),
    ("config-exchange_mode", lambda s: epmoe.MoE(_config(exchange_mode="fast")), ValueError,
     "MoEConfig.exchange_mode"),
    ("config-capacity-missing", lambda s: epmoe.MoE(_config(exchange_mode="capacity")), ValueError,
     "MoEConfig.capacity must be given"),
    ("config-capacity-negative", lambda s: epmoe.MoE(_config(exchange_mode="capacity", capacity=-1)), ValueError,
     "MoEConfig.capacity must be an int >= 0"),
    ("rebalance_model-not-a-module", lambda s: epmoe.rebalance_model("model"), TypeError,
     "model must be a torch.nn.Module, got str"),
    ("sync_grads-not-a-module", lambda s: epmoe.sync_grads(3), TypeError, "model must be a torch.nn.Module, got int"),
    ("config-dtype", lambda s: epmoe.MoE(_config(dtype=torch.float64)), ValueError, "MoEConfig.dtype"),
    ("config-top_k", lambda s: epmoe.MoE(_config(top_k=E + 1)), ValueError, "MoEConfig.top_k"),
    # epmoe.eplb
    ("plan-slots-str", lambda s: eplb.plan(s.load, "8", 4), TypeError, "num_slots must be an int"),
    ("plan-ranks-bool", lambda s: eplb.plan(s.load, 8, True), TypeError, "num_ranks must be an int"),
    ("plan-slots-few", lambda s: eplb.plan(s.load, E - 1, 1), ValueError, "num_slots"),
    ("plan-slots-ranks", lambda s: eplb.plan(np.ones((1, 64)), 70, 8), ValueError,
     r"num_slots \(70\) must be divisible by num_ranks \(8\)"),
    ("plan-load-3d", lambda s: eplb.plan(np.ones((2, 2, E)), E, 4), ValueError, "load must have shape"),
    ("plan-load-negative", lambda s: eplb.plan(-s.load, E, 4), ValueError, "load must be finite and non-negative"),
    ("plan-load-nan", lambda s: eplb.plan(np.full((1, E), np.nan), E, 4), ValueError, "load must be finite"),
    ("plan-load-none", lambda s: eplb.plan(None, E, 4), TypeError, "load must be a numeric"),
    ("plan-load-bool", lambda s: eplb.plan(s.load > 0, E, 4), TypeError, "load must be real numbers .*got bool"),
    ("plan-load-bool-tensor", lambda s: eplb.plan(torch.ones(1, E, dtype=torch.bool), E, 4), TypeError,
     "load must be real numbers .*got bool"),
    ("plan-load-ragged", lambda s: eplb.plan([[1, 2], [3]], E, 4), TypeError, "load must be a numeric"),
    ("plan-load-meta", lambda s: eplb.plan(torch.ones(1, E, device="meta"), E, 4), ValueError, "load is a meta"),
    ("plan-load-complex", lambda s: eplb.plan(torch.ones(1, E, dtype=torch.complex64), E, 4), TypeError,
     "load must be real"),
    ("plan-strategy", lambda s: eplb.plan(s.load, E, 4, strategy="auto"), ValueError, "strategy must be one of"),
    ("plan-max_moves-alone", lambda s: eplb.plan(s.load, E, 4, max_moves=2), ValueError, "max_moves needs previous"),
    ("plan-max_moves-negative", lambda s: eplb.plan(s.load, E, 4, previous=s.placement, max_moves=-1), ValueError,
     "max_moves must be >= 0"),
    ("plan-previous-str", lambda s: eplb.plan(s.load, E, 4, previous="plan.json"), TypeError,
     "previous must be a Placement"),
    ("plan-previous-shape", lambda s: eplb.plan(s.load, 2 * E, 4, previous=s.placement), ValueError, "previous"),
    ("plan-hierarchical-groups", lambda s: eplb.plan(s.load, E, 4, strategy="hierarchical", num_groups=3),
     ValueError, "num_groups"),
    ("balancedness-placement", lambda s: eplb.balancedness(s.load, None), TypeError,
     "placement must be an epmoe.eplb.Placement"),
    ("balancedness-load-shape", lambda s: eplb.balancedness(np.ones((3, E)), s.placement), ValueError,
     "load must have shape"),
    ("rank_load-placement", lambda s: eplb.rank_load(s.load, "p"), TypeError, "placement must be"),
    ("rebalance_experts-gpus-float", lambda s: eplb.rebalance_experts(s.load, E, 1, 1, 4.0), TypeError,
     "num_gpus must be an int"),
    ("rebalance_experts-replicas", lambda s: eplb.rebalance_experts(s.load, E - 1, 1, 1, 1), ValueError,
     "num_replicas"),
    ("placement-float", lambda s: eplb.Placement(np.zeros((1, 4)), 4, 2), TypeError,
     "phy2log must be an integer array"),
    ("placement-1d", lambda s: eplb.Placement(np.arange(4), 4, 2), ValueError, "phy2log must be a non-empty"),
    ("placement-empty", lambda s: eplb.Placement(np.zeros((1, 0), dtype=np.int64), 4, 2), ValueError,
     "phy2log must be a non-empty"),
    ("placement-uncovered", lambda s: eplb.Placement(np.zeros((1, 4), dtype=np.int64), 4, 2), ValueError,
     "without a replica"),
    ("placement-range", lambda s: eplb.Placement(np.array([[0, 1, 2, 7]]), 4, 2), ValueError, "phy2log values"),
    ("placement-ranks", lambda s: eplb.Placement(np.arange(6)[None], 6, 4), ValueError, "divisible"),
    ("placement-ranks-bool", lambda s: eplb.Placement(np.arange(4)[None], 4, True), TypeError, "num_ranks"),
    ("recorder-slots-0", lambda s: eplb.LoadRecorder(1, 0, 4), ValueError, "num_slots must be >= 1"),
    ("recorder-window-str", lambda s: eplb.LoadRecorder(1, E, "4"), TypeError, "window_size must be an int"),
    ("record-float", lambda s: s.recorder.record(0, torch.zeros(2, 2)), TypeError, "phys_idx must be int32"),
    ("record-0d", lambda s: s.recorder.record(0, torch.tensor(1)), ValueError, "phys_idx must be 2-D"),
    ("record-range", lambda s: s.recorder.record(0, torch.full((2, 2), E)), ValueError, "phys_idx values"),
    ("record-layer", lambda s: s.recorder.record(1, torch.zeros(2, 2, dtype=torch.int32)), ValueError, "layer"),
    ("logical_load-numpy", lambda s: s.recorder.logical_load(np.zeros((1, E)), E), TypeError,
     "phy2log must be a torch.Tensor"),
    ("logical_load-range", lambda s: s.recorder.logical_load(torch.full((1, E), E), E), ValueError,
     "phy2log values"),
    ("rearrange-no-dist", lambda s: eplb.rearrange([[s.w13]], s.placement, s.placement), RuntimeError,
     "torch.distributed"),
    ("num_redundant_auto-float", lambda s: eplb.num_redundant_auto(8.0, 4), TypeError, "num_experts must be an int"),
    ("epgroup-no-dist", lambda s: epmoe.EPGroup(), RuntimeError, "torch.distributed"),
]


@pytest.fixture(scope="module")
def inputs():
    return _inputs()


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in SINGLE], ids=[c[0] for c in SINGLE])
def test_single_process(inputs, call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call(inputs)
    assert type(info.value) is exc or exc is RuntimeError  # exactly the documented type (no subclasses slip)


def test_non_contiguous_inputs_are_accepted(inputs):
    s = inputs
    x_t, idx_t, w_t = (t.t().contiguous().t() for t in (s.x, s.idx, s.w))
    assert not x_t.is_contiguous()
    assert torch.equal(epmoe.experts_forward(x_t, idx_t, w_t, s.w13, s.w2),
                       epmoe.experts_forward(s.x, s.idx, s.w, s.w13, s.w2))
    logits_t = s.logits.t().contiguous().t()
    assert all(torch.equal(a, b) for a, b in zip(epmoe.route(logits_t, K), epmoe.route(s.logits, K), strict=True))
    rows_t = s.rows.t().contiguous().t()
    assert torch.equal(epmoe.grouped_swiglu_experts(rows_t, s.offsets, s.w13, s.w2, allow_padding=True),
                       epmoe.grouped_swiglu_experts(s.rows, s.offsets, s.w13, s.w2, allow_padding=True))
    with torch.no_grad():
        assert torch.equal(s.moe(x_t), s.moe(s.x))
        assert s.moe(x_t.bfloat16()).dtype == torch.bfloat16  # other float dtypes are computed in cfg.dtype


# ---------------------------------------------------------------------------------------------------------------
# Two ranks: every rank makes the same mistake (or the ranks disagree), and every rank raises; the group stays
# usable afterwards.


def _ep_inputs(rank):
    gen = torch.Generator().manual_seed(rank)
    idx = torch.zeros(T, K, dtype=torch.int32)
    idx[:, 1] = 1 + 2 * (torch.arange(T) % 2).int()  # experts 1 and 3 (both ranks)
    return SimpleNamespace(x=torch.randn(T, H, generator=gen), idx=idx, w=torch.rand(T, K, generator=gen), rank=rank)


EP_CASES = [
    ("dispatch-x-list", lambda ep, s: ep.dispatch(s.x.tolist(), s.idx, s.w, 4), TypeError, "x must be a torch"),
    ("dispatch-x-int", lambda ep, s: ep.dispatch(s.x.long(), s.idx, s.w, 4), TypeError, "x must be float32"),
    ("dispatch-x-1d", lambda ep, s: ep.dispatch(s.x[0], s.idx, s.w, 4), ValueError, "x must be 2-D"),
    ("dispatch-idx-float", lambda ep, s: ep.dispatch(s.x, s.idx.float(), s.w, 4), TypeError,
     "topk_idx must be int32 or int64"),
    ("dispatch-idx-tokens", lambda ep, s: ep.dispatch(s.x, s.idx[:2], s.w[:2], 4), ValueError,
     "topk_idx must have shape"),
    ("dispatch-weights-int", lambda ep, s: ep.dispatch(s.x, s.idx, s.idx, 4), TypeError,
     "topk_weights must be a floating-point"),
    ("dispatch-weights-shape", lambda ep, s: ep.dispatch(s.x, s.idx, s.w[:, :1], 4), ValueError,
     "topk_weights must have shape"),
    ("dispatch-num_experts-str", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, "4"), TypeError,
     "num_experts must be an int"),
    ("dispatch-num_experts-indivisible", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 5), ValueError, "divisible"),
    ("dispatch-mode", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4, mode="fast"), ValueError, "mode must be one of"),
    ("dispatch-capacity-missing", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4, mode="capacity"), ValueError,
     "capacity must be given"),
    ("dispatch-capacity-negative", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4, mode="capacity", capacity=-1),
     ValueError, "capacity must be >= 0"),
    ("dispatch-drop_overflow", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4, drop_overflow="yes"), TypeError,
     "drop_overflow must be a bool"),
    ("dispatch-expert_to_rank-float", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4, expert_to_rank=torch.zeros(4)),
     TypeError, "expert_to_rank must be int32 or int64"),
    ("dispatch-expert_to_rank-length", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4,
                                                                  expert_to_rank=torch.tensor([0, 1])),
     ValueError, "expert_to_rank must have shape"),
    ("dispatch-expert_to_rank-values", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4,
                                                                  expert_to_rank=torch.tensor([0, 1, 2, 1])),
     ValueError, "expert_to_rank"),
    ("dispatch-ids-range", lambda ep, s: ep.dispatch(s.x, s.idx + 4, s.w, 4), ValueError, "topk_idx values"),
    ("dispatch-x-meta", lambda ep, s: ep.dispatch(s.x.to("meta"), s.idx.to("meta"), s.w.to("meta"), 4), ValueError,
     r"^x must be on cpu \(gloo\) or cuda \(NCCL\), got meta"),
    ("dispatch-device", lambda ep, s: ep.dispatch(s.x, s.idx.to("meta"), s.w, 4), ValueError,
     "topk_idx must be on cpu"),
    ("combine-handle", lambda ep, s: ep.combine(s.x, "handle"), TypeError, "handle must be a DispatchHandle"),
    ("combine-shape", lambda ep, s: ep.combine(s.d.recv_x[:, :1], s.d.handle), ValueError,
     "expert_out must have shape"),
    ("combine-dtype", lambda ep, s: ep.combine(s.d.recv_x.double(), s.d.handle), TypeError,
     "expert_out must have the dispatched dtype"),
    ("combine-1d", lambda ep, s: ep.combine(s.d.recv_x[0], s.d.handle), ValueError, "expert_out must be 2-D"),
    ("combine-weights-int", lambda ep, s: ep.combine(s.d.recv_x, s.d.handle, s.d.recv_topk_weights.long()),
     TypeError, "recv_topk_weights must be a floating-point"),
    ("epgroup-timeout", lambda ep, s: epmoe.EPGroup(timeout=-1), ValueError, "timeout must be > 0"),
    # ranks that disagree: ValueError on every rank, naming the field
    ("disagree-hidden", lambda ep, s: ep.dispatch(torch.randn(T, H * (s.rank + 1)), s.idx, s.w, 4), ValueError,
     "disagree on hidden size"),
    ("disagree-num_experts", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4 * (s.rank + 1)), ValueError,
     "disagree on num_experts"),
    ("disagree-dtype", lambda ep, s: ep.dispatch(s.x.bfloat16() if s.rank else s.x, s.idx, s.w, 4), ValueError,
     r"disagree on dtype: rank \d has (float32|bfloat16), rank \d has (float32|bfloat16)"),
    ("disagree-mode", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4, mode="capacity" if s.rank else "exact",
                                                capacity=8), ValueError,
     r"disagree on mode: rank \d has (exact|capacity), rank \d has (exact|capacity)"),
    ("disagree-top_k", lambda ep, s: ep.dispatch(s.x, s.idx[:, :s.rank + 1], s.w[:, :s.rank + 1], 4), ValueError,
     "disagree on top-k"),
    ("disagree-expert_to_rank", lambda ep, s: ep.dispatch(s.x, s.idx, s.w, 4,
                                                           expert_to_rank=torch.tensor([0, 1, s.rank, 1])),
     ValueError, "disagree on expert_to_rank"),
    # the EP layer
    ("moe-ep-input-int", lambda ep, s: s.moe(s.x.long()), TypeError, "hidden_states must be float32"),
    ("moe-ep-input-0d", lambda ep, s: s.moe(torch.tensor(1.0)), ValueError, "hidden_states must have shape"),
    ("moe-ep-redundancy", lambda ep, s: epmoe.MoE(_config(num_experts=7, top_k=1)), ValueError,
     "divisible by the EP size"),
]


def _ep_cases(rank, world):
    ep = epmoe.EPGroup(timeout=20)
    s = _ep_inputs(rank)
    s.moe = epmoe.MoE(_config())
    s.d = ep.dispatch(s.x, s.idx, s.w, 4)
    reference = ep.combine(s.d.recv_x, s.d.handle)
    results = {}
    for case_id, call, _exc, _match in EP_CASES:
        try:
            call(ep, s)
            results[case_id] = ("no exception", "")
        except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
            results[case_id] = (type(exc).__name__, str(exc))
        # still in step: the group works after every case, on every rank
        d = ep.dispatch(s.x, s.idx, s.w, 4)
        assert torch.equal(ep.combine(d.recv_x, d.handle), reference), case_id
    ep.destroy()
    return results


@pytest.fixture(scope="module")
def ep_results():
    return run_ranks(_ep_cases, 2, timeout=120)


@pytest.mark.parametrize("exc, match", [c[2:] for c in EP_CASES], ids=[c[0] for c in EP_CASES])
def test_two_ranks(ep_results, request, exc, match):
    case_id = request.node.callspec.id
    for rank in (0, 1):
        name, message = ep_results[rank][case_id]
        assert name == exc.__name__, (rank, name, message)
        assert re.search(match, message), (rank, message)


# ---------------------------------------------------------------------------------------------------------------
# Bad input on one rank only: that rank raises the named error; its peer raises within the timeout (no hang).

ONE_SIDED = {
    "one-rank-dtype": (lambda ep, s: ep.dispatch(s.x.long() if s.rank == 0 else s.x, s.idx, s.w, 4), TypeError,
                       "x must be float32"),
    "one-rank-expert-id": (lambda ep, s: ep.dispatch(s.x, s.idx + (4 if s.rank == 0 else 0), s.w, 4), ValueError,
                           "topk_idx values"),
}
TIMEOUT = 4


def _one_sided(rank, world, case_id, linger):
    call = ONE_SIDED[case_id][0]
    ep = epmoe.EPGroup(timeout=TIMEOUT)
    s = _ep_inputs(rank)
    start = time.monotonic()
    try:
        call(ep, s)
        outcome = ("no exception", "")
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
        outcome = (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    elapsed = time.monotonic() - start
    if linger and rank == 0:
        time.sleep(TIMEOUT + 2)  # the bad rank stays alive: its peer must not wait past the EP timeout
    return outcome + (elapsed,)


@pytest.mark.parametrize("case_id, linger", [(c, False) for c in sorted(ONE_SIDED)] + [("one-rank-expert-id", True)])
def test_bad_input_on_one_rank_fails_every_rank_in_time(case_id, linger):
    _, exc, match = ONE_SIDED[case_id]
    results = run_ranks(_one_sided, 2, case_id, linger, timeout=2 * TIMEOUT + 40, pg_timeout=TIMEOUT + 10)
    name, message, _ = results[0]
    assert name == exc.__name__ and match in message, results[0]
    # A bad expert id travels in the header exchange: the peer raises the same error, naming the bad rank and the
    # id, at once. Other one-sided mistakes are caught before the exchange: the peer raises at the timeout.
    peer_name, peer_message, peer_seconds = results[1]
    if case_id == "one-rank-expert-id":
        assert peer_name == "ValueError" and "rank 0 has" in peer_message and peer_message == message, results
    else:  # the peer's error says where and what a failed exchange usually means, not only gloo's words
        assert peer_name == "RuntimeError" and "EP exchange failed on rank 1 of 2" in peer_message, results[1]
    assert peer_seconds < TIMEOUT + 5, results[1]
