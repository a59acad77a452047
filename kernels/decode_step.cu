// See decode_step.cuh.
#include "kernels/decode_step.cuh"

// KVD_SIMT_EMULATION: compiled as host C++ against tests/kernels/simt_emulator.h for CPU tests (see
// kernels/retention_attention.cu); the launchers then live in kvd::kernels::emulated.
#ifdef KVD_SIMT_EMULATION
#include <cmath>

#include "tests/kernels/simt_emulator.h"
#define KVD_DS_NAMESPACE kvd::kernels::emulated
#else
#define KVD_DS_NAMESPACE kvd::kernels
#define KVD_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define KVD_LAST_ERROR() cudaGetLastError()
#endif
#include "kernels/bf16_bits.cuh"

namespace KVD_DS_NAMESPACE {
namespace {

using kvd::kernels::bits::bf16_to_float;
using kvd::kernels::bits::to_bf16;

#ifdef KVD_SIMT_EMULATION
inline float rsq(float x) { return 1.f / std::sqrt(x); }
inline float ex(float x) { return std::exp(x); }
#else
__device__ __forceinline__ float rsq(float x) { return rsqrtf(x); }  // what LibTorch's rsqrt runs on CUDA
__device__ __forceinline__ float ex(float x) { return expf(x); }
#endif

constexpr int kNormThreads = 256;

// grid (rows), kNormThreads threads: one row per CTA, two passes over it (the second reads from cache).
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const kvd::kernels::RmsNormArgs a) {
  KVD_DYNAMIC_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);  // (kNormThreads / 32) warp sums, then the total
  const int64_t off = static_cast<int64_t>(blockIdx.x) * a.n;
  auto value = [&](int i) {  // the normalized row's input x[i] (after the residual add, rounded as LibTorch does)
    const float x = bf16_to_float(a.x[off + i]);
    return a.residual ? bf16_to_float(to_bf16(x + bf16_to_float(a.residual[off + i]))) : x;
  };
  float ss = 0.f;
  for (int i = threadIdx.x; i < a.n; i += kNormThreads) {
    const float v = value(i);
    if (a.residual) a.sum[off + i] = to_bf16(v);
    ss += v * v;
  }
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < kNormThreads / 32; ++w) t += part[w];
    part[kNormThreads / 32] = rsq(t / static_cast<float>(a.n) + a.eps);
  }
  __syncthreads();
  const float r = part[kNormThreads / 32];
  for (int i = threadIdx.x; i < a.n; i += kNormThreads) {
    const float normed = bf16_to_float(to_bf16(value(i) * r));
    a.y[off + i] = to_bf16(bf16_to_float(a.w[i]) * normed);
  }
}

// grid (rows), kNormThreads threads: one row per CTA; pass 1 sums x² and u · x (u = bf16(dy · w), as LibTorch's
// bf16 product rounds it), pass 2 writes dx.
__global__ void __launch_bounds__(kNormThreads) rms_norm_bwd_kernel(const kvd::kernels::RmsNormBwdArgs a) {
  KVD_DYNAMIC_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);  // 2 · (kNormThreads / 32) warp sums, then r and r³ · mean(u · x)
  const int64_t off = static_cast<int64_t>(blockIdx.x) * a.n;
  auto u_at = [&](int i) { return bf16_to_float(to_bf16(bf16_to_float(a.dy[off + i]) * bf16_to_float(a.w[i]))); };
  float ss = 0.f, sd = 0.f;
  for (int i = threadIdx.x; i < a.n; i += kNormThreads) {
    const float x = bf16_to_float(a.x[off + i]);
    ss += x * x;
    sd += u_at(i) * x;
  }
  for (int o = 16; o > 0; o /= 2) {
    ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
    sd += __shfl_xor_sync(0xFFFFFFFFu, sd, o);
  }
  constexpr int kW = kNormThreads / 32;
  if (threadIdx.x % 32 == 0) {
    part[threadIdx.x / 32] = ss;
    part[kW + threadIdx.x / 32] = sd;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f, d = 0.f;
    for (int w = 0; w < kW; ++w) t += part[w], d += part[kW + w];
    const float r = rsq(t / static_cast<float>(a.n) + a.eps);
    part[2 * kW] = r;
    part[2 * kW + 1] = r * r * r * (d / static_cast<float>(a.n));
  }
  __syncthreads();
  const float r = part[2 * kW], c = part[2 * kW + 1];
  for (int i = threadIdx.x; i < a.n; i += kNormThreads)
    a.dx[off + i] = to_bf16(r * u_at(i) - bf16_to_float(a.x[off + i]) * c);
}

// grid (tokens, H + H_kv), hd / 2 threads: CTA (t, j) rotates query head j (j < H) or key head j − H of token t.
__global__ void rope_kernel(const kvd::kernels::RopeArgs a) {
  const int64_t t = blockIdx.x;
  const int j = blockIdx.y, half = a.hd / 2, i = threadIdx.x;
  const int64_t row = j < a.H ? (t * a.H + j) * a.hd : (t * a.Hkv + (j - a.H)) * a.hd;
  const uint16_t* src = j < a.H ? a.q : a.k;
  uint16_t* dst = j < a.H ? a.q_out : a.k_out;
  const float x1 = bf16_to_float(src[row + i]), x2 = bf16_to_float(src[row + half + i]);
  const uint16_t* c = a.cos + t * a.hd;
  const uint16_t* s = a.sin + t * a.hd;
  auto r = [](float v) { return bf16_to_float(to_bf16(v)); };
  if (a.pass == kvd::kernels::RopePass::Forward) {
    dst[row + i] = to_bf16(r(x1 * bf16_to_float(c[i])) + r(-x2 * bf16_to_float(s[i])));
    dst[row + half + i] = to_bf16(r(x2 * bf16_to_float(c[half + i])) + r(x1 * bf16_to_float(s[half + i])));
  } else {  // x holds dy: the transpose of the map above
    dst[row + i] = to_bf16(r(x1 * bf16_to_float(c[i])) + r(x2 * bf16_to_float(s[half + i])));
    dst[row + half + i] = to_bf16(r(x2 * bf16_to_float(c[half + i])) + r(-x1 * bf16_to_float(s[i])));
  }
}

constexpr int kElemThreads = 256;

__global__ void __launch_bounds__(kElemThreads) silu_mul_kernel(const kvd::kernels::SiluMulArgs a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x; i < a.n; i += stride) {
    const float g = bf16_to_float(a.g[i]);
    const float s = bf16_to_float(to_bf16(g / (1.f + ex(-g))));
    a.out[i] = to_bf16(s * bf16_to_float(a.u[i]));
  }
}

__global__ void __launch_bounds__(kElemThreads) silu_mul_bwd_kernel(const kvd::kernels::SiluMulBwdArgs a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x; i < a.n; i += stride) {
    const float g = bf16_to_float(a.g[i]), dy = bf16_to_float(a.dy[i]);
    const float e = ex(-g), sig = 1.f / (1.f + e);
    const float s = bf16_to_float(to_bf16(g / (1.f + e)));  // the forward's rounded silu(g)
    a.du[i] = to_bf16(dy * s);
    const float t = bf16_to_float(to_bf16(dy * bf16_to_float(a.u[i])));
    a.dg[i] = to_bf16(t * sig * (1.f + g * (1.f - sig)));
  }
}

// grid (B · H_kv), hd threads: segment s gets this step's entry at slot start[s] + len[s]; then len[s] += 1 (every
// thread has read len[s] before the barrier, and no other CTA touches segment s).
__global__ void decode_append_kernel(const kvd::kernels::DecodeAppendArgs a) {
  const int s = blockIdx.x, d = threadIdx.x;
  const int64_t n = a.len[s];
  const int64_t row = a.start[s] + n;
  a.k_store[row * a.hd + d] = a.k[static_cast<int64_t>(s) * a.hd + d];
  a.v_store[row * a.hd + d] = a.v[static_cast<int64_t>(s) * a.hd + d];
  if (d == 0) a.pos_store[row] = a.qpos[s / a.Hkv];
  __syncthreads();
  if (d == 0) a.len[s] = n + 1;
}

}  // namespace

cudaError_t rms_norm(const kvd::kernels::RmsNormArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.rows > 2147483647 || a.n <= 0 || (a.residual && !a.sum)) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  const size_t smem = (kNormThreads / 32 + 1) * sizeof(float);
  KVD_LAUNCH(rms_norm_kernel, dim3(static_cast<unsigned>(a.rows)), dim3(kNormThreads), smem, stream, a);
  return KVD_LAST_ERROR();
}

cudaError_t rms_norm_bwd(const kvd::kernels::RmsNormBwdArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.rows > 2147483647 || a.n <= 0 || (a.rows > 0 && (!a.x || !a.w || !a.dy || !a.dx)))
    return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  const size_t smem = (2 * (kNormThreads / 32) + 2) * sizeof(float);
  KVD_LAUNCH(rms_norm_bwd_kernel, dim3(static_cast<unsigned>(a.rows)), dim3(kNormThreads), smem, stream, a);
  return KVD_LAST_ERROR();
}

cudaError_t rope(const kvd::kernels::RopeArgs& a, cudaStream_t stream) {
  if (a.tokens < 0 || a.tokens > 2147483647 || a.hd <= 0 || a.hd % 2 != 0 || a.hd > 2048 || a.H <= 0 || a.Hkv <= 0 ||
      a.H + a.Hkv > 65535)
    return cudaErrorInvalidValue;
  if (a.tokens == 0) return cudaSuccess;
  KVD_LAUNCH(rope_kernel, dim3(static_cast<unsigned>(a.tokens), a.H + a.Hkv), dim3(a.hd / 2), 0, stream, a);
  return KVD_LAST_ERROR();
}

cudaError_t silu_mul(const kvd::kernels::SiluMulArgs& a, cudaStream_t stream) {
  if (a.n < 0) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  const int64_t want = (a.n + kElemThreads - 1) / kElemThreads;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  KVD_LAUNCH(silu_mul_kernel, dim3(blocks), dim3(kElemThreads), 0, stream, a);
  return KVD_LAST_ERROR();
}

cudaError_t silu_mul_bwd(const kvd::kernels::SiluMulBwdArgs& a, cudaStream_t stream) {
  if (a.n < 0 || (a.n > 0 && (!a.g || !a.u || !a.dy || !a.dg || !a.du))) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  const int64_t want = (a.n + kElemThreads - 1) / kElemThreads;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  KVD_LAUNCH(silu_mul_bwd_kernel, dim3(blocks), dim3(kElemThreads), 0, stream, a);
  return KVD_LAST_ERROR();
}

cudaError_t decode_append(const kvd::kernels::DecodeAppendArgs& a, cudaStream_t stream) {
  if (a.B <= 0 || a.Hkv <= 0 || a.hd <= 0 || a.hd > 1024 || static_cast<int64_t>(a.B) * a.Hkv > 2147483647)
    return cudaErrorInvalidValue;
  KVD_LAUNCH(decode_append_kernel, dim3(a.B * a.Hkv), dim3(a.hd), 0, stream, a);
  return KVD_LAST_ERROR();
}

}  // namespace KVD_DS_NAMESPACE
