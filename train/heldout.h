// The held-out eviction check (issue 4, item 7): how far do next-token distributions move when the KV cache is
// evicted to a budget of M tokens per (layer, KV head) by a Scorer?
//
// For validation sequences, prefill runs in chunks through two caches in lock-step: a full one and one that,
// after every chunk, is evicted per (layer, KV head) down to M entries by the scorer (top-M scores, kept in
// position order with KVCache::keep). The result is the mean KL(p_full ‖ p_evicted) of the next-token
// distributions over the counted positions (positions ≥ eval_from). Any Scorer works: the retention gate's,
// StreamingLLM's (4 sinks + recent), an untrained gate's.
//
// Scorers that need LayerView.hidden (the retention gate) get, for every cached entry, the layer's attention
// input of that token from one no-grad full-sequence forward (B, H_kv, n, d). This is the full-cache
// trajectory's input, not the evicted one's (Model::prefill exposes no layer inputs): an approximation that
// ranks tokens exactly as TRIM-KV would whenever the gate's input is unaffected by earlier evictions.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace kvd {

class KVCache;
class Model;
class Scorer;

struct HeldoutOptions {
  int64_t budget = 128;    // M: entries kept per (layer, KV head) after every chunk
  int64_t chunk = 128;     // prefill chunk length
  int64_t eval_from = -1;  // first position whose next-token distribution counts; -1: the second chunk's start
};

struct HeldoutResult {
  double kl = 0.0;                  // mean KL(p_full ‖ p_evicted) in nats per counted token
  int64_t tokens = 0;               // counted positions (over all sequences and batch rows)
  int64_t peak_cache_bytes = 0;     // the evicted cache's peak K+V bytes (max over sequences)
  int64_t full_cache_bytes = 0;     // the full cache's final K+V bytes (max over sequences)
};

// ids (B, T) int64 validation tokens, one sequence per row (no padding). Runs under no-grad.
HeldoutResult heldout_kl(const Model& model, const at::Tensor& ids, Scorer& scorer, const HeldoutOptions& options);
// Several sequences of any lengths, each run at batch 1; the KL is token-weighted over all of them.
HeldoutResult heldout_kl(const Model& model, const std::vector<at::Tensor>& sequences, Scorer& scorer,
                         const HeldoutOptions& options);

// Evicts every layer of `cache` whose longest head holds more than `budget` entries down to `budget` per
// (batch row, KV head), keeping the top-scored entries in position order. layer_hidden: [layer] (B, T, d)
// attention inputs of every position so far (only read when scorer.needs().hidden), else empty.
void evict_to_budget(const Model& model, KVCache& cache, Scorer& scorer, int64_t budget,
                     const std::vector<at::Tensor>& layer_hidden);

}  // namespace kvd
