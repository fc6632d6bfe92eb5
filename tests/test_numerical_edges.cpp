// SPDX-License-Identifier: Apache-2.0
// Numerical edges of dot_product_attention and the modules, each pinned for both
// implementations (Reference and Fused) and, where cheap, every element type, against an
// independent restatement of Flax's maths in double that rounds where Flax rounds
// (flax/linen/attention.py, dot_product_attention_weights, and jax.nn.softmax):
//
//   query  = query / jnp.sqrt(depth).astype(dtype)             rounded to dtype
//   logits = einsum('...qhd,...khd->...hqk', query, key)       rounded to dtype
//   logits = logits + bias                                     rounded to dtype
//   logits = jnp.where(mask, logits, jnp.finfo(dtype).min)     a masked NaN is replaced
//   softmax: x_max = max(x); e = exp(x - x_max); e / sum(e)    in dtype (float32 when
//            force_fp32_for_softmax with a half dtype); a row of -inf gives
//            -inf - (-inf) = NaN; a row with a +inf gives inf - inf = NaN
//   out    = einsum('...hqk,...khd->...qhd', weights, value)   0 * NaN = NaN, 0 * inf = NaN
//
// What each edge gives (and where that differs from intuition) is written at its test.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "test_support.hpp"

namespace {

using linen::Implementation;
using linen::Index;
using linen::Shape;
using linen::Tensor;

using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
struct DtypeNames {
  template <class T>
  static std::string GetName(int) {
    return linen::dtype_name<T>();
  }
};

constexpr Implementation kImplementations[] = {Implementation::Reference, Implementation::Fused};
const char* name_of(Implementation impl) { return impl == Implementation::Fused ? "Fused" : "Reference"; }

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// x rounded to T the way XLA rounds a float32 result to T (through float32 for the half
// types); values beyond float32's range become +-inf, as a float32 computation would.
template <class T>
double rt(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    if (std::isnan(x)) return x;
    if (std::abs(x) > static_cast<double>(std::numeric_limits<float>::max())) return x > 0 ? kInf : -kInf;
    const float f = static_cast<float>(x);
    if constexpr (std::is_same_v<T, float>)
      return static_cast<double>(f);
    else
      return static_cast<double>(static_cast<T>(f));
  }
}

template <class T>
double lowest() {
  return static_cast<double>(std::numeric_limits<T>::lowest());
}

// One attention problem in Flax's layouts: q [B, Lq, H, D], k [B, Lk, H, D],
// v [B, Lk, H, Dv], bias and mask (optional) of the full weights shape [B, H, Lq, Lk].
template <class T>
struct Problem {
  Index B = 1, Lq = 1, Lk = 1, H = 1, D = 1, Dv = 1;
  std::vector<T> q, k, v, bias;
  std::vector<char> mask;
  bool force_fp32 = false;

  Problem(Index b, Index lq, Index lk, Index h, Index d, Index dv)
      : B(b),
        Lq(lq),
        Lk(lk),
        H(h),
        D(d),
        Dv(dv),
        q(static_cast<std::size_t>(b * lq * h * d)),
        k(static_cast<std::size_t>(b * lk * h * d)),
        v(static_cast<std::size_t>(b * lk * h * dv)) {}

  T& Q(Index b, Index i, Index h, Index c) { return q[static_cast<std::size_t>(((b * Lq + i) * H + h) * D + c)]; }
  T& K(Index b, Index j, Index h, Index c) { return k[static_cast<std::size_t>(((b * Lk + j) * H + h) * D + c)]; }
  T& V(Index b, Index j, Index h, Index c) { return v[static_cast<std::size_t>(((b * Lk + j) * H + h) * Dv + c)]; }
  std::size_t w_at(Index b, Index h, Index i, Index j) const {
    return static_cast<std::size_t>(((b * H + h) * Lq + i) * Lk + j);
  }
  std::size_t o_at(Index b, Index i, Index h, Index c) const {
    return static_cast<std::size_t>(((b * Lq + i) * H + h) * Dv + c);
  }
  T& Bias(Index b, Index h, Index i, Index j) {
    if (bias.empty()) bias.assign(static_cast<std::size_t>(B * H * Lq * Lk), T(0.0f));
    return bias[w_at(b, h, i, j)];
  }
  char& Mask(Index b, Index h, Index i, Index j) {
    if (mask.empty()) mask.assign(static_cast<std::size_t>(B * H * Lq * Lk), 1);
    return mask[w_at(b, h, i, j)];
  }
  void fill_normal(std::mt19937& g, float scale = 1.0f) {
    std::normal_distribution<float> nd(0.0f, scale);
    for (auto* t : {&q, &k, &v})
      for (T& x : *t) x = static_cast<T>(nd(g));
  }
};

// Flax's dot_product_attention(_weights) in double, rounding to T where Flax's dtype
// computation rounds. weights [B, H, Lq, Lk], out [B, Lq, H, Dv].
struct FlaxResult {
  std::vector<double> weights, out;
};

template <class T>
FlaxResult flax_attention(const Problem<T>& p) {
  constexpr bool half = linen::is_half_type_v<T>;
  const bool fp32 = half && p.force_fp32;
  // softmax's own rounding: dtype, or float32 under force_fp32_for_softmax
  auto rs = [&](double x) { return fp32 ? rt<float>(x) : rt<T>(x); };
  // jnp.sqrt(depth) is float32 (float64 under x64), then .astype(dtype)
  const double scale =
      std::is_same_v<T, double> ? std::sqrt(static_cast<double>(p.D)) : rt<T>(std::sqrt(static_cast<float>(p.D)));
  FlaxResult r;
  r.weights.assign(static_cast<std::size_t>(p.B * p.H * p.Lq * p.Lk), 0.0);
  r.out.assign(static_cast<std::size_t>(p.B * p.Lq * p.H * p.Dv), 0.0);
  auto at = [](const std::vector<T>& t, Index i) { return static_cast<double>(t[static_cast<std::size_t>(i)]); };
  for (Index b = 0; b < p.B; ++b)
    for (Index h = 0; h < p.H; ++h)
      for (Index i = 0; i < p.Lq; ++i) {
        std::vector<double> x(static_cast<std::size_t>(p.Lk));
        for (Index j = 0; j < p.Lk; ++j) {
          double s = 0;
          for (Index c = 0; c < p.D; ++c)
            s += rt<T>(at(p.q, ((b * p.Lq + i) * p.H + h) * p.D + c) / scale) *
                 at(p.k, ((b * p.Lk + j) * p.H + h) * p.D + c);
          s = rt<T>(s);
          if (!p.bias.empty()) s = rt<T>(s + static_cast<double>(p.bias[p.w_at(b, h, i, j)]));
          if (!p.mask.empty() && !p.mask[p.w_at(b, h, i, j)]) s = lowest<T>();
          x[static_cast<std::size_t>(j)] = s;
        }
        // x_max = jnp.max(x): XLA's max propagates NaN
        double mx = -kInf;
        for (double s : x) mx = std::isnan(s) || std::isnan(mx) ? kNaN : std::max(mx, s);
        double sum = 0;
        for (double& s : x) sum += (s = rs(std::exp(rs(s - mx))));
        sum = rs(sum);
        for (Index j = 0; j < p.Lk; ++j) r.weights[p.w_at(b, h, i, j)] = rs(x[static_cast<std::size_t>(j)] / sum);
        for (Index c = 0; c < p.Dv; ++c) {
          double acc = 0;
          for (Index j = 0; j < p.Lk; ++j)
            acc += r.weights[p.w_at(b, h, i, j)] * at(p.v, ((b * p.Lk + j) * p.H + h) * p.Dv + c);
          r.out[p.o_at(b, i, h, c)] = rt<T>(acc);
        }
      }
  return r;
}

template <class T>
linen::AttentionOptions<T> options_for(const Problem<T>& p, Implementation impl, Tensor<T, 4>& bias,
                                       Tensor<bool, 4>& mask) {
  linen::AttentionOptions<T> o;
  o.implementation = impl;
  o.force_fp32_for_softmax = p.force_fp32;
  if (!p.bias.empty()) {
    bias.resize(p.B, p.H, p.Lq, p.Lk);
    std::copy(p.bias.begin(), p.bias.end(), bias.data());
    o.bias = bias;
  }
  if (!p.mask.empty()) {
    mask.resize(p.B, p.H, p.Lq, p.Lk);
    for (std::size_t n = 0; n < p.mask.size(); ++n) mask.data()[n] = p.mask[n] != 0;
    o.mask = mask;
  }
  return o;
}

template <class T>
Tensor<T, 4> run(const Problem<T>& p, Implementation impl) {
  const linen::ConstTensorMap<T, 4> q(p.q.data(), p.B, p.Lq, p.H, p.D);
  const linen::ConstTensorMap<T, 4> k(p.k.data(), p.B, p.Lk, p.H, p.D);
  const linen::ConstTensorMap<T, 4> v(p.v.data(), p.B, p.Lk, p.H, p.Dv);
  Tensor<T, 4> bias;
  Tensor<bool, 4> mask;
  return linen::dot_product_attention(q, k, v, options_for(p, impl, bias, mask));
}

template <class T>
Tensor<T, 4> run_weights(const Problem<T>& p) {
  const linen::ConstTensorMap<T, 4> q(p.q.data(), p.B, p.Lq, p.H, p.D);
  const linen::ConstTensorMap<T, 4> k(p.k.data(), p.B, p.Lk, p.H, p.D);
  Tensor<T, 4> bias;
  Tensor<bool, 4> mask;
  return linen::dot_product_attention_weights(q, k, options_for(p, Implementation::Reference, bias, mask));
}

// got equals Flax's `want`: NaN exactly where Flax has NaN, the same infinities, and the
// fixtures' metric (max abs error / max abs value) within tolerance<T>() elsewhere.
template <class T, class Got>
::testing::AssertionResult like_flax(const Got& got, const std::vector<double>& want, double tol) {
  if (static_cast<std::size_t>(got.size()) != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  double err = 0, scale = 0;
  std::size_t worst = 0;
  for (std::size_t n = 0; n < want.size(); ++n) {
    const double g = static_cast<double>(got.data()[n]), w = want[n];
    if (std::isnan(w) != std::isnan(g) || (std::isinf(w) && g != w) || (std::isinf(g) && g != w))
      return ::testing::AssertionFailure() << "element " << n << ": got " << g << ", Flax gives " << w;
    if (!std::isfinite(w)) continue;
    scale = std::max(scale, std::abs(w));
    if (std::abs(g - w) > err) {
      err = std::abs(g - w);
      worst = n;
    }
  }
  const double rel = scale > 0 ? err / scale : err;
  if (rel > tol)
    return ::testing::AssertionFailure() << "relative error " << rel << " > " << tol << " at element " << worst
                                         << ": got " << static_cast<double>(got.data()[worst]) << ", Flax gives "
                                         << want[worst];
  return ::testing::AssertionSuccess();
}

template <class T>
double tol() {
  return linen_test::tolerance<T>();
}

template <class T>
class NumericalEdges : public ::testing::Test {};
TYPED_TEST_SUITE(NumericalEdges, ElementTypes, DtypeNames);

// ---------------------------------------------------------------------------------------
// A fully masked row gives the mean of V: masked logits become finfo(dtype).min, a finite
// number, so the row is [min, ..., min], x - x_max = 0 everywhere and every weight is
// 1 / kv_length (exactly: exp(0) = 1). Not NaN and not 0. It holds whatever the logits
// were, NaN included (jnp.where replaces them), and whatever the bias was.
TYPED_TEST(NumericalEdges, FullyMaskedRowIsTheMeanOfTheValues) {
  using T = TypeParam;
  std::mt19937 g(1);
  Problem<T> p(2, 3, 5, 2, 4, 3);
  p.fill_normal(g);
  p.Mask(0, 0, 1, 0) = 1;  // materialise the mask (all true)
  for (Index j = 0; j < p.Lk; ++j) {
    p.Mask(0, 0, 1, j) = 0;                                   // one row
    for (Index i = 0; i < p.Lq; ++i) p.Mask(1, 1, i, j) = 0;  // a whole head
    p.Mask(0, 0, 2, j) = 0;                                   // a row whose query is NaN
    p.Mask(1, 0, 0, j) = 0;                                   // a row with huge logits and bias
    p.Bias(1, 0, 0, j) = static_cast<T>(1e4f);
  }
  p.Mask(1, 0, 2, 3) = 0;  // and a partly masked row
  for (Index c = 0; c < p.D; ++c) {
    p.Q(0, 2, 0, c) = std::numeric_limits<T>::quiet_NaN();
    p.Q(1, 0, 0, c) = static_cast<T>(100.0f);
  }
  const FlaxResult want = flax_attention(p);
  const std::pair<Index, Index> full_rows[] = {{0, 1}, {0, 2}, {1, 0}};  // (b, i) of head 0
  const Tensor<T, 4> w = run_weights(p);
  EXPECT_TRUE(like_flax<T>(w, want.weights, tol<T>()));
  for (const auto& [b, i] : full_rows)
    for (Index j = 0; j < p.Lk; ++j)  // exactly 1/5 in T: exp(0) / 5
      EXPECT_EQ(static_cast<double>(w(b, 0, i, j)), rt<T>(1.0 / 5)) << b << "," << i << "," << j;
  for (Implementation impl : kImplementations) {
    SCOPED_TRACE(name_of(impl));
    const Tensor<T, 4> out = run(p, impl);
    EXPECT_TRUE(like_flax<T>(out, want.out, tol<T>()));
    for (Index c = 0; c < p.Dv; ++c) {
      double mean0 = 0, mean1[2] = {0, 0};
      for (Index j = 0; j < p.Lk; ++j) {
        mean0 += static_cast<double>(p.V(0, j, 0, c)) / 5;
        mean1[0] += static_cast<double>(p.V(1, j, 0, c)) / 5;
        mean1[1] += static_cast<double>(p.V(1, j, 1, c)) / 5;
      }
      const double t = 4 * tol<T>();
      EXPECT_NEAR(static_cast<double>(out(0, 1, 0, c)), mean0, t);
      EXPECT_NEAR(static_cast<double>(out(0, 2, 0, c)), mean0, t) << "NaN query, fully masked";
      EXPECT_NEAR(static_cast<double>(out(1, 0, 0, c)), mean1[0], t) << "logits 1e4, fully masked";
      for (Index i = 0; i < p.Lq; ++i) EXPECT_NEAR(static_cast<double>(out(1, i, 1, c)), mean1[1], t);
    }
  }
}

// A bias of -inf over a whole row: the row is [-inf, ..., -inf], x_max = -inf, and
// x - x_max = -inf - (-inf) = NaN, so Flax's weights and output for that row are NaN (a
// documented difference from a *masked* row). Other rows are unaffected (bit for bit).
// A -inf bias on some entries only gives those weights exactly 0. The mask is applied
// after the bias: a masked row is the mean of V even with -inf bias, and a row whose
// visible keys all have -inf bias averages the *masked* keys (they hold finfo.min, the
// -inf ones exp(-inf) = 0).
TYPED_TEST(NumericalEdges, MinusInfBiasRowIsNaNAndOtherRowsAreUnaffected) {
  using T = TypeParam;
  const T ninf = -std::numeric_limits<T>::infinity();
  std::mt19937 g(2);
  Problem<T> p(1, 4, 6, 2, 4, 3);
  p.fill_normal(g);
  std::normal_distribution<float> nd;
  for (Index h = 0; h < p.H; ++h)
    for (Index i = 0; i < p.Lq; ++i)
      for (Index j = 0; j < p.Lk; ++j) p.Bias(0, h, i, j) = static_cast<T>(nd(g));
  p.Mask(0, 0, 0, 0) = 1;
  for (Index j = 0; j < p.Lk; ++j) {
    p.Bias(0, 0, 1, j) = ninf;  // head 0, row 1: all -inf -> NaN
    p.Bias(0, 1, 3, j) = ninf;  // head 1, row 3: all -inf but fully masked -> mean of V
    p.Mask(0, 1, 3, j) = 0;
    if (j < 3)
      p.Mask(0, 0, 3, j) = 0;  // head 0, row 3: keys 0-2 masked, 3-5 -inf
    else
      p.Bias(0, 0, 3, j) = ninf;
  }
  p.Bias(0, 1, 2, 0) = ninf;  // head 1, row 2: two -inf entries -> weights exactly 0
  p.Bias(0, 1, 2, 3) = ninf;
  Problem<T> finite = p;  // the same with row (0, 1) finite
  for (Index j = 0; j < p.Lk; ++j) finite.Bias(0, 0, 1, j) = static_cast<T>(0.5f);

  const FlaxResult want = flax_attention(p);
  const Tensor<T, 4> w = run_weights(p);
  EXPECT_TRUE(like_flax<T>(w, want.weights, tol<T>()));
  for (Index j = 0; j < p.Lk; ++j) {
    EXPECT_TRUE(std::isnan(static_cast<double>(w(0, 0, 1, j)))) << j;
    if (j == 0 || j == 3)
      EXPECT_EQ(static_cast<double>(w(0, 1, 2, j)), 0.0) << j;
    else
      EXPECT_GT(static_cast<double>(w(0, 1, 2, j)), 0.0) << j;
    EXPECT_EQ(static_cast<double>(w(0, 0, 3, j)), j < 3 ? rt<T>(1.0 / 3) : 0.0) << j;
  }
  for (Implementation impl : kImplementations) {
    SCOPED_TRACE(name_of(impl));
    const Tensor<T, 4> out = run(p, impl);
    const Tensor<T, 4> ref = run(finite, impl);
    EXPECT_TRUE(like_flax<T>(out, want.out, tol<T>()));
    for (Index i = 0; i < p.Lq; ++i)
      for (Index h = 0; h < p.H; ++h)
        for (Index c = 0; c < p.Dv; ++c) {
          const double o = static_cast<double>(out(0, i, h, c));
          if (i == 1 && h == 0) {
            EXPECT_TRUE(std::isnan(o)) << c;
          } else {
            EXPECT_EQ(std::memcmp(&out(0, i, h, c), &ref(0, i, h, c), sizeof(T)), 0)
                << "row " << i << " head " << h << ": " << o << " vs " << static_cast<double>(ref(0, i, h, c));
          }
        }
    for (Index c = 0; c < p.Dv; ++c) {
      double all = 0, first3 = 0;
      for (Index j = 0; j < p.Lk; ++j) {
        all += static_cast<double>(p.V(0, j, 1, c)) / 6;
        if (j < 3) first3 += static_cast<double>(p.V(0, j, 0, c)) / 3;
      }
      EXPECT_NEAR(static_cast<double>(out(0, 3, 1, c)), all, 4 * tol<T>()) << "masked row with -inf bias";
      EXPECT_NEAR(static_cast<double>(out(0, 3, 0, c)), first3, 4 * tol<T>()) << "the masked keys' mean";
    }
  }
}

// NaN in a masked-out key: its logits are NaN, and Flax's jnp.where(mask, logits, big_neg)
// replaces them with finfo.min, so every row that does not see the key is finite (and
// equal, bit for bit, to the result with a finite key there). A row that sees the NaN key
// gets a NaN logit, hence x_max = NaN: the whole row is NaN.
TYPED_TEST(NumericalEdges, NaNInAMaskedOutKeyIsReplacedByTheMask) {
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::mt19937 g(3);
  for (Index lq : {1, 4}) {  // 1: the decode-step kernel; 4: the tiled kernel
    SCOPED_TRACE("q_length " + std::to_string(lq));
    Problem<T> p(2, lq, 7, 2, 4, 3);
    p.fill_normal(g);
    Problem<T> clean = p;
    for (Index h = 0; h < p.H; ++h)
      for (Index c = 0; c < p.D; ++c) {
        p.K(0, 2, h, c) = nan;  // batch 0, key 2: masked for every row
        p.K(1, 6, h, c) = nan;  // batch 1, key 6: masked for row 0 only
      }
    for (Index h = 0; h < p.H; ++h)
      for (Index i = 0; i < p.Lq; ++i) {
        p.Mask(0, h, i, 2) = 0;
        if (i == 0) p.Mask(1, h, i, 6) = 0;
      }
    clean.mask = p.mask;
    const FlaxResult want = flax_attention(p);
    for (Implementation impl : kImplementations) {
      SCOPED_TRACE(name_of(impl));
      const Tensor<T, 4> out = run(p, impl);
      const Tensor<T, 4> ref = run(clean, impl);
      EXPECT_TRUE(like_flax<T>(out, want.out, tol<T>()));
      for (Index i = 0; i < p.Lq; ++i)
        for (Index h = 0; h < p.H; ++h)
          for (Index c = 0; c < p.Dv; ++c) {
            EXPECT_EQ(std::memcmp(&out(0, i, h, c), &ref(0, i, h, c), sizeof(T)), 0) << i << "," << h << "," << c;
            if (i == 0)
              EXPECT_EQ(std::memcmp(&out(1, i, h, c), &ref(1, i, h, c), sizeof(T)), 0) << h << "," << c;
            else
              EXPECT_TRUE(std::isnan(static_cast<double>(out(1, i, h, c)))) << i << "," << h << "," << c;
          }
    }
  }
}

// NaN (or inf) in the value row of a masked-out key: its weight is exactly 0, but the
// output is einsum(weights, value) and 0 * NaN = NaN (0 * inf = NaN) in IEEE arithmetic,
// so Flax's output is NaN for every query row of that batch entry and head, masked or
// not. (A padding mask does not protect against garbage in the padded value rows.)
// Checked with the masked key among visible ones and with a long padded tail (whole key
// tiles and chunks masked), on the tiled (q_length 3) and decode-step (q_length 1) paths.
TYPED_TEST(NumericalEdges, NaNValueUnderAMaskedOutKeySpreadsLikeFlax) {
  using T = TypeParam;
  std::mt19937 g(4);
  struct Case {
    Index lq, lk, masked_from, bad;
  };
  // masked_from: keys >= masked_from are masked (padding); bad: the key whose value row is
  // non-finite (also masked out when below masked_from).
  const Case cases[] = {{3, 6, 6, 2}, {1, 6, 6, 2}, {3, 600, 256, 550}, {1, 600, 256, 550}, {3, 40, 20, 35}};
  for (const Case& cs : cases) {
    SCOPED_TRACE("q_length " + std::to_string(cs.lq) + ", kv_length " + std::to_string(cs.lk) + ", bad value row " +
                 std::to_string(cs.bad));
    Problem<T> p(1, cs.lq, cs.lk, 2, 4, 3);
    p.fill_normal(g);
    for (Index h = 0; h < p.H; ++h)
      for (Index i = 0; i < p.Lq; ++i)
        for (Index j = 0; j < p.Lk; ++j) p.Mask(0, h, i, j) = j < cs.masked_from && j != cs.bad;
    for (Index c = 0; c < p.Dv; ++c) {
      p.V(0, cs.bad, 0, c) = std::numeric_limits<T>::quiet_NaN();  // head 0: NaN
      p.V(0, cs.bad, 1, c) = std::numeric_limits<T>::infinity();   // head 1: +inf
    }
    const FlaxResult want = flax_attention(p);
    for (double o : want.out) ASSERT_TRUE(std::isnan(o));  // the derivation above
    for (Implementation impl : kImplementations) {
      SCOPED_TRACE(name_of(impl));
      const Tensor<T, 4> out = run(p, impl);
      EXPECT_TRUE(like_flax<T>(out, want.out, tol<T>()));
    }
  }
}

// The same through linen's is_causal flag, documented as equivalent to passing
// make_causal_mask's mask: a non-finite value row in the future of every query but the
// last makes every row NaN, as the explicit causal mask does in Flax.
TYPED_TEST(NumericalEdges, NaNValueInTheFutureUnderIsCausalLikeTheCausalMask) {
  using T = TypeParam;
  std::mt19937 g(6);
  for (Index lq : {300, 3, 1}) {
    SCOPED_TRACE("q_length " + std::to_string(lq));
    Problem<T> p(1, lq, 300, 1, 4, 2);
    p.fill_normal(g);
    for (Index c = 0; c < p.Dv; ++c) p.V(0, 299, 0, c) = std::numeric_limits<T>::quiet_NaN();
    Problem<T> masked = p;  // make_causal_mask's pattern: key j visible to query i iff j <= i
    for (Index i = 0; i < p.Lq; ++i)
      for (Index j = 0; j < p.Lk; ++j) masked.Mask(0, 0, i, j) = j <= i;
    const FlaxResult want = flax_attention(masked);
    for (double o : want.out) ASSERT_TRUE(std::isnan(o));
    const linen::ConstTensorMap<T, 4> q(p.q.data(), 1, p.Lq, 1, p.D), k(p.k.data(), 1, p.Lk, 1, p.D),
        v(p.v.data(), 1, p.Lk, 1, p.Dv);
    for (Implementation impl : kImplementations) {
      SCOPED_TRACE(name_of(impl));
      EXPECT_TRUE(like_flax<T>(run(masked, impl), want.out, tol<T>())) << "causal mask";
      linen::AttentionOptions<T> o;
      o.implementation = impl;
      o.is_causal = true;
      EXPECT_TRUE(like_flax<T>(linen::dot_product_attention(q, k, v, o), want.out, tol<T>())) << "is_causal";
    }
  }
}

// Logits of +-1e4 stay finite: softmax subtracts the row max first, so exp never
// overflows and the weights are those of the logits' differences. Row 0: [1e4, 9950,
// -1e4] -> weights ~[1, e^-50, 0]: the output is V[0]; row 1: [-1e4, -9950, 1e4] ->
// exactly V[2]; row 2: [-10000, -9999, -9998] (all hugely negative) -> softmax([0, 1, 2])
// = [0.090, 0.245, 0.665], not 0/0. The values are chosen so that every product and sum
// is exact in float32 (in the half types the keys round, which the restatement follows).
TYPED_TEST(NumericalEdges, LogitsOfPlusMinus1e4StayFinite) {
  using T = TypeParam;
  Problem<T> p(1, 3, 3, 1, 4, 2);
  std::fill(p.q.begin(), p.q.end(), T(0.0f));
  std::fill(p.k.begin(), p.k.end(), T(0.0f));
  // depth 4: the query is divided by 2
  p.Q(0, 0, 0, 0) = T(200.0f);   // q/2 = 100
  p.Q(0, 1, 0, 0) = T(-200.0f);  // -100
  p.Q(0, 2, 0, 1) = T(128.0f);   // 64 on the second component
  const float k0[3] = {100.0f, 99.5f, -100.0f};
  const float k1[3] = {-10000.0f / 64, -9999.0f / 64, -9998.0f / 64};
  for (Index j = 0; j < 3; ++j) {
    p.K(0, j, 0, 0) = static_cast<T>(k0[j]);
    p.K(0, j, 0, 1) = static_cast<T>(k1[j]);
  }
  for (Index j = 0; j < 3; ++j)
    for (Index c = 0; c < 2; ++c) p.V(0, j, 0, c) = static_cast<T>(static_cast<float>(j + 1) * (c ? -1.0f : 1.0f));
  const FlaxResult want = flax_attention(p);
  for (double o : want.out) ASSERT_TRUE(std::isfinite(o));
  const Tensor<T, 4> w = run_weights(p);
  EXPECT_TRUE(like_flax<T>(w, want.weights, tol<T>()));
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const double e1 = std::exp(1.0), e2 = std::exp(2.0), z = 1 + e1 + e2;
    EXPECT_NEAR(static_cast<double>(w(0, 0, 2, 0)), 1 / z, 1e-6);
    EXPECT_NEAR(static_cast<double>(w(0, 0, 2, 1)), e1 / z, 1e-6);
    EXPECT_NEAR(static_cast<double>(w(0, 0, 2, 2)), e2 / z, 1e-6);
  }
  for (Implementation impl : kImplementations) {
    SCOPED_TRACE(name_of(impl));
    const Tensor<T, 4> out = run(p, impl);
    EXPECT_TRUE(like_flax<T>(out, want.out, tol<T>()));
    for (Index c = 0; c < 2; ++c) {
      EXPECT_NEAR(static_cast<double>(out(0, 0, 0, c)), static_cast<double>(p.V(0, 0, 0, c)), 1e-6);
      EXPECT_NEAR(static_cast<double>(out(0, 1, 0, c)), static_cast<double>(p.V(0, 2, 0, c)), 1e-6);
    }
  }
}

// q_length 1 and kv_length 1: one key means softmax([x]) = exp(0) / exp(0) = 1 exactly, so
// the output *is* the value, bit for bit, in every type, masked or not (a masked single
// key still has weight 1); with a -inf bias it is NaN. q_length 5 against one key: every
// row is V[0]. q_length 1 against 7 keys: as Flax.
TYPED_TEST(NumericalEdges, SingleQueryAndSingleKey) {
  using T = TypeParam;
  std::mt19937 g(5);
  for (int variant = 0; variant < 3; ++variant) {  // plain, masked, -inf bias
    SCOPED_TRACE("variant " + std::to_string(variant));
    for (Index lq : {1, 5}) {
      Problem<T> p(2, lq, 1, 3, 4, 5);
      p.fill_normal(g, 3.0f);
      for (Index b = 0; b < p.B; ++b)
        for (Index h = 0; h < p.H; ++h)
          for (Index i = 0; i < p.Lq; ++i) {
            if (variant == 1) p.Mask(b, h, i, 0) = 0;
            if (variant == 2) p.Bias(b, h, i, 0) = -std::numeric_limits<T>::infinity();
          }
      const Tensor<T, 4> w = run_weights(p);
      for (Index n = 0; n < w.size(); ++n) {
        if (variant == 2)
          EXPECT_TRUE(std::isnan(static_cast<double>(w.data()[n])));
        else
          EXPECT_EQ(static_cast<double>(w.data()[n]), 1.0);
      }
      for (Implementation impl : kImplementations) {
        SCOPED_TRACE(name_of(impl));
        const Tensor<T, 4> out = run(p, impl);
        for (Index b = 0; b < p.B; ++b)
          for (Index i = 0; i < p.Lq; ++i)
            for (Index h = 0; h < p.H; ++h)
              for (Index c = 0; c < p.Dv; ++c) {
                if (variant == 2) {
                  EXPECT_TRUE(std::isnan(static_cast<double>(out(b, i, h, c))));
                } else {
                  EXPECT_EQ(std::memcmp(&out(b, i, h, c), &p.V(b, 0, h, c), sizeof(T)), 0)
                      << static_cast<double>(out(b, i, h, c)) << " vs " << static_cast<double>(p.V(b, 0, h, c));
                }
              }
      }
    }
  }
  Problem<T> p(2, 1, 7, 3, 4, 5);
  p.fill_normal(g);
  p.Mask(1, 2, 0, 4) = 0;
  const FlaxResult want = flax_attention(p);
  for (Implementation impl : kImplementations) {
    SCOPED_TRACE(name_of(impl));
    EXPECT_TRUE(like_flax<T>(run(p, impl), want.out, tol<T>()));
  }
}

// Zero-sized dims: a batch of 0 gives an empty output of the right shape (rank 4 and with
// two batch dims); kv_length 0 is a softmax over nothing, and Flax's einsum over an empty
// axis gives zeros; q_length 0 gives an empty output.
TYPED_TEST(NumericalEdges, ZeroSizedBatchAndEmptyLengths) {
  using T = TypeParam;
  for (Implementation impl : kImplementations) {
    SCOPED_TRACE(name_of(impl));
    linen::AttentionOptions<T> o;
    o.implementation = impl;
    {
      Tensor<T, 4> q(0, 3, 2, 4), k(0, 5, 2, 4), v(0, 5, 2, 6);
      Tensor<bool, 4> mask(0, 2, 3, 5);
      o.mask = mask;
      EXPECT_EQ(linen::shape_of(linen::dot_product_attention(q, k, v, o)), (Shape{0, 3, 2, 6}));
      EXPECT_EQ(linen::shape_of(linen::dot_product_attention_weights(q, k, o)), (Shape{0, 2, 3, 5}));
      o.mask = {};
    }
    {
      Tensor<T, 5> q(2, 0, 3, 2, 4), k(2, 0, 5, 2, 4), v(2, 0, 5, 2, 6);
      EXPECT_EQ(linen::shape_of(linen::dot_product_attention(q, k, v, o)), (Shape{2, 0, 3, 2, 6}));
    }
    {
      Tensor<T, 4> q(2, 3, 2, 4), k(2, 0, 2, 4), v(2, 0, 2, 6);
      q.setConstant(T(1.5f));
      Tensor<bool, 4> mask(2, 1, 3, 0);
      o.mask = mask;
      const Tensor<T, 4> out = linen::dot_product_attention(q, k, v, o);
      ASSERT_EQ(linen::shape_of(out), (Shape{2, 3, 2, 6}));
      for (Index n = 0; n < out.size(); ++n) EXPECT_EQ(static_cast<double>(out.data()[n]), 0.0);
      EXPECT_EQ(linen::shape_of(linen::dot_product_attention_weights(q, k, o)), (Shape{2, 2, 3, 0}));
      o.mask = {};
    }
    {
      Tensor<T, 3> q(0, 2, 4), k(5, 2, 4), v(5, 2, 6);
      k.setConstant(T(1.0f));
      v.setConstant(T(1.0f));
      EXPECT_EQ(linen::shape_of(linen::dot_product_attention(q, k, v, o)), (Shape{0, 2, 6}));
    }
  }
}

// ---------------------------------------------------------------------------------------
// float16 with |q|, |k| near 300. Flax computes the logits with einsum in float16, so
// q/sqrt(d) . k = 150 * 300 * 4 = 180000 is rounded to float16: +inf (max 65504). A row
// holding a +inf logit has x_max = +inf and inf - inf = NaN: the whole row is NaN. Under
// force_fp32_for_softmax Flax only casts the float16 logits (already inf) to float32
// before the softmax, so the same rows are NaN: the flag does not rescue logits that
// overflowed in the product. Logits that overflow to -inf (a finite max) get weight 0.
// bfloat16 has float32's range: the same inputs stay finite.
template <class T>
Problem<T> overflow_problem(bool force_fp32) {
  Problem<T> p(1, 4, 4, 1, 4, 2);
  p.force_fp32 = force_fp32;
  const float q[4][4] = {{300, 300, 300, 300},  // q/2 = 150: 180000 -> +inf (and -inf)
                         {0.5f, 0.5f, 0.5f, 0.5f},
                         {100, 100, 0, 0},  // q/2 = 50: [30000, 25, -30000, -70000 -> -inf]
                         {-300, -300, -300, -300}};
  const float k[4][4] = {
      {300, 300, 300, 300}, {0.25f, 0.25f, 0.25f, 0.25f}, {-300, -300, -300, -300}, {-700, -700, 0, 0}};
  for (Index i = 0; i < 4; ++i)
    for (Index c = 0; c < 4; ++c) {
      p.Q(0, i, 0, c) = static_cast<T>(q[i][c]);
      p.K(0, i, 0, c) = static_cast<T>(k[i][c]);
    }
  for (Index j = 0; j < 4; ++j)
    for (Index c = 0; c < 2; ++c)
      p.V(0, j, 0, c) = static_cast<T>(0.5f * static_cast<float>(j + 1) + static_cast<float>(c));
  return p;
}

TEST(NumericalEdgesHalf, Float16LogitsOverflowToNaNRowsWithAndWithoutFp32Softmax) {
  using T = Eigen::half;
  for (bool fp32 : {false, true}) {
    SCOPED_TRACE(fp32 ? "force_fp32_for_softmax" : "float16 softmax");
    const Problem<T> p = overflow_problem<T>(fp32);
    const FlaxResult want = flax_attention(p);
    // The derivation, row by row: 0 and 3 hold +inf logits -> NaN; 1 and 2 are finite and
    // pick key 0 (logit 300 against <= 0.25; 30000 against 25, -30000 and -inf).
    for (Index i = 0; i < 4; ++i)
      for (Index c = 0; c < 2; ++c) {
        const double o = want.out[p.o_at(0, i, 0, c)];
        if (i == 0 || i == 3)
          ASSERT_TRUE(std::isnan(o)) << i;
        else
          ASSERT_NEAR(o, 0.5 + c, 1e-3) << i;
      }
    EXPECT_EQ(want.weights[p.w_at(0, 0, 2, 3)], 0.0);  // the -inf logit's weight
    EXPECT_TRUE(like_flax<T>(run_weights(p), want.weights, tol<T>()));
    for (Implementation impl : kImplementations) {
      SCOPED_TRACE(name_of(impl));
      EXPECT_TRUE(like_flax<T>(run(p, impl), want.out, tol<T>()));
    }
  }
}

TEST(NumericalEdgesHalf, Bfloat16HasTheRangeTheSameInputsStayFinite) {
  using T = Eigen::bfloat16;
  for (bool fp32 : {false, true}) {
    const Problem<T> p = overflow_problem<T>(fp32);
    const FlaxResult want = flax_attention(p);
    for (double o : want.out) ASSERT_TRUE(std::isfinite(o));
    for (Implementation impl : kImplementations) {
      SCOPED_TRACE(name_of(impl));
      EXPECT_TRUE(like_flax<T>(run(p, impl), want.out, tol<T>()));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Through the modules.

// In double: x [B, L, F] projected by a DenseGeneral kernel [F, H, Dh] + bias [H, Dh].
template <class P>
std::vector<double> project(const Tensor<double, 3>& x, const linen::DenseParams<P, 1, 2>& d) {
  const Index B = x.dimension(0), L = x.dimension(1), F = x.dimension(2);
  const Index H = d.kernel.dimension(1), Dh = d.kernel.dimension(2);
  std::vector<double> y(static_cast<std::size_t>(B * L * H * Dh));
  for (Index b = 0; b < B; ++b)
    for (Index l = 0; l < L; ++l)
      for (Index h = 0; h < H; ++h)
        for (Index e = 0; e < Dh; ++e) {
          double s = static_cast<double>(d.bias(h, e));
          for (Index f = 0; f < F; ++f) s += x(b, l, f) * static_cast<double>(d.kernel(f, h, e));
          y[static_cast<std::size_t>(((b * L + l) * H + h) * Dh + e)] = s;
        }
  return y;
}

// The out projection of one attended row a [H, Dh]: [out_features].
template <class P>
std::vector<double> out_project(const std::vector<double>& a, const linen::DenseParams<P, 2, 1>& d) {
  const Index H = d.kernel.dimension(0), Dh = d.kernel.dimension(1), O = d.kernel.dimension(2);
  std::vector<double> y(static_cast<std::size_t>(O));
  for (Index o = 0; o < O; ++o) {
    double s = static_cast<double>(d.bias(o));
    for (Index h = 0; h < H; ++h)
      for (Index e = 0; e < Dh; ++e)
        s += a[static_cast<std::size_t>(h * Dh + e)] * static_cast<double>(d.kernel(h, e, o));
    y[static_cast<std::size_t>(o)] = s;
  }
  return y;
}

template <class T>
Tensor<T, 3> random_input(Index b, Index l, Index f, std::uint32_t seed, Tensor<double, 3>* exact = nullptr) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  Tensor<T, 3> x(b, l, f);
  for (Index n = 0; n < x.size(); ++n) x.data()[n] = static_cast<T>(nd(g));
  if (exact) *exact = x.template cast<double>();
  return x;
}

// Random parameters of a sensible size (the fixtures' recipe) with non-zero biases, so
// that the mean of V is not the mean of zero-bias projections.
template <class T>
linen::AttentionConfig<T, float> module_config(Index heads) {
  linen::AttentionConfig<T, float> cfg;
  cfg.num_heads = heads;
  cfg.bias_init = linen::initializers::normal{0.2};
  return cfg;
}

// SelfAttention with a mask that leaves some query rows nothing to see: those rows are
// the out projection of the mean of the value projections (Flax's behaviour through the
// module). Compared with that, computed in double from the parameters.
TYPED_TEST(NumericalEdges, SelfAttentionFullyMaskedRowsAverageTheValues) {
  using T = TypeParam;
  const Index B = 2, L = 4, F = 8, H = 2, Dh = 4;
  const linen::SelfAttention<T, float> attn(module_config<T>(H));
  Tensor<double, 3> xd;
  const Tensor<T, 3> x = random_input<T>(B, L, F, 7, &xd);
  const auto vars = attn.init(linen::random::key(0), x);
  Tensor<bool, 4> mask(B, 1, L, L);  // causal, with row 1 of batch 0 and row 3 of batch 1 empty
  for (Index b = 0; b < B; ++b)
    for (Index i = 0; i < L; ++i)
      for (Index j = 0; j < L; ++j) mask(b, 0, i, j) = j <= i && !(b == 0 && i == 1) && !(b == 1 && i == 3);
  linen::CallOptions<T> call;
  call.mask = mask;
  const Tensor<T, 3> out = attn.apply(vars, x, call);
  const std::vector<double> v = project(xd, vars.params.value);
  for (const auto& [b, i] : {std::pair<Index, Index>{0, 1}, {1, 3}}) {
    std::vector<double> mean(static_cast<std::size_t>(H * Dh), 0.0);
    for (Index j = 0; j < L; ++j)
      for (Index e = 0; e < H * Dh; ++e)
        mean[static_cast<std::size_t>(e)] += v[static_cast<std::size_t>((b * L + j) * H * Dh + e)] / L;
    const std::vector<double> want = out_project(mean, vars.params.out);
    double scale = 0, err = 0;
    for (Index o = 0; o < F; ++o) {
      scale = std::max(scale, std::abs(want[static_cast<std::size_t>(o)]));
      err = std::max(err, std::abs(static_cast<double>(out(b, i, o)) - want[static_cast<std::size_t>(o)]));
    }
    EXPECT_LE(err / scale, 4 * tol<T>()) << "batch " << b << " row " << i;
  }
}

// Decoding, a step whose mask hides every key: Flax combines the caller's mask with
// arange(max_length) <= cur_index, so the step's row is fully masked over the whole cache
// and averages all max_length cached values, the not-yet-written zero slots included.
TEST(NumericalEdgesModules, DecodeStepWithEverythingMaskedAveragesTheWholeCache) {
  const Index F = 8, H = 2, Dh = 4, max_length = 5;
  auto cfg = module_config<float>(H);
  cfg.decode = true;
  const linen::SelfAttention<float> attn(cfg);
  Tensor<double, 3> xd;
  const Tensor<float, 3> x = random_input<float>(1, max_length, F, 8, &xd);
  auto vars = attn.init(linen::random::key(1), x);
  const std::vector<double> v = project(xd, vars.params.value);
  Tensor<bool, 4> none(1, 1, 1, max_length);
  none.setConstant(false);
  for (Index step = 0; step < 3; ++step) {
    linen::CallOptions<float> call;
    if (step == 2) call.mask = none;
    const Eigen::array<Index, 3> off{0, step, 0}, ext{1, 1, F};
    const Tensor<float, 3> xt = x.slice(off, ext);
    const Tensor<float, 3> out = attn.apply(vars, xt, call);
    if (step < 2) continue;
    std::vector<double> mean(static_cast<std::size_t>(H * Dh), 0.0);
    for (Index j = 0; j <= step; ++j)  // slots past the step hold zeros
      for (Index e = 0; e < H * Dh; ++e)
        mean[static_cast<std::size_t>(e)] += v[static_cast<std::size_t>(j * H * Dh + e)] / max_length;
    const std::vector<double> want = out_project(mean, vars.params.out);
    for (Index o = 0; o < F; ++o) EXPECT_NEAR(out(0, 0, o), want[static_cast<std::size_t>(o)], 1e-5) << o;
  }
}

// Zero-sized batches through init and apply: the parameters do not depend on the batch
// (same key, same parameters as with a batch of 2), the output is empty with the right
// shape, and a decode cache of batch 0 steps like any other.
TEST(NumericalEdgesModules, ZeroSizedBatchInitAndApply) {
  const Index L = 5, F = 8;
  const linen::AttentionConfig<float> cfg = module_config<float>(2);
  const linen::SelfAttention<float> attn(cfg);
  const Tensor<float, 3> x0(0, L, F), x2 = random_input<float>(2, L, F, 9);
  const auto v0 = attn.init(linen::random::key(3), x0);
  const auto v2 = attn.init(linen::random::key(3), x2);
  auto same = [](const auto& a, const auto& b) {
    return linen::shape_of(a) == linen::shape_of(b) &&
           std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
  };
  EXPECT_TRUE(same(v0.params.query.kernel, v2.params.query.kernel));
  EXPECT_TRUE(same(v0.params.key.kernel, v2.params.key.kernel));
  EXPECT_TRUE(same(v0.params.value.bias, v2.params.value.bias));
  EXPECT_TRUE(same(v0.params.out.kernel, v2.params.out.kernel));
  EXPECT_EQ(linen::shape_of(attn.apply(v0, x0)), (Shape{0, L, F}));
  EXPECT_EQ(linen::shape_of(attn.apply(v2, x0)), (Shape{0, L, F}));
  const Tensor<float, 4> x4(2, 0, L, F);
  EXPECT_EQ(linen::shape_of(attn.apply(v2, x4)), (Shape{2, 0, L, F}));
  Tensor<bool, 4> mask(0, 1, L, L);
  linen::CallOptions<float> call;
  call.mask = mask;
  EXPECT_EQ(linen::shape_of(attn.apply(v2, x0, call)), (Shape{0, L, F}));

  auto dcfg = cfg;
  dcfg.decode = true;
  const linen::SelfAttention<float> dec(dcfg);
  auto dv = dec.init(linen::random::key(3), x0);
  ASSERT_TRUE(dv.cache.has_value());
  EXPECT_EQ(linen::shape_of(dv.cache->cached_key), (Shape{0, L, 2, 4}));
  const Tensor<float, 3> step(0, 1, F);
  EXPECT_EQ(linen::shape_of(dec.apply(dv, step)), (Shape{0, 1, F}));
  EXPECT_EQ(dv.cache->cache_index, 1);
  auto cache = dec.init_cache(v2.params, {0}, 3);
  EXPECT_EQ(linen::shape_of(dec.apply(v2.params, cache, step)), (Shape{0, 1, F}));
  EXPECT_EQ(cache.cache_index, 1);
}

// kv_length 0 through MultiHeadDotProductAttention: the attention is zeros (softmax over
// nothing, einsum over an empty axis), so every output row is exactly the out bias.
// q_length 0 gives an empty output. q_length = kv_length = 1 through SelfAttention: the
// single weight is 1, so the output is the out projection of the value projection.
TYPED_TEST(NumericalEdges, ModulesWithEmptyAndSingletonLengths) {
  using T = TypeParam;
  const Index F = 8, H = 2;
  const linen::MultiHeadDotProductAttention<T, float> mha(module_config<T>(H));
  const Tensor<T, 3> q = random_input<T>(2, 3, F, 10), kv(2, 0, F);
  const auto vars = mha.init(linen::random::key(4), q, kv);
  const Tensor<T, 3> out = mha.apply(vars, q, kv);
  ASSERT_EQ(linen::shape_of(out), (Shape{2, 3, F}));
  for (Index b = 0; b < 2; ++b)
    for (Index i = 0; i < 3; ++i)
      for (Index o = 0; o < F; ++o)
        EXPECT_EQ(static_cast<double>(out(b, i, o)), static_cast<double>(static_cast<T>(vars.params.out.bias(o))));
  const Tensor<T, 3> q0(2, 0, F);
  const Tensor<T, 3> kv3 = random_input<T>(2, 3, F, 11);
  EXPECT_EQ(linen::shape_of(mha.apply(vars, q0, kv3)), (Shape{2, 0, F}));

  const linen::SelfAttention<T, float> self(module_config<T>(H));
  Tensor<double, 3> xd;
  const Tensor<T, 3> x1 = random_input<T>(3, 1, F, 12, &xd);
  const auto sv = self.init(linen::random::key(5), x1);
  const Tensor<T, 3> y = self.apply(sv, x1);
  const std::vector<double> v = project(xd, sv.params.value);
  for (Index b = 0; b < 3; ++b) {
    const std::vector<double> row(v.begin() + b * F, v.begin() + (b + 1) * F);
    const std::vector<double> want = out_project(row, sv.params.out);
    double scale = 0, err = 0;
    for (Index o = 0; o < F; ++o) {
      scale = std::max(scale, std::abs(want[static_cast<std::size_t>(o)]));
      err = std::max(err, std::abs(static_cast<double>(y(b, 0, o)) - want[static_cast<std::size_t>(o)]));
    }
    EXPECT_LE(err / scale, 4 * tol<T>()) << "batch " << b;
  }
}

}  // namespace
