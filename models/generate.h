// Text generation on a Model: greedy, or seeded temperature / top-p sampling; stops on an eos id or after
// max_new_tokens; streams each token to a callback. generate() runs one prompt; generate_batch() runs many
// prompts of different lengths as one batch (left-padded; the padding is never stored in the cache).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "models/model.h"

namespace kvd {

class Model;
class KVCache;
class StaticStepEvictor;
struct StaticDecodeState;

enum class SamplingMode {
  Greedy,  // argmax
  Sample,  // softmax(logits / temperature), restricted to the top-p nucleus (top_p = 1: plain temperature)
};

enum class StopReason { Eos, MaxNewTokens };

// How generate_batch runs its decode steps (the prompt's prefill is the same for all).
enum class DecodePath {
  Auto,    // Graph on CUDA where it applies (greedy; no decode_observer, or one with a static_evictor) and its
           // copy of the cache takes at most half the free device memory, else Cache
  Cache,   // Model::prefill on the KVCache, one step at a time: any sampling, decode-time observers
  Static,  // a fixed-shape copy of the cache (models/static_decode.h), op by op; greedy; a decode_observer only
           // with its static_evictor
  Graph,   // Static, each step replayed from one CUDA graph (CUDA only)
};
const char* decode_path_name(DecodePath p);      // "auto" | "cache" | "static" | "graph"
DecodePath parse_decode_path(const std::string& s);  // the names above; anything else is an error

struct GenerateOptions {
  SamplingMode mode = SamplingMode::Greedy;
  double temperature = 1.0;  // > 0; Sample only
  double top_p = 1.0;        // in (0, 1]; Sample only
  uint64_t seed = 0;         // Sample: the same seed gives the same tokens (sampling runs on the CPU)
  int64_t max_new_tokens = 256;
  // generate_batch: row b stops after max_new_tokens_per_row[b] tokens (empty: max_new_tokens for every row).
  std::vector<int64_t> max_new_tokens_per_row;
  // nullopt: the config's eos_token_ids; an empty vector: never stop on eos.
  std::optional<std::vector<int64_t>> eos_ids;
  // Called with every generated token as soon as it is chosen (the eos token included). Batch: row 0's.
  std::function<void(int64_t token)> on_token;
  // Called for every layer of every decode step (not the prompt's prefill): decode-time eviction hooks in here.
  PrefillObserver decode_observer;
  // The same eviction inside fixed-shape steps (DecodeEvictor::static_evictor), made from the state when the
  // Static / Graph path starts; it lets a greedy decode with a decode_observer take those paths. Empty: a
  // decode_observer keeps the decode on the Cache path.
  std::function<std::shared_ptr<StaticStepEvictor>(const StaticDecodeState&)> static_evictor;
  // Called for every layer of the prompt's prefill (e.g. a scorer's on_append, so that per-entry state covers
  // the prompt's entries too).
  PrefillObserver prefill_observer;
  // Static and Graph give the tokens Cache gives up to floating-point ties: the attention sums in another order
  // (tests/models/test_static_decode.cpp); the cache is left as Cache leaves it.
  DecodePath decode = DecodePath::Auto;
};

struct GenerateResult {
  std::vector<int64_t> tokens;  // generated tokens (eos included when it stopped generation)
  StopReason stop = StopReason::MaxNewTokens;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;   // all decode steps
  int64_t peak_kv_bytes = 0;   // KVCache::peak_bytes at the end
};

// Picks the next token from one row of logits; owns the seeded CPU generator.
class Sampler {
 public:
  explicit Sampler(const GenerateOptions& opts);
  int64_t next(const at::Tensor& logits);  // (V) any dtype / device
 private:
  SamplingMode mode_;
  double temperature_, top_p_;
  at::Generator gen_;
};

// Generates from `prompt` with a fresh cache.
GenerateResult generate(const Model& model, const std::vector<int64_t>& prompt, const GenerateOptions& opts);
// Same, appending to a caller-owned cache of batch 1 (which may already hold earlier turns).
GenerateResult generate(const Model& model, const std::vector<int64_t>& prompt, KVCache& cache,
                        const GenerateOptions& opts);

struct BatchGenerateResult {
  std::vector<std::vector<int64_t>> tokens;  // [row] generated tokens (eos included when it stopped the row)
  std::vector<StopReason> stop;              // [row]
  std::vector<int64_t> prompt_tokens;        // [row]
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int64_t decode_steps = 0;                  // batched decode steps run
  int64_t peak_kv_bytes = 0;                 // KVCache::peak_bytes at the end (the whole batch)
  DecodePath decode = DecodePath::Cache;     // the path the decode steps took (Auto resolved)
};

// Appends each row's prompt to a caller-owned cache of batch prompts.size() (which may already hold earlier
// tokens, e.g. a compressed context; rows may hold different counts) and generates for every row until each
// stops. Greedy rows give the same tokens as generate() on that row alone (up to floating-point ties).
// Sampling uses one generator per row seeded with opts.seed + row.
BatchGenerateResult generate_batch(const Model& model, const std::vector<std::vector<int64_t>>& prompts, KVCache& cache,
                                   const GenerateOptions& opts);
// Same with a fresh cache.
BatchGenerateResult generate_batch(const Model& model, const std::vector<std::vector<int64_t>>& prompts,
                                   const GenerateOptions& opts);

// Left-pads ragged rows into (B, T) ids with `pad_id`; lead[b] = T - prompts[b].size().
at::Tensor left_pad(const std::vector<std::vector<int64_t>>& prompts, int64_t pad_id, std::vector<int64_t>& lead);

}  // namespace kvd
