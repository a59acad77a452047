#include "train/config.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "common/error.h"
#include "common/fs.h"

namespace kvd {

const char* value_type_name(ValueType t) {
  switch (t) {
    case ValueType::Int: return "an integer";
    case ValueType::Float: return "a number";
    case ValueType::String: return "a string";
    case ValueType::Bool: return "true or false";
  }
  return "?";
}

// The defaults table: the one place that says which keys exist, their types, defaults and meaning.
const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> keys = {
      {"model.dir", ValueType::String, "", "Hugging Face model directory of the frozen model (required)"},
      {"model.dtype", ValueType::String, "auto", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16"},
      {"data.train", ValueType::String, "",
       "packed_text .h5 (`kvdistill prepare text`) or responses .h5 (`kvdistill prepare responses`) (required)"},
      {"data.val", ValueType::String, "", "packed_text or responses .h5 for eval; empty: the val split of data.train"},
      {"data.prefetch", ValueType::Int, "2", "batches read ahead on a background thread"},
      {"data.seq_len", ValueType::Int, "2048",
       "responses files only: samples (prompt + response) are packed into sequences of this many tokens"},
      {"data.val_fraction", ValueType::Float, "0.05",
       "responses files only: fraction of samples held out as val (by a hash of the prompt and train.seed)"},
      {"component.kind", ValueType::String, "retention_gate", "learned part: retention_gate"},
      {"component.budget", ValueType::Int, "128", "M: KV entries kept per head (capacity loss, held-out check)"},
      {"component.hidden", ValueType::Int, "512", "retention gate MLP width"},
      {"component.bias_init", ValueType::Float, "18.0", "retention gate output bias at init (beta ~ 1)"},
      {"loss.kl", ValueType::Float, "1.0", "weight of the forward KL(teacher || student)"},
      {"loss.ce", ValueType::Float, "0.0", "weight of the student's next-token cross-entropy"},
      {"loss.capacity", ValueType::Float, "1.0", "weight of the component's capacity regularizer"},
      {"loss.block", ValueType::Int, "256", "sequence rows per block when computing logits for KL / CE"},
      {"train.steps", ValueType::Int, "100", "optimizer steps"},
      {"train.batch_size", ValueType::Int, "1", "sequences per rank per micro-step"},
      {"train.grad_accum", ValueType::Int, "1", "micro-steps per optimizer step (global batch = batch_size x grad_accum x world)"},
      {"train.lr", ValueType::Float, "0.001", "peak learning rate (AdamW)"},
      {"train.min_lr", ValueType::Float, "0.0001", "learning rate at the end of the cosine decay"},
      {"train.warmup", ValueType::Int, "10", "linear warm-up steps"},
      {"train.weight_decay", ValueType::Float, "0.0", "AdamW decoupled weight decay"},
      {"train.beta1", ValueType::Float, "0.9", "AdamW beta1"},
      {"train.beta2", ValueType::Float, "0.95", "AdamW beta2"},
      {"train.eps", ValueType::Float, "1e-8", "AdamW epsilon"},
      {"train.clip", ValueType::Float, "1.0", "max global grad norm (0: no clipping)"},
      {"train.seed", ValueType::Int, "0", "seed of parameter init and data order"},
      {"train.out_dir", ValueType::String, "runs/default", "checkpoints/ and metrics.jsonl go here"},
      {"train.device", ValueType::String, "auto", "auto (cuda:LOCAL_RANK if CUDA is present) | cpu | cuda | cuda:N"},
      {"train.log_every", ValueType::Int, "1", "steps between progress lines"},
      {"train.eval_every", ValueType::Int, "0", "steps between held-out checks (0: never)"},
      {"train.eval_batches", ValueType::Int, "2", "val batches per held-out check"},
      {"train.save_every", ValueType::Int, "50", "steps between checkpoints (0: only at the end)"},
      {"train.keep_last", ValueType::Int, "3", "checkpoints kept (older ones are removed)"},
      {"train.progress", ValueType::String, "auto", "auto (live line on a terminal) | lines | never"},
      {"train.activation_checkpointing", ValueType::String, "none",
       "none | layers (keep only each frozen decoder layer's input and recompute the layer in the backward: "
       "less memory, about one more forward; same gradients)"},
      {"dist.backend", ValueType::String, "auto", "auto (nccl on CUDA, gloo on CPU) | gloo | nccl"},
      {"dist.timeout_s", ValueType::Float, "300", "timeout of rendezvous and collectives, seconds"},
      {"dist.bucket_mb", ValueType::Float, "25", "gradient all-reduce bucket size, MiB"},
  };
  return keys;
}

namespace {

using json = nlohmann::ordered_json;

const ConfigKey* find_key(const std::string& k) {
  for (const ConfigKey& c : config_keys())
    if (k == c.key) return &c;
  return nullptr;
}

[[noreturn]] void unknown_key(const std::string& key, const std::string& where) {
  std::string section = key.substr(0, key.find('.'));
  std::string known;
  for (const ConfigKey& c : config_keys())
    if (std::string(c.key).rfind(section + ".", 0) == 0) known += (known.empty() ? "" : ", ") + std::string(c.key);
  if (known.empty())
    for (const ConfigKey& c : config_keys()) known += (known.empty() ? "" : ", ") + std::string(c.key);
  KVD_FAIL("config key '", key, "' (", where, ") is unknown; known keys: ", known,
           " (run `kvdistill train --list-keys` for their meaning)");
}

// Parses a scalar's text as the key's type.
json parse_value(const ConfigKey& k, const std::string& text, const std::string& where) {
  auto bad = [&]() -> json {
    KVD_FAIL("config key '", k.key, "' (", where, ") must be ", value_type_name(k.type), ", got '", text, "'");
  };
  switch (k.type) {
    case ValueType::String: return text;
    case ValueType::Bool:
      if (text == "true") return true;
      if (text == "false") return false;
      return bad();
    case ValueType::Int: {
      errno = 0;
      char* end = nullptr;
      long long v = std::strtoll(text.c_str(), &end, 10);
      if (text.empty() || *end != '\0' || errno) return bad();
      return static_cast<int64_t>(v);
    }
    case ValueType::Float: {
      errno = 0;
      char* end = nullptr;
      double v = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || errno || !std::isfinite(v)) return bad();
      return v;
    }
  }
  return bad();
}

void flatten(const YAML::Node& node, const std::string& prefix, const std::string& source, json& values) {
  for (const auto& kv : node) {
    const std::string name = kv.first.as<std::string>();
    const std::string key = prefix.empty() ? name : prefix + "." + name;
    const YAML::Node& v = kv.second;
    if (v.IsMap()) {
      flatten(v, key, source, values);
      continue;
    }
    const ConfigKey* k = find_key(key);
    if (!k) unknown_key(key, source);
    if (v.IsNull()) {
      if (k->type != ValueType::String) KVD_FAIL("config key '", key, "' (", source, ") has no value; it must be ", value_type_name(k->type));
      values[key] = "";
    } else if (!v.IsScalar()) {
      KVD_FAIL("config key '", key, "' (", source, ") must be ", value_type_name(k->type), ", got a list");
    } else {
      values[key] = parse_value(*k, v.Scalar(), source);
    }
  }
}

void check(bool ok, const char* key, const std::string& msg) {
  KVD_CHECK(ok, "config key '", key, "': ", msg);
}

void one_of(const std::string& v, const char* key, const std::vector<std::string>& allowed) {
  for (const auto& a : allowed)
    if (v == a) return;
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : " | ") + a;
  KVD_FAIL("config key '", key, "': '", v, "' is not one of ", list);
}

RunConfig from_values(const json& values) {
  RunConfig c;
  c.values = values;
  auto S = [&](const char* k) { return values.at(k).get<std::string>(); };
  auto I = [&](const char* k) { return values.at(k).get<int64_t>(); };
  auto F = [&](const char* k) { return values.at(k).get<double>(); };
  c.model_dir = S("model.dir");
  c.model_dtype = S("model.dtype");
  c.data_train = S("data.train");
  c.data_val = S("data.val");
  c.data_prefetch = I("data.prefetch");
  c.data_seq_len = I("data.seq_len");
  c.data_val_fraction = F("data.val_fraction");
  c.component_kind = S("component.kind");
  c.budget = I("component.budget");
  c.gate_hidden = I("component.hidden");
  c.gate_bias_init = F("component.bias_init");
  c.w_kl = F("loss.kl");
  c.w_ce = F("loss.ce");
  c.w_capacity = F("loss.capacity");
  c.loss_block = I("loss.block");
  c.steps = I("train.steps");
  c.batch_size = I("train.batch_size");
  c.grad_accum = I("train.grad_accum");
  c.lr = F("train.lr");
  c.min_lr = F("train.min_lr");
  c.warmup = I("train.warmup");
  c.weight_decay = F("train.weight_decay");
  c.beta1 = F("train.beta1");
  c.beta2 = F("train.beta2");
  c.adam_eps = F("train.eps");
  c.clip = F("train.clip");
  c.seed = I("train.seed");
  c.out_dir = S("train.out_dir");
  c.device = S("train.device");
  c.log_every = I("train.log_every");
  c.eval_every = I("train.eval_every");
  c.eval_batches = I("train.eval_batches");
  c.save_every = I("train.save_every");
  c.keep_last = I("train.keep_last");
  c.progress = S("train.progress");
  const std::string ckpt = S("train.activation_checkpointing");
  c.dist_backend = S("dist.backend");
  c.dist_timeout_s = F("dist.timeout_s");
  c.bucket_mb = F("dist.bucket_mb");

  // Impossible values, each naming its key. (component.budget vs the sequence length is checked by the
  // trainer once the dataset is open.)
  check(!c.model_dir.empty(), "model.dir", "is required (a Hugging Face model directory)");
  check(!c.data_train.empty(), "data.train",
        "is required (make one with `kvdistill prepare text` or `kvdistill prepare responses`)");
  one_of(c.model_dtype, "model.dtype", {"auto", "float32", "bfloat16"});
  one_of(c.component_kind, "component.kind", {"retention_gate"});
  check(c.budget > 0, "component.budget", "M must be > 0, got " + std::to_string(c.budget));
  check(c.gate_hidden > 0, "component.hidden", "must be > 0");
  check(c.w_kl >= 0 && c.w_ce >= 0 && c.w_capacity >= 0, c.w_kl < 0 ? "loss.kl" : c.w_ce < 0 ? "loss.ce" : "loss.capacity",
        "loss weights must be >= 0");
  check(c.loss_block > 0, "loss.block", "must be > 0");
  check(c.steps > 0, "train.steps", "must be > 0");
  check(c.batch_size > 0, "train.batch_size", "must be > 0");
  check(c.grad_accum > 0, "train.grad_accum", "must be > 0");
  check(c.lr >= 0, "train.lr", "must be >= 0, got " + values.at("train.lr").dump());
  check(c.min_lr >= 0 && c.min_lr <= c.lr, "train.min_lr", "must be in [0, train.lr]");
  check(c.warmup >= 0, "train.warmup", "must be >= 0");
  check(c.weight_decay >= 0, "train.weight_decay", "must be >= 0");
  check(c.beta1 >= 0 && c.beta1 < 1, "train.beta1", "must be in [0, 1)");
  check(c.beta2 >= 0 && c.beta2 < 1, "train.beta2", "must be in [0, 1)");
  check(c.adam_eps > 0, "train.eps", "must be > 0");
  check(c.clip >= 0, "train.clip", "must be >= 0 (0 turns clipping off)");
  check(c.seed >= 0, "train.seed", "must be >= 0");
  check(!c.out_dir.empty(), "train.out_dir", "must not be empty");
  check(c.log_every > 0, "train.log_every", "must be > 0");
  check(c.eval_every >= 0, "train.eval_every", "must be >= 0");
  check(c.eval_batches > 0, "train.eval_batches", "must be > 0");
  check(c.save_every >= 0, "train.save_every", "must be >= 0");
  check(c.keep_last > 0, "train.keep_last", "must be > 0");
  check(c.data_prefetch >= 0, "data.prefetch", "must be >= 0");
  check(c.data_seq_len >= 2, "data.seq_len", "must be >= 2");
  check(c.data_val_fraction >= 0 && c.data_val_fraction < 1, "data.val_fraction", "must be in [0, 1)");
  one_of(c.progress, "train.progress", {"auto", "lines", "never"});
  one_of(ckpt, "train.activation_checkpointing", {"none", "layers"});
  c.activation_checkpointing = ckpt == "layers" ? ActivationCheckpointing::Layers : ActivationCheckpointing::None;
  one_of(c.dist_backend, "dist.backend", {"auto", "gloo", "nccl"});
  check(c.dist_timeout_s > 0, "dist.timeout_s", "must be > 0");
  check(c.bucket_mb > 0, "dist.bucket_mb", "must be > 0");
  return c;
}

json defaults() {
  json v = json::object();
  for (const ConfigKey& k : config_keys()) v[k.key] = parse_value(k, k.value, "default");
  return v;
}

}  // namespace

std::string RunConfig::to_text() const {
  std::ostringstream os;
  for (const auto& [k, v] : values.items()) os << k << ": " << (v.is_string() ? v.get<std::string>() : v.dump()) << "\n";
  return os.str();
}

RunConfig resolve_config(const std::string& yaml_text, const std::string& source,
                         const std::vector<std::string>& overrides) {
  json values = defaults();
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    KVD_FAIL(source, ": not valid YAML: ", e.what());
  }
  if (root.IsDefined() && !root.IsNull()) {
    KVD_CHECK(root.IsMap(), source, ": a run config must be a mapping of sections (model, data, component, loss, train, dist)");
    try {
      flatten(root, "", source, values);
    } catch (const YAML::Exception& e) {
      KVD_FAIL(source, ": ", e.what());
    }
  }
  for (const std::string& o : overrides) {
    const size_t eq = o.find('=');
    KVD_CHECK(eq != std::string::npos && eq > 0, "override '", o, "' must look like key=value (e.g. train.steps=100)");
    const std::string key = o.substr(0, eq);
    const ConfigKey* k = find_key(key);
    if (!k) unknown_key(key, "override '" + o + "'");
    values[key] = parse_value(*k, o.substr(eq + 1), "override '" + o + "'");
  }
  return from_values(values);
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  return resolve_config(read_file(path), path, overrides);
}

RunConfig config_from_values(const nlohmann::ordered_json& stored, const std::string& source) {
  json values = defaults();
  for (const auto& [k, v] : stored.items()) {
    const ConfigKey* key = find_key(k);
    if (!key) unknown_key(k, source);
    values[k] = v;
  }
  return from_values(values);
}

}  // namespace kvd
