#include "train/config.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "common/error.h"
#include "common/fs.h"
#include "gates/components.h"
#include "common/json_error.h"

namespace kvd {

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
      {"component.kind", ValueType::String, "retention_gate",
       "learned part (its options follow as component.*; `--list-keys` prints every kind's)"},
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
      {"train.calibration_sequences", ValueType::Int, "32",
       "training sequences, spread over data.train, on which a component fits its data-set quantities after the "
       "last step (the Attention-Gate's flag threshold at its keep target; 0: none)"},
      {"train.eval_budget", ValueType::Int, "0",
       "entries kept per KV head in the held-out check (0: the component's budget, e.g. component.budget)"},
      {"train.save_every", ValueType::Int, "50", "steps between checkpoints (0: only at the end)"},
      {"train.keep_last", ValueType::Int, "3", "checkpoints kept (older ones are removed)"},
      {"train.progress", ValueType::String, "auto", "auto (live line on a terminal) | lines | never"},
      {"train.activation_checkpointing", ValueType::String, "none",
       "none | layers (keep only each frozen decoder layer's input and recompute the layer in the backward: "
       "less memory, about one more forward; same gradients)"},
      {"train.kernels", ValueType::String, "fused",
       "fused (on CUDA: the fused retention-biased attention and capacity kernels of kernels/, where they apply) "
       "| reference (the LibTorch reference paths; what CPU runs use either way)"},
      {"train.float32_matmul", ValueType::String, "tf32",
       "tf32 (on CUDA, the component's float32 matrix products use TF32 tensor cores, as PyTorch's "
       "allow_tf32) | ieee (full float32)"},
      {"train.on_nonfinite", ValueType::String, "stop",
       "when a loss term or the gradient is NaN / Inf: stop (exit 1 naming the step and the term; the last "
       "checkpoint stays the latest) | skip (drop that step's update, count it, go on)"},
      {"dist.backend", ValueType::String, "auto", "auto (nccl on CUDA, gloo on CPU) | gloo | nccl"},
      {"dist.timeout_s", ValueType::Float, "300", "timeout of rendezvous and collectives, seconds"},
      {"dist.bucket_mb", ValueType::Float, "25", "gradient all-reduce bucket size, MiB"},
  };
  return keys;
}

std::vector<ConfigKey> config_keys_for(const std::string& kind) {
  const ComponentSpec& spec = component_spec(kind, "config key 'component.kind'");
  std::vector<ConfigKey> out;
  for (const ConfigKey& k : config_keys()) {
    if (std::string(k.key) == "loss.block") out.insert(out.end(), spec.losses.begin(), spec.losses.end());
    out.push_back(k);
    if (std::string(k.key) == "component.kind") out.insert(out.end(), spec.options.begin(), spec.options.end());
  }
  return out;
}

double RunConfig::loss_weight(const std::string& term) const {
  for (const auto& [name, w] : loss_weights)
    if (name == term) return w;
  KVD_FAIL("component '", component_kind, "' has no loss term '", term, "' (config key 'loss.", term, "')");
}

namespace {

using json = nlohmann::ordered_json;

const ConfigKey* find_key(const std::vector<ConfigKey>& keys, const std::string& k) {
  for (const ConfigKey& c : keys)
    if (k == c.key) return &c;
  return nullptr;
}

[[noreturn]] void unknown_key(const std::vector<ConfigKey>& keys, const std::string& key, const std::string& where) {
  std::string section = key.substr(0, key.find('.'));
  std::string known;
  for (const ConfigKey& c : keys)
    if (std::string(c.key).rfind(section + ".", 0) == 0) known += (known.empty() ? "" : ", ") + std::string(c.key);
  if (known.empty())
    for (const ConfigKey& c : keys) known += (known.empty() ? "" : ", ") + std::string(c.key);
  KVD_FAIL("config key '", key, "' (", where, ") is unknown; known keys: ", known,
           " (run `kvdistill train --list-keys` for their meaning)");
}

// A value as written, before the component kind (and so the full key table) is known.
struct RawValue {
  std::string text;
  bool null = false;  // YAML `key:` with no value
  bool list = false;  // a YAML sequence
  std::string where;  // the file or the override it came from
};
using RawValues = std::vector<std::pair<std::string, RawValue>>;  // in the order given (later ones win)

// True if some general key lives under section `prefix` ("train" -> train.steps, ...). A component's own
// keys live in the component and loss sections, which always have general keys too.
bool is_section(const std::string& prefix) {
  for (const ConfigKey& c : config_keys())
    if (std::string(c.key).rfind(prefix + ".", 0) == 0) return true;
  return false;
}

void flatten(const YAML::Node& node, const std::string& prefix, const std::string& source, RawValues& raw) {
  for (const auto& kv : node) {
    const std::string name = kv.first.as<std::string>();
    const std::string key = prefix.empty() ? name : prefix + "." + name;
    const YAML::Node& v = kv.second;
    if (v.IsMap()) {
      // Recurse only into sections that exist: the depth is that of the key table, whatever the file's.
      if (!prefix.empty() || !is_section(key)) unknown_key(config_keys(), key, source);
      flatten(v, key, source, raw);
      continue;
    }
    RawValue r;
    r.where = source;
    r.null = v.IsNull();
    r.list = !r.null && !v.IsScalar();
    if (!r.null && !r.list) r.text = v.Scalar();
    raw.emplace_back(key, r);
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
  const ComponentSpec& spec = component_spec(S("component.kind"), "config key 'component.kind'");
  c.component_kind = spec.kind;  // an alias (attngate) names its kind
  json options = json::object();
  for (const ConfigKey& k : spec.options) options[std::string(k.key).substr(10)] = values.at(k.key);
  c.component = complete_options(spec, nlohmann::json::parse(options.dump()), "run config");
  for (const ConfigKey& k : spec.losses) {
    const double w = F(k.key);
    check(w >= 0, k.key, "loss weights must be >= 0");
    c.loss_weights.emplace_back(std::string(k.key).substr(5), w);
  }
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
  c.calibration_sequences = I("train.calibration_sequences");
  c.eval_budget = I("train.eval_budget");
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
  check(c.calibration_sequences >= 0, "train.calibration_sequences", "must be >= 0");
  check(c.eval_budget >= 0, "train.eval_budget", "must be >= 0");
  check(c.save_every >= 0, "train.save_every", "must be >= 0");
  check(c.keep_last > 0, "train.keep_last", "must be > 0");
  check(c.data_prefetch >= 0, "data.prefetch", "must be >= 0");
  check(c.data_seq_len >= 2, "data.seq_len", "must be >= 2");
  check(c.data_val_fraction >= 0 && c.data_val_fraction < 1, "data.val_fraction", "must be in [0, 1)");
  one_of(c.progress, "train.progress", {"auto", "lines", "never"});
  one_of(ckpt, "train.activation_checkpointing", {"none", "layers"});
  const std::string nonfinite = S("train.on_nonfinite");
  one_of(nonfinite, "train.on_nonfinite", {"stop", "skip"});
  c.on_nonfinite = nonfinite == "skip" ? NonFinite::Skip : NonFinite::Stop;
  c.activation_checkpointing = ckpt == "layers" ? ActivationCheckpointing::Layers : ActivationCheckpointing::None;
  const std::string kernels = S("train.kernels");
  one_of(kernels, "train.kernels", {"fused", "reference"});
  c.kernels = kernels == "reference" ? KernelPath::Reference : KernelPath::Fused;
  const std::string f32 = S("train.float32_matmul");
  one_of(f32, "train.float32_matmul", {"tf32", "ieee"});
  c.float32_matmul = f32 == "ieee" ? Float32Matmul::Ieee : Float32Matmul::Tf32;
  one_of(c.dist_backend, "dist.backend", {"auto", "gloo", "nccl"});
  check(c.dist_timeout_s > 0, "dist.timeout_s", "must be > 0");
  check(c.bucket_mb > 0, "dist.bucket_mb", "must be > 0");
  return c;
}

// Typed values for every key of `kind`: defaults, then `raw` in order (each checked against its key).
json resolve_values(const std::string& kind, const RawValues& raw) {
  const std::vector<ConfigKey> keys = config_keys_for(kind);
  json values = json::object();
  for (const ConfigKey& k : keys) values[k.key] = parse_option(k, k.value, "default");
  for (const auto& [key, r] : raw) {
    const ConfigKey* k = find_key(keys, key);
    if (!k) unknown_key(keys, key, r.where);
    if (r.list) KVD_FAIL("config key '", key, "' (", r.where, ") must be ", value_type_name(k->type), ", got a list");
    if (r.null) {
      if (k->type != ValueType::String)
        KVD_FAIL("config key '", key, "' (", r.where, ") has no value; it must be ", value_type_name(k->type));
      values[key] = "";
      continue;
    }
    values[key] = parse_option(*k, r.text, r.where);
  }
  return values;
}

// component.kind as given last in `raw`, else its default.
std::string kind_of(const RawValues& raw) {
  std::string kind = find_key(config_keys(), "component.kind")->value;
  for (const auto& [key, r] : raw)
    if (key == "component.kind" && !r.null && !r.list) kind = r.text;
  return kind;
}

}  // namespace

std::string RunConfig::to_text() const {
  std::ostringstream os;
  for (const auto& [k, v] : values.items()) os << k << ": " << (v.is_string() ? v.get<std::string>() : v.dump()) << "\n";
  return os.str();
}

RunConfig resolve_config(const std::string& yaml_text, const std::string& source,
                         const std::vector<std::string>& overrides) {
  RawValues raw;
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    KVD_FAIL(source, ": not valid YAML: ", e.what());
  }
  if (root.IsDefined() && !root.IsNull()) {
    KVD_CHECK(root.IsMap(), source, ": a run config must be a mapping of sections (model, data, component, loss, train, dist)");
    try {
      flatten(root, "", source, raw);
    } catch (const YAML::Exception& e) {
      KVD_FAIL(source, ": ", e.what());
    }
  }
  for (const std::string& o : overrides) {
    const size_t eq = o.find('=');
    KVD_CHECK(eq != std::string::npos && eq > 0, "override '", o, "' must look like key=value (e.g. train.steps=100)");
    RawValue r;
    r.text = o.substr(eq + 1);
    r.where = "override '" + o + "'";
    raw.emplace_back(o.substr(0, eq), r);
  }
  return from_values(resolve_values(kind_of(raw), raw));
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  return resolve_config(read_file(path), path, overrides);
}

RunConfig config_from_values(const nlohmann::ordered_json& stored, const std::string& source) {
  KVD_CHECK(stored.is_object(), source, ": the stored config is not an object");
  RawValues raw;
  for (const auto& [k, v] : stored.items()) {
    RawValue r;
    r.where = source;
    r.null = v.is_null();
    r.list = v.is_array() || v.is_object();
    if (!r.null && !r.list) r.text = v.is_string() ? v.get<std::string>() : v.dump();
    raw.emplace_back(k, r);
  }
  return with_json_context(source, "invalid stored config", [&] { return from_values(resolve_values(kind_of(raw), raw)); });
}

}  // namespace kvd
