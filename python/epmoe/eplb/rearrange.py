"""Moves per-expert tensors between ranks to go from one `Placement` to another.

Protocol per layer (every rank derives the same plan from (old, new), no handshake):
  - a slot whose expert is unchanged is left alone; a slot whose new expert already sits on the rank is copied
    locally; otherwise the rank receives the expert once (further slots of the same rank copy it locally).
  - senders of expert e: the ranks holding e in the old placement (ascending); receivers: the ranks that need e
    and lack it (ascending); receiver i is served by sender i mod #senders, from its first old slot holding e.
  - transfers, ordered by (expert, receiver), run in batches of `batch_size` with `batch_isend_irecv`; each
    transfer carries every registered tensor of the slot plus an int64 digest of their bytes.
  - the received bytes are checked against the digest; then all ranks agree (all_reduce MIN of an ok flag)
    and only then copy the staged slots into place and call `on_commit(layer)`. A failed check or a failing
    hook on any rank leaves that layer's weights untouched on every rank and raises `RearrangeError`; layers
    committed before it stay committed (each layer is consistent on its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from epmoe._logging import get_logger

from .placement import Placement

log = get_logger(__name__)

__all__ = ["rearrange", "transfer_plan", "tensor_digest", "Transfer", "LayerTransferStats", "RearrangeReport",
           "RearrangeError"]


@dataclass(frozen=True)
class Transfer:
    """One expert copy over the network: slot `src_slot` of `src_rank` -> slot `dst_slot` of `dst_rank` (local ids)."""

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass
class LayerTransferStats:
    """What one layer's rearrangement did on this rank."""

    layer: int
    num_sent: int = 0
    num_received: int = 0
    num_local_copies: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


@dataclass
class RearrangeReport:
    """Per-layer statistics of this rank; `committed_layers` lists the layers now on the new placement."""

    layers: list = field(default_factory=list)
    committed_layers: list = field(default_factory=list)

    @property
    def bytes_sent(self) -> int:
        return sum(stats.bytes_sent for stats in self.layers)

    @property
    def bytes_received(self) -> int:
        return sum(stats.bytes_received for stats in self.layers)

    @property
    def seconds(self) -> float:
        return sum(stats.seconds for stats in self.layers)


class RearrangeError(RuntimeError):
    """A layer could not be moved; its old placement and weights are still in force on every rank.

    Attributes:
        layer: the failed layer.
        report: the `RearrangeReport` up to the failure (`report.committed_layers` were moved).
    """

    def __init__(self, message: str, layer: int, report: RearrangeReport):
        super().__init__(message)
        self.layer = layer
        self.report = report


def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """int64 [3] digest of a tensor's bytes (sum and position-weighted sum of its 32-bit words, and the word count).

    Integer sums wrap modulo 2^64, so the value does not depend on the reduction order.
    """
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    words = flat.view(torch.int32).to(torch.int64) if flat.numel() % 4 == 0 else flat.to(torch.int64)
    pos = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 65521 + 1
    count = torch.tensor(words.numel(), dtype=torch.int64, device=words.device)
    return torch.stack([words.sum(), (words * pos).sum(), count])


def transfer_plan(old_phy2log, new_phy2log, num_ranks: int) -> tuple:
    """The matching of one layer, identical on every rank.

    Arguments:
        old_phy2log, new_phy2log: int [P] slot contents before and after.
        num_ranks: R.

    Returns:
        transfers: list of `Transfer`, ordered by (expert, dst_rank).
        local_copies: list per rank of (dst_slot, src) pairs; src = ("old", slot) copies an old local slot,
            src = ("new", slot) copies a slot of the same rank filled earlier in this plan (a received expert).
    """
    old = np.asarray(old_phy2log).reshape(num_ranks, -1)
    new = np.asarray(new_phy2log).reshape(num_ranks, -1)
    num_local = old.shape[1]
    holders: dict = {}
    for rank in range(num_ranks):
        for slot in range(num_local):
            holders.setdefault(int(old[rank, slot]), {}).setdefault(rank, slot)
    needs: dict = {}  # expert -> list of (dst_rank, dst_slot) primary receivers
    local_copies: list = [[] for _ in range(num_ranks)]
    for rank in range(num_ranks):
        received: dict = {}
        for slot in range(num_local):
            expert = int(new[rank, slot])
            if old[rank, slot] == expert:
                continue
            src_slot = holders.get(expert, {}).get(rank)
            if src_slot is not None:
                local_copies[rank].append((slot, ("old", src_slot)))
            elif expert in received:
                local_copies[rank].append((slot, ("new", received[expert])))
            else:
                received[expert] = slot
                needs.setdefault(expert, []).append((rank, slot))
    transfers = []
    for expert in sorted(needs):
        senders = sorted(holders[expert].items())
        for i, (dst_rank, dst_slot) in enumerate(needs[expert]):
            src_rank, src_slot = senders[i % len(senders)]
            transfers.append(Transfer(expert, src_rank, src_slot, dst_rank, dst_slot))
    return transfers, local_copies


def _normalise_registry(expert_tensors, num_layers: int, num_local: int) -> list:
    if not isinstance(expert_tensors, Sequence) or len(expert_tensors) != num_layers:
        raise ValueError(f"expert_tensors must be a sequence with one entry per layer ({num_layers})")
    registry = []
    for layer, entry in enumerate(expert_tensors):
        tensors = list(entry.values()) if isinstance(entry, Mapping) else list(entry)
        if not tensors:
            raise ValueError(f"expert_tensors[{layer}] must hold at least one tensor")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"expert_tensors[{layer}][{i}] must be a tensor, got {type(t).__name__}")
            if t.dim() == 0 or t.shape[0] != num_local:
                raise ValueError(f"expert_tensors[{layer}][{i}] must have num_local_slots ({num_local}) as its first "
                                 f"dimension, got shape {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"expert_tensors[{layer}][{i}] must be contiguous")
        registry.append(tensors)
    return registry


def _plans_agree(old: Placement, new: Placement, device, group) -> bool:
    key = np.concatenate([old.numpy()[0].reshape(-1), new.numpy()[0].reshape(-1)]).astype(np.int64)
    digest = tensor_digest(torch.from_numpy(key))[:2].to(device)
    both = torch.cat([digest, -digest])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(both[:2], digest)) and bool(torch.equal(-both[2:], digest))


def rearrange(expert_tensors, old: Placement, new: Placement, group=None, *, batch_size: int = 32,
              on_commit: Callable[[int], None] | None = None,
              recv_hook: Callable[[int, int, list], None] | None = None) -> RearrangeReport:
    """Moves every registered per-expert tensor so that local slot j of this rank holds `new`'s expert.

    Collective: every rank of `group` calls it with the same `old` and `new`.

    Arguments:
        expert_tensors: one entry per layer, each a list (or dict) of tensors whose first dimension is the local
            slot, e.g. `[[w13, w2], ...]` with w13 [num_local_slots, 2I, H] and w2 [num_local_slots, H, I], plus
            any scales; all tensors of the weights, scales and extras must be registered. Modified in place.
        old: the placement the tensors hold now.
        new: the target placement (same layers, slots, experts and ranks).
        group: the EP process group (default: WORLD); its size must equal `old.num_ranks`.
        batch_size: transfers per `batch_isend_irecv` batch (all ranks walk the same batches).
        on_commit: called with the layer index on every rank once that layer's tensors are in place, e.g. to
            install the layer's new routing maps.
        recv_hook: test hook `(layer, dst_slot, buffers)` called on each received slot before verification; may
            modify the buffers or raise.

    Returns:
        `RearrangeReport` (bytes and seconds per layer on this rank).

    Raises:
        ValueError/TypeError before anything moves (invalid or mismatched placements, bad tensors, ranks that
        disagree on the plans); `RearrangeError` if a layer's transfer fails (that layer stays on `old`).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("rearrange needs an initialised torch.distributed process group")
    if not isinstance(old, Placement):
        raise TypeError(f"old must be a Placement, got {type(old).__name__}")
    if not isinstance(new, Placement):
        raise TypeError(f"new must be a Placement, got {type(new).__name__}")
    old.check_compatible(new, "new")
    old.validate()
    new.validate()
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    num_ranks = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if num_ranks != old.num_ranks:
        raise ValueError(f"the group has {num_ranks} ranks but the placements are for {old.num_ranks}")
    registry = _normalise_registry(expert_tensors, old.num_layers, old.num_local_slots)
    device = registry[0][0].device
    if not _plans_agree(old, new, device, group):
        raise ValueError("ranks disagree on the old or new placement; nothing was moved")
    global_rank = [dist.get_global_rank(group, r) if group is not None else r for r in range(num_ranks)]

    old_phy, new_phy = old.numpy()[0], new.numpy()[0]
    report = RearrangeReport()
    for layer in range(old.num_layers):
        start = time.perf_counter()
        stats = LayerTransferStats(layer)
        tensors = registry[layer]
        transfers, local_copies = transfer_plan(old_phy[layer], new_phy[layer], num_ranks)
        staged: dict = {}  # local slot -> new tensors
        error = None
        for dst_slot, (kind, src_slot) in local_copies[rank]:
            if kind == "old":
                staged[dst_slot] = [t[src_slot].clone() for t in tensors]
                stats.num_local_copies += 1
        for begin in range(0, len(transfers), batch_size):
            ops, received = [], []
            for index, tr in enumerate(transfers[begin:begin + batch_size], start=begin):
                tag = index * (len(tensors) + 1)
                if tr.src_rank == rank:
                    parts = [t[tr.src_slot] for t in tensors]
                    digest = torch.stack([tensor_digest(p) for p in parts])
                    for i, part in enumerate(parts + [digest]):
                        ops.append(dist.P2POp(dist.isend, part, global_rank[tr.dst_rank], group, tag + i))
                    stats.num_sent += 1
                    stats.bytes_sent += sum(p.numel() * p.element_size() for p in parts)
                elif tr.dst_rank == rank:
                    bufs = [torch.empty_like(t[0]) for t in tensors]
                    digest = torch.empty(len(tensors), 3, dtype=torch.int64, device=device)
                    for i, buf in enumerate(bufs + [digest]):
                        ops.append(dist.P2POp(dist.irecv, buf, global_rank[tr.src_rank], group, tag + i))
                    received.append((tr, bufs, digest))
            if ops:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            for tr, bufs, digest in received:
                stats.num_received += 1
                stats.bytes_received += sum(b.numel() * b.element_size() for b in bufs)
                try:
                    if recv_hook is not None:
                        recv_hook(layer, tr.dst_slot, bufs)
                    got = torch.stack([tensor_digest(b) for b in bufs])
                    if not torch.equal(got, digest):
                        raise RuntimeError(f"checksum mismatch for expert {tr.expert} from rank {tr.src_rank} "
                                           f"into slot {tr.dst_slot}")
                except Exception as exc:  # keep walking the batches so that peers do not hang
                    error = error or exc
                staged[tr.dst_slot] = bufs
        for dst_slot, (kind, src_slot) in local_copies[rank]:
            if kind == "new":
                staged[dst_slot] = [b.clone() for b in staged[src_slot]]
                stats.num_local_copies += 1
        ok = torch.tensor([0 if error is not None else 1], dtype=torch.int64, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        stats.seconds = time.perf_counter() - start
        report.layers.append(stats)
        if int(ok.item()) == 0:
            where = f"on this rank: {error}" if error is not None else "on another rank"
            log.warning("rearrange: layer %d failed (%s); it keeps the old placement", layer, where)
            raise RearrangeError(f"rearrange failed at layer {layer} ({where}); layer {layer} keeps the old "
                                 f"placement, layers {report.committed_layers} were moved", layer, report)
        for dst_slot, bufs in staged.items():
            for t, buf in zip(tensors, bufs, strict=True):
                t[dst_slot].copy_(buf)
        report.committed_layers.append(layer)
        log.debug("rearrange: layer %d moved: %d sent (%d bytes), %d received (%d bytes), %d local copies, %.3f s",
                  layer, stats.num_sent, stats.bytes_sent, stats.num_received, stats.bytes_received,
                  stats.num_local_copies, stats.seconds)
        if on_commit is not None:
            on_commit(layer)
    return report
