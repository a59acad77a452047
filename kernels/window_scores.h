// Column statistics of an observation window's attention (kernels/window_scores.cuh) for LibTorch callers: for w
// query rows and a layer's n cached entries, per request b, query
// head h and entry j, the sum over the rows of the softmax probability P[b, h, i, j] (and of its square, or
// instead the maximum over the rows, each row's P scaled by a weight), where
// row i sees the entries with k_pos <= q_pos[i] that are valid. Scorers that rank entries by window attention
// (SnapKV, PyramidKV, TOVA, H2O, the eval's hit-rate oracle) need only these sums, never P itself. Their
// dispatcher, with the LibTorch reference it falls back to, is gates/heuristics.h's window_columns.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace kvd {

enum class WindowMoments {
  Sum,            // Σ_i P
  SumAndSquares,  // Σ_i P and Σ_i P² (a variance over the rows)
  Max,            // max_i P · row_weight[b, i] (KVzip's max-pooled reconstruction attention)
  MaxAndPlain,    // Max, and max_i P without the row weights (KVzip's and KVzip+'s scores from one pass)
};

struct WindowScoresInput {
  at::Tensor q;      // (B, H, w, hd) post-RoPE queries of the window rows
  at::Tensor q_pos;  // (B, w) int64 their positions
  at::Tensor k;      // (B, H_kv, n, hd) the layer's cached keys
  at::Tensor k_pos;  // (B, H_kv, n) int64 their positions
  at::Tensor valid;  // (B, H_kv, n) bool, or undefined: every entry valid
  at::Tensor row_weight;  // (B, w) float, WindowMoments::Max / MaxAndPlain only: each row's P scaled by it; undefined: 1
};

// float32; the LibTorch reference (gates/heuristics.h window_columns) computes a float64 q in float64.
struct WindowColumns {
  at::Tensor sum;    // (B, H, n) float32
  at::Tensor sumsq;  // (B, H, n) float32, with WindowMoments::SumAndSquares only
  at::Tensor max;    // (B, H, n) float32, with WindowMoments::Max / MaxAndPlain (sum is then undefined); 0 where no
                     // row sees j
  at::Tensor max_plain;  // (B, H, n) float32, with WindowMoments::MaxAndPlain only: max_i P, no row weights
};

// Whether window_columns_fused runs for `in`: a build with the CUDA kernels, CUDA tensors, bf16 q and k, head dim
// 64 or 128, H / H_kv <= 16, k's rows contiguous and 16-byte aligned.
bool window_scores_fused_available(const WindowScoresInput& in);

// The fused kernel: no (w, n) tensor in global memory; deterministic. A row that sees nothing adds 0.
WindowColumns window_columns_fused(const WindowScoresInput& in, WindowMoments moments);

}  // namespace kvd
