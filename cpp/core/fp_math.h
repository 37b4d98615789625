// Scalar fp32 helpers shared by the CPU kernels: bit casts, a branch-free exp, 16-bit float conversions. Written
// so that g++ vectorises loops calling them (no branches, explicit fmaf), whatever the ISA of the caller.
#pragma once

#include <cmath>
#include <cstdint>

namespace epmoe::core {

inline float as_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t as_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// exp(x) in fp32, within 1 ulp over the whole range; NaN -> NaN, -inf -> 0, +inf -> inf. Branch-free so that
// g++ vectorises the loops that call it. cuda/route.cu evaluates the identical sequence.
inline float exp_fp32(float x) {
    x = x < -120.0f ? -120.0f : x;  // comparisons keep NaN
    x = x > 90.0f ? 90.0f : x;
    // t = x*log2(e) rounded to an integer by the 1.5*2^23 shifter; n's bits sit in t's low mantissa
    const float t = fmaf(x, 1.44269504088896341f, 12582912.0f);
    const float n = t - 12582912.0f;
    const int32_t n_int = static_cast<int32_t>(as_bits(t) - 0x4B400000u);
    float r = fmaf(n, -0.693145751953125f, x);  // ln2 split into an exact high part and a low part
    r = fmaf(n, -1.428606765330187045e-06f, r);
    float poly = 1.0f / 5040.0f;  // Taylor series of exp(r), |r| <= ln2/2
    poly = fmaf(poly, r, 1.0f / 720.0f);
    poly = fmaf(poly, r, 1.0f / 120.0f);
    poly = fmaf(poly, r, 1.0f / 24.0f);
    poly = fmaf(poly, r, 1.0f / 6.0f);
    poly = fmaf(poly, r, 0.5f);
    poly = fmaf(poly, r, 1.0f);
    poly = fmaf(poly, r, 1.0f);
    // 2^n as two normal factors, so that results in the subnormal range round once
    const int32_t n_lo = n_int >> 1, n_hi = n_int - n_lo;
    return poly * as_float(static_cast<uint32_t>(n_lo + 127) << 23) * as_float(static_cast<uint32_t>(n_hi + 127) << 23);
}

inline float bf16_to_float(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

// Exact IEEE half -> float, subnormals and NaN payloads included, branch-free.
inline float fp16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp_mant = h & 0x7fffu;
    // Normal and subnormal halves: shift into place, then rebias by 2^(127 - 15) (exact)
    const float finite = as_float(exp_mant << 13) * 0x1p112f;
    const uint32_t special = 0x7f800000u | ((exp_mant & 0x3ffu) << 13);
    return as_float(sign | (exp_mant >= 0x7c00u ? special : as_bits(finite)));
}

// fp32 -> bf16 bits, round to nearest even; NaN -> quiet NaN 0x7fc0 (as c10::BFloat16).
inline uint16_t float_to_bf16(float f) {
    const uint32_t u = as_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

// fp32 -> fp16 bits, round to nearest even (the compiler's IEEE conversion; F16C where the ISA has it).
inline uint16_t float_to_fp16(float f) { return __builtin_bit_cast(uint16_t, static_cast<_Float16>(f)); }

}  // namespace epmoe::core
