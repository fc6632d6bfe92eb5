// SPDX-License-Identifier: Apache-2.0
// The sliding-window ring cache (issue 16): RingCache steps (decode_step, decode_chunk)
// against windowed attention over the whole history: bit for bit against the kernels'
// windowed rule on a contiguous cache of every position (the same problem), to rounding
// against a Flax cache of the full length stepped with the window as its mask, and
// against a float64 restatement (the module's non-decode forward with the band mask);
// memory bounded by the window; rollback; the errors (the ring unchanged); the Flax
// interop (import_flax / export_flax).
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_fixture.hpp"

namespace {

using linen::Index;
using linen::RingCache;
using linen::Shape;
using linen::Tensor;
using linen_test::random_tensor;
using linen_test::message_of;
using linen_test::same_bytes;
using linen_test::rel_err;

template <class T>
linen::AttentionConfig<T> config(Index heads, bool decode) {
  linen::AttentionConfig<T> cfg;
  cfg.num_heads = heads;
  cfg.decode = decode;
  return cfg;
}

// The window as a mask: rows [r0, r0 + n) of [B, 1, n, L], key j visible to the row at
// position p iff p - window <= j <= p.
Tensor<bool, 4> band(Index B, Index r0, Index n, Index L, Index window) {
  Tensor<bool, 4> m(B, 1, n, L);
  for (Index b = 0; b < B; ++b)
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < L; ++j) m(b, 0, i, j) = j <= r0 + i && j >= r0 + i - window;
  return m;
}

// The kernels' windowed problem of a ring step from p0 over a contiguous cache of every
// position (full: [B, L, H, dh]), keys from the ring's origin: what ring_ops.hpp states.
template <class T>
void windowed_over_history(const linen::AttentionCache<T>& full, const T* q, Index p0, Index n, Index window,
                           Index capacity, T* out) {
  const Index L = full.max_length(), H = full.cached_key.dimension(2), dh = full.cached_key.dimension(3), F = H * dh;
  const Index s = linen::detail::decode::ring_origin(p0, window, capacity);
  linen::detail::AttentionDims d;
  d.B = full.cached_key.dimension(0);
  d.Lq = n;
  d.Lk = p0 + n - s;
  d.H = H;
  d.D = d.Dv = dh;
  auto a = linen::detail::flax_problem<T>(d, q, full.cached_key.data() + s * F, full.cached_value.data() + s * F, out);
  a.k_sb = a.v_sb = L * F;
  a.windowed = true;
  a.window_left = window - (p0 - s);
  a.window_right = p0 - s;
  if (n <= linen::detail::decode::kRowKernelMaxRows) a.tuning.path = 2;
  linen::detail::fused_attention<T>(a);
}

// Ragged steps (1 to max_chunk positions, single decode_steps among them) over a history
// several rings long.
template <class T>
void expect_ring_equals_windowed_history(Index window, Index max_chunk, Index L, double tol) {
  std::mt19937 g(static_cast<unsigned>(window * 31 + max_chunk));
  const Index B = 2, E = 16, H = 4, F = E;
  const linen::SelfAttention<T> attn(config<T>(H, true)), forward(config<T>(H, false));
  const auto x = random_tensor<T, 3>({B, L, E}, g);
  const auto params = attn.init(linen::random::key(3), x).params;
  // the float64-style restatement: the non-decode forward of the whole history, the band as mask
  const Tensor<bool, 4> full_band = band(1, 0, L, L, window);
  linen::CallOptions<T> fc;
  fc.mask = full_band;
  const Tensor<T, 3> want = forward.apply(params, x, fc);
  RingCache<T> ring = attn.init_ring_cache(params, B, window, max_chunk);
  linen::AttentionCache<T> full = attn.init_cache(params, {B}, L);
  const Index ring_elements = ring.ring_key().size();
  EXPECT_EQ(ring_elements, B * (window + max_chunk) * F);
  linen::DecodeWorkspace<T> wr, wf;
  for (Index p0 = 0; p0 < L;) {
    const Index n = std::min<Index>(L - p0, 1 + static_cast<Index>(g() % static_cast<unsigned>(max_chunk)));
    Eigen::array<Index, 3> off{0, p0, 0}, ext{B, n, E};
    const Tensor<T, 3> xi = x.slice(off, ext);
    Tensor<T, 3> yr(B, n, E), yf(B, n, E);
    const Tensor<bool, 4> m = band(B, p0, n, L, window);
    linen::CallOptions<T> cf;
    cf.mask = m;
    if (n == 1 && p0 % 3 == 0) attn.decode_step(params, ring, xi, yr, wr);
    else attn.decode_chunk(params, ring, xi, yr, wr);
    attn.decode_chunk(params, full, xi, yf, wf, cf);
    ASSERT_EQ(ring.cache_index(), p0 + n);
    EXPECT_LE(rel_err(yr, yf), linen_test::tolerance<T>()) << "p0 " << p0 << " n " << n << ": the Flax cache, masked";
    const Tensor<T, 3> wi = want.slice(off, ext);
    EXPECT_LE(rel_err(yr, wi), tol) << "p0 " << p0 << " n " << n << ": the forward over the history";
    // the attention alone, bit for bit against the kernels' windowed rule over the history
    const auto q = random_tensor<T, 4>({B, n, H, E / H}, g);
    Tensor<T, 4> o1(B, n, H, E / H), o2(B, n, H, E / H);
    linen::detail::decode::attend(ring, q.data(), n, {}, o1.data(), nullptr, nullptr, nullptr);
    windowed_over_history(full, q.data(), p0, n, window, ring.capacity(), o2.data());
    EXPECT_TRUE(same_bytes(o1.data(), o2.data(), o1.size())) << "p0 " << p0 << " n " << n;
    // memory: the ring, whatever the history; it holds what the window needs
    EXPECT_EQ(ring.ring_key().size(), ring_elements);
    EXPECT_GE(Index{ring.lowest()}, std::max<Index>(0, p0 - window));
    if (ring.lowest() == 0) {  // nothing dropped yet: Flax's cache, byte for byte
      const auto back = linen::export_flax(ring, L);
      EXPECT_TRUE(linen_test::same_bits(back.cached_key, full.cached_key)) << "p0 " << p0;
      EXPECT_TRUE(linen_test::same_bits(back.cached_value, full.cached_value)) << "p0 " << p0;
    }
    p0 += n;
  }
  EXPECT_GT(ring.lowest(), 0) << "the history never left the ring";
}

TEST(RingCache, StepsEqualWindowedAttentionOverTheHistoryFloat) {
  expect_ring_equals_windowed_history<float>(7, 4, 64, 2e-6);
  expect_ring_equals_windowed_history<float>(0, 1, 20, 2e-6);   // a window of the query alone
  expect_ring_equals_windowed_history<float>(20, 12, 90, 2e-6);  // chunks past the row kernel's 8 rows
}
TEST(RingCache, StepsEqualTheFloat64Restatement) {
  expect_ring_equals_windowed_history<double>(9, 3, 70, 1e-12);
  expect_ring_equals_windowed_history<double>(5, 16, 80, 1e-12);
}
TEST(RingCache, StepsEqualWindowedAttentionBfloat16) {
  expect_ring_equals_windowed_history<Eigen::bfloat16>(6, 2, 40, 2e-2);
}

// A verify step and a rollback to a prefix of it: the ring byte for byte as a step of
// only the accepted positions; a rollback to the step's start: every position a query
// can see as before (the next steps equal, bit for bit).
TEST(RingCache, RollbackToAnAcceptedPrefix) {
  std::mt19937 g(5);
  const Index B = 2, E = 8, H = 2, W = 6, K = 4;
  const linen::SelfAttention<float> attn(config<float>(H, true));
  const auto x = random_tensor<float, 3>({B, 40, E}, g);
  const auto params = attn.init(linen::random::key(1), x).params;
  auto history = [&](RingCache<float>& r, linen::DecodeWorkspace<float>& ws) {
    for (Index p = 0; p < 20; p += 2) {
      Eigen::array<Index, 3> off{0, p, 0}, ext{B, 2, E};
      Tensor<float, 3> y(B, 2, E);
      attn.decode_chunk(params, r, Tensor<float, 3>(x.slice(off, ext)), y, ws);
    }
  };
  Eigen::array<Index, 3> off{0, 20, 0}, ext{B, K, E};
  const Tensor<float, 3> drafts = x.slice(off, ext);
  for (Index accept = 0; accept <= K; ++accept) {
    RingCache<float> a = attn.init_ring_cache(params, B, W, K), b = a;
    linen::DecodeWorkspace<float> wa, wb;
    history(a, wa);
    history(b, wb);
    Tensor<float, 3> y(B, K, E);
    attn.decode_chunk(params, a, drafts, y, wa);
    linen::rollback(a, 20 + accept);
    if (accept > 0) {
      Eigen::array<Index, 3> ea{B, accept, E};
      Tensor<float, 3> ya(B, accept, E);
      attn.decode_chunk(params, b, Tensor<float, 3>(drafts.slice(Eigen::array<Index, 3>{0, 0, 0}, ea)), ya, wb);
      EXPECT_TRUE(linen_test::same_bits(a.ring_key(), b.ring_key())) << "accepted " << accept;
      EXPECT_TRUE(linen_test::same_bits(a.ring_value(), b.ring_value())) << "accepted " << accept;
      EXPECT_EQ(a.lowest(), b.lowest());
    }
    EXPECT_EQ(a.cache_index(), b.cache_index());
    // the next steps: the same outputs
    for (Index p = 20 + accept; p < 30; ++p) {
      Eigen::array<Index, 3> o1{0, p, 0}, e1{B, 1, E};
      const Tensor<float, 3> xp = x.slice(o1, e1);
      Tensor<float, 3> ya(B, 1, E), yb(B, 1, E);
      attn.decode_step(params, a, xp, ya, wa);
      attn.decode_step(params, b, xp, yb, wb);
      EXPECT_TRUE(linen_test::same_bits(ya, yb)) << "accepted " << accept << " position " << p;
    }
  }
  // bad rollbacks: nothing changed
  RingCache<float> r = attn.init_ring_cache(params, B, W, K);
  linen::DecodeWorkspace<float> ws;
  history(r, ws);  // index 20, holding [12, 20)
  const Tensor<float, 4> before = r.ring_key();
  const std::string low = message_of([&] { linen::rollback(r, 17); });
  EXPECT_NE(low.find("cache_index 17: it must lie in [18, 20]"), std::string::npos) << low;
  EXPECT_NE(message_of([&] { linen::rollback(r, 21); }).find("[18, 20]"), std::string::npos);
  EXPECT_TRUE(linen_test::same_bits(before, r.ring_key()));
  EXPECT_EQ(r.cache_index(), 20);
}

TEST(RingCache, BadInputsNameWhatIsAtFaultAndChangeNothing) {
  std::mt19937 g(8);
  const Index B = 2, E = 8, H = 2;
  const linen::SelfAttention<float> attn(config<float>(H, true));
  const auto x = random_tensor<float, 3>({B, 5, E}, g);
  const auto params = attn.init(linen::random::key(1), x).params;
  RingCache<float> r = attn.init_ring_cache(params, B, 4, 3);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> y(B, 5, E);
  const std::string big = message_of([&] { attn.decode_chunk(params, r, x, y, ws); });
  EXPECT_NE(big.find("a step of 5 positions on a RingCache of window 4 and capacity 7 (at most 3"), std::string::npos)
      << big;
  EXPECT_THROW(attn.decode_chunk(params, r, x, y, ws), linen::cache_overflow);
  EXPECT_EQ(r.cache_index(), 0);
  Tensor<bool, 4> m(B, 1, 1, 7);
  m.setConstant(true);
  linen::CallOptions<float> call;
  call.mask = m;
  Tensor<float, 3> x1(B, 1, E), y1(B, 1, E);
  x1.setZero();
  EXPECT_NE(message_of([&] { attn.decode_step(params, r, x1, y1, ws, call); }).find("takes no mask"),
            std::string::npos);
  Tensor<float, 3> x3(3, 1, E), y3(3, 1, E);
  x3.setZero();
  EXPECT_NE(message_of([&] { attn.decode_step(params, r, x3, y3, ws); }).find("a RingCache step of 2 sequences"),
            std::string::npos);
  EXPECT_EQ(r.cache_index(), 0);
  const Tensor<float, 0> total = r.ring_key().abs().sum();
  EXPECT_EQ(total(), 0.0f);
  EXPECT_NE(message_of([] { (void)RingCache<float>(1, -1, 1, 1, 1); }).find("window -1"), std::string::npos);
  EXPECT_NE(message_of([] { (void)RingCache<float>(1, 2, 0, 1, 1); }).find("max_chunk 0"), std::string::npos);
  EXPECT_NE(message_of([] { (void)RingCache<float>(0, 2, 1, 1, 1); }).find("batch 0"), std::string::npos);
  // the fallback (dropout) is refused on this layout
  auto cfg = config<float>(H, true);
  cfg.dropout_rate = 0.5;
  cfg.deterministic = false;
  const linen::SelfAttention<float> dropping(cfg);
  EXPECT_THROW(dropping.decode_step(params, r, x1, y1, ws), linen::invalid_argument);
}

// Flax interop: a Flax cache's last positions as a ring, continued as Flax continues; the
// ring back to Flax while nothing has left it.
TEST(RingCacheFlax, ImportContinuesTheFlaxDecodeAndExportsBack) {
  const auto f = linen_test::fixture("decode_resume");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::SelfAttention<float> attn(cfg);
  const auto x = f.get<float, 3>("inputs/q");
  const auto expected = f.get<float, 3>("decode/outputs");
  const Index steps = std::stoi(f.metadata.at("steps")), B = x.dimension(0), E = x.dimension(2), L = x.dimension(1);
  const auto params = linen::io::load_attention(f, cfg).params;
  linen::io::Variables v;
  v.merge("params", f.subtree("params"));
  v.merge("cache", f.subtree("resume_cache"));
  const linen::AttentionCache<float> flax = *linen::io::load_attention(v, cfg).cache;
  const Index start = std::stoi(f.metadata.at("resume_at"));
  // a window that covers the whole sequence: Flax's own (causal) decode
  RingCache<float> ring = linen::import_flax(flax, L, 1);
  EXPECT_EQ(ring.cache_index(), start);
  {
    const auto back = linen::export_flax(ring, L);
    EXPECT_TRUE(linen_test::same_bits(back.cached_key, flax.cached_key));
    EXPECT_TRUE(linen_test::same_bits(back.cached_value, flax.cached_value));
  }
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(B, 1, E);
  for (Index i = start; i < steps; ++i) {
    attn.decode_step(params, ring, linen_test::position(x, i), out, ws);
    EXPECT_LE(rel_err(out, linen_test::position(expected, i)), 2e-6) << "step " << i;
  }
  const auto want = *linen::io::load_attention(f, cfg).cache;
  const auto got = linen::export_flax(ring, want.max_length());
  EXPECT_EQ(got.cache_index, want.cache_index);
  EXPECT_LE(rel_err(got.cached_key, want.cached_key), 2e-6);
  EXPECT_LE(rel_err(got.cached_value, want.cached_value), 2e-6);
  // a short window: only the last positions are imported; export names why it cannot
  RingCache<float> short_ring = linen::import_flax(flax, 1, 2);
  EXPECT_EQ(short_ring.lowest(), std::max<Index>(0, start - 1));
  if (start > 1) {
    const std::string what = message_of([&] { (void)linen::export_flax(short_ring, L); });
    EXPECT_NE(what.find("holds positions [" + std::to_string(start - 1)), std::string::npos) << what;
  }
  EXPECT_NE(message_of([&] { (void)linen::export_flax(ring, 1); }).find("max_length 1 is below"), std::string::npos);
  linen::AttentionCache<float> dirty = flax;
  dirty.cache_index = 0;  // positions past the index are not zeros
  EXPECT_NE(message_of([&] { (void)linen::import_flax(dirty, 4, 1); }).find("past cache_index"), std::string::npos);
}

}  // namespace
