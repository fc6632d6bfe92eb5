// SPDX-License-Identifier: Apache-2.0
// decode_step's kept kernels (DecodeWorkspace keeps the projections' kernels promoted to
// T where the parameters need promotion): a step equals apply's decode step bit for bit
// on the first step, on later steps, after the parameters are replaced by another tensor
// (other values, possibly at the same address), after every value changed in place, and,
// after forget_parameters(), after a single entry changed in place.
#include <cstring>
#include <random>
#include <vector>

#include "test_support.hpp"

namespace {

using linen::Index;
using linen::Tensor;

template <class T, int N>
Tensor<T, N> random_tensor(const std::array<Index, N>& dims, std::mt19937& g) {
  Tensor<T, N> t(dims);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(d(g));
  return t;
}

template <class T, class P>
struct DecodeWeights : ::testing::Test {
  static constexpr Index B = 2, L = 5, E = 16, H = 2;
  std::mt19937 g{11};
  linen::SelfAttention<T, P> attn{[] {
    linen::AttentionConfig<T, P> c;
    c.num_heads = H;
    c.decode = true;
    return c;
  }()};
  Tensor<T, 3> x = random_tensor<T, 3>({B, L, E}, g);

  Tensor<T, 3> step(Index i) const {
    const Eigen::array<Index, 3> off{0, i, 0}, ext{B, 1, E};
    return x.slice(off, ext);
  }
  // One step through apply (cache c1) and decode_step (cache c2, workspace ws): equal bytes.
  void expect_same(const typename linen::SelfAttention<T, P>::Params& params,
                   typename linen::SelfAttention<T, P>::Cache& c1, typename linen::SelfAttention<T, P>::Cache& c2,
                   linen::DecodeWorkspace<T>& ws, Index i, const char* what) {
    const Tensor<T, 3> xi = step(i);
    const Tensor<T, 3> want = attn.apply(params, c1, xi);
    Tensor<T, 3> out(B, 1, E);
    attn.decode_step(params, c2, xi, out, ws);
    EXPECT_EQ(0, std::memcmp(want.data(), out.data(), sizeof(T) * static_cast<std::size_t>(out.size())))
        << what << ", step " << i;
  }
};

template <class Pair>
struct DecodeWeightsTyped : DecodeWeights<typename Pair::first_type, typename Pair::second_type> {};
using Types = ::testing::Types<std::pair<Eigen::bfloat16, float>, std::pair<Eigen::half, float>,
                               std::pair<Eigen::bfloat16, Eigen::bfloat16>, std::pair<float, double>,
                               std::pair<float, float>>;
TYPED_TEST_SUITE(DecodeWeightsTyped, Types);

TYPED_TEST(DecodeWeightsTyped, ChangedParametersAreSeen) {
  using P = typename TypeParam::second_type;
  auto& f = *this;
  auto vars = f.attn.init(linen::random::key(1), f.x);
  auto c1 = f.attn.init_cache(vars.params, {f.B}, f.L), c2 = c1;
  linen::DecodeWorkspace<typename TypeParam::first_type> ws;
  f.expect_same(vars.params, c1, c2, ws, 0, "first step");
  f.expect_same(vars.params, c1, c2, ws, 1, "same parameters");
  // Other parameters in other tensors.
  auto other = f.attn.init(linen::random::key(2), f.x).params;
  f.expect_same(other, c1, c2, ws, 2, "other parameters");
  // Every value of every kernel changed in place (as an optimizer step would).
  for (auto* k : {&other.query.kernel, &other.key.kernel, &other.value.kernel})
    for (Index i = 0; i < k->size(); ++i) k->data()[i] = static_cast<P>(static_cast<float>(k->data()[i]) * 2.0f);
  for (Index i = 0; i < other.out.kernel.size(); ++i) other.out.kernel.data()[i] = static_cast<P>(-static_cast<float>(other.out.kernel.data()[i]));
  f.expect_same(other, c1, c2, ws, 3, "values changed in place");
  // One unsampled entry changed in place: the documented contract is forget_parameters().
  other.value.kernel.data()[1] = static_cast<P>(static_cast<float>(other.value.kernel.data()[1]) + 8.0f);
  ws.forget_parameters();
  f.expect_same(other, c1, c2, ws, 4, "one entry changed, then forget_parameters");
}

// Parameters replaced by another tensor at the same address (the old one freed first):
// new values, same address, same size.
TYPED_TEST(DecodeWeightsTyped, SameAddressOtherValues) {
  auto& f = *this;
  auto vars = f.attn.init(linen::random::key(1), f.x);
  auto c1 = f.attn.init_cache(vars.params, {f.B}, f.L), c2 = c1;
  linen::DecodeWorkspace<typename TypeParam::first_type> ws;
  f.expect_same(vars.params, c1, c2, ws, 0, "first step");
  const auto other = f.attn.init(linen::random::key(5), f.x).params;
  auto* before = vars.params.query.kernel.data();
  vars.params.query.kernel = other.query.kernel;  // same shape: assigned in place
  ASSERT_EQ(before, vars.params.query.kernel.data());
  f.expect_same(vars.params, c1, c2, ws, 1, "same address, other values");
}

}  // namespace
