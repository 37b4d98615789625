#include "cpp/torch/cpu_scratch.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace epmoe::cpu {
namespace {

constexpr size_t kMaxKeptBlocks = 4;
constexpr size_t kMaxKeptBytes = size_t{1} << 30;
constexpr size_t kHugePage = size_t{2} << 20;

struct Pool {
    std::mutex mutex;
    std::vector<std::pair<size_t, void*>> free_blocks;  // (capacity, pointer)
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: leases may end during static destruction
    return *p;
}

void* allocate(size_t bytes) {
    // 2 MB aligned, rounded to 2 MB, and transparent huge pages requested: fewer page faults on first touch
    const size_t capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(kHugePage, capacity);
    if (p == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, capacity, MADV_HUGEPAGE);
#endif
    return p;
}

}  // namespace

ScratchBuffer::ScratchBuffer(size_t bytes) {
    bytes = std::max<size_t>(bytes, 64);
    {
        Pool& p = pool();
        std::lock_guard<std::mutex> lock(p.mutex);
        auto best = p.free_blocks.end();
        for (auto it = p.free_blocks.begin(); it != p.free_blocks.end(); ++it) {
            if (it->first >= bytes && (best == p.free_blocks.end() || it->first < best->first)) best = it;
        }
        if (best != p.free_blocks.end()) {
            capacity_ = best->first;
            data_ = best->second;
            p.free_blocks.erase(best);
            return;
        }
    }
    capacity_ = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    data_ = allocate(bytes);
}

ScratchBuffer::~ScratchBuffer() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    p.free_blocks.emplace_back(capacity_, data_);
    // Keep the largest blocks within the limits; free the rest.
    std::sort(p.free_blocks.begin(), p.free_blocks.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    size_t kept = 0, total = 0;
    for (auto& block : p.free_blocks) {
        if (kept < kMaxKeptBlocks && total + block.first <= kMaxKeptBytes) {
            ++kept;
            total += block.first;
        } else {
            std::free(block.second);
            block.second = nullptr;
        }
    }
    p.free_blocks.erase(std::remove_if(p.free_blocks.begin(), p.free_blocks.end(),
                                       [](const auto& b) { return b.second == nullptr; }),
                        p.free_blocks.end());
}

void* thread_scratch(size_t bytes) {
    struct Block {
        std::unique_ptr<char[]> storage;
        size_t capacity = 0;
    };
    thread_local Block block;
    if (bytes + 64 > block.capacity) {
        block.capacity = std::max(bytes + 64, block.capacity * 2);
        block.storage.reset(new char[block.capacity]);
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(block.storage.get());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
}

}  // namespace epmoe::cpu
