// Training checkpoints: one directory per saved step under <out_dir>/checkpoints/,
//
//   step_00000100/
//     weights.safetensors   trainable parameters (fp32), named as the component names them
//     optimizer.pt          AdamW state (moments, step counts) via torch::save
//     rng.pt                CPU and CUDA generator states
//     state.json            written last: step, data cursor, resolved config, component kind, base model id
//
// Atomic: files are written into <out_dir>/checkpoints/.tmp.step_X.<pid>/, fsync'ed, the directory is
// fsync'ed and renamed to step_X, and the parent fsync'ed. A crash at any point leaves earlier checkpoints
// intact and at most a .tmp.* directory, which the next save removes and loading ignores. Only the last K
// are kept.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/fs.h"  // make_dirs

namespace torch::optim {
class Optimizer;
}
namespace torch::nn {
class Module;
}

namespace kvd {

// What identifies a run's checkpoints (a checkpoint of another component or model refuses to load).
struct CheckpointIdentity {
  std::string component_kind;  // e.g. "retention_gate"
  std::string model_id;        // the model directory's name, e.g. "SmolLM2-135M-Instruct"
  std::string model_sha256;    // sha256 of its config.json
};

struct CheckpointMeta {
  int64_t step = 0;                 // optimizer steps done
  nlohmann::json cursor;            // data cursor (data/loader.h cursor_to_json) of the next batch, rank 0's
  nlohmann::ordered_json config;    // resolved config values (train/config.h)
  CheckpointIdentity identity;
  int64_t world_size = 1;
};

// <root>/step_<8 digits>
std::string checkpoint_name(int64_t step);

// Writes a checkpoint directory atomically: `write_files(tmp_dir)` fills the temporary directory (every
// file it writes is fsync'ed afterwards), then it is renamed to <root>/<name>. If `write_files` throws,
// the temporary directory is removed and nothing else changes. Then keeps only the newest `keep_last`
// step_* directories. Returns the final path.
std::string save_checkpoint_dir(const std::string& root, const std::string& name,
                                const std::function<void(const std::string& tmp_dir)>& write_files,
                                int64_t keep_last);

// Complete checkpoints (step_* directories holding state.json) under root, oldest first.
std::vector<std::string> list_checkpoints(const std::string& root);
// The newest, or "" when there is none.
std::string latest_checkpoint(const std::string& root);

// The trainer's checkpoint: module parameters, optimizer, RNG and meta into `root`.
std::string save_training_checkpoint(const std::string& root, const CheckpointMeta& meta, torch::nn::Module& module,
                                     torch::optim::Optimizer& optimizer, int64_t keep_last);
// Reads state.json of `dir`, checking that it belongs to `expect` (component kind and model); throws a
// message naming both and what to do otherwise.
CheckpointMeta read_checkpoint_meta(const std::string& dir, const CheckpointIdentity& expect);
// Loads the parameters (by name, shapes checked) and buffers saved by save_training_checkpoint into `module`.
void load_checkpoint_weights(const std::string& dir, torch::nn::Module& module);
// Loads parameters and buffers (load_checkpoint_weights), optimizer state and RNG states saved by
// save_training_checkpoint.
void load_training_state(const std::string& dir, torch::nn::Module& module, torch::optim::Optimizer& optimizer);

}  // namespace kvd
