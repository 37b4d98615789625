"""`plan()`: the epmoe expert placement planner.

Fresh plan, per layer (all layers at once, numpy):
  1. (hierarchical) expert groups -> nodes: the best of every partition when there are few (8 groups on 2 or 4
     nodes: 35 or 105), else cardinality-constrained packing of group loads refined by swaps.
  2. replica counts: give each extra slot to the expert with the largest per-copy load (optimal for the largest
     per-copy load), never more copies than ranks in scope so that no rank needs two copies of one expert.
  3. replicas -> ranks: round-robin LPT (per round the heaviest remaining replicas go to the lightest ranks),
     a repair pass for same-rank duplicates, rounds of pairwise swaps (i-th heaviest <-> i-th lightest rank), then
     swaps between the heaviest rank and the lightest ranks until the heaviest rank cannot be lowered. A swap's new
     maximum grows with the distance of the partner's weight from the one that evens the two ranks, so ranks with
     many slots only try the partners nearest to it. Packing stops once the heaviest rank is within
     _PACK_TOLERANCE of the lower bound (mean and largest replica).
  4. where the one-copy-per-rank cap binds (an expert has >= R - 1 copies in its scope), step 3 also runs on
     replica-count variants (one copy moved between two of the three most replicated experts), all variants in one
     call, and the best packing is kept.
  5. replica shares ("weighted" policy): the min-max split of each expert's load over its copies, water-filled.
Incremental plan (`previous=` and `max_moves=`): greedy local search from the previous slots, all layers at once.
Potential: sum over ranks of ((load - mean)_+ / mean) ** 4. Each step scores, per layer, the best swap of each of the
heaviest ranks with a slot of another rank (2 slot changes; screened in float32, then scored exactly) and the best
re-assignments (1 slot change: a replica of an expert with spare copies becomes a replica of another expert), by
potential decrease per slot change; it then applies, in decreasing score, every candidate that touches ranks and
experts disjoint from those already taken and scores at least half the best one, within the budget. Slots already
changed are free to change again. It stops when the budget is used or nothing improves.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np
import torch

from .._validate import check_int
from .placement import Placement, as_load_array
from .shares import replica_shares

__all__ = ["plan", "STRATEGIES"]

STRATEGIES = ("global", "hierarchical")

_REFINE_LIGHT = 16
_REFINE_SMALL = 8
_MAX_REFINE = 12
_PAIR_ROUNDS = 8
_PAIRS = 8
_VARIANT_EXPERTS = 3
_PACK_TOLERANCE = 1e-5  # packing stops once the heaviest pack is within this of the lower bound
_NEAREST = 2  # swap partners tried on each side of the ideal weight, when packs hold more than _NEAREST_MIN items
_NEAREST_MIN = 12
_MAX_PARTITIONS = 8192  # groups -> nodes: every partition is scored when there are at most this many
_REPAIR_HEAVY_RANKS = 2
_REPAIR_LIGHT_RANKS = 64
_REPAIR_SWAP_BUDGET = 4096
_REPAIR_SOURCES = 32
_REPAIR_TARGETS = 8
_REPAIR_CHEAP_TARGETS = 4
_REPAIR_EXACT = 4
_REPAIR_BATCH = 0.5


def _gather(arr: np.ndarray, index: np.ndarray) -> np.ndarray:
    """arr [A, n] gathered along dim 1 by index [A, ...] (any trailing shape) -> [A, ...]."""
    return np.take_along_axis(arr, index.reshape(index.shape[0], -1), axis=1).reshape(index.shape)


def _at(table: np.ndarray, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """table[i, j, k] for a contiguous 3-d table and broadcasting integer index arrays (one flat take)."""
    _, n1, n2 = table.shape
    return table.reshape(-1)[(i * n1 + j) * n2 + k]


def _partner_items(w: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """Swap partners worth trying in K selected packs, for Q items each: all S items of the pack when packs are
    small (None), else the 2 * _NEAREST items whose weight is nearest to the target (the weight that evens the two
    packs; the swap's new maximum grows with the distance from it).

    Arguments: w float64 [A, K, S] item weights of the selected packs; target float64 [A, Q, K].

    Returns:
        None, or int64 [A, Q, K, 2 * _NEAREST] flat indices into w (w.reshape(-1)).
    """
    num_a, num_k, num_items = w.shape
    if num_items <= _NEAREST_MIN:
        return None
    order = np.argsort(w, axis=2).reshape(-1)
    srt = w.reshape(-1)[order + np.repeat(np.arange(num_a * num_k) * num_items, num_items)]
    # One sorted array for every pack: pack i's weights shifted by i * span, so that one searchsorted serves all.
    lo, hi = float(srt.min()), float(srt.max())
    span = 2.0 * (hi - lo) + 1.0
    row = np.arange(num_a * num_k).reshape(num_a, 1, num_k)
    flat = srt - lo + np.repeat(np.arange(num_a * num_k) * span, num_items)
    t = np.clip(target, lo - 0.25 * span, hi + 0.25 * span) - lo + row * span
    pos = np.searchsorted(flat, t) - row * num_items  # rank of the target inside its pack
    sorted_idx = np.clip(pos[..., None] + np.arange(-_NEAREST, _NEAREST), 0, num_items - 1) + row[..., None] * num_items
    return order[sorted_idx] + row[..., None] * num_items


def _candidates(values: np.ndarray, cand: np.ndarray | None, num_q: int) -> np.ndarray:
    """values [A, K, S] at the partner items: [A, Q, K, C] (a broadcast view [A, Q, K, S] when cand is None)."""
    if cand is None:
        return np.broadcast_to(values[:, None, :, :], (values.shape[0], num_q) + values.shape[1:])
    return values.reshape(-1)[cand]


def _replicate(weight: np.ndarray, num_phy: int, max_copies: int | None) -> np.ndarray:
    """Replica counts int64 [X, n]: each of the num_phy - n extra copies goes to the first expert with the largest
    per-copy load among those below `max_copies`."""
    num_rows, num_items = weight.shape
    rows = np.arange(num_rows)
    logcnt = np.ones((num_rows, num_items), dtype=np.int64)
    ratio = weight.astype(np.float64, copy=True)
    for _ in range(num_phy - num_items):
        expert = np.argmax(ratio, axis=1)
        logcnt[rows, expert] += 1
        count = logcnt[rows, expert]
        ratio[rows, expert] = np.where(max_copies is None or count < max_copies, weight[rows, expert] / count,
                                       -np.inf)
    return logcnt


def _repair_duplicates(pw, pk, load, has) -> None:
    """Swaps items so that no pack holds a key twice (in place). Rare: only called for rows with duplicates."""
    num_rows, num_packs, num_per_pack = pk.shape
    for x, r in zip(*np.nonzero(has.max(axis=2) > 1), strict=True):
        for key in np.nonzero(has[x, r] > 1)[0]:
            while has[x, r, key] > 1:
                a = int(np.nonzero(pk[x, r] == key)[0][-1])
                # Partner item b in another pack r2: key not in r2, b's key not in r.
                ok = (has[x, :, key] == 0)[:, None] & (has[x, r][pk[x]] == 0)
                if not ok.any():
                    return  # infeasible swap set: keep the duplicate, the placement stays valid
                cost = np.where(ok, np.abs(pw[x] - pw[x, r, a]), np.inf)
                r2, b = np.unravel_index(np.argmin(cost), cost.shape)
                _swap(pw, pk, load, has, x, r, a, r2, b)


def _swap(pw, pk, load, has, x, r1, a, r2, b) -> None:
    ka, kb = pk[x, r1, a], pk[x, r2, b]
    d = pw[x, r1, a] - pw[x, r2, b]
    load[x, r1] -= d
    load[x, r2] += d
    has[x, r1, ka] -= 1
    has[x, r2, kb] -= 1
    has[x, r1, kb] += 1
    has[x, r2, ka] += 1
    pw[x, r1, a], pw[x, r2, b] = pw[x, r2, b], pw[x, r1, a]
    pk[x, r1, a], pk[x, r2, b] = kb, ka


def _refine(pw, pk, load, has, bound, avoid_conflicts: bool, max_iters: int) -> None:
    """Swaps between the heaviest pack and the lightest packs while that lowers the heaviest pack (in place).
    Rows whose heaviest pack is at most `bound` (float64 [X], a lower bound of the optimum) are left alone."""
    num_rows, num_packs, num_per_pack = pw.shape
    if num_packs == 1:
        return
    # Keep the [A, S, T, C] candidate array small when packs hold many items.
    budget = max(1, 4096 // (num_per_pack * (2 * _NEAREST if num_per_pack > _NEAREST_MIN else num_per_pack)))
    num_light = min(num_packs - 1, _REFINE_LIGHT, budget)
    num_small = min(num_packs * num_per_pack - 1, _REFINE_SMALL, budget)
    active = np.nonzero(load.max(axis=1) > bound)[0]
    for _ in range(max_iters):
        if active.size == 0:
            break
        ld = load[active]
        heavy = np.argmax(ld, axis=1)
        # Partners: the lightest packs, and the packs holding the lightest items (small swaps for a pack that
        # holds one huge item).
        lightest = np.argpartition(ld, num_light - 1, axis=1)[:, :num_light]
        flat_w = pw[active].reshape(active.size, -1)
        small = np.argpartition(flat_w, num_small - 1, axis=1)[:, :num_small] // num_per_pack
        partners = np.concatenate([lightest, small], axis=1)
        lh = ld[np.arange(active.size), heavy]
        lp = np.take_along_axis(ld, partners, axis=1)
        wh = pw[active, heavy]  # [A, S]
        wp = pw[active[:, None], partners]  # [A, T, S]
        target = wh[:, :, None] - 0.5 * (lh[:, None] - lp)[:, None, :]  # [A, S, T]: the partner weight that evens
        cand = _partner_items(wp, target)
        # Layout [A, S (heavy item), T (partner), C (partner item)].
        d = wh[:, :, None, None] - _candidates(wp, cand, num_per_pack)
        new_max = np.maximum(lh[:, None, None, None] - d, lp[:, None, :, None] + d)
        valid = (d > 0) & (partners != heavy[:, None])[:, None, :, None]
        if avoid_conflicts:
            kh = pk[active, heavy]  # [A, S]
            kc = _candidates(pk[active[:, None], partners], cand, num_per_pack)  # [A, S, T, C]
            a_in_partner = _at(has, active[:, None, None], partners[:, None, :], kh[:, :, None]) > 0  # [A, S, T]
            b_in_heavy = _at(has, active[:, None, None, None], heavy[:, None, None, None], kc) > 0
            valid &= ~a_in_partner[:, :, :, None] & ~b_in_heavy
        new_max = np.where(valid, new_max, np.inf).reshape(active.size, -1)
        best = np.argmin(new_max, axis=1)
        improves = new_max[np.arange(active.size), best] < lh * (1 - 1e-12)
        # One swap per improving row, applied to all rows at once.
        x, h, best = active[improves], heavy[improves], best[improves]
        a, t, c = np.unravel_index(best, d.shape[1:])
        b = c if cand is None else cand[improves, a, t, c] % num_per_pack
        r = partners[improves, t]
        _swap(pw, pk, load, has, x, h, a, r, b)
        active = x[load[x].max(axis=1) > bound[x]]


def _balance_pairs(pw, pk, load, has, bound, avoid_conflicts: bool, num_iters: int) -> None:
    """Rounds of simultaneous swaps: the i-th heaviest pack (i < _PAIRS) swaps one item with the i-th lightest pack
    (rotated each round), choosing the swap that minimises the larger of the two new loads (in place). Rows whose
    heaviest pack is at most `bound` (float64 [X], a lower bound of the optimum) are left alone."""
    num_rows, num_packs, num_per_pack = pw.shape
    half = min(num_packs // 2, _PAIRS)
    if half == 0:
        return
    active = np.nonzero(load.max(axis=1) > bound)[0]
    for it in range(num_iters):
        if active.size == 0:
            break
        rows = active[:, None]
        num_rows = active.size
        order = np.argsort(load[active], axis=1)
        light = order[:, :half]
        heavy = np.roll(order[:, ::-1][:, :half], -(it % half), axis=1)
        lh, ll = load[rows, heavy], load[rows, light]
        wh, wl = pw[rows, heavy], pw[rows, light]  # [X, half, S]
        target = (wh - 0.5 * (lh - ll)[:, :, None])[:, :, None, :]  # [X * half, 1, 1, S]: evens the pair
        cand = _partner_items(wl.reshape(-1, 1, num_per_pack), target.reshape(-1, num_per_pack, 1))
        # Layout [X * half, S (heavy item), 1, C (light item)].
        d = wh.reshape(-1, num_per_pack, 1, 1) - _candidates(wl.reshape(-1, 1, num_per_pack), cand, num_per_pack)
        new_max = np.maximum(lh.reshape(-1, 1, 1, 1) - d, ll.reshape(-1, 1, 1, 1) + d)
        valid = d > 0
        if avoid_conflicts:
            kh, kl = pk[rows, heavy], pk[rows, light]
            a_in_light = _at(has, rows[:, :, None], light[:, :, None], kh) > 0  # [X, half, S]
            kc = _candidates(kl.reshape(-1, 1, num_per_pack), cand, num_per_pack)
            b_in_heavy = _at(has, np.repeat(active, half)[:, None, None, None],
                             heavy.reshape(-1)[:, None, None, None], kc) > 0
            valid &= ~a_in_light.reshape(-1, num_per_pack, 1, 1) & ~b_in_heavy
        new_max = np.where(valid, new_max, np.inf).reshape(num_rows, half, -1)
        best = np.argmin(new_max, axis=2)
        i, p = np.nonzero(np.take_along_axis(new_max, best[:, :, None], axis=2)[:, :, 0] < lh * (1 - 1e-12))
        a, c = np.divmod(best[i, p], d.shape[3])
        b = c if cand is None else cand.reshape(num_rows, half, num_per_pack, -1)[i, p, a, c] % num_per_pack
        x, h, r = active[i], heavy[i, p], light[i, p]
        _swap(pw, pk, load, has, x, h, a, r, b)
        # Rows without an improving pair this round stop.
        active = np.unique(x)
        active = active[load[active].max(axis=1) > bound[active]]


def _pack(item_weight: np.ndarray, item_key: np.ndarray, num_packs: int, num_keys: int, avoid_conflicts: bool):
    """Packs the n items of each row into `num_packs` packs of n / num_packs items.

    Returns the keys of the items of each pack, int64 [X, num_packs, n / num_packs].
    """
    num_rows, num_items = item_weight.shape
    num_per_pack = num_items // num_packs
    rows = np.arange(num_rows)[:, None]
    order = np.argsort(-item_weight, axis=1, kind="stable")
    pw = np.empty((num_rows, num_packs, num_per_pack))
    pk = np.empty((num_rows, num_packs, num_per_pack), dtype=np.int64)
    load = np.zeros((num_rows, num_packs))
    # Round-robin LPT: per round the heaviest remaining items go to the packs in increasing load order.
    for k in range(num_per_pack):
        items = order[:, k * num_packs:(k + 1) * num_packs]
        packs = np.argsort(load, axis=1, kind="stable")
        pw[rows, packs, k] = item_weight[rows, items]
        pk[rows, packs, k] = item_key[rows, items]
        load[rows, packs] += item_weight[rows, items]
    # has[x, r, key]: copies of `key` in pack r (int16: at most num_per_pack). Plain assignment counts a key once
    # per pack; the rare duplicates are added afterwards.
    has = np.zeros((num_rows, num_packs, num_keys), dtype=np.int16)
    has[rows[:, :, None], np.arange(num_packs)[None, :, None], pk] = 1
    srt = np.sort(pk, axis=2)
    dup_x, dup_r, dup_j = np.nonzero(srt[:, :, 1:] == srt[:, :, :-1])
    np.add.at(has, (dup_x, dup_r, srt[dup_x, dup_r, dup_j + 1]), 1)
    if avoid_conflicts and has.max() > 1:
        _repair_duplicates(pw, pk, load, has)
    # Lower bound of the optimal heaviest pack per row: the mean pack load and the largest item.
    bound = np.maximum(load.mean(axis=1), item_weight.max(axis=1)) * (1 + _PACK_TOLERANCE)
    _balance_pairs(pw, pk, load, has, bound, avoid_conflicts, num_iters=_PAIR_ROUNDS)
    _refine(pw, pk, load, has, bound, avoid_conflicts, max_iters=_MAX_REFINE)
    return pk


def _pack_counts(weight: np.ndarray, logcnt: np.ndarray, num_ranks: int, avoid_conflicts: bool):
    """Packs the replicas given by `logcnt` (int64 [X, n]) of weight [X, n] onto ranks.

    Returns (keys of each rank's replicas int64 [X, R, P / R], heaviest rank load float64 [X]).
    """
    num_rows, num_items = weight.shape
    per_copy = weight / logcnt
    keys = np.repeat(np.tile(np.arange(num_items), num_rows), logcnt.reshape(-1)).reshape(num_rows, -1)
    pk = _pack(np.take_along_axis(per_copy, keys, axis=1), keys, num_ranks, num_items, avoid_conflicts)
    peak = np.take_along_axis(per_copy, pk.reshape(num_rows, -1), axis=1).reshape(pk.shape).sum(axis=2).max(axis=1)
    return pk, peak


def _plan_scope(weight: np.ndarray, num_phy: int, num_ranks: int) -> np.ndarray:
    """Plans rows independently: weight [X, n] -> slot contents [X, num_phy] (indices into n), ranks contiguous.

    Where the one-copy-per-rank cap binds (an expert has >= R - 1 copies), the replica counts also decide how well
    the copies pack: those rows also try moving one copy between two of their three most replicated experts, all
    variants packed in one call, and keep the best packing.
    """
    num_rows, num_items = weight.shape
    num_per_rank = num_phy // num_ranks
    # Two copies on one rank are unavoidable only when a rank has more slots than there are experts.
    avoid_conflicts = num_per_rank <= num_items
    logcnt = _replicate(weight, num_phy, num_ranks if avoid_conflicts else None)
    pk, peak = _pack_counts(weight, logcnt, num_ranks, avoid_conflicts)
    # Rows whose cap binds and whose heaviest rank is above what any variant could reach: the mean, the largest
    # per-copy load of the experts the variants leave alone, and that of the top experts with one more copy each.
    top = np.argsort(-logcnt, axis=1, kind="stable")[:, :_VARIANT_EXPERTS]  # [X, 3]
    per_copy = weight / logcnt
    np.put_along_axis(per_copy, top, np.take_along_axis(weight / (logcnt + 1), top, axis=1), axis=1)
    reach = np.maximum(weight.sum(axis=1) / num_ranks, per_copy.max(axis=1))
    tight = (np.nonzero((logcnt.max(axis=1) >= num_ranks - 1) & (peak > reach * (1 + _PACK_TOLERANCE)))[0]
             if avoid_conflicts else [])
    if len(tight):
        top = top[tight]
        src, dst = np.nonzero(~np.eye(top.shape[1], dtype=bool))
        rows = np.repeat(tight, src.size)  # [T * V]
        a, b = top[:, src].reshape(-1), top[:, dst].reshape(-1)
        counts = logcnt[rows]
        ok = (counts[np.arange(rows.size), a] > 1) & (counts[np.arange(rows.size), b] < num_ranks)
        rows, a, b, counts = rows[ok], a[ok], b[ok], counts[ok]
        if rows.size == 0:
            return np.sort(pk, axis=2).reshape(num_rows, num_phy)
        counts[np.arange(rows.size), a] -= 1
        counts[np.arange(rows.size), b] += 1
        var_pk, var_peak = _pack_counts(weight[rows], counts, num_ranks, avoid_conflicts)
        # Best variant per row (stable: the first of equal peaks), kept only if it lowers the peak.
        order = np.lexsort((np.arange(rows.size), var_peak, rows))
        first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
        better = var_peak[first] < peak[rows[first]] * (1 - 1e-12)
        pk[rows[first[better]]] = var_pk[first[better]]
    return np.sort(pk, axis=2).reshape(num_rows, num_phy)


@functools.cache
def _partitions(num_items: int, num_packs: int) -> np.ndarray | None:
    """Every split of items 0..n-1 into `num_packs` unordered packs of n / num_packs items, int64 [K, packs, n/packs]
    (each pack ascending, packs ordered by their first item), or None when there are more than _MAX_PARTITIONS."""
    size = num_items // num_packs
    count = math.factorial(num_items) // (math.factorial(size) ** num_packs * math.factorial(num_packs))
    if count > _MAX_PARTITIONS:
        return None

    def split(items: tuple) -> list:
        if not items:
            return [[]]
        first, rest = items[0], items[1:]
        out = []
        for others in itertools.combinations(rest, size - 1):
            pack = (first,) + others
            remaining = tuple(i for i in rest if i not in others)
            out.extend([list(pack)] + tail for tail in split(remaining))
        return out

    return np.array(split(tuple(range(num_items))), dtype=np.int64).reshape(count, num_packs, size)


def _plan_fresh(weight, num_slots, num_ranks, num_nodes, num_groups, hierarchical: bool) -> np.ndarray:
    num_layers, num_experts = weight.shape
    if not hierarchical:
        return _plan_scope(weight, num_slots, num_ranks)
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    parts = _partitions(num_groups, num_nodes)
    if num_nodes > 1 and parts is not None:
        # Few partitions (8 groups on 2 or 4 nodes: 35 or 105): the one with the lightest heaviest node, exactly.
        node_load = group_load[:, parts].sum(axis=3).max(axis=2)  # [L, K]
        node_groups = parts[np.argmin(node_load, axis=1)]  # [L, N, G/N]
    elif num_nodes > 1:
        node_groups = np.sort(_pack(group_load, np.broadcast_to(np.arange(num_groups), group_load.shape),
                                    num_nodes, num_groups, avoid_conflicts=False), axis=2)  # [L, N, G/N]
    else:
        node_groups = np.broadcast_to(np.arange(num_groups), (num_layers, 1, num_groups))
    # Logical ids of each node's experts: [L, N, E/N]
    node_experts = (node_groups[:, :, :, None] * group_size + np.arange(group_size)).reshape(
        num_layers, num_nodes, groups_per_node * group_size)
    node_weight = np.take_along_axis(weight, node_experts.reshape(num_layers, -1), axis=1)
    local = _plan_scope(node_weight.reshape(num_layers * num_nodes, -1), num_slots // num_nodes,
                        num_ranks // num_nodes)
    return np.take_along_axis(node_experts.reshape(num_layers * num_nodes, -1), local, axis=1).reshape(
        num_layers, num_slots)


def _match_ranks(new: np.ndarray, old: np.ndarray, num_ranks: int, num_experts: int, num_nodes: int) -> np.ndarray:
    """Relabels the ranks of `new` (greedy max overlap with `old`, inside a node) and keeps each expert in its old
    slot when it stays on the same rank. Balancedness is unchanged: ranks are only permuted."""
    num_layers, num_slots = new.shape
    num_per_rank = num_slots // num_ranks
    ranks_per_node = num_ranks // num_nodes
    node = np.arange(num_ranks) // ranks_per_node
    out = np.empty_like(new)
    # Slot pairs (new slot, old slot) holding the same expert in the same layer, all layers at once (no BLAS: a
    # threaded matmul of the hold matrices costs far more than counting).
    key_new = (np.arange(num_layers)[:, None] * num_experts + new).reshape(-1)
    key_old = (np.arange(num_layers)[:, None] * num_experts + old).reshape(-1)
    order_old = np.argsort(key_old, kind="stable")
    cnt_old = np.bincount(key_old, minlength=num_layers * num_experts)
    start_old = np.cumsum(cnt_old) - cnt_old
    reps = cnt_old[key_new]
    pair_new = np.repeat(np.arange(key_new.size), reps)
    pair_old = order_old[np.repeat(start_old[key_new], reps) + np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps,
                                                                                                   reps)]
    pair_layer = pair_new // num_slots
    rank_pair = (pair_new % num_slots) // num_per_rank * num_ranks + (pair_old % num_slots) // num_per_rank
    bounds = np.searchsorted(pair_layer, np.arange(num_layers + 1))
    for layer in range(num_layers):
        new_r = new[layer].reshape(num_ranks, num_per_rank).tolist()
        old_r = old[layer].reshape(num_ranks, num_per_rank).tolist()
        overlap = np.bincount(rank_pair[bounds[layer]:bounds[layer + 1]], minlength=num_ranks * num_ranks).reshape(
            num_ranks, num_ranks).astype(np.float64)  # [new rank, old rank]
        overlap = np.where(node[:, None] == node[None, :], overlap, -1.0)
        # Greedy assignment by decreasing overlap; ties resolved in index order. Pairs without overlap come last:
        # each unmatched new rank (ascending) then takes the lowest unused old rank of its node.
        positive = np.flatnonzero(overlap > 0)
        target = np.full(num_ranks, -1)
        used = np.zeros(num_ranks, dtype=bool)
        for flat in positive[np.argsort(-overlap.reshape(-1)[positive], kind="stable")]:
            nr, orr = divmod(int(flat), num_ranks)
            if target[nr] < 0 and not used[orr]:
                target[nr] = orr
                used[orr] = True
        for nr in np.flatnonzero(target < 0):
            orr = int(np.flatnonzero(~used & (node == node[nr]))[0])
            target[nr] = orr
            used[orr] = True
        for nr in range(num_ranks):
            old_slots = list(old_r[target[nr]])
            row = [-1] * num_per_rank
            rest = []
            for expert in new_r[nr]:
                if expert in old_slots:
                    j = old_slots.index(expert)
                    old_slots[j] = -1  # a duplicate may match only one old slot
                    row[j] = expert
                else:
                    rest.append(expert)
            free = [j for j in range(num_per_rank) if row[j] < 0]
            for j, expert in zip(free, rest, strict=True):
                row[j] = expert
            out[layer, target[nr] * num_per_rank:(target[nr] + 1) * num_per_rank] = row
    return out


def _excess(load: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Repair potential of rank loads: ((load - mean)_+ / mean) ** 4, elementwise (mean broadcasts)."""
    t = load / mean
    t -= 1.0
    np.maximum(t, 0.0, out=t)
    t *= t
    t *= t
    return t


def _relu4(over: np.ndarray) -> np.ndarray:
    """max(over, 0) ** 4 (a new array): `_excess` of loads given as load / mean - 1."""
    t = np.maximum(over, 0)
    t *= t
    t *= t
    return t


class _View(NamedTuple):
    """The state of the A active layers in one repair step (float64 unless noted).

    x int64 [A] layer ids; w [A, E] load; cnt int64 [A, E] replica counts; per_copy [A, E]; share [A, P] slot
    loads; load [A, R] rank loads; exc [A, R] `_excess` of the rank loads; m [A, 1] mean rank load; changed bool
    [A, P] slot differs from the original; ph / orig int64 [A, P] current / original slot contents; budget int64
    [A] slot changes left.
    """

    x: np.ndarray
    w: np.ndarray
    cnt: np.ndarray
    per_copy: np.ndarray
    share: np.ndarray
    load: np.ndarray
    exc: np.ndarray
    m: np.ndarray
    changed: np.ndarray
    ph: np.ndarray
    orig: np.ndarray
    budget: np.ndarray


def _repair(prev: np.ndarray, weight: np.ndarray, num_ranks: int, max_moves: int, node_of_rank: np.ndarray,
            max_copies: int) -> np.ndarray:
    """Greedy local search on all layers at once (see the module docstring).

    Arguments:
        prev: int64 [L, P] previous slot contents.
        weight: float64 [L, E] new load.
        num_ranks: R.
        max_moves: most slots per layer whose expert may differ from `prev`.
        node_of_rank: int64 [R] scope (node) of each rank: swaps stay inside a node and a slot may only become a
            copy of an expert that its node already holds.
        max_copies: most replicas per expert.

    Returns:
        int64 [L, P] repaired slot contents.
    """
    num_layers, num_slots = prev.shape
    num_experts = weight.shape[1]
    num_per_rank = num_slots // num_ranks
    num_nodes = int(node_of_rank.max()) + 1
    ranks_per_node = num_ranks // num_nodes
    rank_of_slot = np.arange(num_slots) // num_per_rank
    layer = np.arange(num_layers)[:, None]
    phy = prev.copy()
    logcnt = np.bincount((layer * num_experts + phy).reshape(-1), minlength=num_layers * num_experts).reshape(
        num_layers, num_experts)
    # hold[l, r, e] (int16): copies of e on rank r; node_cnt[l, k, e]: copies of e on node k (None: one node).
    hold = np.bincount(((layer * num_ranks + rank_of_slot) * num_experts + phy).reshape(-1),
                       minlength=num_layers * num_ranks * num_experts).astype(np.int16).reshape(
                           num_layers, num_ranks, num_experts)
    node_cnt = hold.reshape(num_layers, num_nodes, ranks_per_node, num_experts).sum(axis=2) if num_nodes > 1 else None
    mean = weight.sum(axis=1) / num_ranks
    # Swap candidates [A, H, S, S, T]: the H heaviest ranks x the T lightest other ranks of their node.
    num_heavy = min(num_ranks, _REPAIR_HEAVY_RANKS)
    num_light = min(ranks_per_node - 1, _REPAIR_LIGHT_RANKS)
    while num_heavy > 1 and num_heavy * num_light * num_per_rank ** 2 > _REPAIR_SWAP_BUDGET:
        num_heavy -= 1
    while num_light > 1 and num_heavy * num_light * num_per_rank ** 2 > _REPAIR_SWAP_BUDGET:
        num_light //= 2
    # Re-assignment sources: the slots of experts with >= 2 copies (at most 2 (P - E) slots since sum(c - 1) = P - E);
    # targets: the experts whose extra copy helps most, and the lightest per-copy experts.
    num_sources = max(1, min(num_slots, 2 * (num_slots - num_experts)))
    num_keep = min(num_sources, _REPAIR_SOURCES)
    num_targets = min(num_experts, _REPAIR_TARGETS)
    num_cheap = min(num_experts, _REPAIR_CHEAP_TARGETS)
    num_exact = min(_REPAIR_EXACT, num_targets + num_cheap)
    active = np.nonzero(mean > 0)[0]
    for _ in range(4 * max_moves + 16):
        if active.size == 0:
            break
        x = active
        num_active = x.size
        rows = np.arange(num_active)[:, None]
        ph, orig, w, cnt, m = phy[x], prev[x], weight[x], logcnt[x], mean[x, None]
        per_copy = w / cnt
        share = np.take_along_axis(per_copy, ph, axis=1)  # [A, P]
        load = share.reshape(num_active, num_ranks, num_per_rank).sum(axis=2)  # [A, R]
        exc = _excess(load, m)
        changed = ph != orig
        budget = max_moves - np.count_nonzero(changed, axis=1)  # [A]
        view = _View(x, w, cnt, per_copy, share, load, exc, m, changed, ph, orig, budget)
        # Candidates [A, C]: the best swap of each heavy rank, then the best re-assignments. Each touches a set of
        # ranks (whose loads it changes) and of experts (whose holders or counts it changes).
        move_score, move_slot, move_expert, move_cost, move_ranks = _best_reassignments(
            view, hold, node_cnt, node_of_rank, max_copies, num_sources, num_keep, num_targets, num_cheap, num_exact)
        slot_a, slot_b, score, cost, touched = move_slot, move_slot, move_score, move_cost, move_ranks
        expert_a, expert_b = np.take_along_axis(ph, move_slot, axis=1), move_expert
        if num_light > 0:
            swap_a, swap_b, swap_score, swap_cost = _best_swaps(view, hold, node_of_rank, num_heavy, num_light)
            swap_ranks = np.zeros((num_active, num_heavy, num_ranks), dtype=bool)
            swap_ranks[rows, np.arange(num_heavy)[None, :], rank_of_slot[swap_a]] = True
            swap_ranks[rows, np.arange(num_heavy)[None, :], rank_of_slot[swap_b]] = True
            slot_a, slot_b = np.concatenate([swap_a, move_slot], axis=1), np.concatenate([swap_b, move_slot], axis=1)
            score = np.concatenate([swap_score, move_score], axis=1)
            cost = np.concatenate([swap_cost, move_cost], axis=1)
            touched = np.concatenate([swap_ranks, move_ranks], axis=1)
            expert_a = np.concatenate([_gather(ph, swap_a), expert_a], axis=1)
            expert_b = np.concatenate([_gather(ph, swap_b), expert_b], axis=1)
        is_swap = np.arange(score.shape[1]) < score.shape[1] - num_exact
        # Greedy in decreasing score: take every candidate independent of those taken (disjoint ranks and experts)
        # that is worth at least _REPAIR_BATCH times the best one and fits in the budget.
        floor = np.maximum(score.max(axis=1) * _REPAIR_BATCH, 1e-15)
        used_ranks = np.zeros((num_active, num_ranks), dtype=bool)
        used_experts = np.zeros((num_active, w.shape[1]), dtype=bool)
        remaining = budget.copy()
        moved = np.zeros(num_active, dtype=bool)
        for c in np.argsort(-score, axis=1).T:
            r = rows[:, 0]
            ea, eb, cst = expert_a[r, c], expert_b[r, c], cost[r, c]
            ok = ((score[r, c] >= floor) & (cst <= remaining) & ~(touched[r, c] & used_ranks).any(axis=1)
                  & ~used_experts[r, ea] & ~used_experts[r, eb])
            used_ranks[ok] |= touched[r[ok], c[ok]]
            used_experts[r[ok], ea[ok]] = True
            used_experts[r[ok], eb[ok]] = True
            remaining -= np.where(ok, cst, 0)
            moved |= ok
            sw = ok & is_swap[c]
            lx, a, b, ea_s, eb_s = x[sw], slot_a[r[sw], c[sw]], slot_b[r[sw], c[sw]], ea[sw], eb[sw]
            r1, r2 = rank_of_slot[a], rank_of_slot[b]
            phy[lx, a], phy[lx, b] = eb_s, ea_s
            hold[lx, r1, ea_s] -= 1
            hold[lx, r2, eb_s] -= 1
            hold[lx, r1, eb_s] += 1
            hold[lx, r2, ea_s] += 1
            re = ok & ~is_swap[c]
            lx, slot, ea_r, eb_r = x[re], slot_a[r[re], c[re]], ea[re], eb[re]
            ra = rank_of_slot[slot]
            phy[lx, slot] = eb_r
            logcnt[lx, ea_r] -= 1
            logcnt[lx, eb_r] += 1
            hold[lx, ra, ea_r] -= 1
            hold[lx, ra, eb_r] += 1
            if node_cnt is not None:
                node_cnt[lx, node_of_rank[ra], ea_r] -= 1
                node_cnt[lx, node_of_rank[ra], eb_r] += 1
        active = x[moved]
    return phy


def _best_swaps(view: _View, hold: np.ndarray, node_of_rank: np.ndarray, num_heavy: int, num_light: int):
    """Best swap of each of the `num_heavy` heaviest ranks with a slot of one of the `num_light` lightest other
    ranks of its node. Screened in float32 with the cost bound 2 - (slots already changed), then scored exactly.

    Arguments: the `_View` of the A active layers; hold int16 [L, R, E] copies of each expert per rank;
    node_of_rank int64 [R].

    Returns:
        slot_a / slot_b int64 [A, H] the two slots (slot_a on the h-th heavy rank); score float64 [A, H] (> 0:
        improving; potential decrease per slot change); cost int64 [A, H] slot changes.
    """
    share, load, m, changed, ph, orig, budget = (view.share, view.load, view.m, view.changed, view.ph, view.orig,
                                                 view.budget)
    num_active, num_slots = share.shape
    num_ranks = load.shape[1]
    num_per_rank = num_slots // num_ranks
    rows = np.arange(num_active)[:, None]
    heavy = np.argpartition(-load, num_heavy - 1, axis=1)[:, :num_heavy]  # [A, H]
    cand = np.where(node_of_rank[heavy][:, :, None] == node_of_rank[None, None, :], load[:, None, :], np.inf)
    cand[rows, np.arange(num_heavy)[None, :], heavy] = np.inf
    light = np.argpartition(cand, num_light - 1, axis=2)[:, :, :num_light]  # [A, H, T]
    sa = heavy[:, :, None] * num_per_rank + np.arange(num_per_rank)  # [A, H, S]
    sb = light[:, :, None, :] * num_per_rank + np.arange(num_per_rank)[:, None]  # [A, H, S, T]
    unit = (share / m).astype(np.float32)
    over = (load / m - 1.0).astype(np.float32)
    # Layout [A, H, S (heavy slot), S (partner slot), T (partner rank)]: the long axis last.
    d = _gather(unit, sa)[:, :, :, None, None] - _gather(unit, sb)[:, :, None, :, :]
    oh, ol = _gather(over, heavy), _gather(over, light)
    screen = _relu4(oh[:, :, None, None, None] - d)
    screen += _relu4(ol[:, :, None, None, :] + d)
    screen -= (_relu4(oh)[:, :, None] + _relu4(ol))[:, :, None, None, :]
    # Screen x 1 / cost bound (a product of per-slot factors 1/2 or 1 for the heavy slot, 1 or 2 for the other, by
    # whether the slot already changed). Without budget only changed slots may move; the exact cost decides the rest.
    spare = (budget > 0)[:, None, None, None]
    xl = view.x[:, None, None, None]
    ok_a = _at(hold, xl, light[:, :, None, :], _gather(ph, sa)[:, :, :, None]) == 0  # [A, H, S, T] a not on t
    ok_b = _at(hold, xl, heavy[:, :, None, None], _gather(ph, sb)) == 0  # [A, H, S, T] b not on the heavy rank
    fa = ok_a * np.where(_gather(changed, sa)[..., None], np.float32(1.0),
                         np.where(spare, np.float32(0.5), np.float32(0.0)))
    fb = ok_b * np.where(_gather(changed, sb), np.float32(2.0), np.where(spare, np.float32(1.0), np.float32(0.0)))
    screen *= fa[:, :, :, None, :]
    screen *= fb[:, :, None, :, :]
    flat = screen.reshape(num_active, num_heavy, -1)
    i = np.argmin(flat, axis=2)  # [A, H]
    ok = np.take_along_axis(flat, i[:, :, None], axis=2)[:, :, 0] < 0
    ia, ib, t = np.unravel_index(i, screen.shape[2:])
    h = np.arange(num_heavy)[None, :]
    slot_a, slot_b = sa[rows, h, ia], sb[rows, h, ib, t]
    delta_load = _gather(share, slot_a) - _gather(share, slot_b)
    lh, ll = load[rows, heavy], _gather(load, slot_b // num_per_rank)
    delta = _excess(lh - delta_load, m) + _excess(ll + delta_load, m) - _excess(lh, m) - _excess(ll, m)
    cost = (2 - _gather(changed, slot_a).astype(np.int64) - _gather(changed, slot_b)
            - (_gather(ph, slot_b) == _gather(orig, slot_a)) - (_gather(ph, slot_a) == _gather(orig, slot_b)))
    score = np.where(ok & (cost <= budget[:, None]), -delta / np.maximum(cost, 0.5), 0.0)
    return slot_a, slot_b, score, cost


def _best_reassignments(view: _View, hold: np.ndarray, node_cnt, node_of_rank: np.ndarray, max_copies: int,
                        num_sources: int, num_keep: int, num_targets: int, num_cheap: int, num_exact: int):
    """Best re-assignments of each layer: slot s (expert a with >= 2 copies) becomes a copy of expert b (1 slot
    change). Candidates: the `num_sources` slots of experts with >= 2 copies x the `num_targets` experts whose extra
    copy lowers the potential most and the `num_cheap` lightest per-copy experts. Scored per expert (ranks holding
    both a and b are approximated), then the best `num_exact` are scored exactly.

    Arguments: the `_View` of the A active layers; hold int16 [L, R, E]; node_cnt int16 [L, N, E] copies of each
    expert per node, None with one node; node_of_rank int64 [R]; max_copies: most replicas per expert.

    Returns:
        [A, M] arrays: score float64 (> 0: improving; potential decrease per slot change), slot int64, new expert
        int64, cost int64 (slot changes); and touched bool [A, M, R] (ranks whose load changes).
    """
    x, w, cnt, per_copy, share, load, exc, m, changed, ph, orig, budget = view
    num_active, num_slots = ph.shape
    num_ranks, num_experts = load.shape[1], w.shape[1]
    num_nodes = 1 if node_cnt is None else node_cnt.shape[1]
    rank_of_slot = np.arange(num_slots) // (num_slots // num_ranks)
    rows = np.arange(num_active)[:, None]
    cnt_slot = np.take_along_axis(cnt, ph, axis=1)
    src = np.argpartition(cnt_slot < 2, num_sources - 1, axis=1)[:, :num_sources]  # [A, Q]
    ea = np.take_along_axis(ph, src, axis=1)
    rank_src = rank_of_slot[src]
    load_src = np.take_along_axis(load, rank_src, axis=1)
    exc_src = np.take_along_axis(exc, rank_src, axis=1)
    more = w / (cnt + 1)  # per-copy load of e with one more copy
    fewer = w / np.maximum(cnt - 1, 1)
    load_slot, exc_slot = load[:, rank_of_slot], exc[:, rank_of_slot]
    # gain[e]: potential change on e's ranks when e gets one more copy; loss[a]: when a loses one.
    gain = np.bincount((rows * num_experts + ph).reshape(-1), weights=(
        _excess(load_slot + np.take_along_axis(more - per_copy, ph, axis=1), m) - exc_slot).reshape(-1),
        minlength=num_active * num_experts)
    gain = np.where(cnt < max_copies, gain.reshape(num_active, num_experts), np.inf)
    many = np.take_along_axis(cnt_slot, src, axis=1) >= 2
    loss_src = _excess(load_src + np.take_along_axis(fewer - per_copy, ea, axis=1), m) - exc_src
    loss = np.bincount((rows * num_experts + ea).reshape(-1), weights=np.where(many, loss_src, 0.0).reshape(-1),
                       minlength=num_active * num_experts).reshape(num_active, num_experts)
    loss_others = np.take_along_axis(loss, ea, axis=1) - loss_src  # [A, Q]: the other holders of a
    share_src = np.take_along_axis(share, src, axis=1)
    if num_keep < src.shape[1]:
        # Keep the most promising sources, scored as if the new copy carried no load.
        pre = np.where(many, loss_others + _excess(load_src - share_src, m) - exc_src, np.inf)
        keep = np.argpartition(pre, num_keep - 1, axis=1)[:, :num_keep]
        src, ea, rank_src, load_src, exc_src, loss_others, many, share_src = (
            np.take_along_axis(v, keep, axis=1)
            for v in (src, ea, rank_src, load_src, exc_src, loss_others, many, share_src))
    targets = np.concatenate([np.argpartition(gain, num_targets - 1, axis=1)[:, :num_targets],
                              np.argpartition(np.where(cnt < max_copies, more, np.inf), num_cheap - 1,
                                              axis=1)[:, :num_cheap]], axis=1)  # [A, K]
    gain_t = np.take_along_axis(gain, targets, axis=1)
    own = (load_src - share_src)[:, :, None] + np.take_along_axis(more, targets, axis=1)[:, None, :]
    approx = _excess(own, m[:, :, None])
    approx += (loss_others - exc_src)[:, :, None] + gain_t[:, None, :]
    # hold / node_cnt of the targets on every rank / node, then per source slot.
    hold_t = _at(hold, x[:, None, None], np.arange(num_ranks)[None, :, None], targets[:, None, :])  # [A, R, K]
    cost = (targets[:, None, :] != np.take_along_axis(orig, src, axis=1)[:, :, None]).astype(np.int8)
    cost -= np.take_along_axis(changed, src, axis=1)[:, :, None]
    valid = (cost <= budget[:, None, None]) & (targets[:, None, :] != ea[:, :, None])
    valid &= many[:, :, None] & np.isfinite(gain_t)[:, None, :]
    valid &= np.take_along_axis(hold_t, rank_src[:, :, None], axis=1) == 0
    if num_nodes > 1:
        node_t = _at(node_cnt, x[:, None, None], np.arange(num_nodes)[None, :, None], targets[:, None, :])
        valid &= np.take_along_axis(node_t, node_of_rank[rank_src][:, :, None], axis=1) > 0
    score = np.where(valid, -approx / np.maximum(cost, 0.5), -np.inf)  # [A, Q, K]
    # The best source per target, then the best targets: distinct new experts, so that several can be taken.
    q_best = np.argmax(score, axis=1)  # [A, K]
    score = np.take_along_axis(score, q_best[:, None, :], axis=1)[:, 0, :]
    k_top = np.argpartition(-score, num_exact - 1, axis=1)[:, :num_exact]  # [A, M]
    ok = np.take_along_axis(score, k_top, axis=1) > -np.inf
    q_top = q_best[rows, k_top]
    s_top = src[rows, q_top]
    b_top = targets[rows, k_top]
    a_top = ph[rows, s_top]
    xm = x[:, None, None]
    ranks = np.arange(num_ranks)[None, None, :]
    da, db = (fewer - per_copy)[rows, a_top], (more - per_copy)[rows, b_top]
    hold_a, hold_b = _at(hold, xm, ranks, a_top[:, :, None]), _at(hold, xm, ranks, b_top[:, :, None])  # [A, M, R]
    new_load = load[:, None, :] + (hold_a * da[:, :, None] + hold_b * db[:, :, None])
    new_load[rows, np.arange(num_exact)[None, :], rank_of_slot[s_top]] += more[rows, b_top] - fewer[rows, a_top]
    exact = _excess(new_load, m[:, :, None]).sum(axis=2) - exc.sum(axis=1)[:, None]
    cost_top = cost[rows, q_top, k_top].astype(np.int64)
    score = np.where(ok, -exact / np.maximum(cost_top, 0.5), 0.0)
    touched = (hold_a > 0) | (hold_b > 0)
    touched[rows, np.arange(num_exact)[None, :], rank_of_slot[s_top]] = True
    return score, s_top, b_top, cost_top, touched


def _check_int(name: str, value, minimum: int = 1) -> None:
    check_int(name, value, minimum=minimum)  # TypeError for a non-int, ValueError below the minimum


def plan(load, num_slots: int, num_ranks: int, *, num_nodes: int = 1, num_groups: int = 1, strategy: str = "global",
         previous=None, max_moves: int | None = None) -> Placement:
    """Plans the physical slots of every MoE layer.

    Arguments:
        load: [L, E] logical load (tokens per expert over a window); torch tensor, numpy array or nested list.
        num_slots: P physical slots per layer (E + redundant); must be >= E and divisible by `num_ranks`
            (`num_redundant_auto` gives the smallest valid redundant count).
        num_ranks: R; rank r owns slots [r * P / R, (r + 1) * P / R).
        num_nodes: nodes (hierarchical only); R and `num_groups` must be divisible by it.
        num_groups: expert groups (hierarchical only); E must be divisible by it.
        strategy: "global" (replicas anywhere) or "hierarchical" (groups packed onto nodes, replicas stay in the
            node of their group). Never inferred.
        previous: the current `Placement` (or its phy2log [L, P]). Without `max_moves` the fresh plan is
            relabelled to keep as many experts on their rank and slot as possible; with `max_moves` the previous
            placement is repaired instead.
        max_moves: with `previous`, the largest number of slots per layer whose expert may change.

    Returns:
        A validated `Placement`; no rank holds two replicas of one expert unless P / R > E (or a previous placement
        passed to the incremental mode already did). Its `share` (the "weighted" replica policy) makes the rank
        loads predicted for `load` as even as the replicas allow (`epmoe.eplb.shares.replica_shares`).
    """
    weight = as_load_array(load)
    num_layers, num_experts = weight.shape
    _check_int("num_slots", num_slots)
    _check_int("num_ranks", num_ranks)
    _check_int("num_nodes", num_nodes)
    _check_int("num_groups", num_groups)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_slots < num_experts:
        raise ValueError(f"num_slots ({num_slots}) must be >= the number of experts ({num_experts})")
    if num_slots % num_ranks != 0:
        raise ValueError(f"num_slots ({num_slots}) must be divisible by num_ranks ({num_ranks}); "
                         f"epmoe.eplb.num_redundant_auto({num_experts}, {num_ranks}) gives a valid redundant count")
    hierarchical = strategy == "hierarchical"
    if hierarchical:
        if num_experts % num_groups != 0:
            raise ValueError(f"the number of experts ({num_experts}) must be divisible by num_groups ({num_groups})")
        if num_groups % num_nodes != 0:
            raise ValueError(f"num_groups ({num_groups}) must be divisible by num_nodes ({num_nodes})")
        if num_ranks % num_nodes != 0:
            raise ValueError(f"num_ranks ({num_ranks}) must be divisible by num_nodes ({num_nodes})")
    if max_moves is not None:
        _check_int("max_moves", max_moves, minimum=0)
        if previous is None:
            raise ValueError("max_moves needs previous (the placement to repair)")
    prev_phy = None
    if previous is not None:
        if not isinstance(previous, (Placement, torch.Tensor, np.ndarray)):
            raise TypeError(f"previous must be a Placement or an integer phy2log [num_layers, num_slots], got "
                            f"{type(previous).__name__}")
        if not isinstance(previous, Placement):
            try:
                previous = Placement(previous, num_experts, num_ranks)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"previous: {exc}") from exc
        if (previous.num_layers, previous.num_slots, previous.num_experts, previous.num_ranks) != (
                num_layers, num_slots, num_experts, num_ranks):
            raise ValueError(f"previous has (layers, slots, experts, ranks) = "
                             f"{(previous.num_layers, previous.num_slots, previous.num_experts, previous.num_ranks)}, "
                             f"expected {(num_layers, num_slots, num_experts, num_ranks)}")
        prev_phy = previous.numpy()[0]
    scope_nodes = num_nodes if hierarchical else 1

    if max_moves is not None:
        node_of_rank = np.arange(num_ranks) // (num_ranks // scope_nodes)
        # Copies per expert: at most one per rank in its scope, as in the fresh plan.
        max_copies = num_ranks // scope_nodes if num_slots // num_ranks <= num_experts // scope_nodes else num_slots
        phy2log = _repair(prev_phy, weight, num_ranks, max_moves, node_of_rank, max_copies)
    else:
        phy2log = _plan_fresh(weight, num_slots, num_ranks, num_nodes, num_groups, hierarchical)
        if prev_phy is not None:
            phy2log = _match_ranks(phy2log, prev_phy, num_ranks, num_experts, scope_nodes)
    # The constructor derives the inverse maps from phy2log and rejects an expert without a replica: the plan is
    # valid by construction (Placement.validate would only recompute the same maps).
    placement = Placement(torch.from_numpy(phy2log), num_experts, num_ranks)
    return placement.with_share(replica_shares(weight, placement))
