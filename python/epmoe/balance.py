"""Balance losses and DeepSeek-V3's aux-loss-free bias update for `epmoe.MoE` (names after Megatron-Core).

Invariants:
- The balance terms are functions of the router logits (and of the selected ids, which carry no gradient): their
  gradients reach the gate and the layer's input, never the experts or the correction bias.
- The bias update uses token counts summed over the EP and DP groups, so every rank applies bitwise the same
  update and the correction bias stays identical on every rank.
- With `aux_loss="global"` the counts and token totals are summed over the EP and DP groups, so the mean over ranks
  of the per-rank `aux_loss` (the quantity `sync_grads` differentiates) is the loss of the concatenated batch.

Terms, over the T tokens of one forward (E experts, top-k; s = softmax or sigmoid of the logits as the layer
scores, p = s / sum_j s_j the normalised unbiased scores):
- "seq" (DeepSeek-V3 sequence-wise): per sequence of S tokens (the input's second-to-last dimension),
  f_i = E / (k S) * #tokens selecting i, P_i = mean over the sequence of p_i; loss = coeff * sum_i f_i P_i,
  averaged over the sequences.
- "global" (Switch / GShard): the same over the whole batch of every rank, i.e. coeff * E * sum_i f_i P_i with
  f_i = #selections of i / (k T), the fraction of the k T assignments (Megatron-Core's normalisation; transformers'
  load_balancing_loss_func divides by T, k times this).
- z-loss (ST-MoE): z_coeff * mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["AUX_LOSSES", "aux_loss", "routing_losses", "update_bias", "validate_config"]

AUX_LOSSES = ("seq", "global")


def validate_config(cfg) -> None:
    """Raises ValueError naming the MoEConfig training field that is out of range."""
    if cfg.aux_loss is not None and cfg.aux_loss not in AUX_LOSSES:
        raise ValueError(f"MoEConfig.aux_loss must be None, 'seq' or 'global', got {cfg.aux_loss!r}")
    for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"MoEConfig.{name} must be a finite number >= 0, got {value!r}")
    if cfg.aux_loss_coeff > 0 and cfg.aux_loss is None:
        raise ValueError(f"MoEConfig.aux_loss_coeff={cfg.aux_loss_coeff} has no effect with aux_loss=None; "
                         "set aux_loss='seq' or 'global'")
    if cfg.bias_update_rate > 0 and not cfg.use_bias:
        raise ValueError(f"MoEConfig.bias_update_rate={cfg.bias_update_rate} needs use_bias=True (the correction "
                         "bias it updates)")
    if isinstance(cfg.eplb_interval, bool) or not isinstance(cfg.eplb_interval, int) or cfg.eplb_interval < 0:
        raise ValueError(f"MoEConfig.eplb_interval must be an int >= 0, got {cfg.eplb_interval!r}")


def _sum_over_ranks(t: torch.Tensor, moe) -> torch.Tensor:
    for group in (moe.group if moe.distributed else None, moe.dp_group):
        if group is not None:
            dist.all_reduce(t, group=group)
    return t


def enabled(cfg) -> bool:
    """Whether a training forward has balance work: an aux or z loss, or the bias update's counts."""
    return cfg.aux_loss is not None or cfg.z_loss_coeff != 0 or cfg.bias_update_rate > 0


def routing_losses(moe, logits: torch.Tensor, topk_idx: torch.Tensor, leading_shape) -> torch.Tensor | None:
    """The enabled balance terms of one forward, summed (None when none is enabled).

    Arguments:
        moe: the layer (its config and groups).
        logits: float32 [T, E] router logits (differentiable).
        topk_idx: int32 [T, k] selected logical experts.
        leading_shape: the input's shape without the hidden dimension; its last entry is the sequence length.
    """
    cfg = moe.config
    if cfg.aux_loss is None and cfg.z_loss_coeff == 0:
        return None
    num_tokens, num_experts = logits.shape
    terms = []
    if cfg.aux_loss is not None:
        scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        ids = topk_idx.long()
        if cfg.aux_loss == "seq":
            seq_len = int(leading_shape[-1]) if len(leading_shape) > 0 else 1
            num_seqs = num_tokens // seq_len if seq_len > 0 else 0
            if num_seqs == 0:
                balance = logits.sum() * 0.0
            else:
                counts = torch.zeros(num_seqs, num_experts, dtype=torch.float32, device=logits.device)
                counts.scatter_add_(1, ids.reshape(num_seqs, -1), torch.ones_like(ids, dtype=torch.float32)
                                    .reshape(num_seqs, -1))
                f = counts * (num_experts / (cfg.top_k * seq_len))
                p = probs.reshape(num_seqs, seq_len, num_experts).mean(1)
                balance = (f * p).sum(-1).mean()
        else:
            # Counts and token totals over every rank; this rank's share of P is scaled by the number of ranks so
            # that the mean over ranks of the per-rank loss is the loss of the whole batch.
            totals = torch.zeros(num_experts + 1, dtype=torch.int64, device=logits.device)
            totals[:num_experts].index_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
            totals[num_experts] = num_tokens
            totals = _sum_over_ranks(totals, moe).double()
            all_tokens = totals[num_experts].clamp_min(1)  # stays on the device: no host sync
            num_ranks = moe.num_ranks * moe.dp_size
            f = (totals[:num_experts] * (num_experts / cfg.top_k) * num_ranks / all_tokens.square()).float()
            balance = (f * probs.sum(0)).sum()
        terms.append(cfg.aux_loss_coeff * balance)
    if cfg.z_loss_coeff > 0:
        z = torch.logsumexp(logits, -1).square().mean() if num_tokens > 0 else logits.sum() * 0.0
        terms.append(cfg.z_loss_coeff * z)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def after_routing(moe, logits: torch.Tensor, topk_idx: torch.Tensor, leading_shape) -> torch.Tensor | None:
    """Called by a training forward: counts the selections for the bias update; returns the balance terms."""
    if moe.config.bias_update_rate > 0:
        counts = getattr(moe, "_routed_counts", None)
        if counts is None or counts.device != topk_idx.device:
            counts = torch.zeros(moe.config.num_experts, dtype=torch.int64, device=topk_idx.device)
            moe._routed_counts = counts
        torch.ops.epmoe.count_slots(counts, topk_idx.to(torch.int32).contiguous())
    return routing_losses(moe, logits, topk_idx, leading_shape)


@torch.no_grad()
def update_bias_layers(layers) -> None:
    """The bias update of layers that share their EP and DP groups: one all-reduce of their [L, E] counts, then
    bias += rate * sign(mean load - load) per layer; the counts restart."""
    if not layers:
        return
    device = layers[0].e_score_correction_bias.device
    counts = torch.zeros(len(layers), layers[0].config.num_experts, dtype=torch.int64, device=device)
    for row, moe in zip(counts, layers, strict=True):
        routed = getattr(moe, "_routed_counts", None)
        if routed is not None:
            row.copy_(routed)
            routed.zero_()
    counts = _sum_over_ranks(counts, layers[0])
    load = counts.double()
    step = torch.sign(load.mean(1, keepdim=True) - load).float()
    for row, moe in zip(step, layers, strict=True):
        moe.e_score_correction_bias.add_(moe.config.bias_update_rate * row)


def update_bias(moe) -> None:
    """`MoE.update_bias()`: the aux-loss-free update of one layer (collective over its EP and DP groups)."""
    if moe.config.bias_update_rate <= 0:
        raise ValueError("MoE.update_bias needs MoEConfig.bias_update_rate > 0 (and use_bias=True)")
    from epmoe import training

    training.check_agreement([moe], "update_bias")
    update_bias_layers([moe])


def aux_loss(model) -> torch.Tensor | None:
    """Sum of `aux_loss` over every `epmoe.MoE` in `model` after a training forward (None when no layer has an
    enabled balance term)."""
    from epmoe import training

    losses = [moe.aux_loss for moe in training.moe_layers(model) if moe.aux_loss is not None]
    if not losses:
        return None
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total
