# Runs packaging/vcpkg/ports/linen/portfile.cmake outside vcpkg, as vcpkg would run it,
# with the vcpkg helper functions it calls restated below (their documented behaviour,
# reduced to one release configuration), then checks the package tree and builds the
# find_package consumer against it. Run by ctest as packaging_vcpkg_port[_core]:
#
#   cmake -DLINEN_SOURCE_DIR=<checkout> -DWORK_DIR=<scratch> -DGENERATOR=<...>
#         -DCXX_COMPILER=<...> [-DMAKE_PROGRAM=] [-DFEATURES=core|io]
#         [-DPREFIX_PATH=a|b] [-DPACKAGE_DIRS=Eigen3_DIR=...|...] -P vcpkg_port.cmake
#
# vcpkg itself is not reachable from linen's CI machines, so what is tested is the
# port's CMake: the options it passes exist and work, the tree it installs is what
# vcpkg's post-build checks and find_package(linen CONFIG) expect.
cmake_minimum_required(VERSION 3.20)

foreach(var IN ITEMS LINEN_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "vcpkg_port.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT FEATURES)
  set(FEATURES io)
endif()
set(tag "[packaging_vcpkg_port ${FEATURES}]")

set(port_dir "${LINEN_SOURCE_DIR}/packaging/vcpkg/ports/linen")
file(READ "${port_dir}/vcpkg.json" manifest)
string(JSON PORT GET "${manifest}" name)
string(JSON VERSION GET "${manifest}" version-semver)
file(STRINGS "${LINEN_SOURCE_DIR}/include/linen/version.hpp" version_lines REGEX "#define LINEN_VERSION_(MAJOR|MINOR|PATCH) ")
set(header_version "")
foreach(line IN LISTS version_lines)
  string(REGEX REPLACE ".* ([0-9]+)$" "\\1" n "${line}")
  list(APPEND header_version "${n}")
endforeach()
list(JOIN header_version "." header_version)
if(NOT VERSION STREQUAL header_version)
  message(FATAL_ERROR "${tag} vcpkg.json says version ${VERSION}, include/linen/version.hpp says ${header_version}")
endif()
# Every dependency the io feature names must be one the port really needs.
string(JSON io_deps GET "${manifest}" features io dependencies)
string(JSON n_io_deps LENGTH "${io_deps}")
if(NOT n_io_deps EQUAL 2)
  message(FATAL_ERROR "${tag} feature io should depend on nlohmann-json and zstd: ${io_deps}")
endif()

# Every LINEN_* option the port passes must be one linen defines.
include("${CMAKE_CURRENT_LIST_DIR}/recipe_options.cmake")
linen_check_recipe_options("${port_dir}/portfile.cmake")

file(REMOVE_RECURSE "${WORK_DIR}")
set(CURRENT_PACKAGES_DIR "${WORK_DIR}/packages/${PORT}_x64-linux")
set(CURRENT_BUILDTREES_DIR "${WORK_DIR}/buildtrees/${PORT}")
string(REPLACE "|" ";" prefix_path "${PREFIX_PATH}")
string(REPLACE "|" ";" package_dirs "${PACKAGE_DIRS}")
if(FEATURES STREQUAL "core")
  set(FEATURES core)
else()
  set(FEATURES core io)
endif()

include("${CMAKE_CURRENT_LIST_DIR}/../consumer/run_step.cmake")

# ---- vcpkg's helpers, restated (vcpkg/scripts/cmake, ports/vcpkg-cmake*) ----
function(vcpkg_check_features)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "OUT_FEATURE_OPTIONS" "FEATURES;INVERTED_FEATURES")
  set(options "")
  list(LENGTH arg_FEATURES n)
  math(EXPR last "${n} - 1")
  foreach(i RANGE 0 ${last} 2)
    math(EXPR j "${i} + 1")
    list(GET arg_FEATURES ${i} feature)
    list(GET arg_FEATURES ${j} option)
    if(feature IN_LIST FEATURES)
      list(APPEND options "-D${option}=ON")
    else()
      list(APPEND options "-D${option}=OFF")
    endif()
  endforeach()
  set(${arg_OUT_FEATURE_OPTIONS} "${options}" PARENT_SCOPE)
endfunction()

function(vcpkg_cmake_configure)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "SOURCE_PATH" "OPTIONS;OPTIONS_RELEASE;OPTIONS_DEBUG")
  set(args -S "${arg_SOURCE_PATH}" -B "${CURRENT_BUILDTREES_DIR}/x64-linux-rel" -G "${GENERATOR}"
           "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DCMAKE_BUILD_TYPE=Release
           "-DCMAKE_INSTALL_PREFIX=${CURRENT_PACKAGES_DIR}")
  if(MAKE_PROGRAM)
    list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  if(prefix_path)
    list(JOIN prefix_path "\\;" joined)
    list(APPEND args "-DCMAKE_PREFIX_PATH=${joined}")
  endif()
  foreach(entry IN LISTS package_dirs)
    list(APPEND args "-D${entry}")
  endforeach()
  run_step("vcpkg_cmake_configure" "${CMAKE_COMMAND}" ${args} ${arg_OPTIONS} ${arg_OPTIONS_RELEASE})
endfunction()

function(vcpkg_cmake_install)
  run_step("vcpkg_cmake_install (build)" "${CMAKE_COMMAND}" --build "${CURRENT_BUILDTREES_DIR}/x64-linux-rel")
  run_step("vcpkg_cmake_install" "${CMAKE_COMMAND}" --install "${CURRENT_BUILDTREES_DIR}/x64-linux-rel")
endfunction()

# Moves CONFIG_PATH to share/<PACKAGE_NAME> (here the port installs it there already).
function(vcpkg_cmake_config_fixup)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "PACKAGE_NAME;CONFIG_PATH" "")
  if(NOT EXISTS "${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH}/${arg_PACKAGE_NAME}Config.cmake")
    message(FATAL_ERROR "${tag} vcpkg_cmake_config_fixup: no ${arg_CONFIG_PATH}/${arg_PACKAGE_NAME}Config.cmake")
  endif()
  if(NOT arg_CONFIG_PATH STREQUAL "share/${arg_PACKAGE_NAME}")
    file(RENAME "${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH}" "${CURRENT_PACKAGES_DIR}/share/${arg_PACKAGE_NAME}")
  endif()
endfunction()

# vcpkg rewrites absolute prefixes in .pc files: there must be none.
function(vcpkg_fixup_pkgconfig)
  file(GLOB_RECURSE pcs "${CURRENT_PACKAGES_DIR}/*.pc")
  if(NOT pcs)
    message(FATAL_ERROR "${tag} vcpkg_fixup_pkgconfig: the package has no .pc file")
  endif()
  foreach(pc IN LISTS pcs)
    file(READ "${pc}" text)
    string(FIND "${text}" "${CURRENT_PACKAGES_DIR}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "${tag} ${pc} names the packages directory: not relocatable")
    endif()
  endforeach()
endfunction()

function(vcpkg_install_copyright)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "" "FILE_LIST")
  file(MAKE_DIRECTORY "${CURRENT_PACKAGES_DIR}/share/${PORT}")
  file(READ "${arg_FILE_LIST}" text)
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright" "${text}")
endfunction()

# ---- the port ---------------------------------------------------------------
include("${port_dir}/portfile.cmake")  # CMAKE_CURRENT_LIST_DIR is the port's there

# ---- vcpkg's post-build checks that apply, and the consumer -------------------
foreach(file IN ITEMS include/linen/linen.hpp share/${PORT}/linenConfig.cmake share/${PORT}/linenTargets.cmake
                      share/${PORT}/copyright share/${PORT}/usage share/pkgconfig/linen.pc)
  if(NOT EXISTS "${CURRENT_PACKAGES_DIR}/${file}")
    message(FATAL_ERROR "${tag} the package lacks ${file}")
  endif()
endforeach()
if(EXISTS "${CURRENT_PACKAGES_DIR}/debug")
  message(FATAL_ERROR "${tag} a release-only port left a debug/ directory")
endif()
set(has_io FALSE)
if(EXISTS "${CURRENT_PACKAGES_DIR}/share/${PORT}/linenIoTargets.cmake")
  set(has_io TRUE)
endif()
if("io" IN_LIST FEATURES AND NOT has_io)
  message(FATAL_ERROR "${tag} feature io installed no linen::io")
elseif(NOT "io" IN_LIST FEATURES AND has_io)
  message(FATAL_ERROR "${tag} without feature io the package still exports linen::io")
endif()

set(init_cache "${WORK_DIR}/consumer-init.cmake")
file(WRITE "${init_cache}" "set(CMAKE_CXX_COMPILER \"${CXX_COMPILER}\" CACHE STRING \"\")\n")
file(APPEND "${init_cache}" "set(CMAKE_PREFIX_PATH \"${CURRENT_PACKAGES_DIR};${prefix_path}\" CACHE STRING \"\")\n")
file(APPEND "${init_cache}" "set(LINEN_EXPECTED_VERSION \"${VERSION}\" CACHE STRING \"\")\n")
file(APPEND "${init_cache}" "set(LINEN_EXPECTED_PREFIX \"${CURRENT_PACKAGES_DIR}\" CACHE STRING \"\")\n")
file(APPEND "${init_cache}" "set(LINEN_EXPECTED_INCLUDEDIR \"${CURRENT_PACKAGES_DIR}/include\" CACHE STRING \"\")\n")
file(APPEND "${init_cache}" "set(LINEN_EXPECT_IO ${has_io} CACHE STRING \"\")\n")
if(MAKE_PROGRAM)
  file(APPEND "${init_cache}" "set(CMAKE_MAKE_PROGRAM \"${MAKE_PROGRAM}\" CACHE STRING \"\")\n")
endif()
foreach(entry IN LISTS package_dirs)
  if(entry MATCHES "^([^=]+)=(.*)$")
    file(APPEND "${init_cache}" "set(${CMAKE_MATCH_1} \"${CMAKE_MATCH_2}\" CACHE STRING \"\")\n")
  endif()
endforeach()
set(consumer "${LINEN_SOURCE_DIR}/tests/consumer/find_package")
run_step("consumer configure" "${CMAKE_COMMAND}" -S "${consumer}" -B "${WORK_DIR}/consumer" -G "${GENERATOR}"
         -C "${init_cache}")
run_step("consumer build" "${CMAKE_COMMAND}" --build "${WORK_DIR}/consumer")
run_step("consumer run" "${CMAKE_CTEST_COMMAND}" --test-dir "${WORK_DIR}/consumer" --output-on-failure --no-tests=error)
message(STATUS "${tag} passed")
