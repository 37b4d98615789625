// NCCL backend of the EP communicator (CUDA tensors). Compiled only against a CUDA torch with EPMOE_WITH_NCCL.
//
// The runtime owns one ncclComm_t per EP group, bootstrapped from a unique id that Python broadcasts through the
// torch.distributed group. An all-to-all is a grouped ncclSend/ncclRecv on a dedicated communication stream:
// the comm stream waits on an event recorded on the caller's stream (inputs are ready), and the work's wait() or
// wait_stream() makes the caller's stream wait on the comm stream's completion event. The work object keeps both
// buffers alive; when it is destroyed without a wait, the stream the buffers were allocated on is made to wait for
// the transfer instead, so the caching allocator can only hand the memory out again after the transfer, and the
// destructor never blocks the host.
//
// NOTES: failure handling. The communicator is non-blocking (ncclConfig_t::blocking = 0), so init and ncclGroupEnd
// return at once (ncclInProgress) instead of blocking inside NCCL. Every host wait — init, launch, wait() of a
// transfer, a fence — polls ncclCommGetAsyncError and the completion event on the host against a deadline (the EP
// group's timeout, by default the process group's). On an asynchronous NCCL error (a peer closed its connection) or
// at the deadline (a peer died or stopped calling), the communicator is aborted with ncclCommAbort, which also stops
// its kernels still spinning on the device, and the wait raises. An aborted communicator refuses later calls.
// wait_stream() (capacity mode, CUDA graphs) does not poll: a failure of such a transfer surfaces at the next host
// wait on the communicator (a later exact-mode exchange, EPGroup.synchronize(), handle.check(), destroy()).
// The group of an all-to-all is always ended, also when enqueuing a send or receive failed.
#ifdef EPMOE_WITH_NCCL

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <nccl.h>

#include <chrono>
#include <memory>
#include <thread>

#include "cpp/core/check.h"
#include "cpp/torch/runtime.h"

namespace epmoe {
namespace {

// The communicator and its failure state, shared by the communicator and its in-flight works.
class NcclState {
  public:
    NcclState(int device, std::chrono::milliseconds timeout) : device_(device), timeout_(timeout) {}

    int device() const { return device_; }
    ncclComm_t comm() const { return comm_; }
    ncclComm_t* comm_ptr() { return &comm_; }

    // Throws when the communicator was aborted or destroyed.
    void check_usable() const {
        EPMOE_HOST_CHECK(comm_ != nullptr, "the NCCL communicator of this EP group is unusable: ", failure_);
    }

    // Polls until `done()` holds and NCCL reports no error. Returns "" on success; otherwise aborts the
    // communicator and returns the reason. `what` names the operation in the message.
    template <typename Done>
    std::string poll(const char* what, Done done) {
        if (comm_ == nullptr) return "the NCCL communicator of this EP group is unusable: " + failure_;
        const auto start = std::chrono::steady_clock::now();
        while (true) {
            ncclResult_t state = ncclSuccess;
            const ncclResult_t res = ncclCommGetAsyncError(comm_, &state);
            if (res != ncclSuccess) state = res;
            if (state != ncclSuccess && state != ncclInProgress) {
                return abort(std::string("EP NCCL ") + what + " failed: " + ncclGetErrorString(state) +
                             " (a peer rank died or its connection failed)");
            }
            if (state == ncclSuccess && done()) return "";
            if (std::chrono::steady_clock::now() - start > timeout_) {
                return abort(std::string("EP NCCL ") + what + " timed out after " + std::to_string(timeout_.count()) +
                             " ms: a peer rank died or stopped calling the same EP operations");
            }
            std::this_thread::yield();
        }
    }

    // Completes a non-blocking NCCL call that returned `res`: polls ncclInProgress (or a success that may still
    // have work in flight) to the end; any other result aborts. Throws on failure.
    void complete(const char* what, ncclResult_t res) {
        std::string error;
        if (res == ncclSuccess || res == ncclInProgress) {
            error = poll(what, [] { return true; });
        } else {
            error = abort(std::string("EP NCCL ") + what + " failed: " + ncclGetErrorString(res));
        }
        EPMOE_HOST_CHECK(error.empty(), error);
    }

    // Aborts the communicator (idempotent) and returns the message, which later calls repeat.
    std::string abort(const std::string& reason) {
        // NOTES: ncclCommAbort also ends the kernels of this communicator still waiting for a dead peer.
        if (comm_ != nullptr) ncclCommAbort(comm_);
        comm_ = nullptr;
        failure_ = reason + "; the NCCL communicator of this EP group was aborted";
        return failure_;
    }

    // Orderly shutdown: finalize (polled), then destroy; aborts instead when finalize fails.
    void destroy() {
        if (comm_ == nullptr) return;
        const ncclResult_t res = ncclCommFinalize(comm_);
        if (res != ncclSuccess && res != ncclInProgress) {
            abort(std::string("ncclCommFinalize failed: ") + ncclGetErrorString(res));
            return;
        }
        if (!poll("destroy", [] { return true; }).empty()) return;  // aborted
        ncclCommDestroy(comm_);
        comm_ = nullptr;
        failure_ = "it was destroyed";
    }

  private:
    int device_;
    std::chrono::milliseconds timeout_;
    ncclComm_t comm_ = nullptr;
    std::string failure_ = "it was not initialised";
};

// A CUDA event owned by one object (destroying a recorded event that is still pending is allowed: CUDA releases it
// once it completes).
class Event {
  public:
    Event() { EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
    ~Event() {
        if (event_ != nullptr) cudaEventDestroy(event_);
    }
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    cudaEvent_t get() const { return event_; }

  private:
    cudaEvent_t event_ = nullptr;
};

// True when `stream` is being captured into a CUDA graph: host waits are impossible there.
bool is_capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    EPMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    return status != cudaStreamCaptureStatusNone;
}

class NcclWork final : public CommWork {
  public:
    NcclWork(std::shared_ptr<NcclState> state, std::unique_ptr<Event> done, cudaStream_t alloc_stream,
             at::Tensor output, at::Tensor input)
        : state_(std::move(state)), done_(std::move(done)), alloc_stream_(alloc_stream),
          output_(std::move(output)), input_(std::move(input)) {}
    ~NcclWork() override {
        // NOTES: never blocks: reuse of the buffers on their allocation stream is ordered after the transfer. A
        // refused wait (e.g. on an event recorded in a graph capture that has ended) must not linger as the thread's
        // last CUDA error, which the next kernel's launch check would report as its own.
        if (!waited_ && (output_.defined() || input_.defined()) &&
            cudaStreamWaitEvent(alloc_stream_, done_->get(), 0) != cudaSuccess) {
            (void)cudaGetLastError();
        }
    }
    void wait() override {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state_->device()));
        const cudaStream_t caller = c10::cuda::getCurrentCUDAStream().stream();
        EPMOE_HOST_CHECK(!is_capturing(caller), "this EP transfer waits on the host (exact mode), which a CUDA graph "
                                                "capture cannot contain: use mode='capacity' inside graphs");
        const std::string error = state_->poll("all-to-all", [&] { return event_done(); });
        EPMOE_HOST_CHECK(error.empty(), error);
        EPMOE_HOST_CHECK(query_ == cudaSuccess, "CUDA error in an EP all-to-all: ", cudaGetErrorString(query_));
        order(caller);
    }
    void wait_stream() override {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state_->device()));
        state_->check_usable();
        order(c10::cuda::getCurrentCUDAStream().stream());
    }

  private:
    bool event_done() {
        query_ = cudaEventQuery(done_->get());
        return query_ != cudaErrorNotReady;
    }
    void order(cudaStream_t caller) {
        EPMOE_CUDA_CHECK(cudaStreamWaitEvent(caller, done_->get(), 0));
        waited_ = true;
    }

    std::shared_ptr<NcclState> state_;
    std::unique_ptr<Event> done_;
    cudaStream_t alloc_stream_;
    at::Tensor output_, input_;
    cudaError_t query_ = cudaSuccess;
    bool waited_ = false;
};

class NcclCommunicator final : public Communicator {
  public:
    NcclCommunicator(const std::string& unique_id, int rank, int num_ranks, int device,
                     std::chrono::milliseconds timeout)
        : rank_(rank), num_ranks_(num_ranks), state_(std::make_shared<NcclState>(device, timeout)),
          stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device))) {
        EPMOE_HOST_CHECK(unique_id.size() == sizeof(ncclUniqueId), "the NCCL unique id must have ",
                         sizeof(ncclUniqueId), " bytes, got ", unique_id.size());
        ncclUniqueId id;
        std::copy(unique_id.begin(), unique_id.end(), id.internal);
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;
        state_->complete("communicator init", ncclCommInitRankConfig(state_->comm_ptr(), num_ranks, id, rank, &config));
    }

    int rank() const override { return rank_; }
    int num_ranks() const override { return num_ranks_; }

    std::unique_ptr<CommWork> all_to_all(const at::Tensor& output, const at::Tensor& input,
                                         const std::vector<int64_t>& output_splits,
                                         const std::vector<int64_t>& input_splits) override {
        state_->check_usable();
        EPMOE_HOST_CHECK(output.is_contiguous() && input.is_contiguous(), "all_to_all needs contiguous buffers");
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state_->device()));
        const cudaStream_t caller = c10::cuda::getCurrentCUDAStream().stream();
        const Event ready;
        auto done = std::make_unique<Event>();
        EPMOE_CUDA_CHECK(cudaEventRecord(ready.get(), caller));
        EPMOE_CUDA_CHECK(cudaStreamWaitEvent(stream_.stream(), ready.get(), 0));
        const int64_t in_row = input.dim() > 0 && input.size(0) > 0 ? input.nbytes() / input.size(0) : 0;
        const int64_t out_row = output.dim() > 0 && output.size(0) > 0 ? output.nbytes() / output.size(0) : 0;
        const auto* send = static_cast<const uint8_t*>(input.data_ptr());
        auto* recv = static_cast<uint8_t*>(output.data_ptr());
        const ncclComm_t comm = state_->comm();
        // NOTES: the group is ended whatever happens inside it; a failed enqueue then aborts the communicator
        // (its peers would wait for the missing transfer) and raises.
        EPMOE_NCCL_CHECK(ncclGroupStart());
        ncclResult_t enqueue = ncclSuccess;
        for (int64_t r = 0, send_row = 0, recv_row = 0; r < num_ranks_ && enqueue == ncclSuccess; ++r) {
            if (input_splits[r] > 0) {
                enqueue = ncclSend(send + send_row * in_row, input_splits[r] * in_row, ncclUint8,
                                   static_cast<int>(r), comm, stream_.stream());
            }
            if (enqueue == ncclSuccess && output_splits[r] > 0) {
                enqueue = ncclRecv(recv + recv_row * out_row, output_splits[r] * out_row, ncclUint8,
                                   static_cast<int>(r), comm, stream_.stream());
            }
            send_row += input_splits[r];
            recv_row += output_splits[r];
        }
        const ncclResult_t end = ncclGroupEnd();
        if (enqueue != ncclSuccess) {
            const std::string error = state_->abort(std::string("EP NCCL all-to-all enqueue failed: ") +
                                                    ncclGetErrorString(enqueue));
            EPMOE_HOST_CHECK(false, error);
        }
        state_->complete("all-to-all launch", end);
        EPMOE_CUDA_CHECK(cudaEventRecord(done->get(), stream_.stream()));
        return std::make_unique<NcclWork>(state_, std::move(done), caller, output, input);
    }

    std::unique_ptr<CommWork> fence() override {
        state_->check_usable();
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state_->device()));
        auto done = std::make_unique<Event>();
        EPMOE_CUDA_CHECK(cudaEventRecord(done->get(), stream_.stream()));
        return std::make_unique<NcclWork>(state_, std::move(done), c10::cuda::getCurrentCUDAStream().stream(),
                                          at::Tensor(), at::Tensor());
    }

    void destroy() override { state_->destroy(); }

  private:
    int rank_, num_ranks_;
    std::shared_ptr<NcclState> state_;
    c10::cuda::CUDAStream stream_;
};

}  // namespace

std::string nccl_unique_id() {
    ncclUniqueId id;
    EPMOE_NCCL_CHECK(ncclGetUniqueId(&id));
    return std::string(id.internal, sizeof(id.internal));
}

std::unique_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank, int num_ranks, int device,
                                                     std::chrono::milliseconds timeout) {
    return std::make_unique<NcclCommunicator>(unique_id, rank, num_ranks, device, timeout);
}

}  // namespace epmoe

#endif  // EPMOE_WITH_NCCL
