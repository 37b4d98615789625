// What the CPU we run on can execute, detected once at run time (cpuid through the compiler's builtins). The
// library is compiled for the baseline x86-64 ISA; functions that use AVX-512 carry per-function target
// attributes and are called only when these flags say the instructions exist.
#pragma once

namespace epmoe::core {

struct CpuFeatures {
    bool avx512 = false;       // AVX-512 F/BW/VL/DQ and FMA: the fp32 micro-kernels
    bool avx512_bf16 = false;  // + AVX512_BF16 (vdpbf16ps): the bf16 micro-kernels
    bool amx_bf16 = false;     // AMX-BF16 tiles usable by this process (the OS granted the tile state)
};

// Detected on first use; the same object for the life of the process.
const CpuFeatures& cpu_features();

}  // namespace epmoe::core
