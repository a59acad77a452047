// KeyDiff: s_j = -cos(k_j, anchor), anchor = mean_m k_m / ||k_m|| (docs/methods/keydiff.md; kvpress KeyDiffPress).
#include <torch/torch.h>

#include "gates/heuristics.h"

namespace kvd {

at::Tensor KeyDiffScorer::score(const LayerView& view) {
  namespace F = torch::nn::functional;
  at::Tensor k = view.keys.to(torch::kFloat);  // (B, H_kv, n, hd)
  at::Tensor unit = F::normalize(k, F::NormalizeFuncOptions().p(2).dim(-1));  // (B, H_kv, n, hd)
  at::Tensor anchor;                                                          // (B, H_kv, 1, hd)
  if (view.valid.defined()) {
    at::Tensor m = view.valid.to(torch::kFloat).unsqueeze(-1);  // (B, H_kv, n, 1)
    anchor = (unit * m).sum(2, true) / m.sum(2, true).clamp_min(1.0);
  } else {
    anchor = unit.mean(2, true);
  }
  return -F::cosine_similarity(k, anchor, F::CosineSimilarityFuncOptions().dim(-1));  // (B, H_kv, n)
}

}  // namespace kvd
