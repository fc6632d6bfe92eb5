# Install rules and the CMake package of linen (included when LINEN_INSTALL).
#
#   <prefix>/include/linen/...                       the headers
#   <prefix>/share/cmake/linen/linenConfig.cmake     find_package(linen CONFIG)
#   <prefix>/share/cmake/linen/linenConfigVersion.cmake
#   <prefix>/share/cmake/linen/linenTargets.cmake    linen::linen
#   <prefix>/share/cmake/linen/linenIoTargets.cmake  linen::io (if built with nlohmann_json)
#   <prefix>/share/cmake/linen/linenDispatchTargets.cmake, <prefix>/lib/liblinen_dispatch.a
#                                                    linen::dispatch (if built)
#   <prefix>/share/doc/linen/LICENSE
#
# linen is header-only and the same on every architecture, so the package goes
# under the data directory and its version file is ARCH_INDEPENDENT (linen::dispatch,
# compiled for x86-64, is offered to x86-64 consumers only: linenConfig.cmake.in).
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
