// The send plan of a dispatch in the form the device computes it (cuda/dispatch_plan.cuh): fixed-size arrays
// indexed by (token, destination rank) and by wire row, built from topk_idx without any host read. These
// functions are the CPU twins of those kernels, step for step, and their oracle in the tests; they describe the
// same plan as plan_dispatch (dispatch_layout.h): a token goes once to every rank owning one of its experts,
// rows are ordered by destination rank then token, capacity mode keeps the earliest `capacity` tokens per rank.
//
// Wire layout: rank r's rows start at base[r]; exact mode packs them (base = exclusive prefix sum of the rows
// sent), capacity mode gives every rank `capacity` rows (base = r * capacity; unused rows are padding).
#pragma once

#include <cstdint>

#include "cpp/core/dispatch_layout.h"

namespace epmoe::core {

// Rows of the per-rank counts array counts [kNumPlanCounts, num_ranks] (int64).
enum PlanCount : int {
    kWanted = 0,  // tokens that have at least one expert on the rank
    kSent,        // of those, rows sent (capacity mode: at most `capacity`)
    kOverflow,    // kWanted - kSent
    kSentSlots,   // (row, slot) pairs of the sent rows that land on the rank's experts
    kBase,        // first wire row of the rank
    kNumPlanCounts
};

// token_rank_pos values besides positions >= 0.
constexpr int32_t kNotSent = -1;   // the token has no expert on that rank
constexpr int32_t kOverflowed = -2;  // it has, but the rank's capacity was full

// Step 1 (device: one block per destination rank). For every rank r and token t: token_rank_pos[t * R + r] = the
// position of t among the tokens sent to r (ascending t), kNotSent or kOverflowed; counts rows kWanted, kSent,
// kOverflow, kSentSlots. Ids outside [-1, num_experts) are skipped like -1, and *bad_slot receives the first such
// flat slot (num_tokens * num_topk when there is none). capacity < 0: exact mode.
void plan_rank_counts(const int32_t* topk_idx, int64_t num_tokens, int num_topk, const int32_t* expert_to_rank,
                      int num_experts, int num_ranks, int64_t capacity, int32_t* token_rank_pos, int64_t* counts,
                      int64_t* bad_slot);

// Step 2 (device: one block). counts row kBase; returns the number of wire rows (exact: the rows sent; capacity:
// num_ranks * capacity).
int64_t plan_rank_offsets(int num_ranks, int64_t capacity, int64_t* counts);

// Step 3 (device: one thread per (token, rank)). token_wire_row[t * R + r] = base[r] + position, or the
// kNotSent / kOverflowed of token_rank_pos; wire_token[row] = t for every sent row. wire_token [num_wire_rows]
// must be pre-filled with -1 (capacity padding keeps it).
void plan_wire_rows(const int32_t* token_rank_pos, int64_t num_tokens, int num_ranks, const int64_t* counts,
                    int32_t* token_wire_row, int32_t* wire_token);

// The destination rank of wire row w: the largest r with base[r] <= w (ranks that send nothing share the base of
// the next rank, so the largest one is the rank that owns the row).
int wire_row_rank(const int64_t* counts, int num_ranks, int64_t w);

// The slot list and weights of wire row w as the receiver reads them (device: the meta part of the pack kernel):
// slots[j] = the destination-local expert of slot j, -1 where slot j is not on the row's rank (or the row is
// padding); weights[j] = topk_weights of the slot, 0 where slots[j] == -1.
void wire_row_slots(const int32_t* topk_idx, const float* topk_weights, int num_topk, const int32_t* expert_to_rank,
                    const int32_t* expert_to_local, int num_experts, int dest_rank, int32_t token, int32_t* slots,
                    float* weights);

}  // namespace epmoe::core
