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
#include "kernels/bf16_bits.cuh"

namespace KVD_DA_NAMESPACE {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxG = kvd::kernels::kDecodeMaxGroup;

#ifdef KVD_SIMT_EMULATION
inline float ex(float x) { return std::exp(x); }
#else
__device__ __forceinline__ float ex(float x) { return expf(x); }
#endif
using kvd::kernels::bits::bits_to_float;
using kvd::kernels::bits::to_bf16;

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

// grid (splits, B · H_kv); kThreads threads. See decode_attention.cuh. Each lane group loads U keys (K and V rows)
// before using any, so that enough loads are in flight to keep HBM busy.
template <int HD, int G>
__global__ void __launch_bounds__(kThreads) split_kernel(const kvd::kernels::DecodeAttentionArgs a, int64_t chunk) {
  constexpr int LPK = HD / 8;         // lanes per key row
  constexpr int KPW = 32 / LPK;       // keys per warp and round
  constexpr int NGRP = kWarps * KPW;  // lane groups per CTA
  constexpr int U = 4;                // rounds per iteration
  KVD_DYNAMIC_SMEM(smem);
  const int split = blockIdx.x, seg = blockIdx.y;
  const int b = seg / a.Hkv, h = seg % a.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kg = lane / LPK, sub = lane % LPK, grp = warp * KPW + kg;
  const int64_t len = a.len[seg], row0 = a.start[seg];
  const int64_t lo = static_cast<int64_t>(split) * chunk;
  const int64_t hi = len < lo + chunk ? len : lo + chunk;
  const int64_t qp = a.window > 0 ? a.qpos[b] : 0;

  float q[G][8], acc[G][8], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    load8(a.q + (static_cast<int64_t>(b) * a.H + h * G + g) * HD + sub * 8, q[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f, q[g][i] *= a.scale;
  }

  // Every lane of a warp runs the same iterations (the shuffles need all 32); lanes past `hi` read a held row.
  for (int64_t base = lo + warp * KPW; base < hi; base += NGRP * U) {
    float kf[U][8], vf[U][8];
    bool vis[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + u * NGRP + kg;
      const bool in = j < hi;
      const int64_t r = row0 + (in ? j : lo);
      vis[u] = in && (a.window <= 0 || qp - a.kpos[r] < a.window);
      load8(a.k + r * HD + sub * 8, kf[u]);
      load8(a.v + r * HD + sub * 8, vf[u]);
    }
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d += q[g][i] * kf[u][i];
#pragma unroll
        for (int off = LPK / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xFFFFFFFFu, d, off);
        s[u][g] = d;
      }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = vis[u] && s[u][g] > mx ? s[u][g] : mx;
      if (mx == -INFINITY) continue;  // nothing visible yet
      const float corr = ex(m[g] - mx);  // m = -inf: 0
      l[g] *= corr;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!vis[u]) continue;
        const float p = ex(s[u][g] - mx);
        l[g] += p;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] += p * vf[u][i];
      }
      m[g] = mx;
    }
  }

  // Merge the lane groups of the CTA: (max, sum) and the output slice of every group to shared memory, then
  // each thread merges whole (head, dim) columns in group order.
  float* s_ml = reinterpret_cast<float*>(smem);  // (NGRP, G, 2)
  float* s_o = s_ml + NGRP * G * 2;              // (NGRP, G, HD)
#pragma unroll
  for (int g = 0; g < G; ++g) {
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

// grid (B · H), kMergeGroups · HD threads: merges the splits of one (request, query head). Group g merges splits
// g, g + kMergeGroups, ... in order (the loads of the groups are in flight together), then group 0 merges the
// groups' results in group order: a fixed order, so the result is deterministic.
constexpr int kMergeGroups = 4;
template <int HD>
__global__ void __launch_bounds__(kMergeGroups * HD) merge_kernel(const kvd::kernels::DecodeAttentionArgs a) {
  KVD_DYNAMIC_SMEM(smem);
  float* s_ml = reinterpret_cast<float*>(smem);  // (kMergeGroups, 2): max, sum
  float* s_o = s_ml + 2 * kMergeGroups;          // (kMergeGroups, HD)
  const int64_t row = blockIdx.x, BH = static_cast<int64_t>(a.B) * a.H;
  const int grp = threadIdx.x / HD, d = threadIdx.x % HD;
  float M = -INFINITY;
  for (int s = grp; s < a.splits; s += kMergeGroups) {
    const float ms = a.part_ml[(s * BH + row) * 2];
    M = ms > M ? ms : M;
  }
  float L = 0.f, O = 0.f;
  if (M > -INFINITY) {
    for (int s = grp; s < a.splits; s += kMergeGroups) {
      const float ms = a.part_ml[(s * BH + row) * 2];
      if (ms == -INFINITY) continue;
      const float w = ex(ms - M);
      L += w * a.part_ml[(s * BH + row) * 2 + 1];
      O += w * a.part_o[(s * BH + row) * HD + d];
    }
  }
  if (d == 0) {
    s_ml[grp * 2] = M;
    s_ml[grp * 2 + 1] = L;
  }
  s_o[grp * HD + d] = O;
  __syncthreads();
  if (grp != 0) return;
  float MM = -INFINITY;
  for (int g = 0; g < kMergeGroups; ++g) MM = s_ml[g * 2] > MM ? s_ml[g * 2] : MM;
  float LL = 0.f, OO = 0.f;
  if (MM > -INFINITY)
    for (int g = 0; g < kMergeGroups; ++g) {
      if (s_ml[g * 2] == -INFINITY) continue;
      const float w = ex(s_ml[g * 2] - MM);
      LL += w * s_ml[g * 2 + 1];
      OO += w * s_o[g * HD + d];
    }
  a.out[row * HD + d] = to_bf16(LL > 0.f ? OO / LL : 0.f);
}

template <int HD, int G>
void launch_g(const kvd::kernels::DecodeAttentionArgs& a, int64_t chunk, cudaStream_t stream) {
  constexpr int NGRP = kWarps * (32 / (HD / 8));
  const size_t smem = static_cast<size_t>(NGRP) * G * (HD + 2) * sizeof(float);
  auto* kernel = split_kernel<HD, G>;
  KVD_LAUNCH(kernel, dim3(a.splits, a.B * a.Hkv), dim3(kThreads), smem, stream, a, chunk);
  const size_t merge_smem = (2 + HD) * kMergeGroups * sizeof(float);
  KVD_LAUNCH(merge_kernel<HD>, dim3(a.B * a.H), dim3(kMergeGroups * HD), merge_smem, stream, a);
}

template <int HD>
void launch(const kvd::kernels::DecodeAttentionArgs& a, int64_t chunk, cudaStream_t stream) {
  switch (a.H / a.Hkv) {
    case 1: return launch_g<HD, 1>(a, chunk, stream);
    case 2: return launch_g<HD, 2>(a, chunk, stream);
    case 3: return launch_g<HD, 3>(a, chunk, stream);
    case 4: return launch_g<HD, 4>(a, chunk, stream);
    case 5: return launch_g<HD, 5>(a, chunk, stream);
    case 6: return launch_g<HD, 6>(a, chunk, stream);
    case 7: return launch_g<HD, 7>(a, chunk, stream);
    default: return launch_g<HD, 8>(a, chunk, stream);
  }
}

}  // namespace

int decode_attention_splits(int segments, int64_t max_len) {
  // About 8 CTAs per SM of an H100 / H200 (132 SMs): a CTA holds few loads in flight, so bandwidth needs many of
  // them; with ragged heads the splits are sized by the longest, and short heads leave theirs idle. At most 128
  // per segment: past that the merge costs more than the extra CTAs gain (H200, SmolLM2 at batch 1 and 32K: 352
  // splits 0.053 ms, 128 splits 0.034 ms; bench/RESULTS.md, 2026-12-05).
  const int64_t want = (1056 + segments - 1) / (segments > 0 ? segments : 1);
  const int64_t most = (max_len + 63) / 64;
  int64_t s = want < most ? want : most;
  s = s < 128 ? s : 128;
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
