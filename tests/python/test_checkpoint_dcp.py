"""torch.distributed.checkpoint with EP models: `model.state_dict()` saved at EP=4 (redundant experts, a skewed
placement) loads at EP=2 (another redundancy and placement), is saved there again and loads at EP=1, always with the
same logical weights; each rank writes only logical experts it holds, each tensor is stored once."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ep_harness import run_ranks
from epmoe import eplb
from epmoe.layer import MoE, MoEConfig
from test_layer import full_weights, small_config
from torch import nn

CONFIGS = (small_config, lambda **kw: MoEConfig(hidden_size=32, moe_intermediate_size=8, num_experts=6, top_k=2,
                                                 **kw))


def logical_state(weights: dict) -> dict:
    """The state dict of an MoE layer holding `weights` (test_layer.full_weights), keyed by logical expert."""
    state = {"gate_weight": weights["gate"]}
    if weights["bias"] is not None:
        state["e_score_correction_bias"] = weights["bias"]
    if weights["shared"] is not None:
        for proj, w in zip(("gate_proj", "up_proj", "down_proj"), weights["shared"], strict=True):
            state[f"shared_experts.{proj}.weight"] = w
    for e in range(weights["w13"].shape[0]):
        state[f"experts.{e}.gate_up_proj"] = weights["w13"][e]
        state[f"experts.{e}.down_proj"] = weights["w2"][e]
    return state


class Stack(nn.Module):
    """A dense projection (replicated) and two MoE layers of different shapes, in a skewed placement."""

    def __init__(self, group, num_ranks: int, num_redundant: int, weights_seed: int, placement_seed: int):
        """`num_redundant`: at least that many redundant slots per layer (more where the EP size needs it)."""
        super().__init__()
        self.proj = nn.Linear(32, 32)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(weights_seed)))
        layers = []
        for i, make in enumerate(CONFIGS):
            num_experts = make().num_experts
            cfg = make(num_redundant_experts=eplb.num_redundant_auto(num_experts, num_ranks, num_redundant))
            skew = torch.rand(1, cfg.num_experts, generator=torch.Generator().manual_seed(placement_seed + i)) ** 4
            layer = MoE(cfg, group, layer_idx=i, placement=eplb.plan(skew, cfg.num_slots, num_ranks))
            missing, unexpected = layer.load_state_dict(logical_state(full_weights(cfg, weights_seed + i)))
            assert not missing and not unexpected
            layers.append(layer)
        self.layers = nn.ModuleList(layers)


def check_logical_weights(model: Stack, weights_seed: int) -> None:
    """Every slot holds its logical expert's weights of `weights_seed`; replicated tensors likewise."""
    gen = torch.Generator().manual_seed(weights_seed)
    assert torch.equal(model.proj.weight, torch.randn(32, 32, generator=gen))
    for i, (layer, make) in enumerate(zip(model.layers, CONFIGS, strict=True)):
        weights = full_weights(make(), weights_seed + i)
        experts = layer.local_slot_experts()
        assert torch.equal(layer.w13.detach(), weights["w13"][experts])
        assert torch.equal(layer.w2.detach(), weights["w2"][experts])
        assert torch.equal(layer.gate_weight.detach(), weights["gate"])
        if weights["bias"] is not None:
            assert torch.equal(layer.e_score_correction_bias, weights["bias"])
        if weights["shared"] is not None:
            assert torch.equal(layer.shared_experts.down_proj.weight.detach(), weights["shared"][2])


def _save(rank, world, folder):
    model = Stack(dist.group.WORLD, world, num_redundant=4, weights_seed=1, placement_seed=10)
    dcp.save(model.state_dict(), checkpoint_id=folder)
    return [sorted(set(layer.local_slot_experts().tolist())) for layer in model.layers]


def _load(rank, world, folder, num_redundant, resave=None):
    """Loads `folder` at this EP size (another redundancy and placement); `resave`: saves it there again."""
    model = Stack(dist.group.WORLD if world > 1 else None, world, num_redundant, weights_seed=2, placement_seed=20)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=folder, no_dist=world == 1)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    check_logical_weights(model, weights_seed=1)
    if resave is not None:
        dcp.save(model.state_dict(), checkpoint_id=resave)
    return True


def test_dcp_ep4_to_ep2_to_ep1(tmp_path):
    folder = str(tmp_path / "dcp")
    held = run_ranks(_save, 4, folder, timeout=120)
    # Each expert key is stored once, by a rank that holds that expert; replicated tensors once too.
    metadata = dcp.FileSystemReader(folder).read_metadata()
    writers = {}
    for index, info in metadata.storage_data.items():
        writers.setdefault(index.fqn, set()).add(int(re.match(r"__(\d+)_", info.relative_path).group(1)))
    for i, make in enumerate(CONFIGS):
        for e in range(make().num_experts):
            for name in ("gate_up_proj", "down_proj"):
                (rank,) = writers[f"layers.{i}.experts.{e}.{name}"]
                assert e in held[rank][i]
    assert len(writers["proj.weight"]) == 1 and len(writers["layers.0.gate_weight"]) == 1
    # EP=4 -> EP=2 (saved again there) -> EP=1, and EP=4 -> EP=1 directly.
    assert all(run_ranks(_load, 2, folder, 2, str(tmp_path / "dcp2"), timeout=120).values())
    assert _load(0, 1, str(tmp_path / "dcp2"), 0)
    assert _load(0, 1, folder, 0)
