"""transformers integration.

- `register()` adds "epmoe" to transformers' experts interface (single process, local experts).
- `shard_model(model, process_group)` / `moe_from_hf(block)` replace MoE blocks (DeepseekV2Moe, DeepseekV3MoE,
  Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock) with expert-parallel `epmoe.MoE` layers; each rank keeps only its
  experts. The router GEMM runs in fp32 (as DeepSeek's routers do; for Qwen3/Mixtral in bf16 this is more precise
  than the block it replaces, so selections can differ on near-ties). The sharded model's epmoe parameters are
  excluded from DistributedDataParallel (`epmoe.sync_grads` owns them), `model.to(dtype)` converts the layers, and
  `output_router_logits=True` returns each layer's fp32 router logits [T, E] (docs/training.md says what the
  model's own load-balancing loss then computes).

After `register()`, `AutoModelForCausalLM.from_config(cfg, experts_implementation="epmoe")` (or
`model.set_experts_implementation("epmoe")`) runs every MoE block's experts through `epmoe.experts_forward`.
Supported experts modules hold concatenated `gate_up_proj [E, 2I, H]` (gate rows then up rows) and
`down_proj [E, H, I]`, no bias, SiLU (DeepseekV2, DeepseekV3, Qwen3-MoE, Mixtral and others of that shape);
anything else raises instead of computing something different. `transformers` is an optional dependency: this
module imports it only inside `register()`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from epmoe import eplb, training
from epmoe.experts import experts_forward
from epmoe.integrations.hf_checkpoint import remember_hf_block
from epmoe.layer import MoE, MoEConfig

__all__ = [
    "IMPLEMENTATION_NAME",
    "RouterLogitsProbe",
    "SUPPORTED_BLOCKS",
    "check_supported_experts",
    "epmoe_experts_forward",
    "from_pretrained",  # noqa: F822 - lazy (__getattr__ below)
    "moe_config_from_hf",
    "moe_from_hf",
    "register",
    "save_pretrained",  # noqa: F822 - lazy (__getattr__ below)
    "shard_model",
]

# Checkpoint loading and saving live in hf_load / hf_save, which import this module; they are re-exported here
# lazily (PEP 562) so that importing either module first never meets a half-initialised one.
_LAZY = {"from_pretrained": "epmoe.integrations.hf_load", "save_pretrained": "epmoe.integrations.hf_save"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

IMPLEMENTATION_NAME = "epmoe"

_SILU_NAMES = ("silu", "swish")


def check_supported_experts(module: torch.nn.Module) -> None:
    name = type(module).__name__
    unsupported = []
    if not getattr(module, "has_gate", True):
        unsupported.append("experts without a gate (has_gate=False)")
    if getattr(module, "has_bias", False):
        unsupported.append("expert biases (has_bias=True)")
    if getattr(module, "is_transposed", False):
        unsupported.append("transposed weights (is_transposed=True)")
    if not getattr(module, "is_concatenated", True):
        unsupported.append("interleaved gate/up layout (is_concatenated=False)")
    if getattr(module, "has_post_expert_norm", False):
        unsupported.append("a post-expert norm (has_post_expert_norm=True)")
    if getattr(module, "_is_expert_parallel", False):
        unsupported.append("transformers' own expert parallelism (use epmoe.MoE for EP)")
    if type(module)._apply_gate.__name__ != "_default_apply_gate":
        unsupported.append(f"a custom gating function ({type(module)._apply_gate.__qualname__})")
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    if act not in _SILU_NAMES:
        unsupported.append(f"activation {act!r} (only SiLU/SwiGLU experts)")
    for attr in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(module, attr, None), torch.Tensor):
            unsupported.append(f"a missing `{attr}` weight")
    if unsupported:
        raise NotImplementedError(f"epmoe experts backend does not support {name}: " + "; ".join(unsupported))


def epmoe_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The transformers experts-interface function: (module, hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H] in hidden_states.dtype."""
    check_supported_experts(self)
    w13, w2 = self.gate_up_proj, self.down_proj
    # Under autocast the activations may come in another dtype than the weights (as in transformers' grouped_mm).
    x = hidden_states.to(w13.dtype).contiguous()
    out = experts_forward(x, top_k_index.to(torch.int32), top_k_weights.float(), w13, w2)
    return out.to(hidden_states.dtype)


def register() -> None:
    """Adds "epmoe" to transformers' experts interface (idempotent). Raises ImportError without transformers."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError(
            "epmoe.integrations.transformers needs transformers >= 5 (pip install 'epmoe[transformers]')"
        ) from exc
    ExpertsInterface.register(IMPLEMENTATION_NAME, epmoe_experts_forward)


SUPPORTED_BLOCKS = ("DeepseekV3MoE", "DeepseekV2Moe", "Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock")


def moe_config_from_hf(block: nn.Module, **overrides) -> MoEConfig:
    """The MoEConfig equivalent to a transformers MoE block (raises ValueError for unsupported blocks); `overrides`
    set the fields that have no transformers counterpart (e.g. num_redundant_experts, exchange_mode)."""
    name = type(block).__name__
    if name not in SUPPORTED_BLOCKS:
        raise ValueError(f"unsupported MoE block {name}; supported: {', '.join(SUPPORTED_BLOCKS)}")
    experts, gate = block.experts, block.gate
    check_supported_experts(experts)
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
    # Built on meta, then allocated without drawing initial weights: every tensor is copied from `block`.
    moe = MoE(config, process_group, layer_idx=layer_idx, device="meta").to_empty(device=device)
    remember_hf_block(moe, block)
    with torch.no_grad():
        moe.gate_weight.copy_(block.gate.weight.float())
        if config.use_bias:
            moe.e_score_correction_bias.copy_(block.gate.e_score_correction_bias.float())
        moe.load_logical_experts(block.experts.gate_up_proj, block.experts.down_proj)
        if moe.shared_experts is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.shared_experts, proj).weight.copy_(getattr(block.shared_experts, proj).weight)
    install_router_logits_probe(moe)
    return moe.train(block.training)


class RouterLogitsProbe(nn.Module):
    """Identity on an `epmoe.MoE` layer's fp32 router logits [T, E]: transformers' output capturing records them
    here, so `output_router_logits=True` returns one tensor per MoE layer as the replaced router did."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def install_router_logits_probe(moe: MoE) -> None:
    """Gives `moe` a `RouterLogitsProbe` hooked into transformers' output capturing (`output_router_logits`)."""
    moe.router_logits_probe = RouterLogitsProbe()
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # a transformers without output capturing hooks records nothing here
        return
    install_output_capuring_hook(moe.router_logits_probe, "router_logits", 0)


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
    return training.exclude_from_ddp(model)
