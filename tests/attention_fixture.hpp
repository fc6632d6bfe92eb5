// SPDX-License-Identifier: Apache-2.0
// Reading a module fixture: its Flax config (metadata "config") and its variables.
#ifndef LINEN_TESTS_ATTENTION_FIXTURE_HPP
#define LINEN_TESTS_ATTENTION_FIXTURE_HPP

#include <string>

#include <nlohmann/json.hpp>

#include <linen/attention.hpp>
#include <linen/io/attention.hpp>

#include "test_support.hpp"

namespace linen_test {

inline nlohmann::json fixture_config(const linen::io::Variables& f) {
  return nlohmann::json::parse(f.metadata.at("config"));
}

// The Flax constructor arguments of a fixture as an AttentionConfig.
template <class T, class P>
linen::AttentionConfig<T, P> config_from(const nlohmann::json& c) {
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = c.at("num_heads").get<linen::Index>();
  if (c.contains("qkv_features")) cfg.qkv_features = c["qkv_features"].get<linen::Index>();
  if (c.contains("out_features")) cfg.out_features = c["out_features"].get<linen::Index>();
  if (c.contains("use_bias")) cfg.use_bias = c["use_bias"].get<bool>();
  if (c.contains("normalize_qk")) cfg.normalize_qk = c["normalize_qk"].get<bool>();
  if (c.contains("decode")) cfg.decode = c["decode"].get<bool>();
  if (c.contains("force_fp32_for_softmax")) cfg.force_fp32_for_softmax = c["force_fp32_for_softmax"].get<bool>();
  if (c.contains("dropout_rate")) cfg.dropout_rate = c["dropout_rate"].get<double>();
  if (c.contains("broadcast_dropout")) cfg.broadcast_dropout = c["broadcast_dropout"].get<bool>();
  return cfg;
}

// numpy dtype names of the fixture config (Flax's defaults: dtype from the inputs,
// param_dtype float32).
inline std::string dtype_of_case(const nlohmann::json& c) { return c.value("dtype", std::string("float32")); }
inline std::string param_dtype_of_case(const nlohmann::json& c) {
  return c.value("param_dtype", std::string("float32"));
}

// Slices position i of the length axis (rank-3 [batch, len, features] inputs).
template <class T>
linen::Tensor<T, 3> position(const linen::Tensor<T, 3>& x, linen::Index i) {
  const Eigen::array<linen::Index, 3> off{0, i, 0}, ext{x.dimension(0), 1, x.dimension(2)};
  return x.slice(off, ext);
}

}  // namespace linen_test

#endif  // LINEN_TESTS_ATTENTION_FIXTURE_HPP
