"""`plan()`: the epmoe expert placement planner.

Fresh plan, per layer (all layers at once, numpy):
  1. (hierarchical) expert groups -> nodes: cardinality-constrained packing of group loads, refined by swaps.
  2. replica counts: give each extra slot to the expert with the largest per-copy load (optimal for the largest
     per-copy load), never more copies than ranks in scope so that no rank needs two copies of one expert.
  3. replicas -> ranks: round-robin LPT (per round the heaviest remaining replicas go to the lightest ranks),
     a repair pass for same-rank duplicates, then swaps between the heaviest rank and the lightest ranks until
     the heaviest rank cannot be lowered.
Incremental plan (`previous=` and `max_moves=`): start from the previous slots and apply the best-scoring
single-slot re-assignments (1 slot change: one replica of an expert with spare copies becomes a replica of
another expert) and cross-rank swaps (2 slot changes) until the budget is used or nothing improves.
"""

from __future__ import annotations

import numpy as np
import torch

from .placement import Placement, as_load_array

__all__ = ["plan", "STRATEGIES"]

STRATEGIES = ("global", "hierarchical")

_REFINE_PARTNERS = 8
_MAX_REFINE = 16
_PAIR_ROUNDS = 8
_PAIRS = 32
_REPAIR_HEAVY_RANKS = 4
_REPAIR_POWER = 4


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
    # Keep the [A, S, T, S] candidate array small when packs hold many items.
    budget = max(1, 4096 // (num_per_pack * num_per_pack))
    num_light = min(num_packs - 1, _REFINE_PARTNERS, budget)
    num_small = min(num_packs * num_per_pack - 1, _REFINE_PARTNERS, budget)
    num_partners = num_light + num_small
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
        d = wh[:, :, None, None] - wp[:, None, :, :]  # [A, S, T, S]
        new_max = np.maximum(lh[:, None, None, None] - d, lp[:, None, :, None] + d)
        valid = (d > 0) & (partners != heavy[:, None])[:, None, :, None]
        if avoid_conflicts:
            kh = pk[active, heavy]  # [A, S]
            kp = pk[active[:, None], partners]  # [A, T, S]
            a_in_partner = has[active[:, None, None], partners[:, None, :], kh[:, :, None]] > 0  # [A, S, T]
            b_in_heavy = has[active[:, None, None], heavy[:, None, None], kp] > 0  # [A, T, S]
            valid &= ~a_in_partner[:, :, :, None] & ~b_in_heavy[:, None, :, :]
        new_max = np.where(valid, new_max, np.inf).reshape(active.size, -1)
        best = np.argmin(new_max, axis=1)
        improves = new_max[np.arange(active.size), best] < lh * (1 - 1e-12)
        # One swap per improving row, applied to all rows at once.
        x, h, best = active[improves], heavy[improves], best[improves]
        a, t, b = np.unravel_index(best, (num_per_pack, num_partners, num_per_pack))
        r = partners[improves, t]
        ka, kb = pk[x, h, a], pk[x, r, b]
        wa, wb = pw[x, h, a], pw[x, r, b]
        load[x, h] -= wa - wb
        load[x, r] += wa - wb
        has[x, h, ka] -= 1
        has[x, r, kb] -= 1
        has[x, h, kb] += 1
        has[x, r, ka] += 1
        pw[x, h, a], pw[x, r, b] = wb, wa
        pk[x, h, a], pk[x, r, b] = kb, ka
        active = x[load[x].max(axis=1) > bound[x]]


def _balance_pairs(pw, pk, load, has, bound, avoid_conflicts: bool, num_iters: int) -> None:
    """Rounds of simultaneous swaps: the i-th heaviest pack (i < _PAIRS) swaps one item with the i-th lightest pack
    (rotated each round), choosing the swap that minimises the larger of the two new loads (in place). Rows whose
    heaviest pack is at most `bound` (float64 [X], a lower bound of the optimum) are left alone."""
    num_rows, num_packs, num_per_pack = pw.shape
    half = min(num_packs // 2, _PAIRS)
    if half == 0:
        return
    for it in range(num_iters):
        active = np.nonzero(load.max(axis=1) > bound)[0]
        if active.size == 0:
            break
        rows = active[:, None]
        num_rows = active.size
        order = np.argsort(load[active], axis=1)
        light = order[:, :half]
        heavy = np.roll(order[:, ::-1][:, :half], -(it % half), axis=1)
        lh, ll = load[rows, heavy], load[rows, light]
        wh, wl = pw[rows, heavy], pw[rows, light]  # [X, half, S]
        d = wh[:, :, :, None] - wl[:, :, None, :]  # [X, half, S, S]
        new_max = np.maximum(lh[:, :, None, None] - d, ll[:, :, None, None] + d)
        valid = d > 0
        if avoid_conflicts:
            kh, kl = pk[rows, heavy], pk[rows, light]
            a_in_light = has[rows[:, :, None], light[:, :, None], kh] > 0  # [X, half, S]
            b_in_heavy = has[rows[:, :, None], heavy[:, :, None], kl] > 0
            valid &= ~a_in_light[:, :, :, None] & ~b_in_heavy[:, :, None, :]
        new_max = np.where(valid, new_max, np.inf).reshape(num_rows, half, -1)
        best = np.argmin(new_max, axis=2)
        i, p = np.nonzero(np.take_along_axis(new_max, best[:, :, None], axis=2)[:, :, 0] < lh * (1 - 1e-12))
        if i.size == 0:
            break
        a, b = np.divmod(best[i, p], num_per_pack)
        x, h, r = active[i], heavy[i, p], light[i, p]
        ka, kb = pk[x, h, a], pk[x, r, b]
        wa, wb = pw[x, h, a], pw[x, r, b]
        load[x, h] -= wa - wb
        load[x, r] += wa - wb
        has[x, h, ka] -= 1
        has[x, r, kb] -= 1
        has[x, h, kb] += 1
        has[x, r, ka] += 1
        pw[x, h, a], pw[x, r, b] = wb, wa
        pk[x, h, a], pk[x, r, b] = kb, ka


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
    bound = np.maximum(load.mean(axis=1), item_weight.max(axis=1)) * (1 + 1e-9)
    _balance_pairs(pw, pk, load, has, bound, avoid_conflicts, num_iters=_PAIR_ROUNDS)
    _refine(pw, pk, load, has, bound, avoid_conflicts, max_iters=_MAX_REFINE)
    return pk


def _plan_scope(weight: np.ndarray, num_phy: int, num_ranks: int) -> np.ndarray:
    """Plans rows independently: weight [X, n] -> slot contents [X, num_phy] (indices into n), ranks contiguous."""
    num_rows, num_items = weight.shape
    num_per_rank = num_phy // num_ranks
    # Two copies on one rank are unavoidable only when a rank has more slots than there are experts.
    avoid_conflicts = num_per_rank <= num_items
    logcnt = _replicate(weight, num_phy, num_ranks if avoid_conflicts else None)
    keys = np.repeat(np.tile(np.arange(num_items), num_rows), logcnt.reshape(-1)).reshape(num_rows, num_phy)
    per_copy = np.take_along_axis(weight / logcnt, keys, axis=1)
    pk = _pack(per_copy, keys, num_ranks, num_items, avoid_conflicts)
    return np.sort(pk, axis=2).reshape(num_rows, num_phy)


def _plan_fresh(weight, num_slots, num_ranks, num_nodes, num_groups, hierarchical: bool) -> np.ndarray:
    num_layers, num_experts = weight.shape
    if not hierarchical:
        return _plan_scope(weight, num_slots, num_ranks)
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    if num_nodes > 1:
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
    out = np.empty_like(new)
    for layer in range(num_layers):
        new_r = new[layer].reshape(num_ranks, num_per_rank)
        old_r = old[layer].reshape(num_ranks, num_per_rank)
        hold_new = np.zeros((num_ranks, num_experts))
        hold_old = np.zeros((num_ranks, num_experts))
        np.add.at(hold_new, (np.repeat(np.arange(num_ranks), num_per_rank), new_r.reshape(-1)), 1)
        np.add.at(hold_old, (np.repeat(np.arange(num_ranks), num_per_rank), old_r.reshape(-1)), 1)
        overlap = hold_new @ hold_old.T  # [new rank, old rank]
        node = np.arange(num_ranks) // ranks_per_node
        overlap = np.where(node[:, None] == node[None, :], overlap, -1.0)
        # Greedy assignment by decreasing overlap; ties resolved in index order.
        order = np.argsort(-overlap, axis=None, kind="stable")
        target = np.full(num_ranks, -1)
        used = np.zeros(num_ranks, dtype=bool)
        for flat in order:
            nr, orr = divmod(int(flat), num_ranks)
            if target[nr] < 0 and not used[orr] and overlap[nr, orr] >= 0:
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


def _excess(load: np.ndarray, mean: float) -> np.ndarray:
    return (np.maximum(load - mean, 0.0) / mean) ** _REPAIR_POWER


def _repair_layer(phy, weight, num_ranks, max_moves, node_of_rank, max_copies):
    """Greedy local search on one layer (see the module docstring); returns the new slot contents [P]."""
    orig = phy
    phy = phy.copy()
    num_slots = phy.size
    num_experts = weight.size
    num_per_rank = num_slots // num_ranks
    if weight.sum() <= 0:
        return phy
    rank_of_slot = np.arange(num_slots) // num_per_rank
    node_of_slot = node_of_rank[rank_of_slot]
    logcnt = np.bincount(phy, minlength=num_experts)
    hold = np.zeros((num_ranks, num_experts))
    np.add.at(hold, (rank_of_slot, phy), 1)
    # node_has[k, e]: expert e lives on node k (hierarchical scopes stay closed)
    num_nodes = int(node_of_rank.max()) + 1
    node_has = np.zeros((num_nodes, num_experts), dtype=bool)
    node_has[node_of_slot, phy] = True
    mean = weight.sum() / num_ranks
    all_slots = np.arange(num_slots)
    for _ in range(4 * max_moves + 16):
        budget = max_moves - int(np.count_nonzero(phy != orig))
        per_copy = weight / logcnt
        share = per_copy[phy]
        load = share.reshape(num_ranks, num_per_rank).sum(axis=1)
        excess = _excess(load, mean)
        total = excess.sum()
        heavy = np.argsort(-load, kind="stable")[:_REPAIR_HEAVY_RANKS]
        changed = phy != orig
        best_score, best_op = 0.0, None

        # Swaps: a slot of a heavy rank <-> any slot of another rank (same node).
        sa = (heavy[:, None] * num_per_rank + np.arange(num_per_rank)).reshape(-1)
        ra, rb = rank_of_slot[sa][:, None], rank_of_slot[None, :]
        ea, eb = phy[sa][:, None], phy[None, :]
        d = share[sa][:, None] - share[None, :]
        delta = (_excess(load[ra] - d, mean) + _excess(load[rb] + d, mean) - excess[ra] - excess[rb])
        cost = ((eb != orig[sa][:, None]).astype(np.int64) + (ea != orig[None, :])
                - changed[sa][:, None] - changed[None, :])
        valid = ((ra != rb) & (node_of_rank[ra] == node_of_rank[rb]) & (hold[rb, ea] == 0) & (hold[ra, eb] == 0)
                 & (cost <= budget))
        score = np.where(valid, -delta / np.maximum(cost, 0.5), -np.inf)
        i = np.argmax(score)
        if score.flat[i] > best_score:
            best_score, best_op = score.flat[i], ("swap",) + np.unravel_index(i, score.shape)

        # Re-assignments: slot s (expert a with >= 2 copies) becomes a copy of expert b.
        # Candidates: slots of heavy ranks x all experts, and all slots x experts of the heaviest rank.
        s1 = np.repeat(sa, num_experts)
        b1 = np.tile(np.arange(num_experts), sa.size)
        heavy_experts = phy[heavy[0] * num_per_rank:(heavy[0] + 1) * num_per_rank]
        s2 = np.repeat(all_slots, heavy_experts.size)
        b2 = np.tile(heavy_experts, num_slots)
        s, b = np.concatenate([s1, s2]), np.concatenate([b1, b2])
        a, r = phy[s], rank_of_slot[s]
        ok = ((logcnt[a] >= 2) & (b != a) & (hold[r, b] == 0) & (logcnt[b] < max_copies)
              & node_has[node_of_slot[s], b])
        cost = (b != orig[s]).astype(np.int64) - changed[s]
        ok &= cost <= budget
        if ok.any():
            s, b, a, r, cost = s[ok], b[ok], a[ok], r[ok], cost[ok]
            ca, cb = logcnt[a], logcnt[b]
            da = weight[a] / (ca - 1) - weight[a] / ca
            db = weight[b] / (cb + 1) - weight[b] / cb
            new_load = load[None, :] + hold[:, a].T * da[:, None] + hold[:, b].T * db[:, None]
            new_load[np.arange(s.size), r] += weight[b] / (cb + 1) - weight[a] / (ca - 1)
            delta = _excess(new_load, mean).sum(axis=1) - total
            score = -delta / np.maximum(cost, 0.5)
            i = np.argmax(score)
            if score[i] > best_score:
                best_score, best_op = score[i], ("assign", s[i], b[i])

        if best_op is None or best_score <= 1e-15:
            break
        if best_op[0] == "swap":
            slot_a, slot_b = sa[best_op[1]], best_op[2]
            ea, eb = phy[slot_a], phy[slot_b]
            ra, rb = rank_of_slot[slot_a], rank_of_slot[slot_b]
            phy[slot_a], phy[slot_b] = eb, ea
            hold[ra, ea] -= 1
            hold[rb, eb] -= 1
            hold[ra, eb] += 1
            hold[rb, ea] += 1
        else:
            slot, eb = best_op[1], best_op[2]
            ea, ra = phy[slot], rank_of_slot[slot]
            phy[slot] = eb
            logcnt[ea] -= 1
            logcnt[eb] += 1
            hold[ra, ea] -= 1
            hold[ra, eb] += 1
            node_has[node_of_slot[slot], ea] = bool(np.any(phy[node_of_slot == node_of_slot[slot]] == ea))
    return phy


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
        passed to the incremental mode already did).
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
        if not isinstance(previous, Placement):
            previous = Placement(previous, num_experts, num_ranks)
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
        phy2log = np.stack([_repair_layer(prev_phy[layer], weight[layer], num_ranks, max_moves, node_of_rank,
                                          max_copies) for layer in range(num_layers)])
    else:
        phy2log = _plan_fresh(weight, num_slots, num_ranks, num_nodes, num_groups, hierarchical)
        if prev_phy is not None:
            phy2log = _match_ranks(phy2log, prev_phy, num_ranks, num_experts, scope_nodes)
    placement = Placement(torch.from_numpy(phy2log), num_experts, num_ranks)
    placement.validate()
    return placement
