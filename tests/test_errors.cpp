// SPDX-License-Identifier: Apache-2.0
// linen::error: one base for every exception linen throws, beside the standard base each
// keeps; one message prefix; the caller's own exceptions pass through untouched.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include <linen/dot_product_attention.hpp>
#include <linen/errors.hpp>
#include <linen/io/safetensors.hpp>
#include <linen/random.hpp>
#include <linen/tensor.hpp>

namespace {

static_assert(std::is_base_of_v<linen::error, linen::invalid_argument>);
static_assert(std::is_base_of_v<std::invalid_argument, linen::invalid_argument>);
static_assert(std::is_base_of_v<linen::error, linen::overflow_error>);
static_assert(std::is_base_of_v<std::overflow_error, linen::overflow_error>);
static_assert(std::is_base_of_v<linen::error, linen::io_error>);
static_assert(std::is_base_of_v<std::runtime_error, linen::io_error>);
static_assert(std::is_base_of_v<linen::error, linen::cache_overflow>);
static_assert(std::is_base_of_v<std::out_of_range, linen::cache_overflow>);
// linen::error is a mixin, not a second std::exception (which would make
// `catch (const std::exception&)` ambiguous and so never match).
static_assert(!std::is_base_of_v<std::exception, linen::error>);

// What `f` threw, caught the three ways a caller may catch it.
struct Caught {
  bool as_linen = false, as_std = false;
  std::string what;
};

template <class F>
Caught catch_linen(F&& f) {
  Caught c;
  try {
    f();
  } catch (const linen::error& e) {
    c.as_linen = true;
    c.what = e.what();
  } catch (...) {
  }
  try {
    f();
  } catch (const std::exception& e) {
    c.as_std = true;
    EXPECT_EQ(c.what, e.what()) << "what() differs through the two bases";
  } catch (...) {
  }
  return c;
}

TEST(Errors, EveryTypeIsCaughtAsLinenErrorAndAsStdException) {
  const Caught a = catch_linen([] { throw linen::invalid_argument("bad"); });
  const Caught b = catch_linen([] { throw linen::overflow_error("big"); });
  const Caught c = catch_linen([] { throw linen::io_error("file.bin: broken"); });
  const Caught d = catch_linen([] { throw linen::cache_overflow("full"); });
  for (const Caught* x : {&a, &b, &c, &d}) {
    EXPECT_TRUE(x->as_linen);
    EXPECT_TRUE(x->as_std);
  }
  EXPECT_EQ(a.what, "linen: bad");
  EXPECT_EQ(b.what, "linen: big");
  EXPECT_EQ(c.what, "linen::io: file.bin: broken");
  EXPECT_EQ(d.what, "linen: full");
}

TEST(Errors, OnePrefixNeverDoubled) {
  EXPECT_STREQ(linen::invalid_argument("linen::random::uniform: x").what(), "linen::random::uniform: x");
  EXPECT_STREQ(linen::invalid_argument("linen: x").what(), "linen: x");
  EXPECT_STREQ(linen::io_error("linen::io: x").what(), "linen::io: x");
  EXPECT_STREQ(linen::io_error("x").what(), "linen::io: x");
}

TEST(Errors, LibraryThrowsAreLinenErrors) {
  // tensor.hpp: overflow and rank errors.
  const Caught overflow = catch_linen([] { (void)linen::num_elements({Eigen::Index{1} << 40, Eigen::Index{1} << 40}); });
  EXPECT_TRUE(overflow.as_linen);
  EXPECT_NE(overflow.what.find("(1099511627776, 1099511627776)"), std::string::npos) << overflow.what;
  const Caught rank = catch_linen([] { (void)linen::to_dims<2>({1, 2, 3}); });
  EXPECT_TRUE(rank.as_linen);
  EXPECT_EQ(rank.what.rfind("linen", 0), 0u) << rank.what;

  // random.hpp: a bad probability.
  const Caught p = catch_linen([] { bool out[2]; linen::random::bernoulli(linen::random::key(0), 1.5, {2}, out); });
  EXPECT_TRUE(p.as_linen);
  EXPECT_EQ(p.what.rfind("linen", 0), 0u) << p.what;

  // io: a missing file.
  const Caught io = catch_linen([] { (void)linen::io::load_safetensors("/nonexistent/linen/model.safetensors"); });
  EXPECT_TRUE(io.as_linen);
  EXPECT_EQ(io.what.rfind("linen::io: ", 0), 0u) << io.what;

  // The attention core: mismatched heads.
  const Caught heads = catch_linen([] {
    linen::Tensor<float, 3> q(2, 3, 4), k(2, 2, 4);
    q.setZero();
    k.setZero();
    (void)linen::dot_product_attention(q, k, k);
  });
  EXPECT_TRUE(heads.as_linen);
  EXPECT_NE(heads.what.find("(2, 3, 4)"), std::string::npos) << heads.what;
}

TEST(Errors, CallersOwnExceptionsPassThroughUnwrapped) {
  // A dropout source of the caller's that throws: linen neither wraps it nor turns it
  // into a linen::error, so "any linen error" is told apart from the caller's.
  struct users_error : std::runtime_error {
    using std::runtime_error::runtime_error;
  };
  linen::Tensor<float, 3> q(2, 1, 4);
  q.setConstant(1.0f);
  linen::AttentionOptions<float> opts;
  opts.dropout_rate = 0.5;
  opts.deterministic = false;
  opts.dropout_rng = linen::DropoutRng([](double, const linen::Shape&, bool*) { throw users_error("mine"); });
  bool caught_users = false, caught_linen = false;
  try {
    (void)linen::dot_product_attention(q, q, q, opts);
  } catch (const linen::error&) {
    caught_linen = true;
  } catch (const users_error& e) {
    caught_users = std::string(e.what()) == "mine";
  }
  EXPECT_FALSE(caught_linen);
  EXPECT_TRUE(caught_users);
}

}  // namespace
