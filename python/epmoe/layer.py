"""The expert-parallel MoE layer: router GEMM -> fused routing -> replica choice -> dispatch -> grouped SwiGLU on
this rank's experts -> combine, plus shared experts computed while the dispatch is in flight. Balanced by EPLB."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from epmoe import _validate, balance, eplb, training
from epmoe.experts import experts_forward, fused_experts_forward, grouped_swiglu_experts
from epmoe.ops import route

__all__ = ["MoEConfig", "MoE"]


_SCORINGS = ("softmax", "sigmoid")
_MODES = ("exact", "capacity")


@dataclass
class MoEConfig:
    """Configuration of an `epmoe.MoE` layer.

    Routing as in `epmoe.route` (docs/semantics.md): `scoring`, `num_groups`/`topk_groups`, an optional fp32 correction
    bias (`use_bias`, selection only), `renormalize`, then `scaling_factor`. Shared experts are a dense SwiGLU MLP of
    `shared_intermediate_size` (default `moe_intermediate_size * num_shared_experts`) replicated on every rank.
    `num_redundant_experts` extra physical slots hold EPLB replicas of hot experts; `(num_experts +
    num_redundant_experts)` must be divisible by the EP size. Load is recorded over the last `eplb_window` forward
    calls; `eplb_interval > 0` rebalances automatically in every `eplb_interval`-th `sync_grads()` call (after the
    backward, never inside forward). `replica_policy` picks the copy of a replicated expert each (token, slot) goes
    to (`epmoe.eplb.map_to_physical`): "hash" (even split), "weighted" (the plan's replica shares) or "balanced" (the
    less-loaded copy for each batch; with EP the counts are exchanged over the layer's group); outputs do not depend
    on it.

    Training (docs/training.md): `dp_group` is an optional outer data-parallel group (the EP group is replicated
    across it); `bias_update_rate > 0` applies DeepSeek-V3's aux-loss-free bias update in `sync_grads()` (needs
    `use_bias`); `aux_loss` ("seq" | "global" | None) with `aux_loss_coeff` and `z_loss_coeff` set `MoE.aux_loss`
    after each training forward (`epmoe.balance`).
    """

    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    use_bias: bool = False
    renormalize: bool = True
    scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None
    dtype: torch.dtype = torch.float32
    exchange_mode: str = "exact"
    capacity: int | None = None
    num_redundant_experts: int = 0
    record_load: bool = True
    eplb_window: int = 16
    eplb_interval: int = 0
    replica_policy: str = "hash"
    dp_group: dist.ProcessGroup | None = None
    bias_update_rate: float = 0.0
    aux_loss: str | None = None
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0

    def __post_init__(self):
        balance.validate_config(self)  # training fields fail at construction; the rest in validate()

    def validate(self, num_ranks: int) -> None:
        """Raises ValueError naming the offending field."""
        for name in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "num_groups", "topk_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.scoring not in _SCORINGS:
            raise ValueError(f"MoEConfig.scoring must be one of {_SCORINGS}, got {self.scoring!r}")
        if self.replica_policy not in eplb.POLICIES:
            raise ValueError(f"MoEConfig.replica_policy must be one of {eplb.POLICIES}, got {self.replica_policy!r}")
        if self.exchange_mode not in _MODES:
            raise ValueError(f"MoEConfig.exchange_mode must be one of {_MODES}, got {self.exchange_mode!r}")
        if self.capacity is not None and (isinstance(self.capacity, bool) or not isinstance(self.capacity, int)
                                          or self.capacity < 0):
            raise ValueError(f"MoEConfig.capacity must be an int >= 0 (rows per rank pair) or None, got "
                             f"{self.capacity!r}")
        if self.exchange_mode == "capacity" and self.capacity is None:
            raise ValueError("MoEConfig.capacity must be given (rows per source/destination rank pair) when "
                             "exchange_mode='capacity'")
        if self.num_experts % self.num_groups != 0:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be divisible by num_groups ({self.num_groups})"
            )
        if self.topk_groups > self.num_groups:
            raise ValueError(f"MoEConfig.topk_groups ({self.topk_groups}) > num_groups ({self.num_groups})")
        candidates = self.topk_groups * self.num_experts // self.num_groups
        if self.top_k > candidates:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) > the {candidates} experts of the kept groups")
        if self.num_redundant_experts < 0:
            raise ValueError(f"MoEConfig.num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"MoEConfig.dtype must be float32, bfloat16 or float16, got {self.dtype}")
        balance.validate_config(self)
        num_slots = self.num_experts + self.num_redundant_experts
        if num_slots % num_ranks != 0:
            auto = eplb.num_redundant_auto(self.num_experts, num_ranks)
            raise ValueError(
                f"MoEConfig: num_experts + num_redundant_experts ({num_slots}) must be divisible by the EP size "
                f"({num_ranks}); num_redundant_experts={auto} would do"
            )

    @property
    def num_slots(self) -> int:
        return self.num_experts + self.num_redundant_experts

    @property
    def shared_size(self) -> int:
        if self.shared_intermediate_size is not None:
            return self.shared_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts


_MASK64 = (1 << 64) - 1


def derive_seed(base: int, kind: int, index: int) -> int:
    """A 63-bit seed for parameter group (kind, index) from a base seed (splitmix64 finaliser): kind 0 = the
    replicated parameters, kind 1 = logical expert `index`."""
    z = (base + 0x9E3779B97F4A7C15 * (1 + 2 * index + (kind << 40))) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def draw_base_seed(group: dist.ProcessGroup | None, generator: torch.Generator | None = None) -> int:
    """One int drawn from `generator` (default: the global CPU generator) on every rank; with a `group`, rank 0's
    value is broadcast, so initialisation depends on rank 0's RNG state only (collective)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64).item())
    if group is not None:
        box = [seed]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        seed = int(box[0])
    return seed


def placement_row(placement: eplb.Placement, row: int) -> eplb.Placement:
    """Layer `row` of an L-layer placement as a 1-layer placement (slots and replica shares)."""
    return eplb.Placement(placement.phy2log[row : row + 1], placement.num_experts, placement.num_ranks,
                          share=placement.share[row : row + 1])


class _SharedExperts(nn.Module):
    """Dense SwiGLU MLP (HF layout: gate_proj, up_proj, down_proj without bias), replicated on every rank. The
    weights are allocated uninitialised (`MoE.reset_parameters` draws them): nn.Linear's own init is skipped."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        # Built on meta (nn.Linear's init there costs nothing and draws nothing), then allocated on `device`.
        kwargs = dict(bias=False, dtype=dtype, device="meta")
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kwargs)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kwargs)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kwargs)
        if device.type != "meta":
            self.to_empty(device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _like_input(out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's output [T, H] in the shape and dtype of its input (no op when they match: decode runs it per
    layer and token)."""
    if out.dtype != hidden_states.dtype:
        out = out.to(hidden_states.dtype)
    return out if hidden_states.dim() == 2 else out.reshape(hidden_states.shape)


class MoE(nn.Module):
    """Expert-parallel MoE layer (gate + routed experts sharded over the EP group + shared experts).

    Each rank holds only the weights of its physical expert slots: `w13 [num_local_slots, 2I, H]` (gate rows then
    up rows) and `w2 [num_local_slots, H, I]`. Rank r owns slots `[r*P/R, (r+1)*P/R)` of the current EPLB placement
    (`self.placement`, P = num_experts + num_redundant_experts). The gate weight, the correction bias and the shared
    experts are replicated. Training: call `epmoe.sync_grads(model)` (or `sync_grads()`) after the backward; it
    averages the replicated gradients over the EP (and `dp_group`) ranks and gives every replica of an expert the
    sum of its replicas' gradients (docs/training.md). The layer's parameters are excluded from
    DistributedDataParallel, which must not touch them.

    With `process_group=None` and torch.distributed not initialized the layer runs in one process (EP size 1).
    `dp_group` (or `config.dp_group`): an outer data-parallel group over which the EP group is replicated.

    Construction allocates only this rank's slots, directly in `config.dtype` on `device` (None: the current
    default device, so `with torch.device("meta")` works), and initialises them with `reset_parameters()`; memory
    and time are proportional to the rank's share, not to E. On the meta device nothing is drawn and nothing is
    communicated; `to_empty(device=...)` then `reset_parameters()` gives the weights an eager build would.
    `placement`: start from this EPLB placement (one layer, or an L-layer placement whose row `layer_idx` is used);
    default: the plan for uniform load.

    forward(hidden_states [..., H]) -> [..., H] in hidden_states.dtype.
    """

    def __init__(self, config: MoEConfig, process_group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, *, layer_idx: int = 0,
                 placement: eplb.Placement | None = None, dp_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        if self.distributed:
            self.group = process_group if process_group is not None else dist.group.WORLD
            self.rank = dist.get_rank(self.group)
            self.num_ranks = dist.get_world_size(self.group)
        else:
            self.group, self.rank, self.num_ranks = None, 0, 1
        config.validate(self.num_ranks)
        self.config = dataclasses.replace(config)
        self.dp_group, self.dp_size = training.resolve_dp_group(self, dp_group)
        self.layer_idx = layer_idx
        cfg = self.config
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.num_local_slots = cfg.num_slots // self.num_ranks
        # None = the current default device (honours `with torch.device(...)`), resolved once for every tensor.
        device = torch.empty(0, device=device).device

        # Placement: host-side numpy, never on `device` (so meta construction works). Default: the plan for uniform
        # load (replicas spread over ranks).
        if placement is None:
            uniform = torch.ones(1, cfg.num_experts, dtype=torch.float64, device="cpu")
            placement = eplb.plan(uniform, cfg.num_slots, self.num_ranks)
        self.placement = self._layer_placement(placement)

        # Only this rank's slots are allocated, directly in cfg.dtype on `device`; nothing is initialised here
        # except by reset_parameters (skipped on meta: no RNG drawn, no collective).
        self.gate_weight = nn.Parameter(torch.empty(cfg.num_experts, hidden, dtype=torch.float32, device=device))
        if cfg.use_bias:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(cfg.num_experts, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None
        self.w13 = nn.Parameter(torch.empty(self.num_local_slots, 2 * inter, hidden, dtype=cfg.dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(self.num_local_slots, hidden, inter, dtype=cfg.dtype, device=device))
        self.shared_experts = (_SharedExperts(hidden, cfg.shared_size, cfg.dtype, device)
                               if cfg.shared_size > 0 else None)

        self.ep = None
        if self.distributed:
            from epmoe.ep import EPGroup

            self.ep = EPGroup(self.group)
        self.recorder = None
        self.aux_loss: torch.Tensor | None = None  # the enabled balance terms of the last training forward
        self.router_logits_probe: nn.Module | None = None  # identity on the fp32 router logits, for forward hooks
        training.attach(self)
        if device.type == "meta":
            self._install_placement(self.placement)
        else:
            self.reset_parameters()  # installs the placement on `device`

    def _layer_placement(self, placement: eplb.Placement) -> eplb.Placement:
        """The 1-layer placement of this layer: `placement` itself, or row `layer_idx` of an L-layer placement.
        Raises ValueError naming the field that disagrees with the config or the EP group."""
        if not isinstance(placement, eplb.Placement):
            raise TypeError(f"placement must be an epmoe.eplb.Placement, got {type(placement).__name__}")
        cfg = self.config
        for field, got, expected, meaning in (
                ("num_experts", placement.num_experts, cfg.num_experts, "the config's num_experts"),
                ("num_slots", placement.num_slots, cfg.num_slots, "num_experts + num_redundant_experts"),
                ("num_ranks", placement.num_ranks, self.num_ranks, "the EP size")):
            if got != expected:
                raise ValueError(f"placement.{field} is {got}, expected {expected} ({meaning})")
        if placement.num_layers == 1:
            return placement
        if not 0 <= self.layer_idx < placement.num_layers:
            raise ValueError(f"placement has {placement.num_layers} layers, no row for layer_idx={self.layer_idx}")
        return placement_row(placement, self.layer_idx)

    def _install_placement(self, placement: eplb.Placement) -> None:
        """Makes `placement` current: routing maps on the layer's device, load recorder restarted (slot ids changed
        meaning)."""
        device = self.gate_weight.device
        self.placement = placement
        self._log2phy = placement.log2phy[0].to(device)
        self._logcnt = placement.logcnt[0].to(device)
        if self.recorder is None or self.recorder.device != device:
            self.recorder = eplb.LoadRecorder(1, self.config.num_slots, self.config.eplb_window, device=device)
        self.recorder.reset()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), to_empty() and the like: the routing maps and the load recorder follow the parameters
        # (rebuilt from the host-side placement, so they are right even after to_empty). `.to(dtype)` / `.half()`
        # convert the weights and config.dtype follows them; the correction bias stays float32 (a selection
        # statistic that the bias update changes in small steps).
        bias = self.e_score_correction_bias
        out = super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = bias.to(moved.device, torch.float32)
        self.config.dtype = self.w13.dtype
        if self._log2phy.device != self.gate_weight.device:
            self._install_placement(self.placement)
        return out

    def extra_repr(self) -> str:
        cfg = self.config
        policy = getattr(cfg, "replica_policy", "hash")
        return (f"num_experts={cfg.num_experts}, top_k={cfg.top_k}, hidden_size={cfg.hidden_size}, "
                f"moe_intermediate_size={cfg.moe_intermediate_size}, ep_size={self.num_ranks}, ep_rank={self.rank}, "
                f"num_local_slots={self.num_local_slots}, num_redundant_experts={cfg.num_redundant_experts}, "
                f"dtype={_validate.dtype_name(cfg.dtype)}, exchange_mode={cfg.exchange_mode!r}, "
                f"replica_policy={policy!r}, layer_idx={self.layer_idx}")

    # ---- parameters

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialises all weights, EP-size invariant and seed safe (collective over the EP and DP groups).

        One base seed is drawn from `generator` (default: torch's global CPU generator) on EP rank 0 and broadcast
        (then from DP rank 0 over the DP group);
        logical expert e is drawn from its own generator seeded with `derive_seed(base, 1, e)` and the replicated
        parameters (gate, shared experts) from `derive_seed(base, 0, 0)`. So with the same seed on rank 0, every
        EP size and placement holds exactly the weights of the single-process layer, whatever the other ranks'
        RNG states, and no rank draws an expert it does not hold. Values are drawn in fp32 on the CPU, then cast.

        On the meta device there is nothing to draw: it returns at once (no RNG, no collective). After
        `to_empty(device=...)` it draws exactly the weights an eager build would, and reinstalls the routing maps and
        the load recorder on the new device.
        """
        if self.gate_weight.is_meta:
            return
        cfg = self.config
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        base = draw_base_seed(self.group if self.distributed else None, generator)
        if self.dp_group is not None:  # every replica of the EP group starts from DP rank 0's seed
            base = training.broadcast_seed(base, self.dp_group)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(derive_seed(base, 0, 0))
            self.gate_weight.copy_(torch.randn(cfg.num_experts, hidden, generator=gen).mul_(hidden**-0.5))
            if self.e_score_correction_bias is not None:
                self.e_score_correction_bias.zero_()
            if self.shared_experts is not None:
                for lin in (self.shared_experts.gate_proj, self.shared_experts.up_proj, self.shared_experts.down_proj):
                    fan_in = lin.weight.shape[1]
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen).mul_(fan_in**-0.5))
            drawn: dict[int, int] = {}  # logical expert -> first local slot holding it (replicas copy it)
            for slot, expert in enumerate(self.local_slot_experts().tolist()):
                if expert in drawn:
                    self.w13[slot].copy_(self.w13[drawn[expert]])
                    self.w2[slot].copy_(self.w2[drawn[expert]])
                    continue
                drawn[expert] = slot
                # One expert at a time in fp32 on the CPU: the temporary is one expert, whatever E is.
                gen = torch.Generator().manual_seed(derive_seed(base, 1, expert))
                self.w13[slot].copy_(torch.randn(2 * inter, hidden, generator=gen).mul_(hidden**-0.5))
                self.w2[slot].copy_(torch.randn(hidden, inter, generator=gen).mul_(inter**-0.5))
        self._install_placement(self.placement)

    def local_slot_experts(self) -> torch.Tensor:
        """int64 [num_local_slots]: the logical expert held by each of this rank's slots."""
        start = self.rank * self.num_local_slots
        return self.placement.phy2log[0, start : start + self.num_local_slots]

    @torch.no_grad()
    def load_logical_experts(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copies this rank's slots from full logical weights w13 [E, 2I, H], w2 [E, H, I]."""
        cfg = self.config
        if tuple(w13.shape) != (cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size):
            raise ValueError(f"w13 must have shape [num_experts, 2*I, H], got {tuple(w13.shape)}")
        if tuple(w2.shape) != (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size):
            raise ValueError(f"w2 must have shape [num_experts, H, I], got {tuple(w2.shape)}")
        experts = self.local_slot_experts().to(w13.device)
        self.w13.copy_(w13.index_select(0, experts))
        self.w2.copy_(w2.index_select(0, experts.to(w2.device)))

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters held in full by every rank: all but `w13`/`w2` (gate, shared experts, and the correction bias
        if it was made a Parameter)."""
        return [p for name, p in self.named_parameters() if name not in ("w13", "w2")]

    # ---- training (epmoe.training): gradient contract, safe-point rebalancing, bias update

    def sync_grads(self, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """`epmoe.sync_grads` for this layer alone (collective over its EP and DP groups); see docs/training.md."""
        training.sync_grads(self, optimizer=optimizer)

    def update_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free update of the correction bias from the tokens routed since the last update
        (collective; `sync_grads` calls it when `bias_update_rate > 0`)."""
        balance.update_bias(self)

    # ---- state dict: experts are keyed by logical id, so a checkpoint loads at any EP size and placement
    #
    # Keys: the replicated tensors under their own names, and `experts.{e}.gate_up_proj` [2I, H] /
    # `experts.{e}.down_proj` [H, I] for every logical expert e this rank holds (once, from its first local slot;
    # the values are views of the slot). Replicas are bitwise identical, so the same key on several ranks holds
    # the same tensor: torch.distributed.checkpoint writes it once, and loads it into every rank that asks for it.
    # Loading fills every local slot of e from `experts.{e}.*`; experts of other ranks in the dict are ignored.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "w13", None)
        destination.pop(prefix + "w2", None)
        seen = set()
        for slot, expert in enumerate(self.local_slot_experts().tolist()):
            if expert in seen:
                continue  # a second local replica: same values
            seen.add(expert)
            w13, w2 = self.w13[slot], self.w2[slot]
            destination[f"{prefix}experts.{expert}.gate_up_proj"] = w13 if keep_vars else w13.detach()
            destination[f"{prefix}experts.{expert}.down_proj"] = w2 if keep_vars else w2.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expert_keys = {k for k in state_dict if k.startswith(prefix + "experts.")}
        # load_state_dict(assign=True) into a layer built on meta: the slots are allocated from the checkpoint's
        # tensors (their dtype and device) instead of being copied into meta storage, which keeps nothing.
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        experts = self.local_slot_experts().tolist()
        with torch.no_grad():
            for name, attr in (("gate_up_proj", "w13"), ("down_proj", "w2")):
                param = getattr(self, attr)
                values = []
                for expert in experts:
                    key = f"{prefix}experts.{expert}.{name}"
                    value = state_dict.get(key)
                    if value is None:
                        missing_keys.append(key)
                    elif tuple(value.shape) != tuple(param.shape[1:]):
                        error_msgs.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(param.shape[1:])}")
                        value = None
                    values.append(value)
                if assign and param.is_meta:
                    if all(v is not None for v in values):
                        setattr(self, attr, nn.Parameter(torch.stack(values), requires_grad=param.requires_grad))
                    continue
                for slot, value in enumerate(values):
                    if value is not None:
                        param[slot].copy_(value)
        # Experts held by other ranks are expected in a merged checkpoint: not unexpected here.
        filtered = {k: v for k, v in state_dict.items() if k not in expert_keys}
        super()._load_from_state_dict(filtered, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in ("w13", "w2"):
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        if self._log2phy.device != self.gate_weight.device:  # assigned tensors on another device
            self._install_placement(self.placement)

    # ---- forward

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits float32 [T, E]: the gate GEMM in fp32 whatever the weights' dtype (the
        `router_logits_probe` module, if set, sees them: transformers' `output_router_logits` records them there)."""
        if torch.is_grad_enabled():
            self._grad_forward = True  # a backward may follow: sync_grads treats changed gradients as new ones
        weight = self._parameters["gate_weight"]
        logits = F.linear(x if x.dtype == torch.float32 else x.float(),
                          weight if weight.dtype == torch.float32 else weight.float())
        probe = self.router_logits_probe
        return logits if probe is None else probe(logits)

    def route(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router GEMM in fp32 (or the given `logits` [T, E]) then fused routing. x [T, H] -> (topk_weights fp32
        [T,k], topk_idx int32 [T,k]) with logical expert ids."""
        cfg = self.config
        logits = self.router_logits(x) if logits is None else logits
        bias = self.e_score_correction_bias
        return route(
            logits,
            cfg.top_k,
            scoring=cfg.scoring,
            num_groups=cfg.num_groups,
            topk_groups=cfg.topk_groups,
            bias=None if bias is None else bias.float(),
            renormalize=cfg.renormalize,
            scaling_factor=cfg.scaling_factor,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # Input checks (docs/errors.md): any strides are accepted; other dtypes are not cast silently. At decode this
        # runs per layer and token with cold caches: the cheap tests first, the checks with messages on a failure.
        device = self._parameters["gate_weight"].device
        if (not isinstance(hidden_states, torch.Tensor) or hidden_states.dtype not in _validate.FLOAT_DTYPES
                or hidden_states.dim() == 0 or hidden_states.shape[-1] != cfg.hidden_size or hidden_states.is_meta
                or hidden_states.device != device):
            self._check_input(hidden_states, device)
        shape = hidden_states.shape
        x = hidden_states if len(shape) == 2 else hidden_states.reshape(-1, cfg.hidden_size)
        if self._log2phy.device != device:  # the module was moved after the placement was installed
            self._install_placement(self.placement)
        if not torch.is_grad_enabled() and not self.distributed and (not self.training or not balance.enabled(cfg)):
            out = self._forward_inference(x)
            if out is not None:
                if self.aux_loss is not None:
                    self.aux_loss = None
                return _like_input(out, hidden_states)
        logits = self.router_logits(x)
        topk_weights, topk_idx = self.route(x, logits)
        # Balance losses and the bias-update counts see training forwards only (epmoe.balance).
        self.aux_loss = balance.after_routing(self, logits, topk_idx, shape[:-1]) if self.training else None
        # Replica choice by cfg.replica_policy; for the hashes the rank salts the token index so ranks spread
        # differently, "balanced" exchanges the counts over the EP group.
        slot_idx = eplb.map_to_physical(topk_idx, self.placement, self.layer_idx, token_offset=self.rank << 24,
                                        policy=cfg.replica_policy, group=self.group)
        if cfg.record_load:
            self.recorder.record(0, slot_idx)
            self.recorder.step()
        x_in = x.to(self.w13.dtype)  # the compute dtype follows the module (.to(dtype)), not a stale config

        if not self.distributed:
            fused_shared = self._fused_shared_weights(x_in)
            if fused_shared is not None:  # inference: routed and shared experts in one op
                out = fused_experts_forward(x_in, slot_idx, topk_weights, self.w13, self.w2, shared=fused_shared)
                return out.to(hidden_states.dtype).reshape(shape)
            routed = experts_forward(x_in, slot_idx, topk_weights, self.w13, self.w2)
            shared = self.shared_experts(x_in) if self.shared_experts is not None else None
        else:
            work = self.ep.dispatch(
                x_in, slot_idx, topk_weights, cfg.num_slots, mode=cfg.exchange_mode, capacity=cfg.capacity,
                async_op=True,
            )
            # Shared experts run while the tokens are in flight.
            shared = self.shared_experts(x_in) if self.shared_experts is not None else None
            dispatched = work.wait()
            expert_out = grouped_swiglu_experts(dispatched.recv_x, dispatched.expert_offsets, self.w13, self.w2)
            routed = self.ep.combine(expert_out, dispatched.handle)
        # In place: `routed` is a fresh tensor no autograd node saved, and a new [T, H] buffer costs page faults.
        out = routed if shared is None else routed.add_(shared)
        return _like_input(out, hidden_states)

    def _check_input(self, hidden_states, device: torch.device) -> None:
        """Raises the error for a `hidden_states` that forward's quick test rejected (`device`: the parameters')."""
        cfg = self.config
        _validate.check_tensor("hidden_states", hidden_states, dtypes=_validate.FLOAT_DTYPES)
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != cfg.hidden_size:
            raise ValueError(f"hidden_states must have shape [..., {cfg.hidden_size}] (hidden_size), got "
                             f"{list(hidden_states.shape)}")
        if hidden_states.is_meta:
            raise ValueError("hidden_states is on the meta device: MoE.forward routes real tokens, so it needs data "
                             "(materialise the layer and the input first)")
        _validate.check_tensor("hidden_states", hidden_states, device=device, like="the layer's parameters")

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """The one-process inference forward (grad mode off; eval mode, or training without balance terms): the
        router GEMM, then routing, replica choice, load count and experts in one op (`torch.ops.epmoe.
        fused_moe_forward`: the general path's ops in its order, so the same result bit for bit, without three
        Python calls and dispatches that at decode cost more than the routing they run). x [T, H] -> [T, H] in the
        compute dtype; None where it does not apply (a non-hash replica policy, wrapped or hooked shared experts):
        then the general path runs."""
        cfg = self.config
        if cfg.replica_policy != "hash":
            return None
        shared = self._fused_shared_weights(x)
        if shared is None:
            return None
        params = self._parameters
        out = torch.ops.epmoe.fused_moe_forward(
            x, self.router_logits(x), cfg.top_k, cfg.scoring, cfg.num_groups, cfg.topk_groups,
            self.e_score_correction_bias, cfg.renormalize, cfg.scaling_factor, self._log2phy, self._logcnt,
            self.rank << 24, self.layer_idx, params["w13"], params["w2"],
            self.recorder.counts(0) if cfg.record_load else None, *(shared or (None,) * 3))
        if cfg.record_load:
            self.recorder.step()
        return out

    def _fused_shared_weights(self, x: torch.Tensor) -> tuple | None:
        """(gate, up, down) weights of the shared experts when the forward may run them inside the fused inference
        op: no autograd wanted, and the shared experts are this layer's own plain linear layers with no hooks (their
        own or global ones: nothing that wraps or observes them is bypassed). () when there are none; None
        otherwise. Runs at every decode step: dictionary lookups rather than nn.Module attribute access."""
        grad = torch.is_grad_enabled()
        if grad and (x.requires_grad or self.w13.requires_grad or self.w2.requires_grad):
            return None
        se = self.shared_experts
        if se is None:
            return ()
        if (type(se) is not _SharedExperts or se._forward_hooks or se._forward_pre_hooks
                or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks):
            return None
        weights = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = se._modules.get(name)
            if (type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks
                    or lin._parameters.get("bias") is not None):
                return None
            weight = lin._parameters["weight"]
            if grad and weight.requires_grad:
                return None
            weights.append(weight)
        return tuple(weights)

    @classmethod
    def from_hf(cls, block: nn.Module, process_group: dist.ProcessGroup | None = None, **kwargs) -> MoE:
        """Builds the EP layer from a transformers MoE block (DeepseekV2/V3, Qwen3-MoE, Mixtral), copying its
        weights; each rank keeps only its experts. kwargs: see `epmoe.integrations.transformers.moe_from_hf`."""
        from epmoe.integrations.transformers import moe_from_hf

        return moe_from_hf(block, process_group, **kwargs)

    # ---- EPLB (epmoe.training moves weights, gradients and optimizer state at safe points)

    @torch.no_grad()
    def rebalance(self, *, optimizer: torch.optim.Optimizer | None = None, max_moves: int | None = None,
                  extra_tensors: list[torch.Tensor] | None = None) -> dict:
        """Plans a new placement from the recorded load window (summed over the EP and DP groups) and moves the
        expert weights there, with their `.grad` and the optimizer's per-slot state: outputs and the next optimizer
        step are unchanged, only where experts live changes. Collective over the EP (and DP) group. Call it between
        steps or between backward and `optimizer.step()`, never between a forward and its backward.

        Arguments:
            optimizer: an optimizer holding `w13`/`w2` (or a list of them) whose per-slot state (every state tensor
                whose first dimension is the local slot, e.g. Adam's exp_avg/exp_avg_sq) moves with the weights.
                Optimizers that already stepped these parameters are found automatically.
            max_moves: repair the current placement with at most this many slot changes instead of planning afresh.
            extra_tensors: other per-slot tensors to move (first dimension = local slot).

        Returns:
            dict with "balancedness_before", "balancedness_after" (mean/max of per-rank load on the recorded
            window) and "bytes_moved" (sent by this rank).
        """
        return training.rebalance_layers([self], optimizer=optimizer, max_moves=max_moves,
                                         extra_tensors=extra_tensors)[0]

    @torch.no_grad()
    def apply_placement(self, placement: eplb.Placement, *, optimizer: torch.optim.Optimizer | None = None,
                        extra_tensors: list[torch.Tensor] | None = None) -> dict:
        """Moves the experts (weights, `.grad`, optimizer state, `extra_tensors`) to `placement`, as `rebalance`
        does (collective). `placement` has one layer, or several of which row `layer_idx` is taken.

        Returns:
            dict with "bytes_moved" (sent by this rank).
        """
        return training.apply_placement(self, placement, optimizer=optimizer, extra_tensors=extra_tensors)
