// The resolved configuration of a frozen decoder, parsed strictly from a Hugging Face config.json.
// One struct for every supported family; the decoder reads its flags instead of forking per family.
// Fields honoured: docs/ecosystem.md, "HF model config fields".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace kvd {

enum class Family { Llama, Mistral, Qwen2, Qwen3 };
enum class RopeScaling { None, Linear, Llama3 };
enum class Activation { SiLU };

const char* family_name(Family f);

struct ModelConfig {
  Family family = Family::Llama;
  std::string architecture;  // e.g. "LlamaForCausalLM"
  std::string model_type;    // e.g. "llama"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // config head_dim, else hidden_size / num_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling = RopeScaling::None;
  double rope_factor = 1.0;            // linear and llama3
  double rope_low_freq_factor = 1.0;   // llama3
  double rope_high_freq_factor = 4.0;  // llama3
  int64_t rope_original_max_position = 8192;  // llama3
  Activation activation = Activation::SiLU;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2 always; Llama / Qwen3 if attention_bias)
  bool o_proj_bias = false;     // o_proj bias too (Llama / Qwen3 if attention_bias; never Qwen2)
  bool qk_norm = false;         // Qwen3 q_norm / k_norm over head_dim before RoPE
  std::optional<int64_t> sliding_window;  // Mistral (and Qwen2 with use_sliding_window): honoured
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // int or list in config.json

  // Number of query heads per KV head.
  int64_t group_size() const { return num_heads / num_kv_heads; }
  // The resolved config as JSON (for `kvdistill info` and for manifests).
  nlohmann::json to_json() const;
};

// Parses and validates. Unknown architectures, unsupported values (e.g. hidden_act "gelu", rope_type
// "yarn", mlp_bias true) and missing or mistyped required fields throw kvd::Error
// "<context>: <field>: <problem>".
ModelConfig parse_config(const nlohmann::json& j, const std::string& context);
// Reads <model_dir>/config.json (or a path to a .json file).
ModelConfig load_config(const std::string& path_or_dir);

}  // namespace kvd
