// Component: a learned part (TRIM-KV retention gate, soft queries, lookahead predictor, attention gate, ...).
// It is a torch::nn::Module whose parameters are the only ones that train. It owns its objective: loss()
// runs whatever forwards of the frozen model it needs (with its AttentionMods) and returns named loss terms,
// which the trainer weights by name (`loss.<name>` in the run config) without knowing the component. At
// inference it ranks tokens through a Scorer. The trainer (train/) and the harness (eval/) know components
// only through this interface and the registry of gates/components.h (DESIGN.md, "The abstractions").
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>

#include "gates/scorer.h"
#include "models/activation_checkpointing.h"
#include "models/attention_mods.h"

namespace kvd {

class Model;

// One packed training batch.
struct TrainBatch {
  at::Tensor ids;        // (B, T) int64
  at::Tensor positions;  // (B, T) int64, reset per document
  at::Tensor doc_ids;    // (B, T) int64 document (segment) id; -1 on padding
  at::Tensor labels;     // (B, T) int64 next-token targets aligned with ids (label[t] = ids[t+1]), -100 = ignore
};

// A named scalar loss term, e.g. {"capacity", L_cap}.
using LossTerm = std::pair<std::string, at::Tensor>;

// How the trainer asks for a loss: settings that belong to the run, not to the component.
struct LossOptions {
  int64_t block = 256;  // rows per block when a loss forms full-vocabulary logits (loss.block)
  ActivationCheckpointing checkpointing = ActivationCheckpointing::None;  // for the component's student forwards
  KernelPath kernels = KernelPath::Fused;  // fused CUDA kernels where they apply (train.kernels)
  int64_t step = 0;  // the optimizer step being computed (0-based), for objectives with a schedule
  std::string model_dir;  // the frozen model's directory, for objectives that need its tokenizer (KVzap's targets)
};

struct ComponentLoss {
  std::vector<LossTerm> terms;  // unweighted, each a () tensor in the graph; the trainer sums w_name · term
  int64_t tokens = 0;           // tokens the loss was computed over (for the tokens/s log)
  // Logged next to the terms (averaged like them over micro-batches and ranks), never weighted: e.g. the
  // Attention-Gate's kept fraction.
  std::vector<std::pair<std::string, double>> metrics;
  // What the component's end_step() needs from this micro-batch (e.g. each layer's kept fraction); the trainer
  // averages them over micro-batches and ranks like the terms, and does not log them.
  std::vector<double> stats;
};

class Component : public torch::nn::Module {
 public:
  // "retention_gate", ... (the registry's kind, the bundle manifest's "kind").
  virtual std::string kind() const = 0;
  // The component's objective on one micro-batch: forwards of the frozen `model` (teacher and student, as
  // the method needs) and the named terms. Gradients flow into this component's parameters only.
  virtual ComponentLoss loss(const Model& model, const TrainBatch& batch, const LossOptions& options) = 0;
  // Scorer for inference / evaluation, sharing this component's parameters (hold the component in a
  // shared_ptr, or keep it alive longer than the scorer).
  virtual std::unique_ptr<Scorer> make_scorer() = 0;
  // The budget the component is trained for (tokens per KV head), used by the trainer's held-out check;
  // 0: none (the check then uses train.eval_budget).
  virtual int64_t budget() const { return 0; }
  // Called by the trainer on every rank after each optimizer step it applied, with the step's
  // ComponentLoss::stats averaged over micro-batches and ranks (so every rank sees the same values): a
  // component that adapts a quantity of its objective between steps (a Lagrange multiplier) updates it here.
  // Such state lives in buffers (register_buffer), which checkpoints save and restore with the parameters.
  virtual void end_step(int64_t step, const std::vector<double>& stats) {
    (void)step;
    (void)stats;
  }
  // Called by the trainer once after the last optimizer step, on the rank that writes the bundle, before the
  // last held-out check and checkpoint: a component whose inference rule holds a quantity fitted to data rather
  // than learned by gradient (the Attention-Gate's flag threshold, held at its keep target) fits it on `batches`
  // (training sequences, train.calibration_sequences of them) by changing its parameters, and returns what it
  // measured for the metrics log. Null: nothing to fit (the default).
  virtual nlohmann::json calibrate(const Model& model, const std::vector<TrainBatch>& batches,
                                   const LossOptions& options) {
    (void)model;
    (void)batches;
    (void)options;
    return nullptr;
  }
  // Dims, hyper-parameters and score semantics for the bundle manifest (kvdistill.json). Must hold
  // "options": the component's options (the `component.*` keys without the prefix), from which the
  // registry rebuilds it when a bundle is loaded.
  virtual nlohmann::json manifest() const = 0;
  // Another library's on-disk layout of this component's weights, which bundles also hold (save_gate_bundle):
  // {"dir": <subdirectory>, "config": <its config.json>, "tensor_file": <file name>}; the tensors are the
  // parameters under their own names (named_parameters()), in the bundle's dtype. Null: none (the default).
  virtual nlohmann::json foreign_layout() const { return nullptr; }
};

}  // namespace kvd
