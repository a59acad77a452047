// The attention math of the decoder, in one place: the fused calls (grouped SDPA), the explicit grouped softmax
// of a whole-sequence forward with a learned part's biases (retention decay, per-key log-masks, pair biases)
// and its statistics, and the explicit probabilities the scorers and the decode-time evictors read (queries
// against cached keys by stored position). Fused kernels bind here.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "models/attention_mods.h"
#include "models/kv_cache.h"

namespace kvd {

// Scaled dot-product attention with grouped K/V heads: q (B, H, T, hd), k / v (B, H_kv, n, hd) with H a
// multiple of H_kv (query head h reads KV head h / (H / H_kv)), mask undefined or boolean (true = visible),
// broadcastable to (B, H, T, n). Returns (B, H, T, hd). Unmasked calls run flash attention, which groups heads
// itself; masked ones on CUDA run the memory-efficient kernel on K/V repeated to H heads.
at::Tensor grouped_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                        bool causal, double scale);

// Turns PyTorch's cuDNN attention backend off for the process; Model does this when it is loaded on CUDA
// (unless KVD_CUDNN_ATTENTION=1). Measured on an H100 (bench/cudnn_attention.sh, one batch of 16 samples at
// 2K): with cuDNN's attention on, the eval decoded AdaKV's per-head-ragged caches in 19.1 s instead of 1.0 s,
// SnapKV's in 3.0 s instead of 1.0 s, the full cache in 5.4 s instead of 1.1 s. Every decode step brings new
// key lengths, one per layer, and cuDNN plans per shape; an isolated loop of such calls did not show the
// slowdown, so its exact trigger is not pinned down.
void disable_cudnn_attention();

// ---- a chunk of tokens into the cache ----------------------------------------------------------------------

// How a chunk of T tokens attends on CUDA where it is not a plain causal prefill: rows of different lengths
// (left-padded: row b's first lead[b] of T rows are padding, not stored), or a cache that already holds entries
// (a continuation: the rest of a prompt after compression, a teacher-forced answer, KVzip's repeated context),
// whose heads may hold different counts.
enum class ChunkAttention {
  Flash,  // the default: flash attention's variable-length form (GQA and the causal skip inside the kernel;
          // bf16 / fp16, head dim a multiple of 8 up to 256, no sliding window). Into an empty layer: the rows'
          // real tokens packed end to end. Over stored entries: every head's segment of the cache read in place
          // (KVLayerSegments), no padded copy, no mask, no K/V repeated to H heads. Padding rows get 0.
  Masked  // the memory-efficient kernel under a position mask, on K/V padded to the longest head (one gather of
          // a ragged layer per forward) and repeated to H heads (kept for A/B runs)
};
// Process-wide; starts as Masked when the environment sets KVD_CHUNK_ATTENTION=masked, else Flash.
void set_chunk_attention(ChunkAttention a);
ChunkAttention chunk_attention();

// The real tokens of a left-padded (B, T) chunk, packed in row order: index (total) int64 into the flattened
// (B * T) rows, cu_seqlens (B + 1) int32 (row b's tokens are packed rows cu[b] .. cu[b+1]), the longest row.
struct PackedRows {
  at::Tensor index, cu_seqlens;
  int64_t max_len = 0, total = 0;
};
PackedRows pack_left_padded(const std::vector<int64_t>& lead, int64_t T, c10::Device device);
// Whether the flash paths below take queries of this device, dtype and head dim, for a model with(out) a sliding
// window.
bool varlen_flash_applies(c10::Device device, c10::ScalarType dtype, int64_t head_dim, bool sliding_window);
// Causal attention of each row's real tokens among themselves: q (B, H, T, hd), k / v (B, H_kv, T, hd) left-padded
// as `rows` describes, H a multiple of H_kv. Returns (B, H, T, hd) with zeros at padding rows. CUDA only.
at::Tensor varlen_causal_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PackedRows& rows,
                               double scale);
// A chunk's attention into the cache layer it was just appended to, read in place: q (B, H, T, hd) for the
// chunk's T rows; head row r = b * H_kv + h of `seg` holds its earlier entries, then the chunk's real tokens
// (its last ones). Query t of row b sees its head's first len[r] - T + t + 1 entries: every earlier entry and
// the chunk causally (bottom-right alignment, what positions give when the chunk follows every stored entry);
// a padding row sees fewer, down to none (output 0). Each KV head's G = H / H_kv query heads run as one sequence
// of the variable-length batch. Returns (B, H, T, hd). CUDA only.
at::Tensor segment_causal_flash(const at::Tensor& q, const KVLayerSegments& seg, double scale);
// The attention of n > 1 rows that follow every stored entry without being stored (Model::forward_extra,
// ExtraPlacement::AfterCache): each row sees every entry of its head's segment and the rows up to itself. Two flash
// calls, the segments read in place (non-causal) and the rows among themselves (causal), merged by their
// log-sum-exps in float32. q (B, H, n, hd), k_rows / v_rows (B, H_kv, n, hd). Returns (B, H, n, hd). CUDA only.
at::Tensor segment_then_rows_flash(const at::Tensor& q, const KVLayerSegments& seg, const at::Tensor& k_rows,
                                   const at::Tensor& v_rows, double scale);

// ---- whole-sequence (training) attention -------------------------------------------------------------------

// Which keys a row may see in a whole-sequence forward: key j is visible to query row i iff j <= i (row
// order), both rows are in the same document, and (with a sliding window w) pos_i - pos_j < w.
struct SequenceMask {
  at::Tensor positions;  // (B, S) int64
  at::Tensor doc_ids;    // (B, S) int64 or undefined
  std::optional<int64_t> window;
  int64_t S = 0;
  at::Tensor bool_mask;  // (B, 1, S, S) lazily built for the SDPA path

  bool plain_causal() const { return !doc_ids.defined() && !window; }
  // (B, Sq, S) bool: may query row q_rows[b, i] (B, Sq) int64 see key j?
  at::Tensor visible(const at::Tensor& q_rows) const;
  // (B, 1, S, S) bool for every row, built once.
  const at::Tensor& sdpa_mask();
};

// Additive bias (B, H_kv or 1, Sq, S) in `acc` (float32, or float64 for a float64 model) for query rows q_rows
// (B, Sq): -inf where a key is invisible, else the sum of the layer's mods.
at::Tensor mods_bias(const at::Tensor& q_rows, const SequenceMask& tm, const LayerMods& m, int64_t Hkv, c10::ScalarType acc);
// Softmax attention probabilities of query rows against all keys, grouped by KV head, in bias's dtype:
// q (B, H, Sq, hd), k (B, H_kv, S, hd), bias (B, H_kv|1, Sq, S) -> (B, H_kv, G, Sq, S).
at::Tensor grouped_probs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bias, double scale);

// ---- queries against cached keys ---------------------------------------------------------------------------

enum class EmptyRows {
  Nan,  // a query that sees no key gets NaN probabilities (plain softmax)
  Zero  // ... gets zeros
};

// Softmax attention of queries to cached keys, computed explicitly in `compute` dtype: key j of KV head h is
// visible to query i iff its stored position k_pos <= q_pos[i] and (valid undefined or) valid. GQA: each query
// head reads its group's KV head. q (B, H, w, hd), q_pos (B, w) int64, k (B, H_kv, n, hd), k_pos (B, H_kv, n)
// int64, valid (B, H_kv, n) bool or undefined -> (B, H, w, n).
at::Tensor attention_probs(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k, const at::Tensor& k_pos,
                           const at::Tensor& valid, c10::ScalarType compute, EmptyRows empty = EmptyRows::Nan);

}  // namespace kvd
