# vcpkg overlay port of linen (header-only, like the nlohmann-json and eigen3 ports):
#   vcpkg install linen --overlay-ports=<linen checkout>/packaging/vcpkg/ports
#   vcpkg install "linen[core]" ...        # without linen::io (no nlohmann-json, zstd)
# The overlay builds the checkout it sits in. A registry port takes the release archive
# instead: replace the SOURCE_PATH line by
#   vcpkg_from_github(OUT_SOURCE_PATH SOURCE_PATH REPO <owner>/linen REF v${VERSION}
#                     SHA512 <archive sha512> HEAD_REF main)
# linen's own ctest runs this file's CMake steps against the checkout
# (tests/packaging/vcpkg_port.cmake, test packaging_vcpkg_port).
set(VCPKG_BUILD_TYPE release)  # header-only: one configuration
# linen::dispatch (the kernels of every x86-64 level in one static library) is not part of
# the port: the package is header-only, and the consumer's -march chooses the kernels.

get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../../../.." ABSOLUTE)

vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    io LINEN_REQUIRE_IO
    io LINEN_USE_ZSTD
)
if(NOT "io" IN_LIST FEATURES)
  # No nlohmann-json in the graph: make sure a system copy is not picked up either.
  list(APPEND FEATURE_OPTIONS -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON)
endif()

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    ${FEATURE_OPTIONS}
    -DLINEN_BUILD_TESTS=OFF
    -DLINEN_BUILD_EXAMPLES=OFF
    -DLINEN_BUILD_BENCHMARKS=OFF
    -DLINEN_BUILD_FUZZERS=OFF
    -DLINEN_INSTALL=ON
    -DLINEN_BUILD_DISPATCH=OFF
    -DLINEN_INSTALL_CMAKEDIR=share/${PORT}
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME ${PORT} CONFIG_PATH share/${PORT})
vcpkg_fixup_pkgconfig()

file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/debug")
file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
