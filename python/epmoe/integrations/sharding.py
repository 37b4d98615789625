"""Expert-parallel versions of transformers MoE blocks: `moe_from_hf(block)` and `shard_model(model)`.

Supported blocks (transformers 5.x): DeepseekV3MoE (sigmoid + correction bias + top-2-sum groups, shared experts),
DeepseekV2Moe (softmax, optional max-score groups, no renormalization, shared experts), Qwen3MoeSparseMoeBlock and
MixtralSparseMoeBlock (softmax top-k, renormalized). The router GEMM runs in fp32 (as DeepSeek's routers do; for
Qwen3/Mixtral in bf16 this is more precise than the block it replaces, so selections can differ on near-ties).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from epmoe import eplb
from epmoe.layer import MoE, MoEConfig

__all__ = ["moe_config_from_hf", "moe_from_hf", "shard_model", "SUPPORTED_BLOCKS"]

SUPPORTED_BLOCKS = ("DeepseekV3MoE", "DeepseekV2Moe", "Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock")


def _check_experts(experts: nn.Module, block_name: str) -> None:
    """Rejects experts that epmoe would compute differently: biases, interleaved gate/up, another activation."""
    if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
        raise ValueError(f"{block_name}.experts has no concatenated gate_up_proj/down_proj weights: unsupported layout")
    if getattr(experts, "has_bias", False) or hasattr(experts, "gate_up_proj_bias"):
        raise ValueError(f"{block_name}.experts has biases: unsupported by epmoe (SwiGLU without bias only)")
    if getattr(experts, "is_transposed", False) or getattr(experts, "interleaved", False):
        raise ValueError(f"{block_name}.experts uses a transposed/interleaved gate_up layout: unsupported")
    act = getattr(experts, "act_fn", None)
    if act is None or "silu" not in type(act).__name__.lower():
        raise ValueError(f"{block_name}.experts activation {type(act).__name__} is unsupported (SiLU only)")


def moe_config_from_hf(block: nn.Module, **overrides) -> MoEConfig:
    """The MoEConfig equivalent to a transformers MoE block (raises ValueError for unsupported blocks); `overrides`
    set the fields that have no transformers counterpart (e.g. num_redundant_experts, exchange_mode)."""
    name = type(block).__name__
    if name not in SUPPORTED_BLOCKS:
        raise ValueError(f"unsupported MoE block {name}; supported: {', '.join(SUPPORTED_BLOCKS)}")
    experts, gate = block.experts, block.gate
    _check_experts(experts, name)
    num_experts, two_inter, hidden = experts.gate_up_proj.shape
    common = dict(
        hidden_size=int(hidden),
        moe_intermediate_size=int(two_inter) // 2,
        num_experts=int(num_experts),
        top_k=int(gate.top_k),
        dtype=experts.gate_up_proj.dtype,
        **overrides,
    )
    shared = getattr(block, "shared_experts", None)
    shared_size = int(shared.gate_proj.weight.shape[0]) if shared is not None else 0
    if name == "DeepseekV3MoE":
        return MoEConfig(
            **common, scoring="sigmoid", num_groups=int(gate.num_group), topk_groups=int(gate.topk_group),
            use_bias=True, renormalize=bool(gate.norm_topk_prob), scaling_factor=float(gate.routed_scaling_factor),
            num_shared_experts=1, shared_intermediate_size=shared_size,
        )
    if name == "DeepseekV2Moe":
        grouped = gate.topk_method == "group_limited_greedy"
        if not grouped and gate.topk_method != "greedy":
            raise ValueError(f"DeepseekV2Moe topk_method {gate.topk_method!r} is unsupported")
        return MoEConfig(
            **common, scoring="softmax", num_groups=int(gate.num_group) if grouped else 1,
            topk_groups=int(gate.topk_group) if grouped else 1, renormalize=False,
            scaling_factor=float(gate.routed_scaling_factor), num_shared_experts=1,
            shared_intermediate_size=shared_size,
        )
    if name == "MixtralSparseMoeBlock" and block.jitter_noise > 0:
        raise ValueError("MixtralSparseMoeBlock with router_jitter_noise > 0 is unsupported")
    renormalize = bool(getattr(gate, "norm_topk_prob", True))
    return MoEConfig(**common, scoring="softmax", renormalize=renormalize)


def _ep_size(process_group: dist.ProcessGroup | None) -> int:
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        return dist.get_world_size(process_group)
    return 1


def moe_from_hf(block: nn.Module, process_group: dist.ProcessGroup | None = None, *, layer_idx: int = 0,
                num_redundant_experts: int | str = 0, **overrides) -> MoE:
    """An `epmoe.MoE` computing what `block` computes, with its weights; each rank keeps only its experts.

    `num_redundant_experts="auto"` adds the fewest EPLB slots that make the slot count divisible by the EP size
    (needed e.g. for 5 experts on 2 ranks); other `overrides` are MoEConfig fields (exchange_mode, eplb_window...).
    """
    if num_redundant_experts == "auto":
        num_redundant_experts = eplb.num_redundant_auto(int(block.experts.gate_up_proj.shape[0]),
                                                        _ep_size(process_group))
    config = moe_config_from_hf(block, num_redundant_experts=num_redundant_experts, **overrides)
    device = block.experts.gate_up_proj.device
    with torch.device(device):
        moe = MoE(config, process_group, layer_idx=layer_idx)
    with torch.no_grad():
        moe.gate_weight.copy_(block.gate.weight.float())
        if config.use_bias:
            moe.e_score_correction_bias.copy_(block.gate.e_score_correction_bias.float())
        moe.load_logical_experts(block.experts.gate_up_proj, block.experts.down_proj)
        if moe.shared_experts is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.shared_experts, proj).weight.copy_(getattr(block.shared_experts, proj).weight)
    return moe.train(block.training)


def shard_model(model: nn.Module, process_group: dist.ProcessGroup | None = None, **moe_kwargs) -> nn.Module:
    """Replaces every supported MoE block of `model` (in place) with its expert-parallel `epmoe.MoE`; each rank keeps
    only its experts' weights. Every rank must call it with the same model. `moe_kwargs` go to `moe_from_hf`
    (num_redundant_experts, MoEConfig fields). Returns `model`."""
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ in SUPPORTED_BLOCKS]
    if not targets:
        raise ValueError(f"model has no MoE block epmoe can shard (supported: {', '.join(SUPPORTED_BLOCKS)})")
    for layer_idx, (name, block) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, moe_from_hf(block, process_group, layer_idx=layer_idx, **moe_kwargs))
    return model
