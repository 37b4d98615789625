"""Argument checks shared by the public entry points (the bad-input contract of docs/errors.md).

Every helper raises `TypeError` for a wrong kind (not a tensor, wrong dtype, not an int) and `ValueError` for a
wrong value (shape, device, range), with a message that names the argument, says what was expected and what came.
The checks read only metadata (dtype, shape, device), so they cost no host sync and trace under torch.compile;
the kernels keep their own TORCH_CHECKs as a second line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def _one_of(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    dim: int | Sequence[int] | None = None,
    layout: str = "",
    shape: Sequence[int | None] | None = None,
    device: torch.device | str | None = None,
    like: str = "",
) -> torch.Tensor:
    """Checks a tensor argument and returns it.

    Arguments:
        name: the argument's name as the caller wrote it (e.g. "topk_idx").
        dtypes: accepted dtypes (TypeError otherwise).
        dim: accepted number of dimensions; `layout` names them, e.g. "[num_tokens, hidden]".
        shape: expected sizes, None = any size in that dimension (implies dim = len(shape)).
        device: expected device; `like` names the argument it comes from, e.g. "x".
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_one_of([dtype_name(d) for d in dtypes])}, got {dtype_name(t.dtype)}")
    if shape is not None:
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=False)):
            raise ValueError(f"{name} must have shape {expected}{' ' + layout if layout else ''}, got "
                             f"{list(t.shape)}")
    elif dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if t.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name} must be {want}{' ' + layout if layout else ''}, got a {t.dim()}-D tensor of "
                             f"shape {list(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {torch.device(device)}{' like ' + like if like else ''}, got {t.device}")
    return t


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({dtype_name(ref.dtype)}), got "
                        f"{dtype_name(t.dtype)}")


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (numpy ints too, bools not) within [minimum, maximum]; returns it as a Python int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value) -> float:
    """A real number (int or float, not bool); returns it as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def can_read_values(t: torch.Tensor) -> bool:
    """Whether a data-dependent check may read `t` on the host: CPU tensors outside a torch.compile trace (a CUDA
    read would be a host sync, so such values are left to the kernels' own checks)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()
