# Builds and runs one consumer project of tests/consumer/ against the linen
# under test, in a fresh directory. Run by ctest (tests/CMakeLists.txt) as
#
#   cmake -DKIND=<find_package|find_package_no_msgpack|find_package_dispatch|find_package_compiled|add_subdirectory|fetchcontent>
#         -DLINEN_SOURCE_DIR=<checkout> -DLINEN_BINARY_DIR=<configured build>
#         -DLINEN_VERSION=<x.y.z> -DWORK_DIR=<scratch dir, emptied first>
#         -DGENERATOR=<...> [-DGENERATOR_PLATFORM=] [-DGENERATOR_TOOLSET=]
#         [-DMAKE_PROGRAM=] -DCXX_COMPILER=<...> [-DBUILD_TYPE=<config>]
#         [-DINSTALL_INCLUDEDIR=include -DINSTALL_CMAKEDIR=share/cmake/linen]
#         [-DWARNINGS_AS_ERRORS=ON] [-DPREFIX_PATH=a|b] [-DPACKAGE_DIRS=Eigen3_DIR=...|...]
#         -P run_consumer.cmake
#
#   find_package:     cmake --install <LINEN_BINARY_DIR> --prefix <WORK_DIR>/prefix,
#                     then the consumer finds linen there;
#   find_package_no_msgpack: the same, as on a machine without msgpack-cxx: the
#                     installed package and headers must not mention it, and the
#                     consumer is configured with find_package(msgpack-cxx) and
#                     find_package(msgpack) disabled, yet gets linen::io;
#   find_package_dispatch: the same install; the consumer links linen::dispatch;
#   find_package_compiled: the same install; the consumer links linen::compiled and
#                     compares it with a header-only build (same_bits.cmake);
#   add_subdirectory: the consumer adds <LINEN_SOURCE_DIR> as a subdirectory;
#   fetchcontent:     the library part of <LINEN_SOURCE_DIR> is packed into
#                     <WORK_DIR>/linen-<version>.tar.gz, which the consumer fetches.
# Lists are passed with '|' separators, since ctest splits arguments on ';'.
cmake_minimum_required(VERSION 3.20)

foreach(var IN ITEMS KIND LINEN_SOURCE_DIR LINEN_BINARY_DIR LINEN_VERSION WORK_DIR GENERATOR
                     CXX_COMPILER)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

set(project_dir "${CMAKE_CURRENT_LIST_DIR}/${KIND}")
if(KIND STREQUAL "find_package_no_msgpack")
  set(project_dir "${CMAKE_CURRENT_LIST_DIR}/find_package")
endif()
if(NOT EXISTS "${project_dir}/CMakeLists.txt")
  message(FATAL_ERROR "run_consumer.cmake: no consumer project ${project_dir}")
endif()
set(tag "[consumer_${KIND}]")

# run_step(<what> <command...>) (run_step.cmake): runs a command, stops if it fails.
include("${CMAKE_CURRENT_LIST_DIR}/run_step.cmake")

# Values are written to an initial cache file (cmake -C), so that lists and
# paths with spaces reach the consumer unmangled.
function(cache_set name value)
  string(REPLACE "\\" "\\\\" value "${value}")
  string(REPLACE "\"" "\\\"" value "${value}")
  file(APPEND "${init_cache}" "set(${name} \"${value}\" CACHE STRING \"\" FORCE)\n")
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(init_cache "${WORK_DIR}/init-cache.cmake")
file(WRITE "${init_cache}" "# Written by tests/consumer/run_consumer.cmake\n")

string(REPLACE "|" ";" prefix_path "${PREFIX_PATH}")
string(REPLACE "|" ";" package_dirs "${PACKAGE_DIRS}")

cache_set(CMAKE_CXX_COMPILER "${CXX_COMPILER}")
if(BUILD_TYPE)
  cache_set(CMAKE_BUILD_TYPE "${BUILD_TYPE}")
endif()
if(MAKE_PROGRAM)
  cache_set(CMAKE_MAKE_PROGRAM "${MAKE_PROGRAM}")
endif()
foreach(entry IN LISTS package_dirs)  # Eigen3_DIR=/usr/share/eigen3/cmake
  if(entry MATCHES "^([^=]+)=(.*)$")
    cache_set("${CMAKE_MATCH_1}" "${CMAKE_MATCH_2}")
  endif()
endforeach()
cache_set(LINEN_EXPECTED_VERSION "${LINEN_VERSION}")
cache_set(LINEN_CONSUMER_WARNINGS_AS_ERRORS "${WARNINGS_AS_ERRORS}")

if(BUILD_TYPE)
  set(config_args --config "${BUILD_TYPE}")
else()
  set(config_args "")
endif()

if(KIND MATCHES "^find_package")
  foreach(var IN ITEMS INSTALL_INCLUDEDIR INSTALL_CMAKEDIR)
    if("${${var}}" STREQUAL "")
      message(FATAL_ERROR "run_consumer.cmake: KIND=find_package needs -D${var}=<relative path>")
    endif()
  endforeach()
  set(prefix "${WORK_DIR}/prefix")
  run_step("install the build under test" "${CMAKE_COMMAND}" --install "${LINEN_BINARY_DIR}"
           --prefix "${prefix}" ${config_args})
  foreach(file IN ITEMS "${INSTALL_INCLUDEDIR}/linen/linen.hpp"
                        "${INSTALL_INCLUDEDIR}/linen/version.hpp"
                        "${INSTALL_CMAKEDIR}/linenConfig.cmake"
                        "${INSTALL_CMAKEDIR}/linenConfigVersion.cmake"
                        "${INSTALL_CMAKEDIR}/linenTargets.cmake")
    if(NOT EXISTS "${prefix}/${file}")
      message(FATAL_ERROR "${tag} the install tree lacks ${file}")
    endif()
  endforeach()
  # The build under test was configured with linen::io if it exported it.
  if(EXISTS "${prefix}/${INSTALL_CMAKEDIR}/linenIoTargets.cmake")
    cache_set(LINEN_EXPECT_IO ON)
  else()
    cache_set(LINEN_EXPECT_IO OFF)
  endif()
  if(KIND STREQUAL "find_package_no_msgpack")
    # linen reads msgpack itself: nothing installed may ask for msgpack-cxx (or Boost).
    file(GLOB_RECURSE package_files "${prefix}/${INSTALL_CMAKEDIR}/*.cmake")
    file(GLOB_RECURSE header_files "${prefix}/${INSTALL_INCLUDEDIR}/linen/*.hpp")
    foreach(file IN LISTS package_files header_files)
      if(file MATCHES "[.]cmake$")
        file(STRINGS "${file}" hits REGEX "msgpack-cxx|msgpackc|(find_dependency|find_package)\\(msgpack|Boost")
      else()
        file(STRINGS "${file}" hits REGEX "#[ \t]*include[ \t]*<msgpack|LINEN_HAS_MSGPACK")
      endif()
      if(hits)
        message(FATAL_ERROR "${tag} ${file} still refers to msgpack-cxx: ${hits}")
      endif()
    endforeach()
    if(NOT EXISTS "${prefix}/${INSTALL_CMAKEDIR}/linenIoTargets.cmake")
      message(FATAL_ERROR "${tag} the build under test exported no linen::io")
    endif()
    cache_set(CMAKE_DISABLE_FIND_PACKAGE_msgpack-cxx ON)
    cache_set(CMAKE_DISABLE_FIND_PACKAGE_msgpack ON)
    cache_set(CMAKE_DISABLE_FIND_PACKAGE_Boost ON)
  endif()
  cache_set(LINEN_EXPECTED_PREFIX "${prefix}")
  cache_set(LINEN_EXPECTED_INCLUDEDIR "${prefix}/${INSTALL_INCLUDEDIR}")
  cache_set(CMAKE_PREFIX_PATH "${prefix};${prefix_path}")
elseif(KIND STREQUAL "add_subdirectory")
  cache_set(LINEN_SOURCE_DIR "${LINEN_SOURCE_DIR}")
  if(prefix_path)
    cache_set(CMAKE_PREFIX_PATH "${prefix_path}")
  endif()
elseif(KIND STREQUAL "fetchcontent")
  # A release-style archive: one top-level directory, the library part only.
  set(stage "${WORK_DIR}/stage/linen-${LINEN_VERSION}")
  file(MAKE_DIRECTORY "${stage}")
  file(COPY "${LINEN_SOURCE_DIR}/CMakeLists.txt" "${LINEN_SOURCE_DIR}/LICENSE"
            "${LINEN_SOURCE_DIR}/cmake" "${LINEN_SOURCE_DIR}/include" "${LINEN_SOURCE_DIR}/src"
       DESTINATION "${stage}")
  set(archive "${WORK_DIR}/linen-${LINEN_VERSION}.tar.gz")
  execute_process(COMMAND "${CMAKE_COMMAND}" -E tar czf "${archive}" "linen-${LINEN_VERSION}"
                  WORKING_DIRECTORY "${WORK_DIR}/stage" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${tag} could not pack ${archive}")
  endif()
  file(SHA256 "${archive}" archive_sha256)
  cache_set(LINEN_ARCHIVE "${archive}")
  cache_set(LINEN_ARCHIVE_SHA256 "${archive_sha256}")
  if(prefix_path)
    cache_set(CMAKE_PREFIX_PATH "${prefix_path}")
  endif()
else()
  message(FATAL_ERROR "${tag} unknown KIND '${KIND}'")
endif()

set(generator_args -G "${GENERATOR}")
if(GENERATOR_PLATFORM)
  list(APPEND generator_args -A "${GENERATOR_PLATFORM}")
endif()
if(GENERATOR_TOOLSET)
  list(APPEND generator_args -T "${GENERATOR_TOOLSET}")
endif()

set(build_dir "${WORK_DIR}/build")
run_step("configure" "${CMAKE_COMMAND}" -S "${project_dir}" -B "${build_dir}" ${generator_args}
         -C "${init_cache}")
run_step("build" "${CMAKE_COMMAND}" --build "${build_dir}" ${config_args})
# The consumer registers its program as a ctest test; ctest finds it for any generator.
if(BUILD_TYPE)
  set(ctest_config -C "${BUILD_TYPE}")
else()
  set(ctest_config "")
endif()
run_step("run" "${CMAKE_CTEST_COMMAND}" --test-dir "${build_dir}" ${ctest_config}
         --output-on-failure --no-tests=error)
message(STATUS "${tag} passed")
