"""Local expert path: token permutation and grouped SwiGLU experts, with autograd.

Typed wrappers of the torch.ops.epmoe expert-path ops (validation lives in the C++ ops), their fake impls for
torch.compile, and the two autograd-enabled entry points, which validate their arguments in Python first
(`epmoe._validate`) and accept any strides:

* `grouped_swiglu_experts(rows, expert_offsets, w13, w2)`: the SwiGLU MLP on expert-major rows (what the EP layer
  runs on the rows it receives from dispatch);
* `experts_forward(x, topk_idx, topk_weights, w13, w2)`: layout -> permute -> grouped SwiGLU -> down GEMM ->
  weighted unpermute (HF experts semantics, docs/semantics.md).

Inside `experts_forward` the row capacity is always T*k rows, so no shape depends on the routing; rows at index
>= expert_offsets[-1] are padding and zero in every op output.
"""

from __future__ import annotations

import torch

from epmoe import _loader  # noqa: F401  (loads _C, which registers the ops)
from epmoe import _validate as v

__all__ = [
    "moe_layout",
    "moe_permute",
    "moe_unpermute",
    "moe_unpermute_backward",
    "grouped_swiglu",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "swiglu_backward",
    "fused_experts_forward",
    "grouped_swiglu_experts",
    "experts_forward",
]

_ops = torch.ops.epmoe


# ---------------------------------------------------------------------------------------------------------------
# Typed wrappers


def moe_layout(
    topk_idx: torch.Tensor, num_experts: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-major layout of the routed slots (flat slot f = t*k + j; ascending f inside an expert).

    Arguments:
        topk_idx: int32 [T, k] expert ids, -1 = skipped slot. Without `expert_map` ids lie in [-1, num_experts).
        num_experts: number of (local) experts the rows are segmented over.
        expert_map: optional int32 [E_global], values in [-1, num_experts): ids (then in [-1, E_global)) are mapped
            through it first, and -1 after mapping means "not local" (skipped).

    Returns:
        tokens_per_expert: int64 [num_experts].
        expert_offsets: int64 [num_experts + 1], exclusive prefix sum ([0] = 0).
        slot_to_row: int32 [T, k], row of each slot, -1 for skipped slots.
        row_to_slot: int32 [T*k], flat slot of each row, -1 for padding rows >= expert_offsets[-1].
    """
    return _ops.moe_layout(topk_idx, num_experts, expert_map)


def moe_permute(x: torch.Tensor, row_to_slot: torch.Tensor, num_topk: int) -> torch.Tensor:
    """rows [T*k, H] (x.dtype) with rows[r] = x[row_to_slot[r] // num_topk], zero where row_to_slot[r] == -1.

    x: [T, H] float32 / bfloat16 / float16; row_to_slot: int32 [T*k] from `moe_layout`.
    """
    return _ops.moe_permute(x, row_to_slot, num_topk)


def moe_unpermute(rows: torch.Tensor, slot_to_row: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out [T, H] (rows.dtype), out[t] = sum_j topk_weights[t, j] * rows[slot_to_row[t, j]], in fp32, ascending j.

    rows: [T*k, H]; slot_to_row: int32 [T, k] (-1 slots skipped); topk_weights: float32 [T, k].
    """
    return _ops.moe_unpermute(rows, slot_to_row, topk_weights)


def moe_unpermute_backward(
    grad_out: torch.Tensor, rows: torch.Tensor, slot_to_row: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `moe_unpermute`: grad_rows [T*k, H] (rows.dtype; unreferenced rows zero) and
    grad_topk_weights float32 [T, k] = <grad_out[t], rows[slot_to_row[t, j]]> (0 for skipped slots)."""
    return _ops.moe_unpermute_backward(grad_out, rows, slot_to_row, topk_weights)


def grouped_swiglu(x: torch.Tensor, expert_offsets: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """h [R, I] (x.dtype), h_e = silu(x_e @ gate_e^T) * (x_e @ up_e^T) per expert segment, fp32 accumulation.

    x: [R, H] expert-major rows; expert_offsets: int64 [E + 1]; w13: [E, 2I, H], gate rows then up rows.
    """
    return _ops.grouped_swiglu(x, expert_offsets, w13)


def grouped_gemm(a: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor, trans_w: bool) -> torch.Tensor:
    """out [R, N] (a.dtype): out_e = a_e @ w_e^T with w [E, N, K] (trans_w) or a_e @ w_e with w [E, K, N]."""
    return _ops.grouped_gemm(a, expert_offsets, w, trans_w)


def grouped_gemm_wgrad(grad_out: torch.Tensor, a: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """[E, N, K] (a.dtype): out_e = grad_out_e^T @ a_e over the expert's rows (fp32 accumulation); empty experts 0."""
    return _ops.grouped_gemm_wgrad(grad_out, a, expert_offsets)


def swiglu_backward(grad_h: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    """grad_gu [R, 2I] (gu.dtype) of h = silu(gate) * up, from gu = (gate | up) [R, 2I] and grad_h [R, I]."""
    return _ops.swiglu_backward(grad_h, gu)


def fused_experts_forward(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *,
    expert_map: torch.Tensor | None = None, shared: tuple = (),
) -> torch.Tensor:
    """Inference (no autograd): the routed experts as `experts_forward` computes them, plus an optional shared expert.

    Arguments as in `experts_forward` (made contiguous, topk_idx int32, topk_weights float32); `shared`: () or
    (gate [Is, H], up [Is, H], down [H, Is]) weights (HF gate_proj / up_proj / down_proj) in x.dtype, run on every
    token. Returns [T, H] in x.dtype: the routed sum rounded to x.dtype, plus down(silu(gate(x)) * up(x)) rounded
    to x.dtype, rounded again (what adding the two tensors does). On CPU the shared expert's GEMMs run in the same
    parallel regions as the routed ones, and its rows are added in the combine pass.
    """
    if len(shared) not in (0, 3):
        raise ValueError(f"shared must be () or (gate, up, down) weights, got {len(shared)} tensors")
    gate, up, down = (t.contiguous() for t in shared) if shared else (None, None, None)
    if expert_map is not None:
        expert_map = expert_map.to(torch.int32).contiguous()
    return _ops.fused_experts_forward(x.contiguous(), topk_idx.to(torch.int32).contiguous(),
                                      topk_weights.to(torch.float32).contiguous(), w13.contiguous(), w2.contiguous(),
                                      expert_map, gate, up, down)


# ---------------------------------------------------------------------------------------------------------------
# Fake impls (shapes never depend on data)


@torch.library.register_fake("epmoe::moe_layout")
def _moe_layout_fake(topk_idx, num_experts, expert_map):
    torch._check(topk_idx.dim() == 2, lambda: "topk_idx must be 2-D [num_tokens, num_topk]")
    num_tokens, num_topk = topk_idx.shape
    return (
        topk_idx.new_empty((num_experts,), dtype=torch.int64),
        topk_idx.new_empty((num_experts + 1,), dtype=torch.int64),
        topk_idx.new_empty((num_tokens, num_topk), dtype=torch.int32),
        topk_idx.new_empty((num_tokens * num_topk,), dtype=torch.int32),
    )


@torch.library.register_fake("epmoe::moe_permute")
def _moe_permute_fake(x, row_to_slot, num_topk):
    torch._check(x.dim() == 2, lambda: "x must be 2-D [num_tokens, hidden]")
    return x.new_empty((row_to_slot.shape[0], x.shape[1]))


@torch.library.register_fake("epmoe::moe_unpermute")
def _moe_unpermute_fake(rows, slot_to_row, topk_weights):
    torch._check(rows.dim() == 2, lambda: "rows must be 2-D [num_rows, hidden]")
    return rows.new_empty((slot_to_row.shape[0], rows.shape[1]))


@torch.library.register_fake("epmoe::moe_unpermute_backward")
def _moe_unpermute_backward_fake(grad_out, rows, slot_to_row, topk_weights):
    return torch.empty_like(rows), torch.empty_like(topk_weights)


@torch.library.register_fake("epmoe::grouped_swiglu")
def _grouped_swiglu_fake(x, expert_offsets, w13):
    torch._check(w13.dim() == 3, lambda: "w13 must be 3-D [num_experts, 2 * I, H]")
    return x.new_empty((x.shape[0], w13.shape[1] // 2))


@torch.library.register_fake("epmoe::grouped_gemm")
def _grouped_gemm_fake(a, expert_offsets, w, trans_w):
    torch._check(w.dim() == 3, lambda: "w must be 3-D")
    return a.new_empty((a.shape[0], w.shape[1] if trans_w else w.shape[2]))


@torch.library.register_fake("epmoe::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(grad_out, a, expert_offsets):
    return a.new_empty((expert_offsets.shape[0] - 1, grad_out.shape[1], a.shape[1]))


@torch.library.register_fake("epmoe::swiglu_backward")
def _swiglu_backward_fake(grad_h, gu):
    return torch.empty_like(gu)


@torch.library.register_fake("epmoe::fused_experts_forward")
def _fused_experts_forward_fake(x, topk_idx, topk_weights, w13, w2, expert_map, shared_gate=None, shared_up=None,
                                shared_down=None):
    torch._check(x.dim() == 2, lambda: "x must be 2-D [num_tokens, hidden]")
    return torch.empty_like(x)


@torch.library.register_fake("epmoe::fused_moe_forward")
def _fused_moe_forward_fake(x, router_logits, top_k, scoring, num_groups, topk_groups, bias, renormalize,
                            scaling_factor, log2phy, logcnt, token_offset, layer, w13, w2, load_counts=None,
                            shared_gate=None, shared_up=None, shared_down=None):
    torch._check(x.dim() == 2, lambda: "x must be 2-D [num_tokens, hidden]")
    return x.new_empty(x.shape, dtype=w13.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Autograd


class _GroupedSwiGLUExperts(torch.autograd.Function):
    """y = down(silu(gate(rows)) * up(rows)) per expert segment. Backward recomputes the pre-activations."""

    @staticmethod
    def forward(ctx, rows, expert_offsets, w13, w2):
        h = _ops.grouped_swiglu(rows, expert_offsets, w13)
        y = _ops.grouped_gemm(h, expert_offsets, w2, True)
        ctx.save_for_backward(rows, expert_offsets, w13, w2, h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        rows, expert_offsets, w13, w2, h = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_h = _ops.grouped_gemm(grad_y, expert_offsets, w2, False)  # [R, I]
        grad_w2 = _ops.grouped_gemm_wgrad(grad_y, h, expert_offsets) if ctx.needs_input_grad[3] else None
        gu = _ops.grouped_gemm(rows, expert_offsets, w13, True)  # [R, 2I] pre-activations
        grad_gu = _ops.swiglu_backward(grad_h, gu)
        grad_rows = _ops.grouped_gemm(grad_gu, expert_offsets, w13, False) if ctx.needs_input_grad[0] else None
        grad_w13 = _ops.grouped_gemm_wgrad(grad_gu, rows, expert_offsets) if ctx.needs_input_grad[2] else None
        return grad_rows, None, grad_w13, grad_w2


class _Permute(torch.autograd.Function):
    """rows = x gathered into the expert-major layout; its backward sums the rows of each token (weights 1)."""

    @staticmethod
    def forward(ctx, x, row_to_slot, slot_to_row, num_topk):
        ctx.save_for_backward(slot_to_row)
        return _ops.moe_permute(x, row_to_slot, num_topk)

    @staticmethod
    def backward(ctx, grad_rows):
        (slot_to_row,) = ctx.saved_tensors
        ones = torch.ones(slot_to_row.shape, dtype=torch.float32, device=slot_to_row.device)
        return _ops.moe_unpermute(grad_rows.contiguous(), slot_to_row, ones), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, slot_to_row, topk_weights):
        ctx.save_for_backward(rows, slot_to_row, topk_weights)
        return _ops.moe_unpermute(rows, slot_to_row, topk_weights)

    @staticmethod
    def backward(ctx, grad_out):
        rows, slot_to_row, topk_weights = ctx.saved_tensors
        grad_rows, grad_weights = _ops.moe_unpermute_backward(grad_out.contiguous(), rows, slot_to_row, topk_weights)
        return grad_rows, None, grad_weights


def _check_expert_weights(x_name: str, x: torch.Tensor, w13, w2) -> None:
    """w13 [E, 2I, H] and w2 [E, H, I] in x's dtype and device, H = x.shape[1]; blames the argument that
    disagrees with the other two."""
    v.check_tensor("w13", w13, dim=3, layout="[num_experts, 2 * I, H]")
    v.check_tensor("w2", w2, dim=3, layout="[num_experts, H, I]")
    if w13.shape[0] == 0 or w13.shape[1] == 0:
        raise ValueError(f"w13 must have shape [num_experts, 2 * I, H] with num_experts >= 1 and I >= 1, got "
                         f"{list(w13.shape)}")
    hidden = x.shape[1]
    h13, h2 = w13.shape[2], w2.shape[1]
    if h13 != hidden and h2 != hidden and h13 == h2:
        raise ValueError(f"{x_name} has hidden size {hidden} but the expert weights have H = {h13} "
                         f"(w13 [num_experts, 2 * I, H] = {list(w13.shape)}, w2 [num_experts, H, I] = "
                         f"{list(w2.shape)}): {x_name} must be [*, {h13}]")
    if h13 != hidden:
        raise ValueError(f"w13 must have shape [num_experts, 2 * I, H] with H = {hidden} (the hidden size of "
                         f"{x_name}), got {list(w13.shape)}")
    if w13.shape[1] % 2 != 0:
        raise ValueError(f"w13 must have shape [num_experts, 2 * I, H] (gate rows then up rows, an even second "
                         f"dimension), got {list(w13.shape)}")
    expected = [w13.shape[0], hidden, w13.shape[1] // 2]
    if list(w2.shape) != expected:
        raise ValueError(f"w2 must have shape [num_experts, H, I] = {expected} to match w13 {list(w13.shape)} and "
                         f"the hidden size of {x_name} ({hidden}), got {list(w2.shape)}")
    for name, t in (("w13", w13), ("w2", w2)):
        v.check_same_dtype(name, t, x_name, x)
        v.check_tensor(name, t, device=x.device, like=x_name)


def grouped_swiglu_experts(
    rows: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    allow_padding: bool = False,
) -> torch.Tensor:
    """SwiGLU MLP of each expert on its segment of expert-major rows, differentiable in rows, w13 and w2.

    Arguments:
        rows: [R, H] float32 / bfloat16 / float16 (any strides), segmented by `expert_offsets`.
        expert_offsets: int64 [E + 1], expert_offsets[0] = 0, non-decreasing, expert_offsets[E] = R: every row
            belongs to an expert. With `allow_padding=True`, expert_offsets[E] <= R and the rows past it are padding
            (zero in the output and in its gradient), e.g. a fixed-capacity buffer. The values are checked for
            CPU tensors (on CUDA that would be a host sync).
        w13: [E, 2I, H] in rows.dtype, gate rows then up rows (HF `gate_up_proj`).
        w2: [E, H, I] in rows.dtype (HF `down_proj`).

    Returns:
        [R, H] in rows.dtype: rows of expert e = down_e(silu(gate_e(x)) * up_e(x)).
    """
    v.check_tensor("rows", rows, dtypes=v.FLOAT_DTYPES, dim=2, layout="[num_rows, hidden]")
    _check_expert_weights("rows", rows, w13, w2)
    v.check_tensor("expert_offsets", expert_offsets, dtypes=(torch.int64,), shape=(w13.shape[0] + 1,),
                   layout="(num_experts + 1, num_experts from w13)", device=rows.device, like="rows")
    if v.can_read_values(expert_offsets):
        offsets = expert_offsets.tolist()
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise ValueError(f"expert_offsets must start at 0 and be non-decreasing, got {offsets}")
        if offsets[-1] > rows.shape[0] or (offsets[-1] != rows.shape[0] and not allow_padding):
            raise ValueError(f"expert_offsets[-1] must equal the number of rows ({rows.shape[0]}): every row "
                             f"belongs to an expert (pass allow_padding=True for trailing padding rows), got "
                             f"{offsets[-1]}")
    return _GroupedSwiGLUExperts.apply(rows.contiguous(), expert_offsets.contiguous(), w13.contiguous(),
                                       w2.contiguous())


def experts_forward(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts with HF experts semantics, differentiable in x, topk_weights, w13 and w2.

    Arguments:
        x: [T, H] float32 / bfloat16 / float16 (any strides).
        topk_idx: [T, k] int32 (int64 is converted) expert ids, -1 = skipped slot; ids lie in [-1, E) or, with
            `expert_map`, in [-1, expert_map.numel()).
        topk_weights: [T, k] floating routing weights; converted to float32 (the sum runs in fp32).
        w13: [E, 2I, H] in x.dtype, gate rows then up rows (HF `gate_up_proj`).
        w2: [E, H, I] in x.dtype (HF `down_proj`).
        expert_map: optional int32 / int64 [E_global] -> local expert in [-1, E) (-1 = not on this rank, slot
            skipped).

    Returns:
        [T, H] in x.dtype: out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_idx[t, j],
        accumulated in fp32 in ascending j.
    """
    v.check_tensor("x", x, dtypes=v.FLOAT_DTYPES, dim=2, layout="[num_tokens, hidden]")
    v.check_tensor("topk_idx", topk_idx, dtypes=v.INDEX_DTYPES, dim=2, layout="[num_tokens, top_k]")
    if topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"x [T, H] and topk_idx [T, k] must have the same T (num_tokens), got x {list(x.shape)} "
                         f"and topk_idx {list(topk_idx.shape)}")
    v.check_tensor("topk_idx", topk_idx, device=x.device, like="x")
    v.check_tensor("topk_weights", topk_weights, device=x.device, like="x")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a floating-point tensor, got {v.dtype_name(topk_weights.dtype)}")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights must have the shape of topk_idx {list(topk_idx.shape)}, got "
                         f"{list(topk_weights.shape)}")
    _check_expert_weights("x", x, w13, w2)
    if expert_map is not None:
        v.check_tensor("expert_map", expert_map, dtypes=v.INDEX_DTYPES, dim=1, layout="[num_global_experts]",
                       device=x.device, like="x")
        expert_map = expert_map.to(torch.int32).contiguous()
    topk_idx = topk_idx.to(torch.int32).contiguous()
    topk_weights = topk_weights.to(torch.float32).contiguous()
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (x, topk_weights, w13, w2)):
        # Inference: one op, no permuted copy of x and no saved activations (same values as the path below).
        return _ops.fused_experts_forward(x.contiguous(), topk_idx, topk_weights, w13.contiguous(), w2.contiguous(),
                                          expert_map)
    num_topk = topk_idx.shape[1]
    with torch.no_grad():
        _, expert_offsets, slot_to_row, row_to_slot = _ops.moe_layout(topk_idx, w13.shape[0], expert_map)
    # Row capacity T*k: rows past expert_offsets[-1] are padding (skipped slots), zero in every op output.
    rows = _Permute.apply(x.contiguous(), row_to_slot, slot_to_row, num_topk)
    y = _GroupedSwiGLUExperts.apply(rows, expert_offsets, w13.contiguous(), w2.contiguous())
    return _Unpermute.apply(y, slot_to_row, topk_weights)
