#include "common/options.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "common/error.h"

namespace kvd {

const char* value_type_name(ValueType t) {
  switch (t) {
    case ValueType::Int: return "an integer";
    case ValueType::Float: return "a number";
    case ValueType::String: return "a string";
    case ValueType::Bool: return "true or false";
  }
  return "?";
}

const char* value_type_short(ValueType t) {
  switch (t) {
    case ValueType::Int: return "int";
    case ValueType::Float: return "float";
    case ValueType::String: return "string";
    case ValueType::Bool: return "bool";
  }
  return "?";
}

nlohmann::ordered_json parse_option(const ConfigKey& k, const std::string& text, const std::string& where) {
  auto bad = [&]() -> nlohmann::ordered_json {
    KVD_FAIL("config key '", k.key, "' (", where, ") must be ", value_type_name(k.type), ", got '", text, "'");
  };
  switch (k.type) {
    case ValueType::String: return text;
    case ValueType::Bool:
      if (text == "true") return true;
      if (text == "false") return false;
      return bad();
    case ValueType::Int: {
      errno = 0;
      char* end = nullptr;
      long long v = std::strtoll(text.c_str(), &end, 10);
      if (text.empty() || *end != '\0' || errno) return bad();
      return static_cast<int64_t>(v);
    }
    case ValueType::Float: {
      errno = 0;
      char* end = nullptr;
      double v = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || errno || !std::isfinite(v)) return bad();
      return v;
    }
  }
  return bad();
}

}  // namespace kvd
