// Text generation on a Model: greedy, or seeded temperature / top-p sampling; stops on an eos id or after
// max_new_tokens; streams each token to a callback. Batch 1.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace kvd {

class Model;
class KVCache;

enum class SamplingMode {
  Greedy,  // argmax
  Sample,  // softmax(logits / temperature), restricted to the top-p nucleus (top_p = 1: plain temperature)
};

enum class StopReason { Eos, MaxNewTokens };

struct GenerateOptions {
  SamplingMode mode = SamplingMode::Greedy;
  double temperature = 1.0;  // > 0; Sample only
  double top_p = 1.0;        // in (0, 1]; Sample only
  uint64_t seed = 0;         // Sample: the same seed gives the same tokens (sampling runs on the CPU)
  int64_t max_new_tokens = 256;
  // nullopt: the config's eos_token_ids; an empty vector: never stop on eos.
  std::optional<std::vector<int64_t>> eos_ids;
  // Called with every generated token as soon as it is chosen (the eos token included).
  std::function<void(int64_t token)> on_token;
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

}  // namespace kvd
