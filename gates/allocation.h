// Layer allocations: how a prefill's compression spends its budget across layers, one object per allocation
// kind (SelectorOptions::allocation), so compress_prefill scores layers without knowing which one it runs.
// compress_prefill hands each batch row's scores of a layer right after the layer's attention ran (the
// layer's entries of this chunk appended), then tells the allocation the layer and the forward are done:
//   Uniform, Pyramid, AdaKV   the layer's rows are selected together once every row is scored (select_top /
//                             select_threshold; AdaKV: select_pooled), and the layer compacted;
//   Global                    the scores wait for the forward's end, then every layer is compacted to one
//                             budget pooled over layers (select_all);
//   Cake                      after each layer, the total budget is re-split over the layers seen so far in
//                             proportion to the scorer's layer preferences, and earlier layers are cut to their
//                             new budgets by the scores they were kept with (a cascade; cake_layer_budgets).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "gates/selector.h"

namespace kvd {

class KVCache;

class LayerAllocation {
 public:
  virtual ~LayerAllocation() = default;
  // Row b of layer l: scores (1, H_kv, n_b) float32, -inf on invalid entries; valid (1, H_kv, n_b) bool or
  // undefined; `tokens` the token count the row's budget applies to; `pref` the scorer's layer preference
  // (Scorer::layer_preference; empty when it has none). Returns the row's keep of layer l now, or an empty
  // RaggedIndices (undefined indices) to leave the row whole while the allocation decides later.
  virtual RaggedIndices row_scored(int64_t layer, int64_t b, const at::Tensor& scores, const at::Tensor& valid,
                                   int64_t tokens, const std::vector<double>& pref) = 0;
  // Every row of layer l at once (a scorer that takes rows together): scores (B, H_kv, n) float32, -inf past each
  // head's entries (cache.lengths(l)); tokens [B]; pref [B] or empty. Returns each row's keep as row_scored
  // would; by default row_scored is asked row by row.
  virtual std::vector<RaggedIndices> rows_scored(int64_t layer, const at::Tensor& scores, const KVCache& cache,
                                                 const std::vector<int64_t>& tokens, const std::vector<double>& pref);
  // Every row of layer l was scored and layer l compacted with the returned keeps: the allocation may
  // compact earlier layers (Cake). tokens [B] as above.
  virtual void layer_done(int64_t layer, KVCache& cache, const std::vector<int64_t>& tokens) {
    (void)layer, (void)cache, (void)tokens;
  }
  // The chunk's forward ended; rows with fresh[b] == 0 saw only padding. tokens [B] as above (Global).
  virtual void forward_done(KVCache& cache, const std::vector<int64_t>& fresh, const std::vector<int64_t>& tokens) {
    (void)cache, (void)fresh, (void)tokens;
  }
  // True when the allocation can run after several chunks of one prefill (not Cake: its cascade runs once).
  virtual bool chunkable() const { return true; }
};

// kernels: the selection path (gates/selector.h).
std::unique_ptr<LayerAllocation> make_allocation(const SelectorOptions& options, int64_t num_layers, int64_t batch,
                                                 KernelPath kernels = KernelPath::Fused);

// Row b's lengths of one layer: [h].
std::vector<int64_t> row_lengths(const KVCache& cache, int64_t layer, int64_t b);

}  // namespace kvd
