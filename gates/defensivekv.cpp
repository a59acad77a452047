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
  n.rows = RowBatching::Together;
  return n;
}

// Everything but the first stage's cap, the one part that depends on the budget.
DefensiveKVScorer::Shared DefensiveKVScorer::shared(const LayerView& view) const {
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2);
  const int64_t w = opt_.window;
  KVD_CHECK(view.window_queries.defined() && view.window_queries.size(2) == w && n > w,
            "defensivekv: the prompt must be longer than the window (", w, ")");
  const int64_t H = view.window_queries.size(1), G = H / Hkv;
  Shared r;
  // Each row's prefix (its valid entries before the window) and its length m: (B, H_kv, n), (B, H_kv, 1). Columns
  // past a row's prefix are zeroed, so pooling and the sums see what they see at the end of a row scored alone.
  r.prefix = window_prefix(view);
  r.m = r.prefix.sum(-1, true);  // (B, H_kv, 1) int64
  at::Tensor a = zero_outside(window_attention(view.window_queries, view.window_positions, view.keys, view.positions,
                                               view.valid),
                              r.prefix);  // (B, H, w, n)
  // Defensive aggregation.
  at::Tensor pooled = zero_outside(
      at::avg_pool1d(a.reshape({B, H * w, n}), {opt_.kernel}, {1}, {opt_.kernel / 2}, false, true).view({B, H, w, n}),
      r.prefix);                                                                  // (B, H, w, n)
  pooled = pooled * (a.sum(-1, true) / pooled.sum(-1, true).clamp_min(1e-30));  // rescaled to each row's mass
  at::Tensor s = std::get<0>(pooled.max(2));                                     // (B, H, n)
  s = reduce_group(s, Hkv, GroupReduce::Max);                                    // (B, H_kv, n)
  s = torch::maximum(s, s.sum(-1, true) / r.m.clamp_min(1).to(torch::kFloat));   // the floor: the prefix's mean
  // CriticalKV's value term, as each KV head's share of the entry's projected value norm.
  const at::Tensor nu = projected_value_l1(view);  // (B, H_kv, n)
  r.s = zero_outside(s * (nu / nu.sum(1, true)), r.prefix);
  // CriticalKV's first stage, per KV head: the entries of highest mean window attention until their normalized
  // mass reaches 0.9 − b. b, as the authors compute it: the mean mass the window rows put on the prefix's last w
  // positions (the window's own columns are already cut off there). Per row: its own maximum, prefix and cap.
  r.top = r.s.amax({1, 2}, true);  // (B, 1, 1)
  r.idx = torch::arange(n, r.m.options()).view({1, 1, n});                           // (1, 1, n)
  const at::Tensor tail = r.idx.ge((r.m - w).clamp_min(0)).logical_and(r.idx.lt(r.m));  // (B, H_kv, n)
  const at::Tensor bias = zero_outside(a, tail).sum(-1).mean({1, 2}).view({B, 1, 1});    // (B, 1, 1)
  at::Tensor mean_a = a.view({B, Hkv, G, w, n}).mean(2).mean(2);  // (B, H_kv, n), 0 past the prefix
  mean_a = mean_a / mean_a.sum(-1, true);
  auto [sorted, order] = mean_a.sort(/*stable=*/true, -1, /*descending=*/true);  // (B, H_kv, n)
  r.order = order;
  // The target 0.9 − b in double, then compared in float32 (as a double scalar is against a float32 tensor).
  const at::Tensor target = (opt_.stage1_mass - bias.to(torch::kDouble)).to(torch::kFloat);  // (B, 1, 1)
  const at::Tensor reached = sorted.cumsum(-1).ge(target);
  r.reach = reached.to(torch::kInt).argmax(-1, true);  // (B, H_kv, 1): the first entry at which the mass is reached (0 when never)
  return r;
}

at::Tensor DefensiveKVScorer::finish(const Shared& r) const {
  // The authors cap by the prefix length m (stage1_cap, per row as a tensor: m (1 − r) − w truncated, N − w, or m).
  at::Tensor cap;  // (B, H_kv, 1) int64
  switch (opt_.budget.kind) {
    case BudgetKind::Ratio:
      cap = (r.m.to(torch::kDouble) * (1.0 - opt_.budget.value) - static_cast<double>(opt_.window)).trunc().to(torch::kLong);
      break;
    case BudgetKind::TokensPerHead:
      cap = torch::full_like(r.m, static_cast<int64_t>(opt_.budget.value) - opt_.window);
      break;
    case BudgetKind::Threshold:
      cap = r.m;
      break;
  }
  cap = cap.clamp_min(0);
  const at::Tensor count = torch::minimum(r.reach, cap);                         // (B, H_kv, 1)
  const at::Tensor first = r.idx.lt(count);                                      // (B, H_kv, n) in sorted order
  const at::Tensor mark = torch::zeros_like(first).scatter(-1, r.order, first);  // (B, H_kv, n) by entry
  const at::Tensor s = torch::where(mark, r.top.expand_as(r.s), r.s);
  return torch::where(r.prefix, s, r.top.expand_as(s));  // (B, H_kv, n): the window at the row's max
}

at::Tensor DefensiveKVScorer::score(const LayerView& view) { return finish(shared(view)); }

std::vector<at::Tensor> DefensiveKVScorer::score_budgets(const LayerView& view, const std::vector<Scorer*>& peers) {
  const Shared r = shared(view);
  std::vector<at::Tensor> out;
  for (Scorer* p : peers) {
    const auto* d = dynamic_cast<const DefensiveKVScorer*>(p);
    KVD_CHECK(d != nullptr && d->opt_.window == opt_.window && d->opt_.kernel == opt_.kernel &&
                  d->opt_.stage1_mass == opt_.stage1_mass,
              "defensivekv: score_budgets takes the budgets of one defensivekv method, got ", p->name());
    out.push_back(d->finish(r));
  }
  return out;
}

}  // namespace kvd
