// SPDX-License-Identifier: Apache-2.0
//
// nnx state names, and binding the nnx modules (linen/nnx/) to a variables tree.
//
// An nnx model's parameters are its attributes' paths ('linear', 'kernel'), not Flax
// linen's collections. How they reach a file decides their names:
//   nnx.to_pure_dict(nnx.state(model))          linear/kernel          (nested dict)
//   the State itself, tree-flattened            linear/kernel/value    (a Variable's leaf is `value`)
//   the same with '.' (safetensors, Orbax)      linear.kernel.value, linear.kernel
//   nnx.List / list attributes                  layers/0/kernel        (the index a key)
// io::from_nnx_state turns any of these into linen's tree: each name split at '.' and '/'
// and joined with '/', the trailing `value` key dropped (when every name ends in it, the
// sign of a State; or always / never, as asked), and the result put under a collection,
// "params" by default (nnx.Param's collection in Flax's linen<->nnx bridge), so that
//   io::Variables vars = io::from_nnx_state(io::load_safetensors("model.safetensors"));
//   auto p = io::load(vars, linear, "linear");          // params/linear/kernel, .../bias
// binds as every linen module binds (io/modules.hpp), through scopes and nn.scan layers
// alike. io::to_nnx_state is the inverse (names without the collection, '/'-joined, and
// `/value` appended when asked), for files nnx reads back with nnx.replace_by_pure_dict /
// nnx.update.
//
// What each module reads (relative to its path; every shape exact, from the config):
//   nnx::Linear          params/kernel [in_features, out_features], params/bias [out_features]
//   nnx::LinearGeneral   params/kernel [batch..., in..., out...], params/bias [batch..., out...]
//   nnx::Embed           params/embedding [num_embeddings, features]
//   nnx::LayerNorm       params/scale, params/bias [num_features] (as use_scale / use_bias)
//   nnx::RMSNorm         params/scale [num_features] (use_scale)
//   nnx::MultiHeadAttention  params/{query,key,value,out}/... as LinearGeneral, with
//                        key/value [in_kv_features, num_kv_heads, head_dim], and
//                        params/{query_ln,key_ln}/scale [head_dim] (normalize_qk)
// A missing tensor or a wrong shape throws linen::io_error naming the path and both
// shapes.
#ifndef LINEN_IO_NNX_HPP
#define LINEN_IO_NNX_HPP

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../nnx/attention.hpp"
#include "../nnx/linear.hpp"
#include "../nnx/normalization.hpp"
#include "../tensor.hpp"
#include "modules.hpp"
#include "tree.hpp"
#include "variables.hpp"

namespace linen::io {

// What to do with a trailing `value` key (an nnx Variable's leaf).
enum class NnxValueSuffix {
  automatic,  // drop it when every name ends in it (an nnx.State), keep names otherwise
  strip,      // drop it wherever a name ends in it
  keep,       // names as they are (a module attribute that is itself called `value`)
};

struct NnxStateOptions {
  std::string collection = "params";  // the collection the names go under ("" = none)
  NnxValueSuffix value_suffix = NnxValueSuffix::automatic;
};

namespace detail {

inline std::vector<std::string> nnx_keys(const std::string& name) {
  std::vector<std::string> keys;
  std::string cur;
  for (char c : name) {
    if (c == '.' || c == '/') {
      keys.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  keys.push_back(cur);
  return keys;
}

}  // namespace detail

// An nnx state's names as linen's tree (see the top of this file). Throws io_error for a
// name with an empty key ("a..b", a leading or trailing separator), a name that is only
// `value` when the suffix is dropped, and two names that become the same path (naming
// both); nothing is returned then.
inline Variables from_nnx_state(const Variables& state, const NnxStateOptions& options = {}) {
  bool strip = options.value_suffix == NnxValueSuffix::strip;
  if (options.value_suffix == NnxValueSuffix::automatic) {
    strip = !state.empty();
    for (const auto& [name, a] : state) strip = strip && detail::nnx_keys(name).back() == "value";
  }
  if (!options.collection.empty())
    if (auto why = Variables::path_error(options.collection))
      throw linen::invalid_argument("linen::io: invalid nnx collection '" + options.collection + "': " + *why);
  Variables out;
  out.metadata = state.metadata;
  std::map<std::string, std::string> source;  // linen path -> the nnx name it came from
  for (const auto& [name, a] : state) {
    std::vector<std::string> keys = detail::nnx_keys(name);
    for (const auto& k : keys)
      if (k.empty()) throw io_error("nnx state name '" + name + "' has an empty key");
    if (strip && keys.back() == "value") {
      if (keys.size() == 1) throw io_error("nnx state name '" + name + "' is only the `value` key");
      keys.pop_back();
    }
    std::string path = options.collection;
    for (const auto& k : keys) path += (path.empty() ? "" : "/") + k;
    const auto [it, fresh] = source.emplace(path, name);
    if (!fresh)
      throw io_error("nnx state names '" + it->second + "' and '" + name + "' both become '" + path + "'");
    out.set(path, a);
  }
  return out;
}

// The inverse: the arrays under `collection` ("" = all), their paths relative to it,
// '/'-joined, with "/value" appended when value_suffix (an nnx.State's flattened names).
// Throws io_error naming the collection when nothing is under it.
inline Variables to_nnx_state(const Variables& vars, const std::string& collection = "params",
                              bool value_suffix = false) {
  Variables sub = collection.empty() ? vars : vars.subtree(collection);
  if (!value_suffix) return sub;
  Variables out;
  out.metadata = sub.metadata;
  for (const auto& [p, a] : sub) out.set(p + "/value", a);
  return out;
}

// ---- load ------------------------------------------------------------------------------

template <class T, class ParamT>
typename nnx::Linear<T, ParamT>::Params load(const ConstScope& vars, const nnx::Linear<T, ParamT>& module,
                                             const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  const auto& c = module.config();
  typename nnx::Linear<T, ParamT>::Params p;
  p.kernel = s.template get<ParamT, 2>("params/kernel", Shape{c.in_features, c.out_features});
  if (c.use_bias) p.bias = s.template get<ParamT, 1>("params/bias", Shape{c.out_features});
  return p;
}

template <class T, class ParamT, int Axes, int Features, int Batch>
nnx::LinearGeneralParams<ParamT, Axes, Features, Batch> load(
    const ConstScope& vars, const nnx::LinearGeneral<T, ParamT, Axes, Features, Batch>& module,
    const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  nnx::LinearGeneralParams<ParamT, Axes, Features, Batch> p;
  p.kernel = s.template get<ParamT, Batch + Axes + Features>("params/kernel", module.kernel_shape());
  if (module.config().use_bias) p.bias = s.template get<ParamT, Batch + Features>("params/bias", module.bias_shape());
  return p;
}

template <class T, class ParamT>
EmbedParams<ParamT> load(const ConstScope& vars, const nnx::Embed<T, ParamT>& module, const std::string& path = "") {
  return load(vars, module.core(), path);
}

template <class T, class ParamT>
LayerNormParams<ParamT> load(const ConstScope& vars, const nnx::LayerNorm<T, ParamT>& module,
                             const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  const Shape f{module.config().num_features};
  LayerNormParams<ParamT> p;
  if (module.config().use_scale) p.scale = s.template get<ParamT, 1>("params/scale", f);
  if (module.config().use_bias) p.bias = s.template get<ParamT, 1>("params/bias", f);
  return p;
}

template <class T, class ParamT>
RMSNormParams<ParamT> load(const ConstScope& vars, const nnx::RMSNorm<T, ParamT>& module, const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  RMSNormParams<ParamT> p;
  if (module.config().use_scale) p.scale = s.template get<ParamT, 1>("params/scale", Shape{module.config().num_features});
  return p;
}

template <class T, class ParamT>
nnx::MultiHeadAttentionParams<ParamT> load(const ConstScope& vars, const nnx::MultiHeadAttention<T, ParamT>& module,
                                           const std::string& path = "") {
  const ConstScope s = detail::scope_at(vars, path);
  nnx::MultiHeadAttentionParams<ParamT> p;
  p.query = load(s, module.query(), "query");
  p.key = load(s, module.key(), "key");
  p.value = load(s, module.value(), "value");
  if (module.config().normalize_qk) {
    p.query_ln = load(s, module.query_ln(), "query_ln");
    p.key_ln = load(s, module.key_ln(), "key_ln");
  }
  p.out = load(s, module.out(), "out");
  return p;
}

// ---- store -----------------------------------------------------------------------------
// Linear's, Embed's, LayerNorm's and RMSNorm's params are linen's types, which
// io/modules.hpp's store writes under the same names; LinearGeneral's:

template <class ParamT, int Axes, int Features, int Batch>
void store(const Scope& vars, const nnx::LinearGeneralParams<ParamT, Axes, Features, Batch>& p,
           const std::string& path = "") {
  const Scope s = detail::scope_at(vars, path);
  s.set("params/kernel", p.kernel);
  if (p.bias.size() > 0) s.set("params/bias", p.bias);
}

template <class ParamT>
void store(const Scope& vars, const nnx::MultiHeadAttentionParams<ParamT>& p, const std::string& path = "") {
  const Scope s = detail::scope_at(vars, path);
  store(s, p.query, "query");
  store(s, p.key, "key");
  store(s, p.value, "value");
  store(s, p.query_ln, "query_ln");  // writes nothing when the scale is empty (no normalize_qk)
  store(s, p.key_ln, "key_ln");
  store(s, p.out, "out");
}

}  // namespace linen::io

#endif  // LINEN_IO_NNX_HPP
