"""Replica choice at routing time: logical top-k ids -> physical slot ids, by one of three policies.

- "hash": the replica of (token t, top-k position j) in layer l is `floor(h * logcnt[e] / 2^32)` with
  `h = hash32(t, j, l)` a 32-bit mix of the *global* token index: the same token gets the same slot on every rank,
  and each replica of an expert receives an expected 1 / logcnt share of its tokens whatever k and the count are
  (unlike `position mod count`, which is biased when the count divides k).
- "weighted": the same hash against thresholds: replica i takes the h in [2^32 * c_(i-1), 2^32 * c_i), c the running
  sum of the placement's replica shares (`Placement.share`, chosen by `plan` so that the predicted rank loads are
  as even as the replicas allow). Rank-invariant like "hash".
- "balanced": the less-loaded copy for this batch. The batch's (token, slot) pairs are counted per logical expert
  (over `group` when given: one all_gather of E int64 per call), the min-max assignment of those counts to the
  replicas is solved exactly (`torch.ops.epmoe.balance_replicas`, a parametric max flow), and each pair takes the
  replica of its position among the group's pairs of its expert (ranks in group order, then flat order
  t * k + j). Deterministic and identical on every rank for identical inputs; per-rank loads are the optimum.

"hash" is one fused op (`torch.ops.epmoe.replica_hash`, the integers of `hash32`), "weighted" int64 torch ops,
"balanced" one fused op; all run on CPU and CUDA. None syncs the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from epmoe import _loader  # noqa: F401  (loads _C: the torch.ops.epmoe ops)

from .placement import POLICIES, Placement

__all__ = ["map_to_physical", "hash32", "group_counts", "POLICIES"]

_MASK32 = 0xFFFFFFFF
# Multipliers < 2^31 so that a product with a 32-bit value stays below 2^63 (no int64 overflow).
_MUL1 = 0x7FEB352D
_MUL2 = 0x5BD1E995
_GOLDEN = 0x1E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit avalanche mix of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def hash32(token_idx: torch.Tensor, slot_idx: torch.Tensor, layer: int) -> torch.Tensor:
    """int64 values in [0, 2^32) from (global token index, top-k position, layer); broadcasts its tensor inputs."""
    salt = _mix32((slot_idx.to(torch.int64) * _GOLDEN + (layer & 0xFFFF) * 0x10001 + 1) & _MASK32)
    return _mix32((token_idx.to(torch.int64) & _MASK32) ^ salt)


@torch.library.register_fake("epmoe::replica_hash")
def _replica_hash_fake(topk_idx, log2phy, logcnt, token_offset, layer):
    return torch.empty_like(topk_idx)


@torch.library.register_fake("epmoe::balance_replicas")
def _balance_replicas_fake(topk_idx, log2phy, logcnt, counts, prefix, num_slots, num_ranks):
    return torch.empty_like(topk_idx)


class _LayerMaps:
    """One layer's maps on one device: log2phy int64 [E, M], logcnt int64 [E], and the "weighted" thresholds
    int64 [E, M - 1] (built on first use)."""

    def __init__(self, placement: Placement, layer: int, device: torch.device):
        self.placement, self.layer = placement, layer
        self.log2phy = placement.log2phy[layer].to(device)
        self.logcnt = placement.logcnt[layer].to(device)
        self._thresholds = None

    def thresholds(self) -> torch.Tensor:
        if self._thresholds is None:
            _, log2phy, logcnt = self.placement.numpy()
            slots = log2phy[self.layer]
            share = self.placement.share[self.layer].numpy()
            cum = torch.from_numpy(share[slots.clip(min=0)] * (slots >= 0)).cumsum(dim=1)
            thr = torch.round(cum * 2.0**32).to(torch.int64)
            # The last replica ends at 2^32: every h < 2^32 finds a replica, rounding never drops one.
            thr[torch.arange(thr.shape[1])[None, :] >= torch.from_numpy(logcnt[self.layer])[:, None] - 1] = 1 << 32
            self._thresholds = thr[:, :-1].contiguous().to(self.log2phy.device)
        return self._thresholds


def _layer_maps(placement: Placement, layer: int, device: torch.device) -> _LayerMaps:
    """Cached per (layer, device) on the placement (immutable, so the cache never goes stale)."""
    cache = placement.__dict__.setdefault("_device_maps", {})
    key = (layer, str(device))
    if key not in cache:
        cache[key] = _LayerMaps(placement, layer, device)
    return cache[key]


def group_counts(topk_idx: torch.Tensor, num_experts: int, group=None) -> tuple:
    """Pairs per logical expert of this batch: (counts, prefix), int64 [E] each on topk_idx's device.

    Without a group (or a group of one rank): counts are this call's pairs, prefix is None. With a group: counts
    are summed over its ranks and prefix holds the pairs of the lower ranks (one all_gather of E int64, on the
    device for NCCL, through the host for a gloo group and CUDA tensors; every rank of the group must call it, with
    the same num_experts).
    """
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device)
    torch.ops.epmoe.count_slots(counts, topk_idx.to(torch.int32).contiguous())
    if group is None or dist.get_world_size(group) == 1:
        return counts, None
    num_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    # A gloo group cannot gather CUDA tensors: then the counts travel through the host (one sync).
    via_host = counts.is_cuda and dist.get_backend(group) == "gloo"
    counts = counts.cpu() if via_host else counts
    gathered = torch.empty(num_ranks, num_experts, dtype=torch.int64, device=counts.device)
    dist.all_gather(list(gathered.unbind(0)), counts, group=group)
    gathered = gathered.to(topk_idx.device)
    return gathered.sum(dim=0), gathered[:rank].sum(dim=0)


def map_to_physical(topk_idx: torch.Tensor, placement, layer: int, token_offset: int = 0, *, policy: str = "hash",
                    group=None) -> torch.Tensor:
    """Maps logical expert ids to physical slot ids with a replica policy (see the module docstring).

    Arguments:
        topk_idx: int32 or int64 [T, k] logical expert ids of T tokens; -1 means "skip" and stays -1.
        placement: a `Placement`; for "hash" also a tuple (log2phy, logcnt) of tensors on the device of
            `topk_idx`: log2phy int64/int32 [L, E, M] (or [E, M] for one layer), logcnt [L, E] (or [E]).
            A one-layer `Placement` serves every layer index (then `layer` only salts the hash).
        layer: the MoE layer index (selects the maps and salts the hash).
        token_offset: global index of token 0 of this batch ("hash" and "weighted"); must be the same number on
            every rank that routes the same token (e.g. the token's position in the all-gathered batch).
        policy: "hash", "weighted" or "balanced".
        group: "balanced" only: the process group whose ranks each route their own tokens; counts are exchanged
            over it (collective: every rank of the group calls this with the same layer). None: this batch alone.

    Returns:
        Tensor [T, k] of slot ids, same dtype and device as `topk_idx`; every slot holds its token's expert.
    """
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError("topk_idx must be an int32 or int64 tensor")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must have shape [num_tokens, num_topk], got {tuple(topk_idx.shape)}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if isinstance(placement, Placement):
        if placement.num_layers > 1 and not 0 <= layer < placement.num_layers:
            raise ValueError(f"layer must lie in [0, {placement.num_layers}), got {layer}")
        maps = _layer_maps(placement, layer if placement.num_layers > 1 else 0, topk_idx.device)
        log2phy, logcnt = maps.log2phy, maps.logcnt
    elif isinstance(placement, (tuple, list)) and len(placement) == 2:
        if policy != "hash":
            raise TypeError(f"policy {policy!r} needs a Placement (a (log2phy, logcnt) tuple serves 'hash' only)")
        log2phy, logcnt = placement
        if log2phy.dim() == 3:
            if not 0 <= layer < log2phy.shape[0]:
                raise ValueError(f"layer must lie in [0, {log2phy.shape[0]}), got {layer}")
            log2phy, logcnt = log2phy[layer], logcnt[layer]
        if log2phy.dim() != 2 or logcnt.dim() != 1 or logcnt.shape[0] != log2phy.shape[0]:
            raise ValueError(f"log2phy must be [L, E, M] or [E, M] and logcnt [L, E] or [E]; got "
                             f"{tuple(log2phy.shape)} and {tuple(logcnt.shape)}")
        if log2phy.device != topk_idx.device or logcnt.device != topk_idx.device:
            raise ValueError(f"log2phy and logcnt must be on {topk_idx.device}")
    else:
        raise TypeError("placement must be a Placement or a (log2phy, logcnt) tuple of tensors")

    if policy == "balanced":
        counts, prefix = group_counts(topk_idx, placement.num_experts, group)
        return torch.ops.epmoe.balance_replicas(topk_idx.contiguous(), log2phy, logcnt, counts, prefix,
                                                placement.num_slots, placement.num_ranks)
    if policy == "hash":  # one op: multiply-shift of hash32 by the replica count, then the slot lookup
        return torch.ops.epmoe.replica_hash(topk_idx.contiguous(), log2phy.to(torch.int64).contiguous(),
                                            logcnt.to(torch.int64).contiguous(), int(token_offset), int(layer))
    num_tokens, num_topk = topk_idx.shape
    valid = topk_idx >= 0
    expert = torch.where(valid, topk_idx, torch.zeros_like(topk_idx)).to(torch.int64)
    token = torch.arange(num_tokens, device=topk_idx.device, dtype=torch.int64)[:, None] + token_offset
    slot = torch.arange(num_topk, device=topk_idx.device, dtype=torch.int64)[None, :]
    h = hash32(token, slot, layer)
    thresholds = maps.thresholds()
    replica = torch.zeros_like(h)
    for i in range(thresholds.shape[1]):
        replica += h >= thresholds[:, i][expert]
    phys = log2phy[expert, replica]
    return torch.where(valid, phys.to(topk_idx.dtype), topk_idx)
