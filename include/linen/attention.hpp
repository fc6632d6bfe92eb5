// SPDX-License-Identifier: Apache-2.0
//
// flax.linen.MultiHeadDotProductAttention and flax.linen.SelfAttention: thin modules over
// the functional core. DenseGeneral projects the inputs to heads, optional LayerNorms
// normalise q and k (normalize_qk), an optional autoregressive cache serves decoding,
// `attention_fn` (default linen::dot_product_attention) attends, and a DenseGeneral
// projects back.
#ifndef LINEN_ATTENTION_HPP
#define LINEN_ATTENTION_HPP

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dense.hpp"
#include "detail/broadcast.hpp"
#include "dot_product_attention.hpp"
#include "dropout_rng.hpp"
#include "errors.hpp"
#include "initializers.hpp"
#include "layer_norm.hpp"
#include "random.hpp"
#include "tensor.hpp"

namespace linen {

// The attention function a module calls: dot_product_attention's signature at rank 4.
// The module flattens the batch dims into one before calling it:
//   query [batch, q_length, num_heads, head_dim], key [batch, kv_length, num_heads, head_dim],
//   value [batch, kv_length, num_heads, head_dim] -> [batch, q_length, num_heads, head_dim];
// options.mask is broadcastable to [batch, num_heads, q_length, kv_length].
template <class T>
using AttentionFn = std::function<Tensor<T, 4>(const Tensor<T, 4>& query, const Tensor<T, 4>& key,
                                               const Tensor<T, 4>& value, const AttentionOptions<T>& options)>;

// linen::dot_product_attention as a function object (the default attention_fn).
struct DotProductAttention {
  template <class T>
  Tensor<T, 4> operator()(const Tensor<T, 4>& query, const Tensor<T, 4>& key, const Tensor<T, 4>& value,
                          const AttentionOptions<T>& options) const {
    return dot_product_attention(query, key, value, options);
  }
};

// Every field of flax.linen.MultiHeadDotProductAttention, with Flax's defaults. Flax's
// `dtype` and `param_dtype` are the template parameters T and ParamT; `None` is an empty
// std::optional or an empty std::function.
template <class T, class ParamT = T>
struct AttentionConfig {
  Index num_heads = 0;                      // required, as in Flax
  std::optional<Index> qkv_features{};      // None: inputs_q.shape[-1]
  std::optional<Index> out_features{};      // None: inputs_q.shape[-1]
  bool broadcast_dropout = true;
  double dropout_rate = 0.0;
  std::optional<bool> deterministic{};      // merged with the call's, like Flax's merge_param
  // jax.lax.Precision of the projections and the attention products. On CPU XLA computes
  // float32 products in float32 whatever the precision, and so does linen; half types
  // accumulate in float32. Kept so that Flax configurations port unchanged.
  Precision precision = Precision::Default;
  initializers::Initializer<ParamT> kernel_init = initializers::lecun_normal();
  initializers::Initializer<ParamT> out_kernel_init{};   // empty: kernel_init
  initializers::Initializer<ParamT> bias_init = initializers::zeros();
  initializers::Initializer<ParamT> out_bias_init{};     // empty: bias_init
  bool use_bias = true;
  AttentionFn<T> attention_fn = DotProductAttention{};
  bool decode = false;
  bool normalize_qk = false;
  bool force_fp32_for_softmax = false;
};

// params: Flax's names and layouts.
template <class ParamT>
struct AttentionParams {
  DenseParams<ParamT, 1, 2> query, key, value;  // kernel [in, heads, head_dim], bias [heads, head_dim]
  DenseParams<ParamT, 2, 1> out;                // kernel [heads, head_dim, out], bias [out]
  LayerNormParams<ParamT> query_ln, key_ln;     // scale [head_dim] when normalize_qk
};

// cache: the autoregressive decode state. Flax's cached_key is [batch..., max_length,
// num_heads, head_dim]; linen keeps the same bytes with the batch dims flattened into one
// (`batch` remembers them), so saving gives Flax's layout back.
template <class T>
struct AttentionCache {
  Shape batch;               // [batch...]
  Tensor<T, 4> cached_key;   // [prod(batch), max_length, num_heads, head_dim]
  Tensor<T, 4> cached_value; // [prod(batch), max_length, num_heads, head_dim]
  std::int32_t cache_index = 0;
  Index max_length() const { return cached_key.dimension(1); }
};

// Flax's `variables` of one attention module: {'params': ..., 'cache': ...}.
template <class T, class ParamT = T>
struct AttentionVariables {
  AttentionParams<ParamT> params;
  std::optional<AttentionCache<T>> cache;  // present when decode
};

// The keyword arguments of MultiHeadDotProductAttention.__call__.
template <class T>
struct CallOptions {
  // false = masked out; broadcastable to [batch..., num_heads, q_length, kv_length].
  ArrayRef<bool> mask{};
  std::optional<bool> deterministic{};
  DropoutRng dropout_rng{};
  // Flax's sow_weights=True: called with the weights [batch..., num_heads, q_length,
  // kv_length] (what Flax stores in 'intermediates'/'attention_weights').
  std::function<void(ArrayRef<T> weights)> sow_weights{};
};

template <class T, class ParamT = T>
class MultiHeadDotProductAttention {
  static_assert(is_element_type_v<T> && is_element_type_v<ParamT>,
                "linen: attention element types must be float, double, Eigen::half or Eigen::bfloat16");

 public:
  using Config = AttentionConfig<T, ParamT>;
  using Params = AttentionParams<ParamT>;
  using Cache = AttentionCache<T>;
  using Variables = AttentionVariables<T, ParamT>;

  explicit MultiHeadDotProductAttention(Config config)
      : MultiHeadDotProductAttention(std::move(config), "MultiHeadDotProductAttention") {}

 protected:
  // For SelfAttention: its errors carry its own name.
  MultiHeadDotProductAttention(Config config, const char* module_name)
      : config_(std::move(config)), name_(module_name) {
    const std::string n = name();
    if (config_.num_heads <= 0)
      throw std::invalid_argument(n + ": num_heads must be positive, got " + std::to_string(config_.num_heads));
    if (config_.qkv_features && *config_.qkv_features <= 0)
      throw std::invalid_argument(n + ": qkv_features must be positive, got " + std::to_string(*config_.qkv_features));
    if (config_.qkv_features && *config_.qkv_features % config_.num_heads != 0)
      throw std::invalid_argument(n + ": Memory dimension (" + std::to_string(*config_.qkv_features) +
                                  ") must be divisible by number of heads (" + std::to_string(config_.num_heads) + ")");
    if (config_.out_features && *config_.out_features <= 0)
      throw std::invalid_argument(n + ": out_features must be positive, got " + std::to_string(*config_.out_features));
    if (!(config_.dropout_rate >= 0.0 && config_.dropout_rate < 1.0))
      throw std::invalid_argument(n + ": dropout_rate must be in [0, 1), got " + std::to_string(config_.dropout_rate));
    if (!config_.attention_fn) throw std::invalid_argument(n + ": attention_fn is empty");
    if (!config_.kernel_init) throw std::invalid_argument(n + ": kernel_init is empty");
    if (config_.use_bias && !config_.bias_init) throw std::invalid_argument(n + ": bias_init is empty");
  }

 public:
  const Config& config() const { return config_; }

  // ---------------------------------------------------------------------------------
  // init: the variables Flax's Module.init(rng, inputs_q[, inputs_k[, inputs_v]]) makes.
  //   inputs_*: [batch..., length, features]; k defaults to q, v to k.
  // Parameter keys follow Flax's rng streams (module path + per-scope counter), so with
  // random::key(seed) the parameters equal Flax's for the same seed. With `decode`, the
  // cache is zeros of [batch..., kv_length, num_heads, head_dim] and cache_index 0.
  // `rng` may also be a C++ engine: its first two 32-bit draws make the root key.
  template <class Rng, class XQ>
  Variables init(Rng&& rng, const XQ& inputs_q) const {
    return init(std::forward<Rng>(rng), inputs_q, inputs_q, inputs_q);
  }
  template <class Rng, class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
  Variables init(Rng&& rng, const XQ& inputs_q, const XK& inputs_k) const {
    return init(std::forward<Rng>(rng), inputs_q, inputs_k, inputs_k);
  }
  template <class Rng, class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
  Variables init(Rng&& rng, const XQ& inputs_q, const XK& inputs_k, const XV& inputs_v) const {
    check_inputs<XQ, XK, XV>();
    return init_impl(root_key(rng), shape_of(inputs_q), shape_of(inputs_k), shape_of(inputs_v));
  }

  // ---------------------------------------------------------------------------------
  // apply: Flax's module.apply(variables, inputs_q[, inputs_k[, inputs_v]], mask=...,
  // deterministic=..., dropout_rng=..., sow_weights=...).
  //   inputs_q: [batch..., q_length, q_features]; inputs_k: [batch..., kv_length, k_features]
  //   (default inputs_q); inputs_v: [batch..., kv_length, v_features] (default inputs_k).
  //   returns [batch..., q_length, out_features].
  // With `decode`, each call feeds one position ([batch..., 1, features]), writes its key
  // and value into variables.cache at cache_index and advances it: pass the variables
  // mutable. A step on a full cache throws linen::cache_overflow and changes nothing
  // (Flax silently overwrites the last slot).
  template <class XQ>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return apply(variables, inputs_q, inputs_q, inputs_q, call);
  }
  template <class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const XK& inputs_k, const CallOptions<T>& call = {}) const {
    return apply(variables, inputs_q, inputs_k, inputs_k, call);
  }
  template <class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const XK& inputs_k, const XV& inputs_v,
                                                  const CallOptions<T>& call = {}) const {
    if (config_.decode)
      throw std::invalid_argument(name() + ": decode=true updates the cache: pass the variables mutable");
    return apply_impl(variables.params, nullptr, inputs_q, inputs_k, inputs_v, call);
  }
  // The mutable overloads: the decode cache is updated in place.
  template <class XQ>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return apply(variables, inputs_q, inputs_q, inputs_q, call);
  }
  template <class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q, const XK& inputs_k,
                                                  const CallOptions<T>& call = {}) const {
    return apply(variables, inputs_q, inputs_k, inputs_k, call);
  }
  template <class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q, const XK& inputs_k,
                                                  const XV& inputs_v, const CallOptions<T>& call = {}) const {
    if (config_.decode && !variables.cache)
      throw std::invalid_argument(name() + ": decode=true needs variables.cache (make it with init)");
    return apply_impl(variables.params, config_.decode ? &*variables.cache : nullptr, inputs_q, inputs_k,
                      inputs_v, call);
  }

  // The same with the cache apart from the parameters, so that one set of parameters
  // serves many concurrent decoders (each with its own cache).
  template <class XQ>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(const Params& params, Cache& cache, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    if (!config_.decode) throw std::invalid_argument(name() + ": a cache is only used with decode=true");
    return apply_impl(params, &cache, inputs_q, inputs_q, inputs_q, call);
  }

  // A zero decode cache for `batch` ([batch...]) sequences of up to `max_length`
  // positions, sized from the parameters (what init makes with decode=true; use it with
  // parameters loaded from a checkpoint).
  Cache init_cache(const Params& params, const Shape& batch, Index max_length) const {
    if (max_length <= 0)
      throw std::invalid_argument(name() + ": max_length must be positive, got " + std::to_string(max_length));
    const Shape ks = shape_of(params.key.kernel);
    if (ks[1] != config_.num_heads)
      throw std::invalid_argument(name() + ": key/kernel has shape " + to_string(ks) + ", num_heads is " +
                                  std::to_string(config_.num_heads));
    Cache c;
    c.batch = batch;
    c.cached_key.resize(num_elements(batch), max_length, ks[1], ks[2]);
    c.cached_value.resize(num_elements(batch), max_length, ks[1], ks[2]);
    c.cached_key.setZero();
    c.cached_value.setZero();
    return c;
  }

  // head_dim and the projections' sizes for inputs of the given feature sizes.
  Index qkv_features(Index q_features) const { return config_.qkv_features.value_or(q_features); }
  Index out_features(Index q_features) const { return config_.out_features.value_or(q_features); }
  Index head_dim(Index q_features) const {
    const Index f = qkv_features(q_features);
    if (f % config_.num_heads != 0)
      throw std::invalid_argument(name() + ": Memory dimension (" + std::to_string(f) +
                                  ") must be divisible by number of heads (" + std::to_string(config_.num_heads) + ")");
    return f / config_.num_heads;
  }

 private:
  std::string name() const { return name_; }

  using QKVDense = DenseGeneral<T, ParamT, 1, 2>;
  using OutDense = DenseGeneral<T, ParamT, 2, 1>;
  using Norm = LayerNorm<T, ParamT>;

  template <class XQ, class XK, class XV>
  static void check_inputs() {
    static_assert(detail::is_tensor_v<XQ> && detail::is_tensor_v<XK> && detail::is_tensor_v<XV>,
                  "linen: attention inputs must be linen::Tensor<T, N> (or maps of one)");
    constexpr int N = detail::tensor_traits<XQ>::rank;
    static_assert(N >= 2, "linen: attention inputs are [batch..., length, features]");
    static_assert(N == detail::tensor_traits<XK>::rank && N == detail::tensor_traits<XV>::rank,
                  "linen: inputs_q, inputs_k and inputs_v must have the same rank");
  }

  template <class Rng>
  static random::Key root_key(Rng& rng) {
    if constexpr (std::is_same_v<std::decay_t<Rng>, random::Key>) {
      return rng;
    } else {
      return random::key_from_engine(rng);
    }
  }

  QKVDense qkv_dense(Index q_features) const {
    typename QKVDense::Config c;
    c.features = {config_.num_heads, head_dim(q_features)};
    c.use_bias = config_.use_bias;
    c.kernel_init = config_.kernel_init;
    c.bias_init = config_.bias_init;
    c.precision = config_.precision;
    return QKVDense(std::move(c));
  }
  OutDense out_dense(Index q_features) const {
    typename OutDense::Config c;
    c.features = {out_features(q_features)};
    c.use_bias = config_.use_bias;
    c.kernel_init = config_.out_kernel_init ? config_.out_kernel_init : config_.kernel_init;
    c.bias_init = config_.out_bias_init ? config_.out_bias_init : config_.bias_init;
    c.precision = config_.precision;
    return OutDense(std::move(c));
  }
  static Norm qk_norm() {
    typename Norm::Config c;
    c.use_bias = false;  // Flax: LayerNorm(use_bias=False), epsilon 1e-6
    return Norm(std::move(c));
  }

  void check_shapes(const Shape& q, const Shape& k, const Shape& v) const {
    const std::string n = name();
    auto same_batch = [](const Shape& a, const Shape& b) {
      return a.size() == b.size() && std::equal(a.begin(), a.end() - 2, b.begin());
    };
    if (!same_batch(q, k) || !same_batch(q, v))
      throw std::invalid_argument(n + ": inputs must share their batch dims [batch..., length, features]; inputs_q " +
                                  to_string(q) + ", inputs_k " + to_string(k) + ", inputs_v " + to_string(v));
    if (k[k.size() - 2] != v[v.size() - 2])
      throw std::invalid_argument(n + ": inputs_k and inputs_v lengths differ: " + to_string(k) + " vs " + to_string(v));
    for (const Shape* s : {&q, &k, &v})
      if (s->back() <= 0)
        throw std::invalid_argument(n + ": input features must be positive, got shape " + to_string(*s));
  }

  Variables init_impl(const random::Key& root, const Shape& qs, const Shape& ks, const Shape& vs) const {
    check_shapes(qs, ks, vs);
    const Index fq = qs.back(), dh = head_dim(fq);
    random::RngScope scope(root);
    Variables vars;
    // Flax declares the submodules in this order: query, key, value, [query_ln, key_ln], out.
    auto dense_init = [&](const QKVDense& d, const char* nm, Index in) {
      random::RngScope s = scope.push(nm);
      const random::Key kk = s.make_rng();
      const random::Key bk = config_.use_bias ? s.make_rng() : kk;
      return d.init({in}, kk, bk);
    };
    const QKVDense qd = qkv_dense(fq);
    vars.params.query = dense_init(qd, "query", fq);
    vars.params.key = dense_init(qd, "key", ks.back());
    vars.params.value = dense_init(qd, "value", vs.back());
    if (config_.normalize_qk) {
      for (auto [nm, dst] : {std::pair{"query_ln", &vars.params.query_ln}, std::pair{"key_ln", &vars.params.key_ln}}) {
        random::RngScope s = scope.push(nm);
        const random::Key sk = s.make_rng();
        *dst = qk_norm().init(dh, sk, sk);
      }
    }
    {
      random::RngScope s = scope.push("out");
      const random::Key kk = s.make_rng();
      const random::Key bk = config_.use_bias ? s.make_rng() : kk;
      vars.params.out = out_dense(fq).init({config_.num_heads, dh}, kk, bk);
    }
    if (config_.decode) {
      Cache c;
      c.batch.assign(ks.begin(), ks.end() - 2);
      const Index b = num_elements(c.batch), len = ks[ks.size() - 2];
      c.cached_key.resize(b, len, config_.num_heads, dh);
      c.cached_value.resize(b, len, config_.num_heads, dh);
      c.cached_key.setZero();
      c.cached_value.setZero();
      c.cache_index = 0;
      vars.cache = std::move(c);
    }
    return vars;
  }

  // Projects x [batch..., len, features] to [B, len, heads, head_dim] (batch flattened).
  template <class X>
  Tensor<T, 4> project(const QKVDense& d, const DenseParams<ParamT, 1, 2>& p, const X& x, Index batch,
                       const char* which) const {
    const Shape xs = shape_of(x);
    const Shape kexp{xs.back(), d.config().features[0], d.config().features[1]};
    if (shape_of(p.kernel) != kexp)
      throw std::invalid_argument(name() + ": " + which + "/kernel has shape " + to_string(shape_of(p.kernel)) +
                                  ", inputs of shape " + to_string(xs) + " need " + to_string(kexp));
    using I = typename detail::tensor_traits<X>::scalar;
    Tensor<T, 4> y(batch, xs[xs.size() - 2], d.config().features[0], d.config().features[1]);
    d.check_params(p, xs);
    d.template apply_raw<I>(p, x.data(), xs, y.data());
    return y;
  }

  void normalize(const LayerNormParams<ParamT>& p, Tensor<T, 4>& x, const char* which) const {
    if (p.scale.dimension(0) != x.dimension(3))
      throw std::invalid_argument(name() + ": " + which + "/scale has shape " + to_string(shape_of(p.scale)) +
                                  ", expected (" + std::to_string(x.dimension(3)) + ",)");
    qk_norm().apply_raw(p, x.data(), shape_of(x), x.data());
  }

  // The caller's mask seen at rank 4 ([B or 1, heads or 1, q or 1, kv or 1]) over the
  // flattened batch. A view when the mask's batch dims are all 1 or all equal to the
  // batch; otherwise expanded into `storage`.
  ArrayRef<bool> flatten_mask(const ArrayRef<bool>& mask, const Shape& batch, Index lq, Index lk,
                              Tensor<bool, 4>& storage) const {
    if (!mask) return {};
    Shape w = batch;
    w.insert(w.end(), {config_.num_heads, lq, lk});
    const auto strides = detail::broadcast_strides(mask.shape(), w, name() + ": mask");
    const std::size_t nb = batch.size();
    Shape m(w.size(), 1);  // the mask's shape right-aligned to w
    std::copy(mask.shape().begin(), mask.shape().end(), m.end() - mask.rank());
    const Shape tail(m.end() - 3, m.end());
    const Index B = num_elements(batch);
    const bool all_one = std::all_of(m.begin(), m.begin() + nb, [](Index d) { return d == 1; });
    const bool all_eq = std::equal(m.begin(), m.begin() + nb, batch.begin());
    if (all_one || all_eq) return ArrayRef<bool>(mask.data(), {all_one ? 1 : B, tail[0], tail[1], tail[2]});
    storage.resize(B, tail[0], tail[1], tail[2]);
    const auto offs = detail::leading_offsets(w, strides, nb);
    const Index inner = tail[0] * tail[1] * tail[2];
    // Within one batch entry the mask's trailing three dims are contiguous.
    for (Index b = 0; b < B; ++b)
      std::copy(mask.data() + offs[static_cast<std::size_t>(b)], mask.data() + offs[static_cast<std::size_t>(b)] + inner,
                storage.data() + b * inner);
    return ArrayRef<bool>(storage);
  }

  template <class XQ, class XK, class XV>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply_impl(const Params& params, Cache* cache, const XQ& inputs_q,
                                                       const XK& inputs_k, const XV& inputs_v,
                                                       const CallOptions<T>& call) const {
    check_inputs<XQ, XK, XV>();
    constexpr int N = detail::tensor_traits<XQ>::rank;
    const Shape qs = shape_of(inputs_q), ks = shape_of(inputs_k), vs = shape_of(inputs_v);
    check_shapes(qs, ks, vs);
    const std::string n = name();
    const Index fq = qs.back(), dh = head_dim(fq), H = config_.num_heads;
    const Shape batch(qs.begin(), qs.end() - 2);
    const Index B = num_elements(batch), lq = qs[qs.size() - 2];

    const QKVDense qd = qkv_dense(fq);
    Tensor<T, 4> query = project(qd, params.query, inputs_q, B, "query");
    Tensor<T, 4> key = project(qd, params.key, inputs_k, B, "key");
    Tensor<T, 4> value = project(qd, params.value, inputs_v, B, "value");
    if (config_.normalize_qk) {
      normalize(params.query_ln, query, "query_ln");
      normalize(params.key_ln, key, "key_ln");
    }

    // Flax: deterministic matters (and must be given once) only when dropout_rate > 0.
    bool deterministic = true;
    if (config_.dropout_rate > 0.0) {
      if (config_.deterministic && call.deterministic)
        throw std::invalid_argument(n + ": Parameter \"deterministic\" was passed to the constructor and at call time. Should be passed just once.");
      if (!config_.deterministic && !call.deterministic)
        throw std::invalid_argument(n + ": Parameter \"deterministic\" must be passed to the constructor or at call time.");
      deterministic = config_.deterministic ? *config_.deterministic : *call.deterministic;
      if (!deterministic && !call.dropout_rng)
        throw std::invalid_argument(n + ": dropout_rate=" + std::to_string(config_.dropout_rate) +
                                    " with deterministic=false needs a dropout_rng");
    }

    Tensor<bool, 4> mask_storage;
    ArrayRef<bool> mask;
    const Tensor<T, 4>* k_used = &key;
    const Tensor<T, 4>* v_used = &value;
    if (cache) {
      // One decode step (Flax's `if self.decode:` branch, cache initialised).
      const Index L = cache->max_length();
      const Shape cshape{cache->cached_key.dimension(0), L, cache->cached_key.dimension(2), cache->cached_key.dimension(3)};
      Shape expected = cache->batch;
      expected.insert(expected.end(), {1, cshape[2], cshape[3]});
      Shape got = batch;
      got.insert(got.end(), {lq, H, dh});
      if (expected != got)
        throw std::invalid_argument(n + ": Autoregressive cache shape error, expected query shape " +
                                    to_string(expected) + " instead got " + to_string(got) + ".");
      if (shape_of(cache->cached_value) != cshape)
        throw std::invalid_argument(n + ": cached_value has shape " + to_string(shape_of(cache->cached_value)) +
                                    ", cached_key " + to_string(cshape));
      const Index cur = cache->cache_index;
      if (cur < 0 || cur >= L)
        throw cache_overflow(n + ": decode step at cache_index " + std::to_string(cur) +
                             " does not fit a cache of max_length " + std::to_string(L) +
                             " (Flax would overwrite the last slot); the cache is unchanged");
      // Check the caller's mask before touching the cache, so a bad mask changes nothing.
      ArrayRef<bool> user = flatten_mask(call.mask, batch, 1, L, mask_storage);
      const Index hm = user ? user.shape()[1] : 1;
      for (Index b = 0; b < B; ++b) {
        const Index row = H * dh;
        std::copy(key.data() + b * row, key.data() + (b + 1) * row, cache->cached_key.data() + (b * L + cur) * row);
        std::copy(value.data() + b * row, value.data() + (b + 1) * row, cache->cached_value.data() + (b * L + cur) * row);
      }
      cache->cache_index = static_cast<std::int32_t>(cur + 1);
      // combine_masks(mask, arange(max_length) <= cur_index broadcast to [batch..., 1, 1, L]).
      Tensor<bool, 4> combined(B, hm, 1, L);
      for (Index b = 0; b < B; ++b)
        for (Index h = 0; h < hm; ++h)
          for (Index j = 0; j < L; ++j) {
            bool keep = j <= cur;
            if (user) {
              const auto& us = user.shape();
              const Index off = ((us[0] == 1 ? 0 : b) * us[1] + (us[1] == 1 ? 0 : h)) * us[2] * us[3] +
                                (us[3] == 1 ? 0 : j);
              keep = keep && user.data()[off];
            }
            combined(b, h, 0, j) = keep;
          }
      mask_storage = std::move(combined);
      mask = ArrayRef<bool>(mask_storage);
      k_used = &cache->cached_key;
      v_used = &cache->cached_value;
    } else {
      mask = flatten_mask(call.mask, batch, lq, ks[ks.size() - 2], mask_storage);
    }

    AttentionOptions<T> opt;
    opt.mask = mask;
    opt.broadcast_dropout = config_.broadcast_dropout;
    opt.dropout_rate = config_.dropout_rate;
    opt.deterministic = deterministic;
    opt.precision = config_.precision;
    opt.force_fp32_for_softmax = config_.force_fp32_for_softmax;
    const Index lk = k_used->dimension(1);
    if (!deterministic) {
      // Present the keep-mask shape Flax draws at the caller's batch rank, so a JAX key or
      // a recorded mask sees exactly Flax's shape.
      Shape flax_shape;
      if (config_.broadcast_dropout) {
        flax_shape.assign(batch.size() + 1, 1);
        flax_shape.insert(flax_shape.end(), {lq, lk});
      } else {
        flax_shape = batch;
        flax_shape.insert(flax_shape.end(), {H, lq, lk});
      }
      const DropoutRng& src = call.dropout_rng;
      opt.dropout_rng = [&src, flax_shape](double p, const Shape& s, bool* keep) {
        src(p, num_elements(s) == num_elements(flax_shape) ? flax_shape : s, keep);
      };
    }
    if (call.sow_weights) {
      opt.sow_weights = [&call, &batch, H, lq, lk](ArrayRef<T> w) {
        Shape s = batch;
        s.insert(s.end(), {H, lq, lk});
        call.sow_weights(ArrayRef<T>(w.data(), s));
      };
    }

    const Tensor<T, 4> x = config_.attention_fn(query, *k_used, *v_used, opt);
    const Shape want{B, lq, H, dh};
    if (shape_of(x) != want)
      throw std::invalid_argument(n + ": attention_fn returned shape " + to_string(shape_of(x)) + ", expected " +
                                  to_string(want));
    const OutDense od = out_dense(fq);
    Shape ys = batch;
    ys.insert(ys.end(), {lq, out_features(fq)});
    if (shape_of(params.out.kernel) != Shape{H, dh, out_features(fq)})
      throw std::invalid_argument(n + ": out/kernel has shape " + to_string(shape_of(params.out.kernel)) +
                                  ", expected " + to_string(Shape{H, dh, out_features(fq)}));
    Tensor<T, N> y(to_dims<N>(ys));
    od.check_params(params.out, shape_of(x));
    od.template apply_raw<T>(params.out, x.data(), shape_of(x), y.data());
    return y;
  }

  Config config_;
  const char* name_;
};

// flax.linen.SelfAttention: MultiHeadDotProductAttention with inputs_k = inputs_v = inputs_q.
template <class T, class ParamT = T>
class SelfAttention : private MultiHeadDotProductAttention<T, ParamT> {
  using Base = MultiHeadDotProductAttention<T, ParamT>;

 public:
  using typename Base::Cache;
  using typename Base::Config;
  using typename Base::Params;
  using typename Base::Variables;

  explicit SelfAttention(Config config) : Base(std::move(config), "SelfAttention") {}
  using Base::config;
  using Base::init_cache;
  using Base::head_dim;
  using Base::out_features;
  using Base::qkv_features;

  // init(rng, inputs_q): see MultiHeadDotProductAttention::init.
  template <class Rng, class XQ>
  Variables init(Rng&& rng, const XQ& inputs_q) const {
    return Base::init(std::forward<Rng>(rng), inputs_q);
  }
  // apply(variables, inputs_q, {mask, deterministic, dropout_rng, sow_weights}).
  template <class XQ>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(variables, inputs_q, call);
  }
  template <class XQ>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(variables, inputs_q, call);
  }
  template <class XQ>
  Tensor<T, detail::tensor_traits<XQ>::rank> apply(const Params& params, Cache& cache, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(params, cache, inputs_q, call);
  }
  // The module as a MultiHeadDotProductAttention (e.g. to pass where one is expected).
  const Base& as_multi_head() const { return *this; }
};

}  // namespace linen

#endif  // LINEN_ATTENTION_HPP
