# linen::compiled (included by the top-level CMakeLists.txt when LINEN_BUILD_COMPILED):
# a static library of explicit instantiations of linen's modules, functional attention
# and vjps for float, double, Eigen::bfloat16 and Eigen::half (and the half types with
# float parameters), as fmt ships fmt::fmt next to fmt::fmt-header-only. Linking it
# defines LINEN_COMPILED for the consumer, whose headers then declare those
# instantiations extern (include/linen/detail/compiled/): a TU that uses
# SelfAttention<float> compiles in seconds instead of compiling the modules itself.
#
#   src/compiled/<type>.cpp   one translation unit per element type (a minute or less
#                             each on one core), built with the consumer's flags;
#   linen::dispatch           linked PUBLIC when it is built, so that the library's
#                             kernels (and the consumer's) run at the CPU's level: the
#                             library is compiled once, for the target's baseline, and
#                             a consumer built with -march=native still gets its CPU's
#                             kernels. Without linen::dispatch the kernels are those of
#                             the flags the library was built with.
set(LINEN_COMPILED_SOURCES float double bfloat16 half)
list(TRANSFORM LINEN_COMPILED_SOURCES PREPEND "${PROJECT_SOURCE_DIR}/src/compiled/")
list(TRANSFORM LINEN_COMPILED_SOURCES APPEND ".cpp")
add_library(linen_compiled STATIC ${LINEN_COMPILED_SOURCES})
add_library(linen::compiled ALIAS linen_compiled)
set_target_properties(linen_compiled PROPERTIES
  EXPORT_NAME compiled
  POSITION_INDEPENDENT_CODE ON)
if(TARGET linen_dispatch)
  target_link_libraries(linen_compiled PUBLIC linen_dispatch)
  set(LINEN_COMPILED_WITH_DISPATCH ON)
else()
  target_link_libraries(linen_compiled PUBLIC linen)
  set(LINEN_COMPILED_WITH_DISPATCH OFF)
endif()
# For the consumer only: the library's own TUs hold the definitions (instantiate.hpp
# refuses LINEN_COMPILED).
target_compile_definitions(linen_compiled INTERFACE LINEN_COMPILED=1)
if(LINEN_WARNINGS_AS_ERRORS)
  linen_target_warnings(linen_compiled)
endif()
# Under add_subdirectory / FetchContent it is built only when something links it.
if(NOT LINEN_IS_TOP_LEVEL)
  set_target_properties(linen_compiled PROPERTIES EXCLUDE_FROM_ALL TRUE)
endif()
message(STATUS "linen: linen::compiled (float, double, bfloat16, half; with linen::dispatch: ${LINEN_COMPILED_WITH_DISPATCH})")
