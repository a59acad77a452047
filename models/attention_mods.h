// AttentionMods: how a learned part modifies the frozen decoder's forward_train without the decoder knowing
// the part (DESIGN.md, "The abstractions"). Every tensor a mod supplies stays in the autograd graph, so
// gradients flow back into the part's parameters.
//
// Indexing: forward_train runs S = T + n rows, the T sequence rows followed by the n extra rows
// (ExtraRows). Keys are the same S rows. Query row i sees key j iff j <= i (row order), both rows are in the
// same document, and (with a sliding window w) pos_i - pos_j < w. Extra rows come after the sequence, so
// the sequence rows never see them: adding extra rows leaves the sequence rows' outputs unchanged.
//
// How the four learned parts use it:
//   TRIM-KV retention gate   layer_hook returns key_rate = log beta (B, H_kv, S): bias (pos_q - pos_k)·log beta_k
//   Attention-Gate           layer_hook returns key_log_mask (B, H_kv, S): soft keep/evict flags
//   Judge-Q soft tokens      extra rows + stats over those rows (mean attention to every key)
//   LookaheadKV              extra rows + row-masked LoRA (lora on the extra rows only) + stats
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "models/kernel_path.h"

namespace kvd {

// What a layer hook sees, once per layer and forward, before the layer's Q/K/V projections.
struct LayerInput {
  int64_t layer = 0;
  at::Tensor hidden;     // (B, S, d) the attention block's input after the layer's input RMSNorm
  at::Tensor positions;  // (B, S) int64 RoPE positions of the S rows
  at::Tensor doc_ids;    // (B, S) int64 document of each row, or undefined (one document per batch row)
  int64_t seq_len = 0;   // T: rows [0, T) are the sequence, rows [T, S) the extra rows
};

// The query side of a general pair bias: `rows` says which of the S rows are the queries (all S for the
// attention output, a subset for statistics).
struct PairBiasQuery {
  at::Tensor q_rows;  // (B, Sq) int64 row indices in [0, S)
  at::Tensor q_pos;   // (B, Sq) int64 positions of those rows
  at::Tensor k_pos;   // (B, S) int64 positions of the keys
};
// Returns an additive bias broadcastable to (B, H_kv, Sq, S) (float32 or the model dtype). It is added for
// visible keys only (the causal / document / window mask is applied on top).
using PairBiasFn = std::function<at::Tensor(const PairBiasQuery&)>;

// A low-rank delta on one projection: y += scale · (x Aᵀ) Bᵀ on the LoRA rows.
struct LoraDelta {
  at::Tensor a;  // (r, in)
  at::Tensor b;  // (out, r)
  double scale = 1.0;  // alpha / r
  bool defined() const { return a.defined() && b.defined(); }
};

struct LayerLora {
  LoraDelta q, k, v, o;     // attention projections (in / out in HF layout: q (H*hd, d), o (d, H*hd))
  LoraDelta gate, up, down; // MLP projections
  bool any() const {
    return q.defined() || k.defined() || v.defined() || o.defined() || gate.defined() || up.defined() ||
           down.defined();
  }
};

// One layer's modifications. All optional; an empty LayerMods leaves the layer exactly as the base model
// (and on the fused SDPA path).
struct LayerMods {
  // Additive retention decay, per KV head and broadcast over the query heads of its group:
  //   bias[q, k] += (pos_q - pos_k) · key_rate[k]        (TRIM-KV: key_rate = log beta_k <= 0)
  at::Tensor key_rate;      // (B, H_kv, S)
  // Additive per-key log-mask, per KV head (Attention-Gate flags, e.g. log sigmoid(logit)):
  //   bias[q, k] += key_log_mask[k]   for k != q; the diagonal (a row's own key) always stays unmasked.
  at::Tensor key_log_mask;  // (B, H_kv, S)
  // > 0: key_log_mask[k] applies only to queries more than this many positions later (pos_q - pos_k > delay):
  // DMS's delayed eviction, a key stays fully visible to the next `delay` positions. 0: every later query.
  int64_t key_log_mask_delay = 0;
  PairBiasFn pair_bias;     // any other (query pos, key pos) bias
  LayerLora lora;           // applied on AttentionMods::lora_row_mask rows only
  bool changes_attention() const { return key_rate.defined() || key_log_mask.defined() || bool(pair_bias); }
};

// What Model::forward_extra computes the extra rows' attention with.
enum class ExtraAttention {
  Probabilities,  // explicit softmax probabilities (float32): ExtraRowsOutput::attention_to_cache is filled
  Fused           // SDPA under the rows' visibility mask, no probabilities: attention_to_cache stays empty (for a
                  // caller that only observes the layers, as KVzip's repeat pass does)
};

// Where the extra rows sit among the cache's entries, for Model::forward_extra's fused attention.
enum class ExtraPlacement {
  Anywhere,   // each stored entry is visible to a row by position (masks compare them)
  AfterCache  // the caller vouches that every row's position is at or past its batch row's next position, so every
              // stored entry is in each row's past: on CUDA the fused attention then reads the cache's segments in
              // place through flash attention (models/attention.h, segment_then_rows_flash), no mask, no copy
};

// n extra input rows (soft / lookahead tokens) appended after the sequence.
struct ExtraRows {
  at::Tensor embeddings;  // (B, n, d) or (n, d), any floating dtype (cast to the model dtype, grads flow)
  at::Tensor positions;   // (B, n) or (n) int64, e.g. T .. T+n-1
  at::Tensor doc_ids;     // (B, n) int64, or undefined: the document of the sequence's last row
  // Model::forward_extra computes the rows' attention for as many batch rows at a time as hold at most this many
  // bytes of probabilities (n × (cached + n) per query head; at least one row), so that a long repeat (KVzip) over
  // a large batch never needs them all at once. The results do not depend on it.
  int64_t prob_bytes = int64_t{1} << 30;
  ExtraAttention attention = ExtraAttention::Probabilities;
  ExtraPlacement placement = ExtraPlacement::Anywhere;
  int64_t count() const { return embeddings.defined() ? embeddings.size(-2) : 0; }
};

enum class StatReduce { Mean, Sum };

// Attention statistics for chosen query rows: for each requested layer, reduce(softmax row) over the chosen
// rows, per query head, to every key: (B, H, S) float32 (float64 for a float64 model). Computed by blocks of
// query rows (never S×S for all rows), with the same masks and biases as the forward, and differentiable.
struct AttentionStatsRequest {
  at::Tensor rows;              // (B, n) or (n) int64 query rows in [0, S); undefined: no statistics
  std::vector<int64_t> layers;  // which layers; empty: every layer
  StatReduce reduce = StatReduce::Mean;
  int64_t row_block = 256;      // query rows per block
  bool wanted() const { return rows.defined(); }
};

// Everything a learned part can do to one forward_train. Default-constructed = the base model.
struct AttentionMods {
  // Called once per layer with that layer's normed input; returns that layer's mods (may be empty).
  std::function<LayerMods(const LayerInput&)> layer_hook;
  ExtraRows extra;
  // Rows on which LayerMods::lora applies: (B, S) bool or 0/1 float; undefined: the extra rows [T, S).
  // Rows outside it are bit-identical to the base model's.
  at::Tensor lora_row_mask;
  AttentionStatsRequest stats;
  // Fused: on CUDA, layers whose mods set key_rate / key_log_mask (and no pair_bias) run the fused
  // retention-biased attention of kernels/retention_attention.h instead of the explicit (B, H, S, S) softmax;
  // so do layers without mods over packed documents or a window (instead of SDPA over a dense mask).
  KernelPath kernels = KernelPath::Fused;
};

}  // namespace kvd
