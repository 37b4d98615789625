// Token permutation kernels. Layouts are in cuda/permute.cuh; the order of rows is DESIGN.md §3.
#include <cub/block/block_scan.cuh>

#include "cpp/core/check.h"
#include "cuda/common.cuh"
#include "cuda/permute.cuh"

namespace epmoe::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kLayoutThreads = 256;
constexpr int kMaxLayoutBlocks = 1024;
constexpr int kScanItems = kMaxLayoutBlocks / kLayoutThreads;
constexpr int kOffsetsThreads = 256;

// How the flat slots are split: block b owns slots [b * chunk, (b + 1) * chunk); inside the scatter kernel,
// warp w of that block owns the w-th of scatter_warps equal sub-chunks.
struct LayoutPlan {
    int num_blocks;
    int64_t chunk;
    int scatter_warps;
};

LayoutPlan plan_layout(int64_t num_slots, int num_experts) {
    // Keep the [num_experts, num_blocks] int32 count matrix at most 16 MB.
    int64_t max_blocks = (int64_t{1} << 22) / num_experts;
    max_blocks = max_blocks < 1 ? 1 : (max_blocks > kMaxLayoutBlocks ? kMaxLayoutBlocks : max_blocks);
    int64_t chunk = (num_slots + max_blocks - 1) / max_blocks;
    chunk = chunk < 1024 ? 1024 : chunk;
    chunk = (chunk + kLayoutThreads - 1) / kLayoutThreads * kLayoutThreads;  // divisible by 32 * scatter_warps
    const int64_t num_blocks = (num_slots + chunk - 1) / chunk;
    // Per-warp histograms of the scatter kernel: scatter_warps * num_experts int32 in 48 KB, a power of two <= 8.
    int scatter_warps = 8;
    while (scatter_warps > 1 && scatter_warps * num_experts > kMaxLayoutExperts) scatter_warps /= 2;
    return {static_cast<int>(num_blocks < 1 ? 1 : num_blocks), chunk, scatter_warps};
}

// Local expert of a routed id, or -1 when the slot is skipped (id -1, out of range, or not local).
__device__ __forceinline__ int map_expert(int32_t id, int num_experts, const int32_t* expert_map, int num_global) {
    if (expert_map != nullptr) {
        if (id < 0 || id >= num_global) return -1;
        id = __ldg(expert_map + id);
    }
    return (id >= 0 && id < num_experts) ? id : -1;
}

// block_counts [num_experts, num_blocks] int32: slots of block b routed to expert e. Shared-memory atomics
// only count, they decide no order.
__global__ void __launch_bounds__(kLayoutThreads) layout_count_kernel(const int32_t* topk_idx, int64_t num_slots,
                                                                      int64_t chunk, int num_experts,
                                                                      const int32_t* expert_map, int num_global,
                                                                      int32_t* block_counts) {
    extern __shared__ int32_t hist[];  // [num_experts]
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int64_t begin = blockIdx.x * chunk;
    const int64_t end = begin + chunk < num_slots ? begin + chunk : num_slots;
    for (int64_t f = begin + threadIdx.x; f < end; f += blockDim.x) {
        const int e = map_expert(__ldg(topk_idx + f), num_experts, expert_map, num_global);
        if (e >= 0) atomicAdd(&hist[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
        block_counts[static_cast<int64_t>(e) * gridDim.x + blockIdx.x] = hist[e];
}

// One block per expert: block_counts[e, :] becomes its exclusive prefix sum over blocks (in place);
// tokens_per_expert[e] = its total.
__global__ void __launch_bounds__(kLayoutThreads) layout_scan_kernel(int32_t* block_counts, int num_blocks,
                                                                     int64_t* tokens_per_expert) {
    using Scan = cub::BlockScan<int32_t, kLayoutThreads>;
    __shared__ typename Scan::TempStorage temp;
    int32_t* counts = block_counts + static_cast<int64_t>(blockIdx.x) * num_blocks;
    int32_t v[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
        const int b = threadIdx.x * kScanItems + i;
        v[i] = b < num_blocks ? counts[b] : 0;
    }
    int32_t total = 0;
    Scan(temp).ExclusiveSum(v, v, total);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
        const int b = threadIdx.x * kScanItems + i;
        if (b < num_blocks) counts[b] = v[i];
    }
    if (threadIdx.x == 0) tokens_per_expert[blockIdx.x] = total;
}

// Single block: expert_offsets [num_experts + 1] int64 = exclusive prefix sum of tokens_per_expert, scanned
// kOffsetsThreads experts at a time with a running carry.
__global__ void __launch_bounds__(kOffsetsThreads) layout_offsets_kernel(const int64_t* tokens_per_expert,
                                                                         int num_experts, int64_t* expert_offsets) {
    using Scan = cub::BlockScan<int64_t, kOffsetsThreads>;
    __shared__ typename Scan::TempStorage temp;
    int64_t carry = 0;
    for (int base = 0; base < num_experts; base += kOffsetsThreads) {
        const int e = base + threadIdx.x;
        int64_t v = e < num_experts ? tokens_per_expert[e] : 0;
        int64_t total = 0;
        Scan(temp).ExclusiveSum(v, v, total);
        if (e < num_experts) expert_offsets[e] = carry + v;
        carry += total;
        __syncthreads();  // temp is reused by the next round
    }
    if (threadIdx.x == 0) expert_offsets[num_experts] = carry;
}

// Writes slot_to_row and row_to_slot. NOTES: the row of slot f routed to e is expert_offsets[e] + (slots of e
// in earlier blocks) + (slots of e in earlier warps of this block) + (slots of e earlier in this warp's
// sub-chunk); warps walk their sub-chunk 32 slots at a time in order and rank lanes with __match_any_sync, so
// rows ascend with f inside each expert whatever the scheduling.
__global__ void __launch_bounds__(kLayoutThreads) layout_scatter_kernel(
    const int32_t* topk_idx, int64_t num_slots, int64_t chunk, int num_experts, const int32_t* expert_map,
    int num_global, const int32_t* block_prefix, const int64_t* expert_offsets, int32_t* slot_to_row,
    int32_t* row_to_slot) {
    extern __shared__ int32_t warp_rows[];  // [num_warps, num_experts]: counts, then next row of each expert
    const int num_warps = blockDim.x / 32;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int i = threadIdx.x; i < num_warps * num_experts; i += blockDim.x) warp_rows[i] = 0;
    __syncthreads();

    const int64_t sub_chunk = chunk / num_warps;
    const int64_t begin = blockIdx.x * chunk + warp * sub_chunk;
    const int64_t end = begin + sub_chunk < num_slots ? begin + sub_chunk : num_slots;
    int32_t* my_rows = warp_rows + warp * num_experts;

    // Pass 1: per-warp counts (the lowest lane of each group of equal experts adds the group size).
    for (int64_t base = begin; base < end; base += 32) {
        const int64_t f = base + lane;
        const int e = f < end ? map_expert(__ldg(topk_idx + f), num_experts, expert_map, num_global) : -1;
        const unsigned same = __match_any_sync(kFullMask, e);
        if (e >= 0 && lane == __ffs(same) - 1) my_rows[e] += __popc(same);
        __syncwarp();
    }
    __syncthreads();

    // Pass 2: counts -> first row of each (warp, expert).
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        int64_t row = expert_offsets[e] + block_prefix[static_cast<int64_t>(e) * gridDim.x + blockIdx.x];
        for (int w = 0; w < num_warps; ++w) {
            const int32_t count = warp_rows[w * num_experts + e];
            warp_rows[w * num_experts + e] = static_cast<int32_t>(row);
            row += count;
        }
    }
    __syncthreads();

    // Pass 3: ordered scatter.
    for (int64_t base = begin; base < end; base += 32) {
        const int64_t f = base + lane;
        const int e = f < end ? map_expert(__ldg(topk_idx + f), num_experts, expert_map, num_global) : -1;
        const unsigned same = __match_any_sync(kFullMask, e);
        if (e >= 0) {
            const int32_t row = my_rows[e] + __popc(same & lanes_below);
            slot_to_row[f] = row;
            row_to_slot[row] = static_cast<int32_t>(f);
        } else if (f < end) {
            slot_to_row[f] = -1;
        }
        __syncwarp();
        if (e >= 0 && lane == __ffs(same) - 1) my_rows[e] += __popc(same);
        __syncwarp();
    }
}

// rows[r] = x[row_to_slot[r] / num_topk] as raw vectors V; four independent loads in flight per thread.
template <typename V>
__global__ void __launch_bounds__(256) permute_kernel(const V* __restrict__ x, const int32_t* __restrict__ row_to_slot,
                                                     int64_t num_rows, int64_t vecs_per_row, int num_topk,
                                                     V* __restrict__ rows) {
    constexpr int kUnroll = 4;
    const int64_t total = num_rows * vecs_per_row;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; first < total;
         first += stride * kUnroll) {
        V val[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t idx = first + u * stride;
            val[u] = V{};
            if (idx < total) {
                const int64_t r = idx / vecs_per_row;
                const int32_t slot = __ldg(row_to_slot + r);
                if (slot >= 0) val[u] = __ldg(x + (slot / num_topk) * vecs_per_row + (idx - r * vecs_per_row));
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t idx = first + u * stride;
            if (idx < total) rows[idx] = val[u];
        }
    }
}

// out[t] = sum_j w[t, j] * rows[slot_to_row[t, j]]: fp32, ascending j, separate multiply and add (no FMA
// contraction) like the CPU loop.
template <typename T, int kN>
__global__ void __launch_bounds__(256) unpermute_kernel(const Pack<T, kN>* __restrict__ rows,
                                                       const int32_t* __restrict__ slot_to_row,
                                                       const float* __restrict__ topk_weights, int64_t num_tokens,
                                                       int num_topk, int64_t vecs_per_row,
                                                       Pack<T, kN>* __restrict__ out) {
    const int64_t total = num_tokens * vecs_per_row;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t t = idx / vecs_per_row;
        const int64_t v = idx - t * vecs_per_row;
        float acc[kN];
#pragma unroll
        for (int i = 0; i < kN; ++i) acc[i] = 0.0f;
        for (int j = 0; j < num_topk; ++j) {
            const int32_t row = __ldg(slot_to_row + t * num_topk + j);
            if (row < 0) continue;
            const float w = __ldg(topk_weights + t * num_topk + j);
            const Pack<T, kN> p = rows[row * vecs_per_row + v];
#pragma unroll
            for (int i = 0; i < kN; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, to_float(p.v[i])));
        }
        Pack<T, kN> o;
#pragma unroll
        for (int i = 0; i < kN; ++i) o.v[i] = from_float<T>(acc[i]);
        out[idx] = o;
    }
}

// One warp per slot: grad_rows[row] = w * grad_out[t]; grad_topk_weights[slot] = <grad_out[t], rows[row]>
// (fp32, fixed butterfly order, so deterministic).
template <typename T, int kN>
__global__ void __launch_bounds__(256) unpermute_backward_kernel(
    const Pack<T, kN>* __restrict__ grad_out, const Pack<T, kN>* __restrict__ rows,
    const int32_t* __restrict__ slot_to_row, const float* __restrict__ topk_weights, int64_t num_slots, int num_topk,
    int64_t vecs_per_row, Pack<T, kN>* __restrict__ grad_rows, float* __restrict__ grad_topk_weights) {
    const int lane = threadIdx.x % 32;
    const int64_t num_warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
    for (int64_t slot = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; slot < num_slots;
         slot += num_warps) {
        const int32_t row = __ldg(slot_to_row + slot);
        if (row < 0) {
            if (lane == 0) grad_topk_weights[slot] = 0.0f;
            continue;
        }
        const int64_t t = slot / num_topk;
        const float w = __ldg(topk_weights + slot);
        float dot = 0.0f;
        for (int64_t v = lane; v < vecs_per_row; v += 32) {
            const Pack<T, kN> g = grad_out[t * vecs_per_row + v];
            const Pack<T, kN> x = rows[row * vecs_per_row + v];
            Pack<T, kN> o;
#pragma unroll
            for (int i = 0; i < kN; ++i) {
                const float gf = to_float(g.v[i]);
                o.v[i] = from_float<T>(w * gf);
                dot += gf * to_float(x.v[i]);
            }
            grad_rows[row * vecs_per_row + v] = o;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);
        if (lane == 0) grad_topk_weights[slot] = dot;
    }
}

// Widest access (16, 8, 4 or 2 bytes) that divides the row size and every base address.
int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
    for (int bytes = 16; bytes > 2; bytes /= 2) {
        bool ok = row_bytes % bytes == 0;
        for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % bytes == 0;
        if (ok) return bytes;
    }
    return 2;
}

int dtype_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Calls f(T{}, std::integral_constant<int, kN>{}) with the element type of dtype and kN elements per vector.
template <typename F>
void dispatch_vec(DType dtype, int vec_bytes, F&& f) {
    auto by_width = [&](auto elem) {
        using T = decltype(elem);
        switch (vec_bytes / static_cast<int>(sizeof(T))) {
            case 8: if constexpr (sizeof(T) == 2) { f(T{}, std::integral_constant<int, 8>{}); return; } break;
            case 4: f(T{}, std::integral_constant<int, 4>{}); return;
            case 2: f(T{}, std::integral_constant<int, 2>{}); return;
            case 1: f(T{}, std::integral_constant<int, 1>{}); return;
            default: break;
        }
        EPMOE_HOST_CHECK(false, "unsupported vector width ", vec_bytes);
    };
    switch (dtype) {
        case DType::kFloat32: by_width(float{}); return;
        case DType::kBFloat16: by_width(__nv_bfloat16{}); return;
        case DType::kFloat16: by_width(__half{}); return;
    }
    EPMOE_HOST_CHECK(false, "unknown dtype");
}

}  // namespace

size_t moe_layout_workspace_bytes(int64_t num_slots, int num_experts) {
    const LayoutPlan plan = plan_layout(num_slots, num_experts);
    return static_cast<size_t>(plan.num_blocks) * num_experts * sizeof(int32_t);
}

void launch_moe_layout(const int32_t* topk_idx, int64_t num_slots, int num_experts, const int32_t* expert_map,
                       int num_global, int64_t* tokens_per_expert, int64_t* expert_offsets, int32_t* slot_to_row,
                       int32_t* row_to_slot, void* workspace, cudaStream_t stream) {
    EPMOE_HOST_CHECK(num_experts >= 1 && num_experts <= kMaxLayoutExperts, "num_experts must be in [1, ",
                     kMaxLayoutExperts, "], got ", num_experts);
    EPMOE_HOST_CHECK(num_slots >= 0 && num_slots < (int64_t{1} << 31), "num_slots must be < 2^31, got ", num_slots);
    const LayoutPlan plan = plan_layout(num_slots, num_experts);
    auto* block_counts = static_cast<int32_t*>(workspace);
    const size_t hist_bytes = static_cast<size_t>(num_experts) * sizeof(int32_t);

    // Rows past the last expert stay -1; the scatter overwrites every other row.
    // Zero-byte memsets are skipped here and below: an empty tensor's pointer may be null.
    if (num_slots > 0)
        EPMOE_CUDA_CHECK(cudaMemsetAsync(row_to_slot, 0xff, static_cast<size_t>(num_slots) * sizeof(int32_t), stream));
    layout_count_kernel<<<plan.num_blocks, kLayoutThreads, hist_bytes, stream>>>(
        topk_idx, num_slots, plan.chunk, num_experts, expert_map, num_global, block_counts);
    EPMOE_LAUNCH_CHECK();
    layout_scan_kernel<<<num_experts, kLayoutThreads, 0, stream>>>(block_counts, plan.num_blocks, tokens_per_expert);
    EPMOE_LAUNCH_CHECK();
    layout_offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(tokens_per_expert, num_experts, expert_offsets);
    EPMOE_LAUNCH_CHECK();
    layout_scatter_kernel<<<plan.num_blocks, plan.scatter_warps * 32, plan.scatter_warps * hist_bytes, stream>>>(
        topk_idx, num_slots, plan.chunk, num_experts, expert_map, num_global, block_counts, expert_offsets,
        slot_to_row, row_to_slot);
    EPMOE_LAUNCH_CHECK();
}

void launch_moe_permute(const void* x, DType dtype, const int32_t* row_to_slot, int64_t num_rows, int64_t hidden,
                        int num_topk, void* rows, cudaStream_t stream) {
    if (num_rows == 0 || hidden == 0) return;
    const int64_t row_bytes = hidden * dtype_bytes(dtype);
    const int vec = vector_bytes(row_bytes, {x, rows});
    const int64_t vecs = row_bytes / vec;
    const unsigned grid = grid_for(num_rows * vecs, 256);
    auto launch = [&](auto v) {
        using V = decltype(v);
        permute_kernel<V><<<grid, 256, 0, stream>>>(static_cast<const V*>(x), row_to_slot, num_rows, vecs, num_topk,
                                                   static_cast<V*>(rows));
    };
    switch (vec) {
        case 16: launch(uint4{}); break;
        case 8: launch(uint2{}); break;
        case 4: launch(uint32_t{}); break;
        default: launch(uint16_t{}); break;
    }
    EPMOE_LAUNCH_CHECK();
}

void launch_moe_unpermute(const void* rows, DType dtype, const int32_t* slot_to_row, const float* topk_weights,
                          int64_t num_tokens, int num_topk, int64_t hidden, void* out, cudaStream_t stream) {
    if (num_tokens == 0 || hidden == 0) return;
    const int64_t row_bytes = hidden * dtype_bytes(dtype);
    const int vec = vector_bytes(row_bytes, {rows, out});
    dispatch_vec(dtype, vec, [&](auto elem, auto width) {
        using T = decltype(elem);
        constexpr int kN = decltype(width)::value;
        using P = Pack<T, kN>;
        const int64_t vecs = hidden / kN;
        unpermute_kernel<T, kN><<<grid_for(num_tokens * vecs, 256), 256, 0, stream>>>(
            static_cast<const P*>(rows), slot_to_row, topk_weights, num_tokens, num_topk, vecs, static_cast<P*>(out));
    });
    EPMOE_LAUNCH_CHECK();
}

void launch_moe_unpermute_backward(const void* grad_out, const void* rows, DType dtype, const int32_t* slot_to_row,
                                   const float* topk_weights, int64_t num_tokens, int num_topk, int64_t num_rows,
                                   int64_t hidden, void* grad_rows, float* grad_topk_weights, cudaStream_t stream) {
    const int64_t row_bytes = hidden * dtype_bytes(dtype);
    // Rows no slot points at (padding) must read zero; the kernel writes only the referenced rows.
    if (num_rows * row_bytes > 0)
        EPMOE_CUDA_CHECK(cudaMemsetAsync(grad_rows, 0, static_cast<size_t>(num_rows * row_bytes), stream));
    const int64_t num_slots = num_tokens * num_topk;
    if (num_slots == 0) return;
    const int vec = vector_bytes(row_bytes, {grad_out, rows, grad_rows});
    dispatch_vec(dtype, vec, [&](auto elem, auto width) {
        using T = decltype(elem);
        constexpr int kN = decltype(width)::value;
        using P = Pack<T, kN>;
        const int64_t vecs = hidden / kN;
        unpermute_backward_kernel<T, kN><<<grid_for(num_slots * 32, 256), 256, 0, stream>>>(
            static_cast<const P*>(grad_out), static_cast<const P*>(rows), slot_to_row, topk_weights, num_slots,
            num_topk, vecs, static_cast<P*>(grad_rows), grad_topk_weights);
    });
    EPMOE_LAUNCH_CHECK();
}

}  // namespace epmoe::cuda
