"""`save_pretrained`: an expert-parallel model written back as a plain transformers checkpoint, collectively.

Every rank writes its own shard files, nobody gathers the model: EP rank 0 writes the config, the non-expert
tensors (each once; tied weights once, under the name transformers keeps) and the index; every rank writes the
logical experts whose first replica it holds, in the hub's per-expert layout (what transformers' own
`save_pretrained` writes and what its loader merges into the fused in-memory experts). Shards are named
`model-0000i-of-0000N.safetensors` over all ranks (`model.safetensors` when there is one); the index
`model.safetensors.index.json` is always written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from epmoe._logging import get_logger
from epmoe.integrations.hf_checkpoint import (
    INDEX_NAME,
    REPLICATED_NAMES,
    WEIGHTS_NAME,
    hub_block_names,
    tensor_at,
)
from epmoe.integrations.hf_load import raise_on_every_rank
from epmoe.layer import MoE

logger = get_logger("epmoe.integrations.transformers")

__all__ = ["save_pretrained"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
_STALE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")


def _parse_size(size) -> int:
    if isinstance(size, int) and size > 0:
        return size
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive int or a size such as '5GB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no epmoe.MoE layer (load it with from_pretrained or "
                         f"shard it with shard_model first)")
    for name, moe in layers:
        if getattr(moe, "hf_block_type", None) is None:
            raise ValueError(f"epmoe.MoE at {name!r} was not built from a transformers block (from_pretrained / "
                             f"shard_model), so its checkpoint names are unknown")
    first = layers[0][1]
    for name, moe in layers[1:]:
        if moe.group is not first.group:
            raise ValueError(f"epmoe.MoE at {name!r} uses another process group than {layers[0][0]!r}")
    return layers


def _non_expert_tensors(model: nn.Module, layers) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every tensor outside the experts: the model's own (persistent buffers
    included; tied aliases once, under the tie's source name as transformers writes them) and each MoE layer's
    replicated ones under the hub block names."""
    inside = {id(m) for _, moe in layers for m in moe.modules()}
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        entries = [(n, t) for n, t in module._parameters.items() if t is not None]
        entries += [(n, t) for n, t in module._buffers.items()
                    if t is not None and n not in module._non_persistent_buffers_set]
        for attr, tensor in entries:
            aliases.setdefault(id(tensor), (tensor, []))[1].append(prefix + attr)
    out = []
    for tensor, names in aliases.values():
        kept = [n for n in names if n not in tied_targets] or names
        out.append((kept[0], tensor))
    for name, moe in layers:
        hub = hub_block_names(moe.hf_block_type, name).hub_prefix
        for attr, suffix in REPLICATED_NAMES:
            tensor = tensor_at(moe, attr)
            if tensor is None:
                continue
            if attr == "gate_weight":
                tensor = tensor.to(moe.hf_gate_dtype)
            out.append((f"{hub}.{suffix}", tensor))
    return out


def _expert_tensors(layers) -> list[tuple[str, torch.Tensor]]:
    """(hub name, tensor) of the logical experts whose first replica is on this rank (each expert on one rank)."""
    out = []
    for name, moe in layers:
        names = hub_block_names(moe.hf_block_type, name)
        inter = moe.config.moe_intermediate_size
        first_slot = moe.placement.log2phy[0][:, 0].tolist()
        start = moe.rank * moe.num_local_slots
        for expert, slot in enumerate(first_slot):
            local = slot - start
            if not 0 <= local < moe.num_local_slots:
                continue
            gate, up, down = names.per_expert(names.hub_prefix, expert)
            out += [(gate, moe.w13[local, :inter]), (up, moe.w13[local, inter:]), (down, moe.w2[local])]
    return out


def _chunks(tensors, max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    chunks, current, size = [], [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    if current:
        chunks.append(current)
    return chunks


def _all_gather(value, group):
    if group is None:
        return [value]
    box: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(box, value, group=group)
    return box


@torch.no_grad()
def save_pretrained(model: nn.Module, path, *, max_shard_size: int | str = "5GB") -> None:
    """Writes an expert-parallel transformers model (from `from_pretrained` or `shard_model`) as a standard
    transformers checkpoint folder: `config.json`, `generation_config.json` where the model generates, safetensors
    shards and `model.safetensors.index.json`, with the hub's tensor names and each logical expert exactly once.
    Plain `AutoModelForCausalLM.from_pretrained(path)` loads it, and so does `from_pretrained` at any EP size.

    Collective over the MoE layers' EP group: every rank calls it with its part of the same model. No rank gathers
    the model: each writes its own shards (at most `max_shard_size` bytes each, e.g. "5GB"), holding the logical
    experts whose first replica it has; EP rank 0 also writes the non-expert tensors, the config and the index.
    """
    group = _group_of(model)
    rank = dist.get_rank(group) if group is not None else 0
    error = None
    try:
        layers = _moe_layers(model)
        max_bytes = _parse_size(max_shard_size)
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained path {str(path)!r} exists and is not a directory")
        mine = _expert_tensors(layers)
        if rank == 0:
            mine = _non_expert_tensors(model, layers) + mine
        chunks = _chunks(mine, max_bytes)
    except Exception as exc:  # noqa: BLE001 - every rank must learn of any rank's failure
        error = exc
    raise_on_every_rank(error, group, "save_pretrained")

    counts = _all_gather(len(chunks), group)
    total, offset = sum(counts), sum(counts[:rank])
    files = [WEIGHTS_NAME] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                               for i in range(offset, offset + len(chunks))]
    error = None
    try:
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():  # shards of an earlier save would shadow or mix with these
                if _STALE.match(old.name):
                    old.unlink()
            config = model.config  # as transformers' save_pretrained records them
            config.architectures = [type(model).__name__]
            config.dtype = str(model.dtype).removeprefix("torch.")
            config.save_pretrained(str(folder))
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        error = exc
    raise_on_every_rank(error, group, "save_pretrained")  # also the barrier: the folder is ready

    error, weight_map, total_size = None, {}, 0
    try:
        from safetensors.torch import save_file

        for filename, chunk in zip(files, chunks, strict=True):
            # Copies (to the CPU) one shard at a time; views of one expert slot must not share storage in a file.
            tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in chunk}
            save_file(tensors, str(folder / filename), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, filename))
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
    except Exception as exc:  # noqa: BLE001
        error = exc
    raise_on_every_rank(error, group, "save_pretrained")

    maps = _all_gather((weight_map, total_size), group)
    error = None
    try:
        if rank == 0:  # also for a single file: every save has the index, whatever the EP size
            merged: dict[str, str] = {}
            for part, _ in maps:
                merged.update(part)
            index = {"metadata": {"total_size": sum(size for _, size in maps)},
                     "weight_map": dict(sorted(merged.items()))}
            (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    except Exception as exc:  # noqa: BLE001
        error = exc
    raise_on_every_rank(error, group, "save_pretrained")  # the index is written when any rank returns
    logger.info("save_pretrained %s: this rank wrote %d file(s), %d tensors, %.3f GB", folder, len(files),
                len(weight_map), total_size / 1e9)


def _group_of(model: nn.Module):
    """The EP group of the first MoE layer of `model` (None: one process), else WORLD when distributed."""
    for module in model.modules():
        if isinstance(module, MoE):
            return module.group
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
