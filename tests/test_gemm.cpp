// SPDX-License-Identifier: Apache-2.0
//
// linen's packed GEMM (detail/gemm/): C[M, N] = A[M, K] B[K, N] (+ bias), row-major with
// strides, checked against a restatement in long double (float64 or wider) over edge
// shapes: M, N, K of 0 and 1, primes, sizes around and past the register tile, the depth
// block (KC) and the column pass (NC). The bound is the classic one for a dot product
// summed in order: |c - exact| <= (K + 1) eps (sum |a b| + |bias|) (one rounding per
// fused multiply-add and one for the bias). Every element being one chain of fused
// multiply-adds over k, the bits do not depend on the blocking, the threads or the column
// groups: those are checked for equality.
#include <array>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/detail/gemm/gemm.hpp>
#include <linen/detail/gemm/product.hpp>

namespace {

using linen::Index;
namespace gemm = linen::detail::gemm;

// A small blocking (tiny tiles, depth blocks of 7, 2 column panels a pass), so that small
// shapes go through every loop and edge of the driver.
template <class P>
struct TinyBlocking {
  static constexpr int W = linen::detail::simd::size_v<P>;
  static constexpr int MR = 3, NR = 1, NRW = NR * W;
  static constexpr Index KC = 7, MC = 6, NC = 2 * NRW;
};

// A product with strides: A[M, K] in rows of lda, B[K, N] in rows of ldb, C[M, N] in rows
// of ldc; the padding of C holds a sentinel that must survive.
template <class T>
struct Case {
  Index M, N, K, lda, ldb, ldc;
  bool with_bias;
  std::vector<T> a, b, bias, c;
  static constexpr T kSentinel = T(-777.25);

  Case(Index m, Index n, Index k, Index pad, bool bias_on, unsigned seed)
      : M(m), N(n), K(k), lda(k + pad), ldb(n + pad), ldc(n + pad), with_bias(bias_on) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    a.assign(static_cast<std::size_t>(std::max<Index>(m * lda, 1)), T(0));
    b.assign(static_cast<std::size_t>(std::max<Index>(k * ldb, 1)), T(0));
    bias.assign(static_cast<std::size_t>(std::max<Index>(n, 1)), T(0));
    c.assign(static_cast<std::size_t>(std::max<Index>(m * ldc, 1)), kSentinel);
    for (auto& x : a) x = static_cast<T>(u(gen));
    for (auto& x : b) x = static_cast<T>(u(gen));
    for (auto& x : bias) x = static_cast<T>(u(gen));
  }
  const T* bias_ptr() const { return with_bias ? bias.data() : nullptr; }

  // The GEMM with blocking Blk over T's widest packet, or over plain scalars (the
  // packet type is only ever a defaulted parameter: naming one draws -Wignored-attributes).
  template <template <class> class Blk = gemm::PackedBlocking, bool Scalar = false,
            class P = linen::detail::simd::packet_t<T>>
  void run(Eigen::ThreadPoolInterface* pool = nullptr) {
    using Q = std::conditional_t<Scalar, T, P>;
    gemm::gemm<T, Q, Blk<Q>>(M, N, K, a.data(), lda, b.data(), ldb, bias_ptr(), c.data(), ldc, pool);
  }

  // Every element within the bound of the exact sum; padding untouched.
  void expect_near_exact() const {
    const long double eps = std::numeric_limits<T>::epsilon();
    for (Index i = 0; i < M; ++i) {
      for (Index j = 0; j < ldc; ++j) {
        const T got = c[static_cast<std::size_t>(i * ldc + j)];
        if (j >= N) {
          ASSERT_EQ(got, kSentinel) << "padding of C overwritten at (" << i << ", " << j << ")";
          continue;
        }
        long double exact = 0, mag = 0;
        for (Index t = 0; t < K; ++t) {
          const long double p = static_cast<long double>(a[static_cast<std::size_t>(i * lda + t)]) *
                                static_cast<long double>(b[static_cast<std::size_t>(t * ldb + j)]);
          exact += p;
          mag += std::fabs(p);
        }
        if (with_bias) {
          exact += bias[static_cast<std::size_t>(j)];
          mag += std::fabs(static_cast<long double>(bias[static_cast<std::size_t>(j)]));
        }
        const long double tol = static_cast<long double>(K + 1) * eps * mag;
        ASSERT_LE(std::fabs(static_cast<long double>(got) - exact), tol)
            << "C(" << i << ", " << j << ") of M=" << M << " N=" << N << " K=" << K << ": " << got << " vs "
            << static_cast<double>(exact);
      }
    }
  }
};

template <class T, class P = linen::detail::simd::packet_t<T>>
void tiny_outputs(Index M, Index K, const T* A, Index lda, const gemm::Output<T>* outs, int count,
                  Eigen::ThreadPoolInterface* pool) {
  gemm::gemm_outputs<T, P, TinyBlocking<P>>(M, K, A, lda, outs, count, pool);
}

template <class T>
class GemmTest : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(GemmTest, Types);

TYPED_TEST(GemmTest, MatchesTheExactProductOverEdgeShapes) {
  using T = TypeParam;
  const Index ms[] = {1, 2, 13, 14, 15, 29, 97};
  const Index ns[] = {1, 7, 16, 17, 31, 32, 33, 65};
  const Index ks[] = {1, 2, 5, 31, 64};
  unsigned seed = 1;
  for (Index m : ms)
    for (Index n : ns)
      for (Index k : ks) {
        Case<T> c(m, n, k, (m + n + k) % 3, (m + n + k) % 2 == 0, seed++);
        c.run();
        c.expect_near_exact();
        if (::testing::Test::HasFatalFailure()) return;
      }
}

// Depth past one block (KC = 512: the second block continues the chain from C) and
// columns past one pass (NC = 64 panels).
TYPED_TEST(GemmTest, MatchesTheExactProductPastTheBlocks) {
  using T = TypeParam;
  const Index shapes[][3] = {{5, 19, 513}, {17, 33, 1031}, {3, 64 * 32 + 37, 9}, {29, 4100, 3}, {1, 1, 2000}};
  unsigned seed = 100;
  for (const auto& s : shapes) {
    Case<T> c(s[0], s[1], s[2], 2, true, seed++);
    c.run();
    c.expect_near_exact();
  }
}

TYPED_TEST(GemmTest, EmptyShapes) {
  using T = TypeParam;
  // M or N of 0: nothing is written.
  for (const auto& s : {std::array<Index, 3>{0, 5, 4}, std::array<Index, 3>{3, 0, 4}, std::array<Index, 3>{0, 0, 0}}) {
    Case<T> c(s[0], s[1], s[2], 1, true, 7);
    c.run();
    for (T x : c.c) EXPECT_EQ(x, Case<T>::kSentinel);
  }
  // K of 0: an empty sum, C = bias (or 0).
  for (bool bias : {true, false}) {
    Case<T> c(4, 37, 0, 1, bias, 8);
    c.run();
    c.expect_near_exact();
    for (Index i = 0; i < 4; ++i)
      for (Index j = 0; j < 37; ++j) EXPECT_EQ(c.c[i * c.ldc + j], bias ? c.bias[j] : T(0));
  }
}

// One chain of fused multiply-adds per element: the tiny blocking (every loop and edge of
// the driver taken), the scalar member of the family and a thread pool give the same bits.
TYPED_TEST(GemmTest, BitsDoNotDependOnBlockingThreadsOrPacket) {
  using T = TypeParam;
  Eigen::ThreadPool pool(2);
  const Index shapes[][3] = {{1, 1, 1}, {13, 29, 17}, {31, 50, 600}, {300, 200, 100}, {143, 97, 520}};
  unsigned seed = 200;
  for (const auto& s : shapes) {
    Case<T> base(s[0], s[1], s[2], 1, true, seed);
    base.run();
    base.expect_near_exact();
    Case<T> tiny = base, scalar = base, threaded = base, tiny_threaded = base;
    for (auto* c : {&tiny, &scalar, &threaded, &tiny_threaded}) std::fill(c->c.begin(), c->c.end(), Case<T>::kSentinel);
    tiny.template run<TinyBlocking>();
    scalar.template run<TinyBlocking, true>();
    threaded.run(&pool);
    tiny_threaded.template run<TinyBlocking>(&pool);
    EXPECT_EQ(tiny.c, base.c) << "tiny blocking, shape " << s[0] << "x" << s[1] << "x" << s[2];
    EXPECT_EQ(scalar.c, base.c) << "scalar member, shape " << s[0] << "x" << s[1] << "x" << s[2];
    EXPECT_EQ(threaded.c, base.c) << "2 threads, shape " << s[0] << "x" << s[1] << "x" << s[2];
    EXPECT_EQ(tiny_threaded.c, base.c) << "tiny blocking on 2 threads, shape " << s[0] << "x" << s[1] << "x" << s[2];
    ++seed;
  }
}

// gemm_outputs: column groups sharing A (the q, k, v projections of one input) give what
// one gemm per group gives, bit for bit, whatever their widths.
TYPED_TEST(GemmTest, OutputGroupsMatchSeparateProducts) {
  using T = TypeParam;
  Eigen::ThreadPool pool(2);
  const Index M = 150, K = 70;
  const Index widths[] = {64, 33, 1};
  std::vector<Case<T>> each;
  unsigned seed = 300;
  for (Index n : widths) {
    each.emplace_back(M, n, K, 0, n != 33, seed++);
    each.back().a = each.front().a;  // one A for all
  }
  Eigen::ThreadPoolInterface* const pools[] = {nullptr, &pool};
  for (Eigen::ThreadPoolInterface* pl : pools) {
    std::vector<std::vector<T>> fused(3);
    gemm::Output<T> outs[3];
    for (int g = 0; g < 3; ++g) {
      fused[g].assign(each[g].c.size(), Case<T>::kSentinel);
      outs[g] = {each[g].b.data(), each[g].ldb, each[g].N, each[g].bias_ptr(), fused[g].data(), each[g].ldc};
    }
    gemm::gemm_outputs<T>(M, K, each[0].a.data(), K, outs, 3, pl);
    for (int g = 0; g < 3; ++g) {
      std::fill(each[g].c.begin(), each[g].c.end(), Case<T>::kSentinel);
      each[g].run();
      each[g].expect_near_exact();
      EXPECT_EQ(fused[g], each[g].c) << "group " << g;
    }
    // And with the tiny blocking, where the groups' panels share passes.
    for (int g = 0; g < 3; ++g) std::fill(fused[g].begin(), fused[g].end(), Case<T>::kSentinel);
    tiny_outputs<T>(M, K, each[0].a.data(), K, outs, 3, pl);
    for (int g = 0; g < 3; ++g) EXPECT_EQ(fused[g], each[g].c) << "group " << g << ", tiny blocking";
  }
}

// The products' entry (detail/gemm/product.hpp): linen's GEMM, or CBLAS in a
// LINEN_USE_BLAS build (its rows split over the pool), within the same bound.
TYPED_TEST(GemmTest, MultiplyMatchesTheExactProduct) {
  using T = TypeParam;
  Eigen::ThreadPool pool(2);
  const Index shapes[][3] = {{1, 1, 1}, {7, 33, 0}, {300, 70, 129}, {65, 3, 700}, {250, 100, 64}};
  unsigned seed = 400;
  for (const auto& s : shapes) {
    for (Eigen::ThreadPoolInterface* pl : {static_cast<Eigen::ThreadPoolInterface*>(nullptr),
                                           static_cast<Eigen::ThreadPoolInterface*>(&pool)}) {
      Case<T> c(s[0], s[1], s[2], 3, seed % 2 == 0, seed);
      gemm::multiply<T>(c.M, c.N, c.K, c.a.data(), c.lda, c.b.data(), c.ldb, c.bias_ptr(), c.c.data(), c.ldc, pl);
      c.expect_near_exact();
      ++seed;
    }
  }
}

}  // namespace
