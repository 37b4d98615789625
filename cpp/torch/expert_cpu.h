// CPU execution of the grouped expert GEMMs shared by grouped_swiglu / grouped_gemm and fused_experts_forward.
//
// Work is cut into (expert, row tile, column chunk) items so that prefill (hundreds of rows per expert) and decode
// (a few) both give every core work; the intra-op threads claim items dynamically. Operand and output rows are
// addressed through per-row pointers, so a gather (permute) or scatter costs no copy. Each item runs on one of two
// backends, chosen per item:
//   native  the micro-kernels of cpp/core/expert_gemm.h (fp32: AVX-512, bf16: AVX512_BF16), fp32 accumulation;
//   aten    at::mm on the item (MKL / oneDNN, which uses AMX on CPUs that have it), epilogue in fp32.
// EPMOE_CPU_GEMM=native|aten forces one (native raises where the CPU lacks the instructions); the default picks
// native, except bf16 segments of >= kAmxMinRows rows on AMX CPUs (oneDNN's AMX kernels are several times faster)
// and fp16 (no native kernel).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace epmoe::cpu {

constexpr int64_t kAmxMinRows = 32;

struct Item {
    int64_t expert, row_begin, row_end, col_begin, col_end;
    int64_t group = 0;  // which segment group of a multi-group call (make_items with several specs)
};

// One group of segments for make_items: rows [offsets[e], offsets[e + 1]) belong to expert e; the output has
// num_cols columns, items at most max_rows rows and column chunks a multiple of col_align; depth (the K of the
// GEMM) weighs the items of different groups against each other.
struct ItemSpec {
    const std::vector<int64_t>* offsets;
    int64_t num_cols, max_rows, col_align, depth;
};

// Cuts every non-empty segment of `offsets` into row tiles of <= max_rows rows, whole panels of kPanelRows rows but
// the last (fixed by the segment size alone, so results do not depend on the thread count), then splits the columns [0, num_cols) into chunks
// (multiples of col_align) until there are a few items per thread (more when segments are a few rows: decode streams
// weights, and short last items balance the cores), so that decode (one tile per expert) still spreads over the
// cores. Largest items first.
std::vector<Item> make_items(const std::vector<int64_t>& offsets, int64_t num_cols, int64_t max_rows,
                             int64_t col_align);
// The same for several groups at once (Item::group = index in specs), sorted together: one parallel region.
std::vector<Item> make_items(const std::vector<ItemSpec>& specs);

// Runs fn on every item on the intra-op threads, each thread claiming the next unclaimed item; ATen calls in fn see
// the caller's thread-local state.
void run_items(const std::vector<Item>& items, const std::function<void(const Item&)>& fn);

// Reads and validates expert_offsets int64 [E + 1] (0 = [0] <= ... <= [E] <= num_rows) on the host.
std::vector<int64_t> read_offsets(const at::Tensor& expert_offsets, int64_t num_rows);

// A group of SwiGLU segments: h_rows[r][c] = silu(a_rows[r] . gate_e[c]) * (a_rows[r] . up_e[c]) for the rows r of
// each expert e (offsets [E + 1]), in the weights' dtype.
//   a_rows [R] pointers to rows of H elements; gate, up [E, I, H] with contiguous rows (stride(2) == 1, stride(1) ==
//   H; e.g. the two halves of HF w13 [E, 2I, H]); h_rows [R] pointers to rows of I elements.
struct SwigluSegments {
    std::vector<int64_t> offsets;
    const void* const* a_rows;
    at::Tensor gate, up;
    void* const* h_rows;
};

// A group of GEMM segments: out_rows[r][n] = a_rows[r] . w_e[n] (w [E, N, K] with contiguous rows of K elements).
struct GemmSegments {
    std::vector<int64_t> offsets;
    const void* const* a_rows;
    at::Tensor w;
    void* const* out_rows;
};

// gate, up = the halves of w13 [E, 2I, H] (contiguous).
SwigluSegments swiglu_group(std::vector<int64_t> offsets, const void* const* a_rows, const at::Tensor& w13,
                            void* const* h_rows);

// Every group in one parallel region (the threads claim items of all groups, largest first).
void swiglu_segments(const std::vector<SwigluSegments>& groups);
void gemm_segments(const std::vector<GemmSegments>& groups);

// swiglu_segments(swiglu_groups) then gemm_segments(gemm_groups) in one parallel region, where GEMM group g reads
// the h rows SwiGLU group g writes (same offsets). A GEMM item of an expert waits until the expert's SwiGLU items
// are done.
// NOTES: items are claimed in list order and every SwiGLU item comes before every GEMM item, so an item waited on is
// already running on another thread (no deadlock, also on one thread); the GEMM items come in the order their
// experts' SwiGLU items end, so waits are rare. It saves the barrier between the phases, where a core idles while
// the other finishes its last item (decode: ~2% of a layer).
void swiglu_gemm_segments(const std::vector<SwigluSegments>& swiglu_groups,
                          const std::vector<GemmSegments>& gemm_groups);

}  // namespace epmoe::cpu
