// SPDX-License-Identifier: Apache-2.0
//
// linen's GEMV (detail/gemm/gemv.hpp), the decode step's projections: y[M, N] = x[M, K]
// W[K, N] (+ bias) for a few rows, row-major with strides. Checked against a restatement in
// long double with the GEMM test's bound, |y - exact| <= (K + 1) eps (sum |x w| + |bias|);
// its numerics rule (one chain of fused multiply-adds over k per element, then + bias: the
// GEMM's) is checked as bit equality across row groups, column tiles, packet widths,
// prefetch and threads, and against the GEMM. The dispatched entry (gemm::multiply_rows,
// DenseGeneral's by_row) runs at the active level: ctest runs this binary under every
// level the CPU has (label isa), where it must equal that level's GEMM bit for bit.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/dense.hpp>
#include <linen/detail/gemm/gemm.hpp>
#include <linen/detail/gemm/gemv.hpp>
#include <linen/detail/gemm/product.hpp>
#include <linen/random.hpp>

namespace {

using linen::Index;
namespace gemm = linen::detail::gemm;

// Narrow tiles (one packet) and depth blocks of 3 steps: every loop of the driver taken;
// and whole-depth blocks without the prefetch.
template <class P>
struct NarrowBlocking {
  template <int R>
  static constexpr int NB = 1;
  static constexpr Index KB = 3;
  static constexpr bool prefetch = true;
};
template <class P>
struct DeepBlocking {
  template <int R>
  static constexpr int NB = linen::detail::gemm::GemvBlocking<P>::template NB<R>;
  static constexpr Index KB = 1 << 20;
  static constexpr bool prefetch = false;
};

// x[M, K] in rows of ldx, W[K, N] in rows of ldw, y[M, N] in rows of ldy; the padding of y
// holds a sentinel that must survive.
template <class T>
struct Case {
  Index M, N, K, ldx, ldw, ldy;
  bool with_bias;
  std::vector<T> x, w, bias, y;
  static constexpr T kSentinel = T(-777.25);

  Case(Index m, Index n, Index k, Index pad, bool bias_on, unsigned seed)
      : M(m), N(n), K(k), ldx(k + pad), ldw(n + pad), ldy(n + pad), with_bias(bias_on) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    x.assign(static_cast<std::size_t>(std::max<Index>(m * ldx, 1)), T(0));
    w.assign(static_cast<std::size_t>(std::max<Index>(k * ldw, 1)), T(0));
    bias.assign(static_cast<std::size_t>(std::max<Index>(n, 1)), T(0));
    for (auto& v : x) v = static_cast<T>(u(gen));
    for (auto& v : w) v = static_cast<T>(u(gen));
    for (auto& v : bias) v = static_cast<T>(u(gen));
    clear();
  }
  const T* bias_ptr() const { return with_bias ? bias.data() : nullptr; }
  void clear() { y.assign(static_cast<std::size_t>(std::max<Index>(M * ldy, 1)), kSentinel); }

  // This translation unit's GEMV with blocking Blk over T's widest packet, or over plain
  // scalars (the packet type is only ever a defaulted parameter: naming one draws
  // -Wignored-attributes).
  template <template <class> class Blk = gemm::GemvBlocking, bool Scalar = false,
            class P = linen::detail::simd::packet_t<T>>
  std::vector<T> gemv(Eigen::ThreadPoolInterface* pool = nullptr) {
    using Q = std::conditional_t<Scalar, T, P>;
    clear();
    gemm::gemv<T, Q, Blk<Q>>(M, N, K, x.data(), ldx, w.data(), ldw, bias_ptr(), y.data(), ldy, pool);
    return y;
  }
  // This translation unit's GEMM on the same rows.
  std::vector<T> gemm_local() {
    clear();
    gemm::gemm<T>(M, N, K, x.data(), ldx, w.data(), ldw, bias_ptr(), y.data(), ldy);
    return y;
  }
  // The dispatched entries (the active level's with linen::dispatch).
  std::vector<T> rows(Eigen::ThreadPoolInterface* pool = nullptr) {
    clear();
    gemm::multiply_rows<T>(M, N, K, x.data(), ldx, w.data(), ldw, bias_ptr(), y.data(), ldy, pool);
    return y;
  }
  std::vector<T> gemm_active() {
    clear();
    const linen::detail::GemmOutput<T> out{w.data(), ldw, N, bias_ptr(), y.data(), ldy};
#if defined(LINEN_DISPATCH)
    linen::detail::dispatch::call<linen::detail::dispatch::Gemm<T>>(M, K, x.data(), ldx, &out, 1, nullptr);
#else
    gemm::gemm_outputs<T>(M, K, x.data(), ldx, &out, 1, nullptr);
#endif
    return y;
  }

  // Every element of y within the bound of the exact sum; padding untouched.
  void expect_near_exact(const std::vector<T>& got) const {
    const long double eps = std::numeric_limits<T>::epsilon();
    for (Index i = 0; i < M; ++i) {
      for (Index j = 0; j < ldy; ++j) {
        const T v = got[static_cast<std::size_t>(i * ldy + j)];
        if (j >= N) {
          ASSERT_EQ(v, kSentinel) << "padding of y overwritten at (" << i << ", " << j << ")";
          continue;
        }
        long double exact = 0, mag = 0;
        for (Index t = 0; t < K; ++t) {
          const long double p = static_cast<long double>(x[static_cast<std::size_t>(i * ldx + t)]) *
                                static_cast<long double>(w[static_cast<std::size_t>(t * ldw + j)]);
          exact += p;
          mag += std::fabs(p);
        }
        if (with_bias) {
          exact += bias[static_cast<std::size_t>(j)];
          mag += std::fabs(static_cast<long double>(bias[static_cast<std::size_t>(j)]));
        }
        const long double tol = static_cast<long double>(K + 1) * eps * mag;
        ASSERT_LE(std::fabs(static_cast<long double>(v) - exact), tol)
            << "y(" << i << ", " << j << ") of M=" << M << " N=" << N << " K=" << K << ": " << v << " vs "
            << static_cast<double>(exact);
      }
    }
  }
};

template <class T>
class GemvTest : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(GemvTest, Types);

// Rows 1..9 (every row group, and past kGemvMaxRows); widths around one packet and one
// tile; depths around the depth block (KB = 8) and past one GEMM depth block.
TYPED_TEST(GemvTest, MatchesTheExactProductOverEdgeShapes) {
  using T = TypeParam;
  const Index ms[] = {1, 2, 3, 4, 5, 9};
  const Index ns[] = {1, 3, 8, 16, 17, 33, 130, 257};
  const Index ks[] = {0, 1, 7, 8, 9, 17, 64, 520};
  unsigned seed = 1;
  for (Index m : ms)
    for (Index n : ns)
      for (Index k : ks) {
        Case<T> c(m, n, k, (m + n + k) % 3, (m + n + k) % 2 == 0, seed++);
        c.expect_near_exact(c.gemv());
        c.expect_near_exact(c.rows());
        if (::testing::Test::HasFatalFailure()) return;
      }
}

TYPED_TEST(GemvTest, EmptyShapes) {
  using T = TypeParam;
  for (const auto& s : {std::array<Index, 3>{0, 5, 4}, std::array<Index, 3>{3, 0, 4}, std::array<Index, 3>{0, 0, 0}}) {
    Case<T> c(s[0], s[1], s[2], 1, true, 7);
    for (T v : c.gemv()) EXPECT_EQ(v, Case<T>::kSentinel);
    for (T v : c.rows()) EXPECT_EQ(v, Case<T>::kSentinel);
  }
  for (bool bias : {true, false}) {  // K of 0: y = bias (or 0)
    Case<T> c(2, 37, 0, 1, bias, 8);
    const std::vector<T> y = c.gemv();
    for (Index i = 0; i < 2; ++i)
      for (Index j = 0; j < 37; ++j) EXPECT_EQ(y[static_cast<std::size_t>(i * c.ldy + j)], bias ? c.bias[j] : T(0));
  }
}

// The numerics rule: the narrow blocking, one depth block, the scalar member, a pool of 2 or 3 threads (the
// columns split among them) and the GEMM on the same rows give the same bits.
TYPED_TEST(GemvTest, BitsDoNotDependOnBlockingThreadsOrPacketAndEqualTheGemm) {
  using T = TypeParam;
  Eigen::ThreadPool pool2(2), pool3(3);
  // Kernels past kGemvParallelMinBytes, so that the pools do split them.
  const Index shapes[][3] = {{1, 1, 1}, {1, 512, 512}, {2, 1000, 300}, {3, 77, 1031}, {4, 2051, 64}, {5, 640, 520}};
  unsigned seed = 200;
  for (const auto& s : shapes) {
    Case<T> c(s[0], s[1], s[2], 1, seed % 2 == 0, seed);
    const std::vector<T> base = c.gemv();
    c.expect_near_exact(base);
    const auto shape = ::testing::Message() << "shape " << s[0] << "x" << s[1] << "x" << s[2];
    EXPECT_EQ(c.template gemv<NarrowBlocking>(), base) << "narrow tiles, " << shape;
    EXPECT_EQ(c.template gemv<DeepBlocking>(), base) << "one depth block, " << shape;
    EXPECT_EQ((c.template gemv<gemm::GemvBlocking, true>()), base) << "scalar member, " << shape;
    EXPECT_EQ(c.gemv(&pool2), base) << "2 threads, " << shape;
    EXPECT_EQ(c.template gemv<NarrowBlocking>(&pool3), base) << "narrow tiles on 3 threads, " << shape;
    EXPECT_EQ(c.gemm_local(), base) << "the GEMM, " << shape;
    ++seed;
  }
}

// The dispatched entry: at the active level, multiply_rows (the GEMV up to kGemvMaxRows
// rows, the GEMM past them) equals that level's GEMM bit for bit, with or without a pool,
// and a row's bits do not depend on how many rows came with it.
TYPED_TEST(GemvTest, DispatchedRowsEqualTheActiveGemm) {
  using T = TypeParam;
  Eigen::ThreadPool pool(2);
  unsigned seed = 300;
  for (Index m : {Index{1}, Index{2}, Index{4}, Index{7}, gemm::kGemvMaxRows, gemm::kGemvMaxRows + 1, Index{20}}) {
    Case<T> c(m, 515, 384, 2, m % 2 == 1, seed++);
    const std::vector<T> gemm_bits = c.gemm_active();
    c.expect_near_exact(gemm_bits);
    EXPECT_EQ(c.rows(), gemm_bits) << "M=" << m;
    EXPECT_EQ(c.rows(&pool), gemm_bits) << "M=" << m << ", 2 threads";
    Case<T> one = c;  // row 0 alone
    one.M = 1;
    EXPECT_TRUE(std::equal(c.y.begin(), c.y.begin() + c.ldy, one.rows().begin())) << "row 0 of M=" << m;
  }
}

// DenseGeneral's by_row path (the decode step's projections) gives what its GEMM path
// gives for the same rows, for float and for bfloat16 with float params (the promoted
// product): apply over one position and a decode step agree.
template <class T, class ParamT>
void expect_by_row_equals_gemm() {
  using Dense = linen::DenseGeneral<T, ParamT, 1, 2>;
  const Dense dense({{8, 48}, true});
  for (Index m : {Index{1}, Index{3}, Index{11}}) {
    linen::Tensor<T, 2> x(m, 200);
    std::mt19937 gen(static_cast<unsigned>(m));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(normal(gen));
    auto p = dense.init(linen::random::key(3), x);
    for (Index i = 0; i < p.bias.size(); ++i) p.bias.data()[i] = ParamT(normal(gen));
    std::vector<T> by_gemm(static_cast<std::size_t>(m * 8 * 48)), by_row(by_gemm.size());
    Dense::template apply_rows<T>(p, true, x.data(), m, by_gemm.data(), nullptr, false);
    linen::detail::DenseScratch<linen::accum_t<T>> scratch;
    Dense::template apply_rows<T>(p, true, x.data(), m, by_row.data(), &scratch, true);
    for (std::size_t i = 0; i < by_row.size(); ++i)
      ASSERT_EQ(static_cast<float>(by_row[i]), static_cast<float>(by_gemm[i])) << "element " << i << " of m=" << m;
  }
}

TEST(GemvDense, ByRowEqualsTheGemmPath) {
  expect_by_row_equals_gemm<float, float>();
  expect_by_row_equals_gemm<double, double>();
  expect_by_row_equals_gemm<Eigen::bfloat16, float>();
}

}  // namespace
