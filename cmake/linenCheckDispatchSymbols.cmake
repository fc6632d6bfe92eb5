# ctest's dispatch_symbols (tests/CMakeLists.txt): every per-level object of
# linen::dispatch must define exactly one global symbol, linen_dispatch_table_<level>;
# everything else it defines (linen's kernels, and Eigen's and the standard library's
# inline functions compiled with the level's flags) must be local, so that the linker can
# never use one of them for another translation unit.
#
#   cmake -DNM=<nm> -DOBJECTS=<dir>/sse2.o|<dir>/avx2.o|... -P linenCheckDispatchSymbols.cmake
string(REPLACE "|" ";" objects "${OBJECTS}")
if(NOT NM OR NOT objects)
  message(FATAL_ERROR "linenCheckDispatchSymbols.cmake: -DNM=... and -DOBJECTS=... are required")
endif()
set(failed FALSE)
foreach(object IN LISTS objects)
  get_filename_component(level "${object}" NAME_WE)
  execute_process(COMMAND "${NM}" -g --defined-only "${object}"
                  OUTPUT_VARIABLE out RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} ${object} failed (${rc}): ${err}")
  endif()
  string(REGEX REPLACE "\n$" "" out "${out}")
  string(REPLACE "\n" ";" lines "${out}")
  set(want "T linen_dispatch_table_${level}")
  set(found FALSE)
  foreach(line IN LISTS lines)
    string(REGEX MATCH "[A-Za-z?] [^ ]+$" sym "${line}")  # "<type> <name>"
    if(sym STREQUAL want)
      set(found TRUE)
    else()
      message(SEND_ERROR "${object}: global symbol '${sym}' (want only '${want}')")
      set(failed TRUE)
    endif()
  endforeach()
  if(NOT found)
    message(SEND_ERROR "${object}: no '${want}'")
    set(failed TRUE)
  endif()
  # The object must be self-contained in what it defines: nothing of linen's is left
  # undefined for another object to provide.
  execute_process(COMMAND "${NM}" -u "${object}" OUTPUT_VARIABLE undefined)
  if(undefined MATCHES "(_ZN5linen[A-Za-z0-9_]*)")
    message(SEND_ERROR "${object}: undefined linen symbol ${CMAKE_MATCH_1}")
    set(failed TRUE)
  endif()
  list(LENGTH lines n)
  message(STATUS "${level}.o: ${n} global symbol(s): ${out}")
endforeach()
if(failed)
  message(FATAL_ERROR "linen::dispatch objects export more than their tables")
endif()
