// The _C extension: the pybind11 module and the root of the TORCH_LIBRARY(epmoe) op library.
// Each op file adds its schemas with TORCH_LIBRARY_FRAGMENT(epmoe, m) next to its CPU impl, and registers CUDA
// impls from cpp/torch/cuda/ (compiled only against a CUDA build of torch).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpp/torch/registry.h"

namespace py = pybind11;

TORCH_LIBRARY(epmoe, m) {}

PYBIND11_MODULE(_C, m) {
    m.doc() = "epmoe native extension (ops are under torch.ops.epmoe)";
    m.def("has_cuda_kernels", []() {
#ifdef EPMOE_WITH_CUDA
        return true;
#else
        return false;
#endif
    }, "True when this build compiled and registered the CUDA kernels.");
    m.def("build_info", []() {
        py::dict info;
        info["torch_version"] = EPMOE_TORCH_VERSION;
        info["cuda_archs"] = EPMOE_CUDA_ARCHS_STR;
#ifdef EPMOE_WITH_CUDA
        info["cuda"] = true;
#else
        info["cuda"] = false;
#endif
#ifdef EPMOE_WITH_NCCL
        info["nccl"] = true;
#else
        info["nccl"] = false;
#endif
        return info;
    }, "What this build was compiled against.");
    epmoe::register_python_bindings(m);
}
