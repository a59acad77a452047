// CAKE's indicator and layer preference (docs/methods/cake.md; the budgets: Allocation::Cake in selector.cpp).
#include <cmath>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"

namespace kvd {

at::Tensor cake_indicator(const at::Tensor& a, double gamma) {  // a (B, H, w, m)
  KVD_CHECK(a.dim() == 4, "cake_indicator: attention must be (B, H, w, m), got ", a.sizes());
  at::Tensor mean = a.mean(2);                              // (B, H, m)
  at::Tensor var = a.size(2) > 1 ? a.var(2, /*unbiased=*/true) : torch::zeros_like(mean);  // (B, H, m)
  return mean + gamma * var;                                // (B, H, m)
}

std::vector<double> cake_preference(const at::Tensor& a, double tau1, double tau2) {  // a (B, H, w, m)
  KVD_CHECK(a.dim() == 4, "cake_preference: attention must be (B, H, w, m), got ", a.sizes());
  KVD_CHECK(tau1 > 0 && tau2 > 0, "cake: tau1 and tau2 must be positive");
  const int64_t B = a.size(0);
  at::Tensor af = a.to(torch::kFloat);
  at::Tensor ent = -(af * torch::log(af + 1e-10)).sum({1, 2, 3});                       // (B)
  at::Tensor var = a.size(2) > 1 ? af.var(2, true).sum({1, 2}) : torch::zeros({B}, af.options());  // (B)
  at::Tensor p = ent.pow(1.0 / tau1) * var.pow(1.0 / tau2);                               // (B)
  p = p.to(torch::kDouble).to(torch::kCPU).contiguous();
  return std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + B);
}

ScorerNeeds CakeScorer::needs() const {
  ScorerNeeds n;
  n.window = opt_.window;
  n.rows = RowBatching::Together;
  return n;
}

at::Tensor CakeScorer::score(const LayerView& view) {
  const int64_t Hkv = view.keys.size(1), n = view.keys.size(2);
  const int64_t w = opt_.window;
  KVD_CHECK(view.window_queries.defined() && view.window_queries.size(2) == w, "cake: needs the last ", w,
            " query rows; the prompt (or prefill chunk) must be longer than the window");
  KVD_CHECK(n > w, "cake: the cache (", n, " entries) must be longer than the window (", w, ")");
  // Each row's prefix: its valid entries before the window; the other columns are zeroed, so they add nothing to
  // the preference's sums and pooling sees zeros past the prefix, as for a row scored alone.
  const at::Tensor prefix = window_prefix(view);  // (B, H_kv, n)
  at::Tensor a = zero_outside(window_attention(view.window_queries, view.window_positions, view.keys, view.positions,
                                               view.valid),
                              prefix);  // (B, H, w, n)
  pref_ = cake_preference(a, opt_.tau1, opt_.tau2);
  at::Tensor s = cake_indicator(a, opt_.gamma);                                          // (B, H, n)
  s = at::avg_pool1d(s, {opt_.kernel}, {1}, {opt_.kernel / 2}, false, true);             // (B, H, n)
  s = reduce_group(s, Hkv, GroupReduce::Mean);                                           // (B, H_kv, n)
  return torch::where(prefix, s, row_top(s, prefix));  // (B, H_kv, n): the window at max + 1
}

}  // namespace kvd
