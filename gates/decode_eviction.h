// Decode-time eviction (docs/methods/budgets.md: H2O and TOVA in decode, LazyEviction, the "every N decode steps"
// trigger): a policy that plugs into any decode loop as a PrefillObserver (GenerateOptions::decode_observer,
// or the observer argument of Model::decode / Model::prefill with ids (B, 1)).
//
// The observer runs for every layer of every decode step, right after the layer's attention ran and the
// step's K/V entry was appended (Model::prefill's contract), so the cache it sees holds the kept entries plus
// the new one. Its per-entry state (H2O's accumulated attention, LazyEviction's step counters) lives in the
// cache's payload columns, so appends give new entries fresh state and every keep() compacts the state with
// its entries; a Scorer policy's scorer writes its own state there through Scorer::on_append. The evictor is
// the only thing that may compact the cache during decode (a foreign keep is detected when a head shrinks).
//
// Per layer, decode step s = 1, 2, ... (counted by the evictor itself). At each step the policy updates its
// state; at steps where s % interval == 0 (a trigger) every head holding more than its target is evicted
// down to the target with cache.keep(layer, RaggedIndices) (sorted indices; heads may be ragged). Between
// triggers heads grow by one entry per step, so a head never holds more than target + interval entries.
//
// Policies (attention is the softmax attention of the step's query to the entries it sees, computed in the
// model's dtype promoted to at least float32; GQA: mean over the query heads of the KV head's group):
//   H2O            s_j += attention of every decode query (accumulated at every step, not only at triggers).
//                  Entries present at the first step start from the per-layer initial scores given with
//                  set_initial_scores() (e.g. the prefill's H2O column sums), else from 0. At a trigger the
//                  most recent target / 2 entries of the head are protected and the lowest-scoring others are
//                  evicted until the head holds target (half heavy hitters, half recent window).
//   TOVA           at a trigger, the entries with the lowest attention of the current query averaged over all
//                  query heads are evicted (one index set per layer and batch row). The new entry is not
//                  protected (plain argmin). Heads holding different positions fall back to each KV head's
//                  group mean.
//   LazyEviction   see lazy_eviction_update / lazy_eviction_keep_scores below. Importance is tracked at every
//                  decode step (LazyTracking::EveryStep, default) or only at trigger steps (AtTrigger, the
//                  literal "every W steps" reading); eviction runs at triggers, W = interval.
//   Scorer         any prefill Scorer (gates/scorer.h) re-run at each trigger on the layer's current entries;
//                  its window_queries are the last min(needs().window, max_query_rows) decode queries (each
//                  sees only the entries at or before its position; a scorer that needs exactly w rows, such
//                  as SnapKV, therefore needs interval >= w). Scorers that need LayerView::hidden per
//                  cached token are refused (decode has only the new token's). No recency protection beyond
//                  what the scorer gives itself.
// Ties: among equal keep scores the older entry (lower index) is kept.
// Batch rows are independent: every score and target is per row (B > 1 gives what each row gives alone),
// rows may hold different counts (left-padded prompts), and a padding step of a row (lead 1, position -1:
// a finished row of generate_batch) appends nothing and leaves that row's state unchanged.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "gates/heuristics.h"
#include "gates/scorer.h"
#include "models/model.h"

namespace kvd {

class KVCache;
class StaticStepEvictor;
struct RaggedIndices;
struct StaticDecodeState;

struct DecodeTrigger {
  int64_t interval = 1;  // evict every `interval` decode steps (>= 1)
  int64_t target = 0;    // entries per head to evict down to; 0: the count each head held before the first
                         // decode step (keeps the budget the prefill compression left, ragged heads included)
};

enum class DecodePolicy { H2O, TOVA, LazyEviction, Scorer };

enum class LazyTracking {
  EveryStep,  // update last-important / MRI with every decode step's attention
  AtTrigger   // only with the attention of trigger steps
};

struct DecodeEvictionOptions {
  GroupReduce reduce = GroupReduce::Mean;  // H2O / LazyEviction: GQA reduction of per-query-head attention
  // LazyEviction: an entry is important at a step when its attention is strictly above this; <= 0: above
  // uniform, 1 / (entries the head's query sees).
  double lazy_threshold = 0.0;
  LazyTracking lazy_tracking = LazyTracking::EveryStep;
  std::shared_ptr<Scorer> scorer;  // DecodePolicy::Scorer
  int64_t max_query_rows = 256;    // DecodePolicy::Scorer: cap on the decode queries kept for window scorers
  KernelPath kernels = KernelPath::Fused;  // DecodePolicy::Scorer: the scorer's kernels (LayerView::kernels)
};

struct DecodeEvictionStats {
  int64_t steps = 0;      // decode steps seen (layer 0's calls)
  int64_t triggers = 0;   // (layer, step) pairs where the trigger fired
  int64_t evictions = 0;  // entries evicted, summed over layers, batch rows and KV heads
};

class DecodeEvictor {
 public:
  DecodeEvictor(const Model& model, DecodePolicy policy, DecodeTrigger trigger, DecodeEvictionOptions opt = {});
  ~DecodeEvictor();
  DecodeEvictor(const DecodeEvictor&) = delete;
  DecodeEvictor& operator=(const DecodeEvictor&) = delete;

  // The observer to hand to the decode loop. It refers to this object, which must outlive it.
  PrefillObserver observer();
  // Called by observer(): one layer of one decode step (obs.queries (B, H, 1, hd)).
  void on_layer(const PrefillLayerObservation& obs, KVCache& cache);

  // H2O: scores of the entries the cache holds for `layer` when decoding starts, (B, H_kv, n) aligned with
  // cache.layer(layer) (padding ignored). Call before the first decode step.
  void set_initial_scores(int64_t layer, const at::Tensor& scores);

  const DecodeEvictionStats& stats() const { return stats_; }
  // Per-head targets of a layer ([b * H_kv + h]); empty before the layer's first decode step.
  std::vector<int64_t> targets(int64_t layer) const;
  // The same eviction inside fixed-shape decode steps (GenerateOptions::static_evictor: the Static and Graph
  // paths), or an empty function where there is none: a Scorer whose needs() are not FixedShape::Yes or that reads
  // decode queries (a window). Every other policy and trigger has one. Its state lives in buffers of the state's
  // shape; a scorer's per-entry columns (Scorer::entry_payload: TRIM-KV's log β, KVzap, DMS) are computed in each
  // step from the layer's attention input into the state's payload slots; triggers are a second graph variant
  // (StaticStepEvictor::variant); ties go as here (the older entry is kept); finished rows are left as here. The
  // decoded cache, payload columns included, equals this evictor's on the cache path
  // (DecodeEviction.FixedShapeEqualsCachePath). stats() count only the cache path's steps. Make it before this
  // evictor decodes on the cache path.
  std::function<std::shared_ptr<StaticStepEvictor>(const StaticDecodeState&)> static_evictor();
  // Forgets all state (a new sequence with a fresh cache).
  void reset();

 private:
  struct LayerState;
  const Model& model_;
  DecodePolicy policy_;
  DecodeTrigger trigger_;
  DecodeEvictionOptions opt_;
  std::vector<std::unique_ptr<LayerState>> layers_;
  DecodeEvictionStats stats_;
};

// ---- LazyEviction state and scoring, exposed so they can be checked on synthetic attention rows ----------
// All tensors (B, H_kv, n), aligned with a layer's padded entries; invalid (padding) entries are ignored.
struct LazyEvictionState {
  at::Tensor born;  // int64: decode step the entry was appended (0: present before decoding)
  at::Tensor last;  // int64: last step its attention was above the threshold (starts at `born`)
  at::Tensor mri;   // int64: maximum recurrence interval, the longest gap between two important steps (0)
  at::Tensor attn;  // float64: its attention at the latest tracked step (0 before any)
};

// Fresh state for n entries born at `step`: (B, H_kv, n) each, on `device`.
LazyEvictionState lazy_eviction_fresh(int64_t B, int64_t H_kv, int64_t n, int64_t step, c10::Device device);

// One tracked step: attn (B, H_kv, n) the step's attention (GQA-reduced), valid (B, H_kv, n) bool or undefined.
// Important entries (attn > threshold; threshold <= 0: attn > 1 / valid count of the head) get
// mri = max(mri, step - last) and last = step; every valid entry's attn is replaced by this step's.
void lazy_eviction_update(LazyEvictionState& st, const at::Tensor& attn, const at::Tensor& valid, int64_t step,
                          double threshold);
// The same with the step as a one-element int64 tensor on the state's device (fixed-shape decode steps).
void lazy_eviction_update(LazyEvictionState& st, const at::Tensor& attn, const at::Tensor& valid,
                          const at::Tensor& step, double threshold);

// Keep scores at `step` (higher = keep, float64 (B, H_kv, n)): with idle = step - last,
//   - entries born within the current window (born > step - window) get +inf (never evicted);
//   - entries with idle > mri rank lowest, by (idle - mri) descending, ties by lower attn first;
//   - the others rank above them, by lower attn first;
//   - invalid entries get -inf.
at::Tensor lazy_eviction_keep_scores(const LazyEvictionState& st, const at::Tensor& valid, int64_t step,
                                     int64_t window);
at::Tensor lazy_eviction_keep_scores(const LazyEvictionState& st, const at::Tensor& valid, const at::Tensor& step,
                                     int64_t window);

}  // namespace kvd
