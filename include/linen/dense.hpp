// SPDX-License-Identifier: Apache-2.0
//
// DenseGeneral (flax/linen/linear.py): a linear map contracting the trailing `Axes` input
// dims against a kernel [in_dims..., features...], plus a bias [features...].
#ifndef LINEN_DENSE_HPP
#define LINEN_DENSE_HPP

#include <array>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "detail/broadcast.hpp"
#include "detail/gemm/product.hpp"
#include "errors.hpp"
#include "initializers.hpp"
#include "module.hpp"
#include "precision.hpp"
#include "random.hpp"
#include "tensor.hpp"

namespace linen {
namespace detail {
// Scratch for DenseGeneral::apply_rows with half types (the promoted copies of x, the
// kernel and the product; for bfloat16 on the pair products, x and the kernel rounded to
// bfloat16); reused, it lets repeated calls of one size run without allocating.
template <class C>
struct DenseScratch {
  std::vector<C> x, kernel, acc;
  std::vector<Eigen::bfloat16> xb, kernelb;
};

// Flax's rounding of a half type's product: y = T(T(acc) + T(bias)) with the bias (ParamT,
// null without one) cast as Flax casts it, else y = T(acc); acc[m, out].
template <class T, class C, class B>
void round_rows(const C* acc, Index m, Index out, const B* bias, T* y) {
  if (bias) {
    for (Index r = 0; r < m; ++r)
      for (Index c = 0; c < out; ++c)
        y[r * out + c] =
            static_cast<T>(static_cast<C>(static_cast<T>(acc[r * out + c])) + static_cast<C>(static_cast<T>(bias[c])));
  } else {
    const Index n = m * out;
    for (Index i = 0; i < n; ++i) y[i] = static_cast<T>(acc[i]);
  }
}

// The half types' product and rounding (Flax's promote_dtype, then the dot in C = float):
// acc[m, out] = x[m, in] . kernel[in, out], both already promoted (cast to T, held in C),
// by rows (by_row: gemm::multiply_rows, the decode step's GEMV) or with the GEMM; then
// round_rows. DenseGeneral::apply_rows and the decode step's kept kernels
// (decode/workspace.hpp) both end here, or, for bfloat16, in gemm::multiply_pairs (where
// gemm::pair_gemm()) / multiply_pair_panels (where gemm::pair_products(): the decode
// step's) with the same bits, and round_rows.
template <class T, class C, class B>
void promoted_rows(const C* x, const C* kernel, Index m, Index in, Index out, const B* bias, C* acc, T* y,
                   bool by_row, Eigen::ThreadPoolInterface* pool) {
  if (by_row) gemm::multiply_rows<C>(m, out, in, x, in, kernel, out, nullptr, acc, out, pool);
  else gemm::multiply<C>(m, out, in, x, in, kernel, out, nullptr, acc, out, pool);
  round_rows<T>(acc, m, out, bias, y);
}

// p (n elements of S) rounded to bfloat16 (as static_cast rounds, Flax's promote_dtype),
// in place when S is bfloat16 already, else into `copy`.
template <class S>
const Eigen::bfloat16* as_bf16(const S* p, Index n, std::vector<Eigen::bfloat16>& copy) {
  if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
    (void)n, (void)copy;
    return p;
  } else {
    copy.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) copy[static_cast<std::size_t>(i)] = static_cast<Eigen::bfloat16>(p[i]);
    return copy.data();
  }
}
}  // namespace detail

// Parameters of one DenseGeneral, named as Flax names them.
//   kernel: [in_dims..., features...]   (query: [in, heads, head_dim]; out: [heads, head_dim, out])
//   bias:   [features...]              (empty, size 0, when use_bias is false)
template <class ParamT, int Axes, int Features>
struct DenseParams {
  Tensor<ParamT, Axes + Features> kernel;
  Tensor<ParamT, Features> bias;
};

// DenseGeneral<T, ParamT, Axes, Features>: T is Flax's `dtype` (the computation type),
// ParamT its `param_dtype`. Flax's `axis` is the trailing `Axes` dims of the input
// (axis=-1 -> Axes=1; axis=(-2, -1) -> Axes=2); `features` has `Features` dims.
template <class T, class ParamT = T, int Axes = 1, int Features = 1>
class DenseGeneral {
  static_assert(is_element_type_v<T> && is_element_type_v<ParamT>,
                "linen: DenseGeneral element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(Axes >= 1 && Features >= 1, "linen: DenseGeneral needs at least one axis and one feature dim");

 public:
  using Params = DenseParams<ParamT, Axes, Features>;
  static constexpr int kAxes = Axes, kFeatures = Features;

  struct Config {
    std::array<Index, Features> features{};
    bool use_bias = true;
    initializers::Initializer<ParamT> kernel_init = initializers::lecun_normal();
    initializers::Initializer<ParamT> bias_init = initializers::zeros();
    Precision precision = Precision::Default;
  };

  DenseGeneral() = default;
  explicit DenseGeneral(Config config) : config_(std::move(config)) {
    for (Index f : config_.features)
      if (f <= 0)
        throw linen::invalid_argument("DenseGeneral: features must be positive, got " +
                                    to_string(Shape(config_.features.begin(), config_.features.end())));
  }
  const Config& config() const { return config_; }

  // init(rng, inputs) / init(rng, in_dims): the parameters Flax's Module.init makes
  // (`kernel`, then `bias`: the scope's draws 1 and 2). `rng`: a linen::random::Key (a
  // top-level module), or the RngScope of this submodule (see module.hpp).
  //   inputs: [batch..., in_dims...]; in_dims: the trailing `Axes` dims of the input.
  // The kernel initializer sees the flattened 2-D shape (prod(in_dims), prod(features))
  // (so fan_in = prod(in_dims)), the bias initializer (prod(features),); both are then
  // reshaped. A kernel too large to address throws linen::overflow_error.
  template <class Rng>
  Params init(Rng&& rng, const std::array<Index, Axes>& in_dims) const {
    detail::InitScope scope(rng);
    return init_params(scope.get(), in_dims);
  }
  template <class Rng, class X, std::enable_if_t<detail::is_tensor_v<X>, int> = 0>
  Params init(Rng&& rng, const X& inputs) const {
    constexpr int N = detail::tensor_traits<X>::rank;
    static_assert(N >= Axes, "linen: DenseGeneral input rank is below its contracted axes");
    std::array<Index, Axes> in_dims{};
    for (int i = 0; i < Axes; ++i) in_dims[i] = inputs.dimension(N - Axes + i);
    detail::InitScope scope(rng);
    return init_params(scope.get(), in_dims);
  }

  // y = x . kernel + bias, with Flax's promotion (x, kernel, bias cast to T; products
  // accumulate in float for half types).
  //   x: [batch..., in_dims...]  ->  [batch..., features...]
  // Throws std::invalid_argument naming the shapes when x's trailing dims do not match the
  // kernel, or the parameters do not match the config.
  template <class X>
  Tensor<T, detail::tensor_traits<X>::rank - Axes + Features> apply(const Params& p, const X& x) const {
    static_assert(detail::is_tensor_v<X>, "linen: DenseGeneral::apply takes a linen::Tensor (or a map of one)");
    constexpr int N = detail::tensor_traits<X>::rank;
    static_assert(N >= Axes, "linen: DenseGeneral input rank is below its contracted axes");
    using I = typename detail::tensor_traits<X>::scalar;
    const Shape xs = shape_of(x);
    check_params(p, xs);
    Shape ys(xs.begin(), xs.end() - Axes);
    ys.insert(ys.end(), config_.features.begin(), config_.features.end());
    Tensor<T, N - Axes + Features> y(to_dims<N - Axes + Features>(ys));
    apply_raw<I>(p, x.data(), xs, y.data());
    return y;
  }

  // The same over raw row-major memory: x of shape xs, y of [batch..., features...].
  template <class I>
  void apply_raw(const Params& p, const I* x, const Shape& xs, T* y) const {
    Index in = 1;
    for (int i = 0; i < Axes; ++i) in *= xs[xs.size() - Axes + i];
    apply_rows<I>(p, config_.use_bias, x, in ? num_elements(xs) / in : 0, y);
  }

  // The core of apply_raw: y[m, out] = x[m, in] . kernel[in, out] (+ bias), with in and
  // out the products of the kernel's input and feature dims (the caller has checked the
  // parameters). float/double with matching types multiply in place with linen's GEMM
  // (detail/gemm/product.hpp: its packing buffers are kept per thread, so repeated calls
  // allocate nothing; a LINEN_USE_BLAS build calls CBLAS instead); other types promote
  // into `scratch` (local when null) and multiply in float. `pool` (may be null) spreads
  // the product's row blocks over its threads; with linen's GEMM the bits do not depend on
  // it.
  // by_row: the few rows of a decode step, each as gemm::multiply_rows computes it
  // (linen's GEMV, detail/gemm/gemv.hpp: the kernel streamed once, no packing and no
  // allocation; the same bits as the GEMM gives the same row), the columns spread over
  // `pool`. The decode step's kept kernels (decode/workspace.hpp) multiply the same way.
  template <class I>
  static void apply_rows(const Params& p, bool use_bias, const I* x, Index m, T* y,
                         detail::DenseScratch<accum_t<T>>* scratch = nullptr, bool by_row = false,
                         Eigen::ThreadPoolInterface* pool = nullptr) {
    Index in = 1, out = 1;
    for (int i = 0; i < Axes; ++i) in *= p.kernel.dimension(i);
    for (int i = Axes; i < Axes + Features; ++i) out *= p.kernel.dimension(i);
    multiply_rows<I>(p.kernel.data(), use_bias ? p.bias.data() : nullptr, in, out, x, m, y, scratch, by_row, pool);
  }

  // The same over a raw kernel [in, out] (row-major) and bias [out] (null: no bias): the
  // one home of the product, which apply_rows and nnx::LinearGeneral (one call per batch
  // slice of its kernel) share.
  template <class I>
  static void multiply_rows(const ParamT* kernel, const ParamT* bias, Index in, Index out, const I* x, Index m, T* y,
                            detail::DenseScratch<accum_t<T>>* scratch = nullptr, bool by_row = false,
                            Eigen::ThreadPoolInterface* pool = nullptr) {
    using C = accum_t<T>;
    if constexpr (std::is_same_v<I, T> && std::is_same_v<ParamT, T> && std::is_same_v<C, T>) {
      // float/double with matching types: multiply in place, no copies.
      (void)scratch;
      if (by_row) detail::gemm::multiply_rows<T>(m, out, in, x, in, kernel, out, bias, y, out, pool);
      else detail::gemm::multiply<T>(m, out, in, x, in, kernel, out, bias, y, out, pool);
    } else {
      // Flax's promote_dtype: cast inputs and params to T, then compute.
      detail::DenseScratch<C> local;
      detail::DenseScratch<C>& s = scratch ? *scratch : local;
      if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<C, float>) {
        if (detail::gemm::pair_gemm()) {
          // bfloat16 operands multiplied in pairs (vdpbf16ps) where that is the faster
          // product (product.hpp); by_row too: the GEMM gives the GEMV's bits.
          const Eigen::bfloat16* xb = detail::as_bf16(x, m * in, s.xb);
          const Eigen::bfloat16* kb = detail::as_bf16(kernel, in * out, s.kernelb);
          s.acc.resize(static_cast<std::size_t>(m * out));
          detail::gemm::multiply_pairs(m, out, in, xb, in, kb, out, s.acc.data(), out, pool);
          detail::round_rows<T>(s.acc.data(), m, out, bias, y);
          return;
        }
      }
      s.x.resize(static_cast<std::size_t>(m * in));
      s.kernel.resize(static_cast<std::size_t>(in * out));
      s.acc.resize(static_cast<std::size_t>(m * out));
      for (Index i = 0; i < m * in; ++i) s.x[static_cast<std::size_t>(i)] = static_cast<C>(static_cast<T>(x[i]));
      for (Index i = 0; i < in * out; ++i)
        s.kernel[static_cast<std::size_t>(i)] = static_cast<C>(static_cast<T>(kernel[i]));
      detail::promoted_rows<T>(s.x.data(), s.kernel.data(), m, in, out, bias, s.acc.data(), y, by_row, pool);
    }
  }

  // Throws when the parameters do not fit the config and an input of shape xs.
  void check_params(const Params& p, const Shape& xs) const {
    Shape kexp(xs.end() - Axes, xs.end());
    kexp.insert(kexp.end(), config_.features.begin(), config_.features.end());
    if (shape_of(p.kernel) != kexp)
      throw linen::invalid_argument("DenseGeneral: kernel of shape " + to_string(shape_of(p.kernel)) +
                                  " does not fit input of shape " + to_string(xs) + " (expected kernel " +
                                  to_string(kexp) + ")");
    if (config_.use_bias) {
      const Shape bexp(config_.features.begin(), config_.features.end());
      if (shape_of(p.bias) != bexp)
        throw linen::invalid_argument("DenseGeneral: bias of shape " + to_string(shape_of(p.bias)) +
                                    ", expected " + to_string(bexp));
    }
  }

 private:
  Params init_params(random::RngScope& scope, const std::array<Index, Axes>& in_dims) const {
    Params p;
    Shape kshape;
    Index in = 1, out = 1;
    for (int i = 0; i < Axes; ++i) {
      if (in_dims[i] <= 0)
        throw linen::invalid_argument("DenseGeneral: input feature dims must be positive, got " +
                                      to_string(Shape(in_dims.begin(), in_dims.end())));
      kshape.push_back(in_dims[i]);
    }
    kshape.insert(kshape.end(), config_.features.begin(), config_.features.end());
    detail::checked_allocation<ParamT>(kshape, "DenseGeneral: kernel");
    for (int i = 0; i < Axes; ++i) in *= in_dims[i];
    for (int i = 0; i < Features; ++i) out *= config_.features[i];
    if (!config_.kernel_init) throw linen::invalid_argument("DenseGeneral: kernel_init is empty");
    if (config_.use_bias && !config_.bias_init) throw linen::invalid_argument("DenseGeneral: bias_init is empty");
    p.kernel.resize(to_dims<Axes + Features>(kshape));
    config_.kernel_init(scope.make_rng(), Shape{in, out}, p.kernel.data());
    if (config_.use_bias) {
      p.bias.resize(config_.features);
      config_.bias_init(scope.make_rng(), Shape{out}, p.bias.data());
    }
    return p;
  }

  Config config_{};
};

}  // namespace linen

#ifdef LINEN_COMPILED  // linen::compiled: its instantiations, declared extern
#include "detail/compiled/dense.hpp"
#endif

#endif  // LINEN_DENSE_HPP
