// CPU twins of the device dispatch planner (cuda/dispatch_plan.cu). See dispatch_plan.h.
#include "cpp/core/dispatch_plan.h"

#include <algorithm>

namespace epmoe::core {

void plan_rank_counts(const int32_t* topk_idx, int64_t num_tokens, int num_topk, const int32_t* expert_to_rank,
                      int num_experts, int num_ranks, int64_t capacity, int32_t* token_rank_pos, int64_t* counts,
                      int64_t* bad_slot) {
    const int64_t num_slots = num_tokens * num_topk;
    *bad_slot = num_slots;
    for (int64_t f = 0; f < num_slots; ++f) {
        if (topk_idx[f] < -1 || topk_idx[f] >= num_experts) {
            *bad_slot = f;
            break;
        }
    }
    for (int r = 0; r < num_ranks; ++r) {
        int64_t pos = 0, sent_slots = 0;
        for (int64_t t = 0; t < num_tokens; ++t) {
            int64_t slots_here = 0;
            for (int j = 0; j < num_topk; ++j) {
                const int32_t e = topk_idx[t * num_topk + j];
                if (e >= 0 && e < num_experts && expert_to_rank[e] == r) ++slots_here;
            }
            int32_t value = kNotSent;
            if (slots_here > 0) {
                const bool kept = capacity < 0 || pos < capacity;
                value = kept ? static_cast<int32_t>(pos) : kOverflowed;
                if (kept) sent_slots += slots_here;
                ++pos;
            }
            token_rank_pos[t * num_ranks + r] = value;
        }
        const int64_t sent = capacity < 0 ? pos : std::min(pos, capacity);
        counts[kWanted * num_ranks + r] = pos;
        counts[kSent * num_ranks + r] = sent;
        counts[kOverflow * num_ranks + r] = pos - sent;
        counts[kSentSlots * num_ranks + r] = sent_slots;
    }
}

int64_t plan_rank_offsets(int num_ranks, int64_t capacity, int64_t* counts) {
    int64_t base = 0;
    for (int r = 0; r < num_ranks; ++r) {
        counts[kBase * num_ranks + r] = capacity < 0 ? base : r * capacity;
        base += counts[kSent * num_ranks + r];
    }
    return capacity < 0 ? base : num_ranks * capacity;
}

void plan_wire_rows(const int32_t* token_rank_pos, int64_t num_tokens, int num_ranks, const int64_t* counts,
                    int32_t* token_wire_row, int32_t* wire_token) {
    for (int64_t i = 0; i < num_tokens * num_ranks; ++i) {
        const int32_t pos = token_rank_pos[i];
        if (pos < 0) {
            token_wire_row[i] = pos;
            continue;
        }
        const int64_t row = counts[kBase * num_ranks + i % num_ranks] + pos;
        token_wire_row[i] = static_cast<int32_t>(row);
        wire_token[row] = static_cast<int32_t>(i / num_ranks);
    }
}

int wire_row_rank(const int64_t* counts, int num_ranks, int64_t w) {
    int lo = 0, hi = num_ranks - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (counts[kBase * num_ranks + mid] <= w) lo = mid; else hi = mid - 1;
    }
    return lo;
}

void wire_row_slots(const int32_t* topk_idx, const float* topk_weights, int num_topk, const int32_t* expert_to_rank,
                    const int32_t* expert_to_local, int num_experts, int dest_rank, int32_t token, int32_t* slots,
                    float* weights) {
    for (int j = 0; j < num_topk; ++j) {
        const int32_t e = token >= 0 ? topk_idx[static_cast<int64_t>(token) * num_topk + j] : -1;
        const bool here = e >= 0 && e < num_experts && expert_to_rank[e] == dest_rank;
        slots[j] = here ? expert_to_local[e] : -1;
        weights[j] = here ? topk_weights[static_cast<int64_t>(token) * num_topk + j] : 0.0f;
    }
}

}  // namespace epmoe::core
