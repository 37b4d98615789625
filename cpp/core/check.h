// Check macros shared by host C++ (g++) and CUDA (nvcc) code. They throw epmoe::Error and never exit
// the process; the torch layer turns the exception into a Python RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace epmoe {

class Error : public std::runtime_error {
  public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
template <typename... Args>
[[noreturn]] inline void throw_error(const char* kind, const char* file, int line, const char* expr, const Args&... args) {
    std::ostringstream os;
    os << "epmoe " << kind << " failed: " << expr << " (" << file << ":" << line << ")";
    if constexpr (sizeof...(Args) > 0) {
        os << ": ";
        (os << ... << args);
    }
    throw Error(os.str());
}
}  // namespace detail

}  // namespace epmoe

// EPMOE_HOST_CHECK(cond, "message parts", ...): throws epmoe::Error when cond is false.
#define EPMOE_HOST_CHECK(cond, ...)                                                             \
    do {                                                                                        \
        if (!(cond)) ::epmoe::detail::throw_error("check", __FILE__, __LINE__, #cond, ##__VA_ARGS__); \
    } while (0)

#if defined(__CUDACC__) || defined(EPMOE_WITH_CUDA)
#include <cuda_runtime_api.h>

// EPMOE_CUDA_CHECK(cudaCall(...)): throws with the CUDA error name and string.
#define EPMOE_CUDA_CHECK(expr)                                                                             \
    do {                                                                                                   \
        cudaError_t epmoe_err_ = (expr);                                                                   \
        if (epmoe_err_ != cudaSuccess)                                                                     \
            ::epmoe::detail::throw_error("CUDA call", __FILE__, __LINE__, #expr, cudaGetErrorName(epmoe_err_), \
                                         ": ", cudaGetErrorString(epmoe_err_));                            \
    } while (0)

// EPMOE_LAUNCH_CHECK(): call right after every kernel launch.
#define EPMOE_LAUNCH_CHECK() EPMOE_CUDA_CHECK(cudaGetLastError())
#endif

#if defined(EPMOE_WITH_NCCL)
#include <nccl.h>

// EPMOE_NCCL_CHECK(ncclCall(...)): throws with NCCL's error string.
#define EPMOE_NCCL_CHECK(expr)                                                                    \
    do {                                                                                          \
        ncclResult_t epmoe_res_ = (expr);                                                         \
        if (epmoe_res_ != ncclSuccess)                                                            \
            ::epmoe::detail::throw_error("NCCL call", __FILE__, __LINE__, #expr, ncclGetErrorString(epmoe_res_)); \
    } while (0)
#endif
