// TOVA: attention of the last row, averaged over every query head; the same ranking for all KV heads
// (docs/methods/tova.md; kvpress TOVAPress).
#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

ScorerNeeds TOVAScorer::needs() const {
  ScorerNeeds n;
  n.window = 1;
  n.rows = RowBatching::Together;
  return n;
}

at::Tensor TOVAScorer::score(const LayerView& view) {
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2);
  KVD_CHECK(view.window_queries.defined() && view.window_queries.size(2) >= 1, "tova: needs the last query row");
  at::Tensor q = view.window_queries.narrow(2, view.window_queries.size(2) - 1, 1);  // (B, H, 1, hd)
  at::Tensor qp = view.window_positions.narrow(1, view.window_positions.size(1) - 1, 1);  // (B, 1)
  LayerView last = view;
  last.window_positions = qp;
  const at::Tensor prefix = window_prefix(last);  // (B, H_kv, n): every valid entry but the last row's own
  at::Tensor a = window_columns({q, qp, view.keys, view.positions, view.valid}, WindowMoments::Sum, view.kernels)
                     .sum;                                       // (B, H, n): the one row's attention
  at::Tensor s = a.mean(1, true).expand({B, Hkv, n});            // (B, H_kv, n)
  return torch::where(prefix, s, row_top(s, prefix));            // (B, H_kv, n): the last token at max + 1
}

}  // namespace kvd
