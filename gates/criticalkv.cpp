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

at::Tensor CriticalKVScorer::score(const LayerView& view) {
  at::Tensor s = base_->score(view).to(torch::kFloat);  // (B, H_kv, n)
  const int64_t n = view.values.size(2);
  at::Tensor norm = projected_value_l1(view);           // (B, H_kv, n)
  const int64_t first = std::max<int64_t>(1, static_cast<int64_t>((1.0 - ratio_) * n * 0.5));
  at::Tensor top = std::get<1>(s.topk(std::min(first, n), -1));  // (B, H_kv, first)
  at::Tensor out = (s + 1e-4) * norm;                            // (B, H_kv, n)
  out.scatter_(-1, top, std::numeric_limits<float>::max());
  return out;
}

}  // namespace kvd
