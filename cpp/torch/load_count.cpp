// epmoe::count_slots: adds the routed (token, slot) pairs of one step to per-slot load counters (EPLB recorder).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpp/torch/load_count_common.h"

namespace epmoe {
namespace {

constexpr int kTables = 4;              // interleaved sub-histograms: consecutive equal ids do not chain on one counter
constexpr int64_t kParallelIds = 1 << 14;  // below this one pass costs less than waking the thread pool

// Counts ids [begin, end) into bins[id + 1] (bin 0: the skipped -1 ids, bin num_slots + 1: any id outside
// [-1, num_slots)), branch-free: kTables interleaved tables of num_slots + 2 bins, summed into `bins`.
void count_range(const int32_t* idx, int64_t begin, int64_t end, int64_t num_slots, int64_t* bins) {
    const int64_t width = num_slots + 2;
    const uint32_t last = static_cast<uint32_t>(num_slots + 1);
    std::vector<uint32_t> tables(kTables * width, 0u);
    uint32_t* t = tables.data();
    const auto bin = [last](int32_t s) {
        const uint32_t u = static_cast<uint32_t>(s) + 1u;  // -1 -> 0; other negatives wrap above `last`
        return u < last ? u : last;
    };
    int64_t i = begin;
    for (; i + kTables <= end; i += kTables) {
        ++t[bin(idx[i])];
        ++t[width + bin(idx[i + 1])];
        ++t[2 * width + bin(idx[i + 2])];
        ++t[3 * width + bin(idx[i + 3])];
    }
    for (; i < end; ++i) ++t[bin(idx[i])];
    for (int64_t b = 0; b < width; ++b) bins[b] += int64_t{t[b]} + t[width + b] + t[2 * width + b] + t[3 * width + b];
}

void count_slots_cpu(at::Tensor& counts, const at::Tensor& slot_idx) {
    check_count_slots_args(counts, slot_idx);
    const int64_t num_slots = counts.numel(), n = slot_idx.numel(), width = num_slots + 2;
    const int32_t* idx = slot_idx.data_ptr<int32_t>();
    int64_t* out = counts.data_ptr<int64_t>();
    // One bins row per chunk (at most one chunk per thread above kParallelIds ids), summed in chunk order: integer
    // sums, so the counts do not depend on the split. Ids outside [-1, num_slots) are never counted; they are
    // reported after the pass (the valid ids of the call are counted by then).
    const int64_t num_chunks = n < kParallelIds ? 1 : std::min<int64_t>(at::get_num_threads(), n / (kParallelIds / 2));
    std::vector<int64_t> bins(num_chunks * width, 0);
    const auto count_chunk = [&](int64_t c) {
        count_range(idx, n * c / num_chunks, n * (c + 1) / num_chunks, num_slots, bins.data() + c * width);
    };
    if (num_chunks == 1) {
        count_chunk(0);
    } else {
        at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
            for (int64_t c = begin; c < end; ++c) count_chunk(c);
        });
    }
    int64_t out_of_range = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t* row = bins.data() + c * width;
        for (int64_t s = 0; s < num_slots; ++s) out[s] += row[s + 1];
        out_of_range += row[width - 1];
    }
    TORCH_CHECK_VALUE(out_of_range == 0, "slot_idx holds ids outside [-1, ", num_slots, ")");
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
