// Typed option tables: one row per documented key (its type, default and meaning), shared by the run config
// (train/config.h) and by every learned part's own options (gates/components.h), so that `kvdistill train
// --list-keys` documents them all from the same rows.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace kvd {

enum class ValueType { Int, Float, String, Bool };
const char* value_type_name(ValueType t);  // "an integer", "a number", ...
const char* value_type_short(ValueType t);  // "int", "float", ...

// One documented key.
struct ConfigKey {
  const char* key;    // dotted, e.g. "train.steps" or "component.budget"
  ValueType type;
  const char* value;  // default, as YAML would write it ("" for an empty string)
  const char* doc;    // one line
};

// Parses a scalar's text as the key's type; throws kvd::Error naming the key and `where` it came from.
nlohmann::ordered_json parse_option(const ConfigKey& k, const std::string& text, const std::string& where);

}  // namespace kvd
