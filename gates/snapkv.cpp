// SnapKV (and PyramidKV's scores): pooled window attention; the window itself is always kept
// (docs/methods/snapkv.md; kvpress SnapKVPress computes its window attention the same way).
#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

ScorerNeeds SnapKVScorer::needs() const {
  ScorerNeeds n;
  n.window = opt_.window;
  return n;
}

at::Tensor SnapKVScorer::score(const LayerView& view) {
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2);
  const int64_t w = opt_.window;
  KVD_CHECK(view.window_queries.defined() && view.window_queries.size(2) == w, "snapkv: needs the last ", w,
            " query rows; the prompt must be longer than the window");
  KVD_CHECK(n > w, "snapkv: the cache (", n, " entries) must be longer than the window (", w, ")");
  KVD_CHECK(!view.valid.defined(), "snapkv: ragged heads before scoring are not supported (score once per prefill)");
  const int64_t m = n - w;  // prefix entries; the window is the last w entries of every head
  at::Tensor s = window_columns({view.window_queries, view.window_positions, view.keys, view.positions, view.valid},
                                 WindowMoments::Sum, view.kernels)
                     .sum.narrow(2, 0, m) / static_cast<double>(w);  // (B, H, m): the mean window attention
  s = at::avg_pool1d(s, {opt_.kernel}, {1}, {opt_.kernel / 2}, false, true);  // (B, H, m)
  s = reduce_group(s, Hkv, opt_.reduce);                           // (B, H_kv, m)
  at::Tensor top = s.max() + 1.0;  // () on the device: no wait for it
  return torch::cat({s, top.expand({B, Hkv, w})}, 2);  // (B, H_kv, n)
}

}  // namespace kvd
