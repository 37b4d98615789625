// Grouped expert GEMMs over expert-major rows. One persistent kernel per op walks a tile schedule built on
// the device from expert_offsets (no host sync, CUDA-graph capturable); tail tiles are masked through
// cp.async zero-fill, empty experts own no tiles. bf16/fp16: mma.sync m16n8k16 with ldmatrix from swizzled
// shared memory, fed by a kStages-deep cp.async pipeline (sm_80 and sm_90). fp32: a SIMT tiled kernel.
#include <cub/block/block_scan.cuh>

#include "cpp/core/check.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.cuh"

namespace epmoe::cuda {
namespace {

constexpr int kBK = 64;  // reduction depth of one pipeline stage (one 128-byte shared-memory row per tile row)
constexpr int kScheduleThreads = 256;

// Everything a GEMM launch needs. Modes: M-grouped forward (rows of A grouped by expert, one weight per expert)
// and wgrad (reduction over the rows of each expert, one output matrix per expert).
struct GemmArgs {
    const void* a;
    const void* b;
    void* c;
    const int64_t* expert_offsets;  // [num_experts + 1] int64
    const int32_t* tile_offsets;    // [num_experts + 1] int32 prefix of m-tiles per expert (forward)
    int num_experts;
    int64_t num_rows;
    int64_t m;            // wgrad: rows of each output matrix (n of the op)
    int64_t n;            // output columns (inter for SwiGLU)
    int64_t k;            // forward: reduction length
    int64_t b_rows;       // forward, weights [b_rows, k] per expert (2 * inter for SwiGLU)
    int n_tiles;          // tiles along n
    int m_tiles;          // wgrad: tiles along m
};

struct TileInfo {
    int e;
    int64_t row_begin, row_end;  // rows of expert e
    int64_t m0, n0;              // first output row (forward: absolute row) and column of the tile
};

struct MaxOp {
    __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

// Single block. NOTES: expert_offsets come from the caller and are never trusted: clamped[e] = min(num_rows,
// max(0, expert_offsets[0..e])) is non-decreasing and inside [0, num_rows], so no tile can read or write outside
// the row buffers whatever the offsets (valid offsets are unchanged). Then tile_offsets[e] = sum over e' < e of
// ceil(rows(e') / bm) from the clamped offsets, tile_offsets[num_experts] = total.
__global__ void __launch_bounds__(kScheduleThreads) tile_schedule_kernel(const int64_t* expert_offsets,
                                                                         int num_experts, int64_t num_rows, int bm,
                                                                         int64_t* clamped, int32_t* tile_offsets) {
    using MaxScan = cub::BlockScan<int64_t, kScheduleThreads>;
    using Scan = cub::BlockScan<int32_t, kScheduleThreads>;
    __shared__ union {
        typename MaxScan::TempStorage max;
        typename Scan::TempStorage sum;
    } temp;
    int64_t running = 0;  // max of the offsets before this round, at least 0
    for (int base = 0; base <= num_experts; base += kScheduleThreads) {
        const int e = base + threadIdx.x;
        int64_t v = e <= num_experts ? expert_offsets[e] : 0;
        int64_t round_max = 0;
        MaxScan(temp.max).InclusiveScan(v, v, MaxOp(), round_max);
        v = v > running ? v : running;
        if (e <= num_experts) clamped[e] = v < num_rows ? v : num_rows;
        running = round_max > running ? round_max : running;
        __syncthreads();
    }
    int32_t carry = 0;
    for (int base = 0; base < num_experts; base += kScheduleThreads) {
        const int e = base + threadIdx.x;
        int32_t v = 0;
        if (e < num_experts) v = static_cast<int32_t>((clamped[e + 1] - clamped[e] + bm - 1) / bm);
        int32_t total = 0;
        Scan(temp.sum).ExclusiveSum(v, v, total);
        if (e < num_experts) tile_offsets[e] = carry + v;
        carry += total;
        __syncthreads();
    }
    if (threadIdx.x == 0) tile_offsets[num_experts] = carry;
}

__device__ __forceinline__ int64_t num_tiles(const GemmArgs& p, bool wgrad) {
    return wgrad ? static_cast<int64_t>(p.num_experts) * p.m_tiles * p.n_tiles
                 : static_cast<int64_t>(p.tile_offsets[p.num_experts]) * p.n_tiles;
}

// Tile t of the schedule. Forward: experts in order; inside one, m-tiles vary fastest so the CTAs that share a
// weight tile run together and the weights stream from HBM about once. Empty experts own no tiles.
template <int kBM, int kBNOut>
__device__ __forceinline__ TileInfo resolve_tile(const GemmArgs& p, int64_t t, bool wgrad) {
    TileInfo ti;
    int64_t local;
    int64_t m_tiles_e;
    if (wgrad) {
        const int64_t per_expert = static_cast<int64_t>(p.m_tiles) * p.n_tiles;
        ti.e = static_cast<int>(t / per_expert);
        local = t - ti.e * per_expert;
        m_tiles_e = p.m_tiles;
    } else {
        // Largest e with tile_offsets[e] <= t / n_tiles; it owns >= 1 tile because tile_offsets[E] > t / n_tiles.
        const int32_t q = static_cast<int32_t>(t / p.n_tiles);
        int lo = 0, hi = p.num_experts - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (__ldg(p.tile_offsets + mid) <= q) lo = mid; else hi = mid - 1;
        }
        ti.e = lo;
        const int32_t first = __ldg(p.tile_offsets + lo);
        local = t - static_cast<int64_t>(first) * p.n_tiles;
        m_tiles_e = __ldg(p.tile_offsets + lo + 1) - first;
    }
    const int64_t mt = local % m_tiles_e;
    const int64_t nt = local / m_tiles_e;
    ti.row_begin = __ldg(p.expert_offsets + ti.e);
    ti.row_end = __ldg(p.expert_offsets + ti.e + 1);
    if (wgrad) {
        // NOTES: wgrad reads the caller's offsets directly: clamp them into [0, num_rows] with end >= begin, so
        // bad offsets never read outside the rows (each expert has its own output, so overlaps cannot race).
        ti.row_begin = ti.row_begin < 0 ? 0 : (ti.row_begin > p.num_rows ? p.num_rows : ti.row_begin);
        ti.row_end = ti.row_end < ti.row_begin ? ti.row_begin : (ti.row_end > p.num_rows ? p.num_rows : ti.row_end);
    }
    ti.m0 = (wgrad ? 0 : ti.row_begin) + mt * kBM;
    ti.n0 = nt * kBNOut;
    return ti;
}

// Rows owned by no expert are zero: [expert_offsets[E], num_rows) (padding) and, for bad offsets only,
// [0, expert_offsets[0]); forward only, on the clamped offsets. 16 bytes a store.
template <typename T>
__device__ __forceinline__ void zero_padding_rows(const GemmArgs& p, T* c, int threads) {
    const int64_t lead = __ldg(p.expert_offsets);
    const int64_t pad_begin = __ldg(p.expert_offsets + p.num_experts);
    const int64_t row_chunks = p.n * static_cast<int64_t>(sizeof(T)) / 16;
    const int64_t lead_chunks = lead * row_chunks;
    const int64_t total = lead_chunks + (p.num_rows - pad_begin) * row_chunks;
    uint4* lead_dst = reinterpret_cast<uint4*>(c);
    uint4* pad_dst = reinterpret_cast<uint4*>(c + pad_begin * p.n) - lead_chunks;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * threads + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * threads)
        (i < lead_chunks ? lead_dst : pad_dst)[i] = make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core path (bf16 / fp16)

// Element offset of (row, col) in a tile of `rows` rows stored as 64-column panels of 128-byte rows; the 16-byte
// chunk index is XORed with row % 8 so ldmatrix and cp.async hit 8 distinct bank groups.
__device__ __forceinline__ int swizzle(int row, int col, int rows) {
    return ((col >> 6) * rows + row) * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy; src_bytes = 0 fills zeros and reads nothing (masked rows and columns).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float x, float y) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x, y);
    } else {
        *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(x, y);
    }
}

// Operand layouts: A is [m, k] with k contiguous (kATrans = false) or stored [k, m] (kATrans, wgrad: grad_out);
// B is [n, k] with k contiguous (kBTrans = false, HF weights with trans_w) or stored [k, n] (kBTrans).
// Shared-memory tiles mirror the global layout and ldmatrix(.trans) produces the mma fragments either way.
// kSwiGLU: tile row j of B holds gate row (j % 32 < 16) or up row (j % 32 >= 16) of output column
// n0 + (j / 32) * 16 + j % 16, so each warp's 32-column slice holds 16 gate and the matching 16 up columns,
// and the epilogue writes kBN / 2 columns of h = silu(gate) * up.
template <typename T, int kBM, int kBN, int kWarpsM, int kWarpsN, int kStages, bool kATrans, bool kBTrans,
          bool kSwiGLU, bool kWgrad>
// Register budget: big tiles keep their 64 accumulators + fragments unspilled (1 CTA of 8 warps per SM; 2
// per SM spill at 128 registers); decode tiles run 4 CTAs of 128 threads per SM.
__global__ void __launch_bounds__(kWarpsM* kWarpsN * 32, kBM >= 128 ? 1 : 4) mma_gemm_kernel(const GemmArgs p) {
    constexpr int kThreads = kWarpsM * kWarpsN * 32;
    constexpr int kWM = kBM / kWarpsM;
    constexpr int kWN = kBN / kWarpsN;
    constexpr int kMI = kWM / 16;
    constexpr int kNI = kWN / 8;
    constexpr int kBNOut = kSwiGLU ? kBN / 2 : kBN;
    constexpr int kATile = kBM * kBK;
    constexpr int kBTile = kBN * kBK;
    static_assert(kWN == 32 && kWM % 16 == 0, "warp tiles are (16 * kMI) x 32");
    static_assert(!kATrans || kBM % 64 == 0, "transposed A tiles are whole 64-column panels");
    static_assert(!kBTrans || kBN % 64 == 0, "transposed B tiles are whole 64-column panels");
    static_assert(!(kSwiGLU && (kBTrans || kWgrad)), "SwiGLU is fused only into the [n, k]-weight forward");

    extern __shared__ __align__(128) uint8_t smem_raw[];
    T* smem_a = reinterpret_cast<T*>(smem_raw);  // [kStages][kATile], swizzled
    T* smem_b = smem_a + kStages * kATile;       // [kStages][kBTile], swizzled
    const T* a_ptr = static_cast<const T*>(p.a);
    const T* b_ptr = static_cast<const T*>(p.b);
    T* c_ptr = static_cast<T*>(p.c);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int wm = warp / kWarpsN;
    const int wn = warp % kWarpsN;

    if (!kWgrad) zero_padding_rows(p, c_ptr, kThreads);

    const int64_t total = num_tiles(p, kWgrad);
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
        const TileInfo ti = resolve_tile<kBM, kBNOut>(p, t, kWgrad);
        const int64_t red_len = kWgrad ? ti.row_end - ti.row_begin : p.k;
        const int num_k_tiles = static_cast<int>((red_len + kBK - 1) / kBK);

        // ---- global -> shared, one stage (every thread issues its 16-byte chunks, then one commit group)
        auto load_stage = [&](int stage, int kt) {
            const int64_t k0 = static_cast<int64_t>(kt) * kBK;
            T* sa = smem_a + stage * kATile;
            T* sb = smem_b + stage * kBTile;
            if constexpr (!kATrans) {
                for (int c = threadIdx.x; c < kBM * 8; c += kThreads) {
                    const int row = c / 8, col = (c % 8) * 8;
                    const int64_t grow = ti.m0 + row, gcol = k0 + col;
                    const bool valid = grow < ti.row_end && gcol < p.k;
                    cp_async_16(smem_u32(sa + swizzle(row, col, kBM)), valid ? a_ptr + grow * p.k + gcol : a_ptr,
                                valid);
                }
            } else {
                for (int c = threadIdx.x; c < kBK * (kBM / 8); c += kThreads) {
                    const int row = c / (kBM / 8), col = (c % (kBM / 8)) * 8;
                    const int64_t grow = ti.row_begin + k0 + row, gcol = ti.m0 + col;
                    const bool valid = grow < ti.row_end && gcol < p.m;
                    cp_async_16(smem_u32(sa + swizzle(row, col, kBK)), valid ? a_ptr + grow * p.m + gcol : a_ptr,
                                valid);
                }
            }
            if constexpr (!kBTrans) {
                const T* b_expert = b_ptr + static_cast<int64_t>(ti.e) * p.b_rows * p.k;
                for (int c = threadIdx.x; c < kBN * 8; c += kThreads) {
                    const int row = c / 8, col = (c % 8) * 8;
                    int64_t wrow;
                    bool valid;
                    if constexpr (kSwiGLU) {
                        const int64_t h = ti.n0 + (row / 32) * 16 + row % 16;
                        valid = h < p.n;
                        wrow = (row % 32 >= 16 ? p.n : 0) + h;
                    } else {
                        wrow = ti.n0 + row;
                        valid = wrow < p.n;
                    }
                    const int64_t gcol = k0 + col;
                    valid = valid && gcol < p.k;
                    cp_async_16(smem_u32(sb + swizzle(row, col, kBN)), valid ? b_expert + wrow * p.k + gcol : b_ptr,
                                valid);
                }
            } else {
                for (int c = threadIdx.x; c < kBK * (kBN / 8); c += kThreads) {
                    const int row = c / (kBN / 8), col = (c % (kBN / 8)) * 8;
                    const int64_t gcol = ti.n0 + col;
                    const T* src;
                    bool valid;
                    if constexpr (kWgrad) {
                        const int64_t grow = ti.row_begin + k0 + row;
                        valid = grow < ti.row_end && gcol < p.n;
                        src = b_ptr + grow * p.n + gcol;
                    } else {
                        const int64_t krow = k0 + row;
                        valid = krow < p.k && gcol < p.n;
                        src = b_ptr + (static_cast<int64_t>(ti.e) * p.k + krow) * p.n + gcol;
                    }
                    cp_async_16(smem_u32(sb + swizzle(row, col, kBK)), valid ? src : b_ptr, valid);
                }
            }
        };

        float acc[kMI][kNI][4];
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
            for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;

        // ---- pipeline: kStages - 1 stages in flight ahead of the one being multiplied
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < num_k_tiles) load_stage(s, s);
            cp_async_commit();
        }
        for (int kt = 0; kt < num_k_tiles; ++kt) {
            cp_async_wait<kStages - 2>();
            // NOTES: this barrier makes stage kt visible to all warps AND guarantees every warp finished
            // multiplying stage kt - 1, whose buffer the prefetch below overwrites.
            __syncthreads();
            if (kt + kStages - 1 < num_k_tiles) load_stage((kt + kStages - 1) % kStages, kt + kStages - 1);
            cp_async_commit();

            const T* sa = smem_a + (kt % kStages) * kATile;
            const T* sb = smem_b + (kt % kStages) * kBTile;
            // NOTES (PTX fragments, g = lane / 4, t = lane % 4): ldmatrix.x4 lanes 8i..8i+7 address the rows of
            // 8x8 matrix i, which lands in register i: thread lane gets (row g, cols 2t, 2t+1), or with .trans
            // (rows 2t, 2t+1, col g). mma m16n8k16 wants a0..a3 = A[m g | g+8][k 0-7 | 8-15] in the order
            // (g, 0-7), (g+8, 0-7), (g, 8-15), (g+8, 8-15), and b0, b1 = B[k 0-7 | 8-15][n g]; the row/col
            // formulas below pick the matrices in exactly that order for all four operand layouts.
#pragma unroll
            for (int ks = 0; ks < kBK / 16; ++ks) {
                uint32_t a_frag[kMI][4];
                uint32_t b_frag[kNI][2];
#pragma unroll
                for (int mi = 0; mi < kMI; ++mi) {
                    if constexpr (!kATrans) {
                        const int row = wm * kWM + mi * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                        const int col = ks * 16 + (lane / 16) * 8;
                        ldmatrix_x4(a_frag[mi], smem_u32(sa + swizzle(row, col, kBM)));
                    } else {
                        const int row = ks * 16 + (lane % 8) + (lane / 16) * 8;
                        const int col = wm * kWM + mi * 16 + ((lane / 8) % 2) * 8;
                        ldmatrix_x4_trans(a_frag[mi], smem_u32(sa + swizzle(row, col, kBK)));
                    }
                }
#pragma unroll
                for (int np = 0; np < kNI / 2; ++np) {
                    uint32_t r[4];
                    if constexpr (!kBTrans) {
                        const int row = wn * kWN + np * 16 + (lane % 8) + (lane / 16) * 8;
                        const int col = ks * 16 + ((lane / 8) % 2) * 8;
                        ldmatrix_x4(r, smem_u32(sb + swizzle(row, col, kBN)));
                    } else {
                        const int row = ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                        const int col = wn * kWN + np * 16 + (lane / 16) * 8;
                        ldmatrix_x4_trans(r, smem_u32(sb + swizzle(row, col, kBK)));
                    }
                    b_frag[2 * np][0] = r[0];
                    b_frag[2 * np][1] = r[1];
                    b_frag[2 * np + 1][0] = r[2];
                    b_frag[2 * np + 1][1] = r[3];
                }
#pragma unroll
                for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < kNI; ++ni)
                        mma_16816<T>(acc[mi][ni], a_frag[mi], b_frag[ni][0], b_frag[ni][1]);
            }
        }
        cp_async_wait<0>();
        __syncthreads();  // the next tile's prologue overwrites the stages

        // ---- epilogue: accumulator (row lane/4 (+8), columns 2*(lane%4) + {0,1}) -> global
        T* c_tile = kWgrad ? c_ptr + static_cast<int64_t>(ti.e) * p.m * p.n : c_ptr;
        const int64_t row_limit = kWgrad ? p.m : ti.row_end;
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int64_t row = ti.m0 + wm * kWM + mi * 16 + lane / 4 + half * 8;
                if (row >= row_limit) continue;
                if constexpr (kSwiGLU) {
#pragma unroll
                    for (int ni = 0; ni < kNI / 2; ++ni) {
                        const int64_t col = ti.n0 + wn * (kWN / 2) + ni * 8 + (lane % 4) * 2;
                        if (col >= p.n) continue;
                        const float* g = &acc[mi][ni][half * 2];
                        const float* u = &acc[mi][ni + kNI / 2][half * 2];
                        store_pair(c_tile + row * p.n + col, silu(g[0]) * u[0], silu(g[1]) * u[1]);
                    }
                } else {
#pragma unroll
                    for (int ni = 0; ni < kNI; ++ni) {
                        const int64_t col = ti.n0 + wn * kWN + ni * 8 + (lane % 4) * 2;
                        if (col >= p.n) continue;
                        store_pair(c_tile + row * p.n + col, acc[mi][ni][half * 2], acc[mi][ni][half * 2 + 1]);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// SIMT path (fp32): 64 x 64 output tiles, 256 threads with 4 x 4 outputs each (twice, gate and up, for SwiGLU).

constexpr int kSimtBM = 64;
constexpr int kSimtBN = 64;
constexpr int kSimtBK = 16;

template <bool kATrans, bool kBTrans, bool kSwiGLU, bool kWgrad>
__global__ void __launch_bounds__(256, 1) simt_gemm_kernel(const GemmArgs p) {
    constexpr int kBCols = kSwiGLU ? 2 * kSimtBN : kSimtBN;
    __shared__ float sa[kSimtBK][kSimtBM + 4];
    __shared__ float sb[kSimtBK][kBCols + 4];
    const float* a_ptr = static_cast<const float*>(p.a);
    const float* b_ptr = static_cast<const float*>(p.b);
    float* c_ptr = static_cast<float*>(p.c);
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;

    if (!kWgrad) zero_padding_rows(p, c_ptr, 256);

    const int64_t total = num_tiles(p, kWgrad);
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
        const TileInfo ti = resolve_tile<kSimtBM, kSimtBN>(p, t, kWgrad);
        const int64_t red_len = kWgrad ? ti.row_end - ti.row_begin : p.k;
        float acc[4][4] = {};
        float acc_up[kSwiGLU ? 4 : 1][4] = {};
        for (int64_t k0 = 0; k0 < red_len; k0 += kSimtBK) {
            for (int i = threadIdx.x; i < kSimtBK * kSimtBM; i += 256) {
                // Consecutive threads walk the contiguous global dimension.
                const int kk = kATrans ? i / kSimtBM : i % kSimtBK;
                const int mm = kATrans ? i % kSimtBM : i / kSimtBK;
                float v = 0.0f;
                if constexpr (kATrans) {
                    const int64_t grow = ti.row_begin + k0 + kk, gcol = ti.m0 + mm;
                    if (grow < ti.row_end && gcol < p.m) v = a_ptr[grow * p.m + gcol];
                } else {
                    const int64_t grow = ti.m0 + mm, gcol = k0 + kk;
                    if (grow < ti.row_end && gcol < p.k) v = a_ptr[grow * p.k + gcol];
                }
                sa[kk][mm] = v;
            }
            for (int i = threadIdx.x; i < kSimtBK * kBCols; i += 256) {
                const int kk = kBTrans ? i / kBCols : i % kSimtBK;
                const int nn = kBTrans ? i % kBCols : i / kSimtBK;
                float v = 0.0f;
                if constexpr (kWgrad) {
                    const int64_t grow = ti.row_begin + k0 + kk, gcol = ti.n0 + nn;
                    if (grow < ti.row_end && gcol < p.n) v = b_ptr[grow * p.n + gcol];
                } else if constexpr (kBTrans) {
                    const int64_t krow = k0 + kk, gcol = ti.n0 + nn;
                    if (krow < p.k && gcol < p.n) v = b_ptr[(static_cast<int64_t>(ti.e) * p.k + krow) * p.n + gcol];
                } else {
                    const int64_t h = ti.n0 + nn % kSimtBN;
                    const int64_t wrow = (nn >= kSimtBN ? p.n : 0) + h;
                    const int64_t gcol = k0 + kk;
                    if (h < p.n && gcol < p.k) v = b_ptr[(static_cast<int64_t>(ti.e) * p.b_rows + wrow) * p.k + gcol];
                }
                sb[kk][nn] = v;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < kSimtBK; ++kk) {
                float av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) av[i] = sa[kk][ty * 4 + i];
#pragma unroll
                for (int j = 0; j < 4; ++j) bv[j] = sb[kk][tx * 4 + j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
                if constexpr (kSwiGLU) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) bv[j] = sb[kk][kSimtBN + tx * 4 + j];
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int j = 0; j < 4; ++j) acc_up[i][j] += av[i] * bv[j];
                }
            }
            __syncthreads();
        }
        float* c_tile = kWgrad ? c_ptr + static_cast<int64_t>(ti.e) * p.m * p.n : c_ptr;
        const int64_t row_limit = kWgrad ? p.m : ti.row_end;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int64_t row = ti.m0 + ty * 4 + i;
            if (row >= row_limit) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t col = ti.n0 + tx * 4 + j;
                if (col >= p.n) continue;
                c_tile[row * p.n + col] = kSwiGLU ? silu(acc[i][j]) * acc_up[kSwiGLU ? i : 0][j] : acc[i][j];
            }
        }
    }
}

// grad_gu = [d_gate, d_up] from gu = [gate, up] and grad_h, kN elements (16 bytes) per thread and step.
template <typename T, int kN>
__global__ void __launch_bounds__(256) swiglu_backward_kernel(const Pack<T, kN>* __restrict__ grad_h,
                                                             const Pack<T, kN>* __restrict__ gu, int64_t num_rows,
                                                             int64_t inter_vecs, Pack<T, kN>* __restrict__ grad_gu) {
    const int64_t total = num_rows * inter_vecs;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = idx / inter_vecs;
        const int64_t v = idx - r * inter_vecs;
        const Pack<T, kN> gh = grad_h[idx];
        const Pack<T, kN> gate = gu[r * 2 * inter_vecs + v];
        const Pack<T, kN> up = gu[r * 2 * inter_vecs + inter_vecs + v];
        Pack<T, kN> d_gate, d_up;
#pragma unroll
        for (int i = 0; i < kN; ++i) {
            const float g = to_float(gate.v[i]);
            const float u = to_float(up.v[i]);
            const float dh = to_float(gh.v[i]);
            const float s = 1.0f / (1.0f + expf(-g));
            d_up.v[i] = from_float<T>(dh * g * s);
            d_gate.v[i] = from_float<T>(dh * u * s * (1.0f + g * (1.0f - s)));
        }
        grad_gu[r * 2 * inter_vecs + v] = d_gate;
        grad_gu[r * 2 * inter_vecs + inter_vecs + v] = d_up;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

// Workspace of the forward launchers: tile_offsets int32 [E + 1] (16-byte padded), then the clamped offsets
// int64 [E + 1].
size_t tile_offsets_bytes(int num_experts) {
    return (static_cast<size_t>(num_experts + 1) * sizeof(int32_t) + 15) / 16 * 16;
}

// Persistent grid: as many CTAs as fit on the device at once, never more than `max_tiles`.
template <typename Kernel>
unsigned persistent_grid(Kernel kernel, int threads, size_t smem, int64_t max_tiles) {
    int per_sm = 0;
    EPMOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    EPMOE_HOST_CHECK(per_sm > 0, "GEMM kernel does not fit on the device (", smem, " bytes of shared memory)");
    const int64_t resident = static_cast<int64_t>(per_sm) * current_sm_count();
    return static_cast<unsigned>(std::max<int64_t>(1, std::min(resident, max_tiles)));
}

template <typename T, int kBM, int kBN, int kWarpsM, int kWarpsN, int kStages, bool kATrans, bool kBTrans,
          bool kSwiGLU, bool kWgrad>
void launch_mma(const GemmArgs& p, int64_t max_tiles, cudaStream_t stream) {
    auto kernel = mma_gemm_kernel<T, kBM, kBN, kWarpsM, kWarpsN, kStages, kATrans, kBTrans, kSwiGLU, kWgrad>;
    constexpr int kThreads = kWarpsM * kWarpsN * 32;
    constexpr size_t kSmem = static_cast<size_t>(kStages) * (kBM + kBN) * kBK * sizeof(T);
    EPMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    kernel<<<persistent_grid(kernel, kThreads, kSmem, max_tiles), kThreads, kSmem, stream>>>(p);
    EPMOE_LAUNCH_CHECK();
}

template <bool kATrans, bool kBTrans, bool kSwiGLU, bool kWgrad>
void launch_simt(const GemmArgs& p, int64_t max_tiles, cudaStream_t stream) {
    auto kernel = simt_gemm_kernel<kATrans, kBTrans, kSwiGLU, kWgrad>;
    kernel<<<persistent_grid(kernel, 256, 0, max_tiles), 256, 0, stream>>>(p);
    EPMOE_LAUNCH_CHECK();
}

// Average rows per expert at or below which the forward GEMMs use the decode tile (32 rows): weights are then
// streamed by many CTAs along n instead of being multiplied against mostly-masked 128-row tiles.
constexpr int64_t kDecodeRowsPerExpert = 48;

// Forward (M-grouped) GEMM: builds the tile schedule for the chosen tile height, then runs the kernel.
template <bool kBTrans, bool kSwiGLU>
void launch_forward(GemmArgs p, DType dtype, void* workspace, cudaStream_t stream) {
    auto* tile_offsets = static_cast<int32_t*>(workspace);
    auto* clamped = reinterpret_cast<int64_t*>(static_cast<uint8_t*>(workspace) + tile_offsets_bytes(p.num_experts));
    p.tile_offsets = tile_offsets;
    const bool decode = p.num_rows <= kDecodeRowsPerExpert * p.num_experts;
    const int bm = dtype == DType::kFloat32 ? kSimtBM : (decode ? 32 : 128);
    const int bn_out = dtype == DType::kFloat32 ? kSimtBN : (kSwiGLU ? 64 : 128);
    p.n_tiles = static_cast<int>((p.n + bn_out - 1) / bn_out);
    tile_schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p.expert_offsets, p.num_experts, p.num_rows, bm, clamped,
                                                             tile_offsets);
    EPMOE_LAUNCH_CHECK();
    p.expert_offsets = clamped;  // the GEMM itself only sees the clamped offsets
    // Upper bound of the device-side tile count: every expert may add one partial m-tile.
    const int64_t max_tiles = (p.num_rows / bm + p.num_experts) * p.n_tiles;
    switch (dtype) {
        case DType::kFloat32: launch_simt<false, kBTrans, kSwiGLU, false>(p, max_tiles, stream); return;
        case DType::kBFloat16:
            if (decode)
                launch_mma<__nv_bfloat16, 32, 128, 1, 4, 4, false, kBTrans, kSwiGLU, false>(p, max_tiles, stream);
            else
                launch_mma<__nv_bfloat16, 128, 128, 2, 4, 3, false, kBTrans, kSwiGLU, false>(p, max_tiles, stream);
            return;
        case DType::kFloat16:
            if (decode) launch_mma<__half, 32, 128, 1, 4, 4, false, kBTrans, kSwiGLU, false>(p, max_tiles, stream);
            else launch_mma<__half, 128, 128, 2, 4, 3, false, kBTrans, kSwiGLU, false>(p, max_tiles, stream);
            return;
    }
    EPMOE_HOST_CHECK(false, "unknown dtype");
}

void check_sizes(std::initializer_list<int64_t> sizes, std::initializer_list<const void*> ptrs) {
    for (int64_t s : sizes) EPMOE_HOST_CHECK(s % 8 == 0, "GEMM row lengths must be multiples of 8, got ", s);
    for (const void* ptr : ptrs)
        EPMOE_HOST_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, "GEMM operands must be 16-byte aligned");
}

}  // namespace

size_t grouped_gemm_workspace_bytes(int num_experts) {
    return tile_offsets_bytes(num_experts) + static_cast<size_t>(num_experts + 1) * sizeof(int64_t);
}

void launch_grouped_swiglu(const void* x, DType dtype, const int64_t* expert_offsets, int num_experts,
                           int64_t num_rows, int64_t hidden, int64_t inter, const void* w13, void* h,
                           void* workspace, cudaStream_t stream) {
    check_sizes({hidden, inter}, {x, w13, h});
    if (num_rows == 0 || inter == 0) return;
    GemmArgs p{};
    p.a = x;
    p.b = w13;
    p.c = h;
    p.expert_offsets = expert_offsets;
    p.num_experts = num_experts;
    p.num_rows = num_rows;
    p.n = inter;
    p.k = hidden;
    p.b_rows = 2 * inter;
    launch_forward<false, true>(p, dtype, workspace, stream);
}

void launch_grouped_gemm(const void* a, DType dtype, const int64_t* expert_offsets, int num_experts, int64_t num_rows,
                         int64_t k, int64_t n, const void* w, bool trans_w, void* out, void* workspace,
                         cudaStream_t stream) {
    check_sizes({k, n}, {a, w, out});
    if (num_rows == 0 || n == 0) return;
    GemmArgs p{};
    p.a = a;
    p.b = w;
    p.c = out;
    p.expert_offsets = expert_offsets;
    p.num_experts = num_experts;
    p.num_rows = num_rows;
    p.n = n;
    p.k = k;
    p.b_rows = n;
    if (trans_w) launch_forward<false, false>(p, dtype, workspace, stream);
    else launch_forward<true, false>(p, dtype, workspace, stream);
}

void launch_grouped_gemm_wgrad(const void* grad_out, const void* a, DType dtype, const int64_t* expert_offsets,
                               int num_experts, int64_t num_rows, int64_t n, int64_t k, void* out,
                               cudaStream_t stream) {
    check_sizes({n, k}, {grad_out, a, out});
    if (num_experts == 0 || n == 0 || k == 0) return;
    GemmArgs p{};
    p.a = grad_out;
    p.b = a;
    p.c = out;
    p.expert_offsets = expert_offsets;
    p.num_experts = num_experts;
    p.num_rows = num_rows;
    p.m = n;
    p.n = k;
    const int bm = dtype == DType::kFloat32 ? kSimtBM : 128;
    const int bn = dtype == DType::kFloat32 ? kSimtBN : 128;
    p.m_tiles = static_cast<int>((p.m + bm - 1) / bm);
    p.n_tiles = static_cast<int>((p.n + bn - 1) / bn);
    const int64_t tiles = static_cast<int64_t>(num_experts) * p.m_tiles * p.n_tiles;
    switch (dtype) {
        case DType::kFloat32: launch_simt<true, true, false, true>(p, tiles, stream); return;
        case DType::kBFloat16:
            launch_mma<__nv_bfloat16, 128, 128, 2, 4, 3, true, true, false, true>(p, tiles, stream);
            return;
        case DType::kFloat16: launch_mma<__half, 128, 128, 2, 4, 3, true, true, false, true>(p, tiles, stream); return;
    }
    EPMOE_HOST_CHECK(false, "unknown dtype");
}

void launch_swiglu_backward(const void* grad_h, const void* gu, DType dtype, int64_t num_rows, int64_t inter,
                            void* grad_gu, cudaStream_t stream) {
    check_sizes({inter}, {grad_h, gu, grad_gu});
    if (num_rows == 0 || inter == 0) return;
    auto launch = [&](auto elem) {
        using T = decltype(elem);
        constexpr int kN = 16 / sizeof(T);
        using P = Pack<T, kN>;
        const int64_t inter_vecs = inter / kN;
        swiglu_backward_kernel<T, kN><<<grid_for(num_rows * inter_vecs, 256), 256, 0, stream>>>(
            static_cast<const P*>(grad_h), static_cast<const P*>(gu), num_rows, inter_vecs, static_cast<P*>(grad_gu));
    };
    switch (dtype) {
        case DType::kFloat32: launch(float{}); break;
        case DType::kBFloat16: launch(__nv_bfloat16{}); break;
        case DType::kFloat16: launch(__half{}); break;
    }
    EPMOE_LAUNCH_CHECK();
}

}  // namespace epmoe::cuda
