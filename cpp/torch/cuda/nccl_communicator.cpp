// NCCL backend of the EP communicator (CUDA tensors). Compiled only against a CUDA torch with EPMOE_WITH_NCCL.
//
// The runtime owns one ncclComm_t per EP group, bootstrapped from a unique id that Python broadcasts through the
// torch.distributed group. An all-to-all is a grouped ncclSend/ncclRecv on a dedicated communication stream:
// the comm stream waits on an event recorded on the caller's stream (inputs are ready), and wait() makes the
// caller's stream wait on the comm stream's completion event. The work object keeps both buffers alive until it
// is destroyed, which happens after the transfer is complete.
//
// NOTES: failure handling. The communicator is non-blocking (ncclConfig_t::blocking = 0), so init and ncclGroupEnd
// return at once (ncclInProgress) instead of blocking inside NCCL. Every wait — init, launch, the completion of a
// transfer — polls ncclCommGetAsyncError and the completion event on the host against a deadline (the EP group's
// timeout, by default the process group's). On an asynchronous NCCL error (a peer closed its connection) or at the
// deadline (a peer died or stopped calling), the communicator is aborted with ncclCommAbort, which also stops
// its kernels still spinning on the device, and the wait raises. An aborted communicator refuses later calls.
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

class NcclWork final : public CommWork {
  public:
    NcclWork(std::shared_ptr<NcclState> state, cudaEvent_t done, at::Tensor output, at::Tensor input)
        : state_(std::move(state)), done_(done), output_(std::move(output)), input_(std::move(input)) {}
    ~NcclWork() override {
        // NOTES: the buffers may be released only once the transfer finished (or the communicator was aborted,
        // which stops its kernels); without a wait() we poll here and drop the error (destructors do not throw).
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state_->device()));
        if (!waited_) wait_done();
        cudaEventDestroy(done_);
    }
    void wait() override {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state_->device()));
        waited_ = true;
        const std::string error = wait_done();
        EPMOE_HOST_CHECK(error.empty(), error);
        EPMOE_CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream().stream(), done_, 0));
    }

  private:
    // Host-side wait for the completion event, polling NCCL's error state and the deadline.
    std::string wait_done() {
        cudaError_t query = cudaSuccess;
        std::string error = state_->poll("all-to-all", [&] {
            query = cudaEventQuery(done_);
            return query != cudaErrorNotReady;
        });
        if (error.empty() && query != cudaSuccess) error = std::string("CUDA error: ") + cudaGetErrorString(query);
        return error;
    }

    std::shared_ptr<NcclState> state_;
    cudaEvent_t done_;
    at::Tensor output_, input_;
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
        cudaEvent_t ready, done;
        EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
        EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        EPMOE_CUDA_CHECK(cudaEventRecord(ready, caller));
        EPMOE_CUDA_CHECK(cudaStreamWaitEvent(stream_.stream(), ready, 0));
        EPMOE_CUDA_CHECK(cudaEventDestroy(ready));
        const int64_t in_row = input.dim() > 0 && input.size(0) > 0 ? input.nbytes() / input.size(0) : 0;
        const int64_t out_row = output.dim() > 0 && output.size(0) > 0 ? output.nbytes() / output.size(0) : 0;
        const auto* send = static_cast<const uint8_t*>(input.data_ptr());
        auto* recv = static_cast<uint8_t*>(output.data_ptr());
        const ncclComm_t comm = state_->comm();
        EPMOE_NCCL_CHECK(ncclGroupStart());
        for (int64_t r = 0, send_row = 0, recv_row = 0; r < num_ranks_; ++r) {
            if (input_splits[r] > 0) {
                EPMOE_NCCL_CHECK(ncclSend(send + send_row * in_row, input_splits[r] * in_row, ncclUint8,
                                          static_cast<int>(r), comm, stream_.stream()));
            }
            if (output_splits[r] > 0) {
                EPMOE_NCCL_CHECK(ncclRecv(recv + recv_row * out_row, output_splits[r] * out_row, ncclUint8,
                                          static_cast<int>(r), comm, stream_.stream()));
            }
            send_row += input_splits[r];
            recv_row += output_splits[r];
        }
        state_->complete("all-to-all launch", ncclGroupEnd());
        EPMOE_CUDA_CHECK(cudaEventRecord(done, stream_.stream()));
        return std::make_unique<NcclWork>(state_, done, output, input);
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
