"""transformers backend: `register()` adds "epmoe" to transformers' experts interface.

After `register()`, `AutoModelForCausalLM.from_config(cfg, experts_implementation="epmoe")` (or
`model.set_experts_implementation("epmoe")`) runs every MoE block's experts through `epmoe.experts_forward`.
Supported experts modules hold concatenated `gate_up_proj [E, 2I, H]` (gate rows then up rows) and
`down_proj [E, H, I]`, no bias, SiLU (DeepseekV2, DeepseekV3, Qwen3-MoE, Mixtral and others of that shape);
anything else raises instead of computing something different. `transformers` is an optional dependency: this
module imports it only inside `register()`.
"""

from __future__ import annotations

import torch

from epmoe.experts import experts_forward

__all__ = ["register", "epmoe_experts_forward", "IMPLEMENTATION_NAME"]

IMPLEMENTATION_NAME = "epmoe"

_SILU_NAMES = ("silu", "swish")


def _check_supported(module: torch.nn.Module) -> None:
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
    _check_supported(self)
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
