// `kvdistill convert`: a llama.cpp GGUF file -> a Hugging Face model directory (config.json,
// model.safetensors in float32, tokenizer.json, tokenizer_config.json, generation_config.json).
// Torch-free. Supported: general.architecture llama (also Mistral files, which llama.cpp writes as
// llama), qwen2, qwen3; tokenizer.ggml.model "gpt2" (byte-level BPE).
//
// What is undone on the way back to HF layout:
//   - tensor names (blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight, ...);
//   - for llama, llama.cpp's row permutation of attn_q / attn_k (see unpermute_qk_rows);
//   - quantization (every tensor is dequantized to float32).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace kvd {

class GgufFile;

// Called after each tensor is written: (tensors done, tensors in total, HF tensor name).
using ConvertProgress = std::function<void(size_t done, size_t total, const std::string& name)>;

// A progress printer for the CLI: one updating line on a terminal, a few lines otherwise (stderr).
ConvertProgress stderr_progress();

// HF's default shard size ("5GB"): bigger checkpoints become model-0000k-of-0000N.safetensors + index.
constexpr uint64_t kDefaultMaxShardBytes = 5'000'000'000ull;

// Converts `gguf_path` into the HF model directory `out_dir`. Everything is written into
// "<out_dir>.tmp" first and renamed into place at the end, so a failure leaves no half-written
// `out_dir`. An existing `out_dir` is replaced only if it holds nothing but files convert writes
// (config.json, *.safetensors, the index, tokenizer*.json, generation_config.json, .converted);
// otherwise it is an error. Throws kvd::Error naming the file and the problem (unsupported
// architecture, tokenizer model or pre-tokenizer, quantization type, missing tensor, ...).
void convert_gguf_to_hf(const std::string& gguf_path, const std::string& out_dir, const ConvertProgress& progress = {},
                        uint64_t max_shard_bytes = kDefaultMaxShardBytes);

// --- the pieces, exposed for tests -----------------------------------------------------------

// config.json for the file's architecture (LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM).
nlohmann::json hf_config_from_gguf(const GgufFile& f);
// tokenizer.json (HF `tokenizers` format) from tokenizer.ggml.* metadata.
nlohmann::ordered_json hf_tokenizer_from_gguf(const GgufFile& f);
// tokenizer_config.json and generation_config.json.
nlohmann::json hf_tokenizer_config_from_gguf(const GgufFile& f);
nlohmann::json hf_generation_config_from_gguf(const GgufFile& f);

// The HF name of a GGUF tensor ("blk.3.ffn_up.weight" -> "model.layers.3.mlp.up_proj.weight"); an
// empty string for tensors that have no HF counterpart but are understood (rope_freqs.weight).
// Throws kvd::Error for an unknown name.
std::string hf_tensor_name(const std::string& gguf_name);

// llama.cpp's converter reorders the rows of each head of q_proj / k_proj from HF's
// [first halves of the rotary pairs | second halves] to interleaved pairs:
//   GGUF row h*D + 2*i + j  <-  HF row h*D + j*(D/2) + i     (D = rows / n_heads, i < D/2, j in {0, 1}).
// This writes the inverse: dst (rows x cols, HF order) from src (rows x cols, GGUF order).
// For q use n_heads = num_attention_heads, for k n_heads = num_key_value_heads.
void unpermute_qk_rows(const float* src, float* dst, int64_t rows, int64_t cols, int64_t n_heads);

}  // namespace kvd
