# Install rules and the CMake package of linen (included when LINEN_INSTALL).
#
#   <prefix>/include/linen/...                       the headers
#   <prefix>/share/cmake/linen/linenConfig.cmake     find_package(linen CONFIG)
#   <prefix>/share/cmake/linen/linenConfigVersion.cmake
#   <prefix>/share/cmake/linen/linenTargets.cmake    linen::linen
#   <prefix>/share/cmake/linen/linenIoTargets.cmake  linen::io (if built with nlohmann_json)
#   <prefix>/share/cmake/linen/linenDispatchTargets.cmake, <prefix>/lib/liblinen_dispatch.a
#                                                    linen::dispatch (if built)
#   <prefix>/share/cmake/linen/linenCompiledTargets.cmake, <prefix>/lib/liblinen_compiled.a
#                                                    linen::compiled (if built)
#   <prefix>/share/pkgconfig/linen.pc                pkg-config --cflags linen
#   <prefix>/share/pkgconfig/linen-io.pc             pkg-config --cflags --libs linen-io
#   <prefix>/lib/pkgconfig/linen-dispatch.pc         pkg-config --cflags --libs linen-dispatch
#   <prefix>/lib/pkgconfig/linen-compiled.pc         pkg-config --cflags --libs linen-compiled
#                                                    (the static libraries' files are
#                                                    architecture-specific: under lib/)
#   <prefix>/share/doc/linen/LICENSE
#
# linen is header-only and the same on every architecture, so the package (and the
# pkg-config files) go under the data directory and its version file is
# ARCH_INDEPENDENT (linen::dispatch, compiled for x86-64, is offered to x86-64 consumers
# only: linenConfig.cmake.in).
include(CMakePackageConfigHelpers)

set(LINEN_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/linen"
    CACHE STRING "Where linen's CMake package files are installed, relative to the prefix")
mark_as_advanced(LINEN_INSTALL_CMAKEDIR)

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        FILES_MATCHING PATTERN "*.hpp")
install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION "${CMAKE_INSTALL_DOCDIR}")

install(TARGETS linen EXPORT linenTargets)
install(EXPORT linenTargets
        NAMESPACE linen::
        DESTINATION "${LINEN_INSTALL_CMAKEDIR}")

# linen::io has its own export set, so that a consumer without nlohmann_json
# still gets linen::linen from the same installation.
if(LINEN_IO_HAS_JSON)
  set(LINEN_IO_EXPORTED ON)
  install(TARGETS linen_io EXPORT linenIoTargets)
  install(EXPORT linenIoTargets
          NAMESPACE linen::
          DESTINATION "${LINEN_INSTALL_CMAKEDIR}")
else()
  set(LINEN_IO_EXPORTED OFF)
endif()

# linen::dispatch (a static library for x86-64) has its own export set too; linenConfig
# offers it, as the component `dispatch`, to x86-64 consumers only, so the rest of the
# package stays architecture-independent.
if(TARGET linen_dispatch)
  set(LINEN_DISPATCH_EXPORTED ON)
  install(TARGETS linen_dispatch EXPORT linenDispatchTargets
          ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}")
  install(EXPORT linenDispatchTargets
          NAMESPACE linen::
          DESTINATION "${LINEN_INSTALL_CMAKEDIR}")
else()
  set(LINEN_DISPATCH_EXPORTED OFF)
endif()

# linen::compiled (a static library for the architecture it was built on): its own
# export set; linenConfig offers it, as the component `compiled`, to consumers of that
# architecture. It links linen::dispatch when that was built.
if(TARGET linen_compiled)
  set(LINEN_COMPILED_EXPORTED ON)
  set(LINEN_COMPILED_PROCESSOR "${CMAKE_SYSTEM_PROCESSOR}")
  set(LINEN_COMPILED_SIZEOF_VOID_P "${CMAKE_SIZEOF_VOID_P}")
  install(TARGETS linen_compiled EXPORT linenCompiledTargets
          ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}")
  install(EXPORT linenCompiledTargets
          NAMESPACE linen::
          DESTINATION "${LINEN_INSTALL_CMAKEDIR}")
else()
  set(LINEN_COMPILED_EXPORTED OFF)
  set(LINEN_COMPILED_WITH_DISPATCH OFF)
  set(LINEN_COMPILED_PROCESSOR "")
  set(LINEN_COMPILED_SIZEOF_VOID_P "")
endif()

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/linenConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/linenConfig.cmake"
  INSTALL_DESTINATION "${LINEN_INSTALL_CMAKEDIR}"
  NO_SET_AND_CHECK_MACRO)
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/linenConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMajorVersion
  ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/linenConfig.cmake"
              "${PROJECT_BINARY_DIR}/linenConfigVersion.cmake"
        DESTINATION "${LINEN_INSTALL_CMAKEDIR}")

# ---- pkg-config ------------------------------------------------------------
# Relocatable files: the prefix is computed from ${pcfiledir}, so an install tree
# that is moved (or unpacked elsewhere by a package manager) still works.
set(LINEN_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_DATADIR}/pkgconfig"
    CACHE STRING "Where linen's pkg-config files are installed, relative to the prefix")
mark_as_advanced(LINEN_INSTALL_PKGCONFIGDIR)
if(IS_ABSOLUTE "${LINEN_INSTALL_PKGCONFIGDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  # Absolute directories: the files name them as they are (not relocatable).
  set(LINEN_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(LINEN_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
else()
  file(RELATIVE_PATH _linen_pc_up "/prefix/${LINEN_INSTALL_PKGCONFIGDIR}" "/prefix")
  string(REGEX REPLACE "/$" "" _linen_pc_up "${_linen_pc_up}")
  set(LINEN_PC_PREFIX "\${pcfiledir}/${_linen_pc_up}")
  set(LINEN_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
  unset(_linen_pc_up)
endif()
configure_file("${PROJECT_SOURCE_DIR}/cmake/linen.pc.in" "${PROJECT_BINARY_DIR}/pkgconfig/linen.pc" @ONLY)
install(FILES "${PROJECT_BINARY_DIR}/pkgconfig/linen.pc" DESTINATION "${LINEN_INSTALL_PKGCONFIGDIR}")
if(LINEN_IO_HAS_JSON)
  set(LINEN_PC_IO_REQUIRES "")
  set(LINEN_PC_IO_CFLAGS "")
  if(LINEN_ZSTD_TARGET)
    set(LINEN_PC_IO_REQUIRES ", libzstd")
    set(LINEN_PC_IO_CFLAGS "-DLINEN_HAS_ZSTD=1")
  endif()
  configure_file("${PROJECT_SOURCE_DIR}/cmake/linen-io.pc.in" "${PROJECT_BINARY_DIR}/pkgconfig/linen-io.pc" @ONLY)
  install(FILES "${PROJECT_BINARY_DIR}/pkgconfig/linen-io.pc" DESTINATION "${LINEN_INSTALL_PKGCONFIGDIR}")
endif()

# The static libraries' pkg-config files, under the library directory (they name an
# architecture's archive): linen-dispatch (linen::dispatch) and linen-compiled
# (linen::compiled, with linen-dispatch when it was built with it).
set(LINEN_INSTALL_LIB_PKGCONFIGDIR "${CMAKE_INSTALL_LIBDIR}/pkgconfig"
    CACHE STRING "Where linen's pkg-config files for its static libraries are installed, relative to the prefix")
mark_as_advanced(LINEN_INSTALL_LIB_PKGCONFIGDIR)
if(TARGET linen_dispatch OR TARGET linen_compiled)
  if(IS_ABSOLUTE "${LINEN_INSTALL_LIB_PKGCONFIGDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
    set(LINEN_PC_LIB_PREFIX "${CMAKE_INSTALL_PREFIX}")
    set(LINEN_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
  else()
    file(RELATIVE_PATH _linen_pc_up "/prefix/${LINEN_INSTALL_LIB_PKGCONFIGDIR}" "/prefix")
    string(REGEX REPLACE "/$" "" _linen_pc_up "${_linen_pc_up}")
    set(LINEN_PC_LIB_PREFIX "\${pcfiledir}/${_linen_pc_up}")
    set(LINEN_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
    unset(_linen_pc_up)
  endif()
endif()
if(TARGET linen_dispatch)
  configure_file("${PROJECT_SOURCE_DIR}/cmake/linen-dispatch.pc.in" "${PROJECT_BINARY_DIR}/pkgconfig/linen-dispatch.pc" @ONLY)
  install(FILES "${PROJECT_BINARY_DIR}/pkgconfig/linen-dispatch.pc" DESTINATION "${LINEN_INSTALL_LIB_PKGCONFIGDIR}")
endif()
if(TARGET linen_compiled)
  if(LINEN_COMPILED_WITH_DISPATCH)
    set(LINEN_PC_COMPILED_REQUIRES "linen-dispatch = ${PROJECT_VERSION}")
  else()
    set(LINEN_PC_COMPILED_REQUIRES "linen = ${PROJECT_VERSION}")
  endif()
  configure_file("${PROJECT_SOURCE_DIR}/cmake/linen-compiled.pc.in" "${PROJECT_BINARY_DIR}/pkgconfig/linen-compiled.pc" @ONLY)
  install(FILES "${PROJECT_BINARY_DIR}/pkgconfig/linen-compiled.pc" DESTINATION "${LINEN_INSTALL_LIB_PKGCONFIGDIR}")
endif()
