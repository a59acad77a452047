// Inference kernels for eviction (framework-free launchers; the LibTorch binding is kernels/kv_select.{h,cpp}, the
// C runtime calls these directly): TRIM-KV's retention score from the attention input, per-segment selection of
// the entries to keep, and in-place compaction of a flat or paged cache.
//
// A segment is one (request, KV head) of one layer: s = b · H + h. Every launcher queues work on `stream` and
// returns the launch's error; nothing synchronizes.
//
// Selection (select_rows): for each segment, the entries to keep, written ascending. Order of preference:
//   1. protected entries (index < sinks, or index >= len − recent), always kept;
//   2. higher scores; NaN ranks below every number, −0 equals +0;
//   3. among equal scores, the lower index (kvdistill's selectors and std::stable_sort agree on this).
// TopK keeps min(keep, len) entries; Threshold keeps the protected entries and every score >= threshold.
// One CTA per segment: a radix select over order-preserving 32-bit keys (4 passes of 8 bits) finds the k-th key,
// then one pass in index order writes the kept indices (block-wide ballot scans), so the output needs no sort.
//
// Compaction (compact_rows): for each segment, row indices[j] moves to row j, for j < count, in place. Indices
// must be ascending (select_rows' output), so indices[j] >= j: a CTA walks its segment's rows in chunks, loading a
// whole chunk before storing it, and no store can reach a row that a later chunk still has to read. A CTA moves
// whole rows of up to 512 bytes (wider rows are split into 512-byte columns over several CTAs). An index outside
// [0, len) is skipped: the kernel never touches memory outside its segment. With base2, a second cache of the same
// geometry (V next to K) is compacted by the same launch.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvd::kernels {

enum class RowDType : int { F32 = 0, BF16 = 1, F16 = 2 };

// One layer of TRIM-KV's retention gate, on the device, fp32:
//   log β_h(x) = log_sigmoid(w2_h · silu(W1 x + b1) + bias_h)
struct RetentionGateDevice {
  const float* w1t = nullptr;   // (D, G): W1 transposed
  const float* b1 = nullptr;    // (G)
  const float* w2 = nullptr;    // (H, G)
  const float* bias = nullptr;  // (H)
  int D = 0, G = 0, H = 0;      // G <= kMaxGateWidth
};
constexpr int kMaxGateWidth = 1024;

// hidden (B, n, D) contiguous rows of `dtype`; out (B, H, n) fp32.
// positions == nullptr: out = log β. Otherwise out = log β · (next_position + 1 − pos), with pos =
// positions[b · positions_batch_stride + i] (stride 0: one (n) vector for every request).
cudaError_t retention_score(const void* hidden, RowDType dtype, int B, int64_t n, const RetentionGateDevice& gate,
                            const int64_t* positions, int64_t positions_batch_stride, int64_t next_position,
                            float* out, cudaStream_t stream);

enum class SelectMode : int { TopK = 0, Threshold = 1 };

struct SelectArgs {
  const float* scores = nullptr;  // segment s: scores + s · score_stride
  int64_t score_stride = 0;
  int num_segments = 0;
  int heads = 1;                   // H: segment s is request s / H, head s % H
  int64_t n = 0;                   // entries per segment (lengths == nullptr)
  const int32_t* lengths = nullptr;  // (B) entries of each request, or nullptr
  SelectMode mode = SelectMode::TopK;
  int64_t keep = 0;                // TopK: kept per segment (keeps == nullptr)
  const int32_t* keeps = nullptr;  // (S) kept per segment (ragged budgets), or nullptr
  float threshold = 0.f;           // Threshold: keep scores >= threshold
  int64_t sinks = 0, recent = 0;   // protected: index < sinks or index >= len − recent
  int32_t* indices = nullptr;      // segment (b, h) writes at indices + b · out_b_stride + h · out_h_stride
  int64_t out_b_stride = 0, out_h_stride = 0;
  int32_t* counts = nullptr;       // (S) entries kept, or nullptr
};
cudaError_t select_rows(const SelectArgs& a, cudaStream_t stream);

struct CompactArgs {
  void* base = nullptr;            // flat: segment s's rows at base + s · segment_rows · row_bytes
  int64_t row_bytes = 0;
  int64_t segment_rows = 0;        // flat
  int num_segments = 0;
  int heads = 1;                   // H: segment s is request s / H, head s % H
  int64_t n = 0;                   // rows per segment before compaction (indices must lie below)
  // Paged (block_table != nullptr): token i of request b lives in block block_table[b · block_table_stride +
  // i / tokens_per_block], slot i % tokens_per_block, head h at base + ((block · H + h) · tokens_per_block + slot) ·
  // row_bytes. The table must map every token below n.
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int tokens_per_block = 0;
  const int32_t* indices = nullptr;  // segment (b, h)'s at indices + b · idx_b_stride + h · idx_h_stride
  int64_t idx_b_stride = 0, idx_h_stride = 0;
  int64_t keep = 0;                  // rows kept per segment (counts == nullptr)
  const int32_t* counts = nullptr;   // (S) rows kept per segment, or nullptr
  void* base2 = nullptr;             // a second cache laid out like base (e.g. V next to K), or nullptr
};
cudaError_t compact_rows(const CompactArgs& a, cudaStream_t stream);

}  // namespace kvd::kernels
