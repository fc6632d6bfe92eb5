// SPDX-License-Identifier: Apache-2.0
//
// Binding Flax checkpoints to attention modules: Flax variable paths
// (`params/<module path>/query/kernel`, `cache/<module path>/cached_key`, ...) to and from
// linen::AttentionVariables, with every shape checked against the module's config.
#ifndef LINEN_IO_ATTENTION_HPP
#define LINEN_IO_ATTENTION_HPP

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../attention.hpp"
#include "../errors.hpp"
#include "variables.hpp"

namespace linen {
namespace io {
namespace detail {

inline std::string join_path(const std::string& collection, const std::string& module_path, const std::string& leaf) {
  std::string p = collection;
  if (!module_path.empty()) p += "/" + module_path;
  return p + "/" + leaf;
}

// A stored cache array [batch..., max_length, heads, head_dim] read as
// [prod(batch), max_length, heads, head_dim]; `batch` receives its batch dims. Vars: a
// Variables or an io::ConstScope (io/tree.hpp).
template <class T, class Vars>
Tensor<T, 4> read_flattened_cache(const Vars& vars, const std::string& path, Index heads, Index head_dim,
                                  Shape& batch) {
  const auto& a = vars.at(path);
  const Shape s = a.shape();
  if (s.size() < 3 || s[s.size() - 2] != heads || s[s.size() - 1] != head_dim)
    throw io_error(path + ": shape " + to_string(s) + " is not [batch..., max_length, " + std::to_string(heads) +
                   ", " + std::to_string(head_dim) + "]");
  batch.assign(s.begin(), s.end() - 3);
  const std::vector<T> data = a.template to_vector<T>(path);
  Tensor<T, 4> t(num_elements(batch), s[s.size() - 3], heads, head_dim);
  std::copy(data.begin(), data.end(), t.data());
  return t;
}

}  // namespace detail

// Reads the variables of one attention module from a checkpoint.
//   vars: a loaded checkpoint (load_safetensors, load_msgpack), flat Flax paths.
//   module_path: where the module sits in the model ("" = the root module; e.g.
//     "encoder/attn_0" reads params/encoder/attn_0/query/kernel, ...).
// params are converted to ParamT and checked against the shapes the module makes
// (AttentionParamShapes, the module's own rule) for the input widths the stored
// query/key/value kernels [in, num_heads, head_dim] give: head_dim = qkv_features (default
// the query's in) / num_heads, biases [num_heads, head_dim] when use_bias, out/kernel
// [num_heads, head_dim, out] (out = out_features, default the query's in), out/bias [out],
// query_ln/key_ln scale [head_dim] when normalize_qk. The cache
// (cache/<module_path>/cached_key, cached_value [batch..., max_length, num_heads,
// head_dim], cache_index int scalar) is read when present. A missing tensor or a wrong
// shape throws linen::io_error naming the path and both shapes. `vars` may also be an
// io::ConstScope (io/tree.hpp): paths are then the scope's, and a scan layer's scope reads
// that layer's slices.
template <class T, class ParamT, class Vars>
AttentionVariables<T, ParamT> load_attention(const Vars& vars, const AttentionConfig<T, ParamT>& config,
                                            const std::string& module_path = "") {
  AttentionVariables<T, ParamT> out;
  auto path = [&](const std::string& leaf) { return detail::join_path("params", module_path, leaf); };
  const Index H = config.num_heads;
  if (H <= 0) throw linen::invalid_argument("load_attention: num_heads must be positive");
  // The input widths, from the stored kernels' first dims.
  Index in[3] = {0, 0, 0};
  const char* names[3] = {"query", "key", "value"};
  for (int i = 0; i < 3; ++i) {
    const std::string kp = path(std::string(names[i]) + "/kernel");
    const Shape ks = vars.at(kp).shape();
    if (ks.size() != 3 || ks[1] != H || ks[2] <= 0 || ks[0] <= 0)
      throw io_error(kp + ": shape " + to_string(ks) + " is not [in_features, num_heads=" + std::to_string(H) +
                     ", head_dim]");
    in[i] = ks[0];
  }
  const std::string qk = path("query/kernel");
  const Shape qks = vars.at(qk).shape();
  const Index qkv = config.qkv_features.value_or(in[0]);
  if (qkv != H * qks[2])
    throw io_error(qk + ": shape " + to_string(qks) + " gives qkv_features " + std::to_string(H * qks[2]) +
                   ", the config says " +
                   (config.qkv_features ? std::to_string(*config.qkv_features)
                                        : "none (qkv_features = in_features = " + std::to_string(in[0]) + ")"));
  const AttentionParamShapes s = linen::detail::attention_param_shapes(config, in[0], in[1], in[2], "load_attention");
  auto& p = out.params;
  const Shape* kernels[3] = {&s.query_kernel, &s.key_kernel, &s.value_kernel};
  DenseParams<ParamT, 1, 2>* dense[3] = {&p.query, &p.key, &p.value};
  for (int i = 0; i < 3; ++i) {
    dense[i]->kernel = vars.template get<ParamT, 3>(path(std::string(names[i]) + "/kernel"), *kernels[i]);
    if (s.use_bias) dense[i]->bias = vars.template get<ParamT, 2>(path(std::string(names[i]) + "/bias"), s.qkv_bias);
  }
  const std::string ok = path("out/kernel");
  const Shape oks = vars.at(ok).shape();
  if (oks.size() == 3 && oks[2] != s.out_features)
    throw io_error(ok + ": shape " + to_string(oks) + " gives out_features " + std::to_string(oks[2]) +
                   ", the config says " +
                   (config.out_features ? std::to_string(*config.out_features)
                                        : "none (out_features = in_features = " + std::to_string(in[0]) + ")"));
  p.out.kernel = vars.template get<ParamT, 3>(ok, s.out_kernel);
  if (s.use_bias) p.out.bias = vars.template get<ParamT, 1>(path("out/bias"), s.out_bias);
  if (s.normalize_qk) {
    p.query_ln.scale = vars.template get<ParamT, 1>(path("query_ln/scale"), s.ln_scale);
    p.key_ln.scale = vars.template get<ParamT, 1>(path("key_ln/scale"), s.ln_scale);
  }
  const Index dh = s.head_dim;
  const std::string ck = detail::join_path("cache", module_path, "cached_key");
  if (vars.contains(ck)) {
    AttentionCache<T> c;
    const std::string cv = detail::join_path("cache", module_path, "cached_value");
    Shape value_batch;
    c.cached_key = detail::read_flattened_cache<T>(vars, ck, H, dh, c.batch);
    c.cached_value = detail::read_flattened_cache<T>(vars, cv, H, dh, value_batch);
    if (vars.at(cv).shape() != vars.at(ck).shape())
      throw io_error(cv + ": shape " + to_string(vars.at(cv).shape()) + " differs from " + ck + "'s " +
                     to_string(vars.at(ck).shape()));
    const std::string ci = detail::join_path("cache", module_path, "cache_index");
    const auto& ia = vars.at(ci);
    if (!ia.shape().empty()) throw io_error(ci + ": shape " + to_string(ia.shape()) + " expected a scalar ()");
    const auto idx = ia.template to_vector<std::int32_t>(ci);
    if (idx[0] < 0 || idx[0] > c.max_length())
      throw io_error(ci + ": value " + std::to_string(idx[0]) + " outside [0, max_length=" +
                     std::to_string(c.max_length()) + "]");
    c.cache_index = idx[0];
    out.cache = std::move(c);
  }
  return out;
}

// Writes the module's variables under Flax's paths (the inverse of load_attention):
// params/<module_path>/..., and cache/<module_path>/... when a cache is present, the
// cache in Flax's layout [batch..., max_length, num_heads, head_dim]. `vars` may also be an
// io::Scope (io/tree.hpp).
template <class T, class ParamT, class Vars>
void store_attention(Vars&& vars, const AttentionVariables<T, ParamT>& v, const AttentionConfig<T, ParamT>& config,
                     const std::string& module_path = "") {
  auto path = [&](const std::string& leaf) { return detail::join_path("params", module_path, leaf); };
  const auto& p = v.params;
  const std::pair<const char*, const DenseParams<ParamT, 1, 2>*> dense[] = {
      {"query", &p.query}, {"key", &p.key}, {"value", &p.value}};
  for (const auto& [name, d] : dense) {
    vars.set(path(std::string(name) + "/kernel"), d->kernel);
    if (config.use_bias) vars.set(path(std::string(name) + "/bias"), d->bias);
  }
  vars.set(path("out/kernel"), p.out.kernel);
  if (config.use_bias) vars.set(path("out/bias"), p.out.bias);
  if (config.normalize_qk) {
    vars.set(path("query_ln/scale"), p.query_ln.scale);
    vars.set(path("key_ln/scale"), p.key_ln.scale);
  }
  if (v.cache) {
    const auto& c = *v.cache;
    for (const auto& [name, t] : {std::pair{"cached_key", &c.cached_key}, std::pair{"cached_value", &c.cached_value}}) {
      Shape s = c.batch;
      s.insert(s.end(), {t->dimension(1), t->dimension(2), t->dimension(3)});
      Array a = Array::from(*t);
      vars.set(detail::join_path("cache", module_path, name), Array(a.dtype(), s, a.bytes()));
    }
    std::vector<std::uint8_t> bytes(4);
    const std::int32_t idx = c.cache_index;
    std::memcpy(bytes.data(), &idx, 4);  // little-endian hosts only, like the readers
    vars.set(detail::join_path("cache", module_path, "cache_index"), Array(DType::I32, Shape{}, std::move(bytes)));
  }
}

}  // namespace io
}  // namespace linen

#endif  // LINEN_IO_ATTENTION_HPP
