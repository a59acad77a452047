// See kv_select.cuh.
#include "kernels/kv_select.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

// KVD_SIMT_EMULATION: compiled as host C++ against tests/kernels/simt_emulator.h for CPU tests (see
// kernels/retention_attention.cu); the launchers then live in kvd::kernels::emulated.
#ifdef KVD_SIMT_EMULATION
#include <cmath>

#include "tests/kernels/simt_emulator.h"
#define KVD_KS_NAMESPACE kvd::kernels::emulated
#else
#define KVD_KS_NAMESPACE kvd::kernels
#include "kernels/smem_limit.cuh"  // raise_smem_limit
#define KVD_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define KVD_LAST_ERROR() cudaGetLastError()
#endif

namespace KVD_KS_NAMESPACE {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Retention score: a CTA of kScoreThreads scores kTok rows. Each thread owns UPT gate units g = tid + u · 256 and
// accumulates W1 x for the kTok rows over chunks of kChunk input features staged in shared memory (W1 is read
// transposed, coalesced across threads). The silu outputs go to shared memory; then each warp reduces (row, head)
// pairs over g with a fixed shuffle tree (deterministic).
constexpr int kScoreThreads = 256;
constexpr int kTok = 16;
constexpr int kChunk = 64;

__device__ __forceinline__ float to_float(float v) { return v; }
#ifdef KVD_SIMT_EMULATION
inline float to_float(__nv_bfloat16 v) {
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return kvd_sim::bf16_bits_to_float(h);
}
inline float to_float(__half v) {
  uint16_t h;
  std::memcpy(&h, &v, 2);
  const uint32_t sign = (h >> 15) & 1u, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  float f = e == 0 ? std::ldexp(static_cast<float>(m), -24)
                   : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(static_cast<float>(m | 0x400u), static_cast<int>(e) - 25);
  return sign ? -f : f;
}
inline float expf_(float x) { return std::exp(x); }
inline float log1pf_(float x) { return std::log1p(x); }
#else
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float expf_(float x) { return expf(x); }
__device__ __forceinline__ float log1pf_(float x) { return log1pf(x); }
#endif

template <typename T, int UPT>
__global__ void __launch_bounds__(kScoreThreads)
    score_kernel(const T* __restrict__ x, int64_t rows, int64_t n, RetentionGateDevice gate,
                 const int64_t* __restrict__ positions, int64_t pos_b_stride, int64_t next_position,
                 float* __restrict__ out) {
  KVD_DYNAMIC_SMEM(smem);
  const int D = gate.D, G = gate.G, H = gate.H;
  float* xs = reinterpret_cast<float*>(smem);  // (kChunk, kTok): feature-major, a row's 16 values contiguous
  float* hs = xs + kChunk * kTok;              // (kTok, G + 1)
  const int tid = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTok;
  float acc[UPT][kTok];
  for (int u = 0; u < UPT; ++u) {
    const int g = tid + u * kScoreThreads;
    const float b = g < G ? gate.b1[g] : 0.f;
    for (int t = 0; t < kTok; ++t) acc[u][t] = b;
  }
  for (int d0 = 0; d0 < D; d0 += kChunk) {
    const int dn = min(kChunk, D - d0);
    __syncthreads();
    for (int e = tid; e < kChunk * kTok; e += kScoreThreads) {
      const int t = e / kChunk, dd = e % kChunk;  // consecutive threads read consecutive features of one row
      const int64_t r = r0 + t;
      xs[dd * kTok + t] = (r < rows && dd < dn) ? to_float(x[r * D + d0 + dd]) : 0.f;
    }
    __syncthreads();
    for (int dd = 0; dd < dn; ++dd) {
      const float* xv = xs + dd * kTok;
      for (int u = 0; u < UPT; ++u) {
        const int g = tid + u * kScoreThreads;
        const float w = g < G ? gate.w1t[static_cast<int64_t>(d0 + dd) * G + g] : 0.f;
        for (int t = 0; t < kTok; ++t) acc[u][t] += w * xv[t];
      }
    }
  }
  for (int u = 0; u < UPT; ++u) {
    const int g = tid + u * kScoreThreads;
    if (g < G)
      for (int t = 0; t < kTok; ++t) hs[t * (G + 1) + g] = acc[u][t] / (1.f + expf_(-acc[u][t]));  // silu
  }
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32;
  for (int p = warp; p < kTok * H; p += kScoreThreads / 32) {
    const int t = p / H, h = p % H;
    const int64_t r = r0 + t;
    float z = 0.f;
    for (int g = lane; g < G; g += 32) z += gate.w2[static_cast<int64_t>(h) * G + g] * hs[t * (G + 1) + g];
    for (int m = 16; m > 0; m >>= 1) z += __shfl_xor_sync(0xffffffffu, z, m);
    if (lane == 0 && r < rows) {
      z += gate.bias[h];
      const float ls = z < 0.f ? z - log1pf_(expf_(z)) : -log1pf_(expf_(-z));  // log_sigmoid
      const int64_t b = r / n, i = r % n;
      float v = ls;
      if (positions) v *= static_cast<float>(next_position + 1 - positions[b * pos_b_stride + i]);
      out[(b * H + h) * n + i] = v;
    }
  }
}

template <typename T, int UPT>
cudaError_t launch_score_upt(const T* x, int64_t rows, int64_t n, const RetentionGateDevice& g, const int64_t* pos,
                             int64_t pos_stride, int64_t next, float* out, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kChunk * kTok + static_cast<size_t>(kTok) * (g.G + 1));
  const int grid = static_cast<int>((rows + kTok - 1) / kTok);
  auto* kernel = &score_kernel<T, UPT>;
#ifndef KVD_SIMT_EMULATION
  if (const cudaError_t e = raise_smem_limit(kernel, smem); e != cudaSuccess) return e;
#endif
  KVD_LAUNCH(kernel, grid, kScoreThreads, smem, stream, x, rows, n, g, pos, pos_stride, next, out);
  return KVD_LAST_ERROR();
}

template <typename T>
cudaError_t launch_score(const T* x, int64_t rows, int64_t n, const RetentionGateDevice& g, const int64_t* pos,
                         int64_t pos_stride, int64_t next, float* out, cudaStream_t stream) {
  switch ((g.G + kScoreThreads - 1) / kScoreThreads) {  // gate units per thread
    case 1: return launch_score_upt<T, 1>(x, rows, n, g, pos, pos_stride, next, out, stream);
    case 2: return launch_score_upt<T, 2>(x, rows, n, g, pos, pos_stride, next, out, stream);
    case 3: return launch_score_upt<T, 3>(x, rows, n, g, pos, pos_stride, next, out, stream);
    case 4: return launch_score_upt<T, 4>(x, rows, n, g, pos, pos_stride, next, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Selection: one CTA of kSelectThreads per segment. The k-th largest key is found digit by digit from the top (11,
// 11, then 10 bits: three passes). A segment of up to kCachedKeys entries has its keys cached in shared memory, and
// the first pass counts them as they are loaded (kLoadBatch loads in flight per thread); a longer one re-reads its
// scores in every pass. Once the keys that share the prefix found so far number at most kCandidates, the pass that
// counts them also copies them to a candidate buffer, and the passes after it read only that buffer. The final
// pass gives each thread kPerThread consecutive entries and places them with two block-wide exclusive sums (of the
// entries equal to the cut, then of the kept ones).
constexpr int kSelectThreads = 512;
constexpr int kWarps = kSelectThreads / 32;
constexpr int kPerThread = 8;
constexpr int kLoadBatch = 8;
constexpr int kBins = 2048;                 // the widest digit: 11 bits
constexpr int kCandidates = 4096;
constexpr int64_t kCachedKeys = 48 * 1024;  // 192 KB of keys
constexpr int kSelectHeaderInts = kBins + kWarps + 8 + kCandidates;
// Digit p of a key: bits [digit_shift(p), digit_shift(p) + digit_bits(p)).
__host__ __device__ constexpr int digit_shift(int p) { return p == 0 ? 21 : p == 1 ? 10 : 0; }
__host__ __device__ constexpr int digit_bits(int p) { return p == 2 ? 10 : 11; }

__device__ __forceinline__ uint32_t float_bits(float v) {
#ifdef KVD_SIMT_EMULATION
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
#else
  return __float_as_uint(v);
#endif
}

// An order-preserving key: a > b as floats <=> key(a) > key(b); NaN lowest; ±0 equal.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0u;
  if (v == 0.f) return 0x80000000u;
  const uint32_t u = float_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
constexpr uint32_t kProtected = 0xFFFFFFFFu;  // above every number's key (+inf is 0xFF800000)

// Exclusive sum of v over the CTA's threads in thread order; *total = the sum over the CTA. Two barriers.
__device__ __forceinline__ int block_exclusive_sum(int v, int* wsum, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = v;
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) wsum[warp] = x;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    const int c = wsum[w];
    before += w < warp ? c : 0;
    all += c;
  }
  __syncthreads();
  *total = all;
  return before + x - v;
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectArgs a, int64_t cached_capacity) {
  KVD_DYNAMIC_SMEM(smem);
  int* hist = reinterpret_cast<int*>(smem);  // (kBins)
  int* wsum = hist + kBins;                  // (kWarps)
  int* scalar = wsum + kWarps;               // [0] digit, [1] remaining, [2] keys with the new prefix, [3] candidates
  uint32_t* cand = reinterpret_cast<uint32_t*>(scalar + 8);                // (kCandidates)
  uint32_t* keys = reinterpret_cast<uint32_t*>(hist + kSelectHeaderInts);  // (cached_capacity)
  const int s = blockIdx.x, tid = threadIdx.x;
  const int b = s / a.heads, h = s % a.heads;
  const int64_t len = a.lengths ? static_cast<int64_t>(a.lengths[b]) : a.n;
  const float* sc = a.scores + static_cast<int64_t>(s) * a.score_stride;
  int32_t* out = a.indices + b * a.out_b_stride + h * a.out_h_stride;
  const int64_t sinks = a.sinks, recent_from = len - a.recent;
  auto key_of = [&](int64_t i, float v) -> uint32_t {
    return (i < sinks || i >= recent_from) ? kProtected : order_key(v);
  };

  // The threshold key T and how many entries equal to T to take (the lowest indices among them).
  uint32_t T = 0;
  int64_t take_eq = 0, target = INT64_MAX;
  bool keep_all = false, keep_none = false;
  if (a.mode == SelectMode::Threshold) {
    T = order_key(a.threshold);
    take_eq = INT64_MAX;
  } else {
    const int64_t k = a.keeps ? static_cast<int64_t>(a.keeps[s]) : a.keep;
    keep_all = k >= len;
    keep_none = k <= 0;
    target = keep_all ? len : keep_none ? 0 : k;
  }
  const bool search = a.mode == SelectMode::TopK && !keep_all && !keep_none;
  const bool cached = len <= cached_capacity;
  for (int i = tid; i < kBins; i += kSelectThreads) hist[i] = 0;
  if (tid == 0) scalar[3] = 0;
  __syncthreads();
  if (cached) {  // load the keys; the first pass counts them on the way
    for (int64_t c = 0; c < len; c += static_cast<int64_t>(kSelectThreads) * kLoadBatch) {
      float v[kLoadBatch];
      for (int u = 0; u < kLoadBatch; ++u) {
        const int64_t i = c + static_cast<int64_t>(u) * kSelectThreads + tid;
        v[u] = i < len ? sc[i] : 0.f;
      }
      for (int u = 0; u < kLoadBatch; ++u) {
        const int64_t i = c + static_cast<int64_t>(u) * kSelectThreads + tid;
        if (i < len) {
          const uint32_t key = key_of(i, v[u]);
          keys[i] = key;
          if (search) atomicAdd(&hist[key >> digit_shift(0)], 1);
        }
      }
    }
    __syncthreads();
  }
  auto key_at = [&](int64_t i) -> uint32_t { return cached ? keys[i] : key_of(i, sc[i]); };

  if (search) {
    uint32_t prefix = 0, mask = 0;
    int remaining = static_cast<int>(target);
    int64_t sharing = len;  // keys with the prefix found so far
    bool from_cand = false;
    for (int p = 0; p < 3; ++p) {
      const int shift = digit_shift(p), bins = 1 << digit_bits(p);
      if (p > 0 || !cached) {  // (the cached first pass was counted at load)
        const bool gather = !from_cand && sharing <= kCandidates;
        if (p > 0) {
          for (int i = tid; i < kBins; i += kSelectThreads) hist[i] = 0;
          __syncthreads();
        }
        const int64_t m = from_cand ? static_cast<int64_t>(scalar[3]) : len;
        for (int64_t i = tid; i < m; i += kSelectThreads) {
          const uint32_t key = from_cand ? cand[i] : key_at(i);
          if ((key & mask) == prefix) {
            atomicAdd(&hist[(key >> shift) & static_cast<uint32_t>(bins - 1)], 1);
            if (gather) cand[atomicAdd(&scalar[3], 1)] = key;
          }
        }
        __syncthreads();
        from_cand = from_cand || gather;
      }
      // The digit whose bin holds the remaining-th largest key: each thread sums `per` consecutive bins, and the
      // bins above a thread's are those of the threads after it.
      const int per = bins / kSelectThreads;
      int local = 0;
      for (int u = 0; u < per; ++u) local += hist[tid * per + u];
      int total;
      const int before = block_exclusive_sum(local, wsum, &total);
      int above = total - before - local;
      for (int u = per - 1; u >= 0; --u) {
        const int d = tid * per + u, c = hist[d];
        if (above < remaining && remaining <= above + c) {
          scalar[0] = d;
          scalar[1] = remaining - above;
          scalar[2] = c;
        }
        above += c;
      }
      __syncthreads();
      prefix |= static_cast<uint32_t>(scalar[0]) << shift;
      mask |= static_cast<uint32_t>(bins - 1) << shift;
      remaining = scalar[1];
      sharing = scalar[2];
      __syncthreads();
    }
    T = prefix;
    take_eq = remaining;
  }

  // One pass in index order: kept entries are those above T, and the first take_eq equal to T.
  int64_t written = 0, eq_seen = 0;
  const int64_t span = static_cast<int64_t>(kSelectThreads) * kPerThread;
  for (int64_t c = 0; c < len && written < target; c += span) {
    const int64_t i0 = c + static_cast<int64_t>(tid) * kPerThread;
    bool gt[kPerThread], eq[kPerThread];
    int n_gt = 0, n_eq = 0;
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = i0 + u;
      gt[u] = eq[u] = false;
      if (i < len && !keep_none) {
        if (keep_all) {
          gt[u] = true;
        } else {
          const uint32_t key = key_at(i);
          gt[u] = key > T;
          eq[u] = key == T;
        }
      }
      n_gt += gt[u];
      n_eq += eq[u];
    }
    int eq_total, sel_total;
    const int eq_before = block_exclusive_sum(n_eq, wsum, &eq_total);
    int64_t eq_rank = eq_seen + eq_before;  // rank of this thread's first equal entry among all equal entries
    const int64_t eq_taken = take_eq - eq_rank <= 0 ? 0 : (take_eq - eq_rank < n_eq ? take_eq - eq_rank : n_eq);
    const int sel_before = block_exclusive_sum(n_gt + static_cast<int>(eq_taken), wsum, &sel_total);
    int64_t pos = written + sel_before;
    for (int u = 0; u < kPerThread; ++u) {
      const bool take = gt[u] || (eq[u] && eq_rank < take_eq);
      eq_rank += eq[u];
      if (take) out[pos++] = static_cast<int32_t>(i0 + u);
    }
    written += sel_total;
    eq_seen += eq_total;
  }
  if (tid == 0 && a.counts) a.counts[s] = static_cast<int32_t>(written);
}

// ---------------------------------------------------------------------------------------------------------------
// Compaction: grid (segments, column groups, caches); a CTA moves one column group (kColumnBytes of every row) of
// one segment of one cache, kRowsPerThread rows per thread per chunk.
constexpr int kCompactThreads = 256;
constexpr int kColumnBytes = 512;  // whole rows up to 512 bytes per CTA: each row is read in one burst
constexpr int kRowsPerThread = 8;

// Vectors of one row a CTA moves: a column of at most kColumnBytes, at most one vector per thread per row.
template <typename V>
__host__ __device__ inline int64_t column_vectors(int64_t vecs_per_row) {
  int64_t c = static_cast<int64_t>(kColumnBytes / sizeof(V));
  c = c < kCompactThreads ? c : kCompactThreads;
  return c < vecs_per_row ? c : vecs_per_row;
}

// 4 CTAs per SM (at most 64 registers a thread): the kernel waits on its loads, so what bounds it is the loads in
// flight, and 4 · 256 threads hold twice those of the 2 CTAs that its 86 registers allowed before; and 512 CTAs (K and
// V of 256 segments, the 32K -> 4K case) then fit in one wave on 132 SMs.
constexpr int kCompactCtasPerSm = 4;

template <typename V>
__global__ void __launch_bounds__(kCompactThreads, kCompactCtasPerSm) compact_kernel(CompactArgs a) {
  const int s = blockIdx.x, tid = threadIdx.x;
  const int b = s / a.heads, h = s % a.heads;
  const int64_t vecs_per_row = a.row_bytes / static_cast<int64_t>(sizeof(V));
  const int cols = static_cast<int>(column_vectors<V>(vecs_per_row));  // vectors per row in this CTA
  const int64_t col = static_cast<int64_t>(blockIdx.y) * cols + tid % cols;
  const bool col_ok = col < vecs_per_row && tid < (kCompactThreads / cols) * cols;
  const int row_lane = tid / cols, rows_per_pass = kCompactThreads / cols;
  const int64_t count = a.counts ? static_cast<int64_t>(a.counts[s]) : a.keep;
  const int32_t* idx = a.indices + b * a.idx_b_stride + h * a.idx_h_stride;
  unsigned char* base = static_cast<unsigned char*>(blockIdx.z ? a.base2 : a.base);
  auto row = [&](int64_t token) -> V* {
    int64_t off;
    if (a.block_table) {
      const int64_t blk = a.block_table[b * a.block_table_stride + token / a.tokens_per_block];
      off = ((blk * a.heads + h) * a.tokens_per_block + token % a.tokens_per_block) * a.row_bytes;
    } else {
      off = (static_cast<int64_t>(s) * a.segment_rows + token) * a.row_bytes;
    }
    return reinterpret_cast<V*>(base + off) + col;
  };
  const int64_t chunk = static_cast<int64_t>(rows_per_pass) * kRowsPerThread;
  for (int64_t c = 0; c < count; c += chunk) {
    V v[kRowsPerThread];
    bool move[kRowsPerThread];
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t j = c + static_cast<int64_t>(u) * rows_per_pass + row_lane;
      const int64_t src = j < count ? idx[j] : j;
      move[u] = col_ok && j < count && src != j && src > j && src < a.n;
      if (move[u]) v[u] = *row(src);
    }
    __syncthreads();
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t j = c + static_cast<int64_t>(u) * rows_per_pass + row_lane;
      if (move[u]) *row(j) = v[u];
    }
    __syncthreads();
  }
}

struct alignas(16) Vec16 {
  uint32_t w[4];
};

}  // namespace

cudaError_t retention_score(const void* hidden, RowDType dtype, int B, int64_t n, const RetentionGateDevice& gate,
                            const int64_t* positions, int64_t positions_batch_stride, int64_t next_position,
                            float* out, cudaStream_t stream) {
  if (B < 0 || n < 0 || !hidden || !out || !gate.w1t || !gate.b1 || !gate.w2 || !gate.bias || gate.D <= 0 ||
      gate.G <= 0 || gate.G > kMaxGateWidth || gate.H <= 0)
    return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(B) * n;
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case RowDType::F32:
      return launch_score(static_cast<const float*>(hidden), rows, n, gate, positions, positions_batch_stride,
                          next_position, out, stream);
    case RowDType::BF16:
      return launch_score(static_cast<const __nv_bfloat16*>(hidden), rows, n, gate, positions,
                          positions_batch_stride, next_position, out, stream);
    case RowDType::F16:
      return launch_score(static_cast<const __half*>(hidden), rows, n, gate, positions, positions_batch_stride,
                          next_position, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t select_rows(const SelectArgs& a, cudaStream_t stream) {
  if (a.num_segments < 0 || a.heads <= 0 || !a.scores || !a.indices || a.n < 0 || a.sinks < 0 || a.recent < 0)
    return cudaErrorInvalidValue;
  if (a.num_segments == 0) return cudaSuccess;
  // Cache the keys in shared memory when every segment fits (lengths never exceed n).
  const int64_t capacity = a.n <= kCachedKeys ? a.n : 0;
  const size_t smem = sizeof(int) * (kSelectHeaderInts + static_cast<size_t>(capacity));
  auto* kernel = &select_kernel;
#ifndef KVD_SIMT_EMULATION
  if (const cudaError_t e = raise_smem_limit(kernel, smem); e != cudaSuccess) return e;
#endif
  KVD_LAUNCH(kernel, a.num_segments, kSelectThreads, smem, stream, a, capacity);
  return KVD_LAST_ERROR();
}

cudaError_t compact_rows(const CompactArgs& a, cudaStream_t stream) {
  if (a.num_segments < 0 || a.heads <= 0 || !a.base || !a.indices || a.row_bytes <= 0 || a.n < 0 ||
      (a.block_table && a.tokens_per_block <= 0))
    return cudaErrorInvalidValue;
  if (a.num_segments == 0) return cudaSuccess;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a.base) | reinterpret_cast<uintptr_t>(a.base2);
  auto launch = [&](auto vec) -> cudaError_t {
    using V = decltype(vec);
    const int64_t vecs = a.row_bytes / static_cast<int64_t>(sizeof(V));
    const int64_t cols = column_vectors<V>(vecs);
    const dim3 grid(static_cast<unsigned>(a.num_segments), static_cast<unsigned>((vecs + cols - 1) / cols),
                    a.base2 ? 2u : 1u);
    auto* kernel = &compact_kernel<V>;
    KVD_LAUNCH(kernel, grid, kCompactThreads, 0, stream, a);
    return KVD_LAST_ERROR();
  };
  if (a.row_bytes % 16 == 0 && addr % 16 == 0) return launch(Vec16{});
  if (a.row_bytes % 4 == 0 && addr % 4 == 0) return launch(uint32_t{});
  return launch(uint8_t{});
}

}  // namespace KVD_KS_NAMESPACE
