// Token permutation for the expert path, CPU implementation (torch-free). Semantics: DESIGN.md §3.
//
// Flat slot f = t * num_topk + j. Rows are expert-major, ascending f inside an expert, so the layout is
// deterministic whatever the chunking. The layout is built in three passes that callers parallelise over
// token chunks: count (per chunk, per expert), offsets (serial prefix sum over experts then chunks), place.
#pragma once

#include <cstdint>

#include "cpp/core/types.h"

namespace epmoe::core {

struct LayoutParams {
    int64_t num_tokens = 0;
    int num_topk = 0;
    int num_experts = 0;         // experts the rows are segmented over
    int64_t num_map_entries = 0; // size of expert_map (ids index it), 0 when there is no map
};

// Counts the local slots of tokens [token_begin, token_end) per expert.
//   topk_idx    [num_tokens, num_topk] int32, -1 = skipped slot
//   expert_map  [num_map_entries] int32 mapping ids to local experts (-1 = not local), or nullptr
//   counts      [num_experts] int64 (out, overwritten)
// Returns the flat index of the first out-of-range id in the range, or -1 when all ids are valid.
int64_t layout_count(const LayoutParams& p, const int32_t* topk_idx, const int32_t* expert_map, int64_t token_begin,
                     int64_t token_end, int64_t* counts);

// Turns per-chunk counts into the layout offsets (serial; O(num_chunks * num_experts)).
//   chunk_counts      [num_chunks, num_experts] int64, from layout_count
//   tokens_per_expert [num_experts] int64 (out)
//   expert_offsets    [num_experts + 1] int64 (out), exclusive prefix sum, [0] = 0
//   chunk_cursors     [num_chunks, num_experts] int64 (out): first row of each chunk's slots of each expert
void layout_offsets(const int64_t* chunk_counts, int num_chunks, int num_experts, int64_t* tokens_per_expert,
                    int64_t* expert_offsets, int64_t* chunk_cursors);

// Places the slots of tokens [token_begin, token_end), whose ids layout_count already validated.
//   cursors      [num_experts] int64, this chunk's row of chunk_cursors (advanced in place)
//   slot_to_row  [num_tokens, num_topk] int32 (out for the range): row of each slot, -1 when skipped
//   row_to_slot  [num_tokens * num_topk] int32 (out for the rows of the range's slots)
void layout_place(const LayoutParams& p, const int32_t* topk_idx, const int32_t* expert_map, int64_t token_begin,
                  int64_t token_end, int64_t* cursors, int32_t* slot_to_row, int32_t* row_to_slot);

// rows[r] = x[row_to_slot[r] / num_topk] for r in [row_begin, row_end), zero where row_to_slot[r] == -1.
// Rows are row_bytes wide: the gather is a copy, so it is dtype-agnostic. row_to_slot must be validated.
void permute_rows(const void* x, int64_t row_bytes, const int32_t* row_to_slot, int num_topk, int64_t row_begin,
                  int64_t row_end, void* rows);

// Weighted sum of each token's rows (the unpermute / combine), for tokens [token_begin, token_end):
//   out[t] = sum_j topk_weights[t, j] * rows[r(t, j)] over the slots with slot_to_row[t, j] >= 0, ascending j,
//   in fp32 with a separate multiply and add per term (the CUDA kernel's order, so both agree bitwise), rounded
//   once to `dtype`. r(t, j) = slot_to_row[t, j], or the flat slot t * num_topk + j when rows_by_slot.
//   rows [*, hidden] and out [num_tokens, hidden] of `dtype`; topk_weights float32 [num_tokens, num_topk].
//   addend: nullptr, or [num_tokens, hidden] of `dtype` added to the rounded sum, then rounded again (what adding
//   two `dtype` tensors does: the shared experts' output).
void unpermute_rows(DType dtype, const void* rows, int64_t hidden, const int32_t* slot_to_row, bool rows_by_slot,
                    const float* topk_weights, int num_topk, const void* addend, int64_t token_begin,
                    int64_t token_end, void* out);

// Index of the first value outside [lo, hi) in values[0, n), or -1.
int64_t find_out_of_range(const int32_t* values, int64_t n, int64_t lo, int64_t hi);

}  // namespace epmoe::core
