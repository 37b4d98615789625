#include "cpp/core/cpu_peak.h"

#include "cpp/core/check.h"
#include "cpp/core/cpu_features.h"
#include "cpp/core/simd_avx512.h"

namespace epmoe::core {
namespace {

constexpr int kChains = 24;  // independent accumulators: > latency x pipes on current cores

// NOTES: the empty asm with the accumulators as in/out operands keeps them in registers and keeps the loop from
// being folded, without forcing them through memory.
EPMOE_TARGET_AVX512 double run_fma(int64_t iterations) {
    __m512 acc[kChains];
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1e-3f * static_cast<float>(i));
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 24
        for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
        asm volatile("" : "+v"(acc[0]), "+v"(acc[6]), "+v"(acc[12]), "+v"(acc[18]));
    }
    float sink = 0.0f;
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) sink += _mm512_reduce_add_ps(acc[i]);
    asm volatile("" : : "x"(sink));
    return static_cast<double>(iterations) * kChains * 16 * 2;
}

EPMOE_TARGET_AVX512_BF16 double run_bf16(int64_t iterations) {
    __m512 acc[kChains];
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1e-3f * static_cast<float>(i));
    const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x33d633d6);
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 24
        for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        asm volatile("" : "+v"(acc[0]), "+v"(acc[6]), "+v"(acc[12]), "+v"(acc[18]));
    }
    float sink = 0.0f;
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) sink += _mm512_reduce_add_ps(acc[i]);
    asm volatile("" : : "x"(sink));
    return static_cast<double>(iterations) * kChains * 16 * 4;
}

}  // namespace

bool cpu_peak_supported(PeakKind kind) {
    const CpuFeatures& f = cpu_features();
    return kind == PeakKind::kFp32Fma ? f.avx512 : f.avx512_bf16;
}

double cpu_peak_run(PeakKind kind, int64_t iterations) {
    EPMOE_HOST_CHECK(cpu_peak_supported(kind), "this CPU lacks the instructions of peak kind ", static_cast<int>(kind));
    return kind == PeakKind::kFp32Fma ? run_fma(iterations) : run_bf16(iterations);
}

}  // namespace epmoe::core
