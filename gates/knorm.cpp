// KNorm: s_j = -||k_j||_2 (docs/methods/knorm.md; kvpress KnormPress). Computed in float32.
#include <torch/torch.h>

#include "gates/heuristics.h"

namespace kvd {

at::Tensor KNormScorer::score(const LayerView& view) {
  return -torch::linalg_vector_norm(view.keys.to(torch::kFloat), 2, {-1}, false, c10::nullopt);  // (B, H_kv, n)
}

}  // namespace kvd
