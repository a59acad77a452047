// Small valid inputs for every fuzz target: the seed corpora (written by fuzz_seeds.cpp, which CTest runs
// before the replays) and the valid tokenizers fuzz_tokenizer.cpp encodes with. Header-only, torch-free.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/gguf.h"

namespace kvd::fuzz::seeds {

using json = nlohmann::json;

// GPT-2's byte -> printable code point map, as UTF-8 (byte-level BPE's alphabet).
inline std::string byte_token(int b) {
  auto printable = [](int x) { return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255); };
  int cp = b;
  if (!printable(b)) {
    int n = 0;
    for (int x = 0; x < b; ++x) n += printable(x) ? 0 : 1;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

inline json added_token(int id, const std::string& content, bool special, bool normalized = false,
                        bool lstrip = false, bool rstrip = false, bool single_word = false) {
  return json{{"id", id},           {"content", content},     {"single_word", single_word}, {"lstrip", lstrip},
              {"rstrip", rstrip},   {"normalized", normalized}, {"special", special}};
}

// A byte-level BPE tokenizer.json: ids 0..255 are the bytes, then a few merges, then added tokens.
//   variant 0: GPT-2 / SmolLM2 style (ByteLevel pre-tokenizer with its regex, no normalizer);
//   variant 1: Qwen2 / Llama-3 style (NFC, Split by a regex + ByteLevel without regex, Digits,
//              TemplateProcessing that prepends a BOS, added tokens with lstrip / rstrip / single_word).
inline std::string tokenizer_json(int variant) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_token(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}, {"i", "n"}, {"Ġ", "a"}, {"e", "r"}, {"o", "n"},
      {"Ġ", "s"}, {"r", "e"}, {"a", "t"}, {"e", "n"}, {"Ġ", "o"}, {"e", "s"}, {"Ġ", "w"}, {"1", "2"}};
  json mlist = json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(a + b)) vocab[a + b] = id++;
    if (variant == 1) {
      mlist.push_back(json::array({a, b}));
    } else {
      mlist.push_back(a + " " + b);
    }
  }
  json added = json::array({added_token(id, "<|endoftext|>", true), added_token(id + 1, "<|im_start|>", true),
                            added_token(id + 2, "<|im_end|>", true)});
  json bytelevel = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  json tok = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"normalizer", nullptr},
              {"pre_tokenizer", bytelevel}, {"post_processor", nullptr}, {"decoder", bytelevel}};
  if (variant == 1) {
    added.push_back(added_token(id + 3, "<mask>", false, true, true, true, true));
    added.push_back(added_token(id + 4, "é!", false, true));
    tok["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({json{{"type", "NFC"}}})}};
    json no_regex = bytelevel;
    no_regex["use_regex"] = false;
    tok["pre_tokenizer"] = {
        {"type", "Sequence"},
        {"pretokenizers",
         json::array({json{{"type", "Split"},
                           {"pattern", {{"Regex", "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                                  "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
                           {"behavior", "Isolated"},
                           {"invert", false}},
                      json{{"type", "Digits"}, {"individual_digits", true}}, no_regex})}};
    tok["post_processor"] = {
        {"type", "Sequence"},
        {"processors",
         json::array({json{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}},
                      json{{"type", "TemplateProcessing"},
                           {"single", json::array({json{{"SpecialToken", {{"id", "<|endoftext|>"}, {"type_id", 0}}}},
                                                   json{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                           {"pair", json::array()},
                           {"special_tokens", {{"<|endoftext|>", {{"id", "<|endoftext|>"}, {"ids", {id}}, {"tokens", {"<|endoftext|>"}}}}}}}})}};
  }
  tok["added_tokens"] = added;
  tok["model"] = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                  {"ignore_merges", variant == 1}, {"vocab", vocab}, {"merges", mlist}};
  return tok.dump(variant == 1 ? 1 : -1);
}

// A Hugging Face config.json of a tiny model: 0 Llama (llama3 RoPE), 1 Qwen2, 2 Qwen3, 3 Mistral.
inline std::string config_json(int variant) {
  json c = {{"hidden_size", 64},       {"intermediate_size", 128}, {"num_hidden_layers", 2},
            {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 300},
            {"max_position_embeddings", 512}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
            {"hidden_act", "silu"},     {"tie_word_embeddings", true}, {"bos_token_id", 1},
            {"eos_token_id", 2},        {"torch_dtype", "bfloat16"}};
  switch (variant) {
    case 0:
      c["architectures"] = {"LlamaForCausalLM"};
      c["model_type"] = "llama";
      c["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                           {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 256}};
      c["eos_token_id"] = {2, 3};
      break;
    case 1:
      c["architectures"] = {"Qwen2ForCausalLM"};
      c["model_type"] = "qwen2";
      c["use_sliding_window"] = false;
      c["sliding_window"] = 4096;
      c["max_window_layers"] = 2;
      break;
    case 2:
      c["architectures"] = {"Qwen3ForCausalLM"};
      c["model_type"] = "qwen3";
      c["head_dim"] = 32;
      c["attention_bias"] = false;
      break;
    default:
      c["architectures"] = {"MistralForCausalLM"};
      c["model_type"] = "mistral";
      c["sliding_window"] = 128;
      c["tie_word_embeddings"] = false;
      break;
  }
  return c.dump(2);
}

// tokenizer_config.json: 0 ChatML (SmolLM2 / Qwen), 1 Llama-3 style.
inline std::string tokenizer_config_json(int variant) {
  if (variant == 0) {
    const std::string tmpl =
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    return json{{"chat_template", tmpl}, {"bos_token", "<|im_start|>"}, {"eos_token", "<|im_end|>"}}.dump(2);
  }
  const std::string tmpl =
      "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
      "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
      "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}";
  return json{{"chat_template", json::array({json{{"name", "default"}, {"template", tmpl}}})},
              {"bos_token", {{"content", "<|begin_of_text|>"}, {"lstrip", false}}},
              {"eos_token", "<|eot_id|>"}}
      .dump(2);
}

inline std::string tasks_jsonl() {
  std::string s;
  s += json{{"id", "niah-0"}, {"context", "The magic number is 7. Grass is green."}, {"question", "What is the magic number?"},
            {"answers", {"7"}}, {"task", "niah_single_1"}, {"length", 12}}.dump() + "\n";
  s += json{{"id", 1}, {"context", "Alice lives in Paris."}, {"question", "Where does Alice live?"},
            {"answers", {"Paris", "France"}}, {"task", "qa_1"}, {"length", 6}, {"answer_prefix", "Answer:"},
            {"max_new_tokens", 8}}.dump() + "\n\n";
  return s;
}

// kvdistill.json of a retention gate bundle, as save_gate_bundle writes it (matching fuzz_bundle.cpp's gate).
inline std::string manifest_json() {
  json m = {{"kind", "retention_gate"}, {"num_layers", 2}, {"hidden_size", 64}, {"num_kv_heads", 2},
            {"gate_hidden", 16}, {"activation", "silu"}, {"bias_init", 18.0}, {"budget", 128},
            {"score", "log_beta"}, {"higher_keeps", true}, {"format_version", 1}, {"dtype", "F32"},
            {"base_model", {{"id", "tiny"}, {"config_sha256", std::string(64, 'a')}}},
            {"tensors", {"model.layers.0.self_attn.retention_gate.w1.weight"}}};
  return m.dump(2);
}

// ---- GGUF v3 ------------------------------------------------------------------------------------

class GgufBuilder {
 public:
  void kv_u32(const std::string& k, uint32_t v) { key(k, 4), pod(kv_, v); }
  void kv_i32(const std::string& k, int32_t v) { key(k, 5), pod(kv_, v); }
  void kv_f32(const std::string& k, float v) { key(k, 6), pod(kv_, v); }
  void kv_bool(const std::string& k, bool v) { key(k, 7), pod(kv_, static_cast<uint8_t>(v)); }
  void kv_str(const std::string& k, const std::string& v) { key(k, 8), str(kv_, v); }
  void kv_strs(const std::string& k, const std::vector<std::string>& v) {
    key(k, 9), pod(kv_, uint32_t(8)), pod(kv_, uint64_t(v.size()));
    for (const auto& s : v) str(kv_, s);
  }
  void kv_i32s(const std::string& k, const std::vector<int32_t>& v) {
    key(k, 9), pod(kv_, uint32_t(5)), pod(kv_, uint64_t(v.size()));
    for (int32_t x : v) pod(kv_, x);
  }
  // A tensor of `dims` (ggml order) and type `type` whose bytes are `bytes`.
  void tensor(const std::string& name, uint32_t type, const std::vector<uint64_t>& dims, const std::string& bytes) {
    str(info_, name);
    pod(info_, uint32_t(dims.size()));
    for (uint64_t d : dims) pod(info_, d);
    pod(info_, type);
    while (data_.size() % 32) data_ += '\0';
    pod(info_, uint64_t(data_.size()));
    data_ += bytes;
    ++n_tensors_;
  }
  std::string bytes() const {
    std::string out = "GGUF";
    pod(out, uint32_t(3));
    pod(out, n_tensors_);
    pod(out, n_kv_);
    out += kv_;
    out += info_;
    while (out.size() % 32) out += '\0';
    return out + data_;
  }

 private:
  template <typename T>
  static void pod(std::string& o, T v) {
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    o.append(b, sizeof(T));
  }
  static void str(std::string& o, const std::string& s) { pod(o, uint64_t(s.size())), o += s; }
  void key(const std::string& k, uint32_t type) { str(kv_, k), pod(kv_, type), ++n_kv_; }
  std::string kv_, info_, data_;
  uint64_t n_tensors_ = 0, n_kv_ = 0;
};

// Deterministic filler bytes (fp16 scales of the quantized blocks included).
inline std::string filler(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    s[i] = static_cast<char>(seed >> 24);
  }
  // Keep fp16 values finite: clear the top exponent bit of every odd byte.
  for (size_t i = 1; i < n; i += 2) s[i] = static_cast<char>(s[i] & 0x3F);
  return s;
}

// 0: a tiny llama-architecture model (hparams, tokenizer, one F32 / F16 / Q8_0 tensor each);
// 1: one 256-element tensor of every ggml type gguf.cpp dequantizes.
inline std::string gguf_bytes(int variant) {
  GgufBuilder g;
  g.kv_str("general.architecture", "llama");
  g.kv_u32("general.alignment", 32);
  if (variant == 0) {
    g.kv_str("general.name", "tiny");
    g.kv_u32("llama.context_length", 512);
    g.kv_u32("llama.embedding_length", 64);
    g.kv_u32("llama.feed_forward_length", 128);
    g.kv_u32("llama.block_count", 1);
    g.kv_u32("llama.attention.head_count", 4);
    g.kv_u32("llama.attention.head_count_kv", 2);
    g.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    g.kv_f32("llama.rope.freq_base", 10000.0f);
    g.kv_u32("llama.rope.dimension_count", 16);
    g.kv_u32("llama.vocab_size", 260);
    std::vector<std::string> tokens;
    std::vector<int32_t> types;
    for (int b = 0; b < 256; ++b) tokens.push_back(byte_token(b)), types.push_back(1);
    for (const char* t : {"Ġt", "he", "<|im_start|>", "<|im_end|>"}) tokens.push_back(t), types.push_back(t[0] == '<' ? 3 : 1);
    g.kv_str("tokenizer.ggml.model", "gpt2");
    g.kv_str("tokenizer.ggml.pre", "smollm");
    g.kv_strs("tokenizer.ggml.tokens", tokens);
    g.kv_i32s("tokenizer.ggml.token_type", types);
    g.kv_strs("tokenizer.ggml.merges", {"Ġ t", "h e"});
    g.kv_u32("tokenizer.ggml.bos_token_id", 258);
    g.kv_u32("tokenizer.ggml.eos_token_id", 259);
    g.kv_bool("tokenizer.ggml.add_bos_token", false);
    g.kv_str("tokenizer.chat_template", "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                                        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                                        "{{ '<|im_start|>assistant\n' }}{% endif %}");
    g.tensor("token_embd.weight", 0, {64, 4}, filler(64 * 4 * 4, 1));
    g.tensor("output_norm.weight", 1, {64}, filler(64 * 2, 2));
    g.tensor("blk.0.attn_q.weight", 8, {64, 2}, filler(2 * 2 * 34, 3));
    return g.bytes();
  }
  for (uint32_t id = 0; id < 64; ++id) {
    const GgmlTypeInfo* info = ggml_type_info(id);
    if (!info || !info->dequantizable) continue;
    const uint64_t n = 256 % info->block_size == 0 ? 256 : info->block_size;
    g.tensor(std::string("t.") + info->name, id, {n}, filler(n / info->block_size * info->type_size, id));
  }
  return g.bytes();
}

}  // namespace kvd::fuzz::seeds
