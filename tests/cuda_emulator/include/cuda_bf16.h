// bfloat16 for the CPU emulator: storage and exact conversions (float -> bfloat16 rounds to nearest, ties to
// even, as __float2bfloat16_rn on a GPU; NaN stays a quiet NaN). No bfloat16 arithmetic: the kernels compute in
// fp32.
#pragma once

#include <cstdint>
#include <cstring>

#pragma GCC visibility push(hidden)

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;  // bfloat16 is the top half of a float
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x0040u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even on the 16 dropped bits (overflow gives infinity)
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

#pragma GCC visibility pop
