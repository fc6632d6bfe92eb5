# linen::dispatch (included by the top-level CMakeLists.txt when LINEN_BUILD_DISPATCH):
# linen's attention kernels compiled once per x86-64 level, the level chosen at run time
# (include/linen/isa.hpp). Linking it defines LINEN_DISPATCH for the consumer, whose
# kernel calls with default packet and blocking then go through the active level's table.
#
#   src/dispatch/<level>.cpp   one translation unit per level, with that level's flags
#                              (appended after the consumer's, so -march=native elsewhere
#                              does not leak in; the file's #error checks the result);
#   <level>.o                  that object partially linked (ld -r, groups dissolved) with
#                              every symbol but linen_dispatch_table_<level> made local
#                              (objcopy): no inline function of linen, Eigen or the standard
#                              library compiled with AVX-512 can be picked by the linker
#                              for a translation unit built for less;
#   src/dispatch/dispatch.cpp  detection and selection, with the consumer's flags.
# LINEN_DISPATCH_LEVELS lists the levels (their order is isa.hpp's enum).
set(LINEN_DISPATCH_LEVELS sse2 avx2 avx512 avx512_bf16)
set(_linen_isa_sse2 -march=x86-64)
set(_linen_isa_avx2 -march=x86-64 -mavx2 -mfma -mf16c)
set(_linen_isa_avx512 ${_linen_isa_avx2} -mavx512f -mavx512bw -mavx512vl -mavx512dq)
set(_linen_isa_avx512_bf16 ${_linen_isa_avx512} -mavx512bf16)

set(_linen_dispatch_dir "${PROJECT_BINARY_DIR}/linen_dispatch")
set(LINEN_DISPATCH_OBJECTS "")
set(_linen_level_targets "")
foreach(_linen_level IN LISTS LINEN_DISPATCH_LEVELS)
  set(_linen_target linen_dispatch_${_linen_level})
  list(APPEND _linen_level_targets ${_linen_target})
  add_library(${_linen_target} OBJECT "${PROJECT_SOURCE_DIR}/src/dispatch/${_linen_level}.cpp")
  target_link_libraries(${_linen_target} PRIVATE linen)
  target_compile_options(${_linen_target} PRIVATE ${_linen_isa_${_linen_level}})
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC gives static locals of inline functions STB_GNU_UNIQUE binding, which objcopy
    # cannot make local; as weak symbols they can be.
    target_compile_options(${_linen_target} PRIVATE -fno-gnu-unique)
  endif()
  set_target_properties(${_linen_target} PROPERTIES
    POSITION_INDEPENDENT_CODE ON
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
  if(LINEN_WARNINGS_AS_ERRORS)
    linen_target_warnings(${_linen_target})
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13
       AND _linen_level MATCHES "^avx512")
      # GCC 12's own avx512fintrin.h (_mm512_undefined_*: `__m512 __Y = __Y;`) draws
      # -Wuninitialized / -Wmaybe-uninitialized in every caller (GCC bug 105593, fixed
      # in GCC 13).
      target_compile_options(${_linen_target} PRIVATE -Wno-uninitialized -Wno-maybe-uninitialized)
    endif()
  endif()
  set(_linen_object "${_linen_dispatch_dir}/${_linen_level}.o")
  add_custom_command(
    OUTPUT "${_linen_object}"
    COMMAND "${CMAKE_COMMAND}" -E make_directory "${_linen_dispatch_dir}"
    COMMAND "${LINEN_DISPATCH_PARTIAL_LD}" -r --force-group-allocation -o "${_linen_object}.r"
            "$<TARGET_OBJECTS:${_linen_target}>"
    COMMAND "${CMAKE_OBJCOPY}" "--keep-global-symbol=linen_dispatch_table_${_linen_level}"
            "${_linen_object}.r" "${_linen_object}"
    DEPENDS ${_linen_target} "$<TARGET_OBJECTS:${_linen_target}>"
    COMMENT "linen::dispatch: ${_linen_level}.o, every symbol local but linen_dispatch_table_${_linen_level}"
    COMMAND_EXPAND_LISTS
    VERBATIM)
  list(APPEND LINEN_DISPATCH_OBJECTS "${_linen_object}")
endforeach()
set_source_files_properties(${LINEN_DISPATCH_OBJECTS} PROPERTIES EXTERNAL_OBJECT TRUE GENERATED TRUE)

add_library(linen_dispatch STATIC "${PROJECT_SOURCE_DIR}/src/dispatch/dispatch.cpp" ${LINEN_DISPATCH_OBJECTS})
add_library(linen::dispatch ALIAS linen_dispatch)
set_target_properties(linen_dispatch PROPERTIES
  EXPORT_NAME dispatch
  POSITION_INDEPENDENT_CODE ON)
target_link_libraries(linen_dispatch PUBLIC linen)
target_compile_definitions(linen_dispatch PUBLIC LINEN_DISPATCH=1)
if(LINEN_WARNINGS_AS_ERRORS)
  linen_target_warnings(linen_dispatch)
endif()
# Under add_subdirectory / FetchContent it is built only when something links it.
if(NOT LINEN_IS_TOP_LEVEL)
  set_target_properties(linen_dispatch ${_linen_level_targets} PROPERTIES EXCLUDE_FROM_ALL TRUE)
endif()
message(STATUS "linen: linen::dispatch with levels ${LINEN_DISPATCH_LEVELS}")
