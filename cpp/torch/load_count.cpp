// epmoe::count_slots: adds the routed (token, slot) pairs of one step to per-slot load counters (EPLB recorder).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpp/torch/load_count_common.h"

namespace epmoe {
namespace {

void count_slots_cpu(at::Tensor& counts, const at::Tensor& slot_idx) {
    check_count_slots_args(counts, slot_idx);
    const int64_t num_slots = counts.numel(), n = slot_idx.numel();
    const int32_t* idx = slot_idx.data_ptr<int32_t>();
    int64_t* out = counts.data_ptr<int64_t>();
    // Serial: one pass over T*k ids costs less than waking the thread pool. Ids outside [-1, num_slots) are never
    // written; they are reported after the pass (the valid ids of the call are counted by then).
    bool out_of_range = false;
    for (int64_t i = 0; i < n; ++i) {
        const int32_t s = idx[i];
        if (s >= 0 and s < num_slots)
            ++out[s];
        else
            out_of_range |= s != -1;
    }
    TORCH_CHECK_VALUE(not out_of_range, "slot_idx holds ids outside [-1, ", num_slots, ")");
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // counts int64 [P] += number of occurrences of each slot id in slot_idx int32 [...] (-1 = skipped).
    m.def("count_slots(Tensor(a!) counts, Tensor slot_idx) -> ()");
}

TORCH_LIBRARY_IMPL(epmoe, CPU, m) {
    m.impl("count_slots", &epmoe::count_slots_cpu);
}
