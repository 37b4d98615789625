"""DeepSeek-EPLB-compatible planner: same signature, output shapes, dtypes and meaning as `rebalance_experts` of
deepseek-ai/EPLB, vectorised across layers with numpy.

Tie rules: replication gives the next copy to the first expert with the largest per-copy load; packing visits items
by descending weight (stable sort: equal weights in index order) and puts each into the first least-loaded pack
that is not full. On inputs without ties this reproduces the reference exactly; with ties only the order among
equal-weight items may differ (the reference sort is not stable), not the replica counts.
"""

from __future__ import annotations

import numpy as np
import torch

from .._validate import check_int
from .placement import as_load_array

__all__ = ["rebalance_experts", "balanced_packing", "replicate_experts"]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple:
    """Greedy LPT packing of n items into `num_packs` packs of exactly n / num_packs items each, per row.

    Arguments:
        weight: float64 [X, n].
        num_packs: m, with n % m == 0.

    Returns:
        pack_index int64 [X, n], rank_in_pack int64 [X, n].
    """
    num_rows, num_items = weight.shape
    capacity = num_items // num_packs
    if capacity == 1:
        # The reference does no balancing here: item i goes to pack i.
        ident = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return ident, np.zeros_like(ident)
    order = np.argsort(-weight, axis=1, kind="stable")
    rows = np.arange(num_rows)
    pack_load = np.zeros((num_rows, num_packs))
    pack_count = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    for i in range(num_items):
        item = order[:, i]
        pack = np.argmin(np.where(pack_count < capacity, pack_load, np.inf), axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_count[rows, pack]
        pack_load[rows, pack] += weight[rows, item]
        pack_count[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple:
    """Greedy replication: each extra slot copies the expert with the largest per-copy load, per row.

    Arguments:
        weight: float64 [X, n].
        num_phy: slots per row, >= n.

    Returns:
        phy2log int64 [X, num_phy], replica rank int64 [X, num_phy], logcnt int64 [X, n].
    """
    num_rows, num_log = weight.shape
    rows = np.arange(num_rows)
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    for slot in range(num_log, num_phy):
        expert = np.argmax(weight / logcnt, axis=1)
        phy2log[:, slot] = expert
        rank[:, slot] = logcnt[rows, expert]
        logcnt[rows, expert] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _rebalance_hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. Groups -> nodes; lay experts out node-major ("mlog" ids), groups in pack order, experts contiguous.
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    group_pos = group_pack * groups_per_node + group_rank
    log2mlog = (group_pos[:, :, None] * group_size + np.arange(group_size)).reshape(num_layers, num_log)
    mlog2log = _inverse(log2mlog)

    # 2. Replicas inside each node: one row per (layer, node).
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(num_layers * num_nodes, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, phy_per_node)

    # 3. Replicas -> GPUs of the node, by per-replica load.
    replica_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    gpu_pack, gpu_rank = balanced_packing(replica_load, num_gpus // num_nodes)
    phy2pphy = gpu_pack * phy_per_gpu + gpu_rank
    pphy2phy = _inverse(phy2pphy)

    # 4. Back to logical ids.
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(num_layers, num_nodes, phy_per_node)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(num_layers, num_phy)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, num_phy)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, num_log), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> tuple:
    """DeepSeek-EPLB-compatible planner.

    Hierarchical when `num_groups % num_nodes == 0` (groups packed onto nodes, replicas kept inside their node),
    else global (the hierarchical routine with one group and one node). Prefer `epmoe.eplb.plan`, which takes the
    strategy explicitly, never puts two replicas of an expert on one GPU, and balances better.

    Arguments:
        weight: [L, E] load statistics, any numeric dtype or a nested list.
        num_replicas: P, physical slots per layer; a multiple of `num_gpus` and >= E.
        num_groups: expert groups; E must be divisible by it.
        num_nodes: server nodes; `num_gpus` must be divisible by it.
        num_gpus: M; GPU g owns slots [g * P / M, (g + 1) * P / M).

    Returns:
        phy2log: int64 [L, P], logical expert of each slot.
        log2phy: int64 [L, E, P - E + 1], slots of each expert (replica creation order), -1 padded.
        logcnt: int64 [L, E], replica count of each expert.
    """
    arr = as_load_array(weight, "weight")
    num_layers, num_log = arr.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        check_int(name, value, minimum=1)
    if num_replicas < num_log:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of experts ({num_log})")
    if num_replicas % num_gpus != 0:
        raise ValueError(f"num_replicas ({num_replicas}) must be divisible by num_gpus ({num_gpus})")
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_gpus ({num_gpus}) must be divisible by num_nodes ({num_nodes})")
    if num_log % num_groups != 0:
        raise ValueError(f"the number of experts ({num_log}) must be divisible by num_groups ({num_groups})")
    # The reference computes in float32; match its arithmetic so ties and orderings agree.
    arr = arr.astype(np.float32).astype(np.float64)
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(arr, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(arr, num_replicas, 1, 1, num_gpus)
    log2phy = np.full((num_layers, num_log, num_replicas - num_log + 1), -1, dtype=np.int64)
    layer = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    log2phy[layer, phy2log, phyrank] = np.broadcast_to(np.arange(num_replicas), phy2log.shape)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
