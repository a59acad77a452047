// Selectors: turn per-token scores plus a budget into keep indices, allocating the budget across layers and
// heads (docs/methods/budgets.md, "Selectors"). The output is RaggedIndices (models/kv_cache.h): sorted keep
// indices per KV head plus offsets, the layout TensorRT-LLM's sparse attention reads, and what
// KVCache::keep(layer, RaggedIndices) compacts to.
//
// Ties: among equal scores the lower index (the older token) wins, on both paths below. torch.topk (kvpress)
// leaves the order of ties unspecified.
//
// Two paths compute the same sets (KernelPath, models/kernel_path.h):
//   Reference  a stable descending sort of each head's scores, a keep mask, its nonzero entries;
//   Fused      on CUDA, the per-(request, KV head) radix select of kernels/kv_select.h for the top-k allocations
//              (Uniform, Pyramid) and threshold budgets: no sort and no mask. The other allocations rank across
//              heads or layers and take the reference path.
// Either way the keep indices stay on the scores' device; only the per-head counts (the offsets) come back to
// the host. Scores are never NaN (a scorer marks an entry never to keep with -inf): the sort would rank NaN
// first, the kernel last.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "models/kernel_path.h"
#include "models/kv_cache.h"

namespace kvd {

enum class BudgetKind {
  Ratio,          // fraction removed, kvpress's compression_ratio: n_kept = max(1, floor(n (1 - r)))
  TokensPerHead,  // absolute entries kept per head (clipped to n)
  Threshold       // keep every entry whose score >= value
};

struct Budget {
  BudgetKind kind = BudgetKind::Ratio;
  double value = 0.0;
  static Budget ratio(double r);
  static Budget tokens(int64_t n);
  static Budget threshold(double tau);
  // Entries kept per head out of n for Ratio / TokensPerHead (kvpress's compute_n_kept for a ratio).
  int64_t n_kept(int64_t n) const;
};

enum class Allocation {
  Uniform,  // every head of every layer keeps n_kept
  Pyramid,  // PyramidKV's linear per-layer budgets (kvpress PyramidKVPress.get_layer_budget)
  AdaKV,    // per layer: the top H_kv * n_kept of the pooled heads, each head keeping >= floor(alpha n_kept)
  Global,   // across layers: the top L * H_kv * n_kept of every layer and head pooled
  Cake,     // CAKE: per-layer budgets B_ℓ ∝ the scorer's layer preference P_ℓ (Scorer::layer_preference),
            // cascading during prefill (compress_prefill; see cake_layer_budgets)
};

struct SelectorOptions {
  Allocation allocation = Allocation::Uniform;
  Budget budget;
  double ada_alpha = 0.2;       // AdaKV floor (kvpress alpha_safeguard)
  int64_t pyramid_window = 64;  // PyramidKV: SnapKV's window
  double pyramid_beta = 20.0;
  // Each batch row's own budget, for the budgets of one method run as rows of one batch (eval's joined prefill of a
  // continuous learned part); empty: `budget` for every row. The rows' budgets must be of one kind, and thresholds
  // are not taken (make_allocation checks both).
  std::vector<Budget> row_budgets;
  const Budget& budget_of(int64_t row) const;
  // These options for one row: budget = budget_of(row), no row budgets.
  SelectorOptions for_row(int64_t row) const;
};

// Boolean keep mask -> RaggedIndices, indices on the mask's device. mask (B, H_kv, n) bool.
RaggedIndices ragged_from_mask(const at::Tensor& mask);
// The same when the caller knows each head row's count ([b * H_kv + h]): the offsets come from the host and
// nothing is read back from the device. On the CPU the counts are checked against the mask.
RaggedIndices ragged_from_mask(const at::Tensor& mask, const std::vector<int64_t>& counts);
// RaggedIndices -> per head lists of indices (row r = b * H_kv + h).
std::vector<std::vector<int64_t>> ragged_to_lists(const RaggedIndices& r);

// The top-k of each row of scores (B, H_kv, n) as a keep mask (B, H_kv, n), ties to the lower index.
at::Tensor topk_mask(const at::Tensor& scores, int64_t k);
// The same with its own k for each batch row: every head of row b keeps its top k[b] ([B]).
at::Tensor topk_mask(const at::Tensor& scores, const std::vector<int64_t>& k);
// The same with its own k for each head: k (B, H_kv) integer on the scores' device (or (B, 1): per row).
at::Tensor topk_mask(const at::Tensor& scores, const at::Tensor& k);
// Each entry's rank in the stable descending order of the last dim: 0 = the highest, ties to the lower index.
// The top k are the entries ranked below k, and the top k of a top k' (k <= k') is the top k of the whole.
at::Tensor rank_desc(const at::Tensor& scores);  // (..., n) -> (..., n) int64

// kvpress PyramidKV budget of `layer` (entries per head) for a prompt of n tokens.
int64_t pyramid_layer_budget(int64_t n, double ratio, int64_t window, double beta, int64_t layer, int64_t num_layers);

// The building blocks of the per-head selections, on either path (scores (B, H_kv, n), higher = keep; valid
// (B, H_kv, n) bool or undefined: entries outside it are never kept):
//   select_top        each head of row b keeps its top k[b] valid entries ([B]; ties to the lower index);
//   select_threshold  every valid entry with score >= tau;
//   select_pooled     AdaKV: each head of row b first keeps its top floor[b], then the row's heads pooled keep
//                     their top H_kv · k[b] (ties to the lower head, then the lower index). Scores must be -inf
//                     past each head's entries (the reference path only).
RaggedIndices select_top(const at::Tensor& scores, const std::vector<int64_t>& k, const at::Tensor& valid,
                         KernelPath kernels);
// select_top where each head's entries are the first lengths[b * H_kv + h] of its scores (the cache's layout; the
// scores -inf past them): head (b, h) keeps min(k[b], its length) entries, counts known on the host, so the
// selection reads nothing back from the device.
RaggedIndices select_top_prefix(const at::Tensor& scores, const std::vector<int64_t>& k,
                                const std::vector<int64_t>& lengths, KernelPath kernels);
RaggedIndices select_threshold(const at::Tensor& scores, double tau, const at::Tensor& valid, KernelPath kernels);
RaggedIndices select_pooled(const at::Tensor& scores, const std::vector<int64_t>& k, const std::vector<int64_t>& floor,
                            const at::Tensor& valid);
// AdaKV's floor for k entries per head: int(k · ada_alpha), at least 1 when alpha > 0 and k > 0.
int64_t adakv_floor(const SelectorOptions& opt, int64_t k);
// Entries kept per head of one layer under the uniform or pyramid allocation, for `tokens` tokens.
int64_t layer_keep_count(const SelectorOptions& opt, int64_t layer, int64_t num_layers, int64_t tokens);

// One layer (every allocation except Global and Cake): scores (B, H_kv, n) float, higher = keep.
//   tokens: the token count the budget applies to (n_kept(tokens) per head); < 0: n. Chunked prefill passes
//           the tokens seen so far, which exceed the entries left after earlier compressions.
//   valid:  (B, H_kv, n) bool or undefined: entries outside it are never kept (ragged heads).
//   kernels: the path (see the top of this file).
RaggedIndices select_layer(const at::Tensor& scores, int64_t layer, int64_t num_layers, const SelectorOptions& opt,
                           int64_t tokens = -1, const at::Tensor& valid = at::Tensor(),
                           KernelPath kernels = KernelPath::Fused);
// Every layer at once (Global; the per-layer allocations too, layer by layer). Layers may hold different
// entry counts (global: padded with -inf); tokens and valid ([layer] or empty) as in select_layer.
std::vector<RaggedIndices> select_all(const std::vector<at::Tensor>& scores, const SelectorOptions& opt,
                                      int64_t tokens = -1, const std::vector<at::Tensor>& valid = {},
                                      KernelPath kernels = KernelPath::Fused);

// Batch rows' RaggedIndices (each over its own B_i rows of heads) -> one over every row, in order; the indices
// on parts[0]'s device.
RaggedIndices concat_ragged(const std::vector<RaggedIndices>& parts);
// Keep everything: head r keeps 0 .. lengths[r] - 1 (indices on `device`).
RaggedIndices ragged_keep_all(const std::vector<int64_t>& lengths, c10::Device device = c10::kCPU);

// CAKE's layer budgets (entries per head): `total` split over the layers in proportion to pref, each capped
// at `cap` (water-filling: what a capped layer cannot hold goes to the others in proportion), each share
// rounded down, so Σ lies within (layers - 1) of min(total, layers · cap). Rounding down keeps the cascade
// monotone: adding a layer lowers the water level, so no earlier layer's budget ever grows back (entries it
// already evicted could not return). All-zero preferences split evenly.
std::vector<int64_t> cake_layer_budgets(const std::vector<double>& pref, int64_t total, int64_t cap);

}  // namespace kvd
