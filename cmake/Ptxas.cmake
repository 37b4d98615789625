# nvcc flags for the torch-free kernels: one -gencode per entry of EPMOE_CUDA_ARCHS, ptxas resource usage in
# the build log, and spills / local-memory use turned into errors unless the source is allow-listed.
function(epmoe_gencode_flags out_var)
    set(_flags "")
    foreach(_arch IN LISTS EPMOE_CUDA_ARCHS)
        list(APPEND _flags "-gencode=arch=compute_${_arch},code=sm_${_arch}")
    endforeach()
    set(${out_var} "${_flags}" PARENT_SCOPE)
endfunction()

# epmoe_ptxas_checks(<sources...>): ptxas -v everywhere; -Werror on spills and local memory except for the
# files listed in EPMOE_SPILL_ALLOWLIST (relative to the source folder).
function(epmoe_ptxas_checks)
    foreach(_src IN LISTS ARGN)
        file(RELATIVE_PATH _rel "${PROJECT_SOURCE_DIR}" "${_src}")
        if(_rel IN_LIST EPMOE_SPILL_ALLOWLIST)
            set_source_files_properties("${_src}" PROPERTIES COMPILE_OPTIONS "-Xptxas=-v")
        else()
            set_source_files_properties("${_src}" PROPERTIES COMPILE_OPTIONS
                                        "-Xptxas=-v;-Xptxas=-warn-spills;-Xptxas=-warn-lmem-usage;-Xptxas=-Werror")
        endif()
    endforeach()
endfunction()
