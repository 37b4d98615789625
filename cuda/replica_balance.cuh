// Launcher of the "balanced" replica choice (EPLB). Torch-free: raw pointers, sizes, a stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cpp/core/replica_balance.h"

namespace epmoe::cuda {

// Largest expert count the kernels support (per-expert counters live in shared memory).
constexpr int kBalanceMaxExperts = 8192;

// Bytes of device workspace launch_balance_replicas needs for `num_pairs` (token, slot) pairs.
size_t balance_workspace_bytes(const core::BalanceShape& s, int64_t num_pairs);

// Same result as the CPU op epmoe::balance_replicas (bitwise equal slot ids), with no host sync and no allocation:
// graph-capturable. Pairs are counted per chunk, one block solves the quotas (core::balance_quotas on one thread),
// then every pair takes its replica from its group index (stable per-expert rank: chunk offset + rank in chunk).
//   topk_idx  [num_pairs] int32 (is_int64 = false) or int64 logical ids, -1 = skipped; other invalid ids give -1
//   log2phy   [E, M] int64, logcnt [E] int64 (not validated here: bad rows are solved as "all on replica 0")
//   counts    [E] int64 pairs of the whole group, or nullptr (this call's pairs); prefix [E] int64 or nullptr
//   workspace balance_workspace_bytes(s, num_pairs) bytes, 8-byte aligned
//   slot_idx  [num_pairs] (out), topk_idx's type
void launch_balance_replicas(const void* topk_idx, bool is_int64, int64_t num_pairs, const core::BalanceShape& s,
                             const int64_t* log2phy, const int64_t* logcnt, const int64_t* counts,
                             const int64_t* prefix, void* workspace, void* slot_idx, cudaStream_t stream);

}  // namespace epmoe::cuda
