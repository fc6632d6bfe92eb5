// SPDX-License-Identifier: Apache-2.0
//
// flax.linen.MultiHeadDotProductAttention and flax.linen.SelfAttention: thin modules over
// the functional core. DenseGeneral projects the inputs to heads, optional LayerNorms
// normalise q and k (normalize_qk), an optional autoregressive cache serves decoding,
// `attention_fn` (default linen::dot_product_attention) attends, and a DenseGeneral
// projects back.
#ifndef LINEN_ATTENTION_HPP
#define LINEN_ATTENTION_HPP

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "dense.hpp"
#include "detail/broadcast.hpp"
#include "detail/fused_attention.hpp"
#include "detail/fused_projection.hpp"
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
  // linen's addition (not a Flax field): threads for the projections and the fused
  // attention kernel (see AttentionOptions::thread_pool), the calling thread being one of
  // them. null = the calling thread only: linen never starts threads of its own. Must
  // outlive every call; one pool may serve many modules and callers at once.
  Eigen::ThreadPoolInterface* thread_pool = nullptr;
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

template <class T, class ParamT>
class MultiHeadDotProductAttention;

// Reusable buffers for MultiHeadDotProductAttention::decode_step (and SelfAttention's):
// the projections, the attention kernel's scratch and the shapes last validated. Keep one
// per decoding thread (a workspace is not thread-safe) and pass it to every step; any
// module and cache may use it, and it grows to the largest step it has served.
template <class T>
class DecodeWorkspace {
 public:
  DecodeWorkspace() = default;

 private:
  template <class, class>
  friend class MultiHeadDotProductAttention;
  using C = accum_t<T>;
  std::vector<T> q, k, v, x;          // [B, H * head_dim] each
  detail::DenseScratch<C> dense;      // half types' promoted copies
  detail::RowScratch<C> row;          // the decode kernel's
  std::vector<Index> validated, now;  // the shapes last checked; this step's
  std::array<Index, 4> mask_dims{};   // the caller's mask at rank 4: [B|1, H|1, 1, L|1]
  std::vector<Index> mask_offsets;    // when it must be gathered: each batch entry's start
  std::vector<unsigned char> mask_storage;
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
      throw linen::invalid_argument(n + ": num_heads must be positive, got " + std::to_string(config_.num_heads));
    if (config_.qkv_features && *config_.qkv_features <= 0)
      throw linen::invalid_argument(n + ": qkv_features must be positive, got " + std::to_string(*config_.qkv_features));
    if (config_.qkv_features && *config_.qkv_features % config_.num_heads != 0)
      throw linen::invalid_argument(n + ": Memory dimension (" + std::to_string(*config_.qkv_features) +
                                  ") must be divisible by number of heads (" + std::to_string(config_.num_heads) + ")");
    if (config_.out_features && *config_.out_features <= 0)
      throw linen::invalid_argument(n + ": out_features must be positive, got " + std::to_string(*config_.out_features));
    if (!(config_.dropout_rate >= 0.0 && config_.dropout_rate < 1.0))
      throw linen::invalid_argument(n + ": dropout_rate must be in [0, 1), got " + std::to_string(config_.dropout_rate));
    if (!config_.attention_fn) throw linen::invalid_argument(n + ": attention_fn is empty");
    if (!config_.kernel_init) throw linen::invalid_argument(n + ": kernel_init is empty");
    if (config_.use_bias && !config_.bias_init) throw linen::invalid_argument(n + ": bias_init is empty");
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
    check_inputs<XQ, XQ, XQ>();
    return init(std::forward<Rng>(rng), inputs_q, inputs_q, inputs_q);
  }
  template <class Rng, class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
  Variables init(Rng&& rng, const XQ& inputs_q, const XK& inputs_k) const {
    check_inputs<XQ, XK, XK>();
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
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    check_inputs<XQ, XQ, XQ>();
    return apply(variables, inputs_q, inputs_q, inputs_q, call);
  }
  template <class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const XK& inputs_k, const CallOptions<T>& call = {}) const {
    check_inputs<XQ, XK, XK>();
    return apply(variables, inputs_q, inputs_k, inputs_k, call);
  }
  template <class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const XK& inputs_k, const XV& inputs_v,
                                                  const CallOptions<T>& call = {}) const {
    if (config_.decode)
      throw linen::invalid_argument(name() + ": decode=true updates the cache: pass the variables mutable");
    return apply_impl(variables.params, nullptr, inputs_q, inputs_k, inputs_v, call);
  }
  // The mutable overloads: the decode cache is updated in place.
  template <class XQ>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    check_inputs<XQ, XQ, XQ>();
    return apply(variables, inputs_q, inputs_q, inputs_q, call);
  }
  template <class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q, const XK& inputs_k,
                                                  const CallOptions<T>& call = {}) const {
    check_inputs<XQ, XK, XK>();
    return apply(variables, inputs_q, inputs_k, inputs_k, call);
  }
  template <class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q, const XK& inputs_k,
                                                  const XV& inputs_v, const CallOptions<T>& call = {}) const {
    if (config_.decode && !variables.cache)
      throw linen::invalid_argument(name() + ": decode=true needs variables.cache (make it with init)");
    return apply_impl(variables.params, config_.decode ? &*variables.cache : nullptr, inputs_q, inputs_k,
                      inputs_v, call);
  }

  // The same with the cache apart from the parameters, so that one set of parameters
  // serves many concurrent decoders (each with its own cache).
  template <class XQ>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Params& params, Cache& cache, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    check_inputs<XQ, XQ, XQ>();
    if (!config_.decode) throw linen::invalid_argument(name() + ": a cache is only used with decode=true");
    return apply_impl(params, &cache, inputs_q, inputs_q, inputs_q, call);
  }

  // One decode step into caller-owned memory, with reusable buffers: computes what
  // apply(params, cache, inputs_q, call) returns and writes it to `out`
  //   inputs_q: [batch..., 1, features]; out: [batch..., 1, out_features], a linen::Tensor
  //   of that shape or a TensorMap over the caller's memory.
  // The shapes are validated on the first step and whenever they change (same exceptions
  // as apply); the cache is checked for room on every step (linen::cache_overflow, cache
  // unchanged). Once `workspace` has served a step of these shapes (the warm-up), a step
  // allocates no heap memory, provided that config.thread_pool is null (Eigen's pool
  // allocates its tasks), the call is deterministic or dropout_rate is 0, it does not sow
  // weights, and attention_fn is the default; otherwise it runs apply and copies (and
  // allocates). Equal, bit for bit, to apply's decode step.
  template <class XQ, class Out>
  void decode_step(const Params& params, Cache& cache, const XQ& inputs_q, Out&& out, DecodeWorkspace<T>& workspace,
                   const CallOptions<T>& call = {}) const {
    using O = std::remove_cv_t<std::remove_reference_t<Out>>;
    check_inputs<XQ, XQ, XQ>();
    constexpr int N = detail::tensor_traits<XQ>::rank;
    static_assert(detail::is_tensor_v<O> && detail::tensor_traits<O>::rank == N &&
                      std::is_same_v<typename detail::tensor_traits<O>::scalar, T> &&
                      !std::is_const_v<std::remove_pointer_t<decltype(out.data())>>,
                  "linen: decode_step's out must be a writable linen::Tensor<T, N> (or TensorMap of one) of "
                  "the inputs' rank");
    if (!config_.decode) throw linen::invalid_argument(name() + ": a cache is only used with decode=true");
    DecodeWorkspace<T>& ws = workspace;
    const bool deterministic = resolve_deterministic(call);
    if (!direct_decode(deterministic, call)) {
      const Shape want = decode_out_shape(shape_of(inputs_q));
      if (shape_of(out) != want)
        throw linen::invalid_argument(name() + ": decode_step's out has shape " + to_string(shape_of(out)) +
                                    ", expected " + to_string(want));
      const Tensor<T, N> y = apply_impl(params, &cache, inputs_q, inputs_q, inputs_q, call);
      std::copy(y.data(), y.data() + y.size(), out.data());
      return;
    }
    // The shapes of this step, compared with those last validated (no allocation once
    // the vector has grown).
    auto& now = ws.now;
    now.clear();
    auto put_dims = [&now](const auto& t) {
      for (int i = 0; i < std::decay_t<decltype(t)>::NumDimensions; ++i) now.push_back(t.dimension(i));
    };
    // the module (and the fields its checks read: another module may live at this address)
    now.push_back(static_cast<Index>(reinterpret_cast<std::uintptr_t>(this)));
    now.insert(now.end(), {config_.num_heads, config_.qkv_features.value_or(-1), config_.out_features.value_or(-1),
                           Index{config_.use_bias}, Index{config_.normalize_qk}});
    put_dims(inputs_q);
    put_dims(out);
    now.push_back(static_cast<Index>(cache.batch.size()));
    now.insert(now.end(), cache.batch.begin(), cache.batch.end());
    for (const auto* t : {&cache.cached_key, &cache.cached_value}) put_dims(*t);
    for (const auto* p : {&params.query, &params.key, &params.value}) {
      put_dims(p->kernel);
      put_dims(p->bias);
    }
    put_dims(params.out.kernel);
    put_dims(params.out.bias);
    put_dims(params.query_ln.scale);
    put_dims(params.key_ln.scale);
    now.push_back(call.mask ? call.mask.rank() : -1);
    if (call.mask) now.insert(now.end(), call.mask.shape().begin(), call.mask.shape().end());
    if (now != ws.validated) {
      ws.validated.clear();
      const Shape qs = shape_of(inputs_q);
      check_shapes(qs, qs, qs);
      const Index fq = qs.back(), dh = head_dim(fq);
      const Shape batch(qs.begin(), qs.end() - 2);
      check_cache(cache, batch, qs[qs.size() - 2], dh);
      const QKVDense qd = qkv_dense(fq);
      check_projection(qd, params.query, qs, "query");
      check_projection(qd, params.key, qs, "key");
      check_projection(qd, params.value, qs, "value");
      if (config_.normalize_qk) {
        check_norm(params.query_ln, dh, "query_ln");
        check_norm(params.key_ln, dh, "key_ln");
      }
      check_out(params, dh, fq);
      const Shape want = decode_out_shape(qs);
      if (shape_of(out) != want)
        throw linen::invalid_argument(name() + ": decode_step's out has shape " + to_string(shape_of(out)) +
                                    ", expected " + to_string(want));
      if (call.mask) {
        MaskPlan plan = mask_plan(call.mask, batch, 1, cache.max_length());
        ws.mask_dims = plan.dims;
        ws.mask_offsets = std::move(plan.offsets);
        ws.mask_storage.resize(static_cast<std::size_t>(num_elements(batch) * plan.dims[1] * plan.dims[3]));
      }
      ws.validated = now;
    }
    check_cache_index(cache);

    const Index B = cache.cached_key.dimension(0), H = config_.num_heads, dh = cache.cached_key.dimension(3),
                F = H * dh;
    for (auto* buf : {&ws.q, &ws.k, &ws.v, &ws.x}) buf->resize(static_cast<std::size_t>(B * F));
    dense_rows<QKVDense>(params.query, inputs_q.data(), B, ws.q.data(), &ws.dense, true);
    dense_rows<QKVDense>(params.key, inputs_q.data(), B, ws.k.data(), &ws.dense, true);
    dense_rows<QKVDense>(params.value, inputs_q.data(), B, ws.v.data(), &ws.dense, true);
    if (config_.normalize_qk) {
      qk_norm_instance().apply_rows(params.query_ln, ws.q.data(), B * H, dh, ws.q.data());
      qk_norm_instance().apply_rows(params.key_ln, ws.k.data(), B * H, dh, ws.k.data());
    }
    detail::FusedView<bool> mask;
    if (call.mask) {
      const bool* m = call.mask.data();
      if (!ws.mask_offsets.empty()) {
        gather_mask(ws.mask_dims, ws.mask_offsets, m, reinterpret_cast<bool*>(ws.mask_storage.data()));
        m = reinterpret_cast<const bool*>(ws.mask_storage.data());
      }
      mask = decode_mask_view(m, ws.mask_dims);
    }
    decode_attend(cache, ws.q.data(), ws.k.data(), ws.v.data(), mask, ws.x.data(), &ws.row);
    project_out(params, ws.x.data(), B, out.data(), &ws.dense, true);
  }

  // A zero decode cache for `batch` ([batch...]) sequences of up to `max_length`
  // positions, sized from the parameters (what init makes with decode=true; use it with
  // parameters loaded from a checkpoint).
  Cache init_cache(const Params& params, const Shape& batch, Index max_length) const {
    if (max_length <= 0)
      throw linen::invalid_argument(name() + ": max_length must be positive, got " + std::to_string(max_length));
    const Shape ks = shape_of(params.key.kernel);
    if (ks[1] != config_.num_heads)
      throw linen::invalid_argument(name() + ": key/kernel has shape " + to_string(ks) + ", num_heads is " +
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
      throw linen::invalid_argument(name() + ": Memory dimension (" + std::to_string(f) +
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
      throw linen::invalid_argument(n + ": inputs must share their batch dims [batch..., length, features]; inputs_q " +
                                  to_string(q) + ", inputs_k " + to_string(k) + ", inputs_v " + to_string(v));
    if (k[k.size() - 2] != v[v.size() - 2])
      throw linen::invalid_argument(n + ": inputs_k and inputs_v lengths differ: " + to_string(k) + " vs " + to_string(v));
    for (const Shape* s : {&q, &k, &v})
      if (s->back() <= 0)
        throw linen::invalid_argument(n + ": input features must be positive, got shape " + to_string(*s));
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

  // [batch..., 1, out_features] for a decode step's inputs_q [batch..., 1, features].
  Shape decode_out_shape(const Shape& qs) const {
    Shape s(qs.begin(), qs.end() - 2);
    s.insert(s.end(), {1, out_features(qs.back())});
    return s;
  }

  // Throws unless p fits the projection of inputs of shape xs ([batch..., features]).
  void check_projection(const QKVDense& d, const DenseParams<ParamT, 1, 2>& p, const Shape& xs,
                        const char* which) const {
    const Shape kexp{xs.back(), d.config().features[0], d.config().features[1]};
    if (shape_of(p.kernel) != kexp)
      throw linen::invalid_argument(name() + ": " + which + "/kernel has shape " + to_string(shape_of(p.kernel)) +
                                  ", inputs of shape " + to_string(xs) + " need " + to_string(kexp));
    d.check_params(p, xs);
  }
  void check_norm(const LayerNormParams<ParamT>& p, Index dh, const char* which) const {
    if (p.scale.dimension(0) != dh)
      throw linen::invalid_argument(name() + ": " + which + "/scale has shape " + to_string(shape_of(p.scale)) +
                                  ", expected (" + std::to_string(dh) + ",)");
  }
  void check_out(const Params& params, Index dh, Index fq) const {
    const Index H = config_.num_heads;
    if (shape_of(params.out.kernel) != Shape{H, dh, out_features(fq)})
      throw linen::invalid_argument(name() + ": out/kernel has shape " + to_string(shape_of(params.out.kernel)) +
                                  ", expected " + to_string(Shape{H, dh, out_features(fq)}));
    out_dense(fq).check_params(params.out, Shape{1, H, dh});
  }
  // The cache against a step's [batch..., lq, H, dh] query (Flax's check, and the value's).
  void check_cache(const Cache& cache, const Shape& batch, Index lq, Index dh) const {
    const std::string n = name();
    const Shape cshape = shape_of(cache.cached_key);
    Shape expected = cache.batch;
    expected.insert(expected.end(), {1, cshape[2], cshape[3]});
    Shape got = batch;
    got.insert(got.end(), {lq, config_.num_heads, dh});
    if (expected != got || num_elements(cache.batch) != cshape[0])
      throw linen::invalid_argument(n + ": Autoregressive cache shape error, expected query shape " +
                                  to_string(expected) + " instead got " + to_string(got) + ".");
    if (shape_of(cache.cached_value) != cshape)
      throw linen::invalid_argument(n + ": cached_value has shape " + to_string(shape_of(cache.cached_value)) +
                                  ", cached_key " + to_string(cshape));
  }
  void check_cache_index(const Cache& cache) const {
    const Index cur = cache.cache_index, L = cache.max_length();
    if (cur < 0 || cur >= L)
      throw cache_overflow(name() + ": decode step at cache_index " + std::to_string(cur) +
                           " does not fit a cache of max_length " + std::to_string(L) +
                           " (Flax would overwrite the last slot); the cache is unchanged");
  }

  // Flax: deterministic matters (and must be given once) only when dropout_rate > 0.
  bool resolve_deterministic(const CallOptions<T>& call) const {
    if (!(config_.dropout_rate > 0.0)) return true;
    if (config_.deterministic && call.deterministic)
      throw linen::invalid_argument(name() + ": Parameter \"deterministic\" was passed to the constructor and at call time. Should be passed just once.");
    if (!config_.deterministic && !call.deterministic)
      throw linen::invalid_argument(name() + ": Parameter \"deterministic\" must be passed to the constructor or at call time.");
    const bool deterministic = config_.deterministic ? *config_.deterministic : *call.deterministic;
    if (!deterministic && !call.dropout_rng)
      throw linen::invalid_argument(name() + ": dropout_rate=" + std::to_string(config_.dropout_rate) +
                                  " with deterministic=false needs a dropout_rng");
    return deterministic;
  }

  // A decode step can attend over the cache directly (the fused row kernel on the first
  // cache_index + 1 positions) when linen's own attention runs without dropout or sowing.
  bool direct_decode(bool deterministic, const CallOptions<T>& call) const {
    return deterministic && !call.sow_weights && config_.attention_fn.template target<DotProductAttention>() != nullptr;
  }

  // y[M, N] = x[M, K] . kernel (+ bias) for a DenseGeneral's params: rows spread over
  // config.thread_pool for float/double with matching types, else DenseGeneral's own code.
  // Decode steps (by_row) take one vector product per row on the calling thread: the same
  // arithmetic in apply and decode_step, and no allocation.
  template <class Dense, class I>
  void dense_rows(const typename Dense::Params& p, const I* x, Index M, T* y,
                  detail::DenseScratch<accum_t<T>>* scratch, bool by_row) const {
    if constexpr (std::is_same_v<I, T> && std::is_same_v<ParamT, T> && std::is_same_v<accum_t<T>, T>) {
      if (config_.thread_pool && !by_row) {
        Index K = 1;
        for (int i = 0; i < Dense::kAxes; ++i) K *= p.kernel.dimension(i);
        const Index N = p.kernel.size() / K;
        detail::project_rows<T>(config_.thread_pool, M, K, N, x, K, p.kernel.data(), N,
                                config_.use_bias ? p.bias.data() : nullptr, y, N);
        return;
      }
    }
    Dense::template apply_rows<I>(p, config_.use_bias, x, M, y, scratch, by_row);
  }

  // Projects x [batch..., len, features] to [B, len, heads, head_dim] (batch flattened).
  template <class X>
  Tensor<T, 4> project(const QKVDense& d, const DenseParams<ParamT, 1, 2>& p, const X& x, Index batch,
                       const char* which, bool by_row) const {
    const Shape xs = shape_of(x);
    check_projection(d, p, xs, which);
    Tensor<T, 4> y(batch, xs[xs.size() - 2], d.config().features[0], d.config().features[1]);
    dense_rows<QKVDense>(p, x.data(), batch * xs[xs.size() - 2], y.data(), nullptr, by_row);
    return y;
  }

  static const Norm& qk_norm_instance() {
    static const Norm norm = qk_norm();
    return norm;
  }
  void normalize(const LayerNormParams<ParamT>& p, Tensor<T, 4>& x, const char* which) const {
    check_norm(p, x.dimension(3), which);
    qk_norm_instance().apply_rows(p, x.data(), x.size() / x.dimension(3), x.dimension(3), x.data());
  }

  // How the caller's mask is seen at rank 4 over the flattened batch: dims [B or 1,
  // heads or 1, q or 1, kv or 1]; `offsets` empty when the mask's batch dims are all 1 or
  // all equal to the batch (a view), else each batch entry's first element (gathered).
  struct MaskPlan {
    std::array<Index, 4> dims{};
    std::vector<Index> offsets;
  };
  MaskPlan mask_plan(const ArrayRef<bool>& mask, const Shape& batch, Index lq, Index lk) const {
    Shape w = batch;
    w.insert(w.end(), {config_.num_heads, lq, lk});
    const auto strides = detail::broadcast_strides(mask.shape(), w, name() + ": mask");
    const std::size_t nb = batch.size();
    Shape m(w.size(), 1);  // the mask's shape right-aligned to w
    std::copy(mask.shape().begin(), mask.shape().end(), m.end() - mask.rank());
    const bool all_one = std::all_of(m.begin(), m.begin() + nb, [](Index d) { return d == 1; });
    const bool all_eq = std::equal(m.begin(), m.begin() + nb, batch.begin());
    MaskPlan plan;
    plan.dims = {all_one ? 1 : num_elements(batch), m[nb], m[nb + 1], m[nb + 2]};
    if (!all_one && !all_eq) plan.offsets = detail::leading_offsets(w, strides, nb);
    return plan;
  }
  // Gathers a planned mask's batch entries into `dst` (within one entry the trailing three
  // dims are contiguous).
  static void gather_mask(const std::array<Index, 4>& dims, const std::vector<Index>& offsets, const bool* src,
                          bool* dst) {
    const Index inner = dims[1] * dims[2] * dims[3];
    for (std::size_t b = 0; b < offsets.size(); ++b)
      std::copy(src + offsets[b], src + offsets[b] + inner, dst + static_cast<Index>(b) * inner);
  }
  // The caller's mask at rank 4: a view, or gathered into `storage`.
  ArrayRef<bool> flatten_mask(const ArrayRef<bool>& mask, const Shape& batch, Index lq, Index lk,
                              Tensor<bool, 4>& storage) const {
    if (!mask) return {};
    const MaskPlan plan = mask_plan(mask, batch, lq, lk);
    const auto& d = plan.dims;
    if (plan.offsets.empty()) return ArrayRef<bool>(mask.data(), {d[0], d[1], d[2], d[3]});
    storage.resize(static_cast<Index>(plan.offsets.size()), d[1], d[2], d[3]);
    gather_mask(plan.dims, plan.offsets, mask.data(), storage.data());
    return ArrayRef<bool>(storage);
  }
  // A rank-4 mask [B|1, H|1, 1, L|1] as the fused kernel reads it.
  static detail::FusedView<bool> decode_mask_view(const bool* data, const std::array<Index, 4>& d) {
    detail::FusedView<bool> v;
    v.data = data;
    v.sb = d[0] == 1 ? 0 : d[1] * d[2] * d[3];
    v.sh = d[1] == 1 ? 0 : d[2] * d[3];
    v.sq = 0;
    v.sk = d[3] == 1 ? 0 : 1;
    return v;
  }

  // One decode step's attention over the cache (checked by the caller): writes k and v
  // ([B, H * head_dim] rows) at cache_index, advances it, and attends q ([B, H, head_dim])
  // to the cache with Flax's mask (positions past the index, and the caller's `mask`)
  // into out ([B, H, head_dim]). Positions past the index are never read unless a row is
  // masked everywhere else: then, as in Flax, it averages all max_length slots.
  void decode_attend(Cache& cache, const T* q, const T* k, const T* v, const detail::FusedView<bool>& mask, T* out,
                     detail::RowScratch<accum_t<T>>* scratch) const {
    const Index B = cache.cached_key.dimension(0), L = cache.max_length(), H = cache.cached_key.dimension(2),
                dh = cache.cached_key.dimension(3), F = H * dh, cur = cache.cache_index;
    for (Index b = 0; b < B; ++b) {
      std::copy(k + b * F, k + (b + 1) * F, cache.cached_key.data() + (b * L + cur) * F);
      std::copy(v + b * F, v + (b + 1) * F, cache.cached_value.data() + (b * L + cur) * F);
    }
    cache.cache_index = static_cast<std::int32_t>(cur + 1);
    detail::FusedAttentionArgs<T> a;
    a.B = B;
    a.H = H;
    a.Lq = 1;
    a.Lk = L;
    a.D = a.Dv = dh;
    a.query = q;
    a.q_sb = a.q_sl = F;
    a.q_sh = dh;
    a.key = cache.cached_key.data();
    a.value = cache.cached_value.data();
    a.k_sb = a.v_sb = L * F;
    a.k_sl = a.v_sl = F;
    a.k_sh = a.v_sh = dh;
    a.out = out;
    a.o_sb = a.o_sl = F;
    a.o_sh = dh;
    a.query_scale = detail::depth_scale<T>(dh);
    a.mask = mask;
    a.causal = true;  // Flax's arange(max_length) <= cache_index
    a.causal_offset = cur;
    a.causal_hides_values = true;  // positions past the index are never read
    a.pool = config_.thread_pool;
    a.row_scratch = scratch;
    detail::fused_attention<T>(a);
  }

  // A decode step's cache slot and index as they were before the step, put back on
  // destruction unless disarmed (the step failed after writing the slot).
  class SlotUndo {
   public:
    SlotUndo() = default;
    SlotUndo(const SlotUndo&) = delete;
    SlotUndo& operator=(const SlotUndo&) = delete;
    void arm(Cache& cache) {
      cache_ = &cache;
      index_ = cache.cache_index;
      const Index B = cache.cached_key.dimension(0), L = cache.max_length(),
                  F = cache.cached_key.dimension(2) * cache.cached_key.dimension(3);
      for (auto [src, dst] : {std::pair{&cache.cached_key, &key_}, std::pair{&cache.cached_value, &value_}}) {
        dst->resize(static_cast<std::size_t>(B * F));
        for (Index b = 0; b < B; ++b)
          std::copy(src->data() + (b * L + index_) * F, src->data() + (b * L + index_ + 1) * F, dst->data() + b * F);
      }
    }
    void disarm() { cache_ = nullptr; }
    ~SlotUndo() {
      if (!cache_) return;
      const Index B = cache_->cached_key.dimension(0), L = cache_->max_length(),
                  F = cache_->cached_key.dimension(2) * cache_->cached_key.dimension(3);
      for (auto [src, dst] : {std::pair{&key_, &cache_->cached_key}, std::pair{&value_, &cache_->cached_value}})
        for (Index b = 0; b < B; ++b)
          std::copy(src->data() + b * F, src->data() + (b + 1) * F, dst->data() + (b * L + index_) * F);
      cache_->cache_index = index_;
    }

   private:
    Cache* cache_ = nullptr;
    std::int32_t index_ = 0;
    std::vector<T> key_, value_;
  };

  // The output projection: x [B * lq, H, head_dim] -> y [B * lq, out_features].
  void project_out(const Params& params, const T* x, Index rows, T* y, detail::DenseScratch<accum_t<T>>* scratch,
                   bool by_row) const {
    dense_rows<OutDense>(params.out, x, rows, y, scratch, by_row);
  }

  template <class XQ, class XK, class XV>
  Tensor<T, detail::signature_traits<XQ>::rank> apply_impl(const Params& params, Cache* cache, const XQ& inputs_q,
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
    Tensor<T, 4> query = project(qd, params.query, inputs_q, B, "query", cache != nullptr);
    Tensor<T, 4> key = project(qd, params.key, inputs_k, B, "key", cache != nullptr);
    Tensor<T, 4> value = project(qd, params.value, inputs_v, B, "value", cache != nullptr);
    if (config_.normalize_qk) {
      normalize(params.query_ln, query, "query_ln");
      normalize(params.key_ln, key, "key_ln");
    }
    check_out(params, dh, fq);  // before a decode step touches the cache
    const bool deterministic = resolve_deterministic(call);

    Shape ys = batch;
    ys.insert(ys.end(), {lq, out_features(fq)});
    Tensor<T, N> y(to_dims<N>(ys));
    Tensor<bool, 4> mask_storage;
    ArrayRef<bool> mask;
    SlotUndo undo;
    const Tensor<T, 4>* k_used = &key;
    const Tensor<T, 4>* v_used = &value;
    if (cache) {
      // One decode step (Flax's `if self.decode:` branch, cache initialised).
      check_cache(*cache, batch, lq, dh);
      check_cache_index(*cache);
      const Index L = cache->max_length(), cur = cache->cache_index;
      // Check the caller's mask before touching the cache, so a bad mask changes nothing.
      ArrayRef<bool> user = flatten_mask(call.mask, batch, 1, L, mask_storage);
      if (direct_decode(deterministic, call)) {
        std::array<Index, 4> md{1, 1, 1, 1};
        if (user) std::copy(user.shape().begin(), user.shape().end(), md.begin());
        Tensor<T, 4> x(B, 1, H, dh);
        decode_attend(*cache, query.data(), key.data(), value.data(),
                      user ? decode_mask_view(user.data(), md) : detail::FusedView<bool>{}, x.data(), nullptr);
        project_out(params, x.data(), B, y.data(), nullptr, true);
        return y;
      }
      const Index hm = user ? user.shape()[1] : 1;
      // attention_fn may still throw (or return a wrong shape): keep the slot's old bytes so
      // that the cache is restored then.
      undo.arm(*cache);
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
    opt.thread_pool = config_.thread_pool;
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
      throw linen::invalid_argument(n + ": attention_fn returned shape " + to_string(shape_of(x)) + ", expected " +
                                  to_string(want));
    undo.disarm();
    project_out(params, x.data(), B * lq, y.data(), nullptr, cache != nullptr);
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
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(variables, inputs_q, call);
  }
  template <class XQ>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(variables, inputs_q, call);
  }
  template <class XQ>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Params& params, Cache& cache, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(params, cache, inputs_q, call);
  }
  // decode_step(params, cache, inputs_q, out, workspace[, call]): see
  // MultiHeadDotProductAttention::decode_step.
  using Base::decode_step;
  // The module as a MultiHeadDotProductAttention (e.g. to pass where one is expected).
  const Base& as_multi_head() const { return *this; }
};

}  // namespace linen

#endif  // LINEN_ATTENTION_HPP
