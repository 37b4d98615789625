// Collects the pybind11 parts of _C. Add one register_* call per subsystem.
#include "cpp/torch/registry.h"
#include "cpp/torch/runtime.h"

namespace epmoe {

void register_python_bindings(pybind11::module_& m) { register_runtime(m); }

}  // namespace epmoe
