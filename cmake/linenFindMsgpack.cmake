# Finds msgpack-cxx, optional for linen::io. Sets, in the caller's scope:
#   LINEN_MSGPACK_TARGET   the target to link ("" when not found or not wanted)
#   LINEN_MSGPACK_PACKAGE  the CMake package it came from, for find_dependency
#                          in linenConfig.cmake ("" when the target was given
#                          by a parent project)
#   LINEN_MSGPACK_NOTE     what was found, for the configure summary
#
# msgpack-cxx 5.0 and later install the package `msgpack-cxx` with target
# `msgpack-cxx`; 4.x (e.g. Debian 12's libmsgpack-cxx-dev 4.1.3) installs the
# package `msgpack` with target `msgpackc-cxx`. Both are tried, newest first.
set(LINEN_MSGPACK_TARGET "")
set(LINEN_MSGPACK_PACKAGE "")
set(LINEN_MSGPACK_NOTE "")

if(NOT LINEN_USE_MSGPACK)
  set(LINEN_MSGPACK_NOTE "no (LINEN_USE_MSGPACK is OFF)")
  return()
endif()

foreach(_linen_msgpack_target IN ITEMS msgpack-cxx msgpackc-cxx)
  if(TARGET ${_linen_msgpack_target})
    set(LINEN_MSGPACK_TARGET ${_linen_msgpack_target})
    set(LINEN_MSGPACK_NOTE "${_linen_msgpack_target} (given by the parent project)")
    return()
  endif()
endforeach()

find_package(msgpack-cxx CONFIG QUIET)
if(msgpack-cxx_FOUND AND TARGET msgpack-cxx)
  set(LINEN_MSGPACK_TARGET msgpack-cxx)
  set(LINEN_MSGPACK_PACKAGE msgpack-cxx)
  set(LINEN_MSGPACK_NOTE "msgpack-cxx (package msgpack-cxx ${msgpack-cxx_VERSION})")
  return()
endif()

find_package(msgpack CONFIG QUIET)
if(msgpack_FOUND AND TARGET msgpackc-cxx)
  set(LINEN_MSGPACK_TARGET msgpackc-cxx)
  set(LINEN_MSGPACK_PACKAGE msgpack)
  set(LINEN_MSGPACK_NOTE "msgpackc-cxx (package msgpack ${msgpack_VERSION})")
  return()
endif()

set(LINEN_MSGPACK_NOTE "no (msgpack-cxx not found: linen::io reads no .msgpack files)")
