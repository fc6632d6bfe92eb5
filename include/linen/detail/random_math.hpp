// SPDX-License-Identifier: Apache-2.0
//
// The scalar maths behind jax.random's samplers, written as XLA:CPU evaluates it so
// that linen draws the same floats as JAX:
//   - erf_inv: the CHLO decomposition JAX lowers `lax.erf_inv` to (Giles' single
//     precision approximation; the double precision one for float64), with its
//     log1p as XLA:CPU's intrinsic (a Cephes rational below sqrt(2) - 1, else log)
//     and float32 log as XLA:CPU's Cephes polynomial;
//   - erf (float32): XLA:CPU's intrinsic, Eigen's 9/12-degree rational interpolant;
//   - every multiply feeding an add is one fused multiply-add, because XLA:CPU
//     always lets LLVM fuse them (llvm::FPOpFusion::Fast) and does on every FMA
//     machine; std::fma is exact to that.
// Half types run these in float32 (XLA upcasts erf/erf_inv for them) and round once.
#ifndef LINEN_DETAIL_RANDOM_MATH_HPP
#define LINEN_DETAIL_RANDOM_MATH_HPP

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../tensor.hpp"

namespace linen::detail {

// XLA:CPU's float32 log: it replaces `llvm.log.f32` by Cephes' logf polynomial
// (xla/service/cpu polynomial_approximations, "the same polynomial approximation as
// implemented in Eigen3"), with LLVM fusing its multiply-adds. Differs from a
// correctly rounded logf in about 2% of inputs. 0 gives -inf, negatives and nan give
// nan; used by linen on (0, 1] only (+inf is not special-cased, as in XLA).
inline float xla_log_f32(float v) {
  if (std::isnan(v) || v < 0.0f) return std::numeric_limits<float>::quiet_NaN();
  if (v == 0.0f) return -std::numeric_limits<float>::infinity();
  constexpr float p0 = 7.0376836292E-2f, p1 = -1.1514610310E-1f, p2 = 1.1676998740E-1f,
                  p3 = -1.2420140846E-1f, p4 = +1.4249322787E-1f, p5 = -1.6668057665E-1f,
                  p6 = +2.0000714765E-1f, p7 = -2.4999993993E-1f, p8 = +3.3333331174E-1f,
                  q1 = -2.12194440e-4f, q2 = 0.693359375f;
  // Split v = m * 2^e with m in [0.5, 1) (subnormals are raised to the smallest normal).
  float x = v < std::numeric_limits<float>::min() ? std::numeric_limits<float>::min() : v;
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  const int exponent = static_cast<int>(b >> 23) - 127;
  b = (b & ~0x7F800000u) | 0x3F000000u;
  std::memcpy(&x, &b, sizeof b);
  float e = static_cast<float>(exponent) + 1.0f;
  // Centre m on 1: m < sqrt(1/2) ? (2m - 1, e - 1) : (m - 1, e).
  const bool small = x < 0.707106781186547524f;
  const float tmp = small ? x : 0.0f;
  x = x - 1.0f;
  e = e - (small ? 1.0f : 0.0f);
  x = x + tmp;
  const float x2 = x * x;
  const float x3 = x2 * x;
  float y = std::fma(x, p0, p1);
  float y1 = std::fma(x, p3, p4);
  float y2 = std::fma(x, p6, p7);
  y = std::fma(y, x, p2);
  y1 = std::fma(y1, x, p5);
  y2 = std::fma(y2, x, p8);
  y = std::fma(y, x3, y1);
  y = std::fma(y, x3, y2);
  y = std::fma(y, x3, q1 * e);  // y * x3 + q1 * e
  x = std::fma(-0.5f, x2, x);   // x - 0.5 * x2
  x = x + y;
  return std::fma(q2, e, x);  // x + q2 * e
}

// XLA:CPU's log1p (xla/codegen/intrinsic/log1p.cc): log(1 + x) for |x| >= sqrt(2) - 1,
// else x - x^2/2 + x^3 * P(x)/Q(x) (Cephes), evaluated in T with fused Horner steps.
// The float64 log is the C library's (XLA:CPU calls it).
template <class T>
T xla_log1p(T x) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  constexpr double kDen[7] = {1.,
                              1.5062909083469192043167E1,
                              8.3047565967967209469434E1,
                              2.2176239823732856465394E2,
                              3.0909872225312059774938E2,
                              2.1642788614495947685003E2,
                              6.0118660497603843919306E1};
  constexpr double kNum[7] = {4.5270000862445199635215E-5, 4.9854102823193375972212E-1,
                              6.5787325942061044846969E0,  2.9911919328553073277375E1,
                              6.0949667980987787057556E1,  5.7112963590585538103336E1,
                              2.0039553499201281259648E1};
  if (!(std::abs(x) < static_cast<T>(0.41421356237309504880))) {
    if constexpr (std::is_same_v<T, float>) return xla_log_f32(x + 1.0f);
    else return std::log(x + 1.0);
  }
  T den = T(0), num = T(0);
  for (double c : kDen) den = std::fma(den, x, static_cast<T>(c));
  for (double c : kNum) num = std::fma(num, x, static_cast<T>(c));
  const T x2 = x * x;
  T r = num / den;
  r = (x * x2) * r;
  r = std::fma(x2, T(-0.5), r);
  return x + r;
}

// lax.erf_inv in float32 (Giles, "Approximating the erfinv function", single precision).
inline float erf_inv_f32(float x) {
  constexpr float kLt5[9] = {2.81022636e-08f,  3.43273939e-07f, -3.5233877e-06f,
                             -4.39150654e-06f, 0.00021858087f,  -0.00125372503f,
                             -0.00417768164f,  0.246640727f,    1.50140941f};
  constexpr float kGe5[9] = {-0.000200214257f, 0.000100950558f, 0.00134934322f,
                             -0.00367342844f,  0.00573950773f,  -0.0076224613f,
                             0.00943887047f,   1.00167406f,     2.83297682f};
  if (std::abs(x) == 1.0f) return x * std::numeric_limits<float>::infinity();
  float w = -xla_log1p(x * -x);
  const bool lt = w < 5.0f;
  const float* c = lt ? kLt5 : kGe5;
  w = lt ? w - 2.5f : std::sqrt(w) - 3.0f;
  float p = c[0];
  for (int i = 1; i < 9; ++i) p = std::fma(p, w, c[i]);
  return p * x;
}

// lax.erf_inv in float64 (Giles, double precision: three ranges of w).
inline double erf_inv_f64(double x) {
  constexpr double kLt625[23] = {
      -3.6444120640178196996e-21, -1.685059138182016589e-19,  1.2858480715256400167e-18,
      1.115787767802518096e-17,   -1.333171662854620906e-16,  2.0972767875968561637e-17,
      6.6376381343583238325e-15,  -4.0545662729752068639e-14, -8.1519341976054721522e-14,
      2.6335093153082322977e-12,  -1.2975133253453532498e-11, -5.4154120542946279317e-11,
      1.051212273321532285e-09,   -4.1126339803469836976e-09, -2.9070369957882005086e-08,
      4.2347877827932403518e-07,  -1.3654692000834678645e-06, -1.3882523362786468719e-05,
      0.0001867342080340571352,   -0.00074070253416626697512, -0.0060336708714301490533,
      0.24015818242558961693,     1.6536545626831027356};
  constexpr double kLt16[19] = {
      2.2137376921775787049e-09,  9.0756561938885390979e-08,  -2.7517406297064545428e-07,
      1.8239629214389227755e-08,  1.5027403968909827627e-06,  -4.013867526981545969e-06,
      2.9234449089955446044e-06,  1.2475304481671778723e-05,  -4.7318229009055733981e-05,
      6.8284851459573175448e-05,  2.4031110387097893999e-05,  -0.0003550375203628474796,
      0.00095328937973738049703,  -0.0016882755560235047313, 0.0024914420961078508066,
      -0.0037512085075692412107,  0.005370914553590063617,    1.0052589676941592334,
      3.0838856104922207635};
  constexpr double kGe16[17] = {
      -2.7109920616438573243e-11, -2.5556418169965252055e-10, 1.5076572693500548083e-09,
      -3.7894654401267369937e-09, 7.6157012080783393804e-09,  -1.4960026627149240478e-08,
      2.9147953450901080826e-08,  -6.7711997758452339498e-08, 2.2900482228026654717e-07,
      -9.9298272942317002539e-07, 4.5260625972231537039e-06,  -1.9681778105531670567e-05,
      7.5995277030017761139e-05,  -0.00021503011930044477347, -0.00013871931833623122026,
      1.0103004648645343977,      4.8499064014085844221};
  if (std::abs(x) == 1.0) return x * std::numeric_limits<double>::infinity();
  double w = -xla_log1p(x * -x);
  const double* c;
  int n;
  if (w < 6.25) {
    c = kLt625;
    n = 23;
    w = w - 3.125;
  } else if (w < 16.0) {
    c = kLt16;
    n = 19;
    w = std::sqrt(w) - 3.25;
  } else {
    c = kGe16;
    n = 17;
    w = std::sqrt(w) - 5.0;
  }
  double p = c[0];
  for (int i = 1; i < n; ++i) p = std::fma(p, w, c[i]);
  return p * x;
}

// lax.erf in float32 as XLA:CPU computes it (xla/codegen/intrinsic/erf.cc, which is
// Eigen's generic_fast_erf_float): x * P(x^2) / Q(x^2), +-1 beyond |x| >= 3.8325.
inline float erf_f32(float x) {
  if (std::isnan(x)) return x;
  if (3.832506856900711f <= std::abs(x)) return std::copysign(1.0f, x);
  const float x2 = x * x;
  float p = std::fma(x2, 0.00022905065861350646f, 0.0034082910107109506f);
  p = std::fma(x2, p, 0.050955695062380861f);
  p = std::fma(x2, p, 0.18520832239976145f);
  p = std::fma(x2, p, 1.128379143519084f);
  p = x * p;
  float q = std::fma(x2, -1.1791602954361697e-7f, 0.000023547966471313185f);
  q = std::fma(x2, q, 0.0010179625278914885f);
  q = std::fma(x2, q, 0.014070470171167667f);
  q = std::fma(x2, q, 0.11098505178285362f);
  q = std::fma(x2, q, 0.49746925110067538f);
  q = std::fma(x2, q, 1.0f);
  return p / q;
}

// A double rounded to T the way numpy's `np.array(v, dtype)` does: once, to nearest
// even. (Eigen::half(double) goes through float, which can round twice; rounding to
// float by round-to-odd first makes the second rounding exact.)
template <class T>
T round_from_double(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(v);
  } else {
    float f = static_cast<float>(v);
    if (std::isfinite(f) && static_cast<double>(f) != v) {
      std::uint32_t b;
      std::memcpy(&b, &f, sizeof b);
      if ((b & 1u) == 0) f = std::nextafter(f, static_cast<double>(f) < v ? INFINITY : -INFINITY);
    }
    return static_cast<T>(f);
  }
}

// numpy's nextafter for every element type (half types step their own bit patterns).
template <class T>
T next_after(T from, T to) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return std::nextafter(from, to);
  } else {
    const float f = static_cast<float>(from), t = static_cast<float>(to);
    if (std::isnan(f) || std::isnan(t)) return static_cast<T>(NAN);
    if (f == t) return to;
    std::uint16_t bits = Eigen::numext::bit_cast<std::uint16_t>(from);
    if (f == 0.0f) {
      bits = static_cast<std::uint16_t>(t > 0 ? 1u : 0x8001u);  // smallest subnormal
    } else if ((f < t) == (f > 0.0f)) {
      ++bits;  // away from zero
    } else {
      --bits;  // toward zero
    }
    return Eigen::numext::bit_cast<T>(bits);
  }
}

}  // namespace linen::detail

#endif  // LINEN_DETAIL_RANDOM_MATH_HPP
