// Random ragged decode-attention cases and a naive float64 reference written with loops, shared by the decode
// attention tests (the emulated kernel, the CUDA kernel, the LibTorch reference).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <torch/torch.h>

#include "kernels/decode_attention.h"

namespace kvd_test {

struct DecodeCase {
  int64_t B = 2, H = 6, Hkv = 2, hd = 64;
  std::vector<int64_t> lens;  // [B * H_kv]
  int64_t max_len = 0;        // >= every len
  std::optional<int64_t> window;
  bool holes = false;  // every third entry an empty slot (kpos -1, EmptySlots::NegativePosition)
};

// Segments at scattered starts (gaps between them, not in segment order) in flat bf16 storages; positions
// increasing within a segment with random gaps (as after eviction); queries at positions past every entry.
inline kvd::DecodeAttentionInput make_decode_input(const DecodeCase& c, uint64_t seed) {
  torch::manual_seed(static_cast<int64_t>(seed));
  const int64_t S = c.B * c.Hkv;
  std::vector<int64_t> start(S);
  int64_t rows = 3;  // a few unused rows first
  for (int64_t i = S - 1; i >= 0; --i) {  // reverse order: segment 0 last
    start[i] = rows;
    rows += c.lens[i] + 5;
  }
  kvd::DecodeAttentionInput in;
  in.q = torch::randn({c.B, c.H, c.hd}).to(torch::kBFloat16);
  in.k = (torch::randn({rows, c.hd}) * 1.5).to(torch::kBFloat16);
  in.v = torch::randn({rows, c.hd}).to(torch::kBFloat16);
  in.start = torch::tensor(start, torch::kLong);
  in.len = torch::tensor(c.lens, torch::kLong);
  in.max_len = c.max_len;
  in.scale = 1.0 / std::sqrt(static_cast<double>(c.hd));
  in.kpos = torch::full({rows}, -7, torch::kLong);
  std::vector<int64_t> qpos(c.B, 0);
  for (int64_t s = 0; s < S; ++s) {
    at::Tensor gaps = torch::randint(1, 4, {std::max<int64_t>(c.lens[s], 1)}, torch::kLong);
    at::Tensor p = gaps.cumsum(0).narrow(0, 0, c.lens[s]);
    if (c.lens[s] > 0) in.kpos.narrow(0, start[s], c.lens[s]).copy_(p);
    if (c.holes)
      for (int64_t j = 1; j < c.lens[s]; j += 3) in.kpos[start[s] + j] = -1;
    const int64_t last = c.lens[s] > 0 ? p[-1].item<int64_t>() : 0;
    qpos[s / c.Hkv] = std::max(qpos[s / c.Hkv], last);
  }
  in.qpos = torch::tensor(qpos, torch::kLong);
  in.window = c.window;
  if (c.holes) in.empty_slots = kvd::EmptySlots::NegativePosition;
  return in;
}

// (B, H, hd) float64, by loops.
inline at::Tensor naive_decode_attention(const kvd::DecodeAttentionInput& in) {
  const int64_t B = in.q.size(0), H = in.q.size(1), hd = in.q.size(2), Hkv = in.start.size(0) / B, G = H / Hkv;
  at::Tensor q = in.q.to(torch::kDouble).contiguous(), k = in.k.to(torch::kDouble).contiguous(),
             v = in.v.to(torch::kDouble).contiguous();
  at::Tensor out = torch::zeros({B, H, hd}, torch::kDouble);
  auto qa = q.accessor<double, 3>();
  auto ka = k.accessor<double, 2>();
  auto va = v.accessor<double, 2>();
  auto oa = out.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hq = 0; hq < H; ++hq) {
      const int64_t s = b * Hkv + hq / G, st = in.start[s].item<int64_t>(), n = in.len[s].item<int64_t>();
      std::vector<double> logit;
      std::vector<int64_t> row;
      for (int64_t j = 0; j < n; ++j) {
        if (in.window && in.qpos[b].item<int64_t>() - in.kpos[st + j].item<int64_t>() >= *in.window) continue;
        if (in.empty_slots == kvd::EmptySlots::NegativePosition && in.kpos[st + j].item<int64_t>() < 0) continue;
        double d = 0;
        for (int64_t i = 0; i < hd; ++i) d += qa[b][hq][i] * ka[st + j][i];
        logit.push_back(d * in.scale);
        row.push_back(st + j);
      }
      if (logit.empty()) continue;
      double m = -std::numeric_limits<double>::infinity(), z = 0;
      for (double x : logit) m = std::max(m, x);
      for (double x : logit) z += std::exp(x - m);
      for (size_t j = 0; j < logit.size(); ++j)
        for (int64_t i = 0; i < hd; ++i) oa[b][hq][i] += std::exp(logit[j] - m) / z * va[row[j]][i];
    }
  return out;
}

// The cases: awkward lengths, empty and one-entry heads, GQA groups 1 / 3 / 4 / 8, both head dims, a window,
// empty slots (with and without a window).
inline std::vector<DecodeCase> decode_cases(bool large) {
  std::vector<DecodeCase> cs;
  cs.push_back({1, 1, 1, 64, {1}, 1, std::nullopt});
  cs.push_back({2, 6, 2, 64, {19, 0, 111, 1}, 111, std::nullopt});
  cs.push_back({2, 9, 3, 64, {300, 7, 64, 65, 2, 129}, 320, std::nullopt});
  cs.push_back({1, 8, 2, 128, {97, 33}, 100, std::nullopt});
  cs.push_back({2, 8, 1, 128, {40, 150}, 150, std::nullopt});
  cs.push_back({2, 6, 2, 64, {200, 90, 31, 180}, 200, 50});
  cs.push_back({2, 9, 3, 64, {300, 1, 64, 65, 2, 129}, 320, std::nullopt, true});
  cs.push_back({2, 8, 2, 128, {200, 90, 31, 180}, 200, 50, true});
  if (large) {
    cs.push_back({3, 32, 8, 128, std::vector<int64_t>(24, 0), 8192, std::nullopt});
    for (int64_t i = 0; i < 24; ++i) cs.back().lens[i] = (i * 977 + 4097) % 8192 + 1;
    cs.push_back({16, 9, 3, 64, std::vector<int64_t>(48, 0), 4200, 1024});
    for (int64_t i = 0; i < 48; ++i) cs.back().lens[i] = (i * 131 + 989) % 4200;
  }
  return cs;
}

// |out - ref| <= tol * max(1, |ref|) elementwise: the worst ratio.
inline double decode_error(const at::Tensor& out, const at::Tensor& ref) {
  at::Tensor o = out.to(torch::kCPU, torch::kDouble), r = ref.to(torch::kCPU, torch::kDouble);
  return ((o - r).abs() / r.abs().clamp_min(1.0)).max().item<double>();
}

}  // namespace kvd_test
