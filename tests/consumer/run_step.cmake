# run_step(<what> <command...>): runs a command of a consumer or packaging script
# (cmake -P), printing it after the caller's ${tag}, and stops with the command line and
# its exit code if it fails. Included by run_consumer.cmake and tests/packaging/*.cmake.
function(run_step what)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "${tag} ${what}: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${tag} ${what} failed (exit ${rc}): ${shown}")
  endif()
endfunction()
