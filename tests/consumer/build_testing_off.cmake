# Configures linen (top level) with BUILD_TESTING=OFF, CMake's standard switch, and
# checks that it defines no test of its own; run by ctest as consumer_build_testing_off:
#
#   cmake -DLINEN_SOURCE_DIR=<checkout> -DWORK_DIR=<scratch dir> -DGENERATOR=<...>
#         -DCXX_COMPILER=<...> [-DMAKE_PROGRAM=] [-DPREFIX_PATH=a|b]
#         [-DPACKAGE_DIRS=Eigen3_DIR=...|...] -P build_testing_off.cmake
cmake_minimum_required(VERSION 3.20)

foreach(var IN ITEMS LINEN_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "build_testing_off.cmake: -D${var}=... is required")
  endif()
endforeach()
set(tag "[consumer_build_testing_off]")

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(args -S "${LINEN_SOURCE_DIR}" -B "${WORK_DIR}" -G "${GENERATOR}"
         "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DBUILD_TESTING=OFF
         -DLINEN_BUILD_EXAMPLES=OFF -DLINEN_BUILD_BENCHMARKS=OFF -DLINEN_INSTALL=OFF)
if(MAKE_PROGRAM)
  list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(PREFIX_PATH)
  string(REPLACE "|" "\\;" prefix_path "${PREFIX_PATH}")
  list(APPEND args "-DCMAKE_PREFIX_PATH=${prefix_path}")
endif()
string(REPLACE "|" ";" package_dirs "${PACKAGE_DIRS}")
foreach(entry IN LISTS package_dirs)
  list(APPEND args "-D${entry}")
endforeach()

execute_process(COMMAND "${CMAKE_COMMAND}" ${args} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${tag} configuring linen with BUILD_TESTING=OFF failed (exit ${rc})")
endif()
file(STRINGS "${WORK_DIR}/CMakeCache.txt" cached REGEX "^LINEN_BUILD_TESTS:")
if(NOT cached MATCHES "=OFF$")
  message(FATAL_ERROR "${tag} LINEN_BUILD_TESTS is '${cached}' with BUILD_TESTING=OFF, want OFF")
endif()
execute_process(COMMAND "${CMAKE_CTEST_COMMAND}" --test-dir "${WORK_DIR}" -N
                OUTPUT_VARIABLE listed RESULT_VARIABLE rc)
if(NOT listed MATCHES "Total Tests: 0")
  message(FATAL_ERROR "${tag} linen defined tests with BUILD_TESTING=OFF:\n${listed}")
endif()
message(STATUS "${tag} passed: no tests with BUILD_TESTING=OFF")
