#include "train/batches.h"

#include <algorithm>
#include <cstdio>

#include <torch/torch.h>

#include "common/error.h"
#include "data/batch_tensors.h"
#include "data/loader.h"
#include "losses/distill.h"

namespace kvd {

TrainBatch make_train_batch(const Batch& b, c10::Device device) {
  BatchTensors t = to_tensors(b);
  TrainBatch tb;
  tb.ids = t.tokens.to(device);                             // (B, T)
  tb.positions = t.positions.to(device);                    // (B, T)
  tb.doc_ids = t.segments.to(torch::kInt64).to(device);     // (B, T), -1 on padding
  // labels[t] = ids[t+1] when t+1 is in the same segment and is a training target; -100 at segment ends, on
  // padding and before context-only tokens (a responses file's prompts: completion-only KL and CE, since
  // distill_losses counts only label-valid rows for both).
  const int64_t T = t.tokens.size(1);
  at::Tensor labels = torch::full_like(t.tokens, kIgnoreLabel);  // (B, T)
  if (T > 1) {
    at::Tensor seg = t.segments;
    at::Tensor same = (seg.narrow(1, 1, T - 1) == seg.narrow(1, 0, T - 1)) & (seg.narrow(1, 0, T - 1) >= 0) &
                      t.targets.narrow(1, 1, T - 1);  // (B, T-1)
    labels.narrow(1, 0, T - 1).copy_(torch::where(same, t.tokens.narrow(1, 1, T - 1), at::Scalar(kIgnoreLabel)));
  }
  tb.labels = labels.to(device);
  return tb;
}

std::vector<TrainBatch> spread_batches(const SequenceSource& source, int64_t n, int64_t batch_size, c10::Device device) {
  KVD_CHECK(batch_size > 0, "spread_batches: batch_size ", batch_size, " must be positive");
  n = std::min(n, source.size());
  std::vector<TrainBatch> out;
  for (int64_t i = 0; i < n; i += batch_size) {
    std::vector<int64_t> idx;
    for (int64_t j = i; j < std::min(n, i + batch_size); ++j) idx.push_back(j * source.size() / n);
    out.push_back(make_train_batch(read_sequences(source, idx, source.seq_len(), 0), device));
  }
  return out;
}

std::string calibration_summary(const nlohmann::json& result) {
  if (!result.is_object()) return result.dump();
  std::string s;
  for (auto it = result.begin(); it != result.end(); ++it) {
    const nlohmann::json& v = it.value();
    if (v.is_structured()) continue;
    std::string text = v.is_string() ? v.get<std::string>() : v.dump();
    if (v.is_number_float()) {
      char num[32];
      std::snprintf(num, sizeof num, "%.4g", v.get<double>());
      text = num;
    }
    s += (s.empty() ? "" : ", ") + it.key() + " " + text;
  }
  return s;
}

}  // namespace kvd
