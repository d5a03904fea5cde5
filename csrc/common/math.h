// Generic elementwise math for the CPU kernels of every op family: code-generation macros,
// branch-free exp/log1p that GCC can vectorise, and the online log-sum-exp merge.
//
// Nothing here knows about tensors or about any particular loss; kernels are written once as
// templates over float/double and call the overloads at the bottom (fast_exp, log1p_unit),
// which pick the vectorisable fp32 forms or libm for double.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace mmk {

// ---------------------------------------------------------------------------------------
// Code generation helpers
// ---------------------------------------------------------------------------------------

#define MMK_INLINE inline __attribute__((always_inline))

// The wheel must run on any x86-64, so there is no global -mavx2. Hot elementwise loops are
// instead compiled three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, and the baseline)
// and the dynamic loader picks one through an ifunc. The always-inline helpers below are
// inlined into each clone, so each copy of the loop is auto-vectorised for its own ISA.
// (The AVX-512 copy runs the InfoNCE tile passes ~25% faster than the AVX2 one on Zen 4,
// where 512-bit operations are split in two: fewer instructions for the same work.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMK_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMK_MULTIVERSION
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// Elementwise math
// ---------------------------------------------------------------------------------------

template <typename T>
MMK_INLINE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max that never turns a finite running maximum into NaN: NaN reaches the results through
// the sums (exp(NaN - m) = NaN), which keeps the maxima usable as exp offsets.
template <typename T>
MMK_INLINE T max_of(T a, T b) {
  return b > a ? b : a;
}

MMK_INLINE float bits_float(uint32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

MMK_INLINE uint32_t float_bits(float f) {
  uint32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// e^x in fp32 without branches or table lookups, so a loop around it vectorises.
// x = n ln2 + r with |r| <= ln2/2 (Cody-Waite: ln2 split into a high part with trailing
// zero bits, so n * ln2_hi is exact, and a small low part), e^r from a degree-6 polynomial
// fitted for minimax relative error (2e-9, below fp32 rounding, so ~1 ulp overall) with the
// constant term pinned to 1 so e^0 == 1 exactly, and 2^n assembled in exponent fields.
// x > ln(FLT_MAX) gives +inf; NaN stays NaN (every comparison with NaN is false, so it flows
// through the polynomial untouched).
// kSubnormal selects the underflow behaviour. false: results below ~2^-125 (x < -86.5)
// flush to 0, which is all a term added to a sum of order 1 needs, and never creates
// subnormals (slow on some CPUs). true: gradual underflow down to 2^-149, for values that
// can be the whole answer (SigLIP loss and sigmoid of a confidently separated pair).
template <bool kSubnormal>
MMK_INLINE float exp_f32(float x) {
  constexpr float kLo = kSubnormal ? -103.972077083991796f : -86.5f;  // ln 2^-150 or ~ln 2^-124.8
  constexpr float kHi = 88.72283935546875f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682030941723e-06f;
  // Adding 1.5 * 2^23 pushes the fraction bits out of the mantissa, so the FPU rounds
  // x * log2(e) to the nearest integer n and the low mantissa bits of the sum hold n.
  constexpr float kShifter = 12582912.0f;
  constexpr uint32_t kShifterBits = 0x4B400000u;

  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const float t = xc * kLog2e + kShifter;
  const float n = t - kShifter;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 0.0013843653651749751f;
  p = p * r + 0.008374155421350976f;
  p = p * r + 0.041668002039231294f;
  p = p * r + 0.16666431261330666f;
  p = p * r + 0.4999999420900921f;
  p = p * r + 1.000000032165329f;
  p = p * r + 1.0f;
  // n is in [-150, 128], outside the normal exponent range at both ends, so 2^n is applied
  // as two normal factors 2^(n/2) (rounded down) and 2^(n - n/2); the last product rounds
  // once into the subnormal range or to FLT_MAX..inf. For NaN input the bits of t are
  // garbage (harmless, p is NaN); integer steps are kept free of signed overflow for it.
  const int32_t n_int = static_cast<int32_t>(float_bits(t) - kShifterBits);
  const int32_t n_lo = n_int >> 1;
  const int32_t n_hi = n_int - n_lo;
  const float two_lo = bits_float((static_cast<uint32_t>(n_lo) + 127u) << 23);
  const float two_hi = bits_float((static_cast<uint32_t>(n_hi) + 127u) << 23);
  float y = (p * two_lo) * two_hi;
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// log(1 + e) for e in [0, 1] (the softplus tail, e = exp(-|x|)), vectorisable.
// log1p(e) = 2 atanh(w) with w = e / (2 + e) in [0, 1/3]; the odd atanh series in w needs
// terms up to w^13 for ~1e-8 relative error at w = 1/3, and for tiny e it returns ~e with
// full relative accuracy (no 1 + e rounding).
MMK_INLINE float log1p_unit_f32(float e) {
  const float w = e / (2.0f + e);
  const float w2 = w * w;
  float q = 1.0f / 13.0f;
  q = q * w2 + 1.0f / 11.0f;
  q = q * w2 + 1.0f / 9.0f;
  q = q * w2 + 1.0f / 7.0f;
  q = q * w2 + 1.0f / 5.0f;
  q = q * w2 + 1.0f / 3.0f;
  q = q * w2 + 1.0f;
  return 2.0f * w * q;
}

// Kernels are written once as templates; float uses the vectorisable forms above and double
// (the gradcheck path, where exactness matters and speed does not) uses libm.
MMK_INLINE float fast_exp(float x) { return exp_f32<false>(x); }
MMK_INLINE double fast_exp(double x) { return std::exp(x); }
MMK_INLINE float fast_exp_subnormal(float x) { return exp_f32<true>(x); }
MMK_INLINE double fast_exp_subnormal(double x) { return std::exp(x); }
MMK_INLINE float log1p_unit(float e) { return log1p_unit_f32(e); }
MMK_INLINE double log1p_unit(double e) { return std::log1p(e); }

// ---------------------------------------------------------------------------------------
// Online log-sum-exp
// ---------------------------------------------------------------------------------------

// A running state (m, l) stands for the sum l * e^m (m = -inf: the empty sum). Merging n
// partial states (max_at(k), sum_at(k)), k = 0..n-1, in a fixed order:
//   log sum_k l_k e^(m_k) = m + log(sum_k l_k e^(m_k - m)),   m = max_k m_k.
// All -inf maxima give -inf (log of an empty sum) without forming -inf - -inf.
template <typename T, typename MaxAt, typename SumAt>
MMK_INLINE T merge_lse(int64_t n, const MaxAt& max_at, const SumAt& sum_at) {
  const T ninf = neg_inf<T>();
  T m = ninf;
  for (int64_t k = 0; k < n; ++k) m = max_of(m, max_at(k));
  const T off = m == ninf ? T(0) : m;
  T l = 0;
  for (int64_t k = 0; k < n; ++k) l += sum_at(k) * std::exp(max_at(k) - off);
  return m + std::log(l);
}

}  // namespace mmk
