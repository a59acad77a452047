// bf16 <-> fp32 on raw bits, for kernels that take bf16 as uint16_t (device code, or host C++ under the SIMT
// emulator of tests/kernels/simt_emulator.h, where __device__ is defined away). Include after the emulator.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvd::kernels::bits {

#ifdef KVD_SIMT_EMULATION
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
#else
__device__ __forceinline__ float bits_to_float(uint32_t u) { return __uint_as_float(u); }
__device__ __forceinline__ uint32_t float_to_bits(float f) { return __float_as_uint(f); }
#endif

__device__ __forceinline__ float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16, round to nearest even (NaN stays NaN), as LibTorch rounds.
__device__ __forceinline__ uint16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace kvd::kernels::bits
