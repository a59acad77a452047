// See window_scores.cuh.
#include "kernels/window_scores.cuh"

#include <cmath>
#include <cstring>

// KVD_SIMT_EMULATION: compiled as host C++ against tests/kernels/simt_emulator.h for CPU tests (see
// kernels/retention_attention.cu); the launchers then live in kvd::kernels::emulated.
#ifdef KVD_SIMT_EMULATION
#include "tests/kernels/simt_emulator.h"
#define KVD_WS_NAMESPACE kvd::kernels::emulated
#else
#define KVD_WS_NAMESPACE kvd::kernels
#define KVD_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define KVD_LAST_ERROR() cudaGetLastError()
#endif
#include "kernels/mma_bits.cuh"

namespace KVD_WS_NAMESPACE {
namespace {

using namespace mma;  // kernels/mma_bits.cuh
using kvd::kernels::WindowScoresArgs;
constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // rows per block: 16 per warp
constexpr int kTile = 64;      // entries per tile
constexpr int64_t kNever = INT64_MAX;  // the position of an entry no row sees (past n, or not valid)

__host__ __device__ __forceinline__ int padded_w(int w) { return (w + 15) / 16 * 16; }

// The (query head within the group, window row) of row r of a (request, KV head); ok: a real row.
struct RowId {
  int g, i;
  bool ok;
};
__device__ __forceinline__ RowId row_id(int r, int wp, int G, int w) {
  const int g = r / wp, i = r % wp;
  return {g, i, g < G && i < w};
}

// cp.async the 64 rows of block rb (rows past a head's w, or past G heads, zero-filled) into a swizzled tile.
template <int D>
__device__ __forceinline__ void load_q_block(bf16* sm, const WindowScoresArgs& a, int b, int hkv, int rb) {
  constexpr int CH = D / 8;
  const int G = a.H / a.Hkv, wp = padded_w(a.w);
  const bf16* q = reinterpret_cast<const bf16*>(a.q);
  for (int idx = threadIdx.x; idx < kRows * CH; idx += kThreads) {
    const int r = idx / CH, c = idx % CH;
    const RowId id = row_id(rb * kRows + r, wp, G, a.w);
    const int64_t row = id.ok ? (static_cast<int64_t>(b) * a.H + hkv * G + id.g) * a.w + id.i : 0;
    cp_async16(sm + r * D + ((c ^ (r & 7)) << 3), q + row * D + c * 8, id.ok);
  }
}

// cp.async entries [t0, t0 + 64) of (b, h_kv) and their positions (kNever where no row may see them).
template <int D>
__device__ __forceinline__ void load_k_tile(bf16* sm, int64_t* spos, const WindowScoresArgs& a, int b, int hkv,
                                            int64_t t0) {
  const bf16* k = reinterpret_cast<const bf16*>(a.k) + b * a.k_sb + hkv * a.k_sh;
  load_tile<D, kTile, kThreads>(sm, k + t0 * D, D, 0, static_cast<int>(a.n - t0 < kTile ? a.n - t0 : kTile));
  for (int c = threadIdx.x; c < kTile; c += kThreads) {
    const int64_t j = t0 + c;
    bool vis = j < a.n;
    if (vis && a.valid) vis = a.valid[b * a.v_sb + hkv * a.v_sh + j];
    spos[c] = vis ? a.kpos[b * a.p_sb + hkv * a.p_sh + j] : kNever;
  }
}

// One warp's 16 rows × 64 entries of scores: c[nt][e] is row (warp·16 + g + 8·(e / 2)), entry nt·8 + 2t + e % 2.
template <int D>
__device__ __forceinline__ void warp_scores(float (&c)[8][4], const bf16* sq, const bf16* sk, int warp, int lane) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    ld_a<D>(af, sq, warp * 16, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t bfr[4];
      ld_b_nk<D>(bfr, sk, np * 16, kk * 16, lane);
      mma16816(c[2 * np], af, bfr[0], bfr[1]);
      mma16816(c[2 * np + 1], af, bfr[2], bfr[3]);
    }
  }
}

// The ids and query positions of a lane's two rows (g and g + 8 of its warp).
__device__ __forceinline__ void lane_rows(const WindowScoresArgs& a, int b, int rb, int warp, int lane, RowId (&id)[2],
                                          int64_t (&qp)[2]) {
  const int G = a.H / a.Hkv, wp = padded_w(a.w);
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    id[hf] = row_id(rb * kRows + warp * 16 + lane / 4 + 8 * hf, wp, G, a.w);
    qp[hf] = id[hf].ok ? a.qpos[static_cast<int64_t>(b) * a.w + id[hf].i] : -1;
  }
}

// (max, sum) of exp2 merged: the pair (m2, l2) into (m, l); -inf max = nothing seen.
__device__ __forceinline__ void merge_ml(float& m, float& l, float m2, float l2) {
  const float mx = m2 > m ? m2 : m;
  if (mx == -INFINITY) return;
  l = l * fast_exp2(m - mx) + l2 * fast_exp2(m2 - mx);
  m = mx;
}

// Pass 1. grid (chunks, B · H_kv, row blocks). Each warp keeps, for each of its lanes' two rows, the running max
// and sum of exp2 (log2 units) over the lane's columns, merged over the quad at the end.
template <int D>
__global__ void __launch_bounds__(kThreads) stats_kernel(const WindowScoresArgs a, int64_t chunk_tiles) {
  KVD_DYNAMIC_SMEM(smem);
  bf16* sq = reinterpret_cast<bf16*>(smem);                // (64, D)
  bf16* sk = sq + kRows * D;                               // 2 × (64, D)
  int64_t* spos = reinterpret_cast<int64_t*>(sk + 2 * kTile * D);  // 2 × 64
  const int b = blockIdx.y / a.Hkv, hkv = blockIdx.y % a.Hkv, rb = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tiles = (a.n + kTile - 1) / kTile;
  const int64_t t_lo = blockIdx.x * chunk_tiles, t_hi = t_lo + chunk_tiles < tiles ? t_lo + chunk_tiles : tiles;
  const float scale2 = a.scale * kLog2e;
  RowId id[2];
  int64_t qp[2];
  lane_rows(a, b, rb, warp, lane, id, qp);
  const bool any_row = (rb * kRows + warp * 16) / padded_w(a.w) < a.H / a.Hkv;  // warp-uniform: rows of a head

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  if (t_lo < t_hi) {
    load_q_block<D>(sq, a, b, hkv, rb);
    load_k_tile<D>(sk, spos, a, b, hkv, t_lo * kTile);
    cp_async_commit();
  }
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int buf = static_cast<int>((t - t_lo) & 1);
    if (t + 1 < t_hi) load_k_tile<D>(sk + (buf ^ 1) * kTile * D, spos + (buf ^ 1) * kTile, a, b, hkv, (t + 1) * kTile);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (any_row) {
      float c[8][4];
      warp_scores<D>(c, sq, sk + buf * kTile * D, warp, lane);
      const int64_t* pos = spos + buf * kTile;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float x[16], mx = m[hf];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = nt * 8 + 2 * (lane % 4) + e;
            x[nt * 2 + e] = id[hf].ok && pos[col] <= qp[hf] ? c[nt][2 * hf + e] * scale2 : -INFINITY;
            mx = x[nt * 2 + e] > mx ? x[nt * 2 + e] : mx;
          }
        if (mx == -INFINITY) continue;
        float s = 0.f;
#pragma unroll
        for (int u = 0; u < 16; ++u) s += fast_exp2(x[u] - mx);
        l[hf] = l[hf] * fast_exp2(m[hf] - mx) + s;
        m[hf] = mx;
      }
    }
    __syncthreads();  // the buffer is refilled next iteration
  }
  // The quad's lanes hold the same rows over different columns.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf)
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m[hf], off), l2 = __shfl_xor_sync(0xFFFFFFFFu, l[hf], off);
      merge_ml(m[hf], l[hf], m2, l2);
    }
  if (lane % 4 != 0) return;
  const int64_t BHw = static_cast<int64_t>(a.B) * a.H * a.w;
  const int G = a.H / a.Hkv;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    if (!id[hf].ok) continue;
    const int64_t row = (static_cast<int64_t>(b) * a.H + hkv * G + id[hf].g) * a.w + id[hf].i;
    a.part_ml[(blockIdx.x * BHw + row) * 2] = m[hf];
    a.part_ml[(blockIdx.x * BHw + row) * 2 + 1] = l[hf];
  }
}

// Pass 2. One warp per row (B · H · w of them, 8 per CTA): lane c merges chunks c, c + 32, ... in order, then the
// lanes' results merge over a fixed butterfly (deterministic). The chunks' loads are in flight together: a thread
// per row walking ~100 chunks one after another was latency-bound (16–19 µs a launch under ncu on an H100).
constexpr int kMergeThreads = 256;
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const WindowScoresArgs a) {
  const int64_t BHw = static_cast<int64_t>(a.B) * a.H * a.w;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kMergeThreads / 32) + threadIdx.x / 32;
  if (row >= BHw) return;  // warp-uniform
  float m = -INFINITY, l = 0.f;
  for (int c = lane; c < a.chunks; c += 32) merge_ml(m, l, a.part_ml[(c * BHw + row) * 2], a.part_ml[(c * BHw + row) * 2 + 1]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m, off), l2 = __shfl_xor_sync(0xFFFFFFFFu, l, off);
    merge_ml(m, l, m2, l2);
  }
  if (lane != 0) return;
  a.row_ml[row * 2] = m == -INFINITY ? 0.f : m;
  a.row_ml[row * 2 + 1] = l > 0.f ? 1.f / l : 0.f;  // a row that sees nothing: P = 0
}

// Pass 3. grid (entry tiles, B · H_kv). The tile's K stays in shared memory while the row blocks stream through
// (double-buffered); each warp sums its 16 rows' P per column, and the warps' sums are added to the head's
// column in warp order.
template <int D>
__global__ void __launch_bounds__(kThreads) columns_kernel(const WindowScoresArgs a) {
  KVD_DYNAMIC_SMEM(smem);
  const int G = a.H / a.Hkv, wp = padded_w(a.w);
  const int blocks = (G * wp + kRows - 1) / kRows;
  const bool mx_mode = a.max_mode != 0;
  const int nstat = (mx_mode ? a.max_plain != nullptr : a.sumsq != nullptr) ? 2 : 1;
  bf16* sk = reinterpret_cast<bf16*>(smem);               // (64, D)
  bf16* sq = sk + kTile * D;                              // 2 × (64, D)
  int64_t* spos = reinterpret_cast<int64_t*>(sq + 2 * kRows * D);  // 64
  float* red = reinterpret_cast<float*>(spos + kTile);    // (4 warps, 2 stats, 64)
  float* acc = red + 4 * 2 * kTile;                       // (G, 2 stats, 64)
  const int b = blockIdx.y / a.Hkv, hkv = blockIdx.y % a.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const float scale2 = a.scale * kLog2e;

  for (int i = threadIdx.x; i < G * 2 * kTile; i += kThreads) acc[i] = 0.f;
  load_k_tile<D>(sk, spos, a, b, hkv, t0);
  load_q_block<D>(sq, a, b, hkv, 0);
  cp_async_commit();
  for (int rb = 0; rb < blocks; ++rb) {
    const int buf = rb & 1;
    if (rb + 1 < blocks) load_q_block<D>(sq + (buf ^ 1) * kRows * D, a, b, hkv, rb + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    RowId id[2];
    int64_t qp[2];
    lane_rows(a, b, rb, warp, lane, id, qp);
    const int wg = (rb * kRows + warp * 16) / wp;  // the head of the warp's rows (>= G: none)
    float cs[8][2][2];                             // [nt][e][stat]: this lane's two rows, summed
    if (wg < G) {
      float c[8][4];
      warp_scores<D>(c, sq + buf * kRows * D, sk, warp, lane);
      float mrow[2], inv[2], inv_plain[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int64_t row = (static_cast<int64_t>(b) * a.H + hkv * G + wg) * a.w + id[hf].i;
        mrow[hf] = id[hf].ok ? a.row_ml[row * 2] : 0.f;
        inv[hf] = inv_plain[hf] = id[hf].ok ? a.row_ml[row * 2 + 1] : 0.f;
        // Max mode: the row's weight folds into 1 / sum (P · w); max_plain takes P alone.
        if (mx_mode && a.row_w && id[hf].ok) inv[hf] *= a.row_w[static_cast<int64_t>(b) * a.w + id[hf].i];
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nt * 8 + 2 * (lane % 4) + e;
          float s1 = 0.f, s2 = 0.f;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const bool seen = id[hf].ok && spos[col] <= qp[hf];
            const float ex = seen ? fast_exp2(c[nt][2 * hf + e] * scale2 - mrow[hf]) : 0.f;
            const float p = ex * inv[hf];
            s1 = mx_mode ? fmaxf(s1, p) : s1 + p;
            s2 = mx_mode ? fmaxf(s2, ex * inv_plain[hf]) : s2 + p * p;
          }
          cs[nt][e][0] = s1;
          cs[nt][e][1] = s2;
        }
      // Sum (max mode: the maximum) over the 8 row pairs of the warp (lanes with the same lane % 4); the second
      // statistic (squares, or the plain maximum) only when asked.
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int st = 0; st < 2; ++st)
#pragma unroll
            for (int off = 4; off <= 16; off *= 2) {
              if (st >= nstat) break;  // block-uniform
              const float o = __shfl_xor_sync(0xFFFFFFFFu, cs[nt][e][st], off);
              cs[nt][e][st] = mx_mode ? fmaxf(cs[nt][e][st], o) : cs[nt][e][st] + o;
            }
      if (lane < 4)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int st = 0; st < 2; ++st) red[(warp * 2 + st) * kTile + nt * 8 + 2 * lane + e] = cs[nt][e][st];
    }
    __syncthreads();
    // Thread (stat, column) adds the warps' sums in warp order.
    {
      const int st = threadIdx.x / kTile, col = threadIdx.x % kTile;
      if (st < nstat)
        for (int wi = 0; wi < 4; ++wi) {
          const int g = (rb * kRows + wi * 16) / wp;
          if (g >= G) continue;
          float& x = acc[(g * 2 + st) * kTile + col];
          x = mx_mode ? fmaxf(x, red[(wi * 2 + st) * kTile + col]) : x + red[(wi * 2 + st) * kTile + col];
        }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * nstat * kTile; idx += kThreads) {
    const int g = idx / (nstat * kTile), st = (idx / kTile) % nstat, col = idx % kTile;
    const int64_t j = t0 + col;
    if (j >= a.n) continue;
    float* out = st == 0 ? a.sum : mx_mode ? a.max_plain : a.sumsq;
    out[(static_cast<int64_t>(b) * a.H + hkv * G + g) * a.n + j] = acc[(g * 2 + st) * kTile + col];
  }
}

template <int D>
cudaError_t launch(const WindowScoresArgs& a, cudaStream_t stream) {
  const int G = a.H / a.Hkv, blocks = (G * padded_w(a.w) + kRows - 1) / kRows;
  const int64_t tiles = (a.n + kTile - 1) / kTile;
  const int64_t chunk_tiles = (tiles + a.chunks - 1) / a.chunks;
  const size_t smem1 = (kRows + 2 * kTile) * D * sizeof(bf16) + 2 * kTile * sizeof(int64_t);
  const size_t smem3 = (kTile + 2 * kRows) * D * sizeof(bf16) + kTile * sizeof(int64_t) +
                       (4 * 2 + G * 2) * kTile * sizeof(float);
  cudaError_t e = allow_smem(stats_kernel<D>, smem1);
  if (e == cudaSuccess) e = allow_smem(columns_kernel<D>, smem3);
  if (e != cudaSuccess) return e;
  KVD_LAUNCH(stats_kernel<D>, dim3(a.chunks, a.B * a.Hkv, blocks), dim3(kThreads), smem1, stream, a, chunk_tiles);
  const int64_t rows = static_cast<int64_t>(a.B) * a.H * a.w;
  constexpr int per_cta = kMergeThreads / 32;
  KVD_LAUNCH(merge_kernel, dim3(static_cast<unsigned>((rows + per_cta - 1) / per_cta)), dim3(kMergeThreads), 0, stream, a);
  KVD_LAUNCH(columns_kernel<D>, dim3(static_cast<unsigned>(tiles), a.B * a.Hkv), dim3(kThreads), smem3, stream, a);
  return KVD_LAST_ERROR();
}

}  // namespace

int window_scores_chunks(int B, int H, int Hkv, int w, int64_t n) {
  const int G = Hkv > 0 ? H / Hkv : 1;
  const int64_t blocks = (static_cast<int64_t>(G) * padded_w(w) + kRows - 1) / kRows;
  const int64_t ctas = static_cast<int64_t>(B) * Hkv * (blocks > 0 ? blocks : 1);
  const int64_t want = (1056 + ctas - 1) / ctas, tiles = (n + kTile - 1) / kTile;
  const int64_t c = want < tiles ? want : tiles;
  return static_cast<int>(c < 1 ? 1 : c);
}

cudaError_t window_scores(const WindowScoresArgs& a, cudaStream_t stream) {
  const int G = a.Hkv > 0 ? a.H / a.Hkv : 0;
  const int64_t blocks = a.Hkv > 0 ? (static_cast<int64_t>(G) * padded_w(a.w) + kRows - 1) / kRows : 0;
  const int64_t tiles = (a.n + kTile - 1) / kTile;
  if ((a.hd != 64 && a.hd != 128) || a.B <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0 || G > kvd::kernels::kWindowMaxGroup ||
      a.w <= 0 || a.n <= 0 || a.chunks < 1 || a.chunks > tiles || static_cast<int64_t>(a.B) * a.Hkv > 65535 ||
      blocks > 65535 || tiles > 2147483647 || !a.q || !a.k || !a.qpos || !a.kpos || !a.part_ml || !a.row_ml || !a.sum ||
      (a.max_mode && a.sumsq) || (!a.max_mode && a.max_plain))
    return cudaErrorInvalidValue;
  return a.hd == 64 ? launch<64>(a, stream) : launch<128>(a, stream);
}

}  // namespace KVD_WS_NAMESPACE
