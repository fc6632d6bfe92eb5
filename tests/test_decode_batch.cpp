// SPDX-License-Identifier: Apache-2.0
// Per-sequence positions (issue 16): BatchCache, the ragged steps on it (decode_step over
// the active slots, decode_chunk over given slots with per-sequence counts), join /
// leave / rollback, the errors (every sequence unchanged) and the Flax interop
// (import_flax / export_flax against the decode fixtures). The reference of a ragged
// step is each of its sequences stepped alone on a Flax cache of batch 1: bit for bit
// under the row kernel (chunks of up to 8 rows), to rounding beyond.
#define EIGEN_RUNTIME_NO_MALLOC
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_fixture.hpp"
#include "counting_new.hpp"  // counts every operator new in linen_test::g_news

namespace {

using linen::BatchCache;
using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen_test::rel_err;

using linen_test::random_tensor;
using linen_test::message_of;
using linen_test::same_bytes;

template <class T, class P = T>
linen::AttentionConfig<T, P> decode_config(Index heads, bool normalize_qk = false) {
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = heads;
  cfg.decode = true;
  cfg.normalize_qk = normalize_qk;
  return cfg;
}

// Slot s of `c` equals the Flax cache `ref` (batch 1) byte for byte, index included.
template <class T>
bool slot_equals(const BatchCache<T>& c, Index s, const linen::AttentionCache<T>& ref) {
  const Index per = c.max_length() * c.num_heads() * c.head_dim();
  return c.cache_index(s) == ref.cache_index && same_bytes(c.cached_key().data() + s * per, ref.cached_key.data(), per) &&
         same_bytes(c.cached_value().data() + s * per, ref.cached_value.data(), per);
}

template <class T>
bool caches_equal(const BatchCache<T>& a, const BatchCache<T>& b) {
  if (a.active_slots() != b.active_slots() || a.slots() != b.slots()) return false;
  for (Index s = 0; s < a.slots(); ++s)
    if (a.cache_index(s) != b.cache_index(s)) return false;
  return same_bytes(a.cached_key().data(), b.cached_key().data(), a.cached_key().size()) &&
         same_bytes(a.cached_value().data(), b.cached_value().data(), a.cached_value().size());
}

// ---------------------------------------------------------------------------------------
// Ragged steps against each sequence alone. Five slots; sequences join at different
// steps, leave, a freed slot is taken again; each step goes over a shuffled subset of the
// active slots with counts in [0, n] (n <= 8: the row kernel, bit for bit; n > 8: the
// tiled kernel, to rounding), and every few steps a decode_step over all active slots.
template <class T, class Module>
void expect_ragged_equals_alone(Index n_max, double tol, bool masked) {
  std::mt19937 g(11);
  const Index S = 5, L = 128, E = 16, H = 4;
  const Module attn(decode_config<T>(H, /*normalize_qk=*/true));
  const auto x0 = random_tensor<T, 3>({1, 1, E}, g);
  const auto vars = attn.init(linen::random::key(5), x0);
  BatchCache<T> cache = attn.init_batch_cache(vars.params, S, L);
  std::vector<linen::AttentionCache<T>> alone(static_cast<std::size_t>(S));
  linen::DecodeWorkspace<T> wb, wa;
  std::uniform_int_distribution<int> coin(0, 9);
  for (int step = 0; step < 24; ++step) {
    // arrivals and departures
    if (cache.free_slots() > 0 && (step < 3 || coin(g) < 3)) {
      const Index s = cache.join();
      alone[static_cast<std::size_t>(s)] = attn.init_cache(vars.params, {1}, L);
    }
    if (cache.active_slots().size() > 2 && coin(g) < 2) {
      const Index s = cache.active_slots()[static_cast<std::size_t>(coin(g)) % cache.active_slots().size()];
      cache.leave(s);
      const Index per = L * H * (E / H);
      for (const Tensor<T, 4>* t : {&cache.cached_key(), &cache.cached_value()})
        for (Index e = 0; e < per; ++e) ASSERT_TRUE(t->data()[s * per + e] == T(0)) << "slot " << s << " not zeroed";
      ASSERT_EQ(cache.cache_index(s), 0);
    }
    const bool single = step % 5 == 4;
    std::vector<std::int32_t> slots(cache.active_slots()), counts;
    if (!single) {
      std::shuffle(slots.begin(), slots.end(), g);
      if (slots.size() > 1 && coin(g) < 3) slots.pop_back();  // a sequence that waits
    }
    const Index n = single ? 1 : 1 + static_cast<Index>(g() % static_cast<unsigned>(n_max));
    const Index B = static_cast<Index>(slots.size());
    for (Index i = 0; i < B; ++i) {
      const Index room = L - cache.cache_index(slots[static_cast<std::size_t>(i)]);
      Index c = single ? 1 : static_cast<Index>(g() % static_cast<unsigned>(n + 1));
      if (i == 0 && !single) c = n;  // a full row set
      counts.push_back(static_cast<std::int32_t>(std::min(c, room)));
    }
    if (single)
      for (Index i = 0; i < B; ++i)
        if (cache.cache_index(slots[static_cast<std::size_t>(i)]) >= L) return;  // full: the run is over
    auto x = random_tensor<T, 3>({B, n, E}, g);
    Tensor<bool, 4> mask(B, 1, n, L);  // per sequence and row: a few positions masked
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = coin(g) != 0;
    linen::CallOptions<T> call;
    if (masked) call.mask = mask;
    Tensor<T, 3> out(B, n, E);
    if (single)
      attn.decode_step(vars.params, cache, x, out, wb, call);
    else
      attn.decode_chunk(vars.params, cache, slots, counts, x, out, wb, call);
    for (Index i = 0; i < B; ++i) {
      const Index s = slots[static_cast<std::size_t>(i)], c = counts[static_cast<std::size_t>(i)];
      auto& ref = alone[static_cast<std::size_t>(s)];
      if (c > 0) {
        Eigen::array<Index, 3> off{i, 0, 0}, ext{1, c, E};
        const Tensor<T, 3> xi = x.slice(off, ext);
        Tensor<T, 3> oi(1, c, E);
        linen::CallOptions<T> ci;
        Tensor<bool, 4> mi(1, 1, c, L);
        for (Index r = 0; r < c; ++r)
          for (Index j = 0; j < L; ++j) mi(0, 0, r, j) = mask(i, 0, r, j);
        if (masked) ci.mask = mi;
        if (single)
          attn.decode_step(vars.params, ref, xi, oi, wa, ci);
        else
          attn.decode_chunk(vars.params, ref, xi, oi, wa, ci);
        const Tensor<T, 3> got = out.slice(off, ext);
        if (tol == 0)
          EXPECT_TRUE(same_bytes(got.data(), oi.data(), got.size()))
              << "step " << step << " sequence " << i << " (slot " << s << ", count " << c << " of " << n << ")";
        else
          EXPECT_LE(rel_err(got, oi), tol) << "step " << step << " slot " << s;
      }
      for (Index r = c; r < n; ++r)
        for (Index e = 0; e < E; ++e) EXPECT_TRUE(out(i, r, e) == T(0)) << "padding row " << r << " of slot " << s;
      EXPECT_TRUE(slot_equals(cache, s, ref)) << "step " << step << " slot " << s;
    }
  }
}

TEST(BatchDecode, RaggedRowKernelEqualsEachAloneBitForBitFloat) {
  expect_ragged_equals_alone<float, linen::SelfAttention<float>>(8, 0.0, false);
}
TEST(BatchDecode, RaggedMaskedEqualsEachAloneBitForBitDouble) {
  expect_ragged_equals_alone<double, linen::MultiHeadDotProductAttention<double>>(8, 0.0, true);
}
TEST(BatchDecode, RaggedEqualsEachAloneBfloat16) {
  expect_ragged_equals_alone<Eigen::bfloat16, linen::SelfAttention<Eigen::bfloat16>>(4, 0.0, false);
}
TEST(BatchDecode, RaggedTiledChunksEqualEachAloneToRounding) {
  expect_ragged_equals_alone<float, linen::SelfAttention<float>>(16, 2e-6, true);
}

// ---------------------------------------------------------------------------------------
// A ragged prefill then steps equals the full causal forward of each sequence (float64
// restatement through the module's own non-decode path).
TEST(BatchDecode, PrefillAndStepsEqualTheCausalForwardPerSequence) {
  std::mt19937 g(3);
  const Index L = 12, E = 8, H = 2;
  const linen::SelfAttention<double> attn(decode_config<double>(H));
  auto full_cfg = decode_config<double>(H);
  full_cfg.decode = false;
  const linen::SelfAttention<double> full(full_cfg);
  const std::vector<Index> len{7, 3, 10};
  std::vector<Tensor<double, 3>> xs;
  for (Index l : len) xs.push_back(random_tensor<double, 3>({1, l, E}, g));
  const auto vars = attn.init(linen::random::key(1), xs[0]);
  BatchCache<double> cache = attn.init_batch_cache(vars.params, 3, L);
  for (int i = 0; i < 3; ++i) cache.join();
  linen::DecodeWorkspace<double> ws;
  std::vector<std::vector<double>> got(3);
  // prefill 4 (or fewer) positions each, then the rest in chunks of 2
  std::vector<Index> at(3, 0);
  while (true) {
    std::vector<std::int32_t> slots{0, 1, 2}, counts;
    const Index n = at[0] == 0 ? 4 : 2;
    bool any = false;
    for (int i = 0; i < 3; ++i) {
      counts.push_back(static_cast<std::int32_t>(std::min(n, len[static_cast<std::size_t>(i)] - at[static_cast<std::size_t>(i)])));
      any = any || counts.back() > 0;
    }
    if (!any) break;
    Tensor<double, 3> x(3, n, E), out(3, n, E);
    x.setConstant(std::nan(""));  // padding rows: never read into the cache or the output
    for (int i = 0; i < 3; ++i)
      for (Index r = 0; r < counts[static_cast<std::size_t>(i)]; ++r)
        for (Index e = 0; e < E; ++e) x(i, r, e) = xs[static_cast<std::size_t>(i)](0, at[static_cast<std::size_t>(i)] + r, e);
    attn.decode_chunk(vars.params, cache, slots, counts, x, out, ws);
    for (int i = 0; i < 3; ++i) {
      for (Index r = 0; r < n; ++r)
        for (Index e = 0; e < E; ++e)
          if (r < counts[static_cast<std::size_t>(i)])
            got[static_cast<std::size_t>(i)].push_back(out(i, r, e));
          else
            EXPECT_EQ(out(i, r, e), 0.0);
      at[static_cast<std::size_t>(i)] += counts[static_cast<std::size_t>(i)];
    }
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(cache.cache_index(i), len[static_cast<std::size_t>(i)]);
    Tensor<double, 2> ones(1, len[static_cast<std::size_t>(i)]);
    ones.setConstant(1.0);
    linen::CallOptions<double> call;
    const auto m = linen::make_causal_mask(ones);
    call.mask = m;
    const Tensor<double, 3> want = full.apply(linen::SelfAttention<double>::Variables{vars.params, std::nullopt},
                                              xs[static_cast<std::size_t>(i)], call);
    double err = 0;
    for (Index k = 0; k < want.size(); ++k) err = std::max(err, std::abs(want.data()[k] - got[static_cast<std::size_t>(i)][static_cast<std::size_t>(k)]));
    EXPECT_LE(err, 1e-12) << "sequence " << i;
  }
}

// ---------------------------------------------------------------------------------------
// join / leave / rollback

TEST(BatchDecode, JoinLeaveRollbackTouchOneSlot) {
  std::mt19937 g(2);
  const Index L = 10, E = 8, H = 2;
  const linen::SelfAttention<float> attn(decode_config<float>(H));
  const auto x = random_tensor<float, 3>({3, 4, E}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  BatchCache<float> cache = attn.init_batch_cache(vars.params, 3, L);
  EXPECT_EQ(cache.join(), 0);
  EXPECT_EQ(cache.join(), 1);
  EXPECT_EQ(cache.join(), 2);
  EXPECT_THROW(cache.join(), linen::cache_overflow);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(3, 4, E);
  const BatchCache<float> before = cache;
  attn.decode_chunk(vars.params, cache, {0, 1, 2}, {4, 2, 3}, x, out, ws);
  // a rollback of slot 1 to its state before the step: that slot as it was, the others
  // as the step left them
  const BatchCache<float> stepped = cache;
  linen::rollback(cache, 1, 0);
  const Index per = L * H * (E / H);
  EXPECT_TRUE(same_bytes(cache.cached_key().data() + per, before.cached_key().data() + per, per));
  EXPECT_TRUE(same_bytes(cache.cached_key().data(), stepped.cached_key().data(), per));
  EXPECT_TRUE(same_bytes(cache.cached_value().data() + 2 * per, stepped.cached_value().data() + 2 * per, per));
  EXPECT_EQ(cache.cache_index(1), 0);
  EXPECT_EQ(cache.cache_index(0), 4);
  // rollback of slot 0 to 2 equals a cache that took only 2 positions of it
  linen::rollback(cache, 0, 2);
  BatchCache<float> two = before;
  Tensor<float, 3> x02(2, 4, E), o02(2, 4, E);
  for (Index r = 0; r < 4; ++r)
    for (Index e = 0; e < E; ++e) {
      x02(0, r, e) = x(0, r, e);
      x02(1, r, e) = x(2, r, e);
    }
  attn.decode_chunk(vars.params, two, {0, 2}, {2, 3}, x02, o02, ws);
  EXPECT_TRUE(caches_equal(cache, two));
  // bad rollbacks: nothing changed
  const BatchCache<float> kept = cache;
  for (auto [slot, idx] : {std::pair<Index, Index>{0, 3}, {0, -1}, {5, 0}, {-1, 0}}) {
    try {
      linen::rollback(cache, slot, idx);
      ADD_FAILURE() << "rollback(" << slot << ", " << idx << ") did not throw";
    } catch (const linen::invalid_argument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(std::to_string(slot == 0 ? idx : slot)), std::string::npos) << what;
    }
    EXPECT_TRUE(caches_equal(cache, kept));
  }
  // leave: the slot zeroed and freed, the others untouched; join takes it again at 0
  cache.leave(0);
  EXPECT_FALSE(cache.active(0));
  EXPECT_EQ(cache.active_slots(), (std::vector<std::int32_t>{1, 2}));
  EXPECT_TRUE(same_bytes(cache.cached_key().data() + 2 * per, kept.cached_key().data() + 2 * per, per));
  EXPECT_THROW(cache.leave(0), linen::invalid_argument);
  EXPECT_THROW(linen::rollback(cache, 0, 0), linen::invalid_argument);
  EXPECT_EQ(cache.join(), 0);
  EXPECT_EQ(cache.cache_index(0), 0);
  BatchCache<float> fresh = attn.init_batch_cache(vars.params, 3, L);
  EXPECT_TRUE(same_bytes(cache.cached_key().data(), fresh.cached_key().data(), per));
}

// ---------------------------------------------------------------------------------------
// errors: every sequence unchanged, the value at fault named

TEST(BatchDecode, BadStepsThrowNamingTheValueAndChangeNothing) {
  std::mt19937 g(4);
  const Index L = 6, E = 8, H = 2;
  const linen::MultiHeadDotProductAttention<float> attn(decode_config<float>(H));
  const auto x = random_tensor<float, 3>({2, 3, E}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  BatchCache<float> cache = attn.init_batch_cache(vars.params, 4, L);
  cache.join();
  cache.join();
  cache.join();
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(2, 3, E);
  attn.decode_chunk(vars.params, cache, {0, 1}, {3, 1}, x, out, ws);  // slot 0 at 3, slot 1 at 1
  const BatchCache<float> kept = cache;
  struct Case {
    std::vector<std::int32_t> slots, counts;
    const char* want;
  };
  const std::vector<Case> bad{
      {{0, 4}, {1, 1}, "slots[1] = 4 outside [0, 4)"},
      {{-2, 1}, {1, 1}, "slots[0] = -2"},
      {{0, 3}, {1, 1}, "slots[1] = 3 holds no sequence"},
      {{1, 1}, {1, 1}, "slot 1 appears twice"},
      {{0, 1}, {1, 4}, "counts[1] = 4 outside [0, 3]"},
      {{0, 1}, {-1, 0}, "counts[0] = -1"},
      {{0, 1}, {1}, "1 counts for 2 slots"},
      {{0}, {1}, "its first dim must be 1"},
  };
  for (const Case& c : bad) {
    const std::string what = message_of([&] { attn.decode_chunk(vars.params, cache, c.slots, c.counts, x, out, ws); });
    EXPECT_NE(what.find(c.want), std::string::npos) << what;
    EXPECT_TRUE(caches_equal(cache, kept)) << c.want;
  }
  // overflow: slot 0 at 3 of 6 takes 3 more, slot 1 (at 1) cannot take... all fit; make
  // slot 1 full first, then a step whose first sequence fits and second does not
  attn.decode_chunk(vars.params, cache, {1}, {3}, Tensor<float, 3>(x.slice(Eigen::array<Index, 3>{0, 0, 0},
                                                                          Eigen::array<Index, 3>{1, 3, E})),
                    Tensor<float, 3>(1, 3, E).setZero(), ws);
  attn.decode_chunk(vars.params, cache, {1}, {2}, Tensor<float, 3>(x.slice(Eigen::array<Index, 3>{0, 0, 0},
                                                                          Eigen::array<Index, 3>{1, 3, E})),
                    Tensor<float, 3>(1, 3, E).setZero(), ws);
  ASSERT_EQ(cache.cache_index(1), L);
  const BatchCache<float> full = cache;
  try {
    attn.decode_chunk(vars.params, cache, {0, 1}, {2, 1}, x, out, ws);
    ADD_FAILURE() << "no overflow";
  } catch (const linen::cache_overflow& e) {
    EXPECT_NE(std::string(e.what()).find("slot 1 at cache_index 6 cannot take 1"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(caches_equal(cache, full));
  // decode_step's inputs must hold the active sequences (3 here)
  Tensor<float, 3> one(2, 1, E), o1(2, 1, E);
  one.setZero();
  EXPECT_NE(message_of([&] { attn.decode_step(vars.params, cache, one, o1, ws); }).find("3 active sequences"),
            std::string::npos);
  // a count of 0 for the full slot is fine: it does not advance
  attn.decode_chunk(vars.params, cache, {0, 1}, {2, 0}, x, out, ws);
  EXPECT_EQ(cache.cache_index(0), 5);
  EXPECT_EQ(cache.cache_index(1), L);
  // a layout without a fallback: dropout refused
  auto dcfg = decode_config<float>(H);
  dcfg.dropout_rate = 0.5;
  const linen::MultiHeadDotProductAttention<float> dropping(dcfg);
  linen::CallOptions<float> call;
  call.deterministic = false;
  call.dropout_rng = linen::random::key(0);
  EXPECT_THROW(dropping.decode_chunk(vars.params, cache, {0}, {1}, Tensor<float, 3>(1, 1, E).setZero(),
                                     Tensor<float, 3>(1, 1, E).setZero(), ws, call),
               linen::invalid_argument);
  EXPECT_EQ(cache.cache_index(0), 5);
  EXPECT_THROW(BatchCache<float>(2, 0, 2, 4), linen::invalid_argument);
  EXPECT_THROW((void)cache.active(9), linen::invalid_argument);
}

// ---------------------------------------------------------------------------------------
// no heap allocation after warm-up: joins, leaves, rollbacks and ragged steps of varying
// counts and slots (one chunk length), with a mask

TEST(BatchDecode, NoAllocationAfterWarmUp) {
  std::mt19937 g(9);
  const Index S = 4, L = 64, E = 32, H = 4, n = 4;
  const linen::SelfAttention<float> attn(decode_config<float>(H, true));
  auto x = random_tensor<float, 3>({S, n, E}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  BatchCache<float> cache = attn.init_batch_cache(vars.params, S, L);
  for (Index i = 0; i < S; ++i) cache.join();
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(S, n, E);
  Tensor<bool, 4> mask(S, 1, 1, L);
  mask.setConstant(true);
  linen::CallOptions<float> call;
  call.mask = mask;
  std::vector<std::int32_t> slots{0, 1, 2, 3}, counts{4, 4, 4, 4};
  attn.decode_chunk(vars.params, cache, slots, counts, x, out, ws, call);  // warm-up
  long news = 0;
  {
    linen_test::NoAllocation guard;
    for (int step = 0; step < 10; ++step) {
      std::swap(slots[static_cast<std::size_t>(step % 4)], slots[static_cast<std::size_t>((step + 1) % 4)]);
      for (auto& c : counts) c = static_cast<std::int32_t>((c + step) % (n + 1));
      if (step == 5) {
        cache.leave(2);
        (void)cache.join();
        linen::rollback(cache, 1, 1);
      }
      attn.decode_chunk(vars.params, cache, slots, counts, x, out, ws, call);
    }
    news = guard.count();
  }
  EXPECT_EQ(news, 0);
}

// ---------------------------------------------------------------------------------------
// Flax interop: import a Flax cache, continue there, export back to Flax's cache

void decode_fixture_through_batch_cache(const std::string& name) {
  const auto f = linen_test::fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::SelfAttention<float> attn(cfg);
  const auto x = f.get<float, 3>("inputs/q");  // [B, steps, E]
  const auto expected = f.get<float, 3>("decode/outputs");
  const Index steps = std::stoi(f.metadata.at("steps")), B = x.dimension(0), E = x.dimension(2);
  const auto params = linen::io::load_attention(f, cfg).params;
  Index start = 0;
  linen::AttentionCache<float> flax = attn.init_cache(params, {B}, x.dimension(1));
  if (f.metadata.count("resume_at")) {
    linen::io::Variables v;
    v.merge("params", f.subtree("params"));
    v.merge("cache", f.subtree("resume_cache"));
    flax = *linen::io::load_attention(v, cfg).cache;
    start = std::stoi(f.metadata.at("resume_at"));
  }
  // two spare slots past the imported batch
  BatchCache<float> cache = linen::import_flax(flax, B + 2);
  ASSERT_EQ(cache.active_slots().size(), static_cast<std::size_t>(B));
  EXPECT_EQ(cache.cache_index(0), start);
  {  // the import exports back byte for byte
    const auto back = linen::export_flax(cache, flax.batch);
    EXPECT_EQ(back.cache_index, flax.cache_index);
    EXPECT_TRUE(linen_test::same_bits(back.cached_key, flax.cached_key));
    EXPECT_TRUE(linen_test::same_bits(back.cached_value, flax.cached_value));
  }
  Tensor<bool, 4> kpm;
  linen::CallOptions<float> call;
  if (f.contains("decode/key_padding_mask")) {
    kpm = f.get<bool, 4>("decode/key_padding_mask");
    call.mask = kpm;
  }
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(B, 1, E);
  for (Index i = start; i < steps; ++i) {
    attn.decode_step(params, cache, linen_test::position(x, i), out, ws, call);
    EXPECT_LE(rel_err(out, linen_test::position(expected, i)), 2e-6) << name << " step " << i;
  }
  const auto want = *linen::io::load_attention(f, cfg).cache;
  const auto got = linen::export_flax(cache, want.batch);
  EXPECT_EQ(got.cache_index, want.cache_index);
  EXPECT_EQ(got.batch, want.batch);
  EXPECT_LE(rel_err(got.cached_key, want.cached_key), 2e-6) << name;
  EXPECT_LE(rel_err(got.cached_value, want.cached_value), 2e-6) << name;
}

TEST(BatchDecodeFlax, DecodeBasicRoundTrip) { decode_fixture_through_batch_cache("decode_basic"); }
TEST(BatchDecodeFlax, DecodeResumeRoundTrip) { decode_fixture_through_batch_cache("decode_resume"); }
TEST(BatchDecodeFlax, DecodePaddingMaskRoundTrip) { decode_fixture_through_batch_cache("decode_padding_mask"); }

TEST(BatchDecodeFlax, ExportThrowsWhereFlaxCannotStateTheCache) {
  const auto f = linen_test::fixture("decode_basic");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  auto flax = *linen::io::load_attention(f, cfg).cache;  // after all steps: full
  linen::rollback(flax, flax.cache_index - 2);            // room past the index
  ASSERT_GE(flax.batch[0], 2);
  ASSERT_GE(flax.cache_index, 1);
  BatchCache<float> cache = linen::import_flax(flax, 4);
  {
    BatchCache<float> c = cache;
    linen::rollback(c, 1, flax.cache_index - 1);
    EXPECT_NE(message_of([&] { (void)linen::export_flax(c); }).find("one cache_index for the batch"),
              std::string::npos);
  }
  {
    BatchCache<float> c = cache;
    c.leave(0);
    EXPECT_EQ(linen::export_flax(c).batch, Shape{flax.batch[0] - 1});  // contiguous 1..: fine
    (void)c.join();  // slot 0 again
    (void)c.join();  // slot 2
    c.leave(1);      // slots 0 and 2
    const std::string what = message_of([&] { (void)linen::export_flax(c); });
    EXPECT_NE(what.find("not contiguous"), std::string::npos) << what;
  }
  EXPECT_NE(message_of([&] { (void)linen::export_flax(BatchCache<float>(2, 4, 1, 1)); }).find("no active sequence"),
            std::string::npos);
  EXPECT_NE(message_of([&] { (void)linen::export_flax(cache, {3, 5}); }).find("batch (3, 5)"), std::string::npos);
  // import: positions past the index must be zeros
  auto dirty = flax;
  dirty.cached_value(1, flax.cache_index, 0, 0) = 1.0f;
  const std::string what = message_of([&] { (void)linen::import_flax(dirty); });
  EXPECT_NE(what.find("cached_value of sequence 1 holds a nonzero value at position " + std::to_string(flax.cache_index)),
            std::string::npos)
      << what;
}

}  // namespace
