// SPDX-License-Identifier: Apache-2.0
//
// The program every consumer project (tests/consumer/*/) builds and runs: it
// uses linen the way an application would, through <linen/linen.hpp>, computes
// two small attentions whose results are known in closed form, and exits
// non-zero if either is wrong or if the headers it compiled against are not
// the version the build expected.
//
//   1. query = 0: every logit is 0, so the weights are uniform and each output
//      row is the mean of the value rows over the kv axis.
//   2. a mask [1, 1, q, kv] that lets query i see key sel(i) only: softmax
//      puts all weight on that key, so output row i is value row sel(i).
#include <cmath>
#include <cstdio>
#include <string>

#include <linen/linen.hpp>

#ifndef LINEN_EXPECTED_VERSION
#error "the consumer project must define LINEN_EXPECTED_VERSION, e.g. \"0.1.0\""
#endif
#ifndef LINEN_CONSUMER_KIND
#define LINEN_CONSUMER_KIND "consumer"
#endif

namespace {

constexpr linen::Index kBatch = 1, kQLen = 3, kKvLen = 5, kHeads = 2, kDepth = 4;

int failures = 0;

void expect_near(const char* what, float got, float want, float tol, linen::Index i,
                 linen::Index h, linen::Index d) {
  if (!(std::fabs(got - want) <= tol)) {
    std::fprintf(stderr, "%s: %s: out[0, %ld, %ld, %ld] = %.9g, want %.9g (tolerance %g)\n",
                 LINEN_CONSUMER_KIND, what, static_cast<long>(i), static_cast<long>(h),
                 static_cast<long>(d), static_cast<double>(got), static_cast<double>(want),
                 static_cast<double>(tol));
    ++failures;
  }
}

bool expect_output_shape(const char* what, const linen::Tensor<float, 4>& out) {
  const linen::Shape want{kBatch, kQLen, kHeads, kDepth};
  if (linen::shape_of(out) != want) {
    std::fprintf(stderr, "%s: %s: output shape %s, want %s\n", LINEN_CONSUMER_KIND, what,
                 linen::to_string(linen::shape_of(out)).c_str(), linen::to_string(want).c_str());
    ++failures;
    return false;
  }
  return true;
}

// The key of query row i in the one-hot mask check: distinct rows, not the diagonal.
linen::Index selected_key(linen::Index i) { return (2 * i + 1) % kKvLen; }

}  // namespace

int main() {
  const std::string version = std::to_string(LINEN_VERSION_MAJOR) + "." +
                              std::to_string(LINEN_VERSION_MINOR) + "." +
                              std::to_string(LINEN_VERSION_PATCH);
  if (version != LINEN_EXPECTED_VERSION) {
    std::fprintf(stderr, "%s: compiled against linen %s, the build expected %s\n",
                 LINEN_CONSUMER_KIND, version.c_str(), LINEN_EXPECTED_VERSION);
    return 1;
  }

  // [batch, length, heads, depth]; values from formulas, different per head
  // and depth so that a transposed or misindexed result cannot pass.
  linen::Tensor<float, 4> query(kBatch, kQLen, kHeads, kDepth);
  linen::Tensor<float, 4> key(kBatch, kKvLen, kHeads, kDepth);
  linen::Tensor<float, 4> value(kBatch, kKvLen, kHeads, kDepth);
  for (linen::Index j = 0; j < kKvLen; ++j)
    for (linen::Index h = 0; h < kHeads; ++h)
      for (linen::Index d = 0; d < kDepth; ++d) {
        key(0, j, h, d) = std::cos(0.9f * float(j) - 0.4f * float(d) + float(h));
        value(0, j, h, d) = 10.0f * float(h) + float(j) * float(j) + 0.25f * float(d);
      }

  // 1. Zero query: uniform weights, out = mean over kv of value.
  query.setZero();
  const linen::Tensor<float, 4> uniform = linen::dot_product_attention(query, key, value);
  if (expect_output_shape("zero query", uniform)) {
    for (linen::Index i = 0; i < kQLen; ++i)
      for (linen::Index h = 0; h < kHeads; ++h)
        for (linen::Index d = 0; d < kDepth; ++d) {
          float mean = 0.0f;
          for (linen::Index j = 0; j < kKvLen; ++j) mean += value(0, j, h, d);
          mean /= float(kKvLen);
          expect_near("zero query (uniform weights)", uniform(0, i, h, d), mean,
                      1e-5f * std::fabs(mean) + 1e-6f, i, h, d);
        }
  }

  // 2. One visible key per query row: out row i = value row selected_key(i).
  for (linen::Index i = 0; i < kQLen; ++i)
    for (linen::Index h = 0; h < kHeads; ++h)
      for (linen::Index d = 0; d < kDepth; ++d)
        query(0, i, h, d) = std::sin(0.7f * float(i) + 0.3f * float(d) - float(h));
  linen::Tensor<bool, 4> mask(1, 1, kQLen, kKvLen);  // broadcasts over batch and heads
  for (linen::Index i = 0; i < kQLen; ++i)
    for (linen::Index j = 0; j < kKvLen; ++j) mask(0, 0, i, j) = (j == selected_key(i));
  linen::AttentionOptions<float> options;
  options.mask = mask;
  const linen::Tensor<float, 4> picked = linen::dot_product_attention(query, key, value, options);
  if (expect_output_shape("one-key mask", picked)) {
    for (linen::Index i = 0; i < kQLen; ++i)
      for (linen::Index h = 0; h < kHeads; ++h)
        for (linen::Index d = 0; d < kDepth; ++d) {
          const float want = value(0, selected_key(i), h, d);
          expect_near("one-key mask", picked(0, i, h, d), want, 1e-6f * std::fabs(want) + 1e-7f, i,
                      h, d);
        }
  }

  if (failures != 0) {
    std::fprintf(stderr, "%s: %d wrong output values\n", LINEN_CONSUMER_KIND, failures);
    return 1;
  }
  std::printf("%s: linen %s, dot_product_attention checks passed\n", LINEN_CONSUMER_KIND,
              version.c_str());
  return 0;
}
