// Decode-time eviction: H2O / TOVA / LazyEviction / any Scorer behind the "every N decode steps" trigger
// (see gates/decode_eviction.h).
#include "gates/decode_eviction.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "models/kv_cache.h"

namespace kvd {

struct DecodeEvictor::LayerState {
  int64_t steps = 0;
  std::vector<int64_t> len;     // [B * H_kv] entries the state covers (== the cache's after each call)
  std::vector<int64_t> target;  // [B * H_kv]
  at::Tensor init_scores;       // (B, H_kv, n0) H2O initial scores, or undefined
  at::Tensor acc;               // (B, H_kv, n) float64 H2O accumulated attention
  LazyEvictionState lazy;       // (B, H_kv, n) each
  at::Tensor q, q_pre, q_pos;   // Scorer: (B, H, w, hd), (B, H, w, hd), (B, w) the last decode queries
};

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Softmax attention of one query row per batch row to a layer's entries, per query head:
//   q (B, H, 1, hd), q_pos (B, 1); k (B, H_kv, n, hd), pos (B, H_kv, n), valid (B, H_kv, n) or undefined.
// Computed in float64 for a float64 model, else float32. Returns (B, H, n); invisible entries get 0, and a
// padding query row (position -1, e.g. a finished row of generate_batch) sees nothing and gets 0 everywhere.
at::Tensor step_attention(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k, const at::Tensor& pos,
                          const at::Tensor& valid) {
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), Hkv = k.size(1), G = H / Hkv;
  const auto ct = q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  at::Tensor kf = k.to(ct);                                                   // (B, H_kv, n, hd)
  if (G > 1) kf = kf.repeat_interleave(G, 1);                                 // (B, H, n, hd)
  at::Tensor logits = torch::matmul(q.to(ct), kf.transpose(2, 3)).squeeze(2) / std::sqrt(static_cast<double>(hd));  // (B, H, n)
  at::Tensor vis = pos.le(q_pos.reshape({B, 1, 1}));                           // (B, H_kv, n)
  if (valid.defined()) vis = vis.logical_and(valid);
  if (G > 1) vis = vis.repeat_interleave(G, 1);                               // (B, H, n)
  at::Tensor a = torch::softmax(logits.masked_fill(vis.logical_not(), -kInf), -1);  // (B, H, n)
  return torch::nan_to_num(a, 0.0, 0.0, 0.0);  // rows that see nothing: 0, not NaN
}

// Grows per-entry state to the cache's padded length: entries below old_len keep `old`, the rest `fresh`.
//   old (B, H_kv, m), old_len [B * H_kv], fresh (B, H_kv, n) -> (B, H_kv, n)
at::Tensor grow(const at::Tensor& old, const std::vector<int64_t>& old_len, const at::Tensor& fresh) {
  const int64_t B = fresh.size(0), Hkv = fresh.size(1);
  const int64_t m = std::min(old.defined() ? old.size(2) : 0, fresh.size(2));
  at::Tensor out = fresh.clone();
  if (m == 0) return out;
  at::Tensor ol = torch::tensor(old_len, torch::kLong).view({B, Hkv, 1}).to(fresh.device());  // (B, H_kv, 1)
  at::Tensor keep = torch::arange(m, ol.options()).view({1, 1, m}).lt(ol);                    // (B, H_kv, m)
  out.narrow(2, 0, m).copy_(torch::where(keep, old.narrow(2, 0, m), fresh.narrow(2, 0, m)));
  return out;
}

// Per head r, the counts[r] entries with the highest keep score (ties: the lower index), in ascending order.
// keep (B, H_kv, n); idx_pad receives (B, H_kv, max count) the same indices padded with 0 (to gather state).
RaggedIndices top_sorted(const at::Tensor& keep, const std::vector<int64_t>& counts, at::Tensor& idx_pad) {
  const int64_t B = keep.size(0), Hkv = keep.size(1), n = keep.size(2), R = B * Hkv;
  at::Tensor s = keep.reshape({R, n}).to(torch::kCPU, torch::kDouble);                  // (R, n)
  at::Tensor order = std::get<1>(s.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));  // (R, n)
  const int64_t n_new = *std::max_element(counts.begin(), counts.end());
  std::vector<at::Tensor> parts;
  std::vector<int64_t> off(R + 1, 0);
  at::Tensor pad = torch::zeros({R, n_new}, torch::kLong);  // (R, n_new)
  for (int64_t r = 0; r < R; ++r) {
    KVD_CHECK(counts[r] <= n, "decode eviction: head row ", r, " keeps ", counts[r], " of ", n, " entries");
    at::Tensor sel = std::get<0>(order[r].narrow(0, 0, counts[r]).sort());  // (c)
    parts.push_back(sel);
    pad[r].narrow(0, 0, counts[r]).copy_(sel);
    off[r + 1] = off[r] + counts[r];
  }
  RaggedIndices out;
  out.indices = torch::cat(parts).to(keep.device());  // (total)
  out.offsets = torch::tensor(off, torch::kLong);     // (R + 1) CPU
  idx_pad = pad.view({B, Hkv, n_new}).to(keep.device());
  return out;
}

at::Tensor compact(const at::Tensor& st, const at::Tensor& idx_pad) {  // (B, H_kv, n) -> (B, H_kv, n')
  return st.defined() ? st.gather(2, idx_pad) : st;
}

// Keeps the last `rows` rows along dim `d`.
at::Tensor keep_last(const at::Tensor& t, int64_t d, int64_t rows) {
  return t.size(d) > rows ? t.narrow(d, t.size(d) - rows, rows) : t;
}

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
              "' needs the hidden state of every cached token, which decode does not have; use it at prefill");
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

void DecodeEvictor::on_layer(const PrefillLayerObservation& obs, KVCache& cache) {
  const int64_t l = obs.layer;
  KVD_CHECK(l >= 0 && l < static_cast<int64_t>(layers_.size()), "decode eviction: no layer ", l);
  KVD_CHECK(obs.queries.dim() == 4 && obs.queries.size(2) == 1, "decode eviction: expects one query row per step "
            "(decode ids (B, 1)); for a multi-token prefill compress with compress_prefill instead, got queries ",
            obs.queries.sizes());
  LayerState& S = *layers_[l];
  const KVLayerView kv = cache.layer(l);  // k, v (B, H_kv, n, hd); pos, valid (B, H_kv, n)
  const int64_t B = kv.k.size(0), Hkv = kv.k.size(1), n = kv.n, R = B * Hkv;
  const std::vector<int64_t>& lens = cache.lengths(l);
  const c10::Device dev = kv.k.device();
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
    const int64_t n0 = *std::max_element(S.len.begin(), S.len.end());
    if (S.init_scores.defined()) {
      KVD_CHECK(S.init_scores.size(0) == B && S.init_scores.size(1) == Hkv && S.init_scores.size(2) >= n0,
                "set_initial_scores: layer ", l, ": scores ", S.init_scores.sizes(), " do not cover the cache's (", B,
                ", ", Hkv, ", ", n0, ") entries at the start of decoding");
      S.acc = S.init_scores.narrow(2, 0, n0).to(dev);
    } else {
      S.acc = torch::zeros({B, Hkv, n0}, dopt);
    }
    S.lazy = lazy_eviction_fresh(B, Hkv, n0, 0, dev);
  }
  for (int64_t r = 0; r < R; ++r)
    KVD_CHECK(lens[r] >= S.len[r], "decode eviction: layer ", l, " head row ", r, " shrank from ", S.len[r], " to ",
              lens[r], " entries outside the evictor; let it be the only decode-time eviction");
  const int64_t step = ++S.steps;
  if (l == 0) ++stats_.steps;

  // Fresh state for the entries appended since the last call.
  const bool h2o = policy_ == DecodePolicy::H2O, lazy = policy_ == DecodePolicy::LazyEviction;
  if (h2o) S.acc = grow(S.acc, S.len, torch::zeros({B, Hkv, n}, dopt));
  if (lazy) {
    LazyEvictionState f = lazy_eviction_fresh(B, Hkv, n, step, dev);
    S.lazy.born = grow(S.lazy.born, S.len, f.born);
    S.lazy.last = grow(S.lazy.last, S.len, f.last);
    S.lazy.mri = grow(S.lazy.mri, S.len, f.mri);
    S.lazy.attn = grow(S.lazy.attn, S.len, f.attn);
  }
  S.len = lens;

  const bool fire = step % trigger_.interval == 0;
  const bool need_attn = h2o || (lazy && (fire || opt_.lazy_tracking == LazyTracking::EveryStep)) ||
                         (fire && policy_ == DecodePolicy::TOVA);
  at::Tensor attn;  // (B, H, n)
  if (need_attn) attn = step_attention(obs.queries, obs.query_positions, kv.k, kv.pos, kv.valid);
  if (h2o) S.acc = S.acc + reduce_group(attn, Hkv, opt_.reduce).to(torch::kDouble);  // (B, H_kv, n)
  if (lazy && attn.defined()) {
    // Padding query rows (a finished row's step) leave the state alone.
    at::Tensor seen = obs.query_positions.ge(0).reshape({B, 1, 1}).expand({B, Hkv, n});  // (B, H_kv, n)
    if (kv.valid.defined()) seen = seen.logical_and(kv.valid);
    lazy_eviction_update(S.lazy, reduce_group(attn, Hkv, opt_.reduce), seen, step, opt_.lazy_threshold);
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
      at::Tensor fr = torch::tensor(first_recent, torch::kLong).view({B, Hkv, 1}).to(dev);  // (B, H_kv, 1)
      keep = S.acc.masked_fill(idx.ge(fr), kInf);
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
      keep = lazy_eviction_keep_scores(S.lazy, kv.valid, step, trigger_.interval);
      break;
    case DecodePolicy::Scorer: {
      const ScorerNeeds needs = opt_.scorer->needs();
      LayerView view = layer_view(kv, l, model_, obs.query_positions.max().item<int64_t>() + 1);
      if (needs.window > 0) {
        view.window_queries = S.q;      // (B, H, w, hd)
        view.window_positions = S.q_pos;  // (B, w)
      }
      if (needs.queries_pre_rope) view.queries_pre_rope = S.q_pre;  // (B, H, w, hd)
      keep = opt_.scorer->score(view).to(torch::kDouble);            // (B, H_kv, n)
      break;
    }
  }
  if (kv.valid.defined()) keep = keep.masked_fill(kv.valid.logical_not(), -kInf);

  at::Tensor idx_pad;
  RaggedIndices sel = top_sorted(keep, counts, idx_pad);
  cache.keep(l, sel);
  if (h2o) S.acc = compact(S.acc, idx_pad);
  if (lazy) {
    S.lazy.born = compact(S.lazy.born, idx_pad);
    S.lazy.last = compact(S.lazy.last, idx_pad);
    S.lazy.mri = compact(S.lazy.mri, idx_pad);
    S.lazy.attn = compact(S.lazy.attn, idx_pad);
  }
  S.len = counts;
  stats_.evictions += evicted;
}

}  // namespace kvd
