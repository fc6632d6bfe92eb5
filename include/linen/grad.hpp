// SPDX-License-Identifier: Apache-2.0
//
// Gradients: vector-Jacobian products (jax.vjp) of everything linen computes.
//
//   dot_product_attention_vjp(query, key, value, cotangent, options)
//       -> output and the cotangents of query, key, value and bias (one call).
//   auto [y, pullback] = vjp(module, variables, inputs_q[, inputs_k[, inputs_v]], call);
//   AttentionGrads g = pullback(cotangent);   // g.params.query.kernel, ..., g.inputs_q
//   auto pullback = vjp_into(module, variables, inputs_q[, ...], out, grad_workspace, call);
//   pullback(cotangent, grads);               // into the caller's tensors, reusing memory
//       for MultiHeadDotProductAttention and SelfAttention, as Flax users write
//       `y, vjp_fn = jax.vjp(lambda p, x: mod.apply({'params': p}, x), params, x)`;
//       the same `vjp` for DenseGeneral and LayerNorm.
//
// Design: a tape for the cheap activations, recomputation for the weights. The module vjp
// runs the module's own forward (MultiHeadDotProductAttention's apply: the same checks,
// configuration and kernels, so the output is apply's bit for bit) with a tape
// (detail/attention_tape.hpp) that keeps what is O(batch x length x features), i.e. no
// more than the forward allocated anyway: the inputs, the projected q, k, v (and q, k
// before normalize_qk's LayerNorm), the attention output, the mask it attended with and
// the dropout keep mask it actually drew. It does not keep the batch x heads x q_length x
// kv_length attention weights: the backward recomputes them, per head (reference) or per
// tile (fused, from two numbers per query row, the softmax's row max and denominator, which
// the forward kernel that made the output writes onto the tape) — FlashAttention's trade
// of a little compute for O(L) memory. With the keep mask on the tape any dropout source works, a C++ engine included:
// the mask is drawn exactly once, in the forward. dot_product_attention_vjp has no
// parameters to hold on to, so it runs its forward and backward in one call.
//
// Decode mode (the autoregressive cache) is inference only: vjp throws for decode=true.
//
// The pullback refers to `variables.params` (and a DenseGeneral/LayerNorm pullback to its
// params) without copying them: keep them alive and unchanged until the pullback has run,
// i.e. apply an optimizer's update after the backward, as a training step does. Passing a
// temporary is a compile error.
//
// Element types: float, double, Eigen::half, Eigen::bfloat16. Half types compute in float
// throughout (products, softmax, reductions) and round only where the forward rounds
// (the reference implementation mirrors dot_product_attention's rounding of the logits and
// weights); cotangents are returned in the primal's types (params in ParamT, inputs in
// their own element type), as jax.vjp returns them.
#ifndef LINEN_GRAD_HPP
#define LINEN_GRAD_HPP

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "attention.hpp"
#include "attention_workspace.hpp"
#include "config.hpp"
#include "dense.hpp"
#include "detail/attention_tape.hpp"
#include "detail/broadcast.hpp"
#include "detail/grad_attention.hpp"
#include "detail/grad_layers.hpp"
#include "detail/vjp.hpp"  // Vjp (the result of every vjp), check_cotangent
#include "dot_product_attention.hpp"
#include "errors.hpp"
#include "layer_norm.hpp"
#include "tensor.hpp"

namespace linen {

// How a vjp computes. The attention kernels (`implementation`, linen::Implementation):
//   Reference: the forward is dot_product_attention's reference path (so the output is
//     bit-identical to dot_product_attention with implementation=Reference); the backward
//     recomputes one head's [q_length, kv_length] weights at a time with the same
//     arithmetic and rounding. Single-threaded, O(q_length x kv_length) working memory.
//   Fused: FlashAttention-2 style. The forward keeps two numbers per query row (the
//     softmax's max and denominator), the backward recomputes [block_q, block_k] score
//     tiles from them: O(length) working memory per worker (a mask, a bias or a dropout
//     keep mask are O(length^2) by themselves when given); tiles that are masked
//     throughout (causal) are skipped. (batch, head) pairs, and key tiles when there are
//     fewer heads than threads, are spread over `thread_pool`. Agrees with Reference to
//     rounding: like dot_product_attention's fused kernel, half types keep the weights in
//     float before the value product.
//   Auto: as the forward would choose. For dot_product_attention_vjp,
//     options.implementation (whose Auto is Fused unless sowing); for the modules, Fused
//     unless sow_weights is set.
struct GradOptions {
  Implementation implementation = Implementation::Auto;
  // The caller's pool (e.g. Eigen::ThreadPool) for the fused kernels and the projections'
  // backward; the calling thread works too and blocks until the pool's share is done, so
  // do not call from inside a task of the same pool. nullptr: for
  // dot_product_attention_vjp, options.thread_pool; otherwise the calling thread only.
  // A pullback keeps using it: it must outlive the pullback. linen never starts threads
  // of its own.
  Eigen::ThreadPoolInterface* thread_pool = nullptr;
  Index block_q = 128;  // query rows per tile (Fused)
  Index block_k = 512;  // key rows per tile (Fused)
};

namespace detail {

inline void check_grad_options(const GradOptions& g, const std::string& fn) {
  if (g.block_q <= 0 || g.block_k <= 0)
    throw linen::invalid_argument(fn + ": GradOptions block_q and block_k must be positive, got block_q=" +
                                std::to_string(g.block_q) + ", block_k=" + std::to_string(g.block_k));
  if (g.implementation != Implementation::Auto && g.implementation != Implementation::Reference &&
      g.implementation != Implementation::Fused)
    throw linen::invalid_argument(fn + ": unknown Implementation " + std::to_string(static_cast<int>(g.implementation)));
}

// Auto resolved: Fused unless the weights are to be sown.
inline bool use_fused(Implementation i, bool sowing) {
  return i == Implementation::Fused || (i == Implementation::Auto && !sowing);
}

// The dropout keep mask the forward draws, with the shape Flax draws it at:
// broadcast_dropout: [1] * (rank - 2) + [q_length, kv_length], else the weights' shape.
inline Shape keep_shape(const AttentionDims& d, bool broadcast_dropout) {
  const Shape w = d.weights_shape();
  if (!broadcast_dropout) return w;
  Shape s(w.size() - 2, 1);
  s.push_back(d.Lq);
  s.push_back(d.Lk);
  return s;
}

// A DropoutRng that hands out a mask already drawn (the tape's), checking the shape.
inline DropoutRng replay_keep(const bool* keep, const Shape& shape) {
  return DropoutRng([keep, shape](double, const Shape& s, bool* out) {
    LINEN_ASSERT(num_elements(s) == num_elements(shape));  // the tape drew this very mask
    std::copy(keep, keep + num_elements(shape), out);
  });
}

template <class To, class From>
void cast_into(const From* src, Index n, To* dst) {
  for (Index i = 0; i < n; ++i) dst[i] = static_cast<To>(src[i]);
}

}  // namespace detail

// ==========================================================================================
// dot_product_attention
// ==========================================================================================

// The forward's output and the cotangents of dot_product_attention's inputs.
template <class T, int N>
struct DotProductAttentionGrads {
  Tensor<T, N> output;  // [batch..., q_length, num_heads, v_depth_per_head], the forward's result
  Tensor<T, N> query;   // [batch..., q_length, num_heads, qk_depth_per_head]
  Tensor<T, N> key;     // [batch..., kv_length, num_heads, qk_depth_per_head]
  Tensor<T, N> value;   // [batch..., kv_length, num_heads, v_depth_per_head]
  // The bias's cotangent summed over the dims it was broadcast along, i.e. the bias's own
  // shape (as jax.vjp gives it), left-padded with 1s to rank N (same elements, same
  // order); size 0 when there is no bias.
  Tensor<T, N> bias;
};

// vjp of dot_product_attention: runs the forward and its backward in one call.
//   query:     [batch..., q_length, num_heads, qk_depth_per_head]
//   key:       [batch..., kv_length, num_heads, qk_depth_per_head]
//   value:     [batch..., kv_length, num_heads, v_depth_per_head]
//   cotangent: [batch..., q_length, num_heads, v_depth_per_head], the output's cotangent
//   options:   dot_product_attention's (bias, mask, dropout, force_fp32_for_softmax, ...)
// Returns the output and the cotangents (bias: see DotProductAttentionGrads).
// Dropout: the keep mask is drawn once from options.dropout_rng and serves both the
// output returned here and the gradients. A deterministic source (a linen::random::Key)
// draws the same mask on every call, so a separate dot_product_attention call with the
// same options gives the same output; a C++ engine advances on every draw and must be
// re-seeded for that (or use the output returned here).
// Throws std::invalid_argument as dot_product_attention does, and when the cotangent's
// shape is not the output's.
template <class Q, class K, class V, class G>
DotProductAttentionGrads<typename detail::tensor_traits<Q>::scalar, detail::tensor_traits<Q>::rank>
dot_product_attention_vjp(const Q& query, const K& key, const V& value, const G& cotangent,
                          const AttentionOptions<typename detail::tensor_traits<Q>::scalar>& options = {},
                          const GradOptions& grad_options = {}) {
  detail::require_qkv<Q, K, V>();
  using T = typename detail::tensor_traits<Q>::scalar;
  using C = accum_t<T>;
  constexpr int N = detail::tensor_traits<Q>::rank;
  const std::string fn = "dot_product_attention_vjp";
  detail::check_grad_options(grad_options, fn);
  const detail::AttentionDims d =
      detail::check_qkv(shape_of(query), shape_of(key), shape_of(value), fn.c_str());
  detail::check_cotangent<G, T, N>(cotangent, d.output_shape(), fn);
  detail::check_dropout(options, fn.c_str());
  const Implementation impl = grad_options.implementation != Implementation::Auto ? grad_options.implementation
                                                                                   : options.implementation;
  const bool fused = detail::use_fused(impl, static_cast<bool>(options.sow_weights));
  if (fused && options.sow_weights)
    throw linen::invalid_argument(fn + ": implementation=Fused cannot sow the attention weights; use "
                                "Implementation::Reference (or Auto)");
  Eigen::ThreadPoolInterface* pool = grad_options.thread_pool ? grad_options.thread_pool : options.thread_pool;
  // Validate mask and bias before drawing any dropout bits.
  if (options.bias) detail::broadcast_strides(options.bias.shape(), d.weights_shape(), fn + ": bias");
  if (options.mask) detail::broadcast_strides(options.mask.shape(), d.weights_shape(), fn + ": mask");

  Tensor<bool, 1> keep;
  Shape keep_shape;
  const bool dropout = !options.deterministic && options.dropout_rate > 0.0;
  if (dropout) {
    if (!options.dropout_rng)
      throw linen::invalid_argument(fn + ": dropout_rate=" + std::to_string(options.dropout_rate) +
                                  " with deterministic=false needs a dropout_rng");
    keep_shape = detail::keep_shape(d, options.broadcast_dropout);
    keep.resize(num_elements(keep_shape));
    options.dropout_rng(1.0 - options.dropout_rate, keep_shape, keep.data());
  }
  const bool* keep_data = dropout ? keep.data() : nullptr;

  DotProductAttentionGrads<T, N> g;
  g.output.resize(to_dims<N>(d.output_shape()));
  g.query.resize(query.dimensions());
  g.key.resize(key.dimensions());
  g.value.resize(value.dimensions());
  std::vector<C> dbias;
  if (options.bias) dbias.assign(static_cast<std::size_t>(num_elements(options.bias.shape())), C(0));
  C* dbias_ptr = options.bias ? dbias.data() : nullptr;

  // One problem (Flax's layout, mask, bias, keep mask) for the forward and the backward.
  detail::FlaxAttentionProblem<T> fp(d, query.data(), key.data(), value.data(), g.output.data(), options.bias,
                                     options.mask, fn);
  fp.set_dropout(keep_data, d, options.broadcast_dropout, options.dropout_rate);
  detail::AttentionProblem<T>& a = fp.problem;
  a.fp32_softmax = options.force_fp32_for_softmax;
  a.causal = options.is_causal;
  a.pool = pool;
  using Policy = detail::FlaxLogits<T>;

  if (!fused) {
    AttentionOptions<T> o = options;
    if (dropout) o.dropout_rng = detail::replay_keep(keep_data, keep_shape);
    detail::attention_reference<T>(d, query.data(), key.data(), value.data(), o, g.output.data(), nullptr,
                                   fn.c_str());
    detail::attention_backward_reference<Policy>(a, cotangent.data(), g.query.data(), g.key.data(), g.value.data(),
                                                 dbias_ptr);
  } else {
    // The forward is dot_product_attention's fused kernel (so the output has its bits),
    // keeping the softmax statistics for the backward.
    const Index rows = d.B * d.H * d.Lq;
    std::vector<C> row_max(static_cast<std::size_t>(rows)), row_sum(static_cast<std::size_t>(rows));
    std::vector<C> out_acc;
    if constexpr (!std::is_same_v<C, T>) out_acc.resize(static_cast<std::size_t>(g.output.size()));
    a.row_max = row_max.data();
    a.row_sum = row_sum.data();
    a.out_acc = out_acc.empty() ? nullptr : out_acc.data();
    detail::fused_attention<T>(a);
    const C* out_c = nullptr;
    if constexpr (std::is_same_v<C, T>) out_c = g.output.data();
    else out_c = out_acc.data();
    detail::attention_backward_fused<Policy>(a, out_c, row_max.data(), row_sum.data(), cotangent.data(),
                                             g.query.data(), g.key.data(), g.value.data(), dbias_ptr,
                                             grad_options.block_q, grad_options.block_k);
  }
  if (options.bias) {
    Shape bs(static_cast<std::size_t>(N) - options.bias.shape().size(), 1);
    bs.insert(bs.end(), options.bias.shape().begin(), options.bias.shape().end());
    g.bias.resize(to_dims<N>(bs));
    detail::cast_into(dbias.data(), g.bias.size(), g.bias.data());
  }
  return g;
}

// ==========================================================================================
// DenseGeneral
// ==========================================================================================

// Cotangents of a DenseGeneral's parameters and input.
template <class ParamT, int Axes, int Features, class I, int N>
struct DenseGrads {
  DenseParams<ParamT, Axes, Features> params;  // kernel [in_dims..., features...], bias [features...]
  Tensor<I, N> input;                          // [batch..., in_dims...]
};

// The backward of one DenseGeneral call (see vjp(DenseGeneral, ...)).
template <class T, class ParamT, int Axes, int Features, class I, int N>
class DensePullback {
 public:
  using Grads = DenseGrads<ParamT, Axes, Features, I, N>;
  static constexpr int OutRank = N - Axes + Features;

  // cotangent: [batch..., features...] -> the cotangents of params and input.
  template <class G>
  Grads operator()(const G& cotangent) const {
    detail::check_cotangent<G, T, OutRank>(cotangent, ys_, "DenseGeneral vjp");
    Grads g;
    g.params.kernel.resize(params_->kernel.dimensions());
    if (use_bias_) g.params.bias.resize(params_->bias.dimensions());
    g.input.resize(to_dims<N>(xs_));
    const Index m = x_.dimension(0), in = x_.dimension(1);
    Index out = 1;
    for (int i = 0; i < Features; ++i) out *= ys_[ys_.size() - Features + i];
    detail::dense_backward<T, ParamT, I>(x_.data(), m, in, out, params_->kernel.data(), cotangent.data(),
                                         g.params.kernel.data(), use_bias_ ? g.params.bias.data() : nullptr,
                                         g.input.data(), pool_);
    return g;
  }

  // Internal: made by vjp().
  DensePullback(const DenseParams<ParamT, Axes, Features>* params, bool use_bias, Tensor<T, 2> x, Shape xs, Shape ys,
                Eigen::ThreadPoolInterface* pool)
      : params_(params), use_bias_(use_bias), x_(std::move(x)), xs_(std::move(xs)), ys_(std::move(ys)), pool_(pool) {}

 private:
  const DenseParams<ParamT, Axes, Features>* params_;
  bool use_bias_;
  Tensor<T, 2> x_;  // the input as the forward used it (cast to T), [prod(batch), prod(in_dims)]
  Shape xs_, ys_;
  Eigen::ThreadPoolInterface* pool_;
};

// vjp of DenseGeneral::apply.
//   x: [batch..., in_dims...] -> output [batch..., features...] and its pullback.
// `params` must outlive the pullback (see the top of this file); options.thread_pool
// shares the backward's products.
template <class T, class ParamT, int Axes, int Features, class X>
Vjp<Tensor<T, detail::tensor_traits<X>::rank - Axes + Features>,
    DensePullback<T, ParamT, Axes, Features, typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank>>
vjp(const DenseGeneral<T, ParamT, Axes, Features>& dense, const DenseParams<ParamT, Axes, Features>& params, const X& x,
    const GradOptions& options = {}) {
  static_assert(detail::is_tensor_v<X>, "linen: vjp(DenseGeneral) takes a linen::Tensor (or a map of one)");
  using I = typename detail::tensor_traits<X>::scalar;
  constexpr int N = detail::tensor_traits<X>::rank;
  detail::check_grad_options(options, "DenseGeneral vjp");
  auto y = dense.apply(params, x);  // checks the shapes
  const Shape xs = shape_of(x), ys = shape_of(y);
  Index in = 1;
  for (int i = 0; i < Axes; ++i) in *= xs[xs.size() - Axes + i];
  const Index m = in ? num_elements(xs) / in : 0;
  Tensor<T, 2> xt(m, in);
  detail::cast_into(x.data(), m * in, xt.data());
  return {std::move(y), DensePullback<T, ParamT, Axes, Features, I, N>(&params, dense.config().use_bias, std::move(xt),
                                                                     xs, ys, options.thread_pool)};
}
template <class T, class ParamT, int Axes, int Features, class X>
void vjp(const DenseGeneral<T, ParamT, Axes, Features>&, DenseParams<ParamT, Axes, Features>&&, const X&,
         const GradOptions& = {}) = delete;  // the pullback would refer to a destroyed temporary

// ==========================================================================================
// LayerNorm
// ==========================================================================================

// Cotangents of a LayerNorm's parameters and input.
template <class ParamT, class I, int N>
struct LayerNormGrads {
  LayerNormParams<ParamT> params;  // scale, bias [features] (size 0 when unused)
  Tensor<I, N> input;              // [batch..., features]
};

// The backward of one LayerNorm call (see vjp(LayerNorm, ...)).
template <class T, class ParamT, class I, int N>
class LayerNormPullback {
 public:
  using Grads = LayerNormGrads<ParamT, I, N>;

  // cotangent: [batch..., features] -> the cotangents of params and input.
  template <class G>
  Grads operator()(const G& cotangent) const {
    detail::check_cotangent<G, T, N>(cotangent, shape_of(x_), "LayerNorm vjp");
    using S = detail::norm_stat_t<T, I>;
    const Index f = x_.dimension(N - 1), rows = f ? x_.size() / f : 0;
    std::vector<S> ds(static_cast<std::size_t>(f), S(0)), db(static_cast<std::size_t>(f), S(0));
    Grads g;
    g.input.resize(x_.dimensions());
    detail::layer_norm_backward<T, I, ParamT>(x_.data(), rows, f, epsilon_, fast_variance_,
                                              use_scale_ ? params_->scale.data() : nullptr, cotangent.data(),
                                              g.input.data(), use_scale_ ? ds.data() : nullptr,
                                              use_bias_ ? db.data() : nullptr);
    if (use_scale_) {
      g.params.scale.resize(f);
      detail::cast_into(ds.data(), f, g.params.scale.data());
    }
    if (use_bias_) {
      g.params.bias.resize(f);
      detail::cast_into(db.data(), f, g.params.bias.data());
    }
    return g;
  }

  // Internal: made by vjp().
  LayerNormPullback(const LayerNormParams<ParamT>* params, const typename LayerNorm<T, ParamT>::Config& c, Tensor<I, N> x)
      : params_(params),
        epsilon_(c.epsilon),
        fast_variance_(c.use_fast_variance),
        use_scale_(c.use_scale),
        use_bias_(c.use_bias),
        x_(std::move(x)) {}

 private:
  const LayerNormParams<ParamT>* params_;
  double epsilon_;
  bool fast_variance_, use_scale_, use_bias_;
  Tensor<I, N> x_;
};

// vjp of LayerNorm::apply.
//   x: [batch..., features] -> output [batch..., features] and its pullback.
// `params` must outlive the pullback (see the top of this file).
template <class T, class ParamT, class X>
Vjp<Tensor<T, detail::tensor_traits<X>::rank>,
    LayerNormPullback<T, ParamT, typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank>>
vjp(const LayerNorm<T, ParamT>& norm, const LayerNormParams<ParamT>& params, const X& x) {
  static_assert(detail::is_tensor_v<X>, "linen: vjp(LayerNorm) takes a linen::Tensor (or a map of one)");
  using I = typename detail::tensor_traits<X>::scalar;
  constexpr int N = detail::tensor_traits<X>::rank;
  auto y = norm.apply(params, x);  // checks the shapes
  Tensor<I, N> xc = x;
  return {std::move(y), LayerNormPullback<T, ParamT, I, N>(&params, norm.config(), std::move(xc))};
}
template <class T, class ParamT, class X>
void vjp(const LayerNorm<T, ParamT>&, LayerNormParams<ParamT>&&, const X&) = delete;  // would dangle

// ==========================================================================================
// MultiHeadDotProductAttention and SelfAttention
// ==========================================================================================

// Cotangents of an attention module's parameters and inputs.
template <class ParamT, class I, int N>
struct AttentionGrads {
  // Same structure and names as the params: query/kernel [in, heads, head_dim], query/bias
  // [heads, head_dim], ..., out/kernel [heads, head_dim, out], out/bias [out],
  // query_ln/scale, key_ln/scale [head_dim] (normalize_qk); unused entries have size 0.
  AttentionParams<ParamT> params;
  Tensor<I, N> inputs_q;  // [batch..., q_length, q_features]
  Tensor<I, N> inputs_k;  // [batch..., kv_length, k_features]; size 0 unless inputs_k was passed
  Tensor<I, N> inputs_v;  // [batch..., kv_length, v_features]; size 0 unless inputs_v was passed
};

namespace detail {

// The attention pullback's buffers (the vjp's own per call; a GradWorkspace keeps them):
// the cotangents on their way through the layer, the half types' C accumulators of the
// input cotangents, and the dense, LayerNorm and fused attention kernels' scratch.
template <class T>
struct AttentionGradScratch {
  using C = accum_t<T>;
  using S = norm_stat_t<T, T>;
  Tensor<T, 4> dx, dq, dk, dv;        // [B, L, heads, head_dim]
  Tensor<T, 4> dpre_q, dpre_k;        // normalize_qk's input cotangents (swapped with dq, dk)
  std::vector<S> dscale, norm_row;     // normalize_qk's scale sums and row buffer
  std::vector<C> tmp_q, tmp_k, tmp_v;  // input cotangents in C (when the inputs are not C)
  DenseBackwardScratch<C> dense;
  BackwardScratch<C> attention;
  std::size_t bytes() const {
    const auto t = [](const Tensor<T, 4>& x) { return static_cast<std::size_t>(x.size()) * sizeof(T); };
    return t(dx) + t(dq) + t(dk) + t(dv) + t(dpre_q) + t(dpre_k) + capacity_bytes(dscale) + capacity_bytes(norm_row) +
           capacity_bytes(tmp_q) + capacity_bytes(tmp_k) + capacity_bytes(tmp_v) + dense.bytes() + attention.bytes();
  }
};

// `x` resized to `dims`, or emptied (size 0: an unused entry), without allocating once it
// has the size.
template <class X, class Dims>
void size_as(X& x, const Dims& dims, bool used) {
  if (used) x.resize(dims);
  else if (x.size() != 0) x = X();
}

// Whether cotangent has the output's shape, without allocating; else throws as
// check_cotangent does.
template <class T, int N, class G>
void check_cotangent_of(const G& cotangent, const Shape& ys, const char* name) {
  bool same = ys.size() == static_cast<std::size_t>(N);
  for (int i = 0; same && i < N; ++i) same = cotangent.dimension(i) == ys[static_cast<std::size_t>(i)];
  if (!same) check_cotangent<G, T, N>(cotangent, ys, std::string(name) + " vjp");  // throws
}

// The backward of one attention module call recorded on `t`: cotangent [batch...,
// q_length, out_features] -> g (every tensor sized here; unused entries size 0), with
// the buffers of `s`. AttentionPullback and vjp_into's pullback, one code.
template <class T, class ParamT, class I, int N, class G>
void attention_pullback(const AttentionTape<T>& t, const AttentionParams<ParamT>& p, const GradOptions& options,
                        bool fused, const char* name, const G& cotangent, AttentionGrads<ParamT, I, N>& g,
                        AttentionGradScratch<T>& s) {
  using C = accum_t<T>;
  check_cotangent_of<T, N>(cotangent, t.ys, name);
  const Index H = t.H, dh = t.head_dim, Mq = t.B * t.Lq, Mk = t.B * t.Lk;
  Eigen::ThreadPoolInterface* pool = options.thread_pool;

  // out: y = x . out/kernel + out/bias
  g.params.out.kernel.resize(p.out.kernel.dimensions());
  size_as(g.params.out.bias, p.out.bias.dimensions(), t.use_bias);
  s.dx.resize(t.B, t.Lq, H, dh);
  dense_backward<T, ParamT, T>(t.x.data(), Mq, H * dh, t.fo, p.out.kernel.data(), cotangent.data(),
                               g.params.out.kernel.data(), t.use_bias ? g.params.out.bias.data() : nullptr,
                               s.dx.data(), pool, false, &s.dense);

  // attention: the problem the tape records; the fused backward reads the row
  // statistics (and, for half types, the unrounded output) the forward kernel wrote.
  s.dq.resize(t.B, t.Lq, H, dh);
  s.dk.resize(t.B, t.Lk, H, dh);
  s.dv.resize(t.B, t.Lk, H, dh);
  AttentionProblem<T> a = t.problem(pool);
  a.backward_scratch = &s.attention;
  using Policy = FlaxLogits<T>;
  if (!fused) {
    attention_backward_reference<Policy>(a, s.dx.data(), s.dq.data(), s.dk.data(), s.dv.data(), nullptr);
  } else {
    LINEN_ASSERT(t.row_max.size() == t.B * H * t.Lq);  // vjp asked the forward for them
    const C* out_c = nullptr;
    if constexpr (std::is_same_v<C, T>) out_c = t.x.data();
    else out_c = t.x_acc.data();
    attention_backward_fused<Policy>(a, out_c, t.row_max.data(), t.row_sum.data(), s.dx.data(), s.dq.data(),
                                     s.dk.data(), s.dv.data(), nullptr, options.block_q, options.block_k);
  }

  // normalize_qk: LayerNorm(use_bias=False, epsilon=1e-6) over head_dim
  size_as(g.params.query_ln.scale, std::array<Index, 1>{dh}, t.normalize_qk);
  size_as(g.params.key_ln.scale, std::array<Index, 1>{dh}, t.normalize_qk);
  if (t.normalize_qk) {
    using S = norm_stat_t<T, T>;
    const auto back = [&](const Tensor<T, 4>& pre, const LayerNormParams<ParamT>& lp, Tensor<T, 4>& grad,
                          Tensor<T, 4>& dpre, Tensor<ParamT, 1>& dscale) {
      s.dscale.assign(static_cast<std::size_t>(dh), S(0));
      dpre.resize(pre.dimensions());
      layer_norm_backward<T, T, ParamT>(pre.data(), pre.size() / std::max<Index>(dh, 1), dh, 1e-6, true,
                                        lp.scale.data(), grad.data(), dpre.data(), s.dscale.data(),
                                        static_cast<S*>(nullptr), &s.norm_row);
      cast_into(s.dscale.data(), dh, dscale.data());
      grad = std::move(dpre);  // a swap of two buffers of one size, both kept in `s`
    };
    back(t.q_pre, p.query_ln, s.dq, s.dpre_q, g.params.query_ln.scale);
    back(t.k_pre, p.key_ln, s.dk, s.dpre_k, g.params.key_ln.scale);
  }

  // query, key, value: DenseGeneral(features=(heads, head_dim)). The input cotangents
  // are summed in C where an input fed several projections (inputs_k = inputs_q, ...).
  g.inputs_q.resize(to_dims<N>(t.xs_q));
  size_as(g.inputs_k, to_dims<N>(t.xs_k), t.inputs >= 2);
  size_as(g.inputs_v, to_dims<N>(t.xs_v), t.inputs == 3);
  const auto buffer = [](Tensor<I, N>& dst, std::vector<C>& tmp) -> C* {
    if constexpr (std::is_same_v<I, C>) {
      return dst.data();
    } else {
      tmp.resize(static_cast<std::size_t>(dst.size()));
      return tmp.data();
    }
  };
  C* const gq = buffer(g.inputs_q, s.tmp_q);
  C* const gk = t.inputs >= 2 ? buffer(g.inputs_k, s.tmp_k) : gq;
  C* const gv = t.inputs == 3 ? buffer(g.inputs_v, s.tmp_v) : gk;
  const auto proj = [&](const Tensor<T, 2>& x, Index m, Index f, const DenseParams<ParamT, 1, 2>& dp,
                        const Tensor<T, 4>& grad, DenseParams<ParamT, 1, 2>& out, C* gx, bool add) {
    out.kernel.resize(dp.kernel.dimensions());
    size_as(out.bias, dp.bias.dimensions(), t.use_bias);
    dense_backward<T, ParamT, C>(x.data(), m, f, H * dh, dp.kernel.data(), grad.data(), out.kernel.data(),
                                 t.use_bias ? out.bias.data() : nullptr, gx, pool, add, &s.dense);
  };
  const Tensor<T, 2>& xk = t.inputs >= 2 ? t.xk : t.xq;
  const Tensor<T, 2>& xv = t.inputs == 3 ? t.xv : xk;
  proj(t.xq, Mq, t.fq, p.query, s.dq, g.params.query, gq, false);
  proj(xk, Mk, t.fk, p.key, s.dk, g.params.key, gk, t.inputs < 2);
  proj(xv, Mk, t.fv, p.value, s.dv, g.params.value, gv, t.inputs < 3);
  if constexpr (!std::is_same_v<I, C>) {
    cast_into(s.tmp_q.data(), g.inputs_q.size(), g.inputs_q.data());
    cast_into(s.tmp_k.data(), g.inputs_k.size(), g.inputs_k.data());
    cast_into(s.tmp_v.data(), g.inputs_v.size(), g.inputs_v.data());
  }
}

}  // namespace detail

// The backward of one attention module call: cotangent [batch..., q_length, out_features]
// -> AttentionGrads. Made by vjp(); may be called any number of times.
template <class T, class ParamT, class I, int N>
class AttentionPullback {
 public:
  using Grads = AttentionGrads<ParamT, I, N>;

  template <class G>
  Grads operator()(const G& cotangent) const {
    Grads g;
    detail::AttentionGradScratch<T> scratch;
    detail::attention_pullback(tape_, *params_, options_, fused_, name_.c_str(), cotangent, g, scratch);
    return g;
  }

  // Internal: made by vjp().
  AttentionPullback(std::string name, const AttentionParams<ParamT>* params, const GradOptions& options, bool fused,
                    detail::AttentionTape<T> tape)
      : name_(std::move(name)), params_(params), options_(options), fused_(fused), tape_(std::move(tape)) {}

 private:
  std::string name_;  // "SelfAttention" or "MultiHeadDotProductAttention"
  const AttentionParams<ParamT>* params_;
  GradOptions options_;
  bool fused_;  // which backward kernels (GradOptions::implementation resolved)
  detail::AttentionTape<T> tape_;
};

namespace detail {

// The module's forward with a tape (attention.hpp's apply, the same code).
struct AttentionAccess {
  template <class T, class ParamT, class XQ, class XK, class XV>
  static Tensor<T, tensor_traits<XQ>::rank> forward(const MultiHeadDotProductAttention<T, ParamT>& module,
                                                    const AttentionParams<ParamT>& params, const XQ& inputs_q,
                                                    const XK& inputs_k, const XV& inputs_v, const CallOptions<T>& call,
                                                    AttentionTape<T>& tape) {
    return module.apply_impl(params, nullptr, inputs_q, inputs_k, inputs_v, call, &tape);
  }
  // vjp_into's forward: apply_into's (validated shapes and scratch kept in `st`) recording
  // onto `tape`, writing `out`. Returns false, having done nothing, when the module does
  // not attend in place (sowing): the caller then takes forward().
  template <class T, class ParamT, class XQ, class XK, class XV, class Out>
  static bool forward_into(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionParams<ParamT>& params,
                           const XQ& inputs_q, const XK& inputs_k, const XV& inputs_v, const CallOptions<T>& call,
                           AttentionWorkspaceState<T>& st, AttentionTape<T>& tape, Out& out,
                           std::uint64_t& generation) {
    if (!module.direct_attention(call)) return false;
    const auto c = module.direct_validate(st, params, inputs_q, inputs_k, inputs_v, call);
    check_out(module, out, c.shapes->ys);
    ++generation;  // from here on the tape is rewritten: earlier pullbacks are stale
    tape.clear();
    module.direct_forward(params, inputs_q, inputs_k, inputs_v, call, c.deterministic, *c.shapes, st.scratch,
                          out.data(), &tape);
    return true;
  }
  // out has the output's shape `ys` (checked without allocating), else throws.
  template <class T, class ParamT, class Out>
  static void check_out(const MultiHeadDotProductAttention<T, ParamT>& module, const Out& out, const Shape& ys) {
    constexpr int N = tensor_traits<Out>::rank;
    bool same = ys.size() == static_cast<std::size_t>(N);
    for (int i = 0; same && i < N; ++i) same = out.dimension(i) == ys[static_cast<std::size_t>(i)];
    if (!same)
      throw linen::invalid_argument(module.name() + ": vjp_into's out has shape " + to_string(shape_of(out)) +
                                    ", expected " + to_string(ys));
  }
  template <class T, class ParamT>
  static std::string name(const MultiHeadDotProductAttention<T, ParamT>& module) {
    return module.name();
  }
  template <class T, class ParamT>
  static const char* c_name(const MultiHeadDotProductAttention<T, ParamT>& module) {
    return module.name_;
  }
};

// What only a vjp checks (its options, and that the module is differentiable here);
// returns whether the backward is the fused one. Allocates nothing unless it throws.
template <class T, class ParamT>
bool check_vjp(const MultiHeadDotProductAttention<T, ParamT>& module, const CallOptions<T>& call,
               const GradOptions& options) {
  const auto& cfg = module.config();
  const auto name = [&module] { return AttentionAccess::name(module); };
  if (options.block_q <= 0 || options.block_k <= 0 ||
      (options.implementation != Implementation::Auto && options.implementation != Implementation::Reference &&
       options.implementation != Implementation::Fused))
    check_grad_options(options, name());  // throws
  if (cfg.decode)
    throw linen::invalid_argument(name() + ": vjp does not differentiate decode=true (the cache is for inference); "
                                  "train the module with decode=false and a causal mask");
  if (cfg.attention_fn.template target<DotProductAttention>() == nullptr)
    throw linen::invalid_argument(name() + ": vjp differentiates the default attention_fn (linen::dot_product_attention) "
                                  "only; this module's attention_fn is another callable");
  const bool fused = use_fused(options.implementation, static_cast<bool>(call.sow_weights));
  if (fused && call.sow_weights)
    throw linen::invalid_argument(name() + ": implementation=Fused cannot sow the attention weights; use "
                                  "Implementation::Reference (or Auto)");
  return fused;
}

// vjp of MultiHeadDotProductAttention: check_vjp, then the module's own forward with a
// tape. `inputs`: how many distinct inputs the caller passed (1, 2 or 3).
template <class T, class ParamT, class XQ, class XK, class XV>
Vjp<Tensor<T, tensor_traits<XQ>::rank>,
    AttentionPullback<T, ParamT, typename tensor_traits<XQ>::scalar, tensor_traits<XQ>::rank>>
attention_module_vjp(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionParams<ParamT>& params,
                     const XQ& inputs_q, const XK& inputs_k, const XV& inputs_v, int inputs, const CallOptions<T>& call,
                     const GradOptions& options) {
  static_assert(std::is_same_v<typename tensor_traits<XQ>::scalar, typename tensor_traits<XK>::scalar> &&
                    std::is_same_v<typename tensor_traits<XQ>::scalar, typename tensor_traits<XV>::scalar>,
                "linen: vjp needs inputs_q, inputs_k and inputs_v of one element type");
  using I = typename tensor_traits<XQ>::scalar;
  constexpr int N = tensor_traits<XQ>::rank;
  const bool fused = check_vjp(module, call, options);
  AttentionTape<T> tape;
  tape.inputs = inputs;
  tape.stats = fused;
  Tensor<T, N> y = AttentionAccess::forward(module, params, inputs_q, inputs_k, inputs_v, call, tape);
  return {std::move(y), AttentionPullback<T, ParamT, I, N>(AttentionAccess::name(module), &params, options, fused,
                                                           std::move(tape))};
}

template <class T>
struct GradWorkspaceState {
  AttentionWorkspaceState<T> forward;  // validated shapes, the forward's scratch
  AttentionTape<T> tape;               // the last vjp_into's
  AttentionGradScratch<T> backward;
  std::uint64_t generation = 0;        // vjp_into calls that rewrote the tape
  std::size_t bytes() const {
    const auto t = [](const auto& x) { return static_cast<std::size_t>(x.size()) * sizeof(*x.data()); };
    const AttentionTape<T>& p = tape;
    return forward.bytes() + backward.bytes() + t(p.xq) + t(p.xk) + t(p.xv) + t(p.q_pre) + t(p.k_pre) + t(p.q) +
           t(p.k) + t(p.v) + t(p.x) + t(p.mask) + t(p.keep) + t(p.row_max) + t(p.row_sum) + t(p.x_acc);
  }
};

struct GradWorkspaceAccess;

}  // namespace detail

// Reusable memory for vjp_into (the attention modules' forward and backward into
// caller-owned tensors): the forward's buffers and validated shapes (as
// AttentionWorkspace), the tape the backward reads, and the backward's buffers (the
// cotangents between the layers, the dense, LayerNorm and fused attention kernels'
// scratch, one share per worker of the pool). One per thread (a workspace is not
// thread-safe); any modules and shapes may share one. Its buffers are reused while the
// shapes stay (the tape's and the backward's tensors are Eigen tensors, reallocated when a
// call's shape differs from the last one's; the kernels' scratch grows to the largest).
// The pullback vjp_into returns reads the workspace's tape: it is valid until the next
// vjp_into on the same workspace (calling it later throws).
template <class T>
class GradWorkspace {
 public:
  GradWorkspace() = default;
  GradWorkspace(const GradWorkspace&) = delete;  // pullbacks point into it
  GradWorkspace& operator=(const GradWorkspace&) = delete;
  // Heap bytes the workspace holds.
  std::size_t bytes() const { return state_.bytes(); }
  // Frees every buffer (the next call validates and allocates again); pullbacks made
  // before become stale.
  void release() {
    const std::uint64_t g = state_.generation + 1;
    state_ = detail::GradWorkspaceState<T>();
    state_.generation = g;
  }

 private:
  friend struct detail::GradWorkspaceAccess;
  detail::GradWorkspaceState<T> state_;
};

namespace detail {
struct GradWorkspaceAccess {
  template <class T>
  static GradWorkspaceState<T>& state(GradWorkspace<T>& w) {
    return w.state_;
  }
};
}  // namespace detail

// The backward of the last vjp_into on a GradWorkspace: pullback(cotangent, grads) writes
// the cotangents of every parameter and input into `grads` (each tensor resized to its
// shape, unused entries to size 0), equal bit for bit to what vjp's pullback returns.
// Once `grads` and the workspace have served a call of these shapes, it allocates no
// heap memory (same conditions as vjp_into). May be called any number of times until the
// next vjp_into on the workspace; then it throws linen::invalid_argument. The cotangent's
// shape is checked before anything is written.
template <class T, class ParamT, class I, int N>
class WorkspacePullback {
 public:
  using Grads = AttentionGrads<ParamT, I, N>;

  template <class G>
  void operator()(const G& cotangent, Grads& grads) const {
    auto& st = detail::GradWorkspaceAccess::state(*workspace_);
    if (st.generation != generation_)
      throw linen::invalid_argument(std::string(name_) +
                                    " vjp_into: this pullback's workspace has recorded another forward since (or "
                                    "was released); keep one pullback per vjp_into and workspace");
    detail::attention_pullback(st.tape, *params_, options_, fused_, name_, cotangent, grads, st.backward);
  }

  // Internal: made by vjp_into().
  WorkspacePullback(GradWorkspace<T>* workspace, const AttentionParams<ParamT>* params, const char* name,
                    const GradOptions& options, bool fused, std::uint64_t generation)
      : workspace_(workspace), params_(params), name_(name), options_(options), fused_(fused), generation_(generation) {}

 private:
  GradWorkspace<T>* workspace_;
  const AttentionParams<ParamT>* params_;
  const char* name_;
  GradOptions options_;
  bool fused_;
  std::uint64_t generation_;
};

namespace detail {

// vjp_into of MultiHeadDotProductAttention: check_vjp, then apply_into's forward with the
// workspace's tape (or, when sowing, apply's forward with it, allocating).
template <class T, class ParamT, class XQ, class XK, class XV, class Out>
WorkspacePullback<T, ParamT, typename tensor_traits<XQ>::scalar, tensor_traits<XQ>::rank> attention_module_vjp_into(
    const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionParams<ParamT>& params, const XQ& inputs_q,
    const XK& inputs_k, const XV& inputs_v, int inputs, Out& out, GradWorkspace<T>& workspace,
    const CallOptions<T>& call, const GradOptions& options) {
  using O = std::remove_cv_t<Out>;
  using I = typename tensor_traits<XQ>::scalar;
  constexpr int N = tensor_traits<XQ>::rank;
  static_assert(std::is_same_v<I, typename tensor_traits<XK>::scalar> &&
                    std::is_same_v<I, typename tensor_traits<XV>::scalar>,
                "linen: vjp_into needs inputs_q, inputs_k and inputs_v of one element type");
  static_assert(is_tensor_v<O> && tensor_traits<O>::rank == N && std::is_same_v<typename tensor_traits<O>::scalar, T> &&
                    !std::is_const_v<std::remove_pointer_t<decltype(out.data())>>,
                "linen: vjp_into's out must be a writable linen::Tensor<T, N> (or TensorMap of one) of the inputs' "
                "rank");
  const bool fused = check_vjp(module, call, options);
  auto& st = GradWorkspaceAccess::state(workspace);
  st.tape.inputs = inputs;
  st.tape.stats = fused;
  if (!AttentionAccess::forward_into(module, params, inputs_q, inputs_k, inputs_v, call, st.forward, st.tape, out,
                                     st.generation)) {
    AttentionTape<T> tape;  // a fresh one: a failed forward leaves the workspace's as it was
    tape.inputs = inputs;
    tape.stats = fused;
    const Tensor<T, N> y = AttentionAccess::forward(module, params, inputs_q, inputs_k, inputs_v, call, tape);
    AttentionAccess::check_out(module, out, tape.ys);
    ++st.generation;
    st.tape = std::move(tape);
    std::copy(y.data(), y.data() + y.size(), out.data());
  }
  return WorkspacePullback<T, ParamT, I, N>(&workspace, &params, AttentionAccess::c_name(module), options, fused,
                                           st.generation);
}

}  // namespace detail

// vjp of MultiHeadDotProductAttention::apply (Flax's
// `jax.vjp(lambda p, q[, k[, v]]: mod.apply({'params': p}, q, k, v, mask=...), params, ...)`).
//   inputs_q: [batch..., q_length, q_features]; inputs_k: [batch..., kv_length, k_features]
//   (default inputs_q); inputs_v: [batch..., kv_length, v_features] (default inputs_k).
//   call: mask, deterministic, dropout_rng, sow_weights as for apply (sow_weights with
//   Implementation::Reference or Auto).
// Returns {output [batch..., q_length, out_features], pullback}; pullback(cotangent) gives
// the cotangents of every parameter and of each input passed (an input used twice, as
// inputs_k = inputs_q, gets the sum). The forward is the module's own apply (its checks,
// its kernels), recording a tape: the output equals apply()'s bit for bit, and the dropout
// keep mask is drawn once, there, with the shape Flax draws it at (so a linen::random::Key
// gives apply()'s mask, and any source gives the gradients of the output returned).
// `variables` must outlive the pullback. decode=true and a custom attention_fn throw
// linen::invalid_argument; wrong shapes throw as apply does.
template <class T, class ParamT, class XQ>
auto vjp(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables,
         const XQ& inputs_q, const CallOptions<T>& call = {}, const GradOptions& options = {}) {
  return detail::attention_module_vjp(module, variables.params, inputs_q, inputs_q, inputs_q, 1, call, options);
}
template <class T, class ParamT, class XQ, class XK, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
auto vjp(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables,
         const XQ& inputs_q, const XK& inputs_k, const CallOptions<T>& call = {}, const GradOptions& options = {}) {
  return detail::attention_module_vjp(module, variables.params, inputs_q, inputs_k, inputs_k, 2, call, options);
}
template <class T, class ParamT, class XQ, class XK, class XV, std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
auto vjp(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables,
         const XQ& inputs_q, const XK& inputs_k, const XV& inputs_v, const CallOptions<T>& call = {},
         const GradOptions& options = {}) {
  return detail::attention_module_vjp(module, variables.params, inputs_q, inputs_k, inputs_v, 3, call, options);
}

// vjp of SelfAttention::apply: inputs_q [batch..., length, features] -> {output
// [batch..., length, out_features], pullback}; pullback(cotangent).inputs_q is the whole
// input cotangent (through query, key and value). See the MultiHeadDotProductAttention
// overloads for the rest.
template <class T, class ParamT, class XQ>
auto vjp(const SelfAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables, const XQ& inputs_q,
         const CallOptions<T>& call = {}, const GradOptions& options = {}) {
  return detail::attention_module_vjp(module.as_multi_head(), variables.params, inputs_q, inputs_q, inputs_q, 1, call,
                                      options);
}

// vjp into caller-owned memory with a reusable workspace (vjp's counterpart of
// apply_into): runs the forward vjp runs, writes its output to `out` and records the tape
// in `workspace`; returns the pullback, which writes the cotangents into the caller's
// AttentionGrads:
//   linen::GradWorkspace<float> ws;                   // one per thread, kept
//   linen::AttentionGrads<float, float, 3> grads;     // kept
//   auto pullback = linen::vjp_into(attn, variables, x, y, ws, call);
//   pullback(cotangent, grads);
//   inputs_*, call, options: as for vjp; out: [batch..., q_length, out_features], a
//   writable linen::Tensor<T, N> of that shape or a TensorMap over the caller's memory.
// Output and cotangents equal vjp's bit for bit. Once the workspace (and `grads`) have
// served a call of these shapes, a forward and its backward allocate no heap memory,
// provided that config.thread_pool and options.thread_pool are null (Eigen's pool
// allocates its tasks), the call does not sow weights and the backward is the fused one
// (Implementation::Auto or Fused; Reference allocates its per-head weights). Nothing
// means nothing: no operator new and no Eigen allocation (the dense backward's GEMM
// packing buffers are kept in the workspace too).
// The pullback is valid until the next vjp_into on `workspace`. Throws as vjp does, and
// when out's shape is not the output's; a call that throws in its checks changes
// nothing (neither `out` nor the workspace's last tape).
template <class T, class ParamT, class XQ, class Out>
auto vjp_into(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables,
              const XQ& inputs_q, Out&& out, GradWorkspace<T>& workspace, const CallOptions<T>& call = {},
              const GradOptions& options = {}) {
  return detail::attention_module_vjp_into(module, variables.params, inputs_q, inputs_q, inputs_q, 1, out, workspace,
                                           call, options);
}
template <class T, class ParamT, class XQ, class XK, class Out, std::enable_if_t<detail::is_tensor_v<XK>, int> = 0>
auto vjp_into(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables,
              const XQ& inputs_q, const XK& inputs_k, Out&& out, GradWorkspace<T>& workspace,
              const CallOptions<T>& call = {}, const GradOptions& options = {}) {
  return detail::attention_module_vjp_into(module, variables.params, inputs_q, inputs_k, inputs_k, 2, out, workspace,
                                           call, options);
}
template <class T, class ParamT, class XQ, class XK, class XV, class Out,
          std::enable_if_t<detail::is_tensor_v<XV>, int> = 0>
auto vjp_into(const MultiHeadDotProductAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables,
              const XQ& inputs_q, const XK& inputs_k, const XV& inputs_v, Out&& out, GradWorkspace<T>& workspace,
              const CallOptions<T>& call = {}, const GradOptions& options = {}) {
  return detail::attention_module_vjp_into(module, variables.params, inputs_q, inputs_k, inputs_v, 3, out, workspace,
                                           call, options);
}
// SelfAttention: inputs_q [batch..., length, features] (k = v = q), out [batch..., length,
// out_features]; the pullback's grads.inputs_q is the whole input cotangent.
template <class T, class ParamT, class XQ, class Out>
auto vjp_into(const SelfAttention<T, ParamT>& module, const AttentionVariables<T, ParamT>& variables,
              const XQ& inputs_q, Out&& out, GradWorkspace<T>& workspace, const CallOptions<T>& call = {},
              const GradOptions& options = {}) {
  return detail::attention_module_vjp_into(module.as_multi_head(), variables.params, inputs_q, inputs_q, inputs_q, 1,
                                           out, workspace, call, options);
}

// The pullbacks refer to variables.params: a temporary would dangle.
template <class T, class ParamT, class... Rest>
void vjp(const MultiHeadDotProductAttention<T, ParamT>&, AttentionVariables<T, ParamT>&&, Rest&&...) = delete;
template <class T, class ParamT, class... Rest>
void vjp(const SelfAttention<T, ParamT>&, AttentionVariables<T, ParamT>&&, Rest&&...) = delete;
template <class T, class ParamT, class... Rest>
void vjp_into(const MultiHeadDotProductAttention<T, ParamT>&, AttentionVariables<T, ParamT>&&, Rest&&...) = delete;
template <class T, class ParamT, class... Rest>
void vjp_into(const SelfAttention<T, ParamT>&, AttentionVariables<T, ParamT>&&, Rest&&...) = delete;

}  // namespace linen

#ifdef LINEN_COMPILED  // linen::compiled: its instantiations, declared extern
#include "detail/compiled/grad.hpp"
#endif

#endif  // LINEN_GRAD_HPP
