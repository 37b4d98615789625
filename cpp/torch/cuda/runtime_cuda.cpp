// Device side of the EP runtime: thin wrappers of the torch-free launchers (cuda/dispatch_plan.cuh,
// cuda/permute.cuh) on the current stream. See cpp/torch/runtime_device.h.
#include "cpp/torch/runtime_device.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cpp/core/check.h"
#include "cpp/core/dispatch_plan.h"
#include "cpp/torch/route_common.h"
#include "cuda/dispatch_plan.cuh"
#include "cuda/permute.cuh"

namespace epmoe::device {
namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

cuda::HeaderRow header_row(const core::DispatchHeader& h) {
    cuda::HeaderRow row;
    std::copy(h.begin(), h.end(), row.v);
    return row;
}

}  // namespace

bool capturing(const at::Device& device) {
    const c10::cuda::CUDAGuard guard(device);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    EPMOE_CUDA_CHECK(cudaStreamIsCapturing(stream(), &status));
    return status != cudaStreamCaptureStatusNone;
}

SendPlan plan_send(const at::Tensor& topk_idx, const at::Tensor& expert_to_rank, int64_t num_experts,
                   int64_t num_ranks, int64_t capacity, const core::DispatchHeader& mine) {
    const c10::cuda::CUDAGuard guard(topk_idx.device());
    const auto i64 = topk_idx.options().dtype(at::kLong);
    SendPlan plan;
    plan.token_rank_pos = at::empty({topk_idx.size(0), num_ranks}, topk_idx.options());
    plan.counts = at::empty({core::kNumPlanCounts, num_ranks}, i64);
    plan.bad_slot = at::empty({1}, i64);
    plan.headers = at::empty({num_ranks, core::kHeaderLen}, i64);
    cuda::launch_plan_send(topk_idx.data_ptr<int32_t>(), topk_idx.size(0), static_cast<int>(topk_idx.size(1)),
                           expert_to_rank.data_ptr<int32_t>(), static_cast<int>(num_experts),
                           static_cast<int>(num_ranks), capacity, header_row(mine),
                           plan.token_rank_pos.data_ptr<int32_t>(), plan.counts.data_ptr<int64_t>(),
                           plan.bad_slot.data_ptr<int64_t>(), plan.headers.data_ptr<int64_t>(), stream());
    return plan;
}

std::tuple<at::Tensor, at::Tensor> plan_wire_rows(const SendPlan& plan, int64_t num_wire_rows) {
    const c10::cuda::CUDAGuard guard(plan.counts.device());
    auto token_wire_row = at::empty(plan.token_rank_pos.sizes(), plan.token_rank_pos.options());
    auto wire_token = at::empty({num_wire_rows}, plan.token_rank_pos.options());
    cuda::launch_plan_wire_rows(plan.token_rank_pos.data_ptr<int32_t>(), plan.token_rank_pos.size(0),
                                static_cast<int>(plan.counts.size(1)), plan.counts.data_ptr<int64_t>(), num_wire_rows,
                                token_wire_row.data_ptr<int32_t>(), wire_token.data_ptr<int32_t>(), stream());
    return {token_wire_row, wire_token};
}

at::Tensor headers_agree(const core::DispatchHeader& mine, const at::Tensor& recv_headers) {
    const c10::cuda::CUDAGuard guard(recv_headers.device());
    auto ok = at::empty({1}, recv_headers.options().dtype(at::kInt));
    cuda::launch_headers_agree(header_row(mine), recv_headers.data_ptr<int64_t>(),
                               static_cast<int>(recv_headers.size(0)), ok.data_ptr<int32_t>(), stream());
    return ok;
}

at::Tensor pack_wire(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                     const at::Tensor& expert_to_rank, const at::Tensor& expert_to_local, const at::Tensor& counts,
                     const at::Tensor& wire_token, int64_t row_bytes) {
    const c10::cuda::CUDAGuard guard(x.device());
    auto wire = at::empty({wire_token.size(0), row_bytes}, x.options().dtype(at::kByte));
    cuda::launch_pack_wire(x.data_ptr(), x.size(1) * x.element_size(), topk_idx.data_ptr<int32_t>(),
                           topk_weights.data_ptr<float>(), static_cast<int>(topk_idx.size(1)),
                           expert_to_rank.data_ptr<int32_t>(), expert_to_local.data_ptr<int32_t>(),
                           static_cast<int>(expert_to_rank.size(0)), counts.data_ptr<int64_t>(),
                           static_cast<int>(counts.size(1)), wire_token.data_ptr<int32_t>(), wire_token.size(0),
                           row_bytes, wire.data_ptr(), stream());
    return wire;
}

at::Tensor gather_rows(const at::Tensor& src, int64_t row_bytes, const at::Tensor& index, int64_t divisor) {
    TORCH_INTERNAL_ASSERT(src.dim() == 2 && src.scalar_type() == at::kByte && src.stride(1) == 1);
    const c10::cuda::CUDAGuard guard(src.device());
    auto out = at::empty({index.numel(), row_bytes}, src.options());
    cuda::launch_gather_rows(src.data_ptr(), src.stride(0), row_bytes, index.data_ptr<int32_t>(),
                             static_cast<int>(divisor), index.numel(), out.data_ptr(), row_bytes, stream());
    return out;
}

at::Tensor sum_rows(const at::Tensor& rows, const at::Tensor& index, const at::Tensor& weights) {
    const c10::cuda::CUDAGuard guard(rows.device());
    const at::Tensor rows_c = rows.contiguous();
    const at::Tensor w = weights.defined() ? weights.to(at::kFloat).contiguous()
                                           : at::ones(index.sizes(), rows.options().dtype(at::kFloat));
    auto out = at::empty({index.size(0), rows.size(1)}, rows.options());
    cuda::launch_moe_unpermute(rows_c.data_ptr(), to_dtype(rows_c, "rows"), index.data_ptr<int32_t>(),
                               w.data_ptr<float>(), index.size(0), static_cast<int>(index.size(1)), rows.size(1),
                               out.data_ptr(), stream());
    return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_layout(const at::Tensor& slots,
                                                                         int64_t num_local_experts) {
    TORCH_CHECK_VALUE(num_local_experts >= 1 && num_local_experts <= cuda::kMaxLayoutExperts,
                      "a rank may hold at most ", cuda::kMaxLayoutExperts, " experts on CUDA, got ",
                      num_local_experts);
    const c10::cuda::CUDAGuard guard(slots.device());
    const int64_t num_slots = slots.numel();
    const int e = static_cast<int>(num_local_experts);
    const auto i64 = slots.options().dtype(at::kLong);
    auto tokens_per_expert = at::empty({num_local_experts}, i64);
    auto expert_offsets = at::empty({num_local_experts + 1}, i64);
    auto slot_to_row = at::empty(slots.sizes(), slots.options());
    auto row_to_slot = at::empty({num_slots}, slots.options());
    auto workspace = at::empty({static_cast<int64_t>(cuda::moe_layout_workspace_bytes(num_slots, e))},
                               slots.options().dtype(at::kByte));
    cuda::launch_moe_layout(slots.data_ptr<int32_t>(), num_slots, e, nullptr, e,
                            tokens_per_expert.data_ptr<int64_t>(), expert_offsets.data_ptr<int64_t>(),
                            slot_to_row.data_ptr<int32_t>(), row_to_slot.data_ptr<int32_t>(), workspace.data_ptr(),
                            stream());
    return {tokens_per_expert, expert_offsets, slot_to_row, row_to_slot};
}

}  // namespace epmoe::device
