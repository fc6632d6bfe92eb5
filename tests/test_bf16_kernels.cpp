// SPDX-License-Identifier: Apache-2.0
// The bfloat16 attention kernels. Where the compiler targets avx512_bf16 (build with
// -march=native on such a CPU) the fused kernels multiply bfloat16 in pairs (vdpbf16ps,
// detail/simd.hpp): the pair member of the micro-GEMM family must give the float family's
// bits on normal numbers, and both forward kernels (the tiled one, the row one of decode
// steps) must agree with a float64 restatement of Flax's bfloat16 numerics within the
// fixtures' bfloat16 tolerance, on edge shapes (odd depths and lengths, so pairs are
// partial; Lk 0 and 1; tiles of odd sizes, masks whose visible keys start and end at odd
// places, the causal cut) and with force_fp32_for_softmax (weights kept in float). Other
// builds run the same forward checks on their own kernels.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "test_support.hpp"

namespace {

using linen::Index;
using linen::Shape;
using Bf = Eigen::bfloat16;

double bf(double x) { return static_cast<double>(static_cast<float>(static_cast<Bf>(static_cast<float>(x)))); }

struct Case {
  Index B, Lq, Lk, H, D, Dv;
  int mask;  // 0: none, 1: random [B, 1, Lq, Lk], 2: causal flag, 3: a window of keys per row
  bool fp32_softmax;
};

// Flax's dot_product_attention with dtype bfloat16, restated in float64 with its rounding
// points: query / sqrt(depth) in bfloat16, logits rounded to bfloat16 (the einsum's
// output), masked logits finfo(bfloat16).min, softmax weights rounded to bfloat16 unless
// force_fp32_for_softmax, the output rounded to bfloat16.
std::vector<double> restate(const Case& c, const std::vector<Bf>& q, const std::vector<Bf>& k,
                            const std::vector<Bf>& v, const std::vector<char>& mask) {
  std::vector<double> out(static_cast<std::size_t>(c.B * c.Lq * c.H * c.Dv));
  const float scale = static_cast<float>(static_cast<Bf>(std::sqrt(static_cast<float>(c.D))));
  const double low = static_cast<double>(static_cast<float>(std::numeric_limits<Bf>::lowest()));
  std::vector<double> s(static_cast<std::size_t>(c.Lk));
  for (Index b = 0; b < c.B; ++b)
    for (Index i = 0; i < c.Lq; ++i)
      for (Index h = 0; h < c.H; ++h) {
        double mx = -std::numeric_limits<double>::infinity();
        for (Index j = 0; j < c.Lk; ++j) {
          double x = 0;
          for (Index d = 0; d < c.D; ++d) {
            const double qd = bf(static_cast<float>(q[static_cast<std::size_t>(((b * c.Lq + i) * c.H + h) * c.D + d)]) / scale);
            x += qd * static_cast<double>(static_cast<float>(k[static_cast<std::size_t>(((b * c.Lk + j) * c.H + h) * c.D + d)]));
          }
          x = bf(x);
          if (!mask.empty() && !mask[static_cast<std::size_t>((b * c.Lq + i) * c.Lk + j)]) x = low;
          s[static_cast<std::size_t>(j)] = x;
          mx = std::max(mx, x);
        }
        double sum = 0;
        for (Index j = 0; j < c.Lk; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
        for (Index e = 0; e < c.Dv; ++e) {
          double o = 0;
          for (Index j = 0; j < c.Lk; ++j) {
            double w = std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
            if (!c.fp32_softmax) w = bf(w);
            o += w * static_cast<double>(static_cast<float>(v[static_cast<std::size_t>(((b * c.Lk + j) * c.H + h) * c.Dv + e)]));
          }
          out[static_cast<std::size_t>(((b * c.Lq + i) * c.H + h) * c.Dv + e)] = c.Lk == 0 ? 0.0 : bf(o);
        }
      }
  return out;
}

// The fused forward of case c on path `path` (1 tiled, 2 rows) with `tile_keys` keys a
// tile (0: the kernel's choice): max |fused - restated| / max |restated|.
double fused_error(const Case& c, int path, Index tile_keys, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  auto fill = [&](Index count, float scale) {
    std::vector<Bf> t(static_cast<std::size_t>(count));
    for (auto& x : t) x = static_cast<Bf>(scale * n(g));
    return t;
  };
  const auto q = fill(c.B * c.Lq * c.H * c.D, 2.0f), k = fill(c.B * c.Lk * c.H * c.D, 1.0f),
             v = fill(c.B * c.Lk * c.H * c.Dv, 1.0f);
  std::vector<char> mask;
  if (c.mask == 1 || c.mask == 3) {
    mask.resize(static_cast<std::size_t>(c.B * c.Lq * c.Lk));
    std::bernoulli_distribution keep(0.6);
    for (Index b = 0; b < c.B; ++b)
      for (Index i = 0; i < c.Lq; ++i)
        for (Index j = 0; j < c.Lk; ++j)
          mask[static_cast<std::size_t>((b * c.Lq + i) * c.Lk + j)] =
              c.mask == 1 ? keep(g) : (j >= (3 * i + 1) % 5 && j < c.Lk - (i % 3));  // starts and ends at odd keys
  } else if (c.mask == 2) {  // the causal flag, restated as its mask
    mask.resize(static_cast<std::size_t>(c.B * c.Lq * c.Lk));
    for (Index b = 0; b < c.B; ++b)
      for (Index i = 0; i < c.Lq; ++i)
        for (Index j = 0; j < c.Lk; ++j) mask[static_cast<std::size_t>((b * c.Lq + i) * c.Lk + j)] = j <= i;
  }
  const auto want = restate(c, q, k, v, mask);
  const auto d = linen::detail::check_qkv(Shape{c.B, c.Lq, c.H, c.D}, Shape{c.B, c.Lk, c.H, c.D},
                                          Shape{c.B, c.Lk, c.H, c.Dv}, "test");
  linen::AttentionOptions<Bf> o;
  if (c.mask == 1 || c.mask == 3) o.mask = linen::ArrayRef<bool>(reinterpret_cast<const bool*>(mask.data()), {c.B, 1, c.Lq, c.Lk});
  o.is_causal = c.mask == 2;
  o.force_fp32_for_softmax = c.fp32_softmax;
  linen::detail::AttentionTuning tuning;
  tuning.path = path;
  tuning.tile_keys = tile_keys;
  std::vector<Bf> out(want.size(), Bf(-12345.0f));
  linen::detail::attention_fused<Bf>(d, q.data(), k.data(), v.data(), o, out.data(), "test", tuning);
  double err = 0, mx = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(static_cast<double>(static_cast<float>(out[i])) - want[i]));
    mx = std::max(mx, std::abs(want[i]));
  }
  return mx > 0 ? err / mx : err;
}

// The fixtures' bfloat16 tolerance (tests/data/flax/README.md: max abs error / max abs value).
constexpr double kTolerance = 2e-2;

TEST(Bf16Kernels, ForwardMatchesFloat64Restatement) {
  const Case cases[] = {
      {1, 37, 130, 2, 64, 64, 0, false}, {2, 19, 67, 3, 7, 5, 0, false},  {1, 5, 1, 2, 33, 17, 0, false},
      {1, 9, 2, 1, 1, 1, 0, false},      {1, 40, 73, 2, 16, 31, 1, false}, {1, 33, 33, 2, 64, 64, 2, false},
      {1, 21, 40, 2, 9, 48, 3, false},   {1, 37, 130, 2, 64, 64, 1, true}, {1, 12, 0, 2, 8, 8, 0, false},
      {1, 1, 301, 3, 64, 64, 0, false},  {2, 2, 77, 2, 31, 33, 1, false},  {1, 1, 1, 2, 5, 3, 0, false},
      {1, 2, 45, 2, 64, 65, 3, false},   {1, 1, 129, 8, 64, 64, 2, false}, {1, 2, 50, 2, 64, 64, 0, true},
  };
  unsigned seed = 1;
  for (const Case& c : cases)
    for (int path : {1, 2})
      for (Index tk : {Index{0}, Index{5}, Index{8}}) {
        const double e = fused_error(c, path, tk, seed++);
        EXPECT_LE(e, kTolerance) << "B " << c.B << " Lq " << c.Lq << " Lk " << c.Lk << " H " << c.H << " D " << c.D
                                 << " Dv " << c.Dv << " mask " << c.mask << " fp32_softmax " << c.fp32_softmax
                                 << " path " << path << " tile_keys " << tk;
      }
}

#if LINEN_SIMD_HAS_BF16_DOT
namespace gemm = linen::detail::gemm;
namespace simd = linen::detail::simd;

// The pair member against the float member on the same (bfloat16-valued) operands, both
// operand layouts and odd K: the same bits.
TEST(Bf16Kernels, PairProductEqualsFloatFamily) {
  using P = simd::bf16::Packet;
  constexpr int MR = 6, NR = 4, QB = NR * 16;
  std::mt19937 g(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (Index K : {Index{1}, Index{2}, Index{7}, Index{64}, Index{65}})
    for (Index M : {Index{1}, Index{5}, Index{6}, Index{13}}) {
      // A [M][K] in bfloat16 (in place, row stride K + 3), B [K][QB]
      const Index am = K + 3;
      std::vector<Bf> a(static_cast<std::size_t>(M * am));
      for (auto& x : a) x = static_cast<Bf>(n(g));
      std::vector<float> af(a.size()), bfl(static_cast<std::size_t>(K * QB));
      for (std::size_t i = 0; i < a.size(); ++i) af[i] = static_cast<float>(a[i]);
      for (auto& x : bfl) x = static_cast<float>(static_cast<Bf>(n(g)));
      // B in pairs: {lo: B[2tp + 1], hi: B[2tp]} (0 past K)
      const Index pairs = (K + 1) / 2;
      std::vector<Bf> bp(static_cast<std::size_t>(pairs * 2 * QB));
      for (Index tp = 0; tp < pairs; ++tp)
        for (Index c = 0; c < QB; ++c) {
          bp[static_cast<std::size_t>(tp * 2 * QB + 2 * c + 1)] = static_cast<Bf>(bfl[static_cast<std::size_t>(2 * tp * QB + c)]);
          bp[static_cast<std::size_t>(tp * 2 * QB + 2 * c)] =
              2 * tp + 1 < K ? static_cast<Bf>(bfl[static_cast<std::size_t>((2 * tp + 1) * QB + c)]) : Bf(0.0f);
        }
      // A packed: pair (m, tp) at (tp * M + m) * 2 = {lo: A[m][2tp + 1], hi: A[m][2tp]}
      std::vector<Bf> ap(static_cast<std::size_t>(pairs * M * 2));
      for (Index tp = 0; tp < pairs; ++tp)
        for (Index m = 0; m < M; ++m) {
          ap[static_cast<std::size_t>((tp * M + m) * 2 + 1)] = a[static_cast<std::size_t>(m * am + 2 * tp)];
          ap[static_cast<std::size_t>((tp * M + m) * 2)] =
              2 * tp + 1 < K ? a[static_cast<std::size_t>(m * am + 2 * tp + 1)] : Bf(0.0f);
        }
      std::vector<float> want(static_cast<std::size_t>(M * QB)), in_place(want.size()), packed(want.size());
      gemm::strip<P, MR, NR>(M, K, af.data(), am, 1, bfl.data(), QB, want.data(), QB, 0, gemm::Zero{}, gemm::Store{});
      gemm::pair_strip<MR, NR, true>(M, K, a.data(), am, 0, bp.data(), 2 * QB, in_place.data(), QB, 0, gemm::Zero{},
                                     gemm::Store{});
      gemm::pair_strip<MR, NR, false>(M, K, ap.data(), 2, 2 * M, bp.data(), 2 * QB, packed.data(), QB, 0, gemm::Zero{},
                                      gemm::Store{});
      EXPECT_EQ(0, std::memcmp(want.data(), in_place.data(), want.size() * sizeof(float))) << "in place, K " << K << " M " << M;
      EXPECT_EQ(0, std::memcmp(want.data(), packed.data(), want.size() * sizeof(float))) << "packed, K " << K << " M " << M;
    }
}

// vdpbf16ps reads denormal operands as 0 (documented in simd.hpp): a denormal key times a
// query adds nothing, where the widened float product would be a denormal.
TEST(Bf16Kernels, PairProductReadsDenormalsAsZero) {
  alignas(64) Bf a[32], b[32];
  for (int i = 0; i < 32; ++i) {
    const std::uint16_t tiny = 0x0001;  // the smallest denormal
    std::memcpy(&a[i], &tiny, sizeof tiny);
    b[i] = Bf(1.0f);
  }
  const simd::bf16::Packet r = simd::bf16::dot2(simd::set1<simd::bf16::Packet>(0.0f), simd::bf16::load(a), simd::bf16::load(b));
  EXPECT_EQ(0.0f, simd::hsum(r));
  EXPECT_GT(static_cast<float>(a[0]) * 1.0f, 0.0f);  // the widened product is not 0
}
#else
TEST(Bf16Kernels, PairProductEqualsFloatFamily) { GTEST_SKIP() << "this build does not target avx512_bf16"; }
#endif

}  // namespace
