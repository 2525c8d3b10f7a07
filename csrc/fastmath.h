// Branch-free fp32 elementary functions that GCC/Clang auto-vectorise inside `#pragma omp simd` loops
// (-O3 -march=native: 8 lanes on AVX2, 16 on AVX-512; plain SSE2 without -march=native).
//
// Accuracy (checked against fp64 by tests/test_cpu_ext.py::test_fastmath):
//   fexp    Cephes expf polynomial after Cody-Waite reduction: <= 2 ulp. Returns 0 below -87
//           (true values there are < 2^-125, far below anything that matters next to a row sum >= 1).
//   fexpm1  exact for the reduced argument (no cancellation near 0): <= 3 ulp / 1e-7 relative.
//   ftanh   expm1(2x) / (expm1(2x) + 2): <= 4 ulp.
//   flog1p  for t in [0, 1] (logaddexp): log(1+t) corrected by t / ((1+t) - 1): <= 3 ulp.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define LSA_INLINE static inline __attribute__((always_inline))
#else
#define LSA_INLINE static inline
#endif

namespace lsa {

LSA_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
LSA_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound - kRound rounds x to an integer

// e^x for x <= 88.3; 0 for x < -87.
LSA_INLINE float fexp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.3f ? 88.3f : x);
  const float fn = (xc * kLog2e + kRound) - kRound;
  float r = xc - fn * kLn2Hi;
  r = r - fn * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(fn) + 127) << 23);
  return x < -87.0f ? 0.0f : y * scale;
}

// expm1(r) - r = r^2 (1/2 + r/6 + r^2/24 + ...), Taylor to r^9 (truncation < 1e-9 relative for |r| <= 0.5):
// shared by fexpm1 (the reduced argument) and lsa_cpu.cpp's phi_expm1 (the centred KL).
LSA_INLINE float expm1_minus_x(float r) {
  float p = 2.7557319224e-6f;
  p = p * r + 2.4801587302e-5f;
  p = p * r + 1.9841269841e-4f;
  p = p * r + 1.3888888889e-3f;
  p = p * r + 8.3333333333e-3f;
  p = p * r + 4.1666666667e-2f;
  p = p * r + 1.6666666667e-1f;
  p = p * r + 0.5f;
  return p * r * r;
}

// e^x - 1 for x in [-80, 80], clamped outside (e^-80 - 1 == -1 in fp32; the upper clamp is
// lsa_kernels.stats.EXPM1_CLAMP, so that p·expm1(-u) never becomes 0·inf).
LSA_INLINE float fexpm1(float x) {
  const float xc = x < -80.0f ? -80.0f : (x > 80.0f ? 80.0f : x);
  const float fn = (xc * kLog2e + kRound) - kRound;
  float r = xc - fn * kLn2Hi;
  r = r - fn * kLn2Lo;  // |r| <= 0.347
  const float em = expm1_minus_x(r) + r;  // expm1(r), exact for the reduced argument
  const float scale = bits_to_float((static_cast<int32_t>(fn) + 127) << 23);
  return scale * em + (scale - 1.0f);  // exactly em when fn == 0
}

LSA_INLINE float ftanh(float x) {
  const float e = fexpm1(2.0f * x);
  return e / (e + 2.0f);
}

// log(1 + t) for t in [0, 1].
LSA_INLINE float flog1p01(float t) {
  const float u = 1.0f + t;
  // log(u), u in [1, 2]: reduce to m in [sqrt(1/2), sqrt(2)) (Cephes logf)
  const bool big = u > 1.41421356f;
  const float m = big ? 0.5f * u : u;
  const float e = big ? 1.0f : 0.0f;
  const float x = m - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y += kLn2Lo * e;
  y += -0.5f * z;
  float l = x + y;
  l += kLn2Hi * e;
  // correct for the rounding of 1 + t: log1p(t) = log(u) * t / (u - 1)
  const float d = u - 1.0f;
  return d == 0.0f ? t : l * (t / d);
}

// log(e^x + e^y)
LSA_INLINE float flogaddexp(float x, float y) {
  const float mx = x > y ? x : y;
  const float d = x > y ? y - x : x - y;  // -|x - y|
  return mx + flog1p01(fexp(d));
}

}  // namespace lsa
