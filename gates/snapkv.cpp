// SnapKV (and PyramidKV's scores): pooled window attention; the window itself is always kept
// (docs/methods/snapkv.md; kvpress SnapKVPress computes its window attention the same way).
#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

ScorerNeeds SnapKVScorer::needs() const {
  ScorerNeeds n;
  n.window = opt_.window;
  n.rows = RowBatching::Together;
  return n;
}

at::Tensor SnapKVScorer::score(const LayerView& view) {
  const int64_t Hkv = view.keys.size(1), n = view.keys.size(2);
  const int64_t w = opt_.window;
  KVD_CHECK(view.window_queries.defined() && view.window_queries.size(2) == w, "snapkv: needs the last ", w,
            " query rows; the prompt must be longer than the window");
  KVD_CHECK(n > w, "snapkv: the cache (", n, " entries) must be longer than the window (", w, ")");
  // The prefix: each row's valid entries before its window. Pooling sees zeros past it, as at the prefix's end of
  // a row scored alone (zero padding counted).
  const at::Tensor prefix = window_prefix(view);  // (B, H_kv, n)
  at::Tensor s = window_columns({view.window_queries, view.window_positions, view.keys, view.positions, view.valid},
                                 WindowMoments::Sum, view.kernels)
                     .sum / static_cast<double>(w);  // (B, H, n): the mean window attention
  s = zero_outside(s, prefix);
  s = at::avg_pool1d(s, {opt_.kernel}, {1}, {opt_.kernel / 2}, false, true);  // (B, H, n)
  s = reduce_group(s, Hkv, opt_.reduce);                                       // (B, H_kv, n)
  return torch::where(prefix, s, row_top(s, prefix));                         // (B, H_kv, n): the window at max + 1
}

}  // namespace kvd
