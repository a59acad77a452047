// CriticalKV (docs/methods/criticalkv.md; kvpress CriticalKVPress, first_stage_ratio 0.5, epsilon 1e-4).
#include <algorithm>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "models/model.h"

namespace kvd {

at::Tensor projected_value_l1(const LayerView& view) {
  KVD_CHECK(view.model != nullptr && view.values.defined(), "the value-norm term needs the model (o_proj) and values");
  const int64_t Hkv = view.values.size(1), hd = view.values.size(3);
  const int64_t H = view.model->config().num_heads, G = H / Hkv;
  at::Tensor wo = view.model->weights().layers[view.layer].o_proj.to(torch::kFloat);  // (d, H*hd)
  wo = wo.t().reshape({H, hd, -1});                                                    // (H, hd, d)
  at::Tensor v = view.values.to(torch::kFloat).repeat_interleave(G, 1);               // (B, H, n, hd)
  at::Tensor proj = torch::matmul(v, wo.unsqueeze(0)).abs().sum(-1);                  // (B, H, n)
  return reduce_group(proj, Hkv, GroupReduce::Mean);                                  // (B, H_kv, n)
}

at::Tensor CriticalKVScorer::score(const LayerView& view) { return finish(view, base_->score(view), projected_value_l1(view)); }

std::vector<at::Tensor> CriticalKVScorer::score_budgets(const LayerView& view, const std::vector<Scorer*>& peers) {
  std::vector<const CriticalKVScorer*> crit;
  std::vector<Scorer*> bases;
  for (Scorer* p : peers) {
    const auto* c = dynamic_cast<const CriticalKVScorer*>(p);
    KVD_CHECK(c != nullptr && c->base_->name() == base_->name(), "criticalkv: score_budgets takes the budgets of one ",
              name(), " method, got ", p->name());
    crit.push_back(c);
    bases.push_back(c->base_.get());
  }
  const std::vector<at::Tensor> s = base_sharing_ == ScoreSharing::AcrossBudgets
                                        ? std::vector<at::Tensor>(bases.size(), base_->score(view))
                                        : base_->score_budgets(view, bases);  // [peer] (B, H_kv, n)
  const at::Tensor norm = projected_value_l1(view);                     // (B, H_kv, n)
  std::vector<at::Tensor> out;
  for (size_t t = 0; t < crit.size(); ++t) out.push_back(crit[t]->finish(view, s[t], norm));
  return out;
}

at::Tensor CriticalKVScorer::finish(const LayerView& view, at::Tensor s, const at::Tensor& norm) const {
  s = s.to(torch::kFloat);  // (B, H_kv, n)
  const int64_t n = view.values.size(2);
  // The first stage: each head's top int((1 − r) · n_b / 2) entries (at least 1) by the base score.
  auto first_of = [&](const auto& len) { return ((1.0 - ratio_) * len * 0.5); };
  const int64_t first = std::max<int64_t>(1, static_cast<int64_t>(first_of(static_cast<double>(n))));
  at::Tensor out;
  if (!view.valid.defined()) {
    at::Tensor top = std::get<1>(s.topk(std::min(first, n), -1));  // (B, H_kv, first)
    out = (s + 1e-4) * norm;                                        // (B, H_kv, n)
    out.scatter_(-1, top, std::numeric_limits<float>::max());
    return out;
  }
  // Rows of different lengths n_b (the longest head of the row): each row's own top k, as it has alone (topk's
  // choice among tied scores depends on the row's length, so each row is cut on its own entries).
  s = s.masked_fill(view.valid.logical_not(), -std::numeric_limits<float>::infinity());
  out = (s + 1e-4) * norm;  // (B, H_kv, n)
  const at::Tensor len = std::get<0>(view.valid.sum(-1).max(1)).to(torch::kCPU).contiguous();  // (B) one read-back
  for (int64_t b = 0; b < s.size(0); ++b) {
    const int64_t nb = len.data_ptr<int64_t>()[b];
    const int64_t k = std::min(nb, std::max<int64_t>(1, static_cast<int64_t>(first_of(static_cast<double>(nb)))));
    at::Tensor top = std::get<1>(s[b].narrow(-1, 0, nb).topk(k, -1));  // (H_kv, k)
    out[b].scatter_(-1, top, std::numeric_limits<float>::max());
  }
  return out;
}

}  // namespace kvd
