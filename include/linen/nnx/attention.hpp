// SPDX-License-Identifier: Apache-2.0
//
// flax/nnx/nn/attention.py: dot_product_attention (nnx's, with its choice of numerics) and
// MultiHeadAttention: its fields, parameters, init, call, init_cache and decode steps.
//
//   nnx.MultiHeadAttention(num_heads=8, in_features=64, num_kv_heads=2, normalize_qk=True,
//                          rngs=rngs)
//   MultiHeadAttention<float> mha({.num_heads = 8, .in_features = 64, .num_kv_heads = 2,
//                                  .normalize_qk = true});
//   auto v = mha.init(rngs);        // v.params.query.kernel, ..., v.rngs (the dropout fork)
//
// Defaults as nnx's __init__ resolves them: qkv_features, out_features and in_kv_features
// default to in_features, num_kv_heads to num_heads; head_dim = qkv_features / num_heads.
// nnx checks num_heads % num_kv_heads first, then qkv_features % num_heads (both
// ValueErrors; linen::invalid_argument here, with nnx's words).
//
// The submodules, in construction order (each draws rngs.params() as its own __init__
// does: a LinearGeneral kernel then bias, a LayerNorm its scale only: use_bias=False):
//   query     LinearGeneral(in_features, (num_heads, head_dim))        kernel [in, heads, head_dim]
//   key       LinearGeneral(in_kv_features, (num_kv_heads, head_dim))  kernel [in_kv, kv_heads, head_dim]
//   value     LinearGeneral(in_kv_features, (num_kv_heads, head_dim))
//   query_ln  LayerNorm(head_dim, use_bias=False)   scale [head_dim]   (normalize_qk)
//   key_ln    LayerNorm(head_dim, use_bias=False)   scale [head_dim]   (normalize_qk)
//   out       LinearGeneral((num_heads, head_dim), out_features, axis=(-2, -1))
//                                                   kernel [heads, head_dim, out], bias [out]
//             (kernel_init = out_kernel_init or kernel_init, bias_init = out_bias_init or
//             bias_init)
// then, when keep_rngs and dropout_rate > 0, `rngs.dropout.fork()`: the dropout stream
// (or `default`, by Rngs' fallback) draws once more, after every parameter. The
// initializers see the flattened shapes LinearGeneral gives them: (in, heads * head_dim)
// for q/k/v, (heads * head_dim, out) for out, as flax.linen's DenseGeneral does.
//
// ---- The call ------------------------------------------------------------------------
//   layer(x, mask=m, deterministic=False, rngs=rngs)
//   mha.apply(v, x, {.mask = m, .deterministic = false, .rngs = &rngs})
// apply(params or variables, inputs_q[, inputs_k[, inputs_v]], call) is __call__: the
// projections (LinearGeneral), query_ln / key_ln per head (normalize_qk), attention_fn
// (default nnx::dot_product_attention, below) and the out projection:
//   inputs_q [batch..., q_length, in_features], inputs_k, inputs_v [batch...,
//   kv_length, in_kv_features] (inputs_k defaults to inputs_q, inputs_v to inputs_k)
//   -> [batch..., q_length, out_features].
// Given `variables`, the module's own dropout stream (variables.rngs, the keep_rngs fork)
// draws when the call gives no rngs; given only `params`, there is none (keep_rngs=False).
// The call's rngs (an Rngs: its `dropout` stream, falling back to `default`; or an
// RngStream) take precedence. The stream draws once per call with active dropout
// (dropout_rate > 0 and not deterministic), `dropout_rng = rngs()`, as nnx does; a call
// that throws leaves every stream and the cache as they were.
// `deterministic` is only required (call's, else the config's; linen::invalid_argument
// with nnx's words when neither is set) when dropout_rate > 0, as in nnx.
//
// ---- Which numerics: nnx's path rule ------------------------------------------------
// nnx.dot_product_attention runs jax.nn.dot_product_attention (linen::jax_nn's numerics:
// the logits scaled after the product, the mask value -0.7 * float32 max, the softmax in
// float32) exactly when `dropout_rate == 0.0 and module is None` (module: the module
// when sow_weights, to sow into); otherwise the einsum path (flax.linen's numerics: the
// query divided by sqrt(depth) before the product, finfo(dtype).min, the softmax in
// dtype, dropout). The rule reads the module's dropout_rate, not `deterministic`: a
// model configured with dropout computes the einsum numbers at inference too. The jax
// path ignores precision (nnx passes it only to the einsum). call.path (linen's addition)
// forces either; forcing JaxNn with active dropout or sowing throws.
// Grouped-query attention (num_kv_heads < num_heads): both paths read kv head
// n / (num_heads / num_kv_heads) for query head n, as nnx's grouped einsum
// ('...qhgd,...kh1d->...hgqk') and jax.nn do; the fused kernel reads each kv head for its
// group (no repeated K/V). Dropout (einsum path) draws nnx's mask shape, [1..., q, kv]
// with broadcast_dropout, else [batch..., num_heads, q, kv]. Only sowing with GQA copies
// K/V repeated to num_heads heads (the weights come from the reference implementation,
// whose arithmetic is the grouped einsum's).
//
// ---- Decoding ------------------------------------------------------------------------
//   model.init_cache(x.shape)           auto cache = mha.init_cache(shape_of(x));
//   model(x_t, decode=True)             mha.apply(params, cache, x_t)   (or decode_step)
// init_cache(input_shape [batch..., max_length, features]) makes cached_key and
// cached_value [batch..., max_length, num_kv_heads, head_dim] (zeros; linen's
// AttentionCache keeps the batch dims flattened) and cache_index 0. nnx's init_cache
// defaults to float32 whatever the module's dtype, but its decode step writes the keys
// with lax.dynamic_update_slice, which requires the cache's dtype to be the keys' (a
// TypeError otherwise): the cache is in T, the dtype of every nnx cache that works.
// (The feature dim of input_shape is ignored, as in nnx.)
// A decode step (apply with a cache, decode_step) takes one position, [batch..., 1,
// in_features], writes its key and value at cache_index, attends to positions
// [0, cache_index] with the path rule's numerics and advances the index; decode_chunk
// (beyond nnx) takes n positions, row i seeing [0, cache_index + i]. The cache is
// checked as nnx checks it (the key [batch..., 1, num_kv_heads, head_dim] against the
// cache) and for room: linen::cache_overflow, the cache unchanged (nnx's
// dynamic_update_slice would clamp the index and overwrite the last slot).
// Difference, flax#5591: with is_causal=True nnx's decode step passes is_causal to the
// attention over the whole cache, whose tril(ones(1, max_length)) leaves only key 0
// visible; linen attends with the cache mask alone (what the user meant: every cached
// position up to the index).
// decode_step / decode_chunk into a caller's `out` with a DecodeWorkspace: with the
// default attention_fn, no sow_weights and no active dropout, the step projects, writes
// the cache and runs the row kernel over the cache in place (each of the num_kv_heads
// heads read once for its group of query heads), allocating nothing once the workspace
// has served a step of these shapes (when config.thread_pool is null, and, with
// normalize_qk, ParamT is T); otherwise it runs apply with the cache and copies.
#ifndef LINEN_NNX_ATTENTION_HPP
#define LINEN_NNX_ATTENTION_HPP

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../decode.hpp"
#include "../detail/decode/cache_ops.hpp"
#include "../detail/mask_plan.hpp"
#include "../dot_product_attention.hpp"
#include "../dropout_rng.hpp"
#include "../errors.hpp"
#include "../initializers.hpp"
#include "../jax_nn.hpp"
#include "../layer_norm.hpp"
#include "../precision.hpp"
#include "../tensor.hpp"
#include "linear.hpp"
#include "normalization.hpp"
#include "rnglib.hpp"

namespace linen::nnx {

// Which numerics nnx's dot_product_attention runs. Auto: nnx's rule (JaxNn when
// dropout_rate == 0 and there is no module to sow into, else Einsum); JaxNn, Einsum:
// forced (linen's addition).
enum class AttentionPath { Auto, JaxNn, Einsum };

// The keyword arguments of nnx.dot_product_attention, with its defaults (None: empty).
// Views must outlive the call.
template <class T>
struct AttentionOptions {
  // Added to the logits; broadcastable to [batch..., num_heads, q_length, kv_length].
  ArrayRef<T> bias{};
  // false = masked out; broadcastable to [batch..., num_heads, q_length, kv_length].
  ArrayRef<bool> mask{};
  bool broadcast_dropout = true;
  // The dropout key (nnx's dropout_rng; a linen::random::Key gives JAX's bits).
  DropoutRng dropout_rng{};
  double dropout_rate = 0.0;
  bool deterministic = false;
  Precision precision = Precision::Default;
  // nnx's module= (sowing): called with the attention weights [batch..., num_heads,
  // q_length, kv_length] after the softmax and before dropout. Set: the einsum path.
  std::function<void(ArrayRef<T> weights)> module{};
  // key j visible to query i only if j <= i (tril(ones(T, S)): top-left when T != S).
  bool is_causal = false;
  AttentionPath path = AttentionPath::Auto;  // linen's addition
  // Threads for the fused kernels (the calling thread one of them); null: none.
  Eigen::ThreadPoolInterface* thread_pool = nullptr;
};

// nnx's rule: whether `o` runs jax.nn.dot_product_attention's numerics.
template <class T>
bool uses_jax_nn(const AttentionOptions<T>& o) {
  if (o.path == AttentionPath::JaxNn) return true;
  if (o.path == AttentionPath::Einsum) return false;
  return o.dropout_rate == 0.0 && !o.module;
}

namespace detail {

struct AttentionShapes {
  Shape batch;
  Index B = 1, T = 0, S = 0, N = 0, K = 0, D = 0, Dv = 0;
};

// nnx's checks (_validate_qkv_shapes, the lengths, the depths, the head multiple), its
// words; and linen's: key and value have the same heads.
inline AttentionShapes check_attention_shapes(const Shape& q, const Shape& k, const Shape& v) {
  const std::string f = "nnx::dot_product_attention: ";
  const std::string all = to_string(q) + ", " + to_string(k) + ", " + to_string(v);
  if (q.size() < 3)
    throw linen::invalid_argument(f + "query must be [batch..., q_length, num_heads, depth], got shape " + to_string(q));
  if (k.size() != q.size() || v.size() != q.size())
    throw linen::invalid_argument(f + "q, k, v must have same rank, but got shapes " + all + ".");
  const std::size_t r = q.size();
  if (!std::equal(q.begin(), q.end() - 3, k.begin()) || !std::equal(q.begin(), q.end() - 3, v.begin()))
    throw linen::invalid_argument(f + "q, k, v batch dims must match, but got shapes " + all + ".");
  if (k[r - 3] != v[r - 3])
    throw linen::invalid_argument(f + "k, v lengths must match, but got " + std::to_string(k[r - 3]) + " and " +
                                  std::to_string(v[r - 3]) + " (shapes " + all + ").");
  if (q[r - 1] != k[r - 1])
    throw linen::invalid_argument(f + "q, k depths must match, but got " + std::to_string(q[r - 1]) + " and " +
                                  std::to_string(k[r - 1]) + " (shapes " + all + ").");
  if (k[r - 2] == 0 || q[r - 2] % k[r - 2] != 0)
    throw linen::invalid_argument(f + "Query heads (" + std::to_string(q[r - 2]) + ") must be multiple of Key heads (" +
                                  std::to_string(k[r - 2]) + ") for Grouped Query Attention (shapes " + all + ").");
  if (v[r - 2] != k[r - 2])
    throw linen::invalid_argument(f + "value heads (" + std::to_string(v[r - 2]) + ") must equal key heads (" +
                                  std::to_string(k[r - 2]) + ") (shapes " + all + ")");
  AttentionShapes d;
  d.batch.assign(q.begin(), q.end() - 3);
  d.B = num_elements(d.batch);
  d.T = q[r - 3];
  d.S = k[r - 3];
  d.N = q[r - 2];
  d.K = k[r - 2];
  d.D = q[r - 1];
  d.Dv = v[r - 1];
  return d;
}

// nnx's reshape_4d for inputs of rank > 4: (prod(shape[:-3]), *shape[-3:]).
inline Shape reshape_4d(const Shape& s) {
  if (s.size() <= 3) return s;
  Shape r{num_elements(Shape(s.begin(), s.end() - 3))};
  r.insert(r.end(), s.end() - 3, s.end());
  return r;
}
template <class X>
ArrayRef<X> reshape_4d(const ArrayRef<X>& a) {
  return a ? ArrayRef<X>(a.data(), reshape_4d(a.shape())) : a;
}

// nnx.dot_product_attention's body over raw row-major arrays: out [batch..., T, N, Dv].
// Validates everything before writing (and before drawing the dropout mask).
template <class T>
void attention(const Shape& qs, const Shape& ks, const Shape& vs, const T* q, const T* k, const T* v,
               const AttentionOptions<T>& o, T* out) {
  static_assert(is_element_type_v<T>, "linen: element type must be float, double, Eigen::half or Eigen::bfloat16");
  const char* fn = "nnx::dot_product_attention";
  const std::string f = std::string(fn) + ": ";
  const AttentionShapes d = check_attention_shapes(qs, ks, vs);
  if (o.path != AttentionPath::Auto && o.path != AttentionPath::JaxNn && o.path != AttentionPath::Einsum)
    throw linen::invalid_argument(f + "unknown AttentionPath " + std::to_string(static_cast<int>(o.path)));
  if (uses_jax_nn(o)) {
    if (o.module)
      throw linen::invalid_argument(f + "path=JaxNn cannot sow the attention weights (nnx sows on the einsum path)");
    if (o.dropout_rate > 0.0 && !o.deterministic)
      throw linen::invalid_argument(f + "path=JaxNn has no dropout, but dropout_rate=" + std::to_string(o.dropout_rate) +
                                    " with deterministic=false");
    // jax.nn.dot_product_attention(query, key, value, bias, mask, is_causal=is_causal):
    // nnx flattens the batch dims of rank > 4 inputs (and of bias and mask) into one.
    jax_nn::Options<T> jo;
    const bool flat = qs.size() > 4;
    jo.bias = flat ? reshape_4d(o.bias) : o.bias;
    jo.mask = flat ? reshape_4d(o.mask) : o.mask;
    jo.is_causal = o.is_causal;
    jo.thread_pool = o.thread_pool;
    linen::detail::jax_nn_attention<T>(flat ? reshape_4d(qs) : qs, flat ? reshape_4d(ks) : ks,
                                       flat ? reshape_4d(vs) : vs, q, k, v, jo, out, nullptr);
    return;
  }
  // The einsum path: flax.linen's numerics (linen::dot_product_attention's implementations).
  linen::detail::AttentionDims ad;
  ad.batch = d.batch;
  ad.B = d.B;
  ad.Lq = d.T;
  ad.Lk = d.S;
  ad.H = d.N;
  ad.D = d.D;
  ad.Dv = d.Dv;
  linen::AttentionOptions<T> lo;
  lo.bias = o.bias;
  lo.mask = o.mask;
  lo.broadcast_dropout = o.broadcast_dropout;
  lo.dropout_rng = o.dropout_rng;
  lo.dropout_rate = o.dropout_rate;
  lo.deterministic = o.deterministic;
  lo.precision = o.precision;
  lo.is_causal = o.is_causal;
  lo.thread_pool = o.thread_pool;
  if (o.module) {
    // The sown weights have the batch dims; the reference computes them.
    lo.sow_weights = o.module;
    if (d.K == d.N) {
      linen::detail::attention_reference<T>(ad, q, k, v, lo, out, nullptr, fn);
      return;
    }
    // GQA: K/V repeated to N heads (the grouped einsum's products, one by one).
    const Index g = d.N / d.K;
    std::vector<T> kr(static_cast<std::size_t>(d.B * d.S * d.N * d.D)),
        vr(static_cast<std::size_t>(d.B * d.S * d.N * d.Dv));
    for (Index bj = 0; bj < d.B * d.S; ++bj)
      for (Index h = 0; h < d.N; ++h) {
        std::copy_n(k + (bj * d.K + h / g) * d.D, d.D, kr.data() + (bj * d.N + h) * d.D);
        std::copy_n(v + (bj * d.K + h / g) * d.Dv, d.Dv, vr.data() + (bj * d.N + h) * d.Dv);
      }
    linen::detail::attention_reference<T>(ad, q, kr.data(), vr.data(), lo, out, nullptr, fn);
    return;
  }
  linen::detail::check_dropout(lo, fn);
  const linen::detail::Broadcast<T> bias(o.bias, ad, (f + "bias").c_str());
  const linen::detail::Broadcast<bool> mask(o.mask, ad, (f + "mask").c_str());
  std::vector<char> keep;
  const bool dropout = linen::detail::draw_keep_mask(ad, lo, keep, fn);
  linen::detail::AttentionProblem<T> a = linen::detail::flax_problem(ad, q, k, v, out);
  a.k_sb = d.S * d.K * d.D;  // K/V have K heads: query head h reads kv head h / (N / K)
  a.k_sl = d.K * d.D;
  a.v_sb = d.S * d.K * d.Dv;
  a.v_sl = d.K * d.Dv;
  a.kv_group = d.N / d.K;
  a.bias = bias.view();
  a.mask = mask.view();
  if (dropout) {
    a.keep = linen::detail::keep_view(reinterpret_cast<const bool*>(keep.data()), ad, o.broadcast_dropout);
    a.keep_scale = linen::detail::flax_keep_scale<T>(o.dropout_rate);
  }
  a.causal = o.is_causal;
  a.pool = o.thread_pool;
  linen::detail::fused_attention<T>(a);
}

}  // namespace detail

// nnx.dot_product_attention(query, key, value, bias, mask, broadcast_dropout, dropout_rng,
// dropout_rate, deterministic, precision=..., module=..., is_causal=...):
//   query: [batch..., q_length, num_heads, qk_depth_per_head]
//   key:   [batch..., kv_length, num_kv_heads, qk_depth_per_head], num_heads % num_kv_heads == 0
//   value: [batch..., kv_length, num_kv_heads, v_depth_per_head] (the jax path: key's shape)
//   returns [batch..., q_length, num_heads, v_depth_per_head].
// The path rule and the numerics: see the top of this file. Throws linen::invalid_argument
// naming the shapes or the value at fault.
template <class Q, class K, class V>
Tensor<typename linen::detail::signature_traits<Q>::scalar, linen::detail::signature_traits<Q>::rank>
dot_product_attention(const Q& query, const K& key, const V& value,
                      const AttentionOptions<typename linen::detail::signature_traits<Q>::scalar>& options = {}) {
  linen::detail::require_qkv<Q, K, V>();
  using T = typename linen::detail::tensor_traits<Q>::scalar;
  constexpr int N = linen::detail::tensor_traits<Q>::rank;
  const Shape qs = shape_of(query), ks = shape_of(key), vs = shape_of(value);
  const detail::AttentionShapes d = detail::check_attention_shapes(qs, ks, vs);
  Shape os = d.batch;
  os.insert(os.end(), {d.T, d.N, d.Dv});
  Tensor<T, N> out(to_dims<N>(os));
  detail::attention<T>(qs, ks, vs, query.data(), key.data(), value.data(), options, out.data());
  return out;
}

// The attention function MultiHeadAttention calls (nnx's attention_fn), at rank 4: the
// module flattens the batch dims into one first:
//   query [batch, q_length, num_heads, head_dim], key, value [batch, kv_length,
//   num_kv_heads, head_dim] -> [batch, q_length, num_heads, head_dim];
//   options.mask broadcastable to [batch, num_heads, q_length, kv_length].
template <class T>
using AttentionFn = std::function<Tensor<T, 4>(const Tensor<T, 4>& query, const Tensor<T, 4>& key,
                                               const Tensor<T, 4>& value, const AttentionOptions<T>& options)>;

// nnx::dot_product_attention as a function object (the default attention_fn).
struct DotProductAttention {
  template <class T>
  Tensor<T, 4> operator()(const Tensor<T, 4>& query, const Tensor<T, 4>& key, const Tensor<T, 4>& value,
                          const AttentionOptions<T>& options) const {
    return dot_product_attention(query, key, value, options);
  }
};

// The keyword arguments of MultiHeadAttention.__call__ (decode: the cache overloads).
template <class T>
struct AttentionCallOptions {
  // false = masked out; broadcastable to [batch..., num_heads, q_length, kv_length]
  // (a decode step: kv_length is max_length).
  ArrayRef<bool> mask{};
  std::optional<bool> deterministic{};  // the config's when empty
  // none: the module's own stream (variables.rngs); an Rngs: its `dropout` stream (or
  // `default`); an RngStream. Pointed-to objects must outlive the call.
  std::variant<std::monostate, Rngs*, RngStream*> rngs{};
  // nnx's sow_weights=True: called with the weights [batch..., num_heads, q_length,
  // kv_length] (what nnx sows as 'attention_weights'); forces the einsum path, as nnx's
  // module= does.
  std::function<void(ArrayRef<T> weights)> sow_weights{};
  bool is_causal = false;
  AttentionPath path = AttentionPath::Auto;  // linen's addition: force a path
  // Threads for the attention kernels; null: the calling thread only.
  Eigen::ThreadPoolInterface* thread_pool = nullptr;
};

// The parameters, named as nnx's state names them (query/kernel, ..., query_ln/scale).
template <class ParamT>
struct MultiHeadAttentionParams {
  LinearGeneralParams<ParamT, 1, 2, 0> query;  // kernel [in, heads, head_dim], bias [heads, head_dim]
  LinearGeneralParams<ParamT, 1, 2, 0> key;    // kernel [in_kv, kv_heads, head_dim], bias [kv_heads, head_dim]
  LinearGeneralParams<ParamT, 1, 2, 0> value;  // as key
  LayerNormParams<ParamT> query_ln;            // scale [head_dim] (normalize_qk; else size 0)
  LayerNormParams<ParamT> key_ln;              // scale [head_dim] (normalize_qk; else size 0)
  LinearGeneralParams<ParamT, 2, 1, 0> out;    // kernel [heads, head_dim, out], bias [out]
};

// What nnx.MultiHeadAttention's __init__ leaves in the module: the parameters and the
// dropout stream it forks (keep_rngs and dropout_rate > 0; else none).
template <class ParamT>
struct MultiHeadAttentionVariables {
  MultiHeadAttentionParams<ParamT> params;
  std::optional<RngStream> rngs;
};

template <class T, class ParamT = T>
class MultiHeadAttention {
 public:
  using Params = MultiHeadAttentionParams<ParamT>;
  using Variables = MultiHeadAttentionVariables<ParamT>;
  using Projection = LinearGeneral<T, ParamT, 1, 2, 0>;
  using Output = LinearGeneral<T, ParamT, 2, 1, 0>;
  using Norm = LayerNorm<T, ParamT>;
  using Cache = AttentionCache<T>;
  using CallOptions = AttentionCallOptions<T>;

  // nnx's constructor fields (the promote / dot_general hooks and the *_metadata are not
  // here: the default promote_dtype is LinearGeneral's and LayerNorm's). 0 / nullopt:
  // nnx's None. dtype and param_dtype are the template parameters T and ParamT.
  struct Config {
    Index num_heads = 0;    // required
    Index in_features = 0;  // required
    Index qkv_features = 0;    // 0: in_features
    Index out_features = 0;    // 0: in_features
    Index num_kv_heads = 0;    // 0: num_heads
    Index in_kv_features = 0;  // 0: in_features
    bool broadcast_dropout = true;
    double dropout_rate = 0.0;
    std::optional<bool> deterministic{};
    Precision precision = Precision::Default;
    initializers::Initializer<ParamT> kernel_init = initializers::lecun_normal();
    initializers::Initializer<ParamT> out_kernel_init{};  // empty: kernel_init
    initializers::Initializer<ParamT> bias_init = initializers::zeros();
    initializers::Initializer<ParamT> out_bias_init{};  // empty: bias_init
    bool use_bias = true;
    AttentionFn<T> attention_fn = DotProductAttention{};
    // nnx's decode flag. Here a decode step is the call given a cache (apply(params,
    // cache, inputs_q), decode_step, decode_chunk: the call's decode=True); with
    // decode=true a call without a cache throws (nnx would decode, needing the cache).
    std::optional<bool> decode{};
    bool normalize_qk = false;
    bool keep_rngs = true;
  };

  explicit MultiHeadAttention(Config config)
      : config_(resolve(std::move(config))),
        query_(projection(config_.in_features, config_.num_heads)),
        key_(projection(config_.in_kv_features, config_.num_kv_heads)),
        value_(projection(config_.in_kv_features, config_.num_kv_heads)),
        query_ln_(norm()),
        key_ln_(norm()),
        out_(output()) {}

  // The config with nnx's defaults filled in (qkv_features, out_features, ... never 0).
  const Config& config() const { return config_; }
  Index head_dim() const { return config_.qkv_features / config_.num_heads; }

  // The submodules, as nnx holds them (self.query, ..., self.out).
  const Projection& query() const { return query_; }
  const Projection& key() const { return key_; }
  const Projection& value() const { return value_; }
  const Norm& query_ln() const { return query_ln_; }
  const Norm& key_ln() const { return key_ln_; }
  const Output& out() const { return out_; }

  // nnx.MultiHeadAttention.__init__'s draws, in its order (see the top of this file). A
  // throw leaves rngs unchanged.
  Variables init(Rngs& rngs) const {
    return detail::transact(rngs, [&](Rngs& r) {
      Variables v;
      v.params.query = query_.init(r);
      v.params.key = key_.init(r);
      v.params.value = value_.init(r);
      if (config_.normalize_qk) {
        v.params.query_ln = query_ln_.init(r);
        v.params.key_ln = key_ln_.init(r);
      }
      v.params.out = out_.init(r);
      if (config_.keep_rngs && config_.dropout_rate > 0) v.rngs = r["dropout"].fork();  // rngs.dropout: falls back to `default`
      return v;
    });
  }

  // Throws unless every parameter has the shape this config gives it.
  void check_params(const Params& p) const {
    query_.check_params(p.query);
    key_.check_params(p.key);
    value_.check_params(p.value);
    if (config_.normalize_qk) {
      const Shape want{head_dim()};
      if (shape_of(p.query_ln.scale) != want)
        throw linen::invalid_argument("nnx::MultiHeadAttention: query_ln/scale of shape " +
                                      to_string(shape_of(p.query_ln.scale)) + ", expected " + to_string(want));
      if (shape_of(p.key_ln.scale) != want)
        throw linen::invalid_argument("nnx::MultiHeadAttention: key_ln/scale of shape " +
                                      to_string(shape_of(p.key_ln.scale)) + ", expected " + to_string(want));
    }
    out_.check_params(p.out);
  }


  // ---- __call__ ----
  // apply(params, inputs_q[, inputs_k[, inputs_v]], call): nnx's __call__ without a
  // module stream (keep_rngs=False: active dropout needs call.rngs).
  //   inputs_q [batch..., q_length, in_features]; inputs_k, inputs_v [batch..., kv_length,
  //   in_kv_features] -> [batch..., q_length, out_features].
  template <class XQ>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(const Params& params, const XQ& inputs_q,
                                                             const CallOptions& call = {}) const {
    return forward(params, nullptr, inputs_q, inputs_q, inputs_q, call, nullptr, false);
  }
  template <class XQ, class XK>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(const Params& params, const XQ& inputs_q,
                                                             const XK& inputs_k, const CallOptions& call = {}) const {
    return forward(params, nullptr, inputs_q, inputs_k, inputs_k, call, nullptr, false);
  }
  template <class XQ, class XK, class XV>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(const Params& params, const XQ& inputs_q,
                                                             const XK& inputs_k, const XV& inputs_v,
                                                             const CallOptions& call = {}) const {
    return forward(params, nullptr, inputs_q, inputs_k, inputs_v, call, nullptr, false);
  }
  // The same on the module's variables: its dropout stream (variables.rngs, the keep_rngs
  // fork) draws when the call gives no rngs (and counts up, as self.rngs does).
  template <class XQ>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q,
                                                             const CallOptions& call = {}) const {
    return forward(variables.params, own(variables), inputs_q, inputs_q, inputs_q, call, nullptr, false);
  }
  template <class XQ, class XK>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q,
                                                             const XK& inputs_k, const CallOptions& call = {}) const {
    return forward(variables.params, own(variables), inputs_q, inputs_k, inputs_k, call, nullptr, false);
  }
  template <class XQ, class XK, class XV>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q,
                                                             const XK& inputs_k, const XV& inputs_v,
                                                             const CallOptions& call = {}) const {
    return forward(variables.params, own(variables), inputs_q, inputs_k, inputs_v, call, nullptr, false);
  }

  // ---- decoding ----
  // nnx's init_cache(input_shape): input_shape [batch..., max_length, features] ->
  // cached_key, cached_value [batch..., max_length, num_kv_heads, head_dim] zeros (linen:
  // [prod(batch), ...] with cache.batch = [batch...]), cache_index 0; in T (see the top of
  // this file). max_length must be positive; a size too large throws
  // linen::overflow_error.
  Cache init_cache(const Shape& input_shape) const {
    const std::string f = "nnx::MultiHeadAttention::init_cache: ";
    if (input_shape.size() < 2)
      throw linen::invalid_argument(f + "input_shape must be [batch..., max_length, features], got " +
                                    to_string(input_shape));
    for (Index s : input_shape)
      if (s < 0) throw linen::invalid_argument(f + "input_shape " + to_string(input_shape) + " has a negative dim");
    const Index L = input_shape[input_shape.size() - 2];
    if (L < 1)
      throw linen::invalid_argument(f + "max_length (input_shape[-2] of " + to_string(input_shape) +
                                    ") must be positive");
    Cache c;
    c.batch.assign(input_shape.begin(), input_shape.end() - 2);
    Shape full = c.batch;
    full.insert(full.end(), {L, config_.num_kv_heads, head_dim()});
    linen::detail::checked_allocation<T>(full, "nnx::MultiHeadAttention: cache");
    const Index b = num_elements(c.batch);
    c.cached_key.resize(b, L, config_.num_kv_heads, head_dim());
    c.cached_value.resize(b, L, config_.num_kv_heads, head_dim());
    c.cached_key.setZero();
    c.cached_value.setZero();
    c.cache_index = 0;
    return c;
  }

  // nnx's decode step, `layer(x, decode=True)`: inputs_q [batch..., 1, in_features] ->
  // [batch..., 1, out_features]; writes the position's key and value at cache_index,
  // attends to [0, cache_index] (call.mask: [batch..., num_heads|1, 1, max_length|1],
  // combined with it) and advances the index. Errors (nnx's cache shape check,
  // linen::cache_overflow) leave the cache and the streams unchanged.
  template <class XQ>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(const Params& params, Cache& cache, const XQ& inputs_q,
                                                             const CallOptions& call = {}) const {
    return forward(params, nullptr, inputs_q, inputs_q, inputs_q, call, &cache, false);
  }
  template <class XQ>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> apply(Variables& variables, Cache& cache, const XQ& inputs_q,
                                                             const CallOptions& call = {}) const {
    return forward(variables.params, own(variables), inputs_q, inputs_q, inputs_q, call, &cache, false);
  }

  // The decode step into caller-owned memory with reusable buffers: what
  // apply(params, cache, inputs_q, call) computes (to rounding: the row kernel reads the
  // valid positions only, apply's attention_fn the whole cache under the mask), into
  // out [batch..., 1, out_features] (a Tensor or a TensorMap). See the top of this file
  // for when it allocates nothing. `variables`' overloads give the module's stream.
  template <class XQ, class Out>
  void decode_step(const Params& params, Cache& cache, const XQ& inputs_q, Out&& out, DecodeWorkspace<T>& workspace,
                   const CallOptions& call = {}) const {
    step_into(params, nullptr, cache, inputs_q, out, workspace, call, false);
  }
  template <class XQ, class Out>
  void decode_step(Variables& variables, Cache& cache, const XQ& inputs_q, Out&& out, DecodeWorkspace<T>& workspace,
                   const CallOptions& call = {}) const {
    step_into(variables.params, own(variables), cache, inputs_q, out, workspace, call, false);
  }
  // n positions at once (prefill, draft verification; beyond nnx): inputs_q [batch..., n,
  // in_features], n >= 1 -> [batch..., n, out_features]; row i attends to [0,
  // cache_index + i]; the index advances by n. The cache written equals n decode steps'.
  template <class XQ, class Out>
  void decode_chunk(const Params& params, Cache& cache, const XQ& inputs_q, Out&& out, DecodeWorkspace<T>& workspace,
                    const CallOptions& call = {}) const {
    step_into(params, nullptr, cache, inputs_q, out, workspace, call, true);
  }
  template <class XQ, class Out>
  void decode_chunk(Variables& variables, Cache& cache, const XQ& inputs_q, Out&& out, DecodeWorkspace<T>& workspace,
                    const CallOptions& call = {}) const {
    step_into(variables.params, own(variables), cache, inputs_q, out, workspace, call, true);
  }

 private:
  std::string name() const { return "nnx::MultiHeadAttention"; }
  static RngStream* own(Variables& v) { return v.rngs ? &*v.rngs : nullptr; }

  template <class XQ, class XK, class XV>
  static void check_input_types() {
    using linen::detail::is_tensor_v;
    using linen::detail::tensor_traits;
    static_assert(is_tensor_v<XQ> && is_tensor_v<XK> && is_tensor_v<XV>,
                  "linen: nnx::MultiHeadAttention inputs must be linen::Tensor<T, N> (or maps of one)");
    if constexpr (is_tensor_v<XQ> && is_tensor_v<XK> && is_tensor_v<XV>) {
      static_assert(tensor_traits<XQ>::rank >= 2, "linen: attention inputs are [batch..., length, features]");
      static_assert(tensor_traits<XQ>::rank == tensor_traits<XK>::rank &&
                        tensor_traits<XQ>::rank == tensor_traits<XV>::rank,
                    "linen: inputs_q, inputs_k and inputs_v must have the same rank");
    }
  }

  // The call's stream: call.rngs (an Rngs' dropout stream, or a stream), else the module's.
  RngStream* resolve_stream(RngStream* own_stream, const CallOptions& call) const {
    if (const auto* r = std::get_if<Rngs*>(&call.rngs)) {
      if (*r == nullptr) throw linen::invalid_argument(name() + ": call rngs is a null Rngs pointer");
      return &(**r)["dropout"];  // rngs.dropout (falls back to `default`)
    }
    if (const auto* s = std::get_if<RngStream*>(&call.rngs)) {
      if (*s == nullptr) throw linen::invalid_argument(name() + ": call rngs is a null RngStream pointer");
      return *s;
    }
    return own_stream;
  }
  // nnx: `deterministic` is only read (and required) when dropout_rate > 0.
  bool resolve_deterministic(const CallOptions& call) const {
    if (!(config_.dropout_rate > 0.0)) return true;
    if (call.deterministic) return *call.deterministic;
    if (config_.deterministic) return *config_.deterministic;
    throw linen::invalid_argument(name() +
                                  ": No `deterministic` argument was provided to MultiHeadAttention as either a "
                                  "__call__ argument, class attribute, or nnx.flag.");
  }
  bool default_attention() const { return config_.attention_fn.template target<DotProductAttention>() != nullptr; }

  // inputs [batch..., length, features]: nnx's feature check, the batch dims of q, k, v
  // (which nnx's attention checks on the projections) and the k, v lengths.
  void check_inputs(const Shape& qs, const Shape& ks, const Shape& vs) const {
    if (qs.back() != config_.in_features)
      throw linen::invalid_argument(name() + ": Incompatible input dimension, got " + std::to_string(qs.back()) +
                                    " but module expects " + std::to_string(config_.in_features) + " (inputs_q " +
                                    to_string(qs) + ").");
    for (const auto& [s, what] : {std::pair<const Shape*, const char*>{&ks, "inputs_k"}, {&vs, "inputs_v"}})
      if (s->back() != config_.in_kv_features)
        throw linen::invalid_argument(name() + ": " + what + " of shape " + to_string(*s) + " has " +
                                      std::to_string(s->back()) + " features, in_kv_features is " +
                                      std::to_string(config_.in_kv_features));
    const std::size_t r = qs.size();
    if (!std::equal(qs.begin(), qs.end() - 2, ks.begin()) || !std::equal(qs.begin(), qs.end() - 2, vs.begin()))
      throw linen::invalid_argument(name() + ": q, k, v batch dims must match, but got inputs " + to_string(qs) + ", " +
                                    to_string(ks) + ", " + to_string(vs) + ".");
    if (ks[r - 2] != vs[r - 2])
      throw linen::invalid_argument(name() + ": k, v lengths must match, but got inputs_k " + to_string(ks) +
                                    " and inputs_v " + to_string(vs) + ".");
  }

  // q/k LayerNorm over the head_dim of `rows` rows, in place (nnx's query_ln / key_ln).
  void norm_rows(const Norm& ln, const LayerNormParams<ParamT>& p, T* x, Index rows) const {
    if constexpr (std::is_same_v<ParamT, T>) {
      ln.core().apply_rows(p, x, rows, head_dim(), x);
    } else {
      ln.core().apply_rows(ln.cast_params(p), x, rows, head_dim(), x);
    }
  }

  // __call__ (cache: the decode step; chunk: decode_chunk's n positions).
  template <class XQ, class XK, class XV>
  Tensor<T, linen::detail::signature_traits<XQ>::rank> forward(const Params& p, RngStream* own_stream,
                                                               const XQ& xq, const XK& xk, const XV& xv,
                                                               const CallOptions& call, Cache* cache,
                                                               bool chunk) const {
    check_input_types<XQ, XK, XV>();
    constexpr int R = linen::detail::tensor_traits<XQ>::rank;
    RngStream* stream = resolve_stream(own_stream, call);
    if (!cache && config_.decode.value_or(false))
      throw linen::invalid_argument(name() + ": decode=true: pass the cache (apply(params, cache, inputs_q), "
                                             "decode_step or decode_chunk; init_cache makes it)");
    const Shape qs = shape_of(xq), ks = shape_of(xk), vs = shape_of(xv);
    check_inputs(qs, ks, vs);
    check_params(p);
    const Shape batch(qs.begin(), qs.end() - 2);
    const Index B = num_elements(batch), Lq = qs[R - 2], Lk = ks[R - 2], N = config_.num_heads,
                K = config_.num_kv_heads, hd = head_dim();
    if (chunk && Lq < 1) linen::detail::decode::throw_empty_chunk(qs, name());
    if (cache) {
      linen::detail::decode::check_cache(*cache, batch, Lk, K, hd, name(), chunk);
      linen::detail::decode::check_room(*cache, Lk, "nnx::MultiHeadAttention");
    }
    const bool deterministic = resolve_deterministic(call);
    const bool dropout = config_.dropout_rate > 0.0 && !deterministic;
    if (dropout && !stream)
      throw linen::invalid_argument(name() +
                                    ": 'rngs' must be provided to __call__ method if MultiHeadAttention instance is "
                                    "defined with keep_rngs=False.");
    // The mask at rank 4 over the flattened batch (checked before anything changes).
    Tensor<bool, 4> mask_storage;
    const Index key_len = cache ? cache->max_length() : Lk;
    const ArrayRef<bool> mask4 =
        linen::detail::flatten_mask(call.mask, batch, N, Lq, key_len, mask_storage, name());

    Tensor<T, 4> q(B, Lq, N, hd), k(B, Lk, K, hd), v(B, Lk, K, hd);
    query_.multiply(p.query, xq.data(), B * Lq, q.data());
    key_.multiply(p.key, xk.data(), B * Lk, k.data());
    value_.multiply(p.value, xv.data(), B * Lk, v.data());
    if (config_.normalize_qk) {
      norm_rows(query_ln_, p.query_ln, q.data(), B * Lq * N);
      norm_rows(key_ln_, p.key_ln, k.data(), B * Lk * K);
    }

    // Undo on failure: the stream's count and the cache's written slots.
    const std::uint32_t count = stream ? stream->count() : 0;
    struct StreamUndo {
      RngStream* s;
      std::uint32_t c;
      bool armed = true;
      ~StreamUndo() {
        if (armed && s) s->set_count(c);
      }
    } stream_undo{stream, count};
    linen::detail::decode::SlotUndo<T> slot_undo;

    AttentionOptions<T> o;
    Tensor<bool, 4> cache_mask;
    if (cache) {
      slot_undo.arm(*cache, Lk);
      linen::detail::decode::write(*cache, k.data(), v.data(), Lk);
      // nnx: combine_masks(mask, arange(max_length) <= cur_index); chunk row i: <= cur + i.
      cache_mask = linen::detail::decode::cache_mask(mask4, B, Lq, cache->max_length(), cache->cache_index - Lk);
      o.mask = ArrayRef<bool>(cache_mask);
      o.is_causal = false;  // flax#5591: nnx passes is_causal here, leaving key 0 alone visible
    } else {
      o.mask = mask4;
      o.is_causal = call.is_causal;
    }
    if (dropout) o.dropout_rng = (*stream)();  // dropout_rng = rngs()
    o.dropout_rate = config_.dropout_rate;
    o.broadcast_dropout = config_.broadcast_dropout;
    o.deterministic = deterministic;
    o.precision = config_.precision;
    if (call.sow_weights) {
      // The weights with the batch dims back (the attention sees them flattened).
      o.module = [&call, &batch](ArrayRef<T> w) {
        Shape s = batch;
        s.insert(s.end(), w.shape().end() - 3, w.shape().end());
        call.sow_weights(ArrayRef<T>(w.data(), s));
      };
    }
    o.path = call.path;
    o.thread_pool = call.thread_pool;
    const Tensor<T, 4> x = cache ? config_.attention_fn(q, cache->cached_key, cache->cached_value, o)
                                 : config_.attention_fn(q, k, v, o);
    const Shape want{B, Lq, N, hd};
    if (shape_of(x) != want)
      throw linen::invalid_argument(name() + ": attention_fn returned shape " + to_string(shape_of(x)) + ", expected " +
                                    to_string(want));
    Shape os = batch;
    os.insert(os.end(), {Lq, config_.out_features});
    Tensor<T, R> y(to_dims<R>(os));
    out_.multiply(p.out, x.data(), B * Lq, y.data());
    stream_undo.armed = false;
    slot_undo.disarm();
    return y;
  }

  // The signature of a direct step: every shape and field its checks read.
  template <class XQ, class Out>
  void put_step_signature(std::vector<Index>& now, const Params& p, const XQ& xq, const Out& out,
                          const Cache& cache, const CallOptions& call, bool chunk) const {
    now.clear();
    now.insert(now.end(), {config_.in_features, config_.num_heads, config_.num_kv_heads, head_dim(),
                           config_.out_features, Index{config_.use_bias}, Index{config_.normalize_qk}, Index{chunk}});
    const auto dims = [&now](const auto& t) {
      now.push_back(t.NumDimensions);
      for (int i = 0; i < t.NumDimensions; ++i) now.push_back(t.dimension(i));
    };
    dims(p.query.kernel), dims(p.query.bias), dims(p.key.kernel), dims(p.key.bias), dims(p.value.kernel);
    dims(p.value.bias), dims(p.out.kernel), dims(p.out.bias), dims(p.query_ln.scale), dims(p.key_ln.scale);
    dims(xq), dims(out);
    linen::detail::decode::put_signature(now, cache);
    if (call.mask) {
      now.push_back(call.mask.rank());
      now.insert(now.end(), call.mask.shape().begin(), call.mask.shape().end());
    } else {
      now.push_back(-1);
    }
  }

  template <class XQ, class Out>
  void step_into(const Params& p, RngStream* own_stream, Cache& cache, const XQ& xq, Out& out,
                 DecodeWorkspace<T>& workspace, const CallOptions& call, bool chunk) const {
    using O = std::remove_cv_t<std::remove_reference_t<Out>>;
    check_input_types<XQ, XQ, XQ>();
    constexpr int R = linen::detail::tensor_traits<XQ>::rank;
    static_assert(linen::detail::is_tensor_v<O> && linen::detail::tensor_traits<O>::rank == R &&
                      std::is_same_v<typename linen::detail::tensor_traits<O>::scalar, T> &&
                      !std::is_const_v<std::remove_pointer_t<decltype(out.data())>>,
                  "linen: decode_step's out must be a writable linen::Tensor<T, N> (or TensorMap of one) of "
                  "the inputs' rank");
    const bool deterministic = resolve_deterministic(call);
    // The direct step: linen's own attention over the cache (no sowing, no active dropout).
    const bool direct =
        default_attention() && !call.sow_weights && (deterministic || !(config_.dropout_rate > 0.0));
    const Index n = xq.dimension(R - 2);
    if (!direct) {
      const Tensor<T, R> y = forward(p, own_stream, xq, xq, xq, call, &cache, chunk);
      if (shape_of(out) != shape_of(y))
        throw linen::invalid_argument(name() + ": decode_step's out has shape " + to_string(shape_of(out)) +
                                      ", expected " + to_string(shape_of(y)));
      std::copy(y.data(), y.data() + y.size(), out.data());
      return;
    }
    resolve_stream(own_stream, call);  // nnx reads rngs.dropout on every call (it may throw)
    if (chunk && n < 1) linen::detail::decode::throw_empty_chunk(shape_of(xq), name());
    auto& ws = linen::detail::decode::Access::state(workspace);
    put_step_signature(ws.now, p, xq, out, cache, call, chunk);
    const linen::detail::decode::Validated* valid = ws.find();
    const Index N = config_.num_heads, K = config_.num_kv_heads, hd = head_dim();
    if (!valid) {
      const Shape qs = shape_of(xq);
      check_inputs(qs, qs, qs);
      check_params(p);
      const Shape batch(qs.begin(), qs.end() - 2);
      linen::detail::decode::check_cache(cache, batch, n, K, hd, name(), chunk);
      Shape os = batch;
      os.insert(os.end(), {n, config_.out_features});
      if (shape_of(out) != os)
        throw linen::invalid_argument(name() + ": decode_step's out has shape " + to_string(shape_of(out)) +
                                      ", expected " + to_string(os));
      linen::detail::MaskPlan plan;
      if (call.mask) plan = linen::detail::mask_plan(call.mask, batch, N, n, cache.max_length(), name());
      valid = &ws.remember(std::move(plan), num_elements(batch));
    }
    linen::detail::decode::check_room(cache, n, "nnx::MultiHeadAttention");
    const Index B = cache.cached_key.dimension(0), rows = B * n, in = config_.in_features;
    ws.q.resize(static_cast<std::size_t>(rows * N * hd));
    ws.x.resize(static_cast<std::size_t>(rows * N * hd));
    ws.k.resize(static_cast<std::size_t>(rows * K * hd));
    ws.v.resize(static_cast<std::size_t>(rows * K * hd));
    using Core = typename Projection::Core;
    const auto bias = [this](const auto& t) { return config_.use_bias ? t.data() : nullptr; };
    Core::multiply_rows(p.query.kernel.data(), bias(p.query.bias), in, N * hd, xq.data(), rows, ws.q.data(), &ws.dense,
                        true, call.thread_pool);
    Core::multiply_rows(p.key.kernel.data(), bias(p.key.bias), in, K * hd, xq.data(), rows, ws.k.data(), &ws.dense,
                        true, call.thread_pool);
    Core::multiply_rows(p.value.kernel.data(), bias(p.value.bias), in, K * hd, xq.data(), rows, ws.v.data(),
                        &ws.dense, true, call.thread_pool);
    if (config_.normalize_qk) {
      norm_rows(query_ln_, p.query_ln, ws.q.data(), rows * N);
      norm_rows(key_ln_, p.key_ln, ws.k.data(), rows * K);
    }
    linen::detail::FusedView<bool> mask;
    if (call.mask) {
      const bool* m = call.mask.data();
      if (!valid->mask_offsets.empty()) {
        linen::detail::gather_mask(valid->mask_dims, valid->mask_offsets, m,
                                   reinterpret_cast<bool*>(ws.mask_storage.data()));
        m = reinterpret_cast<const bool*>(ws.mask_storage.data());
      }
      mask = linen::detail::mask_view(m, valid->mask_dims);
    }
    linen::detail::decode::write(cache, ws.k.data(), ws.v.data(), n);
    const AttentionPath path = call.path == AttentionPath::Auto
                                   ? (config_.dropout_rate == 0.0 ? AttentionPath::JaxNn : AttentionPath::Einsum)
                                   : call.path;
    if (path == AttentionPath::JaxNn)
      linen::detail::decode::attend_grouped<linen::detail::JaxNnLogits<T>>(cache, ws.q.data(), n, N, mask, ws.x.data(),
                                                                           call.thread_pool, &ws.row, &ws.tiled);
    else
      linen::detail::decode::attend_grouped<linen::detail::FlaxLogits<T>>(cache, ws.q.data(), n, N, mask, ws.x.data(),
                                                                          call.thread_pool, &ws.row, &ws.tiled);
    Output::Core::multiply_rows(p.out.kernel.data(), bias(p.out.bias), N * hd, config_.out_features, ws.x.data(), rows,
                                out.data(), &ws.dense, true, call.thread_pool);
  }

  static Config resolve(Config c) {
    if (c.num_heads <= 0 || c.in_features <= 0)
      throw linen::invalid_argument("nnx::MultiHeadAttention: num_heads and in_features must be positive, got num_heads=" +
                                    std::to_string(c.num_heads) + ", in_features=" + std::to_string(c.in_features));
    for (const auto& [value, name] : {std::pair<Index, const char*>{c.qkv_features, "qkv_features"},
                                      {c.out_features, "out_features"},
                                      {c.num_kv_heads, "num_kv_heads"},
                                      {c.in_kv_features, "in_kv_features"}})
      if (value < 0)
        throw linen::invalid_argument(std::string("nnx::MultiHeadAttention: ") + name +
                                      " must be positive (or 0 for nnx's None), got " + std::to_string(value));
    if (c.qkv_features == 0) c.qkv_features = c.in_features;
    if (c.out_features == 0) c.out_features = c.in_features;
    if (c.in_kv_features == 0) c.in_kv_features = c.in_features;
    if (c.num_kv_heads == 0) c.num_kv_heads = c.num_heads;
    if (c.num_heads % c.num_kv_heads != 0)
      throw linen::invalid_argument("nnx::MultiHeadAttention: num_heads (" + std::to_string(c.num_heads) +
                                    ") must be divisible by num_kv_heads (" + std::to_string(c.num_kv_heads) + ").");
    if (c.qkv_features % c.num_heads != 0)
      throw linen::invalid_argument("nnx::MultiHeadAttention: Memory dimension (" + std::to_string(c.qkv_features) +
                                    ") must be divisible by 'num_heads' heads (" + std::to_string(c.num_heads) + ").");
    if (!(c.dropout_rate >= 0.0 && c.dropout_rate <= 1.0))
      throw linen::invalid_argument("nnx::MultiHeadAttention: dropout_rate must be in [0, 1], got " +
                                    std::to_string(c.dropout_rate));
    if (!c.attention_fn) throw linen::invalid_argument("nnx::MultiHeadAttention: attention_fn is empty");
    if (!c.out_kernel_init) c.out_kernel_init = c.kernel_init;  // `out_kernel_init or kernel_init`
    if (!c.out_bias_init) c.out_bias_init = c.bias_init;
    return c;
  }

  Projection projection(Index in, Index heads) const {
    typename Projection::Config p;
    p.in_features = {in};
    p.out_features = {heads, head_dim()};
    p.use_bias = config_.use_bias;
    p.precision = config_.precision;
    p.kernel_init = config_.kernel_init;
    p.bias_init = config_.bias_init;
    return Projection(std::move(p));
  }
  Norm norm() const {
    typename Norm::Config n;
    n.num_features = head_dim();
    n.use_bias = false;
    return Norm(std::move(n));
  }
  Output output() const {
    typename Output::Config o;
    o.in_features = {config_.num_heads, head_dim()};
    o.out_features = {config_.out_features};
    o.axis = {-2, -1};
    o.use_bias = config_.use_bias;
    o.precision = config_.precision;
    o.kernel_init = config_.out_kernel_init;
    o.bias_init = config_.out_bias_init;
    return Output(std::move(o));
  }

  Config config_;
  Projection query_, key_, value_;
  Norm query_ln_, key_ln_;
  Output out_;
};

}  // namespace linen::nnx

#endif  // LINEN_NNX_ATTENTION_HPP
