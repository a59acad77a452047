// Gate bundles (DESIGN.md, "Formats"): a directory a serving engine can load, holding
//   gates.safetensors  float32 tensors named after the base model's HF paths,
//                      model.layers.{i}.self_attn.retention_gate.{w1.weight, w1.bias, w2.weight, bias}
//   kvdistill.json     the manifest: format version, component kind, base model id and config hash
//                      (sha256 of config.json), dims, dtype, budget defaults, score semantics.
// Loading checks the manifest against the model and the component before touching any parameter.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include "export/gate_manifest.h"

namespace kvd {

class Component;
class Model;
struct ModelConfig;

// The bundle tensor name of a component parameter ("layers.3.w1.weight" ->
// "model.layers.3.self_attn.retention_gate.w1.weight" for kind "retention_gate").
std::string bundle_tensor_name(const std::string& kind, const std::string& parameter_name);

// The dtype a bundle stores its tensors in (they load into float32 parameters whatever it is).
enum class BundleDType { F32, BF16, F16 };
// "f32" | "float32" | "bf16" | "bfloat16" | "f16" | "float16"; anything else is a kvd::Error listing these.
BundleDType parse_bundle_dtype(const std::string& s);
const char* bundle_dtype_name(BundleDType d);  // "F32", "BF16", "F16" (safetensors spelling)
c10::ScalarType bundle_scalar_type(BundleDType d);  // kFloat, kBFloat16, kHalf

// Writes <dir>/gates.safetensors and <dir>/kvdistill.json, whole into a temporary directory renamed into place
// (a failed save leaves the previous bundle). The manifest is the component's manifest() plus format_version,
// kind, base_model {id, config_sha256}, dtype and tensor names.
void save_gate_bundle(const std::string& dir, const Component& component, const BaseModelInfo& base,
                      BundleDType dtype = BundleDType::F32);

// Checks a bundle without its model: the manifest (format version, kind, base model, dtype, tensor list) and
// the tensor file (a valid safetensors file holding exactly the manifest's tensors, in the manifest's dtype).
// Returns {"manifest": ..., "tensors": [{"name", "dtype", "shape"}], "tensor_bytes": n}. A corrupt, truncated or
// foreign bundle is a kvd::Error naming the file and what to do.
nlohmann::json inspect_gate_bundle(const std::string& dir);

// Loads a bundle into `component` (parameters copied in place, keeping their dtype and device). Throws
// kvd::Error when the format version, component kind, base model config hash or dims differ (naming both
// models) or a tensor is missing / mis-shaped.
void load_gate_bundle(const std::string& dir, Component& component, const BaseModelInfo& base);

// A learned part from its bundle, for `model` (whose config.json `base` describes): the manifest's kind is
// looked up in the registry (gates/components.h; an unknown kind is refused, naming the known ones), the
// component is built from the manifest's options, checked and loaded as load_gate_bundle does, and moved to
// the model's device (float32 parameters).
std::shared_ptr<Component> load_component(const std::string& bundle_dir, const Model& model, const BaseModelInfo& base);
// The same for a model config on `device` (e.g. to validate a bundle on the CPU before the model is loaded).
std::shared_ptr<Component> load_component(const std::string& bundle_dir, const ModelConfig& cfg, c10::Device device,
                                          const BaseModelInfo& base);

}  // namespace kvd
