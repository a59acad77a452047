// The component list of the run-config fuzz target: the registry (gates/components.cpp) without LibTorch.
// One kind named like the shipped retention gate, with option and loss keys of every value type, so that
// fuzzed configs exercise the per-kind key resolution; its factory is never called by the config parser.
#include "common/error.h"
#include "gates/components.h"

namespace kvd {

std::vector<ComponentSpec> builtin_component_specs() {
  ComponentSpec s;
  s.kind = "retention_gate";
  s.doc = "fuzz stand-in (option tables only)";
  s.options = {
      {"component.budget", ValueType::Int, "128", "an integer option"},
      {"component.hidden", ValueType::Int, "512", "an integer option"},
      {"component.bias_init", ValueType::Float, "18.0", "a number option"},
      {"component.note", ValueType::String, "", "a string option"},
      {"component.flag", ValueType::Bool, "false", "a boolean option"},
  };
  s.losses = {
      {"loss.kl", ValueType::Float, "1.0", "a loss weight"},
      {"loss.ce", ValueType::Float, "0.0", "a loss weight"},
      {"loss.capacity", ValueType::Float, "1.0", "a loss weight"},
  };
  s.check = [](const nlohmann::json& o) {
    KVD_CHECK(o.at("budget").get<int64_t>() > 0, "config key 'component.budget': must be > 0");
  };
  s.make = [](const ModelConfig&, const nlohmann::json&) -> std::shared_ptr<Component> {
    KVD_FAIL("the fuzz build makes no components");
  };
  return {s};
}

}  // namespace kvd
