// Shared helpers of the attention-based heuristic scorers (see heuristics.h), and layer_view (scorer.h).
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "models/attention.h"
#include "models/kv_cache.h"

namespace kvd {

at::Tensor reduce_group(const at::Tensor& s, int64_t num_kv_heads, GroupReduce reduce) {  // (B, H, m)
  KVD_CHECK(s.dim() == 3 && s.size(1) % num_kv_heads == 0, "reduce_group: scores must be (B, H, m) with H a multiple of ",
            num_kv_heads, ", got ", s.sizes());
  const int64_t B = s.size(0), H = s.size(1), m = s.size(2), G = H / num_kv_heads;
  at::Tensor g = s.reshape({B, num_kv_heads, G, m});  // (B, H_kv, G, m)
  return reduce == GroupReduce::Mean ? g.mean(2) : std::get<0>(g.max(2));  // (B, H_kv, m)
}

at::Tensor window_attention(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k, const at::Tensor& k_pos,
                            const at::Tensor& valid) {
  return attention_probs(q, q_pos, k, k_pos, valid, torch::kFloat);  // (B, H, w, n) float32
}

WindowColumns window_columns(const WindowScoresInput& in, WindowMoments moments, KernelPath path, int64_t row_block) {
  if (path == KernelPath::Fused && window_scores_fused_available(in)) return window_columns_fused(in, moments);
  KVD_CHECK(in.q.defined() && in.q.dim() == 4 && row_block > 0, "window_columns: q must be (B, H, w, hd), got ",
            in.q.sizes());
  const int64_t w = in.q.size(2);
  WindowColumns out;  // (B, H, n) each
  for (int64_t r0 = 0; r0 < w; r0 += row_block) {
    const int64_t nb = std::min(row_block, w - r0);
    at::Tensor p = attention_probs(in.q.narrow(2, r0, nb), in.q_pos.narrow(1, r0, nb), in.k, in.k_pos, in.valid,
                                   torch::kFloat, EmptyRows::Zero);  // (B, H, nb, n)
    at::Tensor s = p.sum(2);                                        // (B, H, n)
    out.sum = out.sum.defined() ? out.sum + s : s;
    if (moments == WindowMoments::SumAndSquares) {
      at::Tensor s2 = p.square().sum(2);  // (B, H, n)
      out.sumsq = out.sumsq.defined() ? out.sumsq + s2 : s2;
    }
  }
  return out;
}

LayerView layer_view(const KVLayerView& kv, int64_t layer, const Model& model, int64_t next_position,
                     KernelPath kernels) {
  LayerView view;
  view.layer = layer;
  view.model = &model;
  view.keys = kv.k;         // (B, H_kv, n, hd)
  view.values = kv.v;       // (B, H_kv, n, hd)
  view.positions = kv.pos;  // (B, H_kv, n)
  view.valid = kv.valid;    // (B, H_kv, n) or undefined
  view.payload = kv.payload;
  view.next_position = next_position;
  view.kernels = kernels;
  return view;
}

}  // namespace kvd
