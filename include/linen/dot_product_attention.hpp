// SPDX-License-Identifier: Apache-2.0
//
// The functional core, mirroring flax/linen/attention.py:
//   dot_product_attention_weights(query, key, options)
//   dot_product_attention(query, key, value, options)
// with Flax's maths to the letter: the query is scaled by 1/sqrt(depth) before the
// product, the bias is added, masked entries become finfo(dtype).min (so a fully masked
// row averages the values rather than giving NaN), softmax runs over kv (in float32 when
// force_fp32_for_softmax is set for half types), and dropout multiplies by keep/keep_prob.
//
// Two implementations compute dot_product_attention: the reference (materialises the
// [q_length, kv_length] weights of one head at a time, Flax's rounding points to the
// letter; always used by dot_product_attention_weights and when sowing weights) and the
// fused kernel of detail/fused_attention.hpp (tiled online softmax, O(L) memory,
// threads, causal tile skipping), chosen by AttentionOptions::implementation. Both apply
// the one statement of Flax's logit rules, detail::FlaxLogits (detail/attention/policy.hpp).
#ifndef LINEN_DOT_PRODUCT_ATTENTION_HPP
#define LINEN_DOT_PRODUCT_ATTENTION_HPP

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "detail/broadcast.hpp"
#include "detail/fused_attention.hpp"
#include "dropout_rng.hpp"
#include "errors.hpp"
#include "precision.hpp"
#include "tensor.hpp"

namespace linen {

// Which code computes dot_product_attention.
//   Auto:      Fused, unless sow_weights is set (sowing needs the weights: Reference).
//   Reference: the weights of one head at a time, Flax's maths step by step.
//   Fused:     the tiled kernel: never more than a tile of weights, O(L) memory, threads
//              (thread_pool), causal tiles skipped. Equal to Reference within rounding:
//              its weights stay in the accumulation type (float for half types) as with
//              force_fp32_for_softmax. Cannot sow weights.
enum class Implementation { Auto, Reference, Fused };

// The keyword arguments of flax.linen.dot_product_attention, with Flax's defaults.
// `bias` and `mask` are views (ArrayRef) and must outlive the call; default = None.
template <class T>
struct AttentionOptions {
  // Added to the logits; broadcastable to [batch..., num_heads, q_length, kv_length].
  ArrayRef<T> bias{};
  // false = masked out; broadcastable to [batch..., num_heads, q_length, kv_length].
  ArrayRef<bool> mask{};
  // Dropout mask shared across batch and head dims: [1..., q_length, kv_length].
  bool broadcast_dropout = true;
  // Where the keep mask comes from (a linen::random::Key, an engine, or a callable).
  DropoutRng dropout_rng{};
  // In [0, 1); dropout runs when dropout_rate > 0 and !deterministic.
  double dropout_rate = 0.0;
  bool deterministic = false;
  Precision precision = Precision::Default;
  // For half types: softmax (and the weights) in float32, as Flax does.
  bool force_fp32_for_softmax = false;
  // Flax's `module=` sowing: when set, called once with the attention weights
  // [batch..., num_heads, q_length, kv_length] after softmax and before dropout.
  std::function<void(ArrayRef<T> weights)> sow_weights{};
  // linen's additions (not Flax arguments); the defaults change nothing.
  Implementation implementation = Implementation::Auto;
  // A causal mask given as a flag: key j is visible to query i only if j <= i (the pattern
  // of make_causal_mask, extended to q_length != kv_length), applied in addition to `mask`.
  // Equivalent to passing make_causal_mask's mask, but the fused kernel then skips the key
  // tiles above the diagonal instead of computing and masking them.
  bool is_causal = false;
  // Threads for the fused kernel: its work items (batch, head, query tile) run on
  // thread_pool->NumThreads() threads, the calling thread being one of them. null = the
  // calling thread only; linen never starts threads of its own. Must outlive the call.
  // The reference implementation ignores it.
  Eigen::ThreadPoolInterface* thread_pool = nullptr;
};

namespace detail {

inline AttentionDims check_qk(const Shape& q, const Shape& k, const char* fn) {
  const std::string f = fn;
  if (q.size() < 3)
    throw linen::invalid_argument(f + ": query must be [batch..., q_length, num_heads, depth], got shape " +
                                to_string(q));
  if (q.size() != k.size())
    throw linen::invalid_argument(f + ": q, k must have the same rank; query " + to_string(q) +
                                ", key " + to_string(k));
  const std::size_t r = q.size();
  if (!std::equal(q.begin(), q.end() - 3, k.begin()))
    throw linen::invalid_argument(f + ": q, k batch dims must match; query " + to_string(q) +
                                ", key " + to_string(k));
  if (q[r - 2] != k[r - 2])
    throw linen::invalid_argument(f + ": q, k num_heads must match; query " + to_string(q) +
                                ", key " + to_string(k));
  if (q[r - 1] != k[r - 1])
    throw linen::invalid_argument(f + ": q, k depths must match; query " + to_string(q) + ", key " +
                                to_string(k));
  AttentionDims d;
  d.batch.assign(q.begin(), q.end() - 3);
  d.B = num_elements(d.batch);
  d.Lq = q[r - 3];
  d.Lk = k[r - 3];
  d.H = q[r - 2];
  d.D = q[r - 1];
  d.Dv = d.D;
  return d;
}

inline AttentionDims check_qkv(const Shape& q, const Shape& k, const Shape& v, const char* fn) {
  AttentionDims d = check_qk(q, k, fn);
  const std::string f = fn;
  const std::size_t r = q.size();
  if (v.size() != r)
    throw linen::invalid_argument(f + ": q, k, v must have the same rank; query " + to_string(q) +
                                ", value " + to_string(v));
  if (!std::equal(q.begin(), q.end() - 3, v.begin()))
    throw linen::invalid_argument(f + ": q, k, v batch dims must match; query " + to_string(q) +
                                ", value " + to_string(v));
  if (v[r - 2] != q[r - 2])
    throw linen::invalid_argument(f + ": q, k, v num_heads must match; query " + to_string(q) +
                                ", value " + to_string(v));
  if (v[r - 3] != k[r - 3])
    throw linen::invalid_argument(f + ": k, v lengths must match; key " + to_string(k) + ", value " +
                                to_string(v));
  d.Dv = v[r - 1];
  return d;
}

template <class T>
void check_dropout(const AttentionOptions<T>& o, const char* fn) {
  if (!(o.dropout_rate >= 0.0 && o.dropout_rate < 1.0))
    throw linen::invalid_argument(std::string(fn) + ": dropout_rate must be in [0, 1), got " +
                                std::to_string(o.dropout_rate));
}

// Flax's dropout keep mask for the weights [batch..., H, Lq, Lk]: drawn from o.dropout_rng
// with Flax's shape ([1..., Lq, Lk] when broadcast_dropout, else the weights' shape) into
// `keep` (bytes 0/1). Returns false (and leaves `keep` empty) when dropout is off.
template <class T>
bool draw_keep_mask(const AttentionDims& d, const AttentionOptions<T>& o, std::vector<char>& keep,
                    const std::string& f) {
  if (o.deterministic || !(o.dropout_rate > 0.0)) return false;
  if (!o.dropout_rng)
    throw linen::invalid_argument(f + ": dropout_rate=" + std::to_string(o.dropout_rate) +
                                " with deterministic=false needs a dropout_rng");
  const Shape w = d.weights_shape();
  Shape keep_shape;
  if (o.broadcast_dropout) {
    keep_shape.assign(w.size() - 2, 1);  // Flax: [1] * (key.ndim - 2) + [q, kv]
    keep_shape.push_back(d.Lq);
    keep_shape.push_back(d.Lk);
  } else {
    keep_shape = w;
  }
  keep.assign(static_cast<std::size_t>(num_elements(keep_shape)), 0);  // vector<bool> has no data()
  o.dropout_rng(1.0 - o.dropout_rate, keep_shape, reinterpret_cast<bool*>(keep.data()));
  return true;
}

// The heart of the reference path. Computes, for every (batch, head), the attention
// weights (after dropout) into `weights` ([B, H, Lq, Lk], may be null) and, when `value`
// is given, the output [B, Lq, H, Dv] into `out`. All pointers are row-major in Flax's
// layouts; batch dims are flattened into B.
template <class T>
void attention_reference(const AttentionDims& d, const T* query, const T* key, const T* value,
                         const AttentionOptions<T>& o, T* out, T* weights, const char* fn) {
  static_assert(is_element_type_v<T>, "linen: element type must be float, double, Eigen::half or Eigen::bfloat16");
  using C = accum_t<T>;
  using Mat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using StridedT = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                              Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                                Eigen::OuterStride<>>;
  check_dropout(o, fn);
  // An empty tensor may have no storage: offsets into it must not be taken from null.
  static const T none{};
  if (!query) query = &none;
  if (!key) key = &none;
  if (!value && out) value = &none;

  const std::string f = fn;
  const Broadcast<T> bias(o.bias, d, (f + ": bias").c_str());
  const Broadcast<bool> mask(o.mask, d, (f + ": mask").c_str());

  std::vector<char> keep_storage;
  const bool dropout = draw_keep_mask(d, o, keep_storage, f);
  const bool* keep = reinterpret_cast<const bool*>(keep_storage.data());
  // Flax's rules, step by step (the policy every kernel follows).
  const FlaxLogits<T> pol(depth_scale<T>(d.D), flax_keep_scale<T>(o.dropout_rate), o.force_fp32_for_softmax);
  const C lowest = pol.mask_value();
  const Index HD = d.H * d.D, HDv = d.H * d.Dv;

  Mat qs(d.Lq, d.D), kc(d.Lk, d.D), vc, s(d.Lq, d.Lk), o_bh;
  std::vector<T> sow;  // weights before dropout, only when sowing
  if (o.sow_weights) sow.resize(static_cast<std::size_t>(num_elements(d.weights_shape())));

  for (Index b = 0; b < d.B; ++b) {
    for (Index h = 0; h < d.H; ++h) {
      const StridedT qm(query + b * d.Lq * HD + h * d.D, d.Lq, d.D, Eigen::OuterStride<>(HD));
      const StridedT km(key + b * d.Lk * HD + h * d.D, d.Lk, d.D, Eigen::OuterStride<>(HD));
      // query / sqrt(depth), rounded to T as Flax's division in dtype is.
      for (Index i = 0; i < d.Lq; ++i)
        for (Index c = 0; c < d.D; ++c) qs(i, c) = pol.query(qm(i, c));
      kc = km.template cast<C>();
      s.noalias() = qs * kc.transpose();
      for (Index i = 0; i < d.Lq; ++i) {
        C* row = s.data() + i * d.Lk;
        if constexpr (FlaxLogits<T>::changes_logits()) {  // the einsum's result is stored in dtype
          for (Index j = 0; j < d.Lk; ++j) row[j] = pol.logit(row[j]);
        }
        if (bias) {
          const T* br = bias.row(b, h, i);
          for (Index j = 0; j < d.Lk; ++j) row[j] = pol.add_bias(row[j], br[j * bias.sk]);
        }
        if (mask) {
          const bool* mr = mask.row(b, h, i);
          for (Index j = 0; j < d.Lk; ++j)
            if (!mr[j * mask.sk]) row[j] = lowest;
        }
        if (o.is_causal)
          for (Index j = i + 1; j < d.Lk; ++j) row[j] = lowest;
        // softmax over kv: exp(x - max) / sum. A fully masked row has max = lowest,
        // so every entry is exp(0) = 1 and the row averages the values (Flax's behaviour).
        C mx = -std::numeric_limits<C>::infinity();
        for (Index j = 0; j < d.Lk; ++j) mx = std::max(mx, row[j]);
        C sum = 0;
        for (Index j = 0; j < d.Lk; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        for (Index j = 0; j < d.Lk; ++j) row[j] = pol.weight(row[j] / sum);
        if (!sow.empty()) {
          T* dst = sow.data() + ((b * d.H + h) * d.Lq + i) * d.Lk;
          for (Index j = 0; j < d.Lk; ++j) dst[j] = static_cast<T>(row[j]);
        }
        if (dropout) {
          const bool* kr = keep + (o.broadcast_dropout ? i * d.Lk : ((b * d.H + h) * d.Lq + i) * d.Lk);
          for (Index j = 0; j < d.Lk; ++j) row[j] = pol.dropout(row[j], kr[j]);
        }
        if (weights) {
          T* dst = weights + ((b * d.H + h) * d.Lq + i) * d.Lk;
          for (Index j = 0; j < d.Lk; ++j) dst[j] = static_cast<T>(row[j]);
        }
      }
      if (out) {
        const StridedT vm(value + b * d.Lk * HDv + h * d.Dv, d.Lk, d.Dv, Eigen::OuterStride<>(HDv));
        vc = vm.template cast<C>();
        o_bh.noalias() = s * vc;
        StridedOut om(out + b * d.Lq * HDv + h * d.Dv, d.Lq, d.Dv, Eigen::OuterStride<>(HDv));
        om = o_bh.template cast<T>();
      }
    }
  }
  if (o.sow_weights) o.sow_weights(ArrayRef<T>(sow.data(), d.weights_shape()));
}

// The fused path: the same validation and the same keep mask (one DropoutRng call with
// Flax's shape) as the reference, then detail::fused_attention reads Flax's layouts in
// place. The keep mask is the only O(Lq * Lk) buffer, and only under dropout (one byte
// per weight: Lq * Lk bytes with broadcast_dropout, B * H * Lq * Lk without).
// P, MR, NR and `tuning` reach fused_attention's tuning (for tests and benchmarks).
template <class T, class P = dispatch::TargetPacket, int MR = 0, int NR = 0>
void attention_fused(const AttentionDims& d, const T* query, const T* key, const T* value,
                     const AttentionOptions<T>& o, T* out, const char* fn, const AttentionTuning& tuning = {}) {
  static_assert(is_element_type_v<T>, "linen: element type must be float, double, Eigen::half or Eigen::bfloat16");
  check_dropout(o, fn);
  const std::string f = fn;
  if (o.sow_weights)
    throw linen::invalid_argument(f + ": implementation=Fused cannot sow the attention weights; "
                                    "use Implementation::Auto or Implementation::Reference");
  const Broadcast<T> bias(o.bias, d, (f + ": bias").c_str());
  const Broadcast<bool> mask(o.mask, d, (f + ": mask").c_str());
  std::vector<char> keep;
  const bool dropout = draw_keep_mask(d, o, keep, f);

  AttentionProblem<T> a = flax_problem(d, query, key, value, out);
  a.bias = bias.view();
  a.mask = mask.view();
  if (dropout) {
    a.keep = keep_view(reinterpret_cast<const bool*>(keep.data()), d, o.broadcast_dropout);
    a.keep_scale = flax_keep_scale<T>(o.dropout_rate);
  }
  a.causal = o.is_causal;
  a.pool = o.thread_pool;
  a.tuning = tuning;
  fused_attention<T, P, MR, NR>(a);
}

template <class X>
void require_tensor() {
  static_assert(is_tensor_v<X>,
                "linen: arguments must be linen::Tensor<T, N> (row-major) or a TensorMap of one");
}

// The compile-time contract of dot_product_attention's q, k, v (and its vjp's).
template <class Q, class K, class V>
void require_qkv() {
  require_tensor<Q>();
  require_tensor<K>();
  require_tensor<V>();
  if constexpr (is_tensor_v<Q> && is_tensor_v<K> && is_tensor_v<V>) {
    using T = typename tensor_traits<Q>::scalar;
    constexpr int N = tensor_traits<Q>::rank;
    static_assert(std::is_same_v<T, typename tensor_traits<K>::scalar> &&
                      std::is_same_v<T, typename tensor_traits<V>::scalar>,
                  "linen: query, key and value must have the same element type");
    static_assert(N == tensor_traits<K>::rank && N == tensor_traits<V>::rank, "linen: q, k, v must have the same rank");
    static_assert(N >= 3, "linen: query must be [batch..., q_length, num_heads, depth]");
  }
}

}  // namespace detail

// Computes dot-product attention weights given query and key.
//   query: [batch..., q_length, num_heads, qk_depth_per_head]
//   key:   [batch..., kv_length, num_heads, qk_depth_per_head]
//   returns the weights [batch..., num_heads, q_length, kv_length] (after dropout, as Flax).
// Q and K are linen::Tensor<T, N> or maps of one, N >= 3 (any number of batch dims).
// Always the reference implementation (it returns the weights): options.is_causal applies,
// options.implementation and options.thread_pool are ignored.
// Throws std::invalid_argument naming the shapes when ranks, batch dims, heads or depths
// differ, or a mask/bias does not broadcast.
template <class Q, class K>
Tensor<typename detail::signature_traits<Q>::scalar, detail::signature_traits<Q>::rank>
dot_product_attention_weights(
    const Q& query, const K& key,
    const AttentionOptions<typename detail::signature_traits<Q>::scalar>& options = {}) {
  detail::require_tensor<Q>();
  detail::require_tensor<K>();
  using T = typename detail::tensor_traits<Q>::scalar;
  constexpr int N = detail::tensor_traits<Q>::rank;
  static_assert(std::is_same_v<T, typename detail::tensor_traits<K>::scalar>,
                "linen: query and key must have the same element type");
  static_assert(N == detail::tensor_traits<K>::rank, "linen: q, k must have the same rank");
  static_assert(N >= 3, "linen: query must be [batch..., q_length, num_heads, depth]");
  const auto d = detail::check_qk(shape_of(query), shape_of(key), "dot_product_attention_weights");
  Tensor<T, N> w(to_dims<N>(d.weights_shape()));
  detail::attention_reference<T>(d, query.data(), key.data(), nullptr, options, nullptr, w.data(),
                                 "dot_product_attention_weights");
  return w;
}

// Computes dot-product attention given query, key, and value.
//   query: [batch..., q_length, num_heads, qk_depth_per_head]
//   key:   [batch..., kv_length, num_heads, qk_depth_per_head]
//   value: [batch..., kv_length, num_heads, v_depth_per_head]
//   returns [batch..., q_length, num_heads, v_depth_per_head].
// options.implementation picks the fused kernel (default, unless sowing) or the reference;
// options.thread_pool lends the fused kernel threads; options.is_causal adds a causal mask.
// Throws std::invalid_argument naming the shapes when ranks, batch dims, heads, depths or
// lengths differ, or a mask/bias does not broadcast; and when Fused is asked to sow.
template <class Q, class K, class V>
Tensor<typename detail::signature_traits<Q>::scalar, detail::signature_traits<Q>::rank>
dot_product_attention(
    const Q& query, const K& key, const V& value,
    const AttentionOptions<typename detail::signature_traits<Q>::scalar>& options = {}) {
  detail::require_qkv<Q, K, V>();
  using T = typename detail::tensor_traits<Q>::scalar;
  constexpr int N = detail::tensor_traits<Q>::rank;
  const auto d = detail::check_qkv(shape_of(query), shape_of(key), shape_of(value),
                                   "dot_product_attention");
  if (options.implementation != Implementation::Auto && options.implementation != Implementation::Reference &&
      options.implementation != Implementation::Fused)
    throw linen::invalid_argument("dot_product_attention: unknown Implementation " +
                                std::to_string(static_cast<int>(options.implementation)));
  Tensor<T, N> out(to_dims<N>(d.output_shape()));
  const bool fused = options.implementation == Implementation::Fused ||
                     (options.implementation == Implementation::Auto && !options.sow_weights);
  if (fused) {
    detail::attention_fused<T>(d, query.data(), key.data(), value.data(), options, out.data(),
                               "dot_product_attention");
  } else {
    detail::attention_reference<T>(d, query.data(), key.data(), value.data(), options, out.data(),
                                   nullptr, "dot_product_attention");
  }
  return out;
}

}  // namespace linen

#ifdef LINEN_COMPILED  // linen::compiled: its instantiations, declared extern
#include "detail/compiled/dot_product_attention.hpp"
#endif

#endif  // LINEN_DOT_PRODUCT_ATTENTION_HPP
