// SPDX-License-Identifier: Apache-2.0
//
// Internal: the few SIMD operations the fused attention kernel needs, written once over
// Eigen's packet types (Packet16f/Packet8d under AVX-512, Packet8f/Packet4d under AVX,
// Packet4f/Packet2d under SSE or NEON, and a plain scalar as the portable fallback), so
// that one kernel source serves every instruction set Eigen vectorizes for. Eigen's
// packet primitives (ploadu, pmadd, pmax, ...) are internal but stable across 3.4.x.
#ifndef LINEN_DETAIL_SIMD_HPP
#define LINEN_DETAIL_SIMD_HPP

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <cstring>
#include <limits>
#include <type_traits>

#include <Eigen/Core>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "../config.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace simd {

namespace ei = Eigen::internal;

// Lanes of a packet (1 for a plain scalar).
template <class P>
inline constexpr int size_v = ei::unpacket_traits<P>::size;

// The element type of a packet.
template <class P>
using scalar_t = typename ei::unpacket_traits<P>::type;

// The widest packet Eigen uses for C in this translation unit.
template <class C>
using packet_t = typename ei::packet_traits<C>::type;

// Vector registers of the target (16 with AVX2, 32 with AVX-512): sizes the micro-kernels.
inline constexpr int kRegisters = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;

template <class P>
inline constexpr bool is_scalar_v = size_v<P> == 1;

template <class P>
inline P load(const scalar_t<P>* p) {
  if constexpr (is_scalar_v<P>) return *p;
  else return ei::ploadu<P>(p);
}
template <class P>
inline void store(scalar_t<P>* p, const P& x) {
  if constexpr (is_scalar_v<P>) *p = x;
  else ei::pstoreu(p, x);
}
template <class P>
inline P set1(scalar_t<P> x) {
  if constexpr (is_scalar_v<P>) return x;
  else return ei::pset1<P>(x);
}
// a * b + c, rounded as Eigen's packets round it: once where the target has FMA (Eigen's
// pmadd is then fused), twice elsewhere; so a scalar and a packet of the same data give
// the same bits (the micro-GEMM family's scalar member relies on it).
template <class P>
inline P fmadd(const P& a, const P& b, const P& c) {
  if constexpr (is_scalar_v<P>) {
#if defined(EIGEN_VECTORIZE_FMA)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  } else {
    return ei::pmadd(a, b, c);
  }
}
template <class P>
inline P add(const P& a, const P& b) {
  if constexpr (is_scalar_v<P>) return a + b;
  else return ei::padd(a, b);
}
template <class P>
inline P sub(const P& a, const P& b) {
  if constexpr (is_scalar_v<P>) return a - b;
  else return ei::psub(a, b);
}
template <class P>
inline P mul(const P& a, const P& b) {
  if constexpr (is_scalar_v<P>) return a * b;
  else return ei::pmul(a, b);
}
template <class P>
inline P div(const P& a, const P& b) {
  if constexpr (is_scalar_v<P>) return a / b;
  else return ei::pdiv(a, b);
}
// std::max(a, b) lane by lane: `a` when either is NaN, as the reference's row max.
template <class P>
inline P max(const P& a, const P& b) {
  if constexpr (is_scalar_v<P>) return std::max(a, b);
  else return ei::pmax(a, b);
}
// A lane mask (all bits set where true); less_equal(a, b): a <= b lane by lane.
template <class P>
struct Mask {
  P bits;
};
template <class P>
inline Mask<P> less_equal(const P& a, const P& b) {
  if constexpr (is_scalar_v<P>) {
    return {a <= b ? P(1) : P(0)};
  } else {
    return {ei::pcmp_le(a, b)};
  }
}
// Lanes of `a` where `m` holds, else lanes of `b`.
template <class P>
inline P select(const Mask<P>& m, const P& a, const P& b) {
  if constexpr (is_scalar_v<P>) return m.bits != P(0) ? a : b;
  else return ei::pselect(m.bits, a, b);
}
// [x, x + 1, ..., x + size - 1]
template <class P>
inline P iota(scalar_t<P> x) {
  if constexpr (is_scalar_v<P>) return x;
  else return ei::plset<P>(x);
}
// A hint to bring the `bytes` at p into the cache (no effect where unsupported): into
// every level (Level = 1), or into level 2 only (Level = 2: prefetcht2, for a stream read
// a few thousand cycles later, so that the fills do not wait for level-1 miss buffers; a
// whole-row prefetch into L1 held a decode step at ~12 GB/s on Zen 4, into L2 ~14).
template <int Level = 1>
inline void prefetch(const void* p, std::ptrdiff_t bytes) {
  static_assert(Level == 1 || Level == 2, "linen: prefetch into level 1 or 2");
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (std::ptrdiff_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, Level == 1 ? 3 : 1);
#else
  (void)p;
  (void)bytes;
#endif
}

// dst[i * ds + j] = src[j * ss + i] for i, j < size_v<P>: a square block transposed in
// registers.
template <class P>
inline void transpose(const scalar_t<P>* src, std::ptrdiff_t ss, scalar_t<P>* dst, std::ptrdiff_t ds) {
  if constexpr (is_scalar_v<P>) {
    (void)ss;
    (void)ds;
    *dst = *src;
  } else {
    ei::PacketBlock<P, size_v<P>> block;
    for (int j = 0; j < size_v<P>; ++j) block.packet[j] = ei::ploadu<P>(src + j * ss);
    ei::ptranspose(block);
    for (int i = 0; i < size_v<P>; ++i) ei::pstoreu(dst + i * ds, block.packet[i]);
  }
}

// The lane sum of x, in the order of Eigen's predux (halves, then quarters, ...).
template <class P>
inline scalar_t<P> hsum(const P& x) {
  if constexpr (is_scalar_v<P>) return x;
  else return ei::predux(x);
}

// The largest lane of x (lanes without NaN).
template <class P>
inline scalar_t<P> hmax(const P& x) {
  if constexpr (is_scalar_v<P>) return x;
  else return ei::predux_max(x);
}

// (hsum_n and exp_nonpositive are always inlined: called out of line, as gcc left them in
// jax.nn's row kernel, they took ~13% of a grouped-query decode step.)
#if defined(EIGEN_VECTORIZE_AVX512) && defined(EIGEN_VECTORIZE_AVX512DQ)
namespace tree512 {
// The levels of the 16-lane transposing tree (see hsum_n): level 1 pairs lanes (i, i + 8):
// [a lo + a hi | b lo + b hi]; level 2 (i, i + 4) within 256 bits; levels 3 and 4
// (i, i + 2), (i, i + 1) within each 128 bits.
EIGEN_ALWAYS_INLINE __m512 l1(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}
EIGEN_ALWAYS_INLINE __m512 l2(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
EIGEN_ALWAYS_INLINE __m512 l3(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE)); }
EIGEN_ALWAYS_INLINE __m512 l4(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD)); }
// The 8 sums of v[0..8) in lanes 0..8, in order.
EIGEN_ALWAYS_INLINE __m512 sums8(const __m512* v) {
  const __m512 t = l3(l2(l1(v[0], v[1]), l1(v[2], v[3])), l2(l1(v[4], v[5]), l1(v[6], v[7])));
  // lane 4k: v[k]; lane 4k + 1: v[4 + k]
  return _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 13, 9, 5, 1, 12, 8, 4, 0), l4(t, t));
}
}  // namespace tree512
#endif

// out[i] = hsum(v[i]) for i < N, bit for bit: N lane sums at once, sharing their shuffles
// (a transposing tree: each level adds the halves of two vectors' segments into one
// vector, so N sums cost N - 1 adds and 2 (N - 1) shuffles, not N reductions of log2(W)
// dependent steps each). Every sum pairs its lanes as predux does (lane i with i + W/2,
// then i + W/4, ...), so the bits are predux's: float packets of 16 lanes (AVX-512 with
// DQ, whose predux halves by 256 bits first) and of 8 (AVX), N = 4 or 8; others sum one
// by one.
template <int N, class P>
EIGEN_ALWAYS_INLINE void hsum_n(const P* v, scalar_t<P>* out) {
#if defined(EIGEN_VECTORIZE_AVX512) && defined(EIGEN_VECTORIZE_AVX512DQ)
  if constexpr (size_v<P> == 16 && std::is_same_v<scalar_t<P>, float> && (N == 4 || N == 8)) {
    using namespace tree512;
    if constexpr (N == 8) {
      _mm256_storeu_ps(out, _mm512_castps512_ps256(sums8(v)));
    } else {
      const __m512 s = l2(l1(v[0], v[1]), l1(v[2], v[3]));
      const __m512 t = l3(s, s);
      // lane 4k: v[k]
      const __m512 u = _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), l4(t, t));
      _mm_storeu_ps(out, _mm512_castps512_ps128(u));
    }
    return;
  }
#endif
#if defined(EIGEN_VECTORIZE_AVX)
  if constexpr (size_v<P> == 8 && std::is_same_v<scalar_t<P>, float> && (N == 4 || N == 8)) {
    // level 1 pairs lanes (i, i + 4): [a lo + a hi | b lo + b hi]; levels 2 and 3 (i, i + 2),
    // (i, i + 1) within each 128 bits
    auto l1 = [](__m256 a, __m256 b) {
      return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    };
    auto l2 = [](__m256 a, __m256 b) { return _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xEE)); };
    auto l3 = [](__m256 a, __m256 b) { return _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD)); };
    alignas(32) float u[8];
    if constexpr (N == 8) {
      // [v0 v2 v4 v6 | v1 v3 v5 v7]
      _mm256_store_ps(u, l3(l2(l1(v[0], v[1]), l1(v[2], v[3])), l2(l1(v[4], v[5]), l1(v[6], v[7]))));
      for (int i = 0; i < 8; ++i) out[i] = u[(i % 2) * 4 + i / 2];
    } else {
      // [v0 v2 v0 v2 | v1 v3 v1 v3]
      const __m256 t = l2(l1(v[0], v[1]), l1(v[2], v[3]));
      _mm256_store_ps(u, l3(t, t));
      for (int i = 0; i < 4; ++i) out[i] = u[(i % 2) * 4 + i / 2];
    }
    return;
  }
#endif
  for (int i = 0; i < N; ++i) out[i] = hsum(v[i]);
}

// out[i] = hsum(a[i]) and out[N + i] = hsum(b[i]) for i < N: hsum_n twice, bit for bit,
// where 2 N sums fill a packet (16-lane floats, N = 8) in one store of the packet (a packet
// load of out then forwards from that store; from two 8-lane stores it waits for both to
// reach the cache: ~4% of a decode step at the softmax's first load).
template <int N, class P>
EIGEN_ALWAYS_INLINE void hsum_n2(const P* a, const P* b, scalar_t<P>* out) {
#if defined(EIGEN_VECTORIZE_AVX512) && defined(EIGEN_VECTORIZE_AVX512DQ)
  if constexpr (size_v<P> == 16 && std::is_same_v<scalar_t<P>, float> && N == 8) {
    const __m512 u = tree512::sums8(a), w = tree512::sums8(b);
    _mm512_storeu_ps(out, _mm512_insertf32x8(u, _mm512_castps512_ps256(w), 1));
    return;
  }
#endif
  hsum_n<N>(a, out);
  hsum_n<N>(b, out + N);
}

// --- exp on x <= 0 (or NaN), as softmax needs it: exp(s - max) ---------------------------

template <class P, class = void>
struct has_integer_packet : std::false_type {};
template <class P>
struct has_integer_packet<P, std::void_t<decltype(sizeof(typename ei::unpacket_traits<P>::integer_packet))>>
    : std::true_type {};

// exp(x) for x <= 0: 0 below the smallest normal result (an absolute error below 1.2e-38
// in float), NaN for NaN, and within 2 ulp elsewhere. For float packets: Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial for exp(r), and 2^n
// assembled in the exponent bits; about 14 instructions. Other packets use Eigen's pexp.
template <class P>
EIGEN_ALWAYS_INLINE P exp_nonpositive(const P& x) {
  using C = scalar_t<P>;
  if constexpr (is_scalar_v<P>) {
    return std::exp(x);
  } else if constexpr (std::is_same_v<C, float> && has_integer_packet<P>::value) {
    using PI = typename ei::unpacket_traits<P>::integer_packet;
    const P cutoff = ei::pset1<P>(-87.0f);   // exp(-87) = 1.6e-38 > FLT_MIN: 2^n stays normal
    const P xc = ei::pmax(x, cutoff);         // NaN stays NaN (pmax keeps its first operand)
    // n = round(x / ln2) with the 1.5 * 2^23 trick: the sum's low mantissa bits hold n.
    const P magic = ei::pset1<P>(12582912.0f);
    const P t = ei::pmadd(xc, ei::pset1<P>(1.44269504088896341f), magic);
    const P n = ei::psub(t, magic);
    P r = ei::pmadd(n, ei::pset1<P>(-0.693359375f), xc);  // ln2 split in two (Cephes)
    r = ei::pmadd(n, ei::pset1<P>(2.12194440e-4f), r);
    const P r2 = ei::pmul(r, r);
    P y = ei::pmadd(ei::pset1<P>(1.9875691500e-4f), r, ei::pset1<P>(1.3981999507e-3f));
    P y1 = ei::pmadd(ei::pset1<P>(4.1665795894e-2f), r, ei::pset1<P>(1.6666665459e-1f));
    y = ei::pmadd(y, r, ei::pset1<P>(8.3334519073e-3f));
    y1 = ei::pmadd(y1, r, ei::pset1<P>(5.0000001201e-1f));
    y = ei::pmadd(y, ei::pmul(r2, r), y1);
    y = ei::pmadd(y, r2, ei::padd(r, ei::pset1<P>(1.0f)));
    // 2^n: (n + 127) << 23, with n read from t's bits (t = 0x4B400000 + n).
    const PI bits = ei::padd(ei::preinterpret<PI>(t), ei::pset1<PI>(127 - 0x4B400000));
    const P scale = ei::preinterpret<P>(ei::plogical_shift_left<23>(bits));
    return ei::pselect(ei::pcmp_lt(x, cutoff), ei::pzero(x), ei::pmul(y, scale));
  } else {
    // Eigen's own exp (double, or packets without an integer twin); fix up the tails.
    const P y = ei::pexp(x);
    const P lo = ei::pset1<P>(C(std::is_same_v<C, float> ? -87.0 : -708.0));
    const P nan_or_y = ei::pselect(ei::pcmp_eq(x, x), y, x);
    return ei::pselect(ei::pcmp_lt(x, lo), ei::pzero(x), nan_or_y);
  }
}

// --- element-type conversions ----------------------------------------------------------

// P is Eigen's float packet of `lanes` lanes (Packet8f under AVX, Packet16f under AVX-512).
// (Compared by traits: naming __m256 as a template argument draws -Wignored-attributes.)
template <class P, int lanes>
inline constexpr bool is_float_packet_of = std::is_same_v<scalar_t<P>, float> && size_v<P> == lanes;

// float(T(x)): x rounded to the storage type T (round to nearest even), lane by lane; the
// identity when T is the packet's own type.
template <class T, class P>
inline P round_to(const P& x) {
  using C = scalar_t<P>;
  if constexpr (std::is_same_v<T, C>) {
    return x;
  } else if constexpr (is_scalar_v<P>) {
    return static_cast<C>(static_cast<T>(x));
#if defined(EIGEN_VECTORIZE_AVX512)
  } else if constexpr (is_float_packet_of<P, 16> && std::is_same_v<T, Eigen::half>) {
    return ei::half2float(ei::float2half(x));
  } else if constexpr (is_float_packet_of<P, 16> && std::is_same_v<T, Eigen::bfloat16>) {
    return ei::Bf16ToF32(ei::F32ToBf16(x));
#endif
#if defined(EIGEN_VECTORIZE_AVX)
  } else if constexpr (is_float_packet_of<P, 8> && std::is_same_v<T, Eigen::half>) {
    return ei::half2float(ei::float2half(x));
  } else if constexpr (is_float_packet_of<P, 8> && std::is_same_v<T, Eigen::bfloat16>) {
    return ei::Bf16ToF32(ei::F32ToBf16(x));
#endif
  } else if constexpr (std::is_same_v<C, double> && std::is_same_v<T, float>) {
    // double lanes to float and back with the conversion instructions: GCC 12's SLP
    // vectorizer folds the lane loop below into the identity for double -> float -> double
    // (-O2, AVX2 and SSE2: wrong code), so the loop must not serve this case.
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (size_v<P> == 8) return _mm512_cvtps_pd(_mm512_cvtpd_ps(x));
    else
#endif
#if defined(EIGEN_VECTORIZE_AVX)
    if constexpr (size_v<P> == 4) return _mm256_cvtps_pd(_mm256_cvtpd_ps(x));
    else
#endif
#if defined(EIGEN_VECTORIZE_SSE2)
    if constexpr (size_v<P> == 2) return _mm_cvtps_pd(_mm_cvtpd_ps(x));
    else
#endif
    {
      alignas(64) C t[size_v<P>];
      ei::pstoreu(t, x);
      for (int i = 0; i < size_v<P>; ++i) {
        volatile float f = static_cast<float>(t[i]);  // (see above)
        t[i] = static_cast<C>(f);
      }
      return ei::ploadu<P>(t);
    }
  } else {
    alignas(64) C t[size_v<P>];
    ei::pstoreu(t, x);
    for (int i = 0; i < size_v<P>; ++i) t[i] = static_cast<C>(static_cast<T>(t[i]));
    return ei::ploadu<P>(t);
  }
}

#if defined(EIGEN_VECTORIZE_AVX512)
// bfloat16(x) lane by lane exactly as the scalar conversion rounds (to nearest even; NaN
// to the quiet NaN of its sign; denormals kept, where vcvtneps2bf16 would flush them), in
// the low 16 bits of each 32-bit lane.
inline __m512i bf16_bits_rne(const ei::Packet16f& x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(int(0x80000000u))), 16),
                                      _mm512_set1_epi32(0x7FC0));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, nan);
}
#endif

// float(T(x)) lane by lane, bit for bit as the scalar static_cast<T> (round_to may flush
// denormals where the target converts with vcvtneps2bf16).
template <class T, class P>
inline P round_exact(const P& x) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (is_float_packet_of<P, 16> && std::is_same_v<T, Eigen::bfloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits_rne(x), 16));
  } else
#endif
  if constexpr (is_scalar_v<P> || std::is_same_v<T, scalar_t<P>>) {
    return round_to<T>(x);
  } else {
    using C = scalar_t<P>;
    alignas(64) C t[size_v<P>];
    ei::pstoreu(t, x);
    for (int i = 0; i < size_v<P>; ++i) t[i] = static_cast<C>(static_cast<T>(t[i]));
    return ei::ploadu<P>(t);
  }
}

// p[0, size_v<P>) = T(x), bit for bit as the scalar static_cast<T>.
template <class T, class P>
inline void store_as(T* p, const P& x) {
  using C = scalar_t<P>;
  if constexpr (std::is_same_v<T, C>) {
    store<P>(p, x);
#if defined(EIGEN_VECTORIZE_AVX512)
  } else if constexpr (is_float_packet_of<P, 16> && std::is_same_v<T, Eigen::bfloat16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits_rne(x)));
#endif
  } else if constexpr (is_scalar_v<P>) {
    *p = static_cast<T>(x);
  } else {
    alignas(64) C t[size_v<P>];
    ei::pstoreu(t, x);
    for (int i = 0; i < size_v<P>; ++i) p[i] = static_cast<T>(t[i]);
  }
}

// size_v<P> elements of T at p, widened to the packet's type (exact).
template <class P, class T>
inline P load_as(const T* p) {
  using C = scalar_t<P>;
  if constexpr (std::is_same_v<T, C>) {
    return load<P>(p);
  } else if constexpr (is_scalar_v<P>) {
    return static_cast<C>(*p);
#if defined(EIGEN_VECTORIZE_AVX512)
  } else if constexpr (is_float_packet_of<P, 16> && std::is_same_v<T, Eigen::half>) {
    return ei::half2float(ei::ploadu<ei::Packet16h>(p));
  } else if constexpr (is_float_packet_of<P, 16> && std::is_same_v<T, Eigen::bfloat16>) {
    return ei::Bf16ToF32(ei::ploadu<ei::Packet16bf>(p));
#endif
#if defined(EIGEN_VECTORIZE_AVX)
  } else if constexpr (is_float_packet_of<P, 8> && std::is_same_v<T, Eigen::half>) {
    return ei::half2float(ei::ploadu<ei::Packet8h>(p));
  } else if constexpr (is_float_packet_of<P, 8> && std::is_same_v<T, Eigen::bfloat16>) {
    return ei::Bf16ToF32(ei::ploadu<ei::Packet8bf>(p));
#endif
  } else {
    alignas(64) C t[size_v<P>];
    for (int i = 0; i < size_v<P>; ++i) t[i] = static_cast<C>(p[i]);
    return ei::ploadu<P>(t);
  }
}

// dst[0, n) = C(src[0, n)): half and bfloat16 widened to float (exact), float and double copied.
template <class C, class T>
inline void convert(const T* src, C* dst, std::ptrdiff_t n) {
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(C));
  } else if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<C, float>) {
    // bfloat16 is the top half of a float: a shift the compiler vectorizes.
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      std::uint16_t h;
      std::memcpy(&h, src + i, sizeof h);
      const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
      std::memcpy(dst + i, &u, sizeof u);
    }
  } else {
    std::ptrdiff_t i = 0;
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (std::is_same_v<T, Eigen::half> && std::is_same_v<C, float>) {
      for (; i + 16 <= n; i += 16) ei::pstoreu(dst + i, ei::half2float(ei::ploadu<ei::Packet16h>(src + i)));
    }
#endif
#if defined(EIGEN_VECTORIZE_AVX)
    if constexpr (std::is_same_v<T, Eigen::half> && std::is_same_v<C, float>) {
      for (; i + 8 <= n; i += 8) ei::pstoreu(dst + i, ei::half2float(ei::ploadu<ei::Packet8h>(src + i)));
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<C>(src[i]);
  }
}

// --- bfloat16 pair products (avx512_bf16: vdpbf16ps) -----------------------------------
//
// Where the compiler targets avx512_bf16, a 16-lane float packet accumulates pairs of
// bfloat16 products in one instruction: each 32-bit lane of the operands holds two
// bfloat16 (a "pair": the low and the high 16 bits), and
//   dot2(acc, a, b)[i] = (acc[i] + a.hi[i] * b.hi[i]) + a.lo[i] * b.lo[i],
// measured on Zen 5 as two float FMAs in that order, each rounded to nearest even (the
// products of two bfloat16 are exact in float, so each step is one rounded addition),
// as Intel's SDM states it, with denormal operands (inputs and the accumulator) read as
// zero and denormal results (the intermediate sum and the output) flushed to zero,
// whatever MXCSR says. A pair laid out (hi = element t, lo = element t + 1) so gives
// exactly the fmadd chain over t of the widened operands, except at denormals.
#if defined(__AVX512BF16__) && defined(EIGEN_VECTORIZE_AVX512)
#define LINEN_SIMD_HAS_BF16_DOT 1
#else
#define LINEN_SIMD_HAS_BF16_DOT 0
#endif

// Whether packets of type P (float, 16 lanes) have the pair product in this TU.
template <class P>
inline constexpr bool has_bf16_dot_v = LINEN_SIMD_HAS_BF16_DOT && is_float_packet_of<P, 16>;

#if LINEN_SIMD_HAS_BF16_DOT
namespace bf16 {
using Pairs = __m512i;  // 16 pairs of bfloat16
using Packet = ei::Packet16f;

inline std::uint32_t bits32(const Eigen::bfloat16* p) {
  std::uint32_t u;
  std::memcpy(&u, p, sizeof u);
  return u;
}
inline std::uint32_t bits16(const Eigen::bfloat16* p) {
  std::uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return h;
}
// 32 bfloat16 at p (16 pairs in memory order: lo = p[2i], hi = p[2i + 1]).
inline Pairs load(const Eigen::bfloat16* p) { return _mm512_loadu_si512(p); }
inline Pairs load(const std::uint32_t* p) { return _mm512_loadu_si512(p); }
inline void store(std::uint32_t* p, const Pairs& x) { _mm512_storeu_si512(p, x); }
// The pair (lo = p[0], hi = p[1]) in every lane.
inline Pairs broadcast(const Eigen::bfloat16* p) { return _mm512_set1_epi32(static_cast<int>(bits32(p))); }
// The pair (lo = p[1], hi = p[0]) in every lane: memory order swapped, so that p[0] is
// accumulated first.
inline Pairs broadcast_swapped(const Eigen::bfloat16* p) {
  return _mm512_ror_epi32(_mm512_set1_epi32(static_cast<int>(bits32(p))), 16);
}
// The pair (lo = 0, hi = p[0]) in every lane (a last element alone: 0 * 0 adds nothing).
inline Pairs broadcast_high(const Eigen::bfloat16* p) { return _mm512_set1_epi32(static_cast<int>(bits16(p) << 16)); }
inline Packet dot2(const Packet& acc, const Pairs& a, const Pairs& b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(a), reinterpret_cast<const __m512bh&>(b));
}
// Lane i = (hi = bf16(hi[i]), lo = bf16(lo[i])), rounded to nearest even (denormals to 0).
inline Pairs pack(const Packet& hi, const Packet& lo) {
  const __m512bh h = _mm512_cvtne2ps_pbh(hi, lo);  // words 0-15: lo, 16-31: hi
  const __m512i t = reinterpret_cast<const __m512i&>(h);
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, t);
}
// Lane i = (hi = a[i], lo = b[i]) for 16 bfloat16 at a and at b.
inline Pairs interleave(const Eigen::bfloat16* a, const Eigen::bfloat16* b) {
  const __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)), 1);
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, t);
}
// Lanes i < 16: (lo = a[i], hi = b[i]) (`first`), and (lo = a[16 + i], hi = b[16 + i])
// (`second`), for 32 bfloat16 at a and at b.
inline void interleave32(const Eigen::bfloat16* a, const Eigen::bfloat16* b, Pairs& first, Pairs& second) {
  const __m512i x = _mm512_loadu_si512(a), y = _mm512_loadu_si512(b);
  const __m512i i0 = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i i1 = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22,
                                      53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  first = _mm512_permutex2var_epi16(x, i0, y);
  second = _mm512_permutex2var_epi16(x, i1, y);
}
}  // namespace bf16
#endif

}  // namespace simd
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_SIMD_HPP
