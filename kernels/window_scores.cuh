// Column statistics of an observation window's attention, without a (w, n) probability tensor in global memory
// (framework-free launcher; the LibTorch binding and the reference are kernels/window_scores.{h,cpp}).
//
// For w query rows (the last rows of a prompt, or a query-row method's soft rows) and the n entries of one
// layer's cache, per request b, query head h and entry j:
//   sum[b, h, j]   = Σ_i P[b, h, i, j]
//   sumsq[b, h, j] = Σ_i P[b, h, i, j]²   (when asked)
// or, in max mode, sum[b, h, j] = max_i P[b, h, i, j] · row_w[b, i] (row_w optional: 1), and, when asked,
//   max_plain[b, h, j] = max_i P[b, h, i, j]   (KVzip's and KVzip+'s scores from one pass)
// where P[b, h, i, ·] = softmax_j(scale · <Q[b, h, i], K[b, h / G, j]>) over the entries row i sees:
// kpos[b, h / G, j] <= qpos[b, i] and valid[b, h / G, j]. A row that sees nothing adds 0. G = H / H_kv.
//
// Three launches, all deterministic (fixed reduction orders, no atomics):
//   1. stats   grid (chunks, B · H_kv, row blocks): per row, the max and the sum of exp of its scores over one
//              chunk of entries;
//   2. merge   one warp per row: the chunks' (max, sum) into the row's (max, 1 / sum);
//   3. columns grid (entry tiles of 64, B · H_kv): for one tile, P of every row recomputed from its scores and
//              the row's (max, 1 / sum), summed over the rows in row order (or their maximum taken).
// Rows of one (request, KV head) are r = g · wp + i: query head h_kv · G + g, window row i, with wp = w rounded up
// to 16 so that the 16 rows of a warp belong to one head. A block is 64 rows (4 warps). Scores come from
// mma.sync (bf16 in, fp32 accumulate), both passes through the same code, so the two passes see the same
// scores bit for bit.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvd::kernels {

constexpr int kWindowMaxGroup = 16;  // G = H / H_kv up to this

struct WindowScoresArgs {
  const uint16_t* q = nullptr;     // (B, H, w, hd) contiguous bf16
  const uint16_t* k = nullptr;     // entry j of (b, h_kv) at k + b · k_sb + h_kv · k_sh + j · hd (bf16 rows)
  int64_t k_sb = 0, k_sh = 0;      // in elements; rows 16-byte aligned
  const int64_t* qpos = nullptr;   // (B, w) contiguous
  const int64_t* kpos = nullptr;   // (b, h_kv, j) at kpos + b · p_sb + h_kv · p_sh + j
  int64_t p_sb = 0, p_sh = 0;
  const bool* valid = nullptr;     // optional, (b, h_kv, j) at valid + b · v_sb + h_kv · v_sh + j
  int64_t v_sb = 0, v_sh = 0;
  int B = 0, H = 0, Hkv = 0, hd = 0, w = 0;  // hd 64 or 128; H / H_kv <= kWindowMaxGroup
  int64_t n = 0;                   // entries per (request, KV head)
  float scale = 1.f;
  int chunks = 1;                  // pass 1's entry chunks per (request, KV head); window_scores_chunks
  float* part_ml = nullptr;        // workspace (chunks, B · H · w, 2) fp32
  float* row_ml = nullptr;         // workspace (B · H · w, 2) fp32
  float* sum = nullptr;            // (B, H, n) fp32
  float* sumsq = nullptr;          // (B, H, n) fp32, or nullptr: not computed
  int max_mode = 0;                // != 0: `sum` receives max_i P · row_w[b, i] instead of Σ_i P (no sumsq)
  float* max_plain = nullptr;      // (B, H, n) fp32, max mode only, or nullptr: also max_i P without row_w
  const float* row_w = nullptr;    // (B, w) fp32, optional in max mode: 1 where absent
};

// Pass 1's chunks: about 1,056 CTAs (8 per SM of 132) without chunks shorter than one 64-entry tile.
int window_scores_chunks(int B, int H, int Hkv, int w, int64_t n);

cudaError_t window_scores(const WindowScoresArgs& a, cudaStream_t stream);

}  // namespace kvd::kernels
