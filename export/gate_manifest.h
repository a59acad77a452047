// The gate bundle manifest (kvdistill.json, see export/gate_bundle.h): what identifies a base model, reading
// a manifest and checking it against a component. Free of LibTorch, so that the manifest fuzz target
// (tests/fuzz/fuzz_bundle.cpp) builds without it; export/gate_manifest.cpp.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace kvd {

constexpr int64_t kGateBundleFormatVersion = 1;

// What identifies a base model: its id (e.g. "HuggingFaceTB/SmolLM2-135M-Instruct" or the directory name)
// and the sha256 of its config.json bytes.
struct BaseModelInfo {
  std::string model_id;
  std::string config_sha256;
};
// Reads <model_dir>/config.json. model_id defaults to the directory's last path component.
BaseModelInfo base_model_info(const std::string& model_dir, const std::string& model_id = "");

// The manifest of a bundle (throws naming the file if missing, not JSON or not an object).
nlohmann::json read_gate_manifest(const std::string& dir);

// Checks format version, component kind, base model config hash and the dims in `mine` (the component's own
// manifest) against `manifest`; a missing or mistyped field is a kvd::Error naming `manifest_path`.
void check_gate_manifest(const nlohmann::json& manifest, const std::string& manifest_path,
                         const std::string& component_kind, const nlohmann::json& mine, const BaseModelInfo& base);

}  // namespace kvd
