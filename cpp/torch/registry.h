// pybind11 registration hooks of the non-op parts of _C (e.g. the EP runtime), called from module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace epmoe {

void register_python_bindings(pybind11::module_& m);

}  // namespace epmoe
