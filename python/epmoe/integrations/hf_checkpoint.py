"""transformers checkpoint folders: the safetensors files of one (read side) and the hub names of an MoE block's
tensors (both sides). Used by `hf_load.from_pretrained` and `hf_save.save_pretrained`.

A folder holds `config.json` and either `model.safetensors` or `model.safetensors.index.json` (whose
`weight_map` names the shard of every tensor) plus the shards. Expert tensors come in two layouts:
- per expert (what the hub has and what transformers' `save_pretrained` writes by default):
  `{block}.experts.{e}.{gate}.weight` [I, H], `{block}.experts.{e}.{up}.weight` [I, H],
  `{block}.experts.{e}.{down}.weight` [H, I], with (gate, up, down) = (gate_proj, up_proj, down_proj), or
  Mixtral's (w1, w3, w2) under `block_sparse_moe` instead of `mlp`;
- fused (transformers' in-memory layout, `save_pretrained(save_original_format=False)`):
  `{block}.experts.gate_up_proj` [E, 2I, H] (gate rows then up rows), `{block}.experts.down_proj` [E, H, I].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "REPLICATED_NAMES",
    "WEIGHTS_NAME",
    "CheckpointFiles",
    "HubBlockNames",
    "TensorInfo",
    "hub_block_names",
    "remember_hf_block",
    "tensor_at",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype codes -> torch dtypes (the float and int types a model checkpoint holds).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one checkpoint tensor: shape, dtype, and its size in bytes."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class CheckpointFiles:
    """The safetensors weights of a transformers checkpoint folder.

    Name lookup is one dict (`weight_map`: tensor name -> shard file), built from the index without opening any
    shard; a shard is opened (`safe_open`, memory-mapped, header only) the first time one of its tensors is asked
    for, and reads touch only the bytes of the tensor or rows asked for. `close()` releases every shard.

    Raises ValueError naming the folder and the missing file when there is no config or no safetensors weights.
    """

    def __init__(self, path):
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"checkpoint path {str(path)!r} is not a directory (download the model first, e.g. "
                             f"`hf download REPO --local-dir DIR`)")
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"checkpoint folder {str(folder)!r} has no {CONFIG_NAME}")
        self.folder = folder
        self._handles: dict[str, object] = {}
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map')") from exc
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files")
            for shard in set(weight_map.values()):
                if not (folder / shard).is_file():
                    raise ValueError(f"{index} names the shard {shard!r}, which is not in {str(folder)!r}")
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (folder / WEIGHTS_NAME).is_file():
            self.weight_map = dict.fromkeys(self._handle(WEIGHTS_NAME).keys(), WEIGHTS_NAME)
        else:
            raise ValueError(f"checkpoint folder {str(folder)!r} has no {WEIGHTS_NAME} or {INDEX_NAME} "
                             f"(only safetensors weights are read)")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, shard: str):
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.folder / shard), framework="pt", device="cpu")
            self._handles[shard] = handle
        return handle

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of tensor `name` from its shard's header (no data read). KeyError if absent."""
        view = self._handle(self.weight_map[name]).get_slice(name)
        code = view.get_dtype()
        if code not in _DTYPES:
            raise ValueError(f"checkpoint tensor {name!r} has the unsupported dtype {code}")
        return TensorInfo(tuple(int(d) for d in view.get_shape()), _DTYPES[code])

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor `name` (CPU, its stored dtype; backed by the shard's mapping until copied)."""
        return self._handle(self.weight_map[name]).get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of tensor `name`, reading only those rows."""
        return self._handle(self.weight_map[name]).get_slice(name)[start:stop]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class HubBlockNames:
    """Checkpoint names of one MoE block's tensors.

    Attributes:
        prefixes: the block's name prefixes to look for, in order (e.g. `model.layers.3.mlp` and, for Mixtral,
            `model.layers.3.block_sparse_moe`); `prefixes[-1]` is the hub's, under which `save_pretrained` writes.
        projections: per-expert names of the (gate, up, down) projections.
    """

    prefixes: tuple[str, ...]
    projections: tuple[str, str, str]

    @property
    def hub_prefix(self) -> str:
        return self.prefixes[-1]

    def per_expert(self, prefix: str, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of logical expert `expert` under `prefix`."""
        return tuple(f"{prefix}.experts.{expert}.{proj}.weight" for proj in self.projections)

    @staticmethod
    def fused(prefix: str) -> tuple[str, str]:
        """(gate_up_proj, down_proj) names of the fused layout under `prefix`."""
        return f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"


# Block class -> (hub name of the block's attribute in its decoder layer, or None = as in memory; projections).
_HUB = {
    "DeepseekV3MoE": (None, ("gate_proj", "up_proj", "down_proj")),
    "DeepseekV2Moe": (None, ("gate_proj", "up_proj", "down_proj")),
    "Qwen3MoeSparseMoeBlock": (None, ("gate_proj", "up_proj", "down_proj")),
    "MixtralSparseMoeBlock": ("block_sparse_moe", ("w1", "w3", "w2")),
}


def hub_block_names(block_type: str, module_name: str) -> HubBlockNames:
    """The checkpoint names of the MoE block of class `block_type` that sits at `module_name` in the model."""
    if block_type not in _HUB:
        raise ValueError(f"unsupported MoE block {block_type}; supported: {', '.join(_HUB)}")
    hub_attr, projections = _HUB[block_type]
    prefixes = (module_name,)
    if hub_attr is not None:
        parent, _, _ = module_name.rpartition(".")
        prefixes += (f"{parent}.{hub_attr}" if parent else hub_attr,)
    return HubBlockNames(prefixes, projections)


# The replicated tensors of an `epmoe.MoE` and their names under the block prefix (identical in every layout).
REPLICATED_NAMES = (
    ("gate_weight", "gate.weight"),
    ("e_score_correction_bias", "gate.e_score_correction_bias"),
    ("shared_experts.gate_proj.weight", "shared_experts.gate_proj.weight"),
    ("shared_experts.up_proj.weight", "shared_experts.up_proj.weight"),
    ("shared_experts.down_proj.weight", "shared_experts.down_proj.weight"),
)


def tensor_at(module: torch.nn.Module, path: str) -> torch.Tensor | None:
    """The tensor at dotted `path` under `module`, or None where a module or the tensor on the way is None."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def remember_hf_block(moe: torch.nn.Module, block: torch.nn.Module) -> None:
    """Records on an `epmoe.MoE` what `save_pretrained` needs to write it back as `block` was: the block class
    (hence the hub names) and the dtype of the router weight (fp32 for DeepSeek, the model dtype otherwise)."""
    moe.hf_block_type = type(block).__name__
    moe.hf_gate_dtype = block.gate.weight.dtype
