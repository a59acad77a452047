// TOVA: attention of the last row, averaged over every query head; the same ranking for all KV heads
// (docs/methods/tova.md; kvpress TOVAPress).
#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

ScorerNeeds TOVAScorer::needs() const {
  ScorerNeeds n;
  n.window = 1;
  return n;
}

at::Tensor TOVAScorer::score(const LayerView& view) {
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2);
  KVD_CHECK(view.window_queries.defined() && view.window_queries.size(2) >= 1, "tova: needs the last query row");
  KVD_CHECK(!view.valid.defined(), "tova: ragged heads before scoring are not supported (score once per prefill)");
  at::Tensor q = view.window_queries.narrow(2, view.window_queries.size(2) - 1, 1);  // (B, H, 1, hd)
  at::Tensor qp = view.window_positions.narrow(1, view.window_positions.size(1) - 1, 1);  // (B, 1)
  at::Tensor a = window_columns({q, qp, view.keys, view.positions, view.valid}, WindowMoments::Sum, view.kernels)
                     .sum;                                       // (B, H, n): the one row's attention
  at::Tensor s = a.narrow(2, 0, n - 1).mean(1, true);            // (B, 1, n-1)
  s = s.expand({B, Hkv, n - 1});                                                   // (B, H_kv, n-1)
  at::Tensor top = s.max() + 1.0;  // () on the device: no wait for it
  return torch::cat({s, top.expand({B, Hkv, 1})}, 2);                              // (B, H_kv, n)
}

}  // namespace kvd
