// SPDX-License-Identifier: Apache-2.0
//
// The bfloat16 pair products of the projections (detail/gemm/pairs.hpp: vdpbf16ps where
// the active level is avx512_bf16): the pair GEMM (gemm::multiply_pairs, DenseGeneral's
// bfloat16 product) and the pair GEMV over kept panels (gemm::multiply_pair_panels, the
// decode step's), on odd shapes (m, n, k off the tiles, k odd, past one depth block),
// checked against a float64 restatement with the float GEMM's bound, and bit for bit
// against the float GEMM of the widened operands (a bfloat16 product is exact in float:
// both are one chain of rounded additions over k in order). At every level,
// DenseGeneral<bfloat16, float> and the decode workspace's kept kernels give the float
// path's bits. ctest runs this binary under every level the CPU has (label isa); the
// pair-only cases skip where the active level lacks avx512_bf16.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/dense.hpp>
#include <linen/detail/decode/workspace.hpp>
#include <linen/detail/gemm/pair_panels.hpp>
#include <linen/detail/gemm/product.hpp>
#if defined(LINEN_DISPATCH)
#include <linen/isa.hpp>
#endif

namespace {

using linen::Index;
using Bf = Eigen::bfloat16;
namespace gemm = linen::detail::gemm;

float widen(Bf x) { return static_cast<float>(x); }

std::uint32_t bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// A[M, K] (row stride lda), B[K, N] (row stride ldb) in bfloat16, from uniform(-1, 1)
// rounded (no denormal products or sums in sight).
struct Operands {
  Index M, N, K, lda, ldb;
  std::vector<Bf> a, b;
  Operands(Index m, Index n, Index k, Index pad, unsigned seed) : M(m), N(n), K(k), lda(k + pad), ldb(n + pad) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    a.resize(static_cast<std::size_t>(std::max<Index>(m * lda, 1)));
    b.resize(static_cast<std::size_t>(std::max<Index>(k * ldb, 1)));
    for (auto& v : a) v = static_cast<Bf>(u(g));
    for (auto& v : b) v = static_cast<Bf>(u(g));
  }
  // The float GEMM of the widened operands at the active level (C row stride N).
  std::vector<float> float_gemm() const {
    std::vector<float> fa(a.size()), fb(b.size()), c(static_cast<std::size_t>(std::max<Index>(M * N, 1)), -1.0f);
    std::transform(a.begin(), a.end(), fa.begin(), widen);
    std::transform(b.begin(), b.end(), fb.begin(), widen);
    gemm::multiply<float>(M, N, K, fa.data(), lda, fb.data(), ldb, nullptr, c.data(), N);
    return c;
  }
  // |c - exact| <= (K + 1) eps sum |a b|, the float GEMM's bound, for every element.
  void expect_near_exact(const std::vector<float>& c, Index ldc) const {
    const double eps = std::numeric_limits<float>::epsilon();
    for (Index i = 0; i < M; ++i)
      for (Index j = 0; j < N; ++j) {
        double exact = 0, mag = 0;
        for (Index t = 0; t < K; ++t) {
          const double p = static_cast<double>(widen(a[static_cast<std::size_t>(i * lda + t)])) *
                           static_cast<double>(widen(b[static_cast<std::size_t>(t * ldb + j)]));
          exact += p;
          mag += std::fabs(p);
        }
        const double v = c[static_cast<std::size_t>(i * ldc + j)];
        ASSERT_LE(std::fabs(v - exact), static_cast<double>(K + 1) * eps * mag)
            << "C(" << i << ", " << j << ") of M=" << M << " N=" << N << " K=" << K << ": " << v << " vs " << exact;
      }
  }
};

void expect_same_bits(const std::vector<float>& got, Index ldg, const std::vector<float>& want, Index ldw, Index M,
                      Index N, const char* what) {
  for (Index i = 0; i < M; ++i)
    for (Index j = 0; j < N; ++j)
      ASSERT_EQ(bits(got[static_cast<std::size_t>(i * ldg + j)]), bits(want[static_cast<std::size_t>(i * ldw + j)]))
          << what << ": C(" << i << ", " << j << ") " << got[static_cast<std::size_t>(i * ldg + j)] << " vs "
          << want[static_cast<std::size_t>(i * ldw + j)] << " (M=" << M << " N=" << N << ")";
}

#define LINEN_SKIP_WITHOUT_PAIRS()                                                          \
  if (!gemm::pair_products()) GTEST_SKIP() << "the active level has no bfloat16 pair products (avx512_bf16)"

// The pair GEMM: rows around the register tile (14) and past a row block, columns around
// the panel (32), depths odd, around a pair and past one depth block (512); C's padding
// untouched.
TEST(PairGemm, MatchesFloat64AndTheFloatGemmBitForBit) {
  LINEN_SKIP_WITHOUT_PAIRS();
  const Index ms[] = {1, 3, 14, 15, 29, 150};
  const Index ns[] = {1, 17, 32, 33, 100};
  const Index ks[] = {1, 2, 3, 31, 64, 513, 1030};
  unsigned seed = 1;
  for (Index m : ms)
    for (Index n : ns)
      for (Index k : ks) {
        const Operands o(m, n, k, (m + n + k) % 3, seed++);
        const Index ldc = n + 2;
        std::vector<float> c(static_cast<std::size_t>(m * ldc), -777.25f);
        gemm::multiply_pairs(m, n, k, o.a.data(), o.lda, o.b.data(), o.ldb, c.data(), ldc);
        o.expect_near_exact(c, ldc);
        expect_same_bits(c, ldc, o.float_gemm(), n, m, n, "pair GEMM vs float GEMM");
        for (Index i = 0; i < m; ++i)
          for (Index j = n; j < ldc; ++j) ASSERT_EQ(c[static_cast<std::size_t>(i * ldc + j)], -777.25f) << "padding";
        if (HasFatalFailure()) return;
      }
}

TEST(PairGemm, BitsDoNotDependOnThreads) {
  LINEN_SKIP_WITHOUT_PAIRS();
  Eigen::ThreadPool pool(3);
  const Operands o(300, 200, 515, 1, 42);
  std::vector<float> c1(300 * 200), c3(300 * 200);
  gemm::multiply_pairs(300, 200, 515, o.a.data(), o.lda, o.b.data(), o.ldb, c1.data(), 200);
  gemm::multiply_pairs(300, 200, 515, o.a.data(), o.lda, o.b.data(), o.ldb, c3.data(), 200, &pool);
  expect_same_bits(c3, 200, c1, 200, 300, 200, "3 threads vs 1");
}

// The pair panels: rounding as static_cast, element 2kp in the high half, zero padding.
TEST(PairPanels, LayoutAndRounding) {
  const Index K = 5, N = 130;
  std::vector<float> w(static_cast<std::size_t>(K * N));
  for (Index i = 0; i < K * N; ++i) w[static_cast<std::size_t>(i)] = 1.0f + 0.001f * static_cast<float>(i);
  std::vector<Bf> p(static_cast<std::size_t>(linen::detail::pair_panels_size(K, N)), Bf(9.0f));
  ASSERT_EQ(p.size(), std::size_t(2 * 3 * 2 * 128));
  linen::detail::pack_pair_panels(K, N, w.data(), N, p.data());
  for (Index panel = 0; panel < 2; ++panel)
    for (Index kp = 0; kp < 3; ++kp)
      for (Index c = 0; c < 128; ++c) {
        const Index j = panel * 128 + c;
        const Bf* d = p.data() + panel * 3 * 256 + kp * 256 + 2 * c;
        const float hi = j < N ? static_cast<float>(static_cast<Bf>(w[static_cast<std::size_t>(2 * kp * N + j)])) : 0.f;
        const float lo = j < N && 2 * kp + 1 < K
                             ? static_cast<float>(static_cast<Bf>(w[static_cast<std::size_t>((2 * kp + 1) * N + j)]))
                             : 0.f;
        ASSERT_EQ(static_cast<float>(d[1]), hi) << "panel " << panel << " pair row " << kp << " column " << c;
        ASSERT_EQ(static_cast<float>(d[0]), lo) << "panel " << panel << " pair row " << kp << " column " << c;
      }
}

// The pair GEMV over kept panels: rows 1..9 (every row group), widths around a panel (128),
// odd depths; the pair GEMM's bits, with or without a pool.
TEST(PairGemv, MatchesFloat64AndThePairGemmBitForBit) {
  LINEN_SKIP_WITHOUT_PAIRS();
  Eigen::ThreadPool pool(2);
  const Index ms[] = {1, 2, 3, 4, 5, 9};
  const Index ns[] = {1, 16, 127, 128, 129, 300};
  const Index ks[] = {1, 2, 7, 64, 255, 1030};
  unsigned seed = 100;
  for (Index m : ms)
    for (Index n : ns)
      for (Index k : ks) {
        const Operands o(m, n, k, seed % 2, seed);
        ++seed;
        std::vector<Bf> panels(static_cast<std::size_t>(linen::detail::pair_panels_size(k, n)));
        linen::detail::pack_pair_panels(k, n, o.b.data(), o.ldb, panels.data());
        const Index ldy = n + 1;
        std::vector<float> y(static_cast<std::size_t>(m * ldy), -777.25f), g(static_cast<std::size_t>(m * n));
        gemm::multiply_pair_panels(m, n, k, o.a.data(), o.lda, panels.data(), y.data(), ldy, seed % 3 == 0 ? &pool : nullptr);
        o.expect_near_exact(y, ldy);
        gemm::multiply_pairs(m, n, k, o.a.data(), o.lda, o.b.data(), o.ldb, g.data(), n);
        expect_same_bits(y, ldy, g, n, m, n, "pair GEMV vs pair GEMM");
        for (Index i = 0; i < m; ++i) ASSERT_EQ(y[static_cast<std::size_t>(i * ldy + n)], -777.25f) << "padding";
        if (HasFatalFailure()) return;
      }
}

// DenseGeneral<bfloat16, float> (Flax's dtype=bfloat16, param_dtype=float32), by rows and
// not: at every level the float path's bits (x and the kernel rounded to bfloat16, the
// float product, then Flax's rounding with the bias).
TEST(Bf16Dense, EqualsTheFloatPathAtEveryLevel) {
  using Dense = linen::DenseGeneral<Bf, float, 1, 1>;
  const Index shapes[][3] = {{1, 33, 17}, {5, 130, 64}, {37, 96, 129}, {130, 64, 520}};
  unsigned seed = 7;
  for (const auto& s : shapes) {
    const Index m = s[0], out = s[1], in = s[2];
    std::mt19937 g(seed++);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    linen::DenseParams<float, 1, 1> p;
    p.kernel.resize(in, out);
    p.bias.resize(out);
    for (Index i = 0; i < p.kernel.size(); ++i) p.kernel.data()[i] = u(g);
    for (Index i = 0; i < out; ++i) p.bias.data()[i] = u(g);
    std::vector<Bf> x(static_cast<std::size_t>(m * in));
    for (auto& v : x) v = static_cast<Bf>(u(g));
    // The float path, restated with linen's float GEMM.
    std::vector<float> fx(x.size()), fk(static_cast<std::size_t>(in * out)), acc(static_cast<std::size_t>(m * out));
    std::transform(x.begin(), x.end(), fx.begin(), widen);
    for (Index i = 0; i < in * out; ++i)
      fk[static_cast<std::size_t>(i)] = static_cast<float>(static_cast<Bf>(p.kernel.data()[i]));
    gemm::multiply<float>(m, out, in, fx.data(), in, fk.data(), out, nullptr, acc.data(), out);
    std::vector<Bf> want(static_cast<std::size_t>(m * out));
    linen::detail::round_rows<Bf>(acc.data(), m, out, p.bias.data(), want.data());
    for (bool by_row : {false, true}) {
      std::vector<Bf> y(want.size());
      linen::detail::DenseScratch<float> scratch;
      Dense::apply_rows<Bf>(p, true, x.data(), m, y.data(), &scratch, by_row);
      for (std::size_t i = 0; i < y.size(); ++i)
        ASSERT_EQ(static_cast<float>(y[i]), static_cast<float>(want[i]))
            << "element " << i << " of m=" << m << " out=" << out << " in=" << in << (by_row ? " by row" : "");
    }
    // The decode workspace's kept kernel, twice: made, then reused (pair panels where the
    // level has the pair products, except for a chunk of many rows where the pair GEMM is
    // not the faster product: DenseGeneral's own product then, the panels not made).
    const bool panels = gemm::pair_products() && (m <= gemm::kGemvMaxRows || gemm::pair_gemm());
    linen::detail::decode::KeptKernel<float> kept;
    linen::detail::DenseScratch<float> scratch;
    for (int step = 0; step < 2; ++step) {
      std::vector<Bf> y(want.size());
      linen::detail::decode::kept_rows<Dense>(kept, p, true, x.data(), m, y.data(), scratch);
      EXPECT_EQ(kept.pairs, panels) << "m=" << m;
      for (std::size_t i = 0; i < y.size(); ++i)
        ASSERT_EQ(static_cast<float>(y[i]), static_cast<float>(want[i]))
            << "kept, step " << step << ", element " << i << " of m=" << m << " out=" << out << " in=" << in;
    }
  }
}

#if defined(LINEN_DISPATCH)
// A kept kernel made as pair panels is remade as float when the active level changes to one
// without the pair products (and back), with the same bits.
TEST(Bf16Dense, KeptKernelFollowsTheActiveLevel) {
  LINEN_SKIP_WITHOUT_PAIRS();
  const std::vector<linen::Isa> levels = linen::supported_isas();
  if (std::find(levels.begin(), levels.end(), linen::Isa::avx512) == levels.end()) GTEST_SKIP() << "no avx512 level";
  using Dense = linen::DenseGeneral<Bf, float, 1, 1>;
  const Index m = 2, in = 77, out = 150;
  linen::DenseParams<float, 1, 1> p;
  p.kernel.resize(in, out);
  p.bias.resize(out);
  std::mt19937 g(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (Index i = 0; i < p.kernel.size(); ++i) p.kernel.data()[i] = u(g);
  for (Index i = 0; i < out; ++i) p.bias.data()[i] = u(g);
  std::vector<Bf> x(static_cast<std::size_t>(m * in));
  for (auto& v : x) v = static_cast<Bf>(u(g));
  linen::detail::decode::KeptKernel<float> kept;
  linen::detail::DenseScratch<float> scratch;
  std::vector<Bf> first(static_cast<std::size_t>(m * out)), y(first.size());
  const linen::Isa active = linen::active_isa();
  linen::detail::decode::kept_rows<Dense>(kept, p, true, x.data(), m, first.data(), scratch);
  EXPECT_TRUE(kept.pairs);
  linen::set_isa(linen::Isa::avx512);
  linen::detail::decode::kept_rows<Dense>(kept, p, true, x.data(), m, y.data(), scratch);
  EXPECT_FALSE(kept.pairs);
  for (std::size_t i = 0; i < y.size(); ++i) ASSERT_EQ(static_cast<float>(y[i]), static_cast<float>(first[i])) << i;
  linen::set_isa(active);
  linen::detail::decode::kept_rows<Dense>(kept, p, true, x.data(), m, y.data(), scratch);
  EXPECT_TRUE(kept.pairs);
  for (std::size_t i = 0; i < y.size(); ++i) ASSERT_EQ(static_cast<float>(y[i]), static_cast<float>(first[i])) << i;
}
#endif

}  // namespace
