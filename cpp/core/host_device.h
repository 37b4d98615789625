// EPMOE_HD: a function of cpp/core compiled for host and device (always inlined under nvcc, so that device code
// keeps its state in registers), plain `inline` in host-only builds.
#pragma once

#if defined(__CUDACC__)
#define EPMOE_HD __host__ __device__ __forceinline__
#else
#define EPMOE_HD inline
#endif
