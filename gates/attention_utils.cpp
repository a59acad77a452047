// Shared helpers of the attention-based heuristic scorers (see heuristics.h), and layer_view (scorer.h).
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "models/attention.h"
#include "models/device.h"
#include "models/kv_cache.h"
#include "models/model.h"

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
  const c10::ScalarType compute = in.q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const bool max_mode = moments == WindowMoments::Max || moments == WindowMoments::MaxAndPlain;
  KVD_CHECK(!in.row_weight.defined() || max_mode,
            "window_columns: row_weight applies to WindowMoments::Max and MaxAndPlain only");
  WindowColumns out;  // (B, H, n) each
  for (int64_t r0 = 0; r0 < w; r0 += row_block) {
    const int64_t nb = std::min(row_block, w - r0);
    at::Tensor p = attention_probs(in.q.narrow(2, r0, nb), in.q_pos.narrow(1, r0, nb), in.k, in.k_pos, in.valid,
                                   compute, EmptyRows::Zero);  // (B, H, nb, n)
    if (max_mode) {
      if (moments == WindowMoments::MaxAndPlain) {
        const at::Tensor m = p.amax(2);  // (B, H, n)
        out.max_plain = out.max_plain.defined() ? torch::maximum(out.max_plain, m) : m;
      }
      if (in.row_weight.defined())
        p = p * in.row_weight.narrow(1, r0, nb).to(p.device(), compute).view({p.size(0), 1, nb, 1});
      const at::Tensor m = p.amax(2);  // (B, H, n)
      out.max = out.max.defined() ? torch::maximum(out.max, m) : m;
      continue;
    }
    at::Tensor s = p.sum(2);                                        // (B, H, n)
    out.sum = out.sum.defined() ? out.sum + s : s;
    if (moments == WindowMoments::SumAndSquares) {
      at::Tensor s2 = p.square().sum(2);  // (B, H, n)
      out.sumsq = out.sumsq.defined() ? out.sumsq + s2 : s2;
    }
  }
  return out;
}

at::Tensor window_prefix(const LayerView& view) {
  KVD_CHECK(view.window_positions.defined() && view.window_positions.dim() == 2, "window_prefix: needs the window rows' positions (B, w)");
  const int64_t B = view.positions.size(0);
  at::Tensor first = view.window_positions.narrow(1, 0, 1).to(view.positions.device()).view({B, 1, 1});  // (B, 1, 1)
  at::Tensor m = view.positions.lt(first);                                                              // (B, H_kv, n)
  return view.valid.defined() ? m.logical_and(view.valid) : m;
}

at::Tensor zero_outside(const at::Tensor& s, const at::Tensor& mask) {
  KVD_CHECK(mask.dim() == 3 && s.size(0) == mask.size(0) && s.size(-1) == mask.size(2) && s.size(1) % mask.size(1) == 0,
            "zero_outside: scores ", s.sizes(), " do not match the (B, H_kv, n) mask ", mask.sizes());
  const int64_t B = s.size(0), Hkv = mask.size(1), n = s.size(-1);
  at::Tensor g = s.contiguous().view({B, Hkv, -1, n});                  // (B, H_kv, G·…, n)
  return g.masked_fill(mask.logical_not().unsqueeze(2), 0.0).view(s.sizes());  // s's shape
}

at::Tensor row_top(const at::Tensor& s, const at::Tensor& mask) {
  return zero_outside(s, mask).amax({1, 2}, /*keepdim=*/true) + 1.0;  // (B, 1, 1)
}

at::Tensor LayerView::next_position_column(c10::Device device) const {
  if (next_positions_device.defined()) return next_positions_device.to(device).view({-1, 1, 1});  // (B, 1, 1)
  const int64_t B = positions.defined() ? positions.size(0) : static_cast<int64_t>(next_positions.size());
  KVD_CHECK(static_cast<int64_t>(next_positions.size()) == B, "LayerView: next_positions holds ", next_positions.size(),
            " rows, the view ", B);
  return host_ints(next_positions, device).view({B, 1, 1});  // (B, 1, 1)
}

void Scorer::on_append(const PrefillLayerObservation& obs, KVCache& cache) {
  const std::vector<PayloadColumn> cols = payload_columns();
  if (cols.empty()) return;
  torch::NoGradGuard no_grad;
  // The positions the rows reach with this append (exclusive), from the host's counts: the model advances the
  // cache's next positions after the forward's last layer, so row b's t - lead[b] rows start at next_position(b).
  const int64_t B = obs.hidden.size(0), t = obs.hidden.size(1);
  int64_t reach = 0;
  for (int64_t b = 0; b < B && b < cache.batch(); ++b)
    reach = std::max(reach, cache.next_position(b) + t - (static_cast<int64_t>(obs.lead.size()) == B ? obs.lead[b] : 0));
  RowState rows = cache.row_state(obs.layer);
  reserve_row_state(obs.layer, rows, B, reach);
  const std::vector<at::Tensor> vals = entry_payload(obs.layer, obs.hidden, EntryContext{obs.query_positions, &rows});  // each (B, H_kv, t)
  if (!rows.empty()) cache.set_row_state(obs.layer, std::move(rows));
  KVD_CHECK(vals.size() == cols.size(), "scorer '", name(), "': entry_payload gave ", vals.size(), " columns, ",
            "payload_columns() names ", cols.size());
  for (size_t i = 0; i < cols.size(); ++i) {
    cache.add_payload(cols[i].name, cols[i].dtype, cols[i].fill);
    cache.set_payload_tail(obs.layer, cols[i].name, vals[i], obs.lead);
  }
}

std::vector<Scorer*> Scorer::prepare_peers(const Model& model, const KVCache& cache, const std::vector<Scorer*>& peers) {
  (void)peers;
  prepare(model, cache);
  return {this};
}

std::vector<at::Tensor> Scorer::score_budgets(const LayerView& view, const std::vector<Scorer*>& peers) {
  std::vector<at::Tensor> out;
  for (Scorer* p : peers) out.push_back(p->score(view));  // each (B, H_kv, n)
  return out;
}

LayerView layer_view(const KVLayerView& kv, int64_t layer, const Model& model, std::vector<int64_t> next_positions,
                     KernelPath kernels) {
  LayerView view;
  view.layer = layer;
  view.model = &model;
  view.keys = kv.k;         // (B, H_kv, n, hd)
  view.values = kv.v;       // (B, H_kv, n, hd)
  view.positions = kv.pos;  // (B, H_kv, n)
  view.valid = kv.valid;    // (B, H_kv, n) or undefined
  view.payload = kv.payload;
  view.next_positions = std::move(next_positions);
  view.kernels = kernels;
  return view;
}

}  // namespace kvd
