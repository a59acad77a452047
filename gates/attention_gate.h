// Attention-Gate (docs/methods/attention_gate.md; arXiv 2410.12876): per decoder layer, a small causal
// attention block reads the layer's attention input x (after the input RMSNorm) and emits a keep probability
// per token and KV head:
//   o = softmax(q kᵀ / √d_g + causal/document mask) v      q, k, v = x W_q, x W_k, x W_v  (g heads of d_g)
//   z = W_o · o + b,   s = sigmoid(z)                       (B, S, H_kv), computed in fp32 (or float64)
// Flags f = 1[s ≥ τ]; in training f = f_hard + s − s.detach() (straight-through). Key j of head h with f = 0
// is masked for every later query through LayerMods::key_log_mask = log(f + ε) (its own row always sees it,
// and the first `sinks` positions of every document are always kept). Objective: distillation KL (+ CE)
// against the frozen model, plus a hinge (1/L) Σ_ℓ max(0, keep_ℓ − β) on the kept fraction of each layer
// (keep_ℓ is the mean of the straight-through flags: its value is the exact kept fraction, its gradient
// reaches s), by default with a Lagrange multiplier per layer (KeepPenalty::Dual). β may fall linearly from 1
// to the target over the first schedule_steps steps.
//
// Inference: the flags are computed when tokens are appended (Scorer::on_append; the block attends over every
// earlier token of the sequence, whose gate keys and values the scorer keeps indexed by position) and stored
// in the cache's payload column "attention_gate_keep". Score = s (sinks: 2), higher = keep: a threshold
// budget at τ (--threshold 0.5) evicts exactly the flagged-out entries, each head keeping its own count (a
// ragged cache); a ratio or token budget keeps the top-k under any selector.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "gates/component.h"
#include "models/config.h"

namespace kvd {

// How the kept fraction keep_ℓ of a layer is held at the target β.
enum class KeepPenalty {
  Hinge,         // max(0, keep_ℓ − β): only a kept fraction above β is penalized
  TwoSided,      // |keep_ℓ − β|: pulled to β from both sides (the KL then only decides which entries stay)
  Dual,          // hinge + μ_ℓ · (keep_ℓ − β), μ_ℓ ≥ 0 a Lagrange multiplier per layer raised by dual ascent after
                 // every step, μ_ℓ ← max(0, μ_ℓ + dual_lr · (keep_ℓ − β)) on the step's kept fraction (all
                 // ranks): it grows until keep_ℓ ≤ β holds on average, however strongly the KL pulls
  DualEquality   // Dual without the clamp at 0: μ_ℓ may turn negative, so a layer the KL lets prune below β is
                 // pulled back up: an equality constraint keep_ℓ = β instead of keep_ℓ ≤ β
};

// Over what the hinge (and the two-sided penalty) measures the kept fraction. The dual term always uses the
// layer's mean over the batch.
enum class KeepScope {
  Batch,     // keep_ℓ over all the batch's tokens: rows that keep little can offset rows that keep much
  Sequence   // keep_ℓ,b per sequence (row), the penalty averaged over rows: every row above β is pushed down
};

// Whose kept fraction is held at β: each layer's, or the cache's as a whole (the mean over layers, what a memory
// budget counts; the layers then split it as the distillation loss prefers, like a per-layer budget allocation).
enum class KeepUnit {
  Layer,  // keep_ℓ per layer, one multiplier per layer
  Cache   // keep = (1/L) Σ_ℓ keep_ℓ, one multiplier (every μ_ℓ holds the same value)
};

struct AttentionGateOptions {
  int64_t heads = 2;            // g: heads of the gate's attention block
  int64_t head_dim = 32;        // d_g
  double target = 0.5;          // β: target kept fraction per layer, in (0, 1]
  double tau = 0.5;             // flag threshold on s
  int64_t sinks = 4;            // first positions of every document, always kept
  int64_t schedule_steps = 0;   // > 0: β falls linearly from 1 to `target` over these optimizer steps
  double bias_init = 4.0;       // b at init: s ≈ 0.98, every token kept (the model starts as plain attention)
  double init_std = 0.02;       // W_q, W_k, W_v, W_o ~ N(0, init_std)
  double eps = 1e-6;            // ε of the training log-mask log(f + ε)
  KeepPenalty penalty = KeepPenalty::Dual;
  KeepScope scope = KeepScope::Batch;
  KeepUnit unit = KeepUnit::Layer;
  double dual_lr = 0.1;         // η of the multipliers' dual ascent
};

// One layer's block. Parameter names: wq.weight, wk.weight, wv.weight (g·d_g, d), wo.weight (H_kv, g·d_g),
// wo.bias (H_kv).
struct AttentionGateLayerImpl : torch::nn::Module {
  AttentionGateLayerImpl(int64_t d_model, int64_t heads, int64_t head_dim, int64_t num_kv_heads);
  // x (B, S, d) any floating dtype; allowed (B, 1, S, S) bool (query row, key row) visibility -> z (B, S, H_kv)
  // in the parameters' dtype promoted to at least fp32.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& allowed);
  // The projections of x (B, S, d) to the block's q, k, v, each (B, g, S, d_g).
  std::vector<at::Tensor> qkv(const at::Tensor& x);
  // z from the block's output o (B, g, S, d_g) -> (B, S, H_kv).
  at::Tensor out(const at::Tensor& o);
  torch::nn::Linear wq{nullptr}, wk{nullptr}, wv{nullptr}, wo{nullptr};
  int64_t heads = 0, head_dim = 0;
};
TORCH_MODULE(AttentionGateLayer);

// The straight-through flags of training: s (B, S, H_kv) in (0, 1) and positions (B, S) ->
// f = f_hard + s − s.detach() with f_hard = 1[s ≥ tau], and f = 1 (no gradient) at positions < sinks.
at::Tensor straight_through_flags(const at::Tensor& s, const at::Tensor& positions, double tau, int64_t sinks);

// Causal, document-aware visibility (B, 1, S, S) bool: key j visible to query i iff j ≤ i and both rows are
// in the same document (doc_ids (B, S), -1 = padding: a padding row sees only itself). doc_ids undefined: one
// document per batch row of length S (device: that of positions_like).
at::Tensor causal_document_mask(const at::Tensor& doc_ids, int64_t batch, int64_t seq, c10::Device device);

class AttentionGateImpl : public Component {
 public:
  AttentionGateImpl(const ModelConfig& cfg, AttentionGateOptions options = {});

  std::string kind() const override { return "attention_gate"; }
  const AttentionGateOptions& options() const { return opt_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_->size()); }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  AttentionGateLayer layer(int64_t i) { return layers_->ptr<AttentionGateLayerImpl>(i); }

  // z of one layer over whole sequences: hidden (B, S, d), allowed (B, 1, S, S) -> (B, S, H_kv).
  at::Tensor logits(int64_t layer, const at::Tensor& hidden, const at::Tensor& allowed);
  // β at optimizer step `step` (the schedule from 1 to the target).
  double target_at(int64_t step) const;

  // {"kl", "ce"} against the frozen model with the flags' log-mask, then {"keep", hinge}; metric "kept" (the
  // kept fraction of the batch's entries, mean over layers).
  ComponentLoss loss(const Model& model, const TrainBatch& batch, const LossOptions& options) override;
  // The hook computing the flags of every layer and returning key_log_mask = log(f + ε) (B, H_kv, S); records
  // each layer's straight-through flags of the valid rows for keep_fractions().
  AttentionMods attention_mods(const TrainBatch& batch);
  // [layer] () the kept fraction of the last attention_mods forward (value exact, gradient straight-through).
  std::vector<at::Tensor> keep_fractions() const;
  // (L, B) the same per sequence (row); rows without a valid token hold 0 and are left out by `row_valid` (B).
  at::Tensor row_keep_fractions(at::Tensor* row_valid = nullptr) const;

  std::unique_ptr<Scorer> make_scorer() override;
  // Holds the flags at the target on `batches` (training sequences): adds to each layer's output biases
  // (keep_unit layer; one offset for all layers with keep_unit cache) the offset that makes exactly a fraction
  // β of the entries pass s ≥ τ, measured again after each shift (a layer's inputs depend on the flags of the
  // layers before it) until every unit is within 0.002 of β or after 12 shifts. Returns the kept fraction before
  // and after, and the shifts.
  nlohmann::json calibrate(const Model& model, const std::vector<TrainBatch>& batches,
                           const LossOptions& options) override;
  nlohmann::json manifest() const override;
  // KeepPenalty::Dual / DualEquality: stats = each layer's kept fraction averaged over the step -> the multipliers' ascent.
  void end_step(int64_t step, const std::vector<double>& stats) override;
  const at::Tensor& multipliers() const { return multiplier_; }  // (L) μ_ℓ

 private:
  AttentionGateOptions opt_;
  int64_t d_model_ = 0, num_kv_heads_ = 0;
  torch::nn::ModuleList layers_{nullptr};
  std::vector<at::Tensor> recorded_;  // [layer] (B, T, H_kv) straight-through flags
  std::vector<at::Tensor> recorded_z_;  // [layer] (B, T, H_kv) their logits z, detached
  at::Tensor recorded_valid_;         // (B, T) bool rows that count (not padding)
  at::Tensor multiplier_;             // (L) buffer "multiplier": μ_ℓ (Dual, DualEquality); checkpoints keep it
};
TORCH_MODULE(AttentionGate);

// The registry entry (gates/components.h): options component.heads / head_dim / target / tau / sinks /
// schedule_steps / bias_init; loss terms kl (1.0), ce (0.0), keep (10.0); method alias attngate:<bundle>.
struct ComponentSpec;
ComponentSpec attention_gate_spec();

}  // namespace kvd
