// Component: a learned part (TRIM-KV retention gate, soft queries, lookahead predictor, attention gate).
// It is a torch::nn::Module whose parameters are the only ones that train; it acts on the frozen model
// through AttentionMods during training and ranks tokens through a Scorer at inference. The trainer
// (train/) knows components only through this interface (DESIGN.md, "The abstractions").
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>

#include "gates/scorer.h"
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

class Component : public torch::nn::Module {
 public:
  // "retention_gate", "soft_queries", ... (the gate bundle's component kind).
  virtual std::string kind() const = 0;
  // Hooks for the student forward over `batch`. The component may record what regularizers() needs
  // (e.g. per-layer log β) while the hooks run.
  virtual AttentionMods attention_mods(const TrainBatch& batch) = 0;
  // Loss terms of the component itself, from what the last student forward recorded (weights applied by
  // the trainer from the run config).
  virtual std::vector<LossTerm> regularizers() = 0;
  // Scorer for inference / evaluation, sharing this component's parameters.
  virtual std::unique_ptr<Scorer> make_scorer() = 0;
  // Dims, hyper-parameters and score semantics for the gate bundle manifest (kvdistill.json).
  virtual nlohmann::json manifest() const = 0;
};

}  // namespace kvd
