// NCCL backend of the EP communicator (CUDA tensors). Compiled only against a CUDA torch with EPMOE_WITH_NCCL.
//
// The runtime owns one ncclComm_t per EP group, bootstrapped from a unique id that Python broadcasts through the
// torch.distributed group. An all-to-all is a grouped ncclSend/ncclRecv on a dedicated communication stream:
// the comm stream waits on an event recorded on the caller's stream (inputs are ready), and wait() makes the
// caller's stream wait on the comm stream's completion event. The work object keeps both buffers alive until it
// is destroyed, which happens after wait() has ordered the caller's stream behind the transfer.
#ifdef EPMOE_WITH_NCCL

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <nccl.h>

#include "cpp/core/check.h"
#include "cpp/torch/runtime.h"

namespace epmoe {
namespace {

class NcclWork final : public CommWork {
  public:
    NcclWork(cudaEvent_t done, at::Tensor output, at::Tensor input, int device)
        : done_(done), output_(std::move(output)), input_(std::move(input)), device_(device) {}
    ~NcclWork() override {
        // NOTES: the buffers may be released only once the transfer finished; without a wait() we block here.
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
        if (!waited_) cudaEventSynchronize(done_);
        cudaEventDestroy(done_);
    }
    void wait() override {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
        EPMOE_CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream().stream(), done_, 0));
        waited_ = true;
    }

  private:
    cudaEvent_t done_;
    at::Tensor output_, input_;
    int device_;
    bool waited_ = false;
};

class NcclCommunicator final : public Communicator {
  public:
    NcclCommunicator(const std::string& unique_id, int rank, int num_ranks, int device)
        : rank_(rank), num_ranks_(num_ranks), device_(device),
          stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device))) {
        EPMOE_HOST_CHECK(unique_id.size() == sizeof(ncclUniqueId), "the NCCL unique id must have ",
                         sizeof(ncclUniqueId), " bytes, got ", unique_id.size());
        ncclUniqueId id;
        std::copy(unique_id.begin(), unique_id.end(), id.internal);
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        EPMOE_NCCL_CHECK(ncclCommInitRank(&comm_, num_ranks, id, rank));
    }
    int rank() const override { return rank_; }
    int num_ranks() const override { return num_ranks_; }

    std::unique_ptr<CommWork> all_to_all(const at::Tensor& output, const at::Tensor& input,
                                         const std::vector<int64_t>& output_splits,
                                         const std::vector<int64_t>& input_splits) override {
        EPMOE_HOST_CHECK(comm_ != nullptr, "the NCCL communicator was destroyed");
        EPMOE_HOST_CHECK(output.is_contiguous() && input.is_contiguous(), "all_to_all needs contiguous buffers");
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
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
        EPMOE_NCCL_CHECK(ncclGroupStart());
        for (int r = 0, send_row = 0, recv_row = 0; r < num_ranks_; ++r) {
            if (input_splits[r] > 0) {
                EPMOE_NCCL_CHECK(ncclSend(send + send_row * in_row, input_splits[r] * in_row, ncclUint8, r, comm_,
                                          stream_.stream()));
            }
            if (output_splits[r] > 0) {
                EPMOE_NCCL_CHECK(ncclRecv(recv + recv_row * out_row, output_splits[r] * out_row, ncclUint8, r, comm_,
                                          stream_.stream()));
            }
            send_row += static_cast<int>(input_splits[r]);
            recv_row += static_cast<int>(output_splits[r]);
        }
        EPMOE_NCCL_CHECK(ncclGroupEnd());
        EPMOE_CUDA_CHECK(cudaEventRecord(done, stream_.stream()));
        return std::make_unique<NcclWork>(done, output, input, device_);
    }

    void destroy() override {
        if (comm_ != nullptr) EPMOE_NCCL_CHECK(ncclCommDestroy(comm_));
        comm_ = nullptr;
    }

  private:
    int rank_, num_ranks_, device_;
    c10::cuda::CUDAStream stream_;
    ncclComm_t comm_ = nullptr;
};

}  // namespace

std::string nccl_unique_id() {
    ncclUniqueId id;
    EPMOE_NCCL_CHECK(ncclGetUniqueId(&id));
    return std::string(id.internal, sizeof(id.internal));
}

std::unique_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank, int num_ranks,
                                                     int device) {
    return std::make_unique<NcclCommunicator>(unique_id, rank, num_ranks, device);
}

}  // namespace epmoe

#endif  // EPMOE_WITH_NCCL
