// SPDX-License-Identifier: Apache-2.0
//
// Binding every linen module to its place in a variables tree (io/tree.hpp), under
// Flax's parameter names:
//
//   io::load(vars, module, "decoder/layers_0/mlp/wi")   -> what module.init returns
//   io::store(vars, params, "decoder/layers_0/mlp/wi")  <- the same
//
// `vars` is a Variables or a scope (a module path, or layer i of an nn.scan stack); the
// path, relative to it, may be "" (the scope's own module). What each module reads:
//   Dense / DenseGeneral   params/<path>/kernel [in..., features...], bias [features...]
//                          (when use_bias); `in` from the stored kernel, the rest from
//                          the config;
//   LayerNorm              scale [features] (use_scale), bias [features] (use_bias);
//   RMSNorm                scale [features] (use_scale);
//   Embed                  embedding [num_embeddings, features];
//   MultiHeadDotProductAttention / SelfAttention / an AttentionConfig
//                          io/attention.hpp's load_attention (params/<path>/query/...
//                          and cache/<path>/... when present), the module's own shape
//                          rules (detail::attention_param_shapes).
// Every shape is checked against the config (and, for the widths a config leaves open,
// against each other): a missing tensor or a wrong shape throws linen::io_error naming
// the path (and the layer, in a scan) and both shapes. Loads convert to ParamT as
// Array::to does; in a layer scope only that layer's bytes are read.
//
// store writes every parameter the params hold (a parameter a config turns off is held
// empty, size 0, and is not written); attention's goes through store_attention.
#ifndef LINEN_IO_MODULES_HPP
#define LINEN_IO_MODULES_HPP

#include <string>

#include "../attention.hpp"
#include "../dense.hpp"
#include "../embed.hpp"
#include "../errors.hpp"
#include "../layer_norm.hpp"
#include "../rms_norm.hpp"
#include "../tensor.hpp"
#include "attention.hpp"
#include "tree.hpp"
#include "variables.hpp"

namespace linen::io {
namespace detail {

template <class S>
S scope_at(const S& vars, const std::string& path) {
  return path.empty() ? vars : vars.push(path);
}

// A [features] vector at `leaf`: rank 1, and of length `features` once that is known
// (< 0: not yet; the first vector read fixes it).
template <class ParamT>
Tensor<ParamT, 1> load_feature_vector(const ConstScope& s, const std::string& leaf, Index& features) {
  const ArrayView a = s.at(leaf);
  if (a.rank() != 1)
    throw io_error(s.full_path(leaf) + ": " + a.describe() + " is not a [features] vector" +
                   (features >= 0 ? " (features = " + std::to_string(features) + ")" : std::string()));
  if (features < 0) features = a.shape()[0];
  return s.template get<ParamT, 1>(leaf, Shape{features});
}

}  // namespace detail

// ---- load --------------------------------------------------------------------

// Dense (a DenseGeneral<T, ParamT, 1, 1>) and DenseGeneral: kernel [in_dims..., features...]
// (in_dims from the file, each positive), bias [features...] when use_bias.
template <class T, class ParamT, int Axes, int Features>
DenseParams<ParamT, Axes, Features> load(const ConstScope& vars, const DenseGeneral<T, ParamT, Axes, Features>& module,
                                         const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  const auto& c = module.config();
  const Shape features(c.features.begin(), c.features.end());
  const ArrayView k = s.at("params/kernel");
  const Shape ks = k.shape();
  bool in_ok = k.rank() == Axes + Features;
  for (int i = 0; in_ok && i < Axes; ++i) in_ok = ks[static_cast<std::size_t>(i)] > 0;
  if (!in_ok)
    throw io_error(s.full_path("params/kernel") + ": " + k.describe() + " is not [in_features (" +
                   std::to_string(Axes) + (Axes == 1 ? " dim" : " dims") + ")..., features " + to_string(features) +
                   "]");
  Shape want(ks.begin(), ks.begin() + Axes);
  want.insert(want.end(), features.begin(), features.end());
  DenseParams<ParamT, Axes, Features> p;
  p.kernel = s.template get<ParamT, Axes + Features>("params/kernel", want);
  if (c.use_bias) p.bias = s.template get<ParamT, Features>("params/bias", features);
  return p;
}

// LayerNorm: scale and bias [features] as the config uses them (features from the file;
// scale and bias must agree).
template <class T, class ParamT>
LayerNormParams<ParamT> load(const ConstScope& vars, const LayerNorm<T, ParamT>& module, const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  LayerNormParams<ParamT> p;
  Index features = -1;
  if (module.config().use_scale) p.scale = detail::load_feature_vector<ParamT>(s, "params/scale", features);
  if (module.config().use_bias) p.bias = detail::load_feature_vector<ParamT>(s, "params/bias", features);
  return p;
}

// RMSNorm: scale [features] when use_scale.
template <class T, class ParamT>
RMSNormParams<ParamT> load(const ConstScope& vars, const RMSNorm<T, ParamT>& module, const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  RMSNormParams<ParamT> p;
  Index features = -1;
  if (module.config().use_scale) p.scale = detail::load_feature_vector<ParamT>(s, "params/scale", features);
  return p;
}

// Embed: embedding [num_embeddings, features], both from the config.
template <class T, class ParamT>
EmbedParams<ParamT> load(const ConstScope& vars, const Embed<T, ParamT>& module, const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  EmbedParams<ParamT> p;
  p.embedding = s.template get<ParamT, 2>("params/embedding",
                                          Shape{module.config().num_embeddings, module.config().features});
  return p;
}

// The attention modules: load_attention at the scope's path (so its paths and errors are
// the full Flax paths).
template <class T, class ParamT>
AttentionVariables<T, ParamT> load(const ConstScope& vars, const AttentionConfig<T, ParamT>& config,
                                   const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  return load_attention(s.root(), config, s.path());
}
template <class T, class ParamT>
AttentionVariables<T, ParamT> load(const ConstScope& vars, const MultiHeadDotProductAttention<T, ParamT>& module,
                                   const std::string& path = "") {
  return load(vars, module.config(), path);
}
template <class T, class ParamT>
AttentionVariables<T, ParamT> load(const ConstScope& vars, const SelfAttention<T, ParamT>& module,
                                   const std::string& path = "") {
  return load(vars, module.config(), path);
}

// ---- store -------------------------------------------------------------------

template <class ParamT, int Axes, int Features>
void store(const Scope& vars, const DenseParams<ParamT, Axes, Features>& p, const std::string& path = "") {
  const Scope s = detail::scope_at(vars, path);
  s.set("params/kernel", p.kernel);
  if (p.bias.size() > 0) s.set("params/bias", p.bias);
}

template <class ParamT>
void store(const Scope& vars, const LayerNormParams<ParamT>& p, const std::string& path = "") {
  const Scope s = detail::scope_at(vars, path);
  if (p.scale.size() > 0) s.set("params/scale", p.scale);
  if (p.bias.size() > 0) s.set("params/bias", p.bias);
}

template <class ParamT>
void store(const Scope& vars, const RMSNormParams<ParamT>& p, const std::string& path = "") {
  const Scope s = detail::scope_at(vars, path);
  if (p.scale.size() > 0) s.set("params/scale", p.scale);
}

template <class ParamT>
void store(const Scope& vars, const EmbedParams<ParamT>& p, const std::string& path = "") {
  detail::scope_at(vars, path).set("params/embedding", p.embedding);
}

// Attention: store_attention, with use_bias and normalize_qk read off the params (their
// biases and LayerNorm scales are empty when off).
template <class T, class ParamT>
void store(const Scope& vars, const AttentionVariables<T, ParamT>& v, const std::string& path = "") {
  const Scope s = detail::scope_at(vars, path);
  AttentionConfig<T, ParamT> config;
  config.use_bias = v.params.out.bias.size() > 0;
  config.normalize_qk = v.params.query_ln.scale.size() > 0;
  store_attention(s.root(), v, config, s.path());
}

}  // namespace linen::io

#endif  // LINEN_IO_MODULES_HPP
