// Strict parsing of a Hugging Face config.json into ModelConfig.
// Fields honoured: docs/ecosystem.md, "HF model config fields". Defaults for absent optional fields
// are the ones transformers 5.2 uses for the same family, so a config loads here as it loads there; a value
// we cannot honour is an error naming the field, never ignored.
#include "models/config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_error.h"
#include "common/fs.h"

namespace kvd {

using nlohmann::json;

namespace {

struct FamilyInfo {
  Family family;
  const char* architecture;
  const char* model_type;
};
constexpr FamilyInfo kFamilies[] = {
    {Family::Llama, "LlamaForCausalLM", "llama"},
    {Family::Mistral, "MistralForCausalLM", "mistral"},
    {Family::Qwen2, "Qwen2ForCausalLM", "qwen2"},
    {Family::Qwen3, "Qwen3ForCausalLM", "qwen3"},
};

const FamilyInfo& family_info(Family f) { return kFamilies[static_cast<size_t>(f)]; }


std::string describe(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return std::string(v.type_name()) + " " + s;
}

// Typed access to one JSON object, with errors "<context>: field '<prefix><key>': <problem>".
// An absent key and an explicit null both count as "not given" for optional fields, as in transformers.
class Fields {
 public:
  Fields(const json& obj, const std::string& context, std::string prefix = "")
      : obj_(obj), context_(context), prefix_(std::move(prefix)) {}

  // The value, or nullptr when absent or null.
  const json* get(const char* key) const {
    auto it = obj_.find(key);
    return (it == obj_.end() || it->is_null()) ? nullptr : &*it;
  }
  [[noreturn]] void fail(const char* key, const std::string& problem) const {
    KVD_FAIL(context_, ": field '", prefix_, key, "': ", problem);
  }
  const json& required(const char* key) const {
    const json* v = get(key);
    if (!v) fail(key, obj_.contains(key) ? "must not be null" : "missing");
    return *v;
  }

  int64_t as_int(const char* key, const json& v) const {
    if (!v.is_number_integer()) fail(key, "expected an integer, got " + describe(v));
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) fail(key, "integer out of range");
    return v.get<int64_t>();
  }
  double as_number(const char* key, const json& v) const {
    if (!v.is_number()) fail(key, "expected a number, got " + describe(v));
    return v.get<double>();
  }

  int64_t req_positive_int(const char* key) const {
    const int64_t x = as_int(key, required(key));
    if (x <= 0) fail(key, "must be positive, got " + std::to_string(x));
    return x;
  }
  std::optional<int64_t> opt_int(const char* key) const {
    const json* v = get(key);
    return v ? std::optional<int64_t>(as_int(key, *v)) : std::nullopt;
  }
  std::optional<int64_t> opt_positive_int(const char* key) const {
    auto x = opt_int(key);
    if (x && *x <= 0) fail(key, "must be positive, got " + std::to_string(*x));
    return x;
  }
  double req_number(const char* key) const { return as_number(key, required(key)); }
  double positive_number(const char* key, double dflt) const {
    const json* v = get(key);
    const double x = v ? as_number(key, *v) : dflt;
    if (!(x > 0) || !std::isfinite(x)) fail(key, "must be a positive number");
    return x;
  }
  bool opt_bool(const char* key, bool dflt) const {
    const json* v = get(key);
    if (!v) return dflt;
    if (!v->is_boolean()) fail(key, "expected true or false, got " + describe(*v));
    return v->get<bool>();
  }
  std::optional<std::string> opt_string(const char* key) const {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) fail(key, "expected a string, got " + describe(*v));
    return v->get<std::string>();
  }

 private:
  const json& obj_;
  const std::string& context_;
  std::string prefix_;
};

std::string supported_architectures() {
  std::string s;
  for (const FamilyInfo& f : kFamilies) s += (s.empty() ? "" : ", ") + std::string(f.architecture);
  return s;
}

// Family from architectures[0], else from model_type; the two must agree when both are given.
void resolve_family(const Fields& f, ModelConfig& c) {
  const FamilyInfo* by_arch = nullptr;
  if (const json* archs = f.get("architectures")) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      f.fail("architectures", "expected a non-empty list of strings, got " + describe(*archs));
    }
    const std::string arch = (*archs)[0].get<std::string>();
    for (const FamilyInfo& info : kFamilies) {
      if (arch == info.architecture) by_arch = &info;
    }
    if (!by_arch) f.fail("architectures", "unsupported architecture '" + arch + "' (supported: " +
                                              supported_architectures() + ")");
  }
  const std::optional<std::string> model_type = f.opt_string("model_type");
  const FamilyInfo* by_type = nullptr;
  if (model_type) {
    for (const FamilyInfo& info : kFamilies) {
      if (*model_type == info.model_type) by_type = &info;
    }
    if (!by_type && !by_arch) {
      f.fail("model_type", "unsupported model type '" + *model_type + "' (supported: llama, mistral, qwen2, qwen3)");
    }
    if (by_arch && by_type != by_arch) {
      f.fail("model_type", "'" + *model_type + "' does not match architectures[0] '" + by_arch->architecture + "'");
    }
  }
  const FamilyInfo* info = by_arch ? by_arch : by_type;
  if (!info) f.fail("architectures", "missing (and no 'model_type' either); cannot tell the model family");
  c.family = info->family;
  c.architecture = info->architecture;
  c.model_type = info->model_type;
}

// RoPE: transformers 5 writes `rope_parameters` {"rope_type", "rope_theta", ...}; older configs write a
// top-level `rope_theta` plus `rope_scaling` {"rope_type" or "type", ...}. As in transformers, a non-empty
// rope_scaling wins over rope_parameters, and a rope_theta inside the dict wins over the top-level one.
void resolve_rope(const Fields& f, ModelConfig& c, const std::string& context) {
  const json* params = nullptr;
  const char* name = nullptr;
  if (const json* rs = f.get("rope_scaling"); rs && !(rs->is_object() && rs->empty())) {
    params = rs;
    name = "rope_scaling";
  } else if (const json* rp = f.get("rope_parameters")) {
    params = rp;
    name = "rope_parameters";
  }
  std::optional<double> theta;
  if (const json* t = f.get("rope_theta")) theta = f.as_number("rope_theta", *t);
  if (const json* prf = f.get("partial_rotary_factor"); prf && f.as_number("partial_rotary_factor", *prf) != 1.0) {
    f.fail("partial_rotary_factor", "partial rotary embeddings are not supported");
  }

  if (params) {
    if (!params->is_object()) f.fail(name, "expected an object, got " + describe(*params));
    for (const auto& [k, v] : params->items()) {
      if (v.is_object()) f.fail(name, "per-layer-type RoPE parameters ('" + k + "': {...}) are not supported");
    }
    const Fields p(*params, context, std::string(name) + ".");
    std::string type = "default";
    if (auto t = p.opt_string("rope_type")) {
      type = *t;
    } else if (auto t2 = p.opt_string("type")) {
      type = *t2;
    }
    if (const json* t = p.get("rope_theta")) theta = p.as_number("rope_theta", *t);
    if (const json* prf = p.get("partial_rotary_factor"); prf && p.as_number("partial_rotary_factor", *prf) != 1.0) {
      p.fail("partial_rotary_factor", "partial rotary embeddings are not supported");
    }

    if (type == "default") {
      c.rope_scaling = RopeScaling::None;
    } else if (type == "linear") {
      c.rope_scaling = RopeScaling::Linear;
      c.rope_factor = p.req_number("factor");
      if (!(c.rope_factor > 0)) p.fail("factor", "must be positive");
    } else if (type == "llama3") {
      c.rope_scaling = RopeScaling::Llama3;
      c.rope_factor = p.req_number("factor");
      c.rope_low_freq_factor = p.req_number("low_freq_factor");
      c.rope_high_freq_factor = p.req_number("high_freq_factor");
      if (!(c.rope_factor > 0)) p.fail("factor", "must be positive");
      if (!(c.rope_low_freq_factor > 0)) p.fail("low_freq_factor", "must be positive");
      if (!(c.rope_high_freq_factor > c.rope_low_freq_factor)) {
        p.fail("high_freq_factor", "must be greater than low_freq_factor");
      }
      // transformers: a top-level original_max_position_embeddings has priority, else the dict's, else
      // max_position_embeddings.
      std::optional<int64_t> orig = f.opt_positive_int("original_max_position_embeddings");
      if (!orig) orig = p.opt_positive_int("original_max_position_embeddings");
      c.rope_original_max_position = orig ? *orig : c.max_position_embeddings;
    } else {
      p.fail(params->contains("rope_type") ? "rope_type" : "type",
             "'" + type + "' is not supported (supported: default, linear, llama3)");
    }
  }
  c.rope_theta = theta ? *theta : 10000.0;
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    KVD_FAIL(context, ": field 'rope_theta': must be a positive number");
  }
}

// Sliding-window attention. Mistral: `sliding_window` on every layer (null: none). Qwen2 / Qwen3: only
// when `use_sliding_window`, and then per layer (`layer_types`, or layers >= max_window_layers); one
// window for all layers or none is representable, a mix is not.
void resolve_sliding_window(const json& j, const Fields& f, ModelConfig& c) {
  if (c.family == Family::Llama) return;  // Llama has no sliding window in transformers
  if (c.family == Family::Mistral) {
    c.sliding_window = j.contains("sliding_window") ? f.opt_positive_int("sliding_window") : 4096;
    return;
  }
  if (!f.opt_bool("use_sliding_window", false)) return;
  const std::optional<int64_t> window =
      j.contains("sliding_window") ? f.opt_positive_int("sliding_window") : std::optional<int64_t>(4096);
  if (!window) return;
  int64_t sliding = 0;
  if (const json* types = f.get("layer_types")) {
    if (!types->is_array() || static_cast<int64_t>(types->size()) != c.num_layers) {
      f.fail("layer_types", "expected a list of " + std::to_string(c.num_layers) + " layer types");
    }
    for (const json& t : *types) {
      if (t == "sliding_attention") {
        ++sliding;
      } else if (t != "full_attention") {
        f.fail("layer_types", "unsupported layer type " + describe(t));
      }
    }
  } else {
    const int64_t max_window_layers = f.opt_int("max_window_layers").value_or(28);
    sliding = std::max<int64_t>(0, c.num_layers - std::max<int64_t>(0, max_window_layers));
  }
  if (sliding == c.num_layers) {
    c.sliding_window = window;
  } else if (sliding != 0) {
    f.fail(f.get("layer_types") ? "layer_types" : "max_window_layers",
           std::to_string(sliding) + " of " + std::to_string(c.num_layers) +
               " layers use sliding-window attention; mixing sliding and full layers is not supported");
  }
}

// bos / eos: null means none; an absent key takes the transformers class default (Llama and Mistral:
// bos 1, eos 2; Qwen: none).
void resolve_tokens(const json& j, const Fields& f, ModelConfig& c) {
  const bool llama_like = c.family == Family::Llama || c.family == Family::Mistral;
  c.bos_token_id = f.opt_int("bos_token_id");
  if (!j.contains("bos_token_id") && llama_like) c.bos_token_id = 1;
  if (!j.contains("eos_token_id") && llama_like) c.eos_token_ids = {2};
  if (const json* eos = f.get("eos_token_id")) {
    if (eos->is_array()) {
      for (const json& e : *eos) {
        if (!e.is_number_integer()) {
          f.fail("eos_token_id", "expected an integer or a list of integers, got " + describe(*eos));
        }
        c.eos_token_ids.push_back(f.as_int("eos_token_id", e));
      }
    } else {
      c.eos_token_ids.push_back(f.as_int("eos_token_id", *eos));
    }
  }
}

const char* rope_scaling_name(RopeScaling r) {
  switch (r) {
    case RopeScaling::None: return "none";
    case RopeScaling::Linear: return "linear";
    case RopeScaling::Llama3: return "llama3";
  }
  return "?";
}

}  // namespace

const char* family_name(Family f) { return family_info(f).model_type; }

ModelConfig parse_config(const json& j, const std::string& context) {
  KVD_CHECK(j.is_object(), context, ": expected a JSON object, got ", describe(j));
  const Fields f(j, context);
  ModelConfig c;
  resolve_family(f, c);

  if (const json* q = f.get("quantization_config")) {
    (void)q;
    f.fail("quantization_config", "quantized checkpoints are not supported; use the unquantized weights");
  }

  c.hidden_size = f.req_positive_int("hidden_size");
  c.intermediate_size = f.req_positive_int("intermediate_size");
  c.num_layers = f.req_positive_int("num_hidden_layers");
  c.num_heads = f.req_positive_int("num_attention_heads");
  // num_key_value_heads: null means MHA; an absent key takes the transformers class default.
  if (j.contains("num_key_value_heads")) {
    c.num_kv_heads = f.opt_positive_int("num_key_value_heads").value_or(c.num_heads);
  } else {
    c.num_kv_heads = c.family == Family::Llama ? c.num_heads : c.family == Family::Mistral ? 8 : 32;
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    f.fail("num_key_value_heads", std::to_string(c.num_kv_heads) + " does not divide num_attention_heads " +
                                      std::to_string(c.num_heads) +
                                      (j.contains("num_key_value_heads") ? "" : " (the default when absent)"));
  }
  c.vocab_size = f.req_positive_int("vocab_size");
  c.max_position_embeddings = f.req_positive_int("max_position_embeddings");

  // head_dim: given, else hidden_size / num_heads; Qwen3's transformers default is 128 when the key is absent.
  if (auto hd = f.opt_positive_int("head_dim")) {
    c.head_dim = *hd;
  } else if (c.family == Family::Qwen3 && !j.contains("head_dim")) {
    c.head_dim = 128;
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      f.fail("head_dim", "not given, and hidden_size " + std::to_string(c.hidden_size) +
                             " is not a multiple of num_attention_heads " + std::to_string(c.num_heads));
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) f.fail("head_dim", "must be even for rotary embeddings, got " + std::to_string(c.head_dim));

  c.rms_norm_eps = f.positive_number("rms_norm_eps", 1e-6);

  const std::string act = f.opt_string("hidden_act").value_or("silu");
  if (act != "silu" && act != "swish") {  // transformers maps both names to the same SiLU
    f.fail("hidden_act", "'" + act + "' is not supported (only silu)");
  }
  c.activation = Activation::SiLU;

  c.tie_word_embeddings = f.opt_bool("tie_word_embeddings", false);

  // Biases, as the transformers modules build them: Llama and Qwen3 put attention_bias on q/k/v/o;
  // Qwen2 always has q/k/v biases and no o bias; Mistral has none (its modules ignore attention_bias).
  switch (c.family) {
    case Family::Llama:
    case Family::Qwen3:
      c.attention_bias = c.o_proj_bias = f.opt_bool("attention_bias", false);
      break;
    case Family::Qwen2:
      c.attention_bias = true;
      break;
    case Family::Mistral:
      break;
  }
  if (c.family == Family::Llama && f.opt_bool("mlp_bias", false)) {
    f.fail("mlp_bias", "true is not supported (MLP biases)");
  }
  c.qk_norm = c.family == Family::Qwen3;

  resolve_rope(f, c, context);
  resolve_sliding_window(j, f, c);
  resolve_tokens(j, f, c);
  return c;
}

ModelConfig load_config(const std::string& path_or_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  KVD_CHECK(fs::exists(path_or_dir, ec), path_or_dir, ": no such file or directory");
  const std::string path =
      fs::is_directory(path_or_dir, ec) ? (fs::path(path_or_dir) / "config.json").string() : path_or_dir;
  const json j = parse_json(read_file(path), path, "not valid JSON");
  return with_json_context(path, "invalid config", [&] { return parse_config(j, path); });
}

json ModelConfig::to_json() const {
  json j;
  j["family"] = family_name(family);
  j["architecture"] = architecture;
  j["model_type"] = model_type;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_layers"] = num_layers;
  j["num_heads"] = num_heads;
  j["num_kv_heads"] = num_kv_heads;
  j["group_size"] = group_size();
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["rope_scaling"] = rope_scaling_name(rope_scaling);
  j["rope_factor"] = rope_factor;                        // linear and llama3
  j["rope_low_freq_factor"] = rope_low_freq_factor;      // llama3
  j["rope_high_freq_factor"] = rope_high_freq_factor;    // llama3
  j["rope_original_max_position"] = rope_original_max_position;  // llama3
  j["activation"] = "silu";
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["attention_bias"] = attention_bias;
  j["o_proj_bias"] = o_proj_bias;
  j["qk_norm"] = qk_norm;
  j["sliding_window"] = sliding_window ? json(*sliding_window) : json(nullptr);
  j["bos_token_id"] = bos_token_id ? json(*bos_token_id) : json(nullptr);
  j["eos_token_ids"] = eos_token_ids;
  return j;
}

}  // namespace kvd
