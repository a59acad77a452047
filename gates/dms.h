// DMS-style learned eviction (Dynamic Memory Sparsification, arXiv 2506.05345; docs/methods/dms.md): per decoder
// layer a small probe reads the layer's attention input x (after the input RMSNorm) and decides, per token and
// KV head, whether the entry may be evicted:
//   z = W x + b   (B, S, H_kv)        α = sigmoid(z): the eviction probability (α ≥ 0.5: evict)
// Eviction is delayed: an entry stays visible to the next `window` queries whatever α says, and only then goes.
// Training relaxes the decision with a Gumbel-sigmoid, α̃ = sigmoid((z + log u − log(1 − u)) / temperature),
// u ~ U(0, 1), and applies it as an attention bias on the keys a query sees from farther than the window:
//   bias[q, k] = log(1 − α̃_k + ε)   if pos_q − pos_k > window (0 otherwise; the causal / document mask on top)
// (LayerMods::pair_bias). Objective: distillation KL (+ CE) against the frozen model plus the one-sided
// compression penalty max(0, ρ(step) − mean α̃) over the batch's tokens, layers and heads, where the target
// evicted fraction ρ rises linearly from 0 to `target` over `ramp_steps` optimizer steps.
//
// Inference: the keep score 1 − α = sigmoid(−z) is computed when a token enters the cache (Scorer::on_append, in
// prefill and decode) and kept in the cache's payload column "dms_keep"; the entries younger than the window
// (pos ≥ next position − window) score +inf, so no selector ever evicts them. `--threshold 0.5` evicts what the
// probe marks once it has left the window (each head its own count); a ratio or token budget keeps the top-k
// under any selector, in prefill and, in the continuous learned mode, at every decode step.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "gates/component.h"
#include "models/config.h"

namespace kvd {

struct DMSOptions {
  double target = 0.5;       // ρ: the evicted fraction the compression penalty pushes toward, in [0, 1)
  int64_t ramp_steps = 500;  // ρ rises linearly from 0 to `target` over these optimizer steps (0: at once)
  int64_t window = 128;      // the delay: an entry stays visible to the next `window` queries
  double temperature = 0.5;  // of the Gumbel-sigmoid in training
  double bias_init = -5.0;   // b at init: α ≈ 0.007, nothing evicted (the model starts as plain attention)
  double init_std = 0.02;    // W ~ N(0, init_std)
  double eps = 1e-6;         // ε of the training bias log(1 − α̃ + ε)
  int64_t budget = 512;      // KV entries per head of the trainer's held-out check (more than the window)
};

// Whether the training decision is relaxed with Gumbel noise (training) or taken as sigmoid(z) (deterministic).
enum class DMSNoise { Gumbel, None };

class DMSImpl : public Component {
 public:
  DMSImpl(const ModelConfig& cfg, DMSOptions options = {});

  std::string kind() const override { return "dms"; }
  const DMSOptions& options() const { return opt_; }
  // z of layer l from its attention inputs x (B, S, d), any float dtype: (B, S, H_kv) in the parameters' dtype.
  at::Tensor logits(int64_t layer, const at::Tensor& x) const;
  // ρ at optimizer step `step`.
  double target_at(int64_t step) const;
  // The hook computing α̃ for every layer and returning its delayed-eviction pair bias; records α̃ of the valid
  // rows for evicted_fraction().
  AttentionMods attention_mods(const TrainBatch& batch, DMSNoise noise);
  // Mean α̃ of the last attention_mods forward over valid tokens, layers and heads: () in the graph.
  at::Tensor evicted_fraction() const;

  // {"kl", "ce"} against the frozen model with the delayed-eviction bias, then {"compression",
  // max(0, ρ − mean α̃)}; metrics "evicted" (mean α̃), "evicted_hard" (fraction with z ≥ 0) and "evict_target" (ρ).
  ComponentLoss loss(const Model& model, const TrainBatch& batch, const LossOptions& options) override;
  int64_t budget() const override { return opt_.budget; }
  std::unique_ptr<Scorer> make_scorer() override;
  nlohmann::json manifest() const override;

 private:
  DMSOptions opt_;
  int64_t d_model_ = 0, num_kv_heads_ = 0;
  torch::nn::ModuleList layers_{nullptr};
  std::vector<at::Tensor> alpha_, hard_;  // [layer] (B, T, H_kv) α̃ and 1[z ≥ 0] of the last forward
  at::Tensor valid_;                      // (B, T) bool rows that count
};
TORCH_MODULE(DMS);

// The delayed-eviction bias of one layer for the queries of `q`: α (B, H_kv, S) -> (B, H_kv, Sq, S),
// log(1 − α_k + eps) where pos_q − pos_k > window, else 0.
at::Tensor dms_pair_bias(const at::Tensor& alpha, const PairBiasQuery& q, int64_t window, double eps);

struct ComponentSpec;
ComponentSpec dms_spec();

}  // namespace kvd
