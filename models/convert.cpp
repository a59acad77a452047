#include "models/convert.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "models/gguf.h"
#include "models/safetensors.h"

namespace kvd {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

namespace {

// ------------------------------------------------------------------------------------------------
// Architecture and hyperparameters
// ------------------------------------------------------------------------------------------------
enum class Arch { Llama, Qwen2, Qwen3 };

struct Hparams {
  Arch arch = Arch::Llama;
  std::string gguf_arch;  // "llama", the prefix of the hyperparameter keys
  int64_t hidden = 0, inter = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, ctx = 0, vocab = 0;
  double eps = 1e-5, theta = 10000.0;
  json rope_scaling;  // null or an HF rope_scaling object
  bool tied = false;
  bool attn_bias = false;  // q/k/v(/o) biases present
};

Arch arch_of(const GgufFile& f, std::string& name) {
  name = f.get_string("general.architecture");
  if (name == "llama") return Arch::Llama;
  if (name == "qwen2") return Arch::Qwen2;
  if (name == "qwen3") return Arch::Qwen3;
  KVD_FAIL(f.path(), ": general.architecture '", name,
           "' is not supported by convert (supported: llama (incl. Mistral), qwen2, qwen3)");
}

// A float32 metadata value as the shortest decimal that reads back to the same float32, so that
// 9.99999974737875e-06 (1e-5 stored as f32) is written as 1e-05, as in the original config.json.
double tidy_f32(double v) {
  const float f = float(v);
  if (!std::isfinite(f)) return v;
  for (int prec = 1; prec <= 9; ++prec) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*g", prec, double(f));
    if (std::strtof(buf, nullptr) == f) return std::strtod(buf, nullptr);
  }
  return double(f);
}
double tidy(const GgufValue& v) { return v.type == GgufType::F32 ? tidy_f32(v.as_double()) : v.as_double(); }

// llama.cpp may store a per-layer quantity as an array (one entry per layer); HF needs one value.
int64_t uniform_int(const GgufFile& f, const std::string& key) {
  const GgufValue& v = f.at(key);
  if (!v.is_array()) return v.as_int();
  const std::vector<int64_t> xs = v.as_ints();
  KVD_CHECK(!xs.empty(), v.context, ": empty array");
  for (int64_t x : xs)
    KVD_CHECK(x == xs[0], v.context, ": differs between layers (", xs[0], " vs ", x,
              "); per-layer sizes cannot be expressed in a Hugging Face config");
  return xs[0];
}

// Llama 3.1-style RoPE scaling is stored by llama.cpp only as the tensor rope_freqs.weight (one factor
// per rotary frequency). Recover the HF rope_scaling by recomputing those factors from the standard
// parameters (low_freq_factor 1, high_freq_factor 4, original context 8192, factor = the largest value).
json llama3_rope_scaling(const GgufFile& f, const GgufTensor& rf, const Hparams& h) {
  const std::vector<float> ff = f.dequantize(rf);
  KVD_CHECK(int64_t(ff.size()) * 2 == h.head_dim, f.path(), ": rope_freqs.weight has ", ff.size(),
            " entries, expected head_dim / 2 = ", h.head_dim / 2);
  const double factor = *std::max_element(ff.begin(), ff.end());
  const double low = 1.0, high = 4.0;
  const int64_t orig = f.get_int_or(h.gguf_arch + ".rope.scaling.original_context_length", 8192);
  const double pi = 3.14159265358979323846;
  for (size_t i = 0; i < ff.size(); ++i) {
    const double freq = 1.0 / std::pow(h.theta, double(2 * i) / double(h.head_dim));
    const double wavelen = 2 * pi / freq;
    double want;
    if (wavelen < double(orig) / high)
      want = 1.0;
    else if (wavelen > double(orig) / low)
      want = factor;
    else {
      const double smooth = (double(orig) / wavelen - low) / (high - low);
      want = 1.0 / ((1 - smooth) / factor + smooth);
    }
    KVD_CHECK(std::fabs(ff[i] - want) <= 1e-4 * std::fabs(want), f.path(), ": rope_freqs.weight[", i, "] = ", ff[i],
              " does not match Llama-3 RoPE scaling (factor ", factor, ", low_freq_factor 1, high_freq_factor 4, "
              "original_max_position_embeddings ", orig, ": expected ", want,
              "); this RoPE scaling cannot be written as a Hugging Face rope_scaling");
  }
  return json{{"rope_type", "llama3"},
              {"factor", tidy_f32(factor)},
              {"low_freq_factor", low},
              {"high_freq_factor", high},
              {"original_max_position_embeddings", orig}};
}

Hparams read_hparams(const GgufFile& f) {
  Hparams h;
  h.arch = arch_of(f, h.gguf_arch);
  const std::string a = h.gguf_arch + ".";
  const std::string& p = f.path();
  h.hidden = f.get_int(a + "embedding_length");
  h.inter = uniform_int(f, a + "feed_forward_length");
  h.layers = f.get_int(a + "block_count");
  h.heads = uniform_int(f, a + "attention.head_count");
  h.kv_heads = f.find(a + "attention.head_count_kv") ? uniform_int(f, a + "attention.head_count_kv") : h.heads;
  h.ctx = f.get_int(a + "context_length");
  KVD_CHECK(h.hidden > 0 && h.inter > 0 && h.layers > 0 && h.heads > 0 && h.kv_heads > 0 && h.ctx > 0, p,
            ": non-positive model dimensions in the metadata (", a, "embedding_length / feed_forward_length / "
            "block_count / attention.head_count(_kv) / context_length)");
  // Bounds far above any real model, so that products of them below cannot overflow.
  constexpr int64_t kMaxDim = int64_t(1) << 24, kMaxLayers = 1 << 16;
  KVD_CHECK(h.hidden <= kMaxDim && h.inter <= kMaxDim && h.heads <= kMaxDim && h.kv_heads <= kMaxDim &&
                h.layers <= kMaxLayers,
            p, ": implausible model dimensions in the metadata (embedding_length ", h.hidden, ", feed_forward_length ",
            h.inter, ", head_count ", h.heads, ", head_count_kv ", h.kv_heads, ", block_count ", h.layers, ")");
  KVD_CHECK(h.heads % h.kv_heads == 0, p, ": ", a, "attention.head_count ", h.heads,
            " is not a multiple of head_count_kv ", h.kv_heads);
  if (const GgufValue* kl = f.find(a + "attention.key_length")) {
    h.head_dim = kl->as_int();
  } else {
    KVD_CHECK(h.hidden % h.heads == 0, p, ": embedding_length ", h.hidden, " is not a multiple of head_count ",
              h.heads, " and ", a, "attention.key_length is absent");
    h.head_dim = h.hidden / h.heads;
  }
  KVD_CHECK(h.head_dim > 0 && h.head_dim % 2 == 0 && h.head_dim <= kMaxDim, p, ": head dimension ", h.head_dim,
            " must be positive, even and plausible");
  if (const GgufValue* vl = f.find(a + "attention.value_length"))
    KVD_CHECK(vl->as_int() == h.head_dim, p, ": ", a, "attention.value_length ", vl->as_int(),
              " differs from key_length ", h.head_dim, " (not supported)");
  if (const GgufValue* rd = f.find(a + "rope.dimension_count"))
    KVD_CHECK(rd->as_int() == h.head_dim, p, ": ", a, "rope.dimension_count ", rd->as_int(), " differs from head_dim ",
              h.head_dim, " (partial rotary embeddings are not supported)");
  if (const GgufValue* e = f.find(a + "attention.layer_norm_rms_epsilon")) h.eps = tidy(*e);
  if (const GgufValue* t = f.find(a + "rope.freq_base")) h.theta = tidy(*t);

  const GgufTensor& embd = f.tensor("token_embd.weight");
  KVD_CHECK(embd.dims.size() == 2 && int64_t(embd.dims[0]) == h.hidden, p, ": token_embd.weight has dims [",
            embd.dims[0], ", ...], expected [", h.hidden, ", vocab]");
  h.vocab = int64_t(embd.dims[1]);
  h.tied = f.find_tensor("output.weight") == nullptr;
  h.attn_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;

  // RoPE scaling.
  const std::string type = f.get_string_or(a + "rope.scaling.type", "none");
  const GgufTensor* rf = f.find_tensor("rope_freqs.weight");
  if (type == "linear") {
    KVD_CHECK(!rf, p, ": both linear RoPE scaling and rope_freqs.weight; not supported");
    h.rope_scaling = json{{"rope_type", "linear"}, {"factor", tidy(f.at(a + "rope.scaling.factor"))}};
  } else if (type != "none") {
    KVD_FAIL(p, ": ", a, "rope.scaling.type '", type, "' is not supported (supported: none, linear, and Llama-3 "
             "scaling given as rope_freqs.weight)");
  } else if (rf) {
    KVD_CHECK(h.arch == Arch::Llama, p, ": rope_freqs.weight is only supported for llama");
    h.rope_scaling = llama3_rope_scaling(f, *rf, h);
  }
  return h;
}

// Token ids: the single eos id, or eos + eot + eom (Llama 3 instruct) when the file names them.
json eos_ids(const GgufFile& f) {
  std::vector<int64_t> ids;
  for (const char* k : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    if (const GgufValue* v = f.find(k)) {
      const int64_t id = v->as_int();
      if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
    }
  }
  if (ids.empty()) return nullptr;
  if (ids.size() == 1) return ids[0];
  return ids;
}

json config_json(const GgufFile& f, const Hparams& h) {
  json c;
  switch (h.arch) {
    case Arch::Llama:
      c["architectures"] = {"LlamaForCausalLM"};
      c["model_type"] = "llama";
      break;
    case Arch::Qwen2:
      c["architectures"] = {"Qwen2ForCausalLM"};
      c["model_type"] = "qwen2";
      break;
    case Arch::Qwen3:
      c["architectures"] = {"Qwen3ForCausalLM"};
      c["model_type"] = "qwen3";
      break;
  }
  c["hidden_size"] = h.hidden;
  c["intermediate_size"] = h.inter;
  c["num_hidden_layers"] = h.layers;
  c["num_attention_heads"] = h.heads;
  c["num_key_value_heads"] = h.kv_heads;
  c["head_dim"] = h.head_dim;
  c["rms_norm_eps"] = h.eps;
  c["rope_theta"] = h.theta;
  c["rope_scaling"] = h.rope_scaling;
  c["max_position_embeddings"] = h.ctx;
  c["vocab_size"] = h.vocab;
  c["tie_word_embeddings"] = h.tied;
  c["hidden_act"] = "silu";
  c["torch_dtype"] = "float32";
  c["initializer_range"] = 0.02;
  c["use_cache"] = true;
  c["attention_dropout"] = 0.0;
  if (h.arch == Arch::Llama) {
    c["attention_bias"] = h.attn_bias;
    c["mlp_bias"] = false;
    c["pretraining_tp"] = 1;
  } else {
    c["use_sliding_window"] = false;
    if (h.arch == Arch::Qwen3) c["attention_bias"] = h.attn_bias;
  }
  if (const GgufValue* v = f.find("tokenizer.ggml.bos_token_id")) c["bos_token_id"] = v->as_int();
  json eos = eos_ids(f);
  if (!eos.is_null()) c["eos_token_id"] = eos;
  if (const GgufValue* v = f.find("tokenizer.ggml.padding_token_id")) c["pad_token_id"] = v->as_int();
  return c;
}

// ------------------------------------------------------------------------------------------------
// Tensor names and shapes
// ------------------------------------------------------------------------------------------------
struct LayerName {
  const char* gguf;
  const char* hf;
};
const LayerName kLayerNames[] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"attn_q.bias", "self_attn.q_proj.bias"},
    {"attn_k.bias", "self_attn.k_proj.bias"},
    {"attn_v.bias", "self_attn.v_proj.bias"},
    {"attn_output.bias", "self_attn.o_proj.bias"},
    {"attn_q_norm.weight", "self_attn.q_norm.weight"},
    {"attn_k_norm.weight", "self_attn.k_norm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
};

// Parses "blk.<i>.<rest>"; false if `name` has another form.
bool split_layer(const std::string& name, int64_t& layer, std::string& rest) {
  if (name.rfind("blk.", 0) != 0) return false;
  size_t i = 4, start = 4;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  if (i == start || i - start > 9 || i >= name.size() || name[i] != '.') return false;
  layer = std::stoll(name.substr(start, i - start));
  rest = name.substr(i + 1);
  return true;
}

// The shape each HF tensor must have, given the hyperparameters (row-major, outermost first).
std::vector<int64_t> expected_shape(const std::string& rest, const Hparams& h) {
  const int64_t q = h.heads * h.head_dim, kv = h.kv_heads * h.head_dim;
  if (rest == "attn_norm.weight" || rest == "ffn_norm.weight" || rest == "attn_output.bias") return {h.hidden};
  if (rest == "attn_q.weight") return {q, h.hidden};
  if (rest == "attn_k.weight" || rest == "attn_v.weight") return {kv, h.hidden};
  if (rest == "attn_output.weight") return {h.hidden, q};
  if (rest == "attn_q.bias") return {q};
  if (rest == "attn_k.bias" || rest == "attn_v.bias") return {kv};
  if (rest == "attn_q_norm.weight" || rest == "attn_k_norm.weight") return {h.head_dim};
  if (rest == "ffn_gate.weight" || rest == "ffn_up.weight") return {h.inter, h.hidden};
  if (rest == "ffn_down.weight") return {h.hidden, h.inter};
  return {};
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// One tensor of the output: where it comes from and what happens to it.
struct Plan {
  const GgufTensor* src;
  std::string hf_name;
  std::vector<int64_t> shape;
  int64_t unpermute_heads = 0;  // > 0: undo llama.cpp's q/k row permutation with this many heads
};

std::vector<Plan> plan_tensors(const GgufFile& f, const Hparams& h) {
  const std::string& p = f.path();
  std::vector<Plan> plans;
  std::set<std::string> seen;
  for (const GgufTensor& t : f.tensors()) {
    if (t.name == "rope_freqs.weight") continue;  // folded into config.json's rope_scaling
    std::string hf;
    try {
      hf = hf_tensor_name(t.name);
    } catch (const Error& e) {
      KVD_FAIL(p, ": ", e.what());
    }
    Plan pl{&t, hf, t.shape(), 0};
    int64_t layer;
    std::string rest;
    std::vector<int64_t> want;
    if (split_layer(t.name, layer, rest)) {
      KVD_CHECK(layer < h.layers, p, ": tensor '", t.name, "' names layer ", layer, " but ", h.gguf_arch,
                ".block_count is ", h.layers);
      want = expected_shape(rest, h);
      if (h.arch == Arch::Llama && (rest == "attn_q.weight" || rest == "attn_q.bias")) pl.unpermute_heads = h.heads;
      if (h.arch == Arch::Llama && (rest == "attn_k.weight" || rest == "attn_k.bias")) pl.unpermute_heads = h.kv_heads;
    } else if (t.name == "token_embd.weight" || t.name == "output.weight") {
      want = {h.vocab, h.hidden};
    } else if (t.name == "output_norm.weight") {
      want = {h.hidden};
    }
    KVD_CHECK(want.empty() || want == pl.shape, p, ": tensor '", t.name, "' has shape ", shape_str(pl.shape),
              ", expected ", shape_str(want), " from the metadata");
    seen.insert(t.name);
    plans.push_back(std::move(pl));
  }

  // Everything the HF model needs must be there.
  std::vector<std::string> required = {"token_embd.weight", "output_norm.weight"};
  for (int64_t i = 0; i < h.layers; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    for (const char* r : {"attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                          "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"})
      required.push_back(b + r);
    if (h.arch == Arch::Qwen2 || h.attn_bias)
      for (const char* r : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) required.push_back(b + r);
    if (h.arch == Arch::Llama && h.attn_bias) required.push_back(b + "attn_output.bias");
    if (h.arch == Arch::Qwen3)
      for (const char* r : {"attn_q_norm.weight", "attn_k_norm.weight"}) required.push_back(b + r);
  }
  for (const std::string& r : required)
    KVD_CHECK(seen.count(r), p, ": tensor '", r, "' is missing (required for a ", h.gguf_arch, " model with ",
              h.layers, " layers)");
  return plans;
}

// ------------------------------------------------------------------------------------------------
// Tokenizer
// ------------------------------------------------------------------------------------------------

// Pre-tokenizer regexes of the HF tokenizer.json files of these families (as `tokenizers` Split patterns).
const char* kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

ojson byte_level(bool add_prefix_space, bool trim_offsets, bool use_regex) {
  ojson j;
  j["type"] = "ByteLevel";
  j["add_prefix_space"] = add_prefix_space;
  j["trim_offsets"] = trim_offsets;
  j["use_regex"] = use_regex;
  return j;
}

ojson split_regex(const char* pattern) {
  ojson j;
  j["type"] = "Split";
  j["pattern"] = ojson{{"Regex", pattern}};
  j["behavior"] = "Isolated";
  j["invert"] = false;
  return j;
}

ojson sequence(const char* list_key, std::vector<ojson> items) {
  ojson j;
  j["type"] = "Sequence";
  j[list_key] = ojson::array();
  for (auto& it : items) j[list_key].push_back(std::move(it));
  return j;
}

// llama.cpp token types (tokenizer.ggml.token_type).
constexpr int64_t kTokNormal = 1, kTokControl = 3, kTokUserDefined = 4;

struct Vocab {
  std::vector<std::string> tokens;
  std::vector<int64_t> types;
  std::string pre;
  bool add_bos = false, add_eos = false;
};

Vocab read_vocab(const GgufFile& f) {
  const std::string& p = f.path();
  const std::string model = f.get_string_or("tokenizer.ggml.model", "");
  KVD_CHECK(!model.empty(), p, ": no tokenizer in the file (tokenizer.ggml.model is missing)");
  if (model != "gpt2") {
    const char* what = model == "llama" ? " (SentencePiece)" : model == "bert" ? " (WordPiece)" : "";
    KVD_FAIL(p, ": tokenizer.ggml.model '", model, "'", what,
             " is not supported; only byte-level BPE tokenizers ('gpt2') can be converted");
  }
  Vocab v;
  v.tokens = f.at("tokenizer.ggml.tokens").as_strings();
  KVD_CHECK(!v.tokens.empty(), p, ": tokenizer.ggml.tokens is empty");
  if (const GgufValue* tt = f.find("tokenizer.ggml.token_type")) {
    v.types = tt->as_ints();
    KVD_CHECK(v.types.size() == v.tokens.size(), p, ": tokenizer.ggml.token_type has ", v.types.size(),
              " entries but tokenizer.ggml.tokens has ", v.tokens.size());
  } else {
    v.types.assign(v.tokens.size(), kTokNormal);
  }
  v.pre = f.get_string_or("tokenizer.ggml.pre", "default");
  v.add_bos = f.get_bool_or("tokenizer.ggml.add_bos_token", false);
  v.add_eos = f.get_bool_or("tokenizer.ggml.add_eos_token", false);
  return v;
}

const std::string* token_at(const GgufFile& f, const Vocab& v, const char* key) {
  const GgufValue* id = f.find(key);
  if (!id) return nullptr;
  const int64_t i = id->as_int();
  KVD_CHECK(i >= 0 && i < int64_t(v.tokens.size()), f.path(), ": ", key, " ", i, " is outside the vocabulary (",
            v.tokens.size(), " tokens)");
  return &v.tokens[size_t(i)];
}

ojson post_processor(const GgufFile& f, const Vocab& v) {
  ojson bl = byte_level(true, false, true);
  if (!v.add_bos && !v.add_eos) return bl;
  const std::string* bos = v.add_bos ? token_at(f, v, "tokenizer.ggml.bos_token_id") : nullptr;
  const std::string* eos = v.add_eos ? token_at(f, v, "tokenizer.ggml.eos_token_id") : nullptr;
  KVD_CHECK(!v.add_bos || bos, f.path(), ": tokenizer.ggml.add_bos_token is true but bos_token_id is missing");
  KVD_CHECK(!v.add_eos || eos, f.path(), ": tokenizer.ggml.add_eos_token is true but eos_token_id is missing");
  auto special = [](const std::string& tok) { return ojson{{"SpecialToken", {{"id", tok}, {"type_id", 0}}}}; };
  auto seq = [](const char* id, int type_id) { return ojson{{"Sequence", {{"id", id}, {"type_id", type_id}}}}; };
  ojson single = ojson::array(), pair = ojson::array();
  if (bos) single.push_back(special(*bos));
  single.push_back(seq("A", 0));
  if (eos) single.push_back(special(*eos));
  if (bos) pair.push_back(special(*bos));
  pair.push_back(seq("A", 0));
  if (eos) pair.push_back(special(*eos));
  if (bos) pair.push_back(special(*bos));
  pair.push_back(seq("B", 1));
  if (eos) pair.push_back(special(*eos));
  ojson specials = ojson::object();
  auto id_of = [&](const char* key) { return f.at(key).as_int(); };
  if (bos) specials[*bos] = ojson{{"id", *bos}, {"ids", {id_of("tokenizer.ggml.bos_token_id")}}, {"tokens", {*bos}}};
  if (eos) specials[*eos] = ojson{{"id", *eos}, {"ids", {id_of("tokenizer.ggml.eos_token_id")}}, {"tokens", {*eos}}};
  ojson tp;
  tp["type"] = "TemplateProcessing";
  tp["single"] = single;
  tp["pair"] = pair;
  tp["special_tokens"] = specials;
  return sequence("processors", {bl, tp});
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Public pieces
// ------------------------------------------------------------------------------------------------
std::string hf_tensor_name(const std::string& g) {
  if (g == "token_embd.weight") return "model.embed_tokens.weight";
  if (g == "output_norm.weight") return "model.norm.weight";
  if (g == "output.weight") return "lm_head.weight";
  if (g == "rope_freqs.weight") return "";
  int64_t layer;
  std::string rest;
  if (split_layer(g, layer, rest))
    for (const LayerName& n : kLayerNames)
      if (rest == n.gguf) return "model.layers." + std::to_string(layer) + "." + n.hf;
  KVD_FAIL("tensor '", g, "' has no Hugging Face counterpart known to convert");
}

void unpermute_qk_rows(const float* src, float* dst, int64_t rows, int64_t cols, int64_t n_heads) {
  KVD_CHECK(n_heads > 0 && rows % (2 * n_heads) == 0, "unpermute_qk_rows: ", rows, " rows do not split into ",
            n_heads, " heads of an even size");
  const int64_t d = rows / n_heads, half = d / 2;
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t j = 0; j < 2; ++j) {
        const float* s = src + (h * d + 2 * i + j) * cols;
        float* o = dst + (h * d + j * half + i) * cols;
        std::copy(s, s + cols, o);
      }
}

json hf_config_from_gguf(const GgufFile& f) { return config_json(f, read_hparams(f)); }

ojson hf_tokenizer_from_gguf(const GgufFile& f) {
  const std::string& p = f.path();
  const Vocab v = read_vocab(f);
  const std::vector<std::string>& merges = f.at("tokenizer.ggml.merges").as_strings();

  // vocab: token -> id, in id order. A token listed twice keeps its first id (as HF's vocab would).
  std::unordered_map<std::string, int64_t> ids;
  ids.reserve(v.tokens.size() * 2);
  ojson vocab = ojson::object();
  auto& entries = static_cast<ojson::object_t::Container&>(vocab.get_ref<ojson::object_t&>());
  entries.reserve(v.tokens.size());
  for (size_t i = 0; i < v.tokens.size(); ++i)
    if (ids.emplace(v.tokens[i], int64_t(i)).second) entries.emplace_back(v.tokens[i], int64_t(i));

  // merges: "left right", both sides and their concatenation in the vocabulary (tokenizers requires it).
  ojson merge_list = ojson::array();
  merge_list.get_ref<ojson::array_t&>().reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string& m = merges[i];
    const size_t sp = m.find(' ', 1);
    KVD_CHECK(sp != std::string::npos && sp + 1 < m.size(), p, ": tokenizer.ggml.merges[", i, "] '", m,
              "' is not two space-separated tokens");
    const std::string left = m.substr(0, sp), right = m.substr(sp + 1);
    KVD_CHECK(ids.count(left) && ids.count(right) && ids.count(left + right), p, ": tokenizer.ggml.merges[", i,
              "] '", m, "' uses a token that is not in the vocabulary");
    merge_list.push_back(m);
  }

  // added tokens: control tokens are special; user-defined ones are matched verbatim but not special.
  ojson added = ojson::array();
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    if (v.types[i] != kTokControl && v.types[i] != kTokUserDefined) continue;
    ojson t;
    t["id"] = int64_t(i);
    t["content"] = v.tokens[i];
    t["single_word"] = false;
    t["lstrip"] = false;
    t["rstrip"] = false;
    t["normalized"] = false;
    t["special"] = v.types[i] == kTokControl;
    added.push_back(std::move(t));
  }

  // Pre-tokenization per tokenizer.ggml.pre (the llama.cpp names of the HF pre-tokenizers).
  ojson normalizer = nullptr, pre;
  bool ignore_merges = false;
  if (v.pre == "smollm") {
    // SmolLM / SmolLM2: every digit on its own, then GPT-2's byte-level split.
    pre = sequence("pretokenizers", {ojson{{"type", "Digits"}, {"individual_digits", true}},
                                     byte_level(false, true, true)});
  } else if (v.pre == "llama-bpe" || v.pre == "llama3") {
    pre = sequence("pretokenizers", {split_regex(kLlama3Regex), byte_level(false, true, false)});
    ignore_merges = true;
  } else if (v.pre == "qwen2") {
    normalizer = ojson{{"type", "NFC"}};
    pre = sequence("pretokenizers", {split_regex(kQwen2Regex), byte_level(false, false, false)});
  } else if (v.pre == "gpt-2" || v.pre == "default") {
    pre = byte_level(false, true, true);
  } else {
    KVD_FAIL(p, ": tokenizer.ggml.pre '", v.pre,
             "' is not supported (supported: smollm, llama-bpe, llama3, qwen2, gpt-2, default)");
  }

  ojson model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = ignore_merges;
  model["vocab"] = std::move(vocab);
  model["merges"] = std::move(merge_list);

  ojson tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = std::move(added);
  tok["normalizer"] = std::move(normalizer);
  tok["pre_tokenizer"] = std::move(pre);
  tok["post_processor"] = post_processor(f, v);
  tok["decoder"] = byte_level(true, true, true);
  tok["model"] = std::move(model);
  return tok;
}

json hf_tokenizer_config_from_gguf(const GgufFile& f) {
  const Vocab v = read_vocab(f);
  json c;
  c["tokenizer_class"] = "PreTrainedTokenizerFast";
  c["add_bos_token"] = v.add_bos;
  c["add_eos_token"] = v.add_eos;
  c["clean_up_tokenization_spaces"] = false;
  std::string arch;
  arch_of(f, arch);
  c["model_max_length"] = f.get_int(arch + ".context_length");
  const std::pair<const char*, const char*> specials[] = {{"bos_token", "tokenizer.ggml.bos_token_id"},
                                                          {"eos_token", "tokenizer.ggml.eos_token_id"},
                                                          {"pad_token", "tokenizer.ggml.padding_token_id"},
                                                          {"unk_token", "tokenizer.ggml.unknown_token_id"}};
  for (const auto& [name, key] : specials) {
    const std::string* t = token_at(f, v, key);
    c[name] = t ? json(*t) : json(nullptr);
  }
  if (const GgufValue* t = f.find("tokenizer.chat_template")) c["chat_template"] = t->as_string();
  return c;
}

json hf_generation_config_from_gguf(const GgufFile& f) {
  json g;
  if (const GgufValue* v = f.find("tokenizer.ggml.bos_token_id")) g["bos_token_id"] = v->as_int();
  json eos = eos_ids(f);
  if (!eos.is_null()) g["eos_token_id"] = eos;
  if (const GgufValue* v = f.find("tokenizer.ggml.padding_token_id")) g["pad_token_id"] = v->as_int();
  return g;
}

ConvertProgress stderr_progress() {
  const bool tty = ::isatty(2) == 1;
  int last_quarter = -1;
  return [tty, last_quarter](size_t done, size_t total, const std::string& name) mutable {
    if (tty) {
      std::fprintf(stderr, "\rconvert: %zu/%zu %-64.64s", done, total, name.c_str());
      if (done == total) std::fputc('\n', stderr);
    } else {
      const int quarter = total ? int(done * 4 / total) : 4;
      if (quarter != last_quarter) std::fprintf(stderr, "convert: %zu/%zu tensors\n", done, total);
      last_quarter = quarter;
    }
    std::fflush(stderr);
  };
}

// ------------------------------------------------------------------------------------------------
// convert
// ------------------------------------------------------------------------------------------------
namespace {

std::string dump_json(const json& j, const std::string& what) {
  try {
    return j.dump(2) + "\n";
  } catch (const nlohmann::json::exception& e) {
    KVD_FAIL(what, ": cannot serialize (", e.what(), "); the GGUF metadata holds invalid UTF-8");
  }
}
std::string dump_json(const ojson& j, const std::string& what) {
  try {
    return j.dump(2) + "\n";
  } catch (const nlohmann::json::exception& e) {
    KVD_FAIL(what, ": cannot serialize (", e.what(), "); the GGUF metadata holds invalid UTF-8");
  }
}

// Files convert writes; an existing output directory holding anything else is not replaced.
bool is_convert_output(const std::string& name) {
  static const std::set<std::string> fixed = {"config.json",           "generation_config.json",
                                              "tokenizer.json",        "tokenizer_config.json",
                                              "model.safetensors",     "model.safetensors.index.json",
                                              "special_tokens_map.json", ".converted"};
  if (fixed.count(name)) return true;
  return name.rfind("model-", 0) == 0 && name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0;
}

void check_replaceable(const fs::path& out) {
  std::error_code ec;
  if (!fs::exists(out, ec)) return;
  KVD_CHECK(fs::is_directory(out, ec), out.string(), ": exists and is not a directory");
  for (const auto& e : fs::directory_iterator(out, ec)) {
    const std::string name = e.path().filename().string();
    KVD_CHECK(is_convert_output(name), out.string(), ": exists and holds '", name,
              "', which convert does not write; choose a new or empty output directory");
  }
  KVD_CHECK(!ec, out.string(), ": cannot list (", ec.message(), ")");
}

}  // namespace

void convert_gguf_to_hf(const std::string& gguf_path, const std::string& out_dir, const ConvertProgress& progress,
                        uint64_t max_shard_bytes) {
  KVD_CHECK(!out_dir.empty(), "convert: empty output directory");
  fs::path out = fs::path(out_dir).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  check_replaceable(out);

  // Everything that can fail on the metadata fails here, before any heavy work.
  const GgufFile f(gguf_path);
  const Hparams h = read_hparams(f);
  const std::vector<Plan> plans = plan_tensors(f, h);
  for (const Plan& pl : plans) {
    const GgmlTypeInfo* info = ggml_type_info(static_cast<uint32_t>(pl.src->type));
    KVD_CHECK(info && info->dequantizable, f.path(), ": tensor '", pl.src->name, "' has type ",
              ggml_type_name(pl.src->type), ", which convert cannot dequantize (supported: F32 F16 BF16 Q4_0 Q4_1 "
              "Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K)");
  }
  const std::string config = dump_json(config_json(f, h), "config.json");
  const std::string tokenizer = dump_json(hf_tokenizer_from_gguf(f), "tokenizer.json");
  const std::string tokenizer_config = dump_json(hf_tokenizer_config_from_gguf(f), "tokenizer_config.json");
  const std::string generation_config = dump_json(hf_generation_config_from_gguf(f), "generation_config.json");

  // Shards of at most max_shard_bytes of float32 (a tensor larger than that gets a shard of its own).
  std::vector<std::vector<size_t>> shards;
  uint64_t in_shard = 0, total_bytes = 0;
  for (size_t i = 0; i < plans.size(); ++i) {
    const uint64_t bytes = uint64_t(plans[i].src->numel()) * 4;
    if (shards.empty() || (in_shard > 0 && in_shard + bytes > max_shard_bytes)) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += bytes;
    total_bytes += bytes;
  }

  fs::path tmp = out;
  tmp += ".tmp";
  std::error_code ec;
  remove_tree(tmp.string());  // a leftover of an interrupted run
  if (out.has_parent_path()) fs::create_directories(out.parent_path(), ec);
  fs::create_directory(tmp, ec);
  KVD_CHECK(!ec && fs::is_directory(tmp), tmp.string(), ": cannot create (", ec.message(), ")");

  try {
    json weight_map = json::object();
    size_t done = 0;
    for (size_t s = 0; s < shards.size(); ++s) {
      char name[64];
      if (shards.size() == 1)
        std::snprintf(name, sizeof name, "model.safetensors");
      else
        std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      std::vector<std::vector<float>> bufs;
      std::vector<TensorRef> refs;
      bufs.reserve(shards[s].size());
      for (size_t i : shards[s]) {
        const Plan& pl = plans[i];
        std::vector<float> w = f.dequantize(*pl.src);
        if (pl.unpermute_heads > 0) {
          std::vector<float> u(w.size());
          const int64_t rows = pl.shape[0], cols = rows ? int64_t(w.size()) / rows : 0;
          unpermute_qk_rows(w.data(), u.data(), rows, cols, pl.unpermute_heads);
          w.swap(u);
        }
        bufs.push_back(std::move(w));
        refs.push_back(TensorRef{pl.hf_name, DType::F32, pl.shape, bufs.back().data()});
        weight_map[pl.hf_name] = name;
        if (progress) progress(++done, plans.size(), pl.hf_name);
      }
      write_safetensors((tmp / name).string(), refs, {{"format", "pt"}});
    }
    if (shards.size() > 1) {
      json index{{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
      write_file_atomic((tmp / "model.safetensors.index.json").string(), index.dump(2) + "\n");
    }
    write_file_atomic((tmp / "config.json").string(), config);
    write_file_atomic((tmp / "tokenizer.json").string(), tokenizer);
    write_file_atomic((tmp / "tokenizer_config.json").string(), tokenizer_config);
    write_file_atomic((tmp / "generation_config.json").string(), generation_config);

    // Swap into place: the old directory (only ever one convert wrote) moves aside first.
    if (fs::exists(out)) {
      check_replaceable(out);
      fs::path old = out;
      old += ".old";
      remove_tree(old.string());
      fs::rename(out, old, ec);
      KVD_CHECK(!ec, out.string(), ": cannot move the previous conversion aside (", ec.message(), ")");
      fs::rename(tmp, out, ec);
      if (ec) {
        std::error_code ec2;
        fs::rename(old, out, ec2);
        KVD_FAIL(out.string(), ": cannot rename ", tmp.string(), " into place (", ec.message(), ")");
      }
      remove_tree(old.string());
    } else {
      fs::rename(tmp, out, ec);
      KVD_CHECK(!ec, out.string(), ": cannot rename ", tmp.string(), " into place (", ec.message(), ")");
    }
  } catch (...) {
    remove_tree(tmp.string());
    throw;
  }
}

}  // namespace kvd
