# What of the Conan recipe (packaging/conan/) can be tested without Conan (not reachable
# from linen's CI machines): the recipes parse as Python, every LINEN_* option they set
# exists, and test_package's CMake project builds and runs against an install of the
# build under test, with and without linen::io. Run by ctest as packaging_conan:
#
#   cmake -DLINEN_SOURCE_DIR=<checkout> -DLINEN_BINARY_DIR=<configured build>
#         -DWORK_DIR=<scratch> -DGENERATOR=<...> -DCXX_COMPILER=<...> [-DMAKE_PROGRAM=]
#         [-DPYTHON=<python3>] [-DPREFIX_PATH=a|b] [-DPACKAGE_DIRS=...] [-DEXPECT_IO=ON]
#         -P conan_test_package.cmake
cmake_minimum_required(VERSION 3.20)

foreach(var IN ITEMS LINEN_SOURCE_DIR LINEN_BINARY_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "conan_test_package.cmake: -D${var}=... is required")
  endif()
endforeach()
set(tag "[packaging_conan]")
set(recipe_dir "${LINEN_SOURCE_DIR}/packaging/conan")

include("${CMAKE_CURRENT_LIST_DIR}/../consumer/run_step.cmake")

include("${CMAKE_CURRENT_LIST_DIR}/recipe_options.cmake")
linen_check_recipe_options("${recipe_dir}/conanfile.py")

file(READ "${recipe_dir}/conanfile.py" recipe)
foreach(needle IN ITEMS "package_type = \"header-library\"" "self.info.clear()" "cmake_file_name\", \"linen\""
                        "cmake_target_name\", \"linen::linen\"" "cmake_target_name\", \"linen::io\"")
  string(FIND "${recipe}" "${needle}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "${tag} conanfile.py lacks ${needle}")
  endif()
endforeach()
if(PYTHON)
  foreach(py IN ITEMS "${recipe_dir}/conanfile.py" "${recipe_dir}/test_package/conanfile.py")
    run_step("python syntax" "${PYTHON}" -c "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])" "${py}")
  endforeach()
else()
  message(STATUS "${tag} no python3: the recipes' syntax is not checked")
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/package")
run_step("install the build under test" "${CMAKE_COMMAND}" --install "${LINEN_BINARY_DIR}" --prefix "${prefix}")

string(REPLACE "|" ";" prefix_path "${PREFIX_PATH}")
string(REPLACE "|" ";" package_dirs "${PACKAGE_DIRS}")
list(JOIN prefix_path "\\;" joined_prefix)
set(variants OFF)
if(EXPECT_IO)
  list(APPEND variants ON)
endif()
foreach(io IN LISTS variants)
  set(build "${WORK_DIR}/test_package_io_${io}")
  set(args -S "${recipe_dir}/test_package" -B "${build}" -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
           -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${prefix}\\;${joined_prefix}" "-DLINEN_TEST_IO=${io}"
           -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  if(MAKE_PROGRAM)
    list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  foreach(entry IN LISTS package_dirs)
    list(APPEND args "-D${entry}")
  endforeach()
  run_step("test_package configure (io ${io})" "${CMAKE_COMMAND}" ${args})
  run_step("test_package build (io ${io})" "${CMAKE_COMMAND}" --build "${build}")
  run_step("test_package run (io ${io})" "${CMAKE_CTEST_COMMAND}" --test-dir "${build}" --output-on-failure --no-tests=error)
endforeach()
message(STATUS "${tag} passed")
