// IEEE binary16 for the CPU emulator: storage and exact conversions (float -> half rounds to nearest, ties to
// even, as __float2half_rn on a GPU; subnormals, overflow to infinity and NaN included). No half arithmetic:
// the kernels compute in fp32.
#pragma once

#include <cstdint>
#include <cstring>

#pragma GCC visibility push(hidden)

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000u | (mantissa << 13);  // infinity, NaN (payload kept)
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // subnormal: m * 2^-24, exact
    std::memcpy(&u, &magnitude, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};  // quiet NaN
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to infinity
  if (a >= 0x38800000u) {  // a normal half: drop 13 mantissa bits, rebias the exponent, round the remainder
    uint32_t h = (a >> 13) - (112u << 10);
    const uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still right
    return __half{static_cast<uint16_t>(sign | h)};
  }
  if (a < 0x33000000u) return __half{sign};  // below half the smallest subnormal (2^-25): zero
  // a subnormal half: round(|f| / 2^-24) = mantissa-with-hidden-bit >> (126 - exponent), to nearest even
  const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
  const int shift = 126 - static_cast<int>(a >> 23);  // 14..24
  uint32_t h = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;  // may round up to the smallest normal, 0x0400
  return __half{static_cast<uint16_t>(sign | h)};
}

inline __half __float2half(float f) { return __float2half_rn(f); }

#pragma GCC visibility pop
