// The expert-parallel runtime: the ProcessGroup communicator (gloo for CPU tensors), the dispatch/combine driver
// and its pybind11 classes. Planning is torch-free (cpp/core/dispatch_layout.h for the host path,
// cpp/core/dispatch_plan.h for the device path); this file moves tensors.
//
// Wire format of a dispatched row (uint8 [row_bytes]):  x bytes [H * elem] | int32 source token | int32 local
// expert per slot [k] (-1 = slot not on the receiver) | float32 weight per slot [k] (device path: then padding to a
// multiple of 16 bytes). Rows are not 4-byte aligned in general (odd H with 2-byte dtypes), so metadata is read and
// written bytewise.
// Exact mode sends exactly the planned rows; capacity mode sends `capacity` rows to every rank (padding rows carry
// token -1 and no slot). Before the payload, one small all-to-all exchanges a DispatchHeader per rank pair: the row
// counts, this rank's dispatch count and tag, any bad input it found, and every field that must agree across
// ranks, so a mismatch or a bad input on one rank raises on every rank (core::check_headers).
//
// Combine reduces a token's local slots on the expert rank (fp32, ascending slot), sends one partial row per
// (token, rank) back in x's dtype, and sums the partials on the source rank in fp32 in ascending rank order. Fixed
// order everywhere: bitwise deterministic. The only rounding beyond fp32 is the partial's cast to x's dtype.
//
// Two paths by device:
//   host path, CPU tensors over gloo: the host plan and the fused row kernels of runtime_rows.h;
//   device path, CUDA tensors over NCCL: the plan is computed on the device from topk_idx (runtime_device.h) and
//   rows move by gather kernels. Host reads of device data (NOTES: where the former syncs went):
//     - topk_idx was copied to the host for planning: now kernels plan on the device (plan_send, plan_wire_rows);
//     - the received headers were copied to the host in both modes: exact mode keeps this one read (it sizes the
//       payload exchange and recv_x exactly, and raises on disagreement); capacity mode compares them on the device
//       (headers_agree) and reads them only in handle.check(), or once per new shape signature (see below);
//     - the received slot lists were copied to the host to expand them: now the layout kernel of moe_layout
//       expands them on the device in both modes;
//     - capacity-mode overflow raised at combine from host counts: on CUDA the counts stay on the device; combine
//       returns NaN for tokens that lost rows (unless drop_overflow=True) and handle.check() raises;
//     - the per-rank index_add_ blocks of combine used host row counts: now one fixed-order sum kernel over the
//       (token, rank) wire rows.
//   So capacity mode issues no device-to-host copy and no host wait, and is CUDA-graph capturable, once each shape
//   signature (num_experts, hidden, dtype, top-k, capacity, placement) was seen outside a capture: that first
//   call reads the received headers once, so that ranks whose payload sizes would differ raise instead of hanging.
#include "cpp/torch/runtime.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/remainder.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#endif

#include <chrono>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

#include "cpp/core/check.h"
#include "cpp/core/dispatch_layout.h"
#include "cpp/core/dispatch_plan.h"
#include "cpp/torch/route_common.h"
#include "cpp/torch/runtime_device.h"
#include "cpp/torch/runtime_handle.h"
#include "cpp/torch/runtime_rows.h"

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

std::string list_text(const std::vector<int64_t>& v) {
    std::ostringstream os;
    os << "[";
    for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
    os << "]";
    return os.str();
}

std::vector<int64_t> host_row(const at::Tensor& t) {
    const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// Raises what core::check_headers found: desyncs and malformed headers as RuntimeError, bad or disagreeing
// inputs as ValueError.
void raise_header_error(const core::DispatchHeader& mine, const std::vector<core::DispatchHeader>& recv, int rank) {
    int field = core::kMagic;
    const std::string error = core::check_headers(mine, recv.data(), static_cast<int>(recv.size()), rank, &field);
    if (error.empty()) return;
    if (field == core::kMagic || field == core::kSequence) TORCH_CHECK(false, error);
    TORCH_CHECK_VALUE(false, error);
}

std::vector<core::DispatchHeader> headers_from(const at::Tensor& headers) {
    const at::Tensor host = headers.to(at::kCPU).contiguous();
    std::vector<core::DispatchHeader> out(host.size(0));
    for (int64_t r = 0; r < host.size(0); ++r) {
        std::copy_n(host.data_ptr<int64_t>() + r * core::kHeaderLen, core::kHeaderLen, out[r].begin());
    }
    return out;
}

// ---- ProcessGroup backend (gloo) ---------------------------------------------------------------------------------

// A failed transfer (gloo's "Connection reset by peer", "Timed out waiting ...") as a RuntimeError that says where
// and what it usually means; the backend's own first line follows.
[[noreturn]] void raise_transfer_error(const std::string& where, const std::exception& error) {
    std::string detail = error.what();
    detail = detail.substr(0, detail.find('\n'));
    TORCH_CHECK(false, "EP exchange failed on ", where, ": a peer rank died, timed out, or is not in this exchange "
                "(it skipped a dispatch/combine or a backward, or is in another collective); every rank of the EP "
                "group must make the same EP calls in the same order. Backend: ", detail);
}

class ProcessGroupWork final : public CommWork {
  public:
    ProcessGroupWork(c10::intrusive_ptr<c10d::Work> work, at::Tensor output, at::Tensor input, std::string where)
        : work_(std::move(work)), output_(std::move(output)), input_(std::move(input)), where_(std::move(where)) {}
    void wait() override {
        if (!work_) return;
        try {
            work_->wait();
        } catch (const std::exception& error) {
            raise_transfer_error(where_, error);
        }
    }

  private:
    c10::intrusive_ptr<c10d::Work> work_;
    at::Tensor output_, input_;  // kept alive until the transfer is done
    std::string where_;          // "rank r of R (timeout T s)", for the error message
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
        // NOTES: torch 2.13 renamed ProcessGroup::alltoall_base to all_to_all_single (2.14 deprecates the old
        // name); the GPU machine's torch 2.11 has only the old one.
        const std::string where =
            c10::str("rank ", rank(), " of ", num_ranks(), " (timeout ", timeout().count() / 1000.0, " s)");
        c10::intrusive_ptr<c10d::Work> work;
        try {
#if defined(TORCH_VERSION_MINOR) && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 13)
            work = pg_->all_to_all_single(out, in, out_splits, in_splits, opts);
#else
            work = pg_->alltoall_base(out, in, out_splits, in_splits, opts);
#endif
        } catch (const std::exception& error) {
            raise_transfer_error(where, error);
        }
        return std::make_unique<ProcessGroupWork>(std::move(work), out, in, where);
    }
    // gloo works complete in wait(): nothing is ever left only stream-ordered.
    std::unique_ptr<CommWork> fence() override {
        return std::make_unique<ProcessGroupWork>(nullptr, at::Tensor(), at::Tensor(), std::string());
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

}  // namespace

// ---- the dispatch handle -----------------------------------------------------------------------------------------

std::vector<int64_t> DispatchHandle::num_send_per_rank() const {
    return counts_on_host ? host_send_per_rank : host_row(counts.select(0, core::kSent));
}

std::vector<int64_t> DispatchHandle::num_recv_per_rank() const {
    return counts_on_host ? host_recv_per_rank : host_row(recv_headers.select(1, core::kNumRows));
}

int64_t DispatchHandle::num_send_overflow() const {
    return counts_on_host ? host_send_overflow : sum(host_row(overflow));
}

int64_t DispatchHandle::num_recv_overflow() const {
    return counts_on_host ? host_recv_overflow : sum(host_row(recv_headers.select(1, core::kNumOverflow)));
}

void DispatchHandle::check() const {
    if (!counts_on_host) {
        if (fence) fence->wait();  // the host wait, with the group's timeout, for the stream-ordered transfers
        raise_header_error(mine, headers_from(recv_headers), static_cast<int>(rank));
    }
    if (drop_overflow || !capacity_mode) return;
    const std::vector<int64_t> per_rank = host_row(overflow);
    const int64_t total = sum(per_rank);
    TORCH_CHECK(total == 0, "EP dispatch in capacity mode: ", total, " token rows of rank ", rank,
                " exceeded capacity=", capacity, " and were not delivered (overflow per destination rank: ",
                list_text(per_rank), "); raise the capacity or pass drop_overflow=True");
}

namespace {

// A result whose transfer may still be in flight: wait() finishes the transfer and the unpacking (once).
template <typename Result>
class Pending {
  public:
    explicit Pending(std::function<Result()> finish) : finish_(std::move(finish)) {}
    Result wait() {
        TORCH_CHECK(finish_, "wait() was already called on this EP result");
        auto finish = std::move(finish_);
        finish_ = nullptr;
        return finish();
    }

  private:
    std::function<Result()> finish_;
};

using DispatchOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, HandlePtr>;
using PendingDispatch = Pending<DispatchOut>;
using PendingTensor = Pending<at::Tensor>;

// Waits for `work` on the host, or orders the stream only (device capacity mode).
void finish_work(const std::shared_ptr<CommWork>& work, bool stream_ordered) {
    if (!work) return;
    if (stream_ordered) work->wait_stream(); else work->wait();
}

// What dispatch needs besides the tensors, validated on this rank.
struct DispatchArgs {
    int64_t num_experts = 0;
    bool capacity_mode = false;
    int64_t capacity = -1;
    bool drop_overflow = false;
    core::ExpertPlacement placement;
    core::DispatchHeader mine{};  // error fields set when expert_to_rank is invalid on this rank
};

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
    int64_t num_dispatches() const { return num_dispatches_; }

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

    // Host wait, with the group's timeout, for every transfer issued so far (capacity mode on CUDA only orders
    // streams; this is where a dead peer of such transfers becomes an error).
    void synchronize() {
        TORCH_CHECK(!destroyed_, "this EPGroup was destroyed");
        if (nccl_) nccl_->fence()->wait();
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
                                              const std::string& mode, std::optional<int64_t> capacity,
                                              bool drop_overflow, std::optional<int64_t> tag) {
        // ---- validation that needs no tensor values: every message names the Python argument
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
        DispatchArgs args;
        args.num_experts = num_experts;
        args.capacity_mode = mode == "capacity";
        args.drop_overflow = drop_overflow;
        if (args.capacity_mode) {
            TORCH_CHECK_VALUE(capacity.has_value(), "capacity must be given when mode='capacity' (rows per "
                                                    "source-destination rank pair); none was given");
            TORCH_CHECK_VALUE(*capacity >= 0 && *capacity < (int64_t{1} << 31),
                              "capacity must be in [0, 2^31) rows per rank pair, got ", *capacity);
            // Received (row, slot) pairs are int32-indexed (layout, slot_to_row, the device wire rows).
            TORCH_CHECK_VALUE(*capacity * num_ranks_ * topk_idx.size(1) < (int64_t{1} << 31),
                              "capacity * EP size * top_k must be < 2^31 (received slots are int32-indexed), got ",
                              *capacity, " * ", num_ranks_, " * ", topk_idx.size(1));
            args.capacity = *capacity;
        }
        TORCH_CHECK_VALUE(!tag.has_value() || *tag != core::kNoTag, "tag ", core::kNoTag, " is reserved");
        Communicator& comm = comm_for(x);

        // ---- placement: an invalid map is this rank's error, reported to every rank through the headers
        std::string error;
        core::DispatchError map_error = core::kNoError;
        int64_t map_error_value = 0, map_error_index = 0;
        if (expert_to_rank.has_value()) {
            const at::Tensor& map = *expert_to_rank;
            TORCH_CHECK_VALUE(map.dim() == 1 && map.size(0) == num_experts, "expert_to_rank must have shape [",
                              num_experts, "] (num_experts), got ", map.sizes());
            TORCH_CHECK_TYPE(map.scalar_type() == at::kInt || map.scalar_type() == at::kLong,
                             "expert_to_rank must be int32 or int64, got ", map.scalar_type());
            // NOTES: a CUDA map is copied to the host here; pass a CPU map to keep capacity mode free of syncs.
            const at::Tensor host_map = map.to(at::kCPU, at::kInt).contiguous();
            error = core::make_expert_placement(host_map.data_ptr<int32_t>(), static_cast<int>(num_experts),
                                                num_ranks_, &args.placement);
            if (!error.empty()) {
                const int32_t* m = host_map.data_ptr<int32_t>();
                for (int64_t e = 0; e < num_experts; ++e) {
                    if (m[e] < 0 || m[e] >= num_ranks_) {
                        map_error = core::kBadExpertMap, map_error_value = m[e], map_error_index = e;
                        break;
                    }
                }
                core::make_expert_placement(nullptr, num_ranks_, num_ranks_, &args.placement);  // stand-in
            }
        } else {
            error = core::make_expert_placement(nullptr, static_cast<int>(num_experts), num_ranks_, &args.placement);
            TORCH_CHECK_VALUE(error.empty(), error);
        }
        args.mine = core::make_header(num_experts, x.size(1), static_cast<int>(to_dtype(x, "x")), topk_idx.size(1),
                                      args.capacity_mode, args.capacity, args.placement.fingerprint,
                                      num_dispatches_, tag.value_or(core::kNoTag));
        args.mine[core::kError] = map_error;
        args.mine[core::kErrorValue] = map_error_value;
        args.mine[core::kErrorIndex] = map_error_index;
        if (x.is_cpu()) return dispatch_host(comm, x, topk_idx, topk_weights, args);
#ifdef EPMOE_WITH_CUDA
        return dispatch_device(comm, x, topk_idx, topk_weights, args);
#else
        TORCH_CHECK(false, "this epmoe build has no CUDA runtime");
#endif
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
        return combine_rows(expert_out, weights.has_value() ? *weights : at::Tensor(), h, /*poison=*/true);
    }

    // Combine backward's transfer: rows [num_tokens, C] -> [N_wire_recv, C], row i = rows[source token of i].
    at::Tensor forward_rows(const at::Tensor& rows, const HandlePtr& h) {
        TORCH_CHECK_VALUE(h && rows.dim() == 2 && rows.size(0) == h->num_tokens, "rows must have shape [",
                          h ? h->num_tokens : 0, ", C], got ", rows.sizes());
        Communicator& comm = comm_for(rows);
        at::Tensor send;
        if (h->device_path) {
#ifdef EPMOE_WITH_CUDA
            const int64_t row_bytes = rows.size(1) * rows.element_size();
            const at::Tensor flat = rows.contiguous().view(at::kByte);
            send = device::gather_rows(flat, row_bytes, h->send_token_idx, 1).view(rows.scalar_type());
#endif
        } else {
            auto selected = rows.contiguous().index_select(0, h->send_token_idx);
            send = selected;
            if (h->capacity_mode) {
                send = at::zeros({sum(h->send_splits), rows.size(1)}, rows.options());
                send.index_copy_(0, h->send_wire_pos, selected);
            }
        }
        auto out = at::empty({sum(h->recv_splits), rows.size(1)}, rows.options());
        count_bytes(h->send_splits, rows.size(1) * rows.element_size());
        std::shared_ptr<CommWork> work = comm.all_to_all(out, send, h->recv_splits, h->send_splits);
        finish_work(work, stream_ordered(*h));
        return out;
    }

    // Dispatch backward for the weights: per-row values [M] -> fp32 [num_tokens, k] on the source rank.
    at::Tensor reverse_slots(const at::Tensor& values, const HandlePtr& h) {
        TORCH_CHECK_VALUE(h && values.dim() == 1 && values.size(0) == h->num_recv_rows, "values must have shape [",
                          h ? h->num_recv_rows : 0, "], got ", values.sizes());
        const int64_t k = h->num_topk;
        at::Tensor per_slot;  // [N_wire_recv, k]: the value of each (received row, slot) that landed here, else 0
        if (h->device_path) {
            const auto fp32 = values.options().dtype(at::kFloat);
            const at::Tensor padded = at::cat({values.to(at::kFloat), at::zeros({1}, fp32)});
            const at::Tensor idx = at::where(h->slot_to_row >= 0, h->slot_to_row, h->num_recv_rows).view(-1);
            per_slot = padded.index_select(0, idx).view({-1, k});
        } else {
            const int64_t num_recv = h->recv_slot_row.size(0);
            per_slot = at::zeros({num_recv * k}, values.options().dtype(at::kFloat));
            per_slot.index_copy_(0, h->row_src.to(at::kLong) * k + h->row_slot, values.to(at::kFloat));
            per_slot = per_slot.view({num_recv, k});
        }
        return reverse(per_slot, h)->wait();
    }

    // Unweighted reverse of expert-major rows [M, H] -> [num_tokens, H] in x's dtype (dispatch backward for x).
    at::Tensor reverse_rows(const at::Tensor& rows, const HandlePtr& h) {
        TORCH_CHECK_VALUE(h, "handle must be the handle of a dispatch on this EPGroup");
        const at::Tensor typed = rows.to(h->dtype);
        check_handle(h, typed, "rows", h->num_recv_rows);
        return combine_rows(typed, at::Tensor(), h, /*poison=*/false)->wait();
    }

  private:
    static bool stream_ordered(const DispatchHandle& h) { return h.device_path && h.capacity_mode; }

    void count_bytes(const std::vector<int64_t>& rows_per_rank, int64_t row_bytes) {
        for (int r = 0; r < num_ranks_; ++r) {
            if (r != rank_) total_bytes_sent_ += rows_per_rank[r] * row_bytes;
        }
    }

    // The header exchange: send [R, kHeaderLen] int64 (row r goes to rank r) -> recv, the headers received.
    std::shared_ptr<CommWork> exchange_headers(Communicator& comm, const at::Tensor& send, const at::Tensor& recv) {
        ++num_dispatches_;  // the headers carry num_dispatches_ before this exchange
        const std::vector<int64_t> ones(num_ranks_, 1);
        return comm.all_to_all(recv, send, ones, ones);
    }

    HandlePtr new_handle(const at::Tensor& x, const at::Tensor& topk_idx, const DispatchArgs& args) {
        auto h = std::make_shared<DispatchHandle>();
        h->rank = rank_;
        h->num_ranks = num_ranks_;
        h->num_tokens = x.size(0);
        h->hidden = x.size(1);
        h->num_topk = topk_idx.size(1);
        h->num_local_experts = args.placement.num_local_experts[rank_];
        h->dtype = x.scalar_type();
        h->capacity_mode = args.capacity_mode;
        h->capacity = args.capacity;
        h->drop_overflow = args.drop_overflow;
        h->mine = args.mine;
        return h;
    }

    // ---- host path (CPU tensors, gloo)
    std::shared_ptr<PendingDispatch> dispatch_host(Communicator& comm, const at::Tensor& x,
                                                   const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                                   const DispatchArgs& args) {
        const int64_t num_tokens = x.size(0), hidden = x.size(1), num_topk = topk_idx.size(1);
        const at::Device device = x.device();
        auto h = new_handle(x, topk_idx, args);
        core::DispatchHeader mine = args.mine;

        // Plan; a bad id is this rank's error: it sends its header with no rows and every rank raises.
        const at::Tensor host_idx = topk_idx.to(at::kCPU, at::kInt).contiguous();
        core::SendPlan plan;
        if (mine[core::kError] == core::kNoError) {
            const int64_t bad = core::find_bad_expert_id(host_idx.data_ptr<int32_t>(), num_tokens,
                                                         static_cast<int>(num_topk), static_cast<int>(args.num_experts));
            if (bad >= 0) {
                mine[core::kError] = core::kBadExpertId;
                mine[core::kErrorValue] = host_idx.data_ptr<int32_t>()[bad];
                mine[core::kErrorIndex] = bad;
            }
        }
        const bool planned = mine[core::kError] == core::kNoError;
        const std::string error = core::plan_dispatch(planned ? host_idx.data_ptr<int32_t>() : nullptr,
                                                      planned ? num_tokens : 0, static_cast<int>(num_topk),
                                                      args.placement, args.capacity_mode ? args.capacity : -1, &plan);
        TORCH_CHECK_VALUE(error.empty(), error);
        const int64_t capacity = args.capacity;
        h->host_send_per_rank = plan.num_send_per_rank;
        h->send_splits = args.capacity_mode ? std::vector<int64_t>(num_ranks_, capacity) : plan.num_send_per_rank;
        h->overflow = to_device(plan.num_overflow_per_rank, at::kLong, device);
        h->host_send_overflow = sum(plan.num_overflow_per_rank);
        h->send_token_idx = to_device(plan.send_token_idx, at::kInt, device);
        std::vector<int64_t> wire_pos(plan.send_token_idx.size());
        for (int64_t r = 0, n = 0; r < num_ranks_; ++r) {
            const int64_t base = args.capacity_mode ? r * capacity : n;
            for (int64_t i = 0; i < plan.num_send_per_rank[r]; ++i) wire_pos[n + i] = base + i;
            n += plan.num_send_per_rank[r];
        }
        h->send_wire_pos = to_device(wire_pos, at::kLong, device);
        h->token_send_offsets = plan.token_send_offsets;
        h->token_send_rows = plan.token_send_rows;

        // ---- header exchange: counts + agreement + errors; every rank raises the same message on a problem
        auto send_header = at::empty({num_ranks_, core::kHeaderLen}, at::TensorOptions().dtype(at::kLong));
        std::vector<int64_t> slots_per_rank(num_ranks_, 0);
        for (int64_t r = 0, i = 0; r < num_ranks_; ++r) {
            for (const int64_t end = i + plan.num_send_per_rank[r]; i < end; ++i) {
                for (int64_t j = 0; j < num_topk; ++j) slots_per_rank[r] += plan.send_slot_expert[i * num_topk + j] >= 0;
            }
        }
        for (int r = 0; r < num_ranks_; ++r) {
            int64_t* row = send_header.data_ptr<int64_t>() + r * core::kHeaderLen;
            std::copy(mine.begin(), mine.end(), row);
            row[core::kNumRows] = plan.num_send_per_rank[r];
            row[core::kNumOverflow] = plan.num_overflow_per_rank[r];
            row[core::kNumSlots] = slots_per_rank[r];
        }
        auto recv_header = at::empty_like(send_header);
        exchange_headers(comm, send_header, recv_header)->wait();
        const std::vector<core::DispatchHeader> recv = headers_from(recv_header);
        raise_header_error(mine, recv, rank_);
        h->host_recv_per_rank.assign(num_ranks_, 0);
        for (int r = 0; r < num_ranks_; ++r) {
            h->host_recv_per_rank[r] = recv[r][core::kNumRows];
            h->host_recv_overflow += recv[r][core::kNumOverflow];
        }
        h->recv_splits = args.capacity_mode ? std::vector<int64_t>(num_ranks_, capacity) : h->host_recv_per_rank;

        // ---- pack the wire rows
        const int64_t x_bytes = hidden * x.element_size();
        const int64_t row_bytes = x_bytes + 4 * (1 + 2 * num_topk);
        const at::Tensor x_c = x.contiguous();
        auto send_wire = at::empty({sum(h->send_splits), row_bytes}, x.options().dtype(at::kByte));
        uint8_t* wire = send_wire.data_ptr<uint8_t>();
        for (int r = 0; r < num_ranks_ && args.capacity_mode; ++r) {  // padding rows: 0xFF = token -1, no slot
            const int64_t pad_begin = r * capacity + plan.num_send_per_rank[r], pad_end = (r + 1) * capacity;
            if (pad_end > pad_begin) std::memset(wire + pad_begin * row_bytes, 0xFF, (pad_end - pad_begin) * row_bytes);
        }
        const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
        host::pack_rows(wire, row_bytes, static_cast<const uint8_t*>(x_c.data_ptr()), x_bytes,
                        weights.data_ptr<float>(), plan, h->send_wire_pos.data_ptr<int64_t>());
        auto recv_wire = at::empty({sum(h->recv_splits), row_bytes}, send_wire.options());
        h->num_bytes_sent = 0;
        for (int r = 0; r < num_ranks_; ++r) {
            if (r != rank_) h->num_bytes_sent += h->send_splits[r] * row_bytes;
        }
        total_bytes_sent_ += h->num_bytes_sent;
        std::shared_ptr<CommWork> work = comm.all_to_all(recv_wire, send_wire, h->recv_splits, h->send_splits);

        // ---- unpack on wait(): expert-major expansion
        auto finish = [h, work, recv_wire, x_bytes, device]() -> DispatchOut {
            work->wait();
            const int64_t num_recv = recv_wire.size(0), k = h->num_topk, row_bytes = recv_wire.size(1);
            const uint8_t* meta = recv_wire.data_ptr<uint8_t>() + x_bytes;
            std::vector<int32_t> recv_slots(num_recv * k), recv_token(num_recv);
            for (int64_t i = 0; i < num_recv; ++i) {
                std::memcpy(&recv_token[i], meta + i * row_bytes, 4);
                std::memcpy(&recv_slots[i * k], meta + i * row_bytes + 4, 4 * k);
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
            auto recv_x = at::empty({num_rows, h->hidden}, recv_wire.options().dtype(h->dtype));
            auto recv_topk_weights = at::empty({num_rows}, recv_wire.options().dtype(at::kFloat));
            host::unpack_rows(recv_wire.data_ptr<uint8_t>(), row_bytes, x_bytes, k, layout,
                              static_cast<uint8_t*>(recv_x.data_ptr()), recv_topk_weights.data_ptr<float>());
            return {recv_x, recv_topk_weights, to_device(layout.tokens_per_expert, at::kLong, device),
                    to_device(layout.expert_offsets, at::kLong, device), h};
        };
        return std::make_shared<PendingDispatch>(finish);
    }

#ifdef EPMOE_WITH_CUDA
    // ---- device path (CUDA tensors, NCCL)

    // The placement maps on the device, cached: uploading them is a host-to-device copy, which a capture refuses.
    std::pair<at::Tensor, at::Tensor> device_placement(const core::ExpertPlacement& p, const at::Device& device) {
        const auto key = std::make_tuple(p.fingerprint, p.num_experts, static_cast<int>(device.index()));
        auto it = placements_.find(key);
        if (it != placements_.end()) return it->second;
        TORCH_CHECK(!device::capturing(device), "EP dispatch: a new expert placement cannot be uploaded during CUDA "
                                          "graph capture; run one dispatch with it before capturing");
        if (placements_.size() >= 64) placements_.clear();
        auto maps = std::make_pair(to_device(p.expert_to_rank, at::kInt, device),
                                   to_device(p.expert_to_local, at::kInt, device));
        placements_.emplace(key, maps);
        return maps;
    }

    std::shared_ptr<PendingDispatch> dispatch_device(Communicator& comm, const at::Tensor& x,
                                                     const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                                     const DispatchArgs& args) {
        const int64_t num_topk = topk_idx.size(1), hidden = x.size(1);
        const at::Device device = x.device();
        const bool capacity_mode = args.capacity_mode;
        const bool map_ok = args.mine[core::kError] == core::kNoError;
        auto h = new_handle(x, topk_idx, args);
        h->device_path = true;
        const auto [e2r, e2l] = device_placement(args.placement, device);
        // An invalid map plans no tokens: the headers then carry only its error.
        const at::Tensor idx = (map_ok ? topk_idx : topk_idx.narrow(0, 0, 0)).to(at::kInt).contiguous();
        const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();

        // ---- plan on the device, exchange the headers
        device::SendPlan plan = device::plan_send(idx, e2r, map_ok ? args.num_experts : args.placement.num_experts,
                                                  num_ranks_, capacity_mode ? args.capacity : -1, args.mine);
        h->counts = plan.counts;
        h->overflow = plan.counts.select(0, core::kOverflow);
        h->recv_headers = at::empty_like(plan.headers);
        std::shared_ptr<CommWork> header_work = exchange_headers(comm, plan.headers, h->recv_headers);
        int64_t num_wire_send = 0, num_wire_recv = 0;
        if (!capacity_mode) {
            // NOTES: the one host read of exact mode: the received headers and this rank's counts.
            header_work->wait();
            const at::Tensor host =
                at::cat({h->recv_headers.view(-1), plan.counts.select(0, core::kSent)}).to(at::kCPU);
            const int64_t* v = host.data_ptr<int64_t>();
            std::vector<core::DispatchHeader> recv(num_ranks_);
            for (int r = 0; r < num_ranks_; ++r) std::copy_n(v + r * core::kHeaderLen, core::kHeaderLen, recv[r].begin());
            // this rank's own header came back from itself: it carries any bad id the planner found
            raise_header_error(args.mine, recv, rank_);
            h->host_send_per_rank.assign(v + num_ranks_ * core::kHeaderLen, v + host.numel());
            h->host_recv_per_rank.resize(num_ranks_);
            for (int r = 0; r < num_ranks_; ++r) {
                h->host_recv_per_rank[r] = recv[r][core::kNumRows];
                h->num_recv_rows += recv[r][core::kNumSlots];
            }
            h->send_splits = h->host_send_per_rank;
            h->recv_splits = h->host_recv_per_rank;
        } else {
            verify_signature(args.mine, *h, *header_work);
            h->counts_on_host = false;
            h->headers_ok = device::headers_agree(args.mine, h->recv_headers);
            h->send_splits.assign(num_ranks_, args.capacity);
            h->recv_splits.assign(num_ranks_, args.capacity);
            h->num_recv_rows = h->num_local_experts > 0 ? num_ranks_ * args.capacity * num_topk : 0;
        }
        header_work.reset();
        num_wire_send = sum(h->send_splits);
        num_wire_recv = sum(h->recv_splits);

        // ---- wire rows, pack, payload exchange
        std::tie(h->token_wire_row, h->send_token_idx) = device::plan_wire_rows(plan, num_wire_send);
        const int64_t x_bytes = hidden * x.element_size();
        // Device wire rows are padded to 16 bytes, so that the row kernels move 16-byte vectors.
        const int64_t row_bytes = (x_bytes + 4 * (1 + 2 * num_topk) + 15) / 16 * 16;
        const at::Tensor x_c = map_ok ? x.contiguous() : x.narrow(0, 0, 0).contiguous();
        const at::Tensor send_wire = device::pack_wire(x_c, idx, map_ok ? weights : weights.narrow(0, 0, 0), e2r, e2l,
                                                       plan.counts, h->send_token_idx, row_bytes);
        auto recv_wire = at::empty({num_wire_recv, row_bytes}, send_wire.options());
        h->num_bytes_sent = 0;
        for (int r = 0; r < num_ranks_; ++r) {
            if (r != rank_) h->num_bytes_sent += h->send_splits[r] * row_bytes;
        }
        total_bytes_sent_ += h->num_bytes_sent;
        std::shared_ptr<CommWork> work = comm.all_to_all(recv_wire, send_wire, h->recv_splits, h->send_splits);
        if (capacity_mode && !device::capturing(device)) h->fence = comm.fence();

        // ---- expand on the device on wait()
        auto finish = [h, work, recv_wire, x_bytes]() -> DispatchOut {
            finish_work(work, stream_ordered(*h));
            return expand_device(h, recv_wire, x_bytes);
        };
        return std::make_shared<PendingDispatch>(finish);
    }

    // Capacity mode orders the caller's stream after the header exchange. The first dispatch of each shape
    // signature also waits for it on the host (with the timeout) and reads the received headers, outside a graph
    // capture, so that ranks whose payload sizes differ raise here instead of hanging in the payload exchange.
    void verify_signature(const core::DispatchHeader& mine, const DispatchHandle& h, CommWork& header_work) {
        const std::vector<int64_t> signature(mine.begin() + core::kNumExperts, mine.end());
        if (verified_.count(signature) != 0) {
            header_work.wait_stream();
            return;
        }
        TORCH_CHECK(!device::capturing(h.recv_headers.device()),
                    "EP dispatch in capacity mode: the first dispatch with these shapes (num_experts, hidden, dtype, "
                    "top-k, capacity, placement) checks agreement across ranks on the host and cannot be captured; "
                    "run it once before capturing the CUDA graph");
        header_work.wait();
        raise_header_error(mine, headers_from(h.recv_headers), rank_);
        verified_.insert(signature);
    }

    static DispatchOut expand_device(const HandlePtr& h, const at::Tensor& recv_wire, int64_t x_bytes) {
        const int64_t num_recv = recv_wire.size(0), k = h->num_topk;
        const int64_t num_rows = h->num_recv_rows, num_local = h->num_local_experts;
        const auto i32 = recv_wire.options().dtype(at::kInt);
        const auto i64 = recv_wire.options().dtype(at::kLong);
        const at::Tensor slots = recv_wire.narrow(1, x_bytes + 4, 4 * k).contiguous().view(at::kInt);  // [N, k]
        at::Tensor tokens_per_expert, expert_offsets, row_to_slot;
        if (num_local > 0) {
            at::Tensor all_rows;
            std::tie(tokens_per_expert, expert_offsets, h->slot_to_row, all_rows) =
                device::expert_layout(slots, num_local);
            row_to_slot = all_rows.narrow(0, 0, num_rows);  // exact: the M rows; capacity: all, padding -1
        } else {
            tokens_per_expert = at::zeros({0}, i64);
            expert_offsets = at::zeros({1}, i64);
            h->slot_to_row = at::full({num_recv, k}, -1, i32);
            row_to_slot = at::empty({0}, i32);
        }
        const at::Tensor valid = row_to_slot >= 0;
        const at::Tensor flat_slot = at::where(valid, row_to_slot, 0);
        h->row_src = at::where(valid, at::div(row_to_slot, k, "trunc"), 0).to(at::kInt);
        h->row_slot = at::where(valid, at::remainder(row_to_slot, k), 0).to(at::kInt);
        auto recv_x = device::gather_rows(recv_wire, x_bytes, row_to_slot, k).view(h->dtype).view({num_rows, h->hidden});
        const at::Tensor wire_weights = recv_wire.narrow(1, x_bytes + 4 * (1 + k), 4 * k).contiguous().view(at::kFloat);
        at::Tensor recv_topk_weights = num_rows > 0 ? wire_weights.view(-1).index_select(0, flat_slot)
                                                    : at::empty({0}, recv_wire.options().dtype(at::kFloat));
        recv_topk_weights = at::where(valid, recv_topk_weights, 0.0f);
        h->recv_src_token = recv_wire.narrow(1, x_bytes, 4).contiguous().view(at::kInt).view(-1);
        if (h->capacity_mode) {
            h->recv_src_rank = h->capacity > 0 ? at::div(at::arange(num_recv, i32), h->capacity, "floor").to(at::kInt)
                                               : at::empty({0}, i32);
        } else {
            std::vector<int32_t> src_rank;
            for (int r = 0; r < h->num_ranks; ++r) src_rank.insert(src_rank.end(), h->recv_splits[r], r);
            h->recv_src_rank = to_device(src_rank, at::kInt, recv_wire.device());
        }
        return {recv_x, recv_topk_weights, tokens_per_expert, expert_offsets, h};
    }
#endif

    void check_handle(const HandlePtr& h, const at::Tensor& t, const char* name, int64_t rows) {
        TORCH_CHECK_VALUE(h, "handle must be the handle of a dispatch on this EPGroup");
        TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == h->hidden, name, " must have shape [",
                          rows, ", ", h->hidden, "], got ", t.sizes());
        TORCH_CHECK_TYPE(t.scalar_type() == h->dtype, name, " must have the dispatched dtype ", h->dtype, ", got ",
                         t.scalar_type());
    }

    // Reduce on the expert rank, send back, sum on the source rank. poison: in device capacity mode, tokens that
    // lost rows to the capacity (without drop_overflow) and dispatches whose headers disagreed come out NaN.
    std::shared_ptr<PendingTensor> combine_rows(const at::Tensor& expert_out, const at::Tensor& weights,
                                                const HandlePtr& h, bool poison) {
        at::Tensor partial;  // [N_wire_recv, H] in x's dtype: one row per received (token, this rank)
        if (h->device_path) {
#ifdef EPMOE_WITH_CUDA
            at::Tensor slot_weights;  // [N_wire_recv, k]: the weight of each (received row, slot)
            if (weights.defined()) {
                const auto fp32 = weights.options().dtype(at::kFloat);
                const at::Tensor padded = at::cat({weights.to(at::kFloat), at::zeros({1}, fp32)});
                const at::Tensor idx = at::where(h->slot_to_row >= 0, h->slot_to_row, h->num_recv_rows).view(-1);
                slot_weights = padded.index_select(0, idx).view(h->slot_to_row.sizes());
            }
            partial = device::sum_rows(expert_out, h->slot_to_row, slot_weights);
#endif
        } else {
            partial = host::reduce_slots(expert_out, weights, h->recv_slot_row, h->num_recv_rows);
        }
        auto pending = reverse(partial, h);
        return std::make_shared<PendingTensor>([pending, h, poison]() -> at::Tensor {
            at::Tensor y = pending->wait();
            if (!stream_ordered(*h)) {
                if (poison) h->check();  // after the exchange: an overflow never leaves a peer waiting
                return y;
            }
            if (!poison) return y;
            const double nan = std::numeric_limits<double>::quiet_NaN();
            at::Tensor bad = (h->headers_ok == 0).view({1, 1});
            if (!h->drop_overflow) bad = bad | (h->token_wire_row == core::kOverflowed).any(1, true);
            return y.masked_fill(bad, nan);
        });
    }

    // Sends per-received-row values back to the source ranks and sums them per token in fp32, ascending rank.
    //   rows [N_wire_recv, C] (float dtype, sent as is) -> [num_tokens, C] in rows' dtype on the source rank
    std::shared_ptr<PendingTensor> reverse(const at::Tensor& rows, const HandlePtr& h) {
        Communicator& comm = comm_for(rows);
        auto back = at::empty({sum(h->send_splits), rows.size(1)}, rows.options());
        count_bytes(h->recv_splits, rows.size(1) * rows.element_size());
        std::shared_ptr<CommWork> work = comm.all_to_all(back, rows.contiguous(), h->send_splits, h->recv_splits);
        return std::make_shared<PendingTensor>([h, back, work]() -> at::Tensor {
            finish_work(work, stream_ordered(*h));
            if (!h->device_path) return host::sum_partials(back, *h);
#ifdef EPMOE_WITH_CUDA
            return device::sum_rows(back, h->token_wire_row, at::Tensor());
#else
            TORCH_CHECK(false, "this epmoe build has no CUDA runtime");
#endif
        });
    }

    std::unique_ptr<ProcessGroupCommunicator> host_;
    std::unique_ptr<Communicator> nccl_;
    int rank_ = 0, num_ranks_ = 1;
    int64_t total_bytes_sent_ = 0;
    int64_t num_dispatches_ = 0;  // the sequence number every header carries
    bool destroyed_ = false;
    std::set<std::vector<int64_t>> verified_;  // capacity-mode shape signatures checked across ranks
    std::map<std::tuple<uint64_t, int, int>, std::pair<at::Tensor, at::Tensor>> placements_;
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
        .def_property_readonly("num_send_per_rank", &DispatchHandle::num_send_per_rank,
                               "rows sent to each rank (CUDA capacity mode: read from the device)")
        .def_property_readonly("num_recv_per_rank", &DispatchHandle::num_recv_per_rank,
                               "rows received from each rank (CUDA capacity mode: read from the device)")
        .def_readonly("send_token_idx", &DispatchHandle::send_token_idx, "int32 [N_send] token of each sent row")
        .def_readonly("recv_src_rank", &DispatchHandle::recv_src_rank, "int32 [N_recv] source rank of each row")
        .def_readonly("recv_src_token", &DispatchHandle::recv_src_token, "int32 [N_recv] source token, -1 = pad")
        .def_readonly("row_src", &DispatchHandle::row_src, "int32 [M] received row of each recv_x row")
        .def_readonly("row_slot", &DispatchHandle::row_slot, "int32 [M] top-k slot of each recv_x row")
        .def_readonly("overflow", &DispatchHandle::overflow, "int64 [R] rows not sent to each rank (capacity)")
        .def_property_readonly("num_send_overflow", &DispatchHandle::num_send_overflow)
        .def_property_readonly("num_recv_overflow", &DispatchHandle::num_recv_overflow)
        .def_readonly("num_recv_rows", &DispatchHandle::num_recv_rows)
        .def_readonly("counts_on_host", &DispatchHandle::counts_on_host,
                      "False in CUDA capacity mode: the counts stay on the device and the num_* fields read it")
        .def_readonly("num_bytes_sent", &DispatchHandle::num_bytes_sent, "dispatch payload bytes to other ranks")
        .def("check", &DispatchHandle::check, py::call_guard<py::gil_scoped_release>(),
             "Raise if the ranks disagreed, an input was invalid, or rows overflowed the capacity without "
             "drop_overflow=True.");

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
        .def_property_readonly("num_dispatches", &Runtime::num_dispatches)
        .def_property_readonly("has_nccl", &Runtime::has_nccl)
        .def("dispatch", &Runtime::dispatch, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
             py::arg("num_experts"), py::arg("expert_to_rank"), py::arg("mode"), py::arg("capacity"),
             py::arg("drop_overflow"), py::arg("tag") = py::none(), py::call_guard<py::gil_scoped_release>())
        .def("combine", &Runtime::combine, py::arg("expert_out"), py::arg("recv_topk_weights"), py::arg("handle"),
             py::call_guard<py::gil_scoped_release>())
        .def("forward_rows", &Runtime::forward_rows, py::call_guard<py::gil_scoped_release>())
        .def("reverse_slots", &Runtime::reverse_slots, py::call_guard<py::gil_scoped_release>())
        .def("reverse_rows", &Runtime::reverse_rows, py::call_guard<py::gil_scoped_release>())
        .def("synchronize", &Runtime::synchronize, py::call_guard<py::gil_scoped_release>())
#ifdef EPMOE_WITH_NCCL
        .def("init_nccl", &Runtime::init_nccl, py::arg("unique_id"), py::arg("device"))
        .def_static("nccl_unique_id", []() { return py::bytes(nccl_unique_id()); })
#endif
        .def("destroy", &Runtime::destroy);
}

}  // namespace epmoe
