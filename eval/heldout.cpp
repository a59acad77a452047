#include "eval/heldout.h"

#include <algorithm>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/decode_eviction.h"
#include "gates/registry.h"
#include "gates/scorer.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace kvd {

const char* heldout_mode_name(HeldoutMode m) { return m == HeldoutMode::Continuous ? "continuous" : "once"; }

void evict_to_budget(const Model& model, KVCache& cache, Scorer& scorer, int64_t budget) {
  KVD_CHECK(budget > 0, "evict_to_budget: budget must be positive, got ", budget);
  torch::NoGradGuard no_grad;
  const ScorerNeeds needs = scorer.needs();
  KVD_CHECK(needs.window == 0 && !needs.queries_pre_rope && !needs.hidden, "evict_to_budget: scorer '", scorer.name(),
            "' needs window / pre-RoPE queries / hidden states, which the held-out check does not capture");
  bool prepared = false;
  for (int64_t l = 0; l < cache.num_layers(); ++l) {
    if (cache.max_length(l) <= budget) continue;
    if (!prepared) {  // once per call, on the cache before any layer is cut (query rows run here)
      scorer.prepare(model, cache);
      prepared = true;
    }
    const KVLayerView kv = cache.layer(l);  // k, v (B, H_kv, n, hd); pos (B, H_kv, n)
    const LayerView view = layer_view(kv, l, model, cache.next_positions());
    at::Tensor s = scorer.score(view).to(torch::kFloat);  // (B, H_kv, n)
    if (kv.valid.defined()) s = s.masked_fill(kv.valid.logical_not(), -std::numeric_limits<float>::infinity());
    const int64_t keep = std::min<int64_t>(budget, kv.n);
    // Stable descending sort: among equal scores the older entry is kept.
    at::Tensor order = std::get<1>(s.sort(/*stable=*/true, -1, /*descending=*/true));  // (B, H_kv, n)
    cache.keep(l, std::get<0>(order.narrow(-1, 0, keep).sort(-1)));                   // (B, H_kv, keep) sorted
  }
}

HeldoutResult heldout_kl(const Model& model, const at::Tensor& ids_in, Scorer& scorer, const HeldoutOptions& opt) {
  KVD_CHECK(ids_in.dim() == 2 && ids_in.size(1) > 0, "heldout_kl: ids must be (B, T) with T > 0, got ", ids_in.sizes());
  KVD_CHECK(opt.budget > 0, "heldout_kl: budget M must be positive, got ", opt.budget);
  KVD_CHECK(opt.chunk > 0, "heldout_kl: chunk must be positive, got ", opt.chunk);
  torch::NoGradGuard no_grad;
  at::Tensor ids = ids_in.to(model.device(), torch::kLong);  // (B, T)
  const int64_t B = ids.size(0), T = ids.size(1);
  // Continuous: count from the second chunk on; Once: the first half is the prompt that is compressed.
  const int64_t eval_from = opt.eval_from >= 0                       ? opt.eval_from
                            : opt.mode == HeldoutMode::Continuous ? std::min(opt.chunk, T - 1)
                                                                  : T / 2;

  KVCache full = model.new_cache(B), ev = model.new_cache(B);
  const PrefillObserver on_append = [&scorer](const PrefillLayerObservation& obs, KVCache& c) { scorer.on_append(obs, c); };
  double kl_sum = 0.0;
  int64_t counted = 0;
  // Once: the prompt [0, eval_from) is one chunk, compressed after it; the rest streams in chunks.
  std::vector<std::pair<int64_t, int64_t>> chunks;  // [c0, n)
  int64_t c0 = 0;
  if (opt.mode == HeldoutMode::Once && eval_from > 0) {
    chunks.emplace_back(0, std::min(eval_from, T));
    c0 = chunks.back().second;
  }
  for (; c0 < T; c0 += opt.chunk) chunks.emplace_back(c0, std::min(opt.chunk, T - c0));
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const auto [s0, n] = chunks[ci];
    at::Tensor x = ids.narrow(1, s0, n);                                              // (B, n)
    at::Tensor lf = model.prefill(x, full, LogitsMode::AllPositions);                 // (B, n, V) float32
    at::Tensor le = model.prefill(x, ev, LogitsMode::AllPositions, on_append);        // (B, n, V)
    const int64_t first = std::max<int64_t>(eval_from - s0, 0);
    if (first < n) {
      at::Tensor logp = torch::log_softmax(lf.narrow(1, first, n - first).to(torch::kDouble), -1);  // (B, m, V)
      at::Tensor logq = torch::log_softmax(le.narrow(1, first, n - first).to(torch::kDouble), -1);  // (B, m, V)
      kl_sum += (logp.exp() * (logp - logq)).sum().item<double>();
      counted += B * (n - first);
    }
    if (opt.mode == HeldoutMode::Continuous || ci == 0) evict_to_budget(model, ev, scorer, opt.budget);
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

FidelityResult generation_fidelity(const Model& model, const std::vector<at::Tensor>& sequences,
                                   ResolvedMethod& m, const FidelityOptions& opt) {
  KVD_CHECK(opt.budget > 0 && opt.prompt > 0 && opt.new_tokens > 0,
            "generation_fidelity: budget, prompt and new_tokens must be positive");
  KVD_CHECK(!m.full, "generation_fidelity: the full cache is the reference, not a method to check");
  torch::NoGradGuard no_grad;
  FidelityResult out;
  double kl_sum = 0.0;
  int64_t matches = 0;
  for (const at::Tensor& seq_in : sequences) {
    const at::Tensor seq = seq_in.reshape({-1});
    if (seq.size(0) < opt.prompt + 1) continue;
    const at::Tensor cpu = seq.narrow(0, 0, opt.prompt).to(torch::kCPU, torch::kLong).contiguous();
    const std::vector<int64_t> prompt(cpu.data_ptr<int64_t>(), cpu.data_ptr<int64_t>() + opt.prompt);

    // The full cache: greedy tokens y and the distribution before each.
    KVCache full = model.new_cache(1);
    at::Tensor ids = torch::tensor(prompt, torch::kLong).view({1, opt.prompt}).to(model.device());  // (1, P)
    at::Tensor logits = model.prefill(ids, full);                                                  // (1, V)
    std::vector<at::Tensor> logp;  // [t] (V) float64
    std::vector<int64_t> y;
    for (int64_t t = 0; t < opt.new_tokens; ++t) {
      logp.push_back(torch::log_softmax(logits[0].to(torch::kDouble), -1));
      y.push_back(logits[0].argmax().item<int64_t>());
      if (t + 1 < opt.new_tokens)
        logits = model.decode(torch::full({1, 1}, y.back(), torch::kLong).to(model.device()), full);
    }

    // The method's cache: the prompt but its last token compressed to M per head, then that token and the
    // full cache's tokens decoded one by one while the method's decode-time policy holds every head at M.
    KVCache ev = model.new_cache(1);
    Method& method = m.method;
    const Budget saved = method.selector.budget;
    method.selector.budget = Budget::tokens(opt.budget);
    compress_prefill(model, ev, {std::vector<int64_t>(prompt.begin(), prompt.end() - 1)}, method, m.compress);
    method.selector.budget = saved;
    std::unique_ptr<DecodeEvictor> evictor;
    if (m.decode) {
      DecodeTrigger trig;
      trig.interval = m.decode->interval;
      trig.target = opt.budget;
      DecodeEvictionOptions eo;
      eo.scorer = method.scorer;
      eo.kernels = m.compress.kernels;
      evictor = std::make_unique<DecodeEvictor>(model, m.decode->policy, trig, eo);
    }
    const PrefillObserver observe = evictor ? evictor->observer()
                                            : PrefillObserver([&](const PrefillLayerObservation& o, KVCache& c) {
                                                method.scorer->on_append(o, c);
                                              });
    at::Tensor lq = model.decode(ids.narrow(1, opt.prompt - 1, 1), ev, observe);  // (1, V)
    for (int64_t t = 0; t < opt.new_tokens; ++t) {
      at::Tensor q = torch::log_softmax(lq[0].to(torch::kDouble), -1);  // (V)
      kl_sum += (logp[t].exp() * (logp[t] - q)).sum().item<double>();
      matches += q.argmax().item<int64_t>() == y[t] ? 1 : 0;
      ++out.tokens;
      if (t + 1 < opt.new_tokens) lq = model.decode(torch::full({1, 1}, y[t], torch::kLong).to(model.device()), ev, observe);
    }
    out.peak_cache_bytes = std::max(out.peak_cache_bytes, ev.peak_bytes());
  }
  KVD_CHECK(out.tokens > 0, "generation_fidelity: no sequence is longer than the prompt of ", opt.prompt, " tokens");
  out.kl = kl_sum / static_cast<double>(out.tokens);
  out.match = static_cast<double>(matches) / static_cast<double>(out.tokens);
  return out;
}

}  // namespace kvd
