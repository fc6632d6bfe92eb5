// SPDX-License-Identifier: Apache-2.0
//
// jax.nn.dot_product_attention in C++ (jax/_src/nn/functions.py: dot_product_attention,
// _dot_product_attention_xla, _dot_product_attention_core, _apply_masks), its XLA path's
// numerics, fused (detail::JaxNnLogits on the same kernels as linen's Flax path):
//   linen::jax_nn::dot_product_attention(query, key, value, options)
//   linen::jax_nn::dot_product_attention_with_residual(query, key, value, options)
//     (return_residual=True: the output and the logsumexp)
// Layouts as jax.nn's (B batch, T query length, S key length, N query heads, K kv heads,
// H head depth):
//   query [B, T, N, H] or [T, N, H]; key, value [B, S, K, H] or [S, K, H] (_ensure_4d
//   prepends ones), N a multiple of K (grouped-query attention: query head n reads kv head
//   n / (N / K), K and V are never repeated); returns query's shape; the residual is
//   [B, T, N] or [T, N].
// The numerics, as the source states them:
//   - logits = einsum(query, key) in promote_types(T, float32) (float for float, half and
//     bfloat16, whose products are exact and accumulated in float, as
//     DotAlgorithmPreset.BF16_BF16_F32 / F16_F16_F32; double for double);
//   - logits *= jnp.array(scale, logits.dtype), after the product (scale default
//     1 / np.sqrt(H));
//   - (logits + bias).astype(logits.dtype);
//   - masked logits (mask false, is_causal, local_window_size, sequence lengths) become
//     -0.7 * min(finfo(logits.dtype).max, finfo(float32).max): finite, so a fully masked
//     row is uniform over all S keys (padded ones too);
//   - the softmax in float32 for every dtype (double inputs: the logits are rounded to
//     float first), the weights cast to key.dtype, then einsum with value;
//   - query rows past query_seq_lengths[b] are multiplied by 0 (their logsumexp is not).
// The fused kernel keeps the softmax's weights in the accumulation type between the
// online softmax's tiles (half types: rounded to T only where bfloat16 pair products
// multiply them), so results equal the source's within that rounding; for double the
// softmax runs in double on the float-rounded logits (closer to the exact softmax than
// float32's arithmetic). Threads: options.thread_pool (linen never starts threads).
//
// Errors: every ValueError of the source is a linen::invalid_argument naming the shape or
// value at fault; where the source silently accepts a bad value, linen rejects it:
//   - query_seq_lengths[b] outside [0, T] and key_value_seq_lengths[b] outside [0, S]
//     (JAX masks everything, or nothing, without a word);
//   - local_window_size entries outside int32 (JAX raises OverflowError converting them).
//     Negative entries are the source's formula (key j visible to query i iff
//     i - left <= j <= i + right: (-1, 1) is the key i + 1 alone) and are accepted; the
//     band is computed exactly (JAX's int32 sums would wrap past 2^31);
//   - bias and mask must broadcast to [B, N, T, S] with a head dim of 1 or N (the source
//     asserts the head dim and leaves the rest to broadcasting);
//   - implementation: none or "xla"; "cudnn" (GPU only) and anything else are rejected.
// A failed call changes nothing. Differences, by design: bias is in T (JAX takes any
// dtype and promotes it); query, key and value must be rank 3 or 4 (JAX's _ensure_4d also
// takes rank 1 and 2); padded query rows are +0 (the source's 0 * row is -0.0 where the
// row's average is negative; NaN where a value of its kv head is inf or NaN: linen too).
#ifndef LINEN_JAX_NN_HPP
#define LINEN_JAX_NN_HPP

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "detail/attention/policy.hpp"
#include "detail/attention/problem.hpp"
#include "detail/fused_attention.hpp"
#include "errors.hpp"
#include "tensor.hpp"

namespace linen {
namespace jax_nn {

// local_window_size: an int (a symmetric window) or (left, right).
struct WindowSize {
  Index left = 0, right = 0;
  WindowSize(Index size) : left(size), right(size) {}  // NOLINT: implicit, as jax.nn's int
  WindowSize(Index l, Index r) : left(l), right(r) {}
  WindowSize(std::pair<Index, Index> lr) : left(lr.first), right(lr.second) {}  // NOLINT
};

// The keyword arguments of jax.nn.dot_product_attention, with its defaults (None = empty).
// Views (ArrayRef) must outlive the call.
template <class T>
struct Options {
  // Added to the logits; broadcastable to [B, N, T, S] (fewer dims: ones prepended).
  ArrayRef<T> bias{};
  // true = takes part in attention; broadcastable to [B, N, T, S].
  ArrayRef<bool> mask{};
  // The logits' scale, applied after the product; none: 1 / sqrt(H).
  std::optional<double> scale{};
  // Key j visible to query i only if j <= i (jnp.tril(ones(T, S)): top-left, also for
  // T != S).
  bool is_causal = false;
  // int32 [B]: query rows i >= query_seq_lengths[b] are masked and their output is zeros.
  ArrayRef<std::int32_t> query_seq_lengths{};
  // int32 [B]: keys j >= key_value_seq_lengths[b] are masked.
  ArrayRef<std::int32_t> key_value_seq_lengths{};
  // Key j visible to query i only if i - left <= j <= i + right (not causal by itself).
  std::optional<WindowSize> local_window_size{};
  // none or "xla" (the only CPU implementation); "cudnn" is rejected.
  std::optional<std::string> implementation{};
  // Threads for the kernel (thread_pool->NumThreads(), the calling thread one of them).
  Eigen::ThreadPoolInterface* thread_pool = nullptr;
};

// dot_product_attention_with_residual's result: the output (query's shape) and the
// logsumexp of each row's logits in key.dtype, [B, T, N] (or [T, N]).
template <class T, int N>
struct AttentionResult {
  Tensor<T, N> output;
  Tensor<T, N - 1> residual;
};

}  // namespace jax_nn

namespace detail {

// The validated dims of one jax.nn call (after _ensure_4d).
struct JaxNnDims {
  Index B = 1, T = 0, S = 0, N = 0, K = 0, H = 0;
};

inline Shape ensure_4d(const Shape& s) {
  Shape r = s;
  if (r.size() < 4) r.insert(r.begin(), 4 - r.size(), Index{1});
  return r;
}

// The source's checks (_check_shape_and_dtype, the head multiple), its messages.
inline JaxNnDims jax_nn_check(const Shape& q_in, const Shape& k_in, const Shape& v_in) {
  const std::string f = "jax_nn::dot_product_attention: ";
  const Shape q = ensure_4d(q_in), k = ensure_4d(k_in), v = ensure_4d(v_in);
  JaxNnDims d;
  d.B = k[0];
  d.S = k[1];
  d.K = k[2];
  d.H = k[3];
  if (v != k)
    throw linen::invalid_argument(f + "value shape should be " + to_string(k) + " (key's): but got " +
                                  to_string(v_in));
  if (q[0] != d.B || q[3] != d.H)
    throw linen::invalid_argument(f + "query shape should be [" + std::to_string(d.B) + ", -1, -1, " +
                                  std::to_string(d.H) + "] (key " + to_string(k_in) + "): but got " + to_string(q_in));
  d.T = q[1];
  d.N = q[2];
  if (d.K == 0 || d.N % d.K != 0)
    throw linen::invalid_argument(f + "the number of query heads must be a multiple of key/value heads, but got " +
                                  std::to_string(d.N) + " vs " + std::to_string(d.K) + " (query " + to_string(q_in) +
                                  ", key " + to_string(k_in) + ")");
  return d;
}

template <class X>
void jax_nn_check_4d(const ArrayRef<X>& t, const char* name) {
  if (t && t.rank() > 4)
    throw linen::invalid_argument(std::string("jax_nn::dot_product_attention: ") + name +
                                  " ndim should be 4, but got " + std::to_string(t.rank()) + " (shape " +
                                  to_string(t.shape()) + ")");
}

// bias or mask: after _ensure_4d, the head dim must be 1 or N (_reshape_to_grouped's
// assert), and the whole broadcast to [B, N, T, S].
template <class X>
Broadcast<X> jax_nn_broadcast(const ArrayRef<X>& t, const AttentionDims& dims, const char* name) {
  jax_nn_check_4d(t, name);
  const std::string what = std::string("jax_nn::dot_product_attention: ") + name;
  if (t) {
    const Shape s = ensure_4d(t.shape());
    if (s[1] != 1 && s[1] != dims.H)
      throw linen::invalid_argument(what + " of shape " + to_string(t.shape()) + ": its head dim must be 1 or " +
                                    std::to_string(dims.H) + " (num_heads)");
  }
  return Broadcast<X>(t, dims, what.c_str());
}

// A sequence-lengths array: int32 [B], each in [0, limit] (linen's rule; JAX takes any).
inline void jax_nn_check_lengths(const ArrayRef<std::int32_t>& t, Index B, Index limit, const char* name,
                                 const char* axis) {
  if (!t) return;
  const std::string f = std::string("jax_nn::dot_product_attention: ") + name;
  if (t.rank() != 1) throw linen::invalid_argument(f + " ndim should be 1, but got " + std::to_string(t.rank()));
  if (t.shape()[0] != B)
    throw linen::invalid_argument(f + " shape should be [" + std::to_string(B) + "]: but got " + to_string(t.shape()));
  for (Index b = 0; b < B; ++b) {
    const std::int32_t x = t.data()[b];
    if (x < 0 || x > limit)
      throw linen::invalid_argument(f + "[" + std::to_string(b) + "] = " + std::to_string(x) + " is outside [0, " +
                                    std::to_string(limit) + "] (the " + axis + " length)");
  }
}

// The source's checks of one call, made before anything runs (so a failed call writes
// nothing): shapes, implementation, mask, bias, lengths, window.
template <class T>
JaxNnDims jax_nn_validate(const Shape& q_shape, const Shape& k_shape, const Shape& v_shape,
                          const jax_nn::Options<T>& o) {
  const std::string f = "jax_nn::dot_product_attention: ";
  const JaxNnDims d = jax_nn_check(q_shape, k_shape, v_shape);
  if (o.implementation && *o.implementation != "xla") {
    if (*o.implementation == "cudnn")
      throw linen::invalid_argument(f + "implementation='cudnn' is cuDNN flash attention, GPU only: on a CPU use "
                                        "'xla' or none");
    throw linen::invalid_argument(f + "Unsupported implementation option: '" + *o.implementation + "'");
  }
  return d;
}

inline AttentionDims jax_nn_attention_dims(const JaxNnDims& d) {
  AttentionDims dims;
  dims.batch = {d.B};
  dims.B = d.B;
  dims.Lq = d.T;
  dims.Lk = d.S;
  dims.H = d.N;
  dims.D = d.H;
  dims.Dv = d.H;
  return dims;
}

// One jax.nn call as the kernels read it: the validated dims, the broadcast mask and bias
// (which own the offsets the problem's views point into: not copyable) and the problem
// (jax.nn's layout and index rules, JaxNnLogits' scale), its out pointer `out`. The forward
// and the vjp's backward read this one problem.
template <class T>
struct JaxNnProblem {
  JaxNnDims d;
  AttentionDims dims;
  Broadcast<bool> mask;
  Broadcast<T> bias;
  AttentionProblem<T> a;

  JaxNnProblem(const Shape& q_shape, const Shape& k_shape, const Shape& v_shape, const T* query, const T* key,
               const T* value, const jax_nn::Options<T>& o, T* out, const AttentionTuning& tuning = {})
      : d(jax_nn_validate(q_shape, k_shape, v_shape, o)),
        dims(jax_nn_attention_dims(d)),
        mask(jax_nn_broadcast(o.mask, dims, "mask")),
        bias(jax_nn_broadcast(o.bias, dims, "bias")) {
    using C = accum_t<T>;
    const std::string f = "jax_nn::dot_product_attention: ";
    jax_nn_check_lengths(o.query_seq_lengths, d.B, d.T, "query_seq_lengths", "query");
    jax_nn_check_lengths(o.key_value_seq_lengths, d.B, d.S, "key_value_seq_lengths", "key");
    if (o.local_window_size) {
      const Index lim = std::numeric_limits<std::int32_t>::max();
      for (const Index w : {o.local_window_size->left, o.local_window_size->right})
        if (w > lim || w < -lim - 1)
          throw linen::invalid_argument(f + "local_window_size entry " + std::to_string(w) + " is outside int32");
    }
    a.B = d.B;
    a.H = d.N;
    a.Lq = d.T;
    a.Lk = d.S;
    a.D = d.H;
    a.Dv = d.H;
    static const T none{};
    a.query = query ? query : &none;
    a.q_sb = d.T * d.N * d.H;
    a.q_sl = d.N * d.H;
    a.q_sh = d.H;
    a.key = key ? key : &none;
    a.value = value ? value : &none;
    a.k_sb = a.v_sb = d.S * d.K * d.H;
    a.k_sl = a.v_sl = d.K * d.H;
    a.k_sh = a.v_sh = d.H;
    a.out = out;
    a.o_sb = a.q_sb;
    a.o_sl = a.q_sl;
    a.o_sh = a.q_sh;
    a.logit_scale = o.scale ? static_cast<C>(*o.scale) : jax_nn_default_scale<T>(d.H);
    a.bias = bias.view();
    a.mask = mask.view();
    a.causal = o.is_causal;  // tril(ones(T, S)): causal_offset 0
    a.kv_group = d.N / d.K;
    if (o.local_window_size) {
      a.windowed = true;
      a.window_left = o.local_window_size->left;
      a.window_right = o.local_window_size->right;
    }
    a.q_len = o.query_seq_lengths ? o.query_seq_lengths.data() : nullptr;
    a.kv_len = o.key_value_seq_lengths ? o.key_value_seq_lengths.data() : nullptr;
    a.pool = o.thread_pool;
    a.tuning = tuning;
  }
  JaxNnProblem(const JaxNnProblem&) = delete;
  JaxNnProblem& operator=(const JaxNnProblem&) = delete;
};

// The call's work, the public functions' one body: validates everything first (so a failed
// call writes nothing), then runs detail::attend<JaxNnLogits<T>> into out ([B, T, N, H]
// row-major) and, when `residual` is set, writes the logsumexp [B, T, N] in T.
// P and `tuning` reach the kernel (tests and benchmarks).
template <class T, class P = dispatch::TargetPacket>
void jax_nn_attention(const Shape& q_shape, const Shape& k_shape, const Shape& v_shape, const T* query,
                      const T* key, const T* value, const jax_nn::Options<T>& o, T* out, T* residual,
                      const AttentionTuning& tuning = {}) {
  static_assert(is_element_type_v<T>, "linen: element type must be float, double, Eigen::half or Eigen::bfloat16");
  using C = accum_t<T>;
  JaxNnProblem<T> p(q_shape, k_shape, v_shape, query, key, value, o, out, tuning);
  const JaxNnDims& d = p.d;
  AttentionProblem<T>& a = p.a;
  const Index rows = d.B * d.N * d.T;
  std::vector<C> stats(residual ? static_cast<std::size_t>(2 * rows) : 0);
  if (residual) {
    a.row_max = stats.data();
    a.row_sum = stats.data() + rows;
  }
  attend<JaxNnLogits<T>, P>(a);
  if (!residual) return;
  // logsumexp(padded_logits) = max + log(sum exp(x - max)) in float32, cast to key.dtype;
  // transposed [B, N, T] -> [B, T, N]. (The source's max of a row with +inf is replaced
  // by 0, so that its logsumexp is +inf.)
  for (Index b = 0; b < d.B; ++b)
    for (Index n = 0; n < d.N; ++n)
      for (Index t = 0; t < d.T; ++t) {
        const Index i = (b * d.N + n) * d.T + t;
        const C m = a.row_max[i];
        const C lse = m == std::numeric_limits<C>::infinity() ? m : m + std::log(a.row_sum[i]);
        residual[(b * d.T + t) * d.N + n] = static_cast<T>(static_cast<float>(lse));
      }
}

template <class X>
constexpr bool jax_nn_rank_ok() {
  if constexpr (is_tensor_v<X>) return tensor_traits<X>::rank == 3 || tensor_traits<X>::rank == 4;
  else return false;
}

template <class Q, class K, class V>
void jax_nn_require() {
  static_assert(is_tensor_v<Q> && is_tensor_v<K> && is_tensor_v<V>,
                "linen: arguments must be linen::Tensor<T, N> (row-major) or a TensorMap of one");
  if constexpr (is_tensor_v<Q> && is_tensor_v<K> && is_tensor_v<V>) {
    using T = typename tensor_traits<Q>::scalar;
    static_assert(std::is_same_v<T, typename tensor_traits<K>::scalar> &&
                      std::is_same_v<T, typename tensor_traits<V>::scalar>,
                  "linen: jax_nn: query, key and value must have the same element type (key's dtype)");
    static_assert(jax_nn_rank_ok<Q>() && jax_nn_rank_ok<K>() && jax_nn_rank_ok<V>(),
                  "linen: jax_nn: query must be [B, T, N, H] or [T, N, H], key and value [B, S, K, H] or [S, K, H]");
  }
}

}  // namespace detail

namespace jax_nn {

// jax.nn.dot_product_attention(query, key, value, bias, mask, scale=..., is_causal=...,
// query_seq_lengths=..., key_value_seq_lengths=..., local_window_size=...,
// implementation=...) (see the header comment).
//   query: [B, T, N, H] or [T, N, H]; key, value: [B, S, K, H] or [S, K, H], N % K == 0
//   returns query's shape [B, T, N, H] (or [T, N, H]).
// Throws linen::invalid_argument naming the shape or value at fault.
template <class Q, class K, class V>
Tensor<typename detail::signature_traits<Q>::scalar, detail::signature_traits<Q>::rank> dot_product_attention(
    const Q& query, const K& key, const V& value,
    const Options<typename detail::signature_traits<Q>::scalar>& options = {}) {
  detail::jax_nn_require<Q, K, V>();
  using T = typename detail::tensor_traits<Q>::scalar;
  constexpr int N = detail::tensor_traits<Q>::rank;
  Tensor<T, N> out(query.dimensions());
  detail::jax_nn_attention<T>(shape_of(query), shape_of(key), shape_of(value), query.data(), key.data(),
                              value.data(), options, out.data(), nullptr);
  return out;
}

// The same with return_residual=True: {output, residual}, the residual the logsumexp of
// each row's (masked) logits in key.dtype, [B, T, N] (or [T, N]); padded query rows keep
// theirs (a fully masked row's: the mask value plus log(S)).
template <class Q, class K, class V>
AttentionResult<typename detail::signature_traits<Q>::scalar, detail::signature_traits<Q>::rank>
dot_product_attention_with_residual(const Q& query, const K& key, const V& value,
                                    const Options<typename detail::signature_traits<Q>::scalar>& options = {}) {
  detail::jax_nn_require<Q, K, V>();
  using T = typename detail::tensor_traits<Q>::scalar;
  constexpr int N = detail::tensor_traits<Q>::rank;
  AttentionResult<T, N> r;
  r.output = Tensor<T, N>(query.dimensions());
  std::array<Index, N - 1> rd;
  for (int i = 0; i < N - 1; ++i) rd[static_cast<std::size_t>(i)] = query.dimension(i);
  r.residual = Tensor<T, N - 1>(rd);
  detail::jax_nn_attention<T>(shape_of(query), shape_of(key), shape_of(value), query.data(), key.data(),
                              value.data(), options, r.output.data(), r.residual.data());
  return r;
}

}  // namespace jax_nn
}  // namespace linen

#endif  // LINEN_JAX_NN_HPP
