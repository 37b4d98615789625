// The expert-parallel runtime: the ProcessGroup communicator (gloo for CPU tensors), the dispatch/combine driver
// and its pybind11 classes. Planning is torch-free (cpp/core/dispatch_layout.h); this file moves tensors.
//
// Wire format of a dispatched row (uint8 [row_bytes]):  x bytes [H * elem] | int32 source token | int32 local
// expert per slot [k] (-1 = slot not on the receiver) | float32 weight per slot [k]. Rows are not 4-byte aligned
// in general (odd H with 2-byte dtypes), so metadata is read and written with memcpy.
// Exact mode sends exactly the planned rows; capacity mode sends `capacity` rows to every rank (padding rows carry
// token -1 and no slot). Before the payload, one small all-to-all exchanges a DispatchHeader per rank pair: the row
// counts plus every field that must agree across ranks, so a mismatch raises on every rank.
//
// Combine reduces a token's local slots on the expert rank (fp32, ascending slot), sends one partial row per
// (token, rank) back in x's dtype, and sums the partials on the source rank in fp32 in ascending rank order. Fixed
// order everywhere: bitwise deterministic. The only rounding beyond fp32 is the partial's cast to x's dtype.
//
// Data movement: CPU tensors (gloo) go through the fused row kernels below (one pass each, parallel over rows,
// memcpy of whole rows); other devices use the equivalent gathers and index_add_ in ATen ops.
#include "cpp/torch/runtime.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <numeric>
#include <optional>

#include "cpp/core/check.h"
#include "cpp/core/dispatch_layout.h"

namespace py = pybind11;

namespace epmoe {
namespace {

// Copies a host vector into a tensor of `dtype` (int32 or int64) on `device`.
template <typename T>
at::Tensor to_device(const std::vector<T>& v, at::ScalarType dtype, const at::Device& device) {
    auto host = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(dtype));
    if (dtype == at::kInt) {
        std::copy(v.begin(), v.end(), host.data_ptr<int32_t>());
    } else {
        TORCH_INTERNAL_ASSERT(dtype == at::kLong);
        std::copy(v.begin(), v.end(), host.data_ptr<int64_t>());
    }
    return host.to(device);
}

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

// ---- ProcessGroup backend (gloo) ---------------------------------------------------------------------------------

class ProcessGroupWork final : public CommWork {
  public:
    ProcessGroupWork(c10::intrusive_ptr<c10d::Work> work, at::Tensor output, at::Tensor input)
        : work_(std::move(work)), output_(std::move(output)), input_(std::move(input)) {}
    void wait() override { work_->wait(); }

  private:
    c10::intrusive_ptr<c10d::Work> work_;
    at::Tensor output_, input_;  // kept alive until the transfer is done
};

class ProcessGroupCommunicator final : public Communicator {
  public:
    ProcessGroupCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::chrono::milliseconds timeout)
        : pg_(std::move(pg)), timeout_(timeout) {}
    int rank() const override { return pg_->getRank(); }
    int num_ranks() const override { return pg_->getSize(); }
    std::unique_ptr<CommWork> all_to_all(const at::Tensor& output, const at::Tensor& input,
                                         const std::vector<int64_t>& output_splits,
                                         const std::vector<int64_t>& input_splits) override {
        TORCH_CHECK(pg_, "the EP group was destroyed");
        at::Tensor out = output, in = input;
        std::vector<int64_t> out_splits = output_splits, in_splits = input_splits;
        c10d::AllToAllOptions opts;
        opts.timeout = timeout_;  // kUnsetTimeout = the process group's own timeout
        return std::make_unique<ProcessGroupWork>(pg_->all_to_all_single(out, in, out_splits, in_splits, opts), out,
                                                  in);
    }
    void destroy() override { pg_.reset(); }
    // The timeout of this group's collectives: the one given, else the process group's own.
    std::chrono::milliseconds timeout() const {
        TORCH_CHECK(pg_, "the EP group was destroyed");
        return timeout_ != c10d::kUnsetTimeout ? timeout_ : pg_->getDefaultBackend()->getBackendOptions()->timeout;
    }

  private:
    c10::intrusive_ptr<c10d::ProcessGroup> pg_;
    std::chrono::milliseconds timeout_;
};

// ---- the dispatch handle -----------------------------------------------------------------------------------------

// Everything combine and the backward passes need; tensors live on x's device, int32 unless noted.
struct DispatchHandle {
    int64_t rank = 0, num_ranks = 1, num_tokens = 0, hidden = 0, num_topk = 0, num_local_experts = 0;
    at::ScalarType dtype = at::kFloat;
    bool capacity_mode = false, drop_overflow = false;
    int64_t capacity = -1;
    std::vector<int64_t> num_send_per_rank, num_recv_per_rank;  // rows carrying data, per rank pair
    std::vector<int64_t> send_splits, recv_splits;              // rows on the wire (capacity mode: padded)
    at::Tensor send_token_idx;    // [N_send] source token of each sent row (rank-major, token ascending)
    at::Tensor send_wire_pos;     // int64 [N_send] its row in the send wire buffer
    std::vector<int64_t> token_send_offsets;  // host [num_tokens + 1] and [N_send]: each token's sent rows,
    std::vector<int32_t> token_send_rows;     // ascending rank (core::SendPlan)
    at::Tensor recv_src_rank;     // [N_wire_recv] source rank of each received wire row
    at::Tensor recv_src_token;    // [N_wire_recv] source token, -1 for capacity padding
    at::Tensor recv_slot_row;     // [N_wire_recv, k] expert-major row of each (received row, slot), M = none
    at::Tensor row_src, row_slot;  // [M] received wire row and slot of each expert-major row
    at::Tensor overflow;          // int64 [R] rows this rank could not send to each rank (capacity mode)
    int64_t num_send_overflow = 0;  // sum of overflow
    int64_t num_recv_overflow = 0;  // rows other ranks could not send to this rank
    int64_t num_recv_rows = 0;      // M
    int64_t num_bytes_sent = 0;     // dispatch payload bytes sent to other ranks

    // Raises when rows overflowed the capacity and the caller did not allow dropping. Host-side only.
    void check() const {
        TORCH_CHECK(drop_overflow || num_send_overflow == 0, "EP dispatch in capacity mode: ", num_send_overflow,
                    " token rows of rank ", rank, " exceeded capacity=", capacity,
                    " and were not delivered (overflow per destination rank: ", overflow.cpu(),
                    "); raise the capacity or pass drop_overflow=True");
    }
};
using HandlePtr = std::shared_ptr<DispatchHandle>;

// ---- CPU row kernels ---------------------------------------------------------------------------------------------

constexpr int64_t kRowGrain = 64;  // rows per task: each row is H elements, so a task is tens of microseconds

// Writes the sent rows into the wire buffer [N_wire, row_bytes]: row i at wire_pos[i] gets x[token] and its meta.
// Capacity padding rows (not in wire_pos) must already hold 0xFF.
void pack_rows_cpu(uint8_t* wire, int64_t row_bytes, const uint8_t* x, int64_t x_bytes, const float* topk_weights,
                   const core::SendPlan& plan, const int64_t* wire_pos) {
    const int64_t k = plan.num_topk;
    const int64_t num_send = static_cast<int64_t>(plan.send_token_idx.size());
    at::parallel_for(0, num_send, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int32_t token = plan.send_token_idx[i];
            const int32_t* slots = plan.send_slot_expert.data() + i * k;
            uint8_t* dst = wire + wire_pos[i] * row_bytes;
            std::memcpy(dst, x + token * x_bytes, x_bytes);
            uint8_t* meta = dst + x_bytes;
            std::memcpy(meta, &token, 4);
            std::memcpy(meta + 4, slots, 4 * k);
            for (int64_t j = 0; j < k; ++j) {
                const float w = slots[j] >= 0 ? topk_weights[token * k + j] : 0.0f;
                std::memcpy(meta + 4 * (1 + k + j), &w, 4);
            }
        }
    });
}

// Expert-major rows from the received wire: recv_x[m] = x bytes of wire row row_src[m], recv_w[m] = its weight of
// slot row_slot[m].
void unpack_rows_cpu(const uint8_t* wire, int64_t row_bytes, int64_t x_bytes, int64_t k,
                     const core::RecvLayout& layout, uint8_t* recv_x, float* recv_w) {
    const int64_t num_rows = static_cast<int64_t>(layout.row_src.size());
    at::parallel_for(0, num_rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            const uint8_t* src = wire + layout.row_src[m] * row_bytes;
            std::memcpy(recv_x + m * x_bytes, src, x_bytes);
            std::memcpy(recv_w + m, src + x_bytes + 4 * (1 + k + layout.row_slot[m]), 4);
        }
    });
}

// Combine on the expert rank: partial[i] = sum_j w[row(i, j)] * expert_out[row(i, j)] over the slots j of received
// row i that landed here, ascending j, fp32 accumulation, one pass. weights == nullptr: unweighted sum.
template <typename scalar_t>
void reduce_slots_cpu(const scalar_t* expert_out, const float* weights, const int32_t* slot_row, int64_t num_rows,
                      int64_t num_recv, int64_t k, int64_t hidden, scalar_t* partial) {
    at::parallel_for(0, num_recv, kRowGrain / 4, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(hidden);
        for (int64_t i = begin; i < end; ++i) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t j = 0; j < k; ++j) {
                const int64_t row = slot_row[i * k + j];
                if (row == num_rows) continue;  // slot not on this rank
                const scalar_t* src = expert_out + row * hidden;
                if (weights != nullptr) {
                    const float w = weights[row];
                    for (int64_t c = 0; c < hidden; ++c) acc[c] += w * static_cast<float>(src[c]);
                } else {
                    for (int64_t c = 0; c < hidden; ++c) acc[c] += static_cast<float>(src[c]);
                }
            }
            scalar_t* dst = partial + i * hidden;
            for (int64_t c = 0; c < hidden; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
    });
}

// Combine on the source rank: out[t] = sum of the returned rows of token t in ascending rank order, fp32
// accumulation; tokens sent nowhere get zeros. back is the returned wire [N_wire_send, C].
template <typename scalar_t>
void sum_partials_cpu(const scalar_t* back, const DispatchHandle& h, int64_t num_cols, scalar_t* out) {
    const int64_t* wire_pos = h.send_wire_pos.data_ptr<int64_t>();
    at::parallel_for(0, h.num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(num_cols);
        for (int64_t t = begin; t < end; ++t) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t p = h.token_send_offsets[t]; p < h.token_send_offsets[t + 1]; ++p) {
                const scalar_t* src = back + wire_pos[h.token_send_rows[p]] * num_cols;
                for (int64_t c = 0; c < num_cols; ++c) acc[c] += static_cast<float>(src[c]);
            }
            scalar_t* dst = out + t * num_cols;
            for (int64_t c = 0; c < num_cols; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
    });
}

// A result whose transfer may still be in flight: wait() finishes the transfer and the unpacking.
template <typename Result>
class Pending {
  public:
    Pending(std::unique_ptr<CommWork> work, std::function<Result()> finish)
        : work_(std::move(work)), finish_(std::move(finish)) {}
    Result wait() {
        TORCH_CHECK(finish_, "wait() was already called on this EP result");
        if (work_) work_->wait();
        work_.reset();
        auto finish = std::move(finish_);
        finish_ = nullptr;
        return finish();
    }

  private:
    std::unique_ptr<CommWork> work_;
    std::function<Result()> finish_;
};

using DispatchOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, HandlePtr>;
using PendingDispatch = Pending<DispatchOut>;
using PendingTensor = Pending<at::Tensor>;

// ---- the runtime -------------------------------------------------------------------------------------------------

class Runtime {
  public:
    Runtime(c10::intrusive_ptr<c10d::ProcessGroup> pg, double timeout_s) {
        TORCH_CHECK_VALUE(pg, "process_group must be a torch.distributed ProcessGroup");
        const auto timeout = timeout_s > 0 ? std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000))
                                           : c10d::kUnsetTimeout;
        host_ = std::make_unique<ProcessGroupCommunicator>(std::move(pg), timeout);
        rank_ = host_->rank();
        num_ranks_ = host_->num_ranks();
    }

    int rank() const { return rank_; }
    int num_ranks() const { return num_ranks_; }
    int64_t total_bytes_sent() const { return total_bytes_sent_; }

#ifdef EPMOE_WITH_NCCL
    void init_nccl(const py::bytes& unique_id, int device) {
        TORCH_CHECK(!nccl_, "the NCCL communicator of this EP group is already initialised");
        nccl_ = make_nccl_communicator(std::string(unique_id), rank_, num_ranks_, device, host_->timeout());
    }
#endif
    bool has_nccl() const { return static_cast<bool>(nccl_); }

    void destroy() {
        if (nccl_) nccl_->destroy();
        nccl_.reset();
        if (host_) host_->destroy();
        destroyed_ = true;
    }

    // Communicator by tensor device: CUDA -> NCCL, CPU -> the process group (gloo).
    Communicator& comm_for(const at::Tensor& t) {
        TORCH_CHECK(!destroyed_, "this EPGroup was destroyed");
        if (t.is_cuda()) {
            TORCH_CHECK(nccl_, "CUDA tensors need the NCCL communicator: EPGroup initialises it on first CUDA use");
            return *nccl_;
        }
        TORCH_CHECK_VALUE(t.is_cpu(), "EP tensors must be on CPU (gloo) or CUDA (NCCL), got ", t.device());
        return *host_;
    }

    std::shared_ptr<PendingDispatch> dispatch(const at::Tensor& x, const at::Tensor& topk_idx,
                                              const at::Tensor& topk_weights, int64_t num_experts,
                                              const std::optional<at::Tensor>& expert_to_rank,
                                              const std::string& mode, int64_t capacity, bool drop_overflow) {
        // ---- validation: every message names the Python argument
        TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [num_tokens, hidden], got shape ", x.sizes());
        TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                             x.scalar_type() == at::kHalf,
                         "x must be float32, bfloat16 or float16, got ", x.scalar_type());
        TORCH_CHECK_VALUE(x.size(1) > 0, "x must have a non-zero hidden size");
        TORCH_CHECK_VALUE(topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0) && topk_idx.size(1) > 0,
                          "topk_idx must have shape [", x.size(0), ", top_k] (num_tokens of x), got ",
                          topk_idx.sizes());
        TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kInt || topk_idx.scalar_type() == at::kLong,
                         "topk_idx must be int32 or int64, got ", topk_idx.scalar_type());
        TORCH_CHECK_VALUE(topk_weights.sizes() == topk_idx.sizes(), "topk_weights must have shape ",
                          topk_idx.sizes(), " like topk_idx, got ", topk_weights.sizes());
        TORCH_CHECK_TYPE(at::isFloatingType(topk_weights.scalar_type()), "topk_weights must be floating point, got ",
                         topk_weights.scalar_type());
        TORCH_CHECK_VALUE(topk_idx.device() == x.device() && topk_weights.device() == x.device(),
                          "topk_idx and topk_weights must be on ", x.device(), " like x");
        TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= (1 << 24), "num_experts must be in [1, 2^24], got ",
                          num_experts);
        TORCH_CHECK_VALUE(mode == "exact" || mode == "capacity", "mode must be 'exact' or 'capacity', got '", mode,
                          "'");
        const bool capacity_mode = mode == "capacity";
        TORCH_CHECK_VALUE(!capacity_mode || capacity >= 0,
                          "capacity must be given (rows per rank pair, >= 0) when mode='capacity', got ", capacity);
        Communicator& comm = comm_for(x);
        const at::Device device = x.device();
        const int64_t num_tokens = x.size(0), hidden = x.size(1), num_topk = topk_idx.size(1);

        // ---- placement and plan (host)
        core::ExpertPlacement placement;
        std::string error;
        if (expert_to_rank.has_value()) {
            const at::Tensor& map = *expert_to_rank;
            TORCH_CHECK_VALUE(map.dim() == 1 && map.size(0) == num_experts, "expert_to_rank must have shape [",
                              num_experts, "] (num_experts), got ", map.sizes());
            TORCH_CHECK_TYPE(map.scalar_type() == at::kInt || map.scalar_type() == at::kLong,
                             "expert_to_rank must be int32 or int64, got ", map.scalar_type());
            const at::Tensor host_map = map.to(at::kCPU, at::kInt).contiguous();
            error = core::make_expert_placement(host_map.data_ptr<int32_t>(), static_cast<int>(num_experts),
                                                num_ranks_, &placement);
        } else {
            error = core::make_expert_placement(nullptr, static_cast<int>(num_experts), num_ranks_, &placement);
        }
        TORCH_CHECK_VALUE(error.empty(), error);
        const at::Tensor host_idx = topk_idx.to(at::kCPU, at::kInt).contiguous();
        core::SendPlan plan;
        error = core::plan_dispatch(host_idx.data_ptr<int32_t>(), num_tokens, static_cast<int>(num_topk), placement,
                                    capacity_mode ? capacity : -1, &plan);
        TORCH_CHECK_VALUE(error.empty(), error);

        auto h = std::make_shared<DispatchHandle>();
        h->rank = rank_;
        h->num_ranks = num_ranks_;
        h->num_tokens = num_tokens;
        h->hidden = hidden;
        h->num_topk = num_topk;
        h->num_local_experts = placement.num_local_experts[rank_];
        h->dtype = x.scalar_type();
        h->capacity_mode = capacity_mode;
        h->capacity = capacity_mode ? capacity : -1;
        h->drop_overflow = drop_overflow;
        h->num_send_per_rank = plan.num_send_per_rank;
        h->send_splits = capacity_mode ? std::vector<int64_t>(num_ranks_, capacity) : plan.num_send_per_rank;
        h->overflow = to_device(plan.num_overflow_per_rank, at::kLong, device);
        h->num_send_overflow = sum(plan.num_overflow_per_rank);
        h->send_token_idx = to_device(plan.send_token_idx, at::kInt, device);
        std::vector<int64_t> wire_pos(plan.send_token_idx.size());
        for (int64_t r = 0, n = 0; r < num_ranks_; ++r) {
            const int64_t base = capacity_mode ? r * capacity : n;
            for (int64_t i = 0; i < plan.num_send_per_rank[r]; ++i) wire_pos[n + i] = base + i;
            n += plan.num_send_per_rank[r];
        }
        h->send_wire_pos = to_device(wire_pos, at::kLong, device);
        h->token_send_offsets = plan.token_send_offsets;
        h->token_send_rows = plan.token_send_rows;

        // ---- header exchange: counts + agreement (the one host sync of exact mode)
        core::DispatchHeader mine{};
        mine[core::kMagic] = core::kHeaderMagic;
        mine[core::kNumExperts] = num_experts;
        mine[core::kHidden] = hidden;
        mine[core::kDType] = static_cast<int64_t>(x.scalar_type());
        mine[core::kNumTopk] = num_topk;
        mine[core::kMode] = capacity_mode ? 1 : 0;
        mine[core::kCapacity] = h->capacity;
        mine[core::kPlacement] = static_cast<int64_t>(placement.fingerprint >> 2);
        auto send_header = at::empty({num_ranks_, core::kHeaderLen}, at::TensorOptions().dtype(at::kLong));
        for (int r = 0; r < num_ranks_; ++r) {
            int64_t* row = send_header.data_ptr<int64_t>() + r * core::kHeaderLen;
            std::copy(mine.begin(), mine.end(), row);
            row[core::kNumRows] = plan.num_send_per_rank[r];
            row[core::kNumOverflow] = plan.num_overflow_per_rank[r];
        }
        send_header = send_header.to(device);
        auto recv_header = at::empty_like(send_header);
        const std::vector<int64_t> ones(num_ranks_, 1);
        comm.all_to_all(recv_header, send_header, ones, ones)->wait();
        const at::Tensor host_header = recv_header.cpu();
        h->num_recv_per_rank.assign(num_ranks_, 0);
        for (int r = 0; r < num_ranks_; ++r) {
            core::DispatchHeader theirs;
            std::copy_n(host_header.data_ptr<int64_t>() + r * core::kHeaderLen, core::kHeaderLen, theirs.begin());
            error = core::check_peer_header(mine, theirs, rank_, r);
            TORCH_CHECK_VALUE(error.empty(), error);
            h->num_recv_per_rank[r] = theirs[core::kNumRows];
            h->num_recv_overflow += theirs[core::kNumOverflow];
        }
        h->recv_splits = capacity_mode ? std::vector<int64_t>(num_ranks_, capacity) : h->num_recv_per_rank;

        // ---- pack the wire rows
        const int64_t x_bytes = hidden * x.element_size();
        const int64_t meta_words = 1 + 2 * num_topk;
        const int64_t row_bytes = x_bytes + 4 * meta_words;
        const int64_t num_send = static_cast<int64_t>(plan.send_token_idx.size());
        const at::Tensor x_c = x.contiguous();
        at::Tensor send_wire;
        if (x.is_cpu()) {
            send_wire = at::empty({sum(h->send_splits), row_bytes}, x.options().dtype(at::kByte));
            uint8_t* wire = send_wire.data_ptr<uint8_t>();
            for (int r = 0; r < num_ranks_ && capacity_mode; ++r) {  // padding rows: 0xFF = token -1, no slot
                const int64_t pad_begin = r * capacity + plan.num_send_per_rank[r], pad_end = (r + 1) * capacity;
                if (pad_end > pad_begin) {
                    std::memset(wire + pad_begin * row_bytes, 0xFF, (pad_end - pad_begin) * row_bytes);
                }
            }
            const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
            pack_rows_cpu(wire, row_bytes, static_cast<const uint8_t*>(x_c.data_ptr()), x_bytes,
                          weights.data_ptr<float>(), plan, h->send_wire_pos.data_ptr<int64_t>());
        } else {
            auto slots = at::from_blob(plan.send_slot_expert.data(), {num_send, num_topk}, at::kInt).to(device);
            auto tokens = h->send_token_idx.unsqueeze(1);
            auto weights = topk_weights.to(at::kFloat).index_select(0, h->send_token_idx) * slots.ge(0);
            auto meta = at::cat({tokens, slots, weights.view(at::kInt)}, 1);
            send_wire = at::cat({x_c.index_select(0, h->send_token_idx).view(at::kByte), meta.view(at::kByte)}, 1);
            if (capacity_mode) {
                auto rows = send_wire;
                send_wire = at::full({num_ranks_ * capacity, row_bytes}, 255, x.options().dtype(at::kByte));
                send_wire.index_copy_(0, h->send_wire_pos, rows);
            }
        }
        auto recv_wire = at::empty({sum(h->recv_splits), row_bytes}, send_wire.options());
        for (int r = 0; r < num_ranks_; ++r) {
            if (r != rank_) h->num_bytes_sent += h->send_splits[r] * row_bytes;
        }
        total_bytes_sent_ += h->num_bytes_sent;
        auto work = comm.all_to_all(recv_wire, send_wire, h->recv_splits, h->send_splits);

        // ---- unpack on wait(): expert-major expansion (host plan; row copies on the host or device gathers)
        auto finish = [h, recv_wire, x_bytes, meta_words, device]() -> DispatchOut {
            const int64_t num_recv = recv_wire.size(0), k = h->num_topk, row_bytes = recv_wire.size(1);
            // The metadata columns: read in place on the CPU, copied to the host from a device.
            const bool on_cpu = recv_wire.is_cpu();
            const at::Tensor host_meta = on_cpu ? recv_wire : recv_wire.narrow(1, x_bytes, 4 * meta_words).cpu();
            const int64_t meta_stride = on_cpu ? row_bytes : 4 * meta_words;
            const uint8_t* meta = host_meta.data_ptr<uint8_t>() + (on_cpu ? x_bytes : 0);
            std::vector<int32_t> recv_slots(num_recv * k), recv_token(num_recv);
            for (int64_t i = 0; i < num_recv; ++i) {
                std::memcpy(&recv_token[i], meta + i * meta_stride, 4);
                std::memcpy(&recv_slots[i * k], meta + i * meta_stride + 4, 4 * k);
            }
            core::RecvLayout layout;
            const std::string err = core::expand_received(recv_slots.data(), num_recv, static_cast<int>(k),
                                                          static_cast<int>(h->num_local_experts), &layout);
            TORCH_CHECK(err.empty(), err);
            const int64_t num_rows = static_cast<int64_t>(layout.row_src.size());
            h->num_recv_rows = num_rows;
            h->row_src = to_device(layout.row_src, at::kInt, device);
            h->row_slot = to_device(layout.row_slot, at::kInt, device);
            h->recv_slot_row = to_device(layout.recv_slot_row, at::kInt, device).view({num_recv, k});
            std::vector<int32_t> src_rank;
            for (int r = 0; r < h->num_ranks; ++r) src_rank.insert(src_rank.end(), h->recv_splits[r], r);
            h->recv_src_rank = to_device(src_rank, at::kInt, device);
            h->recv_src_token = to_device(recv_token, at::kInt, device);
            at::Tensor recv_x, recv_topk_weights;
            if (on_cpu) {
                recv_x = at::empty({num_rows, h->hidden}, recv_wire.options().dtype(h->dtype));
                recv_topk_weights = at::empty({num_rows}, recv_wire.options().dtype(at::kFloat));
                unpack_rows_cpu(recv_wire.data_ptr<uint8_t>(), row_bytes, x_bytes, k, layout,
                                static_cast<uint8_t*>(recv_x.data_ptr()), recv_topk_weights.data_ptr<float>());
            } else {
                auto recv_meta = recv_wire.narrow(1, x_bytes, 4 * meta_words).contiguous().view(at::kInt);
                recv_x = recv_wire.narrow(1, 0, x_bytes).contiguous().view(h->dtype).index_select(0, h->row_src);
                auto recv_weights = recv_meta.narrow(1, 1 + k, k).contiguous().view(at::kFloat).reshape({-1});
                recv_topk_weights = recv_weights.index_select(0, h->row_src * k + h->row_slot);
            }
            return {recv_x, recv_topk_weights, to_device(layout.tokens_per_expert, at::kLong, device),
                    to_device(layout.expert_offsets, at::kLong, device), h};
        };
        return std::make_shared<PendingDispatch>(std::move(work), finish);
    }

    // Sends per-received-row values back to the source ranks and sums them per token in fp32, ascending rank.
    //   rows [N_wire_recv, C] (any float dtype, sent as is) -> [num_tokens, C] in rows' dtype on the source rank
    std::shared_ptr<PendingTensor> reverse(const at::Tensor& rows, const HandlePtr& h) {
        Communicator& comm = comm_for(rows);
        auto back = at::empty({sum(h->send_splits), rows.size(1)}, rows.options());
        for (int r = 0; r < num_ranks_; ++r) {
            if (r != rank_) total_bytes_sent_ += h->recv_splits[r] * rows.size(1) * rows.element_size();
        }
        auto work = comm.all_to_all(back, rows.contiguous(), h->send_splits, h->recv_splits);
        auto finish = [h, back]() -> at::Tensor {
            const int64_t num_cols = back.size(1);
            if (back.is_cpu()) {
                auto out = at::empty({h->num_tokens, num_cols}, back.options());
                AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, back.scalar_type(), "epmoe_sum", [&] {
                    sum_partials_cpu<scalar_t>(back.data_ptr<scalar_t>(), *h, num_cols, out.data_ptr<scalar_t>());
                });
                return out;
            }
            auto sent = back.index_select(0, h->send_wire_pos).to(at::kFloat);
            auto result = at::zeros({h->num_tokens, num_cols}, sent.options());
            // NOTES: a token appears at most once per rank block, so each index_add_ has unique indices and is
            // deterministic on every device; blocks are added in ascending rank order.
            int64_t begin = 0;
            for (int r = 0; r < h->num_ranks; ++r) {
                const int64_t n = h->num_send_per_rank[r];
                if (n > 0) result.index_add_(0, h->send_token_idx.narrow(0, begin, n), sent.narrow(0, begin, n));
                begin += n;
            }
            return result.to(back.scalar_type());
        };
        return std::make_shared<PendingTensor>(std::move(work), finish);
    }

    void check_handle(const HandlePtr& h, const at::Tensor& t, const char* name, int64_t rows) {
        TORCH_CHECK_VALUE(h, "handle must be the handle of a dispatch on this EPGroup");
        TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == h->hidden, name, " must have shape [",
                          rows, ", ", h->hidden, "], got ", t.sizes());
        TORCH_CHECK_TYPE(t.scalar_type() == h->dtype, name, " must have the dispatched dtype ", h->dtype, ", got ",
                         t.scalar_type());
    }

    // combine: expert_out [M, H] (expert-major rows of the dispatch), recv_topk_weights fp32 [M] or None for an
    // unweighted sum -> [num_tokens, H] in x's dtype on the source rank.
    std::shared_ptr<PendingTensor> combine(const at::Tensor& expert_out, const std::optional<at::Tensor>& weights,
                                           const HandlePtr& h) {
        check_handle(h, expert_out, "expert_out", h ? h->num_recv_rows : 0);
        if (weights.has_value()) {
            TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == h->num_recv_rows,
                              "recv_topk_weights must have shape [", h->num_recv_rows, "], got ", weights->sizes());
        }
        const int64_t num_recv = h->recv_slot_row.size(0), k = h->num_topk, hidden = h->hidden;
        at::Tensor partial;  // [N_wire_recv, H] in x's dtype: one row per received (token, this rank)
        if (expert_out.is_cpu()) {
            const at::Tensor out_c = expert_out.contiguous();
            const at::Tensor w_c = weights.has_value() ? weights->to(at::kFloat).contiguous() : at::Tensor();
            partial = at::empty({num_recv, hidden}, expert_out.options());
            AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h->dtype, "epmoe_combine_reduce", [&] {
                const float* w_ptr = w_c.defined() ? w_c.data_ptr<float>() : nullptr;
                reduce_slots_cpu<scalar_t>(out_c.data_ptr<scalar_t>(), w_ptr, h->recv_slot_row.data_ptr<int32_t>(),
                                           h->num_recv_rows, num_recv, k, hidden, partial.data_ptr<scalar_t>());
            });
        } else {
            const auto fp32 = expert_out.options().dtype(at::kFloat);
            auto out_pad = at::cat({expert_out.to(at::kFloat), at::zeros({1, hidden}, fp32)});
            at::Tensor w_pad;
            if (weights.has_value()) w_pad = at::cat({weights->to(at::kFloat), at::zeros({1}, fp32)});
            auto acc = at::zeros({num_recv, hidden}, fp32);
            for (int64_t j = 0; j < k; ++j) {  // ascending slot: fixed order
                auto idx = h->recv_slot_row.select(1, j);
                auto rows = out_pad.index_select(0, idx);
                if (w_pad.defined()) rows = rows * w_pad.index_select(0, idx).unsqueeze(1);
                acc.add_(rows);
            }
            partial = acc.to(h->dtype);
        }
        auto pending = reverse(partial, h);
        return std::make_shared<PendingTensor>(nullptr, [pending, h]() -> at::Tensor {
            at::Tensor y = pending->wait();
            h->check();  // after the exchange: an overflow never leaves a peer waiting
            return y;
        });
    }

    // Combine backward's transfer: rows [num_tokens, C] -> [N_wire_recv, C], row i = rows[source token of i].
    at::Tensor forward_rows(const at::Tensor& rows, const HandlePtr& h) {
        TORCH_CHECK_VALUE(h && rows.dim() == 2 && rows.size(0) == h->num_tokens, "rows must have shape [",
                          h ? h->num_tokens : 0, ", C], got ", rows.sizes());
        Communicator& comm = comm_for(rows);
        auto selected = rows.contiguous().index_select(0, h->send_token_idx);
        at::Tensor send = selected;
        if (h->capacity_mode) {
            send = at::zeros({sum(h->send_splits), rows.size(1)}, rows.options());
            send.index_copy_(0, h->send_wire_pos, selected);
        }
        auto out = at::empty({sum(h->recv_splits), rows.size(1)}, rows.options());
        for (int r = 0; r < num_ranks_; ++r) {
            if (r != rank_) total_bytes_sent_ += h->send_splits[r] * rows.size(1) * rows.element_size();
        }
        comm.all_to_all(out, send, h->recv_splits, h->send_splits)->wait();
        return out;
    }

    // Dispatch backward for the weights: per-row values [M] -> fp32 [num_tokens, k] on the source rank.
    at::Tensor reverse_slots(const at::Tensor& values, const HandlePtr& h) {
        TORCH_CHECK_VALUE(h && values.dim() == 1 && values.size(0) == h->num_recv_rows, "values must have shape [",
                          h ? h->num_recv_rows : 0, "], got ", values.sizes());
        const int64_t num_recv = h->recv_slot_row.size(0);
        auto per_row = at::zeros({num_recv * h->num_topk}, values.options().dtype(at::kFloat));
        per_row.index_copy_(0, h->row_src.to(at::kLong) * h->num_topk + h->row_slot, values.to(at::kFloat));
        return reverse(per_row.view({num_recv, h->num_topk}), h)->wait();
    }

    // Unweighted reverse of expert-major rows [M, H] -> [num_tokens, H] in x's dtype (dispatch backward for x).
    at::Tensor reverse_rows(const at::Tensor& rows, const HandlePtr& h) {
        return combine(rows.to(h->dtype), std::nullopt, h)->wait();
    }

  private:
    std::unique_ptr<ProcessGroupCommunicator> host_;
    std::unique_ptr<Communicator> nccl_;
    int rank_ = 0, num_ranks_ = 1;
    int64_t total_bytes_sent_ = 0;
    bool destroyed_ = false;
};


}  // namespace

void register_runtime(py::module_& m) {
    py::class_<DispatchHandle, HandlePtr>(m, "DispatchHandle",
                                          "What combine and the backward passes need; tensors on x's device.")
        .def_readonly("rank", &DispatchHandle::rank)
        .def_readonly("num_ranks", &DispatchHandle::num_ranks)
        .def_readonly("num_tokens", &DispatchHandle::num_tokens)
        .def_readonly("hidden", &DispatchHandle::hidden)
        .def_readonly("num_topk", &DispatchHandle::num_topk)
        .def_readonly("num_local_experts", &DispatchHandle::num_local_experts)
        .def_readonly("capacity", &DispatchHandle::capacity)
        .def_readonly("drop_overflow", &DispatchHandle::drop_overflow)
        .def_property_readonly("mode", [](const DispatchHandle& h) { return h.capacity_mode ? "capacity" : "exact"; })
        .def_readonly("num_send_per_rank", &DispatchHandle::num_send_per_rank, "rows sent to each rank")
        .def_readonly("num_recv_per_rank", &DispatchHandle::num_recv_per_rank, "rows received from each rank")
        .def_readonly("send_token_idx", &DispatchHandle::send_token_idx, "int32 [N_send] token of each sent row")
        .def_readonly("recv_src_rank", &DispatchHandle::recv_src_rank, "int32 [N_recv] source rank of each row")
        .def_readonly("recv_src_token", &DispatchHandle::recv_src_token, "int32 [N_recv] source token, -1 = pad")
        .def_readonly("row_src", &DispatchHandle::row_src, "int32 [M] received row of each recv_x row")
        .def_readonly("row_slot", &DispatchHandle::row_slot, "int32 [M] top-k slot of each recv_x row")
        .def_readonly("overflow", &DispatchHandle::overflow, "int64 [R] rows not sent to each rank (capacity)")
        .def_readonly("num_send_overflow", &DispatchHandle::num_send_overflow)
        .def_readonly("num_recv_overflow", &DispatchHandle::num_recv_overflow)
        .def_readonly("num_recv_rows", &DispatchHandle::num_recv_rows)
        .def_readonly("num_bytes_sent", &DispatchHandle::num_bytes_sent, "dispatch payload bytes to other ranks")
        .def("check", &DispatchHandle::check, "Raise if rows overflowed the capacity without drop_overflow=True.");

    py::class_<PendingDispatch, std::shared_ptr<PendingDispatch>>(m, "PendingDispatch")
        .def("wait", &PendingDispatch::wait, py::call_guard<py::gil_scoped_release>(),
             "-> (recv_x, recv_topk_weights, tokens_per_expert, expert_offsets, handle)");
    py::class_<PendingTensor, std::shared_ptr<PendingTensor>>(m, "PendingTensor")
        .def("wait", &PendingTensor::wait, py::call_guard<py::gil_scoped_release>());

    py::class_<Runtime>(m, "Runtime", "Expert-parallel runtime over one process group (gloo) and, on CUDA, NCCL.")
        .def(py::init<c10::intrusive_ptr<c10d::ProcessGroup>, double>(), py::arg("process_group"),
             py::arg("timeout_s") = 0.0)
        .def_property_readonly("rank", &Runtime::rank)
        .def_property_readonly("num_ranks", &Runtime::num_ranks)
        .def_property_readonly("total_bytes_sent", &Runtime::total_bytes_sent)
        .def_property_readonly("has_nccl", &Runtime::has_nccl)
        .def("dispatch", &Runtime::dispatch, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
             py::arg("num_experts"), py::arg("expert_to_rank"), py::arg("mode"), py::arg("capacity"),
             py::arg("drop_overflow"), py::call_guard<py::gil_scoped_release>())
        .def("combine", &Runtime::combine, py::arg("expert_out"), py::arg("recv_topk_weights"), py::arg("handle"),
             py::call_guard<py::gil_scoped_release>())
        .def("forward_rows", &Runtime::forward_rows, py::call_guard<py::gil_scoped_release>())
        .def("reverse_slots", &Runtime::reverse_slots, py::call_guard<py::gil_scoped_release>())
        .def("reverse_rows", &Runtime::reverse_rows, py::call_guard<py::gil_scoped_release>())
#ifdef EPMOE_WITH_NCCL
        .def("init_nccl", &Runtime::init_nccl, py::arg("unique_id"), py::arg("device"))
        .def_static("nccl_unique_id", []() { return py::bytes(nccl_unique_id()); })
#endif
        .def("destroy", &Runtime::destroy);
}

}  // namespace epmoe
