// SPDX-License-Identifier: Apache-2.0
// linen::dispatch (isa.hpp): level names, detection, forcing (set_isa, LINEN_ISA), the
// refusal of levels the CPU lacks, and the kernels of every level the CPU has (forward,
// decode rows, backward) against the reference, for every element type; and every
// level's GEMM (the projections).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/detail/attention/backward.hpp>
#include <linen/detail/dispatch.hpp>
#include <linen/detail/gemm/product.hpp>
#include <linen/dot_product_attention.hpp>
#include <linen/errors.hpp>
#include <linen/isa.hpp>

namespace {

using linen::Index;
using linen::Isa;
namespace dispatch = linen::detail::dispatch;

constexpr Isa kAll[] = {Isa::sse2, Isa::avx2, Isa::avx512, Isa::avx512_bf16};

unsigned bits(std::initializer_list<Isa> levels) {
  unsigned b = 0;
  for (Isa l : levels) b |= 1u << static_cast<int>(l);
  return b;
}

bool supported(Isa l) {
  for (Isa s : linen::supported_isas())
    if (s == l) return true;
  return false;
}

// The message of the linen::invalid_argument `f` throws ("" when it throws nothing).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const linen::invalid_argument& e) {
    return e.what();
  }
  return "";
}

// Restores the active level at the end of a test that forces one.
struct RestoreLevel {
  Isa saved = linen::active_isa();
  ~RestoreLevel() { linen::set_isa(saved); }
};

TEST(Dispatch, LevelNamesRoundTrip) {
  for (Isa l : kAll) EXPECT_EQ(linen::parse_isa(linen::isa_name(l)), l) << linen::isa_name(l);
  EXPECT_STREQ(linen::isa_name(Isa::avx512_bf16), "avx512_bf16");
  EXPECT_EQ(linen::parse_isa("native"), linen::detected_isa());
  for (const char* bad : {"", "AVX2", "avx", "avx512bf16", "sse4", "native "}) {
    const std::string msg = error_of([&] { linen::parse_isa(bad); });
    EXPECT_NE(msg.find(std::string("'") + bad + "' is not an instruction-set level"), std::string::npos) << msg;
    EXPECT_NE(msg.find("known: sse2, avx2, avx512, avx512_bf16, native"), std::string::npos) << msg;
    EXPECT_NE(msg.find("this CPU supports sse2"), std::string::npos) << msg;
  }
}

// The choice LINEN_ISA makes, on made-up CPUs: a level the CPU lacks is refused, naming
// the level and what the CPU has; never a silent fallback.
TEST(Dispatch, ChooseLevelRefusesWhatTheCpuLacks) {
  const unsigned zen3 = bits({Isa::sse2, Isa::avx2});
  const unsigned old = bits({Isa::sse2});
  const unsigned zen5 = bits({Isa::sse2, Isa::avx2, Isa::avx512, Isa::avx512_bf16});
  const unsigned skx = bits({Isa::sse2, Isa::avx2, Isa::avx512});
  EXPECT_EQ(dispatch::choose_level("avx2", zen3, "LINEN_ISA"), Isa::avx2);
  EXPECT_EQ(dispatch::choose_level("sse2", zen3, "LINEN_ISA"), Isa::sse2);
  EXPECT_EQ(dispatch::choose_level("native", zen3, "LINEN_ISA"), Isa::avx2);
  EXPECT_EQ(dispatch::choose_level("native", old, "LINEN_ISA"), Isa::sse2);
  EXPECT_EQ(dispatch::choose_level("native", skx, "LINEN_ISA"), Isa::avx512);
  EXPECT_EQ(dispatch::choose_level("native", zen5, "LINEN_ISA"), Isa::avx512_bf16);
  EXPECT_EQ(dispatch::choose_level("avx512_bf16", zen5, "LINEN_ISA"), Isa::avx512_bf16);

  std::string msg = error_of([&] { dispatch::choose_level("avx512", zen3, "LINEN_ISA"); });
  EXPECT_NE(msg.find("LINEN_ISA=avx512: this CPU does not support avx512 (it supports sse2, avx2)"),
            std::string::npos)
      << msg;
  msg = error_of([&] { dispatch::choose_level("avx512_bf16", skx, "LINEN_ISA"); });
  EXPECT_NE(msg.find("does not support avx512_bf16 (it supports sse2, avx2, avx512)"), std::string::npos) << msg;
  msg = error_of([&] { dispatch::choose_level("avx2", old, "LINEN_ISA"); });
  EXPECT_NE(msg.find("does not support avx2 (it supports sse2)"), std::string::npos) << msg;
  msg = error_of([&] { dispatch::choose_level("avx-512", zen5, "LINEN_ISA"); });
  EXPECT_NE(msg.find("LINEN_ISA: 'avx-512' is not an instruction-set level"), std::string::npos) << msg;
  EXPECT_EQ(msg.rfind("linen", 0), 0u) << msg;

  EXPECT_NO_THROW(dispatch::require_level(Isa::avx512, skx, "x"));
  msg = error_of([&] { dispatch::require_level(Isa::avx512, zen3, "linen::set_isa(avx512)"); });
  EXPECT_NE(msg.find("linen::set_isa(avx512): this CPU does not support avx512"), std::string::npos) << msg;
}

// The CPU's flags as Linux reports them (the "flags" line of /proc/cpuinfo), or empty.
std::string cpuinfo_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) return line + " ";
  return "";
}

TEST(Dispatch, DetectionAgreesWithTheKernelsView) {
  const std::vector<Isa> levels = linen::supported_isas();
  ASSERT_FALSE(levels.empty());
  for (std::size_t i = 0; i < levels.size(); ++i) EXPECT_EQ(levels[i], kAll[i]) << "levels imply the ones below";
  EXPECT_EQ(linen::detected_isa(), levels.back());
  const std::string flags = cpuinfo_flags();
  if (flags.empty()) GTEST_SKIP() << "no /proc/cpuinfo to compare with";
  const auto has = [&](const char* f) { return flags.find(std::string(" ") + f + " ") != std::string::npos; };
  EXPECT_EQ(supported(Isa::avx2), has("avx2") && has("fma") && has("f16c"));
  EXPECT_EQ(supported(Isa::avx512), has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq"));
  EXPECT_EQ(supported(Isa::avx512_bf16), supported(Isa::avx512) && has("avx512_bf16"));
}

// The first choice follows LINEN_ISA (ctest runs this binary once per level with it set).
TEST(Dispatch, EnvironmentChoosesTheLevel) {
  const char* env = std::getenv("LINEN_ISA");
  EXPECT_EQ(linen::active_isa(), env && *env ? linen::parse_isa(env) : linen::detected_isa());
}

TEST(Dispatch, SetIsaForcesAndRefuses) {
  const RestoreLevel restore;
  for (Isa l : linen::supported_isas()) {
    linen::set_isa(l);
    EXPECT_EQ(linen::active_isa(), l);
    EXPECT_EQ(&dispatch::active_table(), &dispatch::table_of(l));
  }
  linen::set_isa(std::string_view("sse2"));
  EXPECT_EQ(linen::active_isa(), Isa::sse2);
  bool refused = false;
  for (Isa l : kAll) {
    if (supported(l)) continue;
    const std::string msg = error_of([&] { linen::set_isa(l); });
    EXPECT_NE(msg.find(std::string("this CPU does not support ") + linen::isa_name(l)), std::string::npos) << msg;
    EXPECT_EQ(linen::active_isa(), Isa::sse2) << "a refused level changes nothing";
    refused = true;
  }
  EXPECT_NE(error_of([] { linen::set_isa(std::string_view("avx1024")); }), "");
  if (!refused) GTEST_SKIP() << "this CPU has every level: nothing to refuse here (ChooseLevel covers it)";
}

// ---- each level's kernels against the reference -------------------------------------

template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  else if constexpr (std::is_same_v<T, float>) return 2e-6;
  else if constexpr (std::is_same_v<T, Eigen::half>) return 5e-3;
  else return 2e-2;
}

template <class T>
double rel_err(const std::vector<T>& a, const std::vector<T>& e) {
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < e.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(e[i]);
    if (!std::isfinite(x)) return INFINITY;
    err = std::max(err, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return scale > 0 ? err / scale : err;
}

template <class T>
std::vector<T> random_vector(Index n, std::mt19937& g) {
  std::normal_distribution<float> nd;
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<T>(nd(g));
  return v;
}

// One problem in Flax's layout: B = 2, H = 3, depth 16 (values 8), causal or with a mask.
template <class T>
struct Case {
  Index lq, lk;
  bool causal;
  linen::detail::AttentionDims d;
  std::vector<T> q, k, v;
  std::vector<char> mask;  // [Lq, Lk], broadcast over batch and heads
  Case(Index lq_, Index lk_, bool causal_, std::mt19937& g) : lq(lq_), lk(lk_), causal(causal_) {
    d = linen::detail::check_qkv({2, lq, 3, 16}, {2, lk, 3, 16}, {2, lk, 3, 8}, "test");
    q = random_vector<T>(2 * lq * 3 * 16, g);
    k = random_vector<T>(2 * lk * 3 * 16, g);
    v = random_vector<T>(2 * lk * 3 * 8, g);
    mask.resize(static_cast<std::size_t>(lq * lk));
    for (std::size_t i = 0; i < mask.size(); ++i) mask[i] = (i % 7) != 3;
  }
  linen::AttentionOptions<T> options() const {
    linen::AttentionOptions<T> o;
    o.is_causal = causal;
    if (!causal) o.mask = linen::ArrayRef<bool>(reinterpret_cast<const bool*>(mask.data()), {lq, lk});
    return o;
  }
  std::vector<T> reference() const {
    std::vector<T> out(static_cast<std::size_t>(2 * lq * 3 * 8));
    linen::detail::attention_reference<T>(d, q.data(), k.data(), v.data(), options(), out.data(), nullptr, "test");
    return out;
  }
  // The fused forward at the active level (the default packet: dispatched).
  std::vector<T> fused(Eigen::ThreadPoolInterface* pool) const {
    std::vector<T> out(static_cast<std::size_t>(2 * lq * 3 * 8), T(-7));
    linen::AttentionOptions<T> o = options();
    o.thread_pool = pool;
    linen::detail::attention_fused<T>(d, q.data(), k.data(), v.data(), o, out.data(), "test");
    return out;
  }
};

// The backward of a Case's problem: fused (at the active level) or reference.
template <class T>
std::vector<T> backward(const Case<T>& c, bool fused, Eigen::ThreadPoolInterface* pool) {
  using C = linen::accum_t<T>;
  using Policy = linen::detail::FlaxLogits<T>;
  const linen::detail::Broadcast<bool> mask(c.options().mask, c.d, "test: mask");
  std::vector<T> out(static_cast<std::size_t>(2 * c.lq * 3 * 8));
  auto a = linen::detail::flax_problem(c.d, c.q.data(), c.k.data(), c.v.data(), out.data());
  a.mask = mask.view();
  a.causal = c.causal;
  a.pool = pool;
  std::mt19937 g(11);
  const std::vector<T> dout = random_vector<T>(static_cast<Index>(out.size()), g);
  std::vector<T> grads(c.q.size() + c.k.size() + c.v.size());
  T* dq = grads.data();
  T* dk = dq + c.q.size();
  T* dv = dk + c.k.size();
  if (!fused) {
    linen::detail::attention_backward_reference<Policy>(a, dout.data(), dq, dk, dv, nullptr);
    return grads;
  }
  const Index rows = 2 * 3 * c.lq;
  std::vector<C> row_max(static_cast<std::size_t>(rows)), row_sum(static_cast<std::size_t>(rows));
  std::vector<C> out_acc(out.size());
  a.row_max = row_max.data();
  a.row_sum = row_sum.data();
  a.out_acc = out_acc.data();
  linen::detail::fused_attention<T>(a);
  const C* out_c = out_acc.data();
  if constexpr (std::is_same_v<C, T>) out_c = out.data();
  linen::detail::attention_backward_fused<Policy>(a, out_c, row_max.data(), row_sum.data(), dout.data(), dq, dk, dv,
                                                  nullptr, 16, 16);
  return grads;
}

template <class T>
void check_level(Isa level, Eigen::ThreadPoolInterface* pool) {
  std::mt19937 g(5);
  const char* name = linen::isa_name(level);
  // tiled forward (many rows), decode rows (the row kernel: 1 and 2 query rows)
  for (const auto& [lq, lk, causal] : {std::tuple<Index, Index, bool>{37, 53, false}, {40, 40, true}, {1, 300, false},
                                       {2, 129, true}}) {
    const Case<T> c(lq, lk, causal, g);
    const std::vector<T> ref = c.reference();
    EXPECT_LE(rel_err(c.fused(nullptr), ref), tolerance<T>()) << name << " Lq " << lq << " Lk " << lk;
    EXPECT_LE(rel_err(c.fused(pool), ref), tolerance<T>()) << name << " Lq " << lq << " Lk " << lk << " (pool)";
    if (lq > 2) {
      const double tol = 10 * tolerance<T>();
      const std::vector<T> want = backward(c, false, nullptr);
      EXPECT_LE(rel_err(backward(c, true, nullptr), want), tol) << name << " backward Lq " << lq;
      EXPECT_LE(rel_err(backward(c, true, pool), want), tol) << name << " backward Lq " << lq << " (pool)";
    }
  }
}

TEST(Dispatch, EveryLevelMatchesTheReference) {
  const RestoreLevel restore;
  Eigen::ThreadPool pool(2);
  for (Isa l : linen::supported_isas()) {
    linen::set_isa(l);
    check_level<float>(l, &pool);
    check_level<double>(l, &pool);
    check_level<Eigen::half>(l, &pool);
    check_level<Eigen::bfloat16>(l, &pool);
  }
}

// Each level runs its own kernels: with FMA (avx2 and up) the float products round
// differently from sse2's, so a table that ran sse2's kernels everywhere would show here.
TEST(Dispatch, LevelsRunTheirOwnKernels) {
  const RestoreLevel restore;
  std::mt19937 g(3);
  const Case<float> c(37, 53, false, g);
  linen::set_isa(Isa::sse2);
  const std::vector<float> base = c.fused(nullptr);
  int others = 0;
  for (Isa l : linen::supported_isas()) {
    if (l == Isa::sse2) continue;
    linen::set_isa(l);
    EXPECT_NE(c.fused(nullptr), base) << linen::isa_name(l) << " gives sse2's bits";
    ++others;
  }
  if (others == 0) GTEST_SKIP() << "this CPU has sse2 only";
}

// The sse2 level runs the kernel a baseline translation unit compiles from the headers,
// to the bit (this file, in the test preset): the table holds what the headers define.
TEST(Dispatch, Sse2LevelIsTheHeaderKernel) {
#if defined(__SSE2__) && !defined(__SSE3__) && !defined(__AVX__)
  const RestoreLevel restore;
  linen::set_isa(Isa::sse2);
  std::mt19937 g(9);
  for (const auto& [lq, lk] : {std::pair<Index, Index>{37, 53}, {1, 300}}) {
    const Case<float> c(lq, lk, false, g);
    std::vector<float> direct(static_cast<std::size_t>(2 * lq * 3 * 8));
    linen::detail::attention_fused<float, linen::detail::simd::packet_t<float>>(
        c.d, c.q.data(), c.k.data(), c.v.data(), c.options(), direct.data(), "test");
    EXPECT_EQ(c.fused(nullptr), direct) << "Lq " << lq;
  }
#else
  GTEST_SKIP() << "this test file is not compiled for x86-64's baseline";
#endif
}


// The projections' GEMM (gemm::multiply, the Gemm<T> entries) at every level against a
// long-double restatement, with and without a pool; and each level runs its own (FMA
// from avx2 up rounds otherwise than sse2's multiply-then-add).
template <class T>
std::vector<T> level_gemm(Index M, Index N, Index K, const std::vector<T>& a, const std::vector<T>& b,
                          const std::vector<T>& bias, Eigen::ThreadPoolInterface* pool) {
  std::vector<T> c(static_cast<std::size_t>(M * N), T(-7));
  linen::detail::gemm::multiply<T>(M, N, K, a.data(), K, b.data(), N, bias.data(), c.data(), N, pool);
  return c;
}

template <class T>
void check_gemm_level(Isa l, Eigen::ThreadPoolInterface* pool) {
  std::mt19937 g(17);
  std::normal_distribution<double> nd;
  for (const auto& [M, N, K] : {std::tuple<Index, Index, Index>{37, 45, 61}, {130, 96, 513}, {1, 7, 3}}) {
    std::vector<T> a(static_cast<std::size_t>(M * K)), b(static_cast<std::size_t>(K * N)), bias(static_cast<std::size_t>(N));
    for (auto& x : a) x = static_cast<T>(nd(g));
    for (auto& x : b) x = static_cast<T>(nd(g));
    for (auto& x : bias) x = static_cast<T>(nd(g));
    const std::vector<T> got = level_gemm<T>(M, N, K, a, b, bias, nullptr);
    EXPECT_EQ(level_gemm<T>(M, N, K, a, b, bias, pool), got) << linen::isa_name(l) << " with a pool";
    for (Index i = 0; i < M; ++i)
      for (Index j = 0; j < N; ++j) {
        long double want = bias[static_cast<std::size_t>(j)], mag = std::fabs(static_cast<long double>(bias[j]));
        for (Index k = 0; k < K; ++k) {
          const long double p = static_cast<long double>(a[static_cast<std::size_t>(i * K + k)]) *
                                static_cast<long double>(b[static_cast<std::size_t>(k * N + j)]);
          want += p;
          mag += std::fabs(p);
        }
        const long double tol = static_cast<long double>(K + 1) * std::numeric_limits<T>::epsilon() * mag;
        ASSERT_LE(std::fabs(static_cast<long double>(got[static_cast<std::size_t>(i * N + j)]) - want), tol)
            << linen::isa_name(l) << " (" << M << ", " << N << ", " << K << ") at " << i << ", " << j;
      }
  }
}

TEST(Dispatch, EveryLevelsGemmMatchesTheReference) {
  const RestoreLevel restore;
  Eigen::ThreadPool pool(2);
  for (Isa l : linen::supported_isas()) {
    linen::set_isa(l);
    check_gemm_level<float>(l, &pool);
    check_gemm_level<double>(l, &pool);
  }
}

TEST(Dispatch, LevelsRunTheirOwnGemm) {
  const RestoreLevel restore;
  std::mt19937 g(5);
  std::normal_distribution<float> nd;
  const Index M = 33, N = 40, K = 300;
  std::vector<float> a(static_cast<std::size_t>(M * K)), b(static_cast<std::size_t>(K * N)), bias(static_cast<std::size_t>(N));
  for (auto* v : {&a, &b, &bias})
    for (auto& x : *v) x = nd(g);
  linen::set_isa(Isa::sse2);
  const std::vector<float> base = level_gemm<float>(M, N, K, a, b, bias, nullptr);
  int others = 0;
  for (Isa l : linen::supported_isas()) {
    if (l == Isa::sse2) continue;
    linen::set_isa(l);
    EXPECT_NE(level_gemm<float>(M, N, K, a, b, bias, nullptr), base) << linen::isa_name(l) << " gives sse2's bits";
    ++others;
  }
  if (others == 0) GTEST_SKIP() << "this CPU has sse2 only";
}

}  // namespace
