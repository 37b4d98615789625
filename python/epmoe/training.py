"""Training with expert parallelism: the gradient contract, rebalancing at safe points, DDP, cross-rank checks.

Invariants:
- After `sync_grads(model)` every parameter of every `epmoe.MoE` in `model` holds the gradient of the mean over
  all ranks (EP group x DP group) of each rank's loss. Replicated parameters are averaged; an expert's gradient is
  the sum over all its replicas (slots and ranks), reduced to one value (by both holders of a two-rank expert, or
  by an owner that sends it back), averaged over the DP group, scaled, and copied to every local replica: replicas
  get bitwise the same gradient and stay bitwise identical under any optimizer.
- Weights, their `.grad` and every per-slot optimizer state tensor move together, atomically per layer
  (`eplb.rearrange`, checksummed), and only at safe points: in `sync_grads` (automatic `eplb_interval`),
  `MoE.rebalance`, `MoE.apply_placement` and `rebalance_model` - never between a forward and its backward.
- Gradients count as new (to be reduced) only after a grad-mode forward (or routing) of the layer since the last
  sync or move: edits in place after `sync_grads` (unscaling, clipping) are never reduced a second time.
- Every layer collective starts with a header exchange (operation, number of layers, per-layer call counter,
  placement digest) over the EP group and then the DP group; ranks that disagree (one skipped a call, one
  rebalanced alone) raise RuntimeError on every rank naming both sides, instead of mixing data.
"""

from __future__ import annotations

import itertools
import weakref
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from epmoe import balance, eplb
from epmoe._logging import get_logger

__all__ = ["apply_placement", "check_agreement", "exclude_from_ddp", "moe_layers", "rebalance_layers",
           "rebalance_model", "sync_grads"]

log = get_logger("epmoe.layer")  # moves are the layer's events (rank-prefixed records, as the layer's other logs)

_MAGIC = 0x45504D4F45  # "EPMOE": marks a header, so a header never matches another collective's payload
_KINDS = ("sync_grads", "rebalance", "apply_placement", "update_bias")

# Optimizers that stepped in this process, with the order in which they were first seen (identical on every rank
# of an SPMD program): their per-slot state moves with the experts even when not passed explicitly.
_OPTIMIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_optimizer_order = itertools.count()
_hooks: list = []


# ---- setup (called by MoE.__init__)

def resolve_dp_group(moe, dp_group) -> tuple:
    """(dp_group, dp_size) from the constructor argument and `config.dp_group`; the DP group must meet the EP group
    in this rank only."""
    configured = moe.config.dp_group
    if dp_group is not None and configured is not None and dp_group is not configured:
        raise ValueError("MoE: dp_group and config.dp_group are different groups; pass one of them")
    group = dp_group if dp_group is not None else configured
    if group is None:
        return None, 1
    if not moe.distributed:
        raise ValueError("MoE: dp_group needs torch.distributed to be initialised")
    me = dist.get_rank()
    ep_ranks = set(dist.get_process_group_ranks(moe.group))
    dp_ranks = set(dist.get_process_group_ranks(group))
    if me not in dp_ranks or ep_ranks & dp_ranks != {me}:
        raise ValueError(f"MoE: dp_group (global ranks {sorted(dp_ranks)}) must contain this rank ({me}) and share no "
                         f"other rank with the EP group (global ranks {sorted(ep_ranks)})")
    moe.config.dp_group = group
    return group, dist.get_world_size(group)


def broadcast_seed(seed: int, group) -> int:
    """Rank 0 of `group`'s seed on every rank of it (collective)."""
    box = [seed]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return int(box[0])


def attach(moe) -> None:
    """Training state of a new layer: call counters, DDP exclusion of its parameters and buffers, global hooks."""
    moe._num_calls = 0  # layer collectives started (header sequence number)
    moe._num_steps = 0  # sync_grads calls (eplb_interval counts these)
    moe._grad_marks = None  # (state, {name: (weakref to grad, version)}) after the last sync or move
    moe._grad_forward = False  # a forward with grad enabled ran since the marks were set (MoE.forward sets it)
    names = [name for name, _ in moe.named_parameters()] + [name for name, _ in moe.named_buffers()]
    moe._epmoe_ddp_names = names
    moe._ddp_params_and_buffers_to_ignore = list(names)
    if not _hooks:
        _hooks.append(register_optimizer_step_pre_hook(_track_optimizer))
        _hooks.append(nn.modules.module.register_module_module_registration_hook(_propagate_ddp_names))


def _track_optimizer(optimizer, args, kwargs) -> None:
    if optimizer not in _OPTIMIZERS:
        _OPTIMIZERS[optimizer] = next(_optimizer_order)


def _propagate_ddp_names(module, name, submodule):
    # A module holding epmoe layers tells DistributedDataParallel to leave their parameters alone, so DDP over
    # the data-parallel group can wrap the model (DDP reads the list of the module it wraps).
    names = getattr(submodule, "_epmoe_ddp_names", None) if submodule is not None else None
    if names:
        _add_ddp_names(module, [f"{name}.{n}" for n in names])
    return None


def _add_ddp_names(module: nn.Module, names: list) -> None:
    # The instance dict, not getattr: the hook also runs inside wrappers' __init__ (torch.compile's OptimizedModule
    # registering `_orig_mod`), whose __getattr__ fails with a KeyError before the wrapped module is set.
    own = list(dict.fromkeys(list(module.__dict__.get("_epmoe_ddp_names", [])) + names))
    ignored = list(dict.fromkeys(list(module.__dict__.get("_ddp_params_and_buffers_to_ignore", [])) + names))
    object.__setattr__(module, "_epmoe_ddp_names", own)
    object.__setattr__(module, "_ddp_params_and_buffers_to_ignore", ignored)


def exclude_from_ddp(model: nn.Module) -> nn.Module:
    """Marks every parameter and buffer of the `epmoe.MoE` layers in `model` as ignored by
    `torch.nn.parallel.DistributedDataParallel(model)` (epmoe synchronises them in `sync_grads`). Modules built
    with their layers in `__init__` are marked automatically; call this for a model whose layers were swapped in
    afterwards (e.g. assigned into an existing tree). Returns `model`."""
    names = [f"{prefix}.{n}" if prefix else n for prefix, module in model.named_modules()
             if getattr(module, "_epmoe_ddp_names", None) is not None and _is_moe(module)
             for n in module._epmoe_ddp_names]
    if names:
        _add_ddp_names(model, names)
    return model


def _is_moe(module) -> bool:
    from epmoe.layer import MoE  # layer imports this module

    return isinstance(module, MoE)


def _placement_row(placement: eplb.Placement, row: int) -> eplb.Placement:
    from epmoe.layer import placement_row

    return placement_row(placement, row)


def moe_layers(model: nn.Module) -> list:
    """The `epmoe.MoE` layers of `model` (itself included), in module order, each once."""
    return [module for module in model.modules() if _is_moe(module)]


def _check_ddp(model: nn.Module) -> None:
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    ignored = set(model.parameters_to_ignore)
    for prefix, module in model.module.named_modules():
        if _is_moe(module):
            for name, p in module.named_parameters():
                fqn = f"{prefix}.{name}" if prefix else name
                if p.requires_grad and fqn not in ignored:
                    raise RuntimeError(
                        f"DistributedDataParallel also reduces the epmoe parameter {fqn!r}: its experts differ per "
                        "rank, so DDP corrupts them (and its broadcast at construction already overwrote them). "
                        "Call epmoe.training.exclude_from_ddp(model) before wrapping it")


def _groups_of(moe) -> list:
    return [(g, label) for g, label in ((moe.group if moe.distributed else None, "EP"), (moe.dp_group, "DP"))
            if g is not None]


def _by_groups(layers) -> list:
    """Layers split by (EP group, DP group), in first-appearance order."""
    sets: dict = {}
    for moe in layers:
        key = (id(moe.group), id(moe.dp_group))
        sets.setdefault(key, []).append(moe)
    return list(sets.values())


def _device(moe) -> torch.device:
    return moe.gate_weight.device


# ---- cross-rank agreement

def _placement_crc(moe) -> int:
    return zlib.crc32(np.ascontiguousarray(moe.placement.numpy()[0]).tobytes())


def check_agreement(layers, kind: str, extra: int = 0) -> None:
    """Starts a collective of `layers` (sharing their groups): every rank of the EP group, then of the DP group,
    must be in the same operation on the same layers with the same call count and placement. Raises RuntimeError
    on every rank otherwise."""
    for moe in layers:
        moe._num_calls += 1
    first = layers[0]
    state = np.array([[moe.layer_idx, moe._num_calls, _placement_crc(moe), moe.config.num_slots,
                       len(list(moe.parameters()))] for moe in layers], dtype=np.int64)
    digest = zlib.crc32(state.tobytes()) ^ (extra & 0xFFFFFFFF)
    header = torch.tensor([_MAGIC, _KINDS.index(kind) + 1, len(layers), first._num_calls, digest],
                          dtype=torch.int64, device=_device(first))
    for group, label in _groups_of(first):
        rows = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
        try:
            dist.all_gather(rows, header, group=group)
        except Exception as exc:  # a peer is elsewhere (a skipped call, another collective) or gone
            raise RuntimeError(f"epmoe: {kind} (call #{first._num_calls} of MoE layer {first.layer_idx}) did not "
                               f"complete on the {label} group: a rank skipped this call, made another collective "
                               f"or died ({exc})") from exc
        table = torch.stack(rows).cpu()
        if not bool((table == table[0]).all()):
            raise RuntimeError(_describe(table, label, first.layer_idx))


def _describe(table: torch.Tensor, label: str, layer_idx: int) -> str:
    def what(row) -> str:
        if int(row[0]) != _MAGIC:
            return "in another collective (not an epmoe training call)"
        kind = int(row[1])
        name = _KINDS[kind - 1] if 1 <= kind <= len(_KINDS) else f"operation {kind}"
        return f"in {name} on {int(row[2])} layer(s), call #{int(row[3])} of layer {layer_idx}"

    mine = table[0]
    for rank in range(1, table.shape[0]):
        other = table[rank]
        if torch.equal(other, mine):
            continue
        if torch.equal(other[:4], mine[:4]):
            return (f"epmoe: {label} ranks 0 and {rank} disagree on the layers' state (placement, call counts or the "
                    f"tensors to move) in {what(mine)[3:]}; every rank must make the same epmoe calls in the same "
                    "order")
        return (f"epmoe: {label} rank 0 is {what(mine)}, {label} rank {rank} is {what(other)}; every rank must make "
                "the same epmoe calls (sync_grads, rebalance, ...) in the same order")
    return f"epmoe: {label} ranks disagree"


def _agree(values: torch.Tensor, layers) -> tuple:
    """(max, min) of an int64 tensor over the EP and DP groups."""
    both = torch.cat([values, -values])
    for group, _ in _groups_of(layers[0]):
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = values.numel()
    return both[:n], -both[n:]


# ---- gradient state: raw (after a backward), summed (replicas summed by a move), synced

_RAW, _SUMMED, _SYNCED, _NONE, _MIXED = 1, 2, 3, 4, 5  # _MIXED: a backward after a move of raw gradients


def _marks(moe) -> dict:
    return {name: (weakref.ref(p.grad), p.grad._version) for name, p in moe.named_parameters() if p.grad is not None}


def _set_marks(moe, state: int) -> None:
    moe._grad_marks = (state, _marks(moe))
    moe._grad_forward = False


def _unchanged(moe, names) -> bool:
    state = moe._grad_marks
    if state is None:
        return False
    marks = state[1]
    for name, p in moe.named_parameters():
        if name not in names:
            continue
        mark = marks.get(name)
        if p.grad is None:
            if mark is not None:
                return False
            continue
        if mark is None or mark[0]() is not p.grad or mark[1] != p.grad._version:
            return False
    return True


def _local_grad_state(moe) -> int:
    params = dict(moe.named_parameters())
    if all(p.grad is None for p in params.values()):
        return _NONE
    state = None if moe._grad_marks is None else moe._grad_marks[0]
    # Without a forward in grad mode since the marks no backward can have added raw gradients: in-place edits in
    # between (clip_grad_norm_, GradScaler.unscale_) keep the state, so they are not reduced a second time.
    edited_only = not moe._grad_forward
    if state == _SUMMED:  # replicas hold their expert's sum (a move of raw gradients); the rest is still raw
        return _SUMMED if edited_only or _unchanged(moe, {"w13", "w2"}) else _MIXED
    if state == _SYNCED and (edited_only or _unchanged(moe, set(params))):
        return _SYNCED
    return _RAW


def _grad_states(layers, extra: list | None = None) -> list:
    """Agrees on each layer's gradient state across ranks; fills missing gradients with zeros where another rank
    has one. Returns the state of each layer. `extra` (one int per layer) must agree too."""
    num_params = max(len(list(moe.parameters())) for moe in layers)  # agreed per layer by the header
    rows = []
    for i, moe in enumerate(layers):
        present = [int(p.grad is not None) for p in moe.parameters()]
        present += [0] * (num_params - len(present))
        rows.append(present + [_local_grad_state(moe), 0 if extra is None else extra[i]])
    local = torch.tensor(rows, dtype=torch.int64, device=_device(layers[0]))
    high, low = _agree(local.reshape(-1), layers) if _groups_of(layers[0]) else (local.reshape(-1),) * 2
    high, low = high.reshape(local.shape).cpu(), low.reshape(local.shape).cpu()
    states = []
    for i, moe in enumerate(layers):
        if int(high[i, -1]) != int(low[i, -1]):
            raise RuntimeError(f"epmoe: ranks disagree on the tensors to move with layer {moe.layer_idx} (optimizer "
                               "state or extra_tensors differ in number, shape or dtype)")
        state_hi, state_lo = int(high[i, num_params]), int(low[i, num_params])
        if state_hi != state_lo:
            raise RuntimeError(f"epmoe: ranks disagree on the gradients of layer {moe.layer_idx} (a rank ran a "
                               "backward or a sync_grads that another did not)")
        if state_hi == _MIXED:
            raise RuntimeError(f"epmoe: a backward ran after a rebalance that moved unsynchronised gradients of layer "
                               f"{moe.layer_idx}; call epmoe.sync_grads before rebalancing when more backward passes "
                               "follow")
        for j, p in enumerate(moe.parameters()):
            if int(high[i, j]) and p.grad is None:
                p.grad = torch.zeros_like(p)
        states.append(state_hi)
    return states


# ---- expert gradients

class _ExpertPlan:
    """Who reduces which expert for one placement (identical on every rank).

    An expert on two ranks is a *pair*: both holders send each other their local sum and add the two (IEEE addition
    commutes, so both get the same bits), one round. An expert on three or more ranks has an *owner* (holder number
    e mod #holders) that sums the others' contributions and sends the result back, two rounds. With a DP group of
    more than two ranks every multi-rank expert uses an owner: the DP all-reduce must see the value at one position.
    """

    def __init__(self, moe):
        per_rank = moe.placement.numpy()[0].reshape(moe.num_ranks, moe.num_local_slots)
        holders: dict = {}  # expert -> ascending ranks holding it
        for rank in range(moe.num_ranks):
            for expert in dict.fromkeys(per_rank[rank].tolist()):
                holders.setdefault(expert, []).append(rank)
        me = moe.rank
        self.local: dict = {}  # expert -> local slots holding it (ascending)
        for slot, expert in enumerate(per_rank[me].tolist()):
            self.local.setdefault(expert, []).append(slot)
        self.first = {e: slots[0] for e, slots in self.local.items()}
        self.send: dict = {}  # owner rank -> experts this rank contributes (ascending)
        self.recv: dict = {}  # holder rank -> experts this rank owns and that rank also holds (ascending)
        self.pair: dict = {}  # other holder -> experts held by exactly this rank and that one (ascending)
        pairs_allowed = moe.dp_size <= 2
        for expert in sorted(holders):
            ranks = holders[expert]
            if len(ranks) < 2 or me not in ranks:
                continue
            if len(ranks) == 2 and pairs_allowed:
                self.pair.setdefault(ranks[1] if ranks[0] == me else ranks[0], []).append(expert)
                continue
            owner = ranks[expert % len(ranks)]  # spreads the owners (and the traffic) over the holders
            if owner == me:
                for rank in ranks:
                    if rank != me:
                        self.recv.setdefault(rank, []).append(expert)
            else:
                self.send.setdefault(owner, []).append(expert)
        self.owned = {e for experts in self.recv.values() for e in experts}
        self.needs_fold = any(len(slots) > 1 for slots in self.local.values())


def _expert_plan(moe) -> _ExpertPlan:
    cached = getattr(moe, "_expert_plan_cache", None)
    if cached is None or cached[0] is not moe.placement:
        cached = (moe.placement, _ExpertPlan(moe))
        moe._expert_plan_cache = cached
    return cached[1]


def _exchange(moe, grads, plan_out: dict, plan_in: dict, slots_of) -> dict:
    """Sends grads[first slot of e] for the experts of plan_out[rank] to each rank and receives those of
    plan_in[rank]; returns {rank: [buffer per grad tensor]} ([num experts, ...])."""
    ops, received = [], {}
    to_global = [dist.get_global_rank(moe.group, r) for r in range(moe.num_ranks)]
    for rank, experts in sorted(plan_out.items()):
        if not experts:
            continue
        idx = torch.tensor([slots_of[e] for e in experts], device=grads[0].device)
        for tag, g in enumerate(grads):
            ops.append(dist.P2POp(dist.isend, g[idx], to_global[rank], moe.group, tag))
    for rank, experts in sorted(plan_in.items()):
        if not experts:
            continue
        bufs = [torch.empty((len(experts),) + tuple(g.shape[1:]), dtype=g.dtype, device=g.device) for g in grads]
        received[rank] = bufs
        for tag, buf in enumerate(bufs):
            ops.append(dist.P2POp(dist.irecv, buf, to_global[rank], moe.group, tag))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return received


def _merged(*plans: dict) -> dict:
    out: dict = {}
    for plan in plans:
        for rank, experts in plan.items():
            out[rank] = out.get(rank, []) + experts
    return out


@torch.no_grad()
def _reduce_expert_grads(moe, *, fold: bool, finish: bool) -> None:
    """fold: every replica's gradient is a partial sum; sum them per logical expert (fp32: the local replicas in
    slot order, then the other holders - the pair partner, or in ascending rank order at the owner - rounded once).
    finish: all-reduce over the DP group and scale by 1 / (EP size * DP size). Owners then send the final value to
    the other holders and every local replica copies its first slot: replicas are bitwise identical."""
    grads = [p.grad for p in (moe.w13, moe.w2) if p.grad is not None]  # the same on every rank (_grad_states)
    if not grads:
        return
    plan = _expert_plan(moe)
    if fold:
        sums: dict = {}  # (expert, tensor index) -> fp32 sum, for the experts this rank owns
        for expert, slots in plan.local.items():
            if len(slots) == 1 and expert not in plan.owned:
                continue
            for t, g in enumerate(grads):
                acc = g[slots[0]].float()  # fp32 gradients: the first slot itself, summed in place
                for slot in slots[1:]:
                    acc += g[slot].float()
                if expert in plan.owned:
                    sums[expert, t] = acc
                elif acc.data_ptr() != g[slots[0]].data_ptr():
                    g[slots[0]].copy_(acc)  # what is sent (owner, pair partner) is the sum in the gradient dtype
        if plan.send or plan.recv or plan.pair:
            received = _exchange(moe, grads, _merged(plan.send, plan.pair), _merged(plan.recv, plan.pair),
                                 plan.first)
            for rank in sorted(received):  # the owner adds the other holders in ascending rank order
                owned = plan.recv.get(rank, [])
                for i, expert in enumerate(owned + plan.pair.get(rank, [])):
                    for t, buf in enumerate(received[rank]):
                        if i < len(owned):
                            sums[expert, t] += buf[i].float()
                        else:  # mine + partner's on one side, partner's + mine on the other: the same bits
                            target = grads[t][plan.first[expert]]
                            target.copy_(target.float() + buf[i].float())
        for (expert, t), acc in sums.items():
            target = grads[t][plan.first[expert]]
            if acc.data_ptr() != target.data_ptr():
                target.copy_(acc)  # rounded once
    if finish:
        if moe.dp_group is not None:
            for g in grads:
                dist.all_reduce(g, group=moe.dp_group)
        scale = 1.0 / (moe.num_ranks * moe.dp_size)
        if scale != 1.0:
            for g in grads:
                g.mul_(scale)
    if plan.send or plan.recv:  # owners send the final value back to the other holders
        received = _exchange(moe, grads, plan.recv, plan.send, plan.first)
        for rank, bufs in received.items():
            for i, expert in enumerate(plan.send[rank]):
                for g, buf in zip(grads, bufs, strict=True):
                    g[plan.first[expert]].copy_(buf[i])
    if plan.needs_fold:
        for slots in plan.local.values():
            for slot in slots[1:]:
                for g in grads:
                    g[slot].copy_(g[slots[0]])


_BUCKET_BYTES = 64 << 20  # replicated gradients are all-reduced in flat buckets of about this size


@torch.no_grad()
def _average_replicated(layers) -> None:
    """Flat all-reduces (buckets per dtype) over the EP group and then the DP group, then / (EP size * DP size)."""
    first = layers[0]
    scale = 1.0 / (first.num_ranks * first.dp_size)
    if not _groups_of(first) and scale == 1.0:
        return  # one process: the mean over ranks is the gradient itself
    buckets: dict = {}  # dtype -> list of buckets (lists of grads)
    for moe in layers:
        for p in moe.replicated_parameters():
            if p.grad is None:
                continue
            open_buckets = buckets.setdefault(p.grad.dtype, [[]])
            used = sum(g.numel() * g.element_size() for g in open_buckets[-1])
            if open_buckets[-1] and used + p.grad.numel() * p.grad.element_size() > _BUCKET_BYTES:
                open_buckets.append([])
            open_buckets[-1].append(p.grad)
    for grads in (bucket for per_dtype in buckets.values() for bucket in per_dtype):
        flat = grads[0] if len(grads) == 1 else torch.cat([g.reshape(-1) for g in grads])
        for group, _ in _groups_of(first):
            dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        if len(grads) > 1:
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


# ---- sync_grads

def sync_grads(model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Call after `loss.backward()` and before `optimizer.step()` on every rank (collective over each layer's EP
    group and DP group). Afterwards every parameter of every `epmoe.MoE` in `model` holds the gradient of the mean
    over all EP x DP ranks of each rank's loss; replicas of an expert hold bitwise the same gradient. Then applies
    the aux-loss-free bias update (`bias_update_rate > 0`) and, every `eplb_interval`-th call, rebalances (moving
    `.grad` and the per-slot state of `optimizer` and of every optimizer that already stepped these parameters).

    A second call without a backward in between leaves the gradients alone. `model` may be wrapped in
    DistributedDataParallel over the data-parallel ranks for its dense parameters (epmoe's are excluded from it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_ddp(model)
    for layers in _by_groups(moe_layers(model)):
        _sync_group(layers, optimizer)


def _sync_group(layers, optimizer) -> None:
    check_agreement(layers, "sync_grads")
    states = _grad_states(layers)
    pending = [moe for moe, state in zip(layers, states, strict=True) if state in (_RAW, _SUMMED)]
    if pending:
        _average_replicated(pending)
        for moe, state in zip(layers, states, strict=True):
            if state in (_RAW, _SUMMED):
                _reduce_expert_grads(moe, fold=state == _RAW, finish=True)
                _set_marks(moe, _SYNCED)
    biased = [moe for moe in layers if moe.config.bias_update_rate > 0]
    balance.update_bias_layers(biased)
    due = []
    for moe, state in zip(layers, states, strict=True):
        if state == _SYNCED:
            continue  # a repeated call: not a new step
        moe._num_steps += 1
        interval = moe.config.eplb_interval
        if interval > 0 and moe._num_steps % interval == 0:
            due.append(moe)
    for members in _rebalance_sets(due):
        rebalance_layers(members, optimizer=optimizer)


# ---- moving experts

def _holds(optimizer, moe) -> bool:
    return any(p is moe.w13 or p is moe.w2 for group in optimizer.param_groups for p in group["params"])


def _optimizers(moe, optimizer) -> list:
    explicit = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for opt in explicit:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), got {type(opt).__name__}")
        if not _holds(opt, moe):
            raise ValueError(f"optimizer {type(opt).__name__} does not hold the w13/w2 parameters of MoE layer "
                             f"{moe.layer_idx}, so its state cannot move with them; pass the optimizer of this model")
    tracked = sorted((order, id(opt), opt) for opt, order in list(_OPTIMIZERS.items())
                     if _holds(opt, moe) and not any(opt is e for e in explicit))
    return explicit + [opt for _, _, opt in tracked]


def _moving_tensors(moe, optimizers, extra_tensors) -> tuple:
    """(tensors to move besides weights and grads, crc of their shapes and dtypes)."""
    num_local = moe.num_local_slots
    tensors = []
    for opt in optimizers:
        for param, pname in ((moe.w13, "w13"), (moe.w2, "w2")):
            for key, value in sorted(opt.state.get(param, {}).items(), key=lambda kv: str(kv[0])):
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_local:
                    if not value.is_contiguous():
                        raise ValueError(f"optimizer state {key!r} of {pname} is not contiguous; it cannot move")
                    tensors.append(value)
    for i, t in enumerate(extra_tensors or []):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"extra_tensors[{i}] must be a tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] != num_local or not t.is_contiguous():
            raise ValueError(f"extra_tensors[{i}] must be contiguous with num_local_slots ({num_local}) as its first "
                             f"dimension, got shape {tuple(t.shape)}")
        tensors.append(t)
    desc = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in tensors)
    return tensors, zlib.crc32(desc.encode())


def _start_move(layers, kind: str, optimizer, extra_tensors) -> list:
    """The header of a move: finds the tensors to move with each layer and checks that every rank agrees."""
    moving = [_moving_tensors(moe, _optimizers(moe, optimizer), extra_tensors) for moe in layers]
    crcs = [crc for _, crc in moving]
    check_agreement(layers, kind, extra=zlib.crc32(np.array(crcs, dtype=np.int64).tobytes()))
    return moving


def _move(layers, new_rows, moving) -> list:
    """Moves weights, grads and the `moving` tensors (optimizer state, extras) of `layers` (sharing groups) to
    `new_rows` (one 1-layer Placement each). Collective. Returns the bytes sent by this rank per layer."""
    states = _grad_states(layers, extra=[crc for _, crc in moving])
    for moe, state in zip(layers, states, strict=True):
        if state == _RAW:  # replicas hold partial gradients: make each the expert's sum before slots change
            _reduce_expert_grads(moe, fold=True, finish=False)
    changed = [i for i, (moe, new) in enumerate(zip(layers, new_rows, strict=True)) if new != moe.placement]
    sent = [0] * len(layers)
    if changed:
        registry = []
        for i in changed:
            moe = layers[i]
            grads = [p.grad for p in (moe.w13, moe.w2) if p.grad is not None]
            registry.append([moe.w13.data, moe.w2.data] + grads + moving[i][0])
        if layers[0].distributed and layers[0].num_ranks > 1:
            old = _stack([layers[i].placement for i in changed])
            new = _stack([new_rows[i] for i in changed])
            report = eplb.rearrange(registry, old, new, layers[0].group,
                                    on_commit=lambda j: layers[changed[j]]._install_placement(new_rows[changed[j]]))
            for j, stats in enumerate(report.layers):
                sent[changed[j]] = int(stats.bytes_sent)
        else:
            for j, i in enumerate(changed):
                moe = layers[i]
                # One rank holds every slot: new slot s takes the old first slot of its logical expert.
                old_slot = moe.placement.log2phy[0][new_rows[i].phy2log[0], 0].to(moe.w13.device)
                for t in registry[j]:
                    t.copy_(t.index_select(0, old_slot.to(t.device)))
                moe._install_placement(new_rows[i])
    for moe, state in zip(layers, states, strict=True):
        if state in (_RAW, _SUMMED, _SYNCED):
            _set_marks(moe, _SUMMED if state == _RAW else state)
    return sent


def _stack(rows) -> eplb.Placement:
    first = rows[0]
    return eplb.Placement(np.concatenate([r.numpy()[0] for r in rows]), first.num_experts, first.num_ranks,
                          share=torch.cat([r.share for r in rows]))


def apply_placement(moe, placement, *, optimizer=None, extra_tensors=None) -> dict:
    """`MoE.apply_placement`: moves the layer's experts to `placement` (collective)."""
    row = moe._layer_placement(placement)  # checks the type, experts, slots and EP size; row layer_idx
    row.validate()
    moving = _start_move([moe], "apply_placement", optimizer, extra_tensors)
    previous = moe.placement
    sent = _move([moe], [row], moving)[0]
    log.info("layer %d: placement applied: %d slots changed, %d bytes sent by this rank", moe.layer_idx,
             row.moves_from(previous).changed_slots, sent)
    return {"bytes_moved": sent}


def rebalance_layers(layers, *, optimizer=None, max_moves=None, extra_tensors=None) -> list:
    """Plans one [L, E] placement for `layers` (same groups and shapes) from their recorded load summed over the
    EP and DP groups, and moves them there. Returns one stats dict per layer (see `MoE.rebalance`)."""
    first = layers[0]
    cfg = first.config
    for moe in layers[1:]:
        if (moe.config.num_experts, moe.config.num_slots, moe.num_ranks) != (cfg.num_experts, cfg.num_slots,
                                                                               first.num_ranks):
            raise ValueError("rebalance_layers: layers must share num_experts, num_slots and the EP size")
    moving = _start_move(layers, "rebalance", optimizer, extra_tensors)
    group = first.group if first.distributed else None
    loads = [moe.recorder.logical_load(moe.placement.phy2log, cfg.num_experts, group=group) for moe in layers]
    load = torch.cat(loads)
    if first.dp_group is not None:
        dist.all_reduce(load, group=first.dp_group)
    load = load.cpu()
    previous = _stack([moe.placement for moe in layers])
    new = eplb.plan(load, cfg.num_slots, first.num_ranks, previous=previous, max_moves=max_moves)
    before, after = eplb.balancedness(load, previous), eplb.balancedness(load, new)
    rows = [_placement_row(new, i) for i in range(len(layers))]
    changed = [row.moves_from(moe.placement).changed_slots for moe, row in zip(layers, rows, strict=True)]
    sent = _move(layers, rows, moving)
    stats = []
    for i, moe in enumerate(layers):
        stats.append({"balancedness_before": float(before[i]), "balancedness_after": float(after[i]),
                      "bytes_moved": sent[i]})
        if changed[i] == 0:
            log.info("layer %d: EPLB rebalance kept the placement (balancedness %.4f on the recorded window)",
                     moe.layer_idx, before[i])
        else:
            log.info("layer %d: EPLB rebalance: balancedness %.4f -> %.4f, %d slots changed, %d bytes sent by this "
                     "rank", moe.layer_idx, before[i], after[i], changed[i], sent[i])
    return stats


def _rebalance_sets(layers) -> list:
    """Layers that can share one plan (same groups, experts and slots), in first-appearance order."""
    sets: dict = {}
    for moe in layers:
        key = (id(moe.group), id(moe.dp_group), moe.config.num_experts, moe.config.num_slots)
        sets.setdefault(key, []).append(moe)
    return list(sets.values())


def rebalance_model(model: nn.Module, *, optimizer=None, max_moves=None) -> list:
    """Rebalances every `epmoe.MoE` of `model` with one planning call over all layers' [L, E] load (per set of
    layers sharing groups and shapes), moving weights, `.grad` and optimizer state (collective). Call it where
    `MoE.rebalance` may be called. Returns one stats dict per layer, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = moe_layers(model)
    stats = {}
    for members in _rebalance_sets(layers):
        for moe, result in zip(members, rebalance_layers(members, optimizer=optimizer, max_moves=max_moves),
                               strict=True):
            stats[id(moe)] = result
    return [stats[id(moe)] for moe in layers]
