// SPDX-License-Identifier: Apache-2.0
//
// The projections' matrix product, C[M, N] = A[M, K] B[K, N] + bias[N] in float, at the
// shapes of the SelfAttention layer's projections (M = batch x length rows, K = E, N = E,
// or 3E when q, k, v are one product):
//   BM_gemm_linen/M/N/K/threads   linen's packed GEMM (detail/gemm/gemm.hpp), on an
//                                 Eigen::ThreadPool of `threads` (1: no pool)
//   BM_gemm_eigen/M/N/K/threads   Eigen's product (+ bias), rows split over the pool in
//                                 blocks as the projections did before linen's GEMM
//   BM_dense_bf16/M/N/K/threads   the same product as DenseGeneral<bfloat16, float32 params>
//                                 computes it (Flax's dtype=bfloat16): x and the kernel
//                                 rounded to bfloat16, multiplied in pairs (vdpbf16ps,
//                                 detail/gemm/pairs.hpp) where the target has avx512_bf16,
//                                 else widened to float; then rounded with the bias.
//                                 Compare its time with BM_gemm_linen's row
//   BM_gemm_cblas/M/N/K/threads   cblas_sgemm (+ bias), only in a LINEN_USE_BLAS build;
//                                 rows split over the pool the same way (run it with the
//                                 BLAS library's own threads off: OPENBLAS_NUM_THREADS=1;
//                                 Debian's OpenBLAS 0.3.21 takes its AVX2 Haswell kernels
//                                 on Zen 5 unless OPENBLAS_CORETYPE=SKYLAKEX)
// And the decode step's projections, a few rows times one kernel (the kernels cycled
// through >= 128 MiB, so each is read from DRAM, as a decode step finds it):
//   BM_gemv_linen/M/N/K/threads   gemm::multiply_rows (detail/gemm/gemv.hpp: what
//                                 DenseGeneral's by_row and decode_step run; the active
//                                 level's with linen::dispatch), columns split over the pool
//   BM_gemv_eigen/M/N/K/threads   Eigen's row-vector product per row on the calling thread,
//                                 compiled at this file's flags (what by_row ran before)
// GB/s counts the kernel's K N 4 bytes; compare with the same run's BM_memory_read_streams
// of the same thread count (bench_fused_attention.cpp).
// GFLOP/s counts 2 M N K; q, k, v as one product is the N = 3E row against three times
// the N = E row. The FMA peak of one thread is 2 x lanes x FMA pipes x clock
// (AVX-512 on Zen 5: 2 x 16 x 2 x 3.5 GHz = 225 GFLOP/s).
#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>
#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/dense.hpp>
#include <linen/detail/gemm/gemm.hpp>
#include <linen/detail/gemm/product.hpp>
#include <linen/detail/parallel.hpp>
#if defined(LINEN_HAS_CBLAS)
#include <linen/detail/gemm/cblas.hpp>
#endif

namespace {

using linen::Index;

struct Problem {
  Index M, N, K;
  std::vector<float> a, b, bias, c;
  Problem(Index m, Index n, Index k) : M(m), N(n), K(k), a(m * k), b(k * n), bias(n), c(m * n) {
    std::mt19937 gen(1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto* v : {&a, &b, &bias})
      for (float& x : *v) x = u(gen);
  }
};

void set_counters(benchmark::State& state, const Problem& p) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(p.M) * double(p.N) * double(p.K) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

std::unique_ptr<Eigen::ThreadPool> make_pool(Index threads) {
  return threads > 1 ? std::make_unique<Eigen::ThreadPool>(static_cast<int>(threads)) : nullptr;
}

// Rows in blocks over the pool (the projections' split before linen's GEMM): f(r0, rows).
template <class F>
void by_row_blocks(Eigen::ThreadPoolInterface* pool, Index M, F&& f) {
  const int threads = linen::detail::pool_workers(pool);
  const Index block = std::max<Index>(64, (M + 2 * threads - 1) / (2 * threads));
  const Index blocks = (M + block - 1) / block;
  linen::detail::parallel_for(pool, static_cast<int>(std::min<Index>(threads, blocks)), blocks, [&](int, Index i) {
    const Index r0 = i * block;
    f(r0, std::min(block, M - r0));
  });
}

void BM_gemm_linen(benchmark::State& state) {
  Problem p(state.range(0), state.range(1), state.range(2));
  const auto pool = make_pool(state.range(3));
  for (auto _ : state) {
    linen::detail::gemm::gemm<float>(p.M, p.N, p.K, p.a.data(), p.K, p.b.data(), p.N, p.bias.data(), p.c.data(), p.N,
                                     pool.get());
    benchmark::DoNotOptimize(p.c.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, p);
}

void BM_gemm_eigen(benchmark::State& state) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Problem p(state.range(0), state.range(1), state.range(2));
  const auto pool = make_pool(state.range(3));
  const Eigen::Map<const Mat> bm(p.b.data(), p.K, p.N);
  const Eigen::Map<const Eigen::RowVectorXf> bias(p.bias.data(), p.N);
  for (auto _ : state) {
    by_row_blocks(pool.get(), p.M, [&](Index r0, Index rows) {
      Eigen::Map<Mat> cm(p.c.data() + r0 * p.N, rows, p.N);
      cm.noalias() = Eigen::Map<const Mat>(p.a.data() + r0 * p.K, rows, p.K) * bm;
      cm.rowwise() += bias;
    });
    benchmark::DoNotOptimize(p.c.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, p);
}

void BM_dense_bf16(benchmark::State& state) {
  using Bf = Eigen::bfloat16;
  Problem p(state.range(0), state.range(1), state.range(2));
  const auto pool = make_pool(state.range(3));
  std::vector<Bf> x(p.a.size()), y(p.c.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<Bf>(p.a[i]);
  linen::detail::DenseScratch<float> scratch;
  for (auto _ : state) {
    linen::DenseGeneral<Bf, float, 1, 1>::multiply_rows<Bf>(p.b.data(), p.bias.data(), p.K, p.N, x.data(), p.M,
                                                            y.data(), &scratch, false, pool.get());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, p);
}

#if defined(LINEN_HAS_CBLAS)
void BM_gemm_cblas(benchmark::State& state) {
  Problem p(state.range(0), state.range(1), state.range(2));
  const auto pool = make_pool(state.range(3));
  for (auto _ : state) {
    by_row_blocks(pool.get(), p.M, [&](Index r0, Index rows) {
      linen::detail::gemm::cblas_gemm<float>(rows, p.N, p.K, p.a.data() + r0 * p.K, p.K, p.b.data(), p.N,
                                             p.bias.data(), p.c.data() + r0 * p.N, p.N);
    });
    benchmark::DoNotOptimize(p.c.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, p);
}
#endif

// M, N, K, threads: the layer's projections at (B, L, E) = (1, 512, 512), (8, 128, 512),
// (1, 2048, 512), (1, 4096, 256); N = E (one projection) and 3E (q, k, v in one).
void gemm_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "N", "K", "threads"});
  for (Index threads : {1, 2}) {
    for (Index m : {512, 1024, 2048}) {
      b->Args({m, 512, 512, threads});
      b->Args({m, 1536, 512, threads});
    }
    b->Args({4096, 256, 256, threads});
    b->Args({4096, 768, 256, threads});
  }
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
BENCHMARK(BM_gemm_linen)->Apply(gemm_shapes);
BENCHMARK(BM_gemm_eigen)->Apply(gemm_shapes);
BENCHMARK(BM_dense_bf16)->Apply(gemm_shapes);
#if defined(LINEN_HAS_CBLAS)
BENCHMARK(BM_gemm_cblas)->Apply(gemm_shapes);
#endif

// Kernels [K, N] enough to cycle through >= 128 MiB, x [M, K], y [M, N], bias [N].
struct GemvProblem {
  Index M, N, K, count;
  std::vector<float> x, w, bias, y;
  GemvProblem(Index m, Index n, Index k)
      : M(m), N(n), K(k), count(std::max<Index>(2, (Index{128} << 20) / (k * n * Index(sizeof(float))))),
        x(m * k), w(count * k * n), bias(n), y(m * n) {
    std::mt19937 gen(1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto* v : {&x, &bias}) for (float& e : *v) e = u(gen);
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = float(i % 13) * 0.0625f - 0.375f;
  }
  const float* kernel(Index c) const { return w.data() + c * K * N; }
};

void set_gemv_counters(benchmark::State& state, const GemvProblem& p) {
  state.counters["GB/s"] = benchmark::Counter(double(p.K) * double(p.N) * sizeof(float) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

void BM_gemv_linen(benchmark::State& state) {
  GemvProblem p(state.range(0), state.range(1), state.range(2));
  const auto pool = make_pool(state.range(3));
  Index c = 0;
  for (auto _ : state) {
    linen::detail::gemm::multiply_rows<float>(p.M, p.N, p.K, p.x.data(), p.K, p.kernel(c), p.N, p.bias.data(),
                                              p.y.data(), p.N, pool.get());
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
    c = (c + 1) % p.count;
  }
  set_gemv_counters(state, p);
}

void BM_gemv_eigen(benchmark::State& state) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  GemvProblem p(state.range(0), state.range(1), state.range(2));
  const Eigen::Map<const Mat> xm(p.x.data(), p.M, p.K);
  const Eigen::Map<const Eigen::RowVectorXf> bias(p.bias.data(), p.N);
  Eigen::Map<Mat> ym(p.y.data(), p.M, p.N);
  Index c = 0;
  for (auto _ : state) {
    const Eigen::Map<const Mat> km(p.kernel(c), p.K, p.N);
    for (Index r = 0; r < p.M; ++r) ym.row(r).noalias() = xm.row(r) * km;
    ym.rowwise() += bias;
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
    c = (c + 1) % p.count;
  }
  set_gemv_counters(state, p);
}

// M, N, K, threads: one decode step's projections at E = 512 (q, k, v, out: N = K = 512)
// and E = 2048, for one sequence and a batch of 4.
void gemv_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "N", "K", "threads"});
  for (Index m : {1, 4}) {
    b->Args({m, 512, 512, 1});
    b->Args({m, 2048, 2048, 1});
  }
  b->Args({1, 2048, 2048, 2});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
BENCHMARK(BM_gemv_linen)->Apply(gemv_shapes);
BENCHMARK(BM_gemv_eigen)->Apply(gemv_shapes);

}  // namespace
