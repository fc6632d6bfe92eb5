# Finds libzstd, optional for linen::io (the Orbax reader and writer,
# include/linen/io/orbax.hpp). Sets, in the caller's scope:
#   LINEN_ZSTD_TARGET   the target to link ("" when not found or not wanted)
#   LINEN_ZSTD_PACKAGE  how it was found, for linenConfig.cmake: "zstd" (CMake
#                       package, find_dependency(zstd CONFIG)), "pkg-config"
#                       (pkg_check_modules(... IMPORTED_TARGET libzstd)), or ""
#                       when the target was given by a parent project
#   LINEN_ZSTD_NOTE     what was found, for the configure summary
#
# zstd's CMake package (Debian 12's libzstd-dev 1.5.4 ships one) has the targets
# zstd::libzstd_shared / zstd::libzstd_static (and zstd::libzstd from 1.5.6); the
# shared library is preferred. Without the package, pkg-config's libzstd.pc.
set(LINEN_ZSTD_TARGET "")
set(LINEN_ZSTD_PACKAGE "")
set(LINEN_ZSTD_NOTE "")

if(NOT LINEN_USE_ZSTD)
  set(LINEN_ZSTD_NOTE "no (LINEN_USE_ZSTD is OFF)")
  return()
endif()

foreach(_linen_zstd_target IN ITEMS zstd::libzstd zstd::libzstd_shared zstd::libzstd_static PkgConfig::LINEN_ZSTD)
  if(TARGET ${_linen_zstd_target})
    set(LINEN_ZSTD_TARGET ${_linen_zstd_target})
    set(LINEN_ZSTD_NOTE "${_linen_zstd_target} (given by the parent project)")
    return()
  endif()
endforeach()

find_package(zstd CONFIG QUIET)
if(zstd_FOUND)
  foreach(_linen_zstd_target IN ITEMS zstd::libzstd zstd::libzstd_shared zstd::libzstd_static)
    if(TARGET ${_linen_zstd_target})
      set(LINEN_ZSTD_TARGET ${_linen_zstd_target})
      set(LINEN_ZSTD_PACKAGE zstd)
      set(LINEN_ZSTD_NOTE "${_linen_zstd_target} (package zstd ${zstd_VERSION})")
      return()
    endif()
  endforeach()
endif()

find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(LINEN_ZSTD QUIET IMPORTED_TARGET GLOBAL libzstd)
  if(LINEN_ZSTD_FOUND AND TARGET PkgConfig::LINEN_ZSTD)
    set(LINEN_ZSTD_TARGET PkgConfig::LINEN_ZSTD)
    set(LINEN_ZSTD_PACKAGE pkg-config)
    set(LINEN_ZSTD_NOTE "PkgConfig::LINEN_ZSTD (pkg-config libzstd ${LINEN_ZSTD_VERSION})")
    return()
  endif()
endif()

set(LINEN_ZSTD_NOTE "no (libzstd not found: linen::io reads and writes no Orbax checkpoints)")
if(LINEN_REQUIRE_IO)
  message(FATAL_ERROR "linen: LINEN_REQUIRE_IO is ON but libzstd (CMake package zstd or pkg-config libzstd) "
                      "is not found; install it or set LINEN_USE_ZSTD=OFF")
endif()
