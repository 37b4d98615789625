// Launcher of the per-slot load counter (EPLB recorder). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace epmoe::cuda {

// counts[s] += #{i : slot_idx[i] == s} for s in [0, num_slots); -1 and out-of-range ids are ignored (no host sync
// to report them). Deterministic: integer atomics commute.
void launch_count_slots(int64_t* counts, int64_t num_slots, const int32_t* slot_idx, int64_t num_ids,
                        cudaStream_t stream);

}  // namespace epmoe::cuda
