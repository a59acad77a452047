// KVzap (arXiv 2601.07891; docs/methods/kvzip_kvzap.md#kvzap): a learned surrogate of KVzip+. Per layer, a linear
// map or a one-hidden-layer GELU MLP from a token's attention input (after the input RMSNorm) to one log-score
// per KV head, trained by regression (MSE) to log KVzip+ scores computed on the fly from the frozen model
// (gates/kvzip.h, KVzipNorm::Plus). At inference the score is written when the token enters the cache
// (on_append), so it works through chunked prefill and decoding; the last `window` positions are never evicted.
// Used with a threshold (keep log-score >= τ, kvpress's DMSPress) or a top-k under any selector.
//
// The parameters are named as kvpress's KVzapModel names them ("layers.<l>.weight" / "layers.<l>.bias" for the
// linear variant, "layers.<l>.0.*" and "layers.<l>.2.*" for the MLP), and a bundle also holds them in that layout
// under kvpress/ (config.json + model.safetensors), which `KVzapModel.from_pretrained` loads as it is.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "gates/component.h"
#include "gates/kvzip.h"
#include "models/config.h"

namespace kvd {

enum class KVzapVariant { Linear, Mlp };

struct KVzapOptions {
  KVzapVariant variant = KVzapVariant::Mlp;
  int64_t hidden = 512;        // MLP width
  int64_t window = 128;        // recent positions never evicted at inference
  int64_t budget = 128;        // KV entries per head of the trainer's held-out check
  int64_t chunk_size = 2048;   // KVzip+ targets: context tokens reconstructed per pass
  int64_t skip_sinks = 4;      // KVzip+ targets: the first positions (scored max + 1 by KVzip) are left out
};

class KVzapImpl : public Component {
 public:
  KVzapImpl(const ModelConfig& cfg, KVzapOptions options = {});

  std::string kind() const override { return "kvzap"; }
  const KVzapOptions& options() const { return opt_; }
  // Predicted log KVzip+ scores of layer l from its attention inputs x (B, T, d), any float dtype: (B, T, H_kv)
  // in the parameters' dtype (float32 as trained), in their graph.
  at::Tensor predict(int64_t layer, const at::Tensor& x) const;

  // The objective on one micro-batch: {"mse"}, the mean squared error between predict() and log KVzip+ over every
  // (layer, KV head, token) of the batch's documents (positions < skip_sinks and zero scores left out).
  ComponentLoss loss(const Model& model, const TrainBatch& batch, const LossOptions& options) override;
  int64_t budget() const override { return opt_.budget; }
  std::unique_ptr<Scorer> make_scorer() override;
  nlohmann::json manifest() const override;
  nlohmann::json foreign_layout() const override;

 private:
  KVzapOptions opt_;
  int64_t d_model_ = 0, num_layers_ = 0, num_kv_heads_ = 0;
  torch::nn::ModuleList layers_{nullptr};
  std::string prompts_dir_;  // the model directory the cached prompts were read from
  KVzipPrompts prompts_;
};
TORCH_MODULE(KVzap);

// Row b's documents of a packed batch: (start, end) of each run of equal doc_ids >= 0.
std::vector<std::vector<std::pair<int64_t, int64_t>>> document_spans(const at::Tensor& doc_ids);

// The KVzip+ regression data of one document: its attention inputs per layer [layer] (1, T, d) and its log
// KVzip+ targets [layer] (1, T, H_kv) float32, with -inf where the target is left out. No grad.
struct KVzapTargets {
  std::vector<at::Tensor> inputs, log_scores;
};
KVzapTargets kvzap_targets(const Model& model, const std::vector<int64_t>& ids, const KVzipPrompts& prompts,
                           const KVzapOptions& options);

struct ComponentSpec;
ComponentSpec kvzap_spec();

}  // namespace kvd
