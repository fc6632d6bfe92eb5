// SPDX-License-Identifier: Apache-2.0
//
// flax.linen.MultiHeadDotProductAttention (alias MultiHeadAttention, as in Flax) and
// flax.linen.SelfAttention: thin modules over the functional core. DenseGeneral projects
// the inputs to heads, optional LayerNorms normalise q and k (normalize_qk), an optional
// autoregressive cache serves decoding (decode.hpp), `attention_fn` (default
// linen::dot_product_attention) attends, and a DenseGeneral projects back. The module
// surface (Config, init(key or RngScope, inputs...), apply(params, inputs..., call)) is
// module.hpp's.
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

#include "attention_workspace.hpp"
#include "batch_cache.hpp"
#include "config.hpp"
#include "decode.hpp"
#include "dense.hpp"
#include "detail/attention_tape.hpp"
#include "detail/decode/batch_ops.hpp"
#include "detail/decode/cache_ops.hpp"
#include "detail/decode/paged_ops.hpp"
#include "detail/decode/ring_ops.hpp"
#include "detail/fused_attention.hpp"
#include "detail/fused_projection.hpp"
#include "detail/mask_plan.hpp"
#include "dot_product_attention.hpp"
#include "dropout_rng.hpp"
#include "errors.hpp"
#include "initializers.hpp"
#include "layer_norm.hpp"
#include "module.hpp"
#include "paged_cache.hpp"
#include "random.hpp"
#include "ring_cache.hpp"
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

// The shapes of an attention module's parameters, as Flax's MultiHeadDotProductAttention
// makes them for inputs of q_features, k_features and v_features features: the one
// statement of these rules, read by init, apply, decode_step, vjp and io's
// load_attention.
struct AttentionParamShapes {
  Index num_heads = 0, head_dim = 0, out_features = 0;
  bool use_bias = true, normalize_qk = false;
  Shape query_kernel, key_kernel, value_kernel;  // [features, num_heads, head_dim]
  Shape qkv_bias;                                // [num_heads, head_dim]       (use_bias)
  Shape out_kernel;                              // [num_heads, head_dim, out_features]
  Shape out_bias;                                // [out_features]              (use_bias)
  Shape ln_scale;                                // [head_dim]                  (normalize_qk)
};

namespace detail {

// head_dim = qkv_features (default q_features) / num_heads, out_features default
// q_features. Throws linen::invalid_argument ("<name>: Memory dimension (..) must be
// divisible by number of heads (..)", Flax's words) when qkv_features is not a multiple
// of num_heads.
template <class T, class ParamT>
AttentionParamShapes attention_param_shapes(const AttentionConfig<T, ParamT>& c, Index q_features, Index k_features,
                                            Index v_features, const std::string& name) {
  const Index H = c.num_heads, f = c.qkv_features.value_or(q_features);
  LINEN_ASSERT(H > 0);  // the module's constructor checks it
  if (f % H != 0)
    throw linen::invalid_argument(name + ": Memory dimension (" + std::to_string(f) +
                                  ") must be divisible by number of heads (" + std::to_string(H) + ")");
  AttentionParamShapes s;
  s.num_heads = H;
  s.head_dim = f / H;
  s.out_features = c.out_features.value_or(q_features);
  s.use_bias = c.use_bias;
  s.normalize_qk = c.normalize_qk;
  s.query_kernel = {q_features, H, s.head_dim};
  s.key_kernel = {k_features, H, s.head_dim};
  s.value_kernel = {v_features, H, s.head_dim};
  s.qkv_bias = {H, s.head_dim};
  s.out_kernel = {H, s.head_dim, s.out_features};
  s.out_bias = {s.out_features};
  s.ln_scale = {s.head_dim};
  return s;
}

// Throws linen::invalid_argument naming the parameter, its shape and the expected one
// unless `p` has the shapes `s` (inputs_q, inputs_k, inputs_v of shapes qs, ks, vs).
template <class ParamT>
void check_attention_params(const AttentionParams<ParamT>& p, const AttentionParamShapes& s, const Shape& qs,
                            const Shape& ks, const Shape& vs, const std::string& name) {
  const std::pair<const char*, const DenseParams<ParamT, 1, 2>*> qkv[] = {
      {"query", &p.query}, {"key", &p.key}, {"value", &p.value}};
  const Shape* kernels[] = {&s.query_kernel, &s.key_kernel, &s.value_kernel};
  const Shape* inputs[] = {&qs, &ks, &vs};
  for (int i = 0; i < 3; ++i) {
    const auto& [which, d] = qkv[i];
    if (shape_of(d->kernel) != *kernels[i])
      throw linen::invalid_argument(name + ": " + which + "/kernel has shape " + to_string(shape_of(d->kernel)) +
                                    ", inputs of shape " + to_string(*inputs[i]) + " need " + to_string(*kernels[i]));
    if (s.use_bias && shape_of(d->bias) != s.qkv_bias)
      throw linen::invalid_argument(name + ": " + which + "/bias of shape " + to_string(shape_of(d->bias)) +
                                    ", expected " + to_string(s.qkv_bias));
  }
  if (s.normalize_qk)
    for (auto [which, ln] : {std::pair{"query_ln", &p.query_ln}, std::pair{"key_ln", &p.key_ln}})
      if (shape_of(ln->scale) != s.ln_scale)
        throw linen::invalid_argument(name + ": " + which + "/scale has shape " + to_string(shape_of(ln->scale)) +
                                      ", expected " + to_string(s.ln_scale));
  if (shape_of(p.out.kernel) != s.out_kernel)
    throw linen::invalid_argument(name + ": out/kernel has shape " + to_string(shape_of(p.out.kernel)) +
                                  ", expected " + to_string(s.out_kernel));
  if (s.use_bias && shape_of(p.out.bias) != s.out_bias)
    throw linen::invalid_argument(name + ": out/bias of shape " + to_string(shape_of(p.out.bias)) + ", expected " +
                                  to_string(s.out_bias));
}

// The vjp's access to a module's forward with a tape (grad.hpp); NoTape: apply's forward.
struct AttentionAccess;
struct NoTape {};

}  // namespace detail

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
  // `rng`: a linen::random::Key (the module at the top: Module.init(key, ...)), or the
  // RngScope of this module inside a larger one (e.g.
  // RngScope(key).push("encoder").push("layers_0").push("attn")), or a C++ engine (its
  // first two 32-bit draws make the root key). Parameter keys follow Flax's rng streams:
  // the submodules query, key, value, [query_ln, key_ln,] out are pushed in that order
  // and each draws its parameters in declaration order, so with the same key (and path)
  // the parameters equal Flax's. With `decode`, the cache is zeros of [batch...,
  // kv_length, num_heads, head_dim] and cache_index 0. Sizes too large to address throw
  // linen::overflow_error before anything is allocated.
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
    detail::InitScope scope(rng);
    return init_impl(scope.get(), shape_of(inputs_q), shape_of(inputs_k), shape_of(inputs_v));
  }

  // ---------------------------------------------------------------------------------
  // apply: Flax's module.apply(variables, inputs_q[, inputs_k[, inputs_v]], mask=...,
  // deterministic=..., dropout_rng=..., sow_weights=...).
  //   inputs_q: [batch..., q_length, q_features]; inputs_k: [batch..., kv_length, k_features]
  //   (default inputs_q); inputs_v: [batch..., kv_length, v_features] (default inputs_k).
  //   returns [batch..., q_length, out_features].
  // `variables` may be the AttentionVariables or (without decode) the Params alone, as
  // Flax's mod.apply({'params': params}, ...).
  // With `decode`, each call feeds one position ([batch..., 1, features]), writes its key
  // and value into variables.cache at cache_index and advances it: pass the variables
  // mutable. A step on a full cache throws linen::cache_overflow and changes nothing
  // (Flax silently overwrites the last slot).
  template <class XQ>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return apply(variables.params, inputs_q, call);
  }
  template <class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const XK& inputs_k, const CallOptions<T>& call = {}) const {
    return apply(variables.params, inputs_q, inputs_k, call);
  }
  template <class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const XK& inputs_k, const XV& inputs_v,
                                                  const CallOptions<T>& call = {}) const {
    return apply(variables.params, inputs_q, inputs_k, inputs_v, call);
  }
  template <class XQ, std::enable_if_t<detail::is_tensor_v<XQ>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Params& params, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    check_inputs<XQ, XQ, XQ>();
    return apply(params, inputs_q, inputs_q, inputs_q, call);
  }
  template <class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XQ> && detail::is_tensor_v<XK>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Params& params, const XQ& inputs_q, const XK& inputs_k,
                                                  const CallOptions<T>& call = {}) const {
    check_inputs<XQ, XK, XK>();
    return apply(params, inputs_q, inputs_k, inputs_k, call);
  }
  template <class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Params& params, const XQ& inputs_q, const XK& inputs_k,
                                                  const XV& inputs_v, const CallOptions<T>& call = {}) const {
    if (config_.decode)
      throw linen::invalid_argument(name() + ": decode=true updates the cache: pass the variables mutable");
    if (!direct_attention(call)) return apply_impl(params, nullptr, inputs_q, inputs_k, inputs_v, call);
    // The default attention in place, on the scratch this thread keeps (attention_workspace.hpp):
    // only the returned tensor is allocated.
    constexpr int N = detail::tensor_traits<XQ>::rank;
    detail::ThreadScratchLease<T> lease;
    auto& st = detail::WorkspaceAccess::state(lease.get());
    const Checked c = direct_validate(st, params, inputs_q, inputs_k, inputs_v, call);
    Tensor<T, N> y(to_dims<N>(c.shapes->ys));
    direct_forward<detail::NoTape>(params, inputs_q, inputs_k, inputs_v, call, c.deterministic, *c.shapes, st.scratch,
                                   y.data(), nullptr);
    return y;
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
    if (!config_.decode) return apply(std::as_const(variables.params), inputs_q, inputs_k, inputs_v, call);
    if (!variables.cache)
      throw linen::invalid_argument(name() + ": decode=true needs variables.cache (make it with init)");
    return apply_impl(variables.params, &*variables.cache, inputs_q, inputs_k, inputs_v, call);
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

  // apply into caller-owned memory with reusable buffers: computes what
  // apply(params, inputs_q[, inputs_k[, inputs_v]], call) returns, bit for bit, and writes it
  // to `out`
  //   inputs_*: as for apply; out: [batch..., q_length, out_features], a writable
  //   linen::Tensor<T, N> of that shape or a TensorMap over the caller's memory.
  // The shapes are validated on the first call of each (module, inputs, parameters, out,
  // mask) shape the workspace serves (apply's exceptions, and out's shape) and remembered
  // (see AttentionWorkspace). Once `workspace` has served a call of these shapes (the
  // warm-up), a call allocates no heap memory, provided that config.thread_pool is null
  // (Eigen's pool allocates its tasks), attention_fn is the default and the call does not
  // sow weights; otherwise it runs apply and copies (and allocates). A call that throws
  // leaves `out` unchanged. decode=true: use decode_step.
  template <class XQ, class Out>
  void apply_into(const Params& params, const XQ& inputs_q, Out&& out, AttentionWorkspace<T>& workspace,
                  const CallOptions<T>& call = {}) const {
    apply_into(params, inputs_q, inputs_q, inputs_q, std::forward<Out>(out), workspace, call);
  }
  template <class XQ, class XK, class Out>
  void apply_into(const Params& params, const XQ& inputs_q, const XK& inputs_k, Out&& out,
                  AttentionWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    apply_into(params, inputs_q, inputs_k, inputs_k, std::forward<Out>(out), workspace, call);
  }
  template <class XQ, class XK, class XV, class Out>
  void apply_into(const Params& params, const XQ& inputs_q, const XK& inputs_k, const XV& inputs_v, Out&& out,
                  AttentionWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    using O = std::remove_cv_t<std::remove_reference_t<Out>>;
    check_inputs<XQ, XK, XV>();
    constexpr int N = detail::tensor_traits<XQ>::rank;
    static_assert(detail::is_tensor_v<O> && detail::tensor_traits<O>::rank == N &&
                      std::is_same_v<typename detail::tensor_traits<O>::scalar, T> &&
                      !std::is_const_v<std::remove_pointer_t<decltype(out.data())>>,
                  "linen: apply_into's out must be a writable linen::Tensor<T, N> (or TensorMap of one) of "
                  "the inputs' rank");
    if (config_.decode)
      throw linen::invalid_argument(name() + ": decode=true updates the cache: use decode_step");
    if (!direct_attention(call)) {
      const Tensor<T, N> y = apply_impl(params, nullptr, inputs_q, inputs_k, inputs_v, call);
      check_into_shape(out, shape_of(y));
      std::copy(y.data(), y.data() + y.size(), out.data());
      return;
    }
    auto& st = detail::WorkspaceAccess::state(workspace);
    const Checked c = direct_validate(st, params, inputs_q, inputs_k, inputs_v, call, &out);
    direct_forward<detail::NoTape>(params, inputs_q, inputs_k, inputs_v, call, c.deterministic, *c.shapes, st.scratch,
                                   out.data(), nullptr);
  }

  // One decode step into caller-owned memory, with reusable buffers: computes what
  // apply(params, cache, inputs_q, call) returns and writes it to `out`
  //   inputs_q: [batch..., 1, features]; out: [batch..., 1, out_features], a linen::Tensor
  //   of that shape or a TensorMap over the caller's memory.
  // The shapes are validated on the first step of each (module, cache, parameters, mask)
  // shape the workspace serves (same exceptions as apply) and remembered (see
  // DecodeWorkspace); the cache is checked for room on every step (linen::cache_overflow,
  // cache unchanged). Once `workspace` has served a step of these shapes (the warm-up), a
  // step allocates no heap memory, provided that config.thread_pool is null (Eigen's pool
  // allocates its tasks), the call is deterministic or dropout_rate is 0, it does not sow
  // weights, and attention_fn is the default; otherwise it runs apply and copies (and
  // allocates). Equal, bit for bit, to apply's decode step.
  template <class XQ, class Out>
  void decode_step(const Params& params, Cache& cache, const XQ& inputs_q, Out&& out, DecodeWorkspace<T>& workspace,
                   const CallOptions<T>& call = {}) const {
    step_into(params, cache, inputs_q, out, workspace, call, false);
  }

  // A multi-token step (prefill, or the verification of draft tokens): writes the keys
  // and values of n positions at cache_index, attends causally (chunk row i sees cache
  // positions j <= cache_index + i: everything before the chunk and the chunk up to
  // itself) and advances cache_index by n. Beyond Flax, whose decode takes one position.
  //   inputs_q: [batch..., n, features], n >= 1; out: [batch..., n, out_features].
  //   call.mask (optional): [batch..., num_heads|1, n|1, max_length|1], combined with the
  //   causal rule as a decode step combines it.
  // Validation, the workspace, the fallback and the allocation rules are decode_step's;
  // a chunk that does not fit throws linen::cache_overflow, and every error leaves the
  // cache unchanged. The cache written equals, byte for byte, the one n decode steps write;
  // the outputs equal theirs to rounding (the attention kernel blocks a chunk's rows
  // differently: see detail/decode/cache_ops.hpp, attend). To undo a step
  // (rejected drafts): linen::rollback (decode.hpp).
  template <class XQ, class Out>
  void decode_chunk(const Params& params, Cache& cache, const XQ& inputs_q, Out&& out, DecodeWorkspace<T>& workspace,
                    const CallOptions<T>& call = {}) const {
    step_into(params, cache, inputs_q, out, workspace, call, true);
  }

  // Steps on a BatchCache (per-sequence positions, batch_cache.hpp; beyond Flax).
  // decode_step: every active slot (cache.active_slots(), ascending) advances by one
  // position: inputs_q [active sequences, 1, features] in that order -> out
  // [active, 1, out_features]. Each sequence's row attends to its own positions
  // [0, its cache_index], exactly as decode_step on a Flax cache holding that sequence
  // alone. Validation, the workspace, the allocation rules are decode_step's; needs the
  // default attention_fn, no dropout and no sow_weights (linen::invalid_argument else).
  template <class XQ, class Out>
  void decode_step(const Params& params, BatchCache<T>& cache, const XQ& inputs_q, Out&& out,
                   DecodeWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    const std::vector<std::int32_t>& act = cache.active_slots();
    detail::decode::BatchStep<T> st{&cache, act.data(), nullptr, static_cast<Index>(act.size())};
    batch_step(st, params, inputs_q, out, workspace, call, false, nullptr);
  }
  // A ragged multi-token step: sequence i of the step is slot slots[i] (each holding a
  // sequence, each once, any order) and takes its first counts[i] rows of inputs_q
  // [slots.size(), n, features] (0 <= counts[i] <= n; counts empty: n each) at its own
  // cache_index, attending causally to its own positions (row r sees [0, index_i + r]);
  // its index advances by counts[i]. Rows past counts[i] are padding: not written to the
  // cache, their out rows [slots.size(), n, out_features] are zeros. Other slots are not
  // touched. call.mask: [slots.size(), num_heads|1, n|1, max_length|1]. A sequence's rows
  // equal decode_chunk of its counts[i] rows on a Flax cache holding it alone, bit for bit
  // where both take the row kernel (n <= 8), to rounding else. Errors leave every sequence
  // unchanged: a sequence that does not fit throws linen::cache_overflow, a bad slot or
  // count linen::invalid_argument naming it. Undo per sequence: rollback(cache, slot, i).
  template <class XQ, class Out>
  void decode_chunk(const Params& params, BatchCache<T>& cache, const std::vector<std::int32_t>& slots,
                    const std::vector<std::int32_t>& counts, const XQ& inputs_q, Out&& out,
                    DecodeWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    detail::decode::BatchStep<T> st{&cache, slots.data(), counts.empty() ? nullptr : counts.data(),
                                    static_cast<Index>(slots.size())};
    batch_step(st, params, inputs_q, out, workspace, call, true, &counts);
  }

  // A zero BatchCache of `slots` free slots of up to `max_length` positions, sized from
  // the parameters (heads and head_dim of key/kernel).
  BatchCache<T> init_batch_cache(const Params& params, Index slots, Index max_length) const {
    const Shape ks = shape_of(params.key.kernel);
    if (ks[1] != config_.num_heads)
      throw linen::invalid_argument(name() + ": key/kernel has shape " + to_string(ks) + ", num_heads is " +
                                    std::to_string(config_.num_heads));
    return BatchCache<T>(slots, max_length, ks[1], ks[2]);
  }

  // Steps on a PagedCache (paged_cache.hpp: a shared pool of blocks, a block table per
  // sequence; beyond Flax): decode_step and decode_chunk as on a BatchCache (above), the
  // same arguments, rules and errors, and outputs equal, bit for bit, to those of the
  // same steps on a BatchCache holding the same sequences; a step whose sequences need
  // more blocks than the pool has free throws linen::cache_overflow (nothing changed).
  template <class XQ, class Out>
  void decode_step(const Params& params, PagedCache<T>& cache, const XQ& inputs_q, Out&& out,
                   DecodeWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    const std::vector<std::int32_t>& act = cache.active_slots();
    detail::decode::PagedStep<T> st{&cache, act.data(), nullptr, static_cast<Index>(act.size())};
    batch_step(st, params, inputs_q, out, workspace, call, false, nullptr, "PagedCache");
  }
  template <class XQ, class Out>
  void decode_chunk(const Params& params, PagedCache<T>& cache, const std::vector<std::int32_t>& slots,
                    const std::vector<std::int32_t>& counts, const XQ& inputs_q, Out&& out,
                    DecodeWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    detail::decode::PagedStep<T> st{&cache, slots.data(), counts.empty() ? nullptr : counts.data(),
                                    static_cast<Index>(slots.size())};
    batch_step(st, params, inputs_q, out, workspace, call, true, &counts, "PagedCache");
  }

  // Steps on a RingCache (ring_cache.hpp: sliding-window attention in memory bounded by
  // the window; beyond Flax): decode_step (one position) and decode_chunk (n <= the
  // ring's max_chunk positions) of the whole batch at the ring's index, each row at
  // position p attending to the positions [p - window, p] (jax.nn's local_window_size =
  // (window, 0) with is_causal). Shapes, validation, the workspace and the allocation
  // rules are decode_step's on a Flax cache; call.mask is refused (linen::invalid_argument:
  // the ring's slots are no positions a mask could name); a chunk past max_chunk throws
  // linen::cache_overflow; every error leaves the ring unchanged. Equal, bit for bit, to
  // the kernels' windowed attention over the whole history (ring_ops.hpp).
  template <class XQ, class Out>
  void decode_step(const Params& params, RingCache<T>& cache, const XQ& inputs_q, Out&& out,
                   DecodeWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    refuse_ring_mask(call);
    step_into(params, cache, inputs_q, out, workspace, call, false);
  }
  template <class XQ, class Out>
  void decode_chunk(const Params& params, RingCache<T>& cache, const XQ& inputs_q, Out&& out,
                    DecodeWorkspace<T>& workspace, const CallOptions<T>& call = {}) const {
    refuse_ring_mask(call);
    step_into(params, cache, inputs_q, out, workspace, call, true);
  }
  // A zero RingCache of `batch` sequences, a window of `window` positions and steps of up
  // to `max_chunk` positions, sized from the parameters.
  RingCache<T> init_ring_cache(const Params& params, Index batch, Index window, Index max_chunk = 1) const {
    const Shape ks = shape_of(params.key.kernel);
    if (ks[1] != config_.num_heads)
      throw linen::invalid_argument(name() + ": key/kernel has shape " + to_string(ks) + ", num_heads is " +
                                    std::to_string(config_.num_heads));
    return RingCache<T>(batch, window, max_chunk, ks[1], ks[2]);
  }

  // A zero PagedCache of `slots` free slots of up to `max_length` positions sharing a
  // pool of `num_blocks` blocks of `block_size` positions, sized from the parameters.
  PagedCache<T> init_paged_cache(const Params& params, Index slots, Index max_length, Index block_size,
                                 Index num_blocks) const {
    const Shape ks = shape_of(params.key.kernel);
    if (ks[1] != config_.num_heads)
      throw linen::invalid_argument(name() + ": key/kernel has shape " + to_string(ks) + ", num_heads is " +
                                    std::to_string(config_.num_heads));
    return PagedCache<T>(slots, max_length, ks[1], ks[2], block_size, num_blocks);
  }

 private:
  void refuse_ring_mask(const CallOptions<T>& call) const {
    if (call.mask)
      throw linen::invalid_argument(name() + ": a step on a RingCache takes no mask (call.mask of shape " +
                                    to_string(call.mask.shape()) +
                                    "): the window is its mask; the cache is unchanged");
  }
  // A step of slots and counts (St: BatchStep, PagedStep) on a cache of `layout`'s name.
  template <class St, class XQ, class Out>
  void batch_step(St& st, const Params& params, const XQ& inputs_q, Out& out, DecodeWorkspace<T>& workspace,
                  const CallOptions<T>& call, bool chunk, const std::vector<std::int32_t>* counts,
                  const char* layout = "BatchCache") const {
    static_assert(detail::tensor_traits<XQ>::rank == 3,
                  "linen: a BatchCache or PagedCache step takes inputs_q [sequences, n, features] (rank 3)");
    if (counts && !counts->empty() && counts->size() != static_cast<std::size_t>(st.size))
      throw linen::invalid_argument(name() + ": decode_chunk on a " + layout + ": " + std::to_string(counts->size()) +
                                    " counts for " + std::to_string(st.size) + " slots");
    if (inputs_q.dimension(0) != st.size)
      throw linen::invalid_argument(name() + ": a " + layout + " step of " + std::to_string(st.size) +
                                    (chunk ? " slots" : " active sequences") + " got inputs_q of shape " +
                                    to_string(shape_of(inputs_q)) + " (its first dim must be " +
                                    std::to_string(st.size) + "); the cache is unchanged");
    step_into(params, st, inputs_q, out, workspace, call, chunk);
  }

  // decode_step (chunk false: Flax's one position) and decode_chunk (any n >= 1) on any
  // cache layout: `cache` is the step's target (an AttentionCache, or a layout's step
  // view), whose operations (put_signature, check_cache, key_length, step_batch,
  // check_room, write, attend, clear_padding) are found by overload in detail/decode/
  // (listed at the top of detail/decode/cache_ops.hpp). Only an AttentionCache has the fallback through
  // apply (a custom attention_fn, dropout, sow_weights); other layouts throw there.
  template <class C, class XQ, class Out>
  void step_into(const Params& params, C& cache, const XQ& inputs_q, Out& out, DecodeWorkspace<T>& workspace,
                 const CallOptions<T>& call, bool chunk) const {
    using O = std::remove_cv_t<std::remove_reference_t<Out>>;
    check_inputs<XQ, XQ, XQ>();
    constexpr int N = detail::tensor_traits<XQ>::rank;
    static_assert(detail::is_tensor_v<O> && detail::tensor_traits<O>::rank == N &&
                      std::is_same_v<typename detail::tensor_traits<O>::scalar, T> &&
                      !std::is_const_v<std::remove_pointer_t<decltype(out.data())>>,
                  "linen: decode_step's out must be a writable linen::Tensor<T, N> (or TensorMap of one) of "
                  "the inputs' rank");
    if (!config_.decode) throw linen::invalid_argument(name() + ": a cache is only used with decode=true");
    auto& ws = detail::decode::Access::state(workspace);
    const bool deterministic = resolve_deterministic(call);
    if (chunk && inputs_q.dimension(N - 2) < 1) detail::decode::throw_empty_chunk(shape_of(inputs_q), name());
    if (!direct_decode(deterministic, call)) {
      if constexpr (std::is_same_v<C, Cache>) {
        check_out_shape(out, decode_out_shape(shape_of(inputs_q), chunk));
        const Tensor<T, N> y = apply_impl(params, &cache, inputs_q, inputs_q, inputs_q, call,
                                          static_cast<detail::NoTape*>(nullptr), chunk);
        std::copy(y.data(), y.data() + y.size(), out.data());
        return;
      } else {
        throw linen::invalid_argument(name() +
                                      ": a step on this cache layout needs linen's own attention (the default "
                                      "attention_fn), no dropout (deterministic or dropout_rate 0) and no sow_weights");
      }
    }
    // The shapes of this step, looked up among those already validated (no allocation
    // once the vector has grown).
    auto& now = ws.now;
    now.clear();
    put_module_signature(now, params);
    put_dims(now, inputs_q);
    put_dims(now, out);
    detail::decode::put_signature(now, cache);
    put_mask_signature(now, call.mask);
    now.push_back(Index{chunk});  // decode_step keeps Flax's length check
    const detail::decode::Validated* valid = ws.find();
    if (!valid) {
      const Shape qs = shape_of(inputs_q);
      check_shapes(qs, qs, qs);
      const AttentionParamShapes s = param_shapes(qs.back(), qs.back(), qs.back());
      const Shape batch(qs.begin(), qs.end() - 2);
      const Index lq = qs[qs.size() - 2];
      detail::decode::check_cache(cache, batch, lq, s.num_heads, s.head_dim, name(), chunk);
      detail::check_attention_params(params, s, qs, qs, qs, name());
      check_out_shape(out, decode_out_shape(qs, chunk));
      detail::MaskPlan plan;
      if (call.mask)
        plan = detail::mask_plan(call.mask, batch, config_.num_heads, lq, detail::decode::key_length(cache), name());
      valid = &ws.remember(std::move(plan), num_elements(batch));
    }
    const Index n = inputs_q.dimension(N - 2);  // 1 for decode_step (checked)
    detail::decode::check_room(cache, n, name_);

    const Index B = detail::decode::step_batch(cache), H = config_.num_heads, dh = params.query.kernel.dimension(2),
                F = H * dh, rows = B * n;
    for (auto* buf : {&ws.q, &ws.k, &ws.v, &ws.x}) buf->resize(static_cast<std::size_t>(rows * F));
    detail::decode::kept_rows<QKVDense>(ws.kept[0], params.query, config_.use_bias, inputs_q.data(), rows, ws.q.data(),
                                        ws.dense, config_.thread_pool);
    detail::decode::kept_rows<QKVDense>(ws.kept[1], params.key, config_.use_bias, inputs_q.data(), rows, ws.k.data(),
                                        ws.dense, config_.thread_pool);
    detail::decode::kept_rows<QKVDense>(ws.kept[2], params.value, config_.use_bias, inputs_q.data(), rows, ws.v.data(),
                                        ws.dense, config_.thread_pool);
    if (config_.normalize_qk) {
      qk_norm_instance().apply_rows(params.query_ln, ws.q.data(), rows * H, dh, ws.q.data());
      qk_norm_instance().apply_rows(params.key_ln, ws.k.data(), rows * H, dh, ws.k.data());
    }
    detail::FusedView<bool> mask;
    if (call.mask) {
      const bool* m = call.mask.data();
      if (!valid->mask_offsets.empty()) {
        detail::gather_mask(valid->mask_dims, valid->mask_offsets, m, reinterpret_cast<bool*>(ws.mask_storage.data()));
        m = reinterpret_cast<const bool*>(ws.mask_storage.data());
      }
      mask = detail::mask_view(m, valid->mask_dims);
    }
    detail::decode::write(cache, ws.k.data(), ws.v.data(), n);
    detail::decode::attend(cache, ws.q.data(), n, mask, ws.x.data(), config_.thread_pool, &ws.row, &ws.tiled);
    detail::decode::kept_rows<OutDense>(ws.kept[3], params.out, config_.use_bias, ws.x.data(), rows, out.data(), ws.dense,
                                      config_.thread_pool);
    detail::decode::clear_padding(cache, out.data(), n, out.size() / std::max<Index>(1, rows));
  }

 public:

  // A zero decode cache for `batch` ([batch...]) sequences of up to `max_length`
  // positions, sized from the parameters (what init makes with decode=true; use it with
  // parameters loaded from a checkpoint). A size too large to address throws
  // linen::overflow_error.
  Cache init_cache(const Params& params, const Shape& batch, Index max_length) const {
    if (max_length <= 0)
      throw linen::invalid_argument(name() + ": max_length must be positive, got " + std::to_string(max_length));
    const Shape ks = shape_of(params.key.kernel);
    if (ks[1] != config_.num_heads)
      throw linen::invalid_argument(name() + ": key/kernel has shape " + to_string(ks) + ", num_heads is " +
                                  std::to_string(config_.num_heads));
    return make_cache(batch, max_length, ks[2]);
  }

  // The parameter shapes this module expects for inputs of the given feature sizes.
  AttentionParamShapes param_shapes(Index q_features, Index k_features, Index v_features) const {
    return detail::attention_param_shapes(config_, q_features, k_features, v_features, name());
  }
  // head_dim and the projections' sizes for inputs of the given feature sizes.
  Index qkv_features(Index q_features) const { return config_.qkv_features.value_or(q_features); }
  Index out_features(Index q_features) const { return config_.out_features.value_or(q_features); }
  Index head_dim(Index q_features) const { return param_shapes(q_features, q_features, q_features).head_dim; }

 private:
  friend struct detail::AttentionAccess;
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

  QKVDense qkv_dense(Index head_dim) const {
    typename QKVDense::Config c;
    c.features = {config_.num_heads, head_dim};
    c.use_bias = config_.use_bias;
    c.kernel_init = config_.kernel_init;
    c.bias_init = config_.bias_init;
    c.precision = config_.precision;
    return QKVDense(std::move(c));
  }
  OutDense out_dense(Index out_features) const {
    typename OutDense::Config c;
    c.features = {out_features};
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
  static const Norm& qk_norm_instance() {
    static const Norm norm = qk_norm();
    return norm;
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

  // Flax declares the submodules in this order: query, key, value, [query_ln, key_ln],
  // out; each pushes its name on the module's scope and draws its own parameters.
  Variables init_impl(random::RngScope& scope, const Shape& qs, const Shape& ks, const Shape& vs) const {
    check_shapes(qs, ks, vs);
    const AttentionParamShapes s = param_shapes(qs.back(), ks.back(), vs.back());
    const Shape batch(ks.begin(), ks.end() - 2);
    // The cache's size before any parameter is made (a failed init allocates nothing).
    if (config_.decode)
      detail::checked_allocation<T>(cache_shape(batch, ks[ks.size() - 2], s.head_dim), name() + ": cache");
    Variables vars;
    const QKVDense qd = qkv_dense(s.head_dim);
    vars.params.query = qd.init(scope.push("query"), {qs.back()});
    vars.params.key = qd.init(scope.push("key"), {ks.back()});
    vars.params.value = qd.init(scope.push("value"), {vs.back()});
    if (config_.normalize_qk) {
      vars.params.query_ln = qk_norm().init(scope.push("query_ln"), s.head_dim);
      vars.params.key_ln = qk_norm().init(scope.push("key_ln"), s.head_dim);
    }
    vars.params.out = out_dense(s.out_features).init(scope.push("out"), {s.num_heads, s.head_dim});
    if (config_.decode) vars.cache = make_cache(batch, ks[ks.size() - 2], s.head_dim);
    return vars;
  }

  // Flax's cache shape [batch..., max_length, num_heads, head_dim].
  Shape cache_shape(const Shape& batch, Index max_length, Index head_dim) const {
    Shape s = batch;
    s.insert(s.end(), {max_length, config_.num_heads, head_dim});
    return s;
  }
  Cache make_cache(const Shape& batch, Index max_length, Index head_dim) const {
    detail::checked_allocation<T>(cache_shape(batch, max_length, head_dim), name() + ": cache");
    Cache c;
    c.batch = batch;
    const Index b = num_elements(batch);
    c.cached_key.resize(b, max_length, config_.num_heads, head_dim);
    c.cached_value.resize(b, max_length, config_.num_heads, head_dim);
    c.cached_key.setZero();
    c.cached_value.setZero();
    c.cache_index = 0;
    return c;
  }

  // [batch..., 1, out_features] for a decode step's inputs_q [batch..., 1, features]
  // ([batch..., n, out_features] for a chunk's [batch..., n, features]).
  Shape decode_out_shape(const Shape& qs, bool chunk = false) const {
    Shape s(qs.begin(), qs.end() - 2);
    s.insert(s.end(), {chunk ? qs[qs.size() - 2] : 1, out_features(qs.back())});
    return s;
  }
  template <class Out>
  void check_out_shape(const Out& out, const Shape& want) const {
    if (shape_of(out) != want)
      throw linen::invalid_argument(name() + ": decode_step's out has shape " + to_string(shape_of(out)) +
                                    ", expected " + to_string(want));
  }

  bool resolve_deterministic(const CallOptions<T>& call) const {
    return detail::merge_deterministic(config_.deterministic, call.deterministic, config_.dropout_rate,
                                       static_cast<bool>(call.dropout_rng), name_);
  }

  // A decode step can attend over the cache directly (the fused row kernel on the first
  // cache_index + 1 positions) when linen's own attention runs without dropout or sowing.
  bool direct_decode(bool deterministic, const CallOptions<T>& call) const {
    return deterministic && !call.sow_weights && config_.attention_fn.template target<DotProductAttention>() != nullptr;
  }

  // y[M, N] = x[M, K] . kernel (+ bias) for a DenseGeneral's params: rows spread over
  // config.thread_pool for float/double with matching types, else DenseGeneral's own code.
  // Decode steps (by_row) take linen's GEMV (gemm::multiply_rows), its columns over the
  // pool: the same arithmetic in apply and decode_step, and no allocation without a pool.
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
    Dense::template apply_rows<I>(p, config_.use_bias, x, M, y, scratch, by_row, config_.thread_pool);
  }

  // Projects x [batch..., len, features] (parameters checked) to [B, len, heads, head_dim].
  template <class X>
  Tensor<T, 4> project(const DenseParams<ParamT, 1, 2>& p, const X& x, Index B, Index len, bool by_row) const {
    Tensor<T, 4> y(B, len, p.kernel.dimension(1), p.kernel.dimension(2));
    dense_rows<QKVDense>(p, x.data(), B * len, y.data(), nullptr, by_row);
    return y;
  }

  // q, k, v projected as one GEMM (the input packed once for the three kernels: what the
  // three projections give, bit for bit) when they share their input (self-attention),
  // the types are float/double alike and it is not a decode step. Returns false, having
  // done nothing, otherwise.
  template <class XQ, class XK, class XV>
  bool project_shared(const Params& params, const XQ& xq, const XK& xk, const XV& xv, Index B, Index len, bool by_row,
                      Tensor<T, 4>& q, Tensor<T, 4>& k, Tensor<T, 4>& v) const {
    using I = typename detail::tensor_traits<XQ>::scalar;
    if constexpr (std::is_same_v<I, T> && std::is_same_v<typename detail::tensor_traits<XK>::scalar, T> &&
                  std::is_same_v<typename detail::tensor_traits<XV>::scalar, T> && std::is_same_v<ParamT, T> &&
                  std::is_same_v<accum_t<T>, T>) {
      if (by_row || xq.data() != xk.data() || xq.data() != xv.data() || shape_of(xq) != shape_of(xk) ||
          shape_of(xq) != shape_of(xv))
        return false;
      const DenseParams<ParamT, 1, 2>* p[3] = {&params.query, &params.key, &params.value};
      Tensor<T, 4>* y[3] = {&q, &k, &v};
      for (int g = 0; g < 3; ++g) y[g]->resize(B, len, p[g]->kernel.dimension(1), p[g]->kernel.dimension(2));
      const T* const w[3] = {p[0]->kernel.data(), p[1]->kernel.data(), p[2]->kernel.data()};
      const Index n[3] = {q.dimension(2) * q.dimension(3), k.dimension(2) * k.dimension(3),
                          v.dimension(2) * v.dimension(3)};
      const T* const bias[3] = {config_.use_bias ? p[0]->bias.data() : nullptr,
                                config_.use_bias ? p[1]->bias.data() : nullptr,
                                config_.use_bias ? p[2]->bias.data() : nullptr};
      T* const out[3] = {q.data(), k.data(), v.data()};
      detail::project_qkv<T>(config_.thread_pool, B * len, p[0]->kernel.dimension(0), xq.data(), w, n, bias, out);
      return true;
    } else {
      (void)params, (void)xq, (void)xk, (void)xv, (void)B, (void)len, (void)by_row, (void)q, (void)k, (void)v;
      return false;
    }
  }

  // The output projection: x [B * lq, H, head_dim] -> y [B * lq, out_features].
  void project_out(const Params& params, const T* x, Index rows, T* y, detail::DenseScratch<accum_t<T>>* scratch,
                   bool by_row) const {
    dense_rows<OutDense>(params.out, x, rows, y, scratch, by_row);
  }

  // The forward: Flax's __call__. Every check runs before anything is computed or
  // written. With a tape (Tape = detail::AttentionTape<T>: the vjp's; never with a cache)
  // it also records what the backward needs (detail/attention_tape.hpp); the output is
  // the same either way. Without one (apply) the recording is not even compiled.
  template <class XQ, class XK, class XV, class Tape = detail::NoTape>
  Tensor<T, detail::signature_traits<XQ>::rank> apply_impl(const Params& params, Cache* cache, const XQ& inputs_q,
                                                       const XK& inputs_k, const XV& inputs_v,
                                                       const CallOptions<T>& call,
                                                       Tape* tape = nullptr, bool chunk = false) const {
    check_inputs<XQ, XK, XV>();
    constexpr bool kRecord = std::is_same_v<Tape, detail::AttentionTape<T>>;
    static_assert(kRecord || std::is_same_v<Tape, detail::NoTape>, "linen: internal: unknown tape");
    LINEN_ASSERT(!kRecord || (tape && !cache));
    constexpr int N = detail::tensor_traits<XQ>::rank;
    if constexpr (kRecord) {
      if (direct_attention(call)) {  // the default attention in place; the tape keeps the buffers
        detail::AttentionWorkspaceState<T> st;
        const Checked c = direct_validate(st, params, inputs_q, inputs_k, inputs_v, call);
        Tensor<T, N> y(to_dims<N>(c.shapes->ys));
        direct_forward(params, inputs_q, inputs_k, inputs_v, call, c.deterministic, *c.shapes, st.scratch, y.data(),
                       tape);
        return y;
      }
    }
    const Shape qs = shape_of(inputs_q), ks = shape_of(inputs_k), vs = shape_of(inputs_v);
    check_shapes(qs, ks, vs);
    const std::string n = name();
    const AttentionParamShapes s = param_shapes(qs.back(), ks.back(), vs.back());
    detail::check_attention_params(params, s, qs, ks, vs, n);
    const bool deterministic = resolve_deterministic(call);
    const Index H = s.num_heads, dh = s.head_dim;
    const Shape batch(qs.begin(), qs.end() - 2);
    const Index B = num_elements(batch), lq = qs[qs.size() - 2];
    Index lk = ks[ks.size() - 2];

    // The caller's mask over the flattened batch (checked before the cache is touched).
    Tensor<bool, 4> mask_storage;
    ArrayRef<bool> mask;
    if (cache) {
      // One decode step (Flax's `if self.decode:` branch, cache initialised).
      detail::decode::check_cache(*cache, batch, lq, H, dh, n, chunk);
      detail::decode::check_room(*cache, lq, name_);
      lk = cache->max_length();
      mask = detail::flatten_mask(call.mask, batch, H, lq, lk, mask_storage, n);  // lq: 1 unless a chunk
    } else {
      mask = detail::flatten_mask(call.mask, batch, H, lq, lk, mask_storage, n);
    }

    const bool by_row = cache != nullptr;
    Tensor<T, 4> query, key, value;
    if (!project_shared(params, inputs_q, inputs_k, inputs_v, B, lq, by_row, query, key, value)) {
      query = project(params.query, inputs_q, B, lq, by_row);
      key = project(params.key, inputs_k, B, ks[ks.size() - 2], by_row);
      value = project(params.value, inputs_v, B, vs[vs.size() - 2], by_row);
    }
    if constexpr (kRecord) record_inputs(*tape, s.num_heads, s.head_dim, s.out_features, inputs_q, inputs_k, inputs_v);
    if (config_.normalize_qk) {
      if constexpr (kRecord) {
        tape->q_pre = query;
        tape->k_pre = key;
      }
      qk_norm_instance().apply_rows(params.query_ln, query.data(), query.size() / dh, dh, query.data());
      qk_norm_instance().apply_rows(params.key_ln, key.data(), key.size() / dh, dh, key.data());
    }

    Shape ys = batch;
    ys.insert(ys.end(), {lq, s.out_features});
    Tensor<T, N> y(to_dims<N>(ys));
    detail::decode::SlotUndo<T> undo;
    const Tensor<T, 4>* k_used = &key;
    const Tensor<T, 4>* v_used = &value;
    if (cache) {
      if (direct_decode(deterministic, call)) {
        std::array<Index, 4> md{1, 1, 1, 1};
        if (mask) std::copy(mask.shape().begin(), mask.shape().end(), md.begin());
        Tensor<T, 4> x(B, lq, H, dh);
        detail::decode::write(*cache, key.data(), value.data(), lq);
        detail::decode::attend(*cache, query.data(), lq, mask ? detail::mask_view(mask.data(), md) : detail::FusedView<bool>{},
                               x.data(), config_.thread_pool, nullptr);
        project_out(params, x.data(), B * lq, y.data(), nullptr, true);
        return y;
      }
      // attention_fn may still throw (or return a wrong shape): keep the slot's old bytes so
      // that the cache is restored then.
      undo.arm(*cache, lq);
      const Index first = cache->cache_index;
      detail::decode::write(*cache, key.data(), value.data(), lq);
      mask_storage = detail::decode::cache_mask(mask, B, lq, lk, first);
      mask = ArrayRef<bool>(mask_storage);
      k_used = &cache->cached_key;
      v_used = &cache->cached_value;
    }

    AttentionOptions<T> opt;
    opt.mask = mask;
    opt.broadcast_dropout = config_.broadcast_dropout;
    opt.dropout_rate = config_.dropout_rate;
    opt.deterministic = deterministic;
    opt.precision = config_.precision;
    opt.force_fp32_for_softmax = config_.force_fp32_for_softmax;
    opt.thread_pool = config_.thread_pool;
    if (!deterministic) {
      // Present the keep-mask shape Flax draws at the caller's batch rank, so a JAX key or
      // a recorded mask sees exactly Flax's shape.
      Shape flax_shape;
      flax_keep_shape(batch, H, lq, lk, flax_shape);
      const DropoutRng& src = call.dropout_rng;
      if constexpr (kRecord) {
        opt.dropout_rng = [&src, flax_shape, tape](double p, const Shape& shape, bool* keep) {
          const Index count = num_elements(shape);
          src(p, count == num_elements(flax_shape) ? flax_shape : shape, keep);
          tape->keep.resize(count);
          std::copy(keep, keep + count, tape->keep.data());
          tape->dropped = true;
        };
      } else {
        opt.dropout_rng = [&src, flax_shape](double p, const Shape& shape, bool* keep) {
          src(p, num_elements(shape) == num_elements(flax_shape) ? flax_shape : shape, keep);
        };
      }
    }
    if (call.sow_weights) {
      opt.sow_weights = [&call, &batch, H, lq, lk](ArrayRef<T> w) {
        Shape ws = batch;
        ws.insert(ws.end(), {H, lq, lk});
        call.sow_weights(ArrayRef<T>(w.data(), ws));
      };
    }

    Tensor<T, 4> x = config_.attention_fn(query, *k_used, *v_used, opt);
    const Shape want{B, lq, H, dh};
    if (shape_of(x) != want)
      throw linen::invalid_argument(n + ": attention_fn returned shape " + to_string(shape_of(x)) + ", expected " +
                                  to_string(want));
    undo.disarm();
    project_out(params, x.data(), B * lq, y.data(), nullptr, by_row);
    if constexpr (kRecord) {
      tape->ys = ys;
      record_mask(*tape, mask);
      tape->q = std::move(query);
      tape->k = std::move(key);
      tape->v = std::move(value);
      tape->x = std::move(x);
    }
    return y;
  }

  // What direct_validate found: the validated shapes (in the workspace) and the call's
  // deterministic flag (merged as Flax merges it).
  struct Checked {
    const detail::ForwardShapes* shapes;
    bool deterministic;
  };

  template <class X>
  static void put_dims(std::vector<Index>& now, const X& t) {
    for (int i = 0; i < std::decay_t<X>::NumDimensions; ++i) now.push_back(t.dimension(i));
  }
  // The module (and the fields its checks read: another module may live at this address)
  // and the parameters' shapes, for a workspace's validated signatures.
  void put_module_signature(std::vector<Index>& now, const Params& params) const {
    now.push_back(static_cast<Index>(reinterpret_cast<std::uintptr_t>(this)));
    now.insert(now.end(), {config_.num_heads, config_.qkv_features.value_or(-1), config_.out_features.value_or(-1),
                           Index{config_.use_bias}, Index{config_.normalize_qk}});
    for (const auto* p : {&params.query, &params.key, &params.value}) {
      put_dims(now, p->kernel);
      put_dims(now, p->bias);
    }
    put_dims(now, params.out.kernel);
    put_dims(now, params.out.bias);
    put_dims(now, params.query_ln.scale);
    put_dims(now, params.key_ln.scale);
  }
  static void put_mask_signature(std::vector<Index>& now, const ArrayRef<bool>& mask) {
    now.push_back(mask ? mask.rank() : -1);
    if (mask) now.insert(now.end(), mask.shape().begin(), mask.shape().end());
  }

  template <class Out>
  void check_into_shape(const Out& out, const Shape& want) const {
    if (shape_of(out) != want)
      throw linen::invalid_argument(name() + ": apply_into's out has shape " + to_string(shape_of(out)) +
                                    ", expected " + to_string(want));
  }

  // The checks of a forward that attends in place (apply's, in apply's order, and out's
  // shape when given), or their result remembered in `st` for this call's signature: a
  // call of validated shapes allocates nothing here.
  template <class XQ, class XK, class XV, class O = Tensor<T, 1>>
  Checked direct_validate(detail::AttentionWorkspaceState<T>& st, const Params& params, const XQ& inputs_q,
                          const XK& inputs_k, const XV& inputs_v, const CallOptions<T>& call,
                          const O* out = nullptr) const {
    check_inputs<XQ, XK, XV>();
    auto& now = st.now;
    now.clear();
    put_module_signature(now, params);
    put_dims(now, inputs_q);
    put_dims(now, inputs_k);
    put_dims(now, inputs_v);
    if (out) put_dims(now, *out);
    else now.push_back(-1);
    put_mask_signature(now, call.mask);
    if (const detail::ForwardShapes* known = st.find()) return {known, resolve_deterministic(call)};

    const Shape qs = shape_of(inputs_q), ks = shape_of(inputs_k), vs = shape_of(inputs_v);
    check_shapes(qs, ks, vs);
    const AttentionParamShapes s = param_shapes(qs.back(), ks.back(), vs.back());
    detail::check_attention_params(params, s, qs, ks, vs, name());
    detail::ForwardShapes f;
    f.batch.assign(qs.begin(), qs.end() - 2);
    f.B = num_elements(f.batch);
    f.lq = qs[qs.size() - 2];
    f.lk = ks[ks.size() - 2];
    f.H = s.num_heads;
    f.head_dim = s.head_dim;
    f.fq = qs.back();
    f.fk = ks.back();
    f.fv = vs.back();
    f.fo = s.out_features;
    f.ys = f.batch;
    f.ys.insert(f.ys.end(), {f.lq, f.fo});
    if (out) check_into_shape(*out, f.ys);
    const bool deterministic = resolve_deterministic(call);
    if (call.mask) f.mask = detail::mask_plan(call.mask, f.batch, f.H, f.lq, f.lk, name());
    return {&st.remember(std::move(f)), deterministic};
  }

  // The forward with the default attention_fn, not sowing, on validated shapes `f`:
  // the projections into `s` (or the tape), then dot_product_attention's fused path in
  // place (direct_problem: the same problem, so the same bits), then the output projection
  // into y [batch..., q_length, out_features]. With a tape it records what the backward
  // needs, the fused kernel's row statistics included (tape->stats). Allocates nothing
  // once `s` has grown to these shapes (and without a tape or a thread pool).
  template <class Tape, class XQ, class XK, class XV>
  void direct_forward(const Params& params, const XQ& inputs_q, const XK& inputs_k, const XV& inputs_v,
                      const CallOptions<T>& call, bool deterministic, const detail::ForwardShapes& f,
                      detail::ForwardScratch<T>& s, T* y, Tape* tape) const {
    constexpr bool kRecord = std::is_same_v<Tape, detail::AttentionTape<T>>;
    const Index B = f.B, lq = f.lq, lk = f.lk, H = f.H, dh = f.head_dim, F = H * dh;
    // The caller's mask over the flattened batch: in place, or gathered.
    const bool* mask = nullptr;
    if (call.mask) {
      mask = call.mask.data();
      if (!f.mask.offsets.empty()) {
        const auto& d = f.mask.dims;
        s.mask.resize(static_cast<std::size_t>(B * d[1] * d[2] * d[3]));
        detail::gather_mask(d, f.mask.offsets, mask, reinterpret_cast<bool*>(s.mask.data()));
        mask = reinterpret_cast<const bool*>(s.mask.data());
      }
    }
    T *q, *k, *v, *x;
    if constexpr (kRecord) {
      tape->q.resize(B, lq, H, dh);
      tape->k.resize(B, lk, H, dh);
      tape->v.resize(B, lk, H, dh);
      tape->x.resize(B, lq, H, dh);
      q = tape->q.data();
      k = tape->k.data();
      v = tape->v.data();
      x = tape->x.data();
    } else {
      for (auto [buf, rows] : {std::pair{&s.q, B * lq}, std::pair{&s.k, B * lk}, std::pair{&s.v, B * lk},
                               std::pair{&s.x, B * lq}})
        buf->resize(static_cast<std::size_t>(rows * F));
      q = s.q.data();
      k = s.k.data();
      v = s.v.data();
      x = s.x.data();
    }
    dense_rows<QKVDense>(params.query, inputs_q.data(), B * lq, q, &s.dense, false);
    dense_rows<QKVDense>(params.key, inputs_k.data(), B * lk, k, &s.dense, false);
    dense_rows<QKVDense>(params.value, inputs_v.data(), B * lk, v, &s.dense, false);
    if constexpr (kRecord) record_inputs(*tape, H, dh, f.fo, inputs_q, inputs_k, inputs_v);
    if (config_.normalize_qk) {
      if constexpr (kRecord) {
        tape->q_pre = tape->q;
        tape->k_pre = tape->k;
      }
      qk_norm_instance().apply_rows(params.query_ln, q, B * lq * H, dh, q);
      qk_norm_instance().apply_rows(params.key_ln, k, B * lk * H, dh, k);
    }
    const bool* keep = nullptr;
    if (!deterministic) {
      const Index n = keep_count(B, H, lq, lk);
      bool* kb = nullptr;
      if constexpr (kRecord) {
        tape->keep.resize(n);
        kb = tape->keep.data();
        tape->dropped = true;
      } else {
        s.keep.resize(static_cast<std::size_t>(n));
        kb = reinterpret_cast<bool*>(s.keep.data());
      }
      draw_keep(call.dropout_rng, f.batch, H, lq, lk, s.keep_shape, kb);
      keep = kb;
    }
    detail::AttentionProblem<T> a = direct_problem(q, k, v, x, B, lq, lk, H, dh, mask, f.mask.dims, keep);
    a.tiled_scratch = &s.tiled;
    a.row_scratch = &s.row;
    if constexpr (kRecord) {
      if (tape->stats) {
        tape->row_max.resize(B * H * lq);
        tape->row_sum.resize(B * H * lq);
        a.row_max = tape->row_max.data();
        a.row_sum = tape->row_sum.data();
        if constexpr (!std::is_same_v<accum_t<T>, T>) {
          tape->x_acc.resize(B, lq, H, dh);
          a.out_acc = tape->x_acc.data();
        }
      }
    }
    detail::fused_attention<T>(a);
    project_out(params, x, B * lq, y, &s.dense, false);
    if constexpr (kRecord) {
      tape->ys = f.ys;
      if (mask) {
        const auto& d = f.mask.dims;
        record_mask(*tape, mask, {d[0] == 1 ? 1 : B, d[1], d[2], d[3]});
      }
    }
  }

  // Whether the module attends with its default attention_fn (linen::dot_product_attention)
  // on its fused path (Auto: fused unless sowing), which the module then runs in place.
  bool direct_attention(const CallOptions<T>& call) const {
    return !call.sow_weights && config_.attention_fn.template target<DotProductAttention>() != nullptr;
  }

  // The dropout keep mask's elements: Flax draws [1..., lq, lk] with broadcast_dropout,
  // else [batch..., heads, lq, lk].
  Index keep_count(Index B, Index H, Index lq, Index lk) const {
    return config_.broadcast_dropout ? lq * lk : B * H * lq * lk;
  }
  // The shape Flax draws the keep mask at, at the caller's batch rank, into `shape` (no
  // allocation once it has grown).
  void flax_keep_shape(const Shape& batch, Index H, Index lq, Index lk, Shape& shape) const {
    shape.clear();
    if (config_.broadcast_dropout) {
      shape.insert(shape.end(), batch.size() + 1, 1);
    } else {
      shape.insert(shape.end(), batch.begin(), batch.end());
      shape.push_back(H);
    }
    shape.push_back(lq);
    shape.push_back(lk);
  }
  // Draws the keep mask from `rng` with Flax's shape (so a JAX key or a recorded mask sees
  // exactly what Flax draws) into keep [keep_count]; `shape`: storage for that shape.
  void draw_keep(const DropoutRng& rng, const Shape& batch, Index H, Index lq, Index lk, Shape& shape,
                 bool* keep) const {
    flax_keep_shape(batch, H, lq, lk, shape);
    rng(1.0 - config_.dropout_rate, shape, keep);
  }

  // The problem dot_product_attention's fused path solves for the default attention_fn
  // (detail::attention_fused with the module's options): q, k, v [B, L, H, dh] in Flax's
  // layout, the mask at rank 4 over the flattened batch (mask_dims [B|1, H|1, lq|1,
  // lk|1]; null: none), no bias, the keep mask as drawn (null: no dropout), not causal,
  // config.thread_pool. out: x [B, lq, H, dh].
  detail::AttentionProblem<T> direct_problem(const T* q, const T* k, const T* v, T* out, Index B, Index lq, Index lk,
                                             Index H, Index dh, const bool* mask, const std::array<Index, 4>& mask_dims,
                                             const bool* keep) const {
    detail::AttentionDims d;
    d.B = B;
    d.Lq = lq;
    d.Lk = lk;
    d.H = H;
    d.D = d.Dv = dh;
    detail::AttentionProblem<T> a = detail::flax_problem<T>(d, q, k, v, out);
    if (mask) a.mask = detail::mask_view(mask, mask_dims);
    if (keep) {
      a.keep = detail::keep_view(keep, d, config_.broadcast_dropout);
      a.keep_scale = detail::flax_keep_scale<T>(config_.dropout_rate);
    }
    a.pool = config_.thread_pool;
    return a;
  }

  // The mask the attention saw (rank 4 over the flattened batch), onto the tape.
  static void record_mask(detail::AttentionTape<T>& tape, const ArrayRef<bool>& mask) {
    if (!mask) return;
    const auto& ms = mask.shape();
    record_mask(tape, mask.data(), {ms[0], ms[1], ms[2], ms[3]});
  }
  static void record_mask(detail::AttentionTape<T>& tape, const bool* mask, const std::array<Index, 4>& dims) {
    tape.mask.resize(dims[0], dims[1], dims[2], dims[3]);
    std::copy(mask, mask + tape.mask.size(), tape.mask.data());
    tape.masked = true;
  }

  // The tape's dimensions, flags and inputs (cast to T, as the projections read them);
  // each distinct input once.
  template <class XQ, class XK, class XV>
  void record_inputs(detail::AttentionTape<T>& t, Index heads, Index head_dim, Index out_features, const XQ& inputs_q,
                     const XK& inputs_k, const XV& inputs_v) const {
    // The shapes in place (no allocation once the tape's have grown: vjp_into's tape).
    const auto put_shape = [](Shape& dst, const auto& x) {
      dst.resize(static_cast<std::size_t>(std::decay_t<decltype(x)>::NumDimensions));
      for (std::size_t i = 0; i < dst.size(); ++i) dst[i] = x.dimension(static_cast<int>(i));
    };
    put_shape(t.xs_q, inputs_q);
    put_shape(t.xs_k, inputs_k);
    put_shape(t.xs_v, inputs_v);
    const Shape& qs = t.xs_q;
    t.B = 1;
    for (std::size_t i = 0; i + 2 < qs.size(); ++i) t.B *= qs[i];
    t.Lq = qs[qs.size() - 2];
    t.Lk = t.xs_k[t.xs_k.size() - 2];
    t.H = heads;
    t.head_dim = head_dim;
    t.fq = qs.back();
    t.fk = t.xs_k.back();
    t.fv = t.xs_v.back();
    t.fo = out_features;
    t.use_bias = config_.use_bias;
    t.normalize_qk = config_.normalize_qk;
    t.broadcast_dropout = config_.broadcast_dropout;
    t.dropout_rate = config_.dropout_rate;
    t.fp32_softmax = config_.force_fp32_for_softmax;
    const auto keep = [](const auto& x, Index rows, Index f, Tensor<T, 2>& dst) {
      dst.resize(rows, f);
      for (Index i = 0; i < dst.size(); ++i) dst.data()[i] = static_cast<T>(x.data()[i]);
    };
    keep(inputs_q, t.B * t.Lq, t.fq, t.xq);
    if (t.inputs >= 2) keep(inputs_k, t.B * t.Lk, t.fk, t.xk);
    if (t.inputs == 3) keep(inputs_v, t.B * t.Lk, t.fv, t.xv);
  }

  Config config_;
  const char* name_;
};

// flax.linen.MultiHeadAttention: Flax's alias of MultiHeadDotProductAttention.
template <class T, class ParamT = T>
using MultiHeadAttention = MultiHeadDotProductAttention<T, ParamT>;

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
  using Base::init_batch_cache;  // a BatchCache (per-sequence positions): see MultiHeadDotProductAttention
  using Base::init_paged_cache;  // a PagedCache (a pool of blocks): see MultiHeadDotProductAttention
  using Base::init_ring_cache;   // a RingCache (sliding window): see MultiHeadDotProductAttention
  using Base::head_dim;
  using Base::out_features;
  using Base::param_shapes;
  using Base::qkv_features;

  // init(rng, inputs_q), rng a Key, an RngScope or an engine: see
  // MultiHeadDotProductAttention::init.
  template <class Rng, class XQ>
  Variables init(Rng&& rng, const XQ& inputs_q) const {
    return Base::init(std::forward<Rng>(rng), inputs_q);
  }
  // apply(variables or params, inputs_q, {mask, deterministic, dropout_rng, sow_weights}).
  template <class XQ>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Variables& variables, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(variables, inputs_q, call);
  }
  template <class XQ, std::enable_if_t<detail::is_tensor_v<XQ>, int> = 0>
  Tensor<T, detail::signature_traits<XQ>::rank> apply(const Params& params, const XQ& inputs_q,
                                                  const CallOptions<T>& call = {}) const {
    return Base::apply(params, inputs_q, call);
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
  // apply_into(params, inputs_q, out, workspace[, call]): apply into caller-owned memory
  // with reusable buffers; see MultiHeadDotProductAttention::apply_into.
  template <class XQ, class Out>
  void apply_into(const Params& params, const XQ& inputs_q, Out&& out, AttentionWorkspace<T>& workspace,
                  const CallOptions<T>& call = {}) const {
    Base::apply_into(params, inputs_q, std::forward<Out>(out), workspace, call);
  }
  // decode_step(params, cache, inputs_q, out, workspace[, call]): see
  // MultiHeadDotProductAttention::decode_step.
  using Base::decode_step;
  // decode_chunk(params, cache, inputs_q, out, workspace[, call]): n positions in one step
  // (and decode_chunk(params, batch_cache, slots, counts, inputs_q, out, workspace[, call]));
  // see MultiHeadDotProductAttention::decode_chunk.
  using Base::decode_chunk;
  // The module as a MultiHeadDotProductAttention (e.g. to pass where one is expected).
  const Base& as_multi_head() const { return *this; }
};

}  // namespace linen

#ifdef LINEN_COMPILED  // linen::compiled: its instantiations, declared extern
#include "detail/compiled/attention.hpp"
#endif

#endif  // LINEN_ATTENTION_HPP
