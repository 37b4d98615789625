// Expert-parallel dispatch planning (torch-free). See dispatch_layout.h.
#include "cpp/core/dispatch_layout.h"

#include <algorithm>
#include <limits>
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

int64_t find_bad_expert_id(const int32_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts) {
    for (int64_t i = 0; i < num_tokens * num_topk; ++i) {
        if (topk_idx[i] < -1 || topk_idx[i] >= num_experts) return i;
    }
    return -1;
}

std::string plan_dispatch(const int32_t* topk_idx, int64_t num_tokens, int num_topk, const ExpertPlacement& placement,
                          int64_t capacity, SendPlan* out) {
    const int num_ranks = placement.num_ranks;
    const int num_experts = placement.num_experts;
    if (num_topk < 1) return message("topk_idx must have at least one column, got ", num_topk);
    const int64_t bad = find_bad_expert_id(topk_idx, num_tokens, num_topk, num_experts);
    if (bad >= 0) {
        return message("topk_idx values must be in [-1, ", num_experts, ") (num_experts), got ", topk_idx[bad],
                       " at token ", bad / num_topk, " slot ", bad % num_topk);
    }
    out->num_topk = num_topk;
    out->num_send_per_rank.assign(num_ranks, 0);
    out->num_overflow_per_rank.assign(num_ranks, 0);
    // ---- pass 1: rows wanted per destination. last_token[r] deduplicates a token's slots on one rank.
    std::vector<int64_t> last_token(num_ranks, -1);
    std::vector<int64_t> num_wanted(num_ranks, 0);
    for (int64_t t = 0; t < num_tokens; ++t) {
        for (int j = 0; j < num_topk; ++j) {
            const int32_t e = topk_idx[t * num_topk + j];
            if (e < 0) continue;
            const int32_t r = placement.expert_to_rank[e];
            if (last_token[r] != t) last_token[r] = t, ++num_wanted[r];
        }
    }
    std::vector<int64_t> rank_offset(num_ranks + 1, 0);
    for (int r = 0; r < num_ranks; ++r) {
        out->num_send_per_rank[r] = capacity >= 0 ? std::min(num_wanted[r], capacity) : num_wanted[r];
        out->num_overflow_per_rank[r] = num_wanted[r] - out->num_send_per_rank[r];
        rank_offset[r + 1] = rank_offset[r] + out->num_send_per_rank[r];
    }
    const int64_t num_send = rank_offset[num_ranks];
    out->send_token_idx.assign(num_send, 0);
    out->send_slot_expert.assign(num_send * num_topk, -1);
    // ---- pass 2: tokens ascending fill each rank's block in order; the capacity keeps the earliest tokens.
    // NOTES: token_row[r] is the row of token t on rank r, valid while last_token[r] == t (-1: clipped).
    std::vector<int64_t> cursor(rank_offset.begin(), rank_offset.end() - 1);
    std::vector<int64_t> token_row(num_ranks, -1);
    std::fill(last_token.begin(), last_token.end(), -1);
    for (int64_t t = 0; t < num_tokens; ++t) {
        for (int j = 0; j < num_topk; ++j) {
            const int32_t e = topk_idx[t * num_topk + j];
            if (e < 0) continue;
            const int32_t r = placement.expert_to_rank[e];
            if (last_token[r] != t) {
                last_token[r] = t;
                token_row[r] = cursor[r] < rank_offset[r + 1] ? cursor[r]++ : -1;
                if (token_row[r] >= 0) out->send_token_idx[token_row[r]] = static_cast<int32_t>(t);
            }
            if (token_row[r] >= 0) out->send_slot_expert[token_row[r] * num_topk + j] = placement.expert_to_local[e];
        }
    }
    // ---- each token's rows, ascending rank: a stable counting sort of the rank-major rows by token
    out->token_send_offsets.assign(num_tokens + 1, 0);
    for (int64_t i = 0; i < num_send; ++i) ++out->token_send_offsets[out->send_token_idx[i] + 1];
    for (int64_t t = 0; t < num_tokens; ++t) out->token_send_offsets[t + 1] += out->token_send_offsets[t];
    out->token_send_rows.assign(num_send, 0);
    std::vector<int64_t> fill(out->token_send_offsets.begin(), out->token_send_offsets.end() - 1);
    for (int64_t i = 0; i < num_send; ++i) {
        out->token_send_rows[fill[out->send_token_idx[i]]++] = static_cast<int32_t>(i);
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
    if (num_rows > std::numeric_limits<int32_t>::max()) {
        return message("this rank would receive ", num_rows, " expert rows, more than int32 row indices hold");
    }
    out->row_src.assign(num_rows, 0);
    out->row_slot.assign(num_rows, 0);
    out->recv_slot_row.assign(num_recv * num_topk, static_cast<int32_t>(num_rows));
    // NOTES: a stable counting sort: scanning (row, slot) ascending keeps that order inside each expert.
    std::vector<int64_t> cursor(out->expert_offsets.begin(), out->expert_offsets.end() - 1);
    for (int64_t i = 0; i < num_recv; ++i) {
        for (int j = 0; j < num_topk; ++j) {
            const int32_t e = recv_slot_expert[i * num_topk + j];
            if (e < 0) continue;
            const int64_t row = cursor[e]++;
            out->row_src[row] = static_cast<int32_t>(i);
            out->row_slot[row] = j;
            out->recv_slot_row[i * num_topk + j] = static_cast<int32_t>(row);
        }
    }
    return "";
}

DispatchHeader make_header(int64_t num_experts, int64_t hidden, int dtype, int64_t num_topk, bool capacity_mode,
                           int64_t capacity, uint64_t placement_fingerprint, int64_t sequence, int64_t tag) {
    DispatchHeader h{};
    h[kMagic] = kHeaderMagic;
    h[kSequence] = sequence;
    h[kTag] = tag;
    h[kNumExperts] = num_experts;
    h[kHidden] = hidden;
    h[kDType] = dtype;
    h[kNumTopk] = num_topk;
    h[kMode] = capacity_mode ? 1 : 0;
    h[kCapacity] = capacity_mode ? capacity : -1;
    h[kPlacement] = static_cast<int64_t>(placement_fingerprint >> 2);
    return h;
}

namespace {

const char* dtype_name(int64_t code) {
    switch (code) {
        case 0: return "float32";
        case 1: return "bfloat16";
        case 2: return "float16";
        default: return "an unknown dtype";
    }
}

// A field's value as the message prints it.
std::string field_value(int field, int64_t v) {
    switch (field) {
        case kDType: return dtype_name(v);
        case kMode: return v == 1 ? "capacity" : "exact";
        case kCapacity: return v < 0 ? "none (exact mode)" : std::to_string(v);
        case kTag: return v == kNoTag ? "none" : std::to_string(v);
        default: return std::to_string(v);
    }
}

}  // namespace

std::string describe_error(const DispatchHeader& theirs, int peer_rank) {
    const char* tail = "; the dispatch was abandoned on every rank of the EP group";
    switch (theirs[kError]) {
        case kBadExpertId: {
            const int64_t k = theirs[kNumTopk] > 0 ? theirs[kNumTopk] : 1;
            return message("topk_idx values must be in [-1, ", theirs[kNumExperts], ") (num_experts): rank ",
                           peer_rank, " has ", theirs[kErrorValue], " at token ", theirs[kErrorIndex] / k, " slot ",
                           theirs[kErrorIndex] % k, tail);
        }
        case kBadExpertMap:
            return message("expert_to_rank values must be rank ids in [0, num_ranks): rank ", peer_rank, " has ",
                           theirs[kErrorValue], " at expert_to_rank[", theirs[kErrorIndex], "]", tail);
        default:
            return message("rank ", peer_rank, " reported dispatch error code ", theirs[kError], tail);
    }
}

std::string check_peer_header(const DispatchHeader& mine, const DispatchHeader& theirs, int my_rank, int peer_rank) {
    if (theirs[kMagic] != kHeaderMagic) {
        return message("rank ", my_rank, " received a malformed dispatch header from rank ", peer_rank,
                       ": the ranks are not running the same collective sequence");
    }
    if (mine[kSequence] != theirs[kSequence]) {
        return message("EP ranks are out of step: rank ", my_rank, " is at dispatch ", mine[kSequence],
                       " of this EP group, rank ", peer_rank, " at dispatch ", theirs[kSequence],
                       "; every rank must run the same EP collectives in the same order (a forward, rebalance or "
                       "sync_grads that ran on some ranks only?)");
    }
    if (mine[kTag] != theirs[kTag]) {
        return message("EP ranks disagree on the dispatch tag: rank ", my_rank, " has ", field_value(kTag, mine[kTag]),
                       ", rank ", peer_rank, " has ", field_value(kTag, theirs[kTag]),
                       " (the ranks are not running the same step of the same layer)");
    }
    static const char* kNames[kHeaderLen - kNumExperts] = {"num_experts", "hidden size", "dtype",         "top-k",
                                                           "mode",        "capacity",    "expert_to_rank"};
    for (int f = kNumExperts; f < kHeaderLen; ++f) {
        if (mine[f] == theirs[f]) continue;
        if (f == kPlacement) {
            return message("EP ranks disagree on expert_to_rank: rank ", my_rank, " and rank ", peer_rank,
                           " map experts to ranks differently (placement fingerprints ", mine[f], " and ", theirs[f],
                           ")");
        }
        return message("EP ranks disagree on ", kNames[f - kNumExperts], ": rank ", my_rank, " has ", field_value(f, mine[f]),
                       ", rank ", peer_rank, " has ", field_value(f, theirs[f]));
    }
    return "";
}

std::string check_headers(const DispatchHeader& mine, const DispatchHeader* recv, int num_ranks, int my_rank,
                          int* field) {
    int failed = kMagic;
    std::string msg;
    for (int r = 0; r < num_ranks && msg.empty(); ++r) {
        if (recv[r][kMagic] != kHeaderMagic) msg = check_peer_header(mine, recv[r], my_rank, r);
    }
    for (int r = 0; r < num_ranks && msg.empty(); ++r) {
        if (recv[r][kError] != kNoError) msg = describe_error(recv[r], r), failed = kError;
    }
    for (int r = 0; r < num_ranks && msg.empty(); ++r) {
        msg = check_peer_header(mine, recv[r], my_rank, r);
        for (failed = kSequence; !msg.empty() && failed < kHeaderLen && mine[failed] == recv[r][failed];) ++failed;
    }
    if (field != nullptr) *field = failed;
    return msg;
}

bool headers_agree(const DispatchHeader& mine, const DispatchHeader* recv, int num_ranks) {
    for (int r = 0; r < num_ranks; ++r) {
        if (recv[r][kMagic] != kHeaderMagic || recv[r][kError] != kNoError) return false;
        for (int f = kSequence; f < kHeaderLen; ++f) {
            if (recv[r][f] != mine[f]) return false;
        }
    }
    return true;
}

}  // namespace epmoe::core
