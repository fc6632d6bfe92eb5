// SPDX-License-Identifier: Apache-2.0
//
// linen::dot_product_attention in float32, q_len = kv_len = L:
//   BM_dot_product_attention/B:1/L:512/H:8/D:64          (and L:2048, and B:8/L:128)
//   BM_dot_product_attention_causal/B:1/L:2048/H:8/D:64  with make_causal_mask
// The GFLOP/s counter uses the dense count 4*B*L^2*H*D (Q K^T and weights x V,
// 2 flops per multiply-add each; the softmax is not counted). The causal row
// uses the same dense count, so its rate over the dense row's is the speedup of
// the fused kernel skipping the key tiles the mask hides. Compare these rows with
// the reference rows of bench_reference.cpp from the same run.
#include <array>
#include <random>

#include <benchmark/benchmark.h>
#include <linen/linen.hpp>

namespace {

// A tensor of the given dims filled with standard-normal floats from `seed`.
linen::Tensor<float, 4> random_normal(const std::array<linen::Index, 4>& dims, unsigned seed) {
  linen::Tensor<float, 4> t(dims);
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (linen::Index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  return t;
}

// The dense flop count of one attention call: Q K^T and weights x V are each
// B*H matrix products of L x D x L, 2 flops per multiply-add.
double attention_flops(linen::Index b, linen::Index l, linen::Index h, linen::Index d) {
  return 4.0 * double(b) * double(l) * double(l) * double(h) * double(d);
}

// Runs dot_product_attention on [B, L, H, D] inputs, causally masked if asked.
void run_attention(benchmark::State& state, bool causal) {
  const linen::Index b = state.range(0), l = state.range(1), h = state.range(2),
                     d = state.range(3);
  // Inputs are made once, outside the timed loop (fresh pages are slow to
  // fault in; the output is the library's own allocation and is timed).
  const linen::Tensor<float, 4> query = random_normal({b, l, h, d}, 1);
  const linen::Tensor<float, 4> key = random_normal({b, l, h, d}, 2);
  const linen::Tensor<float, 4> value = random_normal({b, l, h, d}, 3);

  linen::AttentionOptions<float> options;  // Flax defaults: no dropout, no bias
  linen::Tensor<bool, 4> mask;              // [B, 1, L, L], outlives `options`
  if (causal) {
    // make_causal_mask reads only the shape of its [batch..., len] argument.
    linen::Tensor<float, 2> tokens(b, l);
    tokens.setZero();
    mask = linen::make_causal_mask(tokens);
    options.mask = mask;
  }

  for (auto _ : state) {
    linen::Tensor<float, 4> out = linen::dot_product_attention(query, key, value, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // kIsIterationInvariantRate: value * iterations / seconds, so GFLOP/s.
  state.counters["GFLOP/s"] = benchmark::Counter(attention_flops(b, l, h, d) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_dot_product_attention(benchmark::State& state) { run_attention(state, false); }
BENCHMARK(BM_dot_product_attention)
    ->ArgNames({"B", "L", "H", "D"})
    ->Args({1, 512, 8, 64})
    ->Args({1, 2048, 8, 64})
    ->Args({8, 128, 8, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_dot_product_attention_causal(benchmark::State& state) { run_attention(state, true); }
BENCHMARK(BM_dot_product_attention_causal)
    ->ArgNames({"B", "L", "H", "D"})
    ->Args({1, 2048, 8, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
