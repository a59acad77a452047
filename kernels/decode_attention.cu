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

// 8 bf16 of a raw 16-byte load to fp32.
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = bits_to_float(w[i] << 16);
    f[2 * i + 1] = bits_to_float(w[i] & 0xFFFF0000u);
  }
}

// 8 consecutive bf16 (one 16-byte load) to fp32.
__device__ __forceinline__ void load8(const uint16_t* p, float (&f)[8]) {
  unpack8(*reinterpret_cast<const uint4*>(p), f);
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

// The work split (see decode_attention.cuh). The segments' entries are taken end to end in segment order, E of
// them in all; CTA x of C = splits · S takes entries [x · E / C, (x + 1) · E / C) (integer division), so every CTA
// gets the same number of rows (±1) however ragged the segments are. Where a CTA's range crosses segments it makes
// one piece per segment, and piece (x, s) is stored at slot x + s: two non-empty pieces never share a slot (a later
// CTA cannot reach back into an earlier segment), so C + S slots hold them all. Every CTA of both kernels derives
// this from `len` itself, so nothing is stored between them and one launch shape serves every decode step.
// Thread t of the CTA owns segments [t · per, (t + 1) · per).
__device__ __forceinline__ int64_t range_lo(int64_t x, int64_t E, int64_t C) { return x * E / C; }
// The CTA whose range holds entry e < E: the last x with range_lo(x) <= e.
__device__ __forceinline__ int64_t cta_of(int64_t e, int64_t E, int64_t C) { return ((e + 1) * C + E - 1) / E - 1; }

struct Where {
  int64_t total;  // E: entries of all segments
  int64_t cum;    // entries of the segments before the one asked about
};

// E, and the first segment with an entry at or after `from` together with its offset (CTA-uniform). *seg = S when
// there is none.
template <int NT>
__device__ Where find_segment(const kvd::kernels::DecodeAttentionArgs& a, int64_t from_x, int64_t C, int* seg,
                              int64_t* scratch) {
  const int S = a.B * a.Hkv, per = (S + NT - 1) / NT;
  const int s0 = min(static_cast<int>(threadIdx.x) * per, S), s1 = min(s0 + per, S);
  int64_t mine = 0;
  for (int s = s0; s < s1; ++s) mine += a.len[s];
  const int64_t total = block_sum64<NT>(mine, scratch);
  int64_t at = block_exclusive64<NT>(mine, scratch);
  const int64_t from = range_lo(from_x, total, C);
  int64_t* found = scratch + NT / 32;  // (2): segment, its offset
  if (threadIdx.x == 0) found[0] = S, found[1] = total;
  __syncthreads();
  if (from >= at && from < at + mine)
    for (int s = s0; s < s1; ++s) {
      if (from < at + a.len[s]) {
        found[0] = s, found[1] = at;
        break;
      }
      at += a.len[s];
    }
  __syncthreads();
  *seg = static_cast<int>(found[0]);
  const Where w{total, found[1]};
  __syncthreads();
  return w;
}

// E and the entries of the segments before `seg`.
template <int NT>
__device__ Where segment_offset(const kvd::kernels::DecodeAttentionArgs& a, int seg, int64_t* scratch) {
  const int S = a.B * a.Hkv, per = (S + NT - 1) / NT;
  const int s0 = min(static_cast<int>(threadIdx.x) * per, S), s1 = min(s0 + per, S);
  int64_t mine = 0, before = 0;
  for (int s = s0; s < s1; ++s) {
    mine += a.len[s];
    before += s < seg ? a.len[s] : 0;
  }
  const int64_t total = block_sum64<NT>(mine, scratch);
  return Where{total, block_sum64<NT>(before, scratch)};
}

// CTAs per SM the registers are bounded for: 4 up to a group of 4 query heads (Llama-3, Mistral: 166 registers a
// thread unbounded, 3 CTAs per SM; 128 with 92 bytes spilled; smaller groups fit 128 without spilling); larger groups
// would spill hundreds of bytes, so they stay unbounded.
template <int G>
constexpr int split_min_ctas() { return G <= 4 ? 4 : 1; }

// 1-D grid of C = splits · S CTAs; kThreads threads. See decode_attention.cuh. Each lane group loads U keys (K and
// V rows, kept as raw bf16 until used: registers bound the CTAs per SM) before using any, so that enough loads are
// in flight to keep HBM busy.
template <int HD, int G>
__global__ void __launch_bounds__(kThreads, split_min_ctas<G>()) split_kernel(const kvd::kernels::DecodeAttentionArgs a) {
  constexpr int LPK = HD / 8;         // lanes per key row
  constexpr int KPW = 32 / LPK;       // keys per warp and round
  constexpr int NGRP = kWarps * KPW;  // lane groups per CTA
  constexpr int U = 4;                // rounds per iteration
  KVD_DYNAMIC_SMEM(smem);
  int64_t* scratch = reinterpret_cast<int64_t*>(smem);  // (kWarps + 2), ahead of the CTA's own merge arrays below
  float* s_ml = reinterpret_cast<float*>(smem) + kScratchFloats;  // (NGRP, G, 2)
  float* s_o = s_ml + NGRP * G * 2;                                // (NGRP, G, HD)
  const int S = a.B * a.Hkv;
  const int64_t C = static_cast<int64_t>(a.splits) * S, x = blockIdx.x;
  int seg;
  const Where wh = find_segment<kThreads>(a, x, C, &seg, scratch);
  const int64_t E = wh.total;
  const int64_t lo = range_lo(x, E, C), hi = range_lo(x + 1, E, C);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kg = lane / LPK, sub = lane % LPK, grp = warp * KPW + kg;

  // The pieces: the segments that [lo, hi) crosses, in order (CTA-uniform loop).
  for (int64_t cum = wh.cum; lo < hi && seg < S && cum < hi; cum += a.len[seg], ++seg) {
    const int64_t len = a.len[seg];
    const int64_t plo = (lo > cum ? lo : cum) - cum, phi = (hi < cum + len ? hi : cum + len) - cum;
    if (plo >= phi) continue;  // an empty segment
    const int b = seg / a.Hkv, h = seg % a.Hkv;
    const int64_t row0 = a.start[seg];
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

    // Every lane of a warp runs the same iterations (the shuffles need all 32); lanes past `phi` read a held row.
    for (int64_t base = plo + warp * KPW; base < phi; base += NGRP * U) {
      uint4 kr[U], vr[U];
      bool vis[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = base + u * NGRP + kg;
        const bool in = j < phi;
        const int64_t r = row0 + (in ? j : plo);
        vis[u] = in && (a.window <= 0 || qp - a.kpos[r] < a.window) && (a.holes == 0 || a.kpos[r] >= 0);
        kr[u] = *reinterpret_cast<const uint4*>(a.k + r * HD + sub * 8);
        vr[u] = *reinterpret_cast<const uint4*>(a.v + r * HD + sub * 8);
      }
      float s[U][G];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kf[8];
        unpack8(kr[u], kf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float d = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) d += q[g][i] * kf[i];
#pragma unroll
          for (int off = LPK / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xFFFFFFFFu, d, off);
          s[u][g] = d;
        }
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
        m[g] = mx;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!vis[u]) continue;
        float vf[8];
        unpack8(vr[u], vf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (m[g] == -INFINITY) continue;
          const float p = ex(s[u][g] - m[g]);
          l[g] += p;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] += p * vf[i];
        }
      }
    }

    // Merge the lane groups of the CTA: (max, sum) and the output slice of every group to shared memory, then
    // each thread merges whole (head, dim) columns in group order, into the piece's slot x + seg.
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
      const int64_t row = (x + seg) * G + g;  // partials: (slot, head of the group)
      a.part_o[row * HD + d] = O;
      if (d == 0) {
        a.part_ml[row * 2] = M;
        a.part_ml[row * 2 + 1] = L;
      }
    }
    __syncthreads();  // s_ml / s_o are written again by the next piece
  }
}

// grid (B · H), kMergeThreads threads: merges the pieces of one (request, query head), those of the CTAs whose
// ranges cross its segment. Group grp (HD threads, one per output dim) merges pieces grp, grp + groups, ... in order,
// kBatch at a time with their loads in flight together and a running (max, sum, output) rescaled as the max grows;
// then group 0 merges the groups' results in group order: a fixed order, so the result is deterministic. When every
// CTA has entries (E >= C, the usual case) piece c is CTA x0 + c with no division to find it.
constexpr int kMergeThreads = 512;
constexpr int kBatch = 4;
template <int HD, int G>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const kvd::kernels::DecodeAttentionArgs a) {
  constexpr int kGroups = kMergeThreads / HD;
  KVD_DYNAMIC_SMEM(smem);
  int64_t* scratch = reinterpret_cast<int64_t*>(smem);            // (kMergeThreads / 32 + 2)
  float* s_ml = reinterpret_cast<float*>(smem) + kScratchFloats;  // (kGroups, 2): max, sum
  float* s_o = s_ml + 2 * kGroups;                                // (kGroups, HD)
  const int64_t row = blockIdx.x;  // b · H + q = segment · G + g
  const int seg = static_cast<int>(row / G), g = static_cast<int>(row % G);
  const int64_t C = static_cast<int64_t>(a.splits) * a.B * a.Hkv;
  const Where wh = segment_offset<kMergeThreads>(a, seg, scratch);
  const int64_t len = a.len[seg], E = wh.total;
  // The CTAs holding the segment's first and last entries, and every one between (skipping empty ranges).
  const int64_t x0 = len > 0 ? cta_of(wh.cum, E, C) : 0, count = len > 0 ? cta_of(wh.cum + len - 1, E, C) - x0 + 1 : 0;
  const bool none_empty = E >= C;
  const int grp = threadIdx.x / HD, d = threadIdx.x % HD;
  float M = -INFINITY, L = 0.f, O = 0.f;
  for (int64_t c0 = grp; c0 < count; c0 += kGroups * kBatch) {
    float ms[kBatch], ls[kBatch], os[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + u * kGroups, x = x0 + c;
      const bool ok = c < count && (none_empty || range_lo(x, E, C) < range_lo(x + 1, E, C));
      const int64_t r = (x + seg) * G + g;
      ms[u] = ok ? a.part_ml[r * 2] : -INFINITY;
      ls[u] = ok ? a.part_ml[r * 2 + 1] : 0.f;
      os[u] = ok ? a.part_o[r * HD + d] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (ms[u] == -INFINITY) continue;
      if (ms[u] > M) {
        const float w = ex(M - ms[u]);  // M = -inf: 0
        L *= w;
        O *= w;
        M = ms[u];
      }
      const float w = ex(ms[u] - M);
      L += w * ls[u];
      O += w * os[u];
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
  for (int t = 0; t < kGroups; ++t) MM = s_ml[t * 2] > MM ? s_ml[t * 2] : MM;
  float LL = 0.f, OO = 0.f;
  if (MM > -INFINITY)
    for (int t = 0; t < kGroups; ++t) {
      if (s_ml[t * 2] == -INFINITY) continue;
      const float w = ex(s_ml[t * 2] - MM);
      LL += w * s_ml[t * 2 + 1];
      OO += w * s_o[t * HD + d];
    }
  a.out[row * HD + d] = to_bf16(LL > 0.f ? OO / LL : 0.f);
}

template <int HD, int G>
constexpr size_t split_smem() {
  return (kScratchFloats + static_cast<size_t>(kWarps * (32 / (HD / 8))) * G * (HD + 2)) * sizeof(float);
}

template <int HD, int G>
void launch_g(const kvd::kernels::DecodeAttentionArgs& a, cudaStream_t stream) {
  auto* kernel = split_kernel<HD, G>;
  const int64_t ctas = static_cast<int64_t>(a.splits) * a.B * a.Hkv;
  constexpr size_t smem = split_smem<HD, G>();
  KVD_LAUNCH(kernel, dim3(static_cast<unsigned>(ctas)), dim3(kThreads), smem, stream, a);
  const size_t merge_smem = (kScratchFloats + (2 + HD) * (kMergeThreads / HD)) * sizeof(float);
  auto* merge = merge_kernel<HD, G>;
  KVD_LAUNCH(merge, dim3(a.B * a.H), dim3(kMergeThreads), merge_smem, stream, a);
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

// CTAs of split_kernel<HD, G> resident at once on the current device (SMs × CTAs per SM); the emulator stands for
// an H100's 132 SMs at 4 per SM.
template <int HD, int G>
int resident_ctas() {
#ifdef KVD_SIMT_EMULATION
  return 132 * 4;
#else
  static int cached[16] = {};  // per device; 0: not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 132 * 4;
  if (dev < 16 && cached[dev] > 0) return cached[dev];
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, split_kernel<HD, G>, kThreads, split_smem<HD, G>()) !=
          cudaSuccess ||
      sms <= 0 || per_sm <= 0) {
    cudaGetLastError();  // clear it: the launch reports its own errors
    return 132 * 4;
  }
  if (dev < 16) cached[dev] = sms * per_sm;
  return sms * per_sm;
#endif
}

template <int HD>
int resident_ctas_g(int G) {
  switch (G) {
    case 1: return resident_ctas<HD, 1>();
    case 2: return resident_ctas<HD, 2>();
    case 3: return resident_ctas<HD, 3>();
    case 4: return resident_ctas<HD, 4>();
    case 5: return resident_ctas<HD, 5>();
    case 6: return resident_ctas<HD, 6>();
    case 7: return resident_ctas<HD, 7>();
    default: return resident_ctas<HD, 8>();
  }
}

}  // namespace

int decode_attention_splits(int segments, int64_t max_len, int hd, int group) {
  // Every CTA gets the same number of entries, so one wave of exactly the CTAs the device holds at once finishes
  // together: splits = resident CTAs / segments (the largest multiple of the segments that fits in one wave). No
  // fewer than 64 entries per CTA on average (max_len / 64 splits at most), at most 128 pieces for a head to merge
  // (at batch 1 past that the merge costs more than the extra CTAs gain), and at least 1.
  const int resident = hd == 64 ? resident_ctas_g<64>(group) : resident_ctas_g<128>(group);
  int64_t want = resident / (segments > 0 ? segments : 1);
  want = want < 128 ? want : 128;
  const int64_t most = (max_len + 63) / 64;
  const int64_t s = want < most ? want : most;
  return static_cast<int>(s < 1 ? 1 : s);
}

cudaError_t decode_attention(const kvd::kernels::DecodeAttentionArgs& a, cudaStream_t stream) {
  if ((a.hd != 64 && a.hd != 128) || a.B <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0 || a.H / a.Hkv > kMaxG ||
      a.splits < 1 || a.max_len < 0 || a.B * a.Hkv > 65535 ||
      static_cast<int64_t>(a.splits) * a.B * a.Hkv > (int64_t{1} << 24))
    return cudaErrorInvalidValue;
  if (a.hd == 64)
    launch<64>(a, stream);
  else
    launch<128>(a, stream);
  return KVD_LAST_ERROR();
}

}  // namespace KVD_DA_NAMESPACE
