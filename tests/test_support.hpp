// SPDX-License-Identifier: Apache-2.0
// Shared helpers of the test suite: fixture loading and Flax's error metric.
#ifndef LINEN_TESTS_TEST_SUPPORT_HPP
#define LINEN_TESTS_TEST_SUPPORT_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <exception>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include <linen/io/safetensors.hpp>
#include <linen/linen.hpp>

#ifndef LINEN_TEST_DATA_DIR
#define LINEN_TEST_DATA_DIR "tests/data"
#endif

namespace linen_test {

inline std::string data_path(const std::string& rel) { return std::string(LINEN_TEST_DATA_DIR) + "/" + rel; }

// A Flax golden fixture, tests/data/flax/<name>.safetensors.
inline linen::io::Variables fixture(const std::string& name) {
  return linen::io::load_safetensors(data_path("flax/" + name + ".safetensors"));
}

// The fixtures' metric: max |actual - expected| / max |expected|, computed in double.
template <class A, class E>
double rel_err(const A& actual, const E& expected) {
  EXPECT_EQ(linen::shape_of(actual), linen::shape_of(expected));
  if (linen::shape_of(actual) != linen::shape_of(expected)) return INFINITY;
  double err = 0, scale = 0;
  for (linen::Index i = 0; i < expected.size(); ++i) {
    const double e = static_cast<double>(expected.data()[i]);
    const double a = static_cast<double>(actual.data()[i]);
    if (std::isnan(a) != std::isnan(e)) return INFINITY;
    if (std::isnan(e)) continue;
    err = std::max(err, std::abs(a - e));
    scale = std::max(scale, std::abs(e));
  }
  return scale > 0 ? err / scale : err;
}

// Tolerances that real Flax meets (tests/data/flax/README.md).
template <class T>
constexpr double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  else if constexpr (std::is_same_v<T, float>) return 2e-6;
  else if constexpr (std::is_same_v<T, Eigen::half>) return 5e-3;
  else return 2e-2;
}

// A tensor of shape s with elements drawn from N(0, 1) in float by g, cast to T (the
// decode tests' inputs).
template <class T, int N>
linen::Tensor<T, N> random_tensor(const linen::Shape& s, std::mt19937& g) {
  linen::Tensor<T, N> t(linen::to_dims<N>(s));
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (linen::Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(d(g));
  return t;
}

// Casts every element (Eigen's cast, keeping rank and layout).
template <class To, class From, int N>
linen::Tensor<To, N> cast(const linen::Tensor<From, N>& t) {
  return t.template cast<To>();
}

// The linen::io_error message of running `load` (a loader call); fails the test if it
// returns or throws anything else.
template <class F>
std::string io_error_message(F&& load) {
  try {
    load();
  } catch (const linen::io_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected linen::io_error, got: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected linen::io_error, the image parsed";
  return {};
}

// Whether a and b have the same shape and bytes (an empty tensor may hold no storage).
template <class T, int N>
bool same_bits(const linen::Tensor<T, N>& a, const linen::Tensor<T, N>& b) {
  return a.dimensions() == b.dimensions() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0);
}

// Whether n elements at a and b have the same bytes.
template <class T>
bool same_bytes(const T* a, const T* b, linen::Index n) {
  return n == 0 || std::memcmp(a, b, sizeof(T) * static_cast<std::size_t>(n)) == 0;
}

// The message of the exception `f` throws ("(no exception)" when it returns).
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

}  // namespace linen_test

#endif  // LINEN_TESTS_TEST_SUPPORT_HPP
