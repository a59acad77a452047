#include "models/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>

#include "common/error.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace kvd {

Sampler::Sampler(const GenerateOptions& opts)
    : mode_(opts.mode),
      temperature_(opts.temperature),
      top_p_(opts.top_p),
      gen_(at::detail::createCPUGenerator(opts.seed)) {
  if (mode_ == SamplingMode::Sample) {
    KVD_CHECK(temperature_ > 0, "sampling: temperature must be > 0, got ", temperature_,
              " (use greedy decoding for temperature 0)");
    KVD_CHECK(top_p_ > 0 && top_p_ <= 1, "sampling: top_p must be in (0, 1], got ", top_p_);
  }
}

int64_t Sampler::next(const at::Tensor& logits_in) {
  at::Tensor logits = logits_in.detach().to(torch::kCPU, torch::kDouble).flatten();  // (V)
  KVD_CHECK(logits.numel() > 0, "sampling: empty logits");
  if (mode_ == SamplingMode::Greedy) return logits.argmax().item<int64_t>();
  at::Tensor probs = torch::softmax(logits / temperature_, 0);  // (V)
  if (top_p_ < 1.0) {
    // The smallest set of most probable tokens whose mass reaches top_p (the most probable always stays).
    auto [sorted, order] = probs.sort(/*dim=*/0, /*descending=*/true);  // (V), (V)
    at::Tensor before = sorted.cumsum(0) - sorted;                       // (V) mass of the tokens ranked above
    at::Tensor keep_sorted = before.lt(top_p_);                          // (V)
    at::Tensor keep = torch::zeros_like(keep_sorted).scatter(0, order, keep_sorted);  // (V)
    probs = torch::where(keep, probs, torch::zeros_like(probs));
    probs = probs / probs.sum();
  }
  return at::multinomial(probs, 1, /*replacement=*/false, gen_).item<int64_t>();
}

GenerateResult generate(const Model& model, const std::vector<int64_t>& prompt, const GenerateOptions& opts) {
  KVCache cache = model.new_cache(1);
  return generate(model, prompt, cache, opts);
}

GenerateResult generate(const Model& model, const std::vector<int64_t>& prompt, KVCache& cache,
                        const GenerateOptions& opts) {
  using Clock = std::chrono::steady_clock;
  KVD_CHECK(!prompt.empty(), "generate: empty prompt");
  KVD_CHECK(cache.batch() == 1, "generate: the cache must have batch 1, got ", cache.batch());
  KVD_CHECK(opts.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  const std::vector<int64_t>& eos = opts.eos_ids ? *opts.eos_ids : model.config().eos_token_ids;
  Sampler sampler(opts);

  GenerateResult res;
  res.prompt_tokens = static_cast<int64_t>(prompt.size());
  auto t0 = Clock::now();
  at::Tensor ids = torch::tensor(prompt, torch::kLong).view({1, res.prompt_tokens});  // (1, T)
  at::Tensor logits = model.prefill(ids, cache);                                      // (1, V)
  int64_t tok = opts.max_new_tokens > 0 ? sampler.next(logits[0]) : -1;  // syncs the device
  auto t1 = Clock::now();
  res.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  while (tok >= 0) {
    res.tokens.push_back(tok);
    if (opts.on_token) opts.on_token(tok);
    if (std::find(eos.begin(), eos.end(), tok) != eos.end()) {
      res.stop = StopReason::Eos;
      break;
    }
    if (static_cast<int64_t>(res.tokens.size()) >= opts.max_new_tokens) {
      res.stop = StopReason::MaxNewTokens;
      break;
    }
    logits = model.decode(torch::full({1, 1}, tok, torch::kLong), cache);  // (1, V)
    tok = sampler.next(logits[0]);
  }
  res.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  res.peak_kv_bytes = cache.peak_bytes();
  return res;
}

}  // namespace kvd
