// DefensiveKV (docs/methods/defensivekv.md), following its authors' code (FFY0/DefensiveKV at 9251b95,
// kvpress/presses/efficient_defensivekv_press.py): a worst-case (max) window score floored at its mean, CriticalKV's
// value term as a share over the KV heads, and CriticalKV's first stage. Checked against kept sets of that code:
// tests/python/test_defensivekv_golden.py.
#include <algorithm>
#include <cmath>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

int64_t DefensiveKVOptions::stage1_cap(int64_t n) const {
  switch (budget.kind) {
    case BudgetKind::Ratio:
      return static_cast<int64_t>(static_cast<double>(n) * (1.0 - budget.value) - static_cast<double>(window));
    case BudgetKind::TokensPerHead:
      return static_cast<int64_t>(budget.value) - window;
    case BudgetKind::Threshold:
      break;
  }
  return n;
}

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
  const int64_t m = n - w, H = view.window_queries.size(1), G = H / Hkv;
  at::Tensor a = window_attention(view.window_queries, view.window_positions, view.keys, view.positions,
                                  view.valid).narrow(3, 0, m);  // (B, H, w, m)
  // Defensive aggregation.
  at::Tensor pooled = at::avg_pool1d(a.reshape({B, H * w, m}), {opt_.kernel}, {1}, {opt_.kernel / 2}, false, true)
                          .view({B, H, w, m});                 // (B, H, w, m)
  pooled = pooled * (a.sum(-1, true) / pooled.sum(-1, true).clamp_min(1e-30));  // rescaled to each row's mass
  at::Tensor s = std::get<0>(pooled.max(2));                                     // (B, H, m)
  s = reduce_group(s, Hkv, GroupReduce::Max);                                    // (B, H_kv, m)
  s = torch::maximum(s, s.mean(-1, true));
  // CriticalKV's value term, as each KV head's share of the entry's projected value norm.
  const at::Tensor nu = projected_value_l1(view).narrow(2, 0, m);  // (B, H_kv, m)
  s = s * (nu / nu.sum(1, true));
  // CriticalKV's first stage, per KV head: the entries of highest mean window attention until their normalized
  // mass reaches 0.9 − b. b, as the authors compute it: the mean mass the window rows put on the prefix's last w
  // positions (the window's own columns are already cut off there).
  const double top = s.max().item<double>();
  const int64_t cap = std::max<int64_t>(0, opt_.stage1_cap(m));  // the authors cap by the prefix length m
  if (cap > 0) {
    const double bias = a.narrow(3, std::max<int64_t>(0, m - w), std::min(w, m)).sum(-1).mean().item<double>();
    at::Tensor mean_a = a.view({B, Hkv, G, w, m}).mean(2).mean(2);  // (B, H_kv, m)
    mean_a = mean_a / mean_a.sum(-1, true);
    auto [sorted, order] = mean_a.sort(-1, /*descending=*/true);    // (B, H_kv, m)
    const at::Tensor reached = sorted.cumsum(-1).ge(opt_.stage1_mass - bias);
    // The index of the first entry at which the mass is reached (0 when it never is), at most the cap.
    const at::Tensor count = reached.to(torch::kInt).argmax(-1).clamp_max(cap);  // (B, H_kv)
    const at::Tensor rank = torch::arange(m, count.options().dtype(torch::kLong)).view({1, 1, m});
    const at::Tensor first = rank.lt(count.unsqueeze(-1));                        // (B, H_kv, m) in sorted order
    at::Tensor mark = torch::zeros_like(first).scatter(-1, order, first);         // (B, H_kv, m) by entry
    s = s.masked_fill(mark, top);
  }
  return torch::cat({s, torch::full({B, Hkv, w}, top, s.options())}, 2);  // (B, H_kv, n): the window at the max
}

}  // namespace kvd
