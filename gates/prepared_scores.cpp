#include "gates/prepared_scores.h"

#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "models/kv_cache.h"

namespace kvd {

void PreparedScores::set(const KVCache& cache, std::vector<at::Tensor> scores) {
  KVD_CHECK(static_cast<int64_t>(scores.size()) == cache.num_layers(), who_, ": scores for ", scores.size(),
            " layers, the cache has ", cache.num_layers());
  positions_.assign(scores.size(), at::Tensor());
  for (size_t l = 0; l < scores.size(); ++l) {
    const KVLayerView kv = cache.layer(static_cast<int64_t>(l));
    at::Tensor s = scores[l].to(torch::kFloat);  // (B, H_kv, n)
    if (kv.valid.defined()) s = s.masked_fill(kv.valid.logical_not(), -std::numeric_limits<float>::infinity());
    scores[l] = s;
    positions_[l] = kv.pos.clone();  // (B, H_kv, n)
  }
  scores_ = std::move(scores);
}

at::Tensor PreparedScores::get(const LayerView& view) const {
  const int64_t l = view.layer;
  KVD_CHECK(l >= 0 && l < static_cast<int64_t>(scores_.size()) && scores_[l].defined(), who_, ": layer ", l,
            " was not prepared; drive it through compress_prefill or evict_to_budget (Scorer::prepare runs first)");
  const int64_t B = view.positions.size(0), n = view.positions.size(2);
  const at::Tensor& all = scores_[l];
  KVD_CHECK(view.batch_offset >= 0 && view.batch_offset + B <= all.size(0) && n <= all.size(2), who_, ": the view (rows ",
            view.batch_offset, "..", view.batch_offset + B, ", ", n, " entries) is not part of the prepared cache (",
            all.size(0), " rows, ", all.size(2), " entries)");
  const at::Tensor pos = positions_[l].narrow(0, view.batch_offset, B).narrow(2, 0, n);
  KVD_CHECK(pos.to(view.positions.device()).equal(view.positions), who_, ": layer ", l,
            " changed since prepare(); score each layer before compacting it");
  return all.narrow(0, view.batch_offset, B).narrow(2, 0, n);  // (B, H_kv, n)
}

}  // namespace kvd
