// Measured arithmetic peak of one CPU core (torch-free), for benchmarks that report achieved GFLOP/s against what
// the machine can do: a loop of independent fp32 FMAs (vfmadd231ps) or bf16 dot products (vdpbf16ps) on 24 zmm
// accumulators, enough in flight to saturate every FMA pipe.
#pragma once

#include <cstdint>

namespace epmoe::core {

enum class PeakKind { kFp32Fma = 0, kBf16Dot = 1 };

// True when this CPU has the instructions of `kind` (AVX-512 / AVX512_BF16).
bool cpu_peak_supported(PeakKind kind);

// Runs `iterations` rounds of 24 instructions on the calling thread; returns the flops done (2 per fp32 FMA lane,
// 4 per bf16 dot-product lane). Requires cpu_peak_supported(kind).
double cpu_peak_run(PeakKind kind, int64_t iterations);

}  // namespace epmoe::core
