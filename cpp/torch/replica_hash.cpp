// epmoe::replica_hash: logical top-k ids -> physical slots by the "hash" replica policy (cpp/core/replica_hash.h),
// one pass instead of a dozen int64 tensor ops. Schema and CPU impl.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "cpp/core/replica_hash.h"
#include "cpp/torch/replica_balance_common.h"

namespace epmoe {
namespace {

// Rows [begin, end); returns the first flat index in them whose id lies outside [-1, num_experts) (that slot is
// written -1), or -1 when all are valid: ids are checked in the same pass.
template <typename Idx>
int64_t replica_hash_rows(const Idx* idx, int64_t num_topk, int64_t num_experts, const int64_t* log2phy, int64_t width,
                          const int64_t* logcnt, int64_t token_offset, int64_t layer, int64_t begin, int64_t end,
                          Idx* out) {
    int64_t first_bad = -1;
    for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < num_topk; ++j) {
            const int64_t f = t * num_topk + j;
            const int64_t e = idx[f];
            if (e < 0 || e >= num_experts) {
                if (e != -1 && first_bad < 0) first_bad = f;
                out[f] = -1;
                continue;
            }
            const int64_t replica = core::replica_of(core::replica_hash32(t + token_offset, j, layer), logcnt[e]);
            out[f] = static_cast<Idx>(log2phy[e * width + replica]);
        }
    }
    return first_bad;
}

at::Tensor replica_hash_cpu(const at::Tensor& topk_idx, const at::Tensor& log2phy, const at::Tensor& logcnt,
                            int64_t token_offset, int64_t layer) {
    check_replica_hash_args(topk_idx, log2phy, logcnt);
    const int64_t num_experts = log2phy.size(0), width = log2phy.size(1);
    const int64_t* cnt = logcnt.data_ptr<int64_t>();
    for (int64_t e = 0; e < num_experts; ++e) {
        TORCH_CHECK_VALUE(cnt[e] >= 1 && cnt[e] <= width, "logcnt values must lie in [1, ", width,
                          "] (max_replicas), got ", cnt[e], " for expert ", e);
    }
    auto out = at::empty_like(topk_idx);
    const int64_t num_tokens = topk_idx.size(0), num_topk = topk_idx.size(1);
    const auto run = [&](auto* idx, auto* dst) {
        // Serial below a few thousand slots: the pass costs less than waking the thread pool. The lowest bad flat
        // index over all chunks is reported, as a serial check would.
        constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
        std::atomic<int64_t> first_bad{kNone};
        at::parallel_for(0, num_tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(num_topk, 1)),
                         [&](int64_t begin, int64_t end) {
                             const int64_t bad = replica_hash_rows(idx, num_topk, num_experts, log2phy.data_ptr<int64_t>(),
                                                                   width, cnt, token_offset, layer, begin, end, dst);
                             int64_t seen = first_bad.load();
                             while (bad >= 0 && bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
                             }
                         });
        const int64_t f = first_bad.load();
        // (The message, idx[f] included, is built only when the check fails.)
        TORCH_CHECK_VALUE(f == kNone, "topk_idx values must lie in [-1, ", num_experts, ") (num_experts of log2phy), got ",
                          idx[f], " at flat index ", f);
    };
    if (topk_idx.scalar_type() == at::kInt) {
        run(topk_idx.data_ptr<int32_t>(), out.data_ptr<int32_t>());
    } else {
        run(topk_idx.data_ptr<int64_t>(), out.data_ptr<int64_t>());
    }
    return out;
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // out [T, k] (topk_idx's dtype): out[t, j] = log2phy[e, floor(hash32(t + token_offset, j, layer) * logcnt[e] /
    // 2^32)] for e = topk_idx[t, j] >= 0, -1 stays -1. CPU: ids outside [-1, E) and logcnt outside [1, M] raise;
    // CUDA: not checked (no host sync), such ids give -1.
    m.def("replica_hash(Tensor topk_idx, Tensor log2phy, Tensor logcnt, int token_offset, int layer) -> Tensor");
}

TORCH_LIBRARY_IMPL(epmoe, CPU, m) {
    m.impl("replica_hash", &epmoe::replica_hash_cpu);
}
