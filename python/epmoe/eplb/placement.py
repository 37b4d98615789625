"""The `Placement` of physical expert slots, its validation, and the one balancedness metric of epmoe.

Terms: logical expert e in [0, E); physical slot p in [0, P); rank r in [0, R) owns the contiguous slots
[r * P / R, (r + 1) * P / R). Layers are independent and batched along dim 0.

Load model: with the default replica policy ("hash") a logical expert's tokens are split uniformly over its
replicas, because `map_to_physical` picks a replica with a uniform hash. Slot p of layer l therefore carries
`load[l, phy2log[l, p]] / logcnt[l, phy2log[l, p]]` tokens and a rank carries the sum over its slots. The
"weighted" policy splits by the placement's replica shares (`Placement.share`, chosen by `plan`) and "balanced"
assigns each batch optimally; `rank_load` and `balancedness` take the policy whose loads they predict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._validate import check_int

__all__ = ["Placement", "MoveStats", "balancedness", "rank_load", "as_load_array", "num_redundant_auto"]


def as_load_array(load, name: str = "load") -> np.ndarray:
    """Converts a load ([L, E] or [E]; torch tensor, numpy array or nested list) to float64 numpy [L, E]."""
    if load is None or isinstance(load, (str, bytes)):
        raise TypeError(f"{name} must be a numeric tensor, array or nested list [num_layers, num_experts], got "
                        f"{type(load).__name__}")
    if isinstance(load, torch.Tensor):
        if load.is_meta:
            raise ValueError(f"{name} is a meta tensor: the planner needs the load values")
        if load.is_complex() or load.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers (token counts), got {str(load.dtype).removeprefix('torch.')}")
        arr = load.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            raw = np.asarray(load)
            arr = raw.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a numeric tensor, array or nested list, "
                            f"got {type(load).__name__}") from exc
        if raw.dtype == np.bool_:  # True/False are not token counts
            raise TypeError(f"{name} must be real numbers (token counts), got bool")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have shape [num_layers, num_experts], got {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return arr


def num_redundant_auto(num_experts: int, num_ranks: int, min_redundant: int = 0) -> int:
    """Smallest number of redundant slots R >= `min_redundant` such that `num_experts + R` is divisible by `num_ranks`.

    Example: 256 experts on 48 ranks -> 32 (288 slots, 6 per rank); with `min_redundant=40` -> 80.
    """
    for name, value in (("num_experts", num_experts), ("num_ranks", num_ranks)):
        check_int(name, value, minimum=1)
    check_int("min_redundant", min_redundant, minimum=0)
    return min_redundant + (-(num_experts + min_redundant)) % num_ranks


def _log2phy_from_phy2log(phy2log: np.ndarray, num_experts: int, width: int | None = None) -> tuple:
    """Builds (log2phy [L, E, width] -1 padded, logcnt [L, E]); replicas of an expert are listed in slot order."""
    num_layers, num_slots = phy2log.shape
    rows = np.repeat(np.arange(num_layers), num_slots)
    logcnt = np.bincount((rows * num_experts + phy2log.reshape(-1)), minlength=num_layers * num_experts).reshape(
        num_layers, num_experts)
    max_replicas = int(logcnt.max()) if width is None else width
    # Stable sort by logical id keeps slot order inside an expert: replica index = rank within its run.
    order = np.argsort(phy2log, axis=1, kind="stable")
    sorted_log = np.take_along_axis(phy2log, order, axis=1)
    starts = np.cumsum(logcnt, axis=1) - logcnt
    replica_idx = np.arange(num_slots)[None, :] - np.take_along_axis(starts, sorted_log, axis=1)
    log2phy = np.full((num_layers, num_experts, max_replicas), -1, dtype=np.int64)
    log2phy[rows, sorted_log.reshape(-1), replica_idx.reshape(-1)] = order.reshape(-1)
    return log2phy, logcnt


@dataclass(frozen=True)
class MoveStats:
    """Cost of going from one placement to another, summed over layers.

    Attributes:
        changed_slots: slots whose logical expert differs.
        remote_copies: changed slots whose new expert was not on the slot's rank before (a copy over the network).
        local_copies: changed slots fed from another slot of the same rank.
        per_layer_remote: int64 [L] remote copies per layer.
    """

    changed_slots: int
    remote_copies: int
    local_copies: int
    per_layer_remote: np.ndarray


def _even_share(phy2log: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    return 1.0 / np.take_along_axis(logcnt, phy2log, axis=1)


def _check_share(share, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """float64 [L, P] copy of `share`, validated: finite, >= 0, summing to 1 over each expert's slots."""
    if isinstance(share, torch.Tensor):
        if share.is_meta:
            raise ValueError("share is a meta tensor: a placement needs the replica shares' values")
        share = share.detach().to("cpu", torch.float64).numpy()
    arr = np.array(share, dtype=np.float64)
    if arr.shape != phy2log.shape:
        raise ValueError(f"share must have shape {tuple(phy2log.shape)} (layers, slots), got {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("share must be finite and non-negative")
    num_layers = phy2log.shape[0]
    rows = np.repeat(np.arange(num_layers), phy2log.shape[1]) * num_experts + phy2log.reshape(-1)
    sums = np.bincount(rows, weights=arr.reshape(-1), minlength=num_layers * num_experts)
    if np.any(np.abs(sums - 1.0) > 1e-6):
        bad = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(f"share must sum to 1 over the slots of each expert; expert {bad % num_experts} of layer "
                         f"{bad // num_experts} sums to {sums[bad]:.9g}")
    return arr


class Placement:
    """Physical slot contents of every MoE layer, with the derived inverse maps and the replica shares.

    Attributes:
        phy2log: int64 [L, P], logical expert held by each slot.
        log2phy: int64 [L, E, max_replicas], slots of each expert in ascending slot order, -1 padded;
            `max_replicas` is the largest replica count of the placement.
        logcnt: int64 [L, E], number of replicas of each logical expert.
        share: float64 [L, P], the fraction of its expert's tokens each slot takes under the "weighted" replica
            policy (sums to 1 over an expert's slots); the even split 1 / logcnt unless given (`plan` chooses it).
        num_ranks: R; rank r owns slots [r * P / R, (r + 1) * P / R).
    """

    def __init__(self, phy2log, num_experts: int, num_ranks: int, share=None):
        if isinstance(phy2log, torch.Tensor):
            if phy2log.is_meta:
                raise ValueError("phy2log is a meta tensor: a placement needs the slot contents' values")
            phy2log = phy2log.detach().cpu().numpy()
        phy2log = np.asarray(phy2log)
        if not np.issubdtype(phy2log.dtype, np.integer):
            raise TypeError(f"phy2log must be an integer array [num_layers, num_slots], got {phy2log.dtype}")
        if phy2log.ndim != 2 or phy2log.size == 0:
            raise ValueError(f"phy2log must be a non-empty [num_layers, num_slots] array, got shape "
                             f"{list(phy2log.shape)}")
        num_experts = check_int("num_experts", num_experts, minimum=1)
        num_ranks = check_int("num_ranks", num_ranks, minimum=1)
        num_slots = phy2log.shape[1]
        if num_slots % num_ranks != 0:
            raise ValueError(f"num_slots ({num_slots}) must be divisible by num_ranks ({num_ranks})")
        if phy2log.min() < 0 or phy2log.max() >= num_experts:
            raise ValueError(f"phy2log values must lie in [0, {num_experts}), got [{phy2log.min()}, {phy2log.max()}]")
        self._phy2log = phy2log.astype(np.int64, copy=True)
        self.num_experts = num_experts
        self.num_ranks = num_ranks
        self._log2phy, self._logcnt = _log2phy_from_phy2log(self._phy2log, num_experts)
        if np.any(self._logcnt == 0):
            layer, expert = np.argwhere(self._logcnt == 0)[0]
            raise ValueError(f"phy2log leaves logical expert {expert} of layer {layer} without a replica")
        self._share = (_even_share(self._phy2log, self._logcnt) if share is None
                       else _check_share(share, self._phy2log, num_experts))

    def with_share(self, share) -> Placement:
        """The same slots with other replica shares (float64 [L, P], validated like the constructor's)."""
        out = object.__new__(Placement)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_device")})
        out._share = _check_share(share, self._phy2log, self.num_experts)
        return out

    def has_even_share(self) -> bool:
        """True when the shares are the even split (then "weighted" and "hash" predict the same loads)."""
        return bool(np.allclose(self._share, _even_share(self._phy2log, self._logcnt), rtol=0, atol=1e-12))

    def __getstate__(self) -> dict:
        # Device copies of the maps (cached by map_to_physical) are not part of the placement.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_device")}

    # Shapes
    @property
    def num_layers(self) -> int:
        return self._phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self._phy2log.shape[1]

    @property
    def num_local_slots(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def max_replicas(self) -> int:
        return self._log2phy.shape[2]

    # Maps as torch tensors (fresh copies: the placement is immutable)
    @property
    def phy2log(self) -> torch.Tensor:
        return torch.from_numpy(self._phy2log.copy())

    @property
    def log2phy(self) -> torch.Tensor:
        return torch.from_numpy(self._log2phy.copy())

    @property
    def logcnt(self) -> torch.Tensor:
        return torch.from_numpy(self._logcnt.copy())

    @property
    def share(self) -> torch.Tensor:
        return torch.from_numpy(self._share.copy())

    def numpy(self) -> tuple:
        """Read-only numpy views (phy2log [L, P], log2phy [L, E, M], logcnt [L, E])."""
        views = (self._phy2log.view(), self._log2phy.view(), self._logcnt.view())
        for view in views:
            view.flags.writeable = False
        return views

    def log2phy_padded(self, width: int) -> torch.Tensor:
        """log2phy padded with -1 to a fixed `width` >= max_replicas (for maps preallocated by a layer)."""
        if width < self.max_replicas:
            raise ValueError(f"width must be >= max_replicas ({self.max_replicas}), got {width}")
        return torch.from_numpy(_log2phy_from_phy2log(self._phy2log, self.num_experts, width)[0])

    def rank_of_slot(self) -> np.ndarray:
        """int64 [P]: owning rank of each slot."""
        return np.arange(self.num_slots) // self.num_local_slots

    def num_same_rank_duplicates(self) -> int:
        """Number of slots holding an expert that an earlier slot of the same rank already holds (over all layers)."""
        per_rank = self._phy2log.reshape(self.num_layers, self.num_ranks, self.num_local_slots)
        srt = np.sort(per_rank, axis=2)
        return int(np.count_nonzero(srt[:, :, 1:] == srt[:, :, :-1]))

    def validate(self) -> None:
        """Checks every invariant; raises ValueError naming the first violation.

        Invariants: each expert has >= 1 replica; counts sum to P; log2phy and phy2log are inverse;
        slots per rank are equal (P divisible by R).
        """
        if self.num_slots % self.num_ranks != 0:
            raise ValueError(f"num_slots ({self.num_slots}) must be divisible by num_ranks ({self.num_ranks})")
        if np.any(self._logcnt < 1):
            raise ValueError("logcnt: every logical expert needs at least one replica")
        if np.any(self._logcnt.sum(axis=1) != self.num_slots):
            raise ValueError("logcnt: replica counts must sum to num_slots on every layer")
        # Fast path: a valid log2phy is the one `_log2phy_from_phy2log` builds (slots of each expert ascending).
        log2phy, logcnt = _log2phy_from_phy2log(self._phy2log, self.num_experts)
        if np.array_equal(log2phy, self._log2phy) and np.array_equal(logcnt, self._logcnt):
            return
        valid = np.arange(self.max_replicas)[None, None, :] < self._logcnt[:, :, None]
        if np.any((self._log2phy >= 0) != valid):
            raise ValueError("log2phy: the first logcnt entries of each expert must be slots, the rest -1")
        # Every listed slot holds its expert, and an expert's slots ascend (hence are distinct); with counts summing
        # to P this makes log2phy the inverse of phy2log.
        slots = np.where(valid, self._log2phy, 0)
        held = np.take_along_axis(self._phy2log, slots.reshape(self.num_layers, -1), axis=1).reshape(slots.shape)
        if (np.any(valid & (held != np.arange(self.num_experts)[None, :, None]))
                or np.any(valid[:, :, 1:] & (slots[:, :, 1:] <= slots[:, :, :-1]))):
            raise ValueError("log2phy is not the inverse of phy2log")

    def check_compatible(self, other: Placement, name: str = "other") -> None:
        """Raises ValueError unless `other` has the same number of layers, slots, experts and ranks."""
        if not isinstance(other, Placement):
            raise TypeError(f"{name} must be a Placement, got {type(other).__name__}")
        mine = (self.num_layers, self.num_slots, self.num_experts, self.num_ranks)
        theirs = (other.num_layers, other.num_slots, other.num_experts, other.num_ranks)
        if mine != theirs:
            raise ValueError(f"{name} has (layers, slots, experts, ranks) = {theirs}, expected {mine}")

    def rank_load(self, load, *, policy: str = "hash") -> np.ndarray:
        """float64 [L, R]: tokens per rank under `policy` (see `rank_load`)."""
        return rank_load(load, self, policy=policy)

    def balancedness(self, load, *, policy: str = "hash") -> np.ndarray:
        """float64 [L]: see `balancedness`."""
        return balancedness(load, self, policy=policy)

    def moves_from(self, other: Placement) -> MoveStats:
        """Expert copies needed to go from `other` (the current placement) to this one."""
        self.check_compatible(other)
        old, new = other._phy2log, self._phy2log
        changed = old != new
        num_layers, num_slots = old.shape
        # Does the slot's rank hold the new expert in the old placement? held[l, r, e]
        held = np.zeros((num_layers, self.num_ranks, self.num_experts), dtype=bool)
        rank = np.broadcast_to(self.rank_of_slot()[None, :], old.shape)
        layer = np.broadcast_to(np.arange(num_layers)[:, None], old.shape)
        held[layer, rank, old] = True
        local = changed & held[layer, rank, new]
        remote = changed & ~local
        return MoveStats(int(changed.sum()), int(remote.sum()), int(local.sum()), remote.sum(axis=1))

    def to_json_dict(self) -> dict:
        """JSON-serialisable dict: `physical_to_logical_map` ([L][P] ints, SGLang's field name and meaning),
        `num_logical_experts` (E), `num_ranks` (R), and `replica_share` ([L][P] floats) unless the shares are the even
        split."""
        data = {
            "physical_to_logical_map": self._phy2log.tolist(),
            "num_logical_experts": self.num_experts,
            "num_ranks": self.num_ranks,
        }
        if not self.has_even_share():
            data["replica_share"] = self._share.tolist()
        return data

    def save(self, path) -> None:
        """Writes the placement as JSON (see `to_json_dict`)."""
        Path(path).write_text(json.dumps(self.to_json_dict()))

    @classmethod
    def from_json_dict(cls, data: dict, *, num_experts: int | None = None, num_ranks: int | None = None) -> Placement:
        """A placement from `to_json_dict`'s output (`replica_share` optional), or from SGLang's
        `--init-expert-location` JSON (a dict with only `physical_to_logical_map`). `num_experts` / `num_ranks` supply
        the fields the dict lacks; where the dict has them they must agree. Raises ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"placement JSON must be an object, got {type(data).__name__}")
        if "physical_to_logical_map" not in data:
            raise ValueError(f"placement JSON lacks the field 'physical_to_logical_map' (has {sorted(data)})")
        try:
            phy2log = np.asarray(data["physical_to_logical_map"], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise ValueError("placement JSON field 'physical_to_logical_map' must be a [num_layers][num_slots] "
                             "list of ints") from exc
        if phy2log.ndim == 1:
            phy2log = phy2log[None, :]
        fields = {}
        for key, given in (("num_logical_experts", num_experts), ("num_ranks", num_ranks)):
            stored = data.get(key)
            if stored is None and given is None:
                raise ValueError(f"placement JSON lacks the field {key!r}; pass it as an argument")
            if stored is not None and given is not None and int(stored) != int(given):
                raise ValueError(f"placement JSON field {key!r} is {stored}, expected {given}")
            fields[key] = int(stored if stored is not None else given)
        return cls(phy2log, fields["num_logical_experts"], fields["num_ranks"], share=data.get("replica_share"))

    @classmethod
    def load(cls, path, *, num_experts: int | None = None, num_ranks: int | None = None) -> Placement:
        """Reads a placement JSON file (`save`, `epmoe plan -o`, or SGLang's; see `from_json_dict`)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"placement file {path} is not valid JSON: {exc}") from exc
        return cls.from_json_dict(data, num_experts=num_experts, num_ranks=num_ranks)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Placement) and self.num_ranks == other.num_ranks
                and self.num_experts == other.num_experts and np.array_equal(self._phy2log, other._phy2log)
                and np.array_equal(self._share, other._share))

    def __repr__(self) -> str:
        return (f"Placement(num_layers={self.num_layers}, num_slots={self.num_slots}, num_experts={self.num_experts}, "
                f"num_ranks={self.num_ranks}, max_replicas={self.max_replicas})")


POLICIES = ("hash", "weighted", "balanced")


def rank_load(load, placement: Placement, *, policy: str = "hash") -> np.ndarray:
    """float64 [L, R]: the predicted tokens of each rank under a replica policy.

    "hash": rank r's load = sum over its slots p of load[l, phy2log[l, p]] / logcnt[l, phy2log[l, p]];
    "weighted": the same with the slot's share (`placement.share`) instead of 1 / logcnt; "balanced": the
    min-max optimum over the placement's replicas (what the per-batch policy achieves on a batch with this load).

    Arguments:
        load: [L, E] logical load (tokens per expert), any numeric dtype.
        placement: a `Placement` with the same L and E.
        policy: "hash", "weighted" or "balanced".
    """
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be an epmoe.eplb.Placement, got {type(placement).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    arr = as_load_array(load)
    if arr.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(f"load must have shape {(placement.num_layers, placement.num_experts)}, got {arr.shape}")
    if policy == "balanced":
        from .shares import optimal_rank_load

        return optimal_rank_load(arr, placement)
    phy2log, _, logcnt = placement.numpy()
    share = placement._share if policy == "weighted" else 1.0 / np.take_along_axis(logcnt, phy2log, axis=1)
    per_slot = np.take_along_axis(arr, phy2log, axis=1) * share
    return per_slot.reshape(placement.num_layers, placement.num_ranks, placement.num_local_slots).sum(axis=2)


def balancedness(load, placement: Placement, *, policy: str = "hash") -> np.ndarray:
    """Per-layer balancedness: mean over ranks of the rank load divided by the max rank load (1.0 = perfect).

    Rank loads are `rank_load(load, placement, policy=policy)`: by default ("hash") a rank's load is the sum over
    its slots of the slot's logical load divided by that expert's replica count. A layer with no load at all counts
    as perfectly balanced.

    Arguments:
        load: [L, E] logical load, any numeric dtype.
        placement: a `Placement` with the same L and E.
        policy: "hash", "weighted" or "balanced" (see `rank_load`).

    Returns:
        float64 numpy [L].
    """
    per_rank = rank_load(load, placement, policy=policy)
    peak = per_rank.max(axis=1)
    return np.where(peak > 0, per_rank.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)
