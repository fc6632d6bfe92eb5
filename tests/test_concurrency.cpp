// SPDX-License-Identifier: Apache-2.0
// Thread safety, as the README states it: a module, its parameters and a Variables store
// are read-only in apply and may be shared by any number of threads; each decoding thread
// has its own cache; a C++ engine as dropout source belongs to one thread (a
// random::Key may be shared); one Eigen thread pool may serve many callers at once, and
// results do not depend on the threads. Eight threads run at once, started together,
// and every result must equal, bit for bit, the same work done serially beforehand.
// Also concurrent loads of the fixture checkpoints (msgpack and safetensors).
//
// Sizes are small so that the file also runs quickly under ThreadSanitizer; a watchdog
// turns a deadlock into a failure instead of a hang.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <linen/io/checkpoint.hpp>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unsupported/Eigen/CXX11/ThreadPool>
#include <vector>

#include "attention_fixture.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;

constexpr int kThreads = 8;

// Aborts the process if `seconds` pass before the watchdog is destroyed: a deadlocked
// test then fails (with a message) instead of hanging until ctest's timeout.
class Watchdog {
 public:
  Watchdog(const char* what, int seconds)
      : thread_([this, what, seconds] {
          std::unique_lock<std::mutex> lock(mu_);
          if (!cv_.wait_for(lock, std::chrono::seconds(seconds), [this] { return done_; })) {
            std::cerr << "linen test_concurrency: " << what << " did not finish within " << seconds << " s (deadlock?)"
                      << std::endl;
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// Runs work(t) for t in [0, kThreads) on kThreads threads released together; an exception
// in a thread is reported as a failure of the test with the thread's index.
template <class F>
void run_concurrently(const char* what, F&& work) {
  Watchdog dog(what, 120);
  std::atomic<int> ready{0};
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      try {
        work(t);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(t)] = e.what();
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t)
    EXPECT_TRUE(errors[static_cast<std::size_t>(t)].empty())
        << what << ", thread " << t << ": " << errors[static_cast<std::size_t>(t)];
}

template <class T, int N>
Tensor<T, N> random_tensor(const Shape& shape, std::uint32_t seed) {
  Tensor<T, N> t(linen::to_dims<N>(shape));
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(nd(g));
  return t;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  return linen::shape_of(a) == linen::shape_of(b) &&
         std::memcmp(a.data(), b.data(), sizeof(*a.data()) * static_cast<std::size_t>(a.size())) == 0;
}

// Every output of one thread's work, in order.
using Outputs = std::vector<Tensor<float, 3>>;

void expect_same(const std::vector<Outputs>& serial, const std::vector<Outputs>& concurrent, const char* what) {
  ASSERT_EQ(serial.size(), concurrent.size());
  for (std::size_t t = 0; t < serial.size(); ++t) {
    ASSERT_EQ(serial[t].size(), concurrent[t].size()) << what << ", thread " << t;
    for (std::size_t i = 0; i < serial[t].size(); ++i)
      EXPECT_TRUE(same_bits(serial[t][i], concurrent[t][i])) << what << ", thread " << t << ", output " << i;
  }
}

// ---------------------------------------------------------------------------------------
// One const module and one set of parameters shared by eight threads.

constexpr Index kB = 2, kL = 6, kF = 16, kHeads = 4;

// The work of thread t: decode steps through its own cache, full forward passes with a
// causal mask, and dropout through a MultiHeadDotProductAttention with its own engine, its
// own key and a key shared by all threads.
struct ModuleWork {
  const linen::SelfAttention<float>& full;
  const linen::SelfAttention<float>& dec;
  const linen::MultiHeadDotProductAttention<float>& drop;
  const linen::SelfAttention<float>::Variables& vars;
  const linen::MultiHeadDotProductAttention<float>::Variables& drop_vars;
  const linen::random::Key& shared_key;

  Outputs operator()(int t) const {
    Outputs out;
    const auto x = random_tensor<float, 3>({kB, kL, kF}, 1000 + static_cast<std::uint32_t>(t));
    const auto kv = random_tensor<float, 3>({kB, kL + 1, kF}, 2000 + static_cast<std::uint32_t>(t));
    // decode: a cache per thread, made from the shared parameters
    auto cache = dec.init_cache(vars.params, {kB}, kL);
    for (Index i = 0; i < kL; ++i) {
      const Eigen::array<Index, 3> off{0, i, 0}, ext{kB, 1, kF};
      const Tensor<float, 3> xt = x.slice(off, ext);
      out.push_back(dec.apply(vars.params, cache, xt));
    }
    // full forward passes
    const Tensor<Index, 2> tokens(kB, kL);
    const Tensor<bool, 4> causal = linen::make_causal_mask(tokens);
    linen::CallOptions<float> call;
    call.mask = causal;
    out.push_back(full.apply(vars, x, call));
    out.push_back(full.apply(vars, x));
    // dropout: a thread's own engine (two calls: it advances), its own key, a shared key
    std::mt19937 engine(3000 + static_cast<std::uint32_t>(t));
    linen::CallOptions<float> d;
    d.deterministic = false;
    d.dropout_rng = engine;
    out.push_back(drop.apply(drop_vars, x, kv, d));
    out.push_back(drop.apply(drop_vars, x, kv, d));
    d.dropout_rng = linen::random::key(4000 + static_cast<std::uint64_t>(t));
    out.push_back(drop.apply(drop_vars, x, kv, d));
    d.dropout_rng = shared_key;
    out.push_back(drop.apply(drop_vars, x, kv, d));
    return out;
  }
};

// The modules and variables every thread shares; `pool` is lent to all three modules.
struct SharedModules {
  linen::SelfAttention<float> full, dec;
  linen::MultiHeadDotProductAttention<float> drop;
  linen::SelfAttention<float>::Variables vars;
  linen::MultiHeadDotProductAttention<float>::Variables drop_vars;
  linen::random::Key shared_key = linen::random::key(99);

  explicit SharedModules(Eigen::ThreadPoolInterface* pool = nullptr)
      : full(config(pool)),
        dec(config(pool, true)),
        drop(config(pool, false, 0.3)),
        vars(full.init(linen::random::key(0), x0())),
        drop_vars(drop.init(linen::random::key(1), x0(), random_tensor<float, 3>({kB, kL + 1, kF}, 2))) {}
  ModuleWork work() const { return {full, dec, drop, vars, drop_vars, shared_key}; }

 private:
  static Tensor<float, 3> x0() { return random_tensor<float, 3>({kB, kL, kF}, 1); }
  static linen::AttentionConfig<float> config(Eigen::ThreadPoolInterface* pool, bool decode = false,
                                              double dropout_rate = 0.0) {
    linen::AttentionConfig<float> cfg;
    cfg.num_heads = kHeads;
    cfg.bias_init = linen::initializers::normal{0.2};
    cfg.decode = decode;
    cfg.dropout_rate = dropout_rate;
    if (dropout_rate > 0) cfg.broadcast_dropout = false;
    cfg.thread_pool = pool;
    return cfg;
  }
};

TEST(ConcurrencyModules, EightThreadsShareOneModuleAndOneParameterSet) {
  const SharedModules s;
  const ModuleWork work = s.work();

  std::vector<Outputs> serial(kThreads), concurrent(kThreads);
  for (int t = 0; t < kThreads; ++t) serial[static_cast<std::size_t>(t)] = work(t);
  // the outputs differ between threads (each has its own inputs and randomness)
  EXPECT_FALSE(same_bits(serial[0].back(), serial[1].back()));
  for (int round = 0; round < 3; ++round) {
    run_concurrently("shared modules", [&](int t) { concurrent[static_cast<std::size_t>(t)] = work(t); });
    expect_same(serial, concurrent, "shared modules");
  }
}

// ---------------------------------------------------------------------------------------
// One Eigen thread pool lent to dot_product_attention by eight threads at once: no
// deadlock, and the bits of the single-threaded run (the kernel's results do not depend
// on the number of threads).

struct DpaProblem {
  Tensor<float, 4> q, k, v;
  Tensor<bool, 4> mask;
  bool causal = false, dropout = false;
};

DpaProblem dpa_problem(int t, int kind) {
  const auto seed = static_cast<std::uint32_t>(100 * t + kind);
  DpaProblem p;
  if (kind == 0) {  // the tiled kernel: several query tiles, a mask and the causal flag
    p.q = random_tensor<float, 4>({2, 70, 2, 16}, seed);
    p.k = random_tensor<float, 4>({2, 90, 2, 16}, seed + 1);
    p.v = random_tensor<float, 4>({2, 90, 2, 8}, seed + 2);
    p.mask.resize(2, 1, 70, 90);
    std::mt19937 g(seed + 3);
    std::bernoulli_distribution keep(0.9);
    for (Index i = 0; i < p.mask.size(); ++i) p.mask.data()[i] = keep(g);
    p.causal = true;
  } else if (kind == 1) {  // a decode step: the row kernel, the keys split in chunks
    p.q = random_tensor<float, 4>({1, 1, 2, 16}, seed);
    p.k = random_tensor<float, 4>({1, 1100, 2, 16}, seed + 1);
    p.v = random_tensor<float, 4>({1, 1100, 2, 16}, seed + 2);
  } else {  // dropout (the keep mask is drawn by the caller, once)
    p.q = random_tensor<float, 4>({2, 9, 2, 8}, seed);
    p.k = random_tensor<float, 4>({2, 11, 2, 8}, seed + 1);
    p.v = random_tensor<float, 4>({2, 11, 2, 8}, seed + 2);
    p.dropout = true;
  }
  return p;
}

Tensor<float, 4> run_dpa(const DpaProblem& p, int t, Eigen::ThreadPoolInterface* pool) {
  linen::AttentionOptions<float> o;
  o.implementation = linen::Implementation::Fused;
  o.thread_pool = pool;
  o.is_causal = p.causal;
  if (p.mask.size() > 0) o.mask = p.mask;
  if (p.dropout) {
    o.dropout_rate = 0.25;
    o.broadcast_dropout = false;
    o.dropout_rng = linen::random::key(static_cast<std::uint64_t>(t));
  }
  return linen::dot_product_attention(p.q, p.k, p.v, o);
}

TEST(ConcurrencyThreadPool, EightCallersShareOnePoolAndGetTheSingleThreadedBits) {
  constexpr int kKinds = 3, kReps = 4;
  std::vector<std::vector<DpaProblem>> problems(kThreads);
  std::vector<std::vector<Tensor<float, 4>>> alone(kThreads);
  for (int t = 0; t < kThreads; ++t)
    for (int kind = 0; kind < kKinds; ++kind) {
      problems[static_cast<std::size_t>(t)].push_back(dpa_problem(t, kind));
      alone[static_cast<std::size_t>(t)].push_back(run_dpa(problems[static_cast<std::size_t>(t)].back(), t, nullptr));
    }
  for (int pool_threads : {1, 3}) {
    Eigen::ThreadPool pool(pool_threads);
    std::vector<std::vector<Tensor<float, 4>>> got(kThreads);
    run_concurrently("shared thread pool", [&](int t) {
      auto& mine = got[static_cast<std::size_t>(t)];
      for (int rep = 0; rep < kReps; ++rep)
        for (int kind = 0; kind < kKinds; ++kind)
          mine.push_back(run_dpa(problems[static_cast<std::size_t>(t)][static_cast<std::size_t>(kind)], t, &pool));
    });
    for (int kind = 0; kind < kKinds; ++kind) {
      int differ = 0;
      for (int t = 0; t < kThreads; ++t) {
        ASSERT_EQ(got[static_cast<std::size_t>(t)].size(), static_cast<std::size_t>(kReps * kKinds));
        for (int rep = 0; rep < kReps; ++rep)
          differ += !same_bits(got[static_cast<std::size_t>(t)][static_cast<std::size_t>(rep * kKinds + kind)],
                               alone[static_cast<std::size_t>(t)][static_cast<std::size_t>(kind)]);
      }
      EXPECT_EQ(differ, 0) << "problem " << kind << " (0: tiled, 1: decode step over 1100 keys, 2: dropout): " << differ
                           << " of " << kThreads * kReps << " results on a pool of " << pool_threads
                           << " differ from the single-threaded bits";
    }
  }
}

// The same pool lent to the modules (AttentionConfig::thread_pool) by eight threads:
// forward passes and decode steps equal, bit for bit, the same modules' results without a
// pool, computed serially.
TEST(ConcurrencyThreadPool, ModulesWithASharedPool) {
  std::vector<Outputs> serial(kThreads);
  {
    const SharedModules s;
    const ModuleWork work = s.work();
    for (int t = 0; t < kThreads; ++t) serial[static_cast<std::size_t>(t)] = work(t);
  }
  Eigen::ThreadPool pool(3);
  const SharedModules s(&pool);
  const ModuleWork work = s.work();
  std::vector<Outputs> concurrent(kThreads);
  run_concurrently("modules with a shared pool", [&](int t) { concurrent[static_cast<std::size_t>(t)] = work(t); });
  expect_same(serial, concurrent, "modules with a shared pool");
}

// ---------------------------------------------------------------------------------------
// Concurrent loads: each thread reads the fixture checkpoints (Flax msgpack and their
// safetensors twins, a module fixture) and binds a module, several times.

TEST(ConcurrencyLoaders, EightThreadsLoadTheFixtureCheckpoints) {
  const std::string dir = linen_test::data_path("flax/");
  const std::vector<std::string> files = {dir + "msgpack_f32.msgpack", dir + "msgpack_bf16.msgpack",
                                          dir + "msgpack_f32.safetensors", dir + "msgpack_bf16.safetensors",
                                          dir + "self_basic.safetensors"};
  std::vector<linen::io::Variables> serial;
  for (const auto& f : files) serial.push_back(linen::io::load_checkpoint(f));
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(serial.back()));
  const auto bound = linen::io::load_attention(serial.back(), cfg);
  const auto x = serial.back().get<float, 3>("inputs/q");
  const linen::SelfAttention<float> attn(cfg);
  const Tensor<float, 3> want = attn.apply(bound, x);

  std::vector<std::vector<linen::io::Variables>> loaded(kThreads);
  std::vector<Outputs> outputs(kThreads);
  run_concurrently("checkpoint loads", [&](int t) {
    for (int rep = 0; rep < 3; ++rep)
      for (std::size_t i = 0; i < files.size(); ++i) {
        // alternate the entry points: by content, and by format
        const std::size_t f = (i + static_cast<std::size_t>(t)) % files.size();
        const bool msgpack = files[f].size() > 8 && files[f].compare(files[f].size() - 8, 8, ".msgpack") == 0;
        linen::io::Variables v = rep != 1  ? linen::io::load_checkpoint(files[f])
                                 : msgpack ? linen::io::load_msgpack(files[f])
                                           : linen::io::load_safetensors(files[f]);
        if (f + 1 == files.size()) {
          // bind the module fixture and run it, sharing `attn`
          outputs[static_cast<std::size_t>(t)].push_back(attn.apply(linen::io::load_attention(v, cfg), x));
        }
        loaded[static_cast<std::size_t>(t)].push_back(std::move(v));
      }
  });
  for (int t = 0; t < kThreads; ++t) {
    const auto& mine = loaded[static_cast<std::size_t>(t)];
    ASSERT_EQ(mine.size(), 3 * files.size());
    for (std::size_t n = 0; n < mine.size(); ++n) {
      const std::size_t f = (n % files.size() + static_cast<std::size_t>(t)) % files.size();
      EXPECT_TRUE(mine[n] == serial[f]) << "thread " << t << ", " << files[f];
    }
    ASSERT_EQ(outputs[static_cast<std::size_t>(t)].size(), 3u);
    for (const auto& o : outputs[static_cast<std::size_t>(t)]) EXPECT_TRUE(same_bits(o, want)) << "thread " << t;
  }
}

}  // namespace
