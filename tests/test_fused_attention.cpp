// SPDX-License-Identifier: Apache-2.0
// The fused attention kernel (detail/fused_attention.hpp) against the reference path, the
// oracle: Flax's golden files, randomized shapes, masks, biases, causal flags and dropout
// in every element type and batch rank, several SIMD widths and register blockings, tiny
// tiles (so that small problems cross many tile edges), threads (bitwise equal to one
// thread), the dispatch rules of AttentionOptions::implementation, and a peak-memory bound.
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>


#include "test_support.hpp"

// ---- allocation accounting (this test executable only) -------------------------------
// The high-water mark of live heap bytes. With glibc (and no sanitizer, which owns malloc)
// the malloc family is interposed, so that every allocation counts: operator new, and
// Eigen's aligned_malloc behind its matrices and tensors. Elsewhere the memory test is
// skipped.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define LINEN_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define LINEN_TEST_SANITIZED 1
#endif

#if defined(__GLIBC__) && !defined(LINEN_TEST_SANITIZED)
#include <malloc.h>
#define LINEN_TEST_COUNTS_MALLOC 1
namespace {
std::atomic<long long> g_live{0}, g_peak{0};
void note_alloc(std::size_t n) {
  const long long now = g_live.fetch_add(static_cast<long long>(n)) + static_cast<long long>(n);
  long long peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}
void note_free(std::size_t n) { g_live.fetch_sub(static_cast<long long>(n)); }
}  // namespace

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
static void* note(void* p) {
  if (p) note_alloc(malloc_usable_size(p));
  return p;
}
void* malloc(std::size_t n) noexcept { return note(__libc_malloc(n)); }
void* calloc(std::size_t n, std::size_t m) noexcept { return note(__libc_calloc(n, m)); }
void* memalign(std::size_t a, std::size_t n) noexcept { return note(__libc_memalign(a, n)); }
void* aligned_alloc(std::size_t a, std::size_t n) noexcept { return note(__libc_memalign(a, n)); }
void* valloc(std::size_t n) noexcept { return note(__libc_memalign(4096, n)); }
void* pvalloc(std::size_t n) noexcept { return note(__libc_memalign(4096, (n + 4095) / 4096 * 4096)); }
int posix_memalign(void** out, std::size_t a, std::size_t n) noexcept {
  void* p = note(__libc_memalign(a, n));
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
void* realloc(void* p, std::size_t n) noexcept {
  const std::size_t old = p ? malloc_usable_size(p) : 0;
  void* q = __libc_realloc(p, n);
  if (q || n == 0) note_free(old);
  return note(q);
}
void free(void* p) noexcept {
  if (!p) return;
  note_free(malloc_usable_size(p));
  __libc_free(p);
}
}
#endif

namespace {

using linen::AttentionOptions;
using linen::Implementation;
using linen::Index;
using linen::Shape;
using linen::Tensor;
namespace ei = Eigen::internal;

template <class T>
double tol() {
  return linen_test::tolerance<T>();
}

// max |a - e| / max |e| over the non-NaN entries; NaN must sit at the same places.
template <class T>
double rel_err(const std::vector<T>& a, const std::vector<T>& e) {
  EXPECT_EQ(a.size(), e.size());
  if (a.size() != e.size()) return INFINITY;
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < e.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(e[i]);
    if (std::isnan(x) != std::isnan(y)) return INFINITY;
    if (std::isnan(y)) continue;
    err = std::max(err, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return scale > 0 ? err / scale : err;
}

// ---- one attention problem with runtime batch rank -------------------------------------

template <class T>
struct Problem {
  Shape batch;
  Index lq = 1, lk = 1, h = 1, d = 1, dv = 1;
  std::vector<T> q, k, v;
  bool has_bias = false, has_mask = false;
  Shape bias_shape, mask_shape;
  std::vector<T> bias;
  std::vector<char> mask;  // bytes 0/1, read as bool
  bool causal = false;
  double dropout_rate = 0;
  bool broadcast_dropout = true;
  unsigned keep_seed = 0;

  Shape shape(Index len, Index depth) const {
    Shape s = batch;
    s.insert(s.end(), {len, h, depth});
    return s;
  }
  Shape weights_shape() const {
    Shape s = batch;
    s.insert(s.end(), {h, lq, lk});
    return s;
  }
  Index B() const { return linen::num_elements(batch); }
};

// A keep mask that depends only on the seed and the shape asked for, so that the
// reference and the fused path (each drawing once) see the same mask; records the shape.
struct RecordedKeep {
  unsigned seed;
  std::shared_ptr<std::vector<Shape>> shapes = std::make_shared<std::vector<Shape>>();
  void operator()(double keep_prob, const Shape& s, bool* keep) const {
    shapes->push_back(s);
    std::mt19937 g(seed);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const Index n = linen::num_elements(s);
    for (Index i = 0; i < n; ++i) keep[i] = u(g) < keep_prob;
  }
};

template <class T>
AttentionOptions<T> options_of(const Problem<T>& p, const RecordedKeep& keep) {
  AttentionOptions<T> o;
  if (p.has_bias) o.bias = linen::ArrayRef<T>(p.bias.data(), p.bias_shape);
  if (p.has_mask) o.mask = linen::ArrayRef<bool>(reinterpret_cast<const bool*>(p.mask.data()), p.mask_shape);
  o.is_causal = p.causal;
  if (p.dropout_rate > 0) {
    o.dropout_rate = p.dropout_rate;
    o.broadcast_dropout = p.broadcast_dropout;
    o.dropout_rng = keep;
  }
  return o;
}

template <class T>
std::vector<T> run_reference(const Problem<T>& p) {
  const auto d = linen::detail::check_qkv(p.shape(p.lq, p.d), p.shape(p.lk, p.d), p.shape(p.lk, p.dv), "test");
  std::vector<T> out(static_cast<std::size_t>(linen::num_elements(d.output_shape())));
  const RecordedKeep keep{p.keep_seed};
  linen::detail::attention_reference<T>(d, p.q.data(), p.k.data(), p.v.data(), options_of(p, keep), out.data(),
                                        nullptr, "test");
  return out;
}

// The fused path with a chosen packet type, register blocking, tiles and pool.
template <class T, class P = linen::detail::dispatch::TargetPacket, int MR = 0, int NR = 0>
std::vector<T> run_fused(const Problem<T>& p, linen::detail::FusedTuning tuning = {},
                         Eigen::ThreadPoolInterface* pool = nullptr, std::vector<Shape>* keep_shapes = nullptr) {
  const auto d = linen::detail::check_qkv(p.shape(p.lq, p.d), p.shape(p.lk, p.d), p.shape(p.lk, p.dv), "test");
  std::vector<T> out(static_cast<std::size_t>(linen::num_elements(d.output_shape())), T(-12345.0f));
  const RecordedKeep keep{p.keep_seed};
  AttentionOptions<T> o = options_of(p, keep);
  o.thread_pool = pool;
  linen::detail::attention_fused<T, P, MR, NR>(d, p.q.data(), p.k.data(), p.v.data(), o, out.data(), "test",
                                               tuning);
  if (keep_shapes) *keep_shapes = *keep.shapes;
  return out;
}

// Tuning for the tests: tile_keys, tile_queries (tiled path), chunk_keys (row path), path.
linen::detail::FusedTuning tiles(Index tk, Index tq = 0, Index chunk = 0, int path = 0) {
  linen::detail::FusedTuning t;
  t.tile_keys = tk;
  t.tile_queries = tq;
  t.chunk_keys = chunk;
  t.path = path;
  return t;
}
constexpr int kTiled = 1, kRows = 2;

template <class T>
void fill_normal(std::vector<T>& x, std::size_t n, std::mt19937& g, double sd = 1.0) {
  std::normal_distribution<double> nd(0.0, sd);
  x.resize(n);
  for (auto& e : x) e = static_cast<T>(nd(g));
}

// A broadcastable shape for `full`: each dim kept or set to 1, leading dims maybe dropped.
Shape random_broadcast_shape(const Shape& full, std::mt19937& g) {
  std::uniform_int_distribution<int> coin(0, 1);
  Shape s = full;
  for (auto& x : s)
    if (coin(g)) x = 1;
  const std::size_t drop = std::uniform_int_distribution<std::size_t>(0, s.size() - 2)(g);
  return Shape(s.begin() + static_cast<std::ptrdiff_t>(drop), s.end());
}

// A random problem: batch rank 0..3, lengths not multiples of any tile (and 1), masks and
// biases of random broadcastable shapes and densities (incl. fully masked rows), causal,
// dropout broadcast or not.
template <class T>
Problem<T> random_problem(std::mt19937& g) {
  auto pick = [&](std::initializer_list<Index> xs) {
    std::vector<Index> v(xs);
    return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(g)];
  };
  Problem<T> p;
  const int rank = std::uniform_int_distribution<int>(0, 3)(g);
  for (int i = 0; i < rank; ++i) p.batch.push_back(pick({1, 2, 3}));
  p.lq = pick({1, 2, 5, 9, 24, 31, 50, 77});
  p.lk = pick({1, 3, 8, 13, 40, 65, 97});
  p.h = pick({1, 2, 3});
  p.d = pick({1, 4, 7, 16, 33});
  p.dv = pick({1, 3, 8, 17});
  const std::size_t B = static_cast<std::size_t>(p.B());
  fill_normal(p.q, B * p.lq * p.h * p.d, g, 1.5);
  fill_normal(p.k, B * p.lk * p.h * p.d, g, 1.5);
  fill_normal(p.v, B * p.lk * p.h * p.dv, g);
  std::uniform_int_distribution<int> die(0, 5);
  const Shape w = p.weights_shape();
  if (die(g) < 3) {
    p.has_mask = true;
    p.mask_shape = random_broadcast_shape(w, g);
    const double density = std::vector<double>{0.0, 0.3, 0.8, 1.0}[std::uniform_int_distribution<int>(0, 3)(g)];
    std::bernoulli_distribution bern(density);
    p.mask.resize(static_cast<std::size_t>(linen::num_elements(p.mask_shape)));
    for (auto& m : p.mask) m = bern(g) ? 1 : 0;
    // a fully masked row now and then
    if (p.mask_shape.size() >= 2 && die(g) == 0) {
      const Index lk = p.mask_shape.back();
      for (Index j = 0; j < lk; ++j) p.mask[static_cast<std::size_t>(j)] = 0;
    }
  }
  if (die(g) < 2) {
    p.has_bias = true;
    p.bias_shape = random_broadcast_shape(w, g);
    fill_normal(p.bias, static_cast<std::size_t>(linen::num_elements(p.bias_shape)), g, 2.0);
  }
  p.causal = die(g) < 2;
  if (die(g) == 0) {
    p.dropout_rate = 0.3;
    p.broadcast_dropout = die(g) < 3;
    p.keep_seed = static_cast<unsigned>(g());
  }
  return p;
}

std::string describe(const Shape& batch, Index lq, Index lk, Index h, Index d, Index dv) {
  return "batch " + linen::to_string(batch) + " lq " + std::to_string(lq) + " lk " + std::to_string(lk) + " h " +
         std::to_string(h) + " d " + std::to_string(d) + " dv " + std::to_string(dv);
}
template <class T>
std::string describe(const Problem<T>& p) {
  std::string s = describe(p.batch, p.lq, p.lk, p.h, p.d, p.dv);
  if (p.has_mask) s += " mask " + linen::to_string(p.mask_shape);
  if (p.has_bias) s += " bias " + linen::to_string(p.bias_shape);
  if (p.causal) s += " causal";
  if (p.dropout_rate > 0) s += p.broadcast_dropout ? " dropout(broadcast)" : " dropout(full)";
  return s;
}

// ---------------------------------------------------------------------------------------
// Flax's golden dot_product_attention files through the public API, Fused and Auto.

template <class T, int N>
void golden_case(const char* name) {
  const auto f = linen_test::fixture(name);
  const Tensor<T, N> q = f.get<T, N>("inputs/query"), k = f.get<T, N>("inputs/key"), v = f.get<T, N>("inputs/value");
  Tensor<T, N> bias;
  Tensor<bool, N> mask;
  AttentionOptions<T> opt;
  if (f.contains("bias")) {
    bias = f.get<T, N>("bias");
    opt.bias = bias;
  }
  if (f.contains("mask")) {
    mask = f.get<bool, N>("mask");
    opt.mask = mask;
  }
  opt.implementation = Implementation::Reference;
  const Tensor<T, N> ref = linen::dot_product_attention(q, k, v, opt);
  opt.implementation = Implementation::Fused;
  const Tensor<T, N> fused = linen::dot_product_attention(q, k, v, opt);
  opt.implementation = Implementation::Auto;
  const Tensor<T, N> automatic = linen::dot_product_attention(q, k, v, opt);
  const double t = std::max(tol<T>(), tol<float>());  // the golden is float32
  EXPECT_LE(linen_test::rel_err(fused, f.get<float, N>("output")), t) << name;
  EXPECT_LE(linen_test::rel_err(fused, ref), tol<T>()) << name;
  EXPECT_LE(linen_test::rel_err(automatic, fused), 0.0) << name << ": Auto is the fused path";
}

template <class T>
class FusedTyped : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
struct DtypeNames {
  template <class T>
  static std::string GetName(int) {
    return linen::dtype_name<T>();
  }
};
TYPED_TEST_SUITE(FusedTyped, ElementTypes, DtypeNames);

TYPED_TEST(FusedTyped, FlaxGoldenFiles) {
  using T = TypeParam;
  golden_case<T, 4>("dpa_bias_mask");
  golden_case<T, 3>("dpa_nobatch");
  golden_case<T, 4>("dpa_lengths_depths");
}

// The golden files again with tiny tiles, so that their short lengths cross tile edges.
TYPED_TEST(FusedTyped, FlaxGoldenFilesTinyTiles) {
  using T = TypeParam;
  for (const char* name : {"dpa_bias_mask", "dpa_nobatch", "dpa_lengths_depths"}) {
    const auto f = linen_test::fixture(name);
    const auto& qv = f.at("inputs/query");
    const Shape qs = qv.shape(), ks = f.at("inputs/key").shape(), vs = f.at("inputs/value").shape();
    Problem<T> p;
    p.batch.assign(qs.begin(), qs.end() - 3);
    p.lq = qs[qs.size() - 3];
    p.h = qs[qs.size() - 2];
    p.d = qs.back();
    p.lk = ks[ks.size() - 3];
    p.dv = vs.back();
    auto flat = [&](const char* key) { return f.at(key).template to_vector<T>(key); };
    p.q = flat("inputs/query");
    p.k = flat("inputs/key");
    p.v = flat("inputs/value");
    if (f.contains("bias")) {
      p.has_bias = true;
      p.bias_shape = f.at("bias").shape();
      p.bias = flat("bias");
    }
    if (f.contains("mask")) {
      p.has_mask = true;
      p.mask_shape = f.at("mask").shape();
      const std::vector<bool> m = f.at("mask").to_vector<bool>("mask");
      p.mask.assign(m.begin(), m.end());
    }
    const auto ref = run_reference(p);
    for (int path : {kTiled, kRows})
      for (Index tk : {1, 2, 5})
        for (Index tq : {1, 3})
          EXPECT_LE(rel_err(run_fused(p, tiles(tk, tq, tq + 1, path)), ref), tol<T>())
              << name << " path " << path << " tk " << tk << " tq " << tq;
  }
}

TYPED_TEST(FusedTyped, RandomizedAgainstReference) {
  using T = TypeParam;
  std::mt19937 g(1234);
  double worst = 0;
  for (int n = 0; n < 120; ++n) {
    const Problem<T> p = random_problem<T>(g);
    const auto ref = run_reference(p);
    const Index tk = std::vector<Index>{0, 1, 3, 8, 16}[static_cast<std::size_t>(n % 5)];
    const Index tq = std::vector<Index>{0, 1, 7}[static_cast<std::size_t>(n % 3)];
    const Index chunk = std::vector<Index>{0, 1, 10, 33}[static_cast<std::size_t>(n % 4)];
    std::vector<Shape> keep_shapes;
    const auto fused = run_fused(p, tiles(tk, tq), nullptr, &keep_shapes);  // the default path
    worst = std::max(worst, rel_err(fused, ref));
    EXPECT_LE(rel_err(fused, ref), tol<T>()) << "case " << n << ": " << describe(p) << " tk " << tk << " tq " << tq;
    for (int path : {kTiled, kRows}) {
      const auto other = run_fused(p, tiles(tk, tq, chunk, path));
      worst = std::max(worst, rel_err(other, ref));
      EXPECT_LE(rel_err(other, ref), tol<T>()) << "case " << n << " path " << path << ": " << describe(p);
    }
    if (p.dropout_rate > 0) {
      // one draw, with Flax's shape
      ASSERT_EQ(keep_shapes.size(), 1u);
      Shape want = p.weights_shape();
      if (p.broadcast_dropout) std::fill(want.begin(), want.end() - 2, 1);
      EXPECT_EQ(keep_shapes[0], want);
    }
  }
  std::cout << "[          ] " << linen::dtype_name<T>() << ": worst fused vs reference " << worst << " (tolerance "
            << tol<T>() << ")\n";
}

// force_fp32_for_softmax: the reference keeps the weights in float; the fused path always
// does, so the two agree at least as well as without it.
TYPED_TEST(FusedTyped, ForceFp32Softmax) {
  using T = TypeParam;
  std::mt19937 g(77);
  for (int n = 0; n < 20; ++n) {
    const Problem<T> p = random_problem<T>(g);
    const auto d = linen::detail::check_qkv(p.shape(p.lq, p.d), p.shape(p.lk, p.d), p.shape(p.lk, p.dv), "t");
    std::vector<T> ref(static_cast<std::size_t>(linen::num_elements(d.output_shape()))), fused = ref;
    const RecordedKeep keep{p.keep_seed};
    AttentionOptions<T> o = options_of(p, keep);
    o.force_fp32_for_softmax = true;
    linen::detail::attention_reference<T>(d, p.q.data(), p.k.data(), p.v.data(), o, ref.data(), nullptr, "t");
    for (int path : {kTiled, kRows}) {
      linen::detail::attention_fused<T>(d, p.q.data(), p.k.data(), p.v.data(), o, fused.data(), "t", tiles(4, 0, 7, path));
      EXPECT_LE(rel_err(fused, ref), tol<T>()) << describe(p) << " path " << path;
    }
  }
}

// Edge shapes: L = 1, kv_length = 1, lengths of 1 against long ones, depth 1.
TYPED_TEST(FusedTyped, EdgeLengths) {
  using T = TypeParam;
  std::mt19937 g(5);
  const Index cases[][5] = {{1, 1, 1, 1, 1}, {1, 1, 2, 8, 8}, {1, 300, 2, 16, 4}, {300, 1, 2, 16, 4},
                            {2, 129, 1, 3, 5}, {129, 2, 3, 5, 3}, {64, 64, 1, 64, 64}};
  for (const auto& c : cases) {
    Problem<T> p;
    p.batch = {2};
    p.lq = c[0];
    p.lk = c[1];
    p.h = c[2];
    p.d = c[3];
    p.dv = c[4];
    fill_normal(p.q, static_cast<std::size_t>(2 * p.lq * p.h * p.d), g);
    fill_normal(p.k, static_cast<std::size_t>(2 * p.lk * p.h * p.d), g);
    fill_normal(p.v, static_cast<std::size_t>(2 * p.lk * p.h * p.dv), g);
    const auto ref = run_reference(p);
    for (bool causal : {false, true}) {
      p.causal = causal;
      const auto r = run_reference(p);
      EXPECT_LE(rel_err(run_fused(p), r), tol<T>()) << describe(p) << " causal " << causal;
      for (int path : {kTiled, kRows})
        EXPECT_LE(rel_err(run_fused(p, tiles(1, 1, 5, path)), r), tol<T>())
            << describe(p) << " causal " << causal << " path " << path;
    }
  }
}

// The causal flag equals make_causal_mask's mask (on the reference and fused paths), and
// combines with a padding mask, including rows the two leave fully masked (their mean of
// V reaches past the diagonal: the skipped tiles must be re-run).
TYPED_TEST(FusedTyped, CausalFlagEqualsCausalMask) {
  using T = TypeParam;
  std::mt19937 g(9);
  for (Index len : {1, 7, 40, 100}) {
    Problem<T> p;
    p.batch = {2};
    p.lq = p.lk = len;
    p.h = 2;
    p.d = 8;
    p.dv = 6;
    fill_normal(p.q, static_cast<std::size_t>(2 * len * 2 * 8), g);
    fill_normal(p.k, static_cast<std::size_t>(2 * len * 2 * 8), g);
    fill_normal(p.v, static_cast<std::size_t>(2 * len * 2 * 6), g);
    // causal as an explicit mask [2, 1, L, L] (make_causal_mask's), with left padding in
    // batch 1: keys < len/3 masked out, so rows < len/3 are fully masked.
    Problem<T> explicit_mask = p;
    explicit_mask.has_mask = true;
    explicit_mask.mask_shape = {2, 1, len, len};
    explicit_mask.mask.assign(static_cast<std::size_t>(2 * len * len), 0);
    Problem<T> flag = p;
    flag.causal = true;
    flag.has_mask = true;
    flag.mask_shape = {2, 1, 1, len};
    flag.mask.assign(static_cast<std::size_t>(2 * len), 1);
    for (Index b = 0; b < 2; ++b)
      for (Index i = 0; i < len; ++i)
        for (Index j = 0; j < len; ++j) {
          const bool pad = b == 1 && j < len / 3;
          explicit_mask.mask[static_cast<std::size_t>((b * len + i) * len + j)] = (j <= i && !pad) ? 1 : 0;
          if (i == 0) flag.mask[static_cast<std::size_t>(b * len + j)] = pad ? 0 : 1;
        }
    const auto want = run_reference(explicit_mask);
    EXPECT_LE(rel_err(run_reference(flag), want), tol<T>()) << "reference, len " << len;
    for (int path : {kTiled, kRows})
      for (Index tk : {0, 1, 4, 16})
        for (Index tq : {0, 1, 9}) {
          const auto t = tiles(tk, tq, tq * 2, path);
          EXPECT_LE(rel_err(run_fused(flag, t), want), tol<T>()) << "flag, len " << len << " tk " << tk << " path " << path;
          EXPECT_LE(rel_err(run_fused(explicit_mask, t), want), tol<T>())
              << "mask, len " << len << " tk " << tk << " path " << path;
        }
  }
}

// A fully masked row is the mean of V (never NaN or 0); a row of -inf bias is NaN, as in
// Flax; NaN in an input spreads to its rows only.
TYPED_TEST(FusedTyped, FlaxEdgeSemantics) {
  using T = TypeParam;
  Problem<T> p;
  p.lq = 3;
  p.lk = 20;
  p.h = 1;
  p.d = 4;
  p.dv = 2;
  std::mt19937 g(3);
  fill_normal(p.q, 12, g);
  fill_normal(p.k, 80, g);
  fill_normal(p.v, 40, g);
  p.has_mask = true;
  p.mask_shape = {3, 20};
  p.mask.assign(60, 1);
  for (Index j = 0; j < 20; ++j) p.mask[static_cast<std::size_t>(j)] = 0;  // row 0 fully masked
  p.has_bias = true;
  p.bias_shape = {3, 20};
  p.bias.assign(60, T(0.5f));
  for (Index j = 0; j < 20; ++j) p.bias[static_cast<std::size_t>(40 + j)] = -std::numeric_limits<T>::infinity();
  for (const auto& t : {tiles(0, 0, 0, kTiled), tiles(3, 1, 0, kTiled), tiles(0, 0, 0, kRows), tiles(3, 0, 5, kRows)}) {
    const Index tk = t.tile_keys;
    const auto out = run_fused(p, t);
    for (Index c = 0; c < 2; ++c) {
      double mean = 0;
      for (Index j = 0; j < 20; ++j) mean += static_cast<double>(p.v[static_cast<std::size_t>(j * 2 + c)]) / 20;
      EXPECT_NEAR(static_cast<double>(out[static_cast<std::size_t>(c)]), mean, 2 * tol<T>() * 4) << "tk " << tk;
      EXPECT_TRUE(std::isfinite(static_cast<double>(out[static_cast<std::size_t>(2 + c)])));
      EXPECT_TRUE(std::isnan(static_cast<double>(out[static_cast<std::size_t>(4 + c)]))) << "-inf bias row";
    }
    EXPECT_LE(rel_err(out, run_reference(p)), tol<T>());
  }
  // NaN in one key poisons every row that sees it (all rows here), like the reference.
  Problem<T> n = p;
  n.has_mask = n.has_bias = false;
  n.k[5] = std::numeric_limits<T>::quiet_NaN();
  EXPECT_LE(rel_err(run_fused(n), run_reference(n)), tol<T>());
  EXPECT_LE(rel_err(run_fused(n, tiles(0, 0, 0, kRows)), run_reference(n)), tol<T>());
}

// Results do not depend on the number of threads: bitwise equal with pools of 2 and 3.
TYPED_TEST(FusedTyped, ThreadsGiveTheSameBits) {
  using T = TypeParam;
  std::mt19937 g(11);
  Problem<T> p;
  p.batch = {2};
  p.lq = 150;
  p.lk = 130;
  p.h = 3;
  p.d = 16;
  p.dv = 8;
  fill_normal(p.q, static_cast<std::size_t>(2 * 150 * 3 * 16), g);
  fill_normal(p.k, static_cast<std::size_t>(2 * 130 * 3 * 16), g);
  fill_normal(p.v, static_cast<std::size_t>(2 * 130 * 3 * 8), g);
  p.has_mask = true;
  p.mask_shape = {2, 1, 150, 130};
  p.mask.resize(2 * 150 * 130);
  std::bernoulli_distribution bern(0.9);
  for (auto& m : p.mask) m = bern(g);
  p.causal = true;
  p.dropout_rate = 0.2;
  p.broadcast_dropout = false;
  p.keep_seed = 4;
  for (int path : {kTiled, kRows}) {
    const auto t = tiles(16, 8, 20, path);
    const auto one = run_fused(p, t);
    EXPECT_LE(rel_err(one, run_reference(p)), tol<T>());
    for (int threads : {2, 3}) {
      Eigen::ThreadPool pool(threads);
      for (int rep = 0; rep < 3; ++rep) {
        const auto many = run_fused(p, t, &pool);
        ASSERT_EQ(many.size(), one.size());
        for (std::size_t i = 0; i < one.size(); ++i)
          ASSERT_EQ(static_cast<double>(many[i]), static_cast<double>(one[i]))
              << "path " << path << ", " << threads << " threads, element " << i;
      }
    }
  }
}

// The kernel reads any layout through strides: a head-major cache [B, H, L, D] (as a
// decoder may keep it) and only the first `used` positions of a longer one, with the
// causal offset of a decode step at position used - 1.
TYPED_TEST(FusedTyped, HeadMajorCacheThroughStrides) {
  using T = TypeParam;
  std::mt19937 g(8);
  const Index B = 2, H = 3, D = 8, max_len = 50;
  for (Index lq : {1, 2, 5}) {
    for (Index used : {1, 17, 50}) {
      if (used < lq) continue;
      Problem<T> p;  // the reference problem: Flax layout, keys [0, used)
      p.batch = {B};
      p.lq = lq;
      p.lk = used;
      p.h = H;
      p.d = p.dv = D;
      fill_normal(p.q, static_cast<std::size_t>(B * lq * H * D), g);
      fill_normal(p.k, static_cast<std::size_t>(B * used * H * D), g);
      fill_normal(p.v, static_cast<std::size_t>(B * used * H * D), g);
      // the causal mask of queries at positions used - lq .. used - 1
      p.has_mask = true;
      p.mask_shape = {lq, used};
      p.mask.resize(static_cast<std::size_t>(lq * used));
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < used; ++j) p.mask[static_cast<std::size_t>(i * used + j)] = j <= i + used - lq;
      const auto want = run_reference(p);
      // head-major caches of max_len positions holding the same keys and values
      std::vector<T> kc(static_cast<std::size_t>(B * H * max_len * D), T(99.0f)), vc = kc;
      for (Index b = 0; b < B; ++b)
        for (Index j = 0; j < used; ++j)
          for (Index h = 0; h < H; ++h)
            for (Index d = 0; d < D; ++d) {
              const auto src = static_cast<std::size_t>(((b * used + j) * H + h) * D + d);
              const auto dst = static_cast<std::size_t>(((b * H + h) * max_len + j) * D + d);
              kc[dst] = p.k[src];
              vc[dst] = p.v[src];
            }
      for (int path : {kTiled, kRows}) {
        std::vector<T> out(want.size());
        linen::detail::FusedAttentionArgs<T> a;
        a.B = B;
        a.H = H;
        a.Lq = lq;
        a.Lk = used;
        a.D = a.Dv = D;
        a.query = p.q.data();
        a.q_sb = lq * H * D;
        a.q_sl = H * D;
        a.q_sh = D;
        a.key = kc.data();
        a.value = vc.data();
        a.k_sb = a.v_sb = H * max_len * D;
        a.k_sl = a.v_sl = D;
        a.k_sh = a.v_sh = max_len * D;
        a.out = out.data();
        a.o_sb = lq * H * D;
        a.o_sl = H * D;
        a.o_sh = D;
        a.query_scale = linen::detail::depth_scale<T>(D);
        a.causal = true;
        a.causal_offset = used - lq;
        a.tuning = tiles(4, 0, 8, path);
        linen::detail::fused_attention(a);
        EXPECT_LE(rel_err(out, want), tol<T>()) << "lq " << lq << " used " << used << " path " << path;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Other SIMD widths and register blockings than this build's default: the kernel source
// is width-generic (AVX-512's 16 lanes and 32 registers run the same code), so every
// width that this machine can run is checked against the reference.

template <class T, class P, int MR, int NR>
void check_variant(const char* what) {
  std::mt19937 g(21);
  for (int n = 0; n < 40; ++n) {
    const Problem<T> p = random_problem<T>(g);
    const auto ref = run_reference(p);
    const Index tk = std::vector<Index>{0, 1, 5, 8}[static_cast<std::size_t>(n % 4)];
    for (int path : {kTiled, kRows})
      EXPECT_LE(rel_err(run_fused<T, P, MR, NR>(p, tiles(tk, n % 2 ? 0 : 5, n % 3 ? 0 : 9, path)), ref), tol<T>())
          << what << " case " << n << " path " << path << ": " << describe(p);
  }
}

TEST(FusedVariants, ScalarFallback) {
  check_variant<float, float, 4, 4>("float scalar");
  check_variant<Eigen::bfloat16, float, 4, 4>("bfloat16 scalar");
}

TEST(FusedVariants, Sse) {
  // SSE's shape (4 lanes, 6 x 2); half types round and widen lane by lane there.
  check_variant<float, ei::Packet4f, 6, 2>("float Packet4f 6x2");
  check_variant<Eigen::half, ei::Packet4f, 6, 2>("half Packet4f 6x2");
}

#ifdef EIGEN_VECTORIZE_AVX
TEST(FusedVariants, AvxBlockingOfAvx512) {
  // AVX-512's register blocking (6 x 4 accumulators) on 8 lanes.
  check_variant<float, ei::Packet8f, 6, 4>("float Packet8f 6x4");
}
#endif

// ---------------------------------------------------------------------------------------
// Dispatch: Auto is fused unless sowing; Fused refuses to sow; weights honour is_causal;
// errors name the shapes on the fused path as on the reference.

TEST(FusedDispatch, AutoSowsThroughTheReferenceAndFusedRefuses) {
  Tensor<float, 4> q(1, 5, 2, 4), k(1, 6, 2, 4), v(1, 6, 2, 3);
  q.setRandom();
  k.setRandom();
  v.setRandom();
  AttentionOptions<float> opt;
  int sown = 0;
  opt.sow_weights = [&](linen::ArrayRef<float> w) {
    ++sown;
    EXPECT_EQ(w.shape(), (Shape{1, 2, 5, 6}));
  };
  const auto a = linen::dot_product_attention(q, k, v, opt);
  EXPECT_EQ(sown, 1);
  opt.implementation = Implementation::Fused;
  EXPECT_THROW((void)linen::dot_product_attention(q, k, v, opt), std::invalid_argument);
  opt.sow_weights = nullptr;
  const auto b = linen::dot_product_attention(q, k, v, opt);
  EXPECT_LE(linen_test::rel_err(b, a), tol<float>());
}

TEST(FusedDispatch, WeightsHonourIsCausal) {
  Tensor<float, 4> q(1, 4, 1, 2), k(1, 4, 1, 2);
  q.setRandom();
  k.setRandom();
  AttentionOptions<float> opt;
  opt.is_causal = true;
  const auto w = linen::dot_product_attention_weights(q, k, opt);
  for (Index i = 0; i < 4; ++i) {
    float sum = 0;
    for (Index j = 0; j < 4; ++j) {
      if (j > i) {
        EXPECT_EQ(w(0, 0, i, j), 0.0f);
      }
      sum += w(0, 0, i, j);
    }
    EXPECT_NEAR(sum, 1.0f, 1e-6f);
  }
}

TEST(FusedDispatch, ErrorsNameTheShapes) {
  Tensor<float, 4> q(2, 5, 2, 4), k(2, 6, 2, 4), v(2, 6, 2, 3);
  q.setRandom();
  k.setRandom();
  v.setRandom();
  Tensor<bool, 4> mask(2, 2, 5, 7);  // kv length 7 != 6
  mask.setConstant(true);
  AttentionOptions<float> opt;
  opt.implementation = Implementation::Fused;
  opt.mask = mask;
  try {
    (void)linen::dot_product_attention(q, k, v, opt);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("(2, 2, 5, 7)"), std::string::npos) << e.what();
  }
  opt.mask = {};
  opt.dropout_rate = 0.5;  // no rng
  EXPECT_THROW((void)linen::dot_product_attention(q, k, v, opt), std::invalid_argument);
  opt.dropout_rate = 1.0;
  EXPECT_THROW((void)linen::dot_product_attention(q, k, v, opt), std::invalid_argument);
}

TEST(FusedDispatch, EmptyKeysAndZeroDepthLikeTheReference) {
  Tensor<float, 4> q(1, 3, 2, 4), k(1, 0, 2, 4), v(1, 0, 2, 5);
  q.setRandom();
  AttentionOptions<float> opt;
  opt.implementation = Implementation::Fused;
  const auto f = linen::dot_product_attention(q, k, v, opt);
  opt.implementation = Implementation::Reference;
  const auto r = linen::dot_product_attention(q, k, v, opt);
  ASSERT_EQ(linen::shape_of(f), (Shape{1, 3, 2, 5}));
  for (Index i = 0; i < f.size(); ++i) {
    EXPECT_EQ(f.data()[i], 0.0f);
    EXPECT_EQ(r.data()[i], 0.0f);
  }
  // Depth 0: every logit is 0, so each row is the mean of V, on both paths.
  Tensor<float, 4> q0(1, 3, 2, 0), k0(1, 4, 2, 0), v0(1, 4, 2, 5);
  v0.setRandom();
  for (auto impl : {Implementation::Fused, Implementation::Reference}) {
    opt.implementation = impl;
    const auto o = linen::dot_product_attention(q0, k0, v0, opt);
    for (Index i = 0; i < 3; ++i)
      for (Index h = 0; h < 2; ++h)
        for (Index c = 0; c < 5; ++c) {
          float mean = 0;
          for (Index j = 0; j < 4; ++j) mean += v0(0, j, h, c) / 4;
          EXPECT_NEAR(o(0, i, h, c), mean, 1e-6f);
        }
  }
}

// ---------------------------------------------------------------------------------------
// The modules with a thread pool (AttentionConfig::thread_pool): the projections split by
// rows over the threads, the fused kernel on the pool; equal to the single-threaded module.
TEST(FusedModule, ThreadPoolGivesTheSingleThreadedOutput) {
  const Index B = 2, L = 150, E = 32, H = 4;
  linen::AttentionConfig<float> config;
  config.num_heads = H;
  const linen::MultiHeadDotProductAttention<float> plain(config);
  Eigen::ThreadPool pool(2);
  config.thread_pool = &pool;
  const linen::MultiHeadDotProductAttention<float> pooled(config);
  Tensor<float, 3> x(B, L, E), kv(B, L + 7, E);
  std::mt19937 g(2);
  std::normal_distribution<float> nd;
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = nd(g);
  for (Index i = 0; i < kv.size(); ++i) kv.data()[i] = nd(g);
  auto variables = plain.init(linen::random::key(3), x, kv);
  auto& p = variables.params;
  for (auto* bias : {&p.query.bias, &p.key.bias, &p.value.bias})  // nonzero biases
    for (Index i = 0; i < bias->size(); ++i) bias->data()[i] = 0.1f * nd(g);
  for (Index i = 0; i < p.out.bias.size(); ++i) p.out.bias.data()[i] = 0.1f * nd(g);
  linen::CallOptions<float> call;
  linen::Tensor<float, 2> tokens(B, L);
  tokens.setZero();
  const Tensor<bool, 4> causal = linen::make_causal_mask(tokens);
  for (bool is_causal : {false, true}) {
    if (is_causal) call.mask = causal;
    EXPECT_LE(linen_test::rel_err(pooled.apply(variables, x, call), plain.apply(variables, x, call)), tol<float>())
        << "self, causal " << is_causal;
  }
  call.mask = {};
  EXPECT_LE(linen_test::rel_err(pooled.apply(variables, x, kv), plain.apply(variables, x, kv)), tol<float>())
      << "cross";
}

// ---------------------------------------------------------------------------------------
// Memory: the fused path allocates O(L), the reference O(L^2) (one head's weights).
TEST(FusedMemory, PeakAllocationIsLinearInLength) {
#ifndef LINEN_TEST_COUNTS_MALLOC
  GTEST_SKIP() << "allocations are counted only with glibc and without sanitizers";
#else
  const Index L = 2048, H = 2, D = 32;
  Tensor<float, 4> q(1, L, H, D), k(1, L, H, D), v(1, L, H, D);
  q.setRandom();
  k.setRandom();
  v.setRandom();
  AttentionOptions<float> opt;
  opt.is_causal = true;
  for (int threads : {1, 2}) {
    Eigen::ThreadPool pool(threads);
    opt.thread_pool = threads > 1 ? &pool : nullptr;
    const long long before = g_live.load();
    g_peak.store(before);
    const auto out = linen::dot_product_attention(q, k, v, opt);
    const long long extra = g_peak.load() - before;
    // Scratch is a few hundred KiB per thread; the weights of one head would be 16 MiB.
    // (The output, 512 KiB, is allocated inside the call too.)
    EXPECT_LT(extra, 2LL << 20) << threads << " threads: " << extra << " bytes";
    EXPECT_TRUE(std::isfinite(out(0, L - 1, 1, D - 1)));
  }
  // The accounting sees Eigen's buffers: the reference path's [L, L] weights of a head.
  opt.implementation = Implementation::Reference;
  opt.thread_pool = nullptr;
  const long long before = g_live.load();
  g_peak.store(before);
  (void)linen::dot_product_attention(q, k, v, opt);
  EXPECT_GT(g_peak.load() - before, L * L * 4LL);
#endif
}

// ---------------------------------------------------------------------------------------
// The micro-GEMM family: every blocking, packet width and remainder path gives the same
// bits, so the backward's tiles (BackwardBlocking, gemm::product) recompute exactly the
// forward's logits (ForwardBlocking, one strip with the running max).

template <class C, class P, int MR, int NR>
std::vector<C> backward_style_product(Index M, Index N, Index K, const std::vector<C>& a, Index am, Index at,
                                      const std::vector<C>& b, Index bt, const std::vector<C>* init) {
  std::vector<C> c(static_cast<std::size_t>(M * N), C(0));
  if (init) c = *init;
  linen::detail::gemm::product<P, MR, NR>(M, N, K, a.data(), am, at, b.data(), bt, c.data(), N,
                                          linen::detail::gemm::ZeroOrLoad{init != nullptr},
                                          linen::detail::gemm::Store{});
  return c;
}

template <class C, class P = linen::detail::simd::packet_t<C>, class FB = linen::detail::gemm::ForwardBlocking<P>,
          class BB = linen::detail::gemm::BackwardBlocking<P>, int W = linen::detail::simd::size_v<P>>
void check_micro_gemm_family() {
  namespace gemm = linen::detail::gemm;
  constexpr Index QB = Index{FB::NR} * W;
  std::mt19937 g(31);
  std::normal_distribution<double> nd;
  for (Index nk : {1, 2, 5, 6, 7, 13, 24}) {
    for (Index D : {1, 3, 8, 17, 33}) {
      // K [nk][D] with a row stride > D (read in place, as through Flax's strides), Q^T [D][QB]
      const Index ks = D + 3;
      std::vector<C> k(static_cast<std::size_t>(nk * ks)), qt(static_cast<std::size_t>(D * QB));
      for (auto& x : k) x = static_cast<C>(nd(g));
      for (auto& x : qt) x = static_cast<C>(nd(g));
      // the forward: one strip of QB rows, the running max on the way
      std::vector<C> fwd(static_cast<std::size_t>(nk * QB));
      P mx[FB::NR];
      for (auto& m : mx) m = linen::detail::simd::set1<P>(-std::numeric_limits<C>::infinity());
      gemm::strip<P, FB::MR, FB::NR>(nk, D, k.data(), ks, 1, qt.data(), QB, fwd.data(), QB, 0, gemm::Zero{},
                                     gemm::StoreMax<P>{mx});
      const auto want_bits = [&](const std::vector<C>& got, const char* what) {
        ASSERT_EQ(got.size(), fwd.size());
        for (std::size_t i = 0; i < fwd.size(); ++i)
          ASSERT_EQ(got[i], fwd[i]) << what << ": nk " << nk << " D " << D << " element " << i;
      };
      want_bits(backward_style_product<C, P, BB::MR, BB::NR>(nk, QB, D, k, ks, 1, qt, QB, nullptr), "backward blocking");
      want_bits(backward_style_product<C, P, 1, 1>(nk, QB, D, k, ks, 1, qt, QB, nullptr), "1 x 1 blocks");
      want_bits(backward_style_product<C, C, 3, 1>(nk, QB, D, k, ks, 1, qt, QB, nullptr), "scalar member");
      // the running max is the max of the tile's columns
      alignas(64) C lanes[W];
      for (int v = 0; v < FB::NR; ++v) {
        linen::detail::simd::store(lanes, mx[v]);
        for (int l = 0; l < W; ++l) {
          C m = -std::numeric_limits<C>::infinity();
          for (Index j = 0; j < nk; ++j) m = std::max(m, fwd[static_cast<std::size_t>(j * QB + v * W + l)]);
          ASSERT_EQ(lanes[l], m);
        }
      }
      // O^T = alpha O^T + V^T P^T (Rescale) equals the accumulating product on alpha O^T
      std::vector<C> alpha(static_cast<std::size_t>(QB)), ot(static_cast<std::size_t>(D * QB));
      for (auto& x : alpha) x = static_cast<C>(std::abs(nd(g)));
      for (auto& x : ot) x = static_cast<C>(nd(g));
      std::vector<C> scaled = ot;
      for (Index c = 0; c < D; ++c)
        for (Index r = 0; r < QB; ++r) scaled[static_cast<std::size_t>(c * QB + r)] *= alpha[static_cast<std::size_t>(r)];
      P av[FB::NR];
      for (int v = 0; v < FB::NR; ++v) av[v] = linen::detail::simd::load<P>(alpha.data() + v * W);
      std::vector<C> pv = ot;  // V = k read as [nk keys][D columns], P^T = fwd
      gemm::strip<P, FB::MR, FB::NR>(D, nk, k.data(), 1, ks, fwd.data(), QB, pv.data(), QB, 0, gemm::Rescale<P>{av},
                                     gemm::Store{});
      const auto acc = backward_style_product<C, P, BB::MR, BB::NR>(D, QB, nk, k, 1, ks, fwd, QB, &scaled);
      for (std::size_t i = 0; i < pv.size(); ++i) ASSERT_EQ(acc[i], pv[i]) << "rescale: nk " << nk << " D " << D;
    }
  }
  // Columns that are no multiple of the packet: strips of one packet, then the scalar member.
  for (Index N : {1, W - 1 > 0 ? W - 1 : 1, W + 3, 3 * W + 1}) {
    const Index M = 11, K = 9;
    std::vector<C> a(static_cast<std::size_t>(M * K)), b(static_cast<std::size_t>(K * N));
    for (auto& x : a) x = static_cast<C>(nd(g));
    for (auto& x : b) x = static_cast<C>(nd(g));
    const auto wide = backward_style_product<C, P, BB::MR, BB::NR>(M, N, K, a, K, 1, b, N, nullptr);
    const auto scalar = backward_style_product<C, C, 1, 1>(M, N, K, a, K, 1, b, N, nullptr);
    for (std::size_t i = 0; i < wide.size(); ++i) ASSERT_EQ(wide[i], scalar[i]) << "N " << N << " element " << i;
    // and the plain sums, to rounding
    for (Index m = 0; m < M; ++m)
      for (Index n = 0; n < N; ++n) {
        double e = 0;
        for (Index t = 0; t < K; ++t)
          e += double(a[static_cast<std::size_t>(m * K + t)]) * double(b[static_cast<std::size_t>(t * N + n)]);
        EXPECT_NEAR(double(wide[static_cast<std::size_t>(m * N + n)]), e, 1e-4 * (1 + std::abs(e)));
      }
  }
}

TEST(MicroGemm, EveryBlockingGivesTheForwardsBitsFloat) { check_micro_gemm_family<float>(); }
TEST(MicroGemm, EveryBlockingGivesTheForwardsBitsDouble) { check_micro_gemm_family<double>(); }

// ---------------------------------------------------------------------------------------
// The logit policy states Flax's rules: each checked against Flax's arithmetic written
// out here, and against the reference at the edges (a fully masked row, a -inf bias row,
// a bias equal to the mask value, half types).

TYPED_TEST(FusedTyped, FlaxPolicyStatesFlaxsRules) {
  using T = TypeParam;
  using C = linen::accum_t<T>;
  using Policy = linen::detail::FlaxLogits<T>;
  const T scale = linen::detail::depth_scale<T>(7);
  EXPECT_EQ(static_cast<double>(scale), static_cast<double>(static_cast<T>(std::is_same_v<T, double>
                                                                                 ? std::sqrt(7.0)
                                                                                 : double(std::sqrt(7.0f)))));
  for (bool fp32 : {false, true}) {
    const Policy pol(scale, linen::detail::flax_keep_scale<T>(0.3), fp32);
    // query / sqrt(depth) in dtype
    for (double q : {1.0, -2.5, 0.1, 3.3e4})
      EXPECT_EQ(pol.query(static_cast<T>(q)), static_cast<C>(static_cast<T>(static_cast<T>(q) / scale)));
    // the product stored in dtype (half types round), the bias added in dtype
    const C s = static_cast<C>(1.00048828125 + 1e-6);
    EXPECT_EQ(pol.logit(s), static_cast<C>(static_cast<T>(s)));
    EXPECT_EQ(Policy::changes_logits(), linen::is_half_type_v<T>);
    EXPECT_EQ(pol.add_bias(pol.logit(s), T(0.25f)), static_cast<C>(static_cast<T>(pol.logit(s) + C(0.25f))));
    EXPECT_TRUE(std::isinf(pol.add_bias(s, -std::numeric_limits<T>::infinity())));
    // masked logits: finfo(dtype).min, where the running max starts too
    EXPECT_EQ(Policy::mask_value(), static_cast<C>(std::numeric_limits<T>::lowest()));
    EXPECT_EQ(Policy::initial_max(), Policy::mask_value());
    EXPECT_FALSE(Policy::masked_vanish(Policy::mask_value()));  // a fully masked row: weights 1 / Lk
    EXPECT_TRUE(Policy::masked_vanish(C(0)));
    // weights in dtype unless force_fp32_for_softmax; dropout's keep / keep_prob in dtype
    EXPECT_EQ(pol.rounds_weights(), linen::is_half_type_v<T> && !fp32);
    const C w = C(1) / C(3);
    EXPECT_EQ(pol.weight(w), pol.rounds_weights() ? static_cast<C>(static_cast<T>(w)) : w);
    EXPECT_EQ(pol.keep_scale(), static_cast<C>(T(1) / static_cast<T>(0.7)));
    EXPECT_EQ(pol.dropout(w, false), C(0));
    EXPECT_EQ(pol.dropout(w, true), pol.weight(w * pol.keep_scale()));
    EXPECT_EQ(pol.query_derivative(), C(1) / static_cast<C>(scale));
  }
  // At the edges the reference and both fused kernels agree with the policy's rules:
  // row 0 fully masked (uniform weights), row 1 a bias of mask_value on every key but one
  // (that key takes all the weight), row 2 a -inf bias (NaN), row 3 plain.
  Problem<T> p;
  p.lq = 4;
  p.lk = 9;
  p.d = 5;
  p.dv = 3;
  std::mt19937 g(12);
  fill_normal(p.q, 20, g);
  fill_normal(p.k, 45, g);
  fill_normal(p.v, 27, g);
  p.has_mask = true;
  p.mask_shape = {4, 9};
  p.mask.assign(36, 1);
  for (Index j = 0; j < 9; ++j) p.mask[static_cast<std::size_t>(j)] = 0;
  p.has_bias = true;
  p.bias_shape = {4, 9};
  p.bias.assign(36, T(0));
  for (Index j = 0; j < 9; ++j) {
    if (j != 4) p.bias[static_cast<std::size_t>(9 + j)] = std::numeric_limits<T>::lowest();
    p.bias[static_cast<std::size_t>(18 + j)] = -std::numeric_limits<T>::infinity();
  }
  const auto ref = run_reference(p);
  for (Index c = 0; c < 3; ++c) {
    double mean = 0;
    for (Index j = 0; j < 9; ++j) mean += static_cast<double>(p.v[static_cast<std::size_t>(j * 3 + c)]) / 9;
    EXPECT_NEAR(static_cast<double>(ref[static_cast<std::size_t>(c)]), mean, 4 * tol<T>());
    EXPECT_EQ(static_cast<double>(ref[static_cast<std::size_t>(3 + c)]),
              static_cast<double>(p.v[static_cast<std::size_t>(4 * 3 + c)]));  // the one key, weight exactly 1
    EXPECT_TRUE(std::isnan(static_cast<double>(ref[static_cast<std::size_t>(6 + c)])));
  }
  for (int path : {kTiled, kRows})
    for (Index tk : {0, 2}) {
      const auto fused = run_fused(p, tiles(tk, 0, 3, path));
      EXPECT_LE(rel_err(fused, ref), tol<T>()) << "path " << path << " tk " << tk;
      for (Index c = 0; c < 3; ++c)
        EXPECT_EQ(static_cast<double>(fused[static_cast<std::size_t>(3 + c)]),
                  static_cast<double>(ref[static_cast<std::size_t>(3 + c)]));
    }
}

// The forward's statistics for the backward (AttentionProblem::row_max, row_sum,
// out_acc): the softmax's max and denominator of every row, on both kernels; a fully
// masked row keeps m = finfo.min and l = Lk; out_acc rounds to out.
TYPED_TEST(FusedTyped, RowStatisticsAreTheSoftmaxs) {
  using T = TypeParam;
  using C = linen::accum_t<T>;
  using Policy = linen::detail::FlaxLogits<T>;
  std::mt19937 g(14);
  Problem<T> p;
  p.batch = {2};
  p.lq = 5;
  p.lk = 23;
  p.h = 2;
  p.d = 6;
  p.dv = 4;
  fill_normal(p.q, 2 * 5 * 2 * 6, g);
  fill_normal(p.k, 2 * 23 * 2 * 6, g);
  fill_normal(p.v, 2 * 23 * 2 * 4, g);
  p.has_mask = true;
  p.mask_shape = {2, 1, 5, 23};
  p.mask.assign(2 * 5 * 23, 1);
  for (Index j = 0; j < 23; ++j) p.mask[static_cast<std::size_t>(5 * 23 + 2 * 23 + j)] = 0;  // batch 1, row 2
  for (Index j = 0; j < 23; j += 3) p.mask[static_cast<std::size_t>(j)] = 0;
  p.causal = true;
  const auto d = linen::detail::check_qkv(p.shape(p.lq, p.d), p.shape(p.lk, p.d), p.shape(p.lk, p.dv), "test");
  const linen::detail::Broadcast<bool> mask(linen::ArrayRef<bool>(reinterpret_cast<const bool*>(p.mask.data()),
                                                                  p.mask_shape),
                                            d, "mask");
  const Policy pol(linen::detail::depth_scale<T>(p.d), C(1), false);
  for (int path : {kTiled, kRows}) {
    for (Index tk : {0, 4}) {
      std::vector<T> out(static_cast<std::size_t>(2 * 5 * 2 * 4));
      std::vector<C> out_acc(out.size()), m(2 * 2 * 5), l(m.size());
      auto a = linen::detail::flax_problem(d, p.q.data(), p.k.data(), p.v.data(), out.data());
      a.mask = mask.view();
      a.causal = true;
      a.row_max = m.data();
      a.row_sum = l.data();
      a.out_acc = out_acc.data();
      a.tuning = tiles(tk, 0, 7, path);
      linen::detail::fused_attention(a);
      EXPECT_LE(rel_err(out, run_reference(p)), tol<T>()) << "path " << path;
      for (std::size_t i = 0; i < out.size(); ++i) ASSERT_EQ(static_cast<double>(out[i]), double(static_cast<T>(out_acc[i])));
      for (Index b = 0; b < 2; ++b)
        for (Index h = 0; h < 2; ++h)
          for (Index i = 0; i < 5; ++i) {
            // the row's logits by the policy, in double from there
            std::vector<double> s(23);
            double mx = static_cast<double>(Policy::initial_max());
            for (Index j = 0; j < 23; ++j) {
              double x = 0;
              for (Index c = 0; c < 6; ++c)
                x += double(pol.query(p.q[static_cast<std::size_t>(((b * 5 + i) * 2 + h) * 6 + c)])) *
                     double(static_cast<C>(p.k[static_cast<std::size_t>(((b * 23 + j) * 2 + h) * 6 + c)]));
              x = double(pol.logit(static_cast<C>(x)));
              if (!p.mask[static_cast<std::size_t>((b * 5 + i) * 23 + j)] || j > i) x = double(Policy::mask_value());
              s[static_cast<std::size_t>(j)] = x;
              mx = std::max(mx, x);
            }
            double sum = 0;
            for (double x : s) sum += std::exp(x - mx);
            const std::size_t r = static_cast<std::size_t>((b * 2 + h) * 5 + i);
            if (b == 1 && i == 2) {  // fully masked
              EXPECT_EQ(m[r], Policy::mask_value());
              EXPECT_EQ(l[r], C(23));
            } else {
              EXPECT_NEAR(double(m[r]), mx, 1e-5 * (1 + std::abs(mx)) + (linen::is_half_type_v<T> ? 2e-2 : 0))
                  << "path " << path << " b " << b << " h " << h << " row " << i;
              EXPECT_NEAR(double(l[r]), sum, 1e-4 * sum + (linen::is_half_type_v<T> ? 5e-2 * sum : 0));
            }
          }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The thread loop (detail/parallel.hpp), which every parallel part of linen uses.

TEST(ThreadLoop, EveryItemOnceAndTheFirstExceptionRethrown) {
  Eigen::ThreadPool pool(3);
  for (Index items : {0, 1, 7, 100}) {
    std::vector<std::atomic<int>> seen(static_cast<std::size_t>(items));
    linen::detail::parallel_for(&pool, 4, items, [&](int worker, Index it) {
      EXPECT_GE(worker, 0);
      EXPECT_LT(worker, 4);
      seen[static_cast<std::size_t>(it)].fetch_add(1);
    });
    for (const auto& s : seen) EXPECT_EQ(s.load(), 1);
  }
  for (Eigen::ThreadPoolInterface* p : {static_cast<Eigen::ThreadPoolInterface*>(&pool),
                                        static_cast<Eigen::ThreadPoolInterface*>(nullptr)}) {
    std::atomic<int> ran{0};
    try {
      linen::detail::run_workers(p, 3, [&](int w) {
        ran.fetch_add(1);
        if (w == 1) throw linen::invalid_argument("linen: worker 1");
      });
      ADD_FAILURE() << "no exception";
    } catch (const linen::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("worker 1"), std::string::npos);
    }
    EXPECT_GE(ran.load(), 1);
  }
}

// Called from inside a task of a busy one-thread pool, the loop does its items itself
// (no task waits for a thread that never comes).
TEST(ThreadLoop, InsideABusyPoolTheCallerDoesTheWork) {
  Eigen::ThreadPool pool(1);
  std::atomic<int> done{0};
  std::vector<int> shares(4, 0);
  Eigen::Barrier finished(1);
  pool.Schedule([&] {
    linen::detail::run_workers(&pool, 4, [&](int w) { shares[static_cast<std::size_t>(w)] += 1; });
    linen::detail::parallel_for(&pool, 2, 50, [&](int, Index) { done.fetch_add(1); });
    finished.Notify();
  });
  finished.Wait();
  EXPECT_EQ(done.load(), 50);
  for (int s : shares) EXPECT_EQ(s, 1);
}

}  // namespace
