# Locates torch through the Python interpreter that will import epmoe (never by asking for a GPU).
# Sets: EPMOE_TORCH_VERSION, EPMOE_TORCH_CUDA (CUDA version, empty for a CPU build), EPMOE_TORCH_INCLUDE_DIRS,
#       EPMOE_TORCH_LIB_DIR, EPMOE_TORCH_CXX11_ABI, EPMOE_SITE_PACKAGES; interface target epmoe::torch.
set(_torch_cmake "${CMAKE_BINARY_DIR}/torch_from_python.cmake")
execute_process(
    COMMAND "${Python_EXECUTABLE}" -c [=[
import os, sys
import torch
from torch.utils import cpp_extension as ce
root = os.path.dirname(torch.__file__)
values = {
    "EPMOE_TORCH_VERSION": torch.__version__,
    "EPMOE_TORCH_CUDA": torch.version.cuda or "",
    "EPMOE_TORCH_INCLUDE_DIRS": ";".join(ce.include_paths()),
    "EPMOE_TORCH_LIB_DIR": os.path.join(root, "lib"),
    "EPMOE_TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
    "EPMOE_SITE_PACKAGES": os.path.dirname(root),
}
with open(sys.argv[1], "w") as f:
    for key, value in values.items():
        f.write(f'set({key} "{value}")\n')
]=] "${_torch_cmake}"
    RESULT_VARIABLE _torch_rc
    ERROR_VARIABLE _torch_err)
if(NOT _torch_rc EQUAL 0)
    message(FATAL_ERROR "epmoe: cannot import torch with ${Python_EXECUTABLE}:\n${_torch_err}")
endif()
include("${_torch_cmake}")

# Link the libraries themselves, not ${TORCH_LIBRARIES}: its CUDA list names an nvrtc library that a minimal
# toolkit lacks.
add_library(epmoe_torch INTERFACE)
add_library(epmoe::torch ALIAS epmoe_torch)
target_include_directories(epmoe_torch SYSTEM INTERFACE ${EPMOE_TORCH_INCLUDE_DIRS})
target_compile_definitions(epmoe_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${EPMOE_TORCH_CXX11_ABI}
                                                  TORCH_API_INCLUDE_EXTENSION_H TORCH_EXTENSION_NAME=_C)
target_link_directories(epmoe_torch INTERFACE "${EPMOE_TORCH_LIB_DIR}")
target_link_libraries(epmoe_torch INTERFACE torch torch_cpu torch_python c10)
