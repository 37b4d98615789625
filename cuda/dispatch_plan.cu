// Device dispatch planner and wire-row kernels. The plan and its CPU twins: cpp/core/dispatch_plan.h.
// NOTES: every order here is fixed by scans over token indices (never by atomics), so the plan is bitwise the one
// of the CPU twins; the only atomic (the first out-of-range slot) takes a minimum, which is order-free.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <initializer_list>

#include "cpp/core/check.h"
#include "cuda/common.cuh"
#include "cuda/dispatch_plan.cuh"

namespace epmoe::cuda {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kPlanItems = 4;  // tokens per thread and round: 1024 tokens per block-wide scan
constexpr int kHeaderThreads = 256;
constexpr int kRowThreads = 256;  // wire-row kernels: one warp per row

// One block per destination rank r: scans the tokens in order, so position p of a token among those sent to r
// is the number of earlier tokens with an expert on r (core::plan_rank_counts).
__global__ void __launch_bounds__(kPlanThreads) plan_counts_kernel(const int32_t* __restrict__ topk_idx,
                                                                   int64_t num_tokens, int num_topk,
                                                                   const int32_t* __restrict__ expert_to_rank,
                                                                   int num_experts, int num_ranks, int64_t capacity,
                                                                   int32_t* __restrict__ token_rank_pos,
                                                                   int64_t* __restrict__ counts,
                                                                   int64_t* __restrict__ bad_slot) {
    using Scan = cub::BlockScan<int32_t, kPlanThreads>;
    using Reduce = cub::BlockReduce<int64_t, kPlanThreads>;
    __shared__ union {
        typename Scan::TempStorage scan;
        typename Reduce::TempStorage reduce;
    } temp;
    __shared__ unsigned long long first_bad;
    const int r = blockIdx.x;
    const int64_t num_slots = num_tokens * num_topk;
    if (threadIdx.x == 0) first_bad = static_cast<unsigned long long>(num_slots);
    __syncthreads();

    int64_t position = 0;    // tokens with an expert on r before this round (same value in every thread)
    int64_t slots_sent = 0;  // this thread's share of kSentSlots
    for (int64_t round = 0; round < num_tokens; round += kPlanThreads * kPlanItems) {
        int32_t here[kPlanItems], flag[kPlanItems], before[kPlanItems];
#pragma unroll
        for (int i = 0; i < kPlanItems; ++i) {
            const int64_t t = round + threadIdx.x * kPlanItems + i;
            here[i] = 0;
            if (t < num_tokens) {
                for (int j = 0; j < num_topk; ++j) {
                    const int32_t e = __ldg(topk_idx + t * num_topk + j);
                    if (e >= 0 && e < num_experts) {
                        here[i] += __ldg(expert_to_rank + e) == r;
                    } else if (e != -1 && r == 0) {
                        atomicMin(&first_bad, static_cast<unsigned long long>(t * num_topk + j));
                    }
                }
            }
            flag[i] = here[i] > 0;
        }
        int32_t round_total = 0;
        Scan(temp.scan).ExclusiveSum(flag, before, round_total);
#pragma unroll
        for (int i = 0; i < kPlanItems; ++i) {
            const int64_t t = round + threadIdx.x * kPlanItems + i;
            if (t >= num_tokens) continue;
            int32_t value = core::kNotSent;
            if (flag[i]) {
                const int64_t pos = position + before[i];
                const bool kept = capacity < 0 || pos < capacity;
                value = kept ? static_cast<int32_t>(pos) : core::kOverflowed;
                if (kept) slots_sent += here[i];
            }
            token_rank_pos[t * num_ranks + r] = value;
        }
        position += round_total;
        __syncthreads();  // temp is reused by the next round
    }
    const int64_t total_slots = Reduce(temp.reduce).Sum(slots_sent);
    if (threadIdx.x == 0) {
        const int64_t sent = capacity < 0 || position < capacity ? position : capacity;
        counts[core::kWanted * num_ranks + r] = position;
        counts[core::kSent * num_ranks + r] = sent;
        counts[core::kOverflow * num_ranks + r] = position - sent;
        counts[core::kSentSlots * num_ranks + r] = total_slots;
        if (r == 0) *bad_slot = static_cast<int64_t>(first_bad);
    }
}

// Single block: kBase (core::plan_rank_offsets) and the header row sent to every rank.
__global__ void __launch_bounds__(kHeaderThreads) plan_headers_kernel(int num_ranks, int64_t capacity,
                                                                      const HeaderRow mine,
                                                                      const int32_t* __restrict__ topk_idx,
                                                                      int64_t num_slots, int64_t* __restrict__ counts,
                                                                      const int64_t* __restrict__ bad_slot,
                                                                      int64_t* __restrict__ headers) {
    using Scan = cub::BlockScan<int64_t, kHeaderThreads>;
    __shared__ typename Scan::TempStorage temp;
    const int64_t bad = *bad_slot;
    const bool report_bad = mine.v[core::kError] == core::kNoError && bad < num_slots;
    int64_t carry = 0;
    for (int first = 0; first < num_ranks; first += kHeaderThreads) {
        const int r = first + threadIdx.x;
        int64_t v = r < num_ranks ? counts[core::kSent * num_ranks + r] : 0;
        int64_t total = 0;
        Scan(temp).ExclusiveSum(v, v, total);
        if (r < num_ranks) {
            counts[core::kBase * num_ranks + r] = capacity < 0 ? carry + v : r * capacity;
            int64_t* h = headers + static_cast<int64_t>(r) * core::kHeaderLen;
            for (int f = 0; f < core::kHeaderLen; ++f) h[f] = mine.v[f];
            h[core::kNumRows] = counts[core::kSent * num_ranks + r];
            h[core::kNumOverflow] = counts[core::kOverflow * num_ranks + r];
            h[core::kNumSlots] = counts[core::kSentSlots * num_ranks + r];
            if (report_bad) {
                h[core::kError] = core::kBadExpertId;
                h[core::kErrorValue] = topk_idx[bad];
                h[core::kErrorIndex] = bad;
            }
        }
        carry += total;
        __syncthreads();
    }
}

// core::plan_wire_rows, one thread per (token, rank).
__global__ void __launch_bounds__(256) plan_wire_rows_kernel(const int32_t* __restrict__ token_rank_pos,
                                                             int64_t num_pairs, int num_ranks,
                                                             const int64_t* __restrict__ counts,
                                                             int32_t* __restrict__ token_wire_row,
                                                             int32_t* __restrict__ wire_token) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_pairs;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int32_t pos = token_rank_pos[i];
        if (pos < 0) {
            token_wire_row[i] = pos;
            continue;
        }
        const int64_t row = counts[core::kBase * num_ranks + i % num_ranks] + pos;
        token_wire_row[i] = static_cast<int32_t>(row);
        wire_token[row] = static_cast<int32_t>(i / num_ranks);
    }
}

// core::headers_agree on one thread (num_ranks headers of a few words).
__global__ void headers_agree_kernel(const HeaderRow mine, const int64_t* __restrict__ recv, int num_ranks,
                                     int32_t* __restrict__ ok) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int32_t agree = 1;
    for (int r = 0; r < num_ranks; ++r) {
        const int64_t* h = recv + static_cast<int64_t>(r) * core::kHeaderLen;
        if (h[core::kMagic] != core::kHeaderMagic || h[core::kError] != core::kNoError) agree = 0;
        for (int f = core::kSequence; f < core::kHeaderLen; ++f) agree &= h[f] == mine.v[f];
    }
    *ok = agree;
}

// core::wire_row_rank: the largest r with base[r] <= w.
__device__ __forceinline__ int wire_row_rank(const int64_t* counts, int num_ranks, int64_t w) {
    int lo = 0, hi = num_ranks - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (__ldg(counts + core::kBase * num_ranks + mid) <= w) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// A 4-byte word at p: one store when the wire's metadata is 4-byte aligned, else four byte stores.
__device__ __forceinline__ void store_word(uint8_t* p, uint32_t v, bool aligned) {
    if (aligned) {
        *reinterpret_cast<uint32_t*>(p) = v;
    } else {
#pragma unroll
        for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(v >> (8 * b));
    }
}

// One warp copies num_vecs V from src (zeros when src is null) to dst.
template <typename V>
__device__ __forceinline__ void warp_copy_row(V* dst, const V* src, int64_t num_vecs, int lane) {
    for (int64_t v = lane; v < num_vecs; v += 32) dst[v] = src != nullptr ? src[v] : V{};
}

template <typename V>
__global__ void __launch_bounds__(kRowThreads) pack_wire_kernel(
    const uint8_t* __restrict__ x, int64_t x_bytes, const int32_t* __restrict__ topk_idx,
    const float* __restrict__ topk_weights, int num_topk, const int32_t* __restrict__ expert_to_rank,
    const int32_t* __restrict__ expert_to_local, int num_experts, const int64_t* __restrict__ counts, int num_ranks,
    const int32_t* __restrict__ wire_token, int64_t num_wire_rows, int64_t row_bytes, bool meta_aligned,
    uint8_t* __restrict__ wire) {
    const int lane = threadIdx.x % 32;
    const int64_t num_warps = static_cast<int64_t>(gridDim.x) * (kRowThreads / 32);
    for (int64_t w = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / 32; w < num_wire_rows;
         w += num_warps) {
        const int32_t t = __ldg(wire_token + w);
        uint8_t* dst = wire + w * row_bytes;
        const V* src = t >= 0 ? reinterpret_cast<const V*>(x + t * x_bytes) : nullptr;
        warp_copy_row(reinterpret_cast<V*>(dst), src, x_bytes / static_cast<int64_t>(sizeof(V)), lane);
        // metadata (core::wire_row_slots): token, slot list, weights
        uint8_t* meta = dst + x_bytes;
        const int r = wire_row_rank(counts, num_ranks, w);
        if (lane == 0) store_word(meta, static_cast<uint32_t>(t), meta_aligned);
        for (int j = lane; j < num_topk; j += 32) {
            const int32_t e = t >= 0 ? __ldg(topk_idx + static_cast<int64_t>(t) * num_topk + j) : -1;
            const bool here = e >= 0 && e < num_experts && __ldg(expert_to_rank + e) == r;
            const int32_t slot = here ? __ldg(expert_to_local + e) : -1;
            const float weight = here ? __ldg(topk_weights + static_cast<int64_t>(t) * num_topk + j) : 0.0f;
            store_word(meta + 4 * (1 + j), static_cast<uint32_t>(slot), meta_aligned);
            store_word(meta + 4 * (1 + num_topk + j), __float_as_uint(weight), meta_aligned);
        }
    }
}

template <typename V>
__global__ void __launch_bounds__(kRowThreads) gather_rows_kernel(const uint8_t* __restrict__ src,
                                                                  int64_t src_stride, int64_t row_bytes,
                                                                  const int32_t* __restrict__ index, int divisor,
                                                                  int64_t num_rows, uint8_t* __restrict__ dst,
                                                                  int64_t dst_stride) {
    const int lane = threadIdx.x % 32;
    const int64_t num_warps = static_cast<int64_t>(gridDim.x) * (kRowThreads / 32);
    for (int64_t m = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / 32; m < num_rows;
         m += num_warps) {
        const int32_t i = __ldg(index + m);
        const V* row = i >= 0 ? reinterpret_cast<const V*>(src + (i / divisor) * src_stride) : nullptr;
        warp_copy_row(reinterpret_cast<V*>(dst + m * dst_stride), row, row_bytes / static_cast<int64_t>(sizeof(V)),
                      lane);
    }
}

// Widest access (16, 8, 4, 2 or 1 bytes) dividing every size and every address.
int widest_access(std::initializer_list<int64_t> sizes, std::initializer_list<const void*> ptrs) {
    for (int bytes = 16; bytes > 1; bytes /= 2) {
        bool ok = true;
        for (int64_t s : sizes) ok = ok && s % bytes == 0;
        for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % bytes == 0;
        if (ok) return bytes;
    }
    return 1;
}

// Calls f(V{}) with the unsigned vector type of `bytes` bytes.
template <typename F>
void with_access(int bytes, F&& f) {
    switch (bytes) {
        case 16: f(uint4{}); return;
        case 8: f(uint2{}); return;
        case 4: f(uint32_t{}); return;
        case 2: f(uint16_t{}); return;
        default: f(uint8_t{}); return;
    }
}

unsigned row_grid(int64_t num_rows) { return grid_for(num_rows * 32, kRowThreads); }

}  // namespace

void launch_plan_send(const int32_t* topk_idx, int64_t num_tokens, int num_topk, const int32_t* expert_to_rank,
                      int num_experts, int num_ranks, int64_t capacity, const HeaderRow& mine,
                      int32_t* token_rank_pos, int64_t* counts, int64_t* bad_slot, int64_t* headers,
                      cudaStream_t stream) {
    EPMOE_HOST_CHECK(num_ranks >= 1 && num_topk >= 1, "bad plan sizes: num_ranks ", num_ranks, ", num_topk ",
                     num_topk);
    EPMOE_HOST_CHECK(num_tokens * num_topk < (int64_t{1} << 31), "too many slots for int32 rows: ",
                     num_tokens * num_topk);
    plan_counts_kernel<<<num_ranks, kPlanThreads, 0, stream>>>(topk_idx, num_tokens, num_topk, expert_to_rank,
                                                               num_experts, num_ranks, capacity, token_rank_pos,
                                                               counts, bad_slot);
    EPMOE_LAUNCH_CHECK();
    plan_headers_kernel<<<1, kHeaderThreads, 0, stream>>>(num_ranks, capacity, mine, topk_idx, num_tokens * num_topk,
                                                          counts, bad_slot, headers);
    EPMOE_LAUNCH_CHECK();
}

void launch_plan_wire_rows(const int32_t* token_rank_pos, int64_t num_tokens, int num_ranks, const int64_t* counts,
                           int64_t num_wire_rows, int32_t* token_wire_row, int32_t* wire_token, cudaStream_t stream) {
    if (num_wire_rows > 0) {
        EPMOE_CUDA_CHECK(cudaMemsetAsync(wire_token, 0xff, static_cast<size_t>(num_wire_rows) * sizeof(int32_t),
                                         stream));
    }
    const int64_t num_pairs = num_tokens * num_ranks;
    if (num_pairs == 0) return;
    plan_wire_rows_kernel<<<grid_for(num_pairs, 256), 256, 0, stream>>>(token_rank_pos, num_pairs, num_ranks, counts,
                                                                        token_wire_row, wire_token);
    EPMOE_LAUNCH_CHECK();
}

void launch_headers_agree(const HeaderRow& mine, const int64_t* recv, int num_ranks, int32_t* ok,
                          cudaStream_t stream) {
    headers_agree_kernel<<<1, 32, 0, stream>>>(mine, recv, num_ranks, ok);
    EPMOE_LAUNCH_CHECK();
}

void launch_pack_wire(const void* x, int64_t x_bytes, const int32_t* topk_idx, const float* topk_weights,
                      int num_topk, const int32_t* expert_to_rank, const int32_t* expert_to_local, int num_experts,
                      const int64_t* counts, int num_ranks, const int32_t* wire_token, int64_t num_wire_rows,
                      int64_t row_bytes, void* wire, cudaStream_t stream) {
    if (num_wire_rows == 0) return;
    const bool meta_aligned = x_bytes % 4 == 0 && row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(wire) % 4 == 0;
    with_access(widest_access({x_bytes, row_bytes}, {x, wire}), [&](auto v) {
        using V = decltype(v);
        pack_wire_kernel<V><<<row_grid(num_wire_rows), kRowThreads, 0, stream>>>(
            static_cast<const uint8_t*>(x), x_bytes, topk_idx, topk_weights, num_topk, expert_to_rank,
            expert_to_local, num_experts, counts, num_ranks, wire_token, num_wire_rows, row_bytes, meta_aligned,
            static_cast<uint8_t*>(wire));
    });
    EPMOE_LAUNCH_CHECK();
}

void launch_gather_rows(const void* src, int64_t src_stride, int64_t row_bytes, const int32_t* index, int divisor,
                        int64_t num_rows, void* dst, int64_t dst_stride, cudaStream_t stream) {
    if (num_rows == 0 || row_bytes == 0) return;
    EPMOE_HOST_CHECK(divisor >= 1, "gather divisor must be >= 1, got ", divisor);
    with_access(widest_access({row_bytes, src_stride, dst_stride}, {src, dst}), [&](auto v) {
        using V = decltype(v);
        gather_rows_kernel<V><<<row_grid(num_rows), kRowThreads, 0, stream>>>(
            static_cast<const uint8_t*>(src), src_stride, row_bytes, index, divisor, num_rows,
            static_cast<uint8_t*>(dst), dst_stride);
    });
    EPMOE_LAUNCH_CHECK();
}

}  // namespace epmoe::cuda
