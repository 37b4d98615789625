// Expert-parallel dispatch planning, torch-free: expert placement, the per-destination-rank deduplicated send plan,
// the cross-rank agreement header, and the receive-side expansion into expert-major rows. Semantics: DESIGN.md §3.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace epmoe::core {

// Which rank holds each expert and where it sits among that rank's experts.
struct ExpertPlacement {
    int num_experts = 0;
    int num_ranks = 0;
    std::vector<int32_t> expert_to_rank;     // [num_experts]
    std::vector<int32_t> expert_to_local;    // [num_experts] index among its rank's experts (ascending expert id)
    std::vector<int32_t> num_local_experts;  // [num_ranks]
    uint64_t fingerprint = 0;                // hash of expert_to_rank, compared across ranks
};

// Builds the placement. expert_to_rank == nullptr means the even split: rank r owns [r*E/R, (r+1)*E/R), which
// needs num_experts % num_ranks == 0. Returns "" on success, else a message naming the offending argument.
std::string make_expert_placement(const int32_t* expert_to_rank, int num_experts, int num_ranks, ExpertPlacement* out);

// What one rank sends. A token goes once to every rank that owns at least one of its experts (deduplicated), with
// its slot list rewritten to destination-local expert ids. Rows are ordered by destination rank, then token.
struct SendPlan {
    int num_topk = 0;
    std::vector<int64_t> num_send_per_rank;      // [R] rows sent to each rank (after the capacity clip)
    std::vector<int64_t> num_overflow_per_rank;  // [R] rows that did not fit the capacity (always 0 in exact mode)
    std::vector<int32_t> send_token_idx;         // [N] source token of each sent row
    std::vector<int32_t> send_slot_expert;       // [N, k] destination-local expert of each slot, -1 = not there
    // The sent rows of each token, for combine's final sum: rows token_send_rows[token_send_offsets[t] ..
    // token_send_offsets[t+1]) in ascending destination rank.
    std::vector<int64_t> token_send_offsets;  // [num_tokens + 1]
    std::vector<int32_t> token_send_rows;     // [N]
};

// First flat slot t * num_topk + j whose id lies outside [-1, num_experts), or -1 when every id is valid.
int64_t find_bad_expert_id(const int32_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts);

// Plans the send side in O(num_tokens * num_topk + R). topk_idx [num_tokens, num_topk] holds expert ids in [0, E)
// or -1 (skipped slot). capacity < 0: exact mode (no clip); otherwise at most `capacity` rows per destination,
// earliest tokens first.
std::string plan_dispatch(const int32_t* topk_idx, int64_t num_tokens, int num_topk, const ExpertPlacement& placement,
                          int64_t capacity, SendPlan* out);

// Expert-major layout of the received rows on one rank.
struct RecvLayout {
    std::vector<int64_t> tokens_per_expert;  // [L]
    std::vector<int64_t> expert_offsets;     // [L+1] exclusive prefix sum of tokens_per_expert
    std::vector<int32_t> row_src;            // [M] received row that feeds each expert-major row
    std::vector<int32_t> row_slot;           // [M] slot of that received row
    std::vector<int32_t> recv_slot_row;      // [N_recv, k] expert-major row of each (received row, slot), M = none
};

// Expands received rows. recv_slot_expert [num_recv, num_topk] holds local expert ids in [0, L) or -1. Rows are
// ordered by local expert, then by received row (= source rank, source token), then slot: deterministic.
// Fails when M would not fit int32 (row indices are int32; byte offsets are computed in int64).
std::string expand_received(const int32_t* recv_slot_expert, int64_t num_recv, int num_topk, int num_local_experts,
                            RecvLayout* out);

// Per-pair header of the counts exchange, one row per (sender, receiver) pair. The counts may differ per pair; every
// field from kSequence on must agree across ranks. A sender that found bad input (kError) still sends its header,
// with no rows, so that every rank learns about it in the same exchange and raises, instead of a peer waiting for a
// transfer that never comes. check_headers() turns the received headers into the message every rank raises.
enum HeaderField : int {
    kMagic = 0,
    kNumRows,      // rows the sender sends to the receiver
    kNumOverflow,  // rows the sender could not send to the receiver (capacity mode)
    kNumSlots,     // (row, slot) pairs of those rows that land on the receiver's experts
    kError,        // DispatchError of the sender, kNoError when its input was valid
    kErrorValue,   // kBadExpertId: the id; kBadExpertMap: the rank it names
    kErrorIndex,   // kBadExpertId: flat slot t * k + j; kBadExpertMap: the expert
    kSequence,     // the sender's dispatch count on this EP group: detects ranks out of step
    kTag,          // the caller's tag for this dispatch, kNoTag when none
    kNumExperts,
    kHidden,
    kDType,        // epmoe::DType code of x
    kNumTopk,
    kMode,         // 0 = exact, 1 = capacity
    kCapacity,     // -1 in exact mode
    kPlacement,    // ExpertPlacement::fingerprint, truncated to 62 bits
    kHeaderLen
};
using DispatchHeader = std::array<int64_t, kHeaderLen>;
constexpr int64_t kHeaderMagic = 0x45504d4f45;  // "EPMOE"
constexpr int64_t kNoTag = -(int64_t{1} << 62);

enum DispatchError : int64_t { kNoError = 0, kBadExpertId = 1, kBadExpertMap = 2 };

// The header fields of a sender that are the same for every receiver (counts zero). num_ranks is the group size.
DispatchHeader make_header(int64_t num_experts, int64_t hidden, int dtype, int64_t num_topk, bool capacity_mode,
                           int64_t capacity, uint64_t placement_fingerprint, int64_t sequence, int64_t tag);

// The message of a sender's error (theirs[kError] != kNoError), naming the rank, the value and where it was.
std::string describe_error(const DispatchHeader& theirs, int peer_rank);

// Compares a peer's header with ours; returns "" when they agree, else a message naming the field and both values
// (dtype and mode by name). Errors reported in the header are not looked at here (check_headers does).
std::string check_peer_header(const DispatchHeader& mine, const DispatchHeader& theirs, int my_rank, int peer_rank);

// What every rank raises after the exchange, "" when the dispatch may proceed. recv[r] is rank r's header to this
// rank. Order: malformed headers, then the lowest rank that reported an error (so every rank raises the same
// message), then disagreements (sequence, tag, then the shape fields) with the lowest disagreeing rank.
// *field (when given) receives the HeaderField that failed: kMagic, kError, kSequence, kTag or a shape field.
std::string check_headers(const DispatchHeader& mine, const DispatchHeader* recv, int num_ranks, int my_rank,
                          int* field = nullptr);

// check_headers(...).empty() without building a message: the CPU twin of the device check
// (cuda/dispatch_plan.cuh, launch_headers_agree).
bool headers_agree(const DispatchHeader& mine, const DispatchHeader* recv, int num_ranks);

}  // namespace epmoe::core
