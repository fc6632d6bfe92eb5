# Run by the consumer project's test same_bits:
#   cmake -DCOMPILED=<exe> -DHEADER_ONLY=<exe> -DNM=<nm> -DCOMPILED_OBJECTS=<obj>
#         -DHEADER_ONLY_OBJECTS=<obj> -P same_bits.cmake
# 1. Both programs pass their own checks and print the same digests (the same bits).
# 2. The compiled build's object defines none of the modules' entry points (it calls
#    linen::compiled's); the header-only one does (so the check can tell).
cmake_minimum_required(VERSION 3.16)

foreach(which IN ITEMS COMPILED HEADER_ONLY)
  execute_process(COMMAND "${${which}}" RESULT_VARIABLE rc OUTPUT_VARIABLE out_${which} ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${${which}} failed (exit ${rc}):\n${out_${which}}\n${err}")
  endif()
  if(NOT out_${which} MATCHES "self_attention/apply [0-9a-f]+")
    message(FATAL_ERROR "${${which}} printed no digests:\n${out_${which}}")
  endif()
endforeach()
if(NOT out_COMPILED STREQUAL out_HEADER_ONLY)
  message(FATAL_ERROR "linen::compiled and header-only differ:\n--- compiled\n${out_COMPILED}--- header-only\n${out_HEADER_ONLY}")
endif()
message(STATUS "same bits from linen::compiled and header-only:\n${out_COMPILED}")

if(NM)
  # Defined (T/W) symbols of the modules' and the vjp's entry points, demangled.
  set(entry "linen::(MultiHeadDotProductAttention<float, float>::(apply|apply_impl|apply_into|decode_step|init_impl)|detail::attention_module_vjp<float, float|AttentionPullback<float, float, float, 3>::operator\\(\\))")
  foreach(which IN ITEMS COMPILED HEADER_ONLY)
    execute_process(COMMAND "${NM}" -C ${${which}_OBJECTS} RESULT_VARIABLE rc OUTPUT_VARIABLE syms ERROR_VARIABLE err)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "${NM} -C ${${which}_OBJECTS} failed: ${err}")
    endif()
    string(REGEX MATCHALL "[^\n]* [TWtw] ${entry}[^\n]*" defined_${which} "${syms}")
    list(LENGTH defined_${which} count_${which})
  endforeach()
  if(count_COMPILED GREATER 0)
    string(REPLACE ";" "\n" shown "${defined_COMPILED}")
    message(FATAL_ERROR "the TU linked to linen::compiled compiled the modules itself:\n${shown}")
  endif()
  if(count_HEADER_ONLY EQUAL 0)
    message(FATAL_ERROR "the header-only TU defines none of the entry points looked for: the check is stale")
  endif()
  message(STATUS "the compiled TU defines none of the ${count_HEADER_ONLY} entry points the header-only one does")
endif()
