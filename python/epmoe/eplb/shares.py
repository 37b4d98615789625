"""Replica shares ("weighted" policy) and the per-batch optimum ("balanced" policy) of a placement, from a load.

Both solve, per layer, the min-max assignment of each expert's load to the ranks holding its replicas (an exact
parametric max flow in C++: `torch.ops.epmoe.replica_quotas`, the solver of the "balanced" policy); the shares then
even out the other ranks by water-filling (`torch.ops.epmoe.replica_shares`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from epmoe import _loader  # noqa: F401  (loads _C: the torch.ops.epmoe ops)

from .placement import Placement, as_load_array

__all__ = ["replica_shares", "optimal_rank_load", "SHARE_SWEEPS"]

# Water-filling rounds after the min-max solve: enough to even out the ranks below the maximum on DeepSeek-sized
# layers (each round costs one pass over the replicated experts).
SHARE_SWEEPS = 8
_SCALE = float(1 << 40)


@torch.library.register_fake("epmoe::replica_quotas")
def _replica_quotas_fake(counts, log2phy, logcnt, num_slots, num_ranks):
    return counts.new_empty((log2phy.shape[0], num_slots))


@torch.library.register_fake("epmoe::replica_shares")
def _replica_shares_fake(load, log2phy, logcnt, num_slots, num_ranks, num_sweeps):
    return load.new_empty((log2phy.shape[0], num_slots))


def _tensor(view: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only placement view (the ops only read it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": nothing writes through it
        return torch.from_numpy(view)


def replica_shares(load, placement: Placement, num_sweeps: int = SHARE_SWEEPS) -> np.ndarray:
    """float64 [L, P]: the share of its expert's load each slot takes so that the predicted rank loads of `load`
    are as even as the placement's replicas allow (exact min-max, then water-filling of the other ranks).

    Arguments:
        load: [L, E] predicted logical load.
        placement: the slots (its own shares are ignored).
        num_sweeps: water-filling rounds after the min-max solve.
    """
    arr = as_load_array(load)
    _, log2phy, logcnt = placement.numpy()
    share = torch.ops.epmoe.replica_shares(_tensor(np.ascontiguousarray(arr)), _tensor(log2phy),
                                           _tensor(logcnt), placement.num_slots, placement.num_ranks, num_sweeps)
    return share.numpy()


def optimal_rank_load(load, placement: Placement) -> np.ndarray:
    """float64 [L, R]: rank loads of the min-max assignment of `load` to the placement's replicas (what the
    "balanced" policy achieves on a batch with this load; the load is solved at a resolution of 2^-40 of a layer's
    total)."""
    arr = as_load_array(load)
    _, log2phy, logcnt = placement.numpy()
    total = arr.sum(axis=1, keepdims=True)
    unit = np.where(total > 0, total / _SCALE, 1.0)
    counts = np.rint(arr / unit).astype(np.int64)
    quotas = torch.ops.epmoe.replica_quotas(torch.from_numpy(counts), _tensor(log2phy), _tensor(logcnt),
                                            placement.num_slots, placement.num_ranks)
    per_slot = quotas.numpy() * unit
    return per_slot.reshape(placement.num_layers, placement.num_ranks, placement.num_local_slots).sum(axis=2)
