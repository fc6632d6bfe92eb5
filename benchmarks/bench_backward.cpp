// SPDX-License-Identifier: Apache-2.0
//
// linen's gradients next to the forward they differentiate: SelfAttention in float32 at
// (B, L, E, H) = (1, 2048, 512, 8) (head_dim 64), no mask, one thread unless the row
// says threads:2.
//   BM_self_attention_forward      SelfAttention::apply, the inference forward
//   BM_self_attention_vjp_forward  linen::vjp: the forward that also keeps the tape
//   BM_self_attention_backward     pullback(cotangent) alone, fused kernels (the default)
//   BM_self_attention_backward_reference   the same with Implementation::Reference
//   BM_self_attention_backward_threads:2   the fused backward on an Eigen::ThreadPool(2)
// The backward rows carry `x_forward`: their best time per iteration divided by the best
// time of a SelfAttention::apply (one thread) run after each backward iteration inside
// the same benchmark (the rows' own times count the backward only), so the ratio holds
// on a shared or throttled machine (best-of, because load from other processes only ever
// adds time). The target is x_forward <= 2.5 for the one-thread fused row.
//   BM_self_attention_vjp_heap/B/L/E/H/kept:0|1/workspace:0|1   a training step's forward
//       and backward (one thread) with glibc's default malloc ("[default malloc]", kept:0)
//       or a heap that keeps freed memory (kept:1); workspace:0 vjp + pullback (tape,
//       output and gradients allocated per call), workspace:1 vjp_into a caller's output
//       and pullback into a caller's AttentionGrads with a kept GradWorkspace. Measured
//       in a forked child as bench_attention_layer.cpp's BM_self_attention_heap; the row's
//       time is forward + backward; x_forward: the best backward divided by the best
//       forward of the same child (apply, resp. apply_into with an AttentionWorkspace,
//       timed after every step). GFLOP/s counts the matrix products only: forward 4 projections
// (2*L*E*E each) + attention (4*L^2*E); backward 8 projection products + 5 attention
// products (Q.K^T is recomputed): 4*4*L*E*E + 10*L^2*E.
// jax.nn.dot_product_attention's vjp (linen::jax_nn::vjp), float32, one thread, query
// [1, L, N, H], key and value [1, L, K, H]; the rows time pullback(d_out) alone:
//   BM_jax_nn_backward_gqa/L:2048/N:8/K:2|8/H:64   grouped-query (K = 2: a unit owns a kv
//       head's 4 query heads, each K, V tile loaded once for them) against multi-head
//   BM_jax_nn_backward_window/L:4096/N:8/H:64/window:256|0   local_window_size = 256
//       (tiles outside the band skipped) against the dense backward (window:0)
// GFLOP/s counts the dense backward's 5 attention products, 10*L^2*N*H.
#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <ctime>
#include <memory>
#include <random>
#include <vector>

#if defined(__GLIBC__) && defined(__linux__)
#include <malloc.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include <benchmark/benchmark.h>
#include <linen/grad.hpp>
#include <linen/jax_nn_grad.hpp>
#include <linen/linen.hpp>

namespace {

using Clock = std::chrono::steady_clock;

linen::Tensor<float, 3> random_normal(linen::Index b, linen::Index l, linen::Index e, unsigned seed) {
  linen::Tensor<float, 3> t(b, l, e);
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (linen::Index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  return t;
}

linen::AttentionConfig<float> config(linen::Index num_heads) {
  linen::AttentionConfig<float> c;
  c.num_heads = num_heads;
  return c;
}

struct Problem {
  linen::SelfAttention<float> attn;
  linen::Tensor<float, 3> x, cotangent;
  linen::AttentionVariables<float> vars;
  explicit Problem(const benchmark::State& state)
      : attn(config(state.range(3))),
        x(random_normal(state.range(0), state.range(1), state.range(2), 1)),
        cotangent(random_normal(state.range(0), state.range(1), state.range(2), 2)),
        vars(attn.init(linen::random::key(0), x)) {}
};

double forward_flops(const benchmark::State& s) {
  const double b = double(s.range(0)), l = double(s.range(1)), e = double(s.range(2));
  return b * (4 * 2 * l * e * e + 4 * l * l * e);
}
double backward_flops(const benchmark::State& s) {
  const double b = double(s.range(0)), l = double(s.range(1)), e = double(s.range(2));
  return b * (8 * 2 * l * e * e + 10 * l * l * e);
}

// Seconds of one SelfAttention::apply.
double forward_seconds(const Problem& p) {
  const auto t0 = Clock::now();
  const linen::Tensor<float, 3> y = p.attn.apply(p.vars, p.x);
  benchmark::DoNotOptimize(y.data());
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void BM_self_attention_forward(benchmark::State& state) {
  const Problem p(state);
  for (auto _ : state) {
    linen::Tensor<float, 3> y = p.attn.apply(p.vars, p.x);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(forward_flops(state) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_self_attention_vjp_forward(benchmark::State& state) {
  const Problem p(state);
  for (auto _ : state) {
    auto r = linen::vjp(p.attn, p.vars, p.x);
    benchmark::DoNotOptimize(r.output.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(forward_flops(state) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The backward alone: the tape is made once, outside the timed loop.
void run_backward(benchmark::State& state, linen::Implementation impl, int threads) {
  const Problem p(state);
  std::unique_ptr<Eigen::ThreadPool> pool;
  linen::GradOptions options;
  options.implementation = impl;
  if (threads > 1) {
    pool = std::make_unique<Eigen::ThreadPool>(threads);
    options.thread_pool = pool.get();
  }
  const auto r = linen::vjp(p.attn, p.vars, p.x, {}, options);
  double best_forward = forward_seconds(p), best_backward = 1e30;  // the first apply warms up
  for (auto _ : state) {
    const auto t0 = Clock::now();
    auto g = r.pullback(p.cotangent);
    benchmark::DoNotOptimize(g.inputs_q.data());
    benchmark::ClobberMemory();
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(seconds);  // the row's time is the backward's alone
    best_backward = std::min(best_backward, seconds);
    best_forward = std::min(best_forward, forward_seconds(p));  // interleaved: same conditions
  }
  state.counters["x_forward"] = best_backward / best_forward;
  state.counters["GFLOP/s"] =
      benchmark::Counter(backward_flops(state) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_self_attention_backward(benchmark::State& state) { run_backward(state, linen::Implementation::Fused, 1); }
void BM_self_attention_backward_reference(benchmark::State& state) {
  run_backward(state, linen::Implementation::Reference, 1);
}
void BM_self_attention_backward_threads2(benchmark::State& state) {
  run_backward(state, linen::Implementation::Fused, 2);
}

#define LINEN_FORWARD_ROW(fn) \
  BENCHMARK(fn)->ArgNames({"B", "L", "E", "H"})->Args({1, 2048, 512, 8})->Unit(benchmark::kMillisecond)->UseRealTime()
#define LINEN_BACKWARD_ROW(fn) \
  BENCHMARK(fn)->ArgNames({"B", "L", "E", "H"})->Args({1, 2048, 512, 8})->Unit(benchmark::kMillisecond)->UseManualTime()

LINEN_FORWARD_ROW(BM_self_attention_forward);
LINEN_FORWARD_ROW(BM_self_attention_vjp_forward);
LINEN_BACKWARD_ROW(BM_self_attention_backward);
LINEN_BACKWARD_ROW(BM_self_attention_backward_reference);
LINEN_BACKWARD_ROW(BM_self_attention_backward_threads2);

// ---- jax.nn.dot_product_attention's backward -------------------------------------------

linen::Tensor<float, 4> random_normal4(const std::array<linen::Index, 4>& dims, unsigned seed) {
  linen::Tensor<float, 4> t(dims);
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (linen::Index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  return t;
}

void run_jax_nn_backward(benchmark::State& state, linen::Index l, linen::Index n, linen::Index kh, linen::Index h,
                         const linen::jax_nn::Options<float>& o) {
  const auto q = random_normal4({1, l, n, h}, 1), k = random_normal4({1, l, kh, h}, 2),
             v = random_normal4({1, l, kh, h}, 3), d_out = random_normal4({1, l, n, h}, 4);
  const auto r = linen::jax_nn::vjp(q, k, v, o);
  for (auto _ : state) {
    auto g = r.pullback(d_out);
    benchmark::DoNotOptimize(g.query.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(10.0 * double(l) * double(l) * double(n) * double(h) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_jax_nn_backward_gqa(benchmark::State& state) {
  run_jax_nn_backward(state, state.range(0), state.range(1), state.range(2), state.range(3), {});
}
BENCHMARK(BM_jax_nn_backward_gqa)
    ->ArgNames({"L", "N", "K", "H"})
    ->Args({2048, 8, 2, 64})
    ->Args({2048, 8, 8, 64})
    ->Unit(benchmark::kMillisecond);

void BM_jax_nn_backward_window(benchmark::State& state) {
  linen::jax_nn::Options<float> o;
  if (state.range(3) > 0) o.local_window_size = state.range(3);
  run_jax_nn_backward(state, state.range(0), state.range(1), state.range(1), state.range(2), o);
}
BENCHMARK(BM_jax_nn_backward_window)
    ->ArgNames({"L", "N", "H", "window"})
    ->Args({4096, 8, 64, 256})
    ->Args({4096, 8, 64, 0})
    ->Unit(benchmark::kMillisecond);

// ---- A training step's forward and backward with the allocator users have -------------
#if defined(__GLIBC__) && defined(__linux__)
// One child process: n + 1 steps (the first a warm-up). Per step: wall seconds of the
// forward (vjp / vjp_into) and of the backward (pullback), CPU seconds of both (user +
// system: page faults included), and wall seconds of a plain forward (apply / apply_into).
// Returns false when the child failed.
struct StepTimes {
  std::vector<double> forward, backward, cpu, apply;
};
bool run_vjp_heap_child(const benchmark::State& state, bool kept, bool workspace, std::size_t steps, StepTimes& out) {
  int fd[2];
  if (pipe(fd) != 0) return false;
  const pid_t pid = fork();
  if (pid < 0) return false;
  const std::size_t fields = 4;
  if (pid == 0) {
    close(fd[0]);
    if (kept) {
      mallopt(M_MMAP_MAX, 0);
      mallopt(M_TRIM_THRESHOLD, INT_MAX);
    }
    const Problem p(state);
    linen::GradWorkspace<float> gws;
    linen::AttentionWorkspace<float> aws;
    linen::Tensor<float, 3> y(p.x.dimensions()), ya(p.x.dimensions());
    linen::AttentionGrads<float, float, 3> grads;
    std::vector<double> t(fields * steps);
    const auto cpu_now = [] {
      timespec ts{};
      clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
      return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
    };
    const auto since = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
    for (std::size_t i = 0; i < steps; ++i) {
      const double c0 = cpu_now();
      auto t0 = Clock::now();
      if (workspace) {
        const auto pullback = linen::vjp_into(p.attn, p.vars, p.x, y, gws);
        t[i] = since(t0);
        t0 = Clock::now();
        pullback(p.cotangent, grads);
        benchmark::DoNotOptimize(grads.inputs_q.data());
      } else {
        auto r = linen::vjp(p.attn, p.vars, p.x);
        benchmark::DoNotOptimize(r.output.data());
        t[i] = since(t0);
        t0 = Clock::now();
        auto g = r.pullback(p.cotangent);
        benchmark::DoNotOptimize(g.inputs_q.data());
      }
      benchmark::ClobberMemory();
      t[steps + i] = since(t0);
      t[2 * steps + i] = cpu_now() - c0;
      t0 = Clock::now();
      if (workspace) {
        p.attn.apply_into(p.vars.params, p.x, ya, aws);
        benchmark::DoNotOptimize(ya.data());
      } else {
        linen::Tensor<float, 3> z = p.attn.apply(p.vars, p.x);
        benchmark::DoNotOptimize(z.data());
      }
      benchmark::ClobberMemory();
      t[3 * steps + i] = since(t0);
    }
    const char* q = reinterpret_cast<const char*>(t.data());
    std::size_t left = t.size() * sizeof(double);
    while (left > 0) {
      const ssize_t w = write(fd[1], q, left);
      if (w <= 0) _exit(1);
      q += w;
      left -= static_cast<std::size_t>(w);
    }
    _exit(0);
  }
  close(fd[1]);
  std::vector<double> t(fields * steps);
  char* q = reinterpret_cast<char*>(t.data());
  std::size_t left = t.size() * sizeof(double);
  while (left > 0) {
    const ssize_t r = read(fd[0], q, left);
    if (r <= 0) break;
    q += r;
    left -= static_cast<std::size_t>(r);
  }
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (left != 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return false;
  const auto part = [&](std::size_t k) {
    return std::vector<double>(t.begin() + static_cast<std::ptrdiff_t>(k * steps),
                               t.begin() + static_cast<std::ptrdiff_t>((k + 1) * steps));
  };
  out = {part(0), part(1), part(2), part(3)};
  return true;
}

void BM_self_attention_vjp_heap(benchmark::State& state) {
  const std::size_t steps = static_cast<std::size_t>(state.max_iterations) + 1;
  StepTimes t;
  if (!run_vjp_heap_child(state, state.range(4) != 0, state.range(5) != 0, steps, t)) {
    state.SkipWithError("the measuring child process failed");
    return;
  }
  std::size_t i = 1;  // [0]: the warm-up
  double best_backward = 1e30, best_apply = 1e30, cpu_sum = 0;
  for (auto _ : state) {
    state.SetIterationTime(t.forward[i] + t.backward[i]);
    best_backward = std::min(best_backward, t.backward[i]);
    best_apply = std::min(best_apply, t.apply[i]);
    cpu_sum += t.cpu[i];
    ++i;
  }
  state.counters["first_step_ms"] = (t.forward[0] + t.backward[0]) * 1e3;
  state.counters["cpu_ms"] = cpu_sum / double(steps - 1) * 1e3;  // forward + backward, CPU per step
  state.counters["x_forward"] = best_backward / best_apply;
  state.counters["GFLOP/s"] = benchmark::Counter((forward_flops(state) + backward_flops(state)) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}
void vjp_heap_rows(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"B", "L", "E", "H", "kept", "workspace"});
  for (const auto& s : {std::array<linen::Index, 4>{1, 2048, 512, 8}, std::array<linen::Index, 4>{8, 128, 512, 8}})
    for (linen::Index kept : {0, 1})
      for (linen::Index ws : {0, 1}) bm->Args({s[0], s[1], s[2], s[3], kept, ws});
  bm->Unit(benchmark::kMillisecond)->UseManualTime();
}
BENCHMARK(BM_self_attention_vjp_heap)->Apply(vjp_heap_rows);
#endif

}  // namespace
