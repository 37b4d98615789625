# GoogleTest for epmoe_cpp_tests where no installed package is found (find_package(GTest) failed): built from a
# GoogleTest source tree named by EPMOE_GTEST_SOURCE_DIR (CMake or environment variable; default:
# third_party/googletest-src, where `scripts/gpu_check.sh --prepare DIR` copies one, e.g. Debian's
# /usr/src/googletest). The tree may be the repository root (googletest/ and googlemock/ inside) or its googletest/
# folder. Nothing of GoogleTest is kept in this repository: this file is only the glue.
# Defines GTest::gtest and GTest::gtest_main when it succeeds; sets EPMOE_GTEST_SOURCE to what was used.
set(EPMOE_GTEST_SOURCE_DIR "$ENV{EPMOE_GTEST_SOURCE_DIR}" CACHE PATH "GoogleTest source tree (fallback)")
set(_gtest_dir "${EPMOE_GTEST_SOURCE_DIR}")
if(_gtest_dir STREQUAL "" AND EXISTS "${PROJECT_SOURCE_DIR}/third_party/googletest-src")
    set(_gtest_dir "${PROJECT_SOURCE_DIR}/third_party/googletest-src")
endif()
set(EPMOE_GTEST_SOURCE "not found (install libgtest-dev or set EPMOE_GTEST_SOURCE_DIR)")
if(NOT _gtest_dir STREQUAL "")
    if(EXISTS "${_gtest_dir}/googletest/src/gtest-all.cc")
        set(_gtest_root "${_gtest_dir}")  # repository root: builds googletest only
    elseif(EXISTS "${_gtest_dir}/src/gtest-all.cc")
        set(_gtest_root "${_gtest_dir}")
        if(NOT DEFINED GOOGLETEST_VERSION)
            set(GOOGLETEST_VERSION 1.0.0)  # the googletest/ folder alone expects its parent to set it
        endif()
    else()
        message(FATAL_ERROR "EPMOE_GTEST_SOURCE_DIR=${_gtest_dir} holds no GoogleTest sources "
                            "(neither googletest/src/gtest-all.cc nor src/gtest-all.cc)")
    endif()
    set(BUILD_GMOCK OFF CACHE BOOL "" FORCE)
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    set(gtest_force_shared_crt ON CACHE BOOL "" FORCE)
    # Older GoogleTest releases declare a minimum CMake version that CMake 4 no longer accepts.
    set(CMAKE_POLICY_VERSION_MINIMUM 3.5)
    add_subdirectory("${_gtest_root}" "${CMAKE_BINARY_DIR}/googletest" EXCLUDE_FROM_ALL SYSTEM)
    foreach(_lib gtest gtest_main)
        if(NOT TARGET GTest::${_lib})
            add_library(GTest::${_lib} ALIAS ${_lib})
        endif()
    endforeach()
    set(EPMOE_GTEST_SOURCE "built from source (${_gtest_root})")
endif()
