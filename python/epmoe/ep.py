"""Expert-parallel dispatch and combine: `EPGroup`, backed by the C++ runtime (`epmoe._C.Runtime`).

CPU tensors travel over the process group (gloo), CUDA tensors over the runtime's own NCCL communicator. Rank r owns
experts `[r*E/R, (r+1)*E/R)` unless an `expert_to_rank` map is given. Semantics (docs/semantics.md):

- dispatch sends each token once per destination rank that owns any of its experts (deduplicated), with its slot
  list; the receiver expands the rows into expert-major order (local expert, then source rank, source token, slot).
- combine reduces a token's slots on the expert rank in fp32 (ascending slot), sends one partial row per
  (token, rank) back in x's dtype, and sums the partials in fp32 in ascending rank order: bitwise deterministic.
  For float32 x this is fp32 throughout; for bf16/fp16 the partial of each rank is rounded once to x's dtype.
- Host syncs: `exact` mode reads the exchanged counts on the host once per dispatch (on CUDA the send plan is
  computed on the device, so that read is the only one). `capacity` mode moves fixed `capacity` rows per rank pair;
  rows beyond it are counted in `handle.overflow`. On CPU they raise at combine and `handle.check()` unless
  `drop_overflow=True`. On CUDA, capacity mode never reads the device on the host and is CUDA-graph capturable
  (after one call with the same shapes outside the capture, which checks agreement across ranks on the host):
  `recv_x` has a fixed `R * capacity * k` rows (rows at and past `expert_offsets[-1]` are zero padding with weight 0),
  tokens that lost rows come back from combine as NaN unless `drop_overflow=True`, and `handle.check()` raises with
  the counts (it reads the device). `EPGroup.synchronize()` is the host wait, with the timeout, for such transfers.
- Agreement: every dispatch exchanges a small header first; a disagreement (dtype, mode, sizes, placement), an
  out-of-range expert id or an invalid `expert_to_rank` on any rank, and ranks out of step (each header carries the
  group's dispatch count and the optional `tag`) raise on every rank with the rank and the values named.
- Autograd: dispatch backward is an unweighted combine of the row gradients (plus the routing-weight gradients sent
  back per slot); combine backward is a dispatch of the output gradient with the cached handle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from epmoe import _loader  # noqa: F401  (loads _C)
from epmoe import _validate as v
from epmoe._loader import _C
from epmoe._logging import get_logger

log = get_logger(__name__)

__all__ = ["EPGroup", "DispatchResult", "DispatchHandle"]


class DispatchHandle:
    """What combine and the backward passes need. Named fields (tensors on x's device unless noted):

    num_send_per_rank / num_recv_per_rank (list[int]): token rows sent to / received from each rank.
    send_token_idx int32 [N_send]: source token of each sent row (rank-major, token ascending).
    recv_src_rank / recv_src_token int32 [N_recv]: origin of each received row (token -1 = capacity padding).
    row_src / row_slot int32 [M]: received row and top-k slot of each `recv_x` row.
    overflow int64 [R]: rows this rank could not send to each rank (capacity mode); num_send_overflow (int) is their
    sum, num_recv_overflow (int) the rows other ranks could not send here.
    num_bytes_sent (int): dispatch payload bytes this rank sent to other ranks.
    recv_topk_weights float32 [M]: the weights combine applies (part of the autograd graph).
    """

    def __init__(self, native, recv_topk_weights: torch.Tensor):
        self._native = native
        self.recv_topk_weights = recv_topk_weights

    def __getattr__(self, name):
        return getattr(self.__dict__["_native"], name)

    def check(self) -> None:
        """Raise RuntimeError if rows overflowed the capacity and the caller did not pass drop_overflow=True, and
        (CUDA capacity mode, where the ranks' headers are compared on the device) ValueError/RuntimeError if the
        ranks disagreed or one of them had bad input. In CUDA capacity mode this reads the device (a host sync)."""
        self._native.check()


@dataclass
class DispatchResult:
    """recv_x [M, H] (x's dtype): this rank's rows, expert-major over its local experts.
    recv_topk_weights float32 [M]: the routing weight of each row.
    tokens_per_expert int64 [num_local_experts]; expert_offsets int64 [num_local_experts + 1] (on x's device).
    handle: the DispatchHandle to pass to combine."""

    recv_x: torch.Tensor
    recv_topk_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    handle: DispatchHandle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, runtime, pending, out_box):
        recv_x, recv_w, tokens_per_expert, expert_offsets, native = pending.wait()
        ctx.runtime, ctx.native = runtime, native
        ctx.x_dtype, ctx.w_dtype, ctx.device = x.dtype, topk_weights.dtype, x.device
        ctx.mark_non_differentiable(tokens_per_expert, expert_offsets)
        out_box.append(native)
        return recv_x, recv_w, tokens_per_expert, expert_offsets

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_w, _grad_tpe, _grad_offsets):
        native = ctx.native
        grad_x = grad_w = None
        # NOTES: every rank must run the same collectives in the same order, so a missing gradient is zeros,
        # never a skipped exchange.
        if ctx.needs_input_grad[0]:
            if grad_recv_x is None:
                grad_recv_x = torch.zeros(native.num_recv_rows, native.hidden, dtype=ctx.x_dtype, device=ctx.device)
            grad_x = ctx.runtime.reverse_rows(grad_recv_x.contiguous(), native).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if grad_recv_w is None:
                grad_recv_w = torch.zeros(native.num_recv_rows, dtype=torch.float32, device=ctx.device)
            grad_w = ctx.runtime.reverse_slots(grad_recv_w.contiguous(), native).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, recv_topk_weights, runtime, pending, native):
        ctx.runtime, ctx.native = runtime, native
        ctx.save_for_backward(expert_out, recv_topk_weights)
        return pending.wait()

    @staticmethod
    def backward(ctx, grad_y):
        expert_out, recv_w = ctx.saved_tensors
        native = ctx.native
        g = ctx.runtime.forward_rows(grad_y.to(expert_out.dtype).contiguous(), native)
        g = g.float().index_select(0, native.row_src)  # [M, H]: the output gradient of each row's token
        grad_out = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_out = (g * recv_w.float().unsqueeze(1)).to(expert_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g * expert_out.float()).sum(-1).to(recv_w.dtype)
        return grad_out, grad_w, None, None, None


class _PendingDispatch:
    """Returned by dispatch(async_op=True): the payload transfer is in flight; wait() returns the DispatchResult."""

    def __init__(self, finish):
        self._finish = finish

    def wait(self) -> DispatchResult:
        return self._finish()


class _PendingCombine:
    """Returned by combine(async_op=True): the transfer is in flight; wait() returns the [T, H] output."""

    def __init__(self, finish):
        self._finish = finish

    def wait(self) -> torch.Tensor:
        return self._finish()


def _collective(op: str, fn, *args):
    """Runs a blocking runtime call; a RuntimeError (timeout, dead peer, NCCL error) is logged with this rank's
    prefix before it propagates, so the log shows which rank saw what."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        log.warning("EP %s failed: %s", op, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
        raise


def _log_overflow(native) -> None:
    if not native.counts_on_host:
        return  # CUDA capacity mode: the counts stay on the device (no host sync); handle.check() reports them
    if native.num_send_overflow == 0 and native.num_recv_overflow == 0:
        return
    what = "dropped (drop_overflow=True)" if native.drop_overflow else "combine will raise (drop_overflow=False)"
    log.warning("EP dispatch overflow: %d rows sent by this rank and %d rows bound for it did not fit capacity=%d; "
                "%s", native.num_send_overflow, native.num_recv_overflow, native.capacity, what)


class EPGroup:
    """Expert-parallel group over a torch.distributed process group.

    Arguments:
        process_group: the EP group (default: WORLD). Its backend must support all_to_all_single with split sizes
            for CPU tensors (gloo does); CUDA tensors use an NCCL communicator that this group creates on first use.
        timeout: seconds per collective; None = the process group's own timeout. A dead or disagreeing peer
            raises RuntimeError on the other ranks instead of hanging. On CUDA the NCCL communicator is polled for
            errors while waiting and aborted on an error or at the timeout; the group's CUDA path is then unusable.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, timeout: float | None = None):
        if not dist.is_initialized():
            raise RuntimeError("EPGroup needs torch.distributed to be initialised (dist.init_process_group)")
        if timeout is not None:
            timeout = v.check_float("timeout", timeout)
            if not timeout > 0:
                raise ValueError(f"timeout must be > 0 seconds (or None for the process group's), got {timeout}")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self._runtime = _C.Runtime(self.process_group, float(timeout) if timeout else 0.0)
        self.rank = self._runtime.rank
        self.num_ranks = self._runtime.num_ranks
        log.info("EP group: rank %d of %d, backend %s, timeout %s", self.rank, self.num_ranks,
                 dist.get_backend(self.process_group), f"{timeout:g} s" if timeout else "of the process group")

    @property
    def bytes_sent(self) -> int:
        """Cumulative bytes this rank sent to other ranks (dispatch, combine and their backward passes)."""
        return self._runtime.total_bytes_sent

    def _prepare(self, t: torch.Tensor) -> None:
        if t.is_cuda and not self._runtime.has_nccl:
            # NCCL bootstrap through the process group: group rank 0 makes the id, everyone connects.
            box = [_C.Runtime.nccl_unique_id() if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
            device = t.device.index if t.device.index is not None else 0
            _collective("NCCL setup", self._runtime.init_nccl, box[0], device)
            log.info("EP group: NCCL communicator ready on cuda:%d (%d ranks)", device, self.num_ranks)

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        mode: str = "exact",
        capacity: int | None = None,
        *,
        drop_overflow: bool = False,
        expert_to_rank: torch.Tensor | None = None,
        async_op: bool = False,
        tag: int | None = None,
    ) -> DispatchResult | _PendingDispatch:
        """Send each token to the ranks that own its experts.

        Arguments:
            x: [T, H] float32 / bfloat16 / float16 (T may differ across ranks, including 0).
            topk_idx: [T, k] int32 / int64 expert ids in [0, num_experts), -1 = skipped slot.
            topk_weights: [T, k] floating routing weights (differentiable).
            num_experts: E, the same on every rank.
            mode: "exact" (counts exchanged first, one host read, exact sizes) or "capacity" (`capacity` rows per
                rank pair).
            capacity: rows per (source, destination) rank pair in capacity mode.
            drop_overflow: in capacity mode, allow dropping rows beyond the capacity instead of raising at the
                next host sync.
            expert_to_rank: optional int [num_experts] rank of each (physical) expert; a rank's local experts are
                the ids mapped to it in ascending order. Default: the even split (E % R == 0 required). With CUDA
                tensors pass it on the CPU: a CUDA map is copied to the host (a sync).
            async_op: return before the payload transfer completes; call .wait() for the DispatchResult.
            tag: optional int compared across ranks (e.g. a step or layer counter): ranks that pass different tags
                raise on every rank, naming both values.

        Returns:
            DispatchResult (recv_x [M, H], recv_topk_weights float32 [M], tokens_per_expert int64 [L],
            expert_offsets int64 [L+1], handle), or a pending object whose wait() returns it.
        """
        # Local checks (docs/errors.md); ids, the placement and cross-rank agreement are checked by the runtime.
        v.check_tensor("x", x, dtypes=v.FLOAT_DTYPES, dim=2, layout="[num_tokens, hidden]")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"x must be on cpu (gloo) or cuda (NCCL), got {x.device}")
        v.check_tensor("topk_idx", topk_idx, dtypes=v.INDEX_DTYPES, dim=2, layout="[num_tokens, top_k]",
                       device=x.device, like="x")
        if topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"topk_idx must have shape [{x.shape[0]}, top_k] (num_tokens of x), got "
                             f"{list(topk_idx.shape)}")
        v.check_tensor("topk_weights", topk_weights, shape=tuple(topk_idx.shape), layout="like topk_idx",
                       device=x.device, like="x")
        if not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights must be a floating-point tensor, got {v.dtype_name(topk_weights.dtype)}")
        num_experts = v.check_int("num_experts", num_experts, minimum=1)
        v.check_choice("mode", mode, ("exact", "capacity"))
        if capacity is not None:
            capacity = v.check_int("capacity", capacity, minimum=0)
        elif mode == "capacity":
            raise ValueError("capacity must be given (rows per source/destination rank pair, >= 0) when "
                             "mode='capacity'")
        drop_overflow = v.check_bool("drop_overflow", drop_overflow)
        async_op = v.check_bool("async_op", async_op)
        if tag is not None:
            tag = v.check_int("tag", tag)
        if expert_to_rank is not None:
            v.check_tensor("expert_to_rank", expert_to_rank, dtypes=v.INDEX_DTYPES, shape=(num_experts,),
                           layout="(num_experts)")
        self._prepare(x)
        pending = _collective(
            "dispatch",
            self._runtime.dispatch,
            x.detach(),
            topk_idx,
            topk_weights.detach(),
            num_experts,
            expert_to_rank,
            mode,
            capacity,
            drop_overflow,
            tag,
        )

        def finish() -> DispatchResult:
            box: list = []
            recv_x, recv_w, tokens_per_expert, expert_offsets = _collective(
                "dispatch", _Dispatch.apply, x, topk_weights, self._runtime, pending, box
            )
            _log_overflow(box[0])
            return DispatchResult(recv_x, recv_w, tokens_per_expert, expert_offsets, DispatchHandle(box[0], recv_w))

        return _PendingDispatch(finish) if async_op else finish()

    def combine(
        self,
        expert_out: torch.Tensor,
        handle: DispatchHandle,
        recv_topk_weights: torch.Tensor | None = None,
        *,
        async_op: bool = False,
    ) -> torch.Tensor | _PendingCombine:
        """Bring the expert outputs back and sum them per token with the routing weights.

        Arguments:
            expert_out: [M, H] in the dispatched dtype, rows in the order of DispatchResult.recv_x.
            handle: the DispatchHandle of that dispatch.
            recv_topk_weights: float32 [M] weights to apply; default: handle.recv_topk_weights.
            async_op: return before the transfer completes; call .wait() for the output.

        Returns:
            [T, H] in x's dtype on the source rank: sum_j w[t, j] * expert_out[row(t, j)] (fp32 accumulation,
            fixed order). If the dispatch overflowed its capacity without drop_overflow: raises RuntimeError on CPU;
            on CUDA (no host sync) the tokens that lost rows are NaN and `handle.check()` raises.
        """
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a DispatchHandle from EPGroup.dispatch, got {type(handle).__name__}")
        # The runtime checks the shape and the dtype against the dispatch.
        v.check_tensor("expert_out", expert_out, dim=2, layout="[num_recv_rows, hidden]")
        if recv_topk_weights is not None:
            v.check_tensor("recv_topk_weights", recv_topk_weights, dim=1, layout="[num_recv_rows]",
                           device=expert_out.device, like="expert_out")
            if not recv_topk_weights.is_floating_point():
                raise TypeError(f"recv_topk_weights must be a floating-point tensor, got "
                                f"{v.dtype_name(recv_topk_weights.dtype)}")
        async_op = v.check_bool("async_op", async_op)
        weights = handle.recv_topk_weights if recv_topk_weights is None else recv_topk_weights
        native = handle._native
        pending = _collective("combine", self._runtime.combine, expert_out.detach(), weights.detach(), native)

        def finish() -> torch.Tensor:
            return _collective("combine", _Combine.apply, expert_out, weights, self._runtime, pending, native)

        return _PendingCombine(finish) if async_op else finish()

    @property
    def num_dispatches(self) -> int:
        """Dispatches this rank ran on the group: the sequence number compared across ranks in every dispatch."""
        return self._runtime.num_dispatches

    def synchronize(self) -> None:
        """Host wait, with the group's timeout, for every transfer issued so far: where a dead peer of
        capacity-mode CUDA transfers (which only order streams) becomes a RuntimeError. No-op for gloo."""
        self._runtime.synchronize()

    def destroy(self) -> None:
        """Release the NCCL communicator (if any) and detach from the process group. Call it explicitly."""
        self._runtime.destroy()
