#include "models/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <memory>

#include "common/error.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/profile.h"
#include "models/static_decode.h"

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

const char* decode_path_name(DecodePath p) {
  switch (p) {
    case DecodePath::Auto: return "auto";
    case DecodePath::Cache: return "cache";
    case DecodePath::Static: return "static";
    case DecodePath::Graph: return "graph";
  }
  return "?";
}

DecodePath parse_decode_path(const std::string& s) {
  for (DecodePath p : {DecodePath::Auto, DecodePath::Cache, DecodePath::Static, DecodePath::Graph})
    if (s == decode_path_name(p)) return p;
  KVD_FAIL("decode path '", s, "': use auto, cache, static or graph");
}

namespace {

// The path generate_batch takes: Auto resolved; Static / Graph checked against the options.
DecodePath resolve_decode(const Model& model, const GenerateOptions& opts) {
  const bool fixed_shape_ok =
      opts.mode == SamplingMode::Greedy && (!opts.decode_observer || static_cast<bool>(opts.static_evictor));
  bool graphs = false;
#if KVD_WITH_CUDA
  graphs = model.device().is_cuda();
#endif
  switch (opts.decode) {
    case DecodePath::Auto:
      return fixed_shape_ok && graphs ? DecodePath::Graph : DecodePath::Cache;
    case DecodePath::Cache:
      return DecodePath::Cache;
    case DecodePath::Static:
    case DecodePath::Graph:
      KVD_CHECK(fixed_shape_ok, "generate: the ", decode_path_name(opts.decode),
                " decode path is greedy and takes a decode-time observer (eviction while decoding) only with its "
                "fixed-shape form (GenerateOptions::static_evictor; DecodeEvictor::static_evictor() has none for this "
                "policy); use the cache path");
      KVD_CHECK(opts.decode == DecodePath::Static || graphs,
                "generate: the graph decode path needs a model on a CUDA device; use static or cache");
      return opts.decode;
  }
  return DecodePath::Cache;
}

}  // namespace

GenerateResult generate(const Model& model, const std::vector<int64_t>& prompt, const GenerateOptions& opts) {
  KVCache cache = model.new_cache(1);
  return generate(model, prompt, cache, opts);
}

GenerateResult generate(const Model& model, const std::vector<int64_t>& prompt, KVCache& cache,
                        const GenerateOptions& opts) {
  KVD_CHECK(cache.batch() == 1, "generate: the cache must have batch 1, got ", cache.batch());
  BatchGenerateResult b = generate_batch(model, {prompt}, cache, opts);
  GenerateResult res;
  res.tokens = std::move(b.tokens[0]);
  res.stop = b.stop[0];
  res.prompt_tokens = b.prompt_tokens[0];
  res.prefill_seconds = b.prefill_seconds;
  res.decode_seconds = b.decode_seconds;
  res.peak_kv_bytes = b.peak_kv_bytes;
  return res;
}

at::Tensor left_pad(const std::vector<std::vector<int64_t>>& prompts, int64_t pad_id, std::vector<int64_t>& lead) {
  KVD_CHECK(!prompts.empty(), "left_pad: no rows");
  size_t T = 0;
  for (const auto& p : prompts) T = std::max(T, p.size());
  const int64_t B = static_cast<int64_t>(prompts.size());
  at::Tensor ids = torch::full({B, static_cast<int64_t>(T)}, pad_id, torch::kLong);  // (B, T)
  lead.assign(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    const auto& p = prompts[b];
    lead[b] = static_cast<int64_t>(T - p.size());
    if (!p.empty()) std::copy(p.begin(), p.end(), ids.data_ptr<int64_t>() + b * static_cast<int64_t>(T) + lead[b]);
  }
  return ids;
}

BatchGenerateResult generate_batch(const Model& model, const std::vector<std::vector<int64_t>>& prompts,
                                   const GenerateOptions& opts) {
  KVCache cache = model.new_cache(static_cast<int64_t>(prompts.size()));
  return generate_batch(model, prompts, cache, opts);
}

BatchGenerateResult generate_batch(const Model& model, const std::vector<std::vector<int64_t>>& prompts, KVCache& cache,
                                   const GenerateOptions& opts) {
  using Clock = std::chrono::steady_clock;
  const int64_t B = static_cast<int64_t>(prompts.size());
  KVD_CHECK(B > 0, "generate: no prompts");
  KVD_CHECK(cache.batch() == B, "generate: the cache has batch ", cache.batch(), " but there are ", B, " prompts");
  for (const auto& p : prompts) KVD_CHECK(!p.empty(), "generate: empty prompt");
  KVD_CHECK(opts.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  KVD_CHECK(opts.max_new_tokens_per_row.empty() || static_cast<int64_t>(opts.max_new_tokens_per_row.size()) == B,
            "generate: max_new_tokens_per_row has ", opts.max_new_tokens_per_row.size(), " entries for ", B, " rows");
  std::vector<int64_t> limit(B, opts.max_new_tokens);
  if (!opts.max_new_tokens_per_row.empty()) limit = opts.max_new_tokens_per_row;
  for (int64_t m : limit) KVD_CHECK(m >= 0, "generate: max_new_tokens must be >= 0");
  const std::vector<int64_t>& eos = opts.eos_ids ? *opts.eos_ids : model.config().eos_token_ids;
  std::vector<Sampler> samplers;
  for (int64_t b = 0; b < B; ++b) {
    GenerateOptions o = opts;
    o.seed = opts.seed + static_cast<uint64_t>(b);
    samplers.emplace_back(o);
  }
  // Greedy picks every row's argmax on the device with one transfer; sampling goes row by row on the CPU.
  auto pick = [&](const at::Tensor& logits) {  // (B, V) -> B tokens
    std::vector<int64_t> next(B);
    if (opts.mode == SamplingMode::Greedy) {
      at::Tensor a = logits.argmax(-1).to(torch::kCPU).contiguous();  // (B)
      std::copy(a.data_ptr<int64_t>(), a.data_ptr<int64_t>() + B, next.begin());
    } else {
      for (int64_t b = 0; b < B; ++b) next[b] = samplers[b].next(logits[b]);
    }
    return next;
  };

  DecodePath path = resolve_decode(model, opts);
  BatchGenerateResult res;
  res.decode = path;
  res.tokens.assign(B, {});
  res.stop.assign(B, StopReason::MaxNewTokens);
  for (const auto& p : prompts) res.prompt_tokens.push_back(static_cast<int64_t>(p.size()));
  auto t0 = Clock::now();
  ProfileLap lap(model.device(), "generate ");
  std::vector<int64_t> lead;
  at::Tensor ids = left_pad(prompts, 0, lead);                                          // (B, T)
  at::Tensor logits = model.prefill(ids, cache, LogitsMode::LastPosition, opts.prefill_observer, lead);  // (B, V)
  std::vector<int64_t> tok = pick(logits);  // syncs the device
  lap("prompt");
  auto t1 = Clock::now();
  res.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  std::vector<bool> done(B);
  int64_t active = 0;
  for (int64_t b = 0; b < B; ++b) {
    done[b] = limit[b] == 0;
    active += done[b] ? 0 : 1;
  }
  // The fixed-shape paths: a state with room for every step the longest row can need, made at the first step.
  std::unique_ptr<StaticDecodeState> state;
  std::unique_ptr<StaticDecoder> decoder;
  std::vector<int64_t> fed(B, 0);  // tokens each row fed (what its cache gains)
  const int64_t most_steps = *std::max_element(limit.begin(), limit.end()) - 1;  // the longest row's decode steps
  while (active > 0) {
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      res.tokens[b].push_back(tok[b]);
      if (b == 0 && opts.on_token) opts.on_token(tok[b]);
      if (std::find(eos.begin(), eos.end(), tok[b]) != eos.end()) {
        res.stop[b] = StopReason::Eos;
        done[b] = true;
      } else if (static_cast<int64_t>(res.tokens[b].size()) >= limit[b]) {
        res.stop[b] = StopReason::MaxNewTokens;
        done[b] = true;
      }
      if (done[b]) --active;
    }
    if (active == 0) break;
    for (int64_t b = 0; b < B; ++b) fed[b] += done[b] ? 0 : 1;
    if (path != DecodePath::Cache && !decoder && opts.decode == DecodePath::Auto &&
        !static_decode_fits(cache, most_steps)) {
      path = DecodePath::Cache;  // the fixed-shape copy would take over half the free memory: decode on the cache
      res.decode = path;
    }
    if (path == DecodePath::Cache) {
      // A finished row's step is padding (lead 1): nothing of it is stored, so every row's cache (and its bytes)
      // is what it would be alone.
      std::vector<int64_t> pad(B, 0);
      for (int64_t b = 0; b < B; ++b) pad[b] = done[b] ? 1 : 0;
      at::Tensor step = torch::tensor(tok, torch::kLong).view({B, 1});                                // (B, 1)
      logits = model.prefill(step, cache, LogitsMode::LastPosition, opts.decode_observer, pad);    // (B, V)
      tok = pick(logits);
    } else {
      // Every row steps (a finished row's tokens are dropped); write_back stores only what each row fed.
      if (!decoder) {
        state = std::make_unique<StaticDecodeState>(make_static_decode(model, cache, tok, most_steps));
        if (opts.decode_observer) {
          // Eviction inside the steps; the state tracks on the device which rows still feed tokens.
          std::vector<bool> alive(B);
          std::vector<int64_t> more(B);  // the tokens each row may still produce
          for (int64_t b = 0; b < B; ++b) {
            alive[b] = !done[b];
            more[b] = limit[b] - static_cast<int64_t>(res.tokens[b].size());
          }
          attach_evictor(*state, opts.static_evictor(*state), cache, alive, more, eos);
        }
        decoder = std::make_unique<StaticDecoder>(model, *state,
                                                  path == DecodePath::Graph ? StepRunner::Graph : StepRunner::Eager);
        lap("fixed-shape set-up");
      }
      tok = decoder->next();
    }
    ++res.decode_steps;
  }
  lap("steps");
  if (state) write_back(*state, cache, fed);
  if (state) lap("write-back");
  res.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  res.peak_kv_bytes = cache.peak_bytes();
  return res;
}

}  // namespace kvd
