// SPDX-License-Identifier: Apache-2.0
//
// Embed (flax/linen/linear.py): a table `embedding` [num_embeddings, features], looked up
// by integer indices (Flax's __call__, jnp.take along axis 0) or attended by a query
// (Flax's attend: query . embedding^T, the tied output logits of a language model).
//
//   Embed<T, ParamT>::Config{.num_embeddings, .features, .embedding_init}
//   init(rng)                       {embedding}: embedding_init sees (num_embeddings,
//                                   features), the scope's draw 1
//   apply(params, indices)          [batch...] integers -> [batch..., features]
//   attend(params, query)           [batch..., features] -> [batch..., num_embeddings]
//   vjp(embed, params, indices)     -> output, pullback(cotangent) -> EmbedParams (the
//                                   table's cotangent: the rows of the cotangent added
//                                   into the rows they were read from)
//   vjp_attend(embed, params, query) -> output, pullback(cotangent) -> {params, query}
//
// Flax's defaults: dtype (T) = param_dtype (ParamT); embedding_init =
// variance_scaling(1.0, 'fan_in', 'normal', out_axis=0). With in_axis left at -2 that is
// axis 0 too, so JAX's _compute_fans gives fan_in = features (receptive field
// prod(shape) / num_embeddings / num_embeddings): N(0, 1/features).
//
// Indices: Flax (jnp.take's default mode "fill") wraps negative indices in
// [-num_embeddings, 0) Python-style and returns a row of NaN for any other index out of
// range (and with num_embeddings == 1 broadcasts the one row for every index, whatever its
// value). linen wraps negative indices the same way and throws linen::invalid_argument
// naming the index, its position and the range for any index outside
// [-num_embeddings, num_embeddings): nothing is filled or clamped silently.
//
// dtype: Flax's promote_dtype casts the table to T before the lookup, and the query and
// table to T before attend's product (for half types the product accumulates in float and
// is rounded to T once, as DenseGeneral's does). Cotangents come back in the primal's
// types (the table's in ParamT, the query's in its own); they accumulate in accum_t<T>
// and are rounded once.
#ifndef LINEN_EMBED_HPP
#define LINEN_EMBED_HPP

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "detail/vjp.hpp"
#include "errors.hpp"
#include "initializers.hpp"
#include "module.hpp"
#include "random.hpp"
#include "tensor.hpp"

namespace linen {

// embedding: [num_embeddings, features].
template <class ParamT>
struct EmbedParams {
  Tensor<ParamT, 2> embedding;
};

template <class T, class ParamT = T>
class Embed {
  static_assert(is_element_type_v<T> && is_element_type_v<ParamT>,
                "linen: Embed element types must be float, double, Eigen::half or Eigen::bfloat16");

 public:
  using Params = EmbedParams<ParamT>;
  struct Config {
    Index num_embeddings = 0;  // required (Flax: no default)
    Index features = 0;        // required
    initializers::Initializer<ParamT> embedding_init =
        initializers::variance_scaling{1.0, initializers::FanMode::fan_in, initializers::Distribution::normal,
                                       {-2}, {0}, {}};
  };

  explicit Embed(Config config) : config_(std::move(config)) {
    if (config_.num_embeddings <= 0 || config_.features <= 0)
      throw linen::invalid_argument("Embed: num_embeddings and features must be positive, got num_embeddings=" +
                                    std::to_string(config_.num_embeddings) +
                                    ", features=" + std::to_string(config_.features));
    if (!config_.embedding_init) throw linen::invalid_argument("Embed: embedding_init is empty");
  }
  const Config& config() const { return config_; }

  // init(rng): the parameters Flax's Module.init makes (Embed's setup declares
  // `embedding`, the scope's first draw, whatever the inputs). `rng`: a
  // linen::random::Key (a top-level module) or the RngScope of this submodule (see
  // module.hpp); the inputs Flax's init is called with only have to be valid.
  template <class Rng>
  Params init(Rng&& rng) const {
    detail::InitScope scope(rng);
    const Shape shape{config_.num_embeddings, config_.features};
    detail::checked_allocation<ParamT>(shape, "Embed: embedding");
    Params p;
    p.embedding.resize(config_.num_embeddings, config_.features);
    config_.embedding_init(scope.get().make_rng(), shape, p.embedding.data());
    return p;
  }
  template <class Rng, class X, std::enable_if_t<detail::is_tensor_v<X>, int> = 0>
  Params init(Rng&& rng, const X& inputs) const {
    check_indices(inputs);
    return init(std::forward<Rng>(rng));
  }

  // Flax's __call__: embedding[indices] in dtype T.
  //   indices: [batch...] of any integer type  ->  [batch..., features]
  // Throws for an index outside [-num_embeddings, num_embeddings) or a table whose shape
  // is not [num_embeddings, features].
  template <class X>
  Tensor<T, detail::tensor_traits<X>::rank + 1> apply(const Params& p, const X& indices) const {
    check_indices(indices);
    check_params(p);
    constexpr int N = detail::tensor_traits<X>::rank;
    const Index f = config_.features;
    Shape ys = shape_of(indices);
    ys.push_back(f);
    Tensor<T, N + 1> y(to_dims<N + 1>(ys));
    const Index m = indices.size();
    for (Index i = 0; i < m; ++i) {
      const ParamT* row = p.embedding.data() + row_of(indices.data()[i], i) * f;
      T* out = y.data() + i * f;
      for (Index j = 0; j < f; ++j) out[j] = static_cast<T>(row[j]);
    }
    return y;
  }

  // Flax's attend: jnp.dot(query, embedding.T) after promoting both to T.
  //   query: [batch..., features]  ->  [batch..., num_embeddings]
  template <class X>
  Tensor<T, detail::tensor_traits<X>::rank> attend(const Params& p, const X& query) const {
    static_assert(detail::is_tensor_v<X>, "linen: Embed::attend takes a linen::Tensor (or a map of one)");
    constexpr int N = detail::tensor_traits<X>::rank;
    static_assert(N >= 1, "linen: Embed::attend needs a query with a features dim");
    static_assert(is_element_type_v<typename detail::tensor_traits<X>::scalar>,
                  "linen: Embed::attend takes a float, double, Eigen::half or Eigen::bfloat16 query");
    check_params(p);
    const Shape qs = shape_of(query);
    if (qs.back() != config_.features)
      throw linen::invalid_argument("Embed::attend: query of shape " + to_string(qs) + " does not end in features=" +
                                    std::to_string(config_.features));
    Shape ys = qs;
    ys.back() = config_.num_embeddings;
    Tensor<T, N> y(to_dims<N>(ys));
    const Index f = config_.features, n = config_.num_embeddings, m = f ? query.size() / f : 0;
    using C = accum_t<T>;
    const RowMat<C> q = promoted<typename detail::tensor_traits<X>::scalar>(query.data(), m, f);
    const RowMat<C> e = promoted<ParamT>(p.embedding.data(), n, f);
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> ym(y.data(), m, n);
    ym = (q * e.transpose()).template cast<T>();
    return y;
  }

  // Throws unless the table is [num_embeddings, features].
  void check_params(const Params& p) const {
    const Shape want{config_.num_embeddings, config_.features};
    if (shape_of(p.embedding) != want)
      throw linen::invalid_argument("Embed: embedding of shape " + to_string(shape_of(p.embedding)) + ", expected " +
                                    to_string(want));
  }

  // The table row index `indices` element `pos` (flat, row-major) reads: negative indices
  // wrap once (jnp.take); anything outside [-num_embeddings, num_embeddings) throws.
  template <class I>
  Index row_of(I index, Index pos) const {
    const Index n = config_.num_embeddings;
    bool in_range = false;
    Index row = 0;
    if constexpr (std::is_signed_v<I>) {
      const long long v = static_cast<long long>(index);
      in_range = v >= -static_cast<long long>(n) && v < static_cast<long long>(n);
      row = static_cast<Index>(v < 0 ? v + n : v);
    } else {
      const unsigned long long v = static_cast<unsigned long long>(index);
      in_range = v < static_cast<unsigned long long>(n);
      row = static_cast<Index>(v);
    }
    if (!in_range)
      throw linen::invalid_argument("Embed: index " + std::to_string(index) + " at flat position " +
                                    std::to_string(pos) + " is out of range [" + std::to_string(-n) + ", " +
                                    std::to_string(n) + ") for num_embeddings=" + std::to_string(n));
    return row;
  }

  template <class C>
  using RowMat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  // rows x cols of X read as promote_dtype reads them (X -> T), in accum_t<T>.
  template <class X>
  static RowMat<accum_t<T>> promoted(const X* src, Index rows, Index cols) {
    RowMat<accum_t<T>> m(rows, cols);
    for (Index i = 0; i < rows * cols; ++i) m.data()[i] = static_cast<accum_t<T>>(static_cast<T>(src[i]));
    return m;
  }

 private:
  template <class X>
  void check_indices(const X& indices) const {
    static_assert(detail::is_tensor_v<X>, "linen: Embed takes its indices as a linen::Tensor (or a map of one)");
    using I = typename detail::tensor_traits<X>::scalar;
    static_assert(std::is_integral_v<I> && !std::is_same_v<I, bool>,
                  "linen: Embed's inputs must be integers (Flax: 'Input type must be an integer or unsigned integer.')");
    for (Index i = 0; i < indices.size(); ++i) (void)row_of(indices.data()[i], i);
  }

  Config config_;
};

// ---- vjp -------------------------------------------------------------------------------

// The backward of one Embed lookup: cotangent [batch..., features] -> the table's
// cotangent (scatter-add of the cotangent's rows into the rows they were read from).
template <class T, class ParamT, int N>
class EmbedPullback {
 public:
  template <class G>
  EmbedParams<ParamT> operator()(const G& cotangent) const {
    detail::check_cotangent<G, T, N + 1>(cotangent, ys_, "Embed vjp");
    using C = accum_t<T>;
    const Index f = ys_.back();
    std::vector<C> acc(static_cast<std::size_t>(num_embeddings_ * f), C(0));
    for (std::size_t i = 0; i < rows_.size(); ++i) {
      C* dst = acc.data() + rows_[i] * f;
      const T* g = cotangent.data() + static_cast<Index>(i) * f;
      for (Index j = 0; j < f; ++j) dst[j] += static_cast<C>(g[j]);
    }
    EmbedParams<ParamT> out;
    out.embedding.resize(num_embeddings_, f);
    for (Index i = 0; i < out.embedding.size(); ++i) out.embedding.data()[i] = static_cast<ParamT>(acc[i]);
    return out;
  }

  // Internal: made by vjp().
  EmbedPullback(std::vector<Index> rows, Index num_embeddings, Shape ys)
      : rows_(std::move(rows)), num_embeddings_(num_embeddings), ys_(std::move(ys)) {}

 private:
  std::vector<Index> rows_;  // the table row of each lookup (indices wrapped)
  Index num_embeddings_;
  Shape ys_;
};

// vjp of Embed::apply. indices: [batch...] -> output [batch..., features] and its pullback
// (indices, being integers, have no cotangent). The pullback holds the rows it read, not
// the params.
template <class T, class ParamT, class X>
Vjp<Tensor<T, detail::tensor_traits<X>::rank + 1>, EmbedPullback<T, ParamT, detail::tensor_traits<X>::rank>> vjp(
    const Embed<T, ParamT>& embed, const EmbedParams<ParamT>& params, const X& indices) {
  auto y = embed.apply(params, indices);  // checks indices and params
  std::vector<Index> rows(static_cast<std::size_t>(indices.size()));
  for (Index i = 0; i < indices.size(); ++i) rows[static_cast<std::size_t>(i)] = embed.row_of(indices.data()[i], i);
  Shape ys = shape_of(y);
  return {std::move(y), EmbedPullback<T, ParamT, detail::tensor_traits<X>::rank>(
                            std::move(rows), embed.config().num_embeddings, std::move(ys))};
}

// Cotangents of Embed::attend: the table's and the query's.
template <class ParamT, class I, int N>
struct EmbedAttendGrads {
  EmbedParams<ParamT> params;  // embedding [num_embeddings, features]
  Tensor<I, N> query;          // [batch..., features]
};

// The backward of one Embed::attend call: cotangent [batch..., num_embeddings] ->
// d_embedding = g^T . query, d_query = g . embedding (in accum_t<T>, from the promoted
// operands).
template <class T, class ParamT, class I, int N>
class EmbedAttendPullback {
 public:
  using Grads = EmbedAttendGrads<ParamT, I, N>;
  template <class G>
  Grads operator()(const G& cotangent) const {
    Shape ys = shape_of(query_);
    ys.back() = params_->embedding.dimension(0);
    detail::check_cotangent<G, T, N>(cotangent, ys, "Embed attend vjp");
    using C = accum_t<T>;
    using E = Embed<T, ParamT>;
    const Index n = params_->embedding.dimension(0), f = params_->embedding.dimension(1);
    const Index m = f ? query_.size() / f : 0;
    const typename E::template RowMat<C> g = E::template promoted<T>(cotangent.data(), m, n);
    const typename E::template RowMat<C> q = E::template promoted<I>(query_.data(), m, f);
    const typename E::template RowMat<C> e = E::template promoted<ParamT>(params_->embedding.data(), n, f);
    Grads out;
    out.params.embedding.resize(n, f);
    out.query.resize(query_.dimensions());
    const typename E::template RowMat<C> de = g.transpose() * q, dq = g * e;
    for (Index i = 0; i < n * f; ++i) out.params.embedding.data()[i] = static_cast<ParamT>(de.data()[i]);
    for (Index i = 0; i < m * f; ++i) out.query.data()[i] = static_cast<I>(dq.data()[i]);
    return out;
  }

  // Internal: made by vjp_attend().
  EmbedAttendPullback(const EmbedParams<ParamT>* params, Tensor<I, N> query)
      : params_(params), query_(std::move(query)) {}

 private:
  const EmbedParams<ParamT>* params_;
  Tensor<I, N> query_;
};

// vjp of Embed::attend (jax.vjp of embed.apply(..., method='attend')).
//   query: [batch..., features] -> output [batch..., num_embeddings] and its pullback.
// `params` must outlive the pullback (as with grad.hpp's vjps).
template <class T, class ParamT, class X>
Vjp<Tensor<T, detail::tensor_traits<X>::rank>,
    EmbedAttendPullback<T, ParamT, typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank>>
vjp_attend(const Embed<T, ParamT>& embed, const EmbedParams<ParamT>& params, const X& query) {
  using I = typename detail::tensor_traits<X>::scalar;
  constexpr int N = detail::tensor_traits<X>::rank;
  auto y = embed.attend(params, query);  // checks the shapes
  Tensor<I, N> q = query;
  return {std::move(y), EmbedAttendPullback<T, ParamT, I, N>(&params, std::move(q))};
}
template <class T, class ParamT, class X>
void vjp_attend(const Embed<T, ParamT>&, EmbedParams<ParamT>&&, const X&) = delete;  // would dangle

}  // namespace linen

#endif  // LINEN_EMBED_HPP
