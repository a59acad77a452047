// H2O and kvpress's ObservedAttention: accumulated attention from every prefill row (docs/methods/h2o.md).
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

ScorerNeeds H2OScorer::needs() const {
  ScorerNeeds n;
  n.window = ScorerNeeds::kAllRows;
  n.rows = RowBatching::Together;  // a left-padded batch's padding rows (position -1) see nothing and add 0
  return n;
}

at::Tensor H2OScorer::score(const LayerView& view) {
  KVD_CHECK(view.window_queries.defined() && view.window_positions.defined(), name(),
            ": needs the queries of every prefill row (LayerView::window_queries)");
  const int64_t Hkv = view.keys.size(1);
  at::Tensor sums = window_columns({view.window_queries, view.window_positions, view.keys, view.positions, view.valid},
                                   WindowMoments::Sum, view.kernels)
                        .sum;  // (B, H, n)
  if (norm_ == H2ONorm::PerObservingQuery) {
    // A row's real rows (positions >= 0) are consecutive positions p0 .. p1; key j is seen by p1 - max(pos_j, p0) + 1.
    const int64_t H = sums.size(1), G = H / Hkv;
    at::Tensor p0 = view.window_positions.masked_fill(view.window_positions.lt(0), std::numeric_limits<int64_t>::max())
                        .amin(1)
                        .view({-1, 1, 1});  // (B, 1, 1)
    at::Tensor p1 = view.window_positions.narrow(1, view.window_positions.size(1) - 1, 1).view({-1, 1, 1});  // (B, 1, 1)
    at::Tensor seen = (p1 - torch::maximum(view.positions, p0) + 1).clamp_min(1).to(torch::kFloat);  // (B, H_kv, n)
    sums = sums / seen.repeat_interleave(G, 1);  // (B, H, n)
  }
  at::Tensor s = reduce_group(sums, Hkv, reduce_);  // (B, H_kv, n)
  if (view.valid.defined()) s = s.masked_fill(view.valid.logical_not(), -std::numeric_limits<float>::infinity());
  return s;
}

}  // namespace kvd
