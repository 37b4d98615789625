"""Loads the compiled extension, which registers the torch.ops.epmoe ops, with a clear error when it is missing
or was built against another torch."""

import torch

try:
    from epmoe import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "epmoe._C is not built: run `pip install --no-build-isolation -e .` (or `make build`) in the epmoe checkout"
    ) from exc

_BUILD_INFO = _C.build_info()
if _BUILD_INFO["torch_version"] != torch.__version__:  # pragma: no cover - environment mismatch
    raise ImportError(
        f"epmoe._C was built against torch {_BUILD_INFO['torch_version']} but torch {torch.__version__} is "
        "imported: rebuild epmoe (`make build`)"
    )


def has_cuda_kernels() -> bool:
    """True when this build compiled the CUDA kernels and registered the CUDA impls of the ops."""
    return bool(_C.has_cuda_kernels())


def build_info() -> dict:
    """What this build was compiled against: torch version, CUDA archs, whether CUDA and NCCL are in."""
    return dict(_BUILD_INFO)
