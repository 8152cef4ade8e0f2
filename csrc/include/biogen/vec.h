// A 16-float vector type for the CPU kernels. GCC/Clang vector extensions lower it to one zmm
// register under AVX-512, two ymm under AVX2 and four xmm on the baseline, so one source serves
// every per-ISA build (see cpu_dispatch.h) without intrinsics.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace biogen {

typedef float v16f __attribute__((vector_size(64), aligned(64)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));  // unaligned access

constexpr int kVec = 16;

static inline v16f vload(const float* p) { return *(const v16f_u*)p; }
static inline void vstore(float* p, v16f v) { *(v16f_u*)p = v; }
static inline v16f vbroadcast(float x) { return (v16f){} + x; }
// a > b ? a : b, NaN and signed zeros included, is exactly x86's max (min likewise); GCC does not
// see it through the vector select (it would then compare and blend: two instructions).
static inline v16f vmax(v16f a, v16f b) {
#if defined(__AVX512F__)
  return (v16f)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
  __m256 x[2], y[2];
  std::memcpy(x, &a, sizeof(x));
  std::memcpy(y, &b, sizeof(y));
  x[0] = _mm256_max_ps(x[0], y[0]);
  x[1] = _mm256_max_ps(x[1], y[1]);
  std::memcpy(&a, x, sizeof(a));
  return a;
#else
  return a > b ? a : b;
#endif
}
static inline v16f vmin(v16f a, v16f b) {
#if defined(__AVX512F__)
  return (v16f)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
  __m256 x[2], y[2];
  std::memcpy(x, &a, sizeof(x));
  std::memcpy(y, &b, sizeof(y));
  x[0] = _mm256_min_ps(x[0], y[0]);
  x[1] = _mm256_min_ps(x[1], y[1]);
  std::memcpy(&a, x, sizeof(a));
  return a;
#else
  return a < b ? a : b;
#endif
}

// 1 / d for finite d with |d| in [2^-125, 2^125], relative error below 1.5e-7 (AVX-512) or 2.5e-7
// (AVX): the ISA's reciprocal estimate (14 or 12 bits) and one Newton step, fewer cycles than a
// division; the base build divides. Not IEEE: 1 / 3 need not round correctly, and d outside that
// range may give 0 or inf.
static inline v16f vrcp(v16f d) {
#if defined(__AVX512F__)
  const v16f r = (v16f)_mm512_rcp14_ps((__m512)d);
#elif defined(__AVX__)
  __m256 h[2];
  std::memcpy(h, &d, sizeof(h));
  h[0] = _mm256_rcp_ps(h[0]);
  h[1] = _mm256_rcp_ps(h[1]);
  v16f r;
  std::memcpy(&r, h, sizeof(r));
#else
  return 1.f / d;
#endif
#if defined(__AVX512F__) || defined(__AVX__)
  return r + r * (1.f - d * r);
#endif
}

static inline float vsum(v16f v) {
  float s = 0.f;
  for (int i = 0; i < kVec; ++i) s += v[i];
  return s;
}
static inline float vhmax(v16f v) {
  float m = v[0];
  for (int i = 1; i < kVec; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) with ~2 ulp error on [-87, 88]; exp(-inf) = 0, exp(x < -87.3) = 0, NaN propagates.
// Cody-Waite reduction x = n ln2 + r, degree-6 polynomial for e^r, 2^n from exponent bits.
static inline v16f vexp(v16f x) {
  const v16f lo = vbroadcast(-87.33654f), hi = vbroadcast(88.3762626f);
  const v16i underflow = x < lo;
  v16f xc = vmin(vmax(x, lo), hi);
  const v16f nan_mask_src = x;
  v16f n = xc * 1.44269504088896341f;
  // round to nearest: add and subtract 1.5 * 2^23
  n = (n + 12582912.0f) - 12582912.0f;
  v16f r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16f p = vbroadcast(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  v16i ni = __builtin_convertvector(n, v16i);
  v16i bits = (ni + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  v16f y = p * scale;
  y = underflow ? vbroadcast(0.f) : y;
  // NaN in -> NaN out (comparisons with NaN are false, so clamping turned it into a number)
  const v16i is_nan = nan_mask_src != nan_mask_src;
  return is_nan ? nan_mask_src : y;
}

}  // namespace biogen
