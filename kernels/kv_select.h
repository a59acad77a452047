// Eviction kernels (kernels/kv_select.cuh) for LibTorch callers: per-(request, KV head) selection of the entries to
// keep and in-place compaction, plus the CPU references they are tested against. The selection rule (protected
// entries, then higher scores, NaN lowest, ties to the lower index) is written out in kv_select.cuh.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kvd {

enum class RowSelectMode { TopK, Threshold };

struct RowSelectSpec {
  RowSelectMode mode = RowSelectMode::TopK;
  int64_t keep = 0;        // TopK: kept per (request, head); with `keeps`, a bound on each of them when > 0
  at::Tensor keeps;        // TopK, ragged budgets: (B, H) integer, clamped to `keep` when keep > 0 (then the
                           // output's capacity is known without reading keeps back from the device)
  double threshold = 0.0;  // Threshold: keep scores >= threshold
  int64_t sinks = 0;       // always kept: index < sinks
  int64_t recent = 0;      // always kept: index >= length − recent
  at::Tensor lengths;      // (B) integer: entries of each request (right padding beyond); undefined = n
};

struct RowSelection {
  at::Tensor indices;  // (B, H, capacity) int32, ascending; entries past counts[b, h] are unspecified
  at::Tensor counts;   // (B, H) int32
};

// Whether the fused kernels run for t: a build with the CUDA kernels and t on a CUDA device.
bool kv_select_fused_available(const at::Tensor& t);

// scores (B, H, n) float32. capacity = n for Threshold, else `keep` when > 0, else the largest of `keeps` (one read
// back from the device), clamped to n.
RowSelection select_rows_fused(const at::Tensor& scores, const RowSelectSpec& spec);
RowSelection select_rows_reference(const at::Tensor& scores, const RowSelectSpec& spec);  // CPU, any device in

// In place: cache (B, H, n, ...) contiguous, any dtype; row indices[b, h, j] moves to row j for j < counts[b, h].
void compact_rows_fused(at::Tensor& cache, const RowSelection& sel);
// K and V (same shape and dtype) in one launch.
void compact_rows_fused(at::Tensor& k, at::Tensor& v, const RowSelection& sel);
void compact_rows_reference(at::Tensor& cache, const RowSelection& sel);

// TRIM-KV's retention score of one layer: hidden (B, n, D) float / bf16 / f16 on CUDA; w1 (G, D), b1 (G),
// w2 (H, G), bias (H) float32; positions (B, n) or (n) int64, or undefined for log β alone. Returns (B, H, n).
at::Tensor retention_score_fused(const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& bias, const at::Tensor& positions,
                                 int64_t next_position);

}  // namespace kvd
