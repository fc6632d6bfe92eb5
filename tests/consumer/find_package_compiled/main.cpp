// SPDX-License-Identifier: Apache-2.0
//
// A typical user translation unit (the one README "Compile time" measures): a pre-LN
// attention block's pieces in float (SelfAttention init, apply, apply_into, decode_step
// and vjp; MultiHeadDotProductAttention with three inputs; Dense and LayerNorm with their
// vjps). Built twice by the consumer project: linked to linen::compiled (LINEN_COMPILED:
// the library's instantiations) and header-only. Each build checks what linen promises
// bit for bit within itself, then prints one digest line per result; same_bits.cmake
// compares the two builds' lines, which must be equal.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include <linen/linen.hpp>

#if defined(LINEN_CONSUMER_EXPECT_COMPILED) && !defined(LINEN_COMPILED)
#error "linking linen::compiled defines LINEN_COMPILED"
#endif
#if !defined(LINEN_CONSUMER_EXPECT_COMPILED) && defined(LINEN_COMPILED)
#error "the header-only build must not see LINEN_COMPILED"
#endif

namespace {

using linen::Index;
using linen::Tensor;

int failures = 0;

// FNV-1a over the tensor's bytes: equal digests, equal bits.
template <class X>
std::uint64_t digest(const X& t) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* p = reinterpret_cast<const unsigned char*>(t.data());
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.size()) * sizeof(*t.data()); ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

template <class X>
void print(const char* what, const X& t) {
  std::printf("%s %016llx\n", what, static_cast<unsigned long long>(digest(t)));
}

template <class X, class Y>
void expect_same_bits(const char* what, const X& a, const Y& b) {
  if (a.size() != b.size() || std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) != 0) {
    std::fprintf(stderr, "%s: not bit-identical\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  const Index B = 2, L = 6, F = 16;
  Tensor<float, 3> x(B, L, F);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = 0.013f * static_cast<float>(i % 89) - 0.5f;

  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 4;
  const linen::SelfAttention<float> self(cfg);
  const auto vars = self.init(linen::random::key(0), x);
  const Tensor<bool, 4> causal = linen::make_causal_mask(Tensor<int, 2>(B, L));
  linen::CallOptions<float> call;
  call.mask = causal;
  const Tensor<float, 3> y = self.apply(vars, x, call);
  print("self_attention/apply", y);

  linen::AttentionWorkspace<float> ws;
  Tensor<float, 3> into(B, L, F);
  self.apply_into(vars.params, x, into, ws, call);
  expect_same_bits("apply_into vs apply", into, y);

  auto [yv, pullback] = linen::vjp(self, vars, x, call);
  expect_same_bits("vjp output vs apply", yv, y);
  const auto grads = pullback(yv);
  print("self_attention/vjp/inputs_q", grads.inputs_q);
  print("self_attention/vjp/query/kernel", grads.params.query.kernel);
  print("self_attention/vjp/out/kernel", grads.params.out.kernel);

  // Decoding position by position equals the causal pass (to float rounding: the decode
  // step's projections are per row).
  auto dcfg = cfg;
  dcfg.decode = true;
  const linen::SelfAttention<float> dec(dcfg);
  auto cache = dec.init_cache(vars.params, {B}, L);
  linen::DecodeWorkspace<float> dws;
  Tensor<float, 3> step(B, 1, F), out(B, 1, F), decoded(B, L, F);
  double err = 0, scale = 0;
  for (Index t = 0; t < L; ++t) {
    for (Index b = 0; b < B; ++b)
      for (Index f = 0; f < F; ++f) step(b, 0, f) = x(b, t, f);
    dec.decode_step(vars.params, cache, step, out, dws);
    for (Index b = 0; b < B; ++b)
      for (Index f = 0; f < F; ++f) {
        decoded(b, t, f) = out(b, 0, f);
        err = std::max(err, std::abs(static_cast<double>(out(b, 0, f)) - y(b, t, f)));
        scale = std::max(scale, std::abs(static_cast<double>(y(b, t, f))));
      }
  }
  if (!(err <= 2e-6 * scale)) {
    std::fprintf(stderr, "decode_step vs the causal pass: max error %g (scale %g)\n", err, scale);
    ++failures;
  }
  print("self_attention/decode_step", decoded);

  const linen::MultiHeadDotProductAttention<float> mha(cfg);
  Tensor<float, 3> kv(B, L + 3, F);
  for (Index i = 0; i < kv.size(); ++i) kv.data()[i] = 0.021f * static_cast<float>(i % 53) - 0.4f;
  const auto mvars = mha.init(linen::random::key(1), x, kv, kv);
  print("multi_head/apply", mha.apply(mvars, x, kv, kv));

  linen::Dense<float>::Config dc;
  dc.features = 24;
  const linen::Dense<float> dense(dc);
  const auto dp = dense.init(linen::random::key(2), x);
  auto [yd, dpull] = linen::vjp(dense, dp, x);
  expect_same_bits("Dense vjp output vs apply", yd, dense.apply(dp, x));
  print("dense/vjp/kernel", dpull(yd).params.kernel);

  const linen::LayerNorm<float> norm;
  const auto np = norm.init(linen::random::key(3), x);
  auto [yn, npull] = linen::vjp(norm, np, x);
  expect_same_bits("LayerNorm vjp output vs apply", yn, norm.apply(np, x));
  print("layer_norm/vjp/input", npull(yn).input);

  if (failures != 0) {
    std::fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  return 0;
}
