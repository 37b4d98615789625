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

// The cache lines of the next weight block, prefetched into L2 one per K step by the tiles of the current block:
// each tile gets a budget (set_budget: its share of the lines) and continues where the previous tile stopped, so
// that the block's first pass over the next rows does not wait on memory. Tiles copy it into registers (take) and
// hand it back (put).
class WeightPrefetch {
  public:
    WeightPrefetch() = default;
    WeightPrefetch(const void* const* rows, int64_t row_bytes, int64_t num_lines)
        : rows_(reinterpret_cast<const char* const*>(rows)), row_bytes_(row_bytes), left_(num_lines) {}
    void set_budget(int64_t lines) {
        remaining_ = lines < left_ ? lines : left_;
        left_ -= remaining_;
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
    int64_t row_bytes_ = 0, left_ = 0, remaining_ = 0, row_ = 0, offset_ = 0;
};

// Requests write ownership of the output lines a tile will store (columns [col, col + width) of each of its rows),
// one line per K step from the start of the tile: the stores at its end then find them in cache. Spread over the
// loop, since a burst of misses at once would wait for the core's few line fill buffers.
class OutputPrefetch {
  public:
    OutputPrefetch(void* const* rows, int64_t num_rows, int64_t col_byte, int64_t width_bytes)
        : rows_(rows), first_(col_byte), last_(col_byte + width_bytes - 1), remaining_(2 * num_rows) {}
    inline void next() {
        if (remaining_ <= 0) return;
        --remaining_;
        __builtin_prefetch(static_cast<const char*>(rows_[remaining_ >> 1]) + ((remaining_ & 1) ? last_ : first_), 1, 2);
    }

  private:
    void* const* rows_;
    int64_t first_, last_, remaining_;
};

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

// 12 weight rows as four groups of 3 rows of stride ld elements: row n = base[n / 3] + (n % 3) * ld. With one
// pointer per group and ld in a register every row is a single addressing mode (ld scaled by 1, 2, 4 or 8), which
// keeps the K loop's 12 broadcasts within the 16 general registers.
template <typename T>
struct WeightBlock {
    const T* base[4];
    int64_t ld;
};

// ---- fp32 tiles: acc[n][half] += w[n][k] * panel[k][16 * half .. + 16]

EPMOE_TARGET_AVX512 inline void tile_f32(const uint32_t* panel, int64_t depth, const WeightBlock<float>& w,
                                         WeightPrefetch& weight_prefetch, OutputPrefetch out_prefetch,
                                         __m512 (&out)[12][2]) {
    __m512 acc[12][2];  // local: `out` may alias the loads (__m512 is may_alias), registers need a local
    WeightPrefetch prefetch = weight_prefetch;  // in registers for the loop
#pragma GCC unroll 12
    for (int n = 0; n < 12; ++n) acc[n][0] = acc[n][1] = _mm512_setzero_ps();
    const float* p = reinterpret_cast<const float*>(panel);
    const float* g[4] = {w.base[0], w.base[1], w.base[2], w.base[3]};
    const int64_t ld = w.ld;
    for (int64_t k = 0; k < depth; ++k) {
        const __m512 x0 = _mm512_load_ps(p), x1 = _mm512_load_ps(p + 16);
        p += kPanelRows;
        prefetch.next();
        out_prefetch.next();
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
#pragma GCC unroll 3
            for (int i = 0; i < 3; ++i) {
                const __m512 b = _mm512_set1_ps(g[q][i * ld]);
                acc[3 * q + i][0] = _mm512_fmadd_ps(b, x0, acc[3 * q + i][0]);
                acc[3 * q + i][1] = _mm512_fmadd_ps(b, x1, acc[3 * q + i][1]);
            }
            ++g[q];
        }
    }
#pragma GCC unroll 12
    for (int n = 0; n < 12; ++n) out[n][0] = acc[n][0], out[n][1] = acc[n][1];
    weight_prefetch = prefetch;
}

// ---- bf16 tiles: one vdpbf16ps per (weight row, half) and pair of K values

EPMOE_TARGET_AVX512_BF16 void tile_bf16(const uint32_t* panel, int64_t depth, const WeightBlock<uint16_t>& w,
                                        WeightPrefetch& weight_prefetch, OutputPrefetch out_prefetch,
                                        __m512 (&out)[12][2]) {
    __m512 acc[12][2];
    WeightPrefetch prefetch = weight_prefetch;
#pragma GCC unroll 12
    for (int n = 0; n < 12; ++n) acc[n][0] = acc[n][1] = _mm512_setzero_ps();
    const uint32_t* p = panel;
    const uint16_t* g[4] = {w.base[0], w.base[1], w.base[2], w.base[3]};
    const int64_t ld = w.ld;
    const int64_t full_words = depth / 2;
    for (int64_t k = 0; k < full_words; ++k) {
        const __m512bh x0 = (__m512bh)_mm512_load_si512(p), x1 = (__m512bh)_mm512_load_si512(p + 16);
        p += kPanelRows;
        prefetch.next();
        out_prefetch.next();
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
#pragma GCC unroll 3
            for (int i = 0; i < 3; ++i) {
                const __m512bh b = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const u32_unaligned*>(g[q] + i * ld));
                acc[3 * q + i][0] = _mm512_dpbf16_ps(acc[3 * q + i][0], x0, b);
                acc[3 * q + i][1] = _mm512_dpbf16_ps(acc[3 * q + i][1], x1, b);
            }
            g[q] += 2;
        }
    }
    if (full_words * 2 < depth) {  // odd depth: (last value, 0) pairs on both sides
        const __m512bh x0 = (__m512bh)_mm512_load_si512(p), x1 = (__m512bh)_mm512_load_si512(p + 16);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
#pragma GCC unroll 3
            for (int i = 0; i < 3; ++i) {
                const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(g[q][i * ld]));
                acc[3 * q + i][0] = _mm512_dpbf16_ps(acc[3 * q + i][0], x0, b);
                acc[3 * q + i][1] = _mm512_dpbf16_ps(acc[3 * q + i][1], x1, b);
            }
        }
    }
#pragma GCC unroll 12
    for (int n = 0; n < 12; ++n) out[n][0] = acc[n][0], out[n][1] = acc[n][1];
    weight_prefetch = prefetch;
}

template <typename T>
EPMOE_TARGET_AVX512 inline void tile(const uint32_t* panel, int64_t depth, const WeightBlock<T>& w,
                                     WeightPrefetch& prefetch, OutputPrefetch out_prefetch, __m512 (&acc)[12][2]) {
    if constexpr (sizeof(T) == 4) {
        tile_f32(panel, depth, w, prefetch, out_prefetch, acc);
    } else {
        tile_bf16(panel, depth, w, prefetch, out_prefetch, acc);
    }
}

// Rows 0-5 of w: gate rows of 6 h columns, rows 6-11: their up rows.
template <typename T>
EPMOE_TARGET_AVX512 void swiglu_tile(const uint32_t* panel, int64_t depth, const WeightBlock<T>& w,
                                     WeightPrefetch& prefetch, int num_cols, int64_t num_rows, DType dtype,
                                     void* const* out_rows, int64_t col) {
    const OutputPrefetch out_prefetch(out_rows, num_rows < kPanelRows ? num_rows : kPanelRows, col * sizeof(T),
                                      num_cols * sizeof(T));
    __m512 acc[12][2];
    tile<T>(panel, depth, w, prefetch, out_prefetch, acc);
    __m512 h[kSwigluCols][2];
#pragma GCC unroll 6
    for (int c = 0; c < kSwigluCols; ++c) {
        h[c][0] = swiglu_ps(acc[c][0], acc[kSwigluCols + c][0]);
        h[c][1] = swiglu_ps(acc[c][1], acc[kSwigluCols + c][1]);
    }
    store_tile<kSwigluCols>(h, num_cols, num_rows, dtype, out_rows, col);
}

template <typename T>
EPMOE_TARGET_AVX512 void gemm_tile(const uint32_t* panel, int64_t depth, const WeightBlock<T>& w,
                                   WeightPrefetch& prefetch, int num_cols, int64_t num_rows, DType dtype,
                                   void* const* out_rows, int64_t col) {
    const OutputPrefetch out_prefetch(out_rows, num_rows < kPanelRows ? num_rows : kPanelRows, col * sizeof(T),
                                      num_cols * sizeof(T));
    __m512 acc[12][2];
    tile<T>(panel, depth, w, prefetch, out_prefetch, acc);
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

// The weight rows of one tile: `num` consecutive groups of `group` rows (gate then up for SwiGLU: 2 groups of 6;
// a plain GEMM: 1 group of 12) starting at first[g], row stride depth. Blocks with fewer than `group` valid rows (the
// last of a call) are copied into `edge` ([12, depth], the last valid row repeated), so that the tile always reads
// 12 in-bounds rows of one stride.
template <typename T>
WeightBlock<T> weight_block(const T* const* first, int num_groups, int valid, int64_t depth, T* edge) {
    const int group = 12 / num_groups;
    if (valid == group) {
        WeightBlock<T> block{{}, depth};
        for (int q = 0; q < 4; ++q) block.base[q] = first[q * 3 / group] + (q * 3 % group) * depth;
        return block;
    }
    for (int n = 0; n < 12; ++n) {
        const int g = n / group, row = n % group < valid ? n % group : valid - 1;
        std::memcpy(edge + n * depth, first[g] + row * depth, depth * sizeof(T));
    }
    return WeightBlock<T>{{edge, edge + 3 * depth, edge + 6 * depth, edge + 9 * depth}, depth};
}

// NOTES: loop order weight block -> panel: the block's 12 weight rows are reused by every panel from L1/L2, the
// panels (all rows of the call) stay in L2; while a block runs, its tiles prefetch the next block. `first` holds
// the first row of each group of the block at columns [c0, c0 + width): SwiGLU gate and up rows (2 groups of 6),
// plain GEMM rows (1 group of 12).
template <typename T, int kGroups>
void run_blocks(DType dtype, const T* const (&first)[kGroups], int64_t depth, int64_t col_begin, int64_t col_end,
                const uint32_t* panels, int64_t stride, int64_t num_rows, void* const* out_rows, T* edge) {
    constexpr int kWidth = 12 / kGroups;  // output columns per block
    const int64_t num_panels = (num_rows + kPanelRows - 1) / kPanelRows;
    for (int64_t c0 = col_begin; c0 < col_end; c0 += kWidth) {
        const int valid = static_cast<int>(col_end - c0 < kWidth ? col_end - c0 : kWidth);
        const T* rows[kGroups];
        for (int g = 0; g < kGroups; ++g) rows[g] = first[g] + (c0 - col_begin) * depth;
        const WeightBlock<T> block = weight_block<T>(rows, kGroups, valid, depth, edge);
        const void* next[12];
        const bool has_next = c0 + kWidth < col_end;
        for (int n = 0; n < 12 && has_next; ++n)  // the next block's rows (its tail rows may be past col_end)
            next[n] = rows[n / kWidth] + (kWidth + (n % kWidth < col_end - c0 - kWidth ? n % kWidth : 0)) * depth;
        // The next block's lines, an equal share per panel (one division per block, none per tile).
        const int64_t lines = has_next ? 12 * ((depth * static_cast<int64_t>(sizeof(T)) + 63) / 64) : 0;
        const int64_t share = (lines + num_panels - 1) / num_panels;
        WeightPrefetch prefetch = has_next ? WeightPrefetch(next, depth * static_cast<int64_t>(sizeof(T)), lines)
                                           : WeightPrefetch();
        for (int64_t p = 0; p < num_panels; ++p) {
            prefetch.set_budget(share);
            const uint32_t* panel = panels + p * stride;
            if constexpr (kGroups == 2) {
                swiglu_tile<T>(panel, depth, block, prefetch, valid, num_rows - p * kPanelRows, dtype,
                               out_rows + p * kPanelRows, c0);
            } else {
                gemm_tile<T>(panel, depth, block, prefetch, valid, num_rows - p * kPanelRows, dtype,
                             out_rows + p * kPanelRows, c0);
            }
        }
    }
}

template <typename T>
void panel_swiglu_impl(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t hidden, const T* gate,
                       const T* up, int64_t col_begin, int64_t col_end, void* const* out_rows, uint32_t* panels) {
    const int64_t stride = pack_panels<T>(a_rows, num_rows, hidden, panels);
    T* edge = reinterpret_cast<T*>(panels + ((num_rows + kPanelRows - 1) / kPanelRows) * stride);
    const T* const first[2] = {gate + col_begin * hidden, up + col_begin * hidden};
    run_blocks<T, 2>(dtype, first, hidden, col_begin, col_end, panels, stride, num_rows, out_rows, edge);
}

template <typename T>
void panel_gemm_impl(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t depth, const T* w_all,
                     int64_t col_begin, int64_t col_end, void* const* out_rows, uint32_t* panels) {
    const int64_t stride = pack_panels<T>(a_rows, num_rows, depth, panels);
    T* edge = reinterpret_cast<T*>(panels + ((num_rows + kPanelRows - 1) / kPanelRows) * stride);
    const T* const first[1] = {w_all + col_begin * depth};
    run_blocks<T, 1>(dtype, first, depth, col_begin, col_end, panels, stride, num_rows, out_rows, edge);
}

void check_supported(DType dtype) {
    EPMOE_HOST_CHECK(gemm_nt_supported(dtype), "no native panel GEMM kernel for dtype ", static_cast<int>(dtype),
                     " on this CPU");
}

}  // namespace

int64_t panel_scratch_bytes(DType dtype, int64_t num_rows, int64_t depth) {
    const int64_t words = dtype == DType::kFloat32 ? depth : (depth + 1) / 2;
    const int64_t edge_block = 12 * depth * (dtype == DType::kFloat32 ? 4 : 2);
    return (num_rows + kPanelRows - 1) / kPanelRows * kPanelRows * words * 4 + edge_block;
}

void panel_swiglu(DType dtype, const void* const* a_rows, int64_t num_rows, int64_t hidden, const void* gate,
                  const void* up, int64_t col_begin, int64_t col_end, void* const* out_rows, void* scratch) {
    check_supported(dtype);
    if (num_rows == 0 || col_begin >= col_end) return;
    uint32_t* panels = static_cast<uint32_t*>(scratch);
    if (dtype == DType::kFloat32) {
        panel_swiglu_impl(dtype, a_rows, num_rows, hidden, static_cast<const float*>(gate),
                          static_cast<const float*>(up), col_begin, col_end, out_rows, panels);
    } else {
        panel_swiglu_impl(dtype, a_rows, num_rows, hidden, static_cast<const uint16_t*>(gate),
                          static_cast<const uint16_t*>(up), col_begin, col_end, out_rows, panels);
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
