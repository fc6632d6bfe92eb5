// SPDX-License-Identifier: Apache-2.0
//
// flax/nnx/nn/attention.py's MultiHeadAttention: its fields, its parameters and its init
// (the attention call is not here yet).
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
#ifndef LINEN_NNX_ATTENTION_HPP
#define LINEN_NNX_ATTENTION_HPP

#include <optional>
#include <string>
#include <utility>

#include "../errors.hpp"
#include "../initializers.hpp"
#include "../layer_norm.hpp"
#include "../precision.hpp"
#include "../tensor.hpp"
#include "linear.hpp"
#include "normalization.hpp"
#include "rnglib.hpp"

namespace linen::nnx {

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

  // nnx's constructor fields (the parameter part; attention_fn and the promote /
  // dot_general hooks are not here). 0 / nullopt: nnx's None.
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

 private:
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
