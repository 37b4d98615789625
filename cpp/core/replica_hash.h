// Replica choice "hash" (EPLB): the replica of (token t, top-k position j) in layer l is floor(h * logcnt[e] / 2^32)
// with h = hash32(t, j, l) a 32-bit mix of the global token index, so every rank that routes a token picks the
// same slot and each replica of an expert gets an expected 1 / logcnt share of its tokens. Torch-free, host and
// device: the CPU op (cpp/torch/replica_hash.cpp), the CUDA kernel (cuda/replica_hash.cu) and the Python reference
// (epmoe.eplb.hash32) compute the same integers.
#pragma once

#include <cstdint>

#include "cpp/core/host_device.h"

namespace epmoe::core {

// 32-bit avalanche mix (two multiply-xorshift rounds) of x in [0, 2^32).
EPMOE_HD uint64_t mix32(uint64_t x) {
    x ^= x >> 16;
    x = (x * 0x7FEB352Dull) & 0xFFFFFFFFull;
    x ^= x >> 15;
    x = (x * 0x5BD1E995ull) & 0xFFFFFFFFull;
    return x ^ (x >> 16);
}

// h in [0, 2^32) of (global token index, top-k position, layer); the token index is taken modulo 2^32.
EPMOE_HD uint64_t replica_hash32(int64_t token, int64_t slot, int64_t layer) {
    const uint64_t salt =
        mix32((static_cast<uint64_t>(slot) * 0x1E3779B9ull + static_cast<uint64_t>(layer & 0xFFFF) * 0x10001ull + 1) &
              0xFFFFFFFFull);
    return mix32((static_cast<uint64_t>(token) & 0xFFFFFFFFull) ^ salt);
}

// The replica index in [0, count) for hash h (multiply-shift: uniform for any count < 2^31).
EPMOE_HD int64_t replica_of(uint64_t h, int64_t count) {
    return static_cast<int64_t>((h * static_cast<uint64_t>(count)) >> 32);
}

}  // namespace epmoe::core
