// Shared by every kernel: argument checks that raise Python-visible errors, dtype codes, and the
// scalar conversions CPU kernels use to read fp16/bf16 inputs into fp32 tiles.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace biogen {

// Python passes dtype as one of these codes (see biogen/ops/_runtime.py: DTYPE_CODES).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// Raised as ValueError by pybind11 (std::invalid_argument maps to ValueError).
#define BIOGEN_CHECK(cond, msg)                                                   \
  do {                                                                            \
    if (!(cond)) throw std::invalid_argument(std::string("biogen: ") + (msg));    \
  } while (0)

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {  // round to nearest even, as torch does
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // overflow -> inf
  if (absx < 0x38800000u) {                                   // subnormal or zero in half
    if (absx < 0x33000000u) return (uint16_t)sign;
    const uint32_t e = absx >> 23, m = (absx & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fff;
  r >>= 13;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return (uint16_t)(sign | r);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
  x += 0x7fff + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

// Typed element access for the three storage types a kernel template is instantiated with.
struct F32 { using T = float;    static float load(const float* p) { return *p; }    static void store(float* p, float v) { *p = v; } };
struct F16 { using T = uint16_t; static float load(const uint16_t* p) { return half_to_float(*p); } static void store(uint16_t* p, float v) { *p = float_to_half(v); } };
struct BF16 { using T = uint16_t; static float load(const uint16_t* p) { return bf16_to_float(*p); } static void store(uint16_t* p, float v) { *p = float_to_bf16(v); } };

// Calls F.template operator()<Storage>() for a runtime dtype code: one switch shared by all kernels.
template <typename F>
inline void dispatch_float_types(int dtype, const char* op, F&& f) {
  switch ((DType)dtype) {
    case DType::f32: f.template operator()<F32>(); break;
    case DType::f16: f.template operator()<F16>(); break;
    case DType::bf16: f.template operator()<BF16>(); break;
    default: throw std::invalid_argument(std::string("biogen: ") + op + " supports float32, float16 and bfloat16");
  }
}

}  // namespace biogen
