// Fuzz target: a gate bundle manifest (kvdistill.json), read and checked against a retention gate's own
// manifest the way `load_component` (export/gate_bundle.h) reads and checks one before any tensor. The bounds
// of the options a manifest carries are checked by the component's spec (tests/train/test_component_seam.cpp).
#include "export/gate_manifest.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = kvd::fuzz::scratch_path("bundle");
    ::mkdir(d.c_str(), 0755);
    return d;
  }();
  kvd::fuzz::write_bytes(dir + "/kvdistill.json", data, size);
  static const nlohmann::json mine = {{"kind", "retention_gate"}, {"num_layers", 2}, {"hidden_size", 64},
                                      {"num_kv_heads", 2},         {"gate_hidden", 16}, {"budget", 128}};
  static const kvd::BaseModelInfo base{"tiny", std::string(64, 'a')};
  kvd::fuzz::expect_clean([&] {
    const nlohmann::json m = kvd::read_gate_manifest(dir);
    kvd::check_gate_manifest(m, dir + "/kvdistill.json", "retention_gate", mine, base);
  });
  return 0;
}
