#include "gates/components.h"

#include <algorithm>
#include <map>
#include <mutex>

#include "common/error.h"

namespace kvd {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, ComponentSpec> specs;
  std::vector<std::string> order;
  Registry() {
    for (ComponentSpec& s : builtin_component_specs()) add(std::move(s));
  }
  void add(ComponentSpec s) {
    KVD_CHECK(!s.kind.empty() && s.make, "register_component: a spec needs a kind and a factory");
    KVD_CHECK(!specs.count(s.kind), "register_component: component kind '", s.kind, "' is already registered");
    for (const ConfigKey& k : s.options)
      KVD_CHECK(std::string(k.key).rfind("component.", 0) == 0, "register_component: option '", k.key,
                "' of '", s.kind, "' must start with 'component.'");
    for (const ConfigKey& k : s.losses)
      KVD_CHECK(std::string(k.key).rfind("loss.", 0) == 0 && k.type == ValueType::Float,
                "register_component: loss weight '", k.key, "' of '", s.kind, "' must be a Float 'loss.*' key");
    for (const std::string& a : s.aliases)
      for (const auto& [kind, other] : specs)
        KVD_CHECK(a != kind && std::find(other.aliases.begin(), other.aliases.end(), a) == other.aliases.end(),
                  "register_component: alias '", a, "' of '", s.kind, "' already names '", kind, "'");
    for (const std::string& v : s.variants)
      for (const auto& [kind, other] : specs)
        for (const std::string& w : other.variants)
          KVD_CHECK(v != w, "register_component: variant '", v, "' of '", s.kind, "' is already a variant of '", kind, "'");
    order.push_back(s.kind);
    specs.emplace(s.kind, std::move(s));
  }
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void register_component(ComponentSpec spec) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.add(std::move(spec));
}

const ComponentSpec* find_component(const std::string& kind) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.specs.find(kind);
  if (it != r.specs.end()) return &it->second;
  for (const auto& [k, spec] : r.specs)
    if (std::find(spec.aliases.begin(), spec.aliases.end(), kind) != spec.aliases.end()) return &spec;
  return nullptr;
}

const ComponentSpec* find_component_variant(const std::string& variant) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  for (const auto& [kind, spec] : r.specs)
    for (const std::string& v : spec.variants)
      if (v == variant) return &spec;
  return nullptr;
}

std::vector<std::string> component_kinds() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.order;
}

const ComponentSpec& component_spec(const std::string& kind, const std::string& where) {
  if (const ComponentSpec* s = find_component(kind)) return *s;
  std::string known;
  for (const std::string& k : component_kinds()) known += (known.empty() ? "" : ", ") + k;
  KVD_FAIL(where, ": unknown component kind '", kind, "'; known kinds: ", known);
}

nlohmann::json default_options(const ComponentSpec& spec) {
  nlohmann::json o = nlohmann::json::object();
  for (const ConfigKey& k : spec.options)
    o[std::string(k.key).substr(10)] = parse_option(k, k.value, "default of component '" + spec.kind + "'");
  return o;
}

nlohmann::json complete_options(const ComponentSpec& spec, const nlohmann::json& partial, const std::string& where) {
  nlohmann::json o = default_options(spec);
  KVD_CHECK(partial.is_object(), where, ": component options must be an object");
  for (const auto& [name, value] : partial.items()) {
    const ConfigKey* key = nullptr;
    for (const ConfigKey& k : spec.options)
      if (name == std::string(k.key).substr(10)) key = &k;
    if (!key) {
      std::string known;
      for (const ConfigKey& k : spec.options) known += (known.empty() ? "" : ", ") + std::string(k.key);
      KVD_FAIL(where, ": 'component.", name, "' is not an option of component '", spec.kind, "'; its options: ",
               known.empty() ? "none" : known);
    }
    const bool ok = key->type == ValueType::String  ? value.is_string()
                    : key->type == ValueType::Bool  ? value.is_boolean()
                    : key->type == ValueType::Int   ? value.is_number_integer()
                                                    : value.is_number();
    KVD_CHECK(ok, where, ": 'component.", name, "' must be ", value_type_name(key->type), ", got ", value.dump());
    o[name] = key->type == ValueType::Float ? nlohmann::json(value.get<double>()) : value;
  }
  if (spec.check) {
    try {
      spec.check(o);
    } catch (const Error& e) {
      KVD_FAIL(where, ": ", e.what());  // names the file or the config the values came from
    }
  }
  return o;
}

std::shared_ptr<Component> make_component(const std::string& kind, const ModelConfig& cfg, const nlohmann::json& options) {
  const ComponentSpec& spec = component_spec(kind, "make_component");
  return spec.make(cfg, complete_options(spec, options, "component '" + kind + "'"));
}

}  // namespace kvd
