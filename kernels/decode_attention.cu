// See decode_attention.cuh.
#include "kernels/decode_attention.cuh"

#include <cstring>

// KVD_SIMT_EMULATION: compiled as host C++ against tests/kernels/simt_emulator.h for CPU tests (see
// kernels/retention_attention.cu); the launchers then live in kvd::kernels::emulated.
#ifdef KVD_SIMT_EMULATION
#include <cmath>

#include "tests/kernels/simt_emulator.h"
#define KVD_DA_NAMESPACE kvd::kernels::emulated
#else
#define KVD_DA_NAMESPACE kvd::kernels
#define KVD_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define KVD_LAST_ERROR() cudaGetLastError()
#endif

namespace KVD_DA_NAMESPACE {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxG = kvd::kernels::kDecodeMaxGroup;

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
inline float ex(float x) { return std::exp(x); }
#else
__device__ __forceinline__ float bits_to_float(uint32_t u) { return __uint_as_float(u); }
__device__ __forceinline__ uint32_t float_to_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float ex(float x) { return expf(x); }
#endif

// 8 consecutive bf16 (one 16-byte load) to fp32.
__device__ __forceinline__ void load8(const uint16_t* p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = bits_to_float(w[i] << 16);
    f[2 * i + 1] = bits_to_float(w[i] & 0xFFFF0000u);
  }
}

// fp32 -> bf16, round to nearest even (NaN stays NaN).
__device__ __forceinline__ uint16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// grid (splits, B · H_kv); kThreads threads. See decode_attention.cuh.
template <int HD>
__global__ void __launch_bounds__(kThreads) split_kernel(const kvd::kernels::DecodeAttentionArgs a, int64_t chunk) {
  constexpr int LPK = HD / 8;       // lanes per key row
  constexpr int KPW = 32 / LPK;     // keys per warp and iteration
  constexpr int NGRP = kWarps * KPW;  // lane groups per CTA
  KVD_DYNAMIC_SMEM(smem);
  const int split = blockIdx.x, seg = blockIdx.y;
  const int G = a.H / a.Hkv, b = seg / a.Hkv, h = seg % a.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kg = lane / LPK, sub = lane % LPK, grp = warp * KPW + kg;
  const int64_t len = a.len[seg], row0 = a.start[seg];
  const int64_t lo = static_cast<int64_t>(split) * chunk;
  const int64_t hi = len < lo + chunk ? len : lo + chunk;
  const int64_t qp = a.window > 0 ? a.qpos[b] : 0;

  float q[kMaxG][8], acc[kMaxG][8], m[kMaxG], l[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f, q[g][i] = 0.f;
    if (g < G) {
      load8(a.q + (static_cast<int64_t>(b) * a.H + h * G + g) * HD + sub * 8, q[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[g][i] *= a.scale;
    }
  }

  // Every lane of a warp runs the same iterations (the shuffles need all 32); lanes past `hi` read a held row.
  for (int64_t base = lo + warp * KPW; base < hi; base += kWarps * KPW) {
    const int64_t j = base + kg;
    const bool in = j < hi;
    const int64_t r = row0 + (in ? j : lo);
    const bool visible = in && (a.window <= 0 || qp - a.kpos[r] < a.window);
    float kf[8];
    load8(a.k + r * HD + sub * 8, kf);
    float s[kMaxG];
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) d += q[g][i] * kf[i];
#pragma unroll
      for (int off = LPK / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xFFFFFFFFu, d, off);
      s[g] = d;
    }
    if (visible) {
      float vf[8];
      load8(a.v + r * HD + sub * 8, vf);
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        if (g >= G) continue;
        const float mn = s[g] > m[g] ? s[g] : m[g];
        const float corr = ex(m[g] - mn), p = ex(s[g] - mn);  // m = -inf: corr = 0
        l[g] = l[g] * corr + p;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * corr + p * vf[i];
        m[g] = mn;
      }
    }
  }

  // Merge the lane groups of the CTA: (max, sum) and the output slice of every group to shared memory, then
  // each thread merges whole (head, dim) columns in group order.
  float* s_ml = reinterpret_cast<float*>(smem);  // (NGRP, G, 2)
  float* s_o = s_ml + NGRP * G * 2;              // (NGRP, G, HD)
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    if (g >= G) continue;
    if (sub == 0) {
      s_ml[(grp * G + g) * 2] = m[g];
      s_ml[(grp * G + g) * 2 + 1] = l[g];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) s_o[(grp * G + g) * HD + sub * 8 + i] = acc[g][i];
  }
  __syncthreads();
  const int64_t BH = static_cast<int64_t>(a.B) * a.H;
  for (int idx = threadIdx.x; idx < G * HD; idx += kThreads) {
    const int g = idx / HD, d = idx % HD;
    float M = -INFINITY;
    for (int t = 0; t < NGRP; ++t) M = s_ml[(t * G + g) * 2] > M ? s_ml[(t * G + g) * 2] : M;
    float L = 0.f, O = 0.f;
    if (M > -INFINITY) {
      for (int t = 0; t < NGRP; ++t) {
        const float mt = s_ml[(t * G + g) * 2];
        if (mt == -INFINITY) continue;
        const float w = ex(mt - M);
        L += w * s_ml[(t * G + g) * 2 + 1];
        O += w * s_o[(t * G + g) * HD + d];
      }
    }
    const int64_t row = static_cast<int64_t>(split) * BH + static_cast<int64_t>(b) * a.H + h * G + g;
    a.part_o[row * HD + d] = O;
    if (d == 0) {
      a.part_ml[row * 2] = M;
      a.part_ml[row * 2 + 1] = L;
    }
  }
}

// grid (B · H), HD threads: merges the splits of one (request, query head) in split order.
template <int HD>
__global__ void __launch_bounds__(HD) merge_kernel(const kvd::kernels::DecodeAttentionArgs a) {
  const int64_t row = blockIdx.x, BH = static_cast<int64_t>(a.B) * a.H;
  const int d = threadIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < a.splits; ++s) {
    const float ms = a.part_ml[(s * BH + row) * 2];
    M = ms > M ? ms : M;
  }
  float L = 0.f, O = 0.f;
  if (M > -INFINITY) {
    for (int s = 0; s < a.splits; ++s) {
      const float ms = a.part_ml[(s * BH + row) * 2];
      if (ms == -INFINITY) continue;
      const float w = ex(ms - M);
      L += w * a.part_ml[(s * BH + row) * 2 + 1];
      O += w * a.part_o[(s * BH + row) * HD + d];
    }
  }
  a.out[row * HD + d] = to_bf16(L > 0.f ? O / L : 0.f);
}

template <int HD>
void launch(const kvd::kernels::DecodeAttentionArgs& a, int64_t chunk, cudaStream_t stream) {
  constexpr int NGRP = kWarps * (32 / (HD / 8));
  const int G = a.H / a.Hkv;
  const size_t smem = static_cast<size_t>(NGRP) * G * (HD + 2) * sizeof(float);
  KVD_LAUNCH(split_kernel<HD>, dim3(a.splits, a.B * a.Hkv), dim3(kThreads), smem, stream, a, chunk);
  KVD_LAUNCH(merge_kernel<HD>, dim3(a.B * a.H), dim3(HD), 0, stream, a);
}

}  // namespace

int decode_attention_splits(int segments, int64_t max_len) {
  const int64_t want = (264 + segments - 1) / (segments > 0 ? segments : 1);
  const int64_t most = (max_len + 63) / 64;
  const int64_t s = want < most ? want : most;
  return static_cast<int>(s < 1 ? 1 : s);
}

cudaError_t decode_attention(const kvd::kernels::DecodeAttentionArgs& a, cudaStream_t stream) {
  if ((a.hd != 64 && a.hd != 128) || a.B <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0 || a.H / a.Hkv > kMaxG ||
      a.splits < 1 || a.max_len < 0 || a.B * a.Hkv > 65535)
    return cudaErrorInvalidValue;
  const int64_t chunk = a.max_len > 0 ? (a.max_len + a.splits - 1) / a.splits : 1;
  if (a.hd == 64)
    launch<64>(a, chunk, stream);
  else
    launch<128>(a, chunk, stream);
  return KVD_LAST_ERROR();
}

}  // namespace KVD_DA_NAMESPACE
