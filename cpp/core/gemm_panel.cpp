#include "cpp/core/gemm_panel.h"

#include <cstring>

#include "cpp/core/check.h"
#include "cpp/core/gemm_nt.h"
#include "cpp/core/simd_avx512.h"

namespace epmoe::core {
namespace {

constexpr int kSwigluCols = 6;  // h columns per SwiGLU tile: 6 gate + 6 up weight rows
constexpr int kGemmCols = 12;   // output columns per plain tile

typedef uint32_t u32_unaligned __attribute__((aligned(2), may_alias));

// The cache lines of the next weight block that one tile prefetches into L2, one per K step: while a block runs
// over the P panels, tile p fetches the p-th share of the next block, so its first pass does not wait on memory.
class WeightPrefetch {
  public:
    WeightPrefetch() = default;
    WeightPrefetch(const void* const* rows, int64_t row_bytes, int64_t line_begin, int64_t line_end)
        : rows_(reinterpret_cast<const char* const*>(rows)), row_bytes_(row_bytes), remaining_(line_end - line_begin) {
        const int64_t lines_per_row = (row_bytes + 63) / 64;
        row_ = line_begin / lines_per_row;
        offset_ = (line_begin % lines_per_row) * 64;
    }
    inline void next() {
        if (remaining_ <= 0) return;
        __builtin_prefetch(rows_[row_] + offset_, 0, 2);
        --remaining_;
        offset_ += 64;
        if (offset_ >= row_bytes_) offset_ = 0, ++row_;
    }

  private:
    const char* const* rows_ = nullptr;
    int64_t row_bytes_ = 0, remaining_ = 0, row_ = 0, offset_ = 0;
};

// Requests write ownership of the output lines a tile will store (columns [col, col + num_cols) of each row), at
// the start of the tile: the store then finds them in cache instead of stalling on memory.
inline void prefetch_output(void* const* out_rows, int64_t num_rows, int64_t col, int num_cols, int64_t elem) {
    for (int64_t m = 0; m < num_rows; ++m) {
        const char* first = static_cast<const char*>(out_rows[m]) + col * elem;
        __builtin_prefetch(first, 1, 3);
        __builtin_prefetch(first + num_cols * elem - 1, 1, 3);
    }
}

// 32-bit words per packed row: fp32 values, or bf16 pairs (an odd depth ends in a pair with a zero high half).
template <typename T>
int64_t panel_words(int64_t depth) {
    return sizeof(T) == 4 ? depth : (depth + 1) / 2;
}

// panel[w * 32 + m] = word w of row m for m < num_rows (row pointers), 0 for the rows after them.
// Layout: [words][32] uint32, i.e. rows transposed, 16 x 16 blocks in registers.
template <typename T>
EPMOE_TARGET_AVX512 void pack_panel(const T* const* rows, int64_t num_rows, int64_t depth, uint32_t* panel) {
    const int64_t full_words = sizeof(T) == 4 ? depth : depth / 2;
    for (int64_t w0 = 0; w0 < full_words; w0 += 16) {
        const int nw = static_cast<int>(full_words - w0 < 16 ? full_words - w0 : 16);
        const __mmask16 mask = static_cast<__mmask16>((1u << nw) - 1u);
        for (int64_t m0 = 0; m0 < kPanelRows; m0 += 16) {
            __m512i r[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) {
                r[i] = m0 + i < num_rows
                           ? _mm512_maskz_loadu_epi32(mask, reinterpret_cast<const uint32_t*>(rows[m0 + i]) + w0)
                           : _mm512_setzero_si512();
            }
            transpose16(r);
            for (int j = 0; j < nw; ++j) _mm512_storeu_si512(panel + (w0 + j) * kPanelRows + m0, r[j]);
        }
    }
    if (full_words < panel_words<T>(depth)) {  // bf16, odd depth: (last value, 0)
        for (int64_t m = 0; m < kPanelRows; ++m)
            panel[full_words * kPanelRows + m] = m < num_rows ? static_cast<uint16_t>(rows[m][depth - 1]) : 0u;
    }
}

// Writes columns [col, col + num_cols) of rows [0, num_rows) from v[c][half] (lane = row within the half).
template <int NC>
EPMOE_TARGET_AVX512 inline void store_tile(const __m512 (&v)[NC][2], int num_cols, int64_t num_rows, DType dtype,
                                           void* const* out_rows, int64_t col) {
    const __mmask16 mask = static_cast<__mmask16>((1u << num_cols) - 1u);
    for (int half = 0; half < 2 && 16 * half < num_rows; ++half) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) r[c] = c < NC ? _mm512_castps_si512(v[c < NC ? c : 0][half]) : _mm512_setzero_si512();
        transpose16(r);
        const int64_t rows = num_rows - 16 * half < 16 ? num_rows - 16 * half : 16;
        void* const* dst = out_rows + 16 * half;
        if (dtype == DType::kFloat32) {
            for (int64_t m = 0; m < rows; ++m)
                _mm512_mask_storeu_ps(static_cast<float*>(dst[m]) + col, mask, _mm512_castsi512_ps(r[m]));
        } else {
            for (int64_t m = 0; m < rows; ++m) {
                const __m256i b = _mm512_cvtepi32_epi16(round_bf16_epi32(_mm512_castsi512_ps(r[m])));
                _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst[m]) + col, mask, b);
            }
        }
    }
}

// ---- fp32 tiles: acc[n][half] += w[n][k] * panel[k][16 * half .. + 16]

template <int NW>
EPMOE_TARGET_AVX512 inline void tile_f32(const uint32_t* panel, int64_t depth, const float* const (&w)[NW],
                                         WeightPrefetch prefetch, __m512 (&out)[NW][2]) {
    __m512 acc[NW][2];  // local: `out` may alias the loads (__m512 is may_alias), registers need a local
#pragma GCC unroll 12
    for (int n = 0; n < NW; ++n) acc[n][0] = acc[n][1] = _mm512_setzero_ps();
    const float* p = reinterpret_cast<const float*>(panel);
    for (int64_t k = 0; k < depth; ++k) {
        const __m512 x0 = _mm512_load_ps(p + k * kPanelRows), x1 = _mm512_load_ps(p + k * kPanelRows + 16);
        prefetch.next();
#pragma GCC unroll 12
        for (int n = 0; n < NW; ++n) {
            const __m512 b = _mm512_set1_ps(w[n][k]);
            acc[n][0] = _mm512_fmadd_ps(b, x0, acc[n][0]);
            acc[n][1] = _mm512_fmadd_ps(b, x1, acc[n][1]);
        }
    }
#pragma GCC unroll 12
    for (int n = 0; n < NW; ++n) out[n][0] = acc[n][0], out[n][1] = acc[n][1];
}

// ---- bf16 tiles: one vdpbf16ps per (weight row, half) and pair of K values

template <int NW>
EPMOE_TARGET_AVX512_BF16 void tile_bf16(const uint32_t* panel, int64_t depth, const uint16_t* const (&w)[NW],
                                        WeightPrefetch prefetch, __m512 (&out)[NW][2]) {
    __m512 acc[NW][2];
#pragma GCC unroll 12
    for (int n = 0; n < NW; ++n) acc[n][0] = acc[n][1] = _mm512_setzero_ps();
    const int64_t full_words = depth / 2;
    for (int64_t k = 0; k < full_words; ++k) {
        const __m512bh x0 = (__m512bh)_mm512_load_si512(panel + k * kPanelRows);
        const __m512bh x1 = (__m512bh)_mm512_load_si512(panel + k * kPanelRows + 16);
        prefetch.next();
#pragma GCC unroll 12
        for (int n = 0; n < NW; ++n) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const u32_unaligned*>(w[n] + 2 * k));
            acc[n][0] = _mm512_dpbf16_ps(acc[n][0], x0, b);
            acc[n][1] = _mm512_dpbf16_ps(acc[n][1], x1, b);
        }
    }
    if (full_words * 2 < depth) {  // odd depth: (last value, 0) pairs on both sides
        const __m512bh x0 = (__m512bh)_mm512_load_si512(panel + full_words * kPanelRows);
        const __m512bh x1 = (__m512bh)_mm512_load_si512(panel + full_words * kPanelRows + 16);
#pragma GCC unroll 12
        for (int n = 0; n < NW; ++n) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(w[n][depth - 1]));
            acc[n][0] = _mm512_dpbf16_ps(acc[n][0], x0, b);
            acc[n][1] = _mm512_dpbf16_ps(acc[n][1], x1, b);
        }
    }
#pragma GCC unroll 12
    for (int n = 0; n < NW; ++n) out[n][0] = acc[n][0], out[n][1] = acc[n][1];
}

template <typename T, int NW>
EPMOE_TARGET_AVX512 inline void tile(const uint32_t* panel, int64_t depth, const T* const (&w)[NW],
                                     WeightPrefetch prefetch, __m512 (&acc)[NW][2]) {
    if constexpr (sizeof(T) == 4) {
        tile_f32<NW>(panel, depth, w, prefetch, acc);
    } else {
        tile_bf16<NW>(panel, depth, w, prefetch, acc);
    }
}

template <typename T>
EPMOE_TARGET_AVX512 void swiglu_tile(const uint32_t* panel, int64_t depth, const T* const (&w)[2 * kSwigluCols],
                                     WeightPrefetch prefetch, int num_cols, int64_t num_rows, DType dtype,
                                     void* const* out_rows, int64_t col) {
    prefetch_output(out_rows, num_rows < kPanelRows ? num_rows : kPanelRows, col, num_cols, sizeof(T));
    __m512 acc[2 * kSwigluCols][2];
    tile<T, 2 * kSwigluCols>(panel, depth, w, prefetch, acc);
    __m512 h[kSwigluCols][2];
#pragma GCC unroll 6
    for (int c = 0; c < kSwigluCols; ++c) {
        h[c][0] = swiglu_ps(acc[c][0], acc[kSwigluCols + c][0]);
        h[c][1] = swiglu_ps(acc[c][1], acc[kSwigluCols + c][1]);
    }
    store_tile<kSwigluCols>(h, num_cols, num_rows, dtype, out_rows, col);
}

template <typename T>
EPMOE_TARGET_AVX512 void gemm_tile(const uint32_t* panel, int64_t depth, const T* const (&w)[kGemmCols],
                                   WeightPrefetch prefetch, int num_cols, int64_t num_rows, DType dtype,
                                   void* const* out_rows, int64_t col) {
    prefetch_output(out_rows, num_rows < kPanelRows ? num_rows : kPanelRows, col, num_cols, sizeof(T));
    __m512 acc[kGemmCols][2];
    tile<T, kGemmCols>(panel, depth, w, prefetch, acc);
    store_tile<kGemmCols>(acc, num_cols, num_rows, dtype, out_rows, col);
}

// Packs every panel of the call; returns the panel stride in words.
template <typename T>
int64_t pack_panels(const void* const* a_rows, int64_t num_rows, int64_t depth, uint32_t* panels) {
    const int64_t stride = panel_words<T>(depth) * kPanelRows;
    for (int64_t m0 = 0; m0 < num_rows; m0 += kPanelRows) {
        pack_panel<T>(reinterpret_cast<const T* const*>(a_rows) + m0, num_rows - m0, depth,
                      panels + (m0 / kPanelRows) * stride);
    }
    return stride;
}

// Weight rows of block c0 (columns [c0, c0 + width) of `w`, at most kMax rows): edge blocks repeat their last row.
template <typename T, int kMax>
int block_rows(const T* w, int64_t depth, int64_t c0, int64_t col_end, const T* (&rows)[kMax]) {
    const int num = static_cast<int>(col_end - c0 < kMax ? col_end - c0 : kMax);
    for (int c = 0; c < kMax; ++c) rows[c] = w + (c0 + (c < num ? c : num - 1)) * depth;
    return num;
}

// The share of panel p (of num_panels) of the lines of `next` (num_rows rows of depth T values).
template <typename T>
WeightPrefetch prefetch_share(const void* const* next, int num_rows, int64_t depth, int64_t p, int64_t num_panels) {
    if (next == nullptr) return {};
    const int64_t row_bytes = depth * static_cast<int64_t>(sizeof(T));
    const int64_t lines = num_rows * ((row_bytes + 63) / 64);
    return WeightPrefetch(next, row_bytes, lines * p / num_panels, lines * (p + 1) / num_panels);
}

// NOTES: loop order weight block -> panel: the block's 12 weight rows are reused by every panel from L1/L2, the
// panels (all rows of the call) stay in L2. Edge blocks repeat their last weight row and store fewer columns.
template <typename T>
void panel_swiglu_impl(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t hidden, const T* w13,
                       int64_t inter, int64_t col_begin, int64_t col_end, void* const* out_rows, uint32_t* panels) {
    const int64_t stride = pack_panels<T>(a_rows, num_rows, hidden, panels);
    const int64_t num_panels = (num_rows + kPanelRows - 1) / kPanelRows;
    const T* gate[kSwigluCols];
    const T* up[kSwigluCols];
    const T* w[2][2 * kSwigluCols];  // this block, next block: 6 gate rows then 6 up rows
    auto fill = [&](int64_t c0, const T* (&dst)[2 * kSwigluCols]) {
        const int num = block_rows<T, kSwigluCols>(w13, hidden, c0, col_end, gate);
        block_rows<T, kSwigluCols>(w13 + inter * hidden, hidden, c0, col_end, up);
        for (int c = 0; c < kSwigluCols; ++c) dst[c] = gate[c], dst[kSwigluCols + c] = up[c];
        return num;
    };
    int cur = 0;
    int num_cols = fill(col_begin, w[cur]);
    for (int64_t c0 = col_begin; c0 < col_end; c0 += kSwigluCols, cur ^= 1) {
        const bool has_next = c0 + kSwigluCols < col_end;
        const int next_cols = has_next ? fill(c0 + kSwigluCols, w[cur ^ 1]) : 0;
        const void* const* next = has_next ? reinterpret_cast<const void* const*>(w[cur ^ 1]) : nullptr;
        for (int64_t p = 0; p < num_panels; ++p) {
            swiglu_tile<T>(panels + p * stride, hidden, w[cur],
                           prefetch_share<T>(next, 2 * kSwigluCols, hidden, p, num_panels), num_cols,
                           num_rows - p * kPanelRows, dtype, out_rows + p * kPanelRows, c0);
        }
        num_cols = next_cols;
    }
}

template <typename T>
void panel_gemm_impl(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t depth, const T* w_all,
                     int64_t col_begin, int64_t col_end, void* const* out_rows, uint32_t* panels) {
    const int64_t stride = pack_panels<T>(a_rows, num_rows, depth, panels);
    const int64_t num_panels = (num_rows + kPanelRows - 1) / kPanelRows;
    const T* w[2][kGemmCols];
    int cur = 0;
    int num_cols = block_rows<T, kGemmCols>(w_all, depth, col_begin, col_end, w[cur]);
    for (int64_t c0 = col_begin; c0 < col_end; c0 += kGemmCols, cur ^= 1) {
        const bool has_next = c0 + kGemmCols < col_end;
        const int next_cols = has_next ? block_rows<T, kGemmCols>(w_all, depth, c0 + kGemmCols, col_end, w[cur ^ 1]) : 0;
        const void* const* next = has_next ? reinterpret_cast<const void* const*>(w[cur ^ 1]) : nullptr;
        for (int64_t p = 0; p < num_panels; ++p) {
            gemm_tile<T>(panels + p * stride, depth, w[cur], prefetch_share<T>(next, kGemmCols, depth, p, num_panels),
                         num_cols, num_rows - p * kPanelRows, dtype, out_rows + p * kPanelRows, c0);
        }
        num_cols = next_cols;
    }
}

void check_supported(DType dtype) {
    EPMOE_HOST_CHECK(gemm_nt_supported(dtype), "no native panel GEMM kernel for dtype ", static_cast<int>(dtype),
                     " on this CPU");
}

}  // namespace

int64_t panel_scratch_bytes(DType dtype, int64_t num_rows, int64_t depth) {
    const int64_t words = dtype == DType::kFloat32 ? depth : (depth + 1) / 2;
    return (num_rows + kPanelRows - 1) / kPanelRows * kPanelRows * words * 4;
}

void panel_swiglu(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t hidden, const void* w13,
                  int64_t inter, int64_t col_begin, int64_t col_end, void* const* out_rows, void* scratch) {
    check_supported(dtype);
    if (num_rows == 0 || col_begin >= col_end) return;
    uint32_t* panels = static_cast<uint32_t*>(scratch);
    if (dtype == DType::kFloat32) {
        panel_swiglu_impl(dtype, a_rows, num_rows, hidden, static_cast<const float*>(w13), inter, col_begin, col_end,
                          out_rows, panels);
    } else {
        panel_swiglu_impl(dtype, a_rows, num_rows, hidden, static_cast<const uint16_t*>(w13), inter, col_begin,
                          col_end, out_rows, panels);
    }
}

void panel_gemm(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t depth, const void* w,
                int64_t col_begin, int64_t col_end, void* const* out_rows, void* scratch) {
    check_supported(dtype);
    if (num_rows == 0 || col_begin >= col_end) return;
    uint32_t* panels = static_cast<uint32_t*>(scratch);
    if (dtype == DType::kFloat32) {
        panel_gemm_impl(dtype, a_rows, num_rows, depth, static_cast<const float*>(w), col_begin, col_end, out_rows,
                        panels);
    } else {
        panel_gemm_impl(dtype, a_rows, num_rows, depth, static_cast<const uint16_t*>(w), col_begin, col_end, out_rows,
                        panels);
    }
}

}  // namespace epmoe::core
