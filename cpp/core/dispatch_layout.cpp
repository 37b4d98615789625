// Expert-parallel dispatch planning (torch-free). See dispatch_layout.h.
#include "cpp/core/dispatch_layout.h"

#include <sstream>

namespace epmoe::core {

namespace {

template <typename... Args>
std::string message(const Args&... args) {
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}

}  // namespace

std::string make_expert_placement(const int32_t* expert_to_rank, int num_experts, int num_ranks, ExpertPlacement* out) {
    if (num_ranks < 1) return message("the process group must have at least 1 rank, got ", num_ranks);
    if (num_experts < 1) return message("num_experts must be >= 1, got ", num_experts);
    if (expert_to_rank == nullptr && num_experts % num_ranks != 0) {
        return message("num_experts (", num_experts, ") must be divisible by the number of ranks (", num_ranks,
                       ") for the even expert split; pass expert_to_rank for other placements");
    }
    out->num_experts = num_experts;
    out->num_ranks = num_ranks;
    out->expert_to_rank.assign(num_experts, 0);
    out->expert_to_local.assign(num_experts, 0);
    out->num_local_experts.assign(num_ranks, 0);
    // FNV-1a over the map: a cheap fingerprint that the agreement header compares.
    uint64_t hash = 1469598103934665603ull;
    for (int e = 0; e < num_experts; ++e) {
        const int32_t r = expert_to_rank != nullptr ? expert_to_rank[e] : e / (num_experts / num_ranks);
        if (r < 0 || r >= num_ranks) {
            return message("expert_to_rank[", e, "] must be in [0, ", num_ranks, ") (rank ids), got ", r);
        }
        out->expert_to_rank[e] = r;
        out->expert_to_local[e] = out->num_local_experts[r]++;  // ascending expert id within a rank
        hash = (hash ^ static_cast<uint64_t>(r)) * 1099511628211ull;
    }
    out->fingerprint = hash;
    return "";
}

std::string plan_dispatch(const int32_t* topk_idx, int64_t num_tokens, int num_topk, const ExpertPlacement& placement,
                          int64_t capacity, SendPlan* out) {
    const int num_ranks = placement.num_ranks;
    const int num_experts = placement.num_experts;
    if (num_topk < 1) return message("topk_idx must have at least one column, got ", num_topk);
    for (int64_t i = 0; i < num_tokens * num_topk; ++i) {
        if (topk_idx[i] < -1 || topk_idx[i] >= num_experts) {
            return message("topk_idx values must be in [-1, ", num_experts, ") (num_experts), got ", topk_idx[i],
                           " at token ", i / num_topk, " slot ", i % num_topk);
        }
    }
    out->num_topk = num_topk;
    out->num_send_per_rank.assign(num_ranks, 0);
    out->num_overflow_per_rank.assign(num_ranks, 0);
    out->send_token_idx.clear();
    out->send_slot_expert.clear();
    // One pass per destination keeps the rank-major, token-ascending order without a sort.
    for (int r = 0; r < num_ranks; ++r) {
        for (int64_t t = 0; t < num_tokens; ++t) {
            const int32_t* ids = topk_idx + t * num_topk;
            bool goes_here = false;
            for (int j = 0; j < num_topk; ++j) goes_here |= ids[j] >= 0 && placement.expert_to_rank[ids[j]] == r;
            if (!goes_here) continue;
            if (capacity >= 0 && out->num_send_per_rank[r] >= capacity) {
                ++out->num_overflow_per_rank[r];
                continue;
            }
            ++out->num_send_per_rank[r];
            out->send_token_idx.push_back(static_cast<int32_t>(t));
            for (int j = 0; j < num_topk; ++j) {
                const bool here = ids[j] >= 0 && placement.expert_to_rank[ids[j]] == r;
                out->send_slot_expert.push_back(here ? placement.expert_to_local[ids[j]] : -1);
            }
        }
    }
    return "";
}

std::string expand_received(const int32_t* recv_slot_expert, int64_t num_recv, int num_topk, int num_local_experts,
                            RecvLayout* out) {
    out->tokens_per_expert.assign(num_local_experts, 0);
    for (int64_t i = 0; i < num_recv * num_topk; ++i) {
        const int32_t e = recv_slot_expert[i];
        if (e < -1 || e >= num_local_experts) {
            return message("received a slot for local expert ", e, " but this rank holds ", num_local_experts,
                           " experts: the ranks disagree on the expert placement");
        }
        if (e >= 0) ++out->tokens_per_expert[e];
    }
    out->expert_offsets.assign(num_local_experts + 1, 0);
    for (int e = 0; e < num_local_experts; ++e) {
        out->expert_offsets[e + 1] = out->expert_offsets[e] + out->tokens_per_expert[e];
    }
    const int64_t num_rows = out->expert_offsets[num_local_experts];
    out->row_src.assign(num_rows, 0);
    out->row_slot.assign(num_rows, 0);
    out->recv_slot_row.assign(num_recv * num_topk, num_rows);
    // NOTES: a stable counting sort: scanning (row, slot) ascending keeps that order inside each expert.
    std::vector<int64_t> cursor(out->expert_offsets.begin(), out->expert_offsets.end() - 1);
    for (int64_t i = 0; i < num_recv; ++i) {
        for (int j = 0; j < num_topk; ++j) {
            const int32_t e = recv_slot_expert[i * num_topk + j];
            if (e < 0) continue;
            const int64_t row = cursor[e]++;
            out->row_src[row] = static_cast<int32_t>(i);
            out->row_slot[row] = j;
            out->recv_slot_row[i * num_topk + j] = row;
        }
    }
    return "";
}

std::string check_peer_header(const DispatchHeader& mine, const DispatchHeader& theirs, int my_rank, int peer_rank) {
    if (theirs[kMagic] != kHeaderMagic) {
        return message("rank ", my_rank, " received a malformed dispatch header from rank ", peer_rank,
                       ": the ranks are not running the same collective sequence");
    }
    static const char* kNames[kHeaderLen] = {"magic",  "num_rows",  "num_overflow", "num_experts", "hidden size",
                                             "dtype",  "top-k",     "mode",         "capacity",    "expert_to_rank"};
    for (int f = kNumExperts; f < kHeaderLen; ++f) {
        if (mine[f] != theirs[f]) {
            return message("EP ranks disagree on ", kNames[f], ": rank ", my_rank, " has ", mine[f], ", rank ",
                           peer_rank, " has ", theirs[f]);
        }
    }
    return "";
}

}  // namespace epmoe::core
