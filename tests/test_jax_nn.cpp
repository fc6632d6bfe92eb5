// SPDX-License-Identifier: Apache-2.0
// linen::jax_nn::dot_product_attention (jax.nn.dot_product_attention's XLA path) and the
// kernels' index rules (GQA, key bands, sequence lengths) under both logit policies:
// against a float64 restatement of jax/_src/nn/functions.py's _dot_product_attention_core
// written below (with the casts the source makes), and by properties (GQA equals MHA with
// the K/V heads repeated, bit for bit; a window equals its band as a mask; sequence
// lengths equal a padding mask plus zeroed rows). Registered per ISA level (label isa).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <linen/dot_product_attention.hpp>
#include <linen/jax_nn.hpp>

namespace {

using linen::ArrayRef;
using linen::Index;
using linen::Shape;
using linen::Tensor;
namespace jn = linen::jax_nn;

template <class T, int N>
Tensor<T, N> random_tensor(const std::array<Index, N>& dims, unsigned seed, double lo = -1.0, double hi = 1.0) {
  Tensor<T, N> t(dims);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(u(rng));
  return t;
}

// Element (b, n, t, s) of an array broadcast (numpy's rules, ones prepended) to [B, N, T, S].
template <class X>
X at4(const ArrayRef<X>& a, Index b, Index n, Index t, Index s) {
  Shape sh = a.shape();
  sh.insert(sh.begin(), 4 - sh.size(), Index{1});
  const Index c[4] = {b, n, t, s};
  Index off = 0;
  for (int i = 0; i < 4; ++i) off = off * sh[static_cast<std::size_t>(i)] + (sh[static_cast<std::size_t>(i)] == 1 ? 0 : c[i]);
  return a.data()[off];
}

struct Expected {
  std::vector<double> out;  // [B, T, N, H], values of T
  std::vector<double> lse;  // [B, T, N], values of T
};

// The float64 restatement of _dot_product_attention_xla (query [B, T, N, H], key and value
// [B, S, K, H]), step by step with the source's casts:
//   logits = einsum(q, k, preferred_element_type=C): exact products, summed (here in double),
//   rounded to C = promote_types(T, float32);
//   logits *= jnp.array(scale, C); logits = (logits + bias).astype(C);
//   where(combined_mask, logits, -0.7 * min(finfo(C).max, finfo(float32).max) as C);
//   .astype(float32); softmax (here in double, rounded to float32); .astype(T);
//   encoded = einsum(probs, value) (here in double) rounded to T; encoded *= q_mask;
//   lse = logsumexp(float32 logits).astype(T).
template <class T>
Expected restatement(const Tensor<T, 4>& q, const Tensor<T, 4>& k, const Tensor<T, 4>& v, const jn::Options<T>& o) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Index B = q.dimension(0), Tq = q.dimension(1), N = q.dimension(2), H = q.dimension(3);
  const Index S = k.dimension(1), K = k.dimension(2), G = N / K;
  const C scale = static_cast<C>(o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(H)));
  const double cmax = std::is_same_v<C, double> ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  const C fill = static_cast<C>(-0.7 * std::min(cmax, static_cast<double>(std::numeric_limits<float>::max())));
  const bool any_mask = o.mask || o.is_causal || o.query_seq_lengths || o.key_value_seq_lengths || o.local_window_size;
  Expected e;
  e.out.assign(static_cast<std::size_t>(B * Tq * N * H), 0.0);
  e.lse.assign(static_cast<std::size_t>(B * Tq * N), 0.0);
  std::vector<float> x(static_cast<std::size_t>(S));
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n)
      for (Index t = 0; t < Tq; ++t) {
        const Index kh = n / G;
        for (Index s = 0; s < S; ++s) {
          double dot = 0;
          for (Index h = 0; h < H; ++h) dot += static_cast<double>(q(b, t, n, h)) * static_cast<double>(k(b, s, kh, h));
          C lg = static_cast<C>(dot);
          lg = static_cast<C>(lg * scale);
          if (o.bias) lg = static_cast<C>(lg + static_cast<C>(at4(o.bias, b, n, t, s)));
          bool keep = true;
          if (o.mask) keep = keep && at4(o.mask, b, n, t, s);
          if (o.is_causal) keep = keep && s <= t;
          if (o.local_window_size)
            keep = keep && t <= s + o.local_window_size->left && t >= s - o.local_window_size->right;
          if (o.query_seq_lengths) keep = keep && t < o.query_seq_lengths.data()[b];
          if (o.key_value_seq_lengths) keep = keep && s < o.key_value_seq_lengths.data()[b];
          if (any_mask && !keep) lg = fill;
          x[static_cast<std::size_t>(s)] = static_cast<float>(lg);
        }
        double m = -std::numeric_limits<double>::infinity();
        for (Index s = 0; s < S; ++s) m = std::max(m, static_cast<double>(x[static_cast<std::size_t>(s)]));
        double sum = 0;
        for (Index s = 0; s < S; ++s) sum += std::exp(x[static_cast<std::size_t>(s)] - m);
        const double amax = std::isfinite(m) ? m : 0.0;
        double sum_lse = 0;
        for (Index s = 0; s < S; ++s) sum_lse += std::exp(x[static_cast<std::size_t>(s)] - amax);
        e.lse[static_cast<std::size_t>((b * Tq + t) * N + n)] =
            static_cast<double>(static_cast<T>(static_cast<float>(std::log(sum_lse) + amax)));
        const bool padded = o.query_seq_lengths && t >= o.query_seq_lengths.data()[b];
        for (Index h = 0; h < H; ++h) {
          double acc = 0;
          for (Index s = 0; s < S; ++s) {
            const T p = static_cast<T>(static_cast<float>(std::exp(x[static_cast<std::size_t>(s)] - m) / sum));
            acc += static_cast<double>(p) * static_cast<double>(v(b, s, kh, h));
          }
          double r = static_cast<double>(static_cast<T>(acc));
          if (padded) r *= 0.0;
          e.out[static_cast<std::size_t>(((b * Tq + t) * N + n) * H + h)] = r;
        }
      }
  return e;
}

template <class T>
double out_tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-6;  // the reference's float32 weights
  else if constexpr (std::is_same_v<T, float>) return 1e-5;
  else if constexpr (std::is_same_v<T, Eigen::half>) return 6e-3;
  else return 4e-2;
}

// max |a - e| over max(1, max |e|); NaN must meet NaN.
template <class T>
double max_err(const T* a, const std::vector<double>& e) {
  double err = 0, scale = 1;
  for (std::size_t i = 0; i < e.size(); ++i) {
    const double x = static_cast<double>(a[i]);
    if (std::isnan(x) != std::isnan(e[i])) return INFINITY;
    if (std::isnan(x)) continue;
    if (std::isinf(e[i]) || std::isinf(x)) {
      if (x != e[i]) return INFINITY;
      continue;
    }
    err = std::max(err, std::abs(x - e[i]));
    scale = std::max(scale, std::abs(e[i]));
  }
  return err / scale;
}

template <class T>
struct Outcome {
  std::vector<T> out, res;
};

// The call's body with the kernel's path and tiles forced (1: tiled, 2: row; tile keys).
template <class T>
Outcome<T> run(const Tensor<T, 4>& q, const Tensor<T, 4>& k, const Tensor<T, 4>& v, const jn::Options<T>& o, int path,
           Index tile_keys = 0) {
  linen::detail::AttentionTuning tu;
  tu.path = path;
  tu.tile_keys = tile_keys;
  tu.chunk_keys = tile_keys > 0 ? 2 * tile_keys : 0;
  Outcome<T> r;
  r.out.assign(static_cast<std::size_t>(q.size()), T(7));
  r.res.assign(static_cast<std::size_t>(q.size() / q.dimension(3)), T(7));
  linen::detail::jax_nn_attention<T>(linen::shape_of(q), linen::shape_of(k), linen::shape_of(v), q.data(), k.data(),
                                     v.data(), o, r.out.data(), r.res.data(), tu);
  return r;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// K/V heads repeated N / K times: [B, S, K, H] -> [B, S, N, H].
template <class T>
Tensor<T, 4> repeat_heads(const Tensor<T, 4>& x, Index N) {
  const Index G = N / x.dimension(2);
  Tensor<T, 4> r(x.dimension(0), x.dimension(1), N, x.dimension(3));
  for (Index b = 0; b < r.dimension(0); ++b)
    for (Index s = 0; s < r.dimension(1); ++s)
      for (Index n = 0; n < N; ++n)
        for (Index h = 0; h < r.dimension(3); ++h) r(b, s, n, h) = x(b, s, n / G, h);
  return r;
}

template <class T>
class JaxNn : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
struct DtypeNames {
  template <class T>
  static std::string GetName(int) {
    if (std::is_same_v<T, float>) return "float32";
    if (std::is_same_v<T, double>) return "float64";
    if (std::is_same_v<T, Eigen::half>) return "float16";
    return "bfloat16";
  }
};
TYPED_TEST_SUITE(JaxNn, ElementTypes, DtypeNames);

// Every argument, alone and together, on both kernels, against the restatement.
TYPED_TEST(JaxNn, MatchesTheSourceRestatement) {
  using T = TypeParam;
  struct Case {
    const char* name;
    Index B, Tq, S, N, K, H;
  };
  const Case cases[] = {{"mha", 2, 7, 9, 2, 2, 8}, {"gqa", 2, 11, 13, 4, 2, 5}, {"mqa", 1, 2, 37, 3, 1, 16},
                        {"long", 1, 40, 70, 2, 1, 8}};
  for (const Case& c : cases) {
    const auto q = random_tensor<T, 4>({c.B, c.Tq, c.N, c.H}, 1);
    const auto k = random_tensor<T, 4>({c.B, c.S, c.K, c.H}, 2);
    const auto v = random_tensor<T, 4>({c.B, c.S, c.K, c.H}, 3);
    const auto bias = random_tensor<T, 4>({1, c.N, c.Tq, c.S}, 4);
    Tensor<bool, 4> mask(c.B, 1, c.Tq, c.S);
    std::mt19937 rng(5);
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = (rng() % 4) != 0;
    Tensor<std::int32_t, 1> qlen(c.B), kvlen(c.B);
    for (Index b = 0; b < c.B; ++b) {
      qlen(b) = static_cast<std::int32_t>(std::max<Index>(0, c.Tq - 1 - 2 * b));
      kvlen(b) = static_cast<std::int32_t>(std::max<Index>(1, c.S - 3 - b));
    }
    std::vector<std::pair<std::string, jn::Options<T>>> opts;
    opts.push_back({"plain", {}});
    {
      jn::Options<T> o;
      o.bias = bias;
      o.scale = 0.37;
      opts.push_back({"bias+scale", o});
    }
    {
      jn::Options<T> o;
      o.mask = mask;
      opts.push_back({"mask", o});
    }
    {
      jn::Options<T> o;
      o.is_causal = true;
      opts.push_back({"causal", o});
    }
    {
      jn::Options<T> o;
      o.local_window_size = jn::WindowSize(3, 1);
      opts.push_back({"window", o});
    }
    {
      jn::Options<T> o;
      o.query_seq_lengths = qlen;
      o.key_value_seq_lengths = kvlen;
      opts.push_back({"lengths", o});
    }
    {
      jn::Options<T> o;
      o.bias = bias;
      o.mask = mask;
      o.is_causal = true;
      o.local_window_size = 4;
      o.query_seq_lengths = qlen;
      o.key_value_seq_lengths = kvlen;
      o.implementation = "xla";
      opts.push_back({"all", o});
    }
    for (const auto& [oname, o] : opts) {
      const Expected e = restatement(q, k, v, o);
      for (int path : {1, 2})
        for (Index tk : {Index{0}, Index{4}}) {
          SCOPED_TRACE(std::string(c.name) + " " + oname + " path " + std::to_string(path) + " tk " + std::to_string(tk));
          const Outcome<T> r = run(q, k, v, o, path, tk);
          EXPECT_LE(max_err(r.out.data(), e.out), out_tolerance<T>());
          EXPECT_LE(max_err(r.res.data(), e.lse), out_tolerance<T>());
        }
    }
  }
}

// The public functions: [B, T, N, H] and [T, N, H] layouts, the residual's shape.
TYPED_TEST(JaxNn, PublicFunctionsAndLayouts) {
  using T = TypeParam;
  const auto q = random_tensor<T, 4>({1, 6, 4, 8}, 11);
  const auto k = random_tensor<T, 4>({1, 5, 2, 8}, 12);
  const auto v = random_tensor<T, 4>({1, 5, 2, 8}, 13);
  jn::Options<T> o;
  o.is_causal = true;
  const Tensor<T, 4> out = jn::dot_product_attention(q, k, v, o);
  const auto full = jn::dot_product_attention_with_residual(q, k, v, o);
  const Expected e = restatement(q, k, v, o);
  EXPECT_LE(max_err(out.data(), e.out), out_tolerance<T>());
  EXPECT_LE(max_err(full.residual.data(), e.lse), out_tolerance<T>());
  EXPECT_EQ(full.residual.dimension(0), 1);
  EXPECT_EQ(full.residual.dimension(1), 6);
  EXPECT_EQ(full.residual.dimension(2), 4);
  EXPECT_EQ(0, std::memcmp(out.data(), full.output.data(), sizeof(T) * static_cast<std::size_t>(out.size())));
  // [T, N, H]: _ensure_4d's batch of one
  const linen::ConstTensorMap<T, 3> q3(q.data(), 6, 4, 8), k3(k.data(), 5, 2, 8), v3(v.data(), 5, 2, 8);
  const Tensor<T, 3> out3 = jn::dot_product_attention(q3, k3, v3, o);
  const auto full3 = jn::dot_product_attention_with_residual(q3, k3, v3, o);
  EXPECT_EQ(0, std::memcmp(out.data(), out3.data(), sizeof(T) * static_cast<std::size_t>(out.size())));
  EXPECT_EQ(full3.residual.dimension(0), 6);
  EXPECT_EQ(full3.residual.dimension(1), 4);
  EXPECT_EQ(0, std::memcmp(full.residual.data(), full3.residual.data(),
                           sizeof(T) * static_cast<std::size_t>(full3.residual.size())));
  // a 3-D query with a 4-D key of batch 1 (each is made 4-D on its own)
  const Tensor<T, 3> mixed = jn::dot_product_attention(q3, k, v, o);
  EXPECT_EQ(0, std::memcmp(out.data(), mixed.data(), sizeof(T) * static_cast<std::size_t>(out.size())));
}

// GQA reads kv head n / (N / K): bit for bit the MHA of the K/V heads repeated, with every
// other rule on, on both kernels.
TYPED_TEST(JaxNn, GqaEqualsRepeatedHeadsBitForBit) {
  using T = TypeParam;
  const Index B = 2, Tq = 19, S = 23, N = 6, K = 2, H = 12;
  const auto q = random_tensor<T, 4>({B, Tq, N, H}, 21);
  const auto k = random_tensor<T, 4>({B, S, K, H}, 22);
  const auto v = random_tensor<T, 4>({B, S, K, H}, 23);
  const auto kr = repeat_heads(k, N), vr = repeat_heads(v, N);
  const auto bias = random_tensor<T, 4>({B, N, Tq, S}, 24);
  Tensor<std::int32_t, 1> qlen(B), kvlen(B);
  qlen.setValues({15, 19});
  kvlen.setValues({23, 9});
  jn::Options<T> o;
  o.bias = bias;
  o.local_window_size = jn::WindowSize(6, 2);
  o.query_seq_lengths = qlen;
  o.key_value_seq_lengths = kvlen;
  for (int path : {1, 2})
    for (Index tk : {Index{0}, Index{5}}) {
      const Outcome<T> g = run(q, k, v, o, path, tk), m = run(q, kr, vr, o, path, tk);
      EXPECT_TRUE(same_bits(g.out, m.out)) << "path " << path;
      EXPECT_TRUE(same_bits(g.res, m.res)) << "path " << path;
    }
}

// Threads change no bit (each work item is one thread's; the row kernel's chunks are fixed).
TYPED_TEST(JaxNn, ThreadsChangeNothing) {
  using T = TypeParam;
  const Index B = 2, Tq = 70, S = 90, N = 4, K = 2, H = 16;
  const auto q = random_tensor<T, 4>({B, Tq, N, H}, 111);
  const auto k = random_tensor<T, 4>({B, S, K, H}, 112);
  const auto v = random_tensor<T, 4>({B, S, K, H}, 113);
  Tensor<std::int32_t, 1> qlen(B), kvlen(B);
  qlen.setValues({70, 33});
  kvlen.setValues({41, 90});
  jn::Options<T> o;
  o.is_causal = true;
  o.local_window_size = jn::WindowSize(20, 5);
  o.query_seq_lengths = qlen;
  o.key_value_seq_lengths = kvlen;
  Eigen::ThreadPool pool(3);
  jn::Options<T> ot = o;
  ot.thread_pool = &pool;
  for (int path : {1, 2}) {
    const Outcome<T> one = run(q, k, v, o, path, 8), many = run(q, k, v, ot, path, 8);
    EXPECT_TRUE(same_bits(one.out, many.out)) << path;
    EXPECT_TRUE(same_bits(one.res, many.res)) << path;
  }
}

// A local window equals its band given as a mask (any window: negative sizes, wider than
// the sequence, with the causal flag), also when whole tiles lie outside the band.
TYPED_TEST(JaxNn, WindowEqualsBandMask) {
  using T = TypeParam;
  const Index B = 1, Tq = 40, S = 52, N = 2, H = 8;
  const auto q = random_tensor<T, 4>({B, Tq, N, H}, 31);
  const auto k = random_tensor<T, 4>({B, S, N, H}, 32);
  const auto v = random_tensor<T, 4>({B, S, N, H}, 33);
  const std::pair<Index, Index> windows[] = {{3, 2}, {0, 0}, {5, -2}, {-1, 1}, {-2, -2}, {100, 100}, {0, 60}};
  for (const auto& [l, r] : windows)
    for (bool causal : {false, true}) {
      Tensor<bool, 4> band(1, 1, Tq, S);
      for (Index t = 0; t < Tq; ++t)
        for (Index s = 0; s < S; ++s) band(0, 0, t, s) = t - l <= s && s <= t + r && (!causal || s <= t);
      jn::Options<T> w, m;
      w.local_window_size = jn::WindowSize(l, r);
      w.is_causal = causal;
      m.mask = band;
      const Expected e = restatement(q, k, v, w);
      for (int path : {1, 2}) {
        SCOPED_TRACE("window " + std::to_string(l) + "," + std::to_string(r) + (causal ? " causal" : "") + " path " +
                     std::to_string(path));
        const Outcome<T> a = run(q, k, v, w, path, 4), b = run(q, k, v, m, path, 4);
        EXPECT_LE(max_err(a.out.data(), e.out), out_tolerance<T>());
        std::vector<double> bo(b.out.begin(), b.out.end()), br(b.res.begin(), b.res.end());
        EXPECT_LE(max_err(a.out.data(), bo), out_tolerance<T>() / 4);
        EXPECT_LE(max_err(a.res.data(), br), out_tolerance<T>() / 4);
      }
    }
}

// Key tiles wholly outside every row's band are skipped only while their values are
// finite: an inf or NaN value far outside the band still meets its zero weights (NaN in
// its column of every row of its head, as the source's einsum makes it), left or right
// of the band, in every query item (long enough for several).
TYPED_TEST(JaxNn, WindowSkipsOutsideTilesOnlyWhenValuesAreFinite) {
  using T = TypeParam;
  const Index Tq = 300, S = 300, N = 2, H = 8;
  const auto q = random_tensor<T, 4>({1, Tq, N, H}, 34);
  const auto k = random_tensor<T, 4>({1, S, N, H}, 35);
  const auto v0 = random_tensor<T, 4>({1, S, N, H}, 36);
  struct Case {
    Index key, head, column;
    T value;
  };
  const Case cases[] = {{-1, 0, 0, T(0)},
                        {290, 0, 1, std::numeric_limits<T>::infinity()},
                        {2, 1, 3, std::numeric_limits<T>::quiet_NaN()},
                        {150, 1, 7, -std::numeric_limits<T>::infinity()}};
  for (const Case& c : cases)
    for (bool causal : {false, true}) {
      auto v = v0;
      if (c.key >= 0) v(0, c.key, c.head, c.column) = c.value;
      jn::Options<T> o;
      o.local_window_size = jn::WindowSize(5, 3);
      o.is_causal = causal;
      const Expected e = restatement(q, k, v, o);
      for (Index tk : {0, 8}) {
        SCOPED_TRACE("key " + std::to_string(c.key) + (causal ? " causal" : "") + " tile_keys " + std::to_string(tk));
        const Outcome<T> a = run(q, k, v, o, 1, tk);
        EXPECT_LE(max_err(a.out.data(), e.out), out_tolerance<T>());
        EXPECT_LE(max_err(a.res.data(), e.lse), out_tolerance<T>());
        for (Index t = 0; c.key >= 0 && t < Tq; ++t) {
          if (c.key >= t - 5 && c.key <= t + 3 && (!causal || c.key <= t)) continue;  // in row t's band
          EXPECT_TRUE(std::isnan(static_cast<double>(a.out[static_cast<std::size_t>((t * N + c.head) * H + c.column)])))
              << t;
        }
      }
    }
}

// Sequence lengths equal a padding mask plus zeroed query rows; the residual of a padded
// row is a fully masked row's (fill + log S), not zeroed; lengths of 0.
TYPED_TEST(JaxNn, LengthsEqualPaddingMaskAndZeroedRows) {
  using T = TypeParam;
  const Index B = 3, Tq = 17, S = 21, N = 2, H = 8;
  const auto q = random_tensor<T, 4>({B, Tq, N, H}, 41);
  const auto k = random_tensor<T, 4>({B, S, N, H}, 42);
  const auto v = random_tensor<T, 4>({B, S, N, H}, 43);
  Tensor<std::int32_t, 1> qlen(B), kvlen(B);
  qlen.setValues({17, 5, 0});
  kvlen.setValues({0, 21, 8});
  Tensor<bool, 4> pad(B, 1, Tq, S);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < Tq; ++t)
      for (Index s = 0; s < S; ++s) pad(b, 0, t, s) = t < qlen(b) && s < kvlen(b);
  jn::Options<T> lo, mo;
  lo.query_seq_lengths = qlen;
  lo.key_value_seq_lengths = kvlen;
  mo.mask = pad;
  const float fill = linen::detail::jax_nn_large_negative();
  for (int path : {1, 2}) {
    const Outcome<T> a = run(q, k, v, lo, path, 4), m = run(q, k, v, mo, path, 4);
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < Tq; ++t)
        for (Index n = 0; n < N; ++n) {
          const Index row = (b * Tq + t) * N + n;
          EXPECT_EQ(static_cast<double>(a.res[row]), static_cast<double>(m.res[row])) << b << " " << t;
          if (t >= qlen(b)) {
            EXPECT_EQ(static_cast<double>(a.res[row]),
                      static_cast<double>(static_cast<T>(static_cast<float>(fill + std::log(float(S))))));
          }
          for (Index h = 0; h < H; ++h) {
            const double x = static_cast<double>(a.out[row * H + h]);
            if (t >= qlen(b)) EXPECT_EQ(x, 0.0);
            else EXPECT_NEAR(x, static_cast<double>(m.out[row * H + h]), out_tolerance<T>() / 4);
          }
        }
  }
}

// A fully masked row (jax.nn's fill is finite) is uniform over ALL S keys, padded or
// outside the window ones too; a kv length of 0 makes every row of the batch so.
TYPED_TEST(JaxNn, FullyMaskedRowIsUniformOverAllKeys) {
  using T = TypeParam;
  const Index Tq = 5, S = 300, N = 1, H = 4;
  const auto q = random_tensor<T, 4>({2, Tq, N, H}, 51);
  const auto k = random_tensor<T, 4>({2, S, N, H}, 52);
  const auto v = random_tensor<T, 4>({2, S, N, H}, 53);
  Tensor<std::int32_t, 1> kvlen(2);
  kvlen.setValues({0, 3});
  jn::Options<T> o;
  o.key_value_seq_lengths = kvlen;
  o.local_window_size = jn::WindowSize(0, -10);  // batch 1: empty bands too
  const T p = static_cast<T>(static_cast<float>(1.0 / S));
  for (int path : {1, 2}) {
    const Outcome<T> r = run(q, k, v, o, path, 16);
    for (Index b = 0; b < 2; ++b)
      for (Index t = 0; t < Tq; ++t)
        for (Index h = 0; h < H; ++h) {
          double mean = 0;
          for (Index s = 0; s < S; ++s) mean += static_cast<double>(p) * static_cast<double>(v(b, s, 0, h));
          EXPECT_NEAR(static_cast<double>(r.out[(b * Tq + t) * H + h]), mean, out_tolerance<T>()) << b << " " << t;
        }
  }
}

// The mask fill is -0.7 * float32 max, not finfo.min: a logit below it (a bias can make
// one) loses to a masked key, and the row keeps its own max (not the fill).
TYPED_TEST(JaxNn, MaskFillIsFiniteAndAboveLowLogits) {
  using T = TypeParam;
  const auto q = random_tensor<T, 4>({1, 3, 1, 4}, 61);
  const auto k = random_tensor<T, 4>({1, 2, 1, 4}, 62);
  const auto v = random_tensor<T, 4>({1, 2, 1, 4}, 63);
  Tensor<T, 4> bias(1, 1, 3, 2);
  bias.setConstant(T(0));
  bias(0, 0, 0, 0) = static_cast<T>(-3.0e38);  // row 0: key 0 below the fill, key 1 masked
  bias(0, 0, 1, 0) = static_cast<T>(-3.0e38);  // row 1: key 0 below the fill, key 1 too
  bias(0, 0, 1, 1) = static_cast<T>(-3.0e38);
  Tensor<bool, 4> mask(1, 1, 3, 2);
  mask.setConstant(true);
  mask(0, 0, 0, 1) = false;
  jn::Options<T> o;
  o.bias = bias;
  o.mask = mask;
  const Expected e = restatement(q, k, v, o);
  for (int path : {1, 2}) {
    const Outcome<T> r = run(q, k, v, o, path);
    EXPECT_LE(max_err(r.out.data(), e.out), out_tolerance<T>());
    for (Index h = 0; h < 4; ++h)  // row 0: all weight on the masked key 1
      EXPECT_NEAR(static_cast<double>(r.out[h]), static_cast<double>(v(0, 1, 0, h)), out_tolerance<T>());
  }
}

// float64 inputs: the softmax is float32's, so logits closer than float's resolution weigh
// the same (XLA casts padded_logits to float32 before the softmax).
TEST(JaxNnDouble, SoftmaxRoundsLogitsToFloat) {
  Tensor<double, 4> q(1, 1, 1, 1), k(1, 2, 1, 1), v(1, 2, 1, 1);
  q(0, 0, 0, 0) = 1.0;
  k(0, 0, 0, 0) = 1.0;
  k(0, 1, 0, 0) = 1.0 + 1e-12;
  v(0, 0, 0, 0) = 0.0;
  v(0, 1, 0, 0) = 1.0;
  jn::Options<double> o;
  o.scale = 1e6;  // logits 1e6 and 1e6 + 1e-6: one float
  for (int path : {1, 2}) {
    const Outcome<double> r = run(q, k, v, o, path);
    EXPECT_EQ(r.out[0], 0.5);
    EXPECT_EQ(r.res[0], static_cast<double>(static_cast<float>(1e6 + std::log(2.0))));
  }
  // with a bias, the rounding comes after it (logits + bias in float64 first)
  Tensor<double, 4> bias(1, 1, 1, 2);
  bias(0, 0, 0, 0) = 0.0;
  bias(0, 0, 0, 1) = -1e-6;
  o.bias = bias;
  const Outcome<double> r = run(q, k, v, o, 1);
  EXPECT_EQ(r.out[0], 0.5);
}

// Padded query rows are 0 * their row: NaN in a column where a value of the kv head is inf or NaN (as
// the source's `encoded *= mask`), 0 otherwise; the padded keys' values meet their zero
// weights (a NaN there makes the row NaN, as einsum does).
TYPED_TEST(JaxNn, PaddedRowsWithNonFiniteValues) {
  using T = TypeParam;
  const Index Tq = 4, S = 9, H = 4;
  const auto q = random_tensor<T, 4>({1, Tq, 2, H}, 71);
  const auto k = random_tensor<T, 4>({1, S, 2, H}, 72);
  auto v = random_tensor<T, 4>({1, S, 2, H}, 73);
  v(0, 7, 1, 2) = std::numeric_limits<T>::quiet_NaN();  // head 1, a padded key
  Tensor<std::int32_t, 1> qlen(1), kvlen(1);
  qlen.setValues({2});
  kvlen.setValues({5});
  jn::Options<T> o;
  o.query_seq_lengths = qlen;
  o.key_value_seq_lengths = kvlen;
  const Expected e = restatement(q, k, v, o);
  for (int path : {1, 2}) {
    const Outcome<T> r = run(q, k, v, o, path, 4);
    EXPECT_LE(max_err(r.out.data(), e.out), out_tolerance<T>()) << path;
    for (Index t = 0; t < Tq; ++t)
      for (Index h = 0; h < H; ++h) {  // column 2 of head 1 alone
        EXPECT_FALSE(std::isnan(static_cast<double>(r.out[(t * 2 + 0) * H + h])));
        EXPECT_EQ(std::isnan(static_cast<double>(r.out[(t * 2 + 1) * H + h])), h == 2) << t << " " << h;
      }
  }
}

// Empty axes: a query length of 0 (nothing to write), a kv length of 0 (zeros, the
// residual -inf: logsumexp of nothing), a depth of 0.
TYPED_TEST(JaxNn, EmptyAxes) {
  using T = TypeParam;
  const auto q0 = random_tensor<T, 4>({2, 0, 2, 4}, 81);
  const auto k = random_tensor<T, 4>({2, 3, 2, 4}, 82);
  const auto out0 = jn::dot_product_attention_with_residual(q0, k, k);
  EXPECT_EQ(out0.output.size(), 0);
  EXPECT_EQ(out0.residual.size(), 0);
  const auto q = random_tensor<T, 4>({2, 3, 2, 4}, 83);
  const Tensor<T, 4> k0(2, 0, 1, 4);
  jn::Options<T> o;
  o.is_causal = true;
  const auto r = jn::dot_product_attention_with_residual(q, k0, k0, o);
  for (Index i = 0; i < r.output.size(); ++i) EXPECT_EQ(static_cast<double>(r.output.data()[i]), 0.0);
  for (Index i = 0; i < r.residual.size(); ++i)
    EXPECT_EQ(static_cast<double>(r.residual.data()[i]), -std::numeric_limits<double>::infinity());
  // a depth of 0: the default scale 1 / sqrt(0) is inf, and 0 * inf makes the logits NaN
  // (as numpy's and XLA's); with scale 1 the logits are 0 and the residual is log(S)
  const Tensor<T, 4> qd(1, 3, 2, 0), kd(1, 4, 1, 0);
  const auto rd = jn::dot_product_attention_with_residual(qd, kd, kd);
  EXPECT_EQ(rd.output.size(), 0);
  for (Index i = 0; i < rd.residual.size(); ++i) EXPECT_TRUE(std::isnan(static_cast<double>(rd.residual.data()[i])));
  jn::Options<T> one;
  one.scale = 1.0;
  const auto r1 = jn::dot_product_attention_with_residual(qd, kd, kd, one);
  for (Index i = 0; i < r1.residual.size(); ++i)
    EXPECT_EQ(static_cast<double>(r1.residual.data()[i]),
              static_cast<double>(static_cast<T>(static_cast<float>(std::log(4.0f)))));
}

// Every error: a linen::invalid_argument naming the value, and nothing written.
TEST(JaxNnErrors, EveryBadInput) {
  const auto q = random_tensor<float, 4>({2, 3, 4, 8}, 91);
  const auto k = random_tensor<float, 4>({2, 5, 2, 8}, 92);
  const auto v = k;
  auto expect_error = [&](const Tensor<float, 4>& qq, const Tensor<float, 4>& kk, const Tensor<float, 4>& vv,
                          const jn::Options<float>& o, const std::string& needle) {
    std::vector<float> out(static_cast<std::size_t>(qq.size()), 7.0f), res(static_cast<std::size_t>(qq.size()), 7.0f);
    try {
      linen::detail::jax_nn_attention<float>(linen::shape_of(qq), linen::shape_of(kk), linen::shape_of(vv), qq.data(),
                                             kk.data(), vv.data(), o, out.data(), res.data());
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const linen::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).rfind("linen", 0), 0u) << e.what();
    }
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.0f; }));
    EXPECT_TRUE(std::all_of(res.begin(), res.end(), [](float x) { return x == 7.0f; }));
  };
  const jn::Options<float> none;
  expect_error(q, k, random_tensor<float, 4>({2, 5, 2, 4}, 1), none, "value shape should be");
  expect_error(q, k, random_tensor<float, 4>({2, 6, 2, 8}, 1), none, "value shape should be");
  expect_error(random_tensor<float, 4>({1, 3, 4, 8}, 1), k, v, none, "query shape should be");
  expect_error(random_tensor<float, 4>({2, 3, 4, 6}, 1), k, v, none, "query shape should be");
  expect_error(random_tensor<float, 4>({2, 3, 3, 8}, 1), k, v, none, "multiple of key/value heads, but got 3 vs 2");
  const Tensor<float, 4> k0(2, 5, 0, 8);
  expect_error(random_tensor<float, 4>({2, 3, 0, 8}, 1), k0, k0, none, "multiple of key/value heads");
  {
    jn::Options<float> o;
    o.implementation = "cudnn";
    expect_error(q, k, v, o, "cudnn");
    o.implementation = "pallas";
    expect_error(q, k, v, o, "Unsupported implementation option: 'pallas'");
    o.implementation = "";
    expect_error(q, k, v, o, "Unsupported implementation option");
  }
  Tensor<bool, 5> mask5(1, 1, 1, 3, 5);
  mask5.setConstant(true);
  Tensor<bool, 4> mask_heads(1, 3, 3, 5), mask_len(1, 1, 3, 4);
  mask_heads.setConstant(true);
  mask_len.setConstant(true);
  {
    jn::Options<float> o;
    o.mask = mask5;
    expect_error(q, k, v, o, "mask ndim should be 4, but got 5");
    o.mask = mask_heads;
    expect_error(q, k, v, o, "head dim must be 1 or 4");
    o.mask = mask_len;
    expect_error(q, k, v, o, "does not broadcast");
  }
  Tensor<float, 4> bias_heads(2, 2, 3, 5), bias_batch(3, 1, 3, 5);
  bias_heads.setZero();
  bias_batch.setZero();
  {
    jn::Options<float> o;
    o.bias = bias_heads;  // K heads are not N
    expect_error(q, k, v, o, "head dim must be 1 or 4");
    o.bias = bias_batch;
    expect_error(q, k, v, o, "does not broadcast");
  }
  Tensor<std::int32_t, 1> len3(3), bad(2);
  len3.setValues({1, 1, 1});
  Tensor<std::int32_t, 2> len2(2, 1);
  len2.setValues({{1}, {1}});
  {
    jn::Options<float> o;
    o.query_seq_lengths = len3;
    expect_error(q, k, v, o, "query_seq_lengths shape should be [2]");
    o.query_seq_lengths = len2;
    expect_error(q, k, v, o, "query_seq_lengths ndim should be 1");
    bad.setValues({3, -1});
    o.query_seq_lengths = bad;
    expect_error(q, k, v, o, "query_seq_lengths[1] = -1 is outside [0, 3]");
    bad.setValues({4, 0});
    expect_error(q, k, v, o, "query_seq_lengths[0] = 4 is outside [0, 3]");
  }
  {
    jn::Options<float> o;
    Tensor<std::int32_t, 1> kvbad(2);
    kvbad.setValues({5, 6});
    o.key_value_seq_lengths = kvbad;
    expect_error(q, k, v, o, "key_value_seq_lengths[1] = 6 is outside [0, 5]");
    kvbad.setValues({-3, 2});
    expect_error(q, k, v, o, "key_value_seq_lengths[0] = -3");
  }
  {
    jn::Options<float> o;
    o.local_window_size = jn::WindowSize(Index{1} << 31, 0);
    expect_error(q, k, v, o, "local_window_size entry 2147483648 is outside int32");
    o.local_window_size = jn::WindowSize(0, -(Index{1} << 31) - 1);
    expect_error(q, k, v, o, "outside int32");
  }
}

// --- the index rules under Flax's policy (nnx's einsum path reads them) ---------------

template <class T>
linen::detail::AttentionProblem<T> flax_problem_gqa(const Tensor<T, 4>& q, const Tensor<T, 4>& k, const Tensor<T, 4>& v,
                                                     Tensor<T, 4>& out) {
  linen::detail::AttentionDims d;
  d.batch = {q.dimension(0)};
  d.B = q.dimension(0);
  d.Lq = q.dimension(1);
  d.Lk = k.dimension(1);
  d.H = q.dimension(2);
  d.D = d.Dv = q.dimension(3);
  linen::detail::AttentionProblem<T> a = linen::detail::flax_problem(d, q.data(), k.data(), v.data(), out.data());
  const Index K = k.dimension(2);
  a.kv_group = d.H / K;
  a.k_sb = a.v_sb = d.Lk * K * d.D;
  a.k_sl = a.v_sl = K * d.D;
  return a;
}

TYPED_TEST(JaxNn, FlaxPolicyTakesTheIndexRules) {
  using T = TypeParam;
  const Index B = 2, Tq = 13, S = 17, N = 4, K = 2, H = 8;
  const auto q = random_tensor<T, 4>({B, Tq, N, H}, 101);
  const auto k = random_tensor<T, 4>({B, S, K, H}, 102);
  const auto v = random_tensor<T, 4>({B, S, K, H}, 103);
  const auto kr = repeat_heads(k, N), vr = repeat_heads(v, N);
  const std::int32_t qlen[B] = {13, 6}, kvlen[B] = {0, 11};
  Tensor<bool, 4> band(B, 1, Tq, S);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < Tq; ++t)
      for (Index s = 0; s < S; ++s) band(b, 0, t, s) = t - 2 <= s && s <= t + 1 && s <= t && s < kvlen[b];
  for (int path : {1, 2}) {
    linen::detail::AttentionTuning tu;
    tu.path = path;
    tu.tile_keys = 4;
    // GQA: bit for bit the repeated heads
    Tensor<T, 4> g(B, Tq, N, H), m(B, Tq, N, H);
    auto a = flax_problem_gqa(q, k, v, g);
    a.tuning = tu;
    linen::detail::fused_attention(a);
    auto am = flax_problem_gqa(q, kr, vr, m);
    am.tuning = tu;
    linen::detail::fused_attention(am);
    EXPECT_EQ(0, std::memcmp(g.data(), m.data(), sizeof(T) * static_cast<std::size_t>(g.size())));
    // window + causal + lengths: Flax's reference with the band as a mask (finfo.min fill:
    // batch 0, kv length 0, is uniform over all keys), padded rows zeroed
    Tensor<T, 4> w(B, Tq, N, H);
    auto aw = flax_problem_gqa(q, k, v, w);
    aw.tuning = tu;
    aw.causal = true;
    aw.windowed = true;
    aw.window_left = 2;
    aw.window_right = 1;
    aw.q_len = qlen;
    aw.kv_len = kvlen;
    linen::detail::fused_attention(aw);
    linen::AttentionOptions<T> fo;
    fo.mask = band;
    fo.implementation = linen::Implementation::Reference;
    const Tensor<T, 4> ref = linen::dot_product_attention(q, kr, vr, fo);
    double err = 0;
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < Tq; ++t)
        for (Index n = 0; n < N; ++n)
          for (Index h = 0; h < H; ++h) {
            const double x = static_cast<double>(w(b, t, n, h));
            if (t >= qlen[b]) EXPECT_EQ(x, 0.0);
            else err = std::max(err, std::abs(x - static_cast<double>(ref(b, t, n, h))));
          }
    EXPECT_LE(err, out_tolerance<T>()) << "path " << path;
  }
}

}  // namespace
