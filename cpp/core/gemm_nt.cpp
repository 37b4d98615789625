#include "cpp/core/gemm_nt.h"

#include "cpp/core/check.h"
#include "cpp/core/cpu_features.h"
#include "cpp/core/fp_math.h"
#include "cpp/core/simd_avx512.h"

namespace epmoe::core {
namespace {

constexpr int kBlock = 16;  // b rows per block = 32-bit words of K per step (one 16 x 16 transpose)
constexpr int kMr = 8;      // rows of a accumulated in registers at once

typedef uint32_t u32_unaligned __attribute__((aligned(2), may_alias));

// Words (fp32 values or bf16 pairs) [w0, w0 + num_words) of row `row` into the low lanes, zeros above; the bf16 pair
// past an odd depth is (last value, 0). Never reads past the row.
template <typename T>
EPMOE_TARGET_AVX512 inline __m512i load_words(const T* row, int64_t w0, int num_words, int64_t depth) {
    if constexpr (sizeof(T) == 4) {
        return _mm512_castps_si512(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << num_words) - 1u), row + w0));
    } else {
        const int64_t values = 2 * num_words - ((w0 + num_words) * 2 > depth ? 1 : 0);
        return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << values) - 1ull), row + 2 * w0);
    }
}

// Word w of a row of a, broadcast (fp32 value, or bf16 pair with a zero high half past an odd depth).
template <typename T>
EPMOE_TARGET_AVX512 inline __m512i broadcast_word(const T* row, int64_t w, int64_t depth) {
    if constexpr (sizeof(T) == 4) {
        return _mm512_castps_si512(_mm512_set1_ps(row[w]));
    } else {
        return 2 * w + 1 < depth ? _mm512_set1_epi32(static_cast<int>(*reinterpret_cast<const u32_unaligned*>(row + 2 * w)))
                                 : _mm512_set1_epi32(static_cast<int>(row[2 * w]));
    }
}

// acc += b_words (lanes = b rows) * a word (broadcast): an FMA (fp32) or a vdpbf16ps over the pair (bf16). The same
// operation, operand for operand up to the order of the commuting product, as the panel kernels' inner step.
EPMOE_TARGET_AVX512 inline __m512 step(__m512 acc, __m512i b_words, __m512i a_word, float) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(b_words), _mm512_castsi512_ps(a_word), acc);
}
EPMOE_TARGET_AVX512_BF16 inline __m512 step(__m512 acc, __m512i b_words, __m512i a_word, uint16_t) {
    return _mm512_dpbf16_ps(acc, (__m512bh)b_words, (__m512bh)a_word);
}

// Software prefetch of the next b block (into L2), one line per b row per 16 words of K.
enum class Prefetch {
    kNone,
    kSameOffset,  // the next block's rows at the same K offset: rows of a page or more, one sequential stream each
    kLinear,      // the next block's lines in address order: rows shorter than a page (a contiguous block)
};

// c[m][n0 + i] = sum over K of a[m] . b[n0 + i] for MR rows of a and NB consecutive blocks of 16 b rows (the last
// with num_b <= 16 rows; lanes = b rows): per 16 words of K each block's rows are loaded, transposed in registers,
// and every row of a accumulates with one step per word, while the next NB blocks are prefetched as `prefetch`
// says. Two blocks give each row of a two independent accumulation chains: with a few rows of a, one chain per row
// waits on the latency of its vdpbf16ps steps (bf16 decode streamed at 0.87 of the read bandwidth with one block,
// 0.91 with two, in one interleaved run of bench_experts' T=32 case).
// NOTES: both instantiations carry the bf16 ISA (one template); the fp32 one holds no bf16 instruction, and both run
// only after cpu_features() checks.
template <typename T, int MR, int NB>
EPMOE_TARGET_AVX512_BF16 void rows_block(const T* const* a_rows, int64_t depth, const T* b, int64_t ldb, int num_b,
                                         float* c, int64_t ldc, Prefetch prefetch) {
    const int64_t words = sizeof(T) == 4 ? depth : (depth + 1) / 2;
    __m512 acc[NB][MR];
#pragma GCC unroll 2
    for (int k = 0; k < NB; ++k) {
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) acc[k][m] = _mm512_setzero_ps();
    }
    for (int64_t w0 = 0; w0 < words; w0 += kBlock) {
        const int nw = static_cast<int>(words - w0 < kBlock ? words - w0 : kBlock);
#pragma GCC unroll 2
        for (int k = 0; k < NB; ++k) {
            const T* block = b + k * kBlock * ldb;
            const int rows = k == NB - 1 ? num_b : kBlock;
            __m512i t[kBlock];
#pragma GCC unroll 16
            for (int i = 0; i < kBlock; ++i) {
                const T* row = block + i * ldb;
                t[i] = i < rows ? load_words(row, w0, nw, depth) : _mm512_setzero_si512();
                if (prefetch == Prefetch::kSameOffset) {
                    __builtin_prefetch(row + NB * kBlock * ldb + w0 * (4 / sizeof(T)), 0, 2);
                } else if (prefetch == Prefetch::kLinear) {
                    __builtin_prefetch(reinterpret_cast<const char*>(block + NB * kBlock * ldb) + (w0 + i) * 64, 0, 2);
                }
            }
            transpose16(t);
            if (nw == kBlock) {
#pragma GCC unroll 16
                for (int j = 0; j < kBlock; ++j) {
#pragma GCC unroll 8
                    for (int m = 0; m < MR; ++m)
                        acc[k][m] = step(acc[k][m], t[j], broadcast_word(a_rows[m], w0 + j, depth), T{});
                }
            } else {
                for (int j = 0; j < nw; ++j) {
#pragma GCC unroll 8
                    for (int m = 0; m < MR; ++m)
                        acc[k][m] = step(acc[k][m], t[j], broadcast_word(a_rows[m], w0 + j, depth), T{});
                }
            }
        }
    }
#pragma GCC unroll 2
    for (int k = 0; k < NB; ++k) {
        const __mmask16 col_mask = static_cast<__mmask16>(k == NB - 1 ? (1u << num_b) - 1u : 0xFFFFu);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(c + m * ldc + k * kBlock, col_mask, acc[k][m]);
    }
}

// rows_block for 1 <= mr <= kMr rows; two blocks (two_blocks) for mr <= kMr2 (the accumulators of two blocks and
// one transposed block fill the 32 vector registers at 8 rows).
constexpr int kMr2 = 4;
template <typename T>
EPMOE_TARGET_AVX512 inline void rows_block_n(int mr, bool two_blocks, const T* const* a_rows, int64_t depth,
                                             const T* b, int64_t ldb, int num_b, float* c, int64_t ldc,
                                             Prefetch prefetch) {
    if (two_blocks) {
        switch (mr) {
            case 1: return rows_block<T, 1, 2>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
            case 2: return rows_block<T, 2, 2>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
            case 3: return rows_block<T, 3, 2>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
            default: return rows_block<T, kMr2, 2>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        }
    }
    switch (mr) {
        case 1: return rows_block<T, 1, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        case 2: return rows_block<T, 2, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        case 3: return rows_block<T, 3, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        case 4: return rows_block<T, 4, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        case 5: return rows_block<T, 5, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        case 6: return rows_block<T, 6, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        case 7: return rows_block<T, 7, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
        default: return rows_block<T, kMr, 1>(a_rows, depth, b, ldb, num_b, c, ldc, prefetch);
    }
}

// NOTES: every output element is the FMA chain over K in ascending order from 0 (bf16: one vdpbf16ps per pair),
// exactly as in the panel kernels, so a row's result does not depend on the kernel its segment size selects, on
// the other rows of the call, or on how callers split rows and columns. Decode reads each b row once, straight from
// memory, and the hardware prefetcher does not follow 16 interleaved rows shorter than a page: the first row group
// of each block prefetches the next block, into L2 (rows a power-of-two apart share L1 sets; 3-5% faster cold).
// Rows shorter than a page (the down GEMM's I of 256-512 values) are prefetched in address order: at the same K
// offsets their lines are scattered over the block, and the down GEMM of bench_layer (1 KB rows) streamed ~20%
// slower per byte than its gate/up GEMM (the layer at T=8: ~2% faster in address order).
template <typename T>
EPMOE_TARGET_AVX512 void gemm_nt_impl(const T* const* a_rows, int64_t num_rows, const T* b, int64_t ldb,
                                      int64_t num_cols, int64_t depth, float* c, int64_t ldc) {
    // Linear prefetch needs ldb == depth to cover the block (as in every call of the library); it is a hint only.
    const Prefetch ahead = ldb * static_cast<int64_t>(sizeof(T)) < 4096 ? Prefetch::kLinear : Prefetch::kSameOffset;
    // bf16 with a few rows: two blocks at once (vdpbf16ps chains are latency-bound here; fp32 FMAs are not, and
    // there the 32 rows in flight stream ~4% slower: measured).
    const bool pairs = sizeof(T) == 2 && num_rows <= kMr2;
    for (int64_t n0 = 0; n0 < num_cols;) {
        const bool two = pairs && num_cols - n0 > kBlock;
        const int64_t span = two ? 2 * kBlock : kBlock;
        const int nv = static_cast<int>(num_cols - n0 < span ? num_cols - n0 : span) - (two ? kBlock : 0);
        for (int64_t m0 = 0; m0 < num_rows; m0 += kMr) {
            const int mr = static_cast<int>(num_rows - m0 < kMr ? num_rows - m0 : kMr);
            rows_block_n<T>(mr, two, a_rows + m0, depth, b + n0 * ldb, ldb, nv, c + m0 * ldc + n0, ldc,
                            m0 == 0 && n0 + span < num_cols ? ahead : Prefetch::kNone);
        }
        n0 += span;
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

// The bf16 instantiation needs AVX512_BF16 on top of the fp32 path's ISA.
EPMOE_TARGET_AVX512_BF16 void gemm_nt_bf16(const uint16_t* const* a_rows, int64_t num_rows, const uint16_t* b,
                                           int64_t ldb, int64_t num_cols, int64_t depth, float* c, int64_t ldc) {
    gemm_nt_impl(a_rows, num_rows, b, ldb, num_cols, depth, c, ldc);
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
        gemm_nt_bf16(reinterpret_cast<const uint16_t* const*>(a_rows), num_rows, static_cast<const uint16_t*>(b),
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
