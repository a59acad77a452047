#include "export/gate_bundle.h"

#include <unistd.h>

#include <filesystem>
#include <vector>

#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "gates/components.h"
#include "models/model.h"
#include "gates/component.h"
#include "models/safetensors.h"
#include "models/weights.h"

namespace kvd {
namespace {

const char* kManifestFile = "kvdistill.json";
const char* kTensorFile = "gates.safetensors";

}  // namespace

BaseModelInfo base_model_info(const std::string& model_dir, const std::string& model_id) {
  BaseModelInfo info;
  info.config_sha256 = sha256_hex(read_file(model_dir + "/config.json"));
  if (!model_id.empty()) {
    info.model_id = model_id;
  } else {
    std::filesystem::path p(model_dir);
    if (!p.has_filename()) p = p.parent_path();
    info.model_id = p.filename().string();
  }
  return info;
}

std::string bundle_tensor_name(const std::string& kind, const std::string& parameter_name) {
  const std::string prefix = "layers.";
  if (parameter_name.rfind(prefix, 0) == 0) {
    const size_t dot = parameter_name.find('.', prefix.size());
    KVD_CHECK(dot != std::string::npos, "bundle_tensor_name: unexpected parameter name '", parameter_name, "'");
    const std::string layer = parameter_name.substr(prefix.size(), dot - prefix.size());
    return "model.layers." + layer + ".self_attn." + kind + "." + parameter_name.substr(dot + 1);
  }
  return "kvdistill." + kind + "." + parameter_name;  // component-wide parameters (none for retention gates)
}

BundleDType parse_bundle_dtype(const std::string& s) {
  if (s == "f32" || s == "float32") return BundleDType::F32;
  if (s == "bf16" || s == "bfloat16") return BundleDType::BF16;
  if (s == "f16" || s == "float16") return BundleDType::F16;
  KVD_FAIL("unknown bundle dtype '", s, "'; use f32, bf16 or f16");
}

const char* bundle_dtype_name(BundleDType d) {
  switch (d) {
    case BundleDType::F32: return "F32";
    case BundleDType::BF16: return "BF16";
    case BundleDType::F16: return "F16";
  }
  return "F32";
}

c10::ScalarType bundle_scalar_type(BundleDType d) {
  return d == BundleDType::BF16 ? torch::kBFloat16 : d == BundleDType::F16 ? torch::kHalf : torch::kFloat;
}

void save_gate_bundle(const std::string& final_dir, const Component& component, const BaseModelInfo& base,
                      BundleDType dtype) {
  // Written whole into a temporary directory, then renamed into place: a reader never sees a bundle whose
  // tensors and manifest come from different saves, and a failed save (a full disk) leaves the old one.
  std::string d = final_dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const std::string dir = d + ".tmp." + std::to_string(::getpid());
  remove_tree(dir);
  make_dirs(dir);
  struct Cleanup {
    const std::string& p;
    bool armed = true;
    ~Cleanup() {
      if (armed) remove_tree(p);
    }
  } cleanup{dir};
  const std::string kind = component.kind();
  const c10::ScalarType st = bundle_scalar_type(dtype);
  const DType file_dtype = dtype_from_name(bundle_dtype_name(dtype), "save_gate_bundle");
  std::vector<at::Tensor> hold;  // CPU copies in the bundle's dtype backing the TensorRefs
  std::vector<TensorRef> refs;
  std::vector<std::string> names;
  for (const auto& item : component.named_parameters()) {
    at::Tensor t = item.value().detach().to(torch::kCPU, torch::kFloat).to(st).contiguous();  // round to nearest
    hold.push_back(t);
    std::string name = bundle_tensor_name(kind, item.key());
    names.push_back(name);
    refs.push_back(TensorRef{name, file_dtype, std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), t.data_ptr()});
  }
  write_safetensors(dir + "/" + kTensorFile, refs, {{"format", "pt"}, {"kvdistill_kind", kind}});
  // Another library's layout of the same weights (Component::foreign_layout): its config and the parameters under
  // their own names, in the same dtype.
  const nlohmann::json foreign = component.foreign_layout();
  if (!foreign.is_null()) {
    const std::string sub = dir + "/" + foreign.at("dir").get<std::string>();
    make_dirs(sub);
    write_file_atomic(sub + "/config.json", foreign.at("config").dump(2) + "\n");
    std::vector<TensorRef> raw = refs;
    std::vector<std::string> raw_names;
    for (const auto& item : component.named_parameters()) raw_names.push_back(item.key());
    for (size_t i = 0; i < raw.size(); ++i) raw[i].name = raw_names[i];
    write_safetensors(sub + "/" + foreign.at("tensor_file").get<std::string>(), raw, {{"format", "pt"}});
  }
  nlohmann::json m = component.manifest();
  m["format_version"] = kGateBundleFormatVersion;
  m["kind"] = kind;
  m["base_model"] = {{"id", base.model_id}, {"config_sha256", base.config_sha256}};
  m["dtype"] = bundle_dtype_name(dtype);
  m["tensors"] = names;
  write_file_atomic(dir + "/" + kManifestFile, m.dump(2) + "\n");
  const std::string old = d + ".old." + std::to_string(::getpid());
  std::error_code ec;
  if (std::filesystem::exists(d, ec)) {
    std::filesystem::rename(d, old, ec);
    KVD_CHECK(!ec, d, ": cannot move the previous bundle aside (", ec.message(), ")");
  }
  std::filesystem::rename(dir, d, ec);
  KVD_CHECK(!ec, d, ": cannot rename ", dir, " into place (", ec.message(), ")");
  cleanup.armed = false;
  remove_tree(old);
}

void load_gate_bundle(const std::string& dir, Component& component, const BaseModelInfo& base) {
  const std::string mpath = dir + "/" + kManifestFile;
  check_gate_manifest(read_gate_manifest(dir), mpath, component.kind(), component.manifest(), base);
  SafetensorsFile f(dir + "/" + kTensorFile);
  torch::NoGradGuard no_grad;
  for (auto& item : component.named_parameters()) {
    const std::string name = bundle_tensor_name(component.kind(), item.key());
    const TensorView* v = f.find(name);
    KVD_CHECK(v != nullptr, f.path(), ": tensor '", name, "' not found; the bundle does not match this component");
    at::Tensor t = view_to_tensor(*v);  // CPU, its own dtype
    at::Tensor& p = item.value();
    KVD_CHECK(t.sizes() == p.sizes(), f.path(), ": tensor '", name, "' has shape ", t.sizes(), ", expected ", p.sizes());
    p.copy_(t.to(p.device(), p.scalar_type()));
  }
}

nlohmann::json inspect_gate_bundle(const std::string& dir) {
  const std::string mpath = dir + "/" + kManifestFile;
  const nlohmann::json m = read_gate_manifest(dir);
  nlohmann::json out;
  with_json_context(mpath, "malformed manifest", [&] {
    const int64_t version = m.at("format_version").get<int64_t>();
    KVD_CHECK(version == kGateBundleFormatVersion, mpath, ": format_version ", version, ", this kvdistill reads ",
              kGateBundleFormatVersion, "; export the bundle again with this kvdistill");
    const std::string kind = m.at("kind").get<std::string>();
    KVD_CHECK(find_component(kind) != nullptr, mpath, ": the bundle holds a '", kind,
              "' component, which this kvdistill does not know");
    m.at("base_model").at("id").get<std::string>();
    m.at("base_model").at("config_sha256").get<std::string>();
    const std::string dtype = m.at("dtype").get<std::string>();
    KVD_CHECK(dtype == "F32" || dtype == "BF16" || dtype == "F16", mpath, ": dtype '", dtype,
              "' is not a bundle dtype (F32, BF16, F16); the bundle is corrupt, export it again");
    const std::vector<std::string> names = m.at("tensors").get<std::vector<std::string>>();
    SafetensorsFile f(dir + "/" + kTensorFile);  // checks the header and every tensor's extent
    KVD_CHECK(f.tensors().size() == names.size(), f.path(), ": holds ", f.tensors().size(), " tensors, the manifest ",
              names.size(), "; the bundle is corrupt, export it again");
    nlohmann::json tensors = nlohmann::json::array();
    int64_t bytes = 0;
    for (const std::string& name : names) {
      const TensorView* v = f.find(name);
      KVD_CHECK(v != nullptr, f.path(), ": tensor '", name, "' of the manifest is missing; the bundle is corrupt, "
                "export it again");
      KVD_CHECK(dtype_name(v->dtype) == dtype, f.path(), ": tensor '", name, "' is ", dtype_name(v->dtype),
                ", the manifest says ", dtype, "; the bundle is corrupt, export it again");
      tensors.push_back({{"name", name}, {"dtype", dtype_name(v->dtype)}, {"shape", v->shape}});
      bytes += static_cast<int64_t>(v->nbytes);
    }
    out = {{"manifest", m}, {"tensors", tensors}, {"tensor_bytes", bytes}};
  });
  return out;
}

std::shared_ptr<Component> load_component(const std::string& dir, const Model& model, const BaseModelInfo& base) {
  return load_component(dir, model.config(), model.device(), base);
}

std::shared_ptr<Component> load_component(const std::string& dir, const ModelConfig& cfg, c10::Device device,
                                          const BaseModelInfo& base) {
  const std::string mpath = dir + "/" + kManifestFile;
  const nlohmann::json m = read_gate_manifest(dir);
  KVD_CHECK(m.is_object() && m.contains("kind") && m.at("kind").is_string(), mpath,
            ": the manifest names no component kind; export the bundle again");
  const std::string kind = m.at("kind").get<std::string>();
  const ComponentSpec* spec = find_component(kind);
  if (spec == nullptr) {
    std::string known;
    for (const std::string& k : component_kinds()) known += (known.empty() ? "" : ", ") + k;
    KVD_FAIL(mpath, ": the bundle holds a '", kind, "' component, which this kvdistill does not know (known kinds: ",
             known, ")");
  }
  nlohmann::json options;
  try {
    options = spec->options_from_manifest ? spec->options_from_manifest(m) : m.value("options", nlohmann::json::object());
    options = complete_options(*spec, options, mpath);
  } catch (const nlohmann::json::exception& e) {
    KVD_FAIL(mpath, ": malformed options (", e.what(), ")");
  }
  std::shared_ptr<Component> c = spec->make(cfg, options);
  load_gate_bundle(dir, *c, base);
  c->to(device, torch::kFloat32);
  return c;
}

}  // namespace kvd
