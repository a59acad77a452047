// Scorer: the one interface through which every eviction policy ranks cached tokens — the heuristics
// (StreamingLLM, SnapKV, ...) and the learned parts (TRIM-KV retention gates, soft queries, ...) alike —
// so the eval harness and the export path treat them the same (DESIGN.md, "The abstractions").
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <c10/core/Device.h>

#include "models/kernel_path.h"
#include "models/kv_cache.h"

namespace kvd {

class Model;
class KVCache;
struct KVLayerView;
struct PrefillLayerObservation;

// What a scorer may look at for one layer. Fields a scorer does not declare in needs() may be undefined.
struct LayerView {
  int64_t layer = 0;
  const Model* model = nullptr;  // frozen weights (e.g. o_proj for CriticalKV), config, RoPE
  at::Tensor hidden;             // (B, n, d) the layer's attention input (after its input RMSNorm) per cached token
  at::Tensor keys;               // (B, H_kv, n, hd) post-RoPE keys as cached
  at::Tensor values;             // (B, H_kv, n, hd)
  at::Tensor positions;          // (B, H_kv, n) int64 original positions
  at::Tensor valid;              // (B, H_kv, n) bool, undefined when every head holds n entries
  at::Tensor window_queries;     // (B, H, w, hd) post-RoPE queries of the last w prompt rows (observation window)
  at::Tensor window_positions;   // (B, w) int64 positions of those rows
  at::Tensor queries_pre_rope;   // (B, H, n_q, hd) pre-RoPE queries of the prompt rows (Expected Attention)
  at::Tensor query_valid;        // (B, n_q) bool: the real rows of queries_pre_rope; undefined when all are
  std::map<std::string, at::Tensor> payload;  // the cache's per-entry columns (B, H_kv, n) (KVCache payload)
  std::vector<int64_t> next_positions;        // [B] the position each row's next query will have (t)
  at::Tensor next_positions_device;           // (B) int64, optional: the same on the device, used by
                                              // next_position_column where defined (fixed-shape decode steps)
  int64_t batch_offset = 0;  // the cache's batch row of this view's row 0 (a view of row b alone has batch_offset b)
  KernelPath kernels = KernelPath::Fused;  // fused scoring kernels where they apply (CompressOptions::kernels)

  // next_positions as a (B, 1, 1) int64 tensor on `device`, to broadcast against (B, H_kv, n) positions
  // (next_positions_device where defined).
  at::Tensor next_position_column(c10::Device device) const;
};

// One layer of a cache as a scorer sees it: its entries, validity and positions; the optional fields are left
// undefined for the caller to fill as the scorer's needs() ask.
LayerView layer_view(const KVLayerView& kv, int64_t layer, const Model& model, std::vector<int64_t> next_positions,
                     KernelPath kernels = KernelPath::Fused);

// When a scorer can rate a layer's entries.
enum class ScoreTiming {
  PerLayer,     // right after the layer's attention ran (a prefill observer), from the LayerView alone
  AfterForward  // only once the forward of every layer ended: drivers call Scorer::prepare(model, cache) on the
                // whole cache, then score each layer (query-row methods: their rows run after the prompt)
};

// How a driver may hand a scorer the rows of a batch:
//   OneAtATime  a view of one batch row at a time (what any scorer handles);
//   Together    one view of every row (one launch chain per layer, not one per row). The rows of one prefill have
//               different lengths: row b's entries are 0 .. n_b - 1 of each head and `valid` marks them; hidden
//               (B, n, d) and queries_pre_rope (B, H, n, hd) are aligned with the entries (index j of row b is
//               entry j's token, meaningless past n_b, and query_valid marks the real ones); the window rows are each row's own last w query rows, so a
//               window-based scorer finds a row's window entries by position (>= window_positions[b][0]), not by
//               index. The scorer must rate each row's entries as it would rate that row alone.
enum class RowBatching { OneAtATime, Together };

// Whether a scorer can run inside a fixed-shape decode step (models/static_decode.h), which a CUDA graph replays:
enum class FixedShape {
  No,  // it may read host fields (next_positions) or window queries, keep state of its own, or read values back
  Yes  // it reads only keys, values, positions, valid, next_position_column() and its own payload columns, never
       // reads back, and its per-entry state, if any, is what entry_payload() computes (on_append is the default),
       // from the appended rows and the per-row state it keeps in the cache (reserve_row_state)
};

// What entry_payload sees besides the appended rows' attention input.
struct EntryContext {
  at::Tensor positions;             // (B, t) int64 on the rows' device: their positions (-1: padding, never stored)
  RowState* row_state = nullptr;    // the layer's per-row state (KVCache::row_state), reserved (reserve_row_state)
                                    // for these positions: entry_payload writes it in place, never reallocates it
};

// Which optional LayerView fields a scorer reads, so the harness captures only those, and how it takes rows.
struct ScorerNeeds {
  RowBatching rows = RowBatching::OneAtATime;
  bool hidden = false;
  int64_t window = 0;  // > 0: window_queries of this many rows (kAllRows: every row of the prefill chunk)
  static constexpr int64_t kAllRows = INT64_MAX;
  bool queries_pre_rope = false;
  ScoreTiming timing = ScoreTiming::PerLayer;
  FixedShape fixed_shape = FixedShape::No;  // Yes: decode-time eviction may run it in fixed-shape steps
};

// The needs of a scorer that reads no optional field and takes a batch's rows together (FixedShape::Yes: it also
// runs inside fixed-shape decode steps).
inline ScorerNeeds rows_together(FixedShape fixed_shape = FixedShape::No) {
  ScorerNeeds n;
  n.rows = RowBatching::Together;
  n.fixed_shape = fixed_shape;
  return n;
}

// Whether a method scores a prompt the same at every budget (only its selection differs), so that one scoring can
// serve several budgets of one prefill (compress_prefill_many).
enum class ScoreSharing {
  PerBudget,     // the scores depend on the budget (DefensiveKV's first-stage cap) or on the scorer's own state
                 // (random): one prefill may still serve several budgets, each scored by its own scorer (its
                 // budgets' shared part once where Scorer::score_budgets computes it so)
  AcrossBudgets  // the same scores at every budget: scored once
};

class Scorer {
 public:
  virtual ~Scorer() = default;
  virtual std::string name() const = 0;
  virtual ScorerNeeds needs() const { return {}; }
  // Called by every driver that prefills or decodes with this scorer (compress_prefill, the decode evictor, the
  // held-out check), once per layer of every chunk or decode step, right after the chunk's entries were
  // appended to `cache` and before any scoring of that layer: a scorer that rates tokens when they are
  // written stores its per-entry state in the cache's payload here (KVCache::add_payload / set_payload_tail;
  // obs.hidden (B, t, d) are the new rows' attention inputs). The default writes the columns of
  // payload_columns() with the values of entry_payload(obs.layer, obs.hidden, ctx), the layer's row state reserved
  // for the positions the rows reach (from the cache's host counts: no read-back).
  virtual void on_append(const PrefillLayerObservation& obs, KVCache& cache);
  // Per-entry state that is a function of each appended row's attention input alone (TRIM-KV's log β, KVzap's
  // predicted score, DMS's keep probability): the columns it fills, and their values for rows just appended to
  // `layer` from hidden (B, t, d): one (B, H_kv, t) per column. Device ops of fixed shapes only, with no read-back,
  // so that fixed-shape decode steps (DecodeEvictor::static_evictor, CUDA graphs) compute it too, into slot buffers
  // that write_back carries to the cache.
  // A scorer whose values also depend on earlier rows keeps what it needs of them per row in the cache
  // (KVCache::row_state, e.g. the Attention-Gate's own keys and values by position), read and written by
  // entry_payload through ctx.row_state.
  virtual std::vector<PayloadColumn> payload_columns() const { return {}; }
  virtual std::vector<at::Tensor> entry_payload(int64_t layer, const at::Tensor& hidden, const EntryContext& ctx) {
    (void)layer;
    (void)hidden;
    (void)ctx;
    return {};
  }
  // Makes `state` (layer `layer`'s row state, `batch` rows) hold rows up to position `positions` - 1: the scorer
  // allocates or grows its tensors here, so that entry_payload only writes in place. Called before each append by
  // on_append's default, and by fixed-shape decoding once for all its steps before the first. The default keeps no
  // row state.
  virtual void reserve_row_state(int64_t layer, RowState& state, int64_t batch, int64_t positions) {
    (void)layer;
    (void)state;
    (void)batch;
    (void)positions;
  }
  // Called by drivers that score a cache after a whole forward (compress_prefill for ScoreTiming::AfterForward
  // scorers, evict_to_budget for every scorer), once the forward ended and before the first score() of the
  // cache as it is now; the scorer may run the model against the cache (it must leave the cache as it is).
  virtual void prepare(const Model& model, const KVCache& cache) {
    (void)model;
    (void)cache;
  }
  // prepare() for this scorer and for those of `peers` (the other ScoreTiming::AfterForward scorers of methods that
  // share one prefill, compress_prefill_many; this one among them) it can prepare from the same work; returns the
  // scorers it prepared, this one included, each as its own prepare() would have. The driver asks the first scorer
  // not yet prepared until none is left. The default prepares this one alone; a scorer whose kind shares a pass
  // with peers of its kind overrides it (KVzip and KVzip+: one reconstruction pass).
  virtual std::vector<Scorer*> prepare_peers(const Model& model, const KVCache& cache, const std::vector<Scorer*>& peers);
  // Importance of each cached token, higher = keep: (B, H_kv, n) float32. Invalid entries are ignored.
  virtual at::Tensor score(const LayerView& view) = 0;
  // One layer scored for several budgets of one method at once (compress_prefill_many, ScoreSharing::PerBudget):
  // peers[t] is budget t's scorer, this one first, all of one method. Returns one (B, H_kv, n) per peer, equal to
  // peers[t]->score(view). The default calls each peer's score(); a scorer whose budget enters only its last step
  // overrides it to compute the rest once (and must leave each peer's layer_preference() as score() would).
  virtual std::vector<at::Tensor> score_budgets(const LayerView& view, const std::vector<Scorer*>& peers);
  // Layer preference of the view last passed to score(), one value per batch row (CAKE's P_ℓ, read by
  // Allocation::Cake right after score()). Empty: the scorer has none (the default), and the Cake allocation
  // refuses it.
  virtual std::vector<double> layer_preference() const { return {}; }
};

}  // namespace kvd
