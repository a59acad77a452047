// The registry of learned parts: kind -> its documented options (`component.*` config keys), its loss terms
// with their default weights (`loss.*` keys) and a factory. The trainer, `kvdistill train --list-keys`,
// bundle loading (export/) and the eval harness find components here and nowhere else.
//
// Adding a learned part: one file in gates/ defining the component and a `ComponentSpec <kind>_spec()`, one
// line in kBuiltins (components.cpp). Code outside the library (a test, a plugin) may add kinds at run time
// with register_component().
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/options.h"

namespace kvd {

class Component;
struct ModelConfig;

// options: the `component.*` values (without the prefix), every key of the spec present and typed.
using ComponentFactory = std::function<std::shared_ptr<Component>(const ModelConfig& cfg, const nlohmann::json& options)>;

struct ComponentSpec {
  std::string kind;                 // component.kind
  std::string doc;                  // one line for --list-keys
  std::vector<ConfigKey> options;   // "component.<name>" keys (component.kind excluded)
  std::vector<ConfigKey> losses;    // "loss.<term>" weights, Float, in the order the terms are summed
  ComponentFactory make;            // parameters on CPU, float32; draws its init from the torch generator
  // Validates typed options (values of `options`), throwing a kvd::Error naming the `component.*` key.
  std::function<void(const nlohmann::json& options)> check;
  // Options to rebuild a component from a bundle manifest; default: manifest["options"].
  std::function<nlohmann::json(const nlohmann::json& manifest)> options_from_manifest;
  // Named variants of the kind (e.g. query_rows: judgeq, lookahead): each is also a method prefix,
  // `<variant>:<bundle dir>`, which loads the bundle and insists that its manifest's "variant" is that one.
  std::vector<std::string> variants;
  // Other names of the kind: accepted as `component.kind` and as method prefixes (`<alias>:<bundle dir>`).
  std::vector<std::string> aliases;
};

// The kinds the registry starts with (gates/builtin_components.cpp).
std::vector<ComponentSpec> builtin_component_specs();

// Adds a kind (replacing none: a kind registered twice is an error).
void register_component(ComponentSpec spec);
// The spec of `kind` (or of a kind that has it among its aliases), or nullptr.
const ComponentSpec* find_component(const std::string& kind);
// The spec of `kind`; an unknown kind throws naming `where` and the known kinds.
const ComponentSpec& component_spec(const std::string& kind, const std::string& where);
std::vector<std::string> component_kinds();
// The spec that declares `variant` (ComponentSpec::variants), or nullptr.
const ComponentSpec* find_component_variant(const std::string& variant);

// Defaults of a spec's options, as the factory takes them: {"budget": 128, ...}.
nlohmann::json default_options(const ComponentSpec& spec);
// `partial` (short names) completed with the defaults, each value checked against its key's type, then
// spec.check; an unknown key throws naming it and `where`.
nlohmann::json complete_options(const ComponentSpec& spec, const nlohmann::json& partial, const std::string& where);

// A fresh component of `kind` with `options` (completed with the defaults), parameters float32 on CPU.
std::shared_ptr<Component> make_component(const std::string& kind, const ModelConfig& cfg,
                                          const nlohmann::json& options = nlohmann::json::object());

}  // namespace kvd
