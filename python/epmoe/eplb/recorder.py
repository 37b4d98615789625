"""Per-physical-expert load recording on the routing device, with a window of the last N steps."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _validate as v

__all__ = ["LoadRecorder"]


class LoadRecorder:
    """Counts routed (token, k) pairs per physical slot and keeps the last `window_size` steps.

    Usage per forward step: `record(layer, phys_idx)` for every MoE layer (after `map_to_physical`), then `step()`.
    Counting is one fused op (`torch.ops.epmoe.count_slots`) into a device buffer: no host sync, no temporaries.
    Nothing is communicated until `window_load` / `logical_load` is called with a process group.

    Arguments:
        num_layers: L.
        num_slots: P physical slots per layer (global slot ids, all ranks).
        window_size: N steps kept in the ring buffer.
        device: where counts live (the routing device).
    """

    def __init__(self, num_layers: int, num_slots: int, window_size: int, device=None):
        for name, value in (("num_layers", num_layers), ("num_slots", num_slots), ("window_size", window_size)):
            v.check_int(name, value, minimum=1)
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.window_size = window_size
        self.device = torch.device(device if device is not None else "cpu")
        # Ring of window_size + 1 steps: the one at _cursor is the step in progress, counted into directly.
        self._window = torch.zeros(window_size + 1, num_layers, num_slots, dtype=torch.int64, device=self.device)
        # Views of every step (and step x layer) made once: a view per call costs more than the count of a batch.
        self._steps = list(self._window.unbind(0))
        self._rows = [list(step.unbind(0)) for step in self._steps]
        self._cursor = 0
        self.num_steps = 0

    def record(self, layer: int, phys_idx: torch.Tensor) -> None:
        """Adds the routed slots of one layer in this step.

        Arguments:
            layer: MoE layer index in [0, L).
            phys_idx: int32/int64 [T, k] physical slot ids on `device`; -1 entries are ignored.
        """
        v.check_int("layer", layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must lie in [0, {self.num_layers}), got {layer}")
        v.check_tensor("phys_idx", phys_idx, dtypes=v.INDEX_DTYPES, dim=2, layout="[num_tokens, top_k]",
                       device=self.device, like="the recorder")
        if phys_idx.dtype != torch.int32 or not phys_idx.is_contiguous():
            phys_idx = phys_idx.to(torch.int32).contiguous()
        # A fused counting op (CPU loop / CUDA shared-memory histogram): no sync, no temporaries.
        try:
            torch.ops.epmoe.count_slots(self.counts(layer), phys_idx)
        except ValueError as exc:  # the op checks the ids in the same pass (no extra cost when they are valid)
            raise ValueError(f"phys_idx values must lie in [-1, {self.num_slots}) (num_slots): {exc}") from exc

    def counts(self, layer: int) -> torch.Tensor:
        """The int64 [num_slots] counters of `layer` in the step in progress (what `record` adds to), for ops that
        count in place (`torch.ops.epmoe.fused_moe_forward`)."""
        return self._rows[self._cursor][layer]

    def step(self) -> None:
        """Closes the current step; the next one overwrites the oldest step of the window."""
        self._cursor = (self._cursor + 1) % (self.window_size + 1)
        self._steps[self._cursor].zero_()
        self.num_steps += 1

    def reset(self) -> None:
        """Forgets every recorded step (e.g. after a rearrangement changed what slot ids mean)."""
        self._window.zero_()
        self._cursor = 0
        self.num_steps = 0

    def window_load(self, group=None) -> torch.Tensor:
        """int64 [L, P]: counts per physical slot summed over the window (and over ranks when `group` is given or
        torch.distributed is initialised; every rank of the group must call it)."""
        total = self._window.sum(dim=0) - self._window[self._cursor]  # closed steps only
        if group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    def logical_load(self, phy2log: torch.Tensor, num_experts: int, group=None) -> torch.Tensor:
        """int64 [L, E]: window counts folded onto logical experts with the placement the window was recorded with.

        Arguments:
            phy2log: int64 [L, P] slot contents during the window.
            num_experts: E.
            group: as in `window_load`.
        """
        v.check_tensor("phy2log", phy2log, dtypes=v.INDEX_DTYPES, shape=(self.num_layers, self.num_slots),
                       layout="(num_layers, num_slots)")
        num_experts = v.check_int("num_experts", num_experts, minimum=1)
        if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts):
            raise ValueError(f"phy2log values must lie in [0, {num_experts}) (num_experts), got "
                             f"[{int(phy2log.min())}, {int(phy2log.max())}]")
        per_slot = self.window_load(group)
        out = torch.zeros(self.num_layers, num_experts, dtype=torch.int64, device=per_slot.device)
        return out.scatter_add_(1, phy2log.to(per_slot.device, torch.int64), per_slot)
