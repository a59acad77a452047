// Run configuration of `kvdistill train`: a YAML file plus dotted `key=value` overrides, resolved against
// one table of defaults (kConfigKeys in config.cpp), which doubles as the documentation of every key:
// `kvdistill train --list-keys` prints it.
//
//   train.steps: 200          # optimizer steps
//   component: {kind: retention_gate, budget: 128}
//
// Resolution: defaults <- YAML file <- overrides, in that order. An unknown key, a value of the wrong type
// or an impossible value is a kvd::Error naming the key (and the file or the override it came from).
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/options.h"
#include "models/activation_checkpointing.h"
#include "models/kernel_path.h"

namespace kvd {

// What the trainer does when a loss term or the gradient of a step is NaN or Inf (train.on_nonfinite).
enum class NonFinite {
  Stop,  // throw naming the step and the term; nothing of that step is applied or saved
  Skip,  // drop the step's update (parameters and optimizer state unchanged), count it, continue
};

// How float32 matrix products run on CUDA during training (train.float32_matmul). The frozen model runs in
// bf16 either way; what this changes is the component's own float32 layers (e.g. the retention gate's MLP).
enum class Float32Matmul {
  Ieee,  // full float32 (CUDA cores)
  Tf32,  // tensor cores with TF32 inputs (10-bit mantissa) and float32 accumulation
};

// The keys every run has (model, data, component.kind, loss.block, train, dist). A component's own
// `component.*` options and `loss.*` weights come from its registry entry (gates/components.h).
const std::vector<ConfigKey>& config_keys();
// Every key of a run whose component.kind is `kind`, in the order they are printed: the general keys with
// the component's options after component.kind and its loss weights before loss.block. Throws for an
// unknown kind.
std::vector<ConfigKey> config_keys_for(const std::string& kind);

// Where the run's settings live once resolved. Field names follow the dotted keys.
struct RunConfig {
  // model
  std::string model_dir;          // model.dir
  std::string model_dtype;        // model.dtype: auto | float32 | bfloat16
  // data
  std::string data_train;         // data.train
  std::string data_val;           // data.val ("" = the val split of data.train)
  int64_t data_prefetch = 2;      // data.prefetch
  int64_t data_seq_len = 2048;    // data.seq_len (responses files only: packed sequence length)
  double data_val_fraction = 0.05;  // data.val_fraction (responses files only: held-out samples)
  // component
  std::string component_kind;     // component.kind
  nlohmann::json component;       // the component's options (component.<name> as {"<name>": value}), checked
  // loss
  std::vector<std::pair<std::string, double>> loss_weights;  // loss.<term> in the component's term order
  int64_t loss_block = 256;       // loss.block
  double loss_weight(const std::string& term) const;  // throws if the component declares no such term
  // train
  int64_t steps = 0;              // train.steps
  int64_t batch_size = 1;         // train.batch_size (per rank, per micro-step)
  int64_t grad_accum = 1;         // train.grad_accum
  double lr = 0, min_lr = 0;      // train.lr, train.min_lr
  int64_t warmup = 0;             // train.warmup
  double weight_decay = 0, beta1 = 0, beta2 = 0, adam_eps = 0;
  double clip = 0;                // train.clip (0 = off)
  int64_t seed = 0;               // train.seed
  std::string out_dir;            // train.out_dir
  std::string device;             // train.device: auto | cpu | cuda | cuda:N
  int64_t log_every = 1, eval_every = 0, save_every = 0, keep_last = 3, eval_batches = 2;
  int64_t calibration_sequences = 32;  // train.calibration_sequences: Component::calibrate's training sequences
  int64_t eval_budget = 0;        // train.eval_budget (0: the component's budget())
  std::string progress;           // train.progress: auto | lines | never
  // train.activation_checkpointing: none | layers (recompute each frozen decoder layer in the backward)
  ActivationCheckpointing activation_checkpointing = ActivationCheckpointing::None;
  NonFinite on_nonfinite = NonFinite::Stop;  // train.on_nonfinite: stop | skip
  KernelPath kernels = KernelPath::Fused;     // train.kernels: fused | reference
  Float32Matmul float32_matmul = Float32Matmul::Tf32;  // train.float32_matmul: tf32 | ieee
  // dist
  std::string dist_backend;       // dist.backend: auto | gloo | nccl
  double dist_timeout_s = 300;    // dist.timeout_s
  double bucket_mb = 25;          // dist.bucket_mb

  // The resolved values, keyed by dotted key (what is printed and stored in checkpoints).
  nlohmann::ordered_json values;
  // The resolved config as YAML-ish text, one `key: value` per line, in table order.
  std::string to_text() const;
};

// Resolves defaults <- YAML text (named `source` in errors) <- overrides ("a.b=value").
RunConfig resolve_config(const std::string& yaml_text, const std::string& source,
                         const std::vector<std::string>& overrides);
// Reads `path` and resolves it.
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides);
// Rebuilds a RunConfig from the `values` JSON stored in a checkpoint.
RunConfig config_from_values(const nlohmann::ordered_json& values, const std::string& source);

}  // namespace kvd
