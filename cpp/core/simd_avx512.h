// AVX-512 building blocks of the CPU micro-kernels (included by the kernel .cpp files only). Every function has
// the AVX-512 target attribute and internal linkage, so no copy of them can end up called on a CPU without it.
#pragma once

// GCC 12 reports its own AVX-512 intrinsics (the _mm512_undefined_* they start from) as uninitialized reads;
// silence that false positive for the kernel files, which include this header before anything else reaches it.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#define EPMOE_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define EPMOE_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace epmoe::core {
namespace {

// exp(x), the operation sequence of exp_fp32 (fp_math.h) on 16 lanes; NaN stays NaN.
EPMOE_TARGET_AVX512 inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-120.0f), x);  // max/min return the second operand on NaN
    x = _mm512_min_ps(_mm512_set1_ps(90.0f), x);
    const __m512 shifter = _mm512_set1_ps(12582912.0f);
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter);
    const __m512 n = _mm512_sub_ps(t, shifter);
    const __m512i n_int = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000));
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187045e-06f), r);
    __m512 poly = _mm512_set1_ps(1.0f / 5040.0f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 720.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    const __m512i n_lo = _mm512_srai_epi32(n_int, 1);
    const __m512i n_hi = _mm512_sub_epi32(n_int, n_lo);
    const __m512i bias = _mm512_set1_epi32(127);
    const __m512 s_lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n_lo, bias), 23));
    const __m512 s_hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n_hi, bias), 23));
    return _mm512_mul_ps(_mm512_mul_ps(poly, s_lo), s_hi);
}

// silu(gate) * up = gate / (1 + exp(-gate)) * up.
EPMOE_TARGET_AVX512 inline __m512 swiglu_ps(__m512 gate, __m512 up) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate));
    return _mm512_mul_ps(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), up);
}

// fp32 -> bf16 bits (round to nearest even, NaN -> 0x7fc0, like float_to_bf16) in the low 16 bits of each lane.
EPMOE_TARGET_AVX512 inline __m512i round_bf16_epi32(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0));
}

// In-register transpose of 16 x 16 32-bit words: rows[i] lane j -> rows[j] lane i.
EPMOE_TARGET_AVX512 inline void transpose16(__m512i (&rows)[16]) {
    __m512i t[16], u[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
    }
    // u[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // 4 x 4 transpose of 128-bit lanes
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
        const __m512i s0 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i s1 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i s2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i s3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
        rows[c] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(2, 0, 2, 0));
        rows[4 + c] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(3, 1, 3, 1));
        rows[8 + c] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(2, 0, 2, 0));
        rows[12 + c] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

}  // namespace
}  // namespace epmoe::core
