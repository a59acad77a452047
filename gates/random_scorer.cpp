// Random: uniform scores from a seeded generator (docs/methods/random.md).
#include <torch/torch.h>

#include "gates/heuristics.h"

namespace kvd {

RandomScorer::RandomScorer(uint64_t seed) : seed_(seed) {}

at::Tensor RandomScorer::score(const LayerView& view) {
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2);
  at::Generator gen = at::detail::createCPUGenerator(seed_ + static_cast<uint64_t>(calls_++) * 1000003ull);
  at::Tensor s = torch::rand({B, Hkv, n}, gen, torch::kFloat);  // (B, H_kv, n) on CPU
  return s.to(view.keys.device());
}

}  // namespace kvd
