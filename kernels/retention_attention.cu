// Fused retention-biased attention on sm_90: see retention_attention.cuh for the math and the design.
//
// Tensor cores through mma.sync.m16n8k16 (bf16 in, fp32 accumulate), operands from shared memory through
// ldmatrix. Shared-memory tiles are rows of D bf16 whose 16-byte chunks are XOR-swizzled by (row % 8), so the
// 8 row addresses of one ldmatrix hit 8 different bank groups. Global -> shared copies are cp.async,
// double-buffered over the loop dimension.
//
// Fragment layouts: kernels/mma_bits.cuh. The C fragments of two adjacent 8-column tiles are, packed to bf16, the
// A fragment of a 16-deep k-step: this is how P (and dS) feed the second product without leaving registers.
#include "kernels/retention_attention.cuh"

#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>

// KVD_SIMT_EMULATION: the same kernel code compiled as host C++ against tests/kernels/simt_emulator.h (CPU tests
// of the kernels; CI has no GPU). The launchers then live in kvd::kernels::emulated.
#ifdef KVD_SIMT_EMULATION
#include "tests/kernels/simt_emulator.h"
#define KVD_RA_NAMESPACE kvd::kernels::emulated
#else
#define KVD_RA_NAMESPACE kvd::kernels
#define KVD_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define KVD_LAST_ERROR() cudaGetLastError()
#endif
#include "kernels/mma_bits.cuh"

namespace KVD_RA_NAMESPACE {
namespace {

using namespace mma;  // kernels/mma_bits.cuh
constexpr int kBN = 64;  // keys per tile (forward and dQ), queries per tile (dK/dV)

// Row-side and column-side context for the score of one (query, key) pair.
struct Side {
  int row;    // row index in [0, S) (or beyond: padding)
  int pos;
  int doc;
  float rate2;  // key_rate · log2(e) (key side only)
  float mask2;  // key_log_mask · log2(e) (key side only)
};

// Score in log2 units: (scale·qk + bias)·log2(e), or -inf where the key is invisible.
template <bool BIAS, bool MASKS>
__device__ __forceinline__ float score2(float acc, float scale2, int qi, float qpos, int qdoc, int kj, float kpos,
                                        int kdoc, float rate2, float mask2, bool check, float window, float delay) {
  float x;
  if (BIAS) {
    // Positions are exact in float (< 2^24). delay 0: a row's own key (only in tiles that cross the diagonal) is
    // unmasked; delay d > 0: only keys more than d positions back are.
    const float m = delay > 0.f ? (qpos - kpos > delay ? mask2 : 0.f) : ((check && kj == qi) ? 0.f : mask2);
    x = fmaf(fmaxf(qpos - kpos, 0.f), rate2, fmaf(acc, scale2, m));
  } else {
    x = acc * scale2;
  }
  if (MASKS || check) {
    bool vis = kj <= qi;
    if (MASKS) vis = vis && qdoc == kdoc && (qpos - kpos < window);  // window = +inf when there is none
    if (!vis) x = -INFINITY;
  }
  return x;
}

// Row blocks of 32: min / max document and position of the valid rows of each block (B, ceil(S / 32), 4).
constexpr int kRowBlock = 32;
__global__ void row_blocks_kernel(const RetentionAttnParams p) {
  const int blk = blockIdx.x, b = blockIdx.y, lane = threadIdx.x;
  const int r = blk * kRowBlock + lane;
  const bool ok = r < p.S;
  const int64_t at = static_cast<int64_t>(b) * p.S + (ok ? r : blk * kRowBlock);  // the block's first row is valid
  int dmin = p.doc ? p.doc[at] : 0, dmax = dmin, pmin = p.pos[at], pmax = pmin;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    dmin = min(dmin, __shfl_xor_sync(0xffffffffu, dmin, off));
    dmax = max(dmax, __shfl_xor_sync(0xffffffffu, dmax, off));
    pmin = min(pmin, __shfl_xor_sync(0xffffffffu, pmin, off));
    pmax = max(pmax, __shfl_xor_sync(0xffffffffu, pmax, off));
  }
  if (lane == 0) {
    int32_t* o = p.row_blocks + (static_cast<int64_t>(b) * ((p.S + kRowBlock - 1) / kRowBlock) + blk) * 4;
    o[0] = dmin, o[1] = dmax, o[2] = pmin, o[3] = pmax;
  }
}

struct RowBounds {
  int dmin, dmax, pmin, pmax;
};
// Bounds of rows [r0, r0 + n) ∩ [0, S) of batch row b (r0 a multiple of 32, r0 < S).
__device__ __forceinline__ RowBounds row_bounds(const RetentionAttnParams& p, int b, int r0, int n) {
  const int nblk = (p.S + kRowBlock - 1) / kRowBlock;
  const int first = r0 / kRowBlock, last = (min(r0 + n, p.S) - 1) / kRowBlock;
  const int32_t* o = p.row_blocks + (static_cast<int64_t>(b) * nblk + first) * 4;
  RowBounds rb{o[0], o[1], o[2], o[3]};
  for (int i = 1; i <= last - first; ++i) {
    rb.dmin = min(rb.dmin, o[4 * i]);
    rb.dmax = max(rb.dmax, o[4 * i + 1]);
    rb.pmin = min(rb.pmin, o[4 * i + 2]);
    rb.pmax = max(rb.pmax, o[4 * i + 3]);
  }
  return rb;
}
// True when no (query, key) pair of the two row ranges can be visible: their documents differ for sure, or every
// pair is out of the window (pos_q - pos_k >= min pos_q - max pos_k >= w). Sound for any doc ids and positions.
__device__ __forceinline__ bool bounds_invisible(const RetentionAttnParams& p, const RowBounds& q, const RowBounds& k) {
  if (p.doc && (q.dmax < k.dmin || k.dmax < q.dmin)) return true;
  return p.window > 0 && static_cast<int64_t>(q.pmin) - k.pmax >= p.window;
}
__device__ __forceinline__ bool tiles_invisible(const RetentionAttnParams& p, int b, int q0, int qn, int k0,
                                                int kn) {
  return bounds_invisible(p, row_bounds(p, b, q0, qn), row_bounds(p, b, k0, kn));
}

// ------------------------------------------------------------------------------------------------------------
// Forward: one CTA per (query tile of BM rows, head, batch); NW warps, each MT m16 row tiles.
template <int D, int NW, int MT, bool BIAS, bool MASKS>
__global__ void __launch_bounds__(NW * 32) fwd_kernel(const RetentionAttnParams p) {
  constexpr int BM = NW * 16 * MT, NT = NW * 32, BN = kBN;
  KVD_DYNAMIC_SMEM(smem);
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sK = sQ + BM * D;
  bf16* sV = sK + 2 * BN * D;
  float* sKpos = reinterpret_cast<float*>(sV + 2 * BN * D);
  int* sKdoc = reinterpret_cast<int*>(sKpos + 2 * BN);
  float* sKrate = reinterpret_cast<float*>(sKdoc + 2 * BN);
  float* sKmask = sKrate + 2 * BN;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Causal: the last query tiles see the most keys; they are dispatched first so that the light tiles fill the tail.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, h = blockIdx.y, b = blockIdx.z;
  const int S = p.S, hk = h / (p.H / p.Hkv);
  const bf16* gq = static_cast<const bf16*>(p.q) + b * p.q_sb + h * p.q_sh;
  const bf16* gk = static_cast<const bf16*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const bf16* gv = static_cast<const bf16*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int* gpos = p.pos + static_cast<int64_t>(b) * S;
  const int* gdoc = p.doc ? p.doc + static_cast<int64_t>(b) * S : nullptr;
  const float* grate = p.key_rate ? p.key_rate + b * p.kr_sb + hk * p.kr_sh : nullptr;
  const float* gmask = p.key_log_mask ? p.key_log_mask + b * p.km_sb + hk * p.km_sh : nullptr;

  auto load_kv = [&](int kt, int buf) {
    const int k0 = kt * BN;
    load_tile<D, BN, NT>(sK + buf * BN * D, gk, p.k_ss, k0, S);
    load_tile<D, BN, NT>(sV + buf * BN * D, gv, p.v_ss, k0, S);
    if (tid < BN) {
      const int kj = k0 + tid;
      const bool ok = kj < S;
      sKpos[buf * BN + tid] = ok ? static_cast<float>(gpos[kj]) : 0.f;
      sKdoc[buf * BN + tid] = gdoc ? (ok ? gdoc[kj] : INT_MIN) : 0;
      sKrate[buf * BN + tid] = ok && grate ? grate[kj] * kLog2e : 0.f;
      sKmask[buf * BN + tid] = ok && gmask ? gmask[kj] * kLog2e : 0.f;
    }
  };

  // This thread's rows: rows[mt][hf] = q0 + warp·16·MT + mt·16 + lane/4 + 8·hf.
  int qrow[MT][2], qdoc[MT][2];
  float qpos[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = q0 + warp * 16 * MT + mt * 16 + (lane >> 2) + hf * 8;
      qrow[mt][hf] = r;
      qpos[mt][hf] = r < S ? static_cast<float>(gpos[r]) : 0.f;
      qdoc[mt][hf] = gdoc ? (r < S ? gdoc[r] : INT_MAX) : 0;
    }

  const int kend = min(S, q0 + BM);  // causal: no key after the tile's last row
  const int nkt = (kend + BN - 1) / BN;
  const float scale2 = p.scale * kLog2e;
  const float window = p.window > 0 ? static_cast<float>(p.window) : INFINITY;
  const float delay = static_cast<float>(p.mask_delay);

  // The next key tile at or after kt that may hold a visible key (all of them without documents / window).
  auto next_kt = [&](int kt) {
    if (MASKS)
      while (kt < nkt && tiles_invisible(p, b, q0, BM, kt * BN, BN)) ++kt;
    return kt;
  };
  int kt = next_kt(0);
  load_tile<D, BM, NT>(sQ, gq, p.q_ss, q0, S);
  if (kt < nkt) load_kv(kt, 0);
  cp_async_commit();

  float acc_o[MT][D / 8][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][j][e] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  for (int buf = 0; kt < nkt; buf ^= 1) {
    const int kt_next = next_kt(kt + 1);
    if (kt_next < nkt) {
      load_kv(kt_next, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* cK = sK + buf * BN * D;
    const bf16* cV = sV + buf * BN * D;

    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ld_a<D>(a[mt], sQ, warp * 16 * MT + mt * 16, ks * 16, lane);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bb[4];
        ld_b_nk<D>(bb, cK, np * 16, ks * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(s[mt][2 * np], a[mt], bb[0], bb[1]);
          mma16816(s[mt][2 * np + 1], a[mt], bb[2], bb[3]);
        }
      }
    }

    const int k0 = kt * BN;
    const bool check = k0 + BN - 1 > q0;  // the tile reaches past the CTA's first row
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const int c = j * 8 + (lane & 3) * 2 + e1;
        const int kj = k0 + c;
        const float kpos = sKpos[buf * BN + c];
        const int kdoc = sKdoc[buf * BN + c];
        const float rate2 = sKrate[buf * BN + c], mask2 = sKmask[buf * BN + c];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            s[mt][j][2 * hf + e1] =
                score2<BIAS, MASKS>(s[mt][j][2 * hf + e1], scale2, qrow[mt][hf], qpos[mt][hf], qdoc[mt][hf], kj,
                                    kpos, kdoc, rate2, mask2, check, window, delay);
      }

    // Online softmax (log2 units).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = m[mt][hf];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * hf], s[mt][j][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = mx == -INFINITY ? 0.f : mx;
        const float corr = fast_exp2(m[mt][hf] - base);
        m[mt][hf] = mx;
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e1 = 0; e1 < 2; ++e1) {
            const float pv = fast_exp2(s[mt][j][2 * hf + e1] - base);
            s[mt][j][2 * hf + e1] = pv;
            rs += pv;
          }
        l[mt][hf] = l[mt][hf] * corr + rs;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          acc_o[mt][j][2 * hf] *= corr;
          acc_o[mt][j][2 * hf + 1] *= corr;
        }
      }

    // O += P·V
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack_bf16(s[mt][2 * ks][0], s[mt][2 * ks][1]);
        a[mt][1] = pack_bf16(s[mt][2 * ks][2], s[mt][2 * ks][3]);
        a[mt][2] = pack_bf16(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
        a[mt][3] = pack_bf16(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bb[4];
        ld_b_kn<D>(bb, cV, ks * 16, np * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(acc_o[mt][2 * np], a[mt], bb[0], bb[1]);
          mma16816(acc_o[mt][2 * np + 1], a[mt], bb[2], bb[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
    kt = kt_next;
  }

  // Epilogue: normalize, write out (bf16) and lse.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float lt = l[mt][hf];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      const int r = qrow[mt][hf];
      if (r >= S) continue;
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      bf16* go = static_cast<bf16*>(p.out) + b * p.o_sb + h * p.o_sh + r * p.o_ss;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int c = j * 8 + (lane & 3) * 2;
        *reinterpret_cast<__nv_bfloat162*>(go + c) =
            __floats2bfloat162_rn(acc_o[mt][j][2 * hf] * inv, acc_o[mt][j][2 * hf + 1] * inv);
      }
      if ((lane & 3) == 0)
        p.lse[(static_cast<int64_t>(b) * p.H + h) * S + r] = lt > 0.f ? m[mt][hf] * kLn2 + logf(lt) : -INFINITY;
    }
}

// ------------------------------------------------------------------------------------------------------------
// Δ_i = Σ_d dout_i · out_i (fp32), one warp per row.
__global__ void delta_kernel(const RetentionAttnParams p, const RetentionAttnGrads g) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  const int64_t total = static_cast<int64_t>(p.B) * p.H * p.S;
  if (warp >= total) return;
  const int r = warp % p.S, h = (warp / p.S) % p.H, b = warp / (p.S * p.H);
  const bf16* o = static_cast<const bf16*>(p.out) + b * p.o_sb + h * p.o_sh + r * p.o_ss;
  const bf16* d = static_cast<const bf16*>(g.dout) + b * g.do_sb + h * g.do_sh + r * g.do_ss;
  float acc = 0.f;
  for (int c = lane * 2; c < p.D; c += 64) {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + c));
    const float2 bb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(d + c));
    acc = fmaf(a.x, bb.x, fmaf(a.y, bb.y, acc));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) g.delta[warp] = acc;
}

// ------------------------------------------------------------------------------------------------------------
// dQ: one CTA per (query tile, head, batch), looping over key tiles of BNK keys; recomputes P and dP. Each warp
// owns MT m16 row tiles, so every K / V fragment read from shared memory feeds MT products.
template <int D, int NW, int MT, int BNK, bool BIAS, bool MASKS>
__global__ void __launch_bounds__(NW * 32) dq_kernel(const RetentionAttnParams p, const RetentionAttnGrads g) {
  constexpr int BM = NW * 16 * MT, NT = NW * 32, BN = BNK;
  KVD_DYNAMIC_SMEM(smem);
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sdO = sQ + BM * D;
  bf16* sK = sdO + BM * D;
  bf16* sV = sK + 2 * BN * D;
  float* sKpos = reinterpret_cast<float*>(sV + 2 * BN * D);
  int* sKdoc = reinterpret_cast<int*>(sKpos + 2 * BN);
  float* sKrate = reinterpret_cast<float*>(sKdoc + 2 * BN);
  float* sKmask = sKrate + 2 * BN;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Causal: the last query tiles see the most keys; they are dispatched first so that the light tiles fill the tail.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, h = blockIdx.y, b = blockIdx.z;
  const int S = p.S, hk = h / (p.H / p.Hkv);
  const bf16* gq = static_cast<const bf16*>(p.q) + b * p.q_sb + h * p.q_sh;
  const bf16* gdo = static_cast<const bf16*>(g.dout) + b * g.do_sb + h * g.do_sh;
  const bf16* gk = static_cast<const bf16*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const bf16* gv = static_cast<const bf16*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int* gpos = p.pos + static_cast<int64_t>(b) * S;
  const int* gdoc = p.doc ? p.doc + static_cast<int64_t>(b) * S : nullptr;
  const float* grate = p.key_rate ? p.key_rate + b * p.kr_sb + hk * p.kr_sh : nullptr;
  const float* gmask = p.key_log_mask ? p.key_log_mask + b * p.km_sb + hk * p.km_sh : nullptr;
  const int64_t row_base = (static_cast<int64_t>(b) * p.H + h) * S;

  auto load_kv = [&](int kt, int buf) {
    const int k0 = kt * BN;
    load_tile<D, BN, NT>(sK + buf * BN * D, gk, p.k_ss, k0, S);
    load_tile<D, BN, NT>(sV + buf * BN * D, gv, p.v_ss, k0, S);
    if (tid < BN) {
      const int kj = k0 + tid;
      const bool ok = kj < S;
      sKpos[buf * BN + tid] = ok ? static_cast<float>(gpos[kj]) : 0.f;
      sKdoc[buf * BN + tid] = gdoc ? (ok ? gdoc[kj] : INT_MIN) : 0;
      sKrate[buf * BN + tid] = ok && grate ? grate[kj] * kLog2e : 0.f;
      sKmask[buf * BN + tid] = ok && gmask ? gmask[kj] * kLog2e : 0.f;
    }
  };

  int qrow[MT][2], qdoc[MT][2];
  float qpos[MT][2], lse2[MT][2], dlt[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = q0 + warp * 16 * MT + mt * 16 + (lane >> 2) + hf * 8;
      qrow[mt][hf] = r;
      qpos[mt][hf] = r < S ? static_cast<float>(gpos[r]) : 0.f;
      qdoc[mt][hf] = gdoc ? (r < S ? gdoc[r] : INT_MAX) : 0;
      const float ls = r < S ? p.lse[row_base + r] : -INFINITY;
      lse2[mt][hf] = ls == -INFINITY ? INFINITY : ls * kLog2e;  // a row that sees nothing: P = 0
      dlt[mt][hf] = r < S ? g.delta[row_base + r] : 0.f;
    }

  const int kend = min(S, q0 + BM);
  const int nkt = (kend + BN - 1) / BN;
  const float scale2 = p.scale * kLog2e;
  const float window = p.window > 0 ? static_cast<float>(p.window) : INFINITY;
  const float delay = static_cast<float>(p.mask_delay);

  auto next_kt = [&](int kt) {
    if (MASKS)
      while (kt < nkt && tiles_invisible(p, b, q0, BM, kt * BN, BN)) ++kt;
    return kt;
  };
  int kt = next_kt(0);
  load_tile<D, BM, NT>(sQ, gq, p.q_ss, q0, S);
  load_tile<D, BM, NT>(sdO, gdo, g.do_ss, q0, S);
  if (kt < nkt) load_kv(kt, 0);
  cp_async_commit();

  float acc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

  for (int buf = 0; kt < nkt; buf ^= 1) {
    const int kt_next = next_kt(kt + 1);
    if (kt_next < nkt) {
      load_kv(kt_next, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* cK = sK + buf * BN * D;
    const bf16* cV = sV + buf * BN * D;

    float s[MT][BN / 8][4], dp[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = dp[mt][j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[MT][4], ad[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ld_a<D>(a[mt], sQ, warp * 16 * MT + mt * 16, ks * 16, lane);
        ld_a<D>(ad[mt], sdO, warp * 16 * MT + mt * 16, ks * 16, lane);
      }
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bk[4], bv[4];
        ld_b_nk<D>(bk, cK, np * 16, ks * 16, lane);
        ld_b_nk<D>(bv, cV, np * 16, ks * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma16816(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
          mma16816(dp[mt][2 * np], ad[mt], bv[0], bv[1]);
          mma16816(dp[mt][2 * np + 1], ad[mt], bv[2], bv[3]);
        }
      }
    }

    const int k0 = kt * BN;
    const bool check = k0 + BN - 1 > q0;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const int c = j * 8 + (lane & 3) * 2 + e1;
        const int kj = k0 + c;
        const float kpos = sKpos[buf * BN + c];
        const int kdoc = sKdoc[buf * BN + c];
        const float rate2 = sKrate[buf * BN + c], mask2 = sKmask[buf * BN + c];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const float x = score2<BIAS, MASKS>(s[mt][j][2 * hf + e1], scale2, qrow[mt][hf], qpos[mt][hf],
                                                qdoc[mt][hf], kj, kpos, kdoc, rate2, mask2, check, window, delay);
            const float pr = fast_exp2(x - lse2[mt][hf]);
            s[mt][j][2 * hf + e1] = pr * (dp[mt][j][2 * hf + e1] - dlt[mt][hf]);  // dS
          }
      }

    // dQ += dS·K
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack_bf16(s[mt][2 * ks][0], s[mt][2 * ks][1]);
        a[mt][1] = pack_bf16(s[mt][2 * ks][2], s[mt][2 * ks][3]);
        a[mt][2] = pack_bf16(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
        a[mt][3] = pack_bf16(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bb[4];
        ld_b_kn<D>(bb, cK, ks * 16, np * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(acc[mt][2 * np], a[mt], bb[0], bb[1]);
          mma16816(acc[mt][2 * np + 1], a[mt], bb[2], bb[3]);
        }
      }
    }
    __syncthreads();
    kt = kt_next;
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = qrow[mt][hf];
      if (r >= S) continue;
      bf16* gdq = static_cast<bf16*>(g.dq) + b * g.dq_sb + h * g.dq_sh + r * g.dq_ss;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int c = j * 8 + (lane & 3) * 2;
        *reinterpret_cast<__nv_bfloat162*>(gdq + c) =
            __floats2bfloat162_rn(acc[mt][j][2 * hf] * p.scale, acc[mt][j][2 * hf + 1] * p.scale);
      }
    }
}

// ------------------------------------------------------------------------------------------------------------
// The one-pass backward's dQ (see dkv_kernel, DQ).

// A fragments of a row-major swizzled tile whose rows are the K dimension and columns the M dimension (A = tileᵀ):
// the transposing ldmatrix, matrices (m0.., k0..), (m0+8.., k0..), (m0.., k0+8..), (m0+8.., k0+8..).
template <int W>
__device__ __forceinline__ void ld_a_t(uint32_t (&a)[4], const bf16* t, int m0, int k0, int lane) {
  ldsm_x4_t(a, t + swz<W>(k0 + (lane & 7) + (lane >> 4) * 8, m0 + ((lane >> 3) & 1) * 8));
}

#ifdef KVD_SIMT_EMULATION
// CTAs run one after another in blockIdx order, so every key tile before this one has added already.
inline void wait_count(const int* c, int want) {
  if (*c != want) {
    std::fprintf(stderr, "retention_attention one-pass dQ: count %d, want %d (CTA order broken)\n", *c, want);
    std::abort();
  }
}
inline void set_count(int* c, int v) { *c = v; }
inline float ld_l2(const float* a) { return *a; }
inline void st_l2(float* a, float v) { *a = v; }
inline void fence() {}
#else
__device__ __forceinline__ void wait_count(const int* c, int want) {
  while (*reinterpret_cast<const volatile int*>(c) != want) {
  }
  __threadfence();
}
__device__ __forceinline__ void set_count(int* c, int v) { *reinterpret_cast<volatile int*>(c) = v; }
__device__ __forceinline__ float ld_l2(const float* a) { return __ldcg(a); }  // L2: other CTAs' adds
__device__ __forceinline__ void st_l2(float* a, float v) { __stcg(a, v); }
__device__ __forceinline__ void fence() { __threadfence(); }
#endif

// dS (this warp's 16 keys × BMQ queries, fp32 C fragments, transposed: rows = keys) of one (head h, query tile
// qt): staged as bf16 dSᵀ, multiplied by the key tile (dQ rows of 16 queries per warp, 64 columns at a time), and
// added to dq_acc after every visible key tile before this one (kt) has added.
template <int D, int NW, int BMQ, bool MASKS>
__device__ __forceinline__ void add_dq(const RetentionAttnParams& p, const RetentionAttnGrads& g, const bf16* sK,
                                       bf16* sDS, const float (&dp)[BMQ / 8][4], int b, int h, int qt, int kt,
                                       int warp, int lane) {
  constexpr int BN = NW * 16;
  const int q0 = qt * BMQ;
#pragma unroll
  for (int j = 0; j < BMQ / 8; ++j)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = warp * 16 + (lane >> 2) + 8 * hf, c = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(sDS + swz<BMQ>(r, c)) = pack_bf16(dp[j][2 * hf], dp[j][2 * hf + 1]);
    }
  // The visible key tiles before this one (contiguous runs are the common case, but any pattern is counted), by
  // warp 0, for thread 0.
  int want = kt;
  if (MASKS && warp == 0) {
    const RowBounds qb = row_bounds(p, b, q0, BMQ);
    int hidden = 0;
    for (int k = lane; k < kt; k += 32) hidden += bounds_invisible(p, qb, row_bounds(p, b, k * BN, BN)) ? 1 : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) hidden += __shfl_xor_sync(0xffffffffu, hidden, o);
    want = kt - hidden;
  }
  int* count = g.dq_count + (static_cast<int64_t>(b) * p.H + h) * ((p.S + BMQ - 1) / BMQ) + qt;
  __syncthreads();  // sDS complete
  if (threadIdx.x == 0) wait_count(count, want);
  __syncthreads();
  float* acc_rows = g.dq_acc + (static_cast<int64_t>(b) * p.H + h) * p.S * D;
#pragma unroll
  for (int c0 = 0; c0 < D; c0 += 64) {
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      uint32_t a[4];
      ld_a_t<BMQ>(a, sDS, warp * 16, ks * 16, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bk[4];
        ld_b_kn<D>(bk, sK, ks * 16, c0 + np * 16, lane);
        mma16816(acc[2 * np], a, bk[0], bk[1]);
        mma16816(acc[2 * np + 1], a, bk[2], bk[3]);
      }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = q0 + warp * 16 + (lane >> 2) + 8 * hf;
      if (r >= p.S) continue;
      float* row = acc_rows + static_cast<int64_t>(r) * D + c0 + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        st_l2(row + j * 8, ld_l2(row + j * 8) + acc[j][2 * hf]);
        st_l2(row + j * 8 + 1, ld_l2(row + j * 8 + 1) + acc[j][2 * hf + 1]);
      }
    }
  }
  fence();
  __syncthreads();
  if (threadIdx.x == 0) set_count(count, want + 1);
}

// dq = bf16(scale · dq_acc), one thread per pair of columns; and the zeroing of the accumulator and the counts.
__global__ void dq_from_acc_kernel(const RetentionAttnParams p, const RetentionAttnGrads g) {
  const int64_t pairs = static_cast<int64_t>(p.B) * p.H * p.S * (p.D / 2);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = 2 * i;
    const int c = static_cast<int>(e % p.D);
    const int64_t row = e / p.D;  // (b · H + h) · S + s
    const int s = static_cast<int>(row % p.S), bh = static_cast<int>(row / p.S);
    const int b = bh / p.H, h = bh % p.H;
    bf16* dst = static_cast<bf16*>(g.dq) + b * g.dq_sb + h * g.dq_sh + s * g.dq_ss + c;
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(g.dq_acc[e] * p.scale, g.dq_acc[e + 1] * p.scale);
  }
}
__global__ void zero_kernel(float* a, int64_t na, int* c, int64_t nc) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < na + nc;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < na) a[i] = 0.f;
    else c[i - na] = 0;
  }
}

// ------------------------------------------------------------------------------------------------------------
// dK, dV, dkey_rate, dkey_log_mask: one CTA per (key tile of NW·16 keys, KV head, batch), looping over the query
// tiles (BMQ rows) of every query head of the group. Works on transposed scores Sᵀ = K·Qᵀ (rows = keys).
//
// DQ (the one-pass backward): the CTA also forms dQ = dS·K for each query tile it visits, from dSᵀ staged in shared
// memory, and adds it to the fp32 accumulator g.dq_acc in a fixed order: for each (head, query tile) the key tiles
// that see it add in increasing order, each waiting until g.dq_count says that every visible key tile before it has
// added (a key tile waits only on key tiles of lower blockIdx.x, dispatched before it, so the waits always end). The
// query tiles are visited from the last down, heads innermost, so all the key tiles of a KV head reach a query tile
// at about the same iteration and only the adds are serialized. dq_from_acc_kernel then scales and rounds.
template <int D, int NW, int BMQ, bool BIAS, bool MASKS, bool DQ>
__global__ void __launch_bounds__(NW * 32) dkv_kernel(const RetentionAttnParams p, const RetentionAttnGrads g) {
  constexpr int BN = NW * 16, NT = NW * 32;
  static_assert(!DQ || (BN == BMQ && BMQ == NW * 16), "the one-pass dQ takes square tiles, 16 query rows per warp");
  KVD_DYNAMIC_SMEM(smem);
  bf16* sK = reinterpret_cast<bf16*>(smem);
  bf16* sV = sK + BN * D;
  bf16* sQ = sV + BN * D;        // 2 buffers
  bf16* sdO = sQ + 2 * BMQ * D;  // 2 buffers
  float* sQpos = reinterpret_cast<float*>(sdO + 2 * BMQ * D);
  int* sQdoc = reinterpret_cast<int*>(sQpos + 2 * BMQ);
  float* sLse2 = reinterpret_cast<float*>(sQdoc + 2 * BMQ);
  float* sDelta = sLse2 + 2 * BMQ;
  bf16* sDS = reinterpret_cast<bf16*>(sDelta + 2 * BMQ);  // DQ: dSᵀ (BN keys × BMQ queries), swizzled rows of BMQ

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int k0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int S = p.S, G = p.H / p.Hkv;
  const bf16* gk = static_cast<const bf16*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const bf16* gv = static_cast<const bf16*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int* gpos = p.pos + static_cast<int64_t>(b) * S;
  const int* gdoc = p.doc ? p.doc + static_cast<int64_t>(b) * S : nullptr;

  // This thread's keys: k0 + warp·16 + lane/4 + 8·hf.
  int krow[2], kdoc[2];
  float kpos[2], rate2[2], mask2[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = k0 + warp * 16 + (lane >> 2) + hf * 8;
    const bool ok = r < S;
    krow[hf] = r;
    kpos[hf] = ok ? static_cast<float>(gpos[r]) : 0.f;
    kdoc[hf] = gdoc ? (ok ? gdoc[r] : INT_MIN) : 0;
    rate2[hf] = ok && p.key_rate ? p.key_rate[b * p.kr_sb + hk * p.kr_sh + r] * kLog2e : 0.f;
    mask2[hf] = ok && p.key_log_mask ? p.key_log_mask[b * p.km_sb + hk * p.km_sh + r] * kLog2e : 0.f;
  }

  const int nqt = (S + BMQ - 1) / BMQ;
  const int qt0 = k0 / BMQ;  // causal: the first query that sees key k0 is row k0
  const int per_head = nqt - qt0;
  const int iters = G * per_head;
  // Iteration it's head and query tile: every query tile of one head after the other, or (DQ) the query tiles from
  // the last down with the heads of the group innermost.
  auto head_of = [&](int it) { return hk * G + (DQ ? it % G : it / per_head); };
  auto qtile_of = [&](int it) { return DQ ? nqt - 1 - it / G : qt0 + it % per_head; };

  auto load_q = [&](int it, int buf) {
    const int h = head_of(it);
    const int q0 = qtile_of(it) * BMQ;
    const bf16* gq = static_cast<const bf16*>(p.q) + b * p.q_sb + h * p.q_sh;
    const bf16* gdo = static_cast<const bf16*>(g.dout) + b * g.do_sb + h * g.do_sh;
    load_tile<D, BMQ, NT>(sQ + buf * BMQ * D, gq, p.q_ss, q0, S);
    load_tile<D, BMQ, NT>(sdO + buf * BMQ * D, gdo, g.do_ss, q0, S);
    if (tid < BMQ) {
      const int r = q0 + tid;
      const bool ok = r < S;
      const int64_t row = (static_cast<int64_t>(b) * p.H + h) * S + r;
      sQpos[buf * BMQ + tid] = ok ? static_cast<float>(gpos[r]) : 0.f;
      sQdoc[buf * BMQ + tid] = gdoc ? (ok ? gdoc[r] : INT_MAX) : 0;
      const float ls = ok ? p.lse[row] : -INFINITY;
      sLse2[buf * BMQ + tid] = ls == -INFINITY ? INFINITY : ls * kLog2e;
      sDelta[buf * BMQ + tid] = ok ? g.delta[row] : 0.f;
    }
  };

  // The next iteration at or after it whose query tile may see a key of this tile (the same for every head).
  auto next_it = [&](int it) {
    if (MASKS)
      while (it < iters && tiles_invisible(p, b, qtile_of(it) * BMQ, BMQ, k0, BN)) ++it;
    return it;
  };
  int it = next_it(0);
  load_tile<D, BN, NT>(sK, gk, p.k_ss, k0, S);
  load_tile<D, BN, NT>(sV, gv, p.v_ss, k0, S);
  if (it < iters) load_q(it, 0);
  cp_async_commit();

  float adk[D / 8][4], adv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) adk[j][e] = adv[j][e] = 0.f;
  float grate[2] = {0.f, 0.f}, gmask[2] = {0.f, 0.f};
  const float scale2 = p.scale * kLog2e;
  const float window = p.window > 0 ? static_cast<float>(p.window) : INFINITY;
  const float delay = static_cast<float>(p.mask_delay);

  for (int buf = 0; it < iters; buf ^= 1) {
    const int it_next = next_it(it + 1);
    if (it_next < iters) {
      load_q(it_next, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* cQ = sQ + buf * BMQ * D;
    const bf16* cdO = sdO + buf * BMQ * D;
    const float* cpos = sQpos + buf * BMQ;
    const int* cdoc = sQdoc + buf * BMQ;
    const float* clse = sLse2 + buf * BMQ;
    const float* cdel = sDelta + buf * BMQ;
    const int q0 = qtile_of(it) * BMQ;

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (rows = this warp's 16 keys, cols = BMQ queries)
    float s[BMQ / 8][4], dp[BMQ / 8][4];
#pragma unroll
    for (int j = 0; j < BMQ / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t ak[4], av[4];
      ld_a<D>(ak, sK, warp * 16, ks * 16, lane);
      ld_a<D>(av, sV, warp * 16, ks * 16, lane);
#pragma unroll
      for (int np = 0; np < BMQ / 16; ++np) {
        uint32_t bq[4], bd[4];
        ld_b_nk<D>(bq, cQ, np * 16, ks * 16, lane);
        ld_b_nk<D>(bd, cdO, np * 16, ks * 16, lane);
        mma16816(s[2 * np], ak, bq[0], bq[1]);
        mma16816(s[2 * np + 1], ak, bq[2], bq[3]);
        mma16816(dp[2 * np], av, bd[0], bd[1]);
        mma16816(dp[2 * np + 1], av, bd[2], bd[3]);
      }
    }

    const bool check = q0 < k0 + BN - 1;  // some query of the tile precedes some key
#pragma unroll
    for (int j = 0; j < BMQ / 8; ++j)
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const int c = j * 8 + (lane & 3) * 2 + e1;
        const int qi = q0 + c;
        const float qp = cpos[c];
        const int qd = cdoc[c];
        const float ls = clse[c], de = cdel[c];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const float x = score2<BIAS, MASKS>(s[j][2 * hf + e1], scale2, qi, qp, qd, krow[hf], kpos[hf], kdoc[hf],
                                              rate2[hf], mask2[hf], check, window, delay);
          const float pr = fast_exp2(x - ls);
          const float ds = pr * (dp[j][2 * hf + e1] - de);
          s[j][2 * hf + e1] = pr;
          dp[j][2 * hf + e1] = ds;
          if (BIAS) {
            grate[hf] = fmaf(ds, fmaxf(qp - kpos[hf], 0.f), grate[hf]);
            gmask[hf] += (delay > 0.f ? qp - kpos[hf] > delay : qi != krow[hf]) ? ds : 0.f;
          }
        }
      }

    // dV += Pᵀ·dO, dK += dSᵀ·Q
#pragma unroll
    for (int ks = 0; ks < BMQ / 16; ++ks) {
      uint32_t ap[4], as[4];
      ap[0] = pack_bf16(s[2 * ks][0], s[2 * ks][1]);
      ap[1] = pack_bf16(s[2 * ks][2], s[2 * ks][3]);
      ap[2] = pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]);
      ap[3] = pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3]);
      as[0] = pack_bf16(dp[2 * ks][0], dp[2 * ks][1]);
      as[1] = pack_bf16(dp[2 * ks][2], dp[2 * ks][3]);
      as[2] = pack_bf16(dp[2 * ks + 1][0], dp[2 * ks + 1][1]);
      as[3] = pack_bf16(dp[2 * ks + 1][2], dp[2 * ks + 1][3]);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bd[4], bq[4];
        ld_b_kn<D>(bd, cdO, ks * 16, np * 16, lane);
        ld_b_kn<D>(bq, cQ, ks * 16, np * 16, lane);
        mma16816(adv[2 * np], ap, bd[0], bd[1]);
        mma16816(adv[2 * np + 1], ap, bd[2], bd[3]);
        mma16816(adk[2 * np], as, bq[0], bq[1]);
        mma16816(adk[2 * np + 1], as, bq[2], bq[3]);
      }
    }
    if constexpr (DQ) add_dq<D, NW, BMQ, MASKS>(p, g, sK, sDS, dp, b, head_of(it), qtile_of(it), blockIdx.x, warp,
                                                   lane);
    __syncthreads();
    it = it_next;
  }

#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float gr = grate[hf], gm = gmask[hf];
    gr += __shfl_xor_sync(0xffffffffu, gr, 1);
    gr += __shfl_xor_sync(0xffffffffu, gr, 2);
    gm += __shfl_xor_sync(0xffffffffu, gm, 1);
    gm += __shfl_xor_sync(0xffffffffu, gm, 2);
    const int r = krow[hf];
    if (r >= S) continue;
    bf16* gdk = static_cast<bf16*>(g.dk) + b * g.dk_sb + hk * g.dk_sh + r * g.dk_ss;
    bf16* gdv = static_cast<bf16*>(g.dv) + b * g.dv_sb + hk * g.dv_sh + r * g.dv_ss;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int c = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<__nv_bfloat162*>(gdk + c) =
          __floats2bfloat162_rn(adk[j][2 * hf] * p.scale, adk[j][2 * hf + 1] * p.scale);
      *reinterpret_cast<__nv_bfloat162*>(gdv + c) = __floats2bfloat162_rn(adv[j][2 * hf], adv[j][2 * hf + 1]);
    }
    if ((lane & 3) == 0) {
      const int64_t kidx = (static_cast<int64_t>(b) * p.Hkv + hk) * S + r;
      if (g.dkey_rate) g.dkey_rate[kidx] = p.key_rate ? gr : 0.f;
      if (g.dkey_log_mask) g.dkey_log_mask[kidx] = p.key_log_mask ? gm : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Launch configurations.
constexpr int kFwdNW = 4, kFwdMT = 2;  // 128 query rows per CTA, 32 per warp
constexpr int kDqNW = 4, kDqMT = 2, kDqBN = 32;  // 128 query rows per CTA, 32 per warp, 32-key tiles
constexpr int kDkvNW = 4, kDkvBMQ = 64;  // 64 keys per CTA, 64-query tiles

template <int D>
constexpr size_t fwd_smem() {
  return (kFwdNW * 16 * kFwdMT * D + 4 * kBN * D) * sizeof(bf16) + 8 * kBN * 4;
}
template <int D>
constexpr size_t dq_smem() {
  return (2 * kDqNW * 16 * kDqMT * D + 4 * kDqBN * D) * sizeof(bf16) + 8 * kDqBN * 4;
}
template <int D>
constexpr size_t dkv_smem(bool dq) {
  return (2 * kDkvNW * 16 * D + 4 * kDkvBMQ * D) * sizeof(bf16) + 8 * kDkvBMQ * 4 +
         (dq ? kDkvNW * 16 * kDkvBMQ * sizeof(bf16) : 0);
}

cudaError_t row_blocks_launch(const RetentionAttnParams& p, cudaStream_t st) {
  if (!p.row_blocks) return cudaErrorInvalidValue;
  KVD_LAUNCH(row_blocks_kernel, dim3((p.S + kRowBlock - 1) / kRowBlock, p.B), kRowBlock, 0, st, p);
  return KVD_LAST_ERROR();
}

template <int D, bool BIAS, bool MASKS>
cudaError_t fwd_launch(const RetentionAttnParams& p, cudaStream_t st) {
  if (MASKS)
    if (cudaError_t e = row_blocks_launch(p, st); e != cudaSuccess) return e;
  auto kernel = fwd_kernel<D, kFwdNW, kFwdMT, BIAS, MASKS>;
  constexpr size_t sm = fwd_smem<D>();
  if (cudaError_t e = allow_smem(kernel, sm); e != cudaSuccess) return e;
  constexpr int BM = kFwdNW * 16 * kFwdMT;
  dim3 grid((p.S + BM - 1) / BM, p.H, p.B);
  KVD_LAUNCH(kernel, grid, kFwdNW * 32, sm, st, p);
  return KVD_LAST_ERROR();
}

template <int D, bool BIAS, bool MASKS>
cudaError_t bwd_launch(const RetentionAttnParams& p, const RetentionAttnGrads& g, cudaStream_t st) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.S;
  if (MASKS)
    if (cudaError_t e = row_blocks_launch(p, st); e != cudaSuccess) return e;
  if (g.passes & kRetentionBwdDelta) {
    KVD_LAUNCH(delta_kernel, static_cast<unsigned>((rows * 32 + 255) / 256), 256, 0, st, p, g);
    if (cudaError_t e = KVD_LAST_ERROR(); e != cudaSuccess) return e;
  }
  // One pass: dQ accumulated by the dK/dV kernel itself (g.dq_acc given, both gradients wanted).
  const bool one_pass = g.dq_acc && (g.passes & kRetentionBwdDq) && (g.passes & kRetentionBwdDkv);
  if ((g.passes & kRetentionBwdDq) && !one_pass) {
    auto kdq = dq_kernel<D, kDqNW, kDqMT, kDqBN, BIAS, MASKS>;
    constexpr size_t smq = dq_smem<D>();
    if (cudaError_t e = allow_smem(kdq, smq); e != cudaSuccess) return e;
    constexpr int BM = kDqNW * 16 * kDqMT;
    KVD_LAUNCH(kdq, dim3((p.S + BM - 1) / BM, p.H, p.B), kDqNW * 32, smq, st, p, g);
    if (cudaError_t e = KVD_LAST_ERROR(); e != cudaSuccess) return e;
  }
  if (!(g.passes & kRetentionBwdDkv)) return cudaSuccess;
  constexpr int BN = kDkvNW * 16;
  const dim3 grid((p.S + BN - 1) / BN, p.Hkv, p.B);
  if (!one_pass) {
    auto kkv = dkv_kernel<D, kDkvNW, kDkvBMQ, BIAS, MASKS, false>;
    const size_t smk = dkv_smem<D>(false);
    if (cudaError_t e = allow_smem(kkv, smk); e != cudaSuccess) return e;
    KVD_LAUNCH(kkv, grid, kDkvNW * 32, smk, st, p, g);
    return KVD_LAST_ERROR();
  }
  const int64_t n_acc = static_cast<int64_t>(p.B) * p.H * p.S * p.D;
  const int64_t n_count = static_cast<int64_t>(p.B) * p.H * ((p.S + kDkvBMQ - 1) / kDkvBMQ);
  KVD_LAUNCH(zero_kernel, static_cast<unsigned>(std::min<int64_t>((n_acc + n_count + 255) / 256, 4096)), 256, 0, st,
             g.dq_acc, n_acc, g.dq_count, n_count);
  if (cudaError_t e = KVD_LAST_ERROR(); e != cudaSuccess) return e;
  auto kkv = dkv_kernel<D, kDkvNW, kDkvBMQ, BIAS, MASKS, true>;
  const size_t smk = dkv_smem<D>(true);
  if (cudaError_t e = allow_smem(kkv, smk); e != cudaSuccess) return e;
  KVD_LAUNCH(kkv, grid, kDkvNW * 32, smk, st, p, g);
  if (cudaError_t e = KVD_LAST_ERROR(); e != cudaSuccess) return e;
  KVD_LAUNCH(dq_from_acc_kernel, static_cast<unsigned>(std::min<int64_t>((n_acc / 2 + 255) / 256, 4096)), 256, 0, st,
             p, g);
  return KVD_LAST_ERROR();
}

template <template <int, bool, bool> class F, typename... A>
cudaError_t dispatch(const RetentionAttnParams& p, A&&... a) {
  const bool bias = p.key_rate || p.key_log_mask;
  const bool masks = p.doc || p.window > 0;
#define KVD_RA_CASE(DD, BB, MM) \
  if (p.D == DD && bias == BB && masks == MM) return F<DD, BB, MM>::run(p, a...);
  KVD_RA_CASE(64, false, false)
  KVD_RA_CASE(64, false, true)
  KVD_RA_CASE(64, true, false)
  KVD_RA_CASE(64, true, true)
  KVD_RA_CASE(128, false, false)
  KVD_RA_CASE(128, false, true)
  KVD_RA_CASE(128, true, false)
  KVD_RA_CASE(128, true, true)
#undef KVD_RA_CASE
  return cudaErrorInvalidValue;
}

template <int D, bool BIAS, bool MASKS>
struct FwdOp {
  static cudaError_t run(const RetentionAttnParams& p, cudaStream_t st) { return fwd_launch<D, BIAS, MASKS>(p, st); }
};
template <int D, bool BIAS, bool MASKS>
struct BwdOp {
  static cudaError_t run(const RetentionAttnParams& p, const RetentionAttnGrads& g, cudaStream_t st) {
    return bwd_launch<D, BIAS, MASKS>(p, g, st);
  }
};

bool valid(const RetentionAttnParams& p) {
  return p.B > 0 && p.H > 0 && p.Hkv > 0 && p.H % p.Hkv == 0 && p.S > 0 && (p.D == 64 || p.D == 128) && p.q &&
         p.k && p.v && p.out && p.lse && p.pos;
}

}  // namespace

cudaError_t retention_attention_fwd(const RetentionAttnParams& p, cudaStream_t stream) {
  if (!valid(p)) return cudaErrorInvalidValue;
  return dispatch<FwdOp>(p, stream);
}

cudaError_t retention_attention_bwd(const RetentionAttnParams& p, const RetentionAttnGrads& g, cudaStream_t stream) {
  if (!valid(p) || !g.dout || !g.delta) return cudaErrorInvalidValue;
  if (((g.passes & kRetentionBwdDq) && !g.dq) || ((g.passes & kRetentionBwdDkv) && (!g.dk || !g.dv)))
    return cudaErrorInvalidValue;
  return dispatch<BwdOp>(p, g, stream);
}

}  // namespace KVD_RA_NAMESPACE
