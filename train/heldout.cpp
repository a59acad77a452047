#include "train/heldout.h"

#include <algorithm>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/scorer.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace kvd {

void evict_to_budget(const Model& model, KVCache& cache, Scorer& scorer, int64_t budget,
                     const std::vector<at::Tensor>& layer_hidden) {
  KVD_CHECK(budget > 0, "evict_to_budget: budget must be positive, got ", budget);
  torch::NoGradGuard no_grad;
  const ScorerNeeds needs = scorer.needs();
  KVD_CHECK(needs.window == 0 && !needs.queries_pre_rope, "evict_to_budget: scorer '", scorer.name(),
            "' needs window / pre-RoPE queries, which the held-out check does not capture");
  for (int64_t l = 0; l < cache.num_layers(); ++l) {
    if (cache.max_length(l) <= budget) continue;
    const KVLayerView kv = cache.layer(l);  // k, v (B, H_kv, n, hd); pos (B, H_kv, n)
    LayerView view = layer_view(kv, l, model, cache.next_position());
    if (needs.hidden) {
      KVD_CHECK(l < static_cast<int64_t>(layer_hidden.size()) && layer_hidden[l].defined(),
                "evict_to_budget: scorer '", scorer.name(), "' needs hidden states of layer ", l);
      const at::Tensor& h = layer_hidden[l];  // (B, T, d)
      const int64_t B = kv.pos.size(0), H = kv.pos.size(1), n = kv.pos.size(2), T = h.size(1), d = h.size(2);
      at::Tensor idx = kv.pos.clamp(0, T - 1).unsqueeze(-1).expand({B, H, n, d});       // (B, H_kv, n, d)
      view.hidden = h.unsqueeze(1).expand({B, H, T, d}).gather(2, idx);                  // (B, H_kv, n, d)
    }
    at::Tensor s = scorer.score(view).to(torch::kFloat);  // (B, H_kv, n)
    if (kv.valid.defined()) s = s.masked_fill(kv.valid.logical_not(), -std::numeric_limits<float>::infinity());
    const int64_t keep = std::min<int64_t>(budget, kv.n);
    at::Tensor idx = std::get<0>(std::get<1>(s.topk(keep, -1)).sort(-1));  // (B, H_kv, keep) sorted
    cache.keep(l, idx);
  }
}

HeldoutResult heldout_kl(const Model& model, const at::Tensor& ids_in, Scorer& scorer, const HeldoutOptions& opt) {
  KVD_CHECK(ids_in.dim() == 2 && ids_in.size(1) > 0, "heldout_kl: ids must be (B, T) with T > 0, got ", ids_in.sizes());
  KVD_CHECK(opt.budget > 0, "heldout_kl: budget M must be positive, got ", opt.budget);
  KVD_CHECK(opt.chunk > 0, "heldout_kl: chunk must be positive, got ", opt.chunk);
  torch::NoGradGuard no_grad;
  at::Tensor ids = ids_in.to(model.device(), torch::kLong);  // (B, T)
  const int64_t B = ids.size(0), T = ids.size(1);
  const int64_t eval_from = opt.eval_from >= 0 ? opt.eval_from : std::min(opt.chunk, T - 1);

  std::vector<at::Tensor> layer_hidden;  // [layer] (B, T, d)
  if (scorer.needs().hidden) {
    layer_hidden.resize(model.config().num_layers);
    AttentionMods capture;
    capture.layer_hook = [&layer_hidden](const LayerInput& in) {
      layer_hidden[in.layer] = in.hidden;
      return LayerMods();
    };
    model.forward_train(ids, sequential_positions(B, T, model.device()), capture);
  }

  KVCache full = model.new_cache(B), ev = model.new_cache(B);
  double kl_sum = 0.0;
  int64_t counted = 0;
  for (int64_t c0 = 0; c0 < T; c0 += opt.chunk) {
    const int64_t n = std::min(opt.chunk, T - c0);
    at::Tensor x = ids.narrow(1, c0, n);                                         // (B, n)
    at::Tensor lf = model.prefill(x, full, LogitsMode::AllPositions);            // (B, n, V) float32
    at::Tensor le = model.prefill(x, ev, LogitsMode::AllPositions);              // (B, n, V)
    const int64_t first = std::max<int64_t>(eval_from - c0, 0);
    if (first < n) {
      at::Tensor logp = torch::log_softmax(lf.narrow(1, first, n - first).to(torch::kDouble), -1);  // (B, m, V)
      at::Tensor logq = torch::log_softmax(le.narrow(1, first, n - first).to(torch::kDouble), -1);  // (B, m, V)
      kl_sum += (logp.exp() * (logp - logq)).sum().item<double>();
      counted += B * (n - first);
    }
    evict_to_budget(model, ev, scorer, opt.budget, layer_hidden);
  }
  HeldoutResult r;
  r.tokens = counted;
  r.kl = counted > 0 ? kl_sum / static_cast<double>(counted) : 0.0;
  r.peak_cache_bytes = ev.peak_bytes();
  r.full_cache_bytes = full.bytes();
  return r;
}

HeldoutResult heldout_kl(const Model& model, const std::vector<at::Tensor>& sequences, Scorer& scorer,
                         const HeldoutOptions& options) {
  HeldoutResult total;
  double kl_sum = 0.0;
  for (const at::Tensor& seq : sequences) {
    KVD_CHECK(seq.dim() == 1 || (seq.dim() == 2 && seq.size(0) == 1),
              "heldout_kl: each sequence must be (T) or (1, T), got ", seq.sizes());
    HeldoutResult r = heldout_kl(model, seq.reshape({1, -1}), scorer, options);
    kl_sum += r.kl * static_cast<double>(r.tokens);
    total.tokens += r.tokens;
    total.peak_cache_bytes = std::max(total.peak_cache_bytes, r.peak_cache_bytes);
    total.full_cache_bytes = std::max(total.full_cache_bytes, r.full_cache_bytes);
  }
  total.kl = total.tokens > 0 ? kl_sum / static_cast<double>(total.tokens) : 0.0;
  return total;
}

}  // namespace kvd
