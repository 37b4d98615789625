// "balanced" replica choice on the GPU: count per chunk -> solve quotas (one block) -> assign per chunk.
#include "cpp/core/check.h"
#include "cuda/common.cuh"
#include "cuda/replica_balance.cuh"

namespace epmoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinChunk = 2048;  // pairs per block: a multiple of kThreads

struct Layout {
    int num_chunks;
    int64_t chunk;
    // int64 words: chunk_counts [C, E], chunk_base [C, E], total [E], cum [E, M], bad_maps [1], then the solver
    // scratch
    int64_t* chunk_counts;
    int64_t* chunk_base;
    int64_t* total;
    int64_t* cum;
    int64_t* bad_maps;
    void* scratch;
};

// Chunks of pairs, one block each: at least kMinChunk pairs, at most two blocks per SM.
int num_chunks_for(int64_t num_pairs) {
    const int64_t wanted = (num_pairs + kMinChunk - 1) / kMinChunk;
    const int64_t cap = 2 * static_cast<int64_t>(current_sm_count());
    return static_cast<int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

Layout make_layout(const core::BalanceShape& s, int64_t num_pairs, void* workspace) {
    Layout l;
    l.num_chunks = num_chunks_for(num_pairs);
    const int64_t per = (num_pairs + l.num_chunks - 1) / l.num_chunks;
    l.chunk = (per + kThreads - 1) / kThreads * kThreads;
    const int64_t ce = static_cast<int64_t>(l.num_chunks) * s.num_experts;
    auto* w = static_cast<int64_t*>(workspace);
    l.chunk_counts = w;
    l.chunk_base = w + ce;
    l.total = l.chunk_base + ce;
    l.cum = l.total + s.num_experts;
    l.bad_maps = l.cum + static_cast<int64_t>(s.num_experts) * s.max_replicas;
    l.scratch = l.bad_maps + 1;
    return l;
}

template <typename Idx>
__device__ __forceinline__ int expert_of(const Idx* topk_idx, int64_t f, int64_t num_pairs, int num_experts) {
    if (f >= num_pairs) return -1;
    const Idx e = topk_idx[f];
    return (e >= 0 && e < num_experts) ? static_cast<int>(e) : -1;
}

// chunk_counts[b, e] = pairs of expert e in chunk b.
template <typename Idx>
__global__ void balance_count_kernel(const Idx* topk_idx, int64_t num_pairs, int num_experts, int64_t chunk,
                                     int64_t* chunk_counts) {
    extern __shared__ unsigned int bins[];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) bins[e] = 0;
    __syncthreads();
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
    const int64_t end = begin + chunk < num_pairs ? begin + chunk : num_pairs;
    for (int64_t f = begin + threadIdx.x; f < end; f += blockDim.x) {
        const int e = expert_of(topk_idx, f, num_pairs, num_experts);
        if (e >= 0) atomicAdd(&bins[e], 1u);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
        chunk_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = bins[e];
}

// One block: chunk offsets per expert (group index of each chunk's first pair), totals, the quotas (thread 0),
// then their running sums per expert.
__global__ void balance_solve_kernel(core::BalanceShape s, int num_chunks, const int64_t* counts, const int64_t* prefix,
                                     const int64_t* log2phy, const int64_t* logcnt, int64_t* chunk_counts,
                                     int64_t* chunk_base, int64_t* total, int64_t* cum, int64_t* bad_flag,
                                     void* scratch) {
    __shared__ int bad_maps;
    if (threadIdx.x == 0) bad_maps = 0;
    __syncthreads();
    const int width = s.max_replicas;
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) {
        int64_t running = prefix != nullptr ? prefix[e] : 0;
        for (int c = 0; c < num_chunks; ++c) {
            const int64_t i = static_cast<int64_t>(c) * s.num_experts + e;
            chunk_base[i] = running;
            running += chunk_counts[i];
        }
        const int64_t local = running - (prefix != nullptr ? prefix[e] : 0);
        const int64_t c = counts != nullptr ? counts[e] : local;
        total[e] = c > 0 ? c : 0;  // a negative count would never let the solver finish
        // Rows the solver could index out of bounds with: logcnt outside [1, M], slots not ascending in [0, P).
        const int64_t n = logcnt[e];
        bool ok = n >= 1 && n <= width;
        for (int64_t r = 0; ok && r < n; ++r) {
            const int64_t slot = log2phy[static_cast<int64_t>(e) * width + r];
            ok = slot >= 0 && slot < s.num_slots && (r == 0 || slot > log2phy[static_cast<int64_t>(e) * width + r - 1]);
        }
        if (!ok) atomicExch(&bad_maps, 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        *bad_flag = bad_maps;
        if (bad_maps == 0) {
            core::balance_quotas(s, total, log2phy, logcnt, core::balance_scratch_carve(scratch, s), cum);
        } else {
            for (int e = 0; e < s.num_experts; ++e) cum[static_cast<int64_t>(e) * width] = total[e];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) {
        int64_t* row = cum + static_cast<int64_t>(e) * width;
        const int64_t n = bad_maps == 0 ? logcnt[e] : 1;
        for (int64_t r = 1; r < n; ++r) row[r] += row[r - 1];
    }
}

// Each pair's group index g = chunk_base + its rank among the chunk's pairs of the same expert in flat order
// (warp-stable via match_any, warps in order), then the replica i with cum[i - 1] <= g < cum[i].
template <typename Idx>
__global__ void balance_assign_kernel(const Idx* topk_idx, int64_t num_pairs, core::BalanceShape s, int64_t chunk,
                                      const int64_t* chunk_base, const int64_t* cum, const int64_t* bad_flag,
                                      const int64_t* log2phy, const int64_t* logcnt, Idx* slot_idx) {
    extern __shared__ int running[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) running[e] = 0;
    __syncthreads();
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
    const int64_t end = begin + chunk < num_pairs ? begin + chunk : num_pairs;
    const int width = s.max_replicas;
    const int64_t* base_row = chunk_base + static_cast<int64_t>(blockIdx.x) * s.num_experts;
    const bool bad_maps = *bad_flag != 0;  // then every pair takes replica 0 (only cum[e, 0] is written)
    for (int64_t tile = begin; tile < end; tile += blockDim.x) {
        const int64_t f = tile + threadIdx.x;
        const int e = expert_of(topk_idx, f, end, s.num_experts);
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
        int before = 0;
        // NOTES: warps take their offsets in warp order, so ranks follow flat order inside the tile.
        for (int w = 0; w < kWarps; ++w) {
            if (warp == w && e >= 0) {
                before = running[e];
                __syncwarp(peers);
                if (rank_in_warp == 0) running[e] = before + __popc(peers);
            }
            __syncthreads();
        }
        if (f < end) {
            if (e < 0) {
                slot_idx[f] = -1;
                continue;
            }
            const int64_t g = base_row[e] + before + rank_in_warp;
            const int64_t* row = cum + static_cast<int64_t>(e) * width;
            const int64_t last = bad_maps ? 0 : logcnt[e] - 1;
            int64_t i = 0;
            while (i < last && g >= row[i]) ++i;
            slot_idx[f] = static_cast<Idx>(log2phy[static_cast<int64_t>(e) * width + i]);
        }
    }
}

template <typename Idx>
void launch_typed(const Idx* topk_idx, int64_t num_pairs, const core::BalanceShape& s, const int64_t* log2phy,
                  const int64_t* logcnt, const int64_t* counts, const int64_t* prefix, void* workspace, Idx* slot_idx,
                  cudaStream_t stream) {
    const Layout l = make_layout(s, num_pairs, workspace);
    const size_t bins = static_cast<size_t>(s.num_experts) * sizeof(int);
    balance_count_kernel<Idx><<<l.num_chunks, kThreads, bins, stream>>>(topk_idx, num_pairs, s.num_experts, l.chunk,
                                                                        l.chunk_counts);
    EPMOE_LAUNCH_CHECK();
    balance_solve_kernel<<<1, kThreads, 0, stream>>>(s, l.num_chunks, counts, prefix, log2phy, logcnt, l.chunk_counts,
                                                     l.chunk_base, l.total, l.cum, l.bad_maps, l.scratch);
    EPMOE_LAUNCH_CHECK();
    if (num_pairs == 0) return;
    balance_assign_kernel<Idx><<<l.num_chunks, kThreads, bins, stream>>>(
        topk_idx, num_pairs, s, l.chunk, l.chunk_base, l.cum, l.bad_maps, log2phy, logcnt, slot_idx);
    EPMOE_LAUNCH_CHECK();
}

}  // namespace

size_t balance_workspace_bytes(const core::BalanceShape& s, int64_t num_pairs) {
    const size_t words = 2 * static_cast<size_t>(num_chunks_for(num_pairs)) * s.num_experts + s.num_experts +
                         static_cast<size_t>(s.num_experts) * s.max_replicas + 1;
    return 8 * words + core::balance_scratch_bytes(s);
}

void launch_balance_replicas(const void* topk_idx, bool is_int64, int64_t num_pairs, const core::BalanceShape& s,
                             const int64_t* log2phy, const int64_t* logcnt, const int64_t* counts,
                             const int64_t* prefix, void* workspace, void* slot_idx, cudaStream_t stream) {
    EPMOE_HOST_CHECK(s.num_experts >= 1 && s.num_experts <= kBalanceMaxExperts, "num_experts must lie in [1, ",
                     kBalanceMaxExperts, "], got ", s.num_experts);
    if (is_int64)
        launch_typed(static_cast<const int64_t*>(topk_idx), num_pairs, s, log2phy, logcnt, counts, prefix, workspace,
                     static_cast<int64_t*>(slot_idx), stream);
    else
        launch_typed(static_cast<const int32_t*>(topk_idx), num_pairs, s, log2phy, logcnt, counts, prefix, workspace,
                     static_cast<int32_t*>(slot_idx), stream);
}

}  // namespace epmoe::cuda
