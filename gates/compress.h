// Compression methods by name (a scorer plus a selector) and the prefill that applies one: the entry point
// of `kvdistill compress` and of the eval harness. Each layer is scored and compacted right after its
// attention ran during prefill (as kvpress's hooks do), so the full cache of only one layer is held at a
// time, except for the global allocation, which needs every layer's scores first.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "gates/scorer.h"
#include "gates/selector.h"

namespace kvd {

class Model;
class KVCache;

struct Method {
  std::string name;
  std::unique_ptr<Scorer> scorer;
  SelectorOptions selector;
};

// Known names: random, knorm, streaming_llm, h2o, observed_attention, snapkv, pyramidkv, tova, keydiff,
// expected_attention, defensivekv (AdaKV budgets), layer_defensivekv (global budgets), plus the prefixes adakv_<name> (head-adaptive budgets), criticalkv_<name> (value-norm
// re-weighting) and global_<name> (one budget across layers), e.g. adakv_snapkv.
std::vector<std::string> method_names();
// Throws a clear error for an unknown name or a ratio outside [0, 1).
Method make_method(const std::string& name, double ratio, uint64_t seed = 0);

struct CompressStats {
  int64_t tokens = 0;            // prompt tokens
  int64_t full_bytes = 0;        // K+V bytes of the uncompressed cache
  int64_t kept_bytes = 0;        // K+V bytes of the kept entries (Σ kept entries × bytes per entry)
  int64_t peak_bytes = 0;        // the cache's peak K+V bytes during prefill and compression
  int64_t allocated_bytes = 0;   // bytes the cache's storage holds after compression (K, V, positions)
};

// Prefills ids (1, T) into an empty cache and compresses it with `method` (once, after prefill).
CompressStats compress_prefill(const Model& model, KVCache& cache, const at::Tensor& ids, Method& method);

}  // namespace kvd
