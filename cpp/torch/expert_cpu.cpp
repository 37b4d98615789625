#include "cpp/torch/expert_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <utility>

#include "cpp/core/cpu_features.h"
#include "cpp/core/expert_gemm.h"
#include "cpp/core/gemm_nt.h"
#include "cpp/core/gemm_panel.h"
#include "cpp/torch/core_dtype.h"
#include "cpp/torch/cpu_scratch.h"
#include "cpp/torch/dtype_name.h"

namespace epmoe::cpu {
namespace {

constexpr int64_t kSwigluColAlign = 6;     // h columns of a native SwiGLU tile
constexpr int64_t kGemmColAlign = 12;      // output columns of a native GEMM tile
constexpr int64_t kPanelBudget = 768 << 10;  // bytes of packed rows per item: they stay in L2 while reused

enum class Mode { kAuto, kNative, kAten };
enum class Backend { kNative, kAten };

Mode read_mode() {
    const char* env = std::getenv("EPMOE_CPU_GEMM");
    const std::string v = env == nullptr ? "" : env;
    if (v.empty() || v == "auto") return Mode::kAuto;
    if (v == "native") return Mode::kNative;
    if (v == "aten") return Mode::kAten;
    TORCH_CHECK_VALUE(false, "EPMOE_CPU_GEMM must be 'auto', 'native' or 'aten', got '", v, "'");
}

bool native_available(at::ScalarType dtype) {
    return dtype != at::kHalf && core::expert_kernels_supported(core_dtype(dtype));
}

// Validates the mode for dtype once per call (so that an error is raised outside the parallel region).
Mode checked_mode(at::ScalarType dtype) {
    const Mode mode = read_mode();
    TORCH_CHECK(mode != Mode::kNative || native_available(dtype), "EPMOE_CPU_GEMM=native: this CPU has no native ",
                dtype_name(dtype), " kernel (fp32 needs AVX-512, bf16 AVX512_BF16; fp16 has none)");
    return mode;
}

Backend pick_backend(Mode mode, at::ScalarType dtype, int64_t num_rows) {
    if (mode == Mode::kAten || !native_available(dtype)) return Backend::kAten;
    if (mode == Mode::kNative) return Backend::kNative;
    if (dtype == at::kBFloat16 && core::cpu_features().amx_bf16 && num_rows >= kAmxMinRows) return Backend::kAten;
    return Backend::kNative;
}

// Rows per item: the packed rows of a native item fit the L2 budget (whole panels).
int64_t max_item_rows(int64_t depth, int64_t elem_size) {
    const int64_t rows = kPanelBudget / std::max<int64_t>(depth * elem_size, 1);
    return std::clamp<int64_t>(rows / core::kPanelRows * core::kPanelRows, 2 * core::kPanelRows, 512);
}

// The rows [0, num_rows) as a [num_rows, depth] tensor: a view when they are consecutive, else gathered into the
// thread's scratch.
at::Tensor rows_tensor(const void* const* rows, int64_t num_rows, int64_t depth, at::ScalarType dtype) {
    const int64_t row_bytes = depth * static_cast<int64_t>(c10::elementSize(dtype));
    const char* first = static_cast<const char*>(rows[0]);
    bool consecutive = true;
    for (int64_t i = 1; i < num_rows && consecutive; ++i) consecutive = rows[i] == first + i * row_bytes;
    void* data = const_cast<char*>(first);
    if (!consecutive) {
        data = thread_scratch(static_cast<size_t>(num_rows * row_bytes));
        for (int64_t i = 0; i < num_rows; ++i) std::memcpy(static_cast<char*>(data) + i * row_bytes, rows[i], row_bytes);
    }
    return at::from_blob(data, {num_rows, depth}, at::TensorOptions().dtype(dtype));
}

void aten_swiglu_item(const Item& it, const SwigluSegments& g) {
    const int64_t m = it.row_end - it.row_begin, n = it.col_end - it.col_begin, inter = g.gate.size(1);
    const int64_t hidden = g.gate.size(2);
    const at::Tensor a = rows_tensor(g.a_rows + it.row_begin, m, hidden, g.gate.scalar_type());
    const at::Tensor gate_e = g.gate.select(0, it.expert), up_e = g.up.select(0, it.expert);
    // NOTES: the GEMM accumulates in fp32; for bf16/fp16 ATen rounds its result to the input dtype once (no fp32
    // output for 16-bit inputs on CPU). The activation then runs in fp32 and is rounded once into h.
    at::Tensor gu = at::empty({m, 2 * n}, g.gate.options().dtype(at::kFloat));
    const bool adjacent = static_cast<const char*>(up_e.data_ptr()) ==
                          static_cast<const char*>(gate_e.data_ptr()) + inter * hidden * g.gate.element_size();
    if (n == inter && adjacent) {  // one GEMM over the gate and up rows together (HF w13)
        gu.copy_(at::mm(a, gate_e.as_strided({2 * inter, hidden}, {hidden, 1}).t()));
    } else {
        gu.narrow(1, 0, n).copy_(at::mm(a, gate_e.narrow(0, it.col_begin, n).t()));
        gu.narrow(1, n, n).copy_(at::mm(a, up_e.narrow(0, it.col_begin, n).t()));
    }
    core::swiglu_rows(gu.data_ptr<float>(), 2 * n, n, m, n, core_dtype(g.gate.scalar_type()), g.h_rows + it.row_begin,
                      it.col_begin);
}

void aten_gemm_item(const Item& it, const void* const* a_rows, const at::Tensor& w, void* const* out_rows) {
    const int64_t m = it.row_end - it.row_begin, n = it.col_end - it.col_begin;
    const at::Tensor a = rows_tensor(a_rows + it.row_begin, m, w.size(2), w.scalar_type());
    const at::Tensor c = at::mm(a, w.select(0, it.expert).narrow(0, it.col_begin, n).t()).contiguous();
    const int64_t elem = static_cast<int64_t>(w.element_size());
    const char* src = static_cast<const char*>(c.data_ptr());
    for (int64_t i = 0; i < m; ++i)
        std::memcpy(static_cast<char*>(out_rows[it.row_begin + i]) + it.col_begin * elem, src + i * n * elem, n * elem);
}

}  // namespace

std::vector<Item> make_items(const std::vector<int64_t>& off, int64_t num_cols, int64_t max_rows, int64_t col_align) {
    return make_items({ItemSpec{&off, num_cols, max_rows, col_align, 1}});
}

std::vector<Item> make_items(const std::vector<ItemSpec>& specs) {
    std::vector<Item> row_items;
    int64_t total_rows = 0;
    for (size_t s = 0; s < specs.size(); ++s) {
        const std::vector<int64_t>& off = *specs[s].offsets;
        if (specs[s].num_cols == 0 || off.size() < 2) continue;
        total_rows += off.back() - off.front();
        const int64_t max_panels = std::max<int64_t>(1, specs[s].max_rows / core::kPanelRows);
        for (size_t e = 0; e + 1 < off.size(); ++e) {
            const int64_t n = off[e + 1] - off[e];
            if (n == 0) continue;
            // Tiles of whole panels (a partial panel costs a full one), as even as that allows.
            const int64_t num_panels = (n + core::kPanelRows - 1) / core::kPanelRows;
            const int64_t num_tiles = (num_panels + max_panels - 1) / max_panels;
            const int64_t tile = (num_panels + num_tiles - 1) / num_tiles * core::kPanelRows;
            for (int64_t r = off[e]; r < off[e + 1]; r += tile) {
                row_items.push_back({static_cast<int64_t>(e), r, std::min(off[e + 1], r + tile), 0, specs[s].num_cols,
                                     static_cast<int64_t>(s)});
            }
        }
    }
    if (row_items.empty()) return {};
    // Decode items (a few rows: weight streaming) are cut finer, so that the last ones to finish are short.
    const int64_t num_row_items = static_cast<int64_t>(row_items.size());
    const bool streaming = total_rows < 32 * num_row_items;
    const int64_t target = (streaming ? 8 : 4) * static_cast<int64_t>(at::get_num_threads());
    const int64_t wanted_splits = (target + num_row_items - 1) / num_row_items;
    std::vector<Item> items;
    for (const Item& it : row_items) {
        const int64_t num_cols = specs[it.group].num_cols, col_align = specs[it.group].col_align;
        const int64_t num_splits = std::clamp<int64_t>(wanted_splits, 1, std::max<int64_t>(1, num_cols / (2 * col_align)));
        const int64_t chunk = ((num_cols + num_splits - 1) / num_splits + col_align - 1) / col_align * col_align;
        for (int64_t c = 0; c < num_cols; c += chunk)
            items.push_back({it.expert, it.row_begin, it.row_end, c, std::min(num_cols, c + chunk), it.group});
    }
    // Largest first (threads claim items in order), so that skewed segments do not finish last.
    const auto work = [&specs](const Item& it) {
        return (it.row_end - it.row_begin) * (it.col_end - it.col_begin) * specs[it.group].depth;
    };
    std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) { return work(a) > work(b); });
    return items;
}

namespace {

// Runs fn(i) for i in [0, num_items) on the intra-op threads, each claiming the next unclaimed index.
// NOTES: dynamic claiming, because segments differ in size under skewed routing and a static split of the item
// list would leave a core idle.
void run_claimed(int64_t num_items, const std::function<void(int64_t)>& fn) {
    const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_items);
    if (num_workers == 0) return;
    std::atomic<int64_t> next{0};
    // NOTES: the ATen calls in the workers must see the caller's thread-local state (grad mode off, autograd keys
    // excluded inside an op); OpenMP worker threads start without it.
    const at::ThreadLocalState state;
    at::parallel_for(0, num_workers, 1, [&](int64_t begin, int64_t end) {
        const at::ThreadLocalStateGuard state_guard(state);
        for (int64_t w = begin; w < end; ++w) {
            for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) fn(i);
        }
    });
}

}  // namespace

void run_items(const std::vector<Item>& items, const std::function<void(const Item&)>& fn) {
    run_claimed(static_cast<int64_t>(items.size()), [&](int64_t i) { fn(items[i]); });
}

std::vector<int64_t> read_offsets(const at::Tensor& expert_offsets, int64_t num_rows) {
    const int64_t* off = expert_offsets.data_ptr<int64_t>();
    std::vector<int64_t> v(off, off + expert_offsets.numel());
    TORCH_CHECK_VALUE(v[0] == 0, "expert_offsets[0] must be 0, got ", v[0]);
    for (size_t e = 1; e < v.size(); ++e) {
        TORCH_CHECK_VALUE(v[e] >= v[e - 1], "expert_offsets must be non-decreasing, got ", v[e - 1], " then ", v[e],
                          " at index ", e);
    }
    TORCH_CHECK_VALUE(v.back() <= num_rows, "expert_offsets[-1] must be <= the number of rows ", num_rows, ", got ",
                      v.back());
    return v;
}

namespace {

// One item of each GEMM on its backend. a_rows / out_rows are indexed by it.row_begin + i.
void swiglu_item(Mode mode, const Item& it, const SwigluSegments& g) {
    const at::ScalarType dtype = g.gate.scalar_type();
    const int64_t m = it.row_end - it.row_begin, hidden = g.gate.size(2);
    if (pick_backend(mode, dtype, m) == Backend::kAten) return aten_swiglu_item(it, g);
    const DType dt = core_dtype(dtype);
    void* scratch = thread_scratch(core::expert_swiglu_scratch_bytes(dt, m, hidden, it.col_end - it.col_begin));
    const int64_t elem = static_cast<int64_t>(g.gate.element_size());
    const char* gate = static_cast<const char*>(g.gate.data_ptr()) + it.expert * g.gate.stride(0) * elem;
    const char* up = static_cast<const char*>(g.up.data_ptr()) + it.expert * g.up.stride(0) * elem;
    core::expert_swiglu(dt, g.a_rows + it.row_begin, m, hidden, gate, up, it.col_begin, it.col_end,
                        g.h_rows + it.row_begin, scratch);
}

void gemm_item(Mode mode, const Item& it, const GemmSegments& g) {
    const at::ScalarType dtype = g.w.scalar_type();
    const int64_t m = it.row_end - it.row_begin, depth = g.w.size(2);
    if (pick_backend(mode, dtype, m) == Backend::kAten) return aten_gemm_item(it, g.a_rows, g.w, g.out_rows);
    const DType dt = core_dtype(dtype);
    void* scratch = thread_scratch(core::expert_gemm_scratch_bytes(dt, m, depth, it.col_end - it.col_begin));
    const char* w_e = static_cast<const char*>(g.w.data_ptr()) + it.expert * g.w.stride(0) * g.w.element_size();
    core::expert_gemm(dt, g.a_rows + it.row_begin, m, depth, w_e, it.col_begin, it.col_end, g.out_rows + it.row_begin,
                      scratch);
}

// Rows of a [E, N, K] weight view must be contiguous for the kernels (and K-contiguous for at::mm).
void check_rows(const at::Tensor& w, const char* name) {
    TORCH_CHECK(w.dim() == 3 && w.stride(2) == 1 && w.stride(1) == w.size(2), name,
                " must be [E, N, K] with contiguous rows, got sizes ", w.sizes(), " strides ", w.strides());
}

}  // namespace

SwigluSegments swiglu_group(std::vector<int64_t> offsets, const void* const* a_rows, const at::Tensor& w13,
                            void* const* h_rows) {
    const int64_t inter = w13.size(1) / 2;
    return SwigluSegments{std::move(offsets), a_rows, w13.narrow(1, 0, inter), w13.narrow(1, inter, inter), h_rows};
}

namespace {

std::vector<ItemSpec> swiglu_specs(const std::vector<SwigluSegments>& groups) {
    std::vector<ItemSpec> specs;
    for (const SwigluSegments& g : groups) {
        check_rows(g.gate, "gate");
        check_rows(g.up, "up");
        TORCH_CHECK(g.up.sizes() == g.gate.sizes() && g.up.scalar_type() == g.gate.scalar_type(),
                    "gate and up must have the same shape and dtype");
        const int64_t hidden = g.gate.size(2);
        specs.push_back({&g.offsets, g.gate.size(1), max_item_rows(hidden, g.gate.element_size()), kSwigluColAlign,
                         hidden});
    }
    return specs;
}

std::vector<ItemSpec> gemm_specs(const std::vector<GemmSegments>& groups) {
    std::vector<ItemSpec> specs;
    for (const GemmSegments& g : groups) {
        check_rows(g.w, "w");
        const int64_t depth = g.w.size(2);
        specs.push_back({&g.offsets, g.w.size(1), max_item_rows(depth, g.w.element_size()), kGemmColAlign, depth});
    }
    return specs;
}

}  // namespace

void swiglu_segments(const std::vector<SwigluSegments>& groups) {
    if (groups.empty()) return;
    const Mode mode = checked_mode(groups[0].gate.scalar_type());
    const std::vector<Item> items = make_items(swiglu_specs(groups));
    run_items(items, [&](const Item& it) { swiglu_item(mode, it, groups[it.group]); });
}

void gemm_segments(const std::vector<GemmSegments>& groups) {
    if (groups.empty()) return;
    const Mode mode = checked_mode(groups[0].w.scalar_type());
    const std::vector<Item> items = make_items(gemm_specs(groups));
    run_items(items, [&](const Item& it) { gemm_item(mode, it, groups[it.group]); });
}

void swiglu_gemm_segments(const std::vector<SwigluSegments>& swiglu_groups,
                          const std::vector<GemmSegments>& gemm_groups) {
    TORCH_CHECK(swiglu_groups.size() == gemm_groups.size(), "swiglu_gemm_segments: ", swiglu_groups.size(),
                " SwiGLU groups but ", gemm_groups.size(), " GEMM groups");
    if (swiglu_groups.empty()) return;
    const Mode mode = checked_mode(swiglu_groups[0].gate.scalar_type());
    // Segment (group, expert) -> key; its pending SwiGLU items, and the list position of its last one.
    std::vector<int64_t> key_base(swiglu_groups.size() + 1, 0);
    for (size_t g = 0; g < swiglu_groups.size(); ++g) {
        TORCH_CHECK(swiglu_groups[g].offsets == gemm_groups[g].offsets, "swiglu_gemm_segments: GEMM group ", g,
                    " must have the offsets of SwiGLU group ", g);
        key_base[g + 1] = key_base[g] + std::max<int64_t>(0, static_cast<int64_t>(swiglu_groups[g].offsets.size()) - 1);
    }
    const auto key = [&](const Item& it) { return key_base[it.group] + it.expert; };
    const std::vector<Item> first = make_items(swiglu_specs(swiglu_groups));
    std::vector<Item> second = make_items(gemm_specs(gemm_groups));
    std::vector<std::atomic<int64_t>> pending(key_base.back());  // value-initialised: 0
    std::vector<int64_t> last_position(key_base.back(), 0);
    for (size_t i = 0; i < first.size(); ++i) {
        pending[key(first[i])].fetch_add(1, std::memory_order_relaxed);
        last_position[key(first[i])] = static_cast<int64_t>(i);
    }
    std::stable_sort(second.begin(), second.end(), [&](const Item& a, const Item& b) {
        return last_position[key(a)] < last_position[key(b)];
    });
    const int64_t num_first = static_cast<int64_t>(first.size());
    std::atomic<bool> failed{false};
    run_claimed(num_first + static_cast<int64_t>(second.size()), [&](int64_t i) {
        try {
            if (i < num_first) {
                swiglu_item(mode, first[i], swiglu_groups[first[i].group]);
                pending[key(first[i])].fetch_sub(1, std::memory_order_release);
                return;
            }
            const Item& it = second[i - num_first];
            while (pending[key(it)].load(std::memory_order_acquire) > 0) {
                if (failed.load(std::memory_order_relaxed)) return;  // the item it waits for threw
                std::this_thread::yield();
            }
            gemm_item(mode, it, gemm_groups[it.group]);
        } catch (...) {
            failed.store(true, std::memory_order_relaxed);
            throw;
        }
    });
}

}  // namespace epmoe::cpu
