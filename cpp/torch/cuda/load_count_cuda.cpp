// epmoe::count_slots CUDA impl: the torch-free counter kernel on the current stream (no host sync).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cpp/torch/load_count_common.h"
#include "cuda/load_count.cuh"

namespace epmoe {
namespace {

void count_slots_cuda(at::Tensor& counts, const at::Tensor& slot_idx) {
    check_count_slots_args(counts, slot_idx);
    const c10::cuda::CUDAGuard guard(counts.device());
    cuda::launch_count_slots(counts.data_ptr<int64_t>(), counts.numel(), slot_idx.data_ptr<int32_t>(),
                             slot_idx.numel(), c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_IMPL(epmoe, CUDA, m) {
    m.impl("count_slots", &epmoe::count_slots_cuda);
}
