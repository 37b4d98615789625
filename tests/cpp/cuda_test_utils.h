// Helpers for the GPU gtests: skip without a device, typed device buffers.
#pragma once

#ifdef EPMOE_WITH_CUDA
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpp/core/check.h"

// GTEST_SKIP()s the calling test when no CUDA device is usable (cudaGetDeviceCount fails or returns 0); with
// EPMOE_REQUIRE_CUDA=1 (the GPU check) it fails instead, with CUDA's reason.
#define EPMOE_SKIP_IF_NO_GPU()                                                                              \
    do {                                                                                                    \
        int epmoe_num_devices_ = 0;                                                                         \
        const cudaError_t epmoe_err_ = cudaGetDeviceCount(&epmoe_num_devices_);                             \
        if (epmoe_err_ != cudaSuccess || epmoe_num_devices_ == 0) {                                         \
            (void)cudaGetLastError();                                                                       \
            const char* epmoe_require_ = std::getenv("EPMOE_REQUIRE_CUDA");                                 \
            if (epmoe_require_ != nullptr && std::string(epmoe_require_) == "1") {                          \
                GTEST_FAIL() << "EPMOE_REQUIRE_CUDA=1 but no CUDA device: " << cudaGetErrorString(epmoe_err_); \
            }                                                                                               \
            GTEST_SKIP() << "no CUDA device";                                                               \
        }                                                                                                   \
    } while (0)

namespace epmoe::test {

// Device copy of a host vector; freed on destruction.
template <typename T>
class DeviceBuffer {
  public:
    explicit DeviceBuffer(size_t n) : n_(n) {
        EPMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), (n ? n : 1) * sizeof(T)));
    }
    explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
        EPMOE_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
    }
    ~DeviceBuffer() { cudaFree(ptr_); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    T* get() const { return ptr_; }
    std::vector<T> to_host() const {
        std::vector<T> host(n_);
        EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
        EPMOE_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
        return host;
    }

  private:
    T* ptr_ = nullptr;
    size_t n_;
};

}  // namespace epmoe::test
#endif
