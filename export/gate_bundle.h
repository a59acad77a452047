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
#include <nlohmann/json.hpp>

#include "export/gate_manifest.h"

namespace kvd {

class Component;
class Model;
struct ModelConfig;

// The bundle tensor name of a component parameter ("layers.3.w1.weight" ->
// "model.layers.3.self_attn.retention_gate.w1.weight" for kind "retention_gate").
std::string bundle_tensor_name(const std::string& kind, const std::string& parameter_name);

// Writes <dir>/gates.safetensors and <dir>/kvdistill.json (creating dir; each file atomic). The manifest is
// the component's manifest() plus format_version, kind, base_model {id, config_sha256}, dtype "F32" and
// tensor names.
void save_gate_bundle(const std::string& dir, const Component& component, const BaseModelInfo& base);

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
