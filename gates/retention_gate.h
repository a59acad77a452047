// TRIM-KV retention gate (docs/methods/trimkv.md, "Gate"): one small MLP per decoder layer that maps the
// attention block's input x_t (after the input RMSNorm) to a retention log β per KV head:
//   z = W2 · act(W1 · x + b1) + b,   log β = log_sigmoid(z)   (B, S, H_kv), computed in fp32 (or float64)
// Training: key_rate = log β gives the decoder's additive bias (t − i) · log β_i (document-aware, GQA).
// Inference: a Scorer ranking cached token i at next position t by log β_i · (t + 1 − pos_i), higher = keep.
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

struct RetentionGateOptions {
  int64_t hidden = 512;      // MLP width
  double bias_init = 18.0;   // b: β ≈ 1 at start (the model starts as plain attention)
  double init_std = 0.02;    // W1, W2 ~ N(0, init_std); b1 = 0
  int64_t budget = 128;      // M: per-(layer, KV head) memory budget of the capacity loss
  int64_t capacity_block = 256;  // tile size of the capacity loss
};

// One layer's gate. Parameter names: w1.weight (hidden, d), w1.bias (hidden), w2.weight (H_kv, hidden),
// bias (H_kv).
struct RetentionGateLayerImpl : torch::nn::Module {
  RetentionGateLayerImpl(int64_t d_model, int64_t hidden, int64_t num_kv_heads);
  // x (..., d) any floating dtype -> log β (..., H_kv) in the parameters' dtype promoted to at least fp32.
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Linear w1{nullptr};  // d -> hidden, with bias
  torch::nn::Linear w2{nullptr};  // hidden -> H_kv, no bias
  at::Tensor bias;                // (H_kv)
};
TORCH_MODULE(RetentionGateLayer);

class RetentionGateImpl : public Component {
 public:
  // Parameters are created on CPU in float32; move them with ->to(device) (or ->to(torch::kDouble) for tests).
  // Initialization draws from the current torch generator (seed it first for reproducibility).
  RetentionGateImpl(const ModelConfig& cfg, RetentionGateOptions options = {});

  std::string kind() const override { return "retention_gate"; }
  const RetentionGateOptions& options() const { return opt_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_->size()); }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  int64_t hidden_size() const { return d_model_; }

  // log β of one layer: hidden (B, S, d) -> (B, S, H_kv).
  at::Tensor log_beta(int64_t layer, const at::Tensor& hidden);
  RetentionGateLayer layer(int64_t i) { return layers_->ptr<RetentionGateLayerImpl>(i); }

  // TRIM-KV's objective: {"kl", "ce"} of the student (the frozen model with the retention bias) against the
  // teacher (gates/distill_objective.h), then {"capacity", L_cap} (budget options().budget).
  ComponentLoss loss(const Model& model, const TrainBatch& batch, const LossOptions& options) override;
  int64_t budget() const override { return opt_.budget; }

  // A layer_hook computing log β for the S rows of each layer, recording the sequence rows' (B, T, H_kv)
  // for regularizers(), and returning key_rate = log β (B, H_kv, S). Records batch.doc_ids too.
  AttentionMods attention_mods(const TrainBatch& batch);
  // {"capacity", L_cap} over every (b, layer, KV head, t) of the last forward, budget options().budget. The
  // soft cache size runs the fused kernel on CUDA with KernelPath::Fused, else the tiled reference.
  std::vector<LossTerm> regularizers(KernelPath kernels = KernelPath::Reference);
  // Scores log β_i · (t + 1 − pos_i) from LayerView.hidden ((B, n, d) shared by the heads, or (B, H_kv, n, d)
  // per head), positions and next_position. Shares this gate's parameters (the gate must be held by a
  // RetentionGate / shared_ptr, or outlive the scorer).
  std::unique_ptr<Scorer> make_scorer() override;
  nlohmann::json manifest() const override;

  // What the last attention_mods forward recorded: [layer] (B, T, H_kv) log β (in the graph), and doc ids.
  const std::vector<at::Tensor>& recorded_log_beta() const { return recorded_; }
  void clear_recorded();

 private:
  RetentionGateOptions opt_;
  int64_t d_model_ = 0, num_kv_heads_ = 0;
  torch::nn::ModuleList layers_{nullptr};
  std::vector<at::Tensor> recorded_;  // [layer] (B, T, H_kv)
  at::Tensor recorded_docs_;          // (B, T) int64 or undefined
};
TORCH_MODULE(RetentionGate);

// The retention score of cached entries: log_beta (B, H_kv, n), positions (B, H_kv, n) int64 and each row's next
// query position t (B, 1, 1) int64 -> (B, H_kv, n) float32 log β · (t + 1 − pos) (higher = keep).
at::Tensor retention_score(const at::Tensor& log_beta, const at::Tensor& positions, const at::Tensor& next_position);

// The registry entry (gates/components.h): options component.budget / hidden / bias_init, loss terms
// kl (1.0), ce (0.0), capacity (1.0).
struct ComponentSpec;
ComponentSpec retention_gate_spec();

}  // namespace kvd
