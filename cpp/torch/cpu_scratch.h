// Large per-call scratch for the CPU expert ops, reused across calls. A fresh buffer of tens of MB is new mmap'ed
// memory (glibc maps every allocation above 32 MB), and first-touching it page by page costs as much as the
// work at these sizes; reused memory is already mapped.
#pragma once

#include <cstddef>

namespace epmoe::cpu {

// RAII lease of at least `bytes` of 64-byte aligned memory from a process-wide pool (thread-safe). Contents are
// undefined. Returned blocks are kept for the next call, at most kMaxKeptBlocks and kMaxKeptBytes in total.
class ScratchBuffer {
  public:
    explicit ScratchBuffer(size_t bytes);
    ~ScratchBuffer();
    ScratchBuffer(const ScratchBuffer&) = delete;
    ScratchBuffer& operator=(const ScratchBuffer&) = delete;

    void* data() const { return data_; }

  private:
    void* data_ = nullptr;
    size_t capacity_ = 0;
};

// Per-thread scratch for one work item (panels, fp32 tiles): grows, never shrinks, 64-byte aligned.
void* thread_scratch(size_t bytes);

}  // namespace epmoe::cpu
