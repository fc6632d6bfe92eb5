// SPDX-License-Identifier: Apache-2.0
//
// jax.vjp of jax.nn.dot_product_attention (jax_nn.hpp), on the fused kernels:
//   auto [out, pullback] = linen::jax_nn::vjp(query, key, value, options);
//   linen::jax_nn::Grads<T, NQ, NK> g = pullback(d_out);  // g.query, g.key, g.value, g.bias
// as `out, vjp_fn = jax.vjp(lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, b,
// mask, ...), query, key, value, bias)` then `vjp_fn(d_out)`.
// The forward is jax_nn::dot_product_attention's own (its checks, its problem, its
// kernel: `out` equals it bit for bit), keeping the softmax's row statistics; the pullback
// is the fused backward (detail/attention/backward.hpp) under the same policy
// (detail::JaxNnLogits) and index rules, differentiating what the forward computed:
//   - grouped-query attention: dq per query head; dk, dv of kv head k summed over the
//     query heads n with n / (N / K) == k (the gradient of jax.nn's reshape to groups);
//   - masked logits (mask, is_causal, local_window_size, key_value_seq_lengths) pass no
//     cotangent (jnp.where): their dbias and their share of dq, dk are 0; a fully masked
//     row is uniform over all S keys, so its cotangent reaches every value (dv += d_out / S)
//     and nothing else;
//   - query rows past query_seq_lengths[b] are multiplied by 0 in the forward: no
//     cotangent reaches them (dq 0, nothing to dk, dv, dbias; JAX's 0 * d_out would be NaN
//     where d_out is inf or NaN there, linen's is 0);
//   - the scale multiplies the product's cotangent (dq = scale * dS K, dk = scale * dS^T q);
//   - dbias has the bias's own shape (summed over the dims it was broadcast along).
// Numerics: the backward runs in promote_types(T, float32) (float for float and the half
// types, double for double) on the weights the forward normalised; JAX's autodiff rounds
// at its casts (the weights' cotangent to bfloat16/half before the float32 softmax
// backward; double inputs: the softmax's backward in float32), linen does not, so results
// agree with JAX's within those roundings.
// Threads: options.thread_pool, forward and backward; the backward's work split follows
// from the problem alone (results are equal for every thread count).
// Lifetimes: the pullback keeps its own copies of query, key and value, of the forward's
// output and statistics (O(length) memory); it refers to the arrays options views (bias,
// mask, the sequence lengths) and to options.thread_pool, which must outlive it unchanged.
// Errors: the forward's (jax_nn.hpp) at vjp; the pullback throws linen::invalid_argument
// naming both shapes when the cotangent's shape is not the output's.
#ifndef LINEN_JAX_NN_GRAD_HPP
#define LINEN_JAX_NN_GRAD_HPP

#include <array>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/attention/backward.hpp"
#include "detail/vjp.hpp"
#include "jax_nn.hpp"
#include "tensor.hpp"

namespace linen {
namespace jax_nn {

// The cotangents of query, key, value and bias (each its primal's shape).
template <class T, int NQ, int NK>
struct Grads {
  Tensor<T, NQ> query;  // [B, T, N, H] or [T, N, H]
  Tensor<T, NK> key;    // [B, S, K, H] or [S, K, H]: summed over each kv head's group
  Tensor<T, NK> value;  // [B, S, K, H] or [S, K, H]: summed over each kv head's group
  // The bias's cotangent summed over the dims it was broadcast along: the bias's own shape
  // left-padded with 1s to rank 4 (_ensure_4d: same elements, same order); size 0 when
  // there is no bias.
  Tensor<T, 4> bias;
};

}  // namespace jax_nn

namespace detail {

// What the pullback needs from the forward: the inputs (copied), the one problem (pointing
// at the copies), the softmax's row statistics and the output in the accumulation type.
template <class T, int NQ, int NK>
struct JaxNnTape {
  using C = accum_t<T>;
  Tensor<T, NQ> query;
  Tensor<T, NK> key, value;
  Shape bias_shape;  // ensure_4d(bias's shape); empty without a bias
  std::unique_ptr<JaxNnProblem<T>> problem;
  std::vector<C> row_max, row_sum, out_c;
  Index block_q = 128, block_k = 512;
};

}  // namespace detail

namespace jax_nn {

// vjp's pullback: pullback(d_out) -> Grads (see the top of this file). Copyable (copies
// share the tape); calls may run concurrently.
template <class T, int NQ, int NK>
class Pullback {
 public:
  explicit Pullback(std::shared_ptr<const detail::JaxNnTape<T, NQ, NK>> tape) : tape_(std::move(tape)) {}

  //   d_out: query's shape, the output's cotangent.
  template <class G>
  Grads<T, NQ, NK> operator()(const G& d_out) const {
    using C = accum_t<T>;
    const detail::JaxNnTape<T, NQ, NK>& t = *tape_;
    detail::check_cotangent<G, T, NQ>(d_out, shape_of(t.query), "jax_nn::vjp: pullback");
    const detail::AttentionProblem<T>& a = t.problem->a;
    Grads<T, NQ, NK> g;
    g.query.resize(t.query.dimensions());
    g.key.resize(t.key.dimensions());
    g.value.resize(t.value.dimensions());
    std::vector<C> dbias(a.bias ? static_cast<std::size_t>(a.bias.size) : 0, C(0));
    static const T none{};
    detail::attention_backward_fused<detail::JaxNnLogits<T>>(
        a, t.out_c.data(), t.row_max.data(), t.row_sum.data(), d_out.size() ? d_out.data() : &none, g.query.data(),
        g.key.data(), g.value.data(), a.bias ? dbias.data() : nullptr, t.block_q, t.block_k);
    if (a.bias) {
      g.bias.resize(to_dims<4>(t.bias_shape));
      for (Index e = 0; e < g.bias.size(); ++e) g.bias.data()[e] = static_cast<T>(dbias[static_cast<std::size_t>(e)]);
    }
    return g;
  }

 private:
  std::shared_ptr<const detail::JaxNnTape<T, NQ, NK>> tape_;
};

// jax.vjp(jax.nn.dot_product_attention, query, key, value[, bias]) with `options` the
// keyword arguments (as jax_nn::dot_product_attention's).
//   query: [B, T, N, H] or [T, N, H]; key, value: [B, S, K, H] or [S, K, H], N % K == 0
// Returns {output (query's shape, jax_nn::dot_product_attention's bits), pullback}.
// Throws as jax_nn::dot_product_attention does (nothing runs then).
template <class Q, class K, class V>
Vjp<Tensor<typename detail::signature_traits<Q>::scalar, detail::signature_traits<Q>::rank>,
    Pullback<typename detail::signature_traits<Q>::scalar, detail::signature_traits<Q>::rank,
             detail::signature_traits<K>::rank>>
vjp(const Q& query, const K& key, const V& value,
    const Options<typename detail::signature_traits<Q>::scalar>& options = {}) {
  detail::jax_nn_require<Q, K, V>();
  using T = typename detail::tensor_traits<Q>::scalar;
  using C = accum_t<T>;
  constexpr int NQ = detail::tensor_traits<Q>::rank;
  constexpr int NK = detail::tensor_traits<K>::rank;
  static_assert(detail::tensor_traits<V>::rank == NK, "linen: jax_nn::vjp: key and value must have the same rank");
  // Validate before copying anything (the problem's constructor checks again, on the copies).
  detail::jax_nn_validate(shape_of(query), shape_of(key), shape_of(value), options);
  auto tape = std::make_shared<detail::JaxNnTape<T, NQ, NK>>();
  tape->query = query;
  tape->key = key;
  tape->value = value;
  Tensor<T, NQ> out(query.dimensions());
  tape->problem = std::make_unique<detail::JaxNnProblem<T>>(shape_of(tape->query), shape_of(tape->key),
                                                            shape_of(tape->value), tape->query.data(),
                                                            tape->key.data(), tape->value.data(), options, out.data());
  if (options.bias) tape->bias_shape = detail::ensure_4d(options.bias.shape());
  detail::AttentionProblem<T>& a = tape->problem->a;
  const detail::JaxNnDims& d = tape->problem->d;
  const std::size_t rows = static_cast<std::size_t>(d.B * d.N * d.T);
  tape->row_max.resize(rows);
  tape->row_sum.resize(rows);
  a.row_max = tape->row_max.data();
  a.row_sum = tape->row_sum.data();
  if constexpr (!std::is_same_v<T, C>) {
    tape->out_c.resize(static_cast<std::size_t>(out.size()));
    a.out_acc = tape->out_c.data();
  }
  a.backward_fixed_split = true;
  detail::attend<detail::JaxNnLogits<T>>(a);
  a.out = nullptr;
  a.out_acc = nullptr;
  a.row_max = a.row_sum = nullptr;
  if constexpr (std::is_same_v<T, C>) tape->out_c.assign(out.data(), out.data() + out.size());
  // Key tiles narrower under a window, whose band crosses fewer keys.
  if (a.windowed && a.window_left + a.window_right < 512) tape->block_k = 128;
  return {std::move(out), Pullback<T, NQ, NK>(std::move(tape))};
}

}  // namespace jax_nn
}  // namespace linen

#endif  // LINEN_JAX_NN_GRAD_HPP
