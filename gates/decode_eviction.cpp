// Decode-time eviction: H2O / TOVA / LazyEviction / any Scorer behind the "every N decode steps" trigger
// (see gates/decode_eviction.h).
#include "gates/decode_eviction.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/selector.h"
#include "models/attention.h"
#include "models/device.h"
#include "models/kv_cache.h"
#include "models/static_decode.h"

namespace kvd {

struct DecodeEvictor::LayerState {
  int64_t steps = 0;
  std::vector<int64_t> len;     // [B * H_kv] entries the state covers (== the cache's after each call)
  std::vector<int64_t> target;  // [B * H_kv]
  at::Tensor init_scores;       // (B, H_kv, n0) H2O initial scores, or undefined
  at::Tensor q, q_pre, q_pos;   // Scorer: (B, H, w, hd), (B, H, w, hd), (B, w) the last decode queries
};

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Payload columns of the decode-time policies (KVCache per-entry payload).
constexpr const char* kH2OAcc = "h2o.acc";      // float64 accumulated attention
constexpr const char* kLazyBorn = "lazy.born";  // int64 step the entry was appended (0: before decoding)
constexpr const char* kLazyLast = "lazy.last";  // int64 last important step
constexpr const char* kLazyMri = "lazy.mri";    // int64 maximum recurrence interval
constexpr const char* kLazyAttn = "lazy.attn";  // float64 attention at the latest tracked step

// Softmax attention of one query row per batch row to a layer's entries, per query head:
//   q (B, H, 1, hd), q_pos (B, 1); k (B, H_kv, n, hd), pos (B, H_kv, n), valid (B, H_kv, n) or undefined.
// Computed in float64 for a float64 model, else float32. Returns (B, H, n); invisible entries get 0, and a
// padding query row (position -1, e.g. a finished row of generate_batch) sees nothing and gets 0 everywhere.
at::Tensor step_attention(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k, const at::Tensor& pos,
                          const at::Tensor& valid) {
  const auto ct = q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  return attention_probs(q, q_pos, k, pos, valid, ct, EmptyRows::Zero).squeeze(2);  // (B, H, n); rows that see nothing: 0
}

// Per head r, the counts[r] entries with the highest keep score (ties: the lower index), in ascending order, on
// keep's device. keep (B, H_kv, n) float64: the float32 selection kernel could merge close scores into ties.
// counts[r] never exceeds head r's valid entries (the invalid ones score -inf and rank last), so the mask holds
// exactly counts[r] per head and the offsets are built on the host: nothing is read back.
RaggedIndices top_sorted(const at::Tensor& keep, const std::vector<int64_t>& counts) {
  const int64_t n = keep.size(2);
  for (size_t r = 0; r < counts.size(); ++r)
    KVD_CHECK(counts[r] <= n, "decode eviction: head row ", r, " keeps ", counts[r], " of ", n, " entries");
  const at::Tensor k = host_ints(counts, keep.device()).view({keep.size(0), keep.size(1)});
  return ragged_from_mask(topk_mask(keep, k), counts);  // (B, H_kv) counts -> (B, H_kv, n) mask
}

// Keeps the last `rows` rows along dim `d`.
at::Tensor keep_last(const at::Tensor& t, int64_t d, int64_t rows) {
  return t.size(d) > rows ? t.narrow(d, t.size(d) - rows, rows) : t;
}

// step_attention over a fixed-shape state's slots without repeating K to the query heads: q (B, H, hd), q_pos
// (B, 1), k (B, H_kv, C, hd), pos / valid (B, H_kv, C) -> (B, H, C), in float64 for a float64 model, else float32
// (bf16 / fp16 products accumulated in float32 on CUDA, without a float32 copy of K). Empty slots and padding
// get 0.
at::Tensor slot_attention(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k, const at::Tensor& pos,
                          const at::Tensor& valid) {
  const int64_t B = k.size(0), Hkv = k.size(1), C = k.size(2), hd = k.size(3), H = q.size(1), G = H / Hkv;
  const auto ct = q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const at::Tensor qg = q.reshape({B * Hkv, G, hd});                  // (B·H_kv, G, hd): head h·G + g
  const at::Tensor kt = k.reshape({B * Hkv, C, hd}).transpose(1, 2);  // (B·H_kv, hd, C)
  // bf16 / fp16 on CUDA: products accumulated in float32 straight from the model's dtype (bmm with an output
  // dtype), where this build has it; else through a float32 copy.
  static bool out_dtype_ok = true;
  const bool half = q.is_cuda() && (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf);
  at::Tensor logits;  // (B·H_kv, G, C)
  if (half && out_dtype_ok) {
    try {
      logits = at::bmm(qg, kt, ct);
    } catch (const std::exception&) {
      out_dtype_ok = false;
    }
  }
  if (!logits.defined()) logits = at::bmm(qg.to(ct), kt.to(ct));
  logits = logits.view({B, Hkv, G, C}) / std::sqrt(static_cast<double>(hd));
  const at::Tensor vis = pos.le(q_pos.view({B, 1, 1})).logical_and(valid).unsqueeze(2);  // (B, H_kv, 1, C)
  at::Tensor p = torch::softmax(logits.masked_fill(vis.logical_not(), -kInf), -1);     // (B, H_kv, G, C)
  return torch::nan_to_num(p, 0.0, 0.0, 0.0).view({B, H, C});
}

// Decode-time eviction inside fixed-shape decode steps (DecodeEvictor::static_evictor), the cache path's policy on
// the state's slots: per-slot state (H2O's sums, LazyEviction's counters) in buffers of the state's shape, and at a
// trigger each head holding more than its target keeps its top-target entries; the others' slots are emptied
// (position -1). Only device ops of fixed shapes, so that a CUDA graph replays them: whether a step is a trigger is
// known on the host (variant()), the step number itself is read on the device.
class FixedShapeEvictor : public StaticStepEvictor {
 public:
  FixedShapeEvictor(const Model& model, DecodePolicy policy, DecodeTrigger trigger, const DecodeEvictionOptions& opt,
                    const StaticDecodeState& s, const std::vector<at::Tensor>& init_scores)
      : model_(model), policy_(policy), trigger_(trigger), opt_(opt) {
    const int64_t B = s.batch, Hkv = s.kv_heads, C = s.capacity;
    const c10::Device dev = s.start.device();
    const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
    const at::Tensor slot = torch::arange(C, lopt).view({1, 1, C});
    for (size_t l = 0; l < s.len0.size(); ++l) {
      std::vector<int64_t> target = s.len0[l];
      for (int64_t& t : target) {
        if (trigger_.target > 0) t = trigger_.target;
        KVD_CHECK(t >= 1, "decode eviction: layer ", l, " has a head with no entry before decoding; it would keep 0 "
                  "entries; pass DecodeTrigger::target >= 1");
      }
      target_.push_back(host_ints(target, dev).view({B, Hkv}));    // (B, H_kv)
      len0_.push_back(host_ints(s.len0[l], dev).view({B, Hkv, 1}));  // (B, H_kv, 1)
      if (policy_ == DecodePolicy::H2O) {
        at::Tensor acc = torch::zeros({B, Hkv, C}, lopt.dtype(torch::kDouble));  // (B, H_kv, C)
        if (init_scores[l].defined()) {
          const at::Tensor& init = init_scores[l];  // (B, H_kv, n0)
          const int64_t m = std::min(init.size(2), C);
          acc.narrow(2, 0, m).copy_(init.narrow(2, 0, m));
          acc.masked_fill_(slot.ge(len0_.back()), 0.0);  // only the entries held before decoding
        }
        acc_.push_back(acc);
      }
      if (policy_ == DecodePolicy::LazyEviction)  // entries held before decoding: born at step 0, never important
        lazy_.push_back(LazyEvictionState{torch::zeros({B, Hkv, C}, lopt), torch::zeros({B, Hkv, C}, lopt),
                                          torch::zeros({B, Hkv, C}, lopt),
                                          torch::zeros({B, Hkv, C}, lopt.dtype(torch::kDouble))});
    }
  }

  int64_t variant(int64_t step) const override { return fires(step) ? 1 : 0; }

  // A scorer's per-entry columns (Scorer::entry_payload) live in the state's payload slots, and its per-row state
  // is sized for every step now, so that the steps only write it in place.
  void attach(StaticDecodeState& s) override {
    if (policy_ != DecodePolicy::Scorer) return;
    for (const PayloadColumn& col : opt_.scorer->payload_columns()) {
      add_static_payload(s, col);
      for (size_t i = 0; i < s.payload_columns.size(); ++i)
        if (s.payload_columns[i].name == col.name) columns_.push_back(static_cast<int64_t>(i));
    }
    if (columns_.empty()) return;
    const int64_t reach = *std::max_element(s.next0.begin(), s.next0.end()) + s.max_steps;
    for (size_t l = 0; l < s.row_state.size(); ++l)
      opt_.scorer->reserve_row_state(static_cast<int64_t>(l), s.row_state[l], s.batch, reach);
  }

  void on_layer(int64_t l, const at::Tensor& q, const at::Tensor& hidden, StaticDecodeState& s) override {
    const int64_t B = s.batch, Hkv = s.kv_heads, C = s.capacity, hd = s.head_dim;
    const bool fire = fires(s.host_step);
    if (!columns_.empty()) {  // the step's entry (slot len[s] - 1 of each segment) gets the scorer's values
      // A row that no longer feeds appends nothing on the cache path (position -1, as a padding row).
      const at::Tensor qpos = torch::where(s.alive.view({B, 1}), s.qpos, torch::full_like(s.qpos, -1));  // (B, 1)
      const std::vector<at::Tensor> vals =
          opt_.scorer->entry_payload(l, hidden, EntryContext{qpos, &s.row_state[l]});  // each (B, H_kv, 1)
      KVD_CHECK(vals.size() == columns_.size(), "decode eviction: scorer '", opt_.scorer->name(), "' gave ",
                vals.size(), " payload columns, payload_columns() names ", columns_.size());
      const at::Tensor newest = (s.len[l] - 1).view({B, Hkv, 1});  // (B, H_kv, 1)
      for (size_t c = 0; c < columns_.size(); ++c) {
        at::Tensor col = s.payload[l][columns_[c]].view({B, Hkv, C});
        col.scatter_(2, newest, vals[c].reshape({B, Hkv, 1}).to(col.scalar_type()));
      }
    }
    const bool h2o = policy_ == DecodePolicy::H2O, lazy = policy_ == DecodePolicy::LazyEviction;
    const at::Tensor pos = s.pos[l].view({B, Hkv, C});          // (B, H_kv, C); -1: empty
    const at::Tensor slot = torch::arange(C, pos.options()).view({1, 1, C});  // (1, 1, C)
    const at::Tensor alive = s.alive.view({B, 1, 1});           // (B, 1, 1)
    // A row's entries: what it held before decoding and what it fed (a finished row keeps stepping, but its later
    // slots are not its entries: step-by-step decoding stops appending to it).
    const at::Tensor held = len0_[l] + (s.fed + s.alive.to(torch::kLong)).view({B, 1, 1});  // (B, H_kv, 1)
    const at::Tensor valid = pos.ge(0).logical_and(slot.lt(held));                          // (B, H_kv, C)
    const at::Tensor k = s.k[l].view({B, Hkv, C, hd});                                      // (B, H_kv, C, hd)
    const at::Tensor step = s.step + 1;  // (1) this step's number, 1-based (the cache path's per-layer count)
    if (lazy) {  // the step's entry is born now
      LazyEvictionState& z = lazy_[l];
      const at::Tensor fresh = slot.eq((s.len[l] - 1).view({B, Hkv, 1})).logical_and(alive);  // (B, H_kv, C)
      z.born.copy_(torch::where(fresh, step.expand_as(z.born), z.born));  // in place: the graph replays these buffers
      z.last.copy_(torch::where(fresh, step.expand_as(z.last), z.last));
    }
    const bool need_attn = h2o || (lazy && (fire || opt_.lazy_tracking == LazyTracking::EveryStep)) ||
                           (fire && policy_ == DecodePolicy::TOVA);
    at::Tensor attn;  // (B, H, C); a finished row's query sees nothing on the cache path: 0
    if (need_attn) attn = slot_attention(q, s.qpos, k, pos, valid).masked_fill(alive.logical_not(), 0.0);
    if (h2o) acc_[l].add_(reduce_group(attn, Hkv, opt_.reduce).to(torch::kDouble));
    if (lazy && attn.defined())
      lazy_eviction_update(lazy_[l], reduce_group(attn, Hkv, opt_.reduce), valid.logical_and(alive), step,
                           opt_.lazy_threshold);
    if (!fire) return;

    at::Tensor keep;  // (B, H_kv, C) float64, higher = keep
    switch (policy_) {
      case DecodePolicy::H2O: {
        // The most recent target / 2 entries of each head are protected: those with at most that many of the
        // head's entries at or after them.
        const at::Tensor after = valid.to(torch::kLong).flip(2).cumsum(2).flip(2);  // (B, H_kv, C)
        keep = acc_[l].masked_fill(after.le(target_[l].div(2, "floor").unsqueeze(2)), kInf);
        break;
      }
      case DecodePolicy::TOVA: {
        const at::Tensor a = attn.to(torch::kDouble);  // (B, H, C)
        const at::Tensor vp = pos.masked_fill(valid.logical_not(), -1);                      // (B, H_kv, C)
        const at::Tensor same = vp.eq(vp.narrow(1, 0, 1)).flatten(1).all(1).view({B, 1, 1});  // (B, 1, 1)
        keep = torch::where(same, a.mean(1, true).expand({B, Hkv, C}), reduce_group(a, Hkv, GroupReduce::Mean));
        break;
      }
      case DecodePolicy::LazyEviction:
        keep = lazy_eviction_keep_scores(lazy_[l], valid, step, trigger_.interval);
        break;
      case DecodePolicy::Scorer: {
        LayerView view;
        view.layer = l;
        view.model = &model_;
        view.keys = k;
        view.values = s.v[l].view({B, Hkv, C, hd});
        view.positions = pos;
        view.valid = valid;
        for (size_t c = 0; c < s.payload_columns.size(); ++c)
          view.payload[s.payload_columns[c].name] = s.payload[l][c].view({B, Hkv, C});  // (B, H_kv, C)
        view.next_positions_device = torch::where(s.alive, s.qpos.view({B}) + 1, torch::zeros_like(s.qpos.view({B})));
        view.kernels = opt_.kernels;
        keep = opt_.scorer->score(view).to(torch::kDouble);  // (B, H_kv, C)
        break;
      }
    }
    const at::Tensor count = valid.sum(2);  // (B, H_kv)
    at::Tensor evict;                       // (B, H_kv, C)
    if (trigger_.interval == 1 && trigger_.target == 0) {
      // Exactly one entry too many in a head of a row that fed this step: its lowest score among its entries goes;
      // ties: the newest (the older is kept, as the cache path's selection keeps the lower index).
      const at::Tensor sc = keep.masked_fill(valid.logical_not(), kInf);                      // (B, H_kv, C)
      const at::Tensor low = valid.logical_and(sc.eq(sc.amin(2, true)));                     // (B, H_kv, C)
      const at::Tensor last = torch::where(low, slot, torch::full_like(slot, -1)).amax(2, true);  // (B, H_kv, 1)
      evict = slot.eq(last).logical_and(count.gt(target_[l]).unsqueeze(2));
    } else {
      // Each head keeps its top min(count, target) entries (ties to the lower slot, i.e. the older entry); finished
      // rows too, as the cache path evicts every row at a trigger, but only at a step that some row still feeds
      // (the last block of steps may run past the end of every row).
      const at::Tensor kept = topk_mask(keep.masked_fill(valid.logical_not(), -kInf), torch::minimum(count, target_[l]));
      evict = valid.logical_and(kept.logical_not()).logical_and(s.alive.any());
    }
    pos.masked_fill_(evict, -1);
    s.entries.sub_(evict.sum({1, 2}));
  }

 private:
  bool fires(int64_t step) const { return (step + 1) % trigger_.interval == 0; }

  const Model& model_;
  DecodePolicy policy_;
  DecodeTrigger trigger_;
  DecodeEvictionOptions opt_;
  std::vector<at::Tensor> target_;         // [layer] (B, H_kv) entries each head keeps
  std::vector<at::Tensor> len0_;           // [layer] (B, H_kv, 1) entries each head held before decoding
  std::vector<at::Tensor> acc_;            // [layer] (B, H_kv, C) float64 H2O accumulated attention per slot
  std::vector<LazyEvictionState> lazy_;    // [layer] LazyEviction's per-slot state
  std::vector<int64_t> columns_;           // the scorer's payload columns: their indices in s.payload_columns
};

}  // namespace

DecodeEvictor::DecodeEvictor(const Model& model, DecodePolicy policy, DecodeTrigger trigger, DecodeEvictionOptions opt)
    : model_(model), policy_(policy), trigger_(trigger), opt_(std::move(opt)) {
  KVD_CHECK(trigger_.interval >= 1, "decode eviction: the trigger interval must be >= 1 step, got ", trigger_.interval);
  KVD_CHECK(trigger_.target >= 0, "decode eviction: the target must be >= 0 entries per head (0: keep the prefill's "
            "count), got ", trigger_.target);
  KVD_CHECK(policy_ != DecodePolicy::Scorer || opt_.scorer, "decode eviction: DecodePolicy::Scorer needs "
            "DecodeEvictionOptions::scorer (e.g. from make_method(name, ratio).scorer)");
  if (policy_ == DecodePolicy::Scorer)
    KVD_CHECK(!opt_.scorer->needs().hidden, "decode eviction: scorer '", opt_.scorer->name(),
              "' needs the hidden state of every cached token, which decode does not have; use it at prefill "
              "(a scorer that keeps per-entry state writes it in on_append instead)");
  if (policy_ == DecodePolicy::Scorer)
    KVD_CHECK(opt_.scorer->needs().timing == ScoreTiming::PerLayer, "decode eviction: scorer '", opt_.scorer->name(),
              "' scores a cache only after a whole forward (its query rows run after the prompt); it compresses the "
              "prompt once, so use it without decode-time eviction");
  KVD_CHECK(opt_.max_query_rows >= 1, "decode eviction: max_query_rows must be >= 1");
  reset();
}

DecodeEvictor::~DecodeEvictor() = default;

void DecodeEvictor::reset() {
  layers_.clear();
  for (int64_t l = 0; l < model_.config().num_layers; ++l) layers_.push_back(std::make_unique<LayerState>());
  stats_ = {};
}

PrefillObserver DecodeEvictor::observer() {
  return [this](const PrefillLayerObservation& obs, KVCache& cache) { on_layer(obs, cache); };
}

void DecodeEvictor::set_initial_scores(int64_t layer, const at::Tensor& scores) {
  KVD_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "set_initial_scores: no layer ", layer);
  KVD_CHECK(layers_[layer]->len.empty(), "set_initial_scores: layer ", layer, " has already started decoding");
  KVD_CHECK(scores.dim() == 3, "set_initial_scores: scores must be (B, H_kv, n), got ", scores.sizes());
  layers_[layer]->init_scores = scores.to(torch::kDouble);
}

std::vector<int64_t> DecodeEvictor::targets(int64_t layer) const { return layers_.at(layer)->target; }

std::function<std::shared_ptr<StaticStepEvictor>(const StaticDecodeState&)> DecodeEvictor::static_evictor() {
  if (policy_ == DecodePolicy::Scorer &&
      (opt_.scorer->needs().fixed_shape != FixedShape::Yes || opt_.scorer->needs().window != 0 ||
       opt_.scorer->needs().queries_pre_rope))
    return {};
  return [this](const StaticDecodeState& s) -> std::shared_ptr<StaticStepEvictor> {
    std::vector<at::Tensor> init(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      KVD_CHECK(layers_[l]->len.empty(), "decode eviction: this evictor already decoded on the cache path; reset() "
                "it before a fixed-shape decode");
      if (layers_[l]->init_scores.defined()) init[l] = layers_[l]->init_scores.to(s.start.device());
    }
    KVD_CHECK(s.len0.size() == layers_.size(), "decode eviction: the state has ", s.len0.size(), " layers, the model ",
              layers_.size());
    return std::make_shared<FixedShapeEvictor>(model_, policy_, trigger_, opt_, s, init);
  };
}

void DecodeEvictor::on_layer(const PrefillLayerObservation& obs, KVCache& cache) {
  const int64_t l = obs.layer;
  KVD_CHECK(l >= 0 && l < static_cast<int64_t>(layers_.size()), "decode eviction: no layer ", l);
  KVD_CHECK(obs.queries.dim() == 4 && obs.queries.size(2) == 1, "decode eviction: expects one query row per step "
            "(decode ids (B, 1)); for a multi-token prefill compress with compress_prefill instead, got queries ",
            obs.queries.sizes());
  LayerState& S = *layers_[l];
  if (policy_ == DecodePolicy::Scorer) opt_.scorer->on_append(obs, cache);  // per-entry state of the new entry
  const int64_t B = cache.batch(), Hkv = cache.num_kv_heads(), n = cache.max_length(l), R = B * Hkv;
  const std::vector<int64_t>& lens = cache.lengths(l);
  const c10::Device dev = cache.device();
  auto dopt = torch::TensorOptions().dtype(torch::kDouble).device(dev);

  if (S.len.empty()) {  // first decode step of this layer: the entries before it are the prefill's
    S.len.resize(R);
    S.target.resize(R);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t b = r / Hkv, added = obs.lead.empty() ? 1 : 1 - obs.lead[b];  // a padding step adds nothing
      S.len[r] = lens[r] - added;
      S.target[r] = trigger_.target > 0 ? trigger_.target : S.len[r];
      KVD_CHECK(S.target[r] >= 1, "decode eviction: layer ", l, " head row ", r, " would keep 0 entries; pass "
                "DecodeTrigger::target >= 1");
    }
    // Per-entry state lives in the cache's payload (kept and compacted with the entries): entries present
    // before decoding start from 0 (LazyEviction: born at step 0), or H2O from set_initial_scores().
    const int64_t n0 = *std::max_element(S.len.begin(), S.len.end());
    if (policy_ == DecodePolicy::H2O) {
      cache.add_payload(kH2OAcc, torch::kDouble, 0.0);
      if (S.init_scores.defined()) {
        KVD_CHECK(S.init_scores.size(0) == B && S.init_scores.size(1) == Hkv && S.init_scores.size(2) >= n0,
                  "set_initial_scores: layer ", l, ": scores ", S.init_scores.sizes(), " do not cover the cache's (", B,
                  ", ", Hkv, ", ", n0, ") entries at the start of decoding");
        at::Tensor init = torch::zeros({B, Hkv, n}, dopt);  // (B, H_kv, n); the step's new entry starts at 0
        init.narrow(2, 0, std::min(n0, n)).copy_(S.init_scores.narrow(2, 0, std::min(n0, n)));
        at::Tensor idx = torch::arange(n, dopt.dtype(torch::kLong)).view({1, 1, n});
        at::Tensor old = host_ints(S.len, dev).view({B, Hkv, 1});
        cache.set_payload(l, kH2OAcc, torch::where(idx.lt(old), init, torch::zeros_like(init)));
      }
    }
    if (policy_ == DecodePolicy::LazyEviction) {
      for (const char* c : {kLazyBorn, kLazyLast, kLazyMri}) cache.add_payload(c, torch::kLong, 0.0);
      cache.add_payload(kLazyAttn, torch::kDouble, 0.0);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    KVD_CHECK(lens[r] >= S.len[r], "decode eviction: layer ", l, " head row ", r, " shrank from ", S.len[r], " to ",
              lens[r], " entries outside the evictor; let it be the only decode-time eviction");
  const int64_t step = ++S.steps;
  if (l == 0) ++stats_.steps;

  // The step's new entry: the cache gave its payload columns their fill (0); LazyEviction's is born now.
  const bool h2o = policy_ == DecodePolicy::H2O, lazy = policy_ == DecodePolicy::LazyEviction;
  if (lazy) {
    const at::Tensor now = torch::full({B, Hkv, 1}, step, dopt.dtype(torch::kLong));  // (B, H_kv, 1)
    cache.set_payload_tail(l, kLazyBorn, now, obs.lead);
    cache.set_payload_tail(l, kLazyLast, now, obs.lead);
  }
  const KVLayerView kv = cache.layer(l);  // k, v (B, H_kv, n, hd); pos, valid, payload (B, H_kv, n)
  S.len = lens;

  const bool fire = step % trigger_.interval == 0;
  const bool need_attn = h2o || (lazy && (fire || opt_.lazy_tracking == LazyTracking::EveryStep)) ||
                         (fire && policy_ == DecodePolicy::TOVA);
  at::Tensor attn;  // (B, H, n)
  if (need_attn) attn = step_attention(obs.queries, obs.query_positions, kv.k, kv.pos, kv.valid);
  at::Tensor acc;  // (B, H_kv, n) float64 H2O accumulated attention
  if (h2o) {
    acc = kv.payload.at(kH2OAcc) + reduce_group(attn, Hkv, opt_.reduce).to(torch::kDouble);
    cache.set_payload(l, kH2OAcc, acc);
  }
  LazyEvictionState lz;  // (B, H_kv, n) each
  if (lazy) {
    lz.born = kv.payload.at(kLazyBorn);
    lz.last = kv.payload.at(kLazyLast).clone();
    lz.mri = kv.payload.at(kLazyMri).clone();
    lz.attn = kv.payload.at(kLazyAttn).clone();
  }
  if (lazy && attn.defined()) {
    // Padding query rows (a finished row's step) leave the state alone.
    at::Tensor seen = obs.query_positions.ge(0).reshape({B, 1, 1}).expand({B, Hkv, n});  // (B, H_kv, n)
    if (kv.valid.defined()) seen = seen.logical_and(kv.valid);
    lazy_eviction_update(lz, reduce_group(attn, Hkv, opt_.reduce), seen, step, opt_.lazy_threshold);
    cache.set_payload(l, kLazyLast, lz.last);
    cache.set_payload(l, kLazyMri, lz.mri);
    cache.set_payload(l, kLazyAttn, lz.attn);
  }
  if (policy_ == DecodePolicy::Scorer) {
    const ScorerNeeds needs = opt_.scorer->needs();
    const int64_t rows = std::min(std::max<int64_t>(needs.window, 1), opt_.max_query_rows);
    S.q = keep_last(S.q.defined() ? torch::cat({S.q, obs.queries}, 2) : obs.queries, 2, rows);  // (B, H, w, hd)
    S.q_pos = keep_last(S.q_pos.defined() ? torch::cat({S.q_pos, obs.query_positions}, 1) : obs.query_positions, 1,
                        rows);  // (B, w)
    if (needs.queries_pre_rope)
      S.q_pre = keep_last(S.q_pre.defined() ? torch::cat({S.q_pre, obs.queries_pre_rope}, 2) : obs.queries_pre_rope,
                          2, rows);  // (B, H, w, hd)
  }
  if (!fire) return;
  ++stats_.triggers;

  std::vector<int64_t> counts(R);
  int64_t evicted = 0;
  for (int64_t r = 0; r < R; ++r) {
    counts[r] = std::min(lens[r], S.target[r]);
    evicted += lens[r] - counts[r];
  }
  if (evicted == 0) return;

  at::Tensor keep;  // (B, H_kv, n) float64, higher = keep
  at::Tensor idx = torch::arange(n, torch::TensorOptions().dtype(torch::kLong).device(dev)).view({1, 1, n});
  switch (policy_) {
    case DecodePolicy::H2O: {
      std::vector<int64_t> first_recent(R);  // index of the first protected entry of each head
      for (int64_t r = 0; r < R; ++r) first_recent[r] = lens[r] - S.target[r] / 2;
      at::Tensor fr = host_ints(first_recent, dev).view({B, Hkv, 1});  // (B, H_kv, 1)
      keep = acc.masked_fill(idx.ge(fr), kInf);
      break;
    }
    case DecodePolicy::TOVA: {
      // One set per row when the row's KV heads hold the same entries (always, unless a per-head policy
      // compressed the prefill); otherwise each KV head ranks by its own group's mean.
      at::Tensor a = attn.to(torch::kDouble);  // (B, H, n)
      at::Tensor same = kv.pos.eq(kv.pos.narrow(1, 0, 1));  // (B, H_kv, n)
      if (kv.valid.defined())  // same validity, and the same position wherever valid
        same = kv.valid.eq(kv.valid.narrow(1, 0, 1)).logical_and(same.logical_or(kv.valid.logical_not()));
      same = same.flatten(1).all(1).view({B, 1, 1});  // (B, 1, 1)
      keep = torch::where(same, a.mean(1, true).expand({B, Hkv, n}), reduce_group(a, Hkv, GroupReduce::Mean));
      break;
    }
    case DecodePolicy::LazyEviction:
      keep = lazy_eviction_keep_scores(lz, kv.valid, step, trigger_.interval);
      break;
    case DecodePolicy::Scorer: {
      // Each row's next query position is its own (rows of a batch sit at different positions, and a score such
      // as TRIM-KV's log beta · age depends on it). One view of every row, or one per row for a scorer that
      // takes rows one at a time.
      const ScorerNeeds needs = opt_.scorer->needs();
      const at::Tensor qpos = obs.query_positions.to(torch::kCPU, torch::kLong).contiguous();  // (B, 1)
      std::vector<int64_t> next(B);
      for (int64_t b = 0; b < B; ++b) next[b] = qpos.data_ptr<int64_t>()[b * qpos.size(1)] + 1;
      if (needs.rows == RowBatching::Together || B == 1) {
        LayerView view = layer_view(kv, l, model_, next, opt_.kernels);
        if (needs.window > 0) {
          view.window_queries = S.q;        // (B, H, w, hd)
          view.window_positions = S.q_pos;  // (B, w)
        }
        if (needs.queries_pre_rope) view.queries_pre_rope = S.q_pre;  // (B, H, w, hd)
        keep = opt_.scorer->score(view).to(torch::kDouble);            // (B, H_kv, n)
        break;
      }
      std::vector<at::Tensor> rows;
      for (int64_t b = 0; b < B; ++b) {
        KVLayerView kb;
        kb.k = kv.k.narrow(0, b, 1);
        kb.v = kv.v.narrow(0, b, 1);
        kb.pos = kv.pos.narrow(0, b, 1);
        if (kv.valid.defined()) kb.valid = kv.valid.narrow(0, b, 1);
        for (const auto& [name, col] : kv.payload) kb.payload[name] = col.narrow(0, b, 1);
        kb.n = kv.n;
        LayerView view = layer_view(kb, l, model_, {next[b]}, opt_.kernels);
        view.batch_offset = b;
        if (needs.window > 0) {
          view.window_queries = S.q.narrow(0, b, 1);        // (1, H, w, hd)
          view.window_positions = S.q_pos.narrow(0, b, 1);  // (1, w)
        }
        if (needs.queries_pre_rope) view.queries_pre_rope = S.q_pre.narrow(0, b, 1);  // (1, H, w, hd)
        rows.push_back(opt_.scorer->score(view).to(torch::kDouble));                // (1, H_kv, n)
      }
      keep = torch::cat(rows, 0);  // (B, H_kv, n)
      break;
    }
  }
  if (kv.valid.defined()) keep = keep.masked_fill(kv.valid.logical_not(), -kInf);

  // The payload columns follow their entries; the indices come from this layer's own entries (no bounds read-back).
  cache.keep(l, top_sorted(keep, counts), IndexCheck::ByConstruction);
  S.len = counts;
  stats_.evictions += evicted;
}

}  // namespace kvd
