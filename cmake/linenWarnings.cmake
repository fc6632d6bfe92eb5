# linen_target_warnings(<target>): the settings of linen's own tests, examples
# and benchmarks (never of the library targets, whose flags are the
# consumer's): strict ISO C++ without GNU extensions, -Wall -Wextra -Wpedantic
# (/W4 for MSVC), and -Werror (/WX) when LINEN_WARNINGS_AS_ERRORS is ON.
function(linen_target_warnings target)
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "MSVC")
    target_compile_options(${target} PRIVATE /W4 /permissive-)
    if(LINEN_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE /WX)
    endif()
  else()
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
    if(LINEN_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()
