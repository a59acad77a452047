// DefensiveKV (docs/methods/defensivekv.md): a worst-case (max) window score, floored at its mean, with CriticalKV's
// value term. Not in kvpress 0.5.5, so there is no parity oracle; tests/models/test_scorers.cpp checks it.
#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

ScorerNeeds DefensiveKVScorer::needs() const {
  ScorerNeeds n;
  n.window = opt_.window;
  return n;
}

at::Tensor DefensiveKVScorer::score(const LayerView& view) {
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2);
  const int64_t w = opt_.window;
  KVD_CHECK(view.window_queries.defined() && view.window_queries.size(2) == w && n > w,
            "defensivekv: the prompt must be longer than the window (", w, ")");
  KVD_CHECK(!view.valid.defined(), "defensivekv: ragged heads before scoring are not supported");
  const int64_t m = n - w, H = view.window_queries.size(1);
  at::Tensor a = window_attention(view.window_queries, view.window_positions, view.keys, view.positions,
                                  view.valid).narrow(3, 0, m);  // (B, H, w, m)
  at::Tensor pooled = at::avg_pool1d(a.reshape({B, H * w, m}), {opt_.kernel}, {1}, {opt_.kernel / 2}, false, true)
                          .view({B, H, w, m});                 // (B, H, w, m)
  pooled = pooled * (a.sum(-1, true) / pooled.sum(-1, true).clamp_min(1e-30));  // rescaled to each row's mass
  at::Tensor s = std::get<0>(pooled.max(2));                                     // (B, H, m)
  s = reduce_group(s, Hkv, GroupReduce::Max);                                    // (B, H_kv, m)
  s = torch::maximum(s, s.mean(-1, true));
  s = (s + 1e-4) * projected_value_l1(view).narrow(2, 0, m);                     // (B, H_kv, m)
  const double top = s.max().item<double>() + 1.0;
  return torch::cat({s, torch::full({B, Hkv, w}, top, s.options())}, 2);         // (B, H_kv, n)
}

}  // namespace kvd
