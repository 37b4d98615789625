"""`from_pretrained`: a transformers MoE checkpoint loaded expert-parallel, each rank reading only its experts.

Steps (every rank): config from the folder; the model skeleton on the meta device (no memory); every supported MoE
block replaced by an `epmoe.MoE` built on meta; a read plan (checkpoint name, shape) for every tensor the rank
needs, validated against the safetensors headers; one collective so that an error on any rank raises on every
rank before anything is allocated; then the reads: non-expert tensors in full, expert tensors only for this
rank's slots (one read per distinct expert; a replica slot copies it), rows of the fused 3-D tensors through
`safe_open(...).get_slice`. Non-persistent buffers (rotary `inv_freq`) are recomputed as transformers does.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from epmoe import eplb, training
from epmoe._logging import get_logger
from epmoe.integrations.hf_checkpoint import (
    REPLICATED_NAMES,
    CheckpointFiles,
    HubBlockNames,
    hub_block_names,
    remember_hf_block,
    tensor_at,
)
from epmoe.integrations.transformers import SUPPORTED_BLOCKS, install_router_logits_probe, moe_config_from_hf
from epmoe.layer import MoE, placement_row

__all__ = ["from_pretrained", "find_moe_blocks", "load_placement"]

logger = get_logger("epmoe.integrations.transformers")  # rank-prefixed records

_MOE_LIKE = re.compile(r"(MoE|Moe|MoeBlock|SparseMoeBlock)$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_MAX_READ = 1 << 30  # bytes of fused expert rows read at once
_ERROR_TYPES = {t.__name__: t for t in (ValueError, TypeError, KeyError, NotImplementedError, FileNotFoundError)}


def _ep_group(process_group):
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        group = process_group if process_group is not None else dist.group.WORLD
        return group, dist.get_rank(group), dist.get_world_size(group)
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1:  # torchrun started several ranks, each about to load everything
        logger.warning("from_pretrained: WORLD_SIZE=%s but torch.distributed is not initialised, so this process "
                       "loads every expert (EP size 1); call torch.distributed.init_process_group() first to load "
                       "expert-parallel", launched)
    return None, 0, 1


def raise_on_every_rank(error: BaseException | None, group, what: str) -> None:
    """Collective: if any rank of `group` has an `error`, raises on every rank (the error of the lowest failing
    rank, re-raised as the same built-in type on the others). No-op without a group."""
    if group is None:
        if error is not None:
            raise error
        return
    box: list = [None] * dist.get_world_size(group)
    mine = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(box, mine, group=group)
    for rank, report in enumerate(box):
        if report is None:
            continue
        if error is not None and rank == dist.get_rank(group):
            raise error
        raise _ERROR_TYPES.get(report[0], RuntimeError)(f"{what} failed on EP rank {rank}: {report[1]}")


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE block epmoe replaces, in model order. Raises ValueError naming the block type
    of any other MoE block (a class named *MoE / *Moe / *SparseMoeBlock, or holding a fused 3-D `experts`), and
    when there is none."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{prefix}.") for prefix, _ in found):
            continue
        kind = type(module).__name__
        if kind in SUPPORTED_BLOCKS:
            found.append((name, module))
            continue
        experts = getattr(module, "experts", None)
        fused = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        if _MOE_LIKE.search(kind) or fused:
            raise ValueError(f"unsupported MoE block {kind} at {name!r}; epmoe supports {', '.join(SUPPORTED_BLOCKS)}")
    if not found:
        raise ValueError(f"model {type(model).__name__} has no MoE block (supported: {', '.join(SUPPORTED_BLOCKS)})")
    return found


def load_placement(placement, num_experts: int, num_ranks: int) -> eplb.Placement | None:
    """`placement` as an `eplb.Placement`: a Placement, a JSON file path (`epmoe plan -o`, `Placement.save`, or
    SGLang's `physical_to_logical_map` file) or such a dict; None stays None."""
    if placement is None or isinstance(placement, eplb.Placement):
        return placement
    if isinstance(placement, dict):
        return eplb.Placement.from_json_dict(placement, num_experts=num_experts, num_ranks=num_ranks)
    if isinstance(placement, (str, Path)):
        return eplb.Placement.load(placement, num_experts=num_experts, num_ranks=num_ranks)
    raise TypeError(f"placement must be an eplb.Placement, a JSON file path or a dict, got {type(placement).__name__}")


def _layer_rows(placement: eplb.Placement, blocks, num_hidden_layers: int | None) -> list[int]:
    """Row of `placement` for each MoE block: one row per MoE layer, or (SGLang) one per decoder layer."""
    if placement.num_layers == len(blocks):
        return list(range(len(blocks)))
    if placement.num_layers == num_hidden_layers:
        rows = []
        for name, _ in blocks:
            match = _LAYER_INDEX.search(f".{name}.")
            if match is None:
                raise ValueError(f"cannot tell the decoder layer of MoE block {name!r} to pick its placement row")
            rows.append(int(match.group(1)))
        return rows
    raise ValueError(f"placement has {placement.num_layers} layers; the model has {len(blocks)} MoE layers "
                     f"({num_hidden_layers} decoder layers)")


@dataclass
class _Target:
    """A tensor of the model to fill from the checkpoint: where it lives (every alias) and what to read."""

    ckpt_name: str
    owners: list[tuple[nn.Module, str]]
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    is_param: bool


@dataclass
class _ExpertPlan:
    """How one MoE layer's expert weights are read on this rank."""

    moe: MoE
    names: HubBlockNames
    replicated: list[tuple[str, str]]  # (attribute path in the MoE, checkpoint name)
    prefix: str = ""  # the block prefix the checkpoint's expert tensors use
    fused: bool = False  # fused 3-D layout, else per expert
    slots_of: dict[int, list[int]] = field(default_factory=dict)  # distinct local expert -> its local slots


def _first_present(files: CheckpointFiles, candidates) -> str | None:
    return next((name for name in candidates if name in files), None)


def _check_shape(files: CheckpointFiles, name: str, expected: tuple[int, ...]) -> None:
    got = files.info(name).shape
    if got != tuple(expected):
        raise ValueError(f"checkpoint tensor {name!r} has shape {list(got)}, expected {list(expected)}")


def _resolve_dtype(torch_dtype, config, files: CheckpointFiles) -> torch.dtype:
    """transformers' rule: an explicit dtype, else ("auto") the config's, else the checkpoint's first float."""
    dtype = torch_dtype if torch_dtype is not None else "auto"
    if dtype == "auto":
        dtype = getattr(config, "dtype", None)
        if dtype is None:
            for name in files.weight_map:
                stored = files.info(name).dtype
                if stored.is_floating_point:
                    dtype = stored
                    break
            else:
                dtype = torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"torch_dtype must be a torch.dtype, a dtype name or 'auto', got {dtype!r}")
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def _resolve_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, (dict, list)) or device_map == "auto":
        raise ValueError(f"device_map must name one device (e.g. 'cuda:0' or an index), got {device_map!r}: every "
                         f"rank keeps its whole share on one device")
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def _build_skeleton(files: CheckpointFiles, torch_dtype, model_kwargs: dict):
    import transformers

    device = _resolve_device(model_kwargs.pop("device_map", None))
    dtype_kw = model_kwargs.pop("dtype", None)
    if dtype_kw is not None and torch_dtype is not None and dtype_kw != torch_dtype:
        raise ValueError(f"torch_dtype={torch_dtype!r} and dtype={dtype_kw!r} disagree; pass one of them")
    torch_dtype = torch_dtype if torch_dtype is not None else dtype_kw
    config, model_kwargs = transformers.AutoConfig.from_pretrained(
        str(files.folder), return_unused_kwargs=True, **model_kwargs)
    if getattr(config, "quantization_config", None):
        method = config.quantization_config.get("quant_method", "?") if isinstance(
            config.quantization_config, dict) else type(config.quantization_config).__name__
        raise NotImplementedError(f"quantized checkpoints ({method}) are not supported: epmoe loads float weights")
    dtype = _resolve_dtype(torch_dtype, config, files)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
    model.config.name_or_path = str(files.folder)
    return model, device


def _check_block(name: str, block: nn.Module) -> None:
    shared = getattr(block, "shared_experts", None)
    if shared is not None and any(getattr(shared, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(f"MoE block {name!r}: shared experts with biases are unsupported")


def _plan_model_tensors(model: nn.Module, files: CheckpointFiles, moes: set[int]) -> tuple[list[_Target], list]:
    """The non-MoE tensors to read (aliases of one tensor grouped, so tied weights stay tied) and the modules whose
    non-persistent buffers must be recomputed."""
    groups: dict[int, _Target] = {}
    names: dict[int, list[str]] = {}
    recompute = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in moes:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        entries = [(n, t, True) for n, t in module._parameters.items() if t is not None]
        entries += [(n, t, False) for n, t in module._buffers.items() if t is not None]
        if any(n in module._non_persistent_buffers_set for n, _, is_param in entries if not is_param):
            recompute.append(module)
        for attr, tensor, is_param in entries:
            if not is_param and attr in module._non_persistent_buffers_set:
                continue
            target = groups.get(id(tensor))
            if target is None:
                target = groups[id(tensor)] = _Target("", [], tuple(tensor.shape), tensor.dtype,
                                                      bool(getattr(tensor, "requires_grad", False)), is_param)
                names[id(tensor)] = []
            target.owners.append((module, attr))
            names[id(tensor)].append(prefix + attr)
    targets = []
    for key, target in groups.items():
        found = _first_present(files, names[key])
        if found is None:
            raise ValueError(f"checkpoint lacks the tensor {names[key][0]!r}")
        _check_shape(files, found, target.shape)
        target.ckpt_name = found
        targets.append(target)
    return targets, recompute


def _plan_experts(name: str, block_type: str, moe: MoE, files: CheckpointFiles) -> _ExpertPlan:
    names = hub_block_names(block_type, name)
    cfg = moe.config
    hidden, inter, num_experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    replicated = []
    for attr, suffix in REPLICATED_NAMES:
        if tensor_at(moe, attr) is None:  # no correction bias / no shared experts
            continue
        found = _first_present(files, [f"{prefix}.{suffix}" for prefix in names.prefixes])
        if found is None:
            raise ValueError(f"checkpoint lacks the tensor {names.hub_prefix + '.' + suffix!r}")
        _check_shape(files, found, tuple(tensor_at(moe, attr).shape))
        replicated.append((attr, found))
    plan = _ExpertPlan(moe, names, replicated)
    for slot, expert in enumerate(moe.local_slot_experts().tolist()):
        plan.slots_of.setdefault(expert, []).append(slot)
    for prefix in names.prefixes:
        gate_up, down = names.fused(prefix)
        if (gate_up in files) != (down in files):
            present, absent = (gate_up, down) if gate_up in files else (down, gate_up)
            raise ValueError(f"checkpoint has the fused expert tensor {present!r} but lacks {absent!r}")
        if gate_up in files and down in files:
            _check_shape(files, gate_up, (num_experts, 2 * inter, hidden))
            _check_shape(files, down, (num_experts, hidden, inter))
            plan.prefix, plan.fused = prefix, True
            return plan
    prefix = next((p for p in names.prefixes if names.per_expert(p, 0)[0] in files), None)
    if prefix is None:
        raise ValueError(f"checkpoint has no expert weights for the MoE block {name!r} (looked for "
                         f"{names.fused(names.prefixes[0])[0]!r} and {names.per_expert(names.hub_prefix, 0)[0]!r})")
    plan.prefix = prefix
    for expert in range(num_experts):  # every rank checks every name: a missing expert fails everywhere
        for tensor_name in names.per_expert(prefix, expert):
            if tensor_name not in files:
                raise ValueError(f"checkpoint lacks the expert tensor {tensor_name!r}")
    for expert in plan.slots_of:  # shapes from the headers of the shards this rank reads
        gate, up, down = names.per_expert(prefix, expert)
        _check_shape(files, gate, (inter, hidden))
        _check_shape(files, up, (inter, hidden))
        _check_shape(files, down, (hidden, inter))
    return plan


def _expert_bytes_total(plan: _ExpertPlan, files: CheckpointFiles) -> int:
    cfg = plan.moe.config
    if plan.fused:
        return sum(files.info(n).nbytes for n in plan.names.fused(plan.prefix))
    gate, _, _ = plan.names.per_expert(plan.prefix, next(iter(plan.slots_of)))
    per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * files.info(gate).dtype.itemsize
    return per_expert * cfg.num_experts


@torch.no_grad()
def _read_experts(plan: _ExpertPlan, files: CheckpointFiles) -> int:
    """Fills the MoE's slots; returns the expert bytes read (each distinct expert once)."""
    moe, inter = plan.moe, plan.moe.config.moe_intermediate_size
    nbytes = 0

    def fill(expert: int, gate_up: torch.Tensor | None, gate=None, up=None, down=None) -> None:
        first, *others = plan.slots_of[expert]
        if gate_up is not None:
            moe.w13[first].copy_(gate_up)
        else:
            moe.w13[first, :inter].copy_(gate)
            moe.w13[first, inter:].copy_(up)
        moe.w2[first].copy_(down)
        for slot in others:
            moe.w13[slot].copy_(moe.w13[first])
            moe.w2[slot].copy_(moe.w2[first])

    experts = sorted(plan.slots_of)
    if plan.fused:
        gate_up_name, down_name = plan.names.fused(plan.prefix)
        # Runs of consecutive experts, one row-range read per run and tensor; a run touches about _MAX_READ bytes
        # of the mapping at most.
        longest = max(1, _MAX_READ // (moe.w13[0].nbytes + moe.w2[0].nbytes))
        runs, start = [], 0
        for i in range(1, len(experts) + 1):
            if i == len(experts) or experts[i] != experts[i - 1] + 1 or i - start == longest:
                runs.append((experts[start], experts[i - 1] + 1))
                start = i
        for lo, hi in runs:
            gate_up, down = files.read_rows(gate_up_name, lo, hi), files.read_rows(down_name, lo, hi)
            nbytes += gate_up.nbytes + down.nbytes
            for expert in range(lo, hi):
                fill(expert, gate_up[expert - lo], down=down[expert - lo])
            del gate_up, down
        return nbytes
    for expert in experts:
        gate, up, down = (files.read(n) for n in plan.names.per_expert(plan.prefix, expert))
        nbytes += gate.nbytes + up.nbytes + down.nbytes
        fill(expert, None, gate, up, down)
    return nbytes


@torch.no_grad()
def _materialize(model, targets, recompute, plans, files, device) -> tuple[int, int]:
    """Allocates and fills every tensor on `device`; returns (expert bytes read, other bytes read)."""
    for module in recompute:  # rotary inv_freq & co.: placeholders, then transformers' own init computes them
        for attr in module._non_persistent_buffers_set:
            buf = module._buffers.get(attr)
            if buf is not None:
                module._buffers[attr] = torch.empty_like(buf, device=device)
        model._init_weights(module)
    other_bytes = 0
    for target in targets:
        src = files.read(target.ckpt_name)
        other_bytes += src.nbytes
        value = torch.empty(target.shape, dtype=target.dtype, device=device).copy_(src)
        del src
        if target.is_param:
            value = nn.Parameter(value, requires_grad=target.requires_grad)
        for module, attr in target.owners:
            (module._parameters if target.is_param else module._buffers)[attr] = value
    expert_bytes = 0
    for plan in plans:
        moe = plan.moe
        moe.to_empty(device=device)
        for attr, ckpt_name in plan.replicated:
            src = files.read(ckpt_name)
            other_bytes += src.nbytes
            tensor_at(moe, attr).copy_(src)
        expert_bytes += _read_experts(plan, files)  # (to_empty moved the routing maps and the recorder too)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"from_pretrained left tensors unloaded (meta): {left[:5]}")
    return expert_bytes, other_bytes


def _layer_placements(model, blocks, num_experts: int, world: int, num_redundant_experts, placement):
    """(num_redundant_experts, [1-layer Placement or None per block]) from the arguments of from_pretrained."""
    layout = load_placement(placement, num_experts, world)
    if layout is None:
        if num_redundant_experts == "auto":
            num_redundant_experts = eplb.num_redundant_auto(num_experts, world)
        return num_redundant_experts, [None] * len(blocks)
    for attr, got, expected in (("num_experts", layout.num_experts, num_experts), ("num_ranks", layout.num_ranks,
                                                                                    world)):
        if got != expected:
            raise ValueError(f"placement.{attr} is {got}, expected {expected} (the model's experts per layer and "
                             f"the EP size are {num_experts} and {world})")
    rows = _layer_rows(layout, blocks, getattr(model.config, "num_hidden_layers", None))
    from_plan = layout.num_slots - num_experts
    if num_redundant_experts not in (0, from_plan):
        raise ValueError(f"num_redundant_experts={num_redundant_experts!r}, but the placement has "
                         f"{layout.num_slots} slots for {num_experts} experts ({from_plan} redundant)")
    return from_plan, [placement_row(layout, r) for r in rows]


def _replace_blocks(model, files, group, world: int, num_redundant_experts, placement) -> list[_ExpertPlan]:
    """Replaces every MoE block of the meta skeleton by an `epmoe.MoE` on meta; returns their read plans."""
    blocks = find_moe_blocks(model)
    num_experts = int(blocks[0][1].experts.gate_up_proj.shape[0])
    num_redundant_experts, layer_plans = _layer_placements(model, blocks, num_experts, world,
                                                           num_redundant_experts, placement)
    plans = []
    for layer_idx, ((name, block), layer_plan) in enumerate(zip(blocks, layer_plans, strict=True)):
        _check_block(name, block)
        config = moe_config_from_hf(block, num_redundant_experts=num_redundant_experts)
        moe = MoE(config, group, layer_idx=layer_idx, device="meta", placement=layer_plan)
        remember_hf_block(moe, block)
        install_router_logits_probe(moe)  # output_router_logits=True returns each layer's router logits
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, moe)
        plans.append(_plan_experts(name, type(block).__name__, moe, files))
    return plans


def from_pretrained(path, process_group: dist.ProcessGroup | None = None, *, num_redundant_experts: int | str = 0,
                    placement=None, torch_dtype=None, **model_kwargs) -> nn.Module:
    """Loads a transformers MoE checkpoint expert-parallel (collective over `process_group`, default WORLD).

    Arguments:
        path: a local checkpoint folder (`config.json` + `model.safetensors` or a sharded index).
        process_group: the EP group; None = WORLD when torch.distributed is initialised, else one process.
        num_redundant_experts: extra EPLB slots per MoE layer (an int, or "auto" for the fewest that make the
            slot count divisible by the EP size). With `placement`, its slot count decides (0 or the same value).
        placement: start from this plan: an `eplb.Placement` with one row per MoE layer (or per decoder layer, as
            SGLang writes), a JSON file (`epmoe plan -o`, `Placement.save`, SGLang's `physical_to_logical_map`)
            or such a dict. Default: the plan for uniform load.
        torch_dtype: the weights' dtype (a torch.dtype, its name, or "auto" = the config's; default "auto").
        model_kwargs: as for transformers' `from_pretrained`: config attributes (e.g. `attn_implementation`,
            `output_router_logits`) and model arguments; `device_map` names the one device of this rank's weights
            (default CPU).

    Returns:
        the transformers model (`AutoModelForCausalLM`) in eval mode whose MoE blocks (DeepseekV2/V3, Qwen3-MoE,
        Mixtral) are `epmoe.MoE` layers holding only this rank's slots; `model.epmoe_load_stats` = {
        "expert_bytes_read", "expert_bytes_total", "other_bytes_read", "seconds"} for this rank (also logged at INFO
        on the "epmoe.integrations.transformers" logger).

    Raises (on every rank, before any weight is allocated, when any rank finds the problem): ValueError naming the
    file, tensor or field for a folder without config or weights, a missing or mis-shaped tensor, a placement for
    another E or EP size, an unsupported MoE block type; NotImplementedError for quantized checkpoints.
    """
    start = time.perf_counter()
    group, rank, world = _ep_group(process_group)
    files, error = None, None
    try:
        files = CheckpointFiles(path)
        model, device = _build_skeleton(files, torch_dtype, model_kwargs)
        plans = _replace_blocks(model, files, group, world, num_redundant_experts, placement)
        targets, recompute = _plan_model_tensors(model, files, {id(m) for p in plans for m in p.moe.modules()})
    except Exception as exc:  # noqa: BLE001 - every rank must learn of any rank's failure, whatever it is
        error = exc
    raise_on_every_rank(error, group, "from_pretrained")

    error, stats = None, None
    try:
        expert_bytes, other_bytes = _materialize(model, targets, recompute, plans, files, device)
        generation = files.folder / "generation_config.json"
        if model.can_generate() and generation.is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(files.folder))
        stats = {
            "expert_bytes_read": int(expert_bytes),
            "expert_bytes_total": int(sum(_expert_bytes_total(p, files) for p in plans)),
            "other_bytes_read": int(other_bytes),
            "seconds": time.perf_counter() - start,
        }
    except Exception as exc:  # noqa: BLE001
        error = exc
    finally:
        if files is not None:
            files.close()
    raise_on_every_rank(error, group, "from_pretrained")
    model.eval()
    training.exclude_from_ddp(model)  # DDP over the data ranks leaves the epmoe layers to epmoe.sync_grads
    model.epmoe_load_stats = stats
    logger.info("from_pretrained %s: EP rank %d/%d read %.3f of %.3f GB of expert weights and %.3f GB of other "
                "tensors in %.2f s", files.folder, rank, world, stats["expert_bytes_read"] / 1e9,
                stats["expert_bytes_total"] / 1e9, stats["other_bytes_read"] / 1e9, stats["seconds"])
    return model
