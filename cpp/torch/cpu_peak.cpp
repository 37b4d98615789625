// epmoe::cpu_peak_gflops: the measured arithmetic peak of the intra-op threads, for the benchmarks' ceilings.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <time.h>

#include <string>
#include <vector>

#include "cpp/core/cpu_peak.h"

namespace epmoe {
namespace {

core::PeakKind to_kind(const std::string& kind) {
    if (kind == "fp32_fma") return core::PeakKind::kFp32Fma;
    if (kind == "bf16_dot") return core::PeakKind::kBf16Dot;
    TORCH_CHECK_VALUE(false, "kind must be 'fp32_fma' or 'bf16_dot', got '", kind, "'");
}

// CPU time of the calling thread: the probe measures what a core does while it runs, not how often a busy machine
// lets it run.
double thread_seconds() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double cpu_peak_gflops(c10::string_view kind_name, double seconds) {
    const core::PeakKind kind = to_kind(std::string(kind_name));
    TORCH_CHECK(core::cpu_peak_supported(kind), "cpu_peak_gflops: this CPU has no ",
                kind == core::PeakKind::kFp32Fma ? "AVX-512" : "AVX512_BF16", " instructions");
    TORCH_CHECK_VALUE(seconds > 0.0 && seconds <= 10.0, "seconds must be in (0, 10], got ", seconds);
    // Calibrate on this thread, then every intra-op thread runs the same count at once.
    int64_t iterations = 1 << 14;
    for (;;) {
        const double t0 = thread_seconds();
        core::cpu_peak_run(kind, iterations);
        const double elapsed = thread_seconds() - t0;
        if (elapsed > 0.02) {
            iterations = static_cast<int64_t>(static_cast<double>(iterations) * seconds / elapsed) + 1;
            break;
        }
        iterations *= 4;
    }
    const int num_threads = at::get_num_threads();
    std::vector<double> rate(num_threads, 0.0);
    at::parallel_for(0, num_threads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const double t0 = thread_seconds();
            const double flops = core::cpu_peak_run(kind, iterations);
            rate[t] = flops / (thread_seconds() - t0);
        }
    });
    double total = 0.0;
    for (double r : rate) total += r;
    return total / 1e9;
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // GFLOP/s of a loop of independent vfmadd231ps ("fp32_fma") or vdpbf16ps ("bf16_dot") on every intra-op thread
    // for about `seconds` of CPU time each, summed over the threads (benchmark ceilings; raises where the CPU lacks
    // the instructions).
    m.def("cpu_peak_gflops(str kind, float seconds) -> float");
}

TORCH_LIBRARY_IMPL(epmoe, CompositeExplicitAutograd, m) {
    m.impl("cpu_peak_gflops", &epmoe::cpu_peak_gflops);
}
