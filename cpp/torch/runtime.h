// The expert-parallel runtime: a communicator interface with two backends (a torch.distributed ProcessGroup, used
// with gloo for CPU tensors, and NCCL for CUDA tensors) and the dispatch/combine driver on top of it.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace epmoe {

// A transfer in flight. wait() blocks until it is done (gloo; NCCL: the host polls for completion, then orders the
// caller's CUDA stream after it) and raises on transport errors (a dead peer, a timeout). wait_stream() only orders
// the caller's CUDA stream after the transfer, without blocking the host, so it can be captured in a CUDA graph;
// transport errors then surface at the next host wait on the communicator (host transports: the same as wait()).
// The buffers stay alive until the work is destroyed; destroying a work that was never waited for does not block.
class CommWork {
  public:
    virtual ~CommWork() = default;
    virtual void wait() = 0;
    virtual void wait_stream() { wait(); }
};

// All-to-all over dim 0 of contiguous tensors: input rows [sum(input_splits), ...] go to ranks 0..R-1 in order;
// output receives output_splits[r] rows from rank r. Row shapes and dtypes must agree across ranks.
class Communicator {
  public:
    virtual ~Communicator() = default;
    virtual int rank() const = 0;
    virtual int num_ranks() const = 0;
    virtual std::unique_ptr<CommWork> all_to_all(const at::Tensor& output, const at::Tensor& input,
                                                 const std::vector<int64_t>& output_splits,
                                                 const std::vector<int64_t>& input_splits) = 0;
    // A work that completes once every transfer issued so far has: its wait() is the host wait (with the
    // communicator's timeout) for transfers that were only stream-ordered.
    virtual std::unique_ptr<CommWork> fence() = 0;
    // Releases transport resources; later calls fail. Explicit (not in the destructor), as DeepEP does.
    virtual void destroy() = 0;
};

#ifdef EPMOE_WITH_NCCL
// NCCL bootstrap, driven from Python: rank 0 makes an id, the process group broadcasts it, every rank connects.
std::string nccl_unique_id();
// One non-blocking ncclComm_t for the EP group on `device`, with its own communication stream. Every wait polls
// NCCL's error state against `timeout`; on an error or at the deadline the communicator is aborted and the wait
// raises, so a dead peer never hangs the caller. See nccl_communicator.cpp.
std::unique_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank, int num_ranks, int device,
                                                     std::chrono::milliseconds timeout);
#endif

// Adds the runtime classes (Runtime, DispatchHandle, pending results) to the _C module.
void register_runtime(pybind11::module_& m);

}  // namespace epmoe
