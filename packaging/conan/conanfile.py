# Conan 2 recipe of linen, in the shape ConanCenter expects of header-only libraries
# (nlohmann_json, eigen):
#   conan create packaging/conan --version 0.1.0              # from a linen checkout
#   conan create packaging/conan --version 0.1.0 -o "linen/*:with_io=False"
# The recipe packages the checkout it sits in (exports_sources from ../..); a
# ConanCenter recipe takes the release archive in source() instead. test_package/ runs
# find_package(linen CONFIG), links linen::linen (and linen::io with with_io) and runs.
# linen's ctest runs test_package's CMake project against an install of the checkout
# (tests/packaging/conan_test_package.cmake); Conan itself is not run there.
import os

from conan import ConanFile
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout
from conan.tools.files import copy, rmdir

required_conan_version = ">=2.0"


class LinenConan(ConanFile):
    name = "linen"
    description = ("Flax's attention (flax.linen) in C++: header-only templates on Eigen "
                   "tensors, exact to Flax, with checkpoint I/O (safetensors, Flax msgpack, Orbax)")
    license = "Apache-2.0"
    topics = ("attention", "transformer", "flax", "jax", "eigen", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {"with_io": [True, False]}
    default_options = {"with_io": True}
    no_copy_source = True

    def export_sources(self):
        root = os.path.join(self.recipe_folder, "..", "..")
        for pattern in ("CMakeLists.txt", "LICENSE", "cmake/*", "include/*"):
            copy(self, pattern, root, self.export_sources_folder)

    def layout(self):
        cmake_layout(self, src_folder=".")

    def requirements(self):
        self.requires("eigen/3.4.0", transitive_headers=True)
        if self.options.with_io:
            self.requires("nlohmann_json/3.11.3", transitive_headers=True)
            self.requires("zstd/1.5.6", transitive_headers=True)

    def package_id(self):
        self.info.clear()

    def validate(self):
        from conan.tools.build import check_min_cppstd
        if self.settings.compiler.get_safe("cppstd"):
            check_min_cppstd(self, 17)

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["LINEN_BUILD_TESTS"] = False
        tc.cache_variables["LINEN_BUILD_EXAMPLES"] = False
        tc.cache_variables["LINEN_BUILD_BENCHMARKS"] = False
        tc.cache_variables["LINEN_BUILD_FUZZERS"] = False
        tc.cache_variables["LINEN_INSTALL"] = True
        # Header-only: linen::dispatch (a static library of per-ISA kernels) is not packaged.
        tc.cache_variables["LINEN_BUILD_DISPATCH"] = False
        tc.cache_variables["LINEN_REQUIRE_IO"] = bool(self.options.with_io)
        tc.cache_variables["LINEN_USE_ZSTD"] = bool(self.options.with_io)
        if not self.options.with_io:
            tc.cache_variables["CMAKE_DISABLE_FIND_PACKAGE_nlohmann_json"] = True
        tc.generate()
        from conan.tools.cmake import CMakeDeps
        CMakeDeps(self).generate()

    def build(self):
        cmake = CMake(self)
        cmake.configure()

    def package(self):
        cmake = CMake(self)
        cmake.install()
        copy(self, "LICENSE", self.source_folder, os.path.join(self.package_folder, "licenses"))
        # Conan describes the targets itself (package_info): drop linen's own CMake
        # package and pkg-config files, as ConanCenter recipes do.
        rmdir(self, os.path.join(self.package_folder, "share"))

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "linen")
        self.cpp_info.set_property("pkg_config_name", "linen")
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []

        core = self.cpp_info.components["core"]
        core.set_property("cmake_target_name", "linen::linen")
        core.set_property("pkg_config_name", "linen")
        core.requires = ["eigen::eigen"]
        core.bindirs = []
        core.libdirs = []

        if self.options.with_io:
            io = self.cpp_info.components["io"]
            io.set_property("cmake_target_name", "linen::io")
            io.set_property("pkg_config_name", "linen-io")
            io.requires = ["core", "nlohmann_json::nlohmann_json", "zstd::zstd"]
            io.defines = ["LINEN_HAS_ZSTD=1"]
            io.bindirs = []
            io.libdirs = []
