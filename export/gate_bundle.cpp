#include "export/gate_bundle.h"

#include <unistd.h>

#include <filesystem>
#include <vector>

#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
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

void save_gate_bundle(const std::string& final_dir, const Component& component, const BaseModelInfo& base) {
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
  std::vector<at::Tensor> hold;  // CPU float32 copies backing the TensorRefs
  std::vector<TensorRef> refs;
  std::vector<std::string> names;
  for (const auto& item : component.named_parameters()) {
    at::Tensor t = item.value().detach().to(torch::kCPU, torch::kFloat).contiguous();
    hold.push_back(t);
    std::string name = bundle_tensor_name(kind, item.key());
    names.push_back(name);
    refs.push_back(TensorRef{name, DType::F32, std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), t.data_ptr()});
  }
  write_safetensors(dir + "/" + kTensorFile, refs, {{"format", "pt"}, {"kvdistill_kind", kind}});
  nlohmann::json m = component.manifest();
  m["format_version"] = kGateBundleFormatVersion;
  m["kind"] = kind;
  m["base_model"] = {{"id", base.model_id}, {"config_sha256", base.config_sha256}};
  m["dtype"] = "F32";
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
