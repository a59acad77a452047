#include "gates/attention_gate.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/components.h"
#include "gates/shared_owner.h"
#include "gates/distill_objective.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/profile.h"

namespace kvd {

namespace {

constexpr std::pair<KeepPenalty, const char*> kPenaltyNames[] = {{KeepPenalty::Dual, "dual"},
                                                                  {KeepPenalty::DualEquality, "dual_equality"},
                                                                  {KeepPenalty::Hinge, "hinge"},
                                                                  {KeepPenalty::TwoSided, "two_sided"}};

const char* penalty_name(KeepPenalty p) {
  for (const auto& [v, n] : kPenaltyNames)
    if (v == p) return n;
  return "?";
}

std::optional<KeepPenalty> parse_penalty(const std::string& s) {
  for (const auto& [v, n] : kPenaltyNames)
    if (s == n) return v;
  return std::nullopt;
}

}  // namespace

AttentionGateLayerImpl::AttentionGateLayerImpl(int64_t d_model, int64_t heads_, int64_t head_dim_, int64_t num_kv_heads)
    : heads(heads_), head_dim(head_dim_) {
  const int64_t inner = heads * head_dim;
  wq = register_module("wq", torch::nn::Linear(torch::nn::LinearOptions(d_model, inner).bias(false)));
  wk = register_module("wk", torch::nn::Linear(torch::nn::LinearOptions(d_model, inner).bias(false)));
  wv = register_module("wv", torch::nn::Linear(torch::nn::LinearOptions(d_model, inner).bias(false)));
  wo = register_module("wo", torch::nn::Linear(torch::nn::LinearOptions(inner, num_kv_heads).bias(true)));
}

std::vector<at::Tensor> AttentionGateLayerImpl::qkv(const at::Tensor& x) {  // (B, S, d)
  const c10::ScalarType dt = c10::promoteTypes(wq->weight.scalar_type(), torch::kFloat);
  const at::Tensor xf = x.to(wq->weight.device(), dt);
  const int64_t B = x.size(0), S = x.size(1);
  auto split = [&](const at::Tensor& y) { return y.view({B, S, heads, head_dim}).transpose(1, 2); };  // (B, g, S, d_g)
  return {split(wq->forward(xf)), split(wk->forward(xf)), split(wv->forward(xf))};
}

at::Tensor AttentionGateLayerImpl::out(const at::Tensor& o) {  // (B, g, S, d_g)
  const int64_t B = o.size(0), S = o.size(2);
  return wo->forward(o.transpose(1, 2).reshape({B, S, heads * head_dim}));  // (B, S, H_kv)
}

at::Tensor AttentionGateLayerImpl::forward(const at::Tensor& x, const at::Tensor& allowed) {
  std::vector<at::Tensor> p = qkv(x);  // 3 × (B, g, S, d_g)
  // Memory-efficient attention with the boolean visibility (no (S, S) probabilities kept for the backward on
  // CUDA); the math path on CPU.
  at::Tensor o = at::scaled_dot_product_attention(p[0], p[1], p[2], allowed.to(p[0].device()));  // (B, g, S, d_g)
  return out(o);                                                                                   // (B, S, H_kv)
}

at::Tensor straight_through_flags(const at::Tensor& s, const at::Tensor& positions, double tau, int64_t sinks) {
  at::Tensor hard = s.ge(tau).to(s.scalar_type());  // (B, S, H_kv)
  at::Tensor f = hard + (s - s.detach());           // value: exactly hard; gradient: ds
  if (sinks > 0) {
    at::Tensor sink = positions.to(s.device()).lt(sinks).unsqueeze(-1);  // (B, S, 1)
    f = torch::where(sink, torch::ones_like(f), f);
  }
  return f;
}

at::Tensor causal_document_mask(const at::Tensor& doc_ids, int64_t B, int64_t S, c10::Device device) {
  at::Tensor idx = torch::arange(S, torch::TensorOptions().dtype(torch::kLong).device(device));
  at::Tensor allowed = idx.view({1, 1, S, 1}).ge(idx.view({1, 1, 1, S}));  // (1, 1, S, S) key <= query
  if (!doc_ids.defined()) return allowed.expand({B, 1, S, S});
  at::Tensor d = doc_ids.to(device);                                     // (B, S)
  at::Tensor same = d.unsqueeze(2).eq(d.unsqueeze(1)).unsqueeze(1);      // (B, 1, S, S)
  at::Tensor real = d.ge(0).view({B, 1, S, 1});                          // (B, 1, S, 1)
  at::Tensor eye = torch::eye(S, torch::TensorOptions().dtype(torch::kBool).device(device)).view({1, 1, S, S});
  return (allowed & same & real) | eye;  // a padding row sees itself only (no empty softmax)
}

AttentionGateImpl::AttentionGateImpl(const ModelConfig& cfg, AttentionGateOptions options)
    : opt_(options), d_model_(cfg.hidden_size), num_kv_heads_(cfg.num_kv_heads) {
  KVD_CHECK(cfg.num_layers > 0 && cfg.hidden_size > 0 && cfg.num_kv_heads > 0,
            "AttentionGate: the model config has no layers / hidden size / KV heads");
  KVD_CHECK(opt_.heads > 0 && opt_.head_dim > 0, "AttentionGate: heads and head_dim must be positive");
  KVD_CHECK(opt_.target > 0.0 && opt_.target <= 1.0, "AttentionGate: the target keep ratio must lie in (0, 1], got ",
            opt_.target);
  KVD_CHECK(opt_.tau > 0.0 && opt_.tau < 1.0, "AttentionGate: tau must lie in (0, 1), got ", opt_.tau);
  layers_ = register_module("layers", torch::nn::ModuleList());
  multiplier_ = register_buffer("multiplier", torch::zeros({cfg.num_layers}, torch::kDouble));
  torch::NoGradGuard no_grad;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    AttentionGateLayer layer(d_model_, opt_.heads, opt_.head_dim, num_kv_heads_);
    for (auto* lin : {&layer->wq, &layer->wk, &layer->wv, &layer->wo}) (*lin)->weight.normal_(0.0, opt_.init_std);
    layer->wo->bias.fill_(opt_.bias_init);
    layers_->push_back(layer);
  }
}

at::Tensor AttentionGateImpl::logits(int64_t layer, const at::Tensor& hidden, const at::Tensor& allowed) {
  KVD_CHECK(layer >= 0 && layer < num_layers(), "AttentionGate: layer ", layer, " out of range [0, ", num_layers(), ")");
  KVD_CHECK(hidden.dim() == 3 && hidden.size(-1) == d_model_, "AttentionGate: hidden must be (B, S, ", d_model_,
            "), got ", hidden.sizes());
  return layers_->ptr<AttentionGateLayerImpl>(layer)->forward(hidden, allowed);  // (B, S, H_kv)
}

void AttentionGateImpl::end_step(int64_t step, const std::vector<double>& stats) {
  if (opt_.penalty != KeepPenalty::Dual && opt_.penalty != KeepPenalty::DualEquality) return;
  KVD_CHECK(static_cast<int64_t>(stats.size()) == num_layers(), "AttentionGate::end_step: ", stats.size(),
            " kept fractions for ", num_layers(), " layers");
  const double beta = target_at(step);
  torch::NoGradGuard ng;
  at::Tensor kept = torch::tensor(stats, torch::kDouble).to(multiplier_.device());  // (L)
  if (opt_.unit == KeepUnit::Cache) kept = kept.mean().expand_as(kept);             // (L), the cache's fraction
  at::Tensor next = multiplier_ + opt_.dual_lr * (kept - beta);  // (L)
  multiplier_.copy_(opt_.penalty == KeepPenalty::Dual ? next.clamp_min(0.0) : next);
}

double AttentionGateImpl::target_at(int64_t step) const {
  if (opt_.schedule_steps <= 0) return opt_.target;
  const double left = std::max(0.0, 1.0 - static_cast<double>(step) / static_cast<double>(opt_.schedule_steps));
  return opt_.target + (1.0 - opt_.target) * left;
}

AttentionMods AttentionGateImpl::attention_mods(const TrainBatch& batch) {
  recorded_.assign(num_layers(), at::Tensor());
  recorded_z_.assign(num_layers(), at::Tensor());
  const int64_t B = batch.ids.size(0), T = batch.ids.size(1);
  const c10::Device dev = batch.ids.device();
  recorded_valid_ = batch.doc_ids.defined() ? batch.doc_ids.to(dev).ge(0) : torch::ones({B, T}, torch::TensorOptions().dtype(torch::kBool).device(dev));
  const at::Tensor allowed = causal_document_mask(batch.doc_ids, B, T, dev);  // (B, 1, T, T), shared by the layers
  AttentionMods mods;
  mods.layer_hook = [this, allowed, T](const LayerInput& in) {
    KVD_CHECK(in.hidden.size(1) == T, "AttentionGate: extra rows are not supported (the gate flags sequence tokens)");
    const at::Tensor z = logits(in.layer, in.hidden, allowed);                         // (B, T, H_kv)
    at::Tensor s = torch::sigmoid(z);                                                  // (B, T, H_kv)
    at::Tensor f = straight_through_flags(s, in.positions, opt_.tau, opt_.sinks);      // (B, T, H_kv)
    recorded_[in.layer] = f;
    recorded_z_[in.layer] = z.detach();
    LayerMods m;
    m.key_log_mask = torch::log(f + opt_.eps).transpose(1, 2);  // (B, H_kv, T)
    return m;
  };
  return mods;
}

std::vector<at::Tensor> AttentionGateImpl::keep_fractions() const {
  std::vector<at::Tensor> out;
  for (const at::Tensor& f : recorded_) {
    KVD_CHECK(f.defined(), "AttentionGate::keep_fractions: run a forward with attention_mods first");
    at::Tensor w = recorded_valid_.to(f.device()).to(f.scalar_type()).unsqueeze(-1);  // (B, T, 1)
    out.push_back((f * w).sum() / (w.sum() * static_cast<double>(f.size(-1))).clamp_min(1.0));  // ()
  }
  return out;
}

at::Tensor AttentionGateImpl::row_keep_fractions(at::Tensor* row_valid) const {
  std::vector<at::Tensor> rows;
  at::Tensor n;  // (B) valid tokens per row
  for (const at::Tensor& f : recorded_) {
    KVD_CHECK(f.defined(), "AttentionGate::row_keep_fractions: run a forward with attention_mods first");
    at::Tensor w = recorded_valid_.to(f.device()).to(f.scalar_type()).unsqueeze(-1);  // (B, T, 1)
    if (!n.defined()) n = w.sum({1, 2});                                              // (B)
    rows.push_back((f * w).sum({1, 2}) / (n * static_cast<double>(f.size(-1))).clamp_min(1.0));  // (B)
  }
  if (row_valid) *row_valid = n.gt(0);
  return torch::stack(rows);  // (L, B)
}

ComponentLoss AttentionGateImpl::loss(const Model& model, const TrainBatch& batch, const LossOptions& options) {
  const AttentionMods mods = attention_mods(batch);
  DistillTerms d = distill_to_frozen(model, batch, mods, options);
  ProfileLap lap(model.device(), "train ");
  const std::vector<at::Tensor> keep = keep_fractions();  // [layer] ()
  const double beta = target_at(options.step);
  const at::Tensor k_layers = torch::stack(keep);  // (L)
  at::Tensor rv;
  const at::Tensor kr_layers = row_keep_fractions(&rv);      // (L, B)
  // What the penalty holds at β: each layer (L units), or the cache's mean over layers (one unit).
  const bool whole = opt_.unit == KeepUnit::Cache;
  const at::Tensor k = whole ? k_layers.mean(0, /*keepdim=*/true) : k_layers;      // (U)
  const at::Tensor kr = whole ? kr_layers.mean(0, /*keepdim=*/true) : kr_layers;   // (U, B)
  const at::Tensor mu = whole ? multiplier_.narrow(0, 0, 1) : multiplier_;          // (U)
  const at::Tensor rw = rv.to(kr.scalar_type());             // (B) 1 for rows with a valid token
  const at::Tensor nrows = rw.sum().clamp_min(1.0);          // ()
  // The hinge's and the two-sided penalty's argument, per layer: over the batch, or each row's then averaged.
  auto over_scope = [&](const std::function<at::Tensor(const at::Tensor&)>& g) {
    return opt_.scope == KeepScope::Sequence ? (g(kr) * rw).sum(1) / nrows : g(k);  // (U)
  };
  auto hinge = [beta](const at::Tensor& x) { return torch::relu(x - beta); };
  at::Tensor penalty;  // (U)
  switch (opt_.penalty) {
    case KeepPenalty::Hinge: penalty = over_scope(hinge); break;
    case KeepPenalty::TwoSided: penalty = over_scope([beta](const at::Tensor& x) { return (x - beta).abs(); }); break;
    case KeepPenalty::Dual:
    case KeepPenalty::DualEquality:
      penalty = over_scope(hinge) + mu.to(k.device(), k.scalar_type()) * (k - beta);
      break;
  }
  // The spread of the kept fraction between rows (each row's mean over layers): what the Sequence scope narrows.
  const at::Tensor row_mean = kr_layers.detach().mean(0);                            // (B)
  const at::Tensor row_avg = (row_mean * rw).sum() / nrows;                          // ()
  const double row_std = ((row_mean - row_avg).pow(2) * rw).sum().div(nrows).sqrt().item<double>();
  lap("keep penalty");
  ComponentLoss out;
  const at::Tensor kc = k_layers.detach().to(torch::kCPU, torch::kDouble).contiguous();  // one device sync
  out.stats.assign(kc.data_ptr<double>(), kc.data_ptr<double>() + kc.numel());
  out.terms = {{"kl", d.kl}, {"ce", d.ce}, {"keep", penalty.mean().to(torch::kFloat32)}};
  out.metrics = {{"kept", kc.mean().item<double>()}, {"keep_target", beta}, {"kept_row_std", row_std}};
  if (opt_.penalty == KeepPenalty::Dual || opt_.penalty == KeepPenalty::DualEquality)
    out.metrics.emplace_back("keep_multiplier", multiplier_.mean().item<double>());
  out.tokens = d.tokens;
  return out;
}

nlohmann::json AttentionGateImpl::calibrate(const Model& model, const std::vector<TrainBatch>& batches,
                                            const LossOptions& options) {
  (void)options;
  if (batches.empty()) return nullptr;
  torch::NoGradGuard no_grad;
  const int64_t L = num_layers();
  const bool whole = opt_.unit == KeepUnit::Cache;
  const int64_t U = whole ? 1 : L;                       // units held at β: the cache, or each layer
  const double beta = opt_.target;
  const double z_tau = std::log(opt_.tau / (1.0 - opt_.tau));  // s ≥ τ  ⇔  z ≥ logit(τ)
  constexpr int kMaxUpdates = 12;
  constexpr double kTolerance = 0.002;  // |kept − β| of every unit on the calibration sequences
  std::vector<double> shift(U, 0.0);    // total offset added to each unit's output biases
  std::vector<double> before;
  // The pass that came closest: shifting every unit at once moves the inputs of the layers after it, so a later
  // pass can land farther from β than an earlier one; the biases of the closest pass are the ones kept.
  double best_error = std::numeric_limits<double>::infinity();
  std::vector<double> best_shift, best_kept;
  std::vector<at::Tensor> best_bias(L);  // [l] (H_kv): the closest pass's output biases, restored exactly
  int best_pass = 0;
  nlohmann::json passes = nlohmann::json::array();
  auto mean = [](const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0) / x.size(); };
  for (int pass = 0;; ++pass) {
    // One forward of the gated model over every batch: the logits z of the entries a flag decides (valid rows
    // at positions ≥ sinks) per unit, and how many valid entries and sink entries each unit holds.
    std::vector<std::vector<at::Tensor>> free(U);
    std::vector<double> n_valid(U, 0.0), n_sink(U, 0.0);
    for (const TrainBatch& b : batches) {
      const AttentionMods mods = attention_mods(b);
      model.forward_train(b.ids, b.positions, mods, b.doc_ids);
      const at::Tensor valid = recorded_valid_;                                           // (B, T)
      const at::Tensor sink = valid & b.positions.to(valid.device()).lt(opt_.sinks);      // (B, T)
      const at::Tensor decided = valid & sink.logical_not();                              // (B, T)
      const double nv = valid.sum().item<double>(), ns = sink.sum().item<double>();
      for (int64_t l = 0; l < L; ++l) {
        const at::Tensor& z = recorded_z_[l];  // (B, T, H_kv)
        const int64_t u = whole ? 0 : l, H = z.size(-1);
        free[u].push_back(z.masked_select(decided.unsqueeze(-1).expand_as(z)).to(torch::kDouble));  // (n)
        n_valid[u] += nv * static_cast<double>(H);
        n_sink[u] += ns * static_cast<double>(H);
      }
    }
    // Each unit's kept fraction now, and the offset c that makes exactly k = round(β·n_valid − n_sink) of its
    // decided entries pass: z + c ≥ logit(τ), c halfway between the k-th and (k+1)-th largest z.
    std::vector<double> kept(U), step(U, 0.0);
    double worst = 0;
    for (int64_t u = 0; u < U; ++u) {
      const at::Tensor v = std::get<0>(torch::cat(free[u]).sort(0, /*descending=*/true)).cpu();  // (n)
      const int64_t n = v.numel();
      const double passing = v.ge(z_tau).sum().item<double>();
      kept[u] = n_valid[u] > 0 ? (passing + n_sink[u]) / n_valid[u] : 1.0;
      worst = std::max(worst, std::abs(kept[u] - beta));
      const int64_t k = std::clamp<int64_t>(std::llround(beta * n_valid[u] - n_sink[u]), 0, n);
      const double* z = v.data_ptr<double>();
      if (n == 0) continue;
      const double at = k == 0 ? z[0] + 1.0 : k == n ? z[n - 1] - 1.0 : 0.5 * (z[k - 1] + z[k]);
      step[u] = z_tau - at;
    }
    if (pass == 0) before = kept;
    passes.push_back({{"kept_mean", mean(kept)}, {"kept_max_error", worst}});
    if (worst < best_error) {
      best_error = worst;
      best_shift = shift;
      best_kept = kept;
      best_pass = pass;
      for (int64_t l = 0; l < L; ++l) best_bias[l] = layer(l)->wo->bias.detach().clone();
    }
    if (worst <= kTolerance || pass == kMaxUpdates) {
      for (int64_t l = 0; l < L; ++l) layer(l)->wo->bias.copy_(best_bias[l]);
      return {{"target", beta},
              {"unit", whole ? "cache" : "layer"},
              {"kept_before", mean(before)},
              {"kept_after", mean(best_kept)},
              {"kept_after_per_unit", best_kept},
              {"bias_shift", best_shift},
              {"kept_pass", best_pass},
              {"passes", passes}};
    }
    // The layers after a shifted one see other inputs: shift, then measure again.
    for (int64_t l = 0; l < L; ++l) {
      const int64_t u = whole ? 0 : l;
      layer(l)->wo->bias.add_(step[u]);
    }
    for (int64_t u = 0; u < U; ++u) shift[u] += step[u];
  }
}

namespace {

constexpr const char* kKeep = "attention_gate_keep";
constexpr const char* kStateK = "attention_gate_k";  // row state: the block's keys (B, g, capacity + 1, d_g)
constexpr const char* kStateV = "attention_gate_v";  // and values; slot p holds position p, the last padding's writes

// The gate at inference. Its block attends over every earlier token of the sequence, evicted or not, so it keeps
// the block's own keys and values of every position in the cache's per-row state (KVCache::row_state), slot p for
// position p: a rewound continuation's slots are written again before any query reads them, and the state follows
// its cache wherever the cache goes (budgets joined into one batch, fixed-shape decoding). entry_payload writes
// the appended rows' slots and attends over slots 0 .. position, the whole capacity under a mask: fixed shapes, no
// read-back, so it also runs inside CUDA graphs (FixedShape::Yes).
class AttentionGateScorer : public Scorer {
 public:
  AttentionGateScorer(std::shared_ptr<AttentionGateImpl> owner, AttentionGateImpl* gate)
      : owner_(std::move(owner)), gate_(gate) {}
  std::string name() const override { return "attention_gate"; }
  ScorerNeeds needs() const override { return rows_together(FixedShape::Yes); }

  std::vector<PayloadColumn> payload_columns() const override { return {{kKeep, torch::kFloat, 1.0}}; }

  void reserve_row_state(int64_t layer, RowState& state, int64_t batch, int64_t positions) override {
    torch::NoGradGuard no_grad;
    AttentionGateLayerImpl& L = *gate_->layer(layer);
    auto it = state.find(kStateK);
    const int64_t cap = it == state.end() ? 0 : it->second.size(2) - 1;
    if (it != state.end())
      KVD_CHECK(it->second.size(0) == batch, "attention_gate scorer: the cache's gate state holds ",
                it->second.size(0), " rows, the append ", batch);
    if (positions <= cap) return;
    // Room for an eighth more than asked (at least 256 slots), as KVCache grows its segments: appends one chunk or
    // step at a time reallocate rarely, and a fixed-shape decode's one reservation stays close to what it needs.
    const int64_t grown = std::max<int64_t>(positions + std::max<int64_t>(256, positions / 8), cap + cap / 8);
    const c10::ScalarType dt = c10::promoteTypes(L.wq->weight.scalar_type(), torch::kFloat);
    const auto opt = torch::TensorOptions().dtype(dt).device(L.wq->weight.device());
    for (const char* name : {kStateK, kStateV}) {
      at::Tensor t = torch::zeros({batch, L.heads, grown + 1, L.head_dim}, opt);  // (B, g, grown + 1, d_g)
      if (cap > 0) t.narrow(2, 0, cap).copy_(state.at(name).narrow(2, 0, cap));
      state[name] = t;
    }
  }

  std::vector<at::Tensor> entry_payload(int64_t layer, const at::Tensor& hidden, const EntryContext& ctx) override {
    torch::NoGradGuard no_grad;
    KVD_CHECK(ctx.row_state && ctx.row_state->count(kStateK) && ctx.positions.defined(),
              "attention_gate scorer: entry_payload needs the rows' positions and the row state reserved for them "
              "(Scorer::reserve_row_state); drive prefill / decode through on_append or a decode evictor");
    AttentionGateLayerImpl& L = *gate_->layer(layer);
    const int64_t B = hidden.size(0), t = hidden.size(1);
    std::vector<at::Tensor> p = L.qkv(hidden);                          // 3 × (B, g, t, d_g)
    at::Tensor& k = ctx.row_state->at(kStateK);                         // (B, g, C + 1, d_g)
    at::Tensor& v = ctx.row_state->at(kStateV);
    const int64_t C = k.size(2) - 1;                                    // slots of positions; slot C: padding's
    const at::Tensor qpos = ctx.positions.to(p[0].device());           // (B, t), -1 on padding
    const at::Tensor slot = torch::where(qpos.ge(0), qpos, torch::full_like(qpos, C));  // (B, t)
    const at::Tensor idx = slot.view({B, 1, t, 1}).expand({B, L.heads, t, L.head_dim});
    k.scatter_(2, idx, p[1].to(k.scalar_type()));
    v.scatter_(2, idx, p[2].to(v.scalar_type()));
    const at::Tensor slots = torch::arange(C, qpos.options());                          // (C)
    at::Tensor allowed = slots.view({1, 1, 1, C}).le(qpos.view({B, 1, t, 1}));          // (B, 1, t, C)
    allowed = allowed | slots.view({1, 1, 1, C}).eq(0);  // padding rows (position -1) see slot 0: no empty row
    const at::Tensor o = at::scaled_dot_product_attention(p[0].to(k.scalar_type()), k.narrow(2, 0, C),
                                                          v.narrow(2, 0, C), allowed);  // (B, g, t, d_g)
    return {torch::sigmoid(L.out(o)).transpose(1, 2)};  // (B, H_kv, t)
  }

  at::Tensor score(const LayerView& view) override {
    auto it = view.payload.find(kKeep);
    KVD_CHECK(it != view.payload.end(), "attention_gate scorer: the cache holds no keep probabilities (payload '", kKeep,
              "'); drive prefill / decode through the scorer's on_append");
    KVD_CHECK(view.positions.defined(), "attention_gate scorer: LayerView.positions is required");
    at::Tensor s = it->second.to(torch::kFloat);  // (B, H_kv, n)
    const at::Tensor pos = view.positions.to(s.device());
    if (gate_->options().sinks > 0) s = torch::where(pos.lt(gate_->options().sinks), torch::full_like(s, 2.0), s);
    if (view.valid.defined()) s = s.masked_fill(view.valid.to(s.device()).logical_not(), -std::numeric_limits<float>::infinity());
    return s;
  }

 private:
  std::shared_ptr<AttentionGateImpl> owner_;
  AttentionGateImpl* gate_;
};

}  // namespace

std::unique_ptr<Scorer> AttentionGateImpl::make_scorer() {
  return std::make_unique<AttentionGateScorer>(shared_owner(this), this);
}

nlohmann::json AttentionGateImpl::manifest() const {
  return nlohmann::json{
      {"kind", kind()},
      {"num_layers", num_layers()},
      {"hidden_size", d_model_},
      {"num_kv_heads", num_kv_heads_},
      {"gate_heads", opt_.heads},
      {"gate_head_dim", opt_.head_dim},
      {"input", "attention input after the layer's input RMSNorm"},
      {"output", "keep probability s = sigmoid(wo . attention(wq x, wk x, wv x) + bias) per KV head; causal, no "
                 "positional encoding"},
      {"score", "keep_probability"},
      {"score_formula", "s_i; positions < sinks score 2"},
      {"score_timing", "on_append"},
      {"flag_threshold", opt_.tau},
      {"higher_keeps", true},
      {"options",
       {{"heads", opt_.heads},
        {"head_dim", opt_.head_dim},
        {"target", opt_.target},
        {"tau", opt_.tau},
        {"sinks", opt_.sinks},
        {"schedule_steps", opt_.schedule_steps},
        {"bias_init", opt_.bias_init},
        {"keep_penalty", penalty_name(opt_.penalty)},
        {"keep_scope", opt_.scope == KeepScope::Sequence ? "sequence" : "batch"},
        {"keep_unit", opt_.unit == KeepUnit::Cache ? "cache" : "layer"},
        {"dual_lr", opt_.dual_lr}}},
  };
}

ComponentSpec attention_gate_spec() {
  ComponentSpec s;
  s.kind = "attention_gate";
  s.doc = "Attention-Gate: per layer a small causal attention block -> keep flags per token and KV head (arXiv 2410.12876)";
  s.aliases = {"attngate"};
  s.options = {
      {"component.heads", ValueType::Int, "2", "heads of the gate's attention block"},
      {"component.head_dim", ValueType::Int, "32", "head dim of the gate's attention block"},
      {"component.target", ValueType::Float, "0.5", "target kept fraction per layer, in (0, 1] (the keep hinge)"},
      {"component.tau", ValueType::Float, "0.5", "flag threshold on the keep probability, in (0, 1)"},
      {"component.sinks", ValueType::Int, "4", "first positions of every document, always kept"},
      {"component.schedule_steps", ValueType::Int, "0", "> 0: the target falls linearly from 1 over these steps"},
      {"component.bias_init", ValueType::Float, "4.0", "output bias at init (keep probability ~0.98)"},
      {"component.keep_penalty", ValueType::String, "dual",
       "dual: hinge + a Lagrange multiplier (>= 0) per layer raised while kept > target | dual_equality: the "
       "multiplier may turn negative, holding every layer at the target | hinge: max(0, kept - target) | "
       "two_sided: |kept - target|"},
      {"component.keep_scope", ValueType::String, "batch",
       "batch: the hinge on the batch's kept fraction | sequence: on each sequence's, averaged over sequences"},
      {"component.keep_unit", ValueType::String, "layer",
       "layer: every layer's kept fraction held at the target | cache: the whole cache's (the mean over layers), "
       "split between layers as the distillation prefers"},
      {"component.dual_lr", ValueType::Float, "0.1", "step of the multipliers' dual ascent (keep_penalty: dual)"},
  };
  s.losses = {
      {"loss.kl", ValueType::Float, "1.0", "weight of the forward KL(teacher || student)"},
      {"loss.ce", ValueType::Float, "0.0", "weight of the student's next-token cross-entropy"},
      {"loss.keep", ValueType::Float, "10.0", "weight of the hinge (1/L) sum_l max(0, kept_l - target)"},
  };
  s.check = [](const nlohmann::json& o) {
    constexpr int64_t kMax = int64_t(1) << 12;
    const double target = o.at("target").get<double>(), tau = o.at("tau").get<double>();
    KVD_CHECK(std::isfinite(target) && target > 0.0 && target <= 1.0,
              "config key 'component.target': the target keep ratio must lie in (0, 1], got ", target);
    KVD_CHECK(std::isfinite(tau) && tau > 0.0 && tau < 1.0, "config key 'component.tau': must lie in (0, 1), got ", tau);
    for (const char* k : {"heads", "head_dim"}) {
      const int64_t v = o.at(k).get<int64_t>();
      KVD_CHECK(v > 0 && v <= kMax, "config key 'component.", k, "': must be in [1, ", kMax, "], got ", v);
    }
    KVD_CHECK(o.at("sinks").get<int64_t>() >= 0, "config key 'component.sinks': must be >= 0");
    KVD_CHECK(o.at("schedule_steps").get<int64_t>() >= 0, "config key 'component.schedule_steps': must be >= 0");
    KVD_CHECK(std::isfinite(o.at("bias_init").get<double>()), "config key 'component.bias_init': must be finite");
    const std::string pen = o.at("keep_penalty").get<std::string>();
    KVD_CHECK(parse_penalty(pen).has_value(), "config key 'component.keep_penalty': '", pen,
              "' is not one of dual, dual_equality, hinge, two_sided");
    const std::string scope = o.at("keep_scope").get<std::string>();
    KVD_CHECK(scope == "sequence" || scope == "batch", "config key 'component.keep_scope': '", scope,
              "' is not one of sequence, batch");
    const std::string unit = o.value("keep_unit", std::string("layer"));
    KVD_CHECK(unit == "layer" || unit == "cache", "config key 'component.keep_unit': '", unit,
              "' is not one of layer, cache");
    const double dual_lr = o.at("dual_lr").get<double>();
    KVD_CHECK(std::isfinite(dual_lr) && dual_lr >= 0.0, "config key 'component.dual_lr': must be >= 0, got ", dual_lr);
  };
  s.make = [](const ModelConfig& cfg, const nlohmann::json& o) -> std::shared_ptr<Component> {
    AttentionGateOptions opt;
    opt.heads = o.at("heads").get<int64_t>();
    opt.head_dim = o.at("head_dim").get<int64_t>();
    opt.target = o.at("target").get<double>();
    opt.tau = o.at("tau").get<double>();
    opt.sinks = o.at("sinks").get<int64_t>();
    opt.schedule_steps = o.at("schedule_steps").get<int64_t>();
    opt.bias_init = o.at("bias_init").get<double>();
    const std::string pen = o.at("keep_penalty").get<std::string>();
    opt.penalty = *parse_penalty(pen);
    opt.scope = o.at("keep_scope").get<std::string>() == "sequence" ? KeepScope::Sequence : KeepScope::Batch;
    opt.unit = o.value("keep_unit", std::string("layer")) == "cache" ? KeepUnit::Cache : KeepUnit::Layer;
    opt.dual_lr = o.at("dual_lr").get<double>();
    return AttentionGate(cfg, opt).ptr();
  };
  return s;
}

}  // namespace kvd
