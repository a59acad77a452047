// Compression methods by name (a scorer plus a selector) and the prefill that applies one: the entry point
// of `kvdistill compress` and of the eval harness. Each layer is scored and compacted right after its
// attention ran during prefill (as kvpress's hooks do), so the full cache of only one layer is held at a
// time, except for the global allocation, which needs every layer's scores first. A scorer of
// ScoreTiming::AfterForward (query rows appended to the prompt) is prepared once every layer of a chunk is
// cached (Scorer::prepare) and then scores and compacts the layers one by one, in the same way.
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

// A compression method: a scorer (shared, so decode-time eviction can hold it too) and a selector. Names
// resolve in gates/registry.h.
struct Method {
  std::string name;
  std::shared_ptr<Scorer> scorer;
  SelectorOptions selector;
  ScoreSharing sharing = ScoreSharing::PerBudget;
};

// When compression runs (docs/methods/budgets.md, "Triggers").
//   chunk_size == 0: prefill the whole prompt, compress once after (each layer right after its attention).
//   chunk_size  > 0: "after each prefill chunk": prefill chunk_size tokens at a time (the last chunk shorter)
//                    and compress after every chunk, the budget applied to the tokens so far: each head keeps
//                    n_kept(tokens so far) (a ratio r: max(1, floor(t (1 - r))); a token budget: min(t, N)).
//                    In a batch, the chunks are cut on each row's own tokens (row b's chunk c is its tokens
//                    [c·chunk_size, (c+1)·chunk_size), left-padded to the chunk's longest row), so every row
//                    sees the chunks it would see alone; a row whose prompt has ended gets an all-padding
//                    chunk and is left alone. Window scorers need chunks at least as long as their window;
//                    a shorter last chunk takes the missing window rows from the previous chunk's queries.
//                    Not for cake (its cascade is per prefill) nor for scorers that refuse ragged heads after
//                    a head-adaptive / global compression.
// Chunked prefill's budget: the tokens the budget applies to after each chunk.
enum class ChunkBudget {
  SoFar,  // n_kept(tokens so far): the cache shrinks to the budget's share of what it has seen
  Final   // n_kept(the row's whole prompt): a head is evicted only once it holds more than its final budget
          // (TRIM-KV's fixed memory M while the prompt streams in)
};

struct CompressOptions {
  int64_t chunk_size = 0;
  ChunkBudget chunk_budget = ChunkBudget::SoFar;
  KernelPath kernels = KernelPath::Fused;  // scorers' fused kernels where they apply (LayerView::kernels)
};

struct RowCompressStats {
  int64_t tokens = 0;         // the row's prompt tokens
  int64_t full_bytes = 0;     // K+V bytes of its uncompressed cache
  int64_t kept_bytes = 0;     // K+V bytes of its kept entries
  int64_t peak_bytes = 0;     // its peak K+V bytes (KVCache::row_peak_bytes)
  double kept_fraction = 0;   // kept_bytes / full_bytes
};

struct CompressStats {
  int64_t tokens = 0;            // prompt tokens (all rows)
  int64_t full_bytes = 0;        // K+V bytes of the uncompressed cache
  int64_t kept_bytes = 0;        // K+V bytes of the kept entries (Σ kept entries × bytes per entry)
  int64_t peak_bytes = 0;        // the cache's peak K+V bytes during prefill and compression
  int64_t allocated_bytes = 0;   // bytes the cache's storage holds after compression (K, V, positions)
  std::vector<RowCompressStats> rows;  // [batch row]
};

// Prefills the prompts (one per batch row, of any lengths: left-padded with token 0, the padding never
// stored) into an empty cache of batch prompts.size() and compresses it with `method`. Scoring and selection
// run per row on that row's entries and non-padding rows alone, so each row keeps exactly the set it keeps
// when compressed alone (up to floating-point differences of the batched matmuls).
CompressStats compress_prefill(const Model& model, KVCache& cache, const std::vector<std::vector<int64_t>>& prompts,
                               Method& method, const CompressOptions& opts = {});
// The same prefill compressed by several methods at once (one method at several budgets, or several methods): the
// prompts are prefilled once, and caches[t] (each empty, batch prompts.size()) receives what compress_prefill would
// keep with methods[t] — the same entries and the same peak. Consecutive methods of one name are one method's
// budgets: when they all share their scores (ScoreSharing::AcrossBudgets) the first one's scorer scores each layer
// once for all of them; otherwise each budget's scorer scores the layer's observation itself (they must observe
// alike: the same ScorerNeeds, scoring per layer). Methods of different names each score their own whole copy of
// every layer, through a view built for their own needs; they must all score per layer (a scorer that runs after
// the forward shares a prefill only with its own budgets: registry.h's shares_prefill_with). Unchunked only (a
// chunked prefill's later chunks see the earlier evictions).
std::vector<CompressStats> compress_prefill_many(const Model& model, const std::vector<KVCache*>& caches,
                                                 const std::vector<std::vector<int64_t>>& prompts,
                                                 const std::vector<Method*>& methods,
                                                 const CompressOptions& opts = {});
// ids (1, T): the single-prompt form of the above.
CompressStats compress_prefill(const Model& model, KVCache& cache, const at::Tensor& ids, Method& method);

}  // namespace kvd
