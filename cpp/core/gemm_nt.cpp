#include "cpp/core/gemm_nt.h"

#include "cpp/core/check.h"
#include "cpp/core/cpu_features.h"
#include "cpp/core/fp_math.h"
#include "cpp/core/simd_avx512.h"

namespace epmoe::core {
namespace {

constexpr int kMr = 4;                 // rows of a per tile
constexpr int kNr = 6;                 // rows of b per tile
constexpr int64_t kKChunkBytes = 4096;  // K is processed in chunks of this many bytes per row (L1-resident b block)


// [sum(a), sum(b), sum(c), sum(d)] by a fixed tree: 128-bit blocks pairwise, then the 4 floats of a block.
EPMOE_TARGET_AVX512 inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    // block j of abcd: 4 partial sums of input j
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    abcd = _mm512_add_ps(abcd, _mm512_permute_ps(abcd, _MM_SHUFFLE(2, 3, 0, 1)));
    abcd = _mm512_add_ps(abcd, _mm512_permute_ps(abcd, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, abcd));
}

// Reduces the MR x NR accumulators and writes (or adds) them to c.
template <int MR, int NR>
EPMOE_TARGET_AVX512 inline void finish_tile(const __m512 (&acc)[MR][NR], float* c, int64_t ldc, bool accumulate) {
    constexpr int kCount = MR * NR, kPadded = (kCount + 3) / 4 * 4;
    float sums[kPadded];
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < kPadded; i += 4) {
        const __m512 v0 = acc[i / NR][i % NR];
        const __m512 v1 = i + 1 < kCount ? acc[(i + 1) / NR][(i + 1) % NR] : zero;
        const __m512 v2 = i + 2 < kCount ? acc[(i + 2) / NR][(i + 2) % NR] : zero;
        const __m512 v3 = i + 3 < kCount ? acc[(i + 3) / NR][(i + 3) % NR] : zero;
        _mm_storeu_ps(sums + i, reduce4(v0, v1, v2, v3));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 6
        for (int n = 0; n < NR; ++n) {
            float* dst = c + m * ldc + n;
            *dst = accumulate ? *dst + sums[m * NR + n] : sums[m * NR + n];
        }
    }
}

// fp32 tile: c[m][n] (+)= sum_{k < depth} a[m][k] * b[n * ldb + k]; lane l of an accumulator sums k = l mod 16.
template <int MR, int NR>
EPMOE_TARGET_AVX512 void tile_f32(const float* const* a_rows, int64_t k_begin, const float* b, int64_t ldb,
                                  int64_t depth, float* c, int64_t ldc, bool accumulate, bool prefetch_next) {
    __m512 acc[MR][NR];
    const float* a[MR];
    const float* bp[NR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) a[m] = a_rows[m] + k_begin;
#pragma GCC unroll 6
    for (int n = 0; n < NR; ++n) bp[n] = b + n * ldb;
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 6
        for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= depth; k += 16) {
        __m512 bv[NR];
#pragma GCC unroll 6
        for (int n = 0; n < NR; ++n) {
            bv[n] = _mm512_loadu_ps(bp[n] + k);
            if (prefetch_next) __builtin_prefetch(bp[n] + NR * ldb + k, 0, 3);
        }
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
            const __m512 av = _mm512_loadu_ps(a[m] + k);
#pragma GCC unroll 6
            for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(av, bv[n], acc[m][n]);
        }
    }
    if (k < depth) {  // masked tail: absent lanes load as zero
        const __mmask16 mask = static_cast<__mmask16>((1u << (depth - k)) - 1u);
        __m512 bv[NR];
#pragma GCC unroll 6
        for (int n = 0; n < NR; ++n) bv[n] = _mm512_maskz_loadu_ps(mask, bp[n] + k);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
            const __m512 av = _mm512_maskz_loadu_ps(mask, a[m] + k);
#pragma GCC unroll 6
            for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(av, bv[n], acc[m][n]);
        }
    }
    finish_tile<MR, NR>(acc, c, ldc, accumulate);
}

// bf16 tile: lane l of an accumulator sums the pairs k = 2l, 2l + 1 (mod 32), by vdpbf16ps.
template <int MR, int NR>
EPMOE_TARGET_AVX512_BF16 void tile_bf16(const uint16_t* const* a_rows, int64_t k_begin, const uint16_t* b,
                                        int64_t ldb, int64_t depth, float* c, int64_t ldc, bool accumulate,
                                        bool prefetch_next) {
    __m512 acc[MR][NR];
    const uint16_t* a[MR];
    const uint16_t* bp[NR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) a[m] = a_rows[m] + k_begin;
#pragma GCC unroll 6
    for (int n = 0; n < NR; ++n) bp[n] = b + n * ldb;
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 6
        for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= depth; k += 32) {
        __m512bh bv[NR];
#pragma GCC unroll 6
        for (int n = 0; n < NR; ++n) {
            bv[n] = (__m512bh)_mm512_loadu_si512(bp[n] + k);
            if (prefetch_next) __builtin_prefetch(bp[n] + NR * ldb + k, 0, 3);
        }
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
            const __m512bh av = (__m512bh)_mm512_loadu_si512(a[m] + k);
#pragma GCC unroll 6
            for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], av, bv[n]);
        }
    }
    if (k < depth) {
        const __mmask32 mask = static_cast<__mmask32>((1ull << (depth - k)) - 1ull);
        __m512bh bv[NR];
#pragma GCC unroll 6
        for (int n = 0; n < NR; ++n) bv[n] = (__m512bh)_mm512_maskz_loadu_epi16(mask, bp[n] + k);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
            const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(mask, a[m] + k);
#pragma GCC unroll 6
            for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], av, bv[n]);
        }
    }
    finish_tile<MR, NR>(acc, c, ldc, accumulate);
}

template <typename T>
using TileFn = void (*)(const T* const*, int64_t, const T*, int64_t, int64_t, float*, int64_t, bool, bool);

template <typename T, int MR, int NR>
constexpr TileFn<T> tile_fn() {
    if constexpr (sizeof(T) == 4) {
        return &tile_f32<MR, NR>;
    } else {
        return &tile_bf16<MR, NR>;
    }
}

// kTiles<T>[mr - 1][nr - 1]: the tile of mr x nr (edge tiles included).
template <typename T, int MR>
constexpr TileFn<T> kRow[kNr] = {tile_fn<T, MR, 1>(), tile_fn<T, MR, 2>(), tile_fn<T, MR, 3>(),
                                  tile_fn<T, MR, 4>(), tile_fn<T, MR, 5>(), tile_fn<T, MR, 6>()};
template <typename T>
constexpr const TileFn<T>* kTiles[kMr] = {kRow<T, 1>, kRow<T, 2>, kRow<T, 3>, kRow<T, 4>};

// NOTES: loop order K chunk -> b block -> a block: the kNr rows of b (one K chunk each) stay in L1 while every
// row block of a passes; a chunk's partial sums are added to c in chunk order, so the sum order is fixed by K.
// The first a block of each b block prefetches the next b block: in decode every b row is read once, straight
// from memory, and the hardware prefetcher does not follow rows shorter than a page whose accesses interleave
// (measured: bf16 K=1024 weights streamed at 60% of the fp32 rate without it).
template <typename T>
void gemm_nt_impl(const T* const* a_rows, int64_t num_rows, const T* b, int64_t ldb, int64_t num_cols,
                  int64_t depth, float* c, int64_t ldc) {
    constexpr int64_t kChunk = kKChunkBytes / static_cast<int64_t>(sizeof(T));
    if (depth == 0) {
        for (int64_t m = 0; m < num_rows; ++m)
            for (int64_t n = 0; n < num_cols; ++n) c[m * ldc + n] = 0.0f;
        return;
    }
    for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
        const int64_t kc = depth - k0 < kChunk ? depth - k0 : kChunk;
        for (int64_t n0 = 0; n0 < num_cols; n0 += kNr) {
            const int nr = static_cast<int>(num_cols - n0 < kNr ? num_cols - n0 : kNr);
            for (int64_t m0 = 0; m0 < num_rows; m0 += kMr) {
                const int mr = static_cast<int>(num_rows - m0 < kMr ? num_rows - m0 : kMr);
                kTiles<T>[mr - 1][nr - 1](a_rows + m0, k0, b + n0 * ldb + k0, ldb, kc, c + m0 * ldc + n0, ldc,
                                          k0 > 0, m0 == 0 && n0 + kNr < num_cols);
            }
        }
    }
}

// ---- epilogues (plain loops: g++ vectorises them for each clone's ISA)

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void swiglu_row_f32(
    const float* __restrict gate, const float* __restrict up, int64_t width, float* __restrict out) {
    for (int64_t j = 0; j < width; ++j) out[j] = gate[j] / (1.0f + exp_fp32(-gate[j])) * up[j];
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void round_row_bf16(
    const float* __restrict src, int64_t width, uint16_t* __restrict dst) {
    for (int64_t j = 0; j < width; ++j) dst[j] = float_to_bf16(src[j]);
}

void convert_row(const float* src, int64_t width, DType dtype, void* dst) {
    switch (dtype) {
        case DType::kFloat32:
            for (int64_t j = 0; j < width; ++j) static_cast<float*>(dst)[j] = src[j];
            return;
        case DType::kBFloat16: round_row_bf16(src, width, static_cast<uint16_t*>(dst)); return;
        case DType::kFloat16:
            for (int64_t j = 0; j < width; ++j) static_cast<uint16_t*>(dst)[j] = float_to_fp16(src[j]);
            return;
    }
    EPMOE_HOST_CHECK(false, "unknown dtype ", static_cast<int>(dtype));
}

}  // namespace

bool gemm_nt_supported(DType dtype) {
    const CpuFeatures& f = cpu_features();
    return dtype == DType::kFloat32 ? f.avx512 : dtype == DType::kBFloat16 && f.avx512_bf16;
}

void gemm_nt(DType dtype, const void* const* a_rows, int64_t num_rows, const void* b, int64_t ldb, int64_t num_cols,
             int64_t depth, float* c, int64_t ldc) {
    EPMOE_HOST_CHECK(gemm_nt_supported(dtype), "no native NT GEMM kernel for dtype ", static_cast<int>(dtype),
                     " on this CPU");
    if (num_rows == 0 || num_cols == 0) return;
    if (dtype == DType::kFloat32) {
        gemm_nt_impl(reinterpret_cast<const float* const*>(a_rows), num_rows, static_cast<const float*>(b), ldb,
                     num_cols, depth, c, ldc);
    } else {
        gemm_nt_impl(reinterpret_cast<const uint16_t* const*>(a_rows), num_rows, static_cast<const uint16_t*>(b),
                     ldb, num_cols, depth, c, ldc);
    }
}

void swiglu_rows(const float* gu, int64_t ldgu, int64_t offset, int64_t num_rows, int64_t width, DType dtype,
                 void* const* h_rows, int64_t col) {
    const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
    constexpr int64_t kBlock = 256;
    float block[kBlock];  // fp32 staging, then one rounding
    for (int64_t m = 0; m < num_rows; ++m) {
        const float* g = gu + m * ldgu;
        char* dst = static_cast<char*>(h_rows[m]) + col * elem;
        for (int64_t j0 = 0; j0 < width; j0 += kBlock) {
            const int64_t w = width - j0 < kBlock ? width - j0 : kBlock;
            if (dtype == DType::kFloat32) {
                swiglu_row_f32(g + j0, g + offset + j0, w, reinterpret_cast<float*>(dst) + j0);
            } else {
                swiglu_row_f32(g + j0, g + offset + j0, w, block);
                convert_row(block, w, dtype, dst + j0 * elem);
            }
        }
    }
}

void store_rows(const float* src, int64_t lds, int64_t num_rows, int64_t width, DType dtype, void* const* dst_rows,
                int64_t col) {
    const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
    for (int64_t m = 0; m < num_rows; ++m)
        convert_row(src + m * lds, width, dtype, static_cast<char*>(dst_rows[m]) + col * elem);
}

}  // namespace epmoe::core
