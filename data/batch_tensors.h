// LibTorch view of a training Batch (data/loader.h). Header-only so that kvd_data stays torch-free:
// only LibTorch code (the trainer) includes it.
#pragma once

#include <torch/torch.h>

#include "data/loader.h"

namespace kvd {

struct BatchTensors {
  torch::Tensor tokens;     // (B, L) int64 token ids (pad_id on padding)
  torch::Tensor positions;  // (B, L) int64 position within the segment; 0 at each segment start
  torch::Tensor segments;   // (B, L) int32 segment number within the row; -1 on padding
  torch::Tensor lengths;    // (B) int64 real tokens per row
  torch::Tensor indices;    // (B) int64 sequence indices in the split
  torch::Tensor targets;    // (B, L) bool: the token is a training target (false on padding and, for a
                            // responses file, on prompt tokens); all real tokens when the batch has none
};

// Copies a batch into CPU tensors (int64 ids and positions, as embedding and RoPE take them).
inline BatchTensors to_tensors(const Batch& b) {
  auto i32 = torch::TensorOptions().dtype(torch::kInt32);
  auto as = [&](const std::vector<int32_t>& v, std::vector<int64_t> shape) {
    return torch::from_blob(const_cast<int32_t*>(v.data()), shape, i32).clone();
  };
  BatchTensors t;
  t.tokens = as(b.tokens, {b.rows, b.cols}).to(torch::kInt64);
  t.positions = as(b.positions, {b.rows, b.cols}).to(torch::kInt64);
  t.segments = as(b.segments, {b.rows, b.cols});
  t.lengths = as(b.lengths, {b.rows}).to(torch::kInt64);
  t.indices = torch::from_blob(const_cast<int64_t*>(b.indices.data()), {b.rows}, torch::kInt64).clone();
  if (b.targets.empty()) {
    t.targets = t.segments >= 0;
  } else {
    t.targets = torch::from_blob(const_cast<uint8_t*>(b.targets.data()), {b.rows, b.cols}, torch::kUInt8)
                    .to(torch::kBool)
                    .logical_and(t.segments >= 0);
  }
  return t;
}

// (B, L, L) boolean attention mask: query i may attend key j iff both are real tokens of the same
// segment and j <= i (causal within each packed document).
inline torch::Tensor segment_causal_mask(const torch::Tensor& segments) {
  const int64_t L = segments.size(1);
  auto same = segments.unsqueeze(2) == segments.unsqueeze(1);                      // (B, L, L)
  auto real = (segments >= 0).unsqueeze(2) & (segments >= 0).unsqueeze(1);         // (B, L, L)
  auto causal = torch::ones({L, L}, torch::TensorOptions().dtype(torch::kBool).device(segments.device())).tril();
  return same & real & causal;
}

}  // namespace kvd
