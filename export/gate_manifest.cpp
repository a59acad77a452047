// The gate bundle manifest (kvdistill.json): reading and checking it needs no LibTorch, so this file is
// also compiled into the manifest fuzz target (tests/fuzz/fuzz_bundle.cpp).
#include <string>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "export/gate_manifest.h"

namespace kvd {
namespace {

std::string short_hash(const std::string& h) { return h.substr(0, 12); }

const char* kCorrupt = "; the gate bundle is corrupt, export it again";

}  // namespace

nlohmann::json read_gate_manifest(const std::string& dir) {
  const std::string path = dir + "/kvdistill.json";
  nlohmann::json m = parse_json(read_file(path), path, "not valid JSON", kCorrupt);
  KVD_CHECK(m.is_object(), path, ": expected a JSON object", kCorrupt);
  return m;
}

void check_gate_manifest(const nlohmann::json& m, const std::string& mpath, const std::string& component_kind,
                         const nlohmann::json& mine, const BaseModelInfo& base) {
  with_json_context(mpath, "malformed manifest", [&] {
    KVD_CHECK(m.is_object(), mpath, ": expected a JSON object", kCorrupt);
    const int64_t version = m.at("format_version").get<int64_t>();
    KVD_CHECK(version == kGateBundleFormatVersion, mpath, ": format_version ", version, ", this kvdistill reads ",
              kGateBundleFormatVersion);
    const std::string kind = m.at("kind").get<std::string>();
    KVD_CHECK(kind == component_kind, mpath, ": the bundle holds a '", kind, "' component, not a '", component_kind,
              "'");
    const std::string id = m.at("base_model").at("id").get<std::string>();
    const std::string hash = m.at("base_model").at("config_sha256").get<std::string>();
    KVD_CHECK(hash == base.config_sha256, mpath, ": these gates were trained for model '", id, "' (config sha256 ",
              short_hash(hash), "), not for model '", base.model_id, "' (config sha256 ",
              short_hash(base.config_sha256), "); load the model they were trained for, or train gates for this one");
    for (const char* key : {"num_layers", "hidden_size", "num_kv_heads", "gate_hidden"}) {
      if (!mine.contains(key)) continue;
      KVD_CHECK(m.contains(key) && m.at(key) == mine.at(key), mpath, ": ", key, " is ",
                (m.contains(key) ? m.at(key).dump() : std::string("missing")), " in the bundle but ",
                mine.at(key).dump(), " in this component (model '", base.model_id, "')");
    }
  });
}

}  // namespace kvd
