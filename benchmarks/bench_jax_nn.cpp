// SPDX-License-Identifier: Apache-2.0
//
// linen::jax_nn::dot_product_attention (jax.nn's numerics on the fused kernels) in float32,
// one thread, query [B, L, N, H], key and value [B, L, K, H]:
//   BM_jax_nn_gqa/L:2048/N:8/K:2|8/H:64     grouped-query (K = 2: each kv head serves 4
//       query heads, read in place) against multi-head (K = N = 8), the same query
//   BM_jax_nn_window/L:4096/N:8/H:64/window:256|0   local_window_size = 256 (key tiles
//       outside the band skipped) against the dense call (window:0); the band is
//       (2 * 256 + 1) / 4096 of the keys, ~8x less work
//   BM_jax_nn_lengths/B:4/L:2048/N:8/H:64/padded:1   half the batch with query and
//       key/value lengths of L/2; padded:0, the unpadded call of the same shapes
//   BM_jax_nn_lengths_work/B:4/L:2048/N:8/H:64   the work padded:1 has to do, as two
//       unpadded calls (B/2 at L, B/2 at L/2): padded:1 should take about as long
// GFLOP/s counts the dense 4*B*L^2*N*H of the shapes.
#include <array>
#include <cstdint>
#include <random>

#include <benchmark/benchmark.h>

#include <linen/jax_nn.hpp>

namespace {

using linen::Index;
namespace jn = linen::jax_nn;

linen::Tensor<float, 4> normal(const std::array<Index, 4>& dims, unsigned seed) {
  linen::Tensor<float, 4> t(dims);
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = dist(gen);
  return t;
}

double dense_flops(Index b, Index l, Index n, Index h) { return 4.0 * double(b) * double(l) * double(l) * double(n) * double(h); }

void run(benchmark::State& state, const linen::Tensor<float, 4>& q, const linen::Tensor<float, 4>& k,
         const linen::Tensor<float, 4>& v, const jn::Options<float>& o, double flops) {
  for (auto _ : state) {
    linen::Tensor<float, 4> out = jn::dot_product_attention(q, k, v, o);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_jax_nn_gqa(benchmark::State& state) {
  const Index l = state.range(0), n = state.range(1), kh = state.range(2), h = state.range(3);
  const auto q = normal({1, l, n, h}, 1), k = normal({1, l, kh, h}, 2), v = normal({1, l, kh, h}, 3);
  run(state, q, k, v, {}, dense_flops(1, l, n, h));
}
BENCHMARK(BM_jax_nn_gqa)
    ->ArgNames({"L", "N", "K", "H"})
    ->Args({2048, 8, 2, 64})
    ->Args({2048, 8, 8, 64})
    ->Unit(benchmark::kMillisecond);

void BM_jax_nn_window(benchmark::State& state) {
  const Index l = state.range(0), n = state.range(1), h = state.range(2), w = state.range(3);
  const auto q = normal({1, l, n, h}, 1), k = normal({1, l, n, h}, 2), v = normal({1, l, n, h}, 3);
  jn::Options<float> o;
  if (w > 0) o.local_window_size = w;
  run(state, q, k, v, o, dense_flops(1, l, n, h));
}
BENCHMARK(BM_jax_nn_window)
    ->ArgNames({"L", "N", "H", "window"})
    ->Args({4096, 8, 64, 256})
    ->Args({4096, 8, 64, 0})
    ->Unit(benchmark::kMillisecond);

void BM_jax_nn_lengths(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), n = state.range(2), h = state.range(3);
  const bool padded = state.range(4) != 0;
  const auto q = normal({b, l, n, h}, 1), k = normal({b, l, n, h}, 2), v = normal({b, l, n, h}, 3);
  linen::Tensor<std::int32_t, 1> len(b);
  for (Index i = 0; i < b; ++i) len(i) = static_cast<std::int32_t>(i < b / 2 ? l : l / 2);
  jn::Options<float> o;
  if (padded) {
    o.query_seq_lengths = len;
    o.key_value_seq_lengths = len;
  }
  run(state, q, k, v, o, dense_flops(b, l, n, h));
}
BENCHMARK(BM_jax_nn_lengths)
    ->ArgNames({"B", "L", "N", "H", "padded"})
    ->Args({4, 2048, 8, 64, 1})
    ->Args({4, 2048, 8, 64, 0})
    ->Unit(benchmark::kMillisecond);

void BM_jax_nn_lengths_work(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), n = state.range(2), h = state.range(3);
  const auto q = normal({b / 2, l, n, h}, 1), k = normal({b / 2, l, n, h}, 2), v = normal({b / 2, l, n, h}, 3);
  const auto qs = normal({b / 2, l / 2, n, h}, 4), ks = normal({b / 2, l / 2, n, h}, 5),
             vs = normal({b / 2, l / 2, n, h}, 6);
  for (auto _ : state) {
    linen::Tensor<float, 4> full = jn::dot_product_attention(q, k, v);
    linen::Tensor<float, 4> half = jn::dot_product_attention(qs, ks, vs);
    benchmark::DoNotOptimize(full.data());
    benchmark::DoNotOptimize(half.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(dense_flops(b, l, n, h) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_jax_nn_lengths_work)
    ->ArgNames({"B", "L", "N", "H"})
    ->Args({4, 2048, 8, 64})
    ->Unit(benchmark::kMillisecond);

}  // namespace
