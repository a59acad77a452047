// One readable line from an nlohmann::json exception, for error messages that name the file.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace kvd {

// The exception's text without its "[json.exception.parse_error.101] " tag, with bytes outside printable
// ASCII shown as '?' (the "last read" excerpt may hold invalid UTF-8 from the input).
inline std::string json_error_text(const nlohmann::json::exception& e) {
  std::string s = e.what();
  if (!s.empty() && s[0] == '[') {
    const size_t close = s.find("] ");
    if (close != std::string::npos) s = s.substr(close + 2);
  }
  for (char& ch : s) {
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) > 0x7e) ch = '?';
  }
  return s;
}

}  // namespace kvd
