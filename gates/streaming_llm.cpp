// StreamingLLM: sinks + recent window (docs/methods/streaming_llm.md; kvpress StreamingLLMPress keeps the same set).
#include <torch/torch.h>

#include "gates/heuristics.h"

namespace kvd {

at::Tensor StreamingLLMScorer::score(const LayerView& view) {
  // Positions rank recency; the n_sink oldest positions (0 .. n_sink - 1) are lifted above every other.
  at::Tensor pos = view.positions.to(torch::kFloat);                                  // (B, H_kv, n)
  at::Tensor lift = view.next_position_column(pos.device()).to(torch::kFloat) + 1.0;  // (B, 1, 1)
  return torch::where(view.positions.lt(n_sink_), pos + 2.0 * lift, pos);             // (B, H_kv, n)
}

}  // namespace kvd
