# A consumer that knows only pkg-config: installs the build under test into a fresh
# prefix, then compiles tests/consumer/main.cpp with `pkg-config --cflags linen` and
# tests/consumer/pkg_config/io_main.cpp with `pkg-config --cflags --libs linen-io`, with
# the compiler alone (no CMake package), and runs both. Run by ctest as
# consumer_pkg_config:
#
#   cmake -DLINEN_BINARY_DIR=<configured build> -DLINEN_VERSION=<x.y.z>
#         -DWORK_DIR=<scratch dir, emptied first> -DCXX_COMPILER=<...>
#         -DPKG_CONFIG=<pkg-config executable> -DINSTALL_PKGCONFIGDIR=share/pkgconfig
#         -DINSTALL_INCLUDEDIR=include [-DEXPECT_IO=ON]
#         [-DINSTALL_LIB_PKGCONFIGDIR=lib/pkgconfig -DEXPECT_DISPATCH=1 -DEXPECT_COMPILED=1]
#         -P pkg_config.cmake
# With EXPECT_DISPATCH it also builds tests/consumer/find_package_dispatch/main.cpp with
# `pkg-config --cflags --libs linen-dispatch`, with EXPECT_COMPILED
# tests/consumer/find_package_compiled/main.cpp with `... linen-compiled`, and runs them
# (those .pc files are under the library directory, INSTALL_LIB_PKGCONFIGDIR).
cmake_minimum_required(VERSION 3.20)

foreach(var IN ITEMS LINEN_BINARY_DIR LINEN_VERSION WORK_DIR CXX_COMPILER PKG_CONFIG
                     INSTALL_PKGCONFIGDIR INSTALL_INCLUDEDIR)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "pkg_config.cmake: -D${var}=... is required")
  endif()
endforeach()
set(tag "[consumer_pkg_config]")

function(run_step what out_var)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "${tag} ${what}: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${tag} ${what} failed (exit ${rc}): ${shown}\n${out}\n${err}")
  endif()
  if(out)
    message(STATUS "${tag}   ${out}")
  endif()
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
# Installed, then moved: the .pc files must find their prefix from where they are.
set(install_prefix "${WORK_DIR}/installed")
set(prefix "${WORK_DIR}/moved prefix")
run_step("install the build under test" ignored "${CMAKE_COMMAND}" --install "${LINEN_BINARY_DIR}"
         --prefix "${install_prefix}")
file(RENAME "${install_prefix}" "${prefix}")

set(pcdir "${prefix}/${INSTALL_PKGCONFIGDIR}")
if(NOT EXISTS "${pcdir}/linen.pc")
  message(FATAL_ERROR "${tag} the install tree lacks ${INSTALL_PKGCONFIGDIR}/linen.pc")
endif()
# The install's .pc files first, then the system's (eigen3, nlohmann_json, libzstd).
set(install_pcdirs "${pcdir}")
if(INSTALL_LIB_PKGCONFIGDIR)
  string(APPEND install_pcdirs ":${prefix}/${INSTALL_LIB_PKGCONFIGDIR}")
endif()
if(DEFINED ENV{PKG_CONFIG_PATH} AND NOT "$ENV{PKG_CONFIG_PATH}" STREQUAL "")
  set(ENV{PKG_CONFIG_PATH} "${install_pcdirs}:$ENV{PKG_CONFIG_PATH}")
else()
  set(ENV{PKG_CONFIG_PATH} "${install_pcdirs}")
endif()

run_step("version" version "${PKG_CONFIG}" --modversion linen)
if(NOT version STREQUAL LINEN_VERSION)
  message(FATAL_ERROR "${tag} pkg-config says linen ${version}, the build is ${LINEN_VERSION}")
endif()
run_step("cflags" cflags "${PKG_CONFIG}" --cflags linen)
separate_arguments(cflags_list UNIX_COMMAND "${cflags}")
# The include directory must be the moved install tree's.
set(found_include FALSE)
foreach(flag IN LISTS cflags_list)
  if(flag MATCHES "^-I(.*)$")
    get_filename_component(dir "${CMAKE_MATCH_1}" REALPATH)
    if(EXISTS "${dir}/linen/linen.hpp")
      get_filename_component(want "${prefix}/${INSTALL_INCLUDEDIR}" REALPATH)
      if(NOT dir STREQUAL want)
        message(FATAL_ERROR "${tag} linen's headers come from ${dir}, not the install tree ${want}")
      endif()
      set(found_include TRUE)
    endif()
  endif()
endforeach()
if(NOT found_include)
  message(FATAL_ERROR "${tag} `pkg-config --cflags linen` (${cflags}) names no directory with linen/linen.hpp")
endif()

set(here "${CMAKE_CURRENT_LIST_DIR}")
run_step("compile main.cpp" ignored "${CXX_COMPILER}" -std=c++17 -O1 -Wall -Wextra ${cflags_list}
         "-DLINEN_EXPECTED_VERSION=\"${LINEN_VERSION}\"" "-DLINEN_CONSUMER_KIND=\"consumer_pkg_config\""
         "${here}/main.cpp" -o "${WORK_DIR}/attention")
run_step("run" ignored "${WORK_DIR}/attention")

if(EXPECT_IO)
  if(NOT EXISTS "${pcdir}/linen-io.pc")
    message(FATAL_ERROR "${tag} the build has linen::io but the install tree lacks linen-io.pc")
  endif()
  run_step("io cflags" io_cflags "${PKG_CONFIG}" --cflags linen-io)
  run_step("io libs" io_libs "${PKG_CONFIG}" --libs linen-io)
  separate_arguments(io_cflags_list UNIX_COMMAND "${io_cflags}")
  separate_arguments(io_libs_list UNIX_COMMAND "${io_libs}")
  run_step("compile pkg_config/io_main.cpp" ignored "${CXX_COMPILER}" -std=c++17 -O1 -Wall -Wextra
           ${io_cflags_list} "${here}/pkg_config/io_main.cpp" -o "${WORK_DIR}/io" ${io_libs_list})
  run_step("run io" ignored "${WORK_DIR}/io" "${WORK_DIR}/scratch")
endif()
# The static libraries: their .pc files under the library directory, naming the
# install tree's archives.
foreach(lib IN ITEMS dispatch compiled)
  string(TOUPPER "${lib}" upper)
  if(NOT EXPECT_${upper})
    continue()
  endif()
  set(pc "${prefix}/${INSTALL_LIB_PKGCONFIGDIR}/linen-${lib}.pc")
  if(NOT INSTALL_LIB_PKGCONFIGDIR OR NOT EXISTS "${pc}")
    message(FATAL_ERROR "${tag} the build has linen::${lib} but the install tree lacks ${INSTALL_LIB_PKGCONFIGDIR}/linen-${lib}.pc")
  endif()
  run_step("${lib} cflags" ${lib}_cflags "${PKG_CONFIG}" --cflags linen-${lib})
  run_step("${lib} libs" ${lib}_libs "${PKG_CONFIG}" --libs linen-${lib})
  separate_arguments(${lib}_cflags_list UNIX_COMMAND "${${lib}_cflags}")
  separate_arguments(${lib}_libs_list UNIX_COMMAND "${${lib}_libs}")
  # -L must be the moved install tree's library directory, holding the archive.
  set(found_archive FALSE)
  foreach(flag IN LISTS ${lib}_libs_list)
    if(NOT flag MATCHES "^-L(.*)$")
      continue()
    endif()
    set(libdir "${CMAKE_MATCH_1}")
    if(EXISTS "${libdir}/liblinen_${lib}.a")
      get_filename_component(dir "${libdir}" REALPATH)
      get_filename_component(want "${prefix}" REALPATH)
      string(FIND "${dir}/" "${want}/" at)
      if(NOT at EQUAL 0)
        message(FATAL_ERROR "${tag} liblinen_${lib}.a comes from ${dir}, not the install tree ${want}")
      endif()
      set(found_archive TRUE)
    endif()
  endforeach()
  if(NOT found_archive)
    message(FATAL_ERROR "${tag} `pkg-config --libs linen-${lib}` (${${lib}_libs}) names no directory with liblinen_${lib}.a")
  endif()
  if(lib STREQUAL "compiled")
    set(extra -DLINEN_CONSUMER_EXPECT_COMPILED=1)
  else()
    set(extra "")
  endif()
  run_step("compile find_package_${lib}/main.cpp" ignored "${CXX_COMPILER}" -std=c++17 -O1 -Wall -Wextra
           ${${lib}_cflags_list} ${extra} "${here}/find_package_${lib}/main.cpp" -o "${WORK_DIR}/${lib}"
           ${${lib}_libs_list})
  run_step("run ${lib}" ignored "${WORK_DIR}/${lib}")
endforeach()
message(STATUS "${tag} passed")
