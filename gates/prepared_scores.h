// Scores computed for a whole cache at once (Scorer::prepare of a ScoreTiming::AfterForward scorer: query rows,
// KVzip's reconstruction pass) and handed out layer by layer as compress_prefill / evict_to_budget score them.
// It remembers each layer's entry positions, so a view of a layer that changed since prepare() is refused
// instead of being scored with stale values.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "gates/scorer.h"

namespace kvd {

class KVCache;

class PreparedScores {
 public:
  explicit PreparedScores(std::string who) : who_(std::move(who)) {}
  // scores: [layer] (B, H_kv, n_l) for every entry of cache.layer(l) in its padded order; invalid entries are
  // set to -inf here.
  void set(const KVCache& cache, std::vector<at::Tensor> scores);
  // The scores of `view` (rows batch_offset .. + B of its layer): (B, H_kv, n) float32.
  at::Tensor get(const LayerView& view) const;

 private:
  std::string who_;
  std::vector<at::Tensor> scores_, positions_;  // [layer] (B, H_kv, n_l)
};

}  // namespace kvd
