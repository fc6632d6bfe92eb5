// SPDX-License-Identifier: Apache-2.0
// Helpers of the gradient tests (test_grad.cpp, test_grad_modules.cpp): random tensors,
// central finite differences, and the fixtures' error metric over raw arrays.
#ifndef LINEN_TESTS_GRAD_SUPPORT_HPP
#define LINEN_TESTS_GRAD_SUPPORT_HPP

#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <linen/linen.hpp>

namespace linen_grad_test {

using linen::Index;
using linen::Tensor;

template <class T, int N>
Tensor<T, N> random_tensor(const std::array<Index, N>& dims, std::mt19937& gen, double stddev = 1.0) {
  Tensor<T, N> t(dims);
  std::normal_distribution<double> normal(0.0, stddev);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(normal(gen));
  return t;
}

inline double inner(const double* a, const double* b, Index n) {
  double s = 0;
  for (Index i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
template <class A, class B>
double inner(const A& a, const B& b) {
  double s = 0;
  for (Index i = 0; i < a.size(); ++i) s += static_cast<double>(a.data()[i]) * static_cast<double>(b.data()[i]);
  return s;
}

// Central differences of loss() with respect to the n doubles at x (restored afterwards).
template <class Loss>
std::vector<double> numeric_grad(const Loss& loss, double* x, Index n, double eps = 1e-6) {
  std::vector<double> g(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    const double saved = x[i];
    x[i] = saved + eps;
    const double up = loss();
    x[i] = saved - eps;
    const double down = loss();
    x[i] = saved;
    g[static_cast<std::size_t>(i)] = (up - down) / (2 * eps);
  }
  return g;
}

// max |a - e| / max |e| (the fixtures' metric); NaN anywhere is infinitely wrong.
template <class A, class E>
double rel_err_n(const A* a, const E* e, Index n) {
  double err = 0, scale = 0;
  for (Index i = 0; i < n; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(e[i]);
    if (std::isnan(x) || std::isnan(y)) return INFINITY;
    err = std::max(err, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return scale > 0 ? err / scale : err;
}

// The analytic gradient at x must match finite differences of loss; and must not be 0.
template <class Loss>
void expect_matches_fd(const Loss& loss, double* x, const double* analytic, Index n, const std::string& what,
                       double tol = 1e-7) {
  const std::vector<double> fd = numeric_grad(loss, x, n);
  EXPECT_LE(rel_err_n(analytic, fd.data(), n), tol) << what << " (" << n << " elements)";
  double mx = 0;
  for (double v : fd) mx = std::max(mx, std::abs(v));
  EXPECT_GT(mx, 0.0) << what << ": the finite differences are all zero, the check proves nothing";
}

}  // namespace linen_grad_test

#endif  // LINEN_TESTS_GRAD_SUPPORT_HPP
