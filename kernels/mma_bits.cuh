// Tensor-core building blocks shared by the mma.sync kernels of kernels/ (retention_attention.cu,
// window_scores.cu): cp.async tile loads into XOR-swizzled shared memory, ldmatrix fragments, mma.m16n8k16
// (bf16 in, fp32 accumulate), exp2, and the dynamic shared-memory opt-in. Include it after the kernel file's
// KVD_SIMT_EMULATION setup: emulated builds (tests/kernels/simt_emulator.h) get host versions in a namespace of
// their own, so that a binary may link both without two definitions of one inline function.
//
// Fragment layouts (PTX ISA, m16n8k16, g = lane / 4, t = lane % 4):
//   A (16×16, row): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16×8, col):  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C (16×8):       c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
// Shared-memory tiles are rows of D bf16 whose 16-byte chunks are XOR-swizzled by (row % 8), so the 8 row
// addresses of one ldmatrix hit 8 different bank groups.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#ifndef KVD_SIMT_EMULATION
#include "kernels/smem_limit.cuh"
#endif

#ifdef KVD_SIMT_EMULATION
namespace kvd::kernels::emulated::mma {
#else
namespace kvd::kernels::mma {
#endif

using bf16 = __nv_bfloat16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#ifdef KVD_SIMT_EMULATION
inline void cp_async16(void* dst, const void* src, bool pred) {
  if (pred) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { kvd_sim::ldmatrix_x4(r, p, false); }
inline void ldsm_x4_t(uint32_t (&r)[4], const void* p) { kvd_sim::ldmatrix_x4(r, p, true); }
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  kvd_sim::mma_m16n8k16_bf16(c, a, b0, b1);
}
inline float fast_exp2(float x) { return std::exp2(x); }
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of (row, col) in a swizzled tile of rows × D bf16.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// cp.async a tile of R rows × D from global rows [row0, row0 + R) (rows >= nvalid are zero-filled).
template <int D, int R, int NT>
__device__ __forceinline__ void load_tile(bf16* sm, const bf16* g, int64_t row_stride, int row0, int nvalid) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int i = threadIdx.x; i < R * CH; i += NT) {
    const int r = i / CH, c = i % CH;
    const bool ok = row0 + r < nvalid;
    const bf16* src = g + static_cast<int64_t>(ok ? row0 + r : 0) * row_stride + c * 8;
    cp_async16(sm + r * D + ((c ^ (r & 7)) << 3), src, ok);
  }
}

// A fragments (16 rows × 16 cols at (r0, c0)) of a row-major swizzled tile: rows are the M dimension.
template <int D>
__device__ __forceinline__ void ld_a(uint32_t (&a)[4], const bf16* t, int r0, int c0, int lane) {
  ldsm_x4(a, t + swz<D>(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, c0 + (lane >> 4) * 8));
}
// B fragments for two 8-wide n-tiles (n0.., n0+8..) × one 16-deep k-step (k0..), where the tile stores
// rows = n and cols = k (B = tileᵀ, e.g. K in Q·Kᵀ). b[0], b[1]: n-tile n0; b[2], b[3]: n-tile n0 + 8.
template <int D>
__device__ __forceinline__ void ld_b_nk(uint32_t (&b)[4], const bf16* t, int n0, int k0, int lane) {
  ldsm_x4(b, t + swz<D>(n0 + (lane & 7) + (lane >> 4) * 8, k0 + ((lane >> 3) & 1) * 8));
}
// B fragments where the tile stores rows = k and cols = n (B = tile, e.g. V in P·V): transposing ldmatrix.
template <int D>
__device__ __forceinline__ void ld_b_kn(uint32_t (&b)[4], const bf16* t, int k0, int n0, int lane) {
  ldsm_x4_t(b, t + swz<D>(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8));
}

// Lets `kernel` use `bytes` of dynamic shared memory (above the default 48 KB): the limit only rises, so threads
// launching it at once cannot lower it under each other (kernels/smem_limit.cuh); nothing to do when emulated.
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
#ifdef KVD_SIMT_EMULATION
  (void)kernel, (void)bytes;
  return cudaSuccess;
#else
  return kvd::kernels::raise_smem_limit(kernel, bytes);
#endif
}

}  // namespace kvd::kernels::(emulated::)mma
