// SPDX-License-Identifier: Apache-2.0
//
// Every (T, ParamT) pair and element type linen::compiled serves, through each entry it
// instantiates (so that a missing instantiation fails to link): the modules' init,
// apply, apply_into, decode_step and vjp, Dense and LayerNorm with their vjps, and
// dot_product_attention, its weights and its vjp. Built with linen::compiled only (this
// TU compiled header-only would instantiate all of it). Checks that each vjp's output is
// its apply's, bit for bit, and prints a digest per result.
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include <linen/linen.hpp>

#ifndef LINEN_COMPILED
#error "pairs.cpp is built with linen::compiled"
#endif

namespace {

using linen::Index;
using linen::Tensor;

int failures = 0;

template <class X>
std::uint64_t digest(const X& t) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* p = reinterpret_cast<const unsigned char*>(t.data());
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.size()) * sizeof(*t.data()); ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

template <class X, class Y>
void expect_same_bits(const char* type, const char* what, const X& a, const Y& b) {
  if (a.size() != b.size() || std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) != 0) {
    std::fprintf(stderr, "%s: %s: not bit-identical\n", type, what);
    ++failures;
  }
}

template <class T, int N>
Tensor<T, N> filled(const std::array<Index, N>& dims, float seed) {
  Tensor<T, N> t(dims);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(0.01f * static_cast<float>((i * 7 + 3) % 61) - seed);
  return t;
}

template <class T, class P>
void modules(const char* type) {
  const Index B = 2, L = 5, F = 8;
  const auto x = filled<T, 3>({B, L, F}, 0.3f);
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = 2;
  const linen::SelfAttention<T, P> self(cfg);
  const auto vars = self.init(linen::random::key(0), x);
  const Tensor<T, 3> y = self.apply(vars, x);
  linen::AttentionWorkspace<T> ws;
  Tensor<T, 3> into(B, L, F);
  self.apply_into(vars.params, x, into, ws);
  expect_same_bits(type, "apply_into vs apply", into, y);
  auto [yv, pullback] = linen::vjp(self, vars, x);
  expect_same_bits(type, "vjp output vs apply", yv, y);
  const auto g = pullback(yv);

  auto dcfg = cfg;
  dcfg.decode = true;
  const linen::SelfAttention<T, P> dec(dcfg);
  auto cache = dec.init_cache(vars.params, {B}, 2);
  linen::DecodeWorkspace<T> dws;
  Tensor<T, 3> out(B, 1, F);
  const auto step = filled<T, 3>({B, 1, F}, 0.1f);
  dec.decode_step(vars.params, cache, step, out, dws);
  linen::TensorMap<T, 3> out_map(out.data(), B, 1, F);
  dec.decode_step(vars.params, cache, step, out_map, dws);

  const linen::MultiHeadDotProductAttention<T, P> mha(cfg);
  const auto kv = filled<T, 3>({B, L + 1, F}, 0.2f);
  const auto mvars = mha.init(linen::random::key(1), x, kv, kv);
  const Tensor<T, 3> ym = mha.apply(mvars, x, kv, kv);

  typename linen::Dense<T, P>::Config dc;
  dc.features = 4;
  const linen::Dense<T, P> dense(dc);
  const auto dp = dense.init(linen::random::key(2), x);
  auto [yd, dpull] = linen::vjp(dense, dp, x);
  expect_same_bits(type, "Dense vjp output vs apply", yd, dense.apply(dp, x));
  const linen::LayerNorm<T, P> norm;
  const auto np = norm.init(linen::random::key(3), x);
  auto [yn, npull] = linen::vjp(norm, np, x);
  expect_same_bits(type, "LayerNorm vjp output vs apply", yn, norm.apply(np, x));

  std::printf("%s modules %016llx %016llx %016llx %016llx %016llx %016llx\n", type,
              static_cast<unsigned long long>(digest(y)), static_cast<unsigned long long>(digest(g.inputs_q)),
              static_cast<unsigned long long>(digest(out)), static_cast<unsigned long long>(digest(ym)),
              static_cast<unsigned long long>(digest(dpull(yd).input)),
              static_cast<unsigned long long>(digest(npull(yn).input)));
}

template <class T>
void functional(const char* type) {
  const auto q = filled<T, 4>({1, 3, 2, 4}, 0.2f), k = filled<T, 4>({1, 5, 2, 4}, 0.4f),
             v = filled<T, 4>({1, 5, 2, 4}, 0.1f);
  const Tensor<T, 4> o = linen::dot_product_attention(q, k, v);
  const Tensor<T, 4> w = linen::dot_product_attention_weights(q, k);
  const auto g = linen::dot_product_attention_vjp(q, k, v, o);
  expect_same_bits(type, "dot_product_attention_vjp output vs dot_product_attention", g.output, o);
  std::printf("%s functional %016llx %016llx %016llx\n", type, static_cast<unsigned long long>(digest(o)),
              static_cast<unsigned long long>(digest(w)), static_cast<unsigned long long>(digest(g.query)));
}

}  // namespace

int main() {
  modules<float, float>("float");
  modules<double, double>("double");
  modules<Eigen::bfloat16, Eigen::bfloat16>("bfloat16");
  modules<Eigen::half, Eigen::half>("half");
  modules<Eigen::bfloat16, float>("bfloat16/float");
  modules<Eigen::half, float>("half/float");
  functional<float>("float");
  functional<double>("double");
  functional<Eigen::bfloat16>("bfloat16");
  functional<Eigen::half>("half");
  if (failures != 0) {
    std::fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  return 0;
}
