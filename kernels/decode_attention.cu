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
constexpr int kScratchFloats = 2 * (512 / 32 + 4);  // the split search's int64 scratch, ahead of each kernel's arrays

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

// 64-bit warp shuffles from two 32-bit ones.
__device__ __forceinline__ int64_t shfl_xor64(int64_t v, int mask) {
  const int lo = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(static_cast<uint64_t>(v) & 0xFFFFFFFFu), mask);
  const int hi = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(static_cast<uint64_t>(v) >> 32), mask);
  return static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo));
}
__device__ __forceinline__ int64_t shfl_up64(int64_t v, int delta) {
  const int lo = __shfl_up_sync(0xFFFFFFFFu, static_cast<int>(static_cast<uint64_t>(v) & 0xFFFFFFFFu), delta);
  const int hi = __shfl_up_sync(0xFFFFFFFFu, static_cast<int>(static_cast<uint64_t>(v) >> 32), delta);
  return static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo));
}

// Sum of v over the CTA's NT threads (every thread gets it); scratch holds NT / 32 values. Two barriers.
template <int NT>
__device__ __forceinline__ int64_t block_sum64(int64_t v, int64_t* scratch) {
  for (int off = 16; off > 0; off /= 2) v += shfl_xor64(v, off);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  int64_t total = 0;
  for (int w = 0; w < NT / 32; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Exclusive prefix of v over the CTA's NT threads in thread order. Two barriers.
template <int NT>
__device__ __forceinline__ int64_t block_exclusive64(int64_t v, int64_t* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t x = v;
  for (int d = 1; d < 32; d *= 2) {
    const int64_t y = shfl_up64(x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  int64_t before = 0;
  for (int w = 0; w < warp; ++w) before += scratch[w];
  __syncthreads();
  return before + x - v;
}

// The work split (see decode_attention.cuh): chunk = ceil(Σ len / (splits · S)) rows, and segment s gets
// ceil(len[s] / chunk) consecutive chunk ids, in segment order. Every CTA of both kernels computes the same split
// from `len`, so nothing is stored between them. Thread t of the CTA owns segments [t · per, (t + 1) · per).
struct Split {
  int64_t chunk;  // rows per chunk
  int64_t first;  // the first chunk id of the segment (split_of: the one asked about; split_find: the chunk's)
  int64_t count;  // chunks of that segment
};
__device__ __forceinline__ int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <int NT>
__device__ __forceinline__ int64_t split_chunk(const kvd::kernels::DecodeAttentionArgs& a, int S, int s0, int s1,
                                               int64_t* scratch) {
  int64_t rows = 0;
  for (int s = s0; s < s1; ++s) rows += a.len[s];
  const int64_t all = block_sum64<NT>(rows, scratch);
  const int64_t c = ceil_div(all, static_cast<int64_t>(a.splits) * S);
  return c > 0 ? c : 1;
}

// Which segment chunk id x belongs to (x >= total: none, *seg = -1), and where that segment's chunks start.
template <int NT>
__device__ Split split_find(const kvd::kernels::DecodeAttentionArgs& a, int64_t x, int* seg, int64_t* scratch) {
  const int S = a.B * a.Hkv, per = (S + NT - 1) / NT;
  const int s0 = min(static_cast<int>(threadIdx.x) * per, S), s1 = min(s0 + per, S);
  Split r;
  r.chunk = split_chunk<NT>(a, S, s0, s1, scratch);
  int64_t mine = 0;
  for (int s = s0; s < s1; ++s) mine += ceil_div(a.len[s], r.chunk);
  int64_t at = block_exclusive64<NT>(mine, scratch);
  int64_t* found = scratch + NT / 32;  // (3): segment, first, count
  if (threadIdx.x == 0) found[0] = -1;
  __syncthreads();
  if (x >= at && x < at + mine)
    for (int s = s0; s < s1; ++s) {
      const int64_t c = ceil_div(a.len[s], r.chunk);
      if (x < at + c) {
        found[0] = s, found[1] = at, found[2] = c;
        break;
      }
      at += c;
    }
  __syncthreads();
  *seg = static_cast<int>(found[0]);
  r.first = found[1];
  r.count = found[2];
  __syncthreads();
  return r;
}

// Where segment `seg`'s chunk ids start, and how many it has.
template <int NT>
__device__ Split split_of(const kvd::kernels::DecodeAttentionArgs& a, int seg, int64_t* scratch) {
  const int S = a.B * a.Hkv, per = (S + NT - 1) / NT;
  const int s0 = min(static_cast<int>(threadIdx.x) * per, S), s1 = min(s0 + per, S);
  Split r;
  r.chunk = split_chunk<NT>(a, S, s0, s1, scratch);
  int64_t before = 0;
  for (int s = s0; s < min(s1, seg); ++s) before += ceil_div(a.len[s], r.chunk);
  r.first = block_sum64<NT>(before, scratch);
  r.count = ceil_div(a.len[seg], r.chunk);
  return r;
}

// 1-D grid of (splits + 1) · S CTAs (a bound on the chunk ids in use); kThreads threads. See decode_attention.cuh.
// Each lane group loads U keys (K and V rows) before using any, so that enough loads are in flight to keep HBM
// busy.
template <int HD, int G>
__global__ void __launch_bounds__(kThreads) split_kernel(const kvd::kernels::DecodeAttentionArgs a) {
  constexpr int LPK = HD / 8;         // lanes per key row
  constexpr int KPW = 32 / LPK;       // keys per warp and round
  constexpr int NGRP = kWarps * KPW;  // lane groups per CTA
  constexpr int U = 4;                // rounds per iteration
  KVD_DYNAMIC_SMEM(smem);
  int64_t* scratch = reinterpret_cast<int64_t*>(smem);  // (kWarps + 3), ahead of the CTA's own merge arrays below
  int seg;
  const int64_t x = blockIdx.x;
  const Split sp = split_find<kThreads>(a, x, &seg, scratch);
  if (seg < 0) return;  // past the chunks in use: the merge reads none of this id
  const int b = seg / a.Hkv, h = seg % a.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kg = lane / LPK, sub = lane % LPK, grp = warp * KPW + kg;
  const int64_t len = a.len[seg], row0 = a.start[seg];
  const int64_t lo = (x - sp.first) * sp.chunk;
  const int64_t hi = len < lo + sp.chunk ? len : lo + sp.chunk;
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
      vis[u] = in && (a.window <= 0 || qp - a.kpos[r] < a.window) && (a.holes == 0 || a.kpos[r] >= 0);
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
  float* s_ml = reinterpret_cast<float*>(smem) + kScratchFloats;  // (NGRP, G, 2)
  float* s_o = s_ml + NGRP * G * 2;                                // (NGRP, G, HD)
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
    const int64_t row = x * G + g;  // partials: (chunk id, head of the group)
    a.part_o[row * HD + d] = O;
    if (d == 0) {
      a.part_ml[row * 2] = M;
      a.part_ml[row * 2 + 1] = L;
    }
  }
}

// grid (B · H), kMergeGroups · HD threads: merges the chunks of one (request, query head). Group g merges the
// segment's chunks g, g + kMergeGroups, ... in order (the loads of the groups are in flight together), then group 0
// merges the groups' results in group order: a fixed order, so the result is deterministic.
constexpr int kMergeGroups = 4;
template <int HD, int G>
__global__ void __launch_bounds__(kMergeGroups * HD) merge_kernel(const kvd::kernels::DecodeAttentionArgs a) {
  constexpr int NT = kMergeGroups * HD;
  KVD_DYNAMIC_SMEM(smem);
  int64_t* scratch = reinterpret_cast<int64_t*>(smem);            // (NT / 32 + 3)
  float* s_ml = reinterpret_cast<float*>(smem) + kScratchFloats;  // (kMergeGroups, 2): max, sum
  float* s_o = s_ml + 2 * kMergeGroups;                           // (kMergeGroups, HD)
  const int64_t row = blockIdx.x;  // b · H + q = segment · G + g
  const int seg = static_cast<int>(row / G), g = static_cast<int>(row % G);
  const Split sp = split_of<NT>(a, seg, scratch);
  const int grp = threadIdx.x / HD, d = threadIdx.x % HD;
  float M = -INFINITY;
  for (int64_t c = grp; c < sp.count; c += kMergeGroups) {
    const float ms = a.part_ml[((sp.first + c) * G + g) * 2];
    M = ms > M ? ms : M;
  }
  float L = 0.f, O = 0.f;
  if (M > -INFINITY) {
    for (int64_t c = grp; c < sp.count; c += kMergeGroups) {
      const int64_t r = (sp.first + c) * G + g;
      const float ms = a.part_ml[r * 2];
      if (ms == -INFINITY) continue;
      const float w = ex(ms - M);
      L += w * a.part_ml[r * 2 + 1];
      O += w * a.part_o[r * HD + d];
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
void launch_g(const kvd::kernels::DecodeAttentionArgs& a, cudaStream_t stream) {
  constexpr int NGRP = kWarps * (32 / (HD / 8));
  const size_t smem = (kScratchFloats + static_cast<size_t>(NGRP) * G * (HD + 2)) * sizeof(float);
  auto* kernel = split_kernel<HD, G>;
  const int64_t ctas = (static_cast<int64_t>(a.splits) + 1) * a.B * a.Hkv;
  KVD_LAUNCH(kernel, dim3(static_cast<unsigned>(ctas)), dim3(kThreads), smem, stream, a);
  const size_t merge_smem = (kScratchFloats + (2 + HD) * kMergeGroups) * sizeof(float);
  auto* merge = merge_kernel<HD, G>;
  KVD_LAUNCH(merge, dim3(a.B * a.H), dim3(kMergeGroups * HD), merge_smem, stream, a);
}

template <int HD>
void launch(const kvd::kernels::DecodeAttentionArgs& a, cudaStream_t stream) {
  switch (a.H / a.Hkv) {
    case 1: return launch_g<HD, 1>(a, stream);
    case 2: return launch_g<HD, 2>(a, stream);
    case 3: return launch_g<HD, 3>(a, stream);
    case 4: return launch_g<HD, 4>(a, stream);
    case 5: return launch_g<HD, 5>(a, stream);
    case 6: return launch_g<HD, 6>(a, stream);
    case 7: return launch_g<HD, 7>(a, stream);
    default: return launch_g<HD, 8>(a, stream);
  }
}

}  // namespace

int decode_attention_splits(int segments, int64_t max_len) {
  // About 8 CTAs per SM of an H100 / H200 (132 SMs): a CTA holds few loads in flight, so bandwidth needs many of
  // them (the chunks follow the entries, so a ragged cache gets as many as a uniform one). At most 128 per segment:
  // past that the merge costs more than the extra CTAs gain (H200, SmolLM2 at batch 1 and 32K: 352 splits
  // 0.053 ms, 128 splits 0.034 ms; bench/RESULTS.md, 2026-12-05).
  const int64_t want = (1056 + segments - 1) / (segments > 0 ? segments : 1);
  const int64_t most = (max_len + 63) / 64;
  int64_t s = want < most ? want : most;
  s = s < 128 ? s : 128;
  return static_cast<int>(s < 1 ? 1 : s);
}

cudaError_t decode_attention(const kvd::kernels::DecodeAttentionArgs& a, cudaStream_t stream) {
  if ((a.hd != 64 && a.hd != 128) || a.B <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0 || a.H / a.Hkv > kMaxG ||
      a.splits < 1 || a.max_len < 0 || a.B * a.Hkv > 65535 ||
      (static_cast<int64_t>(a.splits) + 1) * a.B * a.Hkv > 0x7FFFFFFF)
    return cudaErrorInvalidValue;
  if (a.hd == 64)
    launch<64>(a, stream);
  else
    launch<128>(a, stream);
  return KVD_LAST_ERROR();
}

}  // namespace KVD_DA_NAMESPACE
