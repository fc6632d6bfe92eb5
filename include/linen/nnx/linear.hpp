// SPDX-License-Identifier: Apache-2.0
//
// flax/nnx/nn/linear.py's Linear, LinearGeneral and Embed on linen's cores.
//
// An nnx module draws its parameters in its constructor, from the `params` stream of the
// Rngs it is given (nnx.Rngs; rnglib.hpp). linen keeps its one module surface: the
// Config holds nnx's constructor fields, init(rngs) makes the parameters with exactly the
// draws nnx's __init__ makes (and advances the caller's streams as nnx does), apply runs
// __call__ on them:
//
//   nnx.Linear(3, 4, rngs=rngs)            Linear<float> lin({.in_features = 3, .out_features = 4});
//                                          auto p = lin.init(rngs);     // {kernel [3, 4], bias [4]}
//   layer(x)                               lin.apply(p, x)
//
// Linear         kernel [in_features, out_features] (kernel_init sees that shape: rngs.params()
//                draw 1), bias [out_features] (bias_init: draw 2, only when use_bias). This
//                is linen's Dense, whose init sees the same shapes: apply, the checks and
//                the vjp are DenseGeneral's.
// LinearGeneral  kernel [*batch_axis sizes, *in_features, *out_features], bias
//                [*batch_axis sizes, *out_features]. Unlike linen's DenseGeneral the input
//                dims are given (in_features), `axis` may be any input axes (sorted before
//                they pair with the kernel's in dims, as _normalize_axes does), and
//                batch_axis {0: B0, 1: B1, ...} adds leading batch dims to the kernel:
//                kernel_init sees (prod(batch) * prod(in_features), prod(out_features)) (the
//                batch folded into fan_in, as linen's DenseGeneral folds batch_dims), bias_init
//                (prod(bias shape),). The product is DenseGeneral's core (multiply_rows),
//                once per batch slice of the kernel.
// Embed          embedding [num_embeddings, features] (embedding_init: draw 1), looked up
//                and attended by linen's Embed.
//
// dtype: T is the dtype the computation runs in. nnx's default dtype=None means
// jnp.result_type of the inputs and parameters (float32 inputs and float32 params:
// float32); pick T as that. The default promote_dtype casts inputs, kernel and bias to T
// before the product (half types accumulate in float and round once, then add the bias in
// T), which is what linen's DenseGeneral does; a custom promote_dtype is not expressible.
// preferred_element_type, dot_general, out_sharding and the *_metadata are not
// reproduced.
#ifndef LINEN_NNX_LINEAR_HPP
#define LINEN_NNX_LINEAR_HPP

#include <algorithm>
#include <array>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dense.hpp"
#include "../dense_layer.hpp"
#include "../embed.hpp"
#include "../errors.hpp"
#include "../initializers.hpp"
#include "../module.hpp"
#include "../precision.hpp"
#include "../tensor.hpp"
#include "rnglib.hpp"

namespace linen::nnx {
namespace detail {

template <std::size_t N>
std::string tuple_string(const std::array<Index, N>& a) {
  return to_string(Shape(a.begin(), a.end()));
}

inline std::string ints_string(const std::vector<int>& v) {
  std::string s = "(";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// Copies a row-major tensor of `shape` into `dst` with its axes reordered: dst's axis i is
// src's axis perm[i].
template <class S, class D>
void permute_copy(const S* src, const Shape& shape, const std::vector<int>& perm, D* dst) {
  const std::size_t r = shape.size();
  std::vector<Index> sstride(r, 1);
  for (std::size_t d = r; d-- > 1;) sstride[d - 1] = sstride[d] * shape[d];
  Shape dshape(r);
  std::vector<Index> step(r);
  for (std::size_t i = 0; i < r; ++i) {
    dshape[i] = shape[static_cast<std::size_t>(perm[i])];
    step[i] = sstride[static_cast<std::size_t>(perm[i])];
  }
  const Index n = num_elements(shape);
  std::vector<Index> idx(r, 0);
  Index off = 0;
  for (Index i = 0; i < n; ++i) {
    dst[i] = static_cast<D>(src[off]);
    for (std::size_t d = r; d-- > 0;) {  // odometer over dst's shape
      off += step[d];
      if (++idx[d] < dshape[d]) break;
      off -= step[d] * dshape[d];
      idx[d] = 0;
    }
  }
}

// The inverse scatter: dst (of `shape`) from src laid out with axes perm (as permute_copy
// wrote it).
template <class S, class D>
void unpermute_copy(const S* src, const Shape& shape, const std::vector<int>& perm, D* dst) {
  std::vector<int> inv(perm.size());
  Shape pshape(perm.size());
  for (std::size_t i = 0; i < perm.size(); ++i) {
    inv[static_cast<std::size_t>(perm[i])] = static_cast<int>(i);
    pshape[i] = shape[static_cast<std::size_t>(perm[i])];
  }
  permute_copy(src, pshape, inv, dst);
}

}  // namespace detail

// ---- Linear ---------------------------------------------------------------------------

template <class T, class ParamT = T>
class Linear {
 public:
  using Dense = linen::Dense<T, ParamT>;
  using Params = typename Dense::Params;  // kernel [in_features, out_features], bias [out_features]

  // nnx.Linear's fields in nnx's order (dtype and param_dtype are T and ParamT).
  struct Config {
    Index in_features = 0;   // required
    Index out_features = 0;  // required
    bool use_bias = true;
    Precision precision = Precision::Default;
    initializers::Initializer<ParamT> kernel_init = initializers::lecun_normal();
    initializers::Initializer<ParamT> bias_init = initializers::zeros();
  };

  explicit Linear(Config config) : config_(std::move(config)), dense_(dense_config(config_)) {}
  const Config& config() const { return config_; }
  // The linen Dense this Linear computes with (grad.hpp's vjp takes it).
  const Dense& dense() const { return dense_; }

  // nnx.Linear.__init__'s draws: kernel = kernel_init(rngs.params(), (in, out)), then, when
  // use_bias, bias = bias_init(rngs.params(), (out,)). A throw leaves rngs unchanged.
  Params init(Rngs& rngs) const {
    return detail::transact(rngs, [&](Rngs& r) {
      Params p;
      const Shape ks{config_.in_features, config_.out_features};
      linen::detail::checked_allocation<ParamT>(ks, "nnx::Linear: kernel");
      p.kernel.resize(config_.in_features, config_.out_features);
      config_.kernel_init(r.params(), ks, p.kernel.data());
      if (config_.use_bias) {
        p.bias.resize(config_.out_features);
        config_.bias_init(r.params(), Shape{config_.out_features}, p.bias.data());
      }
      return p;
    });
  }

  //   x: [batch..., in_features] -> [batch..., out_features]
  template <class X>
  Tensor<T, linen::detail::tensor_traits<X>::rank> apply(const Params& p, const X& x) const {
    check_params(p);
    return dense_.apply(p, x);
  }

  // Throws unless the parameters are [in_features, out_features] and [out_features].
  void check_params(const Params& p) const {
    const Shape want{config_.in_features, config_.out_features};
    if (shape_of(p.kernel) != want)
      throw linen::invalid_argument("nnx::Linear: kernel of shape " + to_string(shape_of(p.kernel)) + ", expected " +
                                    to_string(want));
    if (config_.use_bias && shape_of(p.bias) != Shape{config_.out_features})
      throw linen::invalid_argument("nnx::Linear: bias of shape " + to_string(shape_of(p.bias)) + ", expected " +
                                    to_string(Shape{config_.out_features}));
  }

 private:
  static typename Dense::Config dense_config(const Config& c) {
    if (c.in_features <= 0 || c.out_features <= 0)
      throw linen::invalid_argument("nnx::Linear: in_features and out_features must be positive, got in_features=" +
                                    std::to_string(c.in_features) + ", out_features=" + std::to_string(c.out_features));
    if (!c.kernel_init) throw linen::invalid_argument("nnx::Linear: kernel_init is empty");
    if (c.use_bias && !c.bias_init) throw linen::invalid_argument("nnx::Linear: bias_init is empty");
    typename Dense::Config d;
    d.features = c.out_features;
    d.use_bias = c.use_bias;
    d.precision = c.precision;
    d.kernel_init = c.kernel_init;
    d.bias_init = c.bias_init;
    return d;
  }

  Config config_;
  Dense dense_;
};

// ---- LinearGeneral --------------------------------------------------------------------

// kernel: [batch..., in_features..., out_features...]; bias: [batch..., out_features...]
// (size 0 when use_bias is false).
template <class ParamT, int Axes, int Features, int Batch>
struct LinearGeneralParams {
  Tensor<ParamT, Batch + Axes + Features> kernel;
  Tensor<ParamT, Batch + Features> bias;
};

// LinearGeneral<T, ParamT, Axes, Features, Batch>: `Axes` input features contracted,
// `Features` output features, `Batch` batch axes (nnx's len(in_features),
// len(out_features), len(batch_axis)).
template <class T, class ParamT = T, int Axes = 1, int Features = 1, int Batch = 0>
class LinearGeneral {
  static_assert(is_element_type_v<T> && is_element_type_v<ParamT>,
                "linen: nnx::LinearGeneral element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(Axes >= 1 && Features >= 1 && Batch >= 0,
                "linen: nnx::LinearGeneral needs at least one in feature and one out feature");

 public:
  using Params = LinearGeneralParams<ParamT, Axes, Features, Batch>;
  // The linen core: its multiply_rows computes each batch slice.
  using Core = DenseGeneral<T, ParamT, 1, 1>;

  struct Config {
    std::array<Index, Axes> in_features{};      // required
    std::array<Index, Features> out_features{};  // required
    std::vector<int> axis{-1};                   // len(axis) must be Axes (nnx: ValueError otherwise)
    std::map<int, Index> batch_axis{};           // {0: size, 1: size, ...}: Batch entries
    bool use_bias = true;
    Precision precision = Precision::Default;
    initializers::Initializer<ParamT> kernel_init = initializers::lecun_normal();
    initializers::Initializer<ParamT> bias_init = initializers::zeros();
  };

  explicit LinearGeneral(Config config) : config_(std::move(config)) {
    const auto& c = config_;
    for (Index f : c.in_features)
      if (f <= 0) throw linen::invalid_argument("nnx::LinearGeneral: in_features must be positive, got " + detail::tuple_string(c.in_features));
    for (Index f : c.out_features)
      if (f <= 0) throw linen::invalid_argument("nnx::LinearGeneral: out_features must be positive, got " + detail::tuple_string(c.out_features));
    if (c.axis.size() != static_cast<std::size_t>(Axes))
      throw linen::invalid_argument("nnx::LinearGeneral: in_features and axis must have the same length. Got " +
                                    detail::tuple_string(c.in_features) + " and " + detail::ints_string(c.axis) + ".");
    if (c.batch_axis.size() != static_cast<std::size_t>(Batch))
      throw linen::invalid_argument("nnx::LinearGeneral: batch_axis has " + std::to_string(c.batch_axis.size()) +
                                    " entries, the module type has Batch = " + std::to_string(Batch));
    int expect = 0;
    for (const auto& [a, size] : c.batch_axis) {
      if (a != expect++) {
        std::vector<int> keys;
        for (const auto& kv : c.batch_axis) keys.push_back(kv.first);
        throw linen::invalid_argument("nnx::LinearGeneral: batch_dims " + detail::ints_string(keys) +
                                      " must be consecutive leading dimensions starting from 0.");
      }
      if (size <= 0)
        throw linen::invalid_argument("nnx::LinearGeneral: batch_axis size of axis " + std::to_string(a) +
                                      " must be positive, got " + std::to_string(size));
    }
    if (!c.kernel_init) throw linen::invalid_argument("nnx::LinearGeneral: kernel_init is empty");
    if (c.use_bias && !c.bias_init) throw linen::invalid_argument("nnx::LinearGeneral: bias_init is empty");
  }
  const Config& config() const { return config_; }

  Shape kernel_shape() const {
    Shape s = batch_shape();
    s.insert(s.end(), config_.in_features.begin(), config_.in_features.end());
    s.insert(s.end(), config_.out_features.begin(), config_.out_features.end());
    return s;
  }
  Shape bias_shape() const {
    Shape s = batch_shape();
    s.insert(s.end(), config_.out_features.begin(), config_.out_features.end());
    return s;
  }

  // nnx.LinearGeneral.__init__'s draws: kernel from rngs.params() (kernel_init seeing
  // (prod(batch) * prod(in_features), prod(out_features))), then, when use_bias, bias from
  // rngs.params() (bias_init seeing (prod(bias_shape),)). A throw leaves rngs unchanged.
  Params init(Rngs& rngs) const {
    return detail::transact(rngs, [&](Rngs& r) {
      const Shape ks = kernel_shape(), bs = bias_shape();
      linen::detail::checked_allocation<ParamT>(ks, "nnx::LinearGeneral: kernel");
      Params p;
      p.kernel.resize(to_dims<Batch + Axes + Features>(ks));
      config_.kernel_init(r.params(), Shape{batch_size() * in_size(), out_size()}, p.kernel.data());
      if (config_.use_bias) {
        p.bias.resize(to_dims<Batch + Features>(bs));
        config_.bias_init(r.params(), Shape{num_elements(bs)}, p.bias.data());
      }
      return p;
    });
  }

  // How an input of shape xs is read: its axes reordered to [batch..., free..., contracted
  // (sorted)...] and the output's shape [batch..., free..., out_features...].
  struct Layout {
    std::vector<int> perm;  // input axes in the order the product reads them
    bool identity = true;   // perm is 0, 1, ..., rank-1: no copy needed
    Index rows = 0;         // prod(free dims): rows of each batch slice
    Shape out_shape;
  };
  Layout layout(const Shape& xs) const {
    const int rank = static_cast<int>(xs.size());
    if (rank < Batch + Axes)
      throw linen::invalid_argument("nnx::LinearGeneral: input of shape " + to_string(xs) + " has rank " +
                                    std::to_string(rank) + ", below len(batch_axis) + len(axis) = " +
                                    std::to_string(Batch + Axes));
    std::vector<int> axes;
    for (int a : config_.axis) {
      if (a < -rank || a >= rank)
        throw linen::invalid_argument("nnx::LinearGeneral: axis " + std::to_string(a) + " is out of range for input of shape " +
                                      to_string(xs));
      axes.push_back(a < 0 ? a + rank : a);
    }
    std::sort(axes.begin(), axes.end());  // _normalize_axes sorts (and keeps duplicates)
    for (std::size_t i = 0; i < axes.size(); ++i) {
      if (i > 0 && axes[i] == axes[i - 1])
        throw linen::invalid_argument("nnx::LinearGeneral: axis " + detail::ints_string(config_.axis) +
                                      " names input axis " + std::to_string(axes[i]) + " twice (input of shape " +
                                      to_string(xs) + ")");
      if (axes[i] < Batch)
        throw linen::invalid_argument("nnx::LinearGeneral: axis " + detail::ints_string(config_.axis) +
                                      " contracts batch axis " + std::to_string(axes[i]) + " (input of shape " +
                                      to_string(xs) + ")");
    }
    for (std::size_t i = 0; i < axes.size(); ++i) {
      if (xs[static_cast<std::size_t>(axes[i])] != config_.in_features[i])
        throw linen::invalid_argument("nnx::LinearGeneral: input of shape " + to_string(xs) + " has " +
                                      std::to_string(xs[static_cast<std::size_t>(axes[i])]) + " at axis " +
                                      std::to_string(axes[i]) + ", in_features " +
                                      detail::tuple_string(config_.in_features) + " (paired with the sorted axes " +
                                      detail::ints_string(axes) + ") needs " + std::to_string(config_.in_features[i]));
    }
    const Shape bsh = batch_shape();
    for (int b = 0; b < Batch; ++b)
      if (xs[static_cast<std::size_t>(b)] != bsh[static_cast<std::size_t>(b)])
        throw linen::invalid_argument("nnx::LinearGeneral: input of shape " + to_string(xs) + " has " +
                                      std::to_string(xs[static_cast<std::size_t>(b)]) + " at batch axis " +
                                      std::to_string(b) + ", batch_axis says " + std::to_string(bsh[static_cast<std::size_t>(b)]));
    Layout l;
    l.rows = 1;
    for (int b = 0; b < Batch; ++b) {
      l.perm.push_back(b);
      l.out_shape.push_back(xs[static_cast<std::size_t>(b)]);
    }
    for (int a = Batch; a < rank; ++a)
      if (!std::binary_search(axes.begin(), axes.end(), a)) {
        l.perm.push_back(a);
        l.out_shape.push_back(xs[static_cast<std::size_t>(a)]);
        l.rows *= xs[static_cast<std::size_t>(a)];
      }
    l.perm.insert(l.perm.end(), axes.begin(), axes.end());
    for (int i = 0; i < rank; ++i) l.identity = l.identity && l.perm[static_cast<std::size_t>(i)] == i;
    l.out_shape.insert(l.out_shape.end(), config_.out_features.begin(), config_.out_features.end());
    return l;
  }

  //   x: [...] with in_features at the axes `axis` (and batch_axis' sizes leading) ->
  //   [batch..., the other axes in order..., out_features...]
  template <class X>
  Tensor<T, linen::detail::tensor_traits<X>::rank - Axes + Features> apply(const Params& p, const X& x) const {
    static_assert(linen::detail::is_tensor_v<X>, "linen: nnx::LinearGeneral::apply takes a linen::Tensor (or a map of one)");
    constexpr int N = linen::detail::tensor_traits<X>::rank;
    static_assert(N >= Axes + Batch, "linen: nnx::LinearGeneral input rank is below len(axis) + len(batch_axis)");
    using I = typename linen::detail::tensor_traits<X>::scalar;
    check_params(p);
    const Shape xs = shape_of(x);
    const Layout l = layout(xs);
    Tensor<T, N - Axes + Features> y(to_dims<N - Axes + Features>(l.out_shape));
    std::vector<I> permuted;
    const I* xp = x.data();
    if (!l.identity) {
      permuted.resize(static_cast<std::size_t>(x.size()));
      detail::permute_copy(x.data(), xs, l.perm, permuted.data());
      xp = permuted.data();
    }
    multiply(p, xp, l.rows, y.data());
    return y;
  }

  // Throws unless the parameters have kernel_shape() and (use_bias) bias_shape().
  void check_params(const Params& p) const {
    if (shape_of(p.kernel) != kernel_shape())
      throw linen::invalid_argument("nnx::LinearGeneral: kernel of shape " + to_string(shape_of(p.kernel)) +
                                    ", expected " + to_string(kernel_shape()));
    if (config_.use_bias && shape_of(p.bias) != bias_shape())
      throw linen::invalid_argument("nnx::LinearGeneral: bias of shape " + to_string(shape_of(p.bias)) +
                                    ", expected " + to_string(bias_shape()));
  }

  // The product over the permuted input [batch..., rows, in]: one multiply_rows per batch
  // slice.
  template <class I>
  void multiply(const Params& p, const I* x, Index rows, T* y) const {
    const Index in = in_size(), out = out_size();
    for (Index b = 0; b < batch_size(); ++b)
      Core::template multiply_rows<I>(p.kernel.data() + b * in * out, config_.use_bias ? p.bias.data() + b * out : nullptr,
                                      in, out, x + b * rows * in, rows, y + b * rows * out);
  }

  Index in_size() const { return prod(config_.in_features); }
  Index out_size() const { return prod(config_.out_features); }
  Index batch_size() const { return num_elements(batch_shape()); }

 private:
  template <std::size_t N>
  static Index prod(const std::array<Index, N>& a) {
    Index s = 1;
    for (Index v : a) s *= v;
    return s;
  }
  Shape batch_shape() const {
    Shape s;
    for (const auto& kv : config_.batch_axis) s.push_back(kv.second);
    return s;
  }

  Config config_;
};

// ---- Embed ----------------------------------------------------------------------------

template <class T, class ParamT = T>
class Embed {
 public:
  using Core = linen::Embed<T, ParamT>;
  using Params = EmbedParams<ParamT>;  // embedding [num_embeddings, features]
  struct Config {
    Index num_embeddings = 0;  // required
    Index features = 0;        // required
    // nnx's default_embed_init: variance_scaling(1.0, 'fan_in', 'normal', out_axis=0).
    initializers::Initializer<ParamT> embedding_init = typename Core::Config{}.embedding_init;
  };

  explicit Embed(Config config) : config_(std::move(config)), core_(core_config(config_)) {}
  const Config& config() const { return config_; }
  // The linen Embed this one computes with (embed.hpp's vjp / vjp_attend take it).
  const Core& core() const { return core_; }

  // nnx.Embed.__init__'s one draw: embedding_init(rngs.params(), (num_embeddings, features)).
  Params init(Rngs& rngs) const {
    return detail::transact(rngs, [&](Rngs& r) {
      const Shape s{config_.num_embeddings, config_.features};
      linen::detail::checked_allocation<ParamT>(s, "nnx::Embed: embedding");
      Params p;
      p.embedding.resize(config_.num_embeddings, config_.features);
      config_.embedding_init(r.params(), s, p.embedding.data());
      return p;
    });
  }

  //   indices: [batch...] integers -> [batch..., features]
  template <class X>
  Tensor<T, linen::detail::tensor_traits<X>::rank + 1> apply(const Params& p, const X& indices) const {
    return core_.apply(p, indices);
  }
  //   query: [batch..., features] -> [batch..., num_embeddings]
  template <class X>
  Tensor<T, linen::detail::tensor_traits<X>::rank> attend(const Params& p, const X& query) const {
    return core_.attend(p, query);
  }

 private:
  static typename Core::Config core_config(const Config& c) {
    if (c.num_embeddings <= 0 || c.features <= 0)
      throw linen::invalid_argument("nnx::Embed: num_embeddings and features must be positive, got num_embeddings=" +
                                    std::to_string(c.num_embeddings) + ", features=" + std::to_string(c.features));
    if (!c.embedding_init) throw linen::invalid_argument("nnx::Embed: embedding_init is empty");
    return typename Core::Config{c.num_embeddings, c.features, c.embedding_init};
  }

  Config config_;
  Core core_;
};

}  // namespace linen::nnx

#endif  // LINEN_NNX_LINEAR_HPP
