"""Replica choice at routing time: logical top-k ids -> physical slot ids.

The replica of (token t, top-k position j) in layer l is `floor(h * logcnt[e] / 2^32)` with
`h = hash32(t, j, l)` a 32-bit mix of the *global* token index: the same token gets the same slot on every rank,
and each replica of an expert receives an expected 1 / logcnt share of its tokens whatever k and the count are
(unlike `position mod count`, which is biased when the count divides k). Only int64 torch ops: runs unchanged on
CPU and CUDA tensors, no host sync.
"""

from __future__ import annotations

import torch

from .placement import Placement

__all__ = ["map_to_physical", "hash32"]

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


def map_to_physical(topk_idx: torch.Tensor, placement, layer: int, token_offset: int = 0) -> torch.Tensor:
    """Maps logical expert ids to physical slot ids.

    Arguments:
        topk_idx: int32 or int64 [T, k] logical expert ids of T tokens; -1 means "skip" and stays -1.
        placement: a `Placement`, or a tuple (log2phy, logcnt) of tensors on the device of `topk_idx`:
            log2phy int64/int32 [L, E, M] (or [E, M] for one layer), logcnt [L, E] (or [E]).
        layer: the MoE layer index (selects the maps and salts the hash).
        token_offset: global index of token 0 of this batch; must be the same number on every rank that routes
            the same token (e.g. the token's position in the all-gathered batch).

    Returns:
        Tensor [T, k] of slot ids, same dtype and device as `topk_idx`.
    """
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError("topk_idx must be an int32 or int64 tensor")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must have shape [num_tokens, num_topk], got {tuple(topk_idx.shape)}")
    if isinstance(placement, Placement):
        log2phy, logcnt = placement.log2phy.to(topk_idx.device), placement.logcnt.to(topk_idx.device)
    elif isinstance(placement, (tuple, list)) and len(placement) == 2:
        log2phy, logcnt = placement
    else:
        raise TypeError("placement must be a Placement or a (log2phy, logcnt) tuple of tensors")
    if log2phy.dim() == 3:
        if not 0 <= layer < log2phy.shape[0]:
            raise ValueError(f"layer must lie in [0, {log2phy.shape[0]}), got {layer}")
        log2phy, logcnt = log2phy[layer], logcnt[layer]
    if log2phy.dim() != 2 or logcnt.dim() != 1 or logcnt.shape[0] != log2phy.shape[0]:
        raise ValueError(f"log2phy must be [L, E, M] or [E, M] and logcnt [L, E] or [E]; got "
                         f"{tuple(log2phy.shape)} and {tuple(logcnt.shape)}")
    if log2phy.device != topk_idx.device or logcnt.device != topk_idx.device:
        raise ValueError(f"log2phy and logcnt must be on {topk_idx.device}")
    num_tokens, num_topk = topk_idx.shape
    valid = topk_idx >= 0
    expert = torch.where(valid, topk_idx, torch.zeros_like(topk_idx)).to(torch.int64)
    token = torch.arange(num_tokens, device=topk_idx.device, dtype=torch.int64)[:, None] + token_offset
    slot = torch.arange(num_topk, device=topk_idx.device, dtype=torch.int64)[None, :]
    count = logcnt.to(torch.int64)[expert]
    replica = (hash32(token, slot, layer) * count) >> 32  # multiply-shift: uniform in [0, count)
    phys = log2phy[expert, replica]
    return torch.where(valid, phys.to(topk_idx.dtype), topk_idx)
